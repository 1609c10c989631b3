//! Baselines measured in the same run as the figures they scale: what Postgres alone does
//! on this machine, through the same driver, at the same concurrency.

use std::future::Future;
use std::time::Duration;

use anyhow::Result;
use hindsight_commands::statements::StatementPool;
use serde_json::json;
use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::PgPool;
use uuid::Uuid;

use crate::load::{closed_loop, open_loop, Outcome, Sample};

/// A table shaped like the event store's, without its triggers and extra indexes.
const RAW_EVENTS: &str = "CREATE TABLE IF NOT EXISTS bench_raw_events (
    aggregate_type text NOT NULL,
    aggregate_id text NOT NULL,
    sequence bigint NOT NULL,
    event_type text NOT NULL,
    event_version text NOT NULL,
    payload jsonb NOT NULL,
    metadata jsonb NOT NULL,
    PRIMARY KEY (aggregate_type, aggregate_id, sequence))";

/// The options of every connection the harness opens, baselines and observers alike: read
/// from the URL as the server reads its own (no TLS to a server on this host unless the URL
/// names a mode), so a baseline pays for TLS exactly when the server does.
///
/// They carry an application name of the harness's own, so that the server's sessions can
/// be told from them (see [`server::postgres_sessions`](crate::server::postgres_sessions)).
pub(crate) fn options(url: &str) -> Result<PgConnectOptions> {
    Ok(hindsight_commands::db::connect_options(url)?.application_name(SESSION_NAME))
}

/// The application name of the harness's own Postgres sessions.
pub(crate) const SESSION_NAME: &str = "hindsight-bench";

async fn pool(url: &str, connections: usize) -> Result<PgPool> {
    Ok(PgPoolOptions::new()
        .max_connections(connections as u32)
        .min_connections(connections as u32)
        // No round trip of sqlx's own before each batch of the scan.
        .test_before_acquire(false)
        .connect_with(options(url)?)
        .await?)
}

/// Connections for the raw clients. A raw client sends its statement and nothing else, as
/// a pgbench client on a connection of its own does: sqlx's pool would check each
/// connection with a round trip of its own when handing it out and again when it comes
/// back, so the clients borrow from the pool the server's statements use, which does
/// neither. Every connection is opened before the clock starts.
async fn connections(url: &str, connections: usize) -> Result<StatementPool> {
    let pool = StatementPool::new(options(url)?, connections as u32);
    let mut opened = Vec::with_capacity(connections);
    for _ in 0..connections {
        opened.push(pool.acquire().await?);
    }
    for connection in opened {
        connection.give_back(Ok::<(), sqlx::Error>(()))?;
    }
    Ok(pool)
}

/// Single-row inserts of an event-sized row, each its own transaction (so each waits for
/// its commit to be flushed, as an appended event does), from `clients` connections.
pub async fn raw_inserts(
    url: &str,
    clients: usize,
    warmup: Duration,
    duration: Duration,
) -> Result<Sample> {
    let pool = connections(url, clients).await?;
    let mut connection = pool.acquire().await?;
    let created = sqlx::query(RAW_EVENTS).execute(&mut *connection).await;
    connection.give_back(created)?;
    let insert = "INSERT INTO bench_raw_events \
         (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata) \
         VALUES ('product', $1, $2, 'ProductRestocked', '1', $3, $4)";
    Ok(restock_rows(pool, insert, clients, warmup, duration).await)
}

/// Appends of one event each to the event store's own table, with its triggers (positions,
/// the hash chain) and indexes, by plain `INSERT`s from `clients` connections, each client
/// to a stream of its own, one autocommitted statement per event: what the schema alone
/// costs, with no server, cache or pipeline. `url` names a database of its own with
/// Hindsight's migrations applied, never the one a server runs on (its relay would
/// publish these events).
pub async fn store_appends(
    url: &str,
    clients: usize,
    warmup: Duration,
    duration: Duration,
) -> Result<Sample> {
    let pool = connections(url, clients).await?;
    // As the server's append of a command's one event.
    let insert = "INSERT INTO events \
         (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata) \
         VALUES ('product', $1, $2, 'ProductRestocked', '1', $3, $4) RETURNING position";
    Ok(restock_rows(pool, insert, clients, warmup, duration).await)
}

/// `insert` (parameters: a stream id, its sequence, a restock's payload and metadata) in a
/// closed loop from `clients` connections, each client writing a stream of its own from
/// sequence 1 on.
async fn restock_rows(
    pool: StatementPool,
    insert: &'static str,
    clients: usize,
    warmup: Duration,
    duration: Duration,
) -> Sample {
    let (payload, metadata) = restock_event();
    let run = Uuid::new_v4();
    closed_loop(clients, warmup, duration, move |client, iteration| {
        let pool = pool.clone();
        let payload = payload.clone();
        let metadata = metadata.clone();
        async move {
            let mut connection = match pool.acquire().await {
                Ok(connection) => connection,
                Err(error) => return Outcome::Failed(error.to_string()),
            };
            let result = sqlx::query(insert)
                .bind(format!("{run}-{client}"))
                .bind(iteration as i64 + 1)
                .bind(payload)
                .bind(metadata)
                .execute(&mut *connection)
                .await;
            match connection.give_back(result) {
                Ok(_) => Outcome::Ok(None),
                Err(error) => Outcome::Failed(error.to_string()),
            }
        }
    })
    .await
}

/// A restock's payload and metadata, shaped as the server stores them.
fn restock_event() -> (serde_json::Value, serde_json::Value) {
    let payload = json!({"ProductRestocked": {"quantity": 1}});
    let metadata = json!({
        "actor_id": Uuid::now_v7().to_string(),
        "actor_role": "admin",
        "request_id": Uuid::new_v4().to_string(),
        "correlation_id": Uuid::new_v4().to_string(),
        "causation_id": Uuid::new_v4().to_string(),
    });
    (payload, metadata)
}

/// Point reads of one product row by primary key from the read model's table, as fast as
/// `clients` connections go.
pub async fn raw_point_reads(
    url: &str,
    clients: usize,
    products: Vec<Uuid>,
    warmup: Duration,
    duration: Duration,
) -> Result<Sample> {
    let pool = connections(url, clients).await?;
    let sample = closed_loop(clients, warmup, duration, move |client, iteration| {
        point_read(&pool, &products, client * 7919 + iteration as usize)
    })
    .await;
    Ok(sample)
}

/// The same point reads sent at a fixed `rate` over `connections` (an open loop): the
/// latency the machine itself gives a read at that rate.
pub async fn raw_point_reads_at(
    url: &str,
    rate: f64,
    connections: usize,
    products: Vec<Uuid>,
    warmup: Duration,
    duration: Duration,
) -> Result<Sample> {
    let pool = self::connections(url, connections).await?;
    let sample = open_loop(rate, connections, warmup, duration, move |k| {
        point_read(&pool, &products, k as usize * 7919)
    })
    .await;
    Ok(sample)
}

fn point_read(
    pool: &StatementPool,
    products: &[Uuid],
    k: usize,
) -> impl Future<Output = Outcome> + Send + 'static {
    let (pool, id) = (pool.clone(), products[k % products.len()]);
    async move {
        let mut connection = match pool.acquire().await {
            Ok(connection) => connection,
            Err(error) => return Outcome::Failed(error.to_string()),
        };
        let result = sqlx::query("SELECT * FROM product_views WHERE id = $1")
            .bind(id)
            .fetch_optional(&mut *connection)
            .await;
        match connection.give_back(result) {
            Ok(Some(_)) => Outcome::Ok(None),
            Ok(None) => Outcome::Failed("no such product row".into()),
            Err(error) => Outcome::Failed(error.to_string()),
        }
    }
}

/// Reads every stored event in position order, in keyset batches of 5,000: the floor of
/// any replay.
pub async fn raw_event_scan(url: &str) -> Result<(u64, f64)> {
    let pool = pool(url, 1).await?;
    let started = std::time::Instant::now();
    let mut after = 0i64;
    let mut count = 0u64;
    loop {
        let rows: Vec<(i64, String, String, serde_json::Value, serde_json::Value)> =
            sqlx::query_as(
                "SELECT position, aggregate_id, event_type, payload, metadata FROM events \
             WHERE position > $1 ORDER BY position LIMIT 5000",
            )
            .bind(after)
            .fetch_all(&pool)
            .await?;
        let Some(last) = rows.last() else { break };
        after = last.0;
        count += rows.len() as u64;
    }
    Ok((count, started.elapsed().as_secs_f64()))
}
