//! Executing commands against the Postgres event store.
//!
//! [`AggregateStore`] loads an aggregate through cqrs-es's snapshotting
//! `PersistedEventStore` over postgres-es, lets the pure domain decide, appends the
//! resulting events with their [`EventMetadata`], and answers with the new version and the
//! global position of the aggregate's last event. The domain's decision is a pure function
//! of state and command, so an optimistic-concurrency conflict is resolved by reloading
//! and deciding again, a bounded number of times; with an expected version (`If-Match`)
//! a conflict is a version mismatch instead.
//!
//! Two kinds of failure never mix: a [`Refusal`] is a decision ("the command is not
//! allowed"), a [`StoreError`] means the infrastructure failed. [`AggregateStore::execute`]
//! returns `Result<Result<Executed, Refusal<_>>, StoreError>` to keep them apart.

use std::error::Error as StdError;
use std::marker::PhantomData;
use std::time::Duration;

use cqrs_es::persist::PersistedEventStore;
use cqrs_es::{AggregateError, EventStore};
use hindsight_domain::{self as domain, RuleViolation};
use postgres_es::PostgresEventRepository;
use rand::Rng;
use sqlx::PgPool;
use uuid::Uuid;

use crate::aggregate::{Event, EventSourced};
use crate::metadata::EventMetadata;
use crate::upcast::Upcaster;

/// Tuning of the write path.
#[derive(Debug, Clone, Copy)]
pub struct StoreSettings {
    /// Take a snapshot every this many events, so loading stays cheap however long the
    /// history grows (at most this many events are replayed on top of the snapshot).
    pub snapshot_every: usize,
    /// How many times a command is decided before a conflict is reported.
    pub max_attempts: u32,
}

impl Default for StoreSettings {
    fn default() -> Self {
        Self {
            snapshot_every: 100,
            max_attempts: 8,
        }
    }
}

/// A command that was accepted (possibly as a no-op).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Executed {
    pub aggregate_id: Uuid,
    /// The aggregate's version after the command: the sequence of its last event.
    pub version: u64,
    /// The global position of the aggregate's last event.
    pub position: i64,
    /// How many events the command appended (0 for an accepted no-op).
    pub appended: usize,
}

/// A key that must be unique across all aggregates of a type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UniqueKey {
    Email,
    Sku,
}

/// A command the system decided not to carry out.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Refusal<E> {
    /// The aggregate's own business rule refused it.
    #[error(transparent)]
    Rule(E),
    /// Another aggregate already holds the unique key the command claims.
    #[error("{} is already taken", match .0 { UniqueKey::Email => "the e-mail address", UniqueKey::Sku => "the SKU" })]
    Taken(UniqueKey),
    /// The caller expected another version of the aggregate (`If-Match`).
    #[error("the resource was changed since version {expected}")]
    VersionMismatch { expected: u64 },
    /// Concurrent writers kept winning; the command was not applied.
    #[error("the resource is being changed concurrently; try again")]
    Contention,
}

impl<E: RuleViolation> Refusal<E> {
    /// The stable API code of the refusal.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Rule(rule) => rule.code(),
            Self::Taken(UniqueKey::Email) => "EMAIL_TAKEN",
            Self::Taken(UniqueKey::Sku) => "SKU_TAKEN",
            Self::VersionMismatch { .. } => "VERSION_MISMATCH",
            Self::Contention => "CONCURRENT_MODIFICATION",
        }
    }
}

/// The infrastructure failed; nothing can be said about the command's fate beyond
/// "not acknowledged".
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("the event store is unreachable")]
    Unavailable(#[source] Box<dyn StdError + Send + Sync>),
    #[error("a stored event or snapshot could not be read")]
    Corrupt(#[source] Box<dyn StdError + Send + Sync>),
    #[error("the event store failed")]
    Database(#[source] Box<dyn StdError + Send + Sync>),
}

impl StoreError {
    fn from_sqlx(error: sqlx::Error) -> Self {
        if crate::db::is_connectivity(&error) {
            Self::Unavailable(Box::new(error))
        } else {
            Self::Database(Box::new(error))
        }
    }
}

impl From<sqlx::Error> for StoreError {
    fn from(error: sqlx::Error) -> Self {
        Self::from_sqlx(error)
    }
}

fn sqlstate_of(error: &(dyn StdError + Send + Sync + 'static)) -> Option<String> {
    let sqlx_error = error.downcast_ref::<sqlx::Error>()?;
    sqlx_error
        .as_database_error()
        .and_then(|db| db.code())
        .map(|code| code.into_owned())
}

/// The outcome of a failed append that is not an infrastructure failure.
enum AppendFailure {
    Conflict,
    Taken(UniqueKey),
}

fn classify<E: StdError>(error: AggregateError<E>) -> Result<AppendFailure, StoreError> {
    match error {
        AggregateError::AggregateConflict => Ok(AppendFailure::Conflict),
        AggregateError::UnexpectedError(inner) => match sqlstate_of(inner.as_ref()).as_deref() {
            Some("HK001") => Ok(AppendFailure::Taken(UniqueKey::Email)),
            Some("HK002") => Ok(AppendFailure::Taken(UniqueKey::Sku)),
            _ => match inner.downcast::<sqlx::Error>() {
                Ok(sqlx_error) => Err(StoreError::from_sqlx(*sqlx_error)),
                Err(other) => Err(StoreError::Database(other)),
            },
        },
        AggregateError::DatabaseConnectionError(inner) => Err(StoreError::Unavailable(inner)),
        AggregateError::DeserializationError(inner) => Err(StoreError::Corrupt(inner)),
        AggregateError::UserError(rule) => Err(StoreError::Database(
            format!("unexpected rule error from the store: {rule}").into(),
        )),
    }
}

/// An aggregate's state as loaded from the store.
#[derive(Debug, Clone)]
pub struct Loaded<A> {
    pub state: A,
    /// The sequence of the aggregate's last event; 0 when it has none.
    pub version: u64,
}

/// The write path of one aggregate type.
pub struct AggregateStore<A: domain::Aggregate> {
    store: PersistedEventStore<PostgresEventRepository, EventSourced<A>>,
    pool: PgPool,
    settings: StoreSettings,
    _aggregate: PhantomData<A>,
}

impl<A: domain::Aggregate> std::fmt::Debug for AggregateStore<A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AggregateStore")
            .field("aggregate_type", &A::TYPE)
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl<A: domain::Aggregate> AggregateStore<A> {
    pub fn new(pool: PgPool, settings: StoreSettings) -> Self {
        let repository = PostgresEventRepository::new(pool.clone());
        let store =
            PersistedEventStore::new_snapshot_store(repository, settings.snapshot_every.max(1))
                .with_upcasters(vec![Box::new(Upcaster::for_aggregate(A::TYPE))]);
        Self {
            store,
            pool,
            settings,
            _aggregate: PhantomData,
        }
    }

    /// Loads an aggregate (snapshot plus later events); `None` if it has no events.
    pub async fn load(&self, id: Uuid) -> Result<Option<Loaded<A>>, StoreError> {
        let context = self
            .store
            .load_aggregate(&id.to_string())
            .await
            .map_err(|error| match classify(error) {
                Ok(_) => StoreError::Database("conflict while loading".into()),
                Err(error) => error,
            })?;
        if context.current_sequence == 0 {
            return Ok(None);
        }
        Ok(Some(Loaded {
            state: context.aggregate.0,
            version: context.current_sequence as u64,
        }))
    }

    /// Decides `command` against aggregate `id` and appends its events.
    ///
    /// With `expected_version`, the command is refused with
    /// [`Refusal::VersionMismatch`] unless the aggregate is at exactly that version when
    /// the events are appended.
    pub async fn execute(
        &self,
        id: Uuid,
        command: A::Command,
        metadata: &EventMetadata,
        expected_version: Option<u64>,
    ) -> Result<Result<Executed, Refusal<A::Error>>, StoreError> {
        let aggregate_id = id.to_string();
        for attempt in 1..=self.settings.max_attempts.max(1) {
            let context = self
                .store
                .load_aggregate(&aggregate_id)
                .await
                .map_err(|error| match classify(error) {
                    Ok(_) => StoreError::Database("conflict while loading".into()),
                    Err(error) => error,
                })?;
            let version = context.current_sequence as u64;
            if let Some(expected) = expected_version {
                if expected != version {
                    return Ok(Err(Refusal::VersionMismatch { expected }));
                }
            }
            let events = match context.aggregate.0.handle(command.clone()) {
                Ok(events) => events,
                Err(rule) => return Ok(Err(Refusal::Rule(rule))),
            };
            if events.is_empty() {
                let position = self.position_of(&aggregate_id, version).await?;
                return Ok(Ok(Executed {
                    aggregate_id: id,
                    version,
                    position,
                    appended: 0,
                }));
            }
            let appended = events.len();
            let events = events.into_iter().map(Event).collect();
            match self.store.commit(events, context, metadata.to_map()).await {
                Ok(_) => {
                    let version = version + appended as u64;
                    let position = self.position_of(&aggregate_id, version).await?;
                    return Ok(Ok(Executed {
                        aggregate_id: id,
                        version,
                        position,
                        appended,
                    }));
                }
                Err(error) => match classify(error)? {
                    AppendFailure::Taken(key) => return Ok(Err(Refusal::Taken(key))),
                    AppendFailure::Conflict => {
                        if let Some(expected) = expected_version {
                            return Ok(Err(Refusal::VersionMismatch { expected }));
                        }
                        tracing::debug!(
                            aggregate_type = A::TYPE,
                            %aggregate_id,
                            attempt,
                            "concurrent append, deciding again"
                        );
                        let jitter = rand::thread_rng().gen_range(0..=2u64 << attempt.min(6));
                        tokio::time::sleep(Duration::from_millis(jitter)).await;
                    }
                },
            }
        }
        Ok(Err(Refusal::Contention))
    }

    /// The global position of the event at `sequence` of this aggregate (0 for none).
    async fn position_of(&self, aggregate_id: &str, sequence: u64) -> Result<i64, StoreError> {
        if sequence == 0 {
            return Ok(0);
        }
        let position: Option<i64> = sqlx::query_scalar(
            "SELECT position FROM events \
             WHERE aggregate_type = $1 AND aggregate_id = $2 AND sequence = $3",
        )
        .bind(A::TYPE)
        .bind(aggregate_id)
        .bind(sequence as i64)
        .fetch_optional(&self.pool)
        .await?;
        position.ok_or_else(|| {
            StoreError::Corrupt(
                format!("event {sequence} of {} {aggregate_id} is missing", A::TYPE).into(),
            )
        })
    }
}
