//! The OpenAPI document: served to anyone, generated from the running router, and in
//! agreement with the contract on the points clients rely on most.

use hindsight_tests::TestSystem;
use serde_json::Value;

fn operation<'a>(document: &'a Value, method: &str, path: &str) -> &'a Value {
    let operation = &document["paths"][path][method];
    assert!(operation.is_object(), "{method} {path} is not documented");
    operation
}

fn parameter_names(operation: &Value) -> Vec<&str> {
    operation["parameters"]
        .as_array()
        .map(|parameters| {
            parameters
                .iter()
                .filter_map(|parameter| parameter["name"].as_str())
                .collect()
        })
        .unwrap_or_default()
}

#[tokio::test]
async fn anyone_gets_the_openapi_document_and_it_agrees_with_the_contract() {
    let system = TestSystem::start().await;
    let response = system
        .client()
        .get(system.url("/api/v1/openapi.json"))
        .header("x-request-id", "openapi-check")
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    assert_eq!(response.headers()["x-request-id"], "openapi-check");
    assert!(response.headers()["content-type"]
        .to_str()
        .unwrap()
        .starts_with("application/json"));
    let document: Value = response.json().await.unwrap();
    assert_eq!(document["openapi"], "3.1.0");

    // Every route the router serves is there, and only those.
    let served = hindsight_api::routes::table();
    let documented: usize = document["paths"]
        .as_object()
        .unwrap()
        .values()
        .map(|item| item.as_object().unwrap().len())
        .sum();
    assert_eq!(documented, served.len());
    for (method, path) in &served {
        operation(&document, &method.as_str().to_lowercase(), path);
    }

    // Bearer tokens, required where the role table requires a session.
    let scheme = &document["components"]["securitySchemes"]["bearerAuth"];
    assert_eq!(scheme["type"], "http");
    assert_eq!(scheme["scheme"], "bearer");
    let login = operation(&document, "post", "/api/v1/auth/login");
    assert!(login.get("security").is_none());
    let products = operation(&document, "get", "/api/v1/products");
    assert!(products.get("security").is_none());
    let me = operation(&document, "get", "/api/v1/users/me");
    assert_eq!(me["security"][0]["bearerAuth"], serde_json::json!([]));

    // Statuses of the contract's writes.
    for (method, path, status) in [
        ("post", "/api/v1/auth/register", "201"),
        ("post", "/api/v1/products", "201"),
        ("post", "/api/v1/orders", "201"),
        ("post", "/api/v1/auth/logout", "204"),
        ("post", "/api/v1/admin/projections/{name}/rebuild", "202"),
        ("post", "/api/v1/orders/{id}/pay", "200"),
    ] {
        let responses = &operation(&document, method, path)["responses"];
        assert!(
            responses.get(status).is_some(),
            "{method} {path} does not answer {status}"
        );
    }

    // Reads wait for min_position; commands take Idempotency-Key (and If-Match when
    // they change an existing aggregate) and answer their position.
    let list = operation(&document, "get", "/api/v1/products");
    let names = parameter_names(list);
    for name in [
        "q",
        "status",
        "min_price",
        "max_price",
        "sort",
        "limit",
        "cursor",
    ] {
        assert!(names.contains(&name), "GET /products lacks {name}");
    }
    assert!(names.contains(&"min_position"));
    assert!(list["responses"]["200"]["headers"]
        .get("X-Projection-Position")
        .is_some());
    let restock = operation(&document, "post", "/api/v1/products/{id}/restock");
    let names = parameter_names(restock);
    assert!(names.contains(&"Idempotency-Key") && names.contains(&"If-Match"));
    assert!(restock["responses"]["200"]["headers"]
        .get("X-Event-Position")
        .is_some());

    // The one error envelope, and every business rule's code.
    let error = &document["components"]["schemas"]["Error"];
    assert_eq!(error["required"], serde_json::json!(["error"]));
    let codes: Vec<&str> = document["components"]["schemas"]["ErrorCode"]["enum"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(Value::as_str)
        .collect();
    for code in [
        "VALIDATION_FAILED",
        "PROJECTION_LAGGING",
        "INSUFFICIENT_STOCK",
        "ORDER_ALREADY_SHIPPED",
        "EMAIL_TAKEN",
        "SKU_TAKEN",
        "PAYMENT_AMOUNT_MISMATCH",
        "IDEMPOTENCY_KEY_REUSED",
    ] {
        assert!(codes.contains(&code), "{code} is not listed");
    }

    // Views: field names as the contract spells them.
    let product = &document["components"]["schemas"]["ProductView"]["properties"];
    for field in [
        "id",
        "sku",
        "name",
        "description",
        "price",
        "stock_available",
        "stock_reserved",
        "status",
        "created_at",
        "updated_at",
        "version",
    ] {
        assert!(product.get(field).is_some(), "ProductView lacks {field}");
    }
    let money = &document["components"]["schemas"]["Money"];
    assert_eq!(money["properties"]["amount"]["type"], "integer");
    let export = operation(&document, "get", "/api/v1/audit/export");
    assert!(export["responses"]["200"]["content"]
        .get("application/x-ndjson")
        .is_some());
}

/// The document describes what the server actually answers, for a real product.
#[tokio::test]
async fn a_product_answer_has_every_field_the_document_requires() {
    let system = TestSystem::start().await;
    let admin = system.user(hindsight_domain::role::Role::Admin).await;
    let created: Value = system
        .create_product(
            &admin.access_token,
            serde_json::json!({
                "sku": "DOC-1", "name": "Documented", "description": "",
                "price": {"amount": 100, "currency": "EUR"}, "stock": 1
            }),
        )
        .await;
    let product: Value = system
        .client()
        .get(system.url(&format!(
            "/api/v1/products/{}?min_position={}",
            created["id"].as_str().unwrap(),
            created["position"]
        )))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let document: Value = system
        .client()
        .get(system.url("/api/v1/openapi.json"))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let schema = &document["components"]["schemas"]["ProductView"];
    for field in schema["required"].as_array().unwrap() {
        let field = field.as_str().unwrap();
        assert!(product.get(field).is_some(), "the answer lacks {field}");
    }
    let answered: Vec<&String> = product.as_object().unwrap().keys().collect();
    for field in answered {
        assert!(
            schema["properties"].get(field).is_some(),
            "{field} is not documented"
        );
    }
}

// Inputs found by fuzzing against the document (scripts/schemathesis) that Postgres
// cannot store: text with U+0000 must be refused, never answered with 500.

#[tokio::test]
async fn a_login_with_an_unstorable_address_fails_like_an_unknown_one() {
    let system = TestSystem::start().await;
    let response = system
        .client()
        .post(system.url("/api/v1/auth/login"))
        .json(&serde_json::json!({ "email": "a\u{0}b@example.com", "password": "whatever it is" }))
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 401);
    let body: Value = response.json().await.unwrap();
    assert_eq!(body["error"]["code"], "UNAUTHENTICATED");
}

#[tokio::test]
async fn a_cancel_reason_with_a_nul_character_is_refused() {
    let system = TestSystem::start().await;
    let admin = system.user(hindsight_domain::role::Role::Admin).await;
    let customer = system.user(hindsight_domain::role::Role::Customer).await;
    let product: Value = system
        .create_product(
            &admin.access_token,
            serde_json::json!({
                "sku": "NUL-1", "name": "Tea", "description": "",
                "price": {"amount": 100, "currency": "EUR"}, "stock": 5
            }),
        )
        .await;
    let order: Value = system
        .client()
        .post(system.url("/api/v1/orders"))
        .bearer_auth(&customer.access_token)
        .json(&serde_json::json!({ "lines": [{ "product_id": product["id"], "quantity": 1 }] }))
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let cancel = system.url(&format!(
        "/api/v1/orders/{}/cancel",
        order["id"].as_str().unwrap()
    ));
    let refused = system
        .client()
        .post(&cancel)
        .bearer_auth(&customer.access_token)
        .json(&serde_json::json!({ "reason": "changed\u{0}my mind" }))
        .send()
        .await
        .unwrap();
    assert_eq!(refused.status(), 422);
    let body: Value = refused.json().await.unwrap();
    assert_eq!(body["error"]["code"], "VALIDATION_FAILED");
    assert!(body["error"]["details"].get("reason").is_some());
    let cancelled = system
        .client()
        .post(&cancel)
        .bearer_auth(&customer.access_token)
        .json(&serde_json::json!({ "reason": "changed my mind" }))
        .send()
        .await
        .unwrap();
    assert_eq!(cancelled.status(), 200);
}
