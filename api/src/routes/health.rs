//! `GET /health/live` (the process is up) and `GET /health/ready` (Postgres reachable,
//! migrations applied, NATS connected).

use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json;
use serde::Serialize;

use crate::state::AppState;

#[derive(Debug, Serialize)]
struct Liveness {
    status: &'static str,
}

pub async fn live() -> impl IntoResponse {
    Json(Liveness { status: "ok" })
}

#[derive(Debug, Serialize)]
struct Readiness {
    status: &'static str,
    checks: Checks,
}

#[derive(Debug, Serialize)]
struct Checks {
    postgres: &'static str,
    migrations: &'static str,
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
