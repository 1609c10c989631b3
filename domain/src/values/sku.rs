use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::ValueError;

/// A stock-keeping unit: 1 to 64 characters of `A-Z a-z 0-9 . _ -`, starting with a
/// letter or digit.
///
/// Stored in uppercase, so `abc-1` and `ABC-1` are the same SKU and uniqueness is
/// case-insensitive without a separate key.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Sku(String);

impl Sku {
    /// The longest accepted SKU, in characters.
    pub const MAX_LEN: usize = 64;

    pub fn parse(input: &str) -> Result<Self, ValueError> {
        let sku = input.trim();
        let starts_alphanumeric = sku
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric());
        let allowed = sku
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
        // All accepted characters are ASCII, so the byte length is the character count.
        if starts_alphanumeric && allowed && sku.len() <= Self::MAX_LEN {
            Ok(Self(sku.to_ascii_uppercase()))
        } else {
            Err(ValueError::SkuInvalid)
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for Sku {
    type Error = ValueError;

    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::parse(&value)
    }
}

impl FromStr for Sku {
    type Err = ValueError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl From<Sku> for String {
    fn from(sku: Sku) -> Self {
        sku.0
    }
}

impl AsRef<str> for Sku {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Sku {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn normalises_to_uppercase() {
        assert_eq!(
            Sku::parse("tea-green_1.5kg").unwrap().as_str(),
            "TEA-GREEN_1.5KG"
        );
        assert_eq!(Sku::parse("abc").unwrap(), Sku::parse("ABC").unwrap());
        assert_eq!(Sku::parse(" abc ").unwrap().as_str(), "ABC");
    }

    #[test]
    fn accepts_one_to_sixty_four_characters() {
        assert!(Sku::parse("a").is_ok());
        assert!(Sku::parse(&"a".repeat(64)).is_ok());
        assert_eq!(Sku::parse(&"a".repeat(65)), Err(ValueError::SkuInvalid));
        assert_eq!(Sku::parse(""), Err(ValueError::SkuInvalid));
    }

    #[test]
    fn rejects_other_characters_and_a_leading_symbol() {
        for input in [
            "-abc", ".abc", "_abc", "ab c", "ab/c", "äbc", "ab\u{0}", "ab+c",
        ] {
            assert_eq!(Sku::parse(input), Err(ValueError::SkuInvalid), "{input:?}");
        }
    }

    #[test]
    fn serde_round_trip_validates() {
        let sku: Sku = serde_json::from_str("\"abc-1\"").unwrap();
        assert_eq!(serde_json::to_string(&sku).unwrap(), "\"ABC-1\"");
        assert!(serde_json::from_str::<Sku>("\"-abc\"").is_err());
    }
}
