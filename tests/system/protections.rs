//! Protections of a public API: per-IP and per-account rate limits, security headers,
//! CORS from an allowlist, metrics.

use std::sync::Arc;

use hindsight_api::rate_limit::RateLimits;
use hindsight_api::routes::auth::LoginThrottle;
use hindsight_api::state::HttpSettings;
use hindsight_domain::role::Role;
use hindsight_tests::{TestApp, TestDb, TestSystem};
use reqwest::StatusCode;
use serde_json::{json, Value};

#[tokio::test]
async fn per_ip_limits_answer_429_with_retry_after() {
    let db = TestDb::new().await;
    let app = TestApp::spawn_with(&db, |state| {
        state.rate_limits = Some(Arc::new(RateLimits::new(1000, 3)));
    })
    .await;
    let mut statuses = Vec::new();
    for _ in 0..4 {
        let response = app
            .client
            .post(app.url("/api/v1/auth/login"))
            .json(&json!({"email": "nobody@example.com", "password": "whatever pw"}))
            .send()
            .await
            .unwrap();
        statuses.push(response.status());
        if response.status() == StatusCode::TOO_MANY_REQUESTS {
            assert!(response.headers().contains_key("retry-after"));
            assert_eq!(
                response.json::<Value>().await.unwrap()["error"]["code"],
                "RATE_LIMITED"
            );
        }
    }
    assert_eq!(statuses[..3], [StatusCode::UNAUTHORIZED; 3]);
    assert_eq!(statuses[3], StatusCode::TOO_MANY_REQUESTS);
    // Other routes are under the global limit only.
    let health = app
        .client
        .get(app.url("/health/live"))
        .send()
        .await
        .unwrap();
    assert_eq!(health.status(), StatusCode::OK);

    let strict = TestApp::spawn_with(&db, |state| {
        state.rate_limits = Some(Arc::new(RateLimits::new(1, 1000)));
    })
    .await;
    let mut limited = false;
    for _ in 0..5 {
        let response = strict
            .client
            .get(strict.url("/health/live"))
            .send()
            .await
            .unwrap();
        limited |= response.status() == StatusCode::TOO_MANY_REQUESTS;
    }
    assert!(limited, "the global per-IP limit never applied");
}

#[tokio::test]
async fn failed_logins_lock_the_account_even_for_the_right_password() {
    let system = TestSystem::start().await;
    let user = system.user(Role::Customer).await;
    let db = &system.db;
    let app = TestApp::spawn_with(db, |state| {
        state.login_throttle = Arc::new(LoginThrottle::per_hour(3));
    })
    .await;
    let login = |password: &str| {
        app.client
            .post(app.url("/api/v1/auth/login"))
            .json(&json!({"email": user.email, "password": password}))
            .send()
    };
    for _ in 0..3 {
        assert_eq!(
            login("wrong password!").await.unwrap().status(),
            StatusCode::UNAUTHORIZED
        );
    }
    let locked = login(&user.password).await.unwrap();
    assert_eq!(locked.status(), StatusCode::TOO_MANY_REQUESTS);
    assert!(locked.headers().contains_key("retry-after"));
}

#[tokio::test]
async fn security_headers_cors_and_metrics() {
    let db = TestDb::new().await;
    let app = TestApp::spawn_with(&db, |state| {
        state.settings = Arc::new(HttpSettings {
            cors_origins: vec!["https://shop.example".to_owned()],
            hsts: true,
            ..HttpSettings::default()
        });
    })
    .await;
    let response = app
        .client
        .get(app.url("/api/v1/products"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    let headers = response.headers();
    assert_eq!(headers["x-content-type-options"], "nosniff");
    assert!(headers["content-security-policy"]
        .to_str()
        .unwrap()
        .contains("frame-ancestors 'none'"));
    assert!(headers.contains_key("strict-transport-security"));
    assert!(!headers.contains_key("server"));

    let preflight = |origin: &'static str| {
        app.client
            .request(reqwest::Method::OPTIONS, app.url("/api/v1/products"))
            .header("Origin", origin)
            .header("Access-Control-Request-Method", "POST")
            .send()
    };
    let allowed = preflight("https://shop.example").await.unwrap();
    assert_eq!(
        allowed.headers()["access-control-allow-origin"],
        "https://shop.example"
    );
    let refused = preflight("https://evil.example").await.unwrap();
    assert!(!refused
        .headers()
        .contains_key("access-control-allow-origin"));

    let metrics = app
        .client
        .get(app.url("/metrics"))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    assert!(
        metrics.contains("hindsight_http_requests_total"),
        "{metrics}"
    );
    assert!(metrics.contains("hindsight_http_request_duration_seconds"));
    assert!(metrics.contains("hindsight_event_store_head"));
    for pool in ["transactions", "statements"] {
        assert!(
            metrics.contains(&format!(
                "hindsight_db_connections{{pool=\"{pool}\",state=\"idle\"}}"
            )),
            "{metrics}"
        );
    }
}
