//! Hindsight's thin HTTP layer and the `hindsight` binary's commands.
//!
//! Routes map writes to commands (`hindsight-commands`) and reads to read models
//! (`hindsight-projections`), nothing else. [`build_app`] assembles the router from an
//! [`state::AppState`] so tests can serve it on any port; [`run`] is what `main` calls:
//! `serve` (the API, the relay and the projection workers, each switchable), `migrate`,
//! and `user create`.
//!
//! Modules: [`config`] (flags and environment), [`error`] (the one error envelope),
//! [`request_id`] (`X-Request-Id` and the per-request span), [`password`] (argon2id),
//! [`routes`] (one module per concept), [`openapi`] (the OpenAPI document generated from
//! the routes, the policy and the types), [`serve`] and [`cli`] (the commands).

use axum::extract::DefaultBodyLimit;
use axum::http::{header, HeaderValue, Method};
use axum::middleware;
use axum::Router;
use tower_http::compression::CompressionLayer;
use tower_http::cors::{AllowOrigin, CorsLayer};

pub mod access;
pub mod auth;
pub mod cli;
pub mod config;
pub mod error;
pub mod extract;
pub mod idempotency;
pub mod metrics;
pub mod openapi;
pub mod password;
pub mod policy;
pub mod protect;
pub mod rate_limit;
pub mod request_id;
pub mod routes;
pub mod serve;
pub mod state;
pub mod telemetry;

use config::{AuditCommand, Cli, Command, EventsCommand, ProjectionsCommand, UserCommand};
use error::ApiError;
use state::AppState;

fn cors(origins: &[String]) -> CorsLayer {
    let origins: Vec<HeaderValue> = origins
        .iter()
        .map(|origin| origin.trim())
        .filter(|origin| !origin.is_empty())
        .filter_map(|origin| HeaderValue::from_str(origin).ok())
        .collect();
    CorsLayer::new()
        .allow_origin(AllowOrigin::list(origins))
        .allow_methods([Method::GET, Method::POST, Method::PUT, Method::PATCH])
        .allow_headers([
            header::AUTHORIZATION,
            header::CONTENT_TYPE,
            header::IF_MATCH,
            header::HeaderName::from_static("idempotency-key"),
            header::HeaderName::from_static("x-request-id"),
        ])
        .expose_headers([
            header::ETAG,
            header::RETRY_AFTER,
            header::HeaderName::from_static("x-request-id"),
            header::HeaderName::from_static("x-event-position"),
            header::HeaderName::from_static("x-projection-position"),
        ])
        .max_age(protect::CORS_MAX_AGE)
}

/// The whole HTTP application.
pub fn build_app(state: AppState) -> Router {
    metrics::install();
    let (routes, _) = routes::all();
    routes
        // Route layers run outermost last: metrics, then authorization, then idempotency.
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            idempotency::layer,
        ))
        .route_layer(middleware::from_fn_with_state(
            state.clone(),
            policy::authorize,
        ))
        .route_layer(middleware::from_fn(metrics::track))
        .fallback(|| async { ApiError::NotFound })
        .method_not_allowed_fallback(|| async { ApiError::MethodNotAllowed })
        .layer(DefaultBodyLimit::max(state.settings.body_limit))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            protect::timeout,
        ))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            rate_limit::layer,
        ))
        .layer(CompressionLayer::new())
        .layer(cors(&state.settings.cors_origins))
        .layer(middleware::from_fn_with_state(
            state.clone(),
            protect::headers,
        ))
        .layer(middleware::from_fn(request_id::middleware))
        .with_state(state)
}

/// Runs one command of the `hindsight` binary.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(args) => serve::serve(*args).await,
        Command::Migrate(args) => cli::migrate(args).await,
        Command::User(UserCommand::Create(args)) => cli::create_user(args).await,
        Command::Projections(ProjectionsCommand::List(args)) => cli::list_projections(args).await,
        Command::Projections(ProjectionsCommand::Status { database, name }) => {
            cli::projection_status(database, name).await
        }
        Command::Projections(ProjectionsCommand::Rebuild {
            database,
            name,
            all,
        }) => cli::rebuild_projections(database, name, all).await,
        Command::Events(EventsCommand::Export(args)) => cli::export_events(args).await,
        Command::Events(EventsCommand::Check(args)) => cli::check_events(args).await,
        Command::Audit(AuditCommand::Verify(args)) => cli::verify_history(args).await,
    }
}
