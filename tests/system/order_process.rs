//! The order process manager against real Postgres and NATS: concurrent orders on scarce
//! stock, the process and the relay killed mid-flight, cancellation and shipping,
//! rejected orders of several lines, and the metadata chain of what it causes.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use futures::future::join_all;
use hindsight_commands::event::EVENT_COLUMNS;
use hindsight_commands::relay::{self, Relay};
use hindsight_commands::{Actor, ActorRole, CommandBus, EventMetadata, StoreSettings, StoredEvent};
use hindsight_domain::ids::{OrderId, ProductId, UserId};
use hindsight_domain::order::{NewOrderLine, Order, OrderCommand, OrderEvent, OrderStatus};
use hindsight_domain::product::{Product, ProductCommand, ProductEvent, Settlement};
use hindsight_domain::role::Role;
use hindsight_domain::values::{Currency, Description, Money, ProductName, Quantity, Sku};
use hindsight_projections::read_model::ReadModel;
use hindsight_projections::worker::{self, ProjectionWorker};
use hindsight_projections::{order_process, products};
use hindsight_tests::{eventually, TestDb, TestStream};
use rand::Rng;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const ORDERS: usize = 200;
const STOCK: u32 = 50;

/// A database and stream of the test's own, with the relay, the order process and the
/// products read model running as tasks the test can kill (abort) and start again.
struct Shop {
    db: TestDb,
    stream: TestStream,
    commands: CommandBus,
    relay: JoinHandle<()>,
    process: JoinHandle<()>,
    products: JoinHandle<()>,
}

impl Shop {
    async fn open() -> Self {
        let db = TestDb::new().await;
        let stream = TestStream::new().await;
        let commands = db.commands(StoreSettings::default());
        let relay = start_relay(&db, &stream);
        let process = start_worker(
            &db,
            &stream,
            Arc::new(order_process::OrderProcess::new(commands.clone())),
        );
        let products = start_worker(&db, &stream, Arc::new(products::Products::live()));
        Self {
            db,
            stream,
            commands,
            relay,
            process,
            products,
        }
    }

    fn restart_relay(&mut self) {
        self.relay.abort();
        self.relay = start_relay(&self.db, &self.stream);
    }

    fn restart_process(&mut self) {
        self.process.abort();
        self.process = start_worker(
            &self.db,
            &self.stream,
            Arc::new(order_process::OrderProcess::new(self.commands.clone())),
        );
    }

    async fn create_product(&self, sku: &str, stock: u32) -> Listed {
        let id = ProductId::new();
        let sku = Sku::parse(sku).unwrap();
        self.commands
            .products
            .execute(
                id.as_uuid(),
                ProductCommand::Create {
                    product_id: id,
                    sku: sku.clone(),
                    name: ProductName::parse("Scarce widget").unwrap(),
                    description: Description::parse("").unwrap(),
                    price: eur(250),
                    stock,
                },
                &admin("create"),
                None,
            )
            .await
            .unwrap()
            .unwrap();
        Listed { id, sku }
    }

    async fn order(&self, id: OrderId) -> Order {
        self.commands
            .orders
            .load(id.as_uuid())
            .await
            .unwrap()
            .unwrap()
            .state
    }

    async fn product(&self, id: ProductId) -> Product {
        self.commands
            .products
            .load(id.as_uuid())
            .await
            .unwrap()
            .unwrap()
            .state
    }

    async fn execute(&self, order: OrderId, command: OrderCommand, metadata: &EventMetadata) {
        self.commands
            .orders
            .execute(order.as_uuid(), command, metadata, None)
            .await
            .unwrap()
            .unwrap();
    }

    /// Waits until `orders` orders are decided and the order process and the products
    /// read model have applied every event, including those the process caused.
    async fn settle(&self, orders: i64) {
        eventually(
            60,
            &format!("{orders} orders decided, all applied"),
            || async {
                let decided: i64 = sqlx::query_scalar(
                    "SELECT count(*) FROM events WHERE aggregate_type = 'order' \
                 AND event_type IN ('OrderConfirmed', 'OrderRejected')",
                )
                .fetch_one(&self.db.pool)
                .await
                .unwrap();
                let head = relay::head(&self.db.pool).await.unwrap();
                decided == orders
                    && self.applied(order_process::NAME, head).await
                    && self.applied("products", head).await
            },
        )
        .await;
    }

    async fn applied(&self, projection: &str, position: i64) -> bool {
        worker::checkpoint(&self.db.pool, projection)
            .await
            .unwrap()
            .is_some_and(|checkpoint| checkpoint.position >= position)
    }

    /// Every event of one aggregate, in sequence order.
    async fn stream_of(&self, aggregate_type: &str, id: uuid::Uuid) -> Vec<StoredEvent> {
        sqlx::query(&format!(
            "SELECT {EVENT_COLUMNS} FROM events \
             WHERE aggregate_type = $1 AND aggregate_id = $2 ORDER BY sequence"
        ))
        .bind(aggregate_type)
        .bind(id.to_string())
        .fetch_all(&self.db.pool)
        .await
        .unwrap()
        .iter()
        .map(|row| StoredEvent::from_row(row).unwrap())
        .collect()
    }

    /// The products read model's `(available, reserved)` for a product.
    async fn product_view(&self, id: ProductId) -> (i64, i64) {
        let view = products::get(&self.db.pool, id).await.unwrap().unwrap();
        (view.stock_available, view.stock_reserved)
    }
}

impl Drop for Shop {
    fn drop(&mut self) {
        self.relay.abort();
        self.process.abort();
        self.products.abort();
    }
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

#[derive(Debug, Clone)]
struct Listed {
    id: ProductId,
    sku: Sku,
}

fn eur(amount: i64) -> Money {
    Money::new(amount, Currency::EUR).unwrap()
}

fn admin(request: &str) -> EventMetadata {
    EventMetadata::for_request(Actor::user(uuid::Uuid::now_v7(), Role::Admin), request)
}

fn as_customer(customer: UserId, request: &str) -> EventMetadata {
    EventMetadata::for_request(Actor::user(customer.as_uuid(), Role::Customer), request)
}

/// Places an order for `customer` from the client request `request`.
async fn place(
    commands: &CommandBus,
    customer: UserId,
    request: &str,
    lines: &[(&Listed, u32)],
) -> OrderId {
    let order = OrderId::new();
    let lines = lines
        .iter()
        .map(|(product, quantity)| NewOrderLine {
            product_id: product.id,
            sku: product.sku.clone(),
            name: ProductName::parse("Scarce widget").unwrap(),
            quantity: Quantity::new(*quantity).unwrap(),
            unit_price: eur(250),
        })
        .collect();
    commands
        .orders
        .execute(
            order.as_uuid(),
            OrderCommand::Place {
                order_id: order,
                customer_id: customer,
                lines,
            },
            &as_customer(customer, request),
            None,
        )
        .await
        .unwrap()
        .unwrap();
    order
}

/// Places `ORDERS` orders of one unit from as many concurrent tasks, by eight customers.
fn place_concurrently(commands: &CommandBus, product: &Listed) -> JoinHandle<Vec<OrderId>> {
    let customers: Vec<UserId> = (0..8).map(|_| UserId::new()).collect();
    let tasks: Vec<JoinHandle<OrderId>> = (0..ORDERS)
        .map(|n| {
            let commands = commands.clone();
            let product = product.clone();
            let customer = customers[n % customers.len()];
            tokio::spawn(async move {
                place(&commands, customer, &format!("place-{n}"), &[(&product, 1)]).await
            })
        })
        .collect();
    tokio::spawn(async move {
        join_all(tasks)
            .await
            .into_iter()
            .map(Result::unwrap)
            .collect()
    })
}

/// Replays a product's own events: stock never went below zero, no order reserved twice,
/// every reservation ended at most once, and the reservations still held are exactly
/// those of `holders`.
async fn assert_stock_history(shop: &Shop, product: ProductId, holders: &BTreeSet<OrderId>) {
    let (mut available, mut reserved) = (0i64, 0i64);
    let mut held: BTreeMap<OrderId, i64> = BTreeMap::new();
    let mut ever_reserved = BTreeSet::new();
    for event in shop.stream_of("product", product.as_uuid()).await {
        match event.decode::<ProductEvent>().unwrap() {
            ProductEvent::ProductCreated { stock, .. } => available = i64::from(stock),
            ProductEvent::ProductRestocked { quantity } => available += i64::from(quantity.get()),
            ProductEvent::StockReserved { order_id, quantity } => {
                assert!(
                    ever_reserved.insert(order_id),
                    "order {order_id} reserved twice"
                );
                available -= i64::from(quantity.get());
                reserved += i64::from(quantity.get());
                held.insert(order_id, i64::from(quantity.get()));
            }
            ProductEvent::StockReleased { order_id, quantity } => {
                assert_eq!(held.remove(&order_id), Some(i64::from(quantity.get())));
                available += i64::from(quantity.get());
                reserved -= i64::from(quantity.get());
            }
            ProductEvent::ReservationCommitted { order_id, quantity } => {
                assert_eq!(held.remove(&order_id), Some(i64::from(quantity.get())));
                reserved -= i64::from(quantity.get());
            }
            _ => {}
        }
        assert!(
            available >= 0 && reserved >= 0,
            "stock went negative at position {}: {available} available, {reserved} reserved",
            event.position
        );
    }
    let holding: BTreeSet<OrderId> = held.keys().copied().collect();
    assert_eq!(&holding, holders, "orders holding a reservation");
}

/// 200 one-unit orders on a product with 50 in stock, optionally while the order process
/// and the relay are killed and restarted at random: the first 50 placed are confirmed,
/// the rest rejected, and the stock adds up.
async fn scarce_stock(chaos: bool) {
    let mut shop = Shop::open().await;
    let product = shop.create_product("SCARCE-1", STOCK).await;
    let placing = place_concurrently(&shop.commands, &product);

    if chaos {
        let mut kills = 0;
        while kills < 16 {
            let pause = rand::thread_rng().gen_range(20..250);
            tokio::time::sleep(Duration::from_millis(pause)).await;
            let process = rand::thread_rng().gen_bool(0.7);
            if process {
                shop.process.abort();
            } else {
                shop.relay.abort();
            }
            let down = rand::thread_rng().gen_range(0..60);
            tokio::time::sleep(Duration::from_millis(down)).await;
            if process {
                shop.restart_process();
            } else {
                shop.restart_relay();
            }
            kills += 1;
        }
    }
    let orders = placing.await.unwrap();
    shop.settle(ORDERS as i64).await;

    let mut confirmed = BTreeSet::new();
    let mut rejected = BTreeSet::new();
    for &order in &orders {
        let state = shop.order(order).await;
        match state.status() {
            Some(OrderStatus::Confirmed) => {
                confirmed.insert(order);
            }
            Some(OrderStatus::Rejected) => {
                assert_eq!(state.rejection_reason(), Some("INSUFFICIENT_STOCK"));
                rejected.insert(order);
            }
            other => panic!("order {order} ended {other:?}"),
        }
    }
    assert_eq!((confirmed.len(), rejected.len()), (50, 150));

    // First placed, first served: the process decides in the order of the events.
    let placed_first: BTreeSet<OrderId> = sqlx::query_scalar::<_, String>(
        "SELECT aggregate_id FROM events WHERE event_type = 'OrderPlaced' \
         ORDER BY position LIMIT $1",
    )
    .bind(i64::from(STOCK))
    .fetch_all(&shop.db.pool)
    .await
    .unwrap()
    .iter()
    .map(|id| id.parse().unwrap())
    .collect();
    assert_eq!(confirmed, placed_first);

    let state = shop.product(product.id).await;
    assert_eq!((state.stock_available(), state.stock_reserved()), (0, 50));
    let holders: BTreeSet<OrderId> = state.reservations().map(|(order, _)| order).collect();
    assert_eq!(holders, confirmed, "one reservation per confirmed order");
    assert!(state
        .reservations()
        .all(|(_, quantity)| quantity.get() == 1));
    assert!(
        rejected
            .iter()
            .all(|order| state.settlement(*order).is_none()),
        "a rejected order never held stock"
    );
    assert_stock_history(&shop, product.id, &confirmed).await;
    assert_eq!(shop.product_view(product.id).await, (0, 50));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_orders_on_scarce_stock_confirm_exactly_what_is_in_stock() {
    scarce_stock(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killing_the_process_and_the_relay_mid_flight_doubles_and_leaks_nothing() {
    scarce_stock(true).await;
}

#[tokio::test]
async fn an_order_cancelled_before_its_turn_stays_cancelled_though_presumed_pending() {
    let mut shop = Shop::open().await;
    let product = shop.create_product("PRESUMED-1", 10).await;
    // Placed, and one cancelled, by another instance while the process is down: the
    // process's bus has none of the orders cached, so it presumes each one pending from
    // its placement, and the cancelled one is not.
    shop.process.abort();
    let elsewhere = shop.db.commands(StoreSettings::default());
    let customer = UserId::new();
    let first = place(&elsewhere, customer, "p1", &[(&product, 2)]).await;
    let cancelled = place(&elsewhere, customer, "p2", &[(&product, 3)]).await;
    let last = place(&elsewhere, customer, "p3", &[(&product, 4)]).await;
    elsewhere
        .orders
        .execute(
            cancelled.as_uuid(),
            OrderCommand::Cancel { reason: None },
            &as_customer(customer, "c2"),
            None,
        )
        .await
        .unwrap()
        .unwrap();
    let unused_before = shop.db.unused_positions().await;
    shop.restart_process();
    shop.settle(2).await;

    // The batch decided on the presumption was refused whole at the cancelled order's
    // sequence, and decided again on what the store holds.
    assert!(
        shop.db.unused_positions().await > unused_before,
        "no batch was refused: the presumption was never put to the test"
    );
    for order in [first, last] {
        assert_eq!(
            shop.order(order).await.status(),
            Some(OrderStatus::Confirmed)
        );
    }
    assert_eq!(
        shop.order(cancelled).await.status(),
        Some(OrderStatus::Cancelled)
    );
    let types: Vec<String> = shop
        .stream_of("order", cancelled.as_uuid())
        .await
        .into_iter()
        .map(|event| event.event_type)
        .collect();
    assert_eq!(types, ["OrderPlaced", "OrderCancelled"]);
    let state = shop.product(product.id).await;
    assert_eq!((state.stock_available(), state.stock_reserved()), (4, 6));
    assert_stock_history(&shop, product.id, &BTreeSet::from([first, last])).await;
    assert_eq!(shop.product_view(product.id).await, (4, 6));
}

#[tokio::test]
async fn cancelling_returns_reserved_stock_and_shipping_commits_it() {
    let shop = Shop::open().await;
    let product = shop.create_product("LIFECYCLE-1", 10).await;
    let customer = UserId::new();
    let confirmed = place(&shop.commands, customer, "life-1", &[(&product, 2)]).await;
    let paid = place(&shop.commands, customer, "life-2", &[(&product, 2)]).await;
    let shipped = place(&shop.commands, customer, "life-3", &[(&product, 2)]).await;
    shop.settle(3).await;
    for order in [confirmed, paid, shipped] {
        assert_eq!(
            shop.order(order).await.status(),
            Some(OrderStatus::Confirmed)
        );
    }
    let stock = |product: Product| (product.stock_available(), product.stock_reserved());
    assert_eq!(stock(shop.product(product.id).await), (4, 6));

    // Cancelling a confirmed order releases its reservation.
    shop.execute(
        confirmed,
        OrderCommand::Cancel { reason: None },
        &as_customer(customer, "cancel-confirmed"),
    )
    .await;
    eventually(20, "the confirmed order's stock is back", || async {
        stock(shop.product(product.id).await) == (6, 4)
    })
    .await;

    // So does cancelling a paid one.
    let total = eur(500);
    shop.execute(
        paid,
        OrderCommand::Pay { amount: total },
        &as_customer(customer, "pay-1"),
    )
    .await;
    shop.execute(
        paid,
        OrderCommand::Cancel {
            reason: Some("out of time".to_owned()),
        },
        &admin("cancel-paid"),
    )
    .await;
    eventually(20, "the paid order's stock is back", || async {
        stock(shop.product(product.id).await) == (8, 2)
    })
    .await;

    // Shipping sells the reserved stock: reserved goes down, available stays.
    shop.execute(
        shipped,
        OrderCommand::Pay { amount: total },
        &as_customer(customer, "pay-2"),
    )
    .await;
    shop.execute(shipped, OrderCommand::Ship, &admin("ship"))
        .await;
    eventually(20, "the shipped order's stock is sold", || async {
        stock(shop.product(product.id).await) == (8, 0)
    })
    .await;

    shop.settle(3).await;
    let state = shop.product(product.id).await;
    assert_eq!(state.settlement(confirmed), Some(Settlement::Released));
    assert_eq!(state.settlement(paid), Some(Settlement::Released));
    assert_eq!(state.settlement(shipped), Some(Settlement::Committed));
    assert_stock_history(&shop, product.id, &BTreeSet::new()).await;
    assert_eq!(shop.product_view(product.id).await, (8, 0));
}

#[tokio::test]
async fn a_rejected_order_releases_what_it_reserved_on_its_other_products() {
    let shop = Shop::open().await;
    let plenty = shop.create_product("MULTI-A", 5).await;
    let enough = shop.create_product("MULTI-B", 5).await;
    let scarce = shop.create_product("MULTI-C", 1).await;
    let retired = shop.create_product("MULTI-D", 5).await;
    shop.commands
        .products
        .execute(
            retired.id.as_uuid(),
            ProductCommand::Discontinue,
            &admin("discontinue"),
            None,
        )
        .await
        .unwrap()
        .unwrap();
    let unknown = Listed {
        id: ProductId::new(),
        sku: Sku::parse("MULTI-X").unwrap(),
    };
    let customer = UserId::new();

    // The refused line comes last, so the lines before it are reserved first.
    let short = place(
        &shop.commands,
        customer,
        "multi-short",
        &[(&plenty, 2), (&enough, 3), (&scarce, 2)],
    )
    .await;
    let discontinued = place(
        &shop.commands,
        customer,
        "multi-discontinued",
        &[(&plenty, 1), (&retired, 1)],
    )
    .await;
    let missing = place(
        &shop.commands,
        customer,
        "multi-missing",
        &[(&enough, 1), (&unknown, 1)],
    )
    .await;
    shop.settle(3).await;

    for (order, reason) in [
        (short, "INSUFFICIENT_STOCK"),
        (discontinued, "PRODUCT_DISCONTINUED"),
        (missing, "PRODUCT_NOT_FOUND"),
    ] {
        let state = shop.order(order).await;
        assert_eq!(state.status(), Some(OrderStatus::Rejected), "{reason}");
        assert_eq!(state.rejection_reason(), Some(reason));
    }
    let plenty_state = shop.product(plenty.id).await;
    assert_eq!(
        (
            plenty_state.stock_available(),
            plenty_state.stock_reserved()
        ),
        (5, 0)
    );
    assert_eq!(plenty_state.settlement(short), Some(Settlement::Released));
    assert_eq!(
        plenty_state.settlement(discontinued),
        Some(Settlement::Released)
    );
    let enough_state = shop.product(enough.id).await;
    assert_eq!(
        (
            enough_state.stock_available(),
            enough_state.stock_reserved()
        ),
        (5, 0)
    );
    assert_eq!(enough_state.settlement(short), Some(Settlement::Released));
    assert_eq!(enough_state.settlement(missing), Some(Settlement::Released));
    let scarce_state = shop.product(scarce.id).await;
    assert_eq!(
        (
            scarce_state.stock_available(),
            scarce_state.stock_reserved()
        ),
        (1, 0)
    );
    assert_eq!(scarce_state.settlement(short), None, "never reserved");
    for product in [&plenty, &enough, &scarce] {
        assert_stock_history(&shop, product.id, &BTreeSet::new()).await;
    }
    assert_eq!(shop.product_view(plenty.id).await, (5, 0));
    assert_eq!(shop.product_view(enough.id).await, (5, 0));
}

/// The metadata of the process's commands: the chain leads back to the client request.
fn assert_caused_by(event: &StoredEvent, cause: &StoredEvent, correlation: &str) {
    let what = &event.event_type;
    assert_eq!(event.metadata.correlation_id, correlation, "{what}");
    assert_eq!(
        event.metadata.causation_id,
        cause.event_id.to_string(),
        "{what}"
    );
    assert_eq!(
        event.metadata.request_id,
        format!("order-process:{}", cause.event_id),
        "{what}"
    );
    assert_eq!(event.metadata.actor_role, ActorRole::System, "{what}");
    assert_eq!(event.metadata.actor_id, None, "{what}");
}

#[tokio::test]
async fn the_process_commands_carry_the_placing_request_and_their_cause() {
    let shop = Shop::open().await;
    let product = shop.create_product("META-1", 1).await;
    let customer = UserId::new();
    let accepted = place(&shop.commands, customer, "req-place-1", &[(&product, 1)]).await;
    let refused = place(&shop.commands, customer, "req-place-2", &[(&product, 1)]).await;
    shop.settle(2).await;
    shop.execute(
        accepted,
        OrderCommand::Cancel { reason: None },
        &as_customer(customer, "req-cancel-1"),
    )
    .await;
    eventually(20, "the cancelled order's stock is back", || async {
        shop.product(product.id).await.stock_available() == 1
    })
    .await;

    let order_events = shop.stream_of("order", accepted.as_uuid()).await;
    let types: Vec<&str> = order_events.iter().map(|e| e.event_type.as_str()).collect();
    assert_eq!(types, ["OrderPlaced", "OrderConfirmed", "OrderCancelled"]);
    let (placed, confirmed, cancelled) = (&order_events[0], &order_events[1], &order_events[2]);
    assert_eq!(placed.metadata.correlation_id, "req-place-1");
    assert_caused_by(confirmed, placed, "req-place-1");

    let product_events = shop.stream_of("product", product.id.as_uuid()).await;
    let for_order = |order: OrderId, event_type: &str| {
        product_events
            .iter()
            .find(|event| {
                event.event_type == event_type
                    && match event.decode::<ProductEvent>().unwrap() {
                        ProductEvent::StockReserved { order_id, .. }
                        | ProductEvent::StockReleased { order_id, .. } => order_id == order,
                        _ => false,
                    }
            })
            .unwrap_or_else(|| panic!("{event_type} for {order}"))
            .clone()
    };
    assert_caused_by(&for_order(accepted, "StockReserved"), placed, "req-place-1");
    assert_caused_by(
        &for_order(accepted, "StockReleased"),
        cancelled,
        "req-cancel-1",
    );

    let refused_events = shop.stream_of("order", refused.as_uuid()).await;
    assert_eq!(refused_events.len(), 2);
    assert!(matches!(
        refused_events[1].decode::<OrderEvent>().unwrap(),
        OrderEvent::OrderRejected { reason } if reason == "INSUFFICIENT_STOCK"
    ));
    assert_caused_by(&refused_events[1], &refused_events[0], "req-place-2");
}
