//! The shared application state handed to every handler.

use std::sync::Arc;

use hindsight_commands::CommandBus;
use hindsight_projections::progress::ProjectionProgress;
use sqlx::PgPool;

use crate::password::Passwords;

/// Cheap to clone: everything inside is reference counted.
#[derive(Debug, Clone)]
pub struct AppState {
    pub commands: CommandBus,
    pub pool: PgPool,
    pub nats: Option<async_nats::Client>,
    pub passwords: Passwords,
    pub progress: ProjectionProgress,
    pub settings: Arc<HttpSettings>,
}

/// The HTTP layer's own settings, taken from the configuration at start-up.
#[derive(Debug, Clone)]
pub struct HttpSettings {
    pub body_limit: usize,
    pub request_timeout: std::time::Duration,
    pub cors_origins: Vec<String>,
    pub hsts: bool,
}

impl Default for HttpSettings {
    fn default() -> Self {
        Self {
            body_limit: 64 * 1024,
            request_timeout: std::time::Duration::from_secs(10),
            cors_origins: Vec::new(),
            hsts: false,
        }
    }
}
