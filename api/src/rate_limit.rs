//! Per-IP rate limits (governor's GCRA): a global limit on every request and a stricter
//! one on the authentication endpoints. Over the limit is 429 `RATE_LIMITED` with
//! `Retry-After`. `HINDSIGHT_RATE_LIMITS=off` removes both (behind a proxy that limits,
//! or for load tests); the per-account failed-login limit is separate and always on.

use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::time::Duration;

use axum::extract::{ConnectInfo, Request, State};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use governor::clock::{Clock, DefaultClock};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};

use crate::error::ApiError;
use crate::state::AppState;

/// The per-IP limiters.
#[derive(Debug)]
pub struct RateLimits {
    global: DefaultKeyedRateLimiter<IpAddr>,
    auth: DefaultKeyedRateLimiter<IpAddr>,
}

fn non_zero(value: u32) -> NonZeroU32 {
    NonZeroU32::new(value.max(1)).unwrap_or(NonZeroU32::MIN)
}

impl RateLimits {
    /// `per_second` requests per IP (bursts of twice that), and `auth_per_minute` calls
    /// of login, refresh and register per IP.
    pub fn new(per_second: u32, auth_per_minute: u32) -> Self {
        Self {
            global: RateLimiter::keyed(
                Quota::per_second(non_zero(per_second)).allow_burst(non_zero(per_second * 2)),
            ),
            auth: RateLimiter::keyed(Quota::per_minute(non_zero(auth_per_minute))),
        }
    }

    /// Forgets idle clients so the tables do not grow without bound.
    pub fn forget_idle(&self) {
        self.global.retain_recent();
        self.auth.retain_recent();
    }

    fn check(limiter: &DefaultKeyedRateLimiter<IpAddr>, ip: IpAddr) -> Result<(), Duration> {
        limiter
            .check_key(&ip)
            .map_err(|not_until| not_until.wait_time_from(DefaultClock::default().now()))
    }
}

fn is_auth(path: &str) -> bool {
    matches!(
        path,
        "/api/v1/auth/login" | "/api/v1/auth/refresh" | "/api/v1/auth/register"
    )
}

pub async fn layer(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let Some(limits) = state.rate_limits.as_deref() else {
        return next.run(request).await;
    };
    let Some(ConnectInfo(peer)) = request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .copied()
    else {
        return next.run(request).await;
    };
    let ip = peer.ip();
    let mut verdict = RateLimits::check(&limits.global, ip);
    if verdict.is_ok() && is_auth(request.uri().path()) {
        verdict = RateLimits::check(&limits.auth, ip);
    }
    match verdict {
        Ok(()) => next.run(request).await,
        Err(wait) => {
            tracing::info!(%ip, path = request.uri().path(), "rate limited");
            ApiError::RateLimited { retry_after: wait }.into_response()
        }
    }
}
