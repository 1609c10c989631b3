//! Password hashing with argon2id (19 MiB, 2 iterations, 1 lane).
//!
//! Hashing is deliberately expensive, so it runs on the blocking pool behind a semaphore:
//! a flood of logins queues instead of exhausting memory or cores. Verifying against an
//! unknown account hashes against a fixed dummy so both answers take similar time.
//!
//! The 19 MiB of working memory each hash needs comes from a small pool of reused
//! buffers (one per permitted hash in flight) instead of a fresh allocation per hash: the
//! system allocator keeps freed blocks of that size in per-thread arenas, and a process
//! that hashed on many blocking threads held hundreds of megabytes it no longer used.

use std::sync::{Arc, Mutex};

use argon2::password_hash::rand_core::{OsRng, RngCore as _};
use argon2::password_hash::{Output, ParamsString, PasswordHash, SaltString};
use argon2::{Algorithm, Argon2, Block, Params, Version};
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
    memory: Arc<MemoryPool>,
    dummy_hash: Arc<str>,
}

fn hashing_error(error: impl std::fmt::Display) -> PasswordError {
    PasswordError::Hashing(error.to_string())
}

/// The parameters new hashes get: 19 MiB, 2 passes, 1 lane, 32-byte output.
fn params() -> Result<Params, PasswordError> {
    Params::new(19 * 1024, 2, 1, Some(32)).map_err(hashing_error)
}

/// Reused argon2 working memory: at most `keep` buffers are kept between hashes.
#[derive(Debug)]
struct MemoryPool {
    buffers: Mutex<Vec<Vec<Block>>>,
    keep: usize,
}

impl MemoryPool {
    fn new(keep: usize) -> Self {
        Self {
            buffers: Mutex::new(Vec::with_capacity(keep)),
            keep,
        }
    }

    /// Runs `hash` with a buffer of at least `blocks` blocks.
    fn with<T>(&self, blocks: usize, hash: impl FnOnce(&mut [Block]) -> T) -> T {
        let taken = self
            .buffers
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .pop();
        let mut buffer = match taken {
            Some(buffer) if buffer.len() >= blocks => buffer,
            _ => vec![Block::new(); blocks],
        };
        let answer = hash(&mut buffer[..blocks]);
        let mut buffers = self
            .buffers
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if buffers.len() < self.keep {
            buffers.push(buffer);
        }
        answer
    }
}

fn hash_blocking(memory: &MemoryPool, password: &str) -> Result<String, PasswordError> {
    let params = params()?;
    let mut salt = [0u8; 16];
    OsRng.fill_bytes(&mut salt);
    let mut output = [0u8; 32];
    let argon2 = Argon2::new(Algorithm::Argon2id, Version::V0x13, params.clone());
    memory
        .with(params.block_count(), |blocks| {
            argon2.hash_password_into_with_memory(password.as_bytes(), &salt, &mut output, blocks)
        })
        .map_err(hashing_error)?;
    let salt = SaltString::encode_b64(&salt).map_err(hashing_error)?;
    let output = Output::new(&output).map_err(hashing_error)?;
    let params = ParamsString::try_from(&params).map_err(hashing_error)?;
    Ok(format!(
        "$argon2id$v={}${params}${}${output}",
        u32::from(Version::V0x13),
        salt.as_str()
    ))
}

/// Recomputes the hash with the parameters and salt stored in `hash` (a PHC string) and
/// compares in constant time.
fn verify_blocking(memory: &MemoryPool, password: &str, hash: &str) -> Result<bool, PasswordError> {
    let parsed = PasswordHash::new(hash).map_err(hashing_error)?;
    let algorithm = Algorithm::try_from(parsed.algorithm).map_err(hashing_error)?;
    let version = match parsed.version {
        Some(version) => Version::try_from(version).map_err(hashing_error)?,
        None => Version::V0x13,
    };
    let params = Params::try_from(&parsed).map_err(hashing_error)?;
    let (Some(salt), Some(expected)) = (parsed.salt, parsed.hash) else {
        return Err(PasswordError::Hashing(
            "the stored hash has no salt or output".into(),
        ));
    };
    let mut salt_bytes = [0u8; 64];
    let salt = salt.decode_b64(&mut salt_bytes).map_err(hashing_error)?;
    let mut output = vec![0u8; expected.len()];
    let argon2 = Argon2::new(algorithm, version, params.clone());
    memory
        .with(params.block_count(), |blocks| {
            argon2.hash_password_into_with_memory(password.as_bytes(), salt, &mut output, blocks)
        })
        .map_err(hashing_error)?;
    let computed = Output::new(&output).map_err(hashing_error)?;
    // `Output`'s equality is constant-time.
    Ok(computed == expected)
}

impl Passwords {
    /// `max_in_flight` bounds the hashes computed at once (each holds 19 MiB).
    pub fn new(max_in_flight: usize) -> Result<Self, PasswordError> {
        let max_in_flight = max_in_flight.max(1);
        let memory = Arc::new(MemoryPool::new(max_in_flight));
        let dummy_hash = hash_blocking(&memory, "not-a-real-password-for-timing")?;
        Ok(Self {
            permits: Arc::new(Semaphore::new(max_in_flight)),
            memory,
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
        let memory = Arc::clone(&self.memory);
        tokio::task::spawn_blocking(move || hash_blocking(&memory, password.expose_secret()))
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
        let memory = Arc::clone(&self.memory);
        let matches = tokio::task::spawn_blocking(move || {
            verify_blocking(&memory, password.expose_secret(), &hash)
        })
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
    fn pooled_hashes_agree_with_the_reference_implementation() {
        use argon2::password_hash::{PasswordHasher as _, PasswordVerifier as _};
        let memory = MemoryPool::new(1);
        let ours = hash_blocking(&memory, "correct horse battery").unwrap();
        let reference = Argon2::new(Algorithm::Argon2id, Version::V0x13, params().unwrap());
        // The library verifies what we wrote...
        let parsed = PasswordHash::new(&ours).unwrap();
        assert!(reference
            .verify_password(b"correct horse battery", &parsed)
            .is_ok());
        assert!(reference
            .verify_password(b"wrong horse battery", &parsed)
            .is_err());
        // ...and we verify what the library writes, with other parameters too.
        let salt = SaltString::generate(&mut OsRng);
        let other = Argon2::new(
            Algorithm::Argon2id,
            Version::V0x13,
            Params::new(8 * 1024, 3, 1, None).unwrap(),
        );
        for argon2 in [&reference, &other] {
            let theirs = argon2
                .hash_password(b"correct horse battery", &salt)
                .unwrap()
                .to_string();
            assert!(verify_blocking(&memory, "correct horse battery", &theirs).unwrap());
            assert!(!verify_blocking(&memory, "correct horse batterx", &theirs).unwrap());
        }
        assert!(verify_blocking(&memory, "x", "not a hash").is_err());
    }

    #[tokio::test]
    async fn working_memory_is_reused_not_reallocated() {
        let passwords = Passwords::new(2).unwrap();
        let secret = SecretString::from("correct horse battery".to_owned());
        let hash = passwords.hash(&secret).await.unwrap();
        for _ in 0..4 {
            assert!(passwords.verify(&secret, Some(&hash)).await.unwrap());
        }
        let kept = passwords.memory.buffers.lock().unwrap();
        assert!(!kept.is_empty() && kept.len() <= 2, "{}", kept.len());
    }

    #[test]
    fn the_policy_bounds_length() {
        assert!(check_policy("1234567").is_err());
        assert!(check_policy("12345678").is_ok());
        assert!(check_policy(&"x".repeat(128)).is_ok());
        assert!(check_policy(&"x".repeat(129)).is_err());
    }
}
