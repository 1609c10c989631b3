//! Validated value objects: once one exists, it is valid.
//!
//! Every value is built through a fallible constructor, and deserialization goes through
//! the same constructor (`#[serde(try_from = ...)]`), so a request body or a stored event
//! can never smuggle in an invalid email, SKU, amount or quantity. A refusal is a
//! [`ValueError`], which names the input field it is about and a stable reason code so the
//! API can answer `422 VALIDATION_FAILED` with per-field details.

mod email;
mod money;
mod name;
mod quantity;
mod sku;

pub use email::Email;
pub use money::{Currency, Money, MoneyError};
pub use name::{Description, PersonName, ProductName};
pub use quantity::Quantity;
pub use sku::Sku;

/// Why an input could not become a value object.
///
/// Messages are phrased to follow the field name (`email` + `is not a valid address`), so
/// the API can use them directly as per-field details. [`ValueError::field`] names the
/// field the value is usually read from; a caller that reads the value from a differently
/// named input (a `price` or `unit_price` that is `Money`) reports it under its own name.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValueError {
    #[error("is not a valid id")]
    IdInvalid,
    #[error("is not a valid address")]
    EmailInvalid,
    #[error(
        "must be 1 to 64 characters of letters, digits, '.', '_' or '-', \
         starting with a letter or digit"
    )]
    SkuInvalid,
    #[error("must not be empty")]
    NameEmpty,
    #[error("must be at most {max} characters")]
    NameTooLong { max: usize },
    #[error("must not contain control characters")]
    NameControlCharacters,
    #[error("must be at most {max} characters")]
    DescriptionTooLong { max: usize },
    #[error("must not contain control characters other than line breaks and tabs")]
    DescriptionControlCharacters,
    #[error("must be a three-letter uppercase ISO 4217 code")]
    CurrencyInvalid,
    #[error("is not a currency we accept")]
    CurrencyUnknown,
    #[error("must not be negative")]
    AmountNegative,
    #[error("must be at least 1")]
    QuantityNotPositive,
    #[error("must be one of customer, admin, auditor, operator")]
    RoleUnknown,
    #[error("is not a known status")]
    StatusUnknown,
    #[error("must not be empty")]
    PasswordHashEmpty,
}

impl ValueError {
    /// The input field this error is usually reported under.
    pub fn field(&self) -> &'static str {
        match self {
            Self::IdInvalid => "id",
            Self::EmailInvalid => "email",
            Self::SkuInvalid => "sku",
            Self::NameEmpty | Self::NameTooLong { .. } | Self::NameControlCharacters => "name",
            Self::DescriptionTooLong { .. } | Self::DescriptionControlCharacters => "description",
            Self::CurrencyInvalid | Self::CurrencyUnknown => "currency",
            Self::AmountNegative => "amount",
            Self::QuantityNotPositive => "quantity",
            Self::RoleUnknown => "role",
            Self::StatusUnknown => "status",
            Self::PasswordHashEmpty => "password_hash",
        }
    }

    /// A stable, upper-snake-case code for the reason, e.g. `EMAIL_INVALID`.
    pub fn code(&self) -> &'static str {
        match self {
            Self::IdInvalid => "ID_INVALID",
            Self::EmailInvalid => "EMAIL_INVALID",
            Self::SkuInvalid => "SKU_INVALID",
            Self::NameEmpty => "NAME_EMPTY",
            Self::NameTooLong { .. } => "NAME_TOO_LONG",
            Self::NameControlCharacters => "NAME_CONTROL_CHARACTERS",
            Self::DescriptionTooLong { .. } => "DESCRIPTION_TOO_LONG",
            Self::DescriptionControlCharacters => "DESCRIPTION_CONTROL_CHARACTERS",
            Self::CurrencyInvalid => "CURRENCY_INVALID",
            Self::CurrencyUnknown => "CURRENCY_UNKNOWN",
            Self::AmountNegative => "AMOUNT_NEGATIVE",
            Self::QuantityNotPositive => "QUANTITY_NOT_POSITIVE",
            Self::RoleUnknown => "ROLE_UNKNOWN",
            Self::StatusUnknown => "STATUS_UNKNOWN",
            Self::PasswordHashEmpty => "PASSWORD_HASH_EMPTY",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_has_an_upper_snake_code_and_a_field() {
        let all = [
            ValueError::IdInvalid,
            ValueError::EmailInvalid,
            ValueError::SkuInvalid,
            ValueError::NameEmpty,
            ValueError::NameTooLong { max: 1 },
            ValueError::NameControlCharacters,
            ValueError::DescriptionTooLong { max: 1 },
            ValueError::DescriptionControlCharacters,
            ValueError::CurrencyInvalid,
            ValueError::CurrencyUnknown,
            ValueError::AmountNegative,
            ValueError::QuantityNotPositive,
            ValueError::RoleUnknown,
            ValueError::StatusUnknown,
            ValueError::PasswordHashEmpty,
        ];
        let mut codes = std::collections::BTreeSet::new();
        for error in all {
            let code = error.code();
            assert!(code.chars().all(|c| c.is_ascii_uppercase() || c == '_'));
            assert!(codes.insert(code), "duplicate code {code}");
            assert!(!error.field().is_empty());
            assert!(!error.to_string().is_empty());
        }
    }
}
