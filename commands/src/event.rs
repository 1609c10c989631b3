//! A committed event as the rest of the system sees it: the row of the event store with
//! its global position, id, time and parsed metadata envelope. This is also the JSON body
//! of every message the relay publishes and the shape the audit API answers with.

use chrono::{DateTime, Utc};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use sqlx::postgres::PgRow;
use sqlx::{PgExecutor, Row};
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
        serde_json::from_value(self.payload.clone()).map_err(|source| EventDecodeError::Payload {
            position: self.position,
            event_type: self.event_type.clone(),
            event_version: self.event_version.clone(),
            source,
        })
    }
}

/// Reads committed events with `after < position <= up_to`, in position order.
///
/// Only call this with an `up_to` the relay has already published (or that is otherwise
/// known to be complete): above the relay's checkpoint a transaction may still commit an
/// event into a gap.
pub async fn read_events<'e>(
    executor: impl PgExecutor<'e>,
    after: i64,
    up_to: i64,
    limit: i64,
) -> Result<Vec<StoredEvent>, EventDecodeError> {
    let rows = sqlx::query(&format!(
        "SELECT {EVENT_COLUMNS} FROM events \
         WHERE position > $1 AND position <= $2 ORDER BY position LIMIT $3"
    ))
    .bind(after)
    .bind(up_to)
    .bind(limit)
    .fetch_all(executor)
    .await?;
    rows.iter().map(StoredEvent::from_row).collect()
}
