//! The projection worker: applies the events the relay publishes to read models, exactly
//! once.
//!
//! A worker runs a group of read models (the process runs all read models in one group,
//! and each process manager in a group of its own) from one durable JetStream consumer.
//! Each batch of messages is received and decoded once, applied to every member, and the
//! members' checkpoints advanced, all in one Postgres transaction (a live batch waits
//! [`WorkerSettings::linger`] from its first message for more, so that a steady trickle
//! of events is not one transaction each); messages are
//! acknowledged only after it commits. That commit does not wait for its WAL flush: should
//! the database crash first, rows and checkpoints go back together, and the worker's
//! start-up catch-up applies those events again from the store. An event at or below a
//! checkpoint is skipped, so redeliveries and the relay's republishing after a crash
//! change nothing. Every message names the position published before it, so a worker knows
//! exactly when it has missed something (a new projection, a stream that no longer holds
//! old messages, a consumer that was recreated): it then reads the missing range from the
//! event store, which is the source of truth. Only one worker per read model is active at
//! a time (a session advisory lock per read model), so order holds with several
//! processes; the checkpoint rows are locked by every apply transaction as a second guard.
//! Once caught up, a worker runs its transactions on the session that holds its locks: a
//! pooled connection costs a check with a round trip each time it goes back to the pool.
//! A member whose checkpoint another transaction holds (a rebuild swapping its tables in)
//! is skipped rather than waited for, and catches up from the store once it is free.
//! A batch of which no event concerns a member ([`ReadModel::concerns`]: the order
//! process only acts on order events) costs that member nothing: its checkpoint follows in
//! memory and is written with its next batch that does concern it, or at most
//! [`QUIET_CHECKPOINT_DELAY`] later; when no member is concerned, no transaction is opened
//! at all. A worker stopped before that write passes the same events by again.
//!
//! A batch that fails is applied again member by member, each retried a bounded number of
//! times and then event by event to commit everything before the poison event; that
//! member then stops at the event with status `failed` and the error recorded, while the
//! other read models go on. Restarting the worker retries it.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::context::GetStreamErrorKind;
use async_nats::jetstream::{self, consumer, ErrorCode};
use futures::StreamExt as _;
use hindsight_commands::event::{read_events_on, StoredEvent};
use hindsight_commands::relay::{self, HEADER_POSITION, HEADER_PREVIOUS_POSITION};
use sqlx::{Connection, Executor as _, PgConnection, PgExecutor, PgPool, Row};
use tokio_util::sync::CancellationToken;

use crate::read_model::{ApplyError, ReadModel};

/// The channel a committed projection batch notifies, with payload `name:position`.
pub const PROGRESS_CHANNEL: &str = "hindsight_projections";

/// What a read model's batch transaction sets for itself, a live worker's and a rebuild's
/// alike: [`SMALL_BATCH_SETTINGS`] for a batch of at most [`SMALL_BATCH`] events,
/// [`LARGE_BATCH_SETTINGS`] for a larger one.
pub fn batch_settings(events: usize) -> &'static str {
    if events <= SMALL_BATCH {
        SMALL_BATCH_SETTINGS
    } else {
        LARGE_BATCH_SETTINGS
    }
}

/// The most events a batch may hold and still run on its session's generic plans.
pub const SMALL_BATCH: usize = 64;

/// What a batch of more than [`SMALL_BATCH`] events sets (a catch-up's, a rebuild's):
///
/// - `synchronous_commit = off`: a read model is derived from the events, which are
///   durable before the relay publishes them, so its batches need not wait for their own
///   WAL flush. If the database crashes before the flush, the checkpoint goes back with
///   the rows and the batch is applied again from the store.
/// - `plan_cache_mode = force_custom_plan`: each statement is planned for the batch in
///   hand. A worker's session prepares its statements once and, left to itself, Postgres
///   settles on one generic plan per statement after five runs, made with whatever the
///   table looked like then, and keeps it until the table is analysed again. Made while a
///   table was small, such a plan joins a batch to the whole table by hash; without
///   autovacuum every later batch reads every row (Postgres's estimates follow a table's
///   size even when it was never analysed, so a fresh plan does not).
pub const LARGE_BATCH_SETTINGS: &str =
    "SET LOCAL synchronous_commit = off; SET LOCAL plan_cache_mode = force_custom_plan";

/// What a batch of at most [`SMALL_BATCH`] events sets (a live worker's, as a rule):
///
/// - `synchronous_commit = off`, as for [`LARGE_BATCH_SETTINGS`].
/// - `plan_cache_mode = force_generic_plan` with sequential scans, hash joins and merge
///   joins off: each statement is planned once per session and that plan is reused. With
///   only nested loops over the tables' keys to choose from, the generic plan is the one
///   a custom plan picks for a handful of rows, whatever the table's size when it was
///   made. Planning each batch for itself cost more than its execution for the small
///   batches a worker commits at a steady rate: 0.66 ms a batch for the audit trail's
///   statement against 0.97 ms of execution, at 1,000 commands a second (BENCHMARKS.md).
///   A larger batch is planned for itself: a nested loop between two of its own row sets
///   grows with the square of its size.
pub const SMALL_BATCH_SETTINGS: &str = "SET LOCAL synchronous_commit = off; \
     SET LOCAL plan_cache_mode = force_generic_plan; SET LOCAL enable_seqscan = off; \
     SET LOCAL enable_hashjoin = off; SET LOCAL enable_mergejoin = off";

#[derive(Debug, Clone)]
pub struct WorkerSettings {
    /// JetStream stream to consume.
    pub stream: String,
    /// Subject prefix of the stream's events.
    pub subject_prefix: String,
    /// Largest number of events applied in one transaction.
    pub batch_size: usize,
    /// Attempts at a failing batch before it is split to find the poison event.
    pub max_attempts: u32,
    /// Events read from the store per catch-up query.
    pub catch_up_batch: i64,
    /// How long a live batch of fewer than `batch_size` events waits, from its first
    /// message, for more before it is applied ([`LINGER`] unless set; zero applies what
    /// has arrived at once).
    pub linger: Duration,
}

/// How long a live batch waits for more events, by default. At a steady rate the messages
/// arrive a few at a time, and each batch pays its transaction, its checkpoint and its
/// notification whatever it holds; 3 ms gathers about three events more at 1,000 a second.
/// In the lag scenario it cut the workers' Postgres time per command by a sixth to a
/// third, for at most 3 ms more of staleness (BENCHMARKS.md).
pub const LINGER: Duration = Duration::from_millis(3);

impl WorkerSettings {
    pub fn new(stream: impl Into<String>, subject_prefix: impl Into<String>) -> Self {
        Self {
            stream: stream.into(),
            subject_prefix: subject_prefix.into(),
            batch_size: 500,
            max_attempts: 3,
            catch_up_batch: 5000,
            linger: LINGER,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("the database failed: {0}")]
    Database(#[from] sqlx::Error),
    #[error("JetStream is unavailable: {0}")]
    JetStream(String),
    #[error("the JetStream stream `{0}` does not exist yet (the relay creates it)")]
    StreamMissing(String),
    #[error("reading events failed: {0}")]
    Events(#[from] hindsight_commands::event::EventDecodeError),
    #[error("projection stopped at position {position}: {error}")]
    Poisoned { position: i64, error: String },
    #[error("the checkpoint moved from {expected} to {found} under this worker")]
    CheckpointMoved { expected: i64, found: i64 },
    #[error("the read model cannot apply for now: {0}")]
    Unavailable(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("`{0}` is not a read-model name (lowercase letters, digits and underscores)")]
    Name(String),
}

/// How soon a member left behind (its checkpoint was locked) is tried again, for its
/// events or for its `live` status.
const LAGGARD_RETRY: Duration = Duration::from_millis(100);

/// How long a member's stored checkpoint may trail what the worker has passed by for it
/// (batches of which no event concerned it) before it is written.
pub const QUIET_CHECKPOINT_DELAY: Duration = Duration::from_millis(100);

/// How often JetStream says a pull is still alive while no message comes. A pull consumer's
/// message stream that hears nothing for two of these ends with "missed idle heartbeat",
/// and the worker starts over (catching up from the store). Under a full load of
/// placements, a worker's stream was once seen to stall with its pull outstanding; with
/// the client's default (15 s) that went unnoticed for 24 s, with this for at most 10 s.
const IDLE_HEARTBEAT: Duration = Duration::from_secs(5);

/// How long a worker waits for its stream quietly before it warns that none appeared.
const STREAM_MISSING_WARNING: Duration = Duration::from_secs(30);

/// One event as delivered by JetStream.
#[derive(Debug)]
struct Delivered {
    event: StoredEvent,
    previous: i64,
}

fn decode(message: &jetstream::Message) -> Result<Delivered, String> {
    let event: StoredEvent = serde_json::from_slice(&message.payload)
        .map_err(|error| format!("message body is not an event: {error}"))?;
    let header = |name: &str| -> Result<i64, String> {
        message
            .headers
            .as_ref()
            .and_then(|headers| headers.get(name))
            .and_then(|value| value.as_str().parse::<i64>().ok())
            .ok_or_else(|| format!("message lacks a numeric {name} header"))
    };
    let position = header(HEADER_POSITION)?;
    if position != event.position {
        return Err(format!(
            "{HEADER_POSITION} {position} disagrees with the body's {}",
            event.position
        ));
    }
    Ok(Delivered {
        event,
        previous: header(HEADER_PREVIOUS_POSITION)?,
    })
}

/// Runs a group of read models (often just one) from one durable consumer.
pub struct ProjectionWorker {
    pool: PgPool,
    jetstream: jetstream::Context,
    name: String,
    models: Vec<Arc<dyn ReadModel>>,
    settings: WorkerSettings,
}

impl std::fmt::Debug for ProjectionWorker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProjectionWorker")
            .field("worker", &self.name)
            .field(
                "projections",
                &self
                    .models
                    .iter()
                    .map(|model| model.name())
                    .collect::<Vec<_>>(),
            )
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

/// A read model the worker runs, with the checkpoint it has reached.
struct Member {
    model: Arc<dyn ReadModel>,
    /// The position up to which the member has applied or passed by every event.
    applied: i64,
    /// Its checkpoint as stored; behind `applied` while the batches since concerned it not.
    stored: i64,
    /// Whether its status says `live`; false while its checkpoint row was held when the
    /// worker went live.
    marked_live: bool,
}

impl Member {
    fn name(&self) -> &'static str {
        self.model.name()
    }

    /// Whether its stored checkpoint trails what it passed by.
    fn trails(&self) -> bool {
        self.stored < self.applied
    }

    /// Whether none of `events` after what it applied concerns it.
    fn passes_by(&self, events: &[StoredEvent]) -> bool {
        !concerned(&self.model, after(events, self.applied))
    }

    fn committed(&mut self, to: i64) {
        self.applied = to;
        self.stored = to;
    }
}

/// Whether some of `events` concern `model`: otherwise its `apply` is never called.
fn concerned(model: &Arc<dyn ReadModel>, events: &[StoredEvent]) -> bool {
    events.iter().any(|event| model.concerns(event))
}

/// The events of `events` (in position order) after position `from`.
fn after(events: &[StoredEvent], from: i64) -> &[StoredEvent] {
    &events[events.partition_point(|event| event.position <= from)..]
}

/// Where a projection stands, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    pub position: i64,
    pub status: String,
    pub last_error: Option<String>,
}

/// Reads a projection's checkpoint row (`None` if it never ran).
pub async fn checkpoint(
    executor: impl PgExecutor<'_>,
    name: &str,
) -> Result<Option<Checkpoint>, sqlx::Error> {
    let row: Option<(i64, String, Option<String>)> = sqlx::query_as(
        "SELECT position, status, last_error FROM projection_checkpoints WHERE name = $1",
    )
    .bind(name)
    .fetch_optional(executor)
    .await?;
    Ok(row.map(|(position, status, last_error)| Checkpoint {
        position,
        status,
        last_error,
    }))
}

/// Sets `status` on those of the projections `names` whose checkpoint rows no one else
/// holds (a rebuild's swap holds one for seconds: a group must not wait on it), answering
/// the names it set.
async fn mark(pool: &PgPool, names: &[&str], status: &str) -> Result<Vec<String>, sqlx::Error> {
    sqlx::query_scalar(
        "UPDATE projection_checkpoints \
         SET status = $2, last_error = NULL, failed_position = NULL, updated_at = now() \
         WHERE name IN (SELECT name FROM projection_checkpoints \
                        WHERE name = ANY($1) FOR UPDATE SKIP LOCKED) \
         RETURNING name",
    )
    .bind(names)
    .bind(status)
    .fetch_all(pool)
    .await
}

/// Sets the status of the projections `names` (with the error and where it happened).
async fn set_status(
    executor: impl PgExecutor<'_>,
    names: &[&str],
    status: &str,
    error: Option<(&str, i64)>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE projection_checkpoints \
         SET status = $2, last_error = $3, failed_position = $4, updated_at = now() \
         WHERE name = ANY($1)",
    )
    .bind(names)
    .bind(status)
    .bind(error.map(|(message, _)| message))
    .bind(error.map(|(_, position)| position))
    .execute(executor)
    .await?;
    Ok(())
}

impl ProjectionWorker {
    /// A worker running one read model, from a durable consumer named after it.
    pub fn new(
        pool: PgPool,
        client: async_nats::Client,
        model: Arc<dyn ReadModel>,
        settings: WorkerSettings,
    ) -> Self {
        let name = model.name().to_owned();
        Self::group(pool, client, name, vec![model], settings)
    }

    /// A worker running several read models from one durable consumer named `name`: each
    /// batch is received and decoded once and applied to all of them in one transaction.
    pub fn group(
        pool: PgPool,
        client: async_nats::Client,
        name: impl Into<String>,
        models: Vec<Arc<dyn ReadModel>>,
        settings: WorkerSettings,
    ) -> Self {
        Self {
            pool,
            jetstream: jetstream::new(client),
            name: name.into(),
            models,
            settings,
        }
    }

    /// The worker's name, which is also its consumer's.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn leader_key(&self, projection: &str) -> String {
        format!("hindsight-projection:{}:{projection}", self.settings.stream)
    }

    /// Runs until `shutdown`, or until every read model of the worker has stopped on a
    /// poison event (each is left with status `failed`; the others go on meanwhile).
    pub async fn run(self, shutdown: CancellationToken) {
        let mut running = self.models.clone();
        let mut backoff = Duration::from_millis(200);
        // Since when the stream has been missing, and whether that was warned of.
        let mut stream_missing: Option<(Instant, bool)> = None;
        while !shutdown.is_cancelled() && !running.is_empty() {
            match self.lead(&mut running, &shutdown).await {
                Ok(_) => {
                    backoff = Duration::from_millis(200);
                    stream_missing = None;
                }
                // A worker started beside a relay may look for the stream before the relay
                // has created it: expected for a moment, worth a warning only if it lasts.
                Err(error @ WorkerError::StreamMissing(_)) => {
                    if stream_missing.is_none() {
                        tracing::info!(worker = self.name, %error, "waiting for the stream");
                    }
                    let (since, warned) =
                        stream_missing.get_or_insert_with(|| (Instant::now(), false));
                    if !*warned && since.elapsed() >= STREAM_MISSING_WARNING {
                        tracing::warn!(
                            worker = self.name,
                            %error,
                            waited_s = since.elapsed().as_secs(),
                            "the stream is still missing: is a relay running on it?"
                        );
                        *warned = true;
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
                Err(error) => {
                    tracing::warn!(worker = self.name, %error, "projection worker interrupted; retrying");
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
            if running.is_empty() {
                return;
            }
            tokio::select! {
                () = shutdown.cancelled() => {}
                () = tokio::time::sleep(backoff) => {}
            }
        }
    }

    /// Becomes the active worker of its read models if no one else runs any of them.
    /// Returns whether it did.
    async fn lead(
        &self,
        running: &mut Vec<Arc<dyn ReadModel>>,
        shutdown: &CancellationToken,
    ) -> Result<bool, WorkerError> {
        let keys: Vec<String> = running
            .iter()
            .map(|model| self.leader_key(model.name()))
            .collect();
        let keys: Vec<&str> = keys.iter().map(String::as_str).collect();
        let Some(leader) = hindsight_commands::db::try_session_locks(&self.pool, &keys).await?
        else {
            return Ok(false);
        };
        let component = format!("worker {}", self.name);
        let mut leader =
            hindsight_commands::db::name_session(&self.pool, leader, &component).await?;
        let result = self.project(&mut leader, running, shutdown).await;
        hindsight_commands::db::end_session(leader).await;
        result.map(|()| true)
    }

    /// Drops a member that stopped on a poison event (its status is already `failed`).
    fn stop_member(
        &self,
        running: &mut Vec<Arc<dyn ReadModel>>,
        name: &str,
        position: i64,
        error: &str,
    ) {
        tracing::error!(projection = name, position, %error, "projection failed and stopped");
        running.retain(|model| model.name() != name);
    }

    async fn project(
        &self,
        leader: &mut PgConnection,
        running: &mut Vec<Arc<dyn ReadModel>>,
        shutdown: &CancellationToken,
    ) -> Result<(), WorkerError> {
        let names: Vec<&str> = running.iter().map(|model| model.name()).collect();
        sqlx::query(
            "INSERT INTO projection_checkpoints (name) SELECT unnest($1::text[]) \
             ON CONFLICT DO NOTHING",
        )
        .bind(&names)
        .execute(&self.pool)
        .await?;
        // A member whose row is held keeps its old status until it is marked live below.
        mark(&self.pool, &names, "catching_up").await?;
        // Catch up from the store to what the relay has published, then follow the stream.
        // The members catch up side by side, each in transactions of its own. From here on
        // this worker alone moves their checkpoints (it holds the leader locks, and every
        // commit checks the stored position under a row lock), so it keeps track of them
        // instead of reading them before every batch.
        let published = relay::checkpoint(&self.pool, &self.settings.stream).await?;
        let caught_up = futures::future::join_all(running.iter().map(|model| async move {
            (
                model.clone(),
                self.apply_store_range(model, published).await,
            )
        }))
        .await;
        let mut members = Vec::with_capacity(caught_up.len());
        for (model, result) in caught_up {
            match result {
                Ok(applied) => members.push(Member {
                    model,
                    applied,
                    stored: applied,
                    marked_live: false,
                }),
                Err(WorkerError::Poisoned { position, error }) => {
                    self.stop_member(running, model.name(), position, &error);
                }
                Err(other) => return Err(other),
            }
        }
        // The position the stream is followed from: members below it (held back by a
        // rebuild's swap, or behind from an earlier run) catch up from the store.
        let Some(mut at) = members.iter().map(|member| member.applied).max() else {
            return Ok(());
        };
        prepare_checkpoint_statements(leader).await?;
        let consumer = self.consumer().await?;
        let mut messages = consumer
            .stream()
            .heartbeat(IDLE_HEARTBEAT)
            .messages()
            .await
            .map_err(|error| WorkerError::JetStream(error.to_string()))?
            .ready_chunks(self.settings.batch_size);
        self.mark_live(&mut members).await?;
        let mut last_leader_check = tokio::time::Instant::now();
        let mut laggards_tried = tokio::time::Instant::now();
        // Since when a member's stored checkpoint has trailed what it passed by.
        let mut quiet_since: Option<tokio::time::Instant> = None;
        // Messages a lingering batch received beyond its size: the next batch's start.
        let mut carried = Vec::new();
        loop {
            if !members.iter().any(Member::trails) {
                quiet_since = None;
            } else if quiet_since
                .get_or_insert_with(tokio::time::Instant::now)
                .elapsed()
                >= QUIET_CHECKPOINT_DELAY
            {
                // Rows still held (a rebuild's swap) are tried again after another delay.
                self.store_quiet(leader, &mut members).await?;
                quiet_since = None;
                continue;
            }
            let behind = members
                .iter()
                .any(|member| member.applied < at || !member.marked_live);
            if behind && laggards_tried.elapsed() >= LAGGARD_RETRY {
                self.catch_up_laggards(leader, &mut members, running, at)
                    .await?;
                self.mark_live(&mut members).await?;
                laggards_tried = tokio::time::Instant::now();
                if members.is_empty() {
                    return Ok(());
                }
                continue;
            }
            let quiet_due = quiet_since.map(|since| since + QUIET_CHECKPOINT_DELAY);
            let chunk = if !carried.is_empty() {
                Some(std::mem::take(&mut carried))
            } else {
                tokio::select! {
                    () = shutdown.cancelled() => {
                        self.store_quiet(leader, &mut members).await?;
                        return Ok(());
                    }
                    chunk = messages.next() => chunk,
                    () = tokio::time::sleep_until(laggards_tried + LAGGARD_RETRY), if behind => continue,
                    () = sleep_until_some(quiet_due), if quiet_due.is_some() => continue,
                }
            };
            let Some(mut chunk) = chunk else {
                return Err(WorkerError::JetStream(
                    "the consumer's message stream ended".into(),
                ));
            };
            self.linger(&mut messages, &mut chunk, &mut carried).await;
            let mut delivered = Vec::with_capacity(chunk.len());
            let mut last_message = None;
            for message in chunk {
                let message = message.map_err(|error| WorkerError::JetStream(error.to_string()))?;
                match decode(&message) {
                    Ok(event) => delivered.push(event),
                    // Not an event we can read: the store is the truth, so the next
                    // well-formed message (or the catch-up it triggers) covers its range.
                    Err(problem) => {
                        tracing::warn!(worker = self.name, %problem, "skipping an unreadable message")
                    }
                }
                last_message = Some(message);
            }
            at = self
                .apply_delivered(leader, &mut members, running, at, delivered)
                .await?;
            if members.is_empty() {
                return Ok(());
            }
            if let Some(message) = last_message {
                // AckPolicy::All: acknowledging the last acknowledges the batch.
                message
                    .ack()
                    .await
                    .map_err(|error| WorkerError::JetStream(error.to_string()))?;
            }
            if last_leader_check.elapsed() > Duration::from_secs(2) {
                leader.ping().await?;
                last_leader_check = tokio::time::Instant::now();
            }
        }
    }

    /// Adds to `chunk` what arrives within the linger from now, up to a batch: a live
    /// batch holds a few milliseconds of events rather than whatever one read found. What
    /// arrived beyond the batch goes to `carried`, the start of the next one. Polling the
    /// stream again loses nothing: what it had gathered when the wait ended stays in it;
    /// an error or the stream's end is met by the next read too.
    async fn linger<S, T>(&self, messages: &mut S, chunk: &mut Vec<T>, carried: &mut Vec<T>)
    where
        S: futures::Stream<Item = Vec<T>> + Unpin,
    {
        if self.settings.linger.is_zero() {
            return;
        }
        let batch = self.settings.batch_size.max(1);
        let until = tokio::time::Instant::now() + self.settings.linger;
        while chunk.len() < batch {
            match tokio::time::timeout_at(until, messages.next()).await {
                Ok(Some(mut more)) => {
                    let room = batch - chunk.len();
                    if more.len() > room {
                        *carried = more.split_off(room);
                    }
                    chunk.extend(more);
                }
                Ok(None) | Err(_) => return,
            }
        }
    }

    async fn consumer(&self) -> Result<consumer::PullConsumer, WorkerError> {
        let stream = self
            .jetstream
            .get_stream(&self.settings.stream)
            .await
            .map_err(|error| match error.kind() {
                GetStreamErrorKind::JetStream(refused)
                    if refused.error_code() == ErrorCode::STREAM_NOT_FOUND =>
                {
                    WorkerError::StreamMissing(self.settings.stream.clone())
                }
                _ => WorkerError::JetStream(error.to_string()),
            })?;
        // Read models once run by a worker of their own now share this one: their old
        // consumers would only hold state on the server.
        for model in &self.models {
            if model.name() != self.name && stream.delete_consumer(model.name()).await.is_ok() {
                tracing::info!(
                    worker = self.name,
                    consumer = model.name(),
                    "deleted a superseded consumer"
                );
            }
        }
        stream
            .get_or_create_consumer(
                &self.name,
                consumer::pull::Config {
                    durable_name: Some(self.name.clone()),
                    ack_policy: consumer::AckPolicy::All,
                    deliver_policy: consumer::DeliverPolicy::All,
                    ack_wait: Duration::from_secs(30),
                    max_ack_pending: 20_000,
                    filter_subject: format!("{}.>", self.settings.subject_prefix),
                    ..Default::default()
                },
            )
            .await
            .map_err(|error| WorkerError::JetStream(error.to_string()))
    }

    /// Applies everything in the store up to `up_to` (a position the relay published) to
    /// one read model, on its own, on a pooled connection of its own (the members catch
    /// up side by side); answers the checkpoint reached.
    async fn apply_store_range(
        &self,
        model: &Arc<dyn ReadModel>,
        up_to: i64,
    ) -> Result<i64, WorkerError> {
        let mut connection = self.pool.acquire().await?;
        let mut position = checkpoint(&mut *connection, model.name())
            .await?
            .map_or(0, |checkpoint| checkpoint.position);
        while position < up_to {
            let events = read_events_on(
                &mut connection,
                position,
                up_to,
                self.settings.catch_up_batch,
            )
            .await?;
            let last = events.last().map_or(up_to, |event| event.position);
            self.commit_with_retries(&mut connection, model, position, &events, last)
                .await?;
            position = last;
        }
        Ok(position)
    }

    /// Applies delivered messages to the members at `at`: skips what is at or below it,
    /// fills any gap a message's previous position reveals from the store, then applies
    /// the rest. Answers the position reached.
    async fn apply_delivered(
        &self,
        connection: &mut PgConnection,
        members: &mut Vec<Member>,
        running: &mut Vec<Arc<dyn ReadModel>>,
        at: i64,
        delivered: Vec<Delivered>,
    ) -> Result<i64, WorkerError> {
        let mut reached = at;
        let mut events = Vec::with_capacity(delivered.len());
        for Delivered { event, previous } in delivered {
            if event.position <= reached {
                continue;
            }
            if previous > reached {
                let missing = read_events_on(connection, reached, previous, i64::MAX).await?;
                events.extend(missing);
            }
            reached = event.position;
            events.push(event);
        }
        if events.is_empty() {
            return Ok(at);
        }
        let due = members
            .iter()
            .enumerate()
            .filter(|(_, member)| member.applied == at)
            .map(|(index, _)| index)
            .collect();
        self.advance(connection, members, running, due, &events, reached)
            .await?;
        Ok(reached)
    }

    /// Writes the checkpoints that trail what their members passed by, in one transaction
    /// per position (normally one). A member whose row is held stays behind.
    async fn store_quiet(
        &self,
        connection: &mut PgConnection,
        members: &mut [Member],
    ) -> Result<(), WorkerError> {
        let mut positions: Vec<i64> = members
            .iter()
            .filter(|member| member.trails())
            .map(|member| member.applied)
            .collect();
        positions.sort_unstable();
        positions.dedup();
        for to in positions {
            let due: Vec<usize> = (0..members.len())
                .filter(|&index| members[index].stored < to && members[index].applied == to)
                .collect();
            for index in self
                .commit_together(connection, members, &due, &[], to)
                .await?
            {
                members[index].committed(to);
            }
        }
        Ok(())
    }

    /// Marks `live` the members not marked yet whose checkpoint rows are free.
    async fn mark_live(&self, members: &mut [Member]) -> Result<(), WorkerError> {
        let names: Vec<&str> = members
            .iter()
            .filter(|member| !member.marked_live)
            .map(Member::name)
            .collect();
        if names.is_empty() {
            return Ok(());
        }
        let marked = mark(&self.pool, &names, "live").await?;
        for member in members.iter_mut() {
            if marked.iter().any(|name| name == member.name()) {
                member.marked_live = true;
                tracing::info!(
                    projection = member.name(),
                    worker = self.name,
                    "projection is live"
                );
            }
        }
        Ok(())
    }

    /// Brings members behind `at` forward from the store, as far as their checkpoints
    /// are free to take.
    async fn catch_up_laggards(
        &self,
        connection: &mut PgConnection,
        members: &mut Vec<Member>,
        running: &mut Vec<Arc<dyn ReadModel>>,
        at: i64,
    ) -> Result<(), WorkerError> {
        let mut index = 0;
        while index < members.len() {
            let from = members[index].applied;
            if from >= at {
                index += 1;
                continue;
            }
            let name = members[index].name();
            let events = read_events_on(connection, from, at, self.settings.catch_up_batch).await?;
            let to = events.last().map_or(at, |event| event.position);
            self.advance(connection, members, running, vec![index], &events, to)
                .await?;
            match members.get(index) {
                // Still there and moved: go on with it.
                Some(member) if member.name() == name && member.applied > from => {}
                // Its checkpoint is still held (a rebuild's swap): try again later.
                Some(member) if member.name() == name => index += 1,
                // Stopped on a poison event: the next member took its place.
                _ => {}
            }
        }
        Ok(())
    }

    /// Applies `events` (all after the members' common checkpoint) to the members at
    /// indexes `due` and moves their checkpoints to `to`: in one transaction for all of
    /// them, and if that fails for what may be the events' fault, member by member, so a
    /// poison event stops only the read model it breaks. A member whose checkpoint is
    /// locked (a rebuild swapping its tables in) is left behind for
    /// [`Self::catch_up_laggards`].
    async fn advance(
        &self,
        connection: &mut PgConnection,
        members: &mut Vec<Member>,
        running: &mut Vec<Arc<dyn ReadModel>>,
        due: Vec<usize>,
        events: &[StoredEvent],
        to: i64,
    ) -> Result<(), WorkerError> {
        // Members no event of the batch concerns pass it by; their checkpoints are written
        // later (`store_quiet`) or with their next batch.
        let (passing, due): (Vec<usize>, Vec<usize>) = due
            .into_iter()
            .partition(|&index| members[index].passes_by(events));
        for index in passing {
            members[index].applied = to;
        }
        if due.is_empty() {
            return Ok(());
        }
        let error = match self
            .commit_together(connection, members, &due, events, to)
            .await
        {
            Ok(committed) => {
                for index in committed {
                    members[index].committed(to);
                }
                return Ok(());
            }
            Err(error) if !error.may_be_poison() => return Err(error.into()),
            Err(error) => error,
        };
        if due.len() > 1 {
            tracing::warn!(worker = self.name, %error, "a batch failed; applying it read model by read model");
        }
        let mut poisoned = Vec::new();
        for &index in &due {
            let member = &members[index];
            let result = self
                .commit_with_retries(
                    connection,
                    &member.model,
                    member.stored,
                    after(events, member.applied),
                    to,
                )
                .await;
            match result {
                Ok(()) => members[index].committed(to),
                Err(WorkerError::Poisoned { position, error }) => {
                    self.stop_member(running, members[index].name(), position, &error);
                    poisoned.push(index);
                }
                Err(other) => return Err(other),
            }
        }
        for index in poisoned.into_iter().rev() {
            members.remove(index);
        }
        Ok(())
    }

    /// One transaction for the members at `due`: lock the checkpoints no one else holds,
    /// check each is still where this worker stored it, apply what follows what each has
    /// passed, advance them to `to`, notify, commit. Answers the members it moved.
    ///
    /// Sends its `BEGIN` with the lock and its `COMMIT` with the checkpoint move (see
    /// [`open_locked`]): two round trips fewer than a `sqlx::Transaction`, on the path every
    /// live batch takes. If anything fails the transaction is rolled back here, before the
    /// error is answered. sqlx does not know of this transaction, so `connection` must be
    /// the leader's own session, which is closed rather than reused should this future be
    /// dropped half-way; [`Self::commit`], which also runs on pooled connections during
    /// the initial catch-up, keeps sqlx's transaction for that reason.
    async fn commit_together(
        &self,
        connection: &mut PgConnection,
        members: &[Member],
        due: &[usize],
        events: &[StoredEvent],
        to: i64,
    ) -> Result<Vec<usize>, CommitError> {
        let result: Result<Vec<usize>, CommitError> = async {
            let names: Vec<&str> = due.iter().map(|&index| members[index].name()).collect();
            let locked = open_locked(&mut *connection, events.len(), &names).await?;
            let mut committed = Vec::with_capacity(locked.len());
            for (name, position) in &locked {
                let Some(&index) = due.iter().find(|&&index| members[index].name() == name) else {
                    continue;
                };
                if *position != members[index].stored {
                    return Err(CommitError::Moved {
                        expected: members[index].stored,
                        found: *position,
                    });
                }
                committed.push(index);
            }
            if committed.is_empty() {
                connection.execute(sqlx::raw_sql("COMMIT")).await?;
                return Ok(committed);
            }
            for &index in &committed {
                let member = &members[index];
                let events = after(events, member.applied);
                if !events.is_empty() {
                    member.model.apply(&mut *connection, events).await?;
                }
            }
            let names: Vec<&str> = committed
                .iter()
                .map(|&index| members[index].name())
                .collect();
            close_advanced(&mut *connection, &names, to).await?;
            Ok(committed)
        }
        .await;
        if result.is_err() {
            // Should this fail too, the session is gone and the next statement says so.
            connection.execute(sqlx::raw_sql("ROLLBACK")).await.ok();
        }
        result
    }

    /// Applies `events` (all after `from`, its stored checkpoint) to one read model and
    /// moves its checkpoint to `to`, retrying; if the batch keeps failing, commits event by
    /// event up to the poison event and marks the projection failed there.
    async fn commit_with_retries(
        &self,
        connection: &mut PgConnection,
        model: &Arc<dyn ReadModel>,
        from: i64,
        events: &[StoredEvent],
        to: i64,
    ) -> Result<(), WorkerError> {
        let mut last_error = None;
        for attempt in 1..=self.settings.max_attempts.max(1) {
            match self.commit(connection, model, from, events, to).await {
                Ok(()) => return Ok(()),
                // Not the events' fault: give up this round and let the lead loop retry.
                Err(error) if !error.may_be_poison() => return Err(error.into()),
                Err(error) => {
                    tracing::warn!(projection = model.name(), attempt, %error, "applying a batch failed");
                    // sqlx rolls back a transaction dropped uncommitted by queueing a
                    // `ROLLBACK` that goes with the connection's next statement; send it
                    // now, so the failed batch's row locks are not held through the pause.
                    // Should this fail, the session is gone and the next attempt says so.
                    connection.ping().await.ok();
                    last_error = Some(error);
                    tokio::time::sleep(Duration::from_millis(50 * u64::from(attempt))).await;
                }
            }
        }
        let Some(batch_error) = last_error else {
            return Ok(());
        };
        if events.len() <= 1 {
            let position = events.first().map_or(to, |event| event.position);
            return self
                .poisoned(connection, model, position, batch_error)
                .await;
        }
        // Find the poison event, committing everything before it.
        let mut position = from;
        for event in events {
            match self
                .commit(
                    connection,
                    model,
                    position,
                    std::slice::from_ref(event),
                    event.position,
                )
                .await
            {
                Ok(()) => position = event.position,
                Err(error) if !error.may_be_poison() => return Err(error.into()),
                Err(error) => {
                    return self
                        .poisoned(connection, model, event.position, error)
                        .await
                }
            }
        }
        self.commit(connection, model, position, &[], to)
            .await
            .map_err(Into::into)
    }

    /// Records that `model` stopped at `position`, on the connection its failed
    /// transaction ran on: the rollback that transaction left queued goes first, so the
    /// write does not wait on that transaction's lock of the checkpoint row.
    async fn poisoned(
        &self,
        connection: &mut PgConnection,
        model: &Arc<dyn ReadModel>,
        position: i64,
        error: CommitError,
    ) -> Result<(), WorkerError> {
        let message = error.to_string();
        set_status(
            connection,
            &[model.name()],
            "failed",
            Some((&message, position)),
        )
        .await?;
        Err(WorkerError::Poisoned {
            position,
            error: message,
        })
    }

    /// One transaction for one read model: lock its checkpoint (waiting for it), check it
    /// is still `from`, apply, advance to `to`, notify, commit.
    async fn commit(
        &self,
        connection: &mut PgConnection,
        model: &Arc<dyn ReadModel>,
        from: i64,
        events: &[StoredEvent],
        to: i64,
    ) -> Result<(), CommitError> {
        let name = model.name();
        // The batch's settings travel with the `BEGIN`, in its round trip.
        let mut tx = connection
            .begin_with(format!("BEGIN; {}", batch_settings(events.len())))
            .await?;
        let (current,): (i64,) = sqlx::query_as(
            "SELECT position FROM projection_checkpoints WHERE name = $1 FOR UPDATE",
        )
        .bind(name)
        .fetch_one(&mut *tx)
        .await?;
        if current != from {
            // Someone else applied in between (a former leader that had not noticed it
            // lost its lock). Applying again would double-apply: stop and re-read.
            return Err(CommitError::Moved {
                expected: from,
                found: current,
            });
        }
        if concerned(model, events) {
            model.apply(&mut tx, events).await?;
        }
        sqlx::query(
            "UPDATE projection_checkpoints SET position = $2, updated_at = now() WHERE name = $1 \
             RETURNING pg_notify($3, $4)",
        )
        .bind(name)
        .bind(to)
        .bind(PROGRESS_CHANNEL)
        .bind(format!("{name}:{to}"))
        .execute(&mut *tx)
        .await?;
        tx.commit().await?;
        Ok(())
    }
}

/// Sleeps until `deadline`, or forever without one.
async fn sleep_until_some(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// Prepares, on a leader's session, the two statements every live batch runs around its
/// read models' own: [`open_locked`]'s lock and [`close_advanced`]'s move. They travel in
/// simple queries (with the `BEGIN` and with the `COMMIT`), which Postgres plans at every
/// run; executed by name, they keep one plan per session like any prepared statement.
/// The session is the worker's own and closed after its run, so the names are free.
async fn prepare_checkpoint_statements(connection: &mut PgConnection) -> Result<(), sqlx::Error> {
    connection
        .execute(sqlx::raw_sql(&format!(
            "PREPARE hindsight_lock_checkpoints (text[]) AS \
                 SELECT name, position FROM projection_checkpoints \
                 WHERE name = ANY ($1) FOR UPDATE SKIP LOCKED; \
             PREPARE hindsight_advance_checkpoints (text[], bigint) AS \
                 UPDATE projection_checkpoints SET position = $2, updated_at = now() \
                 WHERE name = ANY ($1) \
                 RETURNING pg_notify('{PROGRESS_CHANNEL}', name || ':' || position)"
        )))
        .await?;
    Ok(())
}

/// Begins a transaction for a batch of `events` events on `connection` and locks the
/// checkpoint rows of `names` that no one else holds, in one round trip: `BEGIN`, the
/// batch's settings ([`batch_settings`]) and the lock travel as one simple query, so the
/// names are written into it as a literal (read-model names are constants of this crate;
/// [`literal_list`] refuses anything else). Answers the locked rows' names and
/// positions. `connection` is a leader's session, with [`prepare_checkpoint_statements`].
async fn open_locked(
    connection: &mut PgConnection,
    events: usize,
    names: &[&str],
) -> Result<Vec<(String, i64)>, CommitError> {
    let statements = format!(
        "BEGIN; {}; EXECUTE hindsight_lock_checkpoints ({})",
        batch_settings(events),
        names_array(names)?
    );
    let rows = connection.fetch_all(sqlx::raw_sql(&statements)).await?;
    rows.iter()
        .map(|row| Ok((row.try_get("name")?, row.try_get("position")?)))
        .collect()
}

/// Moves the checkpoints of `names` to `to`, notifies [`PROGRESS_CHANNEL`] for each and
/// commits the transaction [`open_locked`] began, in one round trip.
async fn close_advanced(
    connection: &mut PgConnection,
    names: &[&str],
    to: i64,
) -> Result<(), CommitError> {
    let statements = format!(
        "EXECUTE hindsight_advance_checkpoints ({}, {to}); COMMIT",
        names_array(names)?
    );
    connection.execute(sqlx::raw_sql(&statements)).await?;
    Ok(())
}

/// `names` as a SQL `text[]` (see [`literal_list`]).
fn names_array(names: &[&str]) -> Result<String, CommitError> {
    Ok(format!("ARRAY[{}]::text[]", literal_list(names)?))
}

/// `names` as a list of SQL string literals. Only names of lowercase letters, digits and
/// underscores are accepted (every read model's is): nothing in them needs quoting.
fn literal_list(names: &[&str]) -> Result<String, CommitError> {
    let mut list = String::new();
    for name in names {
        if name.is_empty()
            || !name
                .bytes()
                .all(|byte| byte.is_ascii_lowercase() || byte.is_ascii_digit() || byte == b'_')
        {
            return Err(CommitError::Name((*name).to_owned()));
        }
        if !list.is_empty() {
            list.push_str(", ");
        }
        list.push('\'');
        list.push_str(name);
        list.push('\'');
    }
    Ok(list)
}

#[derive(Debug, thiserror::Error)]
enum CommitError {
    #[error(transparent)]
    Apply(#[from] ApplyError),
    #[error("the database failed: {0}")]
    Database(#[from] sqlx::Error),
    #[error("checkpoint moved from {expected} to {found} under this worker")]
    Moved { expected: i64, found: i64 },
    #[error("`{0}` is not a read-model name (lowercase letters, digits and underscores)")]
    Name(String),
}

impl CommitError {
    /// Whether the events themselves may be what fails (as opposed to the database being
    /// unreachable, something the read model depends on being unavailable, or another
    /// worker having moved the checkpoint).
    fn may_be_poison(&self) -> bool {
        match self {
            Self::Apply(ApplyError::Database(error)) | Self::Database(error) => {
                !hindsight_commands::db::is_connectivity(error)
            }
            Self::Apply(ApplyError::Unavailable(_)) => false,
            Self::Apply(_) => true,
            Self::Moved { .. } | Self::Name(_) => false,
        }
    }
}

impl From<CommitError> for WorkerError {
    fn from(error: CommitError) -> Self {
        match error {
            CommitError::Database(error) | CommitError::Apply(ApplyError::Database(error)) => {
                Self::Database(error)
            }
            CommitError::Apply(ApplyError::Decode(error)) => Self::Events(error),
            CommitError::Apply(ApplyError::Invariant { position, reason }) => Self::Poisoned {
                position,
                error: reason,
            },
            CommitError::Apply(ApplyError::Unavailable(error)) => Self::Unavailable(error),
            CommitError::Moved { expected, found } => Self::CheckpointMoved { expected, found },
            CommitError::Name(name) => Self::Name(name),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn read_model_names_are_written_as_literals_and_nothing_else_is() {
        let list = literal_list(&["products", "audit_trail", "v2_orders"]);
        assert_eq!(
            list.ok().as_deref(),
            Some("'products', 'audit_trail', 'v2_orders'")
        );
        assert_eq!(
            names_array(&["products", "sales"]).ok().as_deref(),
            Some("ARRAY['products', 'sales']::text[]")
        );
        for refused in ["", "it's", "Products", "a b", "x;DROP", "back\\slash"] {
            assert!(
                matches!(literal_list(&["users", refused]), Err(CommitError::Name(name)) if name == refused),
                "{refused:?} was accepted"
            );
        }
    }
}
