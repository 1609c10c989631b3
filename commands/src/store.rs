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
//! The hot path costs one round trip (docs/adr/0003-one-round-trip-write-path.md):
//! recently used aggregates stay in a bounded in-process cache at the version they were
//! loaded or written at, and the events are appended by one autocommitted statement that
//! answers their positions; the relay is then woken by an in-process signal (`wakeup`),
//! not by a `NOTIFY` inside the append. The cache cannot make a write wrong, because an
//! append only succeeds at the next free sequence: a stale entry loses the append with a
//! conflict, is dropped and reloaded. A refusal, a no-op or a version mismatch decided on
//! a cached entry is confirmed against the store's current version before it is answered.
//! A command on an id its caller just minted ([`AggregateStore::execute_new`]) is decided
//! on the empty state without a read, under the same rule. Commands on one aggregate from
//! one process take turns ([`crate::turns`]), so they do not race each other into
//! conflicts; reads copy the cached entry without taking it. Snapshots (in postgres-es's
//! table, read by its loader) are written every `snapshot_every` events.
//!
//! Two kinds of failure never mix: a [`Refusal`] is a decision ("the command is not
//! allowed"), a [`StoreError`] means the infrastructure failed. [`AggregateStore::execute`]
//! returns `Result<Result<Executed, Refusal<_>>, StoreError>` to keep them apart.

use std::error::Error as StdError;
use std::marker::PhantomData;
use std::sync::{LazyLock, Mutex, MutexGuard};
use std::time::Duration;

use cqrs_es::persist::PersistedEventStore;
use cqrs_es::{AggregateError, EventStore};
use hashlink::LruCache;
use hindsight_domain::{self as domain, DomainEvent as _, RuleViolation};
use postgres_es::PostgresEventRepository;
use rand::Rng;
use sqlx::PgPool;
use uuid::Uuid;

use crate::aggregate::EventSourced;
use crate::batch::{insert_rows, Row};
use crate::event::EventDecodeError;
use crate::history::aggregate_events_after;
use crate::metadata::EventMetadata;
use crate::statements::StatementPool;
use crate::turns::{Turn, Turns};
use crate::upcast::Upcaster;
use crate::wakeup::AppendSignal;

/// Tuning of the write path.
#[derive(Debug, Clone, Copy)]
pub struct StoreSettings {
    /// Take a snapshot every this many events, so loading stays cheap however long the
    /// history grows (at most this many events are replayed on top of the snapshot).
    pub snapshot_every: usize,
    /// How many times a command is decided before a conflict is reported.
    pub max_attempts: u32,
    /// Aggregates of one type kept in memory between commands (0: load every time).
    pub cache_capacity: usize,
}

impl Default for StoreSettings {
    fn default() -> Self {
        Self {
            snapshot_every: 100,
            max_attempts: 8,
            cache_capacity: 10_000,
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

/// Another aggregate a command was decided with, at the version it was read at (placing an
/// order reads its products' names and prices). The command's events are appended only if
/// no event that would change what was read has followed that version, checked by the
/// appending statement itself ([`AggregateStore::execute_new_reading`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReadAt {
    aggregate_type: &'static str,
    id: Uuid,
    version: u64,
    /// The event types that change what was read; `None`: any event does.
    changed_by: Option<&'static [&'static str]>,
}

impl ReadAt {
    /// Aggregate `id` of type `A`, read whole at `version`: any later event changes it.
    pub fn new<A: domain::Aggregate>(id: Uuid, version: u64) -> Self {
        Self {
            aggregate_type: A::TYPE,
            id,
            version,
            changed_by: None,
        }
    }

    /// Aggregate `id` of type `A`, of which a part was read at `version` that only events
    /// of the types `changed_by` change (a product's listing is not changed by the
    /// reservations the order process keeps appending to it).
    pub fn part<A: domain::Aggregate>(
        id: Uuid,
        version: u64,
        changed_by: &'static [&'static str],
    ) -> Self {
        Self {
            aggregate_type: A::TYPE,
            id,
            version,
            changed_by: Some(changed_by),
        }
    }
}

/// Binds the parameters of [`READS_UNCHANGED`] (`$8` to `$11`: each read's aggregate type,
/// id, version and the types that change it, comma-separated, or `NULL` for any) to an
/// append's statement; an append that read nothing carries no condition and gets none.
pub(crate) fn bind_reads<'q, O>(
    reads: &[ReadAt],
    query: sqlx::query::QueryAs<'q, sqlx::Postgres, O, sqlx::postgres::PgArguments>,
) -> sqlx::query::QueryAs<'q, sqlx::Postgres, O, sqlx::postgres::PgArguments> {
    if reads.is_empty() {
        return query;
    }
    let types: Vec<&str> = reads.iter().map(|read| read.aggregate_type).collect();
    let ids: Vec<String> = reads.iter().map(|read| read.id.to_string()).collect();
    let versions: Vec<i64> = reads.iter().map(|read| read.version as i64).collect();
    let changed_by: Vec<Option<String>> = reads
        .iter()
        .map(|read| read.changed_by.map(|types| types.join(",")))
        .collect();
    query.bind(types).bind(ids).bind(versions).bind(changed_by)
}

/// The condition an append carries when its command read other aggregates: none of them
/// holds an event after the version read that changes what was read (parameters `$8` to
/// `$11`, see [`bind_reads`]). Each read is a walk of its stretch of the primary key from
/// that version on: the events since, usually none or a few. A function of the schema
/// (migration 0015), so that the appending statement keeps one generic plan: written
/// inline, its array parameters made Postgres plan the whole `INSERT` on every execution.
pub(crate) const READS_UNCHANGED: &str =
    "hindsight_reads_unchanged($8::text[], $9::text[], $10::bigint[], $11::text[])";

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
    /// An aggregate the command was decided with ([`ReadAt`]) changed after it was read;
    /// nothing was appended. The caller reads it again and decides again.
    #[error("the resource is being changed concurrently; try again")]
    ReadChanged,
}

impl<E: RuleViolation> Refusal<E> {
    /// The stable API code of the refusal.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Rule(rule) => rule.code(),
            Self::Taken(UniqueKey::Email) => "EMAIL_TAKEN",
            Self::Taken(UniqueKey::Sku) => "SKU_TAKEN",
            Self::VersionMismatch { .. } => "VERSION_MISMATCH",
            Self::Contention | Self::ReadChanged => "CONCURRENT_MODIFICATION",
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

/// Maps a failed load to a store error.
fn load_error<E: StdError>(error: AggregateError<E>) -> StoreError {
    match error {
        AggregateError::DatabaseConnectionError(inner) => StoreError::Unavailable(inner),
        AggregateError::DeserializationError(inner) => StoreError::Corrupt(inner),
        AggregateError::UnexpectedError(inner) => match inner.downcast::<sqlx::Error>() {
            Ok(sqlx_error) => StoreError::from_sqlx(*sqlx_error),
            Err(other) => StoreError::Database(other),
        },
        AggregateError::AggregateConflict => StoreError::Database("conflict while loading".into()),
        AggregateError::UserError(rule) => {
            StoreError::Database(format!("unexpected rule error from the store: {rule}").into())
        }
    }
}

/// Why an append did not happen, when that is not an infrastructure failure.
pub(crate) enum AppendFailure {
    /// Another writer took the next sequence first.
    Conflict,
    /// An aggregate the command read has changed since.
    ReadChanged,
    /// The unique-key trigger refused a key another aggregate holds.
    Taken(UniqueKey),
}

pub(crate) fn classify_append(error: sqlx::Error) -> Result<AppendFailure, StoreError> {
    if let Some(database) = error.as_database_error() {
        match database.code().as_deref() {
            Some("23505") if database.constraint() == Some("events_pkey") => {
                return Ok(AppendFailure::Conflict)
            }
            Some("HK001") => return Ok(AppendFailure::Taken(UniqueKey::Email)),
            Some("HK002") => return Ok(AppendFailure::Taken(UniqueKey::Sku)),
            _ => {}
        }
    }
    Err(StoreError::from_sqlx(error))
}

/// An aggregate's state as loaded from the store.
#[derive(Debug, Clone)]
pub struct Loaded<A> {
    pub state: A,
    /// The sequence of the aggregate's last event; 0 when it has none.
    pub version: u64,
}

/// The sequence of an aggregate's last event (no row: it has none), read from the end of
/// its stretch of the primary key. Written as `ORDER BY … LIMIT 1`, not `max(sequence)`:
/// once a prepared statement switches to Postgres's generic plan, `max` with parameters is
/// planned as an aggregate over every index entry of the aggregate (each with a heap
/// visit), which made confirming a cached product cost O(its history).
pub const CURRENT_VERSION: &str = "SELECT sequence FROM events \
     WHERE aggregate_type = $1 AND aggregate_id = $2 ORDER BY sequence DESC LIMIT 1";

/// The append of a command's one event.
const APPEND: &str = "INSERT INTO events \
         (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata) \
     VALUES ($1, $2, $3, $4, $5, $6, $7) RETURNING position";

/// The append of a command's one event, on the condition that the aggregates it read are
/// where they were ([`READS_UNCHANGED`]).
static APPEND_READING: LazyLock<String> = LazyLock::new(|| {
    format!(
        "INSERT INTO events \
             (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata) \
         SELECT $1::text, $2::text, $3::int8, $4::text, $5::text, $6::jsonb, $7::jsonb \
         WHERE {READS_UNCHANGED} RETURNING position"
    )
});

/// Counts how commands and reads came by their aggregates: `cache` (a cached copy was
/// taken), `caught_up` (a cached copy the store had moved past was brought up to date
/// with the events after it) or `store` (loaded from its snapshot and events).
fn count_read(aggregate_type: &'static str, source: &'static str) {
    metrics::counter!(
        "hindsight_aggregate_reads_total",
        "aggregate_type" => aggregate_type,
        "source" => source
    )
    .increment(1);
}

fn corrupt(error: EventDecodeError) -> StoreError {
    match error {
        EventDecodeError::Database(error) => StoreError::from_sqlx(error),
        other => StoreError::Corrupt(Box::new(other)),
    }
}

/// Whether `cache` holds aggregate `id` at `version` or later.
fn holds<A>(cache: &LruCache<Uuid, Entry<A>>, id: Uuid, version: u64) -> bool {
    cache
        .peek(&id)
        .is_some_and(|entry| entry.version >= version)
}

/// An aggregate in hand while a command is decided.
#[derive(Clone)]
struct Entry<A> {
    state: A,
    version: u64,
    /// The global position of its last event, when known.
    position: Option<i64>,
    /// Taken from the cache rather than read from the store just now.
    cached: bool,
}

/// An aggregate a [`Batch`](crate::batch::Batch) decides on: its turn, held until the
/// batch has appended, and its entry with the batch's events so far applied.
pub(crate) struct Held<'a, A> {
    entry: Entry<A>,
    /// The version the batch found (or presumed); its first event is appended after it.
    base: u64,
    _turn: Turn<'a>,
}

impl<A> Held<'_, A> {
    pub(crate) fn state(&self) -> Option<&A> {
        (self.entry.version > 0).then_some(&self.entry.state)
    }

    /// Taken from the cache or presumed, and neither confirmed since nor appended to.
    fn unproven(&self) -> bool {
        self.entry.cached && self.entry.version == self.base
    }
}

/// An aggregate's state to record in postgres-es's snapshot table (one row per
/// aggregate), so a cold load replays at most `snapshot_every` events.
pub(crate) struct Snapshot {
    aggregate_type: &'static str,
    aggregate_id: Uuid,
    version: u64,
    current_snapshot: u64,
    payload: serde_json::Value,
}

impl Snapshot {
    /// Records the snapshot unless a later one is there. A failure only costs a longer
    /// load later: it is logged, not returned (the events are committed).
    pub(crate) async fn record(self, statements: &StatementPool) {
        let Self {
            aggregate_type,
            aggregate_id,
            version,
            current_snapshot,
            payload,
        } = self;
        let upsert = sqlx::query(
            "INSERT INTO snapshots (aggregate_type, aggregate_id, last_sequence, current_snapshot, payload) \
             VALUES ($1, $2, $3, $4, $5) \
             ON CONFLICT (aggregate_type, aggregate_id) DO UPDATE \
                 SET last_sequence = EXCLUDED.last_sequence, \
                     current_snapshot = EXCLUDED.current_snapshot, \
                     payload = EXCLUDED.payload \
                 WHERE snapshots.last_sequence < EXCLUDED.last_sequence",
        )
        .bind(aggregate_type)
        .bind(aggregate_id.to_string())
        .bind(version as i64)
        .bind(current_snapshot as i64)
        .bind(payload);
        let recorded = async {
            let mut connection = statements.acquire().await?;
            let recorded = upsert.execute(&mut *connection).await;
            connection.give_back(recorded)
        }
        .await;
        if let Err(error) = recorded {
            tracing::warn!(aggregate_type, %aggregate_id, %error, "snapshot not recorded");
        }
    }
}

/// What a command is first decided on when the cache holds no entry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Start {
    /// The aggregate as stored.
    Stored,
    /// The empty state, for an id minted just now (see `execute_new`).
    Empty,
}

/// The write path of one aggregate type.
pub struct AggregateStore<A: domain::Aggregate> {
    store: PersistedEventStore<PostgresEventRepository, EventSourced<A>>,
    /// For the statements a command runs on their own; cold loads go through `store`.
    statements: StatementPool,
    settings: StoreSettings,
    appends: AppendSignal,
    cache: Mutex<LruCache<Uuid, Entry<A>>>,
    turns: Turns,
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
    pub fn new(
        pool: PgPool,
        statements: StatementPool,
        settings: StoreSettings,
        appends: AppendSignal,
    ) -> Self {
        let repository = PostgresEventRepository::new(pool);
        let store =
            PersistedEventStore::new_snapshot_store(repository, settings.snapshot_every.max(1))
                .with_upcasters(vec![Box::new(Upcaster::for_aggregate(A::TYPE))]);
        Self {
            store,
            statements,
            cache: Mutex::new(LruCache::new(settings.cache_capacity.max(1))),
            settings,
            appends,
            turns: Turns::default(),
            _aggregate: PhantomData,
        }
    }

    /// The settings this store was built with.
    pub fn settings(&self) -> &StoreSettings {
        &self.settings
    }

    /// The cache, locked. Its entries stay consistent even if a holder panicked (every
    /// change is a single insert or removal), so a poisoned lock is taken over.
    fn cache(&self) -> MutexGuard<'_, LruCache<Uuid, Entry<A>>> {
        self.cache
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Takes an aggregate out of the cache (so no other command decides on the same
    /// entry); a command that finds none loads from the store. With the cache turned off
    /// nothing is ever kept, so nothing is found.
    fn take_cached(&self, id: Uuid) -> Option<Entry<A>> {
        let entry = self.cache().remove(&id)?;
        count_read(A::TYPE, "cache");
        Some(Entry {
            cached: true,
            ..entry
        })
    }

    /// A copy of an aggregate's cached entry, left in the cache (for reads, which must
    /// not make a command that is about to run miss it).
    fn peek_cached(&self, id: Uuid) -> Option<Entry<A>> {
        self.cache().peek(&id).map(|entry| Entry {
            cached: true,
            ..entry.clone()
        })
    }

    /// Puts an entry back, unless a newer one was put there meanwhile.
    fn keep(&self, id: Uuid, entry: Entry<A>) {
        if self.settings.cache_capacity == 0 || entry.version == 0 {
            return;
        }
        let mut cache = self.cache();
        if !holds(&cache, id, entry.version) {
            cache.insert(id, entry);
        }
    }

    /// Reads an aggregate from the store: its snapshot plus the events after it.
    async fn load_fresh(&self, id: Uuid) -> Result<Entry<A>, StoreError> {
        count_read(A::TYPE, "store");
        let context = self
            .store
            .load_aggregate(&id.to_string())
            .await
            .map_err(load_error)?;
        Ok(Entry {
            state: context.aggregate.0,
            version: context.current_sequence as u64,
            position: None,
            cached: false,
        })
    }

    /// `entry` (a cached or held copy, at a version the store has since passed: it holds
    /// `current`) brought up to date: the events after its version read and applied, one
    /// short statement, where a load reads the snapshot and up to `snapshot_every` events
    /// after it. A copy more than `snapshot_every` events behind, or one the store does
    /// not continue (it was never stored), is loaded afresh instead.
    ///
    /// Copies fall behind mostly for a moment: the order process's batch appends to the
    /// products it decides on and puts them back in the cache a round trip later, while
    /// orders being placed keep reading those products.
    async fn caught_up(
        &self,
        id: Uuid,
        mut entry: Entry<A>,
        current: u64,
    ) -> Result<Entry<A>, StoreError> {
        let behind = current.saturating_sub(entry.version);
        if behind == 0 || behind > self.settings.snapshot_every.max(1) as u64 {
            return self.load_fresh(id).await;
        }
        count_read(A::TYPE, "caught_up");
        let mut connection = self.statements.acquire().await?;
        let events =
            aggregate_events_after(&mut *connection, A::TYPE, id, entry.version as i64).await;
        let events = connection.give_back(events).map_err(corrupt)?;
        for stored in events {
            if stored.sequence != entry.version as i64 + 1 {
                // Sequences are consecutive from 1, so the copy was not a stored state.
                return self.load_fresh(id).await;
            }
            let event = stored.decode::<A::Event>().map_err(corrupt)?;
            entry.state.apply(event);
            entry.version += 1;
            entry.position = Some(stored.position);
        }
        if entry.version < current {
            return self.load_fresh(id).await;
        }
        entry.cached = false;
        Ok(entry)
    }

    /// The store's current version of an aggregate (one index lookup).
    async fn current_version(&self, id: Uuid) -> Result<u64, StoreError> {
        let mut connection = self.statements.acquire().await?;
        let version = sqlx::query_scalar::<_, i64>(CURRENT_VERSION)
            .bind(A::TYPE)
            .bind(id.to_string())
            .fetch_optional(&mut *connection)
            .await;
        let version = connection.give_back(version)?;
        Ok(version.unwrap_or(0) as u64)
    }

    /// `entry` if the store holds no later event, else brought up to date.
    async fn confirmed(&self, id: Uuid, entry: Entry<A>) -> Result<Entry<A>, StoreError> {
        if entry.cached {
            let current = self.current_version(id).await?;
            if current != entry.version {
                return self.caught_up(id, entry, current).await;
            }
        }
        Ok(Entry {
            cached: false,
            ..entry
        })
    }

    /// Loads an aggregate's current state (a copy; see [`read`](Self::read) for a few
    /// fields of it); `None` if it has no events.
    pub async fn load(&self, id: Uuid) -> Result<Option<Loaded<A>>, StoreError> {
        self.read(id, A::clone).await
    }

    /// What `part` makes of an aggregate's current state, without copying the state:
    /// `None` if it has no events. A cached entry counts only if the store holds no later
    /// event (one index lookup); else the aggregate is read afresh, kept in the cache, and
    /// `part` called again on it. For callers that need a few fields of a state that can
    /// be large (placing an order reads its products' names and prices; a product's state
    /// holds every order that reserved it). `part` runs while the cache is locked: it
    /// should take what it needs and no more.
    pub async fn read<R>(
        &self,
        id: Uuid,
        part: impl Fn(&A) -> R,
    ) -> Result<Option<Loaded<R>>, StoreError> {
        let cached = self
            .cache()
            .peek(&id)
            .map(|entry| (entry.version, part(&entry.state)));
        let entry = match cached {
            Some((version, state)) => {
                count_read(A::TYPE, "cache");
                let current = self.current_version(id).await?;
                if current == version {
                    return Ok((version > 0).then_some(Loaded { state, version }));
                }
                // The copy to catch up: the one just read, unless the cache moved on.
                match self.peek_cached(id) {
                    Some(entry) if entry.version == current => entry,
                    Some(entry) if entry.version < current => {
                        self.caught_up(id, entry, current).await?
                    }
                    _ => self.load_fresh(id).await?,
                }
            }
            None => self.load_fresh(id).await?,
        };
        if entry.version == 0 {
            return Ok(None);
        }
        let loaded = Loaded {
            state: part(&entry.state),
            version: entry.version,
        };
        self.keep(id, entry);
        Ok(Some(loaded))
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
        self.run(id, command, metadata, expected_version, Start::Stored, &[])
            .await
    }

    /// Decides `command` against aggregate `id`, an id the caller minted just now (a
    /// random UUID no aggregate has), without reading the store first: the command is
    /// decided on the empty state, whose append can only succeed at sequence 1. Should
    /// the id hold events after all, that append conflicts and the command is decided
    /// again on the aggregate as loaded, as [`execute`](Self::execute) would have; a
    /// refusal or no-op on the empty state is confirmed against the store likewise.
    pub async fn execute_new(
        &self,
        id: Uuid,
        command: A::Command,
        metadata: &EventMetadata,
    ) -> Result<Result<Executed, Refusal<A::Error>>, StoreError> {
        self.run(id, command, metadata, None, Start::Empty, &[])
            .await
    }

    /// [`execute_new`](Self::execute_new) for a command decided with other aggregates, as
    /// read at the versions in `reads` (placing an order reads its products): its events
    /// are appended only if nothing that changes what was read has happened to them since,
    /// which the appending statement checks; else nothing is appended and the answer is
    /// [`Refusal::ReadChanged`]. So the caller can decide on cached copies
    /// ([`read_cached`](Self::read_cached)) without a statement to confirm each first, and
    /// what it read cannot change between its check and the append.
    pub async fn execute_new_reading(
        &self,
        id: Uuid,
        command: A::Command,
        metadata: &EventMetadata,
        reads: &[ReadAt],
    ) -> Result<Result<Executed, Refusal<A::Error>>, StoreError> {
        self.run(id, command, metadata, None, Start::Empty, reads)
            .await
    }

    /// What `part` makes of the cached copy of aggregate `id`, and the copy's version,
    /// without asking the store whether it is current: for a command that hands that
    /// version to [`execute_new_reading`](Self::execute_new_reading), whose append checks
    /// it. `None` when the cache holds no copy. `part` runs while the cache is locked.
    pub fn read_cached<R>(&self, id: Uuid, part: impl Fn(&A) -> R) -> Option<Loaded<R>> {
        let loaded = self.cache().peek(&id).map(|entry| Loaded {
            state: part(&entry.state),
            version: entry.version,
        })?;
        count_read(A::TYPE, "cache");
        Some(loaded)
    }

    async fn run(
        &self,
        id: Uuid,
        command: A::Command,
        metadata: &EventMetadata,
        expected_version: Option<u64>,
        start: Start,
        reads: &[ReadAt],
    ) -> Result<Result<Executed, Refusal<A::Error>>, StoreError> {
        // Commands on this aggregate from this process go one after another, each on the
        // entry the one before it left (see `turns`).
        let ticket = self.turns.ticket(id);
        let _turn = ticket.wait().await;
        for attempt in 1..=self.settings.max_attempts.max(1) {
            let mut entry = match self.take_cached(id) {
                Some(entry) => entry,
                // Presumed, so it is treated as a cached entry: only a successful append
                // proves it current.
                None if start == Start::Empty && attempt == 1 => Entry {
                    state: A::default(),
                    version: 0,
                    position: None,
                    cached: true,
                },
                None => self.load_fresh(id).await?,
            };
            if let Some(expected) = expected_version {
                if expected != entry.version {
                    entry = self.confirmed(id, entry).await?;
                    if expected != entry.version {
                        self.keep(id, entry);
                        return Ok(Err(Refusal::VersionMismatch { expected }));
                    }
                }
            }
            let mut decision = entry.state.handle(command.clone());
            if entry.cached && !matches!(&decision, Ok(events) if !events.is_empty()) {
                // Only a successful append proves an entry current: confirm anything else.
                entry = self.confirmed(id, entry).await?;
                decision = entry.state.handle(command.clone());
            }
            let events = match decision {
                Ok(events) => events,
                Err(rule) => {
                    self.keep(id, entry);
                    return Ok(Err(Refusal::Rule(rule)));
                }
            };
            if events.is_empty() {
                let position = match entry.position {
                    Some(position) => position,
                    None => self.position_of(id, entry.version).await?,
                };
                entry.position = Some(position);
                let version = entry.version;
                self.keep(id, entry);
                return Ok(Ok(Executed {
                    aggregate_id: id,
                    version,
                    position,
                    appended: 0,
                }));
            }
            match self
                .append(id, entry.version, &events, metadata, reads)
                .await?
            {
                Ok(position) => {
                    self.appends.appended(position);
                    let appended = events.len();
                    let before = entry.version;
                    for event in events {
                        entry.state.apply(event);
                    }
                    entry.version += appended as u64;
                    entry.position = Some(position);
                    // Back in the cache before the snapshot's round trip: reads of the
                    // aggregate meanwhile find this entry current.
                    let snapshot = self.snapshot_due(id, before, &entry);
                    let version = entry.version;
                    self.keep(id, entry);
                    if let Some(snapshot) = snapshot {
                        snapshot.record(&self.statements).await;
                    }
                    return Ok(Ok(Executed {
                        aggregate_id: id,
                        version,
                        position,
                        appended,
                    }));
                }
                Err(AppendFailure::Taken(key)) => {
                    self.keep(id, entry);
                    return Ok(Err(Refusal::Taken(key)));
                }
                Err(AppendFailure::ReadChanged) => {
                    self.keep(id, entry);
                    return Ok(Err(Refusal::ReadChanged));
                }
                Err(AppendFailure::Conflict) => {
                    // The entry is stale: drop it, and decide again on a fresh load.
                    drop(entry);
                    if let Some(expected) = expected_version {
                        return Ok(Err(Refusal::VersionMismatch { expected }));
                    }
                    tracing::debug!(
                        aggregate_type = A::TYPE,
                        aggregate_id = %id,
                        attempt,
                        "concurrent append, deciding again"
                    );
                    let jitter = rand::thread_rng().gen_range(0..=2u64 << attempt.min(6));
                    tokio::time::sleep(Duration::from_millis(jitter)).await;
                }
            }
        }
        Ok(Err(Refusal::Contention))
    }

    /// Takes aggregate `id`'s turn for a batch and the entry to decide on: a copy of the
    /// cached one, else `presumed` (a state at a version the caller has reason to believe
    /// current), else the aggregate as stored. A cached or presumed entry is unproven
    /// until the batch appends to it or [`confirm_held`](Self::confirm_held) reads its
    /// version. The cached entry stays where it is meanwhile: readers (placing an order
    /// reads its products) keep finding the last committed state, rather than missing
    /// the cache and reading the store for as long as a batch holds the aggregate.
    pub(crate) async fn hold(
        &self,
        id: Uuid,
        presumed: Option<(A, u64)>,
    ) -> Result<Held<'_, A>, StoreError> {
        let turn = self.turns.take(id).await;
        let entry = match (self.peek_cached(id), presumed) {
            (Some(entry), _) => {
                count_read(A::TYPE, "cache");
                entry
            }
            (None, Some((state, version))) => Entry {
                state,
                version,
                position: None,
                cached: true,
            },
            (None, None) => self.load_fresh(id).await?,
        };
        Ok(Held {
            base: entry.version,
            entry,
            _turn: turn,
        })
    }

    /// Makes an unproven held entry current: kept if the store holds no later event,
    /// else read afresh. An entry the batch has appended to is proven by that append.
    pub(crate) async fn confirm_held(
        &self,
        id: Uuid,
        held: &mut Held<'_, A>,
    ) -> Result<(), StoreError> {
        if !held.unproven() {
            return Ok(());
        }
        let current = self.current_version(id).await?;
        if current == held.entry.version {
            held.entry.cached = false;
        } else {
            let entry = held.entry.clone();
            held.entry = self.caught_up(id, entry, current).await?;
            held.base = held.entry.version;
        }
        Ok(())
    }

    /// Decides `command` on a held entry and stages its events as `rows`, applied to
    /// the entry so the batch's next command sees them. As in [`execute`](Self::execute),
    /// a refusal or no-op decided on an unproven entry is confirmed first.
    pub(crate) async fn stage(
        &self,
        id: Uuid,
        held: &mut Held<'_, A>,
        command: A::Command,
        metadata: &serde_json::Value,
        rows: &mut Vec<Row>,
    ) -> Result<Result<(), Refusal<A::Error>>, StoreError> {
        let mut decision = held.entry.state.handle(command.clone());
        if held.unproven() && !matches!(&decision, Ok(events) if !events.is_empty()) {
            self.confirm_held(id, held).await?;
            decision = held.entry.state.handle(command);
        }
        let events = match decision {
            Ok(events) => events,
            Err(rule) => return Ok(Err(Refusal::Rule(rule))),
        };
        for event in events {
            held.entry.version += 1;
            rows.push(Row::new::<A>(id, held.entry.version, &event, metadata)?);
            held.entry.state.apply(event);
        }
        Ok(Ok(()))
    }

    /// Drops aggregate `id` from the cache, after a batch holding it conflicted: the
    /// copy it decided on may be stale, and the next attempt should read the store.
    pub(crate) fn forget(&self, id: Uuid) {
        self.cache().remove(&id);
    }

    /// Hands a held entry back once its batch has appended (`position`: the global
    /// position of its last event, if the batch appended to it): into the cache, and
    /// passes its turn on. Answers the snapshot to record if the batch crossed a snapshot
    /// boundary: the batch records its snapshots once every entry is back, so reads do not
    /// find the cache behind the store for the length of those round trips. The entries
    /// of a batch whose append failed never come here.
    pub(crate) fn release_held(
        &self,
        id: Uuid,
        held: Held<'_, A>,
        position: Option<i64>,
    ) -> Option<Snapshot> {
        let Held {
            mut entry,
            base,
            _turn,
        } = held;
        if position.is_some() {
            entry.position = position;
        }
        let snapshot = self.snapshot_due(id, base, &entry);
        self.keep(id, entry);
        snapshot
    }

    /// Appends `events` after `version` in one autocommitted statement; answers the
    /// global position of the last one. The table's triggers stamp positions, claim
    /// unique keys and extend the hash chain in the same statement. One event (what every
    /// command decides today) is a plain `INSERT`; more go through the batch's statement.
    async fn append(
        &self,
        id: Uuid,
        version: u64,
        events: &[A::Event],
        metadata: &EventMetadata,
        reads: &[ReadAt],
    ) -> Result<Result<i64, AppendFailure>, StoreError> {
        let metadata = serde_json::to_value(metadata.to_map())
            .map_err(|error| StoreError::Database(Box::new(error)))?;
        let [event] = events else {
            let mut rows = Vec::with_capacity(events.len());
            for (sequence, event) in (version + 1..).zip(events) {
                rows.push(Row::new::<A>(id, sequence, event, &metadata)?);
            }
            let appended = match insert_rows(&self.statements, rows, reads).await? {
                Ok(appended) => appended,
                Err(failure) => return Ok(Err(failure)),
            };
            let position = appended.into_iter().map(|(_, _, position)| position).max();
            return position
                .map(Ok)
                .ok_or_else(|| StoreError::Database("an append stored no event".into()));
        };
        let payload =
            serde_json::to_value(event).map_err(|error| StoreError::Database(Box::new(error)))?;
        let insert = if reads.is_empty() {
            APPEND
        } else {
            APPEND_READING.as_str()
        };
        let query = sqlx::query_as::<_, (i64,)>(insert)
            .bind(A::TYPE)
            .bind(id.to_string())
            .bind(version as i64 + 1)
            .bind(event.event_type())
            .bind(event.event_version())
            .bind(payload)
            .bind(&metadata);
        let query = bind_reads(reads, query);
        let mut connection = self.statements.acquire().await?;
        let result = query.fetch_optional(&mut *connection).await;
        match connection.give_back(result) {
            Ok(Some((position,))) => Ok(Ok(position)),
            // Only the condition on the reads can leave the row out.
            Ok(None) => Ok(Err(AppendFailure::ReadChanged)),
            Err(error) => classify_append(error).map(Err),
        }
    }

    /// A snapshot of `entry` if the events since `before` crossed a snapshot boundary.
    fn snapshot_due(&self, id: Uuid, before: u64, entry: &Entry<A>) -> Option<Snapshot> {
        let every = self.settings.snapshot_every.max(1) as u64;
        if entry.version / every <= before / every {
            return None;
        }
        match serde_json::to_value(&entry.state) {
            Ok(payload) => Some(Snapshot {
                aggregate_type: A::TYPE,
                aggregate_id: id,
                version: entry.version,
                current_snapshot: entry.version / every,
                payload,
            }),
            Err(error) => {
                tracing::warn!(aggregate_type = A::TYPE, aggregate_id = %id, %error, "snapshot not serialisable");
                None
            }
        }
    }

    /// The global position of the event at `sequence` of this aggregate (0 for none).
    async fn position_of(&self, id: Uuid, sequence: u64) -> Result<i64, StoreError> {
        if sequence == 0 {
            return Ok(0);
        }
        let mut connection = self.statements.acquire().await?;
        let position = sqlx::query_scalar::<_, i64>(
            "SELECT position FROM events \
             WHERE aggregate_type = $1 AND aggregate_id = $2 AND sequence = $3",
        )
        .bind(A::TYPE)
        .bind(id.to_string())
        .bind(sequence as i64)
        .fetch_optional(&mut *connection)
        .await;
        let position = connection.give_back(position)?;
        position.ok_or_else(|| {
            StoreError::Corrupt(format!("event {sequence} of {} {id} is missing", A::TYPE).into())
        })
    }
}
