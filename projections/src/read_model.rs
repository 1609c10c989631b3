//! What a read model is to the projection worker: a name, the tables it owns, and a
//! function that applies a batch of committed events inside the worker's transaction.

use futures::future::BoxFuture;
use hindsight_commands::event::EventDecodeError;
use hindsight_commands::{StoreError, StoredEvent};
use sqlx::PgConnection;

/// Why a batch could not be applied. The worker rolls the transaction back and retries a
/// bounded number of times before it marks the projection `failed`, except after
/// [`ApplyError::Unavailable`], which is never the events' fault.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error(transparent)]
    Decode(#[from] EventDecodeError),
    #[error("read-model write failed: {0}")]
    Database(#[from] sqlx::Error),
    #[error("event at position {position} breaks the read model: {reason}")]
    Invariant { position: i64, reason: String },
    /// Something beyond the worker's transaction failed for now: the event store a
    /// process manager executes its commands against, or an aggregate too contended to
    /// change. The batch is retried later and no event is ever marked as poison for it.
    #[error("temporarily unable to apply: {0}")]
    Unavailable(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl From<StoreError> for ApplyError {
    fn from(error: StoreError) -> Self {
        Self::Unavailable(Box::new(error))
    }
}

/// A read model fed by the event stream.
///
/// `apply` receives events in global position order, every event of every aggregate type
/// (a read model ignores what it does not need), and must write only through the given
/// connection, which is inside the transaction that also advances the projection's
/// checkpoint. It must be deterministic: a rebuild replays the same events into empty
/// tables and must reach the same state.
///
/// A process manager ([`crate::order_process`]) is a read model that also executes
/// commands. Those commit on their own, outside the worker's transaction, so a batch
/// redone after a crash issues them again: each must be idempotent or recognisably
/// already done.
pub trait ReadModel: Send + Sync + 'static {
    /// The projection's stable name, e.g. `users`.
    fn name(&self) -> &'static str;

    /// The tables this read model writes (as named for this instance).
    fn tables(&self) -> Vec<String>;

    /// Whether `event` may change what this read model writes or does. The worker never
    /// calls [`Self::apply`] for a batch of which no event concerns the read model: its
    /// checkpoint follows such batches in memory and is written at most
    /// [`QUIET_CHECKPOINT_DELAY`](crate::worker::QUIET_CHECKPOINT_DELAY) later (or with its
    /// next applied batch), which saves the worker a transaction per batch. Should the
    /// worker stop before that write, the events are passed to `apply` again from the
    /// store. Every event concerns a read model by default.
    fn concerns(&self, _event: &StoredEvent) -> bool {
        true
    }

    /// Applies a batch of events, in order, through `connection`.
    fn apply<'a>(
        &'a self,
        connection: &'a mut PgConnection,
        events: &'a [StoredEvent],
    ) -> BoxFuture<'a, Result<(), ApplyError>>;
}
