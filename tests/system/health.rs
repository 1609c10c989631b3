//! Health endpoints and the request-id contract.

use hindsight_tests::{TestApp, TestDb};
use serde_json::Value;

#[tokio::test]
async fn live_and_ready_answer_when_dependencies_are_up() {
    let db = TestDb::new().await;
    let app = TestApp::spawn(&db).await;

    let live = app
        .client
        .get(app.url("/health/live"))
        .send()
        .await
        .unwrap();
    assert_eq!(live.status(), 200);

    let ready = app
        .client
        .get(app.url("/health/ready"))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 200);
    let body: Value = ready.json().await.unwrap();
    assert_eq!(body["status"], "ready");
    assert_eq!(body["checks"]["postgres"], "ok");
    assert_eq!(body["checks"]["migrations"], "ok");
    assert_eq!(body["checks"]["nats"], "ok");
}

#[tokio::test]
async fn ready_reports_pending_migrations() {
    let db = TestDb::empty().await;
    let app = TestApp::spawn(&db).await;
    let ready = app
        .client
        .get(app.url("/health/ready"))
        .send()
        .await
        .unwrap();
    assert_eq!(ready.status(), 503);
    let body: Value = ready.json().await.unwrap();
    assert_eq!(body["checks"]["migrations"], "pending");
}

#[tokio::test]
async fn a_valid_request_id_is_echoed_and_an_invalid_one_replaced() {
    let db = TestDb::new().await;
    let app = TestApp::spawn(&db).await;

    let echoed = app
        .client
        .get(app.url("/health/live"))
        .header("X-Request-Id", "client-req.42_a")
        .send()
        .await
        .unwrap();
    assert_eq!(echoed.headers()["x-request-id"], "client-req.42_a");

    let replaced = app
        .client
        .get(app.url("/health/live"))
        .header("X-Request-Id", "not valid!")
        .send()
        .await
        .unwrap();
    let id = replaced.headers()["x-request-id"]
        .to_str()
        .unwrap()
        .to_owned();
    assert!(uuid::Uuid::parse_str(&id).is_ok(), "{id}");

    let generated = app
        .client
        .get(app.url("/health/live"))
        .send()
        .await
        .unwrap();
    assert!(generated.headers().contains_key("x-request-id"));
}

#[tokio::test]
async fn unknown_routes_answer_the_error_envelope() {
    let db = TestDb::new().await;
    let app = TestApp::spawn(&db).await;
    let response = app
        .client
        .get(app.url("/api/v1/nothing-here"))
        .header("X-Request-Id", "r-404")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 404);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "NOT_FOUND");
    assert_eq!(body["error"]["request_id"], "r-404");
}
