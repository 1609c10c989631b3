//! A pool of connections for statements that run on their own: a read model's point read
//! or listing, an event append. Each is one autocommitted statement, and its connection can
//! go straight back to the pool once the statement has run to its end.
//!
//! sqlx's pool cannot tell a connection whose statement ran to its end from one whose
//! holder was cancelled half-way, so it checks every returned connection with a round trip
//! to Postgres, from a task spawned for it: for a one-statement request that is a second
//! round trip, a second wake-up of the Postgres backend and two more thread wake-ups in
//! the server. Here the holder says how its statement ended ([`Lent::give_back`]): a
//! connection whose statement finished, with rows or a database error, goes back at once
//! and unchecked; one given back after a broken connection, or dropped while its statement
//! may still be running (a cancelled request), is closed instead, so nothing half-done is
//! ever lent again. A connection that sat idle for longer than [`CHECK_AFTER_IDLE`] is
//! checked before it is lent, as in [`db::pool`](crate::db::pool).
//!
//! Begin no transaction on a lent connection; transactions stay on sqlx's pool. A
//! transaction dropped without a commit leaves its `ROLLBACK` queued on the connection, and
//! only a check would send it before the connection sits idle holding the transaction's
//! locks.

use std::ops::{Deref, DerefMut};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use sqlx::postgres::PgConnectOptions;
use sqlx::{ConnectOptions, Connection, PgConnection, PgPool};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::db::{session_name, CHECK_AFTER_IDLE};

/// How long a caller waits for a connection before [`sqlx::Error::PoolTimedOut`] (as for
/// sqlx's pool in [`db::pool`](crate::db::pool)).
pub const ACQUIRE_TIMEOUT: Duration = Duration::from_secs(5);

/// A connection idle for longer is closed instead of being lent again.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(10 * 60);

/// A connection older than this is closed when it comes back (a Postgres backend's caches
/// only grow; sqlx's pool has the same bound).
pub const MAX_LIFETIME: Duration = Duration::from_secs(30 * 60);

/// How long a closing connection may take to say goodbye before it is simply dropped.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(1);

/// Connections for statements that run on their own; cheap to clone. Connections are
/// opened on demand, at most `max_connections` at a time, and the most recently returned
/// is lent first, so a quiet server keeps few backends busy.
#[derive(Clone)]
pub struct StatementPool {
    shared: Arc<Shared>,
}

struct Shared {
    options: PgConnectOptions,
    permits: Arc<Semaphore>,
    /// Oldest-returned first: the front has been idle longest.
    idle: Mutex<Vec<Idle>>,
    max_connections: u32,
}

struct Idle {
    connection: PgConnection,
    opened: Instant,
    since: Instant,
}

impl std::fmt::Debug for StatementPool {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StatementPool")
            .field("max_connections", &self.shared.max_connections)
            .field("idle", &self.shared.idle().len())
            .finish_non_exhaustive()
    }
}

impl StatementPool {
    /// A pool opening connections with `options`, at most `max_connections` (at least one).
    pub fn new(options: PgConnectOptions, max_connections: u32) -> Self {
        let max_connections = max_connections.max(1);
        Self {
            shared: Arc::new(Shared {
                options,
                permits: Arc::new(Semaphore::new(max_connections as usize)),
                idle: Mutex::new(Vec::new()),
                max_connections,
            }),
        }
    }

    /// A pool for the same database as `pool`, of the same size, its sessions named as
    /// `pool`'s followed by `statements` (see [`session_name`]).
    pub fn beside(pool: &PgPool) -> Self {
        let options = pool.connect_options();
        let name = session_name(&options, "statements");
        Self::new(
            (*options).clone().application_name(&name),
            pool.options().get_max_connections(),
        )
    }

    /// Lends a connection: an idle one if there is one, else a new one. Waits at most
    /// [`ACQUIRE_TIMEOUT`] for a free place. Cancelling the wait leaks nothing.
    pub async fn acquire(&self) -> Result<Lent, sqlx::Error> {
        tokio::time::timeout(ACQUIRE_TIMEOUT, self.acquire_unbounded())
            .await
            .unwrap_or(Err(sqlx::Error::PoolTimedOut))
    }

    async fn acquire_unbounded(&self) -> Result<Lent, sqlx::Error> {
        let permit = Arc::clone(&self.shared.permits)
            .acquire_owned()
            .await
            .map_err(|_| sqlx::Error::PoolClosed)?;
        while let Some(mut idle) = self.shared.take_idle() {
            // One a restart of the database may have cut while nobody used it.
            if idle.since.elapsed() > CHECK_AFTER_IDLE && idle.connection.ping().await.is_err() {
                continue;
            }
            return Ok(self.lend(idle.connection, idle.opened, permit));
        }
        let connection = self.shared.options.connect().await?;
        Ok(self.lend(connection, Instant::now(), permit))
    }

    fn lend(
        &self,
        connection: PgConnection,
        opened: Instant,
        permit: OwnedSemaphorePermit,
    ) -> Lent {
        Lent {
            connection: Some(connection),
            opened,
            permit: Some(permit),
            shared: Arc::clone(&self.shared),
        }
    }

    /// Connections open and idle now.
    pub fn idle(&self) -> usize {
        self.shared.idle().len()
    }

    /// Connections lent out now (those being closed included, until they are gone).
    pub fn lent(&self) -> usize {
        (self.shared.max_connections as usize)
            .saturating_sub(self.shared.permits.available_permits())
    }

    /// Refuses new loans and closes the idle connections; connections lent out are closed
    /// as they come back.
    pub async fn close(&self) {
        self.shared.permits.close();
        let idle = std::mem::take(&mut *self.shared.idle());
        for idle in idle {
            close(idle.connection).await;
        }
    }
}

impl Shared {
    /// The idle list, locked. Every change to it is a single push, pop or drain, so a
    /// poisoned lock is taken over.
    fn idle(&self) -> MutexGuard<'_, Vec<Idle>> {
        self.idle
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// The connection returned last, after closing those idle for too long.
    fn take_idle(&self) -> Option<Idle> {
        let mut idle = self.idle();
        let stale = idle
            .iter()
            .take_while(|connection| connection.since.elapsed() > IDLE_TIMEOUT)
            .count();
        for stale in idle.drain(..stale) {
            close_later(stale.connection);
        }
        idle.pop()
    }
}

/// A connection lent by a [`StatementPool`]; derefs to the connection, so `&mut *lent` is
/// an executor. Hand it back with [`give_back`](Self::give_back); dropped without that, the
/// connection is closed.
pub struct Lent {
    connection: Option<PgConnection>,
    opened: Instant,
    /// Held until the connection is idle again or closed.
    permit: Option<OwnedSemaphorePermit>,
    shared: Arc<Shared>,
}

impl std::fmt::Debug for Lent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Lent")
            .field("opened", &self.opened)
            .finish_non_exhaustive()
    }
}

impl Lent {
    /// Hands the connection back after its statements, given how the last one ended, and
    /// passes that outcome on. A statement that ran to its end, with rows or with an error
    /// of the database's or of decoding, leaves the connection ready for the next (sqlx
    /// reads whatever is still in flight before it sends anything): it goes back
    /// unchecked. After any other error (the connection broke, the protocol went astray)
    /// the connection is closed.
    pub fn give_back<T, E: StatementError>(mut self, outcome: Result<T, E>) -> Result<T, E> {
        let ready = outcome
            .as_ref()
            .err()
            .is_none_or(StatementError::leaves_connection_ready);
        if let Some(connection) = self.connection.take() {
            if !ready || self.opened.elapsed() > MAX_LIFETIME || self.shared.permits.is_closed() {
                close_later(connection);
            } else {
                self.shared.idle().push(Idle {
                    connection,
                    opened: self.opened,
                    since: Instant::now(),
                });
            }
        }
        outcome
    }
}

/// An error a statement on a [`Lent`] connection can end with.
pub trait StatementError {
    /// Whether the statement still read its answer to the end, so the connection is ready
    /// for the next one.
    fn leaves_connection_ready(&self) -> bool;
}

impl StatementError for sqlx::Error {
    fn leaves_connection_ready(&self) -> bool {
        matches!(
            self,
            sqlx::Error::Database(_)
                | sqlx::Error::RowNotFound
                | sqlx::Error::ColumnNotFound(_)
                | sqlx::Error::ColumnIndexOutOfBounds { .. }
                | sqlx::Error::ColumnDecode { .. }
                | sqlx::Error::Decode(_)
                | sqlx::Error::TypeNotFound { .. }
        )
    }
}

/// Rows that were read to the end and then failed to decode as events leave the connection
/// ready; a database error says for itself.
impl StatementError for crate::event::EventDecodeError {
    fn leaves_connection_ready(&self) -> bool {
        match self {
            Self::Database(error) => error.leaves_connection_ready(),
            Self::Metadata { .. } | Self::Payload { .. } | Self::Upcast { .. } => true,
        }
    }
}

impl Deref for Lent {
    type Target = PgConnection;

    fn deref(&self) -> &PgConnection {
        // Present from `lend` until `give_back` or drop, which both consume the loan.
        self.connection.as_ref().unwrap_or_else(|| unreachable!())
    }
}

impl DerefMut for Lent {
    fn deref_mut(&mut self) -> &mut PgConnection {
        self.connection.as_mut().unwrap_or_else(|| unreachable!())
    }
}

impl Drop for Lent {
    fn drop(&mut self) {
        // Not given back: its statement may be half-way (the holder was cancelled), so the
        // connection is closed. Its place frees once it is gone.
        if let Some(connection) = self.connection.take() {
            let permit = self.permit.take();
            spawn_or_drop(async move {
                close(connection).await;
                drop(permit);
            });
        }
    }
}

/// Says goodbye to Postgres (so it logs no broken connection), for at most a second.
async fn close(connection: PgConnection) {
    let _ = tokio::time::timeout(CLOSE_TIMEOUT, connection.close()).await;
}

fn close_later(connection: PgConnection) {
    spawn_or_drop(close(connection));
}

/// Runs `work` on the current runtime; without one (a loan dropped while the runtime shuts
/// down) the work is dropped, which closes the socket all the same.
fn spawn_or_drop(work: impl std::future::Future<Output = ()> + Send + 'static) {
    if let Ok(runtime) = tokio::runtime::Handle::try_current() {
        runtime.spawn(work);
    }
}
