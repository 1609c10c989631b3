//! Commands on several aggregates, decided one after another and appended together.
//!
//! A process manager that reacts to many events would otherwise commit each command on
//! its own and wait for each commit's WAL flush before deciding the next (the order
//! process: a reservation and a decision per order). A [`Batch`] decides the same
//! commands in the same order, each on the state the ones before it left, and appends all
//! their events in one statement: one round trip and one flush for the lot, and either
//! every event of the batch is stored or none is.
//!
//! The batch holds the turn ([`crate::turns`]) of every aggregate it touches until it
//! has appended, so commands of this process on those aggregates wait for it rather than
//! race it. The rules of the single command hold for each aggregate in the batch: an
//! entry taken from the cache (or presumed by the caller) is unproven until an append at
//! its next sequence succeeds, and a refusal or no-op decided on an unproven entry is
//! first confirmed against the store. When another process appended to one of the
//! aggregates meanwhile, the whole statement fails at that aggregate's sequence
//! ([`Conflict`]) and nothing of the batch is stored; the batch's aggregates are dropped
//! from the cache, and the caller decides again on a fresh batch, which reads them from
//! the store. While a batch holds an aggregate, the cache keeps its last committed state
//! for readers.
//!
//! Commands that claim a unique key (creating a user or a product) are not for batches:
//! a key another aggregate holds would fail the whole statement.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::sync::LazyLock;

use hindsight_domain::order::Order;
use hindsight_domain::product::Product;
use hindsight_domain::user::User;
use hindsight_domain::{self as domain, DomainEvent as _};
use uuid::Uuid;

use crate::metadata::EventMetadata;
use crate::statements::StatementPool;
use crate::store::{
    bind_reads, classify_append, AggregateStore, AppendFailure, Held, ReadAt, Refusal, Snapshot,
    StoreError, READS_UNCHANGED,
};
use crate::CommandBus;

/// One event staged by a batch, as it will be inserted.
#[derive(Debug)]
pub(crate) struct Row {
    aggregate_type: &'static str,
    aggregate_id: String,
    sequence: i64,
    event_type: &'static str,
    event_version: &'static str,
    payload: serde_json::Value,
    metadata: serde_json::Value,
}

impl Row {
    pub(crate) fn new<A: domain::Aggregate>(
        id: Uuid,
        sequence: u64,
        event: &A::Event,
        metadata: &serde_json::Value,
    ) -> Result<Self, StoreError> {
        Ok(Self {
            aggregate_type: A::TYPE,
            aggregate_id: id.to_string(),
            sequence: sequence as i64,
            event_type: event.event_type(),
            event_version: event.event_version(),
            payload: serde_json::to_value(event)
                .map_err(|error| StoreError::Database(Box::new(error)))?,
            metadata: metadata.clone(),
        })
    }
}

/// How current a state read from a batch must be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Read {
    /// As the batch holds it: possibly as old as the cache's copy or the presumption.
    AsHeld,
    /// An unproven entry is first checked against the store (one index lookup) and read
    /// afresh if the store holds later events.
    Current,
}

/// The batch's statement failed because another writer appended to one of its
/// aggregates first; nothing of the batch was stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("another writer appended to an aggregate of the batch first; nothing was stored")]
pub struct Conflict;

/// The aggregates held by one batch, of one type (opaque outside this module).
pub struct Holding<'a, A: domain::Aggregate> {
    store: &'a AggregateStore<A>,
    held: HashMap<Uuid, Held<'a, A>>,
}

impl<A: domain::Aggregate> std::fmt::Debug for Holding<'_, A> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Holding")
            .field("aggregate_type", &A::TYPE)
            .field("held", &self.held.len())
            .finish()
    }
}

impl<'a, A: domain::Aggregate> Holding<'a, A> {
    fn new(store: &'a AggregateStore<A>) -> Self {
        Self {
            store,
            held: HashMap::new(),
        }
    }

    /// The held entry of `id`, taken (with its turn) on first use.
    async fn entry(
        &mut self,
        id: Uuid,
        presumed: Option<(A, u64)>,
    ) -> Result<&mut Held<'a, A>, StoreError> {
        let store = self.store;
        Ok(match self.held.entry(id) {
            Entry::Occupied(held) => held.into_mut(),
            Entry::Vacant(vacant) => vacant.insert(store.hold(id, presumed).await?),
        })
    }

    /// Drops every held aggregate from the cache (the batch conflicted).
    fn forget(self) {
        for id in self.held.into_keys() {
            self.store.forget(id);
        }
    }

    /// Hands every entry back after the batch appended; `positions` holds the last
    /// position of each aggregate the batch appended to, by type and id. The snapshots
    /// due are added to `snapshots`, to be recorded once every entry is back.
    fn release(self, positions: &HashMap<(String, String), i64>, snapshots: &mut Vec<Snapshot>) {
        for (id, held) in self.held {
            let position = positions
                .get(&(A::TYPE.to_owned(), id.to_string()))
                .copied();
            snapshots.extend(self.store.release_held(id, held, position));
        }
    }
}

/// Several commands decided in order and appended in one statement (see the module).
///
/// Dropping a batch without [`commit`](Self::commit) stores nothing; the cache keeps the
/// entries it held as they were before the batch.
#[derive(Debug)]
pub struct Batch<'a> {
    bus: &'a CommandBus,
    holdings: Holdings<'a>,
    rows: Vec<Row>,
    _alone: tokio::sync::MutexGuard<'a, ()>,
}

/// What a batch holds, by aggregate type (opaque outside this module).
#[derive(Debug)]
pub struct Holdings<'a> {
    users: Holding<'a, User>,
    products: Holding<'a, Product>,
    orders: Holding<'a, Order>,
}

/// The aggregate types a batch can decide on.
pub trait Batched: domain::Aggregate {
    #[doc(hidden)]
    fn holding<'b, 'a>(holdings: &'b mut Holdings<'a>) -> &'b mut Holding<'a, Self>;
}

impl Batched for User {
    fn holding<'b, 'a>(holdings: &'b mut Holdings<'a>) -> &'b mut Holding<'a, Self> {
        &mut holdings.users
    }
}

impl Batched for Product {
    fn holding<'b, 'a>(holdings: &'b mut Holdings<'a>) -> &'b mut Holding<'a, Self> {
        &mut holdings.products
    }
}

impl Batched for Order {
    fn holding<'b, 'a>(holdings: &'b mut Holdings<'a>) -> &'b mut Holding<'a, Self> {
        &mut holdings.orders
    }
}

impl CommandBus {
    /// Starts a batch. A bus runs one batch at a time; a second waits for the first to
    /// be committed or dropped.
    pub async fn batch(&self) -> Batch<'_> {
        Batch {
            bus: self,
            holdings: Holdings {
                users: Holding::new(&self.users),
                products: Holding::new(&self.products),
                orders: Holding::new(&self.orders),
            },
            rows: Vec::new(),
            _alone: self.batching.lock().await,
        }
    }
}

impl<'a> Batch<'a> {
    /// Events staged so far.
    pub fn staged(&self) -> usize {
        self.rows.len()
    }

    /// Tells the batch that aggregate `id` is `state` at `version`, as far as the caller
    /// knows (the event that created it is in hand, say). The batch uses it unless it
    /// holds the aggregate already or finds it in the cache, and it is proven like a
    /// cached entry: by an append at the next sequence, or by reading the store's
    /// version before a refusal or no-op is acted on.
    pub async fn presume<A: Batched>(
        &mut self,
        id: Uuid,
        state: A,
        version: u64,
    ) -> Result<(), StoreError> {
        A::holding(&mut self.holdings)
            .entry(id, Some((state, version)))
            .await?;
        Ok(())
    }

    /// Aggregate `id` as the batch sees it (with its staged events applied); `None` if
    /// it has no events.
    pub async fn state<A: Batched>(
        &mut self,
        id: Uuid,
        read: Read,
    ) -> Result<Option<&A>, StoreError> {
        let holding = A::holding(&mut self.holdings);
        let store = holding.store;
        let held = holding.entry(id, None).await?;
        if read == Read::Current {
            store.confirm_held(id, held).await?;
        }
        Ok(held.state())
    }

    /// Decides `command` on aggregate `id` as the batch sees it and stages its events.
    pub async fn execute<A: Batched>(
        &mut self,
        id: Uuid,
        command: A::Command,
        metadata: &EventMetadata,
    ) -> Result<Result<(), Refusal<A::Error>>, StoreError> {
        let metadata = serde_json::to_value(metadata.to_map())
            .map_err(|error| StoreError::Database(Box::new(error)))?;
        let holding = A::holding(&mut self.holdings);
        let store = holding.store;
        let held = holding.entry(id, None).await?;
        store
            .stage(id, held, command, &metadata, &mut self.rows)
            .await
    }

    /// Appends every staged event in one statement and hands the aggregates back to
    /// the cache; answers the global position of the last event (`None` when nothing
    /// was staged). On [`Conflict`] nothing is stored, and the held aggregates are dropped
    /// from the cache, so that deciding again reads them from the store.
    pub async fn commit(self) -> Result<Result<Option<i64>, Conflict>, StoreError> {
        let Batch {
            bus,
            holdings,
            rows,
            _alone,
        } = self;
        let mut positions = HashMap::new();
        let mut last = None;
        if !rows.is_empty() {
            match insert_rows(bus.statements(), rows, &[]).await? {
                Ok(appended) => {
                    last = appended.iter().map(|(_, _, position)| *position).max();
                    positions = appended
                        .into_iter()
                        .map(|(kind, id, position)| ((kind, id), position))
                        .collect();
                }
                Err(AppendFailure::Conflict) => {
                    holdings.users.forget();
                    holdings.products.forget();
                    holdings.orders.forget();
                    return Ok(Err(Conflict));
                }
                Err(AppendFailure::ReadChanged) => {
                    return Err(StoreError::Database(
                        "a batch's append, which reads nothing, found a read changed".into(),
                    ))
                }
                Err(AppendFailure::Taken(key)) => {
                    return Err(StoreError::Database(
                        format!(
                        "a batched command claimed a unique key ({key:?}) another aggregate holds"
                    )
                        .into(),
                    ))
                }
            }
            if let Some(position) = last {
                bus.appends.appended(position);
            }
        }
        let mut snapshots = Vec::new();
        holdings.users.release(&positions, &mut snapshots);
        holdings.products.release(&positions, &mut snapshots);
        holdings.orders.release(&positions, &mut snapshots);
        for snapshot in snapshots {
            snapshot.record(bus.statements()).await;
        }
        Ok(Ok(last))
    }
}

/// Inserts `rows` in order in one autocommitted statement; answers each appended
/// aggregate's type, id and last position. The table's triggers stamp positions in row
/// order and extend each stream's hash chain as for a single event. Also the statement
/// of a single command that decides more than one event.
pub(crate) async fn insert_rows(
    statements: &StatementPool,
    rows: Vec<Row>,
    reads: &[ReadAt],
) -> Result<Result<Vec<(String, String, i64)>, AppendFailure>, StoreError> {
    let mut columns = Columns::with_capacity(rows.len());
    for row in rows {
        columns.push(row);
    }
    let insert = if reads.is_empty() {
        INSERT_ROWS.as_str()
    } else {
        INSERT_ROWS_READING.as_str()
    };
    let query = sqlx::query_as::<_, (String, String, i64)>(insert)
        .bind(columns.aggregate_types)
        .bind(columns.aggregate_ids)
        .bind(columns.sequences)
        .bind(columns.event_types)
        .bind(columns.event_versions)
        .bind(columns.payloads)
        .bind(columns.metadata);
    let query = bind_reads(reads, query);
    let mut connection = statements.acquire().await?;
    let result = query.fetch_all(&mut *connection).await;
    match connection.give_back(result) {
        // Only the condition on the reads can leave every row out.
        Ok(appended) if appended.is_empty() && !reads.is_empty() => {
            Ok(Err(AppendFailure::ReadChanged))
        }
        Ok(appended) => Ok(Ok(appended)),
        Err(error) => classify_append(error).map(Err),
    }
}

/// Rows appended in the order given.
static INSERT_ROWS: LazyLock<String> = LazyLock::new(|| insert_rows_statement(None));

/// Rows appended in the order given if the aggregates their command read are where they
/// were ([`READS_UNCHANGED`]).
static INSERT_ROWS_READING: LazyLock<String> =
    LazyLock::new(|| insert_rows_statement(Some(READS_UNCHANGED)));

fn insert_rows_statement(condition: Option<&str>) -> String {
    let condition = condition.map_or_else(String::new, |c| format!("WHERE {c} "));
    format!(
        "WITH appended AS ( \
             INSERT INTO events \
                 (aggregate_type, aggregate_id, sequence, event_type, event_version, payload, metadata) \
             SELECT e.aggregate_type, e.aggregate_id, e.sequence, e.event_type, e.event_version, \
                    e.payload, e.metadata \
             FROM UNNEST($1::text[], $2::text[], $3::bigint[], $4::text[], $5::text[], \
                         $6::jsonb[], $7::jsonb[]) \
                 WITH ORDINALITY AS e(aggregate_type, aggregate_id, sequence, event_type, \
                                      event_version, payload, metadata, n) \
             {condition}ORDER BY e.n \
             RETURNING aggregate_type, aggregate_id, position) \
         SELECT aggregate_type, aggregate_id, max(position) FROM appended \
         GROUP BY aggregate_type, aggregate_id"
    )
}

/// Staged rows as the statement's column arrays.
struct Columns {
    aggregate_types: Vec<&'static str>,
    aggregate_ids: Vec<String>,
    sequences: Vec<i64>,
    event_types: Vec<&'static str>,
    event_versions: Vec<&'static str>,
    payloads: Vec<serde_json::Value>,
    metadata: Vec<serde_json::Value>,
}

impl Columns {
    fn with_capacity(capacity: usize) -> Self {
        Self {
            aggregate_types: Vec::with_capacity(capacity),
            aggregate_ids: Vec::with_capacity(capacity),
            sequences: Vec::with_capacity(capacity),
            event_types: Vec::with_capacity(capacity),
            event_versions: Vec::with_capacity(capacity),
            payloads: Vec::with_capacity(capacity),
            metadata: Vec::with_capacity(capacity),
        }
    }

    fn push(&mut self, row: Row) {
        self.aggregate_types.push(row.aggregate_type);
        self.aggregate_ids.push(row.aggregate_id);
        self.sequences.push(row.sequence);
        self.event_types.push(row.event_type);
        self.event_versions.push(row.event_version);
        self.payloads.push(row.payload);
        self.metadata.push(row.metadata);
    }
}
