//! Authentication: access tokens (JWT, HS256 pinned), refresh tokens (opaque, hashed,
//! rotated, with reuse detection), and the [`AuthUser`] extractor.
//!
//! An access token is accepted only if its signature, algorithm, issuer, audience, times
//! and token type check out *and* its `ver` claim still equals the user's token version in
//! `user_access`, which the database bumps in the same transaction as a password change,
//! role change or deactivation (see `migrations/0006_access.sql`): those end existing
//! sessions at once.

use std::time::Duration;

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use base64::Engine as _;
use chrono::{DateTime, Utc};
use hindsight_domain::role::Role;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use rand::RngCore as _;
use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use sqlx::PgPool;
use uuid::Uuid;

use crate::error::ApiError;
use crate::state::AppState;

/// Leeway for clock skew when checking `exp`, `nbf` and `iat`.
const LEEWAY_SECONDS: u64 = 10;
const ACCESS: &str = "access";

/// The claims of an access token; every one is required.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Claims {
    pub iss: String,
    pub aud: String,
    pub sub: Uuid,
    pub role: Role,
    pub jti: Uuid,
    pub iat: i64,
    pub nbf: i64,
    pub exp: i64,
    /// Token type: always `access` (refresh tokens are not JWTs at all).
    pub typ: String,
    /// The user's token version when the token was issued.
    pub ver: i64,
}

/// How access tokens are signed: HS256 with a shared secret (the default), or EdDSA /
/// RS256 with a key pair, so that other services can verify tokens without being able to
/// mint them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum SigningAlgorithm {
    #[value(name = "HS256")]
    Hs256,
    #[value(name = "EdDSA")]
    EdDsa,
    #[value(name = "RS256")]
    Rs256,
}

/// Why signing keys could not be built.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct KeyError(String);

/// Signs and verifies tokens; built once from the configuration.
pub struct Tokens {
    algorithm: Algorithm,
    encoding: EncodingKey,
    decoding: DecodingKey,
    validation: Validation,
    issuer: String,
    audience: String,
    pub access_ttl: Duration,
    pub refresh_ttl: Duration,
}

impl std::fmt::Debug for Tokens {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tokens")
            .field("algorithm", &self.algorithm)
            .field("issuer", &self.issuer)
            .field("audience", &self.audience)
            .field("access_ttl", &self.access_ttl)
            .finish_non_exhaustive()
    }
}

/// A pair handed to a client at login, refresh or password change.
#[derive(Debug, Serialize)]
pub struct TokenPair {
    pub access_token: String,
    pub refresh_token: String,
    pub token_type: &'static str,
    pub expires_in: u64,
}

impl Tokens {
    /// HS256 with a shared secret.
    pub fn new(
        secret: &[u8],
        issuer: &str,
        audience: &str,
        access_ttl: Duration,
        refresh_ttl: Duration,
    ) -> Self {
        Self::with_keys(
            Algorithm::HS256,
            EncodingKey::from_secret(secret),
            DecodingKey::from_secret(secret),
            issuer,
            audience,
            access_ttl,
            refresh_ttl,
        )
    }

    /// EdDSA or RS256 from PEM key files (PKCS#8 private key, SPKI public key).
    #[allow(clippy::too_many_arguments)]
    pub fn from_pem(
        algorithm: SigningAlgorithm,
        private_pem: &[u8],
        public_pem: &[u8],
        issuer: &str,
        audience: &str,
        access_ttl: Duration,
        refresh_ttl: Duration,
    ) -> Result<Self, KeyError> {
        let bad = |what: &str, error: jsonwebtoken::errors::Error| {
            KeyError(format!(
                "{what} is not a usable {algorithm:?} PEM key: {error}"
            ))
        };
        let (algorithm, encoding, decoding) = match algorithm {
            SigningAlgorithm::EdDsa => (
                Algorithm::EdDSA,
                EncodingKey::from_ed_pem(private_pem)
                    .map_err(|error| bad("HINDSIGHT_JWT_PRIVATE_KEY_FILE", error))?,
                DecodingKey::from_ed_pem(public_pem)
                    .map_err(|error| bad("HINDSIGHT_JWT_PUBLIC_KEY_FILE", error))?,
            ),
            SigningAlgorithm::Rs256 => (
                Algorithm::RS256,
                EncodingKey::from_rsa_pem(private_pem)
                    .map_err(|error| bad("HINDSIGHT_JWT_PRIVATE_KEY_FILE", error))?,
                DecodingKey::from_rsa_pem(public_pem)
                    .map_err(|error| bad("HINDSIGHT_JWT_PUBLIC_KEY_FILE", error))?,
            ),
            SigningAlgorithm::Hs256 => {
                return Err(KeyError(
                    "HS256 takes HINDSIGHT_JWT_SECRET, not key files".to_owned(),
                ))
            }
        };
        let tokens = Self::with_keys(
            algorithm,
            encoding,
            decoding,
            issuer,
            audience,
            access_ttl,
            refresh_ttl,
        );
        // A mismatched pair would mint tokens nobody accepts: prove it at start-up.
        let probe = tokens
            .issue_access(Uuid::nil(), Role::Customer, 0)
            .map_err(|_| KeyError("HINDSIGHT_JWT_PRIVATE_KEY_FILE cannot sign".to_owned()))?;
        if tokens.verify_access(&probe).is_none() {
            return Err(KeyError(
                "HINDSIGHT_JWT_PUBLIC_KEY_FILE does not verify what HINDSIGHT_JWT_PRIVATE_KEY_FILE signs"
                    .to_owned(),
            ));
        }
        Ok(tokens)
    }

    fn with_keys(
        algorithm: Algorithm,
        encoding: EncodingKey,
        decoding: DecodingKey,
        issuer: &str,
        audience: &str,
        access_ttl: Duration,
        refresh_ttl: Duration,
    ) -> Self {
        // Pinned: a token signed with any other algorithm (none, HS512, or HS256 with the
        // public key as secret) is refused.
        let mut validation = Validation::new(algorithm);
        validation.set_issuer(&[issuer]);
        validation.set_audience(&[audience]);
        validation.set_required_spec_claims(&["iss", "aud", "sub", "iat", "nbf", "exp"]);
        validation.validate_nbf = true;
        validation.leeway = LEEWAY_SECONDS;
        Self {
            algorithm,
            encoding,
            decoding,
            validation,
            issuer: issuer.to_owned(),
            audience: audience.to_owned(),
            access_ttl,
            refresh_ttl,
        }
    }

    /// Issues an access token for a user at `token_version`.
    pub fn issue_access(
        &self,
        user: Uuid,
        role: Role,
        token_version: i64,
    ) -> Result<String, ApiError> {
        let now = Utc::now().timestamp();
        let claims = Claims {
            iss: self.issuer.clone(),
            aud: self.audience.clone(),
            sub: user,
            role,
            jti: Uuid::new_v4(),
            iat: now,
            nbf: now,
            exp: now + self.access_ttl.as_secs() as i64,
            typ: ACCESS.to_owned(),
            ver: token_version,
        };
        jsonwebtoken::encode(&Header::new(self.algorithm), &claims, &self.encoding)
            .map_err(ApiError::internal)
    }

    /// Verifies an access token's signature, algorithm, claims and type.
    pub fn verify_access(&self, token: &str) -> Option<Claims> {
        if token.len() > 4096 {
            return None;
        }
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation).ok()?;
        let claims = data.claims;
        let issued_in_future = claims.iat > Utc::now().timestamp() + LEEWAY_SECONDS as i64;
        (claims.typ == ACCESS && !issued_in_future).then_some(claims)
    }

    /// Issues a token pair, starting a new refresh family (`family: None`) or continuing one.
    pub async fn issue_pair(
        &self,
        pool: &PgPool,
        user: Uuid,
        role: Role,
        token_version: i64,
        family: Option<(Uuid, DateTime<Utc>)>,
    ) -> Result<TokenPair, ApiError> {
        let access_token = self.issue_access(user, role, token_version)?;
        let mut bytes = [0u8; 32];
        rand::thread_rng().fill_bytes(&mut bytes);
        let refresh_token = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes);
        let (family_id, expires_at) = match family {
            Some(existing) => existing,
            None => {
                let family_id = Uuid::new_v4();
                let expires_at = Utc::now()
                    + chrono::Duration::from_std(self.refresh_ttl).map_err(ApiError::internal)?;
                sqlx::query("INSERT INTO refresh_families (family_id, user_id) VALUES ($1, $2)")
                    .bind(family_id)
                    .bind(user)
                    .execute(pool)
                    .await
                    .map_err(ApiError::from_sqlx)?;
                (family_id, expires_at)
            }
        };
        sqlx::query(
            "INSERT INTO refresh_tokens (token_hash, family_id, user_id, expires_at) \
             VALUES ($1, $2, $3, $4)",
        )
        .bind(hash_refresh_token(&refresh_token))
        .bind(family_id)
        .bind(user)
        .bind(expires_at)
        .execute(pool)
        .await
        .map_err(ApiError::from_sqlx)?;
        Ok(TokenPair {
            access_token,
            refresh_token,
            token_type: "Bearer",
            expires_in: self.access_ttl.as_secs(),
        })
    }
}

pub fn hash_refresh_token(token: &str) -> Vec<u8> {
    Sha256::digest(token.as_bytes()).to_vec()
}

/// What `user_access` says about a user now.
#[derive(Debug, Clone, Copy)]
pub struct Access {
    pub role: Role,
    pub active: bool,
    pub token_version: i64,
}

pub async fn access_of(pool: &PgPool, user: Uuid) -> Result<Option<Access>, ApiError> {
    let row: Option<(String, bool, i64)> =
        sqlx::query_as("SELECT role, active, token_version FROM user_access WHERE user_id = $1")
            .bind(user)
            .fetch_optional(pool)
            .await
            .map_err(ApiError::from_sqlx)?;
    let Some((role, active, token_version)) = row else {
        return Ok(None);
    };
    let role = role
        .parse::<Role>()
        .map_err(|_| ApiError::internal(format!("unknown role `{role}` in user_access")))?;
    Ok(Some(Access {
        role,
        active,
        token_version,
    }))
}

/// The signed-in caller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AuthUser {
    pub id: Uuid,
    pub role: Role,
}

impl AuthUser {
    /// Authenticates the request's bearer token against the current access state.
    pub async fn authenticate(parts: &Parts, state: &AppState) -> Result<Self, ApiError> {
        let header = parts
            .headers
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|value| value.to_str().ok())
            .ok_or(ApiError::Unauthenticated)?;
        let token = header
            .strip_prefix("Bearer ")
            .ok_or(ApiError::Unauthenticated)?;
        let claims = state
            .tokens
            .verify_access(token.trim())
            .ok_or(ApiError::Unauthenticated)?;
        let access = state
            .access
            .get(claims.sub)
            .await?
            .ok_or(ApiError::Unauthenticated)?;
        if !access.active || access.token_version != claims.ver || access.role != claims.role {
            return Err(ApiError::Unauthenticated);
        }
        Ok(Self {
            id: claims.sub,
            role: access.role,
        })
    }
}

impl FromRequestParts<AppState> for AuthUser {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, ApiError> {
        // The authorization layer has usually authenticated the request already.
        if let Some(user) = parts.extensions.get::<AuthUser>() {
            return Ok(*user);
        }
        let user = Self::authenticate(parts, state).await?;
        parts.extensions.insert(user);
        Ok(user)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    // A throwaway Ed25519 key pair for these tests only, and another pair's public key.
    const PRIVATE: &str = "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEIOcRVJTUQvC19g7/Bw4DEGOI72tFxoK3uLNJFduk+9AD\n-----END PRIVATE KEY-----\n";
    const PUBLIC: &str = "-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEAJe+OVIozMib/NiafqBKBzSic0NUIbvaDiO3GHQttHsc=\n-----END PUBLIC KEY-----\n";
    const OTHER_PUBLIC: &str = "-----BEGIN PUBLIC KEY-----\nMCowBQYDK2VwAyEAA0A5kT6C76hEaiMJ4PADratyviRf9HSghpi+lIdT4Tk=\n-----END PUBLIC KEY-----\n";
    const TTL: Duration = Duration::from_secs(900);

    fn eddsa(public: &str) -> Result<Tokens, KeyError> {
        Tokens::from_pem(
            SigningAlgorithm::EdDsa,
            PRIVATE.as_bytes(),
            public.as_bytes(),
            "hindsight",
            "hindsight-api",
            TTL,
            TTL,
        )
    }

    #[test]
    fn eddsa_tokens_round_trip_and_other_algorithms_are_refused() {
        let tokens = eddsa(PUBLIC).unwrap();
        let user = Uuid::new_v4();
        let token = tokens.issue_access(user, Role::Admin, 3).unwrap();
        let header = jsonwebtoken::decode_header(&token).unwrap();
        assert_eq!(header.alg, Algorithm::EdDSA);
        let claims = tokens.verify_access(&token).unwrap();
        assert_eq!(
            (claims.sub, claims.role, claims.ver),
            (user, Role::Admin, 3)
        );

        // Algorithm confusion: HS256 signed with the public key as the secret.
        let hs256 = Tokens::new(PUBLIC.as_bytes(), "hindsight", "hindsight-api", TTL, TTL);
        let forged = hs256.issue_access(user, Role::Admin, 3).unwrap();
        assert!(tokens.verify_access(&forged).is_none());
        // And an HS256 deployment refuses EdDSA tokens.
        assert!(hs256.verify_access(&token).is_none());
    }

    #[test]
    fn a_mismatched_key_pair_is_refused_at_start_up() {
        let error = eddsa(OTHER_PUBLIC).unwrap_err().to_string();
        assert!(error.contains("HINDSIGHT_JWT_PUBLIC_KEY_FILE"), "{error}");
        let garbage = Tokens::from_pem(
            SigningAlgorithm::EdDsa,
            b"not a key",
            PUBLIC.as_bytes(),
            "i",
            "a",
            TTL,
            TTL,
        )
        .unwrap_err()
        .to_string();
        assert!(
            garbage.contains("HINDSIGHT_JWT_PRIVATE_KEY_FILE"),
            "{garbage}"
        );
    }
}
