//! Orders over HTTP with the order process running: placement answers `pending` at once,
//! the process decides, the status stream shows every change in order, payment and
//! shipping, and cancellation returns stock.

use std::time::Duration;

use futures::StreamExt as _;
use hindsight_commands::{Actor, EventMetadata, StoreSettings};
use hindsight_domain::product::ProductCommand;
use hindsight_domain::role::Role;
use hindsight_domain::values::{Currency, Money, Quantity};
use hindsight_tests::{eventually, TestSystem, TestUser};
use reqwest::StatusCode;
use serde_json::{json, Value};

async fn product(system: &TestSystem, admin: &TestUser, sku: &str, stock: i64) -> String {
    system
        .create_product(&admin.access_token, json!({"sku": sku, "name": "Kettle", "price": {"amount": 3000, "currency": "EUR"}, "stock": stock}))
        .await["id"]
        .as_str()
        .unwrap()
        .to_owned()
}

async fn place(system: &TestSystem, customer: &TestUser, product: &str, quantity: i64) -> String {
    let response = system
        .client()
        .post(system.url("/api/v1/orders"))
        .bearer_auth(&customer.access_token)
        .json(&json!({"lines": [{"product_id": product, "quantity": quantity}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["status"], "pending");
    body["id"].as_str().unwrap().to_owned()
}

async fn order_status(system: &TestSystem, user: &TestUser, order: &str) -> String {
    let response = system
        .client()
        .get(system.url(&format!("/api/v1/orders/{order}")))
        .bearer_auth(&user.access_token)
        .send()
        .await
        .unwrap();
    if response.status() != StatusCode::OK {
        return String::new();
    }
    response.json::<Value>().await.unwrap()["status"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

async fn stock(system: &TestSystem, product: &str) -> (i64, i64) {
    let view: Value = system
        .client()
        .get(system.url(&format!("/api/v1/products/{product}")))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    (
        view["stock_available"].as_i64().unwrap_or(-1),
        view["stock_reserved"].as_i64().unwrap_or(-1),
    )
}

#[tokio::test]
async fn an_order_is_decided_and_its_stream_shows_every_status_change_in_order() {
    let system = TestSystem::start().await;
    let admin = system.user(Role::Admin).await;
    let customer = system.user(Role::Customer).await;
    let kettle = product(&system, &admin, "kettle-1", 5).await;
    let order = place(&system, &customer, &kettle, 2).await;

    let stream = system
        .client()
        .get(system.url(&format!("/api/v1/orders/{order}/stream")))
        .bearer_auth(&customer.access_token)
        .send()
        .await
        .unwrap();
    assert_eq!(stream.status(), StatusCode::OK);
    assert!(stream.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("text/event-stream"));
    let statuses = tokio::spawn(async move {
        let mut body = stream.bytes_stream();
        let mut text = String::new();
        while let Some(chunk) = body.next().await {
            text.push_str(&String::from_utf8_lossy(&chunk.unwrap()));
        }
        text.lines()
            .filter_map(|line| line.strip_prefix("data:"))
            .map(|data| {
                serde_json::from_str::<Value>(data.trim()).unwrap()["status"]
                    .as_str()
                    .unwrap()
                    .to_owned()
            })
            .collect::<Vec<_>>()
    });

    eventually(20, "order confirmed", || async {
        order_status(&system, &customer, &order).await == "confirmed"
    })
    .await;
    let wrong = system
        .client()
        .post(system.url(&format!("/api/v1/orders/{order}/pay")))
        .bearer_auth(&customer.access_token)
        .json(&json!({"amount": {"amount": 5999, "currency": "EUR"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), StatusCode::CONFLICT);
    assert_eq!(
        wrong.json::<Value>().await.unwrap()["error"]["code"],
        "PAYMENT_AMOUNT_MISMATCH"
    );
    let paid = system
        .client()
        .post(system.url(&format!("/api/v1/orders/{order}/pay")))
        .bearer_auth(&customer.access_token)
        .json(&json!({"amount": {"amount": 6000, "currency": "EUR"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(paid.status(), StatusCode::OK);
    let by_customer = system
        .client()
        .post(system.url(&format!("/api/v1/orders/{order}/ship")))
        .bearer_auth(&customer.access_token)
        .send()
        .await
        .unwrap();
    assert_eq!(by_customer.status(), StatusCode::FORBIDDEN);
    let shipped = system
        .client()
        .post(system.url(&format!("/api/v1/orders/{order}/ship")))
        .bearer_auth(&admin.access_token)
        .send()
        .await
        .unwrap();
    assert_eq!(shipped.status(), StatusCode::OK);

    let statuses = tokio::time::timeout(Duration::from_secs(30), statuses)
        .await
        .expect("the stream closes once the order is terminal")
        .unwrap();
    assert_eq!(statuses, ["pending", "confirmed", "paid", "shipped"]);

    // Shipping committed the reservation: 5 - 2 available, nothing reserved.
    eventually(20, "stock committed", || async {
        stock(&system, &kettle).await == (3, 0)
    })
    .await;
    let late_cancel = system
        .client()
        .post(system.url(&format!("/api/v1/orders/{order}/cancel")))
        .bearer_auth(&customer.access_token)
        .json(&json!({"reason": "too late"}))
        .send()
        .await
        .unwrap();
    assert_eq!(late_cancel.status(), StatusCode::CONFLICT);
    assert_eq!(
        late_cancel.json::<Value>().await.unwrap()["error"]["code"],
        "ORDER_ALREADY_SHIPPED"
    );
}

#[tokio::test]
async fn cancelling_a_confirmed_order_returns_its_stock_and_too_large_orders_are_rejected() {
    let system = TestSystem::start().await;
    let admin = system.user(Role::Admin).await;
    let customer = system.user(Role::Customer).await;
    let kettle = product(&system, &admin, "kettle-2", 4).await;

    let order = place(&system, &customer, &kettle, 3).await;
    eventually(20, "order confirmed", || async {
        order_status(&system, &customer, &order).await == "confirmed"
    })
    .await;
    eventually(20, "stock reserved", || async {
        stock(&system, &kettle).await == (1, 3)
    })
    .await;
    let cancelled = system
        .client()
        .post(system.url(&format!("/api/v1/orders/{order}/cancel")))
        .bearer_auth(&customer.access_token)
        .send()
        .await
        .unwrap();
    assert_eq!(cancelled.status(), StatusCode::OK);
    eventually(20, "stock released", || async {
        stock(&system, &kettle).await == (4, 0)
    })
    .await;

    let greedy = place(&system, &customer, &kettle, 5).await;
    eventually(20, "order rejected", || async {
        order_status(&system, &customer, &greedy).await == "rejected"
    })
    .await;
    let view: Value = system
        .client()
        .get(system.url(&format!("/api/v1/orders/{greedy}")))
        .bearer_auth(&customer.access_token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(view["rejection_reason"], "INSUFFICIENT_STOCK");
    assert_eq!(stock(&system, &kettle).await, (4, 0));
}

/// The unit prices of the order lines stored in order `order`'s placement.
async fn placed_prices(system: &TestSystem, order: &str) -> Vec<i64> {
    let lines: Value = sqlx::query_scalar(
        "SELECT payload -> 'OrderPlaced' -> 'lines' FROM events \
         WHERE aggregate_type = 'order' AND aggregate_id = $1 AND sequence = 1",
    )
    .bind(order)
    .fetch_one(&system.db.pool)
    .await
    .unwrap();
    lines
        .as_array()
        .unwrap()
        .iter()
        .map(|line| line["unit_price"]["amount"].as_i64().unwrap())
        .collect()
}

#[tokio::test]
async fn an_order_takes_its_products_listing_as_stored_when_placed_whatever_this_instance_cached() {
    // Placing an order decides on the products as this instance has them cached, without
    // a statement to confirm each; its append checks that no listing changed since. Here
    // another instance changes the product behind this one's back.
    let system = TestSystem::start().await;
    let admin = system.user(Role::Admin).await;
    let customer = system.user(Role::Customer).await;
    let kettle = product(&system, &admin, "kettle-listing", 50).await;
    let first = place(&system, &customer, &kettle, 1).await;
    assert_eq!(placed_prices(&system, &first).await, [3000]);

    let elsewhere = system.db.commands(StoreSettings::default());
    let id: uuid::Uuid = kettle.parse().unwrap();
    let metadata = EventMetadata::for_request(Actor::system(), "elsewhere");
    let change = |command| elsewhere.products.execute(id, command, &metadata, None);
    // A stock movement changes no listing: the cached copy still holds.
    change(ProductCommand::Restock {
        quantity: Quantity::new(5).unwrap(),
    })
    .await
    .unwrap()
    .unwrap();
    let second = place(&system, &customer, &kettle, 1).await;
    assert_eq!(placed_prices(&system, &second).await, [3000]);

    change(ProductCommand::ChangePrice {
        price: Money::new(4500, Currency::EUR).unwrap(),
    })
    .await
    .unwrap()
    .unwrap();
    let third = place(&system, &customer, &kettle, 1).await;
    assert_eq!(
        placed_prices(&system, &third).await,
        [4500],
        "the new price, though this instance had the old one cached"
    );

    change(ProductCommand::Discontinue).await.unwrap().unwrap();
    let refused = system
        .client()
        .post(system.url("/api/v1/orders"))
        .bearer_auth(&customer.access_token)
        .json(&json!({"lines": [{"product_id": kettle, "quantity": 1}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), StatusCode::CONFLICT);
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["code"], "PRODUCT_DISCONTINUED", "{body}");
    let placed: i64 =
        sqlx::query_scalar("SELECT count(*) FROM events WHERE event_type = 'OrderPlaced'")
            .fetch_one(&system.db.pool)
            .await
            .unwrap();
    assert_eq!(placed, 3, "the refused order stored nothing");
}
