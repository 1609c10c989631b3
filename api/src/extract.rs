//! Request extractors whose rejections are the API's own errors: JSON bodies, empty
//! bodies, `If-Match`, list paging, and `min_position` waits.

use std::time::Duration;

use axum::extract::rejection::{JsonRejection, QueryRejection};
use axum::extract::{FromRequest, FromRequestParts, Query, Request};
use axum::http::request::Parts;
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use hindsight_projections::page::PageRequest;
use hindsight_projections::progress::Waited;
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::error::ApiError;
use crate::state::AppState;

pub const X_EVENT_POSITION: &str = "x-event-position";
pub const X_PROJECTION_POSITION: &str = "x-projection-position";

fn is_json(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.split(';').next())
        .is_some_and(|mime| {
            let mime = mime.trim().to_ascii_lowercase();
            mime == "application/json"
                || (mime.starts_with("application/") && mime.ends_with("+json"))
        })
}

/// A JSON body: 415 unless JSON, 413 past the limit, 400 when malformed or of wrong
/// types, 422 for unknown fields (request types deny them) or missing ones.
#[derive(Debug, Clone, Copy, Default)]
pub struct ApiJson<T>(pub T);

fn json_rejection(rejection: JsonRejection) -> ApiError {
    match rejection {
        JsonRejection::MissingJsonContentType(_) => ApiError::UnsupportedMediaType,
        JsonRejection::JsonDataError(error) => {
            let detail = error.body_text();
            if detail.contains("unknown field") || detail.contains("missing field") {
                let (field, reason) = describe_data_error(&detail);
                ApiError::validation(&field, reason)
            } else {
                ApiError::Malformed("request body has the wrong shape or types".to_owned())
            }
        }
        JsonRejection::JsonSyntaxError(_) => {
            ApiError::Malformed("request body is not valid JSON".to_owned())
        }
        other if other.status() == StatusCode::PAYLOAD_TOO_LARGE => ApiError::PayloadTooLarge,
        _ => ApiError::Malformed("request body could not be read".to_owned()),
    }
}

/// Turns serde's "unknown field `x`, expected ..." into (`x`, reason).
fn describe_data_error(detail: &str) -> (String, &'static str) {
    let field = detail
        .split('`')
        .nth(1)
        .filter(|name| name.len() <= 64)
        .unwrap_or("body")
        .to_owned();
    let reason = if detail.contains("unknown field") {
        "is not a known field"
    } else {
        "is required"
    };
    (field, reason)
}

impl<T: DeserializeOwned> FromRequest<AppState> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &AppState) -> Result<Self, ApiError> {
        match axum::Json::<T>::from_request(request, state).await {
            Ok(axum::Json(value)) => Ok(Self(value)),
            Err(rejection) => Err(json_rejection(rejection)),
        }
    }
}

/// A body that may be absent: empty means `None`, otherwise it must be JSON of `T`.
#[derive(Debug, Clone, Default)]
pub struct OptionalJson<T>(pub Option<T>);

async fn optional_body<T: DeserializeOwned>(
    request: Request,
    state: &AppState,
) -> Result<Option<T>, ApiError> {
    let json = is_json(request.headers());
    let bytes = axum::body::Bytes::from_request(request, state)
        .await
        .map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::PayloadTooLarge
            } else {
                ApiError::Malformed("request body could not be read".to_owned())
            }
        })?;
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    if !json {
        return Err(ApiError::UnsupportedMediaType);
    }
    match serde_json::from_slice::<T>(&bytes) {
        Ok(value) => Ok(Some(value)),
        Err(error) if error.is_data() => {
            let detail = error.to_string();
            if detail.contains("unknown field") || detail.contains("missing field") {
                let (field, reason) = describe_data_error(&detail);
                Err(ApiError::validation(&field, reason))
            } else {
                Err(ApiError::Malformed(
                    "request body has the wrong shape or types".to_owned(),
                ))
            }
        }
        Err(_) => Err(ApiError::Malformed(
            "request body is not valid JSON".to_owned(),
        )),
    }
}

impl<T: DeserializeOwned> FromRequest<AppState> for OptionalJson<T> {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &AppState) -> Result<Self, ApiError> {
        optional_body(request, state).await.map(Self)
    }
}

/// The body of a command that takes no fields: empty, or `{}`.
#[derive(Debug, Clone, Copy)]
pub struct NoFields;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct Empty {}

impl FromRequest<AppState> for NoFields {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &AppState) -> Result<Self, ApiError> {
        optional_body::<Empty>(request, state).await.map(|_| Self)
    }
}

/// A path parameter; one that does not parse (an id that is not a UUID) names no
/// resource, so it is 404 in the error envelope rather than axum's plain-text 400.
#[derive(Debug, Clone, Copy)]
pub struct ApiPath<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for ApiPath<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|axum::extract::Path(value)| Self(value))
            .map_err(|_| ApiError::NotFound)
    }
}

/// `If-Match: "<version>"`: the version the client expects the aggregate to be at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IfMatch(pub Option<u64>);

impl<S: Send + Sync> FromRequestParts<S> for IfMatch {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, ApiError> {
        let Some(value) = parts.headers.get(header::IF_MATCH) else {
            return Ok(Self(None));
        };
        let text = value
            .to_str()
            .map_err(|_| ApiError::Malformed("If-Match is not a valid entity tag".to_owned()))?
            .trim();
        let text = text.strip_prefix("W/").unwrap_or(text);
        let version = text
            .strip_prefix('"')
            .and_then(|rest| rest.strip_suffix('"'))
            .and_then(|inner| inner.parse::<u64>().ok())
            .ok_or_else(|| {
                ApiError::Malformed("If-Match must be a quoted version such as \"3\"".to_owned())
            })?;
        Ok(Self(Some(version)))
    }
}

/// A query string of the API's own: malformed syntax is 400, well-formed but invalid
/// values (such as an unknown filter value) 422.
#[derive(Debug, Clone, Copy, Default)]
pub struct ApiQuery<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        match Query::<T>::from_request_parts(parts, state).await {
            Ok(Query(value)) => Ok(Self(value)),
            Err(QueryRejection::FailedToDeserializeQueryString(error)) => {
                let detail = error.body_text();
                let (field, _) = describe_data_error(&detail);
                Err(ApiError::validation(&field, "is not a valid value here"))
            }
            Err(_) => Err(ApiError::Malformed("query string is malformed".to_owned())),
        }
    }
}

/// `limit` and `cursor` of a list (query structs carry them inline: flattened structs
/// lose their types in query strings).
#[derive(Debug, Clone, Copy)]
pub struct Paging;

impl Paging {
    pub fn page(limit: Option<u32>, cursor: Option<String>) -> Result<PageRequest, ApiError> {
        PageRequest::new(limit, cursor)
            .map_err(|_| ApiError::validation("limit", "must be between 1 and 100"))
    }
}

/// `min_position`: the query answers only once its read model has applied it.
#[derive(Debug, Clone, Copy, Default, Deserialize, utoipa::IntoParams)]
#[into_params(parameter_in = Query)]
pub struct MinPosition {
    /// Answer only once the read model has applied this global position (a write's
    /// `position`); past the configured wait, 503 `PROJECTION_LAGGING`.
    #[param(minimum = 0)]
    pub min_position: Option<i64>,
}

impl MinPosition {
    pub fn at(min_position: Option<i64>) -> Self {
        Self { min_position }
    }

    /// Waits (bounded) for read model `projection` and returns the position it has
    /// applied, or 503 `PROJECTION_LAGGING`.
    pub async fn wait(&self, state: &AppState, projection: &str) -> Result<i64, ApiError> {
        let progress = &state.progress;
        match self.min_position {
            None => progress
                .position(projection)
                .await
                .map_err(ApiError::from_sqlx),
            Some(position) if position < 0 => Err(ApiError::validation(
                "min_position",
                "must be a non-negative position",
            )),
            Some(position) => {
                match progress
                    .wait_for(projection, position, state.settings.projection_wait)
                    .await
                    .map_err(ApiError::from_sqlx)?
                {
                    Waited::Reached(at) => Ok(at),
                    Waited::Lagging(_) => Err(ApiError::ProjectionLagging {
                        retry_after: Duration::from_secs(1),
                    }),
                }
            }
        }
    }
}

/// A read answer: the body plus `X-Projection-Position` and, for one resource, `ETag`.
#[derive(Debug)]
pub struct ReadAnswer<T> {
    pub body: T,
    pub projection_position: i64,
    pub version: Option<i64>,
}

impl<T: Serialize> IntoResponse for ReadAnswer<T> {
    fn into_response(self) -> Response {
        let mut response = axum::Json(self.body).into_response();
        let headers = response.headers_mut();
        headers.insert(
            X_PROJECTION_POSITION,
            HeaderValue::from(self.projection_position),
        );
        if let Some(version) = self.version {
            if let Ok(etag) = HeaderValue::from_str(&format!("\"{version}\"")) {
                headers.insert(header::ETAG, etag);
            }
        }
        response
    }
}

/// A command's answer: status, body (which carries `position`) and `X-Event-Position`.
#[derive(Debug)]
pub struct CommandAnswer {
    pub status: StatusCode,
    pub body: serde_json::Value,
    pub position: i64,
}

impl CommandAnswer {
    pub fn ok(mut body: serde_json::Value, position: i64) -> Self {
        if let Some(object) = body.as_object_mut() {
            object.insert("position".to_owned(), position.into());
        }
        Self {
            status: StatusCode::OK,
            body,
            position,
        }
    }

    pub fn created(body: serde_json::Value, position: i64) -> Self {
        Self {
            status: StatusCode::CREATED,
            ..Self::ok(body, position)
        }
    }
}

impl IntoResponse for CommandAnswer {
    fn into_response(self) -> Response {
        let mut response = (self.status, axum::Json(self.body)).into_response();
        response
            .headers_mut()
            .insert(X_EVENT_POSITION, HeaderValue::from(self.position));
        response
    }
}
