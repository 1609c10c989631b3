//! Connecting to Postgres and applying Hindsight's migrations.

use std::time::Duration;

use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::{Connection, PgConnection, PgPool};

/// Every migration in `migrations/`, embedded at build time.
pub static MIGRATOR: Migrator = sqlx::migrate!("../migrations");

/// How long a connection may sit idle in a pool before it is checked with a round trip
/// when next handed out.
pub const CHECK_AFTER_IDLE: Duration = Duration::from_secs(1);

/// Opens a connection pool. Connections are opened lazily, so a pool can be built while
/// the database is still starting; `acquire_timeout` bounds how long a caller waits.
///
/// sqlx checks every connection with a round trip when it is handed out and again when it
/// comes back. Under load a connection is back in the pool for microseconds, and the first
/// check doubled the round trips of a one-query request; it is kept only for connections
/// idle longer than [`CHECK_AFTER_IDLE`], those a database restart may have cut while
/// nobody used them. A connection that breaks while in use fails its query and is closed
/// when it comes back, by the second check.
pub fn pool(options: PgConnectOptions, max_connections: u32) -> PgPool {
    PgPoolOptions::new()
        .max_connections(max_connections.max(1))
        .acquire_timeout(Duration::from_secs(5))
        .test_before_acquire(false)
        .before_acquire(|connection, meta| {
            Box::pin(async move {
                if meta.idle_for > CHECK_AFTER_IDLE {
                    connection.ping().await?;
                }
                Ok(true)
            })
        })
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

/// Whether a database error means the database could not be reached (or the connection
/// broke), as opposed to a statement the database refused. The first is worth retrying
/// later and is answered as "unavailable"; the second is a bug or bad data.
pub fn is_connectivity(error: &sqlx::Error) -> bool {
    matches!(
        error,
        sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::Protocol(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed
    )
}

/// Takes the session advisory lock named `key` on a connection of its own, taken out of
/// the pool: the lock lasts exactly as long as that connection, so when the holder dies
/// the server ends the session and someone else can take the lock. `None` when another
/// session holds it. This is how one relay per stream, one worker per projection and one
/// rebuild per projection are elected.
pub async fn try_session_lock(
    pool: &PgPool,
    key: &str,
) -> Result<Option<PgConnection>, sqlx::Error> {
    try_session_locks(pool, &[key]).await
}

/// Takes the session advisory locks named `keys` on one connection of its own, all or
/// none, as [`try_session_lock`] takes one: `None` (and no lock held) when another session
/// holds any of them. A projection worker running several read models holds the lock of
/// each.
pub async fn try_session_locks(
    pool: &PgPool,
    keys: &[&str],
) -> Result<Option<PgConnection>, sqlx::Error> {
    let mut connection = pool.acquire().await?.detach();
    for key in keys {
        let acquired: bool =
            sqlx::query_scalar("SELECT pg_try_advisory_lock(hashtextextended($1, 0))")
                .bind(key)
                .fetch_one(&mut connection)
                .await?;
        if !acquired {
            // Ending the session releases whatever this loop took before.
            connection.close().await.ok();
            return Ok(None);
        }
    }
    Ok(Some(connection))
}

/// Starts a transaction on a pooled connection, in a way a cancelled caller cannot break.
///
/// sqlx 0.8 sends `BEGIN` before it counts the transaction, so a caller cancelled during
/// `pool.begin()` (an aborted task, a request timeout, a `select!` that lost) returns the
/// connection to the pool inside a transaction sqlx does not know about; every later
/// autocommitted statement on that connection then runs uncommitted. Here the `BEGIN`
/// runs in its own task: if the caller is gone by the time it completes, the transaction
/// is dropped as a transaction, which rolls it back before the connection is reused.
pub async fn begin(
    pool: &PgPool,
) -> Result<sqlx::Transaction<'static, sqlx::Postgres>, sqlx::Error> {
    let pool = pool.clone();
    // The task only fails if `begin` panicked (already reported) or the runtime is
    // shutting down.
    tokio::spawn(async move { pool.begin().await })
        .await
        .unwrap_or(Err(sqlx::Error::WorkerCrashed))
}
