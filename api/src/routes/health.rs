//! `GET /health/live` (the process is up) and `GET /health/ready` (Postgres reachable,
//! migrations applied, NATS connected).

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json;
use serde::Serialize;
use utoipa::ToSchema;

use crate::state::AppState;

/// `GET /health/live`: `{"status": "ok"}`.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct Liveness {
    #[schema(value_type = String, pattern = "^ok$")]
    status: &'static str,
}

pub async fn live() -> impl IntoResponse {
    Json(Liveness { status: "ok" })
}

/// `GET /health/ready`: `ready` (200) or `not_ready` (503), with each dependency's check.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct Readiness {
    /// `ready` or `not_ready`.
    #[schema(value_type = String, pattern = "^(ready|not_ready)$")]
    status: &'static str,
    checks: Checks,
}

#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct Checks {
    /// `ok` or `unreachable`.
    #[schema(value_type = String)]
    postgres: &'static str,
    /// `ok`, `pending` or `unknown`.
    #[schema(value_type = String)]
    migrations: &'static str,
    /// `ok`, `unreachable` or `not_used`.
    #[schema(value_type = String)]
    nats: &'static str,
}

pub async fn ready(State(state): State<AppState>) -> impl IntoResponse {
    let (postgres, migrations) = match hindsight_commands::db::is_up_to_date(&state.pool).await {
        Ok(true) => ("ok", "ok"),
        Ok(false) => ("ok", "pending"),
        Err(error) => {
            tracing::warn!(%error, "readiness: Postgres unreachable");
            ("unreachable", "unknown")
        }
    };
    let nats = match &state.nats {
        None => "not_used",
        Some(client) => match client.connection_state() {
            async_nats::connection::State::Connected => "ok",
            _ => "unreachable",
        },
    };
    let ready = postgres == "ok" && migrations == "ok" && nats != "unreachable";
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(Readiness {
            status: if ready { "ready" } else { "not_ready" },
            checks: Checks {
                postgres,
                migrations,
                nats,
            },
        }),
    )
}
