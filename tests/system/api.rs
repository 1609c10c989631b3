//! The HTTP API over real HTTP, Postgres and NATS: authentication and its attacks,
//! authorization and ownership, read-your-writes, optimistic concurrency, and the error
//! envelope.

use std::time::Duration;

use base64::Engine as _;
use hindsight_api::access::RECONNECT_AFTER;
use hindsight_domain::role::Role;
use hindsight_tests::{eventually, TestApp, TestSystem, TestUser, TEST_JWT_SECRET};
use reqwest::{Response, StatusCode};
use serde_json::{json, Value};

async fn body(response: Response) -> Value {
    response.json().await.expect("JSON body")
}

fn header(response: &Response, name: &str) -> String {
    response
        .headers()
        .get(name)
        .unwrap_or_else(|| panic!("missing header {name}"))
        .to_str()
        .unwrap()
        .to_owned()
}

async fn create_product(system: &TestSystem, token: &str, sku: &str, stock: i64) -> (String, i64) {
    let response = system
        .client()
        .post(system.url("/api/v1/products"))
        .bearer_auth(token)
        .json(&json!({
            "sku": sku, "name": format!("Product {sku}"), "description": "A fine thing",
            "price": {"amount": 1250, "currency": "EUR"}, "stock": stock
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    let position: i64 = header(&response, "x-event-position").parse().unwrap();
    let created = body(response).await;
    assert_eq!(created["position"], position);
    (created["id"].as_str().unwrap().to_owned(), position)
}

#[tokio::test]
async fn a_registered_user_signs_in_and_reads_their_own_write() {
    let system = TestSystem::start().await;
    let response = system
        .client()
        .post(system.url("/api/v1/auth/register"))
        .json(
            &json!({"email": "New.User@Example.com", "password": "long enough pw", "name": "New"}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    let position: i64 = header(&response, "x-event-position").parse().unwrap();
    let registered = body(response).await;
    assert_eq!(registered["position"], position);
    assert_eq!(registered["user"]["role"], "customer");
    assert_eq!(registered["user"]["status"], "active");
    assert_eq!(registered["user"]["version"], 1);
    assert!(registered["user"].get("password_hash").is_none());

    let tokens = system.login("new.user@example.com", "long enough pw").await;
    assert_eq!(tokens["token_type"], "Bearer");
    assert!(tokens["expires_in"].as_u64().unwrap() > 0);
    let access = tokens["access_token"].as_str().unwrap();

    let me = system
        .client()
        .get(system.url(&format!("/api/v1/users/me?min_position={position}")))
        .bearer_auth(access)
        .send()
        .await
        .unwrap();
    assert_eq!(me.status(), StatusCode::OK);
    let applied: i64 = header(&me, "x-projection-position").parse().unwrap();
    assert!(applied >= position);
    assert_eq!(header(&me, "etag"), "\"1\"");
    assert_eq!(header(&me, "cache-control"), "no-store");
    assert_eq!(body(me).await["email"], "New.User@Example.com");

    // The same address again, in another spelling, is taken.
    let again = system
        .client()
        .post(system.url("/api/v1/auth/register"))
        .json(
            &json!({"email": "new.user@EXAMPLE.com", "password": "long enough pw", "name": "Dup"}),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), StatusCode::CONFLICT);
    assert_eq!(body(again).await["error"]["code"], "EMAIL_TAKEN");
}

#[tokio::test]
async fn admins_write_products_anyone_reads_them_and_others_are_refused() {
    let system = TestSystem::start().await;
    let admin = system.user(Role::Admin).await;
    let customer = system.user(Role::Customer).await;
    let (id, position) = create_product(&system, &admin.access_token, "tea-1", 5).await;

    let read = system
        .client()
        .get(system.url(&format!("/api/v1/products/{id}?min_position={position}")))
        .send()
        .await
        .unwrap();
    assert_eq!(read.status(), StatusCode::OK);
    assert_eq!(header(&read, "etag"), "\"1\"");
    let product = body(read).await;
    assert_eq!(product["sku"], "TEA-1");
    assert_eq!(product["stock_available"], 5);
    assert_eq!(product["price"], json!({"amount": 1250, "currency": "EUR"}));

    let as_customer = system
        .client()
        .post(system.url("/api/v1/products"))
        .bearer_auth(&customer.access_token)
        .json(&json!({"sku": "X", "name": "X", "price": {"amount": 1, "currency": "EUR"}, "stock": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(as_customer.status(), StatusCode::FORBIDDEN);
    let anonymous = system
        .client()
        .post(system.url(&format!("/api/v1/products/{id}/restock")))
        .json(&json!({"quantity": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(anonymous.status(), StatusCode::UNAUTHORIZED);

    let duplicate = system
        .client()
        .post(system.url("/api/v1/products"))
        .bearer_auth(&admin.access_token)
        .json(&json!({"sku": "TEA-1", "name": "Again", "price": {"amount": 1, "currency": "EUR"}, "stock": 1}))
        .send()
        .await
        .unwrap();
    assert_eq!(duplicate.status(), StatusCode::CONFLICT);
    assert_eq!(body(duplicate).await["error"]["code"], "SKU_TAKEN");

    let bad_sort = system
        .client()
        .get(system.url("/api/v1/products?sort=weight"))
        .send()
        .await
        .unwrap();
    assert_eq!(bad_sort.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let too_many = system
        .client()
        .get(system.url("/api/v1/products?limit=101"))
        .send()
        .await
        .unwrap();
    assert_eq!(too_many.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let listed = system
        .client()
        .get(system.url(&format!(
            "/api/v1/products?q=fine&min_position={position}&sort=-price"
        )))
        .send()
        .await
        .unwrap();
    assert_eq!(listed.status(), StatusCode::OK);
    assert!(listed.headers().contains_key("x-projection-position"));
    let page = body(listed).await;
    assert_eq!(page["items"].as_array().unwrap().len(), 1);
    assert!(page["next_cursor"].is_null());
}

#[tokio::test]
async fn a_stale_if_match_is_refused_and_appends_nothing() {
    let system = TestSystem::start().await;
    let admin = system.user(Role::Admin).await;
    let (id, _) = create_product(&system, &admin.access_token, "im-1", 1).await;
    let restock = |version: &str| {
        system
            .client()
            .post(system.url(&format!("/api/v1/products/{id}/restock")))
            .bearer_auth(&admin.access_token)
            .header("If-Match", version.to_owned())
            .json(&json!({"quantity": 2}))
            .send()
    };
    let stale = restock("\"7\"").await.unwrap();
    assert_eq!(stale.status(), StatusCode::PRECONDITION_FAILED);
    assert_eq!(body(stale).await["error"]["code"], "VERSION_MISMATCH");
    let current = restock("\"1\"").await.unwrap();
    assert_eq!(current.status(), StatusCode::OK);
    assert_eq!(body(current).await["version"], 2);
    let events: i64 = sqlx::query_scalar("SELECT count(*) FROM events WHERE aggregate_id = $1")
        .bind(&id)
        .fetch_one(&system.db.pool)
        .await
        .unwrap();
    assert_eq!(events, 2);
}

#[tokio::test]
async fn a_read_past_the_wait_bound_answers_projection_lagging() {
    let system = TestSystem::start().await;
    let response = system
        .client()
        .get(system.url("/api/v1/products?min_position=999999999"))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert!(response.headers().contains_key("retry-after"));
    assert_eq!(body(response).await["error"]["code"], "PROJECTION_LAGGING");
}

#[tokio::test]
async fn customers_cannot_reach_each_others_orders() {
    let system = TestSystem::start().await;
    let admin = system.user(Role::Admin).await;
    let auditor = system.user(Role::Auditor).await;
    let alice = system.user(Role::Customer).await;
    let mallory = system.user(Role::Customer).await;
    let (product, _) = create_product(&system, &admin.access_token, "bola-1", 10).await;

    let placed = system
        .client()
        .post(system.url("/api/v1/orders"))
        .bearer_auth(&alice.access_token)
        .json(&json!({"lines": [{"product_id": product, "quantity": 2}]}))
        .send()
        .await
        .unwrap();
    assert_eq!(placed.status(), StatusCode::CREATED);
    let placed = body(placed).await;
    assert_eq!(placed["status"], "pending");
    let order = placed["id"].as_str().unwrap().to_owned();
    let position = placed["position"].as_i64().unwrap();

    let path = format!("/api/v1/orders/{order}?min_position={position}");
    let own = system
        .client()
        .get(system.url(&path))
        .bearer_auth(&alice.access_token)
        .send()
        .await
        .unwrap();
    assert_eq!(own.status(), StatusCode::OK);
    let view = body(own).await;
    assert_eq!(
        view["lines"][0]["unit_price"],
        json!({"amount": 1250, "currency": "EUR"})
    );
    assert_eq!(view["total"], json!({"amount": 2500, "currency": "EUR"}));

    let theirs = system
        .client()
        .get(system.url(&path))
        .bearer_auth(&mallory.access_token)
        .send()
        .await
        .unwrap();
    assert_eq!(theirs.status(), StatusCode::NOT_FOUND);
    let pay = system
        .client()
        .post(system.url(&format!("/api/v1/orders/{order}/pay")))
        .bearer_auth(&mallory.access_token)
        .json(&json!({"amount": {"amount": 2500, "currency": "EUR"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(pay.status(), StatusCode::NOT_FOUND);
    let cancel = system
        .client()
        .post(system.url(&format!("/api/v1/orders/{order}/cancel")))
        .bearer_auth(&mallory.access_token)
        .send()
        .await
        .unwrap();
    assert_eq!(cancel.status(), StatusCode::NOT_FOUND);
    let listed = system
        .client()
        .get(system.url(&format!("/api/v1/orders?min_position={position}")))
        .bearer_auth(&mallory.access_token)
        .send()
        .await
        .unwrap();
    assert_eq!(body(listed).await["items"].as_array().unwrap().len(), 0);
    let snooping = system
        .client()
        .get(system.url(&format!("/api/v1/orders?customer_id={}", alice.id)))
        .bearer_auth(&mallory.access_token)
        .send()
        .await
        .unwrap();
    assert_eq!(snooping.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let profile = system
        .client()
        .get(system.url(&format!("/api/v1/users/{}", alice.id)))
        .bearer_auth(&mallory.access_token)
        .send()
        .await
        .unwrap();
    assert_eq!(profile.status(), StatusCode::NOT_FOUND);

    let audited = system
        .client()
        .get(system.url(&path))
        .bearer_auth(&auditor.access_token)
        .send()
        .await
        .unwrap();
    assert_eq!(audited.status(), StatusCode::OK);
    // An auditor writes nothing but their own profile.
    let auditor_cancel = system
        .client()
        .post(system.url(&format!("/api/v1/orders/{order}/cancel")))
        .bearer_auth(&auditor.access_token)
        .send()
        .await
        .unwrap();
    assert_eq!(auditor_cancel.status(), StatusCode::FORBIDDEN);
}

fn b64(bytes: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
}

fn forge(claims: &Value, algorithm: jsonwebtoken::Algorithm, secret: &[u8]) -> String {
    jsonwebtoken::encode(
        &jsonwebtoken::Header::new(algorithm),
        claims,
        &jsonwebtoken::EncodingKey::from_secret(secret),
    )
    .unwrap()
}

#[tokio::test]
async fn forged_expired_and_misused_tokens_are_refused() {
    let system = TestSystem::start().await;
    let user = system.user(Role::Admin).await;
    let good = user.access_token.clone();
    let now = chrono::Utc::now().timestamp();
    let claims = |changes: Value| {
        let mut claims = json!({
            "iss": "hindsight", "aud": "hindsight-api", "sub": user.id, "role": "admin",
            "jti": uuid::Uuid::new_v4(), "iat": now, "nbf": now, "exp": now + 600,
            "typ": "access", "ver": 1
        });
        for (key, value) in changes.as_object().unwrap() {
            if value.is_null() {
                claims.as_object_mut().unwrap().remove(key);
            } else {
                claims[key] = value.clone();
            }
        }
        claims
    };
    let secret = TEST_JWT_SECRET.as_bytes();
    let hs256 = jsonwebtoken::Algorithm::HS256;
    // Sanity: a token forged with the right secret and claims is accepted, so each
    // refusal below is about the one thing changed.
    let control = forge(&claims(json!({})), hs256, secret);

    let parts: Vec<&str> = good.split('.').collect();
    let none_header = b64(br#"{"alg":"none","typ":"JWT"}"#);
    let mut tampered_payload = claims(json!({}));
    tampered_payload["role"] = json!("admin");
    tampered_payload["sub"] = json!(uuid::Uuid::new_v4());
    let attacks = vec![
        ("alg none", format!("{none_header}.{}.", parts[1])),
        ("stripped signature", format!("{}.{}.", parts[0], parts[1])),
        (
            "altered payload",
            format!(
                "{}.{}.{}",
                parts[0],
                b64(tampered_payload.to_string().as_bytes()),
                parts[2]
            ),
        ),
        (
            "altered signature",
            format!("{}.{}.{}x", parts[0], parts[1], parts[2]),
        ),
        (
            "HS512 instead of HS256",
            forge(&claims(json!({})), jsonwebtoken::Algorithm::HS512, secret),
        ),
        (
            "wrong secret",
            forge(
                &claims(json!({})),
                hs256,
                b"another-secret-another-secret-0123456789",
            ),
        ),
        (
            "expired",
            forge(
                &claims(json!({"exp": now - 120, "iat": now - 1000, "nbf": now - 1000})),
                hs256,
                secret,
            ),
        ),
        (
            "not yet valid",
            forge(
                &claims(json!({"nbf": now + 600, "exp": now + 1200})),
                hs256,
                secret,
            ),
        ),
        (
            "wrong audience",
            forge(&claims(json!({"aud": "someone-else"})), hs256, secret),
        ),
        (
            "wrong issuer",
            forge(&claims(json!({"iss": "evil"})), hs256, secret),
        ),
        (
            "missing jti",
            forge(&claims(json!({"jti": null})), hs256, secret),
        ),
        (
            "missing exp",
            forge(&claims(json!({"exp": null})), hs256, secret),
        ),
        (
            "missing type",
            forge(&claims(json!({"typ": null})), hs256, secret),
        ),
        (
            "refresh type",
            forge(&claims(json!({"typ": "refresh"})), hs256, secret),
        ),
        (
            "stale token version",
            forge(&claims(json!({"ver": 0})), hs256, secret),
        ),
        (
            "escalated role",
            forge(&claims(json!({"role": "operator"})), hs256, secret),
        ),
        ("refresh token as access token", user.refresh_token.clone()),
        ("garbage", "not-a-token".to_owned()),
        ("oversized", "a".repeat(10_000)),
        ("empty", String::new()),
    ];
    let me = system.url("/api/v1/users/me");
    let accepted = system
        .client()
        .get(&me)
        .bearer_auth(&control)
        .send()
        .await
        .unwrap();
    assert_eq!(accepted.status(), StatusCode::OK, "control token");
    for (attack, token) in attacks {
        let response = system
            .client()
            .get(&me)
            .bearer_auth(&token)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "{attack}");
        assert_eq!(
            body(response).await["error"]["code"],
            "UNAUTHENTICATED",
            "{attack}"
        );
    }
}

#[tokio::test]
async fn refresh_rotates_and_a_reused_token_revokes_its_family() {
    let system = TestSystem::start().await;
    let user = system.user(Role::Customer).await;
    let refresh = |token: String| {
        system
            .client()
            .post(system.url("/api/v1/auth/refresh"))
            .json(&json!({ "refresh_token": token }))
            .send()
    };
    let first = refresh(user.refresh_token.clone()).await.unwrap();
    assert_eq!(first.status(), StatusCode::OK);
    let second_token = body(first).await["refresh_token"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_ne!(second_token, user.refresh_token);

    // The spent token again: refused, and the whole family with it.
    let reused = refresh(user.refresh_token.clone()).await.unwrap();
    assert_eq!(reused.status(), StatusCode::UNAUTHORIZED);
    let after_reuse = refresh(second_token).await.unwrap();
    assert_eq!(after_reuse.status(), StatusCode::UNAUTHORIZED);

    // Logout revokes a family.
    let fresh = system.login(&user.email, &user.password).await;
    let token = fresh["refresh_token"].as_str().unwrap().to_owned();
    let logout = system
        .client()
        .post(system.url("/api/v1/auth/logout"))
        .json(&json!({ "refresh_token": token }))
        .send()
        .await
        .unwrap();
    assert_eq!(logout.status(), StatusCode::NO_CONTENT);
    assert_eq!(
        refresh(token).await.unwrap().status(),
        StatusCode::UNAUTHORIZED
    );
}

#[tokio::test]
async fn password_role_and_status_changes_end_existing_sessions_at_once() {
    let system = TestSystem::start().await;
    let admin = system.user(Role::Admin).await;
    let user = system.user(Role::Customer).await;
    let me = |token: String| {
        system
            .client()
            .get(system.url("/api/v1/users/me"))
            .bearer_auth(token)
            .send()
    };
    let wrong = system
        .client()
        .post(system.url("/api/v1/users/me/password"))
        .bearer_auth(&user.access_token)
        .json(&json!({"current_password": "not it at all", "new_password": "a brand new password"}))
        .send()
        .await
        .unwrap();
    assert_eq!(wrong.status(), StatusCode::UNPROCESSABLE_ENTITY);

    let changed = system
        .client()
        .post(system.url("/api/v1/users/me/password"))
        .bearer_auth(&user.access_token)
        .json(&json!({"current_password": user.password, "new_password": "a brand new password"}))
        .send()
        .await
        .unwrap();
    assert_eq!(changed.status(), StatusCode::OK);
    let changed = body(changed).await;
    assert!(changed["position"].as_i64().unwrap() > 0);
    let new_access = changed["access_token"].as_str().unwrap().to_owned();
    assert_eq!(
        me(user.access_token.clone()).await.unwrap().status(),
        StatusCode::UNAUTHORIZED
    );
    assert_ne!(
        me(new_access.clone()).await.unwrap().status(),
        StatusCode::UNAUTHORIZED
    );
    let old_refresh = system
        .client()
        .post(system.url("/api/v1/auth/refresh"))
        .json(&json!({ "refresh_token": user.refresh_token }))
        .send()
        .await
        .unwrap();
    assert_eq!(old_refresh.status(), StatusCode::UNAUTHORIZED);

    make_auditor(&system, &admin, &user).await;
    assert_eq!(
        me(new_access).await.unwrap().status(),
        StatusCode::UNAUTHORIZED
    );

    let signed_in = system.login(&user.email, "a brand new password").await;
    let token = signed_in["access_token"].as_str().unwrap().to_owned();
    let deactivate = system
        .client()
        .post(system.url(&format!("/api/v1/users/{}/deactivate", user.id)))
        .bearer_auth(&admin.access_token)
        .send()
        .await
        .unwrap();
    assert_eq!(deactivate.status(), StatusCode::OK);
    assert_eq!(me(token).await.unwrap().status(), StatusCode::UNAUTHORIZED);
    let login = system
        .client()
        .post(system.url("/api/v1/auth/login"))
        .json(&json!({"email": user.email, "password": "a brand new password"}))
        .send()
        .await
        .unwrap();
    assert_eq!(login.status(), StatusCode::UNAUTHORIZED);
}

/// `GET /api/v1/users/me` on `app` with `token`: its status.
async fn me_on(app: &TestApp, token: &str) -> StatusCode {
    app.client
        .get(app.url("/api/v1/users/me"))
        .bearer_auth(token)
        .send()
        .await
        .unwrap()
        .status()
}

/// The database sessions listening for access changes in `system`'s database.
async fn access_listeners(system: &TestSystem) -> Vec<i32> {
    sqlx::query_scalar(
        "SELECT pid FROM pg_stat_activity \
         WHERE datname = current_database() AND query = 'LISTEN \"hindsight_access\"'",
    )
    .fetch_all(&system.db.pool)
    .await
    .unwrap()
}

/// Waits until `app` refuses `token`, failing after `bound`.
async fn refused_within(app: &TestApp, token: &str, bound: Duration, what: &str) {
    let deadline = tokio::time::Instant::now() + bound;
    while me_on(app, token).await != StatusCode::UNAUTHORIZED {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not refused within {bound:?}: {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Waits until `app` refuses `token`, which must happen long before its cached access
/// could expire (a minute): only the database's announcement can have dropped it.
async fn refused_within_a_second(app: &TestApp, token: &str, what: &str) {
    refused_within(app, token, Duration::from_secs(1), what).await;
}

/// A system, a second API process on its database (with its own memory of who may call),
/// an admin, and a customer whose access the second process has already read.
async fn two_instances() -> (TestSystem, TestApp, TestUser, TestUser) {
    let system = TestSystem::start().await;
    let admin = system.user(Role::Admin).await;
    let user = system.user(Role::Customer).await;
    let other = TestApp::spawn(&system.db).await;
    assert_eq!(me_on(&other, &user.access_token).await, StatusCode::OK);
    (system, other, admin, user)
}

/// `admin` makes `user` an auditor through `system`'s own API process.
async fn make_auditor(system: &TestSystem, admin: &TestUser, user: &TestUser) {
    let role = system
        .client()
        .put(system.url(&format!("/api/v1/users/{}/role", user.id)))
        .bearer_auth(&admin.access_token)
        .json(&json!({"role": "auditor"}))
        .send()
        .await
        .unwrap();
    assert_eq!(role.status(), StatusCode::OK);
}

/// `user` signs in again and is served by `other`; `admin` then deactivates them through
/// `system`'s process, and `other` must refuse the new session within a second.
async fn deactivation_reaches(
    system: &TestSystem,
    other: &TestApp,
    admin: &TestUser,
    user: &TestUser,
    what: &str,
) {
    let token = system.login(&user.email, &user.password).await["access_token"]
        .as_str()
        .unwrap()
        .to_owned();
    assert_eq!(me_on(other, &token).await, StatusCode::OK);
    let deactivated = system
        .client()
        .post(system.url(&format!("/api/v1/users/{}/deactivate", user.id)))
        .bearer_auth(&admin.access_token)
        .send()
        .await
        .unwrap();
    assert_eq!(deactivated.status(), StatusCode::OK);
    refused_within_a_second(other, &token, what).await;
}

#[tokio::test]
async fn an_access_change_made_through_another_instance_ends_sessions_there_too() {
    let (system, other, admin, user) = two_instances().await;
    assert_eq!(me_on(&other, &user.access_token).await, StatusCode::OK);

    make_auditor(&system, &admin, &user).await;
    assert_eq!(
        me_on(&system.app, &user.access_token).await,
        StatusCode::UNAUTHORIZED
    );
    refused_within_a_second(
        &other,
        &user.access_token,
        "the other instance to refuse the old role",
    )
    .await;
    deactivation_reaches(
        &system,
        &other,
        &admin,
        &user,
        "the other instance to refuse a deactivated user",
    )
    .await;
}

#[tokio::test]
async fn while_the_access_listener_is_cut_off_no_access_is_served_from_memory() {
    let (system, other, admin, user) = two_instances().await;

    // Cut both instances' listeners off, then change the user's access at once, while
    // they are still reconnecting: the announcement reaches no one.
    let listeners = access_listeners(&system).await;
    assert_eq!(listeners.len(), 2, "one access listener per instance");
    for pid in &listeners {
        sqlx::query("SELECT pg_terminate_backend($1)")
            .bind(pid)
            .execute(&system.db.pool)
            .await
            .unwrap();
    }
    make_auditor(&system, &admin, &user).await;
    // Before the listener is back (it waits RECONNECT_AFTER), so not because it came back.
    refused_within(
        &other,
        &user.access_token,
        RECONNECT_AFTER / 2,
        "the cut-off instance to refuse the old role",
    )
    .await;

    // Back: the listeners reconnect by themselves, and announcements work again.
    eventually(5, "both access listeners back", || async {
        let back = access_listeners(&system).await;
        back.len() == 2 && back.iter().all(|pid| !listeners.contains(pid))
    })
    .await;
    deactivation_reaches(
        &system,
        &other,
        &admin,
        &user,
        "the reconnected instance to refuse a deactivated user",
    )
    .await;
}

#[tokio::test]
async fn bad_bodies_get_the_error_envelope_and_change_nothing() {
    let system = TestSystem::start().await;
    let register = system.url("/api/v1/auth/register");
    let cases = vec![
        ("text/plain", "hello".to_owned(), StatusCode::UNSUPPORTED_MEDIA_TYPE, "UNSUPPORTED_MEDIA_TYPE"),
        ("application/json", "{not json".to_owned(), StatusCode::BAD_REQUEST, "MALFORMED_REQUEST"),
        (
            "application/json",
            json!({"email": 5, "password": "x", "name": "y"}).to_string(),
            StatusCode::BAD_REQUEST,
            "MALFORMED_REQUEST",
        ),
        (
            "application/json",
            json!({"email": "a@example.com", "password": "long enough pw", "name": "A", "role": "admin"}).to_string(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "VALIDATION_FAILED",
        ),
        (
            "application/json",
            json!({"email": "nope", "password": "short", "name": ""}).to_string(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "VALIDATION_FAILED",
        ),
        (
            "application/json",
            json!({"email": "a@example.com", "password": "x".repeat(70_000), "name": "A"}).to_string(),
            StatusCode::PAYLOAD_TOO_LARGE,
            "PAYLOAD_TOO_LARGE",
        ),
    ];
    for (content_type, payload, status, code) in cases {
        let response = system
            .client()
            .post(&register)
            .header("content-type", content_type)
            .header("x-request-id", "bad-body-1")
            .body(payload)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), status, "{code}");
        assert_eq!(header(&response, "x-content-type-options"), "nosniff");
        let error = body(response).await;
        assert_eq!(error["error"]["code"], code);
        assert_eq!(error["error"]["request_id"], "bad-body-1");
    }
    let invalid = system
        .client()
        .post(&register)
        .json(&json!({"email": "nope", "password": "short", "name": ""}))
        .send()
        .await
        .unwrap();
    let details = body(invalid).await["error"]["details"].clone();
    assert!(
        details["email"].is_array() && details["password"].is_array() && details["name"].is_array()
    );
    let events: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(&system.db.pool)
        .await
        .unwrap();
    assert_eq!(events, 0);
}

#[tokio::test]
async fn profile_user_admin_and_product_admin_routes_work_end_to_end() {
    let system = TestSystem::start().await;
    let admin = system.user(Role::Admin).await;
    let customer = system.user(Role::Customer).await;

    let renamed = system
        .client()
        .patch(system.url("/api/v1/users/me"))
        .bearer_auth(&customer.access_token)
        .json(&json!({"name": "Renamed Customer"}))
        .send()
        .await
        .unwrap();
    assert_eq!(renamed.status(), StatusCode::OK);
    let position = header(&renamed, "x-event-position");
    let renamed = body(renamed).await;
    assert_eq!(renamed["name"], "Renamed Customer");
    assert_eq!(renamed["version"], 2);

    let listed = system
        .client()
        .get(system.url(&format!(
            "/api/v1/users?role=customer&status=active&min_position={position}"
        )))
        .bearer_auth(&admin.access_token)
        .send()
        .await
        .unwrap();
    assert_eq!(listed.status(), StatusCode::OK);
    let page = body(listed).await;
    let names: Vec<&str> = page["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|u| u["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["Renamed Customer"]);
    let bad_filter = system
        .client()
        .get(system.url("/api/v1/users?role=superuser"))
        .bearer_auth(&admin.access_token)
        .send()
        .await
        .unwrap();
    assert_eq!(bad_filter.status(), StatusCode::UNPROCESSABLE_ENTITY);

    let user_path = format!("/api/v1/users/{}", customer.id);
    let post_admin = |path: String| {
        system
            .client()
            .post(system.url(&path))
            .bearer_auth(&admin.access_token)
            .send()
    };
    assert_eq!(
        post_admin(format!("{user_path}/deactivate"))
            .await
            .unwrap()
            .status(),
        StatusCode::OK
    );
    let again = post_admin(format!("{user_path}/deactivate")).await.unwrap();
    assert_eq!(again.status(), StatusCode::CONFLICT);
    assert_eq!(body(again).await["error"]["code"], "USER_DEACTIVATED");
    let reactivated = post_admin(format!("{user_path}/reactivate")).await.unwrap();
    assert_eq!(reactivated.status(), StatusCode::OK);
    assert_eq!(body(reactivated).await["status"], "active");
    system.login(&customer.email, &customer.password).await;

    let (product, _) = create_product(&system, &admin.access_token, "patch-1", 3).await;
    let patched = system
        .client()
        .patch(system.url(&format!("/api/v1/products/{product}")))
        .bearer_auth(&admin.access_token)
        .header("If-Match", "\"1\"")
        .json(&json!({"name": "Renamed", "price": {"amount": 1999, "currency": "EUR"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(patched.status(), StatusCode::OK);
    let patched_position = header(&patched, "x-event-position");
    assert_eq!(body(patched).await["version"], 3);
    let other_currency = system
        .client()
        .patch(system.url(&format!("/api/v1/products/{product}")))
        .bearer_auth(&admin.access_token)
        .json(&json!({"price": {"amount": 1999, "currency": "USD"}}))
        .send()
        .await
        .unwrap();
    assert_eq!(
        body(other_currency).await["error"]["code"],
        "CURRENCY_MISMATCH"
    );
    let discontinued = system
        .client()
        .post(system.url(&format!("/api/v1/products/{product}/discontinue")))
        .bearer_auth(&admin.access_token)
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    assert_eq!(discontinued.status(), StatusCode::OK);
    let discontinued_position = header(&discontinued, "x-event-position");
    let view = body(
        system
            .client()
            .get(system.url(&format!(
                "/api/v1/products/{product}?min_position={discontinued_position}"
            )))
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert!(
        discontinued_position > patched_position
            || discontinued_position.len() > patched_position.len()
    );
    assert_eq!(view["name"], "Renamed");
    assert_eq!(view["price"]["amount"], 1999);
    assert_eq!(view["status"], "discontinued");

    // Path and method errors use the envelope too.
    let not_an_id = system
        .client()
        .get(system.url("/api/v1/products/not-a-uuid"))
        .send()
        .await
        .unwrap();
    assert_eq!(not_an_id.status(), StatusCode::NOT_FOUND);
    assert_eq!(body(not_an_id).await["error"]["code"], "NOT_FOUND");
    let wrong_method = system
        .client()
        .delete(system.url("/api/v1/products"))
        .send()
        .await
        .unwrap();
    assert_eq!(wrong_method.status(), StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(
        body(wrong_method).await["error"]["code"],
        "METHOD_NOT_ALLOWED"
    );
}
