//! Password hashing with argon2id (19 MiB, 2 iterations, 1 lane).
//!
//! Hashing is deliberately expensive, so it runs on the blocking pool behind a semaphore:
//! a flood of logins queues instead of exhausting memory or cores. Verifying against an
//! unknown account hashes against a fixed dummy so both answers take similar time.

use std::sync::Arc;

use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHash, PasswordHasher as _, PasswordVerifier as _, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use secrecy::{ExposeSecret, SecretString};
use tokio::sync::Semaphore;

/// Shortest and longest accepted password, in characters.
pub const PASSWORD_LENGTH: std::ops::RangeInclusive<usize> = 8..=128;

#[derive(Debug, thiserror::Error)]
pub enum PasswordError {
    #[error("password must be 8 to 128 characters")]
    Length,
    #[error("password hashing failed")]
    Hashing(String),
    #[error("password hashing was interrupted")]
    Interrupted,
}

/// Checks the password policy.
pub fn check_policy(password: &str) -> Result<(), PasswordError> {
    if PASSWORD_LENGTH.contains(&password.chars().count()) {
        Ok(())
    } else {
        Err(PasswordError::Length)
    }
}

/// Hashes and verifies passwords with a bounded number in flight.
#[derive(Debug, Clone)]
pub struct Passwords {
    permits: Arc<Semaphore>,
    dummy_hash: Arc<str>,
}

fn argon2() -> Result<Argon2<'static>, PasswordError> {
    let params = Params::new(19 * 1024, 2, 1, None)
        .map_err(|error| PasswordError::Hashing(error.to_string()))?;
    Ok(Argon2::new(Algorithm::Argon2id, Version::V0x13, params))
}

fn hash_blocking(password: &str) -> Result<String, PasswordError> {
    let salt = SaltString::generate(&mut OsRng);
    argon2()?
        .hash_password(password.as_bytes(), &salt)
        .map(|hash| hash.to_string())
        .map_err(|error| PasswordError::Hashing(error.to_string()))
}

fn verify_blocking(password: &str, hash: &str) -> Result<bool, PasswordError> {
    let parsed =
        PasswordHash::new(hash).map_err(|error| PasswordError::Hashing(error.to_string()))?;
    Ok(argon2()?
        .verify_password(password.as_bytes(), &parsed)
        .is_ok())
}

impl Passwords {
    /// `max_in_flight` bounds the hashes computed at once (each holds 19 MiB).
    pub fn new(max_in_flight: usize) -> Result<Self, PasswordError> {
        let dummy_hash = hash_blocking("not-a-real-password-for-timing")?;
        Ok(Self {
            permits: Arc::new(Semaphore::new(max_in_flight.max(1))),
            dummy_hash: dummy_hash.into(),
        })
    }

    /// Hashes a password that passed [`check_policy`].
    pub async fn hash(&self, password: &SecretString) -> Result<String, PasswordError> {
        check_policy(password.expose_secret())?;
        let _permit = self
            .permits
            .acquire()
            .await
            .map_err(|_| PasswordError::Interrupted)?;
        let password = password.clone();
        tokio::task::spawn_blocking(move || hash_blocking(password.expose_secret()))
            .await
            .map_err(|_| PasswordError::Interrupted)?
    }

    /// Verifies a password against a stored hash, or against the dummy hash when there is
    /// none (unknown account), so both cost the same. Returns `false` for the dummy.
    pub async fn verify(
        &self,
        password: &SecretString,
        hash: Option<&str>,
    ) -> Result<bool, PasswordError> {
        let known = hash.is_some();
        let hash: String = hash.map_or_else(|| self.dummy_hash.to_string(), str::to_owned);
        let _permit = self
            .permits
            .acquire()
            .await
            .map_err(|_| PasswordError::Interrupted)?;
        let password = password.clone();
        let matches =
            tokio::task::spawn_blocking(move || verify_blocking(password.expose_secret(), &hash))
                .await
                .map_err(|_| PasswordError::Interrupted)??;
        Ok(known && matches)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn hashes_are_argon2id_and_verify() {
        let passwords = Passwords::new(2).unwrap();
        let secret = SecretString::from("correct horse battery".to_owned());
        let hash = passwords.hash(&secret).await.unwrap();
        assert!(
            hash.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"),
            "{hash}"
        );
        assert!(passwords.verify(&secret, Some(&hash)).await.unwrap());
        let wrong = SecretString::from("wrong horse battery".to_owned());
        assert!(!passwords.verify(&wrong, Some(&hash)).await.unwrap());
        assert!(!passwords.verify(&secret, None).await.unwrap());
    }

    #[test]
    fn the_policy_bounds_length() {
        assert!(check_policy("1234567").is_err());
        assert!(check_policy("12345678").is_ok());
        assert!(check_policy(&"x".repeat(128)).is_ok());
        assert!(check_policy(&"x".repeat(129)).is_err());
    }
}
