//! The projection worker: one durable JetStream consumer per read model, applying events
//! exactly once.
//!
//! Each batch is applied and the projection's checkpoint advanced in one Postgres
//! transaction; messages are acknowledged only after it commits. That commit does not wait
//! for its WAL flush: should the database crash first, rows and checkpoint go back
//! together, and the worker's start-up catch-up applies those events again from the
//! store. An event at or below the checkpoint is acknowledged and skipped, so redeliveries
//! and the relay's republishing after a crash change nothing. Every message names the position published
//! before it, so a worker knows exactly when it has missed something (a new projection, a
//! stream that no longer holds old messages, a consumer that was recreated): it then
//! reads the missing range from the event store, which is the source of truth, inside the
//! same transaction. Only one worker per projection is active at a time (a session
//! advisory lock), so order holds with several processes; the checkpoint row is locked by
//! every apply transaction as a second guard.
//!
//! A batch that keeps failing is retried a bounded number of times, then applied event by
//! event to commit everything before the poison event; the projection then stops at that
//! event with status `failed` and the error recorded, while other projections go on.
//! Restarting the worker retries it.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, consumer};
use futures::StreamExt as _;
use hindsight_commands::event::{read_events, StoredEvent};
use hindsight_commands::relay::{self, HEADER_POSITION, HEADER_PREVIOUS_POSITION};
use sqlx::{Connection, PgConnection, PgPool};
use tokio_util::sync::CancellationToken;

use crate::read_model::{ApplyError, ReadModel};

/// The channel a committed projection batch notifies, with payload `name:position`.
pub const PROGRESS_CHANNEL: &str = "hindsight_projections";

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
}

impl WorkerSettings {
    pub fn new(stream: impl Into<String>, subject_prefix: impl Into<String>) -> Self {
        Self {
            stream: stream.into(),
            subject_prefix: subject_prefix.into(),
            batch_size: 500,
            max_attempts: 3,
            catch_up_batch: 5000,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("the database failed: {0}")]
    Database(#[from] sqlx::Error),
    #[error("JetStream is unavailable: {0}")]
    JetStream(String),
    #[error("reading events failed: {0}")]
    Events(#[from] hindsight_commands::event::EventDecodeError),
    #[error("projection stopped at position {position}: {error}")]
    Poisoned { position: i64, error: String },
    #[error("the checkpoint moved from {expected} to {found} under this worker")]
    CheckpointMoved { expected: i64, found: i64 },
    #[error("the read model cannot apply for now: {0}")]
    Unavailable(#[source] Box<dyn std::error::Error + Send + Sync>),
}

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

/// Runs one read model's projection.
pub struct ProjectionWorker {
    pool: PgPool,
    jetstream: jetstream::Context,
    model: Arc<dyn ReadModel>,
    settings: WorkerSettings,
}

impl std::fmt::Debug for ProjectionWorker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProjectionWorker")
            .field("projection", &self.model.name())
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

/// Where a projection stands, as stored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Checkpoint {
    pub position: i64,
    pub status: String,
    pub last_error: Option<String>,
}

/// Reads a projection's checkpoint row (`None` if it never ran).
pub async fn checkpoint(pool: &PgPool, name: &str) -> Result<Option<Checkpoint>, sqlx::Error> {
    let row: Option<(i64, String, Option<String>)> = sqlx::query_as(
        "SELECT position, status, last_error FROM projection_checkpoints WHERE name = $1",
    )
    .bind(name)
    .fetch_optional(pool)
    .await?;
    Ok(row.map(|(position, status, last_error)| Checkpoint {
        position,
        status,
        last_error,
    }))
}

async fn set_status(
    pool: &PgPool,
    name: &str,
    status: &str,
    error: Option<(&str, i64)>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "UPDATE projection_checkpoints \
         SET status = $2, last_error = $3, failed_position = $4, updated_at = now() \
         WHERE name = $1",
    )
    .bind(name)
    .bind(status)
    .bind(error.map(|(message, _)| message))
    .bind(error.map(|(_, position)| position))
    .execute(pool)
    .await?;
    Ok(())
}

impl ProjectionWorker {
    pub fn new(
        pool: PgPool,
        client: async_nats::Client,
        model: Arc<dyn ReadModel>,
        settings: WorkerSettings,
    ) -> Self {
        Self {
            pool,
            jetstream: jetstream::new(client),
            model,
            settings,
        }
    }

    pub fn name(&self) -> &'static str {
        self.model.name()
    }

    fn leader_key(&self) -> String {
        format!(
            "hindsight-projection:{}:{}",
            self.settings.stream,
            self.name()
        )
    }

    /// Runs until `shutdown`, or until the projection is poisoned (then it returns,
    /// leaving status `failed`; the other projections are not affected).
    pub async fn run(self, shutdown: CancellationToken) {
        let mut backoff = Duration::from_millis(200);
        while !shutdown.is_cancelled() {
            match self.lead(&shutdown).await {
                Ok(_) => backoff = Duration::from_millis(200),
                Err(WorkerError::Poisoned { position, error }) => {
                    tracing::error!(projection = self.name(), position, %error, "projection failed and stopped");
                    return;
                }
                Err(error) => {
                    tracing::warn!(projection = self.name(), %error, "projection interrupted; retrying");
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
            tokio::select! {
                () = shutdown.cancelled() => {}
                () = tokio::time::sleep(backoff) => {}
            }
        }
    }

    /// Becomes the active worker of this projection if no one else is. Returns whether it
    /// did.
    async fn lead(&self, shutdown: &CancellationToken) -> Result<bool, WorkerError> {
        let Some(mut leader) =
            hindsight_commands::db::try_session_lock(&self.pool, &self.leader_key()).await?
        else {
            return Ok(false);
        };
        let result = self.project(&mut leader, shutdown).await;
        leader.close().await.ok();
        result.map(|()| true)
    }

    async fn project(
        &self,
        leader: &mut PgConnection,
        shutdown: &CancellationToken,
    ) -> Result<(), WorkerError> {
        let name = self.name();
        sqlx::query("INSERT INTO projection_checkpoints (name) VALUES ($1) ON CONFLICT DO NOTHING")
            .bind(name)
            .execute(&self.pool)
            .await?;
        set_status(&self.pool, name, "catching_up", None).await?;
        // Catch up from the store to what the relay has published, then follow the stream.
        let published = relay::checkpoint(&self.pool, &self.settings.stream).await?;
        // From here on this worker alone moves the checkpoint (it holds the leader lock, and
        // every commit checks the stored position under a row lock), so it keeps track of
        // it instead of reading it before every batch.
        let mut applied = self.apply_store_range(published).await?;
        let consumer = self.consumer().await?;
        let mut messages = consumer
            .messages()
            .await
            .map_err(|error| WorkerError::JetStream(error.to_string()))?
            .ready_chunks(self.settings.batch_size);
        set_status(&self.pool, name, "live", None).await?;
        tracing::info!(projection = name, "projection is live");
        let mut last_leader_check = tokio::time::Instant::now();
        loop {
            let chunk = tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                chunk = messages.next() => chunk,
            };
            let Some(chunk) = chunk else {
                return Err(WorkerError::JetStream(
                    "the consumer's message stream ended".into(),
                ));
            };
            let mut delivered = Vec::with_capacity(chunk.len());
            let mut last_message = None;
            for message in chunk {
                let message = message.map_err(|error| WorkerError::JetStream(error.to_string()))?;
                match decode(&message) {
                    Ok(event) => delivered.push(event),
                    // Not an event we can read: the store is the truth, so the next
                    // well-formed message (or the catch-up it triggers) covers its range.
                    Err(problem) => {
                        tracing::warn!(projection = name, %problem, "skipping an unreadable message")
                    }
                }
                last_message = Some(message);
            }
            applied = self.apply_delivered(applied, delivered).await?;
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

    async fn consumer(&self) -> Result<consumer::PullConsumer, WorkerError> {
        let stream = self
            .jetstream
            .get_stream(&self.settings.stream)
            .await
            .map_err(|error| WorkerError::JetStream(error.to_string()))?;
        stream
            .get_or_create_consumer(
                self.name(),
                consumer::pull::Config {
                    durable_name: Some(self.name().to_owned()),
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

    /// Applies everything in the store up to `up_to` (a position the relay published);
    /// answers the checkpoint reached.
    async fn apply_store_range(&self, up_to: i64) -> Result<i64, WorkerError> {
        let mut position = checkpoint(&self.pool, self.name())
            .await?
            .map_or(0, |checkpoint| checkpoint.position);
        while position < up_to {
            let events =
                read_events(&self.pool, position, up_to, self.settings.catch_up_batch).await?;
            let last = events.last().map_or(up_to, |event| event.position);
            self.commit_with_retries(position, &events, last).await?;
            position = last;
        }
        Ok(position)
    }

    /// Applies delivered messages after checkpoint `start`: skips what is at or below it,
    /// fills any gap a message's previous position reveals from the store, then applies
    /// the rest. Answers the new checkpoint.
    async fn apply_delivered(
        &self,
        start: i64,
        delivered: Vec<Delivered>,
    ) -> Result<i64, WorkerError> {
        let mut applied_to = start;
        let mut events = Vec::with_capacity(delivered.len());
        for Delivered { event, previous } in delivered {
            if event.position <= applied_to {
                continue;
            }
            if previous > applied_to {
                let missing = read_events(&self.pool, applied_to, previous, i64::MAX).await?;
                events.extend(missing);
            }
            applied_to = event.position;
            events.push(event);
        }
        if events.is_empty() {
            return Ok(start);
        }
        self.commit_with_retries(start, &events, applied_to).await?;
        Ok(applied_to)
    }

    /// Applies `events` (all after `from`) and moves the checkpoint to `to`, retrying;
    /// if the batch keeps failing, commits event by event up to the poison event and
    /// marks the projection failed there.
    async fn commit_with_retries(
        &self,
        from: i64,
        events: &[StoredEvent],
        to: i64,
    ) -> Result<(), WorkerError> {
        let mut last_error = None;
        for attempt in 1..=self.settings.max_attempts.max(1) {
            match self.commit(from, events, to).await {
                Ok(()) => return Ok(()),
                // Not the events' fault: give up this round and let the lead loop retry.
                Err(error) if !error.may_be_poison() => return Err(error.into()),
                Err(error) => {
                    tracing::warn!(projection = self.name(), attempt, %error, "applying a batch failed");
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
            return self.poisoned(position, batch_error).await;
        }
        // Find the poison event, committing everything before it.
        let mut position = from;
        for event in events {
            match self
                .commit(position, std::slice::from_ref(event), event.position)
                .await
            {
                Ok(()) => position = event.position,
                Err(error) if !error.may_be_poison() => return Err(error.into()),
                Err(error) => return self.poisoned(event.position, error).await,
            }
        }
        self.commit(position, &[], to).await.map_err(Into::into)
    }

    async fn poisoned(&self, position: i64, error: CommitError) -> Result<(), WorkerError> {
        let message = error.to_string();
        set_status(
            &self.pool,
            self.name(),
            "failed",
            Some((&message, position)),
        )
        .await?;
        Err(WorkerError::Poisoned {
            position,
            error: message,
        })
    }

    /// One transaction: lock the checkpoint, check it is still `from`, apply, advance to
    /// `to`, notify, commit.
    async fn commit(&self, from: i64, events: &[StoredEvent], to: i64) -> Result<(), CommitError> {
        let name = self.name();
        let mut tx = hindsight_commands::db::begin(&self.pool).await?;
        // A read model is derived from the events, which are durable before the relay
        // publishes them: its batches need not wait for their own WAL flush. If the
        // database crashes before the flush, the checkpoint goes back with the rows and
        // the worker applies those events again from the store.
        let (current,): (i64,) = sqlx::query_as(
            "SELECT position, set_config('synchronous_commit', 'off', true) \
             FROM projection_checkpoints WHERE name = $1 FOR UPDATE",
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
        self.model.apply(&mut tx, events).await?;
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

#[derive(Debug, thiserror::Error)]
enum CommitError {
    #[error(transparent)]
    Apply(#[from] ApplyError),
    #[error("the database failed: {0}")]
    Database(#[from] sqlx::Error),
    #[error("checkpoint moved from {expected} to {found} under this worker")]
    Moved { expected: i64, found: i64 },
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
            Self::Moved { .. } => false,
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
        }
    }
}
