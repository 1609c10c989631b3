//! The audit API over real HTTP: the event feed with its filters and paging, one
//! aggregate's stream, state folded as of a version or a time, the audit trail, the
//! NDJSON export, secrets redacted wherever history is shown, and the operators' view of
//! the projections.

use chrono::{DateTime, Utc};
use hindsight_domain::role::Role;
use hindsight_tests::{append_raw_event, eventually, TestApp, TestDb, TestSystem, TestUser};
use reqwest::{Response, StatusCode};
use serde_json::{json, Value};

async fn body(response: Response) -> Value {
    response.json().await.expect("JSON body")
}

async fn get(system: &TestSystem, user: &TestUser, path: &str, query: &[(&str, &str)]) -> Response {
    system
        .client()
        .get(system.url(path))
        .bearer_auth(&user.access_token)
        .query(query)
        .send()
        .await
        .unwrap()
}

async fn get_ok(system: &TestSystem, user: &TestUser, path: &str, query: &[(&str, &str)]) -> Value {
    let response = get(system, user, path, query).await;
    assert_eq!(response.status(), StatusCode::OK, "GET {path} {query:?}");
    body(response).await
}

/// Every event matching `query`, paged through `/audit/events` with `limit`, checking
/// that pages continue exactly where the previous one ended.
async fn walk_feed(
    system: &TestSystem,
    auditor: &TestUser,
    query: &[(&str, &str)],
    limit: usize,
) -> Vec<Value> {
    let limit_text = limit.to_string();
    let mut after = "0".to_owned();
    let mut events = Vec::new();
    loop {
        let mut page_query = query.to_vec();
        page_query.push(("after", &after));
        page_query.push(("limit", &limit_text));
        let page = get_ok(system, auditor, "/api/v1/audit/events", &page_query).await;
        let page_events = page["events"].as_array().unwrap().clone();
        assert!(page_events.len() <= limit);
        if page_events.len() < limit {
            assert!(page["next_after"].is_null(), "a short page ends the feed");
        } else {
            assert_eq!(page["next_after"], page_events.last().unwrap()["position"]);
        }
        events.extend(page_events);
        match page["next_after"].as_i64() {
            Some(next) => after = next.to_string(),
            None => return events,
        }
    }
}

fn positions(events: &[Value]) -> Vec<i64> {
    events
        .iter()
        .map(|event| event["position"].as_i64().unwrap())
        .collect()
}

fn time(value: &Value) -> DateTime<Utc> {
    value.as_str().unwrap().parse().unwrap()
}

/// Creates a product as `admin` (request id `create-<sku>`); answers its id and position.
async fn create_product(
    system: &TestSystem,
    admin: &TestUser,
    sku: &str,
    stock: i64,
) -> (String, i64) {
    let response = system
        .client()
        .post(system.url("/api/v1/products"))
        .bearer_auth(&admin.access_token)
        .header("x-request-id", format!("create-{sku}"))
        .json(&json!({
            "sku": sku, "name": format!("Product {sku}"), "description": "Audited",
            "price": {"amount": 990, "currency": "EUR"}, "stock": stock
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    let created = body(response).await;
    (
        created["id"].as_str().unwrap().to_owned(),
        created["position"].as_i64().unwrap(),
    )
}

async fn restock(system: &TestSystem, admin: &TestUser, id: &str, quantity: i64) -> i64 {
    let response = system
        .client()
        .post(system.url(&format!("/api/v1/products/{id}/restock")))
        .bearer_auth(&admin.access_token)
        .json(&json!({ "quantity": quantity }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::OK);
    body(response).await["position"].as_i64().unwrap()
}

/// Registers a customer over HTTP (so the stored event carries a real password hash)
/// and answers their id.
async fn register(system: &TestSystem, email: &str) -> String {
    let response = system
        .client()
        .post(system.url("/api/v1/auth/register"))
        .json(&json!({"email": email, "password": "a long secret pw", "name": "Audited"}))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), StatusCode::CREATED);
    body(response).await["user"]["id"]
        .as_str()
        .unwrap()
        .to_owned()
}

async fn event_count(system: &TestSystem) -> usize {
    let count: i64 = sqlx::query_scalar("SELECT count(*) FROM events")
        .fetch_one(&system.db.pool)
        .await
        .unwrap();
    usize::try_from(count).unwrap()
}

#[tokio::test]
async fn the_feed_filters_and_pages_without_gaps_or_duplicates() {
    let system = TestSystem::start().await;
    let auditor = system.user(Role::Auditor).await;
    let admin = system.user(Role::Admin).await;
    let (tea, _) = create_product(&system, &admin, "TEA-1", 5).await;
    restock(&system, &admin, &tea, 2).await;
    restock(&system, &admin, &tea, 3).await;
    let (coffee, _) = create_product(&system, &admin, "COFFEE-1", 1).await;
    register(&system, "feed@example.com").await;

    let everything = walk_feed(&system, &auditor, &[], 1000).await;
    assert_eq!(everything.len(), event_count(&system).await);
    let all_positions = positions(&everything);
    assert!(all_positions.windows(2).all(|pair| pair[0] < pair[1]));
    let first = &everything[0];
    for field in [
        "event_id",
        "position",
        "recorded_at",
        "aggregate_type",
        "aggregate_id",
        "sequence",
        "event_type",
        "event_version",
        "payload",
    ] {
        assert!(!first[field].is_null(), "an event has {field}");
    }
    for field in ["actor_role", "request_id", "correlation_id", "causation_id"] {
        assert!(first["metadata"][field].is_string(), "metadata has {field}");
    }
    assert!(first["metadata"]
        .as_object()
        .unwrap()
        .contains_key("actor_id"));

    // Small pages, continued with next_after, are the same feed: no gaps, no duplicates.
    for limit in [1, 2, 3] {
        let paged = walk_feed(&system, &auditor, &[], limit).await;
        assert_eq!(positions(&paged), all_positions, "pages of {limit}");
    }
    // A page starting in the middle continues after that position.
    let middle = all_positions[2].to_string();
    let rest = get_ok(
        &system,
        &auditor,
        "/api/v1/audit/events",
        &[("after", &middle)],
    )
    .await;
    assert_eq!(
        positions(rest["events"].as_array().unwrap()),
        all_positions[3..]
    );
    assert!(rest["next_after"].is_null());

    let products = walk_feed(&system, &auditor, &[("aggregate_type", "product")], 2).await;
    assert_eq!(products.len(), 4);
    assert!(products
        .iter()
        .all(|event| event["aggregate_type"] == "product"));

    let tea_events = walk_feed(&system, &auditor, &[("aggregate_id", &tea)], 2).await;
    assert_eq!(
        tea_events
            .iter()
            .map(|event| event["event_type"].as_str().unwrap())
            .collect::<Vec<_>>(),
        ["ProductCreated", "ProductRestocked", "ProductRestocked"]
    );
    let typed = walk_feed(
        &system,
        &auditor,
        &[("aggregate_type", "product"), ("aggregate_id", &coffee)],
        10,
    )
    .await;
    assert_eq!(typed.len(), 1);
    let mismatched = walk_feed(
        &system,
        &auditor,
        &[("aggregate_type", "user"), ("aggregate_id", &coffee)],
        10,
    )
    .await;
    assert!(mismatched.is_empty());

    let by_admin = walk_feed(&system, &auditor, &[("actor_id", &admin.id.to_string())], 3).await;
    assert_eq!(positions(&by_admin), positions(&products));
    assert!(by_admin.iter().all(
        |event| event["metadata"]["actor_id"] == admin.id.to_string()
            && event["metadata"]["actor_role"] == "admin"
    ));

    let correlated = walk_feed(&system, &auditor, &[("correlation_id", "create-TEA-1")], 10).await;
    assert_eq!(correlated.len(), 1);
    assert_eq!(correlated[0]["aggregate_id"], tea.as_str());
    assert_eq!(correlated[0]["event_type"], "ProductCreated");

    // Time bounds are inclusive at both ends.
    let from = tea_events[1]["recorded_at"].as_str().unwrap();
    let to = tea_events[2]["recorded_at"].as_str().unwrap();
    let between = walk_feed(&system, &auditor, &[("from", from), ("to", to)], 10).await;
    assert_eq!(positions(&between), positions(&tea_events[1..]));
    let since = walk_feed(&system, &auditor, &[("from", to)], 10).await;
    assert_eq!(
        since.first().unwrap()["position"],
        tea_events[2]["position"]
    );
    assert!(since
        .iter()
        .all(|event| time(&event["recorded_at"]) >= time(&tea_events[2]["recorded_at"])));
}

#[tokio::test]
async fn secrets_are_redacted_wherever_auditors_look() {
    let system = TestSystem::start().await;
    let auditor = system.user(Role::Auditor).await;
    let user = register(&system, "secret@example.com").await;
    let hash: String = sqlx::query_scalar(
        "SELECT payload->'UserRegistered'->>'password_hash' FROM events WHERE aggregate_id = $1",
    )
    .bind(&user)
    .fetch_one(&system.db.pool)
    .await
    .unwrap();
    assert!(hash.starts_with("$argon2id$"), "the store keeps the hash");

    let feed = get_ok(
        &system,
        &auditor,
        "/api/v1/audit/events",
        &[("aggregate_id", &user)],
    )
    .await;
    let registered = &feed["events"][0];
    assert_eq!(registered["event_type"], "UserRegistered");
    assert_eq!(
        registered["payload"]["UserRegistered"]["password_hash"],
        "[REDACTED]"
    );
    assert_eq!(
        registered["payload"]["UserRegistered"]["email"],
        "secret@example.com"
    );

    let stream = get_ok(
        &system,
        &auditor,
        &format!("/api/v1/audit/streams/user/{user}"),
        &[],
    )
    .await;
    assert_eq!(stream["events"][0], *registered);

    let state = get_ok(
        &system,
        &auditor,
        &format!("/api/v1/audit/streams/user/{user}/state"),
        &[("version", "1")],
    )
    .await;
    assert_eq!(state["state"]["password_hash"], "[REDACTED]");
    assert_eq!(state["state"]["email"], "secret@example.com");

    let export = get(&system, &auditor, "/api/v1/audit/export", &[]).await;
    assert_eq!(export.status(), StatusCode::OK);
    let text = export.text().await.unwrap();
    assert!(!text.contains(&hash) && !text.contains("$argon2"));
    assert!(text.contains("[REDACTED]"));
    for answer in [feed.to_string(), stream.to_string(), state.to_string()] {
        assert!(!answer.contains(&hash) && !answer.contains("$argon2"));
    }
}

#[tokio::test]
async fn a_stream_is_in_sequence_order_and_state_folds_to_any_version_or_time() {
    let system = TestSystem::start().await;
    let auditor = system.user(Role::Auditor).await;
    let admin = system.user(Role::Admin).await;
    let (id, _) = create_product(&system, &admin, "FOLD-1", 5).await;
    let mut last = 0;
    for quantity in [1, 2, 3] {
        // Distinct, well-separated times make "between two events" unambiguous.
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        last = restock(&system, &admin, &id, quantity).await;
    }
    // Another product interleaved in the global order must not leak into this stream.
    create_product(&system, &admin, "OTHER-1", 1).await;

    let stream = get_ok(
        &system,
        &auditor,
        &format!("/api/v1/audit/streams/product/{id}"),
        &[],
    )
    .await;
    let events = stream["events"].as_array().unwrap();
    let sequences: Vec<i64> = events
        .iter()
        .map(|event| event["sequence"].as_i64().unwrap())
        .collect();
    assert_eq!(sequences, [1, 2, 3, 4]);
    assert!(events
        .iter()
        .all(|event| event["aggregate_id"] == id.as_str()));

    let state_path = format!("/api/v1/audit/streams/product/{id}/state");
    let expected_stock = [5, 6, 8, 11];
    for (version, stock) in (1..=4).zip(expected_stock) {
        let version_text = version.to_string();
        let state = get_ok(
            &system,
            &auditor,
            &state_path,
            &[("version", &version_text)],
        )
        .await;
        assert_eq!(state["aggregate_type"], "product");
        assert_eq!(state["aggregate_id"], id.as_str());
        assert_eq!(state["version"], version);
        assert_eq!(
            state["as_of"],
            events[usize::try_from(version - 1).unwrap()]["recorded_at"]
        );
        assert_eq!(
            state["state"]["stock_available"], stock,
            "version {version}"
        );
        assert_eq!(state["state"]["sku"], "FOLD-1");
    }

    // The fold agrees with the read model at the same point.
    let min_position = last.to_string();
    let view = body(
        system
            .client()
            .get(system.url(&format!("/api/v1/products/{id}")))
            .query(&[("min_position", &min_position)])
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_eq!(view["stock_available"], 11);

    // As of a time: every event recorded at or before it.
    let second = time(&events[1]["recorded_at"]);
    let third = time(&events[2]["recorded_at"]);
    let between = second + (third - second) / 2;
    assert!(second < between && between < third);
    let at = between.to_rfc3339();
    let state = get_ok(&system, &auditor, &state_path, &[("at", &at)]).await;
    assert_eq!(state["version"], 2);
    assert_eq!(state["as_of"], events[1]["recorded_at"]);
    assert_eq!(state["state"]["stock_available"], 6);
    let exactly = events[2]["recorded_at"].as_str().unwrap();
    let state = get_ok(&system, &auditor, &state_path, &[("at", exactly)]).await;
    assert_eq!(state["version"], 3);
    let later = (Utc::now() + chrono::Duration::hours(1)).to_rfc3339();
    let state = get_ok(&system, &auditor, &state_path, &[("at", &later)]).await;
    assert_eq!(state["version"], 4);
    assert_eq!(state["state"]["stock_available"], 11);

    // Before the first event there is no state; nor beyond the last version.
    let before = (time(&events[0]["recorded_at"]) - chrono::Duration::seconds(1)).to_rfc3339();
    for query in [[("at", before.as_str())], [("version", "5")]] {
        let response = get(&system, &auditor, &state_path, &query).await;
        assert_eq!(response.status(), StatusCode::NOT_FOUND, "{query:?}");
        assert_eq!(body(response).await["error"]["code"], "NOT_FOUND");
    }
    let unknown = uuid::Uuid::new_v4();
    for path in [
        format!("/api/v1/audit/streams/product/{unknown}"),
        format!("/api/v1/audit/streams/product/{unknown}/state?version=1"),
        format!("/api/v1/audit/streams/user/{id}"),
    ] {
        let response = get(&system, &auditor, &path, &[]).await;
        assert_eq!(response.status(), StatusCode::NOT_FOUND, "{path}");
    }

    // Exactly one of version and at, each well-formed.
    let now = Utc::now().to_rfc3339();
    let bad: [&[(&str, &str)]; 6] = [
        &[],
        &[("version", "1"), ("at", &now)],
        &[("version", "0")],
        &[("version", "two")],
        &[("at", "yesterday")],
        &[("at", "2024-13-01T00:00:00Z")],
    ];
    for query in bad {
        let response = get(&system, &auditor, &state_path, query).await;
        assert_eq!(
            response.status(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "{query:?}"
        );
        assert_eq!(body(response).await["error"]["code"], "VALIDATION_FAILED");
    }
    for path in [
        format!("/api/v1/audit/streams/cart/{id}"),
        "/api/v1/audit/streams/product/not-a-uuid".to_owned(),
        format!("/api/v1/audit/streams/cart/{id}/state?version=1"),
    ] {
        let response = get(&system, &auditor, &path, &[]).await;
        assert_eq!(
            response.status(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "{path}"
        );
    }
}

#[tokio::test]
async fn the_trail_filters_by_actor_entity_and_time() {
    let system = TestSystem::start().await;
    let auditor = system.user(Role::Auditor).await;
    let admin = system.user(Role::Admin).await;
    let (tea, _) = create_product(&system, &admin, "TRAIL-1", 5).await;
    let restocked_at = restock(&system, &admin, &tea, 4).await;
    let (other, position) = create_product(&system, &admin, "TRAIL-2", 1).await;
    let min_position = position.to_string();

    let all = get(
        &system,
        &auditor,
        "/api/v1/audit/trail",
        &[("min_position", &min_position)],
    )
    .await;
    assert_eq!(all.status(), StatusCode::OK);
    let applied: i64 = all.headers()["x-projection-position"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!(applied >= position && position > restocked_at);
    let all = body(all).await;
    let items = all["items"].as_array().unwrap();
    // Two users registered, two products created, one restock.
    assert_eq!(items.len(), 5);
    assert!(all["next_cursor"].is_null());

    let for_tea = get_ok(
        &system,
        &auditor,
        "/api/v1/audit/trail",
        &[("aggregate_type", "product"), ("aggregate_id", &tea)],
    )
    .await;
    let summaries: Vec<&str> = for_tea["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|item| item["summary"].as_str().unwrap())
        .collect();
    assert_eq!(summaries.len(), 2);
    assert!(summaries[1].contains("restocked 4"), "{summaries:?}");

    let by_admin = get_ok(
        &system,
        &auditor,
        "/api/v1/audit/trail",
        &[("actor_id", &admin.id.to_string())],
    )
    .await;
    let by_admin = by_admin["items"].as_array().unwrap();
    assert_eq!(by_admin.len(), 3);
    assert!(by_admin
        .iter()
        .all(|item| item["actor_id"] == admin.id.to_string() && item["actor_role"] == "admin"));
    assert_eq!(by_admin[2]["aggregate_id"], other.as_str());

    let users = get_ok(
        &system,
        &auditor,
        "/api/v1/audit/trail",
        &[("aggregate_type", "user")],
    )
    .await;
    assert_eq!(users["items"].as_array().unwrap().len(), 2);

    // Inclusive time bounds: exactly the restock.
    let restocked = &for_tea["items"][1]["recorded_at"];
    let at = restocked.as_str().unwrap();
    let window = get_ok(
        &system,
        &auditor,
        "/api/v1/audit/trail",
        &[("from", at), ("to", at)],
    )
    .await;
    assert_eq!(window["items"].as_array().unwrap().len(), 1);
    assert_eq!(window["items"][0]["recorded_at"], *restocked);

    // Cursor paging walks the same entries.
    let mut walked = Vec::new();
    let mut cursor: Option<String> = None;
    loop {
        let mut query = vec![("limit", "2")];
        if let Some(cursor) = &cursor {
            query.push(("cursor", cursor));
        }
        let page = get_ok(&system, &auditor, "/api/v1/audit/trail", &query).await;
        walked.extend(page["items"].as_array().unwrap().iter().cloned());
        match page["next_cursor"].as_str() {
            Some(next) => cursor = Some(next.to_owned()),
            None => break,
        }
    }
    assert_eq!(walked, *items);

    let bad: [&[(&str, &str)]; 6] = [
        &[("actor_id", "someone")],
        &[("aggregate_type", "cart")],
        &[("aggregate_id", "42")],
        &[("from", "last week")],
        &[("limit", "101")],
        &[("cursor", "not-a-cursor")],
    ];
    for query in bad {
        let response = get(&system, &auditor, "/api/v1/audit/trail", query).await;
        assert_eq!(
            response.status(),
            StatusCode::UNPROCESSABLE_ENTITY,
            "{query:?}"
        );
        assert_eq!(body(response).await["error"]["code"], "VALIDATION_FAILED");
    }
}

#[tokio::test]
async fn the_export_streams_ndjson_equal_to_the_feed() {
    let system = TestSystem::start().await;
    let auditor = system.user(Role::Auditor).await;
    let admin = system.user(Role::Admin).await;
    let (tea, _) = create_product(&system, &admin, "EXPORT-1", 5).await;
    restock(&system, &admin, &tea, 1).await;
    register(&system, "export@example.com").await;
    // Enough history to span several of the export's batches.
    let mut tx = system.db.pool.begin().await.unwrap();
    for sequence in 1..=1203 {
        append_raw_event(&mut tx, "bulk", sequence, "Tested").await;
    }
    tx.commit().await.unwrap();

    let export_lines = |query: Vec<(&'static str, String)>| {
        let request = system
            .client()
            .get(system.url("/api/v1/audit/export"))
            .bearer_auth(&auditor.access_token)
            .query(&query);
        async move {
            let response = request.send().await.unwrap();
            assert_eq!(response.status(), StatusCode::OK);
            assert_eq!(
                response.headers()["content-type"].to_str().unwrap(),
                "application/x-ndjson"
            );
            let text = response.text().await.unwrap();
            assert!(text.is_empty() || text.ends_with('\n'));
            text.lines()
                .map(|line| serde_json::from_str::<Value>(line).expect("each line is JSON"))
                .collect::<Vec<_>>()
        }
    };

    let everything = export_lines(Vec::new()).await;
    assert_eq!(everything.len(), event_count(&system).await);
    assert_eq!(everything, walk_feed(&system, &auditor, &[], 1000).await);

    let tea_only = export_lines(vec![("aggregate_id", tea.clone())]).await;
    assert_eq!(tea_only.len(), 2);
    assert_eq!(
        tea_only,
        walk_feed(&system, &auditor, &[("aggregate_id", &tea)], 100).await
    );

    let after = everything[600]["position"].as_i64().unwrap();
    let tail = export_lines(vec![("after", after.to_string())]).await;
    assert_eq!(tail, everything[601..]);

    let users = export_lines(vec![("aggregate_type", "user".to_owned())]).await;
    assert_eq!(users.len(), 3);
    assert!(users.iter().all(|event| event["aggregate_type"] == "user"));

    let none = export_lines(vec![("correlation_id", "no-such-request".to_owned())]).await;
    assert!(none.is_empty());
}

#[tokio::test]
async fn bad_feed_and_export_filters_are_refused() {
    let system = TestSystem::start().await;
    let auditor = system.user(Role::Auditor).await;
    let cases: [(&str, &str); 11] = [
        ("aggregate_type", "cart"),
        ("aggregate_id", "not-a-uuid"),
        ("actor_id", "12345"),
        ("from", "yesterday"),
        ("to", "2024-02-30T00:00:00Z"),
        ("after", "-1"),
        ("after", "first"),
        ("correlation_id", ""),
        ("limit", "0"),
        ("limit", "1001"),
        ("limit", "many"),
    ];
    for (field, value) in cases {
        for path in ["/api/v1/audit/events", "/api/v1/audit/export"] {
            if path.ends_with("export") && field == "limit" {
                continue;
            }
            let response = get(&system, &auditor, path, &[(field, value)]).await;
            assert_eq!(
                response.status(),
                StatusCode::UNPROCESSABLE_ENTITY,
                "{path} {field}={value}"
            );
            let error = body(response).await;
            assert_eq!(error["error"]["code"], "VALIDATION_FAILED");
            assert!(
                error["error"]["details"][field].is_array(),
                "{path} {field}={value}: {error}"
            );
        }
    }
    let reversed = get(
        &system,
        &auditor,
        "/api/v1/audit/events",
        &[
            ("from", "2024-05-02T00:00:00Z"),
            ("to", "2024-05-01T00:00:00Z"),
        ],
    )
    .await;
    assert_eq!(reversed.status(), StatusCode::UNPROCESSABLE_ENTITY);
    let largest = get(
        &system,
        &auditor,
        "/api/v1/audit/events",
        &[("limit", "1000")],
    )
    .await;
    assert_eq!(largest.status(), StatusCode::OK);
}

fn projection_names(system_commands: hindsight_commands::CommandBus) -> Vec<&'static str> {
    hindsight_projections::live_read_models()
        .iter()
        .chain(hindsight_projections::process_managers(system_commands).iter())
        .map(|projection| projection.name())
        .collect()
}

#[tokio::test]
async fn operators_see_every_projection_against_the_head() {
    let system = TestSystem::start().await;
    let operator = system.user(Role::Operator).await;
    let admin = system.user(Role::Admin).await;
    let (id, _) = create_product(&system, &admin, "OPS-1", 2).await;
    let head = restock(&system, &admin, &id, 1).await;
    let names = projection_names(system.app.state.commands.clone());
    assert!(names.contains(&"audit_trail") && names.len() >= 6);

    eventually(10, "every projection is live at the head", || async {
        let list = get_ok(&system, &operator, "/api/v1/admin/projections", &[]).await;
        list.as_array()
            .unwrap()
            .iter()
            .all(|projection| projection["status"] == "live" && projection["position"] == head)
    })
    .await;

    let list = get_ok(&system, &operator, "/api/v1/admin/projections", &[]).await;
    let list = list.as_array().unwrap();
    assert_eq!(
        list.iter()
            .map(|projection| projection["name"].as_str().unwrap())
            .collect::<Vec<_>>(),
        names
    );
    for projection in list {
        assert_eq!(projection["head"], head);
        assert_eq!(projection["lag"], 0);
        assert!(projection.get("last_error").is_none(), "{projection}");
    }

    let one = get_ok(&system, &admin, "/api/v1/admin/projections/products", &[]).await;
    assert_eq!(one["name"], "products");
    assert_eq!(one["position"], head);
    assert_eq!(one["head"], head);
    assert_eq!(one["lag"], 0);
    let unknown = get(
        &system,
        &operator,
        "/api/v1/admin/projections/nonsense",
        &[],
    )
    .await;
    assert_eq!(unknown.status(), StatusCode::NOT_FOUND);
}

/// Signs an operator in on an app that runs no relay and no projection workers.
async fn operator_on(app: &TestApp) -> String {
    use hindsight_domain::user::{PasswordHash, UserCommand};
    use hindsight_domain::values::{Email, PersonName};
    let id = hindsight_domain::ids::UserId::new();
    let password = "correct horse battery staple";
    let hash = app
        .state
        .passwords
        .hash(&secrecy::SecretString::from(password.to_owned()))
        .await
        .unwrap();
    app.state
        .commands
        .users
        .execute(
            id.as_uuid(),
            UserCommand::Register {
                user_id: id,
                email: Email::parse("operator@example.com").unwrap(),
                name: PersonName::parse("Operator").unwrap(),
                password_hash: PasswordHash::new(hash).unwrap(),
                role: Role::Operator,
            },
            &hindsight_commands::EventMetadata::for_request(
                hindsight_commands::Actor::system(),
                "test-setup",
            ),
            None,
        )
        .await
        .unwrap()
        .unwrap();
    let tokens: Value = app
        .client
        .post(app.url("/api/v1/auth/login"))
        .json(&json!({"email": "operator@example.com", "password": password}))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    tokens["access_token"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn projections_that_never_ran_are_catching_up_from_zero() {
    let db = TestDb::new().await;
    let app = TestApp::spawn(&db).await;
    let token = operator_on(&app).await;
    let list: Value = app
        .client
        .get(app.url("/api/v1/admin/projections"))
        .bearer_auth(&token)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let list = list.as_array().unwrap();
    assert_eq!(
        list.len(),
        projection_names(app.state.commands.clone()).len()
    );
    for projection in list {
        assert_eq!(projection["status"], "catching_up", "{projection}");
        assert_eq!(projection["position"], 0);
        assert_eq!(projection["head"], 1, "the operator's registration");
        assert_eq!(projection["lag"], 1);
    }
}

#[tokio::test]
async fn a_correlation_id_that_no_request_could_have_is_refused_not_a_server_error() {
    let system = hindsight_tests::TestSystem::start().await;
    let auditor = system.user(hindsight_domain::role::Role::Auditor).await;
    for path in ["/api/v1/audit/events", "/api/v1/audit/export"] {
        let response = system
            .client()
            .get(system.url(&format!("{path}?correlation_id=a%00b")))
            .bearer_auth(&auditor.access_token)
            .send()
            .await
            .unwrap();
        assert_eq!(response.status(), 422, "{path}");
    }
}
