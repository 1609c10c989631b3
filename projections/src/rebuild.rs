//! Zero-downtime rebuilds of a read model.
//!
//! The event store is replayed, in large ordered batches, into a copy of the read model's
//! tables (`<table>_rebuild`, created `LIKE` the live ones) while the live tables keep
//! serving queries and following the stream. When the copy has caught up with the live
//! checkpoint, one transaction locks the checkpoint row (so the live worker pauses between
//! batches), applies the last few events to the copy, compares copy and live table by
//! table, and renames the copy into place. Queries wait at most for that rename. A
//! rebuild killed half-way leaves the live tables untouched; the next one drops the
//! leftover copy and starts again. One rebuild per projection runs at a time.

use std::sync::Arc;
use std::time::Instant;

use hindsight_commands::event::read_events;
use serde::Serialize;
use sqlx::{Connection, PgPool};

use crate::read_model::{ApplyError, ReadModel};

/// The suffix of the tables a rebuild fills.
pub const SUFFIX: &str = "_rebuild";

#[derive(Debug, thiserror::Error)]
pub enum RebuildError {
    #[error("there is no rebuildable projection named `{0}`")]
    Unknown(String),
    #[error("a rebuild of `{0}` is already running")]
    AlreadyRunning(String),
    #[error("the database failed: {0}")]
    Database(#[from] sqlx::Error),
    #[error(transparent)]
    Events(#[from] hindsight_commands::event::EventDecodeError),
    #[error("replaying into the copy failed: {0}")]
    Apply(#[from] ApplyError),
}

/// How far a rebuild is.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Progress {
    pub events_done: u64,
    pub position: i64,
    pub target: i64,
    pub events_per_second: f64,
}

/// Rows found in one table and not the other, per table, when the copy was swapped in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Difference {
    pub table: String,
    pub only_live: i64,
    pub only_rebuilt: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Report {
    pub name: String,
    pub events: u64,
    pub seconds: f64,
    pub differences: Vec<Difference>,
}

/// Events replayed per transaction.
const BATCH: i64 = 5_000;

/// The live model and a copy writing to the rebuild tables, for a rebuildable projection.
fn pair(name: &str) -> Option<(Arc<dyn ReadModel>, Arc<dyn ReadModel>)> {
    let live = crate::live_read_models()
        .into_iter()
        .find(|model| model.name() == name)?;
    let copy = crate::read_model_with_suffix(name, SUFFIX)?;
    Some((live, copy))
}

/// Names of the projections that can be rebuilt.
pub fn rebuildable() -> Vec<&'static str> {
    crate::live_read_models()
        .iter()
        .map(|model| model.name())
        .collect()
}

async fn record(pool: &PgPool, name: &str, progress: &Progress) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE projection_rebuilds SET position = $2, target = $3, events_done = $4, \
                updated_at = now() WHERE name = $1",
    )
    .bind(name)
    .bind(progress.position)
    .bind(progress.target)
    .bind(progress.events_done as i64)
    .execute(pool)
    .await?;
    Ok(())
}

async fn live_position(pool: &PgPool, name: &str) -> Result<i64, sqlx::Error> {
    let position: Option<i64> =
        sqlx::query_scalar("SELECT position FROM projection_checkpoints WHERE name = $1")
            .bind(name)
            .fetch_optional(pool)
            .await?;
    Ok(position.unwrap_or(0))
}

/// A rebuild that holds its projection's rebuild lock and is ready to run.
pub struct Rebuild {
    pool: PgPool,
    name: &'static str,
    live: Arc<dyn ReadModel>,
    copy: Arc<dyn ReadModel>,
    guard: sqlx::PgConnection,
}

impl std::fmt::Debug for Rebuild {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Rebuild")
            .field("name", &self.name)
            .finish_non_exhaustive()
    }
}

/// Takes the rebuild lock of projection `name` (one rebuild per projection at a time)
/// and records the rebuild as running.
pub async fn start(pool: &PgPool, name: &str) -> Result<Rebuild, RebuildError> {
    let (live, copy) = pair(name).ok_or_else(|| RebuildError::Unknown(name.to_owned()))?;
    let name = live.name();
    let guard =
        hindsight_commands::db::try_session_lock(pool, &format!("hindsight-rebuild:{name}"))
            .await?
            .ok_or_else(|| RebuildError::AlreadyRunning(name.to_owned()))?;
    sqlx::query(
        "INSERT INTO projection_rebuilds (name, status) VALUES ($1, 'running') \
         ON CONFLICT (name) DO UPDATE SET status = 'running', target = 0, position = 0, \
             events_done = 0, differences = NULL, error = NULL, started_at = now(), \
             updated_at = now(), finished_at = NULL",
    )
    .bind(name)
    .execute(pool)
    .await?;
    Ok(Rebuild {
        pool: pool.clone(),
        name,
        live,
        copy,
        guard,
    })
}

impl Rebuild {
    /// Runs the rebuild, calling `on_progress` after every batch, and records the outcome.
    pub async fn run(
        self,
        mut on_progress: impl FnMut(Progress) + Send,
    ) -> Result<Report, RebuildError> {
        let (pool, name) = (&self.pool, self.name);
        let result = run(pool, name, &*self.live, &*self.copy, &mut on_progress).await;
        let (status, error, differences) = match &result {
            Ok(report) => ("done", None, serde_json::to_value(&report.differences).ok()),
            Err(error) => ("failed", Some(error.to_string()), None),
        };
        sqlx::query(
            "UPDATE projection_rebuilds SET status = $2, error = $3, differences = $4, \
                    finished_at = now(), updated_at = now() WHERE name = $1",
        )
        .bind(name)
        .bind(status)
        .bind(error)
        .bind(differences)
        .execute(pool)
        .await?;
        self.guard.close().await.ok();
        result
    }
}

/// Rebuilds projection `name`, calling `on_progress` after every batch.
pub async fn rebuild(
    pool: &PgPool,
    name: &str,
    on_progress: impl FnMut(Progress) + Send,
) -> Result<Report, RebuildError> {
    start(pool, name).await?.run(on_progress).await
}

async fn run(
    pool: &PgPool,
    name: &str,
    live: &dyn ReadModel,
    copy: &dyn ReadModel,
    on_progress: &mut (impl FnMut(Progress) + Send),
) -> Result<Report, RebuildError> {
    let started = Instant::now();
    let tables: Vec<(String, String)> = live.tables().into_iter().zip(copy.tables()).collect();
    for (live_table, copy_table) in &tables {
        sqlx::query(&format!("DROP TABLE IF EXISTS {copy_table}"))
            .execute(pool)
            .await?;
        sqlx::query(&format!(
            "CREATE TABLE {copy_table} (LIKE {live_table} INCLUDING ALL)"
        ))
        .execute(pool)
        .await?;
    }

    // Replay until the copy is within one batch of the live checkpoint.
    let mut position = 0;
    let mut events_done = 0u64;
    loop {
        let target = live_position(pool, name).await?;
        if target - position <= BATCH {
            break;
        }
        let events = read_events(pool, position, target, BATCH).await?;
        let Some(last) = events.last().map(|event| event.position) else {
            break;
        };
        let mut tx = hindsight_commands::db::begin(pool).await?;
        copy.apply(&mut tx, &events).await?;
        tx.commit().await?;
        position = last;
        events_done += events.len() as u64;
        let progress = Progress {
            events_done,
            position,
            target,
            events_per_second: events_done as f64 / started.elapsed().as_secs_f64().max(1e-6),
        };
        record(pool, name, &progress).await?;
        on_progress(progress);
    }

    // Catch up and swap in one transaction, with the live worker paused on its checkpoint.
    let mut tx = hindsight_commands::db::begin(pool).await?;
    sqlx::query("SET LOCAL lock_timeout = '10s'")
        .execute(&mut *tx)
        .await?;
    let target: i64 = sqlx::query_scalar(
        "SELECT position FROM projection_checkpoints WHERE name = $1 FOR UPDATE",
    )
    .bind(name)
    .fetch_optional(&mut *tx)
    .await?
    .unwrap_or(0);
    loop {
        let events = read_events(&mut *tx, position, target, BATCH).await?;
        let Some(last) = events.last().map(|event| event.position) else {
            break;
        };
        copy.apply(&mut tx, &events).await?;
        position = last;
        events_done += events.len() as u64;
    }
    let mut differences = Vec::new();
    for (live_table, copy_table) in &tables {
        let (only_live, only_rebuilt): (i64, i64) = sqlx::query_as(&format!(
            "SELECT (SELECT count(*) FROM (SELECT * FROM {live_table} EXCEPT ALL SELECT * FROM {copy_table}) a), \
                    (SELECT count(*) FROM (SELECT * FROM {copy_table} EXCEPT ALL SELECT * FROM {live_table}) b)"
        ))
        .fetch_one(&mut *tx)
        .await?;
        if only_live != 0 || only_rebuilt != 0 {
            differences.push(Difference {
                table: live_table.clone(),
                only_live,
                only_rebuilt,
            });
        }
    }
    for (live_table, copy_table) in &tables {
        sqlx::query(&format!(
            "ALTER TABLE {live_table} RENAME TO {live_table}_retired"
        ))
        .execute(&mut *tx)
        .await?;
        sqlx::query(&format!("ALTER TABLE {copy_table} RENAME TO {live_table}"))
            .execute(&mut *tx)
            .await?;
        sqlx::query(&format!("DROP TABLE {live_table}_retired"))
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    let progress = Progress {
        events_done,
        position,
        target,
        events_per_second: events_done as f64 / started.elapsed().as_secs_f64().max(1e-6),
    };
    record(pool, name, &progress).await?;
    on_progress(progress);
    if !differences.is_empty() {
        tracing::warn!(
            projection = name,
            ?differences,
            "the rebuilt model differs from the live one; the rebuilt one is now live"
        );
    }
    Ok(Report {
        name: name.to_owned(),
        events: events_done,
        seconds: started.elapsed().as_secs_f64(),
        differences,
    })
}

/// The state of the latest rebuild of a projection, if any.
#[derive(Debug, Clone, PartialEq, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct RebuildStatus {
    pub status: String,
    pub target: i64,
    pub position: i64,
    pub events_done: i64,
    pub differences: Option<serde_json::Value>,
    pub error: Option<String>,
    pub started_at: chrono::DateTime<chrono::Utc>,
    pub finished_at: Option<chrono::DateTime<chrono::Utc>>,
}

pub async fn status(pool: &PgPool, name: &str) -> Result<Option<RebuildStatus>, sqlx::Error> {
    sqlx::query_as(
        // A `running` rebuild that stopped reporting progress died with its process.
        "SELECT CASE WHEN status = 'running' AND updated_at < now() - interval '60 seconds' \
                     THEN 'interrupted' ELSE status END AS status, \
                target, position, events_done, differences, error, started_at, finished_at \
         FROM projection_rebuilds WHERE name = $1",
    )
    .bind(name)
    .fetch_optional(pool)
    .await
}
