//! `/admin/projections`: where every projection (read models and process managers)
//! stands against the head of the event store, for operators.
//!
//! A projection that never ran has no checkpoint row yet; it is shown as `catching_up`
//! at position 0, which is what it will do when it starts.

use axum::extract::{Path, State};
use axum::http::Method;
use axum::Json;
use hindsight_commands::relay;
use hindsight_projections::worker;
use serde::Serialize;

use crate::error::ApiError;
use crate::routes::Routes;
use crate::state::AppState;

pub fn routes(routes: Routes) -> Routes {
    routes.add(Method::GET, "/admin/projections", list).add(
        Method::GET,
        "/admin/projections/{name}",
        one,
    )
}

/// One projection's standing.
#[derive(Debug, Serialize)]
struct ProjectionStatus {
    name: &'static str,
    /// `live`, `catching_up`, `rebuilding` or `failed`.
    status: String,
    /// The last position it has applied.
    position: i64,
    /// The highest position in the event store.
    head: i64,
    /// How many positions it is behind the head.
    lag: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    last_error: Option<String>,
}

/// The name of every projection the process runs, read models first.
fn projection_names(state: &AppState) -> Vec<&'static str> {
    let read_models = hindsight_projections::live_read_models();
    let managers = hindsight_projections::process_managers(state.commands.clone());
    read_models
        .iter()
        .chain(managers.iter())
        .map(|projection| projection.name())
        .collect()
}

/// The standing of `names`. The checkpoints are read before the head, so a position is
/// never ahead of the head it is shown with.
async fn standing(
    state: &AppState,
    names: &[&'static str],
) -> Result<Vec<ProjectionStatus>, ApiError> {
    let mut checkpoints = Vec::with_capacity(names.len());
    for name in names {
        let checkpoint = worker::checkpoint(&state.pool, name)
            .await
            .map_err(ApiError::from_sqlx)?;
        checkpoints.push((*name, checkpoint));
    }
    let head = relay::head(&state.pool)
        .await
        .map_err(ApiError::from_sqlx)?;
    Ok(checkpoints
        .into_iter()
        .map(|(name, checkpoint)| {
            let (status, position, last_error) = match checkpoint {
                Some(checkpoint) => (
                    checkpoint.status,
                    checkpoint.position,
                    checkpoint.last_error,
                ),
                None => ("catching_up".to_owned(), 0, None),
            };
            ProjectionStatus {
                name,
                status,
                position,
                head,
                lag: head.saturating_sub(position).max(0),
                last_error,
            }
        })
        .collect())
}

/// `GET /admin/projections`: every projection.
async fn list(State(state): State<AppState>) -> Result<Json<Vec<ProjectionStatus>>, ApiError> {
    let names = projection_names(&state);
    standing(&state, &names).await.map(Json)
}

/// `GET /admin/projections/{name}`: one projection; 404 for a name no projection has.
async fn one(
    State(state): State<AppState>,
    Path(name): Path<String>,
) -> Result<Json<ProjectionStatus>, ApiError> {
    let name = projection_names(&state)
        .into_iter()
        .find(|known| *known == name)
        .ok_or(ApiError::NotFound)?;
    standing(&state, &[name])
        .await?
        .pop()
        .map(Json)
        .ok_or_else(|| ApiError::internal("a known projection has no standing"))
}
