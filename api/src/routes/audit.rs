//! `/audit`: the stored history for auditors (and admins): the global event feed, one
//! aggregate's stream, an aggregate's state folded from its own events as of a version or
//! a time, the audit-trail read model, a streamed NDJSON export, and the verification of
//! the store's hash chains and signed checkpoints.
//!
//! Everything but the trail reads the event store itself, so those answers carry no
//! `X-Projection-Position` and never wait. Secrets in payloads and states (password
//! hashes) are shown as `"[REDACTED]"`. A `version` the aggregate never reached answers
//! 404, like a time before its first event: there is no state to show.

use axum::body::{Body, Bytes};
use axum::extract::{Path, State};
use axum::http::{header, HeaderValue, Method};
use axum::response::{IntoResponse, Response};
use axum::{BoxError, Json};
use chrono::{DateTime, Utc};
use futures::{stream, StreamExt, TryStreamExt};
use hindsight_commands::event::EventDecodeError;
use hindsight_commands::history::{
    self, AsOf, Folded, HistoryFilter, AGGREGATE_TYPES, DEFAULT_FEED_LIMIT, MAX_FEED_LIMIT,
};
use hindsight_commands::integrity::{self, IntegrityKey, VerifyReport};
use hindsight_commands::StoredEvent;
use hindsight_domain::order::Order;
use hindsight_domain::product::Product;
use hindsight_domain::user::User;
use hindsight_domain::Aggregate;
use hindsight_projections::audit_trail::{self, AuditEntry, TrailFilter};
use hindsight_projections::page::Page;
use serde::{Deserialize, Serialize};
use serde_json::json;
use uuid::Uuid;

use crate::error::ApiError;
use crate::extract::{ApiQuery, MinPosition, Paging, ReadAnswer};
use crate::routes::support::Fields;
use crate::routes::Routes;
use crate::state::AppState;

const TRAIL_PROJECTION: &str = "audit_trail";
const NDJSON: &str = "application/x-ndjson";
/// Longest `correlation_id` worth looking up: request ids are at most 128 characters.
const MAX_CORRELATION_ID: usize = 128;

pub fn routes(routes: Routes) -> Routes {
    routes
        .add(Method::GET, "/audit/events", events)
        .add(
            Method::GET,
            "/audit/streams/{aggregate_type}/{aggregate_id}",
            aggregate_stream,
        )
        .add(
            Method::GET,
            "/audit/streams/{aggregate_type}/{aggregate_id}/state",
            state_as_of,
        )
        .add(Method::GET, "/audit/trail", trail)
        .add(Method::GET, "/audit/export", export)
        .add(Method::GET, "/audit/verify", verify)
}

fn history_failed(error: EventDecodeError) -> ApiError {
    match error {
        EventDecodeError::Database(error) => ApiError::from_sqlx(error),
        other => ApiError::internal(other),
    }
}

/// Query values arrive as text and are parsed here, so a bad one is refused with its
/// own field name.
fn uuid_field(fields: &mut Fields, field: &str, value: Option<&str>) -> Option<Uuid> {
    let value = value?;
    Uuid::parse_str(value)
        .map_err(|_| fields.fail(field, "must be a UUID"))
        .ok()
}

fn time_field(fields: &mut Fields, field: &str, value: Option<&str>) -> Option<DateTime<Utc>> {
    let value = value?;
    DateTime::parse_from_rfc3339(value)
        .map(|time| time.with_timezone(&Utc))
        .map_err(|_| fields.fail(field, "must be an RFC 3339 time, e.g. 2024-05-01T12:00:00Z"))
        .ok()
}

fn aggregate_type_field(fields: &mut Fields, field: &str, value: Option<&str>) -> Option<String> {
    let value = value?;
    if AGGREGATE_TYPES.contains(&value) {
        Some(value.to_owned())
    } else {
        fields.fail(field, "must be one of user, product, order");
        None
    }
}

fn time_range(
    fields: &mut Fields,
    from: Option<&str>,
    to: Option<&str>,
) -> (Option<DateTime<Utc>>, Option<DateTime<Utc>>) {
    let from = time_field(fields, "from", from);
    let to = time_field(fields, "to", to);
    if let (Some(from), Some(to)) = (from, to) {
        if from > to {
            fields.fail("from", "must not be after to");
        }
    }
    (from, to)
}

/// The filters `/audit/events` and `/audit/export` share (`limit` pages the feed only;
/// an export is never cut short).
#[derive(Debug, Deserialize)]
struct EventsQuery {
    after: Option<String>,
    limit: Option<String>,
    aggregate_type: Option<String>,
    aggregate_id: Option<String>,
    actor_id: Option<String>,
    correlation_id: Option<String>,
    from: Option<String>,
    to: Option<String>,
}

impl EventsQuery {
    fn filter(&self, fields: &mut Fields) -> HistoryFilter {
        let after = match self.after.as_deref().map(str::parse::<i64>) {
            None => 0,
            Some(Ok(after)) if after >= 0 => after,
            Some(_) => {
                fields.fail("after", "must be a non-negative position");
                0
            }
        };
        let correlation_id = self.correlation_id.clone();
        // Correlation ids are request ids: 1-128 characters of A-Za-z0-9._- (anything
        // else, a NUL above all, can match nothing and must not reach the database).
        let valid = |id: &str| {
            (1..=MAX_CORRELATION_ID).contains(&id.len())
                && id
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
        };
        if correlation_id.as_deref().is_some_and(|id| !valid(id)) {
            fields.fail(
                "correlation_id",
                "must be 1 to 128 characters of A-Z, a-z, 0-9, '.', '_' or '-'",
            );
        }
        let (from, to) = time_range(fields, self.from.as_deref(), self.to.as_deref());
        HistoryFilter {
            after,
            aggregate_type: aggregate_type_field(
                fields,
                "aggregate_type",
                self.aggregate_type.as_deref(),
            ),
            aggregate_id: uuid_field(fields, "aggregate_id", self.aggregate_id.as_deref()),
            actor_id: uuid_field(fields, "actor_id", self.actor_id.as_deref()),
            correlation_id,
            from,
            to,
        }
    }

    fn limit(&self, fields: &mut Fields) -> u32 {
        match self.limit.as_deref().map(str::parse::<u32>) {
            None => DEFAULT_FEED_LIMIT,
            Some(Ok(limit)) if (1..=MAX_FEED_LIMIT).contains(&limit) => limit,
            Some(_) => {
                fields.fail("limit", format!("must be between 1 and {MAX_FEED_LIMIT}"));
                DEFAULT_FEED_LIMIT
            }
        }
    }
}

/// One page of the feed: `next_after` continues it, `null` once a page came back short.
#[derive(Debug, Serialize)]
struct Feed {
    events: Vec<StoredEvent>,
    next_after: Option<i64>,
}

/// `GET /audit/events`: committed events in global position order.
async fn events(
    State(state): State<AppState>,
    ApiQuery(query): ApiQuery<EventsQuery>,
) -> Result<Json<Feed>, ApiError> {
    let mut fields = Fields::default();
    let filter = query.filter(&mut fields);
    let limit = query.limit(&mut fields);
    fields.finish()?;
    let events = history::feed(&state.pool, &filter, limit)
        .await
        .map_err(history_failed)?;
    let full = u32::try_from(events.len()).is_ok_and(|count| count >= limit);
    let next_after = full
        .then(|| events.last().map(|event| event.position))
        .flatten();
    Ok(Json(Feed {
        events: events.into_iter().map(history::redacted).collect(),
        next_after,
    }))
}

/// `{aggregate_type}/{aggregate_id}` of a stream path.
fn aggregate_of(path: &(String, String)) -> Result<(String, Uuid), ApiError> {
    let mut fields = Fields::default();
    let aggregate_type = aggregate_type_field(&mut fields, "aggregate_type", Some(&path.0));
    let aggregate_id = uuid_field(&mut fields, "aggregate_id", Some(&path.1));
    fields.finish()?;
    match (aggregate_type, aggregate_id) {
        (Some(aggregate_type), Some(aggregate_id)) => Ok((aggregate_type, aggregate_id)),
        _ => Err(ApiError::internal("validated path missing")),
    }
}

/// `GET /audit/streams/{aggregate_type}/{aggregate_id}`: every event of one aggregate.
async fn aggregate_stream(
    State(state): State<AppState>,
    Path(path): Path<(String, String)>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let (aggregate_type, aggregate_id) = aggregate_of(&path)?;
    let events = history::aggregate_events(&state.pool, &aggregate_type, aggregate_id)
        .await
        .map_err(history_failed)?;
    if events.is_empty() {
        return Err(ApiError::NotFound);
    }
    let events: Vec<StoredEvent> = events.into_iter().map(history::redacted).collect();
    Ok(Json(json!({ "events": events })))
}

#[derive(Debug, Deserialize)]
struct StateQuery {
    version: Option<String>,
    at: Option<String>,
}

impl StateQuery {
    fn as_of(&self) -> Result<AsOf, ApiError> {
        let mut fields = Fields::default();
        let as_of = match (self.version.as_deref(), self.at.as_deref()) {
            (Some(version), None) => match version.parse::<i64>() {
                Ok(version) if version >= 1 => Some(AsOf::Version(version)),
                _ => {
                    fields.fail("version", "must be a whole number from 1");
                    None
                }
            },
            (None, at @ Some(_)) => time_field(&mut fields, "at", at).map(AsOf::Time),
            _ => {
                fields.fail("version", "exactly one of version and at is required");
                None
            }
        };
        fields.finish()?;
        as_of.ok_or_else(|| ApiError::internal("validated state query missing"))
    }
}

/// What `/state` answers: the folded state, its version and the time of its last event.
#[derive(Debug, Serialize)]
struct StateAnswer {
    aggregate_type: String,
    aggregate_id: Uuid,
    version: i64,
    as_of: DateTime<Utc>,
    state: serde_json::Value,
}

async fn folded<A: Aggregate>(
    state: &AppState,
    aggregate_id: Uuid,
    as_of: AsOf,
) -> Result<StateAnswer, ApiError> {
    let Folded {
        version,
        as_of,
        state: folded,
    } = history::fold::<A>(&state.pool, aggregate_id, as_of)
        .await
        .map_err(history_failed)?
        .ok_or(ApiError::NotFound)?;
    let mut state = serde_json::to_value(&folded).map_err(ApiError::internal)?;
    history::redact_secrets(&mut state);
    Ok(StateAnswer {
        aggregate_type: A::TYPE.to_owned(),
        aggregate_id,
        version,
        as_of,
        state,
    })
}

/// `GET /audit/streams/{aggregate_type}/{aggregate_id}/state?version=N|at=T`: the
/// aggregate's state folded by the domain from its own events, never from a read model.
async fn state_as_of(
    State(state): State<AppState>,
    Path(path): Path<(String, String)>,
    ApiQuery(query): ApiQuery<StateQuery>,
) -> Result<Json<StateAnswer>, ApiError> {
    let (aggregate_type, aggregate_id) = aggregate_of(&path)?;
    let as_of = query.as_of()?;
    let answer = match aggregate_type.as_str() {
        User::TYPE => folded::<User>(&state, aggregate_id, as_of).await?,
        Product::TYPE => folded::<Product>(&state, aggregate_id, as_of).await?,
        Order::TYPE => folded::<Order>(&state, aggregate_id, as_of).await?,
        _ => return Err(ApiError::NotFound),
    };
    Ok(Json(answer))
}

#[derive(Debug, Deserialize)]
struct TrailQuery {
    actor_id: Option<String>,
    aggregate_type: Option<String>,
    aggregate_id: Option<String>,
    from: Option<String>,
    to: Option<String>,
    limit: Option<u32>,
    cursor: Option<String>,
    min_position: Option<i64>,
}

/// `GET /audit/trail`: the audit-trail read model, who did what to which entity.
async fn trail(
    State(state): State<AppState>,
    ApiQuery(query): ApiQuery<TrailQuery>,
) -> Result<ReadAnswer<Page<AuditEntry>>, ApiError> {
    let mut fields = Fields::default();
    let (from, to) = time_range(&mut fields, query.from.as_deref(), query.to.as_deref());
    let filter = TrailFilter {
        actor_id: uuid_field(&mut fields, "actor_id", query.actor_id.as_deref()),
        aggregate_type: aggregate_type_field(
            &mut fields,
            "aggregate_type",
            query.aggregate_type.as_deref(),
        ),
        aggregate_id: uuid_field(&mut fields, "aggregate_id", query.aggregate_id.as_deref()),
        from,
        to,
    };
    fields.finish()?;
    let page = Paging::page(query.limit, query.cursor)?;
    let position = MinPosition::at(query.min_position)
        .wait(&state, TRAIL_PROJECTION)
        .await?;
    let body = audit_trail::list(&state.pool, &filter, &page).await?;
    Ok(ReadAnswer {
        body,
        projection_position: position,
        version: None,
    })
}

/// One event as a line of the export, its secrets redacted.
fn ndjson_line(event: Result<StoredEvent, EventDecodeError>) -> Result<Bytes, BoxError> {
    let mut line = serde_json::to_vec(&history::redacted(event?))?;
    line.push(b'\n');
    Ok(Bytes::from(line))
}

/// `GET /audit/export`: the events `/audit/events` would page through, as one NDJSON
/// document streamed in batches up to the head of the store when the export began.
///
/// A failure before the first event is answered with the error envelope; one after the
/// body has started can only end the body early (the chunked body is left unfinished,
/// so the client sees a failed transfer rather than a short, complete-looking export).
async fn export(
    State(state): State<AppState>,
    ApiQuery(query): ApiQuery<EventsQuery>,
) -> Result<Response, ApiError> {
    let mut fields = Fields::default();
    let filter = query.filter(&mut fields);
    fields.finish()?;
    let mut events = history::stream_events(&state.pool, &filter);
    let first = match events.next().await {
        Some(Err(error)) => return Err(history_failed(error)),
        first => first,
    };
    let lines = stream::iter(first)
        .chain(events)
        .map(ndjson_line)
        .inspect_err(|error| {
            tracing::error!(%error, "audit export failed after it started; the body ends early");
        });
    let mut response = Body::from_stream(lines).into_response();
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(NDJSON));
    Ok(response)
}

/// The key that checks the signatures of integrity checkpoints.
///
/// `AppState` does not carry it yet: until it does, verification answers 503 rather than
/// a report that could not check a single signature.
fn integrity_key(state: &AppState) -> Result<&IntegrityKey, ApiError> {
    Ok(&state.integrity_key)
}

/// The verification of the whole store, as `GET /audit/verify` answers it.
async fn verification(
    pool: &sqlx::PgPool,
    key: &IntegrityKey,
) -> Result<Json<VerifyReport>, ApiError> {
    let report = integrity::verify(pool, key)
        .await
        .map_err(ApiError::from_sqlx)?;
    if let Some(broken) = &report.first_broken {
        tracing::warn!(
            position = broken.position,
            kind = ?broken.kind,
            reason = %broken.reason,
            "the event store failed verification"
        );
    }
    Ok(Json(report))
}

/// `GET /audit/verify`: recomputes every stream's hash chain and every signed checkpoint
/// and names the first broken link (lowest position). A broken history is the answer
/// (200, `ok: false`), not an error.
async fn verify(State(state): State<AppState>) -> Result<Json<VerifyReport>, ApiError> {
    let key = integrity_key(&state)?;
    verification(&state.pool, key).await
}
