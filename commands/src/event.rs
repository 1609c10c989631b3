//! A committed event as the rest of the system sees it: the row of the event store with
//! its global position, id, time and parsed metadata envelope. This is also the JSON body
//! of every message the relay publishes and the shape the audit API answers with.

use chrono::{DateTime, Utc};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sqlx::postgres::PgRow;
use sqlx::{PgConnection, PgPool, Row};
use uuid::Uuid;

use crate::metadata::EventMetadata;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredEvent {
    pub event_id: Uuid,
    pub position: i64,
    pub recorded_at: DateTime<Utc>,
    pub aggregate_type: String,
    pub aggregate_id: String,
    pub sequence: i64,
    pub event_type: String,
    pub event_version: String,
    pub payload: serde_json::Value,
    pub metadata: EventMetadata,
}

/// A stored row that is not a valid event.
#[derive(Debug, thiserror::Error)]
pub enum EventDecodeError {
    #[error("event at position {position} has invalid metadata: {source}")]
    Metadata {
        position: i64,
        #[source]
        source: crate::metadata::MetadataError,
    },
    #[error("event at position {position} ({event_type} v{event_version}) has an unreadable payload: {source}")]
    Payload {
        position: i64,
        event_type: String,
        event_version: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("event at position {position} cannot be upgraded: {source}")]
    Upcast {
        position: i64,
        #[source]
        source: crate::upcast::UpcastError,
    },
    #[error(transparent)]
    Database(#[from] sqlx::Error),
}

/// The columns [`StoredEvent::from_row`] reads, for `SELECT` lists.
pub const EVENT_COLUMNS: &str = "event_id, position, recorded_at, aggregate_type, aggregate_id, \
     sequence, event_type, event_version, payload, metadata";

impl StoredEvent {
    pub fn from_row(row: &PgRow) -> Result<Self, EventDecodeError> {
        let position: i64 = row.try_get("position")?;
        let metadata: serde_json::Value = row.try_get("metadata")?;
        let metadata = EventMetadata::from_json(&metadata)
            .map_err(|source| EventDecodeError::Metadata { position, source })?;
        // Everything read through here sees current event versions.
        let aggregate_type: String = row.try_get("aggregate_type")?;
        let event_type: String = row.try_get("event_type")?;
        let stored_version: String = row.try_get("event_version")?;
        let mut payload: serde_json::Value = row.try_get("payload")?;
        let event_version =
            crate::upcast::upcast(&aggregate_type, &event_type, &stored_version, &mut payload)
                .map_err(|source| EventDecodeError::Upcast { position, source })?;
        Ok(Self {
            event_id: row.try_get("event_id")?,
            position,
            recorded_at: row.try_get("recorded_at")?,
            aggregate_type,
            aggregate_id: row.try_get("aggregate_id")?,
            sequence: row.try_get("sequence")?,
            event_type,
            event_version,
            payload,
            metadata,
        })
    }

    /// Deserialises the payload as a domain event enum (e.g. `UserEvent`).
    pub fn decode<E: DeserializeOwned>(&self) -> Result<E, EventDecodeError> {
        // Read through a reference: every read model decodes every event it folds, and
        // cloning the payload first cost more than the decoding.
        E::deserialize(&self.payload).map_err(|source| EventDecodeError::Payload {
            position: self.position,
            event_type: self.event_type.clone(),
            event_version: self.event_version.clone(),
            source,
        })
    }
}

/// Reads committed events with `after < position <= up_to`, in position order, at most
/// `limit` of them.
///
/// Only call this with an `up_to` the relay has already published (or that is otherwise
/// known to be complete): above the relay's checkpoint a transaction may still commit an
/// event into a gap.
///
/// The range is read in windows of about twice the events still wanted. Asked for the
/// first rows of a long range, Postgres picks an ordered walk of the position index only
/// when its statistics say the range is long; with stale statistics (a freshly loaded or
/// never analysed store) it sorts the whole range for every batch instead, which made a
/// replay of a million events quadratic. A window bounds that cost whatever the
/// statistics say; an empty stretch of positions is skipped with one index probe.
pub async fn read_events(
    pool: &PgPool,
    after: i64,
    up_to: i64,
    limit: i64,
) -> Result<Vec<StoredEvent>, EventDecodeError> {
    read_events_on(&mut *pool.acquire().await?, after, up_to, limit).await
}

/// [`read_events`] on a given connection, e.g. inside a transaction.
pub async fn read_events_on(
    connection: &mut PgConnection,
    after: i64,
    up_to: i64,
    limit: i64,
) -> Result<Vec<StoredEvent>, EventDecodeError> {
    let mut events = Vec::new();
    let mut from = after;
    while from < up_to {
        let wanted = limit - events.len() as i64;
        if wanted <= 0 {
            break;
        }
        let to = from
            .saturating_add(wanted.saturating_mul(2).max(1_024))
            .min(up_to);
        let rows = sqlx::query(&format!(
            "SELECT {EVENT_COLUMNS} FROM events \
             WHERE position > $1 AND position <= $2 ORDER BY position LIMIT $3"
        ))
        .bind(from)
        .bind(to)
        .bind(wanted)
        .fetch_all(&mut *connection)
        .await?;
        for row in &rows {
            events.push(StoredEvent::from_row(row)?);
        }
        if rows.len() as i64 == wanted || to >= up_to {
            break;
        }
        let next: Option<i64> = sqlx::query_scalar(
            "SELECT min(position) FROM events WHERE position > $1 AND position <= $2",
        )
        .bind(to)
        .bind(up_to)
        .fetch_one(&mut *connection)
        .await?;
        match next {
            Some(next) => from = next - 1,
            None => break,
        }
    }
    Ok(events)
}
