//! A committed event as the rest of the system sees it: the row of the event store with
//! its global position, id, time and parsed metadata envelope. This is also the JSON body
//! of every message the relay publishes and the shape the audit API answers with.

use std::fmt;

use chrono::{DateTime, Utc};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};
use serde_json::value::RawValue;
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
    pub payload: Payload,
    pub metadata: EventMetadata,
}

/// An event's payload as JSON text, kept as read and decoded only where it is used.
///
/// Every consumer of the stream, and a rebuild, handles every event, while each read
/// model decodes only the event types it folds, straight from the text into the domain's
/// event enum. Building a `serde_json::Value` tree for every event first, and dropping
/// it, cost more than the decoding itself. The text is what Postgres stores (its
/// canonical `jsonb` form) and is passed on unchanged in the messages the relay
/// publishes; two payloads are equal when their text is.
#[derive(Clone, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Payload(Box<RawValue>);

impl Payload {
    /// The payload holding `value`.
    pub fn from_value(value: &serde_json::Value) -> Self {
        // A `Value` always serialises.
        Self(serde_json::value::to_raw_value(value).unwrap_or_else(|_| null()))
    }

    /// The JSON text.
    pub fn get(&self) -> &str {
        self.0.get()
    }

    /// The payload as a JSON tree, for code that edits or inspects it.
    pub fn to_value(&self) -> serde_json::Value {
        // The text is valid JSON by construction.
        serde_json::from_str(self.get()).unwrap_or(serde_json::Value::Null)
    }

    fn parse(text: &str) -> Result<Self, serde_json::Error> {
        RawValue::from_string(text.to_owned()).map(Self)
    }
}

fn null() -> Box<RawValue> {
    RawValue::NULL.to_owned()
}

impl PartialEq for Payload {
    fn eq(&self, other: &Self) -> bool {
        self.get() == other.get()
    }
}

impl fmt::Debug for Payload {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.get())
    }
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
        let metadata = EventMetadata::from_json_text(jsonb_text(row, "metadata")?)
            .map_err(|source| EventDecodeError::Metadata { position, source })?;
        // Everything read through here sees current event versions.
        let aggregate_type: String = row.try_get("aggregate_type")?;
        let event_type: String = row.try_get("event_type")?;
        let stored_version: String = row.try_get("event_version")?;
        let text = jsonb_text(row, "payload")?;
        let unreadable = |source| EventDecodeError::Payload {
            position,
            event_type: event_type.clone(),
            event_version: stored_version.clone(),
            source,
        };
        let (payload, event_version) =
            if crate::upcast::is_current(&aggregate_type, &event_type, &stored_version) {
                (Payload::parse(text).map_err(unreadable)?, stored_version)
            } else {
                let mut payload = serde_json::from_str(text).map_err(unreadable)?;
                let version = crate::upcast::upcast(
                    &aggregate_type,
                    &event_type,
                    &stored_version,
                    &mut payload,
                )
                .map_err(|source| EventDecodeError::Upcast { position, source })?;
                (Payload::from_value(&payload), version)
            };
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
        serde_json::from_str(self.payload.get()).map_err(|source| EventDecodeError::Payload {
            position: self.position,
            event_type: self.event_type.clone(),
            event_version: self.event_version.clone(),
            source,
        })
    }
}

/// The JSON text of a `jsonb` (or `json`) column. Postgres sends `jsonb` in the binary
/// format as a version byte (1) and the text; `json`, and either in the text format, as
/// the text alone.
fn jsonb_text<'r>(row: &'r PgRow, column: &str) -> Result<&'r str, sqlx::Error> {
    use sqlx::postgres::PgValueFormat;
    use sqlx::{TypeInfo, ValueRef};
    let value = row.try_get_raw(column)?;
    let bytes = if value.is_null() {
        &b"null"[..]
    } else {
        let versioned =
            value.format() == PgValueFormat::Binary && value.type_info().name() == "JSONB";
        let bytes = value.as_bytes().map_err(decode_error(column))?;
        match (versioned, bytes.split_first()) {
            (false, _) => bytes,
            (true, Some((1, text))) => text,
            (true, _) => return Err(decode_error(column)("not jsonb of format version 1".into())),
        }
    };
    std::str::from_utf8(bytes).map_err(|error| decode_error(column)(error.into()))
}

fn decode_error(column: &str) -> impl Fn(sqlx::error::BoxDynError) -> sqlx::Error + '_ {
    move |source| sqlx::Error::ColumnDecode {
        index: column.to_owned(),
        source,
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
            // Not `min(position)`: see `store::CURRENT_VERSION` on generic plans.
            "SELECT position FROM events WHERE position > $1 AND position <= $2 \
             ORDER BY position LIMIT 1",
        )
        .bind(to)
        .bind(up_to)
        .fetch_optional(&mut *connection)
        .await?;
        match next {
            Some(next) => from = next - 1,
            None => break,
        }
    }
    Ok(events)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::metadata::Actor;

    fn event(payload: &str) -> StoredEvent {
        StoredEvent {
            event_id: Uuid::now_v7(),
            position: 7,
            recorded_at: Utc::now(),
            aggregate_type: "product".to_owned(),
            aggregate_id: Uuid::now_v7().to_string(),
            sequence: 2,
            event_type: "ProductRestocked".to_owned(),
            event_version: "1".to_owned(),
            payload: Payload::parse(payload).unwrap(),
            metadata: EventMetadata::for_request(Actor::system(), "req-1"),
        }
    }

    #[test]
    fn a_payload_travels_as_the_text_it_was_stored_as() {
        // Postgres's canonical jsonb text, spaces included.
        let stored = r#"{"ProductRestocked": {"quantity": 5}}"#;
        let original = event(stored);
        let message = serde_json::to_vec(&original).unwrap();
        assert!(String::from_utf8(message.clone())
            .unwrap()
            .contains(r#""payload":{"ProductRestocked": {"quantity": 5}}"#));
        let received: StoredEvent = serde_json::from_slice(&message).unwrap();
        assert_eq!(received, original);
        assert_eq!(received.payload.get(), stored);
        assert_eq!(
            received.payload.to_value(),
            json!({"ProductRestocked": {"quantity": 5}})
        );
        // Parsed into a tree, as the API's clients do, it is the same object.
        let tree = serde_json::to_value(&original).unwrap();
        assert_eq!(tree["payload"]["ProductRestocked"]["quantity"], 5);
    }

    #[test]
    fn payloads_are_equal_when_their_text_is() {
        assert_eq!(event(r#"{"a": 1}"#).payload, event(r#"{"a": 1}"#).payload);
        assert_ne!(event(r#"{"a": 1}"#).payload, event(r#"{"a": 2}"#).payload);
        // Made from a tree, a payload is written compactly: the same object, other text.
        let built = Payload::from_value(&json!({"a": 1}));
        assert_eq!(built.get(), r#"{"a":1}"#);
        assert_ne!(built, event(r#"{"a": 1}"#).payload);
        assert_eq!(built.to_value(), event(r#"{"a": 1}"#).payload.to_value());
        assert!(Payload::parse("{not json").is_err());
    }

    #[test]
    fn decoding_names_the_event_whose_payload_does_not_fit() {
        #[derive(Debug, Deserialize, PartialEq)]
        enum Change {
            ProductRestocked { quantity: u32 },
        }
        let restocked = event(r#"{"ProductRestocked": {"quantity": 5}}"#);
        assert_eq!(
            restocked.decode::<Change>().unwrap(),
            Change::ProductRestocked { quantity: 5 }
        );
        let error = event(r#"{"ProductRestocked": {"quantity": -5}}"#)
            .decode::<Change>()
            .unwrap_err();
        assert!(
            error
                .to_string()
                .starts_with("event at position 7 (ProductRestocked v1) has an unreadable payload"),
            "{error}"
        );
    }
}
