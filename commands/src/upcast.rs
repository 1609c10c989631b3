//! Event schema evolution: stored events of an older version are upgraded to the current
//! one whenever they are read, by the aggregates (through cqrs-es's upcaster hook), by
//! the projections and by exports (through [`crate::event::StoredEvent`]), so the rest of
//! the code only ever sees current versions.
//!
//! Upcasters so far:
//! - `order` / `OrderPlaced` 1 → 2: version 1 carried the lines only; version 2 records
//!   the order's `total`, the sum of the lines' totals.

use cqrs_es::persist::{EventUpcaster, SerializedEvent};
use serde_json::{json, Value};

/// Why a stored event could not be upgraded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{aggregate_type} {event_type} version {event_version} cannot be upgraded: {reason}")]
pub struct UpcastError {
    pub aggregate_type: String,
    pub event_type: String,
    pub event_version: String,
    pub reason: &'static str,
}

/// Upgrades `payload` from `event_version` to the current version of its event type, in
/// place; returns the version it now has. Current versions pass through unchanged.
pub fn upcast(
    aggregate_type: &str,
    event_type: &str,
    event_version: &str,
    payload: &mut Value,
) -> Result<String, UpcastError> {
    let failure = |reason| UpcastError {
        aggregate_type: aggregate_type.to_owned(),
        event_type: event_type.to_owned(),
        event_version: event_version.to_owned(),
        reason,
    };
    match (aggregate_type, event_type, event_version) {
        ("order", "OrderPlaced", "1") => {
            let body = payload
                .get_mut("OrderPlaced")
                .and_then(Value::as_object_mut)
                .ok_or_else(|| failure("the payload is not an OrderPlaced object"))?;
            let lines = body
                .get("lines")
                .and_then(Value::as_array)
                .ok_or_else(|| failure("it has no lines"))?;
            let mut amount: i64 = 0;
            let mut currency: Option<&str> = None;
            for line in lines {
                let total = line
                    .get("line_total")
                    .ok_or_else(|| failure("a line has no total"))?;
                let line_amount = total
                    .get("amount")
                    .and_then(Value::as_i64)
                    .ok_or_else(|| failure("a line total has no amount"))?;
                let line_currency = total
                    .get("currency")
                    .and_then(Value::as_str)
                    .ok_or_else(|| failure("a line total has no currency"))?;
                if currency.is_some_and(|currency| currency != line_currency) {
                    return Err(failure("its lines mix currencies"));
                }
                currency = Some(line_currency);
                amount = amount
                    .checked_add(line_amount)
                    .ok_or_else(|| failure("its total overflows"))?;
            }
            let currency = currency
                .ok_or_else(|| failure("it has no lines"))?
                .to_owned();
            body.insert(
                "total".to_owned(),
                json!({ "amount": amount, "currency": currency }),
            );
            Ok("2".to_owned())
        }
        _ => Ok(event_version.to_owned()),
    }
}

/// The same upgrades for cqrs-es's loading path.
#[derive(Debug, Clone, Copy, Default)]
pub struct Upcaster {
    aggregate_type: &'static str,
}

impl Upcaster {
    pub fn for_aggregate(aggregate_type: &'static str) -> Self {
        Self { aggregate_type }
    }
}

/// (aggregate type, event type, stored version) that [`upcast`] upgrades.
const UPGRADES: &[(&str, &str, &str)] = &[("order", "OrderPlaced", "1")];

/// Whether [`upcast`] leaves an event of this kind and version as it is.
pub fn is_current(aggregate_type: &str, event_type: &str, event_version: &str) -> bool {
    !UPGRADES.contains(&(aggregate_type, event_type, event_version))
}

impl EventUpcaster for Upcaster {
    fn can_upcast(&self, event_type: &str, event_version: &str) -> bool {
        !is_current(self.aggregate_type, event_type, event_version)
    }

    fn upcast(&self, mut event: SerializedEvent) -> SerializedEvent {
        let (event_type, event_version) = (event.event_type.clone(), event.event_version.clone());
        match upcast(
            self.aggregate_type,
            &event_type,
            &event_version,
            &mut event.payload,
        ) {
            Ok(version) => event.event_version = version,
            // Left as stored: deserialising it then fails loudly, naming the event.
            Err(error) => tracing::error!(%error, "an event could not be upgraded"),
        }
        event
    }
}

/// What `hindsight events check` found for one (aggregate type, event type, version).
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Checked {
    pub aggregate_type: String,
    pub event_type: String,
    pub event_version: String,
    pub events: u64,
    /// The first event of this kind that does not deserialise, with the reason.
    pub first_failure: Option<(i64, String)>,
}

fn decodes(aggregate_type: &str, payload: Value) -> Result<(), String> {
    use hindsight_domain::{order::OrderEvent, product::ProductEvent, user::UserEvent};
    let result = match aggregate_type {
        "user" => serde_json::from_value::<UserEvent>(payload).map(drop),
        "product" => serde_json::from_value::<ProductEvent>(payload).map(drop),
        "order" => serde_json::from_value::<OrderEvent>(payload).map(drop),
        other => return Err(format!("unknown aggregate type `{other}`")),
    };
    result.map_err(|error| error.to_string())
}

/// Proves that stored events still deserialise through the current code and its
/// upcasters: every event (`sample: false`, flat memory, batch by batch) or one event of
/// each (aggregate type, event type, version) (`sample: true`, what `serve` checks at
/// start-up).
pub async fn check_stored_events(
    pool: &sqlx::PgPool,
    sample: bool,
) -> Result<Vec<Checked>, sqlx::Error> {
    use std::collections::BTreeMap;
    let mut found: BTreeMap<(String, String, String), Checked> = BTreeMap::new();
    let mut record = |aggregate_type: String,
                      event_type: String,
                      event_version: String,
                      position: i64,
                      mut payload: Value| {
        let outcome = upcast(&aggregate_type, &event_type, &event_version, &mut payload)
            .map_err(|error| error.to_string())
            .and_then(|_| decodes(&aggregate_type, payload));
        let entry = found
            .entry((
                aggregate_type.clone(),
                event_type.clone(),
                event_version.clone(),
            ))
            .or_insert_with(|| Checked {
                aggregate_type,
                event_type,
                event_version,
                events: 0,
                first_failure: None,
            });
        entry.events += 1;
        if let (Err(reason), None) = (outcome, &entry.first_failure) {
            entry.first_failure = Some((position, reason));
        }
    };
    if sample {
        let rows: Vec<(String, String, String, i64, Value)> = sqlx::query_as(
            "SELECT DISTINCT ON (aggregate_type, event_type, event_version) \
                    aggregate_type, event_type, event_version, position, payload \
             FROM events ORDER BY aggregate_type, event_type, event_version, position",
        )
        .fetch_all(pool)
        .await?;
        for (aggregate_type, event_type, event_version, position, payload) in rows {
            record(aggregate_type, event_type, event_version, position, payload);
        }
    } else {
        let mut after = 0i64;
        loop {
            let rows: Vec<(String, String, String, i64, Value)> = sqlx::query_as(
                "SELECT aggregate_type, event_type, event_version, position, payload \
                 FROM events WHERE position > $1 ORDER BY position LIMIT 5000",
            )
            .bind(after)
            .fetch_all(pool)
            .await?;
            let Some(last) = rows.last().map(|row| row.3) else {
                break;
            };
            for (aggregate_type, event_type, event_version, position, payload) in rows {
                record(aggregate_type, event_type, event_version, position, payload);
            }
            after = last;
        }
    }
    Ok(found.into_values().collect())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    fn v1() -> Value {
        json!({"OrderPlaced": {
            "order_id": "0193a1d2-0000-7000-8000-000000000001",
            "customer_id": "0193a1d2-0000-7000-8000-000000000002",
            "lines": [
                {"product_id": "0193a1d2-0000-7000-8000-000000000003", "sku": "A", "name": "A",
                 "quantity": 2, "unit_price": {"amount": 150, "currency": "EUR"},
                 "line_total": {"amount": 300, "currency": "EUR"}},
                {"product_id": "0193a1d2-0000-7000-8000-000000000004", "sku": "B", "name": "B",
                 "quantity": 1, "unit_price": {"amount": 99, "currency": "EUR"},
                 "line_total": {"amount": 99, "currency": "EUR"}}
            ]
        }})
    }

    #[test]
    fn an_order_placed_v1_gains_its_total() {
        let mut payload = v1();
        assert_eq!(
            upcast("order", "OrderPlaced", "1", &mut payload).unwrap(),
            "2"
        );
        assert_eq!(
            payload["OrderPlaced"]["total"],
            json!({"amount": 399, "currency": "EUR"})
        );
        let event: hindsight_domain::order::OrderEvent = serde_json::from_value(payload).unwrap();
        assert!(matches!(
            event,
            hindsight_domain::order::OrderEvent::OrderPlaced { .. }
        ));
    }

    #[test]
    fn current_versions_pass_through_and_broken_ones_are_refused() {
        let mut payload = json!({"anything": 1});
        assert_eq!(
            upcast("order", "OrderPlaced", "2", &mut payload).unwrap(),
            "2"
        );
        assert_eq!(payload, json!({"anything": 1}));
        let mut broken = json!({"OrderPlaced": {"lines": []}});
        assert!(upcast("order", "OrderPlaced", "1", &mut broken).is_err());
        let upcaster = Upcaster::for_aggregate("order");
        assert!(!Upcaster::for_aggregate("user").can_upcast("OrderPlaced", "1"));
        assert!(upcaster.can_upcast("OrderPlaced", "1"));
        assert!(!upcaster.can_upcast("OrderPlaced", "2"));
        assert!(!upcaster.can_upcast("OrderConfirmed", "1"));
    }
}
