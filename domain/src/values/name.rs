use std::fmt;

use serde::{Deserialize, Serialize};

use super::ValueError;

/// A user's display name: 1 to 100 characters after trimming, no control characters.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct PersonName(String);

impl PersonName {
    /// The longest accepted name, in characters.
    pub const MAX_LEN: usize = 100;

    pub fn parse(input: &str) -> Result<Self, ValueError> {
        parse_name(input, Self::MAX_LEN).map(Self)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A product's name: 1 to 200 characters after trimming, no control characters.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ProductName(String);

impl ProductName {
    /// The longest accepted name, in characters.
    pub const MAX_LEN: usize = 200;

    pub fn parse(input: &str) -> Result<Self, ValueError> {
        parse_name(input, Self::MAX_LEN).map(Self)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A product's description: up to 5000 characters after trimming. Line breaks and tabs
/// are allowed, other control characters are not. May be empty.
#[derive(Debug, Default, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Description(String);

impl Description {
    /// The longest accepted description, in characters.
    pub const MAX_LEN: usize = 5000;

    pub fn parse(input: &str) -> Result<Self, ValueError> {
        let text = input.trim();
        if text.chars().count() > Self::MAX_LEN {
            return Err(ValueError::DescriptionTooLong { max: Self::MAX_LEN });
        }
        if text
            .chars()
            .any(|c| c.is_control() && !matches!(c, '\n' | '\r' | '\t'))
        {
            return Err(ValueError::DescriptionControlCharacters);
        }
        Ok(Self(text.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

fn parse_name(input: &str, max: usize) -> Result<String, ValueError> {
    let name = input.trim();
    if name.is_empty() {
        return Err(ValueError::NameEmpty);
    }
    if name.chars().count() > max {
        return Err(ValueError::NameTooLong { max });
    }
    if name.chars().any(char::is_control) {
        return Err(ValueError::NameControlCharacters);
    }
    Ok(name.to_owned())
}

macro_rules! text_conversions {
    ($($name:ident),*) => {$(
        impl TryFrom<String> for $name {
            type Error = ValueError;

            fn try_from(value: String) -> Result<Self, Self::Error> {
                Self::parse(&value)
            }
        }

        impl std::str::FromStr for $name {
            type Err = ValueError;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Self::parse(s)
            }
        }

        impl From<$name> for String {
            fn from(value: $name) -> Self {
                value.0
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }
    )*};
}

text_conversions!(PersonName, ProductName, Description);

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn person_name_is_trimmed_and_bounded() {
        assert_eq!(
            PersonName::parse("  Ada Lovelace ").unwrap().as_str(),
            "Ada Lovelace"
        );
        assert!(PersonName::parse(&"é".repeat(100)).is_ok());
        assert_eq!(
            PersonName::parse(&"é".repeat(101)),
            Err(ValueError::NameTooLong { max: 100 })
        );
        assert_eq!(PersonName::parse(""), Err(ValueError::NameEmpty));
        assert_eq!(PersonName::parse(" \t\n "), Err(ValueError::NameEmpty));
    }

    #[test]
    fn names_refuse_control_characters() {
        assert_eq!(
            PersonName::parse("Ada\nLovelace"),
            Err(ValueError::NameControlCharacters)
        );
        assert_eq!(
            ProductName::parse("Tea\u{7}"),
            Err(ValueError::NameControlCharacters)
        );
    }

    #[test]
    fn product_name_allows_two_hundred_characters() {
        assert!(ProductName::parse(&"x".repeat(200)).is_ok());
        assert_eq!(
            ProductName::parse(&"x".repeat(201)),
            Err(ValueError::NameTooLong { max: 200 })
        );
        assert_eq!(ProductName::parse("   "), Err(ValueError::NameEmpty));
    }

    #[test]
    fn description_may_be_empty_or_multiline_but_bounded() {
        assert!(Description::parse("").unwrap().is_empty());
        assert_eq!(
            Description::parse(" Line one\n\tLine two\r\n ")
                .unwrap()
                .as_str(),
            "Line one\n\tLine two"
        );
        assert!(Description::parse(&"x".repeat(5000)).is_ok());
        assert_eq!(
            Description::parse(&"x".repeat(5001)),
            Err(ValueError::DescriptionTooLong { max: 5000 })
        );
        assert_eq!(
            Description::parse("bell\u{7}"),
            Err(ValueError::DescriptionControlCharacters)
        );
    }

    #[test]
    fn deserialization_validates() {
        let name: PersonName = serde_json::from_str("\" Ada \"").unwrap();
        assert_eq!(serde_json::to_string(&name).unwrap(), "\"Ada\"");
        assert!(serde_json::from_str::<PersonName>("\"\"").is_err());
        assert!(serde_json::from_str::<ProductName>("\"\"").is_err());
        assert!(serde_json::from_str::<Description>("\"\"").is_ok());
    }
}
