//! The shared application state handed to every handler.

use std::ops::Deref;
use std::sync::Arc;

use hindsight_commands::statements::Lent;
use hindsight_commands::CommandBus;
use hindsight_projections::progress::ProjectionProgress;
use sqlx::PgPool;

use crate::access::AccessCache;
use crate::auth::Tokens;
use crate::error::ApiError;
use crate::password::Passwords;
use crate::rate_limit::RateLimits;
use crate::routes::auth::LoginThrottle;

/// What every handler shares, behind one reference count: extractors and middleware clone
/// the state several times per request, and cloning the services themselves would touch
/// a dozen counters each time.
#[derive(Debug, Clone)]
pub struct AppState(Arc<Services>);

impl AppState {
    pub fn new(services: Services) -> Self {
        Self(Arc::new(services))
    }
}

impl Deref for AppState {
    type Target = Services;

    fn deref(&self) -> &Services {
        &self.0
    }
}

/// The services behind [`AppState`].
#[derive(Debug)]
pub struct Services {
    pub commands: CommandBus,
    pub pool: PgPool,
    pub nats: Option<async_nats::Client>,
    pub passwords: Passwords,
    pub progress: ProjectionProgress,
    pub settings: Arc<HttpSettings>,
    pub tokens: Arc<Tokens>,
    /// Callers' rows of `user_access`, kept while no change to them is announced.
    pub access: AccessCache,
    pub login_throttle: Arc<LoginThrottle>,
    /// Per-IP limits; `None` when switched off.
    pub rate_limits: Option<Arc<RateLimits>>,
    /// Signs and checks the integrity checkpoints.
    pub integrity_key: Arc<hindsight_commands::integrity::IntegrityKey>,
}

impl Services {
    /// A connection for a read that is one statement, handed back with
    /// [`Lent::give_back`] (see [`hindsight_commands::statements`]).
    pub async fn lend(&self) -> Result<Lent, ApiError> {
        self.commands
            .statements()
            .acquire()
            .await
            .map_err(ApiError::from_sqlx)
    }
}

/// The HTTP layer's own settings, taken from the configuration at start-up.
#[derive(Debug, Clone)]
pub struct HttpSettings {
    pub body_limit: usize,
    pub request_timeout: std::time::Duration,
    pub cors_origins: Vec<String>,
    pub hsts: bool,
    pub projection_wait: std::time::Duration,
    pub idempotency_ttl: std::time::Duration,
}

impl Default for HttpSettings {
    fn default() -> Self {
        Self {
            body_limit: 64 * 1024,
            request_timeout: std::time::Duration::from_secs(10),
            cors_origins: Vec::new(),
            hsts: false,
            projection_wait: std::time::Duration::from_secs(2),
            idempotency_ttl: std::time::Duration::from_secs(24 * 3600),
        }
    }
}
