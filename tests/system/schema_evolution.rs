//! Event schema evolution end to end: `OrderPlaced` version 1 events (no `total`) stored
//! before version 2 existed are read as version 2 by aggregates, projections and exports,
//! and `events check` vouches for them.

use hindsight_commands::event::read_events;
use hindsight_commands::upcast::check_stored_events;
use hindsight_commands::{Actor, EventMetadata, StoreSettings};
use hindsight_domain::order::{OrderCommand, OrderStatus};
use hindsight_domain::DomainEvent as _;
use hindsight_projections::orders::{self, Orders};
use hindsight_projections::read_model::ReadModel;
use hindsight_tests::TestDb;
use serde_json::json;

async fn store_v1_order(db: &TestDb) -> uuid::Uuid {
    let order = uuid::Uuid::now_v7();
    let metadata = EventMetadata::for_request(Actor::system(), "legacy-import");
    let payload = json!({"OrderPlaced": {
        "order_id": order,
        "customer_id": uuid::Uuid::now_v7(),
        "lines": [
            {"product_id": uuid::Uuid::now_v7(), "sku": "OLD-1", "name": "Old thing", "quantity": 2,
             "unit_price": {"amount": 500, "currency": "EUR"}, "line_total": {"amount": 1000, "currency": "EUR"}},
            {"product_id": uuid::Uuid::now_v7(), "sku": "OLD-2", "name": "Older thing", "quantity": 1,
             "unit_price": {"amount": 250, "currency": "EUR"}, "line_total": {"amount": 250, "currency": "EUR"}}
        ]
    }});
    sqlx::query(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata) \
         VALUES ('order', $1, 1, 'OrderPlaced', '1', $2, $3)",
    )
    .bind(order.to_string())
    .bind(payload)
    .bind(serde_json::to_value(metadata.to_map()).unwrap())
    .execute(&db.pool)
    .await
    .unwrap();
    order
}

#[tokio::test]
async fn version_1_events_are_read_as_version_2_everywhere() {
    let db = TestDb::new().await;
    let order = store_v1_order(&db).await;
    let commands = db.commands(StoreSettings::default());

    // Aggregates: the upgraded event folds into an order with its total, and it decides.
    let loaded = commands.orders.load(order).await.unwrap().unwrap();
    assert_eq!(loaded.state.total().unwrap().amount(), 1250);
    commands
        .orders
        .execute(
            order,
            OrderCommand::Confirm,
            &EventMetadata::for_request(Actor::system(), "confirm"),
            None,
        )
        .await
        .unwrap()
        .unwrap();

    // Reads and exports see version 2 with the total.
    let events = read_events(&db.pool, 0, i64::MAX, 100).await.unwrap();
    assert_eq!(events[0].event_version, "2");
    assert_eq!(
        events[0].payload.to_value()["OrderPlaced"]["total"],
        json!({"amount": 1250, "currency": "EUR"})
    );
    let current: hindsight_domain::order::OrderEvent = events[0].decode().unwrap();
    assert_eq!(current.event_version(), "2");

    // Projections fold it like any other.
    let mut tx = db.pool.begin().await.unwrap();
    Orders::live().apply(&mut tx, &events).await.unwrap();
    tx.commit().await.unwrap();
    let view = orders::get(&db.pool, hindsight_domain::ids::OrderId::from_uuid(order))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(view.total.amount(), 1250);
    assert_eq!(view.status, OrderStatus::Confirmed);

    // The stored row itself is untouched: history is not rewritten.
    let stored: String = sqlx::query_scalar(
        "SELECT event_version FROM events WHERE aggregate_id = $1 AND sequence = 1",
    )
    .bind(order.to_string())
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(stored, "1");

    let checked = check_stored_events(&db.pool, false).await.unwrap();
    let v1 = checked
        .iter()
        .find(|kind| kind.event_type == "OrderPlaced" && kind.event_version == "1")
        .unwrap();
    assert_eq!((v1.events, v1.first_failure.clone()), (1, None));
}

#[tokio::test]
async fn an_event_the_code_cannot_read_is_named_by_the_check() {
    let db = TestDb::new().await;
    store_v1_order(&db).await;
    sqlx::query(
        "INSERT INTO events (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata) \
         VALUES ('order', 'broken', 1, 'OrderConfirmed', '7', '{\"OrderConfirmed\": 42}', '{}')",
    )
    .execute(&db.pool)
    .await
    .unwrap();
    for sample in [true, false] {
        let checked = check_stored_events(&db.pool, sample).await.unwrap();
        let broken: Vec<_> = checked
            .iter()
            .filter(|kind| kind.first_failure.is_some())
            .collect();
        assert_eq!(broken.len(), 1, "{checked:?}");
        assert_eq!(broken[0].event_type, "OrderConfirmed");
        assert_eq!(broken[0].event_version, "7");
    }
}
