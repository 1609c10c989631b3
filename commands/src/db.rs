//! Connecting to Postgres and applying Hindsight's migrations.

use std::net::IpAddr;
use std::str::FromStr;
use std::time::Duration;

use sqlx::migrate::Migrator;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions, PgSslMode};
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
///
/// Its sessions carry the application name of `options`, or [`APPLICATION_NAME`] when they
/// name none (see [`session_name`]).
pub fn pool(options: PgConnectOptions, max_connections: u32) -> PgPool {
    let options = if options.get_application_name().is_some() {
        options
    } else {
        options.application_name(APPLICATION_NAME)
    };
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

/// The application name of Hindsight's Postgres sessions when the database URL names
/// none (`application_name=...`).
pub const APPLICATION_NAME: &str = "hindsight";

/// The name a session of `component` carries in `pg_stat_activity`: the pool's application
/// name, then the component (`hindsight statements`, `hindsight relay events`, `hindsight
/// worker read_models`). An operator can tell from it which part of which process a
/// session serves, and what its CPU time, locks or long statements are spent on.
pub fn session_name(options: &PgConnectOptions, component: &str) -> String {
    let base = options.get_application_name().unwrap_or(APPLICATION_NAME);
    format!("{base} {component}")
}

/// Names a session taken out of `pool` by [`try_session_lock`] or [`try_session_locks`]
/// after `component` (see [`session_name`]), for as long as it lasts. If that fails, the
/// session is ended ([`end_session`]: its locks released) and the error returned.
pub async fn name_session(
    pool: &PgPool,
    mut connection: PgConnection,
    component: &str,
) -> Result<PgConnection, sqlx::Error> {
    let name = session_name(&pool.connect_options(), component);
    let named = sqlx::query("SELECT set_config('application_name', $1, false)")
        .bind(name)
        .execute(&mut connection)
        .await;
    match named {
        Ok(_) => Ok(connection),
        Err(error) => {
            end_session(connection).await;
            Err(error)
        }
    }
}

/// The connection options of a `postgres://` URL, as Postgres's own clients read it, with
/// one default of Hindsight's: a server on this host (a loopback address, `localhost` or a
/// Unix socket) is reached without TLS unless the URL (`sslmode`) or the environment
/// (`PGSSLMODE`) names a mode.
///
/// Postgres clients default to `sslmode=prefer`: TLS whenever the server offers it, without
/// checking the server's certificate. Over loopback that protects nothing (no one but the
/// host's administrator sees that traffic, and they see the server's memory too), and it
/// costs every round trip encryption on both sides: on two cores, raw point reads ran
/// about half again as fast without it and the server spent about a fifth less CPU per
/// `GET /products/{id}` (see BENCHMARKS.md). A remote server keeps the URL's mode; name
/// `sslmode=verify-full` there to have its certificate checked. A local server that
/// accepts only TLS connections (`hostssl` lines alone in `pg_hba.conf`) refuses the plain
/// connection, and its URL must say `sslmode=require`.
pub fn connect_options(url: &str) -> Result<PgConnectOptions, sqlx::Error> {
    let named = names_ssl_mode(url) || std::env::var_os("PGSSLMODE").is_some();
    Ok(local_without_tls(PgConnectOptions::from_str(url)?, named))
}

/// `options` without TLS if they reach a server on this host and no mode was `named`.
fn local_without_tls(options: PgConnectOptions, named: bool) -> PgConnectOptions {
    if named || !is_local(&options) {
        options
    } else {
        options.ssl_mode(PgSslMode::Disable)
    }
}

/// Whether the URL's query names an `sslmode` (sqlx also reads `ssl-mode`), spelled as sqlx
/// reads it: it ignores any other spelling.
fn names_ssl_mode(url: &str) -> bool {
    let Some((_, query)) = url.split_once('?') else {
        return false;
    };
    let query = query.split_once('#').map_or(query, |(query, _)| query);
    query.split('&').any(|pair| {
        let key = pair.split_once('=').map_or(pair, |(key, _)| key);
        key == "sslmode" || key == "ssl-mode"
    })
}

/// Whether the options reach a server on this host: a loopback address, `localhost` or a
/// Unix socket.
pub fn is_local(options: &PgConnectOptions) -> bool {
    let host = options.get_host();
    options.get_socket().is_some()
        || host.starts_with('/')
        || host.eq_ignore_ascii_case("localhost")
        || host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .parse::<IpAddr>()
            .is_ok_and(|address| address.is_loopback())
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
            // Releases whatever this loop took before.
            end_session(connection).await;
            return Ok(None);
        }
    }
    Ok(Some(connection))
}

/// Ends a session taken by [`try_session_lock`] or [`try_session_locks`], its advisory
/// locks released before this returns. Closing the connection alone releases them only once
/// the server has noticed the session's end, a moment after `close` returns: whoever takes
/// the same lock at once (a rebuild started again right after another was refused or ended)
/// could find it still held. A session that broke has released its locks, or will once the
/// server notices; the release is given at most two seconds.
pub async fn end_session(mut connection: PgConnection) {
    let unlock = sqlx::query("SELECT pg_advisory_unlock_all()").execute(&mut connection);
    // Either way the connection is closed next, which releases what is left.
    let _released = tokio::time::timeout(UNLOCK_WAIT, unlock).await;
    connection.close().await.ok();
}

/// How long [`end_session`] waits for the release of a session's locks.
const UNLOCK_WAIT: Duration = Duration::from_secs(2);

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

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn options(url: &str) -> PgConnectOptions {
        PgConnectOptions::from_str(url).unwrap()
    }

    #[test]
    fn sessions_are_named_after_the_urls_application_or_hindsight() {
        let unnamed = options("postgres://h/db");
        assert_eq!(session_name(&unnamed, "statements"), "hindsight statements");
        let named = options("postgres://h/db?application_name=shop-eu");
        assert_eq!(session_name(&named, "relay events"), "shop-eu relay events");
    }

    #[tokio::test]
    async fn a_pool_names_its_sessions_unless_the_url_did() {
        let unnamed = pool(options("postgres://h/db"), 1);
        assert_eq!(
            unnamed.connect_options().get_application_name(),
            Some(APPLICATION_NAME)
        );
        let named = pool(options("postgres://h/db?application_name=shop-eu"), 1);
        assert_eq!(
            named.connect_options().get_application_name(),
            Some("shop-eu")
        );
    }

    #[test]
    fn an_ssl_mode_is_named_only_by_a_query_key() {
        assert!(names_ssl_mode("postgres://h/db?sslmode=require"));
        assert!(names_ssl_mode(
            "postgres://h/db?application_name=x&ssl-mode=disable"
        ));
        assert!(!names_ssl_mode("postgres://h/db"));
        assert!(!names_ssl_mode("postgres://h/db?SSLMODE=prefer"));
        assert!(!names_ssl_mode("postgres://sslmode@h/sslmode"));
        assert!(!names_ssl_mode("postgres://h/db?application_name=sslmode"));
        assert!(!names_ssl_mode(
            "postgres://h/db?application_name=x#sslmode=require"
        ));
    }

    #[test]
    fn loopback_addresses_localhost_and_sockets_are_local() {
        for url in [
            "postgres://u@127.0.0.1:5432/db",
            "postgres://u@127.0.0.53/db",
            "postgres://u@localhost/db",
            "postgres://u@LOCALHOST/db",
            "postgres://u@[::1]:5432/db",
            "postgres://u@db.example/db?host=/var/run/postgresql",
            "postgres://u@%2Fvar%2Frun%2Fpostgresql/db",
        ] {
            assert!(is_local(&options(url)), "{url}");
        }
        for url in [
            "postgres://u@db.example/db",
            "postgres://u@10.0.0.5/db",
            "postgres://u@[2001:db8::1]/db",
            "postgres://u@localhost.example/db",
        ] {
            assert!(!is_local(&options(url)), "{url}");
        }
    }

    #[test]
    fn only_a_local_server_with_no_mode_named_is_reached_without_tls() {
        // `PgSslMode` has no `PartialEq`; its names are compared.
        let mode = |url: &str, named: bool| {
            format!(
                "{:?}",
                local_without_tls(options(url), named).get_ssl_mode()
            )
        };
        // What sqlx reads when the URL names no mode (`PGSSLMODE`, else `prefer`).
        let unnamed = format!("{:?}", options("postgres://u@db.example/db").get_ssl_mode());
        assert_eq!(mode("postgres://u@127.0.0.1/db", false), "Disable");
        assert_eq!(mode("postgres://u@localhost/db", false), "Disable");
        assert_eq!(mode("postgres://u@[::1]/db", false), "Disable");
        assert_eq!(mode("postgres://u@db.example/db", false), unnamed);
        assert_eq!(
            mode("postgres://u@127.0.0.1/db?sslmode=require", true),
            "Require"
        );
        assert_eq!(
            mode("postgres://u@127.0.0.1/db?sslmode=prefer", true),
            "Prefer"
        );
        // A mode named by the environment (the URL names none) is kept as sqlx read it.
        assert_eq!(mode("postgres://u@127.0.0.1/db", true), unnamed);
    }
}
