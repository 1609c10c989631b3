//! Who may call what: the contract's role table, enforced in one place.
//!
//! Every route is listed here with the roles allowed to reach it. The authorization layer
//! looks the matched route up before any handler runs; a route without a rule is refused,
//! so a new route cannot be reached until someone decides who may call it (and the role x
//! route matrix test fails until then). Ownership ("own orders", "the user itself") is
//! decided by the handlers, which answer 404 rather than 403 so a customer cannot learn
//! that another customer's resource exists.

use axum::extract::{MatchedPath, Request, State};
use axum::http::Method;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hindsight_domain::role::Role;

use crate::auth::AuthUser;
use crate::error::ApiError;
use crate::state::AppState;

/// Who may reach a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Anyone, signed in or not.
    Anyone,
    /// Any signed-in user, whatever the role.
    SignedIn,
    /// Signed-in users with one of these roles.
    Roles(&'static [Role]),
}

impl Access {
    pub fn allows(self, role: Option<Role>) -> bool {
        match (self, role) {
            (Self::Anyone, _) => true,
            (Self::SignedIn, Some(_)) => true,
            (Self::Roles(roles), Some(role)) => roles.contains(&role),
            _ => false,
        }
    }
}

use Role::{Admin, Auditor, Customer, Operator};

const ADMIN: Access = Access::Roles(&[Admin]);
const READ_ALL: Access = Access::Roles(&[Admin, Auditor]);
const OPERATE: Access = Access::Roles(&[Admin, Operator]);

/// (method, route pattern, access): the contract's table.
pub const RULES: &[(Method, &str, Access)] = &[
    (Method::GET, "/health/live", Access::Anyone),
    (Method::GET, "/health/ready", Access::Anyone),
    (Method::GET, "/metrics", Access::Anyone),
    (Method::GET, "/api/v1/openapi.json", Access::Anyone),
    (Method::POST, "/api/v1/auth/register", Access::Anyone),
    (Method::POST, "/api/v1/auth/login", Access::Anyone),
    (Method::POST, "/api/v1/auth/refresh", Access::Anyone),
    (Method::POST, "/api/v1/auth/logout", Access::Anyone),
    (Method::GET, "/api/v1/users/me", Access::SignedIn),
    (Method::PATCH, "/api/v1/users/me", Access::SignedIn),
    (Method::POST, "/api/v1/users/me/password", Access::SignedIn),
    (Method::GET, "/api/v1/users", READ_ALL),
    // Admin, auditor, or the user itself (decided by the handler).
    (Method::GET, "/api/v1/users/{id}", Access::SignedIn),
    (Method::PUT, "/api/v1/users/{id}/role", ADMIN),
    (Method::POST, "/api/v1/users/{id}/deactivate", ADMIN),
    (Method::POST, "/api/v1/users/{id}/reactivate", ADMIN),
    (Method::GET, "/api/v1/products", Access::Anyone),
    (Method::GET, "/api/v1/products/{id}", Access::Anyone),
    (Method::POST, "/api/v1/products", ADMIN),
    (Method::PATCH, "/api/v1/products/{id}", ADMIN),
    (Method::POST, "/api/v1/products/{id}/restock", ADMIN),
    (Method::POST, "/api/v1/products/{id}/discontinue", ADMIN),
    (Method::POST, "/api/v1/orders", Access::Roles(&[Customer])),
    // Customers see only their own (decided by the handler).
    (
        Method::GET,
        "/api/v1/orders",
        Access::Roles(&[Customer, Admin, Auditor]),
    ),
    (
        Method::GET,
        "/api/v1/orders/{id}",
        Access::Roles(&[Customer, Admin, Auditor]),
    ),
    (
        Method::GET,
        "/api/v1/orders/{id}/stream",
        Access::Roles(&[Customer, Admin]),
    ),
    (
        Method::POST,
        "/api/v1/orders/{id}/pay",
        Access::Roles(&[Customer]),
    ),
    (
        Method::POST,
        "/api/v1/orders/{id}/cancel",
        Access::Roles(&[Customer, Admin]),
    ),
    (Method::POST, "/api/v1/orders/{id}/ship", ADMIN),
    (Method::GET, "/api/v1/audit/events", READ_ALL),
    (
        Method::GET,
        "/api/v1/audit/streams/{aggregate_type}/{aggregate_id}",
        READ_ALL,
    ),
    (
        Method::GET,
        "/api/v1/audit/streams/{aggregate_type}/{aggregate_id}/state",
        READ_ALL,
    ),
    (Method::GET, "/api/v1/audit/trail", READ_ALL),
    (Method::GET, "/api/v1/audit/export", READ_ALL),
    (Method::GET, "/api/v1/audit/verify", READ_ALL),
    (Method::GET, "/api/v1/admin/projections", OPERATE),
    (Method::GET, "/api/v1/admin/projections/{name}", OPERATE),
    (
        Method::POST,
        "/api/v1/admin/projections/{name}/rebuild",
        OPERATE,
    ),
];

/// The rule of a route, if it has one. `HEAD` follows `GET`.
pub fn rule(method: &Method, path: &str) -> Option<Access> {
    let method = if method == Method::HEAD {
        &Method::GET
    } else {
        method
    };
    RULES
        .iter()
        .find(|(rule_method, pattern, _)| rule_method == method && *pattern == path)
        .map(|(_, _, access)| *access)
}

/// The authorization layer (a route layer, so it sees the matched route).
pub async fn authorize(
    State(state): State<AppState>,
    matched: Option<MatchedPath>,
    request: Request,
    next: Next,
) -> Response {
    let Some(matched) = matched else {
        return next.run(request).await;
    };
    let Some(access) = rule(request.method(), matched.as_str()) else {
        tracing::error!(
            route = matched.as_str(),
            "route has no authorization rule; refused"
        );
        return ApiError::Forbidden.into_response();
    };
    if access == Access::Anyone {
        return next.run(request).await;
    }
    let (mut parts, body) = request.into_parts();
    let user = match AuthUser::authenticate(&parts, &state).await {
        Ok(user) => user,
        Err(error) => return error.into_response(),
    };
    if !access.allows(Some(user.role)) {
        return ApiError::Forbidden.into_response();
    }
    parts.extensions.insert(user);
    next.run(Request::from_parts(parts, body)).await
}
