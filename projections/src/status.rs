//! Where each projection stands against the head of the event store: what operators see
//! in `GET /admin/projections` and `hindsight projections list`.

use serde::Serialize;
use sqlx::PgPool;

use crate::rebuild::{self, RebuildStatus};
use crate::worker;

/// One projection's standing.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct ProjectionStatus {
    pub name: &'static str,
    /// `live`, `catching_up`, `rebuilding` or `failed`.
    #[schema(value_type = crate::schema::ProjectionStateSchema)]
    pub status: String,
    /// The last position it has applied.
    pub position: i64,
    /// The highest position in the event store.
    pub head: i64,
    /// How many positions it is behind the head.
    pub lag: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    /// The latest rebuild, while one runs or once one ran.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rebuild: Option<RebuildStatus>,
}

/// Every projection Hindsight runs: the read models, then the process managers.
pub fn names() -> Vec<&'static str> {
    let mut names: Vec<&'static str> = crate::live_read_models()
        .iter()
        .map(|model| model.name())
        .collect();
    names.push(crate::order_process::NAME);
    names
}

/// The standing of `names`. Checkpoints are read before the head, so a position is never
/// shown ahead of its head. A projection that never ran is `catching_up` at 0.
pub async fn standing(
    pool: &PgPool,
    names: &[&'static str],
) -> Result<Vec<ProjectionStatus>, sqlx::Error> {
    let mut found = Vec::with_capacity(names.len());
    for name in names {
        let checkpoint = worker::checkpoint(pool, name).await?;
        let rebuild = rebuild::status(pool, name).await?;
        found.push((*name, checkpoint, rebuild));
    }
    let head = hindsight_commands::relay::head(pool).await?;
    Ok(found
        .into_iter()
        .map(|(name, checkpoint, rebuild)| {
            let (mut status, position, last_error) = match checkpoint {
                Some(checkpoint) => (
                    checkpoint.status,
                    checkpoint.position,
                    checkpoint.last_error,
                ),
                None => ("catching_up".to_owned(), 0, None),
            };
            let rebuilding = rebuild
                .as_ref()
                .is_some_and(|rebuild| rebuild.status == "running");
            if rebuilding && status != "failed" {
                status = "rebuilding".to_owned();
            }
            ProjectionStatus {
                name,
                status,
                position,
                head,
                lag: head.saturating_sub(position).max(0),
                last_error,
                rebuild,
            }
        })
        .collect())
}
