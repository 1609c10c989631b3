//! `Idempotency-Key`: replays, reuse with another body, keys in use, scope per user.

use futures::future::join_all;
use hindsight_domain::role::Role;
use hindsight_tests::{TestSystem, TestUser};
use reqwest::StatusCode;
use serde_json::{json, Value};

async fn product(system: &TestSystem, admin: &TestUser) -> String {
    system
        .create_product(&admin.access_token, json!({"sku": "IDEM-1", "name": "Mug", "price": {"amount": 800, "currency": "EUR"}, "stock": 1}))
        .await["id"]
        .as_str()
        .unwrap()
        .to_owned()
}

async fn events_of(system: &TestSystem, id: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM events WHERE aggregate_id = $1")
        .bind(id)
        .fetch_one(&system.db.pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_retried_command_replays_its_first_answer_and_appends_once() {
    let system = TestSystem::start().await;
    let admin = system.user(Role::Admin).await;
    let mug = product(&system, &admin).await;
    let restock = |quantity: i64, key: &str| {
        system
            .client()
            .post(system.url(&format!("/api/v1/products/{mug}/restock")))
            .bearer_auth(&admin.access_token)
            .header("Idempotency-Key", key.to_owned())
            .json(&json!({ "quantity": quantity }))
            .send()
    };
    let first = restock(4, "restock-1").await.unwrap();
    assert_eq!(first.status(), StatusCode::OK);
    let first_position = first.headers()["x-event-position"].clone();
    let first_body: Value = first.json().await.unwrap();

    let again = restock(4, "restock-1").await.unwrap();
    assert_eq!(again.status(), StatusCode::OK);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    assert_eq!(again.headers()["x-event-position"], first_position);
    assert_eq!(again.json::<Value>().await.unwrap(), first_body);
    assert_eq!(events_of(&system, &mug).await, 2);

    let reused = restock(5, "restock-1").await.unwrap();
    assert_eq!(reused.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(
        reused.json::<Value>().await.unwrap()["error"]["code"],
        "IDEMPOTENCY_KEY_REUSED"
    );

    let too_long = restock(1, &"k".repeat(256)).await.unwrap();
    assert_eq!(too_long.status(), StatusCode::UNPROCESSABLE_ENTITY);
    assert_eq!(events_of(&system, &mug).await, 2);

    // A refusal is an answer too: replayed, not re-run.
    let refused = restock(0, "restock-zero").await.unwrap();
    assert_eq!(refused.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let refused_again = restock(0, "restock-zero").await.unwrap();
    assert_eq!(refused_again.headers()["idempotent-replayed"], "true");
}

#[tokio::test]
async fn concurrent_requests_with_one_key_run_the_command_once() {
    let system = TestSystem::start().await;
    let admin = system.user(Role::Admin).await;
    let mug = product(&system, &admin).await;
    let responses = join_all((0..8).map(|_| {
        system
            .client()
            .post(system.url(&format!("/api/v1/products/{mug}/restock")))
            .bearer_auth(&admin.access_token)
            .header("Idempotency-Key", "same-key")
            .json(&json!({ "quantity": 2 }))
            .send()
    }))
    .await;
    let mut ran = 0;
    for response in responses {
        let response = response.unwrap();
        match response.status() {
            StatusCode::OK if !response.headers().contains_key("idempotent-replayed") => ran += 1,
            StatusCode::OK => {}
            StatusCode::CONFLICT => assert_eq!(
                response.json::<Value>().await.unwrap()["error"]["code"],
                "IDEMPOTENCY_KEY_IN_USE"
            ),
            other => panic!("unexpected {other}"),
        }
    }
    assert_eq!(ran, 1);
    assert_eq!(events_of(&system, &mug).await, 2);
}

#[tokio::test]
async fn keys_are_scoped_to_the_user() {
    let system = TestSystem::start().await;
    let admin = system.user(Role::Admin).await;
    let other_admin = system.user(Role::Admin).await;
    let mug = product(&system, &admin).await;
    for user in [&admin, &other_admin] {
        let response = system
            .client()
            .post(system.url(&format!("/api/v1/products/{mug}/restock")))
            .bearer_auth(&user.access_token)
            .header("Idempotency-Key", "shared-name")
            .json(&json!({ "quantity": 1 }))
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::OK);
        assert!(!response.headers().contains_key("idempotent-replayed"));
    }
    assert_eq!(events_of(&system, &mug).await, 3);
}
