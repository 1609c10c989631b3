//! `Idempotency-Key`: a retried command replays its first answer instead of running again.
//!
//! The key is scoped to the caller (anonymous callers share one scope) and bound to a
//! hash of the method, path and body. The first request claims the key (`in_progress`),
//! runs, and stores its answer; the same key with the same request replays that answer,
//! with another request it is 422 `IDEMPOTENCY_KEY_REUSED`, and while the first is still
//! running it is 409 `IDEMPOTENCY_KEY_IN_USE`. A server error releases the key so the
//! client can retry; a claim left by a crashed process is taken over after a lease.
//! Keys expire after the configured time.

use axum::body::{to_bytes, Body};
use axum::extract::{Request, State};
use axum::http::{HeaderName, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use sha2::{Digest as _, Sha256};
use uuid::Uuid;

use crate::auth::AuthUser;
use crate::error::ApiError;
use crate::state::AppState;

pub static IDEMPOTENCY_KEY: HeaderName = HeaderName::from_static("idempotency-key");
/// Set on an answer that is a replay of the first one.
pub static IDEMPOTENT_REPLAYED: HeaderName = HeaderName::from_static("idempotent-replayed");

/// How long an unfinished claim blocks the key before another request may take it over.
const LEASE_SECONDS: i64 = 60;

/// Headers of an answer worth replaying.
const REPLAYED_HEADERS: &[&str] = &["content-type", "x-event-position", "etag", "location"];

#[derive(Debug, sqlx::FromRow)]
struct Claim {
    request_hash: Vec<u8>,
    status: String,
    response_status: Option<i16>,
    response_headers: Option<serde_json::Value>,
    response_body: Option<Vec<u8>>,
}

pub async fn layer(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let is_command = matches!(
        *request.method(),
        Method::POST | Method::PUT | Method::PATCH
    );
    let Some(key) = request.headers().get(&IDEMPOTENCY_KEY).cloned() else {
        return next.run(request).await;
    };
    if !is_command {
        return next.run(request).await;
    }
    match claim_and_run(&state, key, request, next).await {
        Ok(response) | Err(response) => response,
    }
}

async fn claim_and_run(
    state: &AppState,
    key: HeaderValue,
    request: Request,
    next: Next,
) -> Result<Response, Response> {
    let key = key
        .to_str()
        .ok()
        .filter(|key| (1..=255).contains(&key.len()))
        .map(str::to_owned)
        .ok_or_else(|| {
            ApiError::validation("Idempotency-Key", "must be 1 to 255 visible characters")
                .into_response()
        })?;
    let user = request
        .extensions()
        .get::<AuthUser>()
        .map_or(Uuid::nil(), |user| user.id);
    let (parts, body) = request.into_parts();
    let body = to_bytes(body, state.settings.body_limit)
        .await
        .map_err(|_| ApiError::PayloadTooLarge.into_response())?;
    let mut hasher = Sha256::new();
    hasher.update(parts.method.as_str().as_bytes());
    hasher.update(b" ");
    hasher.update(parts.uri.path().as_bytes());
    hasher.update(b"\n");
    hasher.update(&body);
    let request_hash = hasher.finalize().to_vec();

    let claimed = claim(state, user, &key, &request_hash)
        .await
        .map_err(IntoResponse::into_response)?;
    if !claimed {
        return Err(existing(state, user, &key, &request_hash).await);
    }
    let response = next.run(Request::from_parts(parts, Body::from(body))).await;
    Ok(record(state, user, &key, response).await)
}

/// Claims the key; `false` if someone holds it.
async fn claim(state: &AppState, user: Uuid, key: &str, hash: &[u8]) -> Result<bool, ApiError> {
    let ttl =
        chrono::Duration::from_std(state.settings.idempotency_ttl).map_err(ApiError::internal)?;
    let claimed: Option<i32> = sqlx::query_scalar(
        "INSERT INTO idempotency_keys AS k (user_id, key, request_hash, status, expires_at) \
         VALUES ($1, $2, $3, 'in_progress', now() + $4) \
         ON CONFLICT (user_id, key) DO UPDATE \
         SET request_hash = EXCLUDED.request_hash, status = 'in_progress', created_at = now(), \
             expires_at = EXCLUDED.expires_at, response_status = NULL, \
             response_headers = NULL, response_body = NULL \
         WHERE k.expires_at < now() \
            OR (k.status = 'in_progress' AND k.request_hash = EXCLUDED.request_hash \
                AND k.created_at < now() - make_interval(secs => $5)) \
         RETURNING 1",
    )
    .bind(user)
    .bind(key)
    .bind(hash)
    .bind(ttl)
    .bind(LEASE_SECONDS as f64)
    .fetch_optional(&state.pool)
    .await
    .map_err(ApiError::from_sqlx)?;
    Ok(claimed.is_some())
}

async fn existing(state: &AppState, user: Uuid, key: &str, hash: &[u8]) -> Response {
    let claim: Result<Option<Claim>, _> = sqlx::query_as(
        "SELECT request_hash, status, response_status, response_headers, response_body \
         FROM idempotency_keys WHERE user_id = $1 AND key = $2",
    )
    .bind(user)
    .bind(key)
    .fetch_optional(&state.pool)
    .await;
    let claim = match claim {
        Ok(Some(claim)) => claim,
        // Released between our insert and this read: ask the client to try again.
        Ok(None) => return in_use(),
        Err(error) => return ApiError::from_sqlx(error).into_response(),
    };
    if claim.request_hash != hash {
        return ApiError::Unprocessable {
            code: "IDEMPOTENCY_KEY_REUSED",
            message: "this Idempotency-Key was used for a different request".to_owned(),
        }
        .into_response();
    }
    if claim.status != "done" {
        return in_use();
    }
    replay(claim)
}

fn in_use() -> Response {
    ApiError::Conflict {
        code: "IDEMPOTENCY_KEY_IN_USE",
        message: "a request with this Idempotency-Key is still being processed".to_owned(),
    }
    .into_response()
}

fn replay(claim: Claim) -> Response {
    let status = claim
        .response_status
        .and_then(|status| u16::try_from(status).ok())
        .and_then(|status| StatusCode::from_u16(status).ok())
        .unwrap_or(StatusCode::OK);
    let mut response = Response::new(Body::from(claim.response_body.unwrap_or_default()));
    *response.status_mut() = status;
    if let Some(serde_json::Value::Object(headers)) = claim.response_headers {
        for (name, value) in headers {
            if let (Ok(name), Some(Ok(value))) = (
                HeaderName::try_from(name.as_str()),
                value.as_str().map(HeaderValue::from_str),
            ) {
                response.headers_mut().insert(name, value);
            }
        }
    }
    response.headers_mut().insert(
        IDEMPOTENT_REPLAYED.clone(),
        HeaderValue::from_static("true"),
    );
    response
}

/// Stores the answer (or releases the key after a server error) and returns it.
async fn record(state: &AppState, user: Uuid, key: &str, response: Response) -> Response {
    let release = || async {
        let _ = sqlx::query("DELETE FROM idempotency_keys WHERE user_id = $1 AND key = $2")
            .bind(user)
            .bind(key)
            .execute(&state.pool)
            .await;
    };
    if response.status().is_server_error() {
        release().await;
        return response;
    }
    let (parts, body) = response.into_parts();
    let Ok(bytes) = to_bytes(body, usize::MAX).await else {
        release().await;
        return ApiError::internal("an answer could not be buffered").into_response();
    };
    let headers: serde_json::Map<String, serde_json::Value> = REPLAYED_HEADERS
        .iter()
        .filter_map(|name| {
            parts
                .headers
                .get(*name)
                .and_then(|value| value.to_str().ok())
                .map(|value| ((*name).to_owned(), value.into()))
        })
        .collect();
    let stored = sqlx::query(
        "UPDATE idempotency_keys SET status = 'done', response_status = $3, \
                response_headers = $4, response_body = $5 \
         WHERE user_id = $1 AND key = $2",
    )
    .bind(user)
    .bind(key)
    .bind(parts.status.as_u16() as i16)
    .bind(serde_json::Value::Object(headers))
    .bind(bytes.as_ref())
    .execute(&state.pool)
    .await;
    if let Err(error) = stored {
        // The command ran; only the replay is lost. Say so, once.
        tracing::error!(%error, "storing an idempotent answer failed");
    }
    Response::from_parts(parts, Body::from(bytes))
}
