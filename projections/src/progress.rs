//! Read-your-writes: how far each projection has applied, and waiting for a position.
//!
//! Every committed projection batch notifies `hindsight_projections` with
//! `name:position`. One listener per process turns those notifications into watch
//! channels, so a query that must wait for `min_position` sleeps until the projection
//! reports progress (or the bound passes) instead of polling the database. Whenever the
//! listener's connection was lost, positions are re-read once from the checkpoints.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sqlx::postgres::PgListener;
use sqlx::PgPool;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::worker::PROGRESS_CHANNEL;

/// Whether a wait reached its position.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Waited {
    /// The projection has applied the requested position; carries its current position.
    Reached(i64),
    /// The bound passed first; carries the position the projection had applied.
    Lagging(i64),
}

/// Shared, cheap to clone.
#[derive(Debug, Clone)]
pub struct ProjectionProgress {
    pool: PgPool,
    channels: Arc<Mutex<HashMap<String, watch::Sender<i64>>>>,
}

impl ProjectionProgress {
    /// Starts listening for progress; the listener stops with `shutdown`.
    pub async fn start(pool: PgPool, shutdown: CancellationToken) -> Result<Self, sqlx::Error> {
        let mut listener = PgListener::connect_with(&pool).await?;
        listener.listen(PROGRESS_CHANNEL).await?;
        let progress = Self {
            pool,
            channels: Arc::new(Mutex::new(HashMap::new())),
        };
        let listening = progress.clone();
        tokio::spawn(async move {
            loop {
                let next = tokio::select! {
                    () = shutdown.cancelled() => return,
                    next = listener.try_recv() => next,
                };
                match next {
                    Ok(Some(notification)) => listening.record(notification.payload()),
                    // The connection was lost and is re-established on the next call:
                    // notifications may have been missed, so re-read what we track.
                    Ok(None) => listening.refresh_all().await,
                    Err(error) => {
                        tracing::warn!(%error, "projection progress listener failed; retrying");
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                }
            }
        });
        Ok(progress)
    }

    /// Records a `name:position` notification.
    fn record(&self, payload: &str) {
        let Some((name, position)) = payload.rsplit_once(':') else {
            return;
        };
        if let Ok(position) = position.parse::<i64>() {
            self.set(name, position);
        }
    }

    fn set(&self, name: &str, position: i64) {
        if let Some(sender) = self.sender_if_tracked(name) {
            sender.send_if_modified(|current| {
                let newer = position != *current;
                *current = position;
                newer
            });
        }
    }

    fn sender_if_tracked(&self, name: &str) -> Option<watch::Sender<i64>> {
        self.channels
            .lock()
            .ok()
            .and_then(|channels| channels.get(name).cloned())
    }

    async fn refresh_all(&self) {
        let names: Vec<String> = match self.channels.lock() {
            Ok(channels) => channels.keys().cloned().collect(),
            Err(_) => return,
        };
        for name in names {
            if let Ok(position) = stored_position(&self.pool, &name).await {
                self.set(&name, position);
            }
        }
    }

    async fn sender(&self, name: &str) -> Result<watch::Sender<i64>, sqlx::Error> {
        if let Some(sender) = self.sender_if_tracked(name) {
            return Ok(sender);
        }
        let position = stored_position(&self.pool, name).await?;
        let mut channels = self
            .channels
            .lock()
            .map_err(|_| sqlx::Error::Protocol("progress registry poisoned".into()))?;
        Ok(channels
            .entry(name.to_owned())
            .or_insert_with(|| watch::channel(position).0)
            .clone())
    }

    /// A receiver that changes whenever projection `name` reports progress.
    pub async fn subscribe(&self, name: &str) -> Result<watch::Receiver<i64>, sqlx::Error> {
        Ok(self.sender(name).await?.subscribe())
    }

    /// The position projection `name` has applied.
    pub async fn position(&self, name: &str) -> Result<i64, sqlx::Error> {
        Ok(*self.sender(name).await?.borrow())
    }

    /// Waits until projection `name` has applied `min_position`, at most `bound`.
    pub async fn wait_for(
        &self,
        name: &str,
        min_position: i64,
        bound: Duration,
    ) -> Result<Waited, sqlx::Error> {
        let sender = self.sender(name).await?;
        let mut receiver = sender.subscribe();
        // Copy the position out at once: the watch guard must not live across an await.
        let reached = tokio::time::timeout(
            bound,
            receiver.wait_for(|position| *position >= min_position),
        )
        .await
        .ok()
        .and_then(|result| result.ok().map(|position| *position));
        if let Some(position) = reached {
            return Ok(Waited::Reached(position));
        }
        // A notification may have been missed; the stored checkpoint decides.
        let position = stored_position(&self.pool, name).await?;
        self.set(name, position);
        Ok(if position >= min_position {
            Waited::Reached(position)
        } else {
            Waited::Lagging(position)
        })
    }
}

async fn stored_position(pool: &PgPool, name: &str) -> Result<i64, sqlx::Error> {
    let position: Option<i64> =
        sqlx::query_scalar("SELECT position FROM projection_checkpoints WHERE name = $1")
            .bind(name)
            .fetch_optional(pool)
            .await?;
    Ok(position.unwrap_or(0))
}
