//! Prometheus metrics: request counts and latency by route and status, command outcomes
//! by code, and relay and projection positions, lag and failures and the connections of
//! both Postgres pools (read at scrape time).

use std::sync::OnceLock;
use std::time::Instant;

use axum::extract::{MatchedPath, Request, State};
use axum::http::header;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

use crate::error::ApiError;
use crate::state::AppState;

static HANDLE: OnceLock<Option<PrometheusHandle>> = OnceLock::new();

/// The process-wide recorder (installed once; several apps in one test process share it).
fn handle() -> Option<&'static PrometheusHandle> {
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(
                    Matcher::Suffix("duration_seconds".to_owned()),
                    &[
                        0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0,
                    ],
                )
                .ok()?
                .build_recorder();
            let handle = recorder.handle();
            metrics::set_global_recorder(recorder).ok()?;
            Some(handle)
        })
        .as_ref()
}

/// Installs the recorder at start-up.
pub fn install() {
    if handle().is_none() {
        tracing::warn!("another metrics recorder is installed; /metrics will be empty");
    }
}

/// Middleware: counts and times every request by route template and status.
pub async fn track(request: Request, next: Next) -> Response {
    let route = request
        .extensions()
        .get::<MatchedPath>()
        .map_or_else(|| "unmatched".to_owned(), |path| path.as_str().to_owned());
    let method = request.method().as_str().to_owned();
    let started = Instant::now();
    let response = next.run(request).await;
    let status = response.status().as_u16().to_string();
    let labels = [("route", route), ("method", method), ("status", status)];
    metrics::counter!("hindsight_http_requests_total", &labels).increment(1);
    metrics::histogram!("hindsight_http_request_duration_seconds", &labels)
        .record(started.elapsed().as_secs_f64());
    response
}

/// `GET /metrics`.
pub async fn render(State(state): State<AppState>) -> Result<Response, ApiError> {
    let head = hindsight_commands::relay::head(&state.pool)
        .await
        .map_err(ApiError::from_sqlx)?;
    metrics::gauge!("hindsight_event_store_head").set(head as f64);
    let relays: Vec<(String, i64)> =
        sqlx::query_as("SELECT stream, position FROM relay_checkpoints")
            .fetch_all(&state.pool)
            .await
            .map_err(ApiError::from_sqlx)?;
    for (stream, position) in relays {
        metrics::gauge!("hindsight_relay_position", "stream" => stream.clone())
            .set(position as f64);
        metrics::gauge!("hindsight_relay_lag", "stream" => stream).set((head - position) as f64);
    }
    let projections: Vec<(String, i64, String)> =
        sqlx::query_as("SELECT name, position, status FROM projection_checkpoints")
            .fetch_all(&state.pool)
            .await
            .map_err(ApiError::from_sqlx)?;
    for (name, position, status) in projections {
        metrics::gauge!("hindsight_projection_position", "projection" => name.clone())
            .set(position as f64);
        metrics::gauge!("hindsight_projection_lag", "projection" => name.clone())
            .set((head - position) as f64);
        metrics::gauge!("hindsight_projection_failed", "projection" => name)
            .set(if status == "failed" { 1.0 } else { 0.0 });
    }
    let statements = state.commands.statements();
    let pools = [
        (
            "transactions",
            state.pool.size() as usize,
            state.pool.num_idle(),
        ),
        (
            "statements",
            statements.lent() + statements.idle(),
            statements.idle(),
        ),
    ];
    for (pool, open, idle) in pools {
        metrics::gauge!("hindsight_db_connections", "pool" => pool, "state" => "idle")
            .set(idle as f64);
        metrics::gauge!("hindsight_db_connections", "pool" => pool, "state" => "busy")
            .set(open.saturating_sub(idle) as f64);
    }
    let body = handle().map(PrometheusHandle::render).unwrap_or_default();
    Ok((
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        body,
    )
        .into_response())
}
