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
//! [`routes`] (one module per concept), [`serve`] and [`cli`] (the commands).

use axum::middleware;
use axum::routing::get;
use axum::Router;

pub mod cli;
pub mod config;
pub mod error;
pub mod password;
pub mod request_id;
pub mod routes;
pub mod serve;
pub mod state;
pub mod telemetry;

use config::{Cli, Command, UserCommand};
use error::ApiError;
use state::AppState;

/// The whole HTTP application.
pub fn build_app(state: AppState) -> Router {
    Router::new()
        .route("/health/live", get(routes::health::live))
        .route("/health/ready", get(routes::health::ready))
        .fallback(|| async { ApiError::NotFound })
        .layer(middleware::from_fn(request_id::middleware))
        .with_state(state)
}

/// Runs one command of the `hindsight` binary.
pub async fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Serve(args) => serve::serve(*args).await,
        Command::Migrate(args) => cli::migrate(args).await,
        Command::User(UserCommand::Create(args)) => cli::create_user(args).await,
    }
}
