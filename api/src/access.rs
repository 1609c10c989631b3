//! The access state of the users who call, kept in memory.
//!
//! Every authenticated request needs its caller's row of `user_access` (role, active, token
//! version). [`AccessCache`] keeps the rows it has read, so a caller's requests after the
//! first cost no query, and drops a row as soon as that user's access may have changed:
//!
//! - **in this process**, the handler that changed a user's access forgets the user after
//!   its events committed and before it answers ([`AccessCache::forget`]): no request that
//!   starts after the change was acknowledged sees the old row;
//! - **in other processes** (more API instances), the database announces every change on
//!   [`ACCESS_CHANNEL`] when it commits (`migrations/0013_access_notifications.sql`), and a
//!   listener forgets the user on arrival, typically well under a millisecond later;
//! - **while that listener is not connected**, nothing is served from memory: the cache is
//!   emptied when the connection is lost and used again only once `LISTEN` is back, since
//!   announcements sent in between are gone;
//! - a row read before a change committed is never stored after the change was announced:
//!   every forget moves an epoch, and a read stores its row only if the epoch did not move
//!   while it was querying.
//!
//! Rows also expire after the configured time, which bounds how long one could outlive a
//! change whose announcement was lost without the connection being seen to drop. A time of
//! zero switches the cache off: every request then reads the table.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use sqlx::postgres::PgListener;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use crate::auth::{access_of, Access};
use crate::error::ApiError;

/// The channel on which the database announces access changes, payload the user's id.
pub const ACCESS_CHANNEL: &str = "hindsight_access";

/// Rows kept at most; when full, expired rows go first, then all of them.
const CAPACITY: usize = 100_000;

/// How long the listener waits before connecting again after losing its connection (the
/// table answers every request meanwhile).
pub const RECONNECT_AFTER: Duration = Duration::from_secs(1);

/// Shared, cheap to clone.
#[derive(Debug, Clone)]
pub struct AccessCache {
    inner: Arc<Shared>,
}

#[derive(Debug)]
struct Shared {
    pool: PgPool,
    ttl: Duration,
    state: Mutex<State>,
}

#[derive(Debug, Default)]
struct State {
    rows: HashMap<Uuid, (Access, Instant)>,
    /// Moves on every forget: a read that saw it move must not store what it read.
    epoch: u64,
    /// Whether the listener is connected and listening; rows are served only then.
    listening: bool,
}

impl State {
    fn forget_all(&mut self) {
        self.epoch = self.epoch.wrapping_add(1);
        self.rows.clear();
    }
}

/// A read of `user_access` in progress: the epoch it started in.
#[derive(Debug, Clone, Copy)]
struct Fill {
    epoch: u64,
}

impl AccessCache {
    /// Connects the listener and starts it; it stops with `shutdown`. With a `ttl` of zero
    /// the cache is off and nothing listens.
    pub async fn start(
        pool: PgPool,
        ttl: Duration,
        shutdown: CancellationToken,
    ) -> Result<Self, sqlx::Error> {
        let cache = Self::new(pool, ttl);
        if ttl.is_zero() {
            return Ok(cache);
        }
        let listener = cache.connect().await?;
        cache.set_listening(true);
        tokio::spawn(cache.clone().listen(listener, shutdown));
        Ok(cache)
    }

    /// A cache that keeps nothing: every lookup reads the table.
    pub fn off(pool: PgPool) -> Self {
        Self::new(pool, Duration::ZERO)
    }

    /// Not listening yet, so it serves nothing until [`Self::set_listening`].
    fn new(pool: PgPool, ttl: Duration) -> Self {
        Self {
            inner: Arc::new(Shared {
                pool,
                ttl,
                state: Mutex::default(),
            }),
        }
    }

    /// `user`'s access now: from memory if it holds a current row, else from the table.
    pub async fn get(&self, user: Uuid) -> Result<Option<Access>, ApiError> {
        let fill = match self.cached(user) {
            Ok(access) => {
                metrics::counter!("hindsight_access_checks_total", "source" => "memory")
                    .increment(1);
                return Ok(Some(access));
            }
            Err(fill) => fill,
        };
        metrics::counter!("hindsight_access_checks_total", "source" => "database").increment(1);
        let access = access_of(&self.inner.pool, user).await?;
        if let (Some(fill), Some(access)) = (fill, access) {
            self.store(fill, user, access);
        }
        Ok(access)
    }

    /// Drops `user`'s row, and keeps any read already under way from storing one.
    pub fn forget(&self, user: Uuid) {
        if let Some(mut state) = self.lock() {
            state.epoch = state.epoch.wrapping_add(1);
            state.rows.remove(&user);
        }
    }

    /// Drops every row, and keeps any read already under way from storing one.
    fn forget_all(&self) {
        if let Some(mut state) = self.lock() {
            state.forget_all();
        }
    }

    /// A current row for `user`, or, if there is none, whether a read may store one.
    fn cached(&self, user: Uuid) -> Result<Access, Option<Fill>> {
        let Some(state) = self.lock() else {
            return Err(None);
        };
        // A cache that is off never listens.
        if !state.listening {
            return Err(None);
        }
        match state.rows.get(&user) {
            Some((access, read_at)) if read_at.elapsed() < self.inner.ttl => Ok(*access),
            _ => Err(Some(Fill { epoch: state.epoch })),
        }
    }

    /// Stores what a read found, unless something was forgotten since it started.
    fn store(&self, fill: Fill, user: Uuid, access: Access) {
        let Some(mut state) = self.lock() else {
            return;
        };
        if !state.listening || state.epoch != fill.epoch {
            return;
        }
        if state.rows.len() >= CAPACITY {
            let ttl = self.inner.ttl;
            state.rows.retain(|_, (_, read_at)| read_at.elapsed() < ttl);
            if state.rows.len() >= CAPACITY {
                state.rows.clear();
            }
        }
        state.rows.insert(user, (access, Instant::now()));
    }

    /// Empties the cache and says whether rows may be served from it.
    fn set_listening(&self, listening: bool) {
        if let Some(mut state) = self.lock() {
            state.forget_all();
            state.listening = listening;
        }
    }

    /// The state, or `None` if a thread panicked holding it; the cache is then bypassed.
    fn lock(&self) -> Option<MutexGuard<'_, State>> {
        self.inner.state.lock().ok()
    }

    async fn connect(&self) -> Result<PgListener, sqlx::Error> {
        let mut listener = PgListener::connect_with(&self.inner.pool).await?;
        listener.listen(ACCESS_CHANNEL).await?;
        Ok(listener)
    }

    async fn listen(self, mut listener: PgListener, shutdown: CancellationToken) {
        loop {
            let lost = loop {
                let next = tokio::select! {
                    () = shutdown.cancelled() => return,
                    next = listener.try_recv() => next,
                };
                match next {
                    Ok(Some(notification)) => match notification.payload().parse::<Uuid>() {
                        Ok(user) => self.forget(user),
                        // Not ours to read: whatever changed, forget everyone.
                        Err(_) => self.forget_all(),
                    },
                    Ok(None) => break String::from("connection lost"),
                    Err(error) => break error.to_string(),
                }
            };
            self.set_listening(false);
            drop(listener);
            tracing::warn!(
                error = %lost,
                "access listener lost; every request reads user_access until it is back"
            );
            listener = loop {
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(RECONNECT_AFTER) => {}
                }
                match self.connect().await {
                    Ok(listener) => break listener,
                    Err(error) => tracing::debug!(%error, "access listener cannot connect yet"),
                }
            };
            self.set_listening(true);
            tracing::info!("access listener back; caching user_access again");
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use hindsight_domain::role::Role;
    use sqlx::postgres::PgPoolOptions;

    use super::*;

    const ACCESS: Access = Access {
        role: Role::Customer,
        active: true,
        token_version: 1,
    };

    fn lazy_pool() -> PgPool {
        PgPoolOptions::new()
            .connect_lazy("postgres://nobody@127.0.0.1:1/none")
            .unwrap()
    }

    /// A cache whose listener is taken to be connected; no database is ever reached.
    fn listening(ttl: Duration) -> AccessCache {
        let cache = AccessCache::new(lazy_pool(), ttl);
        cache.set_listening(true);
        cache
    }

    /// What a lookup of `user` that found nothing in memory does once it has read a row.
    fn read_from_table(cache: &AccessCache, user: Uuid) {
        let fill = cache.cached(user).unwrap_err().unwrap();
        cache.store(fill, user, ACCESS);
    }

    #[tokio::test]
    async fn a_read_stores_its_row_and_the_next_lookup_is_served_from_memory() {
        let cache = listening(Duration::from_secs(60));
        let user = Uuid::new_v4();
        read_from_table(&cache, user);
        assert_eq!(cache.cached(user).unwrap().token_version, 1);
    }

    #[tokio::test]
    async fn a_read_that_overlapped_a_forget_stores_nothing() {
        let cache = listening(Duration::from_secs(60));
        let user = Uuid::new_v4();
        let fill = cache.cached(user).unwrap_err().unwrap();
        // The change commits and is announced while the read is under way.
        cache.forget(user);
        cache.store(fill, user, ACCESS);
        assert!(cache.cached(user).is_err());
    }

    #[tokio::test]
    async fn a_forget_drops_the_row() {
        let cache = listening(Duration::from_secs(60));
        let user = Uuid::new_v4();
        read_from_table(&cache, user);
        cache.forget(user);
        assert!(cache.cached(user).is_err());
    }

    #[tokio::test]
    async fn nothing_is_served_or_stored_while_the_listener_is_away() {
        let cache = listening(Duration::from_secs(60));
        let user = Uuid::new_v4();
        read_from_table(&cache, user);
        let pending = cache.cached(Uuid::new_v4()).unwrap_err().unwrap();
        cache.set_listening(false);
        assert!(matches!(cache.cached(user), Err(None)));
        cache.store(pending, user, ACCESS);
        cache.set_listening(true);
        // Back, but empty: what was cached before the loss is gone, and the read that
        // started before it stored nothing.
        assert!(matches!(cache.cached(user), Err(Some(_))));
    }

    #[tokio::test]
    async fn rows_expire() {
        let cache = listening(Duration::from_millis(20));
        let user = Uuid::new_v4();
        read_from_table(&cache, user);
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert!(cache.cached(user).is_err());
    }

    #[tokio::test]
    async fn a_cache_that_is_off_never_keeps_a_row() {
        let cache = AccessCache::off(lazy_pool());
        assert!(matches!(cache.cached(Uuid::new_v4()), Err(None)));
    }
}
