//! `X-Request-Id`: echoed when the client's value is 1-128 characters of
//! `A-Za-z0-9._-`, otherwise a fresh UUID. The id is put on the request's tracing span,
//! made available to handlers (for event metadata) and error bodies, and set on every
//! response.
//!
//! Each request's outcome (status and latency) is logged at `debug` under the target
//! [`ACCESS_LOG`], so an access log is one `RUST_LOG` directive away
//! (`RUST_LOG=info,hindsight_api::access=debug`) and costs nothing when off. At `info` it
//! was a fifth of the server's CPU for a product read (BENCHMARKS.md). Failures are logged
//! where they are handled (`crate::error`), at `warn` or `error`, whatever this line's level.

use axum::extract::{FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{HeaderName, HeaderValue};
use axum::middleware::Next;
use axum::response::Response;
use tracing::Instrument;

pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// The target of the access log's lines, one per request served, at `debug`.
pub const ACCESS_LOG: &str = "hindsight_api::access";

tokio::task_local! {
    static CURRENT: RequestId;
}

/// The id of the request being served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RequestId(pub String);

impl RequestId {
    /// The id of the request this task serves, if any.
    pub fn current() -> Option<RequestId> {
        CURRENT.try_with(Clone::clone).ok()
    }

    fn accept(value: &str) -> bool {
        (1..=128).contains(&value.len())
            && value
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    }

    fn from_headers(headers: &axum::http::HeaderMap) -> RequestId {
        headers
            .get(&X_REQUEST_ID)
            .and_then(|value| value.to_str().ok())
            .filter(|value| Self::accept(value))
            .map(|value| RequestId(value.to_owned()))
            .unwrap_or_else(|| RequestId(uuid::Uuid::new_v4().to_string()))
    }
}

impl<S: Send + Sync> FromRequestParts<S> for RequestId {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        Ok(parts
            .extensions
            .get::<RequestId>()
            .cloned()
            .unwrap_or_else(|| RequestId::from_headers(&parts.headers)))
    }
}

/// Middleware: assigns the id, opens the request span, logs the outcome to [`ACCESS_LOG`],
/// echoes the header.
pub async fn middleware(mut request: Request, next: Next) -> Response {
    let id = RequestId::from_headers(request.headers());
    request.extensions_mut().insert(id.clone());
    let span = tracing::info_span!(
        "request",
        request_id = %id.0,
        method = %request.method(),
        path = %request.uri().path(),
    );
    let started = std::time::Instant::now();
    let mut response = CURRENT
        .scope(id.clone(), next.run(request))
        .instrument(span.clone())
        .await;
    span.in_scope(|| {
        tracing::debug!(
            target: ACCESS_LOG,
            status = response.status().as_u16(),
            latency_ms = started.elapsed().as_secs_f64() * 1000.0,
            "request served"
        );
    });
    if let Ok(value) = HeaderValue::from_str(&id.0) {
        response.headers_mut().insert(X_REQUEST_ID.clone(), value);
    }
    response
}

#[cfg(test)]
#[allow(clippy::expect_used)]
mod tests {
    use std::sync::{Arc, Mutex};

    use axum::body::Body;
    use axum::routing::get;
    use axum::Router;
    use tower::ServiceExt as _;
    use tracing::field::{Field, Visit};
    use tracing::{Event, Level, Subscriber};
    use tracing_subscriber::layer::{Context, SubscriberExt as _};
    use tracing_subscriber::registry::LookupSpan;
    use tracing_subscriber::Layer;

    use super::*;

    /// What the recorder kept of one event: target, level, its span's name, its `status`.
    type Seen = (String, Level, Option<String>, Option<u64>);

    struct Recorder(Arc<Mutex<Vec<Seen>>>);

    struct Status(Option<u64>);

    impl Visit for Status {
        fn record_u64(&mut self, field: &Field, value: u64) {
            if field.name() == "status" {
                self.0 = Some(value);
            }
        }

        fn record_debug(&mut self, _: &Field, _: &dyn std::fmt::Debug) {}
    }

    impl<S: Subscriber + for<'a> LookupSpan<'a>> Layer<S> for Recorder {
        fn on_event(&self, event: &Event<'_>, context: Context<'_, S>) {
            let mut status = Status(None);
            event.record(&mut status);
            let span = context.event_span(event).map(|span| span.name().to_owned());
            let meta = event.metadata();
            if let Ok(mut seen) = self.0.lock() {
                seen.push((meta.target().to_owned(), *meta.level(), span, status.0));
            }
        }
    }

    #[tokio::test]
    async fn each_request_is_logged_once_at_debug_under_the_access_target() {
        let seen = Arc::new(Mutex::new(Vec::new()));
        let subscriber = tracing_subscriber::registry().with(Recorder(Arc::clone(&seen)));
        let _default = tracing::subscriber::set_default(subscriber);
        let app = Router::new()
            .route(
                "/teapot",
                get(|| async { axum::http::StatusCode::IM_A_TEAPOT }),
            )
            .layer(axum::middleware::from_fn(middleware));

        let request = Request::get("/teapot")
            .header(&X_REQUEST_ID, "client-id-1")
            .body(Body::empty())
            .expect("a static request");
        let response = app.oneshot(request).await.expect("infallible");

        assert_eq!(response.status().as_u16(), 418);
        assert_eq!(response.headers()[&X_REQUEST_ID], "client-id-1");
        let seen = seen.lock().expect("not poisoned").clone();
        assert_eq!(
            seen,
            vec![(
                ACCESS_LOG.to_owned(),
                Level::DEBUG,
                Some("request".to_owned()),
                Some(418)
            )]
        );
    }

    #[test]
    fn valid_client_ids_are_kept_and_others_replaced() {
        assert!(RequestId::accept("abc-123_x.y"));
        assert!(RequestId::accept(&"a".repeat(128)));
        assert!(!RequestId::accept(&"a".repeat(129)));
        assert!(!RequestId::accept(""));
        assert!(!RequestId::accept("has space"));
        assert!(!RequestId::accept("semi;colon"));
    }
}
