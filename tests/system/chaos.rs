//! 2,000 commands while the relay and every projection worker are killed (their tasks
//! dropped mid-flight, connections and all) and restarted at random points. At the end
//! every read model equals a from-scratch rebuild and every event was applied exactly
//! once.

use std::sync::Arc;
use std::time::Duration;

use futures::future::join_all;
use hindsight_commands::event::read_events;
use hindsight_commands::relay::{self, Relay};
use hindsight_commands::{Actor, CommandBus, EventMetadata, StoreSettings};
use hindsight_domain::ids::{OrderId, ProductId, UserId};
use hindsight_domain::order::{NewOrderLine, OrderCommand};
use hindsight_domain::product::ProductCommand;
use hindsight_domain::role::Role;
use hindsight_domain::user::{PasswordHash, UserCommand};
use hindsight_domain::values::{
    Currency, Description, Email, Money, PersonName, ProductName, Quantity, Sku,
};
use hindsight_projections::read_model::ReadModel;
use hindsight_projections::worker::{self, ProjectionWorker};
use hindsight_projections::{audit_trail, orders, products, sales, users};
use hindsight_tests::{eventually, TestDb, TestStream};
use rand::Rng;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const COMMANDS: usize = 2_000;

fn metadata(n: usize) -> EventMetadata {
    EventMetadata::for_request(Actor::system(), format!("chaos-{n}"))
}

/// Each model with a fresh instance of itself writing to suffixed tables.
fn models() -> Vec<(Arc<dyn ReadModel>, Arc<dyn ReadModel>)> {
    let suffix = "_rebuilt";
    vec![
        (
            Arc::new(users::Users::live()),
            Arc::new(users::Users::with_suffix(suffix)),
        ),
        (
            Arc::new(products::Products::live()),
            Arc::new(products::Products::with_suffix(suffix)),
        ),
        (
            Arc::new(orders::Orders::live()),
            Arc::new(orders::Orders::with_suffix(suffix)),
        ),
        (
            Arc::new(sales::Sales::live()),
            Arc::new(sales::Sales::with_suffix(suffix)),
        ),
        (
            Arc::new(audit_trail::AuditTrail::live()),
            Arc::new(audit_trail::AuditTrail::with_suffix(suffix)),
        ),
    ]
}

fn start_relay(db: &TestDb, stream: &TestStream) -> JoinHandle<()> {
    let relay = Relay::new(
        db.pool.clone(),
        stream.client.clone(),
        stream.relay_settings(),
    );
    tokio::spawn(relay.run(CancellationToken::new()))
}

fn start_worker(db: &TestDb, stream: &TestStream, model: Arc<dyn ReadModel>) -> JoinHandle<()> {
    let worker = ProjectionWorker::new(
        db.pool.clone(),
        stream.client.clone(),
        model,
        stream.worker_settings(),
    );
    tokio::spawn(worker.run(CancellationToken::new()))
}

struct Shop {
    products: Vec<(ProductId, Sku)>,
    customers: Vec<UserId>,
}

async fn seed(commands: &CommandBus) -> Shop {
    let mut products = Vec::new();
    for n in 0..10 {
        let id = ProductId::new();
        let sku = Sku::parse(&format!("CHAOS-{n}")).unwrap();
        commands
            .products
            .execute(
                id.as_uuid(),
                ProductCommand::Create {
                    product_id: id,
                    sku: sku.clone(),
                    name: ProductName::parse(&format!("Chaos {n}")).unwrap(),
                    description: Description::parse("stress").unwrap(),
                    price: Money::new(250, Currency::EUR).unwrap(),
                    stock: 1_000_000,
                },
                &metadata(n),
                None,
            )
            .await
            .unwrap()
            .unwrap();
        products.push((id, sku));
    }
    let mut customers = Vec::new();
    for n in 0..10 {
        let id = UserId::new();
        commands
            .users
            .execute(
                id.as_uuid(),
                UserCommand::Register {
                    user_id: id,
                    email: Email::parse(&format!("chaos{n}@example.com")).unwrap(),
                    name: PersonName::parse("Chaos").unwrap(),
                    password_hash: PasswordHash::new("$argon2id$v=19$x".to_owned()).unwrap(),
                    role: Role::Customer,
                },
                &metadata(n),
                None,
            )
            .await
            .unwrap()
            .unwrap();
        customers.push(id);
    }
    Shop {
        products,
        customers,
    }
}

/// One scripted step: several commands across aggregates, chosen by `n`.
async fn step(commands: &CommandBus, shop: &Shop, n: usize) -> usize {
    let (product, sku) = &shop.products[n % shop.products.len()];
    let customer = shop.customers[n % shop.customers.len()];
    match n % 4 {
        0 => {
            commands
                .products
                .execute(
                    product.as_uuid(),
                    ProductCommand::Restock {
                        quantity: Quantity::new(1 + (n % 7) as u32).unwrap(),
                    },
                    &metadata(n),
                    None,
                )
                .await
                .unwrap()
                .unwrap();
            1
        }
        1 => {
            commands
                .users
                .execute(
                    customer.as_uuid(),
                    UserCommand::ChangeName {
                        name: PersonName::parse(&format!("Chaos {n}")).unwrap(),
                    },
                    &metadata(n),
                    None,
                )
                .await
                .unwrap()
                .unwrap();
            1
        }
        _ => {
            // An order's life: place, reserve, confirm, pay, then ship or cancel.
            let order = OrderId::new();
            let quantity = Quantity::new(1 + (n % 3) as u32).unwrap();
            let price = Money::new(250, Currency::EUR).unwrap();
            let run = |command: OrderCommand| async move {
                commands
                    .orders
                    .execute(order.as_uuid(), command, &metadata(n), None)
                    .await
                    .unwrap()
                    .unwrap();
            };
            run(OrderCommand::Place {
                order_id: order,
                customer_id: customer,
                lines: vec![NewOrderLine {
                    product_id: *product,
                    sku: sku.clone(),
                    name: ProductName::parse("Chaos").unwrap(),
                    quantity,
                    unit_price: price,
                }],
            })
            .await;
            commands
                .products
                .execute(
                    product.as_uuid(),
                    ProductCommand::ReserveStock {
                        order_id: order,
                        quantity,
                    },
                    &metadata(n),
                    None,
                )
                .await
                .unwrap()
                .unwrap();
            run(OrderCommand::Confirm).await;
            run(OrderCommand::Pay {
                amount: price.checked_mul(quantity).unwrap(),
            })
            .await;
            if n.is_multiple_of(3) {
                run(OrderCommand::Cancel { reason: None }).await;
                commands
                    .products
                    .execute(
                        product.as_uuid(),
                        ProductCommand::ReleaseReservation { order_id: order },
                        &metadata(n),
                        None,
                    )
                    .await
                    .unwrap()
                    .unwrap();
            } else {
                run(OrderCommand::Ship).await;
                commands
                    .products
                    .execute(
                        product.as_uuid(),
                        ProductCommand::CommitReservation { order_id: order },
                        &metadata(n),
                        None,
                    )
                    .await
                    .unwrap()
                    .unwrap();
            }
            6
        }
    }
}

/// Rows in one table and not the other, both ways.
async fn differences(db: &TestDb, live: &str, rebuilt: &str) -> i64 {
    sqlx::query_scalar(&format!(
        "SELECT (SELECT count(*) FROM (SELECT * FROM {live} EXCEPT ALL SELECT * FROM {rebuilt}) a) \
              + (SELECT count(*) FROM (SELECT * FROM {rebuilt} EXCEPT ALL SELECT * FROM {live}) b)"
    ))
    .fetch_one(&db.pool)
    .await
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_relay_and_workers_at_random_loses_and_doubles_nothing() {
    let db = TestDb::new().await;
    let stream = TestStream::new().await;
    let commands = Arc::new(db.commands(StoreSettings::default()));
    let shop = Arc::new(seed(&commands).await);
    let models = models();

    // Components: index 0 is the relay, the others are the workers.
    let mut handles: Vec<JoinHandle<()>> = vec![start_relay(&db, &stream)];
    for (live, _) in &models {
        handles.push(start_worker(&db, &stream, Arc::clone(live)));
    }

    let load = {
        let commands = Arc::clone(&commands);
        let shop = Arc::clone(&shop);
        tokio::spawn(async move {
            let mut issued = 0;
            let mut n = 0;
            while issued < COMMANDS {
                let batch = join_all((n..n + 8).map(|k| {
                    let commands = Arc::clone(&commands);
                    let shop = Arc::clone(&shop);
                    async move { step(&commands, &shop, k).await }
                }))
                .await;
                issued += batch.into_iter().sum::<usize>();
                n += 8;
            }
            issued
        })
    };

    let mut kills = 0;
    while !load.is_finished() {
        let pause = rand::thread_rng().gen_range(5..60);
        tokio::time::sleep(Duration::from_millis(pause)).await;
        let victim = rand::thread_rng().gen_range(0..handles.len());
        handles[victim].abort();
        kills += 1;
        let down = rand::thread_rng().gen_range(0..40);
        tokio::time::sleep(Duration::from_millis(down)).await;
        handles[victim] = if victim == 0 {
            start_relay(&db, &stream)
        } else {
            start_worker(&db, &stream, Arc::clone(&models[victim - 1].0))
        };
    }
    let issued = load.await.unwrap();
    assert!(issued >= COMMANDS, "{issued} commands");
    assert!(kills >= 10, "only {kills} kills happened");

    let head = relay::head(&db.pool).await.unwrap();
    eventually(120, "relay reaches the head", || async {
        relay::checkpoint(&db.pool, &stream.stream).await.unwrap() >= head
    })
    .await;
    for (live, _) in &models {
        let name = live.name();
        eventually(120, &format!("{name} reaches the head"), || async {
            worker::checkpoint(&db.pool, name)
                .await
                .unwrap()
                .is_some_and(|checkpoint| checkpoint.position >= head)
        })
        .await;
    }
    for handle in &handles {
        handle.abort();
    }

    // Exactly once: the audit trail has one row per event, no more, no less.
    let (events, trail, distinct): (i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM events), (SELECT count(*) FROM audit_trail), \
                (SELECT count(DISTINCT position) FROM audit_trail)",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!((trail, distinct), (events, events));

    // Every read model equals a from-scratch rebuild.
    let all = read_events(&db.pool, 0, head, i64::MAX).await.unwrap();
    for (live, rebuilt) in &models {
        for (live_table, rebuilt_table) in live.tables().iter().zip(rebuilt.tables()) {
            sqlx::query(&format!(
                "CREATE TABLE {rebuilt_table} (LIKE {live_table} INCLUDING ALL)"
            ))
            .execute(&db.pool)
            .await
            .unwrap();
        }
        for chunk in all.chunks(500) {
            let mut tx = db.pool.begin().await.unwrap();
            rebuilt.apply(&mut tx, chunk).await.unwrap();
            tx.commit().await.unwrap();
        }
        for (live_table, rebuilt_table) in live.tables().iter().zip(rebuilt.tables()) {
            assert_eq!(
                differences(&db, live_table, &rebuilt_table).await,
                0,
                "{live_table} differs from its rebuild"
            );
        }
    }
}
