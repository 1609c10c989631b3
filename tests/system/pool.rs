//! The connection pool checks a connection with a round trip only when it has been idle
//! for a while, and that check must still replace connections the database cut meanwhile.
//! The statement pool hands a connection back without a check when its statement ran to
//! its end, and closes one whose statement may be half-way. A database on this host is
//! reached without TLS unless the URL names a mode.

use std::str::FromStr;
use std::time::Duration;

use hindsight_commands::db::{self, CHECK_AFTER_IDLE};
use hindsight_commands::statements::{Lent, StatementPool};
use hindsight_tests::TestDb;
use sqlx::pool::PoolConnection;
use sqlx::postgres::PgConnectOptions;
use sqlx::{Connection, PgConnection, Postgres};

const CONNECTIONS: usize = 4;

async fn held(db: &TestDb) -> Vec<PoolConnection<Postgres>> {
    futures::future::try_join_all((0..CONNECTIONS).map(|_| db.pool.acquire()))
        .await
        .expect("connections are handed out")
}

async fn pid(connection: &mut PoolConnection<Postgres>) -> Result<i32, sqlx::Error> {
    sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut **connection)
        .await
}

#[tokio::test]
async fn connections_cut_while_idle_are_replaced_before_use() {
    let db = TestDb::new().await;
    let mut first = held(&db).await;
    let mut cut = Vec::new();
    for connection in &mut first {
        cut.push(pid(connection).await.expect("a fresh connection answers"));
    }
    drop(first);
    hindsight_tests::eventually(5, "the connections are back in the pool", || async {
        db.pool.num_idle() >= CONNECTIONS
    })
    .await;

    // The database ends those sessions while they sit in the pool, as a restart would
    // (all but the one asking).
    let mut asking = db.pool.acquire().await.expect("a connection");
    let survivor = pid(&mut asking).await.expect("it answers");
    let terminated: Vec<bool> = sqlx::query_scalar(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE pid = ANY($1) AND pid <> pg_backend_pid()",
    )
    .bind(&cut)
    .fetch_all(&mut *asking)
    .await
    .expect("terminate the pool's sessions");
    assert!(
        terminated.len() >= CONNECTIONS - 1 && terminated.iter().all(|done| *done),
        "sessions terminated: {terminated:?}"
    );
    drop(asking);

    tokio::time::sleep(CHECK_AFTER_IDLE + std::time::Duration::from_millis(300)).await;
    for mut connection in held(&db).await {
        let now = pid(&mut connection)
            .await
            .expect("a connection idle past the check is live when handed out");
        assert!(
            now == survivor || !cut.contains(&now),
            "session {now} was terminated, yet handed out"
        );
    }
}

// The pool for statements that run on their own (`hindsight_commands::statements`).

async fn lent_pid(connection: &mut Lent) -> Result<i32, sqlx::Error> {
    sqlx::query_scalar("SELECT pg_backend_pid()")
        .fetch_one(&mut **connection)
        .await
}

async fn session_exists(db: &TestDb, pid: i32) -> bool {
    sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM pg_stat_activity WHERE pid = $1)")
        .bind(pid)
        .fetch_one(&db.pool)
        .await
        .expect("pg_stat_activity answers")
}

#[tokio::test]
async fn a_statement_pool_connection_goes_back_at_once_after_its_statement() {
    let db = TestDb::new().await;
    let statements = StatementPool::new(db.connect_options(), 1);
    let mut lent = statements.acquire().await.expect("a connection");
    let pid = lent_pid(&mut lent).await;
    let first = lent.give_back(pid).expect("the statement runs");
    // Back without a round trip of its own: idle the moment it was given back.
    assert_eq!(statements.idle(), 1);

    let mut lent = statements.acquire().await.expect("the connection again");
    assert_eq!(statements.idle(), 0);
    let pid = lent_pid(&mut lent).await;
    assert_eq!(lent.give_back(pid).expect("it answers"), first);

    // A statement the database refuses still reads its answer to the end: the same
    // connection goes back and serves the next statement.
    let mut lent = statements.acquire().await.expect("a connection");
    let refused = sqlx::query_scalar::<_, i32>("SELECT 1 / 0")
        .fetch_one(&mut *lent)
        .await;
    let refused = lent.give_back(refused);
    assert!(
        matches!(&refused, Err(sqlx::Error::Database(_))),
        "division by zero is refused: {refused:?}"
    );
    assert_eq!(statements.idle(), 1);
    let mut lent = statements.acquire().await.expect("a connection");
    let pid = lent_pid(&mut lent).await;
    assert_eq!(lent.give_back(pid).expect("it answers"), first);
    statements.close().await;
}

#[tokio::test]
async fn a_statement_pool_connection_dropped_mid_statement_is_closed_not_lent_again() {
    let db = TestDb::new().await;
    let statements = StatementPool::new(db.connect_options(), 1);
    let mut lent = statements.acquire().await.expect("a connection");
    let cancelled_pid = lent_pid(&mut lent).await.expect("it answers");
    // A request cancelled while its statement runs drops the loan half-way.
    let cancelled = tokio::time::timeout(
        Duration::from_millis(200),
        sqlx::query("SELECT pg_sleep(2)").execute(&mut *lent),
    )
    .await;
    assert!(cancelled.is_err(), "the statement was still running");
    drop(lent);
    assert_eq!(statements.idle(), 0, "a half-used connection is not kept");

    // The pool's one place frees once the connection is closed; the next loan is a new
    // session, which answers its own statement.
    let mut lent = tokio::time::timeout(Duration::from_secs(3), statements.acquire())
        .await
        .expect("the place frees")
        .expect("a new connection");
    let pid = lent_pid(&mut lent).await;
    let pid = lent.give_back(pid).expect("the new connection answers");
    assert_ne!(pid, cancelled_pid);
    hindsight_tests::eventually(10, "the cancelled session ends", || async {
        !session_exists(&db, cancelled_pid).await
    })
    .await;
    statements.close().await;
}

#[tokio::test]
async fn a_statement_pool_lends_at_most_its_size_and_replaces_connections_cut_while_idle() {
    let db = TestDb::new().await;
    let statements = StatementPool::new(db.connect_options(), 2);
    let mut first = statements.acquire().await.expect("a connection");
    let mut second = statements.acquire().await.expect("a second connection");
    let waiting = tokio::time::timeout(Duration::from_millis(300), statements.acquire()).await;
    assert!(
        waiting.is_err(),
        "a third connection was lent beyond the size of two"
    );
    assert_eq!((statements.lent(), statements.idle()), (2, 0));

    let first_pid = lent_pid(&mut first).await;
    let first_pid = first.give_back(first_pid).expect("it answers");
    let second_pid = lent_pid(&mut second).await;
    let second_pid = second.give_back(second_pid).expect("it answers");
    assert_eq!((statements.lent(), statements.idle()), (0, 2));

    // The database ends both sessions while they are idle, as a restart would.
    let terminated: Vec<bool> =
        sqlx::query_scalar("SELECT pg_terminate_backend(pid) FROM unnest($1::int4[]) AS pid")
            .bind(vec![first_pid, second_pid])
            .fetch_all(&db.pool)
            .await
            .expect("terminate the sessions");
    assert_eq!(terminated, vec![true, true]);
    tokio::time::sleep(CHECK_AFTER_IDLE + Duration::from_millis(300)).await;

    let mut lent = statements.acquire().await.expect("a live connection");
    let pid = lent_pid(&mut lent).await;
    let pid = lent
        .give_back(pid)
        .expect("a connection idle past the check is live when lent");
    assert!(
        pid != first_pid && pid != second_pid,
        "session {pid} was terminated, yet lent"
    );
    statements.close().await;
    assert!(
        matches!(statements.acquire().await, Err(sqlx::Error::PoolClosed)),
        "a closed pool lends nothing"
    );
}

// TLS to the database.

const SESSION_USES_TLS: &str = "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()";

async fn uses_tls(options: PgConnectOptions) -> bool {
    let mut connection = PgConnection::connect_with(&options)
        .await
        .expect("a connection opens");
    let tls = sqlx::query_scalar(SESSION_USES_TLS)
        .fetch_one(&mut connection)
        .await
        .expect("pg_stat_ssl answers");
    connection.close().await.ok();
    tls
}

#[tokio::test]
async fn a_database_on_this_host_is_reached_without_tls_unless_the_url_names_a_mode() {
    let db = TestDb::new().await;
    let url = db.url();
    let offers_tls: bool = sqlx::query_scalar("SELECT current_setting('ssl') = 'on'")
        .fetch_one(&db.pool)
        .await
        .expect("the server says whether it offers TLS");
    let options = db.connect_options();
    let host = options.get_host().to_owned();
    let local = db::is_local(&options);
    // `db.url()` leaves out the parameters of HINDSIGHT_TEST_DATABASE_URL; the pool keeps them.
    let unnamed = local
        && std::env::var_os("PGSSLMODE").is_none()
        && !hindsight_tests::admin_database_url().contains("sslmode");

    // A mode the URL names is kept: `prefer` takes TLS wherever the server offers it.
    let named = db::connect_options(&format!("{url}?sslmode=prefer")).expect("a postgres URL");
    assert_eq!(
        uses_tls(named).await,
        offers_tls,
        "sslmode=prefer on {host}"
    );

    // The URL alone: no TLS on this host (where `prefer` would have taken it); elsewhere,
    // or with PGSSLMODE set, as sqlx itself reads the URL. The test database's pool is
    // opened the same way, as the server's is.
    let alone = uses_tls(db::connect_options(&url).expect("a postgres URL")).await;
    let pooled: bool = sqlx::query_scalar(SESSION_USES_TLS)
        .fetch_one(&db.pool)
        .await
        .expect("pg_stat_ssl answers");
    if unnamed {
        assert!(!alone && !pooled, "TLS to {host}, which is this host");
    } else {
        let as_sqlx_reads_it = PgConnectOptions::from_str(&url).expect("a postgres URL");
        assert_eq!(
            alone,
            uses_tls(as_sqlx_reads_it).await,
            "the URL's mode to {host}"
        );
    }
}

/// Every session of a running system names the component it serves in `pg_stat_activity`:
/// sqlx's pool, the statement pool, the relay and each worker's leader.
#[tokio::test]
async fn every_session_names_the_component_it_serves() {
    let system = hindsight_tests::TestSystem::start().await;
    let admin = system.user(hindsight_domain::role::Role::Admin).await;
    // A command appends through the statement pool.
    system
        .create_product(
            &admin.access_token,
            serde_json::json!({
                "sku": "NAMED-1",
                "name": "Named",
                "price": {"amount": 100, "currency": "EUR"},
                "stock": 1
            }),
        )
        .await;
    let expected: std::collections::BTreeSet<String> = [
        "hindsight".to_owned(),
        "hindsight statements".to_owned(),
        format!("hindsight relay {}", system.stream.stream),
        "hindsight worker read_models".to_owned(),
        "hindsight worker audit_trail".to_owned(),
        "hindsight worker order_process".to_owned(),
    ]
    .into();
    let names = || async {
        let names: Vec<String> = sqlx::query_scalar(
            "SELECT DISTINCT application_name FROM pg_stat_activity \
             WHERE datname = current_database() AND pid <> pg_backend_pid()",
        )
        .fetch_all(&system.db.pool)
        .await
        .expect("pg_stat_activity answers");
        names
            .into_iter()
            .collect::<std::collections::BTreeSet<String>>()
    };
    hindsight_tests::eventually(10, "every component's session is named", || async {
        expected.is_subset(&names().await)
    })
    .await;
    // Nothing else: every session is one of these.
    let unexpected: Vec<String> = names().await.difference(&expected).cloned().collect();
    assert!(unexpected.is_empty(), "{unexpected:?}");
}
