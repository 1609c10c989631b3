//! `/admin/projections`: where every projection (read models and process managers)
//! stands against the head of the event store, for operators.
//!
//! A projection that never ran has no checkpoint row yet; it is shown as `catching_up`
//! at position 0, which is what it will do when it starts. A rebuild started here runs in
//! this process while the old read model keeps serving; its progress shows in `rebuild`.

use axum::extract::{Path, State};
use axum::http::Method;
use axum::http::StatusCode;
use axum::Json;
use hindsight_projections::rebuild;
use hindsight_projections::status::{self, standing, ProjectionStatus};
use serde::Serialize;
use utoipa::ToSchema;

use crate::error::ApiError;
use crate::routes::Routes;
use crate::state::AppState;

pub fn routes(routes: Routes) -> Routes {
    routes
        .add(Method::GET, "/admin/projections", list)
        .add(Method::GET, "/admin/projections/{name}", one)
        .add(
            Method::POST,
            "/admin/projections/{name}/rebuild",
            start_rebuild,
        )
}

/// `GET /admin/projections`: every projection.
async fn list(State(state): State<AppState>) -> Result<Json<Vec<ProjectionStatus>>, ApiError> {
    standing(&state.pool, &status::names())
        .await
        .map(Json)
        .map_err(ApiError::from_sqlx)
}

/// `GET /admin/projections/{name}`: one projection; 404 for a name no projection has.
async fn one(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<ProjectionStatus>, ApiError> {
    let name = status::names()
        .into_iter()
        .find(|known| *known == name)
        .ok_or(ApiError::NotFound)?;
    standing(&state.pool, &[name])
        .await
        .map_err(ApiError::from_sqlx)?
        .pop()
        .map(Json)
        .ok_or_else(|| ApiError::internal("a known projection has no standing"))
}

/// What a started rebuild answers.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct RebuildStarted {
    name: &'static str,
    /// Always `rebuilding`: progress shows in the projection's status.
    #[schema(value_type = String, pattern = "^rebuilding$")]
    status: &'static str,
}

/// `POST /admin/projections/{name}/rebuild`: 202; the rebuild runs in the background
/// while the old read model keeps serving, then takes over.
async fn start_rebuild(
    State(state): State<AppState>,
    Path(name): Path<String>,
    _body: crate::extract::NoFields,
) -> Result<(StatusCode, Json<RebuildStarted>), ApiError> {
    let name = rebuild::rebuildable()
        .into_iter()
        .find(|known| *known == name)
        .ok_or_else(|| {
            if status::names().contains(&name.as_str()) {
                ApiError::Conflict {
                    code: "NOT_REBUILDABLE",
                    message: format!("{name} keeps no read model to rebuild"),
                }
            } else {
                ApiError::NotFound
            }
        })?;
    let started = rebuild::start(&state.pool, name)
        .await
        .map_err(|error| match error {
            rebuild::RebuildError::AlreadyRunning(_) => ApiError::Conflict {
                code: "REBUILD_RUNNING",
                message: format!("a rebuild of {name} is already running"),
            },
            rebuild::RebuildError::Database(error) => ApiError::from_sqlx(error),
            other => ApiError::internal(other),
        })?;
    tokio::spawn(async move {
        for (name, outcome) in started.run(|_, _| {}).await {
            match outcome {
                Ok(report) => tracing::info!(
                    projection = name,
                    events = report.events,
                    seconds = report.seconds,
                    differences = report.differences.len(),
                    "rebuild finished"
                ),
                Err(error) => tracing::error!(projection = name, %error, "rebuild failed"),
            }
        }
    });
    Ok((
        StatusCode::ACCEPTED,
        Json(RebuildStarted {
            name,
            status: "rebuilding",
        }),
    ))
}
