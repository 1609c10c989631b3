use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::ValueError;

/// An email address, kept as the user typed it (minus surrounding whitespace).
///
/// The check is deliberately structural, not RFC 5322: one `@`, a local part of at most
/// 64 characters, a dotted domain, no whitespace or control characters. Whether the
/// address receives mail is not the domain's business. Two addresses that differ only in
/// case belong to the same person, so uniqueness uses [`Email::key`], not equality.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Email(String);

impl Email {
    /// The longest accepted address, in characters.
    pub const MAX_LEN: usize = 254;
    /// The longest accepted local part (before the `@`), in characters.
    pub const MAX_LOCAL_LEN: usize = 64;

    pub fn parse(input: &str) -> Result<Self, ValueError> {
        let address = input.trim();
        let length = address.chars().count();
        if !(3..=Self::MAX_LEN).contains(&length)
            || address.chars().any(|c| c.is_whitespace() || c.is_control())
        {
            return Err(ValueError::EmailInvalid);
        }
        let (local, domain) = address.split_once('@').ok_or(ValueError::EmailInvalid)?;
        let local_ok = !local.is_empty() && local.chars().count() <= Self::MAX_LOCAL_LEN;
        let domain_ok = !domain.contains('@')
            && domain.contains('.')
            && domain.split('.').all(|label| !label.is_empty());
        if local_ok && domain_ok {
            Ok(Self(address.to_owned()))
        } else {
            Err(ValueError::EmailInvalid)
        }
    }

    /// The address as entered (trimmed).
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The comparison form: the whole address in lowercase. Two emails with the same key
    /// are the same account.
    pub fn key(&self) -> String {
        self.0.to_lowercase()
    }
}

impl TryFrom<String> for Email {
    type Error = ValueError;

    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::parse(&value)
    }
}

impl FromStr for Email {
    type Err = ValueError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl From<Email> for String {
    fn from(email: Email) -> Self {
        email.0
    }
}

impl AsRef<str> for Email {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Email {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn accepts_an_ordinary_address_and_trims_it() {
        let email = Email::parse("  Ada.Lovelace@Example.org \n").unwrap();
        assert_eq!(email.as_str(), "Ada.Lovelace@Example.org");
    }

    #[test]
    fn key_is_the_lowercased_address() {
        let email = Email::parse("Ada.Lovelace@Example.ORG").unwrap();
        assert_eq!(email.key(), "ada.lovelace@example.org");
        assert_eq!(
            email.key(),
            Email::parse("ada.lovelace@example.org").unwrap().key()
        );
    }

    #[test]
    fn rejects_malformed_addresses() {
        for input in [
            "",
            "   ",
            "a@",
            "@example.org",
            "ada",
            "ada.example.org",
            "ada@@example.org",
            "ada@b@example.org",
            "ada@example",
            "ada@.example.org",
            "ada@example.org.",
            "ada@example..org",
            "ada lovelace@example.org",
            "ada@exa\tmple.org",
            "ada\u{0}@example.org",
        ] {
            assert_eq!(
                Email::parse(input),
                Err(ValueError::EmailInvalid),
                "{input:?}"
            );
        }
    }

    #[test]
    fn enforces_length_limits() {
        let local = "a".repeat(Email::MAX_LOCAL_LEN);
        assert!(Email::parse(&format!("{local}@example.org")).is_ok());
        assert_eq!(
            Email::parse(&format!("{local}a@example.org")),
            Err(ValueError::EmailInvalid)
        );

        let longest = format!("a@{}.org", "d".repeat(Email::MAX_LEN - 6));
        assert_eq!(longest.chars().count(), Email::MAX_LEN);
        assert!(Email::parse(&longest).is_ok());
        let too_long = format!("ab{}", longest.get(1..).unwrap());
        assert_eq!(too_long.chars().count(), Email::MAX_LEN + 1);
        assert_eq!(Email::parse(&too_long), Err(ValueError::EmailInvalid));
    }

    #[test]
    fn serializes_as_the_string_and_validates_on_deserialize() {
        let email = Email::parse("Ada@Example.org").unwrap();
        assert_eq!(
            serde_json::to_string(&email).unwrap(),
            "\"Ada@Example.org\""
        );
        let back: Email = serde_json::from_str("\" Ada@Example.org \"").unwrap();
        assert_eq!(back, email);
        assert!(serde_json::from_str::<Email>("\"not-an-email\"").is_err());
    }
}
