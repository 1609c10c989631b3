//! Batches of commands on several aggregates: decided in order on the state the commands
//! before them left, appended in one statement or not at all, proven like cached entries,
//! and holding their aggregates' turns until they have appended.

use std::time::Duration;

use hindsight_commands::batch::{Batch, Conflict, Read};
use hindsight_commands::{Actor, CommandBus, EventMetadata, Refusal, StoreSettings};
use hindsight_domain::ids::{OrderId, ProductId};
use hindsight_domain::product::{Product, ProductCommand, ProductError};
use hindsight_domain::values::{Currency, Description, Money, ProductName, Quantity, Sku};
use hindsight_tests::TestDb;

fn metadata(request: &str) -> EventMetadata {
    EventMetadata::for_request(Actor::system(), request)
}

fn reserve(quantity: u32) -> ProductCommand {
    ProductCommand::ReserveStock {
        order_id: OrderId::new(),
        quantity: Quantity::new(quantity).unwrap(),
    }
}

fn restock(quantity: u32) -> ProductCommand {
    ProductCommand::Restock {
        quantity: Quantity::new(quantity).unwrap(),
    }
}

/// Creates a product with `stock` units through `commands`; answers its id.
async fn product(commands: &CommandBus, sku: &str, stock: u32) -> uuid::Uuid {
    let id = ProductId::new();
    let command = ProductCommand::Create {
        product_id: id,
        sku: Sku::parse(sku).unwrap(),
        name: ProductName::parse("Widget").unwrap(),
        description: Description::parse("").unwrap(),
        price: Money::new(100, Currency::EUR).unwrap(),
        stock,
    };
    commands
        .products
        .execute_new(id.as_uuid(), command, &metadata("create"))
        .await
        .unwrap()
        .unwrap();
    id.as_uuid()
}

/// `(sequence, position)` of every stored event of aggregate `id`, in sequence order.
async fn stored(db: &TestDb, id: uuid::Uuid) -> Vec<(i64, i64)> {
    sqlx::query_as(
        "SELECT sequence, position FROM events WHERE aggregate_id = $1 ORDER BY sequence",
    )
    .bind(id.to_string())
    .fetch_all(&db.pool)
    .await
    .unwrap()
}

/// Stages `command` on product `id`, which must accept it.
async fn accepted(batch: &mut Batch<'_>, id: uuid::Uuid, command: ProductCommand, request: &str) {
    batch
        .execute::<Product>(id, command, &metadata(request))
        .await
        .unwrap()
        .unwrap();
}

async fn stock_of(commands: &CommandBus, id: uuid::Uuid) -> (u64, u64) {
    let loaded = commands.products.load(id).await.unwrap().unwrap();
    (loaded.version, loaded.state.stock_available())
}

#[tokio::test]
async fn a_batch_decides_each_command_on_the_ones_before_it_and_appends_them_in_order() {
    let db = TestDb::new().await;
    let commands = db.commands(StoreSettings::default());
    let (a, b) = (
        product(&commands, "BATCH-A", 3).await,
        product(&commands, "BATCH-B", 1).await,
    );

    let mut batch = commands.batch().await;
    accepted(&mut batch, a, reserve(2), "r1").await;
    // One unit is left after the staged reservation, though the store still holds three.
    let refused = batch
        .execute::<Product>(a, reserve(2), &metadata("r2"))
        .await
        .unwrap();
    assert!(
        matches!(
            refused,
            Err(Refusal::Rule(ProductError::InsufficientStock {
                available: 1,
                ..
            }))
        ),
        "{refused:?}"
    );
    accepted(&mut batch, b, restock(4), "r3").await;
    accepted(&mut batch, a, restock(5), "r4").await;
    accepted(&mut batch, a, reserve(2), "r5").await;
    assert_eq!(batch.staged(), 4);
    let last = batch.commit().await.unwrap().unwrap();

    let (stored_a, stored_b) = (stored(&db, a).await, stored(&db, b).await);
    let sequences: Vec<i64> = stored_a.iter().map(|(sequence, _)| *sequence).collect();
    assert_eq!(sequences, vec![1, 2, 3, 4]);
    assert_eq!(
        stored_b.iter().map(|(s, _)| *s).collect::<Vec<_>>(),
        vec![1, 2]
    );
    // Positions follow the order the commands were decided in: a, b, a, a.
    let (a2, a3, a4, b2) = (stored_a[1].1, stored_a[2].1, stored_a[3].1, stored_b[1].1);
    assert!(a2 < b2 && b2 < a3 && a3 < a4, "{stored_a:?} {stored_b:?}");
    assert_eq!(last, Some(a4));
    // One statement: one transaction.
    let transactions: i64 = sqlx::query_scalar(
        "SELECT count(DISTINCT transaction_id) FROM events \
         WHERE aggregate_id = ANY($1) AND sequence > 1",
    )
    .bind(vec![a.to_string(), b.to_string()])
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(transactions, 1);

    // The cache holds what the batch left, and a fresh bus reads the same from the store.
    let fresh = db.commands(StoreSettings::default());
    for bus in [&commands, &fresh] {
        assert_eq!(stock_of(bus, a).await, (4, 3 - 2 + 5 - 2));
        assert_eq!(stock_of(bus, b).await, (2, 5));
    }
}

#[tokio::test]
async fn a_batch_another_writer_got_ahead_of_stores_nothing() {
    let db = TestDb::new().await;
    let here = db.commands(StoreSettings::default());
    let elsewhere = db.commands(StoreSettings::default());
    let (a, b) = (
        product(&here, "CONFLICT-A", 1).await,
        product(&here, "CONFLICT-B", 1).await,
    );

    let mut batch = here.batch().await;
    accepted(&mut batch, a, restock(1), "h1").await;
    accepted(&mut batch, b, restock(1), "h2").await;
    // Another process restocks b while the batch is being decided.
    elsewhere
        .products
        .execute(b, restock(7), &metadata("e1"), None)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(batch.commit().await.unwrap(), Err(Conflict));

    assert_eq!(
        stored(&db, a).await.len(),
        1,
        "nothing of the batch is stored"
    );
    assert_eq!(
        stored(&db, b).await.len(),
        2,
        "only the other writer's restock"
    );
    // The batch's aggregates were dropped from the cache: the next command decides on
    // the store, with no conflict of its own.
    let unused = db.unused_positions().await;
    here.products
        .execute(b, restock(1), &metadata("h3"), None)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        db.unused_positions().await,
        unused,
        "the command tried its append on the stale copy first"
    );
    assert_eq!(stock_of(&here, b).await, (3, 1 + 7 + 1));
    assert_eq!(stock_of(&here, a).await, (1, 1));
}

#[tokio::test]
async fn presumed_and_cached_entries_are_proven_before_they_are_acted_on() {
    let db = TestDb::new().await;
    let here = db.commands(StoreSettings::default());
    let elsewhere = db.commands(StoreSettings::default());
    let empty = product(&here, "PROVEN-EMPTY", 0).await;
    let created = product(&elsewhere, "PROVEN-CREATED", 2).await;
    let as_created = elsewhere.products.load(created).await.unwrap().unwrap();
    elsewhere
        .products
        .execute(empty, restock(5), &metadata("e1"), None)
        .await
        .unwrap()
        .unwrap();
    elsewhere
        .products
        .execute(created, restock(1), &metadata("e2"), None)
        .await
        .unwrap()
        .unwrap();

    // A refusal on the stale cached entry ("no stock") is checked against the store, and
    // the command decided again on the product as stored.
    let mut batch = here.batch().await;
    batch
        .execute::<Product>(empty, reserve(3), &metadata("h1"))
        .await
        .unwrap()
        .expect("the reservation fits the stock the other process added");
    // A confirmed read of a presumed entry is checked likewise.
    batch
        .presume(created, as_created.state.clone(), as_created.version)
        .await
        .unwrap();
    let state = batch
        .state::<Product>(created, Read::Current)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(state.stock_available(), 3, "read afresh, not as presumed");
    batch.commit().await.unwrap().unwrap();
    assert_eq!(stock_of(&here, empty).await, (3, 2));

    // An append on a stale presumption conflicts instead of landing on top of it.
    let unknown = db.commands(StoreSettings::default());
    let mut batch = unknown.batch().await;
    batch
        .presume(created, as_created.state, as_created.version)
        .await
        .unwrap();
    let unconfirmed = batch
        .state::<Product>(created, Read::AsHeld)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(unconfirmed.stock_available(), 2, "as presumed");
    accepted(&mut batch, created, restock(1), "u1").await;
    assert_eq!(batch.commit().await.unwrap(), Err(Conflict));
    assert_eq!(stock_of(&unknown, created).await, (2, 3));
}

#[tokio::test]
async fn commands_on_a_batch_aggregate_wait_for_the_batch_to_append() {
    let db = TestDb::new().await;
    let commands = db.commands(StoreSettings::default());
    let id = product(&commands, "TURNS-1", 0).await;

    let mut batch = commands.batch().await;
    accepted(&mut batch, id, restock(2), "b1").await;
    let waiting = {
        let commands = commands.clone();
        tokio::spawn(async move {
            commands
                .products
                .execute(id, restock(3), &metadata("c1"), None)
                .await
        })
    };
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(
        !waiting.is_finished(),
        "a command went while the batch held its aggregate"
    );
    batch.commit().await.unwrap().unwrap();
    let executed = waiting.await.unwrap().unwrap().unwrap();
    assert_eq!(
        executed.version, 3,
        "decided after the batch's restock, with no conflict"
    );
    assert_eq!(
        db.unused_positions().await,
        0,
        "no append was refused on the way"
    );
    assert_eq!(stock_of(&commands, id).await, (3, 5));
}
