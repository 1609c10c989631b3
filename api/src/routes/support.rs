//! Small pieces every route module uses: request metadata, field validation, views of
//! freshly written aggregates.

use chrono::{DateTime, Utc};
use hindsight_commands::{Actor, EventMetadata};
use hindsight_domain::ids::UserId;
use hindsight_domain::values::ValueError;
use hindsight_projections::users::UserView;
use uuid::Uuid;

use crate::auth::AuthUser;
use crate::error::{ApiError, FieldErrors};
use crate::request_id::RequestId;
use crate::state::AppState;

/// The metadata envelope of a client's own command.
pub fn metadata(actor: Actor, request: &RequestId) -> EventMetadata {
    EventMetadata::for_request(actor, request.0.clone())
}

pub fn actor(user: &AuthUser) -> Actor {
    Actor::user(user.id, user.role)
}

/// Collects per-field validation failures, answered together as 422.
#[derive(Debug, Default)]
pub struct Fields(FieldErrors);

impl Fields {
    pub fn check<T>(&mut self, field: &str, parsed: Result<T, ValueError>) -> Option<T> {
        match parsed {
            Ok(value) => Some(value),
            Err(error) => {
                self.fail(field, error.to_string());
                None
            }
        }
    }

    pub fn fail(&mut self, field: &str, reason: impl Into<String>) {
        self.0
            .entry(field.to_owned())
            .or_default()
            .push(reason.into());
    }

    pub fn finish(self) -> Result<(), ApiError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(ApiError::Validation(self.0))
        }
    }
}

/// First and last `recorded_at` of an aggregate's events.
pub async fn recorded_span(
    state: &AppState,
    aggregate_type: &str,
    id: Uuid,
) -> Result<(DateTime<Utc>, DateTime<Utc>), ApiError> {
    let span: (Option<DateTime<Utc>>, Option<DateTime<Utc>>) = sqlx::query_as(
        "SELECT min(recorded_at), max(recorded_at) FROM events \
         WHERE aggregate_type = $1 AND aggregate_id = $2",
    )
    .bind(aggregate_type)
    .bind(id.to_string())
    .fetch_one(&state.pool)
    .await
    .map_err(ApiError::from_sqlx)?;
    match span {
        (Some(first), Some(last)) => Ok((first, last)),
        _ => Err(ApiError::NotFound),
    }
}

/// The user view as of the write just made, from the event store (the read model may not
/// have caught up yet, and must not be waited for: NATS may be down).
pub async fn user_view_from_store(state: &AppState, id: Uuid) -> Result<UserView, ApiError> {
    let loaded = state
        .commands
        .users
        .load(id)
        .await?
        .ok_or(ApiError::NotFound)?;
    let user = loaded.state;
    let (created_at, updated_at) = recorded_span(state, "user", id).await?;
    match (user.email(), user.name(), user.role(), user.status()) {
        (Some(email), Some(name), Some(role), Some(status)) => Ok(UserView {
            id: UserId::from_uuid(id),
            email: email.as_str().to_owned(),
            name: name.as_str().to_owned(),
            role,
            status,
            created_at,
            updated_at,
            version: loaded.version as i64,
        }),
        _ => Err(ApiError::NotFound),
    }
}
