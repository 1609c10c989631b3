//! Waking the relay when an append has committed, without a `NOTIFY` in the append.
//!
//! A transaction that notifies takes a database-wide lock at commit and holds it until its
//! commit record is flushed, so appends that notified in their own transaction committed
//! one flush at a time: on two cores that alone capped raw single-row inserts at about a
//! third of their rate without it (see BENCHMARKS.md). Instead, an [`AppendSignal`] is
//! raised by the write path after its append has committed. A relay in the same process
//! watches it directly ([`AppendWatch`]); for relays in other processes one background
//! task sends `pg_notify` on [`EVENTS_CHANNEL`] in its own, flush-free transaction,
//! coalescing every append that happened while the previous notification was on its way.
//! The payload names the signalling process, so a relay ignores the echo of its own
//! appends. While a relay of this process is the active one ([`AppendWatch::leading`]),
//! nothing is sent: relays elsewhere stand by and read from their checkpoint when they
//! take over. A wake-up is only ever a hint: the relay also polls, so an append whose
//! process died before signalling is published all the same.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Once};
use std::time::Duration;

use sqlx::PgPool;
use tokio::sync::watch;
use uuid::Uuid;

/// The channel on which appends are announced to other processes.
pub const EVENTS_CHANNEL: &str = "hindsight_events";

/// How long the notifier gathers appends before announcing them: a relay in another process
/// learns of an append at most this much later than one in the same process.
const COALESCE: Duration = Duration::from_millis(2);

/// Raised after every committed append; cheap to clone.
#[derive(Debug, Clone)]
pub struct AppendSignal {
    inner: Arc<Inner>,
}

#[derive(Debug)]
struct Inner {
    sender: watch::Sender<i64>,
    origin: String,
    pool: PgPool,
    forwarder: Once,
    /// How many relays of this process are active (one per stream at most).
    leading: Arc<AtomicUsize>,
}

/// A relay's view of the appends made by its own process.
#[derive(Debug, Clone)]
pub struct AppendWatch {
    receiver: watch::Receiver<i64>,
    origin: String,
    leading: Arc<AtomicUsize>,
}

/// Held by a relay of this process while it is the active one; see
/// [`AppendWatch::leading`].
#[derive(Debug)]
pub struct Leading {
    leading: Arc<AtomicUsize>,
}

impl Drop for Leading {
    fn drop(&mut self) {
        self.leading.fetch_sub(1, Ordering::SeqCst);
    }
}

impl AppendSignal {
    pub fn new(pool: PgPool) -> Self {
        let (sender, _) = watch::channel(0);
        Self {
            inner: Arc::new(Inner {
                sender,
                origin: Uuid::new_v4().simple().to_string(),
                pool,
                forwarder: Once::new(),
                leading: Arc::new(AtomicUsize::new(0)),
            }),
        }
    }

    /// Announces that events up to `position` are committed. Must be called from within
    /// the Tokio runtime (the first call starts the task that tells other processes).
    pub fn appended(&self, position: i64) {
        self.inner.forwarder.call_once(|| {
            tokio::spawn(forward(
                self.inner.pool.clone(),
                self.inner.sender.subscribe(),
                self.inner.origin.clone(),
                Arc::clone(&self.inner.leading),
            ));
        });
        self.inner
            .sender
            .send_modify(|latest| *latest = (*latest).max(position));
    }

    /// Watches this process's appends.
    pub fn watch(&self) -> AppendWatch {
        AppendWatch {
            receiver: self.inner.sender.subscribe(),
            origin: self.inner.origin.clone(),
            leading: Arc::clone(&self.inner.leading),
        }
    }
}

impl AppendWatch {
    /// Waits for the next append of this process (forever once no signal is left).
    pub async fn appended(&mut self) {
        if self.receiver.changed().await.is_err() {
            std::future::pending::<()>().await;
        }
    }

    /// Whether a notification on [`EVENTS_CHANNEL`] with this payload came from this
    /// process (already seen through [`AppendWatch::appended`]).
    pub fn is_own(&self, payload: &str) -> bool {
        payload == self.origin
    }

    /// Marks a relay of this process active until the answer is dropped: meanwhile this
    /// process's appends are not announced to other processes, whose relays stand by (one
    /// relay per stream is active; a database normally feeds one stream). A relay that
    /// takes over later starts from its checkpoint, so it misses nothing; should it take
    /// over before this process has noticed its own relay's end, it finds the appends of
    /// that moment by its poll.
    pub fn leading(&self) -> Leading {
        self.leading.fetch_add(1, Ordering::SeqCst);
        Leading {
            leading: Arc::clone(&self.leading),
        }
    }
}

/// Tells other processes about appends, one notification per burst (at most one per
/// [`COALESCE`]), until every signal of this process is gone.
async fn forward(
    pool: PgPool,
    mut appends: watch::Receiver<i64>,
    origin: String,
    leading: Arc<AtomicUsize>,
) {
    while appends.changed().await.is_ok() {
        tokio::time::sleep(COALESCE).await;
        appends.borrow_and_update();
        if leading.load(Ordering::SeqCst) > 0 {
            continue;
        }
        if let Err(error) = sqlx::query("SELECT pg_notify($1, $2)")
            .bind(EVENTS_CHANNEL)
            .bind(&origin)
            .execute(&pool)
            .await
        {
            // Relays elsewhere fall back to polling; nothing is lost.
            tracing::debug!(%error, "appends not announced to other processes");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lazy_pool() -> PgPool {
        sqlx::postgres::PgPoolOptions::new()
            .connect_lazy("postgres://nobody@127.0.0.1:1/none")
            .unwrap_or_else(|error| panic!("a lazy pool: {error}"))
    }

    #[tokio::test]
    async fn a_watch_wakes_once_per_burst_and_knows_its_own_echo() {
        let signal = AppendSignal::new(lazy_pool());
        let mut watch = signal.watch();
        signal.appended(3);
        signal.appended(7);
        signal.appended(5);
        tokio::time::timeout(Duration::from_secs(1), watch.appended())
            .await
            .unwrap_or_else(|_| panic!("the first append wakes the watch"));
        assert_eq!(*watch.receiver.borrow(), 7, "the highest position is kept");
        let again = tokio::time::timeout(Duration::from_millis(50), watch.appended()).await;
        assert!(again.is_err(), "a burst wakes the watch once");
        assert!(watch.is_own(&signal.inner.origin));
        let leading = watch.leading();
        assert_eq!(signal.inner.leading.load(Ordering::SeqCst), 1);
        drop(leading);
        assert_eq!(signal.inner.leading.load(Ordering::SeqCst), 0);
        assert!(!watch.is_own(""));
        assert!(!watch.is_own(&AppendSignal::new(lazy_pool()).inner.origin));
    }
}
