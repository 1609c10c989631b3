//! The stored history as auditors read it: the global feed of committed events with
//! filters, one aggregate's stream, an aggregate's state folded from its own events as of
//! a version or a time, and a streaming export whose memory stays flat however long the
//! history is.
//!
//! These queries read committed events straight from the event store, in global position
//! order, rather than waiting for the relay's checkpoint: every event they return is
//! committed and will never change. A transaction still in flight may yet commit an event
//! below a position already returned (positions are drawn before commit, see
//! [`crate::relay`]); a client paging with `after` can therefore miss an event that
//! commits during its walk, at most one whose transaction was open at that instant.
//!
//! Nothing here hides secrets: [`redact_secrets`] is what callers showing history to
//! people apply to payloads and states.

use chrono::{DateTime, Utc};
use futures::stream::{self, BoxStream};
use futures::{StreamExt, TryStreamExt};
use hindsight_domain::order::Order;
use hindsight_domain::product::Product;
use hindsight_domain::user::User;
use hindsight_domain::Aggregate;
use sqlx::{PgExecutor, PgPool, Postgres, QueryBuilder};
use uuid::Uuid;

use crate::event::{EventDecodeError, StoredEvent, EVENT_COLUMNS};

/// The aggregate types the store holds, as spelled in the API.
pub const AGGREGATE_TYPES: [&str; 3] = [User::TYPE, Product::TYPE, Order::TYPE];

/// Events in one feed page when the caller does not say.
pub const DEFAULT_FEED_LIMIT: u32 = 100;
/// The most events one feed page may hold.
pub const MAX_FEED_LIMIT: u32 = 1000;

/// Events fetched per round trip by [`stream_events`]: what bounds its memory.
const STREAM_BATCH: u16 = 500;

/// What replaces a secret in history shown to people.
pub const REDACTED: &str = "[REDACTED]";

/// Payload and state fields that hold secrets, at any depth.
const SECRET_FIELDS: [&str; 1] = ["password_hash"];

/// Which events a feed or export holds; `None` matches any. `from` and `to` bound the
/// time the event was recorded, both inclusive; `after` is an exclusive lower bound on
/// the global position (0 reads from the start).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HistoryFilter {
    pub after: i64,
    /// One of [`AGGREGATE_TYPES`] (any other matches nothing).
    pub aggregate_type: Option<String>,
    pub aggregate_id: Option<Uuid>,
    /// The acting user (`metadata.actor_id`).
    pub actor_id: Option<Uuid>,
    /// The client request that started the chain (`metadata.correlation_id`).
    pub correlation_id: Option<String>,
    pub from: Option<DateTime<Utc>>,
    pub to: Option<DateTime<Utc>>,
}

impl HistoryFilter {
    /// `SELECT ... WHERE <filter> AND position > after AND position <= up_to`, ordered by
    /// position, at most `limit` rows.
    fn query(&self, after: i64, up_to: Option<i64>, limit: i64) -> QueryBuilder<'_, Postgres> {
        let mut query = QueryBuilder::new(format!(
            "SELECT {EVENT_COLUMNS} FROM events WHERE position > "
        ));
        query.push_bind(after);
        if let Some(up_to) = up_to {
            query.push(" AND position <= ").push_bind(up_to);
        }
        if let Some(aggregate_type) = &self.aggregate_type {
            query
                .push(" AND aggregate_type = ")
                .push_bind(aggregate_type);
        }
        if let Some(aggregate_id) = self.aggregate_id {
            // In the "C" collation, the one `events_aggregate_id_idx` answers (migration
            // 0014): without a type, the primary key cannot serve this filter.
            query
                .push(" AND aggregate_id COLLATE \"C\" = ")
                .push_bind(aggregate_id.to_string());
        }
        if let Some(actor_id) = self.actor_id {
            query
                .push(" AND metadata->>'actor_id' = ")
                .push_bind(actor_id.to_string());
        }
        if let Some(correlation_id) = &self.correlation_id {
            query
                .push(" AND metadata->>'correlation_id' = ")
                .push_bind(correlation_id);
        }
        if let Some(from) = self.from {
            query.push(" AND recorded_at >= ").push_bind(from);
        }
        if let Some(to) = self.to {
            query.push(" AND recorded_at <= ").push_bind(to);
        }
        query.push(" ORDER BY position LIMIT ").push_bind(limit);
        query
    }
}

/// At most `limit` events matching `filter`, in global position order.
pub async fn feed<'e>(
    executor: impl PgExecutor<'e>,
    filter: &HistoryFilter,
    limit: u32,
) -> Result<Vec<StoredEvent>, EventDecodeError> {
    let rows = filter
        .query(filter.after, None, i64::from(limit))
        .build()
        .fetch_all(executor)
        .await?;
    rows.iter().map(StoredEvent::from_row).collect()
}

/// Every event matching `filter` up to the head of the store when the stream is first
/// polled, in global position order.
///
/// The events are fetched in keyset batches of a few hundred, each on a pooled
/// connection held only for that batch, so memory and connections stay flat however long
/// the history is and however slowly the consumer reads. An error ends the stream.
pub fn stream_events(
    pool: &PgPool,
    filter: &HistoryFilter,
) -> BoxStream<'static, Result<StoredEvent, EventDecodeError>> {
    struct Walk {
        pool: PgPool,
        filter: HistoryFilter,
        after: i64,
        /// The head when the walk began: an export is a bounded range, not a tail.
        up_to: Option<i64>,
        done: bool,
    }

    let walk = Walk {
        pool: pool.clone(),
        after: filter.after,
        filter: filter.clone(),
        up_to: None,
        done: false,
    };
    stream::try_unfold(walk, |mut walk| async move {
        if walk.done {
            return Ok::<_, EventDecodeError>(None);
        }
        let up_to = match walk.up_to {
            Some(up_to) => up_to,
            None => {
                let head = crate::relay::head(&walk.pool).await?;
                walk.up_to = Some(head);
                head
            }
        };
        let rows = walk
            .filter
            .query(walk.after, Some(up_to), i64::from(STREAM_BATCH))
            .build()
            .fetch_all(&walk.pool)
            .await?;
        let batch = rows
            .iter()
            .map(StoredEvent::from_row)
            .collect::<Result<Vec<_>, _>>()?;
        walk.done = batch.len() < usize::from(STREAM_BATCH);
        match batch.last() {
            Some(last) => {
                walk.after = last.position;
                Ok(Some((batch, walk)))
            }
            None => Ok(None),
        }
    })
    .map_ok(|batch| stream::iter(batch.into_iter().map(Ok)))
    .try_flatten()
    .boxed()
}

/// Every event of one aggregate, in sequence order (empty if it has none).
pub async fn aggregate_events<'e>(
    executor: impl PgExecutor<'e>,
    aggregate_type: &str,
    aggregate_id: Uuid,
) -> Result<Vec<StoredEvent>, EventDecodeError> {
    aggregate_events_after(executor, aggregate_type, aggregate_id, 0).await
}

/// The events of one aggregate after sequence `after`, in sequence order: a walk of the
/// primary key from there, whatever plan the session keeps.
pub async fn aggregate_events_after<'e>(
    executor: impl PgExecutor<'e>,
    aggregate_type: &str,
    aggregate_id: Uuid,
    after: i64,
) -> Result<Vec<StoredEvent>, EventDecodeError> {
    let rows = sqlx::query(&format!(
        "SELECT {EVENT_COLUMNS} FROM events \
         WHERE aggregate_type = $1 AND aggregate_id = $2 AND sequence > $3 ORDER BY sequence"
    ))
    .bind(aggregate_type)
    .bind(aggregate_id.to_string())
    .bind(after)
    .fetch_all(executor)
    .await?;
    rows.iter().map(StoredEvent::from_row).collect()
}

/// How far into an aggregate's history to fold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AsOf {
    /// Up to and including the event with this sequence.
    Version(i64),
    /// Every event recorded at or before this time.
    Time(DateTime<Utc>),
}

/// An aggregate's state folded from its own events.
#[derive(Debug, Clone, PartialEq)]
pub struct Folded<A> {
    /// The sequence of the last event folded.
    pub version: i64,
    /// When the last event folded was recorded.
    pub as_of: DateTime<Utc>,
    pub state: A,
}

/// Folds aggregate `A`'s events with [`Aggregate::apply`], from its first event up to
/// `as_of`, reading them as a stream so memory stays flat however long its history is.
///
/// `None` when no event qualifies, or when [`AsOf::Version`] asks for a version the
/// aggregate has not reached.
pub async fn fold<A: Aggregate>(
    pool: &PgPool,
    aggregate_id: Uuid,
    as_of: AsOf,
) -> Result<Option<Folded<A>>, EventDecodeError> {
    let mut query = QueryBuilder::<Postgres>::new(format!(
        "SELECT {EVENT_COLUMNS} FROM events WHERE aggregate_type = "
    ));
    query
        .push_bind(A::TYPE)
        .push(" AND aggregate_id = ")
        .push_bind(aggregate_id.to_string());
    match as_of {
        AsOf::Version(version) => query.push(" AND sequence <= ").push_bind(version),
        AsOf::Time(time) => query.push(" AND recorded_at <= ").push_bind(time),
    };
    query.push(" ORDER BY sequence");

    let mut rows = query.build().fetch(pool);
    let mut state = A::default();
    let mut last: Option<(i64, DateTime<Utc>)> = None;
    while let Some(row) = rows.try_next().await? {
        let event = StoredEvent::from_row(&row)?;
        // Sequences are consecutive; a hole means a later event carries an earlier time
        // than one before it, and the history as of that time ends at the hole.
        if event.sequence != last.map_or(1, |(sequence, _)| sequence + 1) {
            break;
        }
        state.apply(event.decode::<A::Event>()?);
        last = Some((event.sequence, event.recorded_at));
    }
    Ok(match (last, as_of) {
        (Some((version, _)), AsOf::Version(wanted)) if version != wanted => None,
        (Some((version, as_of)), _) => Some(Folded {
            version,
            as_of,
            state,
        }),
        (None, _) => None,
    })
}

/// Replaces every secret field ([`SECRET_FIELDS`]) anywhere in `value` with
/// [`REDACTED`]; answers whether there was one. Payloads, metadata and states shown to
/// people pass through here.
pub fn redact_secrets(value: &mut serde_json::Value) -> bool {
    match value {
        serde_json::Value::Object(object) => {
            let mut found = false;
            for (key, field) in object.iter_mut() {
                if SECRET_FIELDS.contains(&key.as_str()) {
                    *field = serde_json::Value::String(REDACTED.to_owned());
                    found = true;
                } else {
                    found |= redact_secrets(field);
                }
            }
            found
        }
        serde_json::Value::Array(items) => items
            .iter_mut()
            .fold(false, |found, item| redact_secrets(item) | found),
        _ => false,
    }
}

/// `event` with the secrets of its payload redacted.
pub fn redacted(mut event: StoredEvent) -> StoredEvent {
    let mut payload = event.payload.to_value();
    // A payload without secrets keeps its text as stored.
    if redact_secrets(&mut payload) {
        event.payload = crate::event::Payload::from_value(&payload);
    }
    event
}

#[cfg(test)]
mod tests {
    use serde_json::json;
    use sqlx::Execute;

    use super::*;

    #[test]
    fn secrets_are_redacted_at_any_depth_and_nothing_else_changes() {
        let mut payload = json!({
            "UserRegistered": {
                "email": "a@example.com",
                "password_hash": "$argon2id$v=19$secret",
                "nested": [{"password_hash": {"even": "objects"}}, 3, null],
            }
        });
        redact_secrets(&mut payload);
        assert_eq!(
            payload,
            json!({
                "UserRegistered": {
                    "email": "a@example.com",
                    "password_hash": "[REDACTED]",
                    "nested": [{"password_hash": "[REDACTED]"}, 3, null],
                }
            })
        );
    }

    #[test]
    fn payloads_without_secrets_are_left_alone() {
        let original = json!({"ProductRestocked": {"quantity": 5}, "password": "not a hash"});
        let mut payload = original.clone();
        redact_secrets(&mut payload);
        assert_eq!(payload, original);
        let mut scalar = json!("password_hash");
        redact_secrets(&mut scalar);
        assert_eq!(scalar, json!("password_hash"));
    }

    #[test]
    fn the_filter_binds_every_value_and_orders_by_position() {
        let filter = HistoryFilter {
            after: 7,
            aggregate_type: Some("user".to_owned()),
            aggregate_id: Some(Uuid::nil()),
            actor_id: Some(Uuid::nil()),
            correlation_id: Some("'; DROP TABLE events; --".to_owned()),
            from: Some(DateTime::<Utc>::MIN_UTC),
            to: Some(DateTime::<Utc>::MAX_UTC),
        };
        let mut query = filter.query(filter.after, Some(9), 10);
        let sql = query.build().sql().to_owned();
        assert!(!sql.contains("DROP"), "{sql}");
        assert!(sql.contains("metadata->>'actor_id' = $5"), "{sql}");
        assert!(sql.ends_with("ORDER BY position LIMIT $9"), "{sql}");
        let bare = HistoryFilter::default()
            .query(0, None, 1)
            .build()
            .sql()
            .to_owned();
        assert_eq!(
            bare,
            format!(
                "SELECT {EVENT_COLUMNS} FROM events WHERE position > $1 ORDER BY position LIMIT $2"
            )
        );
    }
}
