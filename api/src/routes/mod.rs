//! The HTTP routes, one module per concept, registered through [`Routes`]: the router
//! is built from a table of (method, path, handler), so the table is exactly what is
//! served and tests can walk it (every route must have an authorization rule).

use axum::handler::Handler;
use axum::http::Method;
use axum::routing::{on, MethodFilter};
use axum::Router;

use crate::state::AppState;

pub mod admin;
pub mod audit;
pub mod auth;
pub mod health;
pub mod orders;
pub mod products;
pub mod support;
pub mod users;

/// A router together with the list of what it serves.
#[derive(Debug)]
pub struct Routes {
    prefix: &'static str,
    router: Router<AppState>,
    table: Vec<(Method, String)>,
}

impl Routes {
    fn new(prefix: &'static str) -> Self {
        Self {
            prefix,
            router: Router::new(),
            table: Vec::new(),
        }
    }

    /// Serves `handler` for `method` on `path` (relative to the prefix).
    pub fn add<H, T>(mut self, method: Method, path: &'static str, handler: H) -> Self
    where
        H: Handler<T, AppState>,
        T: 'static,
    {
        let filter = MethodFilter::try_from(method.clone())
            .unwrap_or_else(|_| panic!("{method} is not a routable method"));
        self.router = self.router.route(path, on(filter, handler));
        self.table.push((method, format!("{}{path}", self.prefix)));
        self
    }
}

/// The service routes outside `/api/v1`.
fn service() -> Routes {
    Routes::new("")
        .add(Method::GET, "/health/live", health::live)
        .add(Method::GET, "/health/ready", health::ready)
        .add(Method::GET, "/metrics", crate::metrics::render)
}

/// The `/api/v1` routes.
fn api() -> Routes {
    let routes = Routes::new("/api/v1").add(Method::GET, "/openapi.json", crate::openapi::serve);
    let routes = auth::routes(routes);
    let routes = users::routes(routes);
    let routes = products::routes(routes);
    let routes = orders::routes(routes);
    let routes = audit::routes(routes);
    admin::routes(routes)
}

/// The router of every route, and the table of what it serves.
pub fn all() -> (Router<AppState>, Vec<(Method, String)>) {
    let service = service();
    let api = api();
    let mut table = service.table;
    table.extend(api.table);
    (service.router.nest(api.prefix, api.router), table)
}

/// Every (method, route pattern) the application serves.
pub fn table() -> Vec<(Method, String)> {
    all().1
}
