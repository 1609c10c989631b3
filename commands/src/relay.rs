//! The relay: publishes every committed event to NATS JetStream, in global position
//! order, without gaps or loss.
//!
//! Positions are drawn from a sequence when a transaction inserts an event, but
//! transactions commit in any order: a reader can see position 11 committed while 10 is
//! still in flight, and a relay that simply advanced past 10 would lose it forever. The
//! store stamps each event with its transaction id, drawn *before* its position (see
//! `migrations/0001_event_store.sql`), so a transaction holding a position below a visible
//! one had its id before the snapshot that sees the visible one was taken. The relay
//! therefore reads events together with the snapshot that saw them and publishes the
//! gap-free prefix. At a gap it draws a transaction id of its own, the *horizon*, newer
//! than every id handed out before that snapshot, and waits until a later snapshot's
//! `xmin` has passed the horizon: every transaction that could hold a missing position
//! has then ended, and what that snapshot still lacks below the gap was rolled back.
//! (A snapshot's in-progress list is not enough: Postgres leaves out of it the running
//! transactions whose ids are newer than the newest completed one, so a transaction that
//! took its id early and its position late can commit above a position held by a
//! transaction the list does not name.) Nothing is skipped on a timer.
//!
//! Messages carry `Nats-Msg-Id` (the event id, for JetStream's duplicate window),
//! `Hindsight-Position`, `Hindsight-Previous-Position` (the position published just
//! before, so consumers can detect a gap exactly) and `Hindsight-Event-Type`. The
//! checkpoint in Postgres only moves past acknowledged publishes, so a relay killed at any
//! point republishes at most what was not yet checkpointed, and JetStream drops the
//! duplicates. Only one relay per stream is active (a session advisory lock); another
//! process takes over within seconds of its death. With NATS down, commands are still
//! accepted and the relay catches up when NATS returns.

use std::time::Duration;

use async_nats::jetstream::{self, stream};
use sqlx::postgres::{PgListener, PgNotification};
use sqlx::{PgConnection, PgPool, Row};
use tokio_util::sync::CancellationToken;

use crate::event::{EventDecodeError, StoredEvent, EVENT_COLUMNS};
use crate::wakeup::AppendWatch;

pub use crate::wakeup::EVENTS_CHANNEL;

pub const HEADER_POSITION: &str = "Hindsight-Position";
pub const HEADER_PREVIOUS_POSITION: &str = "Hindsight-Previous-Position";
pub const HEADER_EVENT_TYPE: &str = "Hindsight-Event-Type";

#[derive(Debug, Clone)]
pub struct RelaySettings {
    /// JetStream stream name.
    pub stream: String,
    /// Subjects are `<subject_prefix>.<aggregate_type>.<aggregate_id>`.
    pub subject_prefix: String,
    /// Events read and published per round.
    pub batch_size: i64,
    /// Poll interval when no wake-up arrives (a process that died between its append and
    /// its announcement).
    pub poll_interval: Duration,
    /// How long the stream keeps messages (`None`: unbounded). Postgres keeps everything.
    pub max_age: Option<Duration>,
}

impl RelaySettings {
    pub fn new(stream: impl Into<String>, subject_prefix: impl Into<String>) -> Self {
        Self {
            stream: stream.into(),
            subject_prefix: subject_prefix.into(),
            batch_size: 1000,
            poll_interval: Duration::from_millis(500),
            max_age: None,
        }
    }

    /// The subject filter covering every event of this stream.
    pub fn all_subjects(&self) -> String {
        format!("{}.>", self.subject_prefix)
    }

    /// The advisory-lock key name that elects the one active relay of this stream.
    fn leader_key(&self) -> String {
        format!("hindsight-relay:{}", self.stream)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("the event store failed: {0}")]
    Store(#[from] sqlx::Error),
    #[error(transparent)]
    Decode(#[from] EventDecodeError),
    #[error("JetStream is unavailable: {0}")]
    JetStream(String),
    #[error("the transaction id `{0}` Postgres gave could not be parsed")]
    TransactionId(String),
}

/// What the relay needs of the snapshot a round read in: its `xmin`, below which every
/// transaction has ended.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Snapshot {
    xmin: u64,
}

/// A transaction id (`xid8`) as Postgres prints it.
fn xid(text: &str) -> Result<u64, RelayError> {
    text.parse()
        .map_err(|_| RelayError::TransactionId(text.to_owned()))
}

/// A gap the relay is waiting on: positions up to `below` that were not visible are
/// settled once a snapshot's `xmin` is past `horizon`, a transaction id drawn after the
/// snapshot that saw the gap.
#[derive(Debug, Clone, PartialEq, Eq)]
struct GapWait {
    horizon: u64,
    below: i64,
}

/// How many of `positions` (ascending, all `> checkpoint`) may be published now, and,
/// when publishing stops at a gap not yet waited on, the last position read: the caller
/// draws a horizon and waits on the gap up to it.
///
/// A gap is settled (permanent) when it lies below an earlier wait whose horizon the
/// snapshot's `xmin` has passed.
fn publishable_prefix(
    checkpoint: i64,
    positions: &[i64],
    snapshot: &Snapshot,
    wait: &mut Option<GapWait>,
) -> (usize, Option<i64>) {
    let settled_below = match wait {
        Some(pending) if snapshot.xmin > pending.horizon => {
            let below = pending.below;
            *wait = None;
            below
        }
        _ => 0,
    };
    let mut expected = checkpoint + 1;
    for (index, &position) in positions.iter().enumerate() {
        if position != expected && position > settled_below {
            // Keep the wait already under way when it covers this gap: starting over with
            // a newer horizon could wait forever under load.
            let covered = wait
                .as_ref()
                .is_some_and(|pending| position <= pending.below);
            return (index, positions.last().copied().filter(|_| !covered));
        }
        expected = position + 1;
    }
    (positions.len(), None)
}

/// Publishes the event store to JetStream. See the module documentation.
#[derive(Debug, Clone)]
pub struct Relay {
    pool: PgPool,
    jetstream: jetstream::Context,
    settings: RelaySettings,
    local: Option<AppendWatch>,
}

/// What one round did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Round {
    /// Published this many events; there may be more.
    Published(usize),
    /// Nothing new, or stopped at a gap that is still in flight.
    Idle { waiting_on_gap: bool },
}

impl Relay {
    pub fn new(pool: PgPool, client: async_nats::Client, settings: RelaySettings) -> Self {
        Self {
            pool,
            jetstream: jetstream::new(client),
            settings,
            local: None,
        }
    }

    /// Wakes on this process's own appends directly rather than through Postgres.
    pub fn with_local_appends(mut self, appends: AppendWatch) -> Self {
        self.local = Some(appends);
        self
    }

    /// Creates the stream if it does not exist yet.
    pub async fn ensure_stream(&self) -> Result<(), RelayError> {
        let config = stream::Config {
            name: self.settings.stream.clone(),
            subjects: vec![self.settings.all_subjects()],
            storage: stream::StorageType::File,
            duplicate_window: Duration::from_secs(120),
            max_age: self.settings.max_age.unwrap_or_default(),
            ..Default::default()
        };
        self.jetstream
            .get_or_create_stream(config)
            .await
            .map_err(|error| RelayError::JetStream(error.to_string()))?;
        Ok(())
    }

    /// The last position published and acknowledged for this stream (0 if none).
    pub async fn checkpoint(&self) -> Result<i64, sqlx::Error> {
        checkpoint(&self.pool, &self.settings.stream).await
    }

    /// Runs until `shutdown`: waits for leadership, then relays; steps down and retries
    /// on failures, so NATS or Postgres being away only delays publishing.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut backoff = Duration::from_millis(200);
        while !shutdown.is_cancelled() {
            match self.lead(&shutdown).await {
                Ok(true) => backoff = Duration::from_millis(200),
                Ok(false) => {}
                Err(error) => {
                    tracing::warn!(stream = %self.settings.stream, %error, "relay interrupted; retrying");
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
            tokio::select! {
                () = shutdown.cancelled() => {}
                () = tokio::time::sleep(backoff) => {}
            }
        }
    }

    /// Becomes the active relay if no one else is, and relays until shutdown or an error.
    /// Returns `Ok(false)` when another process holds leadership.
    async fn lead(&self, shutdown: &CancellationToken) -> Result<bool, RelayError> {
        // The lock lives as long as this dedicated session: if the process dies, the
        // server ends the session and another relay takes over.
        let Some(leader) =
            crate::db::try_session_lock(&self.pool, &self.settings.leader_key()).await?
        else {
            return Ok(false);
        };
        let component = format!("relay {}", self.settings.stream);
        let mut leader = crate::db::name_session(&self.pool, leader, &component).await?;
        tracing::info!(stream = %self.settings.stream, "relay is active");
        let result = self.relay(&mut leader, shutdown).await;
        crate::db::end_session(leader).await;
        result.map(|()| true)
    }

    async fn relay(
        &self,
        leader: &mut PgConnection,
        shutdown: &CancellationToken,
    ) -> Result<(), RelayError> {
        let mut listener = PgListener::connect_with(&self.pool).await?;
        listener.listen(EVENTS_CHANNEL).await?;
        let mut local = self.local.clone();
        // This process's appends need no announcement while its relay is the active one.
        let _leading = local.as_ref().map(AppendWatch::leading);
        self.ensure_stream().await?;
        let mut published = self.checkpoint().await?;
        let mut wait = None;
        loop {
            // Every round reads on the leader's session: a lost session (a lost lock)
            // fails it, and the relay stops before someone else starts.
            let round = self.round(leader, &mut published, &mut wait).await?;
            let pause = match round {
                Round::Published(_) => continue,
                Round::Idle {
                    waiting_on_gap: true,
                } => Duration::from_millis(5),
                Round::Idle {
                    waiting_on_gap: false,
                } => self.settings.poll_interval,
            };
            let deadline = tokio::time::sleep(pause);
            tokio::pin!(deadline);
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => return Ok(()),
                    notification = listener.recv() => {
                        let mut foreign = !is_own(local.as_ref(), &notification?);
                        // Coalesce a burst of commits into one round.
                        while let Some(notification) = listener.next_buffered() {
                            foreign |= !is_own(local.as_ref(), &notification);
                        }
                        // The echo of this process's own appends was seen through `local`.
                        if foreign {
                            break;
                        }
                    }
                    () = local_append(&mut local) => break,
                    () = &mut deadline => break,
                }
            }
        }
    }

    /// Reads what follows the checkpoint, publishes the publishable prefix, and moves
    /// the checkpoint past what JetStream acknowledged. The statements run on the leader's
    /// own session: a pooled connection would cost a check with a round trip each time it
    /// went back to the pool, and a broken session ends the leadership all the same.
    async fn round(
        &self,
        leader: &mut PgConnection,
        published: &mut i64,
        wait: &mut Option<GapWait>,
    ) -> Result<Round, RelayError> {
        let rows = sqlx::query(&format!(
            "SELECT s.xmin, e.* FROM (SELECT pg_snapshot_xmin(pg_current_snapshot())::text AS xmin) s \
             LEFT JOIN LATERAL (SELECT {EVENT_COLUMNS} FROM events WHERE position > $1 \
                                ORDER BY position LIMIT $2) e ON true"
        ))
        .bind(*published)
        .bind(self.settings.batch_size)
        .fetch_all(&mut *leader)
        .await?;
        let Some(first) = rows.first() else {
            return Ok(Round::Idle {
                waiting_on_gap: false,
            });
        };
        let snapshot = Snapshot {
            xmin: xid(&first.try_get::<String, _>("xmin")?)?,
        };
        let events = rows
            .iter()
            .filter(|row| matches!(row.try_get::<Option<i64>, _>("position"), Ok(Some(_))))
            .map(StoredEvent::from_row)
            .collect::<Result<Vec<_>, _>>()?;
        let positions: Vec<i64> = events.iter().map(|event| event.position).collect();
        let (publishable, wait_below) = publishable_prefix(*published, &positions, &snapshot, wait);
        if let Some(below) = wait_below {
            // Drawn after the snapshot, so newer than any id a transaction holding a
            // missing position can have.
            let horizon: String = sqlx::query_scalar("SELECT pg_current_xact_id()::text")
                .fetch_one(&mut *leader)
                .await?;
            *wait = Some(GapWait {
                horizon: xid(&horizon)?,
                below,
            });
        }
        if publishable == 0 {
            return Ok(Round::Idle {
                waiting_on_gap: wait.is_some(),
            });
        }
        let acknowledged = self.publish(*published, &events[..publishable]).await;
        if let Some(position) = acknowledged.last_acknowledged {
            save_checkpoint(&mut *leader, &self.settings.stream, position).await?;
            *published = position;
        }
        match acknowledged.error {
            Some(error) => Err(error),
            None => Ok(Round::Published(publishable)),
        }
    }

    /// Publishes `events` pipelined and returns the last position of the acknowledged
    /// prefix (a failed acknowledgement stops the prefix even if later ones succeeded).
    async fn publish(&self, mut previous: i64, events: &[StoredEvent]) -> Published {
        let mut pending = Vec::with_capacity(events.len());
        let mut error = None;
        for event in events {
            match self.send(event, previous).await {
                Ok(ack) => pending.push((event.position, ack)),
                Err(failure) => {
                    error = Some(failure);
                    break;
                }
            }
            previous = event.position;
        }
        let mut last_acknowledged = None;
        for (position, ack) in pending {
            match ack.await {
                Ok(_) => last_acknowledged = Some(position),
                Err(failure) => {
                    error = Some(RelayError::JetStream(failure.to_string()));
                    break;
                }
            }
        }
        Published {
            last_acknowledged,
            error,
        }
    }

    async fn send(
        &self,
        event: &StoredEvent,
        previous: i64,
    ) -> Result<jetstream::context::PublishAckFuture, RelayError> {
        let subject = format!(
            "{}.{}.{}",
            self.settings.subject_prefix, event.aggregate_type, event.aggregate_id
        );
        let body = serde_json::to_vec(event)
            .map_err(|error| RelayError::JetStream(format!("encoding an event: {error}")))?;
        let message = jetstream::message::PublishMessage::build()
            .payload(body.into())
            .message_id(event.event_id.to_string())
            .header(HEADER_POSITION, event.position.to_string().as_str())
            .header(HEADER_PREVIOUS_POSITION, previous.to_string().as_str())
            .header(HEADER_EVENT_TYPE, event.event_type.as_str());
        self.jetstream
            .send_publish(subject, message)
            .await
            .map_err(|error| RelayError::JetStream(error.to_string()))
    }
}

struct Published {
    last_acknowledged: Option<i64>,
    error: Option<RelayError>,
}

/// Whether `notification` announces appends of this process.
fn is_own(local: Option<&AppendWatch>, notification: &PgNotification) -> bool {
    local.is_some_and(|local| local.is_own(notification.payload()))
}

/// The next append of this process; never, without a local watch.
async fn local_append(local: &mut Option<AppendWatch>) {
    match local {
        Some(local) => local.appended().await,
        None => std::future::pending().await,
    }
}

/// The relay checkpoint of `stream` (0 if it never published).
pub async fn checkpoint(pool: &PgPool, stream: &str) -> Result<i64, sqlx::Error> {
    let position: Option<i64> =
        sqlx::query_scalar("SELECT position FROM relay_checkpoints WHERE stream = $1")
            .bind(stream)
            .fetch_optional(pool)
            .await?;
    Ok(position.unwrap_or(0))
}

async fn save_checkpoint(
    connection: &mut PgConnection,
    stream: &str,
    position: i64,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "INSERT INTO relay_checkpoints (stream, position) VALUES ($1, $2) \
         ON CONFLICT (stream) DO UPDATE \
         SET position = GREATEST(relay_checkpoints.position, EXCLUDED.position), updated_at = now()",
    )
    .bind(stream)
    .bind(position)
    .execute(connection)
    .await?;
    Ok(())
}

/// The highest position in the event store (0 when empty).
pub async fn head(pool: &PgPool) -> Result<i64, sqlx::Error> {
    let head: Option<i64> = sqlx::query_scalar("SELECT max(position) FROM events")
        .fetch_one(pool)
        .await?;
    Ok(head.unwrap_or(0))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn snapshot(xmin: u64) -> Snapshot {
        Snapshot { xmin }
    }

    #[test]
    fn transaction_ids_parse() {
        assert_eq!(xid("10").unwrap(), 10);
        assert!(xid("garbage").is_err());
        assert!(xid("-1").is_err());
    }

    #[test]
    fn a_contiguous_run_is_published_whole() {
        let mut wait = None;
        assert_eq!(
            publishable_prefix(3, &[4, 5, 6], &snapshot(99), &mut wait),
            (3, None)
        );
        assert_eq!(wait, None);
    }

    #[test]
    fn a_gap_is_waited_on_even_when_the_snapshot_names_no_transaction() {
        // Nothing in the in-progress list proves nothing: a running transaction newer
        // than the newest completed one is not listed.
        let mut wait = None;
        assert_eq!(
            publishable_prefix(0, &[1, 3, 4], &snapshot(10), &mut wait),
            (1, Some(4))
        );
        wait = Some(GapWait {
            horizon: 12,
            below: 4,
        });
        // Transactions up to the horizon may still run: still waiting, no new horizon.
        assert_eq!(
            publishable_prefix(1, &[3, 4], &snapshot(12), &mut wait),
            (0, None)
        );
        assert!(wait.is_some());
        // Every transaction up to the horizon has ended without filling the gap (rolled
        // back): the gap below 4 is settled, whatever runs now.
        assert_eq!(
            publishable_prefix(1, &[3, 4], &snapshot(13), &mut wait),
            (2, None)
        );
        assert_eq!(wait, None);
    }

    #[test]
    fn a_late_commit_fills_its_gap_in_order() {
        let mut wait = None;
        assert_eq!(
            publishable_prefix(0, &[2, 3], &snapshot(5), &mut wait),
            (0, Some(3))
        );
        wait = Some(GapWait {
            horizon: 8,
            below: 3,
        });
        // The transaction holding position 1 committed: everything is contiguous.
        assert_eq!(
            publishable_prefix(0, &[1, 2, 3], &snapshot(6), &mut wait),
            (3, None)
        );
    }

    #[test]
    fn a_new_gap_above_a_settled_one_is_waited_on_afresh() {
        let mut wait = Some(GapWait {
            horizon: 8,
            below: 3,
        });
        // 2 was rolled back; 5 is missing above what the old wait covered.
        assert_eq!(
            publishable_prefix(1, &[3, 4, 6], &snapshot(9), &mut wait),
            (2, Some(6))
        );
        assert_eq!(wait, None);
    }
}
