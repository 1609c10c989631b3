//! Connecting to Postgres and applying Hindsight's migrations.

use std::time::Duration;

use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;

/// Every migration in `migrations/`, embedded at build time.
pub static MIGRATOR: Migrator = sqlx::migrate!("../migrations");

/// Opens a connection pool. Connections are opened lazily, so a pool can be built while
/// the database is still starting; `acquire_timeout` bounds how long a caller waits.
pub fn pool(options: PgConnectOptions, max_connections: u32) -> PgPool {
    PgPoolOptions::new()
        .max_connections(max_connections.max(1))
        .acquire_timeout(Duration::from_secs(5))
        .connect_lazy_with(options)
}

/// What `migrate` did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MigrationReport {
    /// Descriptions of the migrations applied by this call, oldest first.
    pub applied: Vec<String>,
}

/// Applies every migration not applied yet. Safe to run concurrently from several
/// processes (sqlx serialises them with an advisory lock) and a no-op when up to date.
pub async fn migrate(pool: &PgPool) -> Result<MigrationReport, sqlx::migrate::MigrateError> {
    let before = applied_versions(pool).await.unwrap_or_default();
    MIGRATOR.run(pool).await?;
    let applied = MIGRATOR
        .iter()
        .filter(|migration| !before.contains(&migration.version))
        .map(|migration| format!("{} {}", migration.version, migration.description))
        .collect();
    Ok(MigrationReport { applied })
}

/// Whether every embedded migration has been applied (used by readiness checks).
pub async fn is_up_to_date(pool: &PgPool) -> Result<bool, sqlx::Error> {
    let applied = applied_versions(pool).await?;
    Ok(MIGRATOR
        .iter()
        .all(|migration| applied.contains(&migration.version)))
}

async fn applied_versions(pool: &PgPool) -> Result<Vec<i64>, sqlx::Error> {
    let exists: bool = sqlx::query_scalar("SELECT to_regclass('_sqlx_migrations') IS NOT NULL")
        .fetch_one(pool)
        .await?;
    if !exists {
        return Ok(Vec::new());
    }
    sqlx::query_scalar("SELECT version FROM _sqlx_migrations WHERE success")
        .fetch_all(pool)
        .await
}
