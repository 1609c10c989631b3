//! The role x route matrix: every route the router serves has an authorization rule, and
//! every role reaches exactly the routes the contract's table gives it. The expectations
//! below are written from the contract, not from the policy under test.

use hindsight_api::policy;
use hindsight_domain::role::Role;
use hindsight_tests::{TestSystem, TestUser};
use reqwest::{Method, StatusCode};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Caller {
    Anonymous,
    Customer,
    Auditor,
    Operator,
    Admin,
}

const ALL: &[Caller] = &[
    Caller::Anonymous,
    Caller::Customer,
    Caller::Auditor,
    Caller::Operator,
    Caller::Admin,
];
const SIGNED_IN: &[Caller] = &[
    Caller::Customer,
    Caller::Auditor,
    Caller::Operator,
    Caller::Admin,
];
const ADMIN: &[Caller] = &[Caller::Admin];
const READ_ALL: &[Caller] = &[Caller::Auditor, Caller::Admin];

/// The contract's role table (API.md, "Roles").
fn contract(method: &Method, path: &str) -> Option<&'static [Caller]> {
    let m = method.as_str();
    Some(match (m, path) {
        (_, "/health/live" | "/health/ready" | "/metrics" | "/api/v1/openapi.json") => ALL,
        ("POST", p) if p.starts_with("/api/v1/auth/") => ALL,
        ("GET", "/api/v1/products" | "/api/v1/products/{id}") => ALL,
        (_, "/api/v1/users/me" | "/api/v1/users/me/password") => SIGNED_IN,
        ("GET", "/api/v1/users") => READ_ALL,
        // Admin, auditor or the user itself: every signed-in role reaches it.
        ("GET", "/api/v1/users/{id}") => SIGNED_IN,
        (_, p) if p.starts_with("/api/v1/users/") => ADMIN,
        (_, p) if p.starts_with("/api/v1/products") => ADMIN,
        ("POST", "/api/v1/orders" | "/api/v1/orders/{id}/pay") => &[Caller::Customer],
        ("POST", "/api/v1/orders/{id}/cancel") => &[Caller::Customer, Caller::Admin],
        ("POST", "/api/v1/orders/{id}/ship") => ADMIN,
        ("GET", "/api/v1/orders/{id}/stream") => &[Caller::Customer, Caller::Admin],
        ("GET", "/api/v1/orders" | "/api/v1/orders/{id}") => {
            &[Caller::Customer, Caller::Auditor, Caller::Admin]
        }
        (_, p) if p.starts_with("/api/v1/audit/") => READ_ALL,
        (_, p) if p.starts_with("/api/v1/admin/projections") => &[Caller::Operator, Caller::Admin],
        _ => return None,
    })
}

fn concrete(path: &str) -> String {
    path.replace("{id}", &uuid::Uuid::new_v4().to_string())
        .replace("{aggregate_type}", "product")
        .replace("{aggregate_id}", &uuid::Uuid::new_v4().to_string())
        .replace("{name}", "products")
}

#[tokio::test]
async fn every_route_has_a_rule_and_each_role_reaches_what_the_contract_gives_it() {
    let table = hindsight_api::routes::table();
    assert!(table.len() >= 25, "suspiciously few routes: {table:?}");
    for (method, path) in &table {
        assert!(
            policy::rule(method, path).is_some(),
            "{method} {path} has no authorization rule"
        );
        assert!(
            contract(method, path).is_some(),
            "{method} {path} is not in the contract's role table"
        );
    }

    let system = TestSystem::start().await;
    let mut users: Vec<(Caller, Option<TestUser>)> = vec![(Caller::Anonymous, None)];
    for (caller, role) in [
        (Caller::Customer, Role::Customer),
        (Caller::Auditor, Role::Auditor),
        (Caller::Operator, Role::Operator),
        (Caller::Admin, Role::Admin),
    ] {
        users.push((caller, Some(system.user(role).await)));
    }
    assert_eq!(users.len(), ALL.len());

    for (method, path) in &table {
        let allowed = contract(method, path).unwrap_or_default();
        for (caller, user) in &users {
            let mut request = system
                .client()
                .request(method.clone(), system.url(&concrete(path)));
            if let Some(user) = user {
                request = request.bearer_auth(&user.access_token);
            }
            if *method != Method::GET {
                request = request.json(&serde_json::json!({}));
            }
            let status = request.send().await.unwrap().status();
            if allowed.contains(caller) {
                assert!(
                    status != StatusCode::UNAUTHORIZED && status != StatusCode::FORBIDDEN,
                    "{caller:?} should reach {method} {path}, got {status}"
                );
            } else if *caller == Caller::Anonymous {
                assert_eq!(
                    status,
                    StatusCode::UNAUTHORIZED,
                    "anonymous {method} {path}"
                );
            } else {
                assert_eq!(status, StatusCode::FORBIDDEN, "{caller:?} {method} {path}");
            }
        }
    }
}
