//! The one error type of the HTTP layer and the contract's error envelope:
//! `{"error": {"code", "message", "details"?, "request_id"}}`.
//!
//! Refusals (a business rule said no) and infrastructure failures stay apart until here:
//! a refusal becomes 4xx with its rule's code, an infrastructure failure is logged once,
//! with its cause, and answered with a generic message.

use std::collections::BTreeMap;
use std::time::Duration;

use axum::http::{header, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use hindsight_commands::{Refusal, StoreError};
use hindsight_domain::RuleViolation;
use serde_json::json;

use crate::request_id::RequestId;

/// Field name to the reasons it was refused.
pub type FieldErrors = BTreeMap<String, Vec<String>>;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// 400 `MALFORMED_REQUEST`: not JSON, wrong types, bad query syntax.
    #[error("{0}")]
    Malformed(String),
    /// 401 `UNAUTHENTICATED`.
    #[error("authentication required")]
    Unauthenticated,
    /// 403 `FORBIDDEN`.
    #[error("not allowed")]
    Forbidden,
    /// 404 `NOT_FOUND`.
    #[error("not found")]
    NotFound,
    /// 405 `METHOD_NOT_ALLOWED`: the route exists, the method does not.
    #[error("method not allowed")]
    MethodNotAllowed,
    /// 409 with the refusing rule's own code.
    #[error("{message}")]
    Conflict { code: &'static str, message: String },
    /// 412 `VERSION_MISMATCH`.
    #[error("the resource was changed since version {expected}")]
    VersionMismatch { expected: u64 },
    /// 413 `PAYLOAD_TOO_LARGE`.
    #[error("request body too large")]
    PayloadTooLarge,
    /// 415 `UNSUPPORTED_MEDIA_TYPE`.
    #[error("request body must be application/json")]
    UnsupportedMediaType,
    /// 422 `VALIDATION_FAILED` with per-field reasons.
    #[error("validation failed")]
    Validation(FieldErrors),
    /// 422 with another code, e.g. `IDEMPOTENCY_KEY_REUSED`.
    #[error("{message}")]
    Unprocessable { code: &'static str, message: String },
    /// 429 `RATE_LIMITED` with `Retry-After`.
    #[error("too many requests")]
    RateLimited { retry_after: Duration },
    /// 503 `PROJECTION_LAGGING` with `Retry-After`.
    #[error("the read model has not caught up yet")]
    ProjectionLagging { retry_after: Duration },
    /// 503 `UNAVAILABLE`: a dependency is down.
    #[error("a dependency is unavailable")]
    Unavailable(#[source] Box<dyn std::error::Error + Send + Sync>),
    /// 500 `INTERNAL`: never with detail in the message.
    #[error("internal error")]
    Internal(#[source] Box<dyn std::error::Error + Send + Sync>),
}

impl ApiError {
    pub fn validation(field: &str, reason: impl Into<String>) -> Self {
        let mut details = FieldErrors::new();
        details.insert(field.to_owned(), vec![reason.into()]);
        Self::Validation(details)
    }

    pub fn internal(error: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        Self::Internal(error.into())
    }

    /// A database error: unreachable is 503, anything else 500.
    pub fn from_sqlx(error: sqlx::Error) -> Self {
        if hindsight_commands::db::is_connectivity(&error) {
            Self::Unavailable(Box::new(error))
        } else {
            Self::Internal(Box::new(error))
        }
    }

    pub fn status(&self) -> StatusCode {
        match self {
            Self::Malformed(_) => StatusCode::BAD_REQUEST,
            Self::Unauthenticated => StatusCode::UNAUTHORIZED,
            Self::Forbidden => StatusCode::FORBIDDEN,
            Self::NotFound => StatusCode::NOT_FOUND,
            Self::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Self::Conflict { .. } => StatusCode::CONFLICT,
            Self::VersionMismatch { .. } => StatusCode::PRECONDITION_FAILED,
            Self::PayloadTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Self::Validation(_) | Self::Unprocessable { .. } => StatusCode::UNPROCESSABLE_ENTITY,
            Self::RateLimited { .. } => StatusCode::TOO_MANY_REQUESTS,
            Self::ProjectionLagging { .. } | Self::Unavailable(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Self::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    pub fn code(&self) -> &'static str {
        match self {
            Self::Malformed(_) => "MALFORMED_REQUEST",
            Self::Unauthenticated => "UNAUTHENTICATED",
            Self::Forbidden => "FORBIDDEN",
            Self::NotFound => "NOT_FOUND",
            Self::MethodNotAllowed => "METHOD_NOT_ALLOWED",
            Self::Conflict { code, .. } | Self::Unprocessable { code, .. } => code,
            Self::VersionMismatch { .. } => "VERSION_MISMATCH",
            Self::PayloadTooLarge => "PAYLOAD_TOO_LARGE",
            Self::UnsupportedMediaType => "UNSUPPORTED_MEDIA_TYPE",
            Self::Validation(_) => "VALIDATION_FAILED",
            Self::RateLimited { .. } => "RATE_LIMITED",
            Self::ProjectionLagging { .. } => "PROJECTION_LAGGING",
            Self::Unavailable(_) => "UNAVAILABLE",
            Self::Internal(_) => "INTERNAL",
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let request_id = RequestId::current().map(|id| id.0);
        match &self {
            Self::Internal(cause) => {
                tracing::error!(error = %cause, cause = ?cause.source(), "request failed")
            }
            Self::Unavailable(cause) => {
                tracing::warn!(error = %cause, cause = ?cause.source(), "dependency unavailable")
            }
            _ => {}
        }
        let mut error = json!({
            "code": self.code(),
            "message": self.to_string(),
            "request_id": request_id,
        });
        if let Self::Validation(details) = &self {
            error["details"] = json!(details);
        }
        let retry_after = match &self {
            Self::RateLimited { retry_after } | Self::ProjectionLagging { retry_after } => {
                Some(retry_after.as_secs().max(1))
            }
            Self::Unavailable(_) => Some(1),
            _ => None,
        };
        let mut response = (self.status(), Json(json!({ "error": error }))).into_response();
        if let Some(seconds) = retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

impl From<hindsight_projections::page::QueryError> for ApiError {
    fn from(error: hindsight_projections::page::QueryError) -> Self {
        match error {
            hindsight_projections::page::QueryError::InvalidCursor => {
                Self::validation("cursor", "is not a cursor of this list")
            }
            hindsight_projections::page::QueryError::Database(error) => Self::from_sqlx(error),
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::Unavailable(cause) => Self::Unavailable(cause),
            other => Self::Internal(Box::new(other)),
        }
    }
}

impl<E: RuleViolation + std::fmt::Display> From<Refusal<E>> for ApiError {
    fn from(refusal: Refusal<E>) -> Self {
        match refusal {
            Refusal::Rule(rule) if rule.is_not_found() => Self::NotFound,
            Refusal::VersionMismatch { expected } => Self::VersionMismatch { expected },
            other => Self::Conflict {
                code: other.code(),
                message: other.to_string(),
            },
        }
    }
}
