//! The connection pool checks a connection with a round trip only when it has been idle
//! for a while, and that check must still replace connections the database cut meanwhile.

use hindsight_commands::db::CHECK_AFTER_IDLE;
use hindsight_tests::TestDb;
use sqlx::pool::PoolConnection;
use sqlx::Postgres;

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
