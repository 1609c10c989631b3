//! `/auth`: register, login, refresh, logout.

use std::collections::HashMap;
use std::num::NonZeroU32;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::State;
use axum::http::Method;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use chrono::{DateTime, Utc};
use governor::{DefaultKeyedRateLimiter, Quota, RateLimiter};
use hindsight_commands::Actor;
use hindsight_domain::ids::UserId;
use hindsight_domain::role::Role;
use hindsight_domain::user::{PasswordHash, UserCommand};
use hindsight_domain::values::{Email, PersonName};
use hindsight_projections::users::UserView;
use secrecy::SecretString;
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;
use uuid::Uuid;

use crate::auth::{access_of, hash_refresh_token};
use crate::error::ApiError;
use crate::extract::{ApiJson, CommandAnswer};
use crate::password::{check_policy, PasswordError};
use crate::request_id::RequestId;
use crate::routes::support::{metadata, user_view_from_store, Fields};
use crate::routes::Routes;
use crate::state::AppState;

pub fn routes(routes: Routes) -> Routes {
    routes
        .add(Method::POST, "/auth/register", register)
        .add(Method::POST, "/auth/login", login)
        .add(Method::POST, "/auth/refresh", refresh)
        .add(Method::POST, "/auth/logout", logout)
}

/// Failed logins per account: at most N an hour, then 429 until the window allows more.
/// The counting is governor's; this only remembers which accounts are locked, so a locked
/// account is refused before any password is hashed.
#[derive(Debug)]
pub struct LoginThrottle {
    failures: DefaultKeyedRateLimiter<String>,
    locked: Mutex<HashMap<String, Instant>>,
}

impl LoginThrottle {
    pub fn per_hour(failures: u32) -> Self {
        let failures = failures.max(2);
        // The limiter refuses the `failures`-th failure within the window (a burst of one
        // less), which locks the account: that many failures, then no more attempts.
        let burst = NonZeroU32::new(failures - 1).unwrap_or(NonZeroU32::MIN);
        let period = Duration::from_secs(3600) / failures;
        let quota = Quota::with_period(period)
            .unwrap_or_else(|| Quota::per_hour(burst))
            .allow_burst(burst);
        Self {
            failures: RateLimiter::keyed(quota),
            locked: Mutex::new(HashMap::new()),
        }
    }

    fn locked_for(&self, account: &str) -> Option<Duration> {
        let mut locked = self.locked.lock().ok()?;
        let until = *locked.get(account)?;
        let now = Instant::now();
        if until > now {
            Some(until - now)
        } else {
            locked.remove(account);
            None
        }
    }

    fn record_failure(&self, account: &str) {
        if let Err(not_until) = self.failures.check_key(&account.to_owned()) {
            let wait = not_until.wait_time_from(governor::clock::Clock::now(
                &governor::clock::DefaultClock::default(),
            ));
            if let Ok(mut locked) = self.locked.lock() {
                locked.insert(account.to_owned(), Instant::now() + wait);
            }
        }
    }
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct RegisterRequest {
    #[schema(format = Email)]
    email: String,
    /// 8 to 128 characters.
    #[schema(min_length = 8, max_length = 128)]
    password: String,
    name: String,
}

/// What `register` answers, besides the command's `position`.
#[derive(Debug, Serialize, ToSchema)]
pub(crate) struct Registered {
    /// The new user, a `customer`.
    user: UserView,
}

async fn register(
    State(state): State<AppState>,
    request_id: RequestId,
    ApiJson(body): ApiJson<RegisterRequest>,
) -> Result<CommandAnswer, ApiError> {
    let mut fields = Fields::default();
    let email = fields.check("email", Email::parse(&body.email));
    let name = fields.check("name", PersonName::parse(&body.name));
    if check_policy(&body.password).is_err() {
        fields.fail("password", "must be 8 to 128 characters");
    }
    fields.finish()?;
    let (Some(email), Some(name)) = (email, name) else {
        return Err(ApiError::internal("validated fields missing"));
    };
    let hash = state
        .passwords
        .hash(&SecretString::from(body.password))
        .await
        .map_err(password_failure)?;
    let password_hash = PasswordHash::new(hash).map_err(ApiError::internal)?;
    let user_id = UserId::new();
    let executed = state
        .commands
        .users
        .execute_new(
            user_id.as_uuid(),
            UserCommand::Register {
                user_id,
                email,
                name,
                password_hash,
                role: Role::Customer,
            },
            &metadata(Actor::anonymous(), &request_id),
        )
        .await??;
    let user = user_view_from_store(&state, user_id.as_uuid()).await?;
    let body = serde_json::to_value(Registered { user }).map_err(ApiError::internal)?;
    Ok(CommandAnswer::created(body, executed.position))
}

fn password_failure(error: PasswordError) -> ApiError {
    match error {
        PasswordError::Length => ApiError::validation("password", "must be 8 to 128 characters"),
        other => ApiError::internal(other),
    }
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct LoginRequest {
    email: String,
    password: String,
}

async fn login(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<LoginRequest>,
) -> Result<Response, ApiError> {
    // One answer for every failure: unknown address, wrong password, deactivated user.
    let email = Email::parse(&body.email);
    let account = email
        .as_ref()
        .map(|email| email.key())
        .unwrap_or_else(|_| body.email.trim().to_lowercase());
    if let Some(wait) = state.login_throttle.locked_for(&account) {
        return Err(ApiError::RateLimited { retry_after: wait });
    }
    // Only a valid address can belong to a user; anything else (such as text Postgres
    // cannot store) is not looked up, and fails like an unknown address.
    let user_id: Option<String> = match email {
        Ok(_) => sqlx::query_scalar(
            "SELECT aggregate_id FROM unique_keys WHERE kind = 'email' AND key = $1",
        )
        .bind(&account)
        .fetch_optional(&state.pool)
        .await
        .map_err(ApiError::from_sqlx)?,
        Err(_) => None,
    };
    let user_id = user_id.and_then(|id| Uuid::parse_str(&id).ok());
    let loaded = match user_id {
        Some(id) => state.commands.users.load(id).await?,
        None => None,
    };
    let hash = loaded
        .as_ref()
        .and_then(|loaded| loaded.state.password_hash())
        .map(|hash| hash.as_str().to_owned());
    let password = SecretString::from(body.password);
    let matches = state
        .passwords
        .verify(&password, hash.as_deref())
        .await
        .map_err(ApiError::internal)?;
    let active = loaded
        .as_ref()
        .is_some_and(|loaded| loaded.state.is_active());
    let (Some(id), true, true) = (user_id, matches, active) else {
        state.login_throttle.record_failure(&account);
        return Err(ApiError::Unauthenticated);
    };
    let access = access_of(&state.pool, id)
        .await?
        .ok_or(ApiError::Unauthenticated)?;
    let pair = state
        .tokens
        .issue_pair(&state.pool, id, access.role, access.token_version, None)
        .await?;
    Ok(Json(pair).into_response())
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub(crate) struct RefreshRequest {
    refresh_token: String,
}

async fn revoke_family(state: &AppState, family: Uuid) -> Result<(), ApiError> {
    sqlx::query(
        "UPDATE refresh_families SET revoked_at = now() WHERE family_id = $1 AND revoked_at IS NULL",
    )
    .bind(family)
    .execute(&state.pool)
    .await
    .map_err(ApiError::from_sqlx)?;
    Ok(())
}

/// Ends every refresh family of a user (password change, deactivation).
pub async fn revoke_user_sessions(state: &AppState, user: Uuid) -> Result<(), ApiError> {
    sqlx::query(
        "UPDATE refresh_families SET revoked_at = now() WHERE user_id = $1 AND revoked_at IS NULL",
    )
    .bind(user)
    .execute(&state.pool)
    .await
    .map_err(ApiError::from_sqlx)?;
    Ok(())
}

/// A refresh token's row and its family's revocation.
#[derive(Debug, sqlx::FromRow)]
struct StoredRefresh {
    family_id: Uuid,
    user_id: Uuid,
    expires_at: DateTime<Utc>,
    spent_at: Option<DateTime<Utc>>,
    revoked_at: Option<DateTime<Utc>>,
}

async fn refresh(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<RefreshRequest>,
) -> Result<Response, ApiError> {
    let hash = hash_refresh_token(&body.refresh_token);
    let row: Option<StoredRefresh> = sqlx::query_as(
        "SELECT t.family_id, t.user_id, t.expires_at, t.spent_at, f.revoked_at \
         FROM refresh_tokens t JOIN refresh_families f USING (family_id) \
         WHERE t.token_hash = $1",
    )
    .bind(&hash)
    .fetch_optional(&state.pool)
    .await
    .map_err(ApiError::from_sqlx)?;
    let Some(StoredRefresh {
        family_id: family,
        user_id: user,
        expires_at,
        spent_at,
        revoked_at,
    }) = row
    else {
        return Err(ApiError::Unauthenticated);
    };
    if revoked_at.is_some() || expires_at <= Utc::now() {
        return Err(ApiError::Unauthenticated);
    }
    if spent_at.is_some() {
        // A spent token presented again: whoever holds the family is not to be trusted.
        tracing::warn!(%user, %family, "refresh token reuse; family revoked");
        revoke_family(&state, family).await?;
        return Err(ApiError::Unauthenticated);
    }
    let spent = sqlx::query(
        "UPDATE refresh_tokens SET spent_at = now() WHERE token_hash = $1 AND spent_at IS NULL",
    )
    .bind(&hash)
    .execute(&state.pool)
    .await
    .map_err(ApiError::from_sqlx)?;
    if spent.rows_affected() != 1 {
        // Raced with another use of the same token: that is reuse too.
        revoke_family(&state, family).await?;
        return Err(ApiError::Unauthenticated);
    }
    let access = access_of(&state.pool, user)
        .await?
        .ok_or(ApiError::Unauthenticated)?;
    if !access.active {
        return Err(ApiError::Unauthenticated);
    }
    let pair = state
        .tokens
        .issue_pair(
            &state.pool,
            user,
            access.role,
            access.token_version,
            Some((family, expires_at)),
        )
        .await?;
    Ok(Json(pair).into_response())
}

async fn logout(
    State(state): State<AppState>,
    ApiJson(body): ApiJson<RefreshRequest>,
) -> Result<StatusCode, ApiError> {
    let family: Option<Uuid> =
        sqlx::query_scalar("SELECT family_id FROM refresh_tokens WHERE token_hash = $1")
            .bind(hash_refresh_token(&body.refresh_token))
            .fetch_optional(&state.pool)
            .await
            .map_err(ApiError::from_sqlx)?;
    if let Some(family) = family {
        revoke_family(&state, family).await?;
    }
    Ok(StatusCode::NO_CONTENT)
}

/// Shared handle type for the state.
pub type SharedThrottle = Arc<LoginThrottle>;
