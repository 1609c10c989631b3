use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::{Quantity, ValueError};

/// An ISO 4217 currency in circulation, e.g. `EUR`.
///
/// Only the codes in [`Currency::ACTIVE_CODES`] are accepted: national and regional
/// currencies currently in use. Fund codes (`BOV`, `CHE`...), precious metals (`XAU`...)
/// and the testing codes (`XTS`, `XXX`) are not money a shop charges in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Currency(&'static str);

impl Currency {
    pub const EUR: Self = Self("EUR");
    pub const USD: Self = Self("USD");
    pub const GBP: Self = Self("GBP");

    /// The accepted codes, sorted so a lookup is a binary search.
    pub const ACTIVE_CODES: &'static [&'static str] = &[
        "AED", "AFN", "ALL", "AMD", "AOA", "ARS", "AUD", "AWG", "AZN", "BAM", "BBD", "BDT", "BGN",
        "BHD", "BIF", "BMD", "BND", "BOB", "BRL", "BSD", "BTN", "BWP", "BYN", "BZD", "CAD", "CDF",
        "CHF", "CLP", "CNY", "COP", "CRC", "CUP", "CVE", "CZK", "DJF", "DKK", "DOP", "DZD", "EGP",
        "ERN", "ETB", "EUR", "FJD", "FKP", "GBP", "GEL", "GHS", "GIP", "GMD", "GNF", "GTQ", "GYD",
        "HKD", "HNL", "HTG", "HUF", "IDR", "ILS", "INR", "IQD", "IRR", "ISK", "JMD", "JOD", "JPY",
        "KES", "KGS", "KHR", "KMF", "KPW", "KRW", "KWD", "KYD", "KZT", "LAK", "LBP", "LKR", "LRD",
        "LSL", "LYD", "MAD", "MDL", "MGA", "MKD", "MMK", "MNT", "MOP", "MRU", "MUR", "MVR", "MWK",
        "MXN", "MYR", "MZN", "NAD", "NGN", "NIO", "NOK", "NPR", "NZD", "OMR", "PAB", "PEN", "PGK",
        "PHP", "PKR", "PLN", "PYG", "QAR", "RON", "RSD", "RUB", "RWF", "SAR", "SBD", "SCR", "SDG",
        "SEK", "SGD", "SHP", "SLE", "SOS", "SRD", "SSP", "STN", "SVC", "SYP", "SZL", "THB", "TJS",
        "TMT", "TND", "TOP", "TRY", "TTD", "TWD", "TZS", "UAH", "UGX", "USD", "UYU", "UZS", "VED",
        "VES", "VND", "VUV", "WST", "XAF", "XCD", "XCG", "XOF", "XPF", "YER", "ZAR", "ZMW", "ZWG",
    ];

    pub fn parse(code: &str) -> Result<Self, ValueError> {
        if code.len() != 3 || !code.bytes().all(|b| b.is_ascii_uppercase()) {
            return Err(ValueError::CurrencyInvalid);
        }
        Self::ACTIVE_CODES
            .binary_search(&code)
            .ok()
            .and_then(|index| Self::ACTIVE_CODES.get(index).copied())
            .map(Self)
            .ok_or(ValueError::CurrencyUnknown)
    }

    pub fn as_str(&self) -> &'static str {
        self.0
    }
}

impl TryFrom<String> for Currency {
    type Error = ValueError;

    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::parse(&value)
    }
}

impl FromStr for Currency {
    type Err = ValueError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Self::parse(s)
    }
}

impl From<Currency> for String {
    fn from(currency: Currency) -> Self {
        currency.0.to_owned()
    }
}

// Written by hand: derived impls would make `Currency` deserializable only from
// `'static` input, because of the `&'static str` it points into the code list with.
impl Serialize for Currency {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.0)
    }
}

impl<'de> Deserialize<'de> for Currency {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let code = String::deserialize(deserializer)?;
        Self::parse(&code).map_err(serde::de::Error::custom)
    }
}

impl fmt::Display for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

/// An amount of money in integer minor units (cents for `EUR`), never negative.
///
/// Serialized as `{"amount": 1999, "currency": "EUR"}`. Arithmetic is checked: adding
/// different currencies or overflowing `i64` is an error, never a wrong number.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "MoneyFields")]
pub struct Money {
    amount: i64,
    currency: Currency,
}

/// Why money arithmetic has no answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum MoneyError {
    #[error("cannot combine amounts in {expected} and {found}")]
    CurrencyMismatch { expected: Currency, found: Currency },
    #[error("the amount is too large")]
    Overflow,
}

impl Money {
    pub fn new(amount: i64, currency: Currency) -> Result<Self, ValueError> {
        if amount < 0 {
            return Err(ValueError::AmountNegative);
        }
        Ok(Self { amount, currency })
    }

    pub const fn zero(currency: Currency) -> Self {
        Self {
            amount: 0,
            currency,
        }
    }

    /// The amount in minor units.
    pub fn amount(&self) -> i64 {
        self.amount
    }

    pub fn currency(&self) -> Currency {
        self.currency
    }

    pub fn is_positive(&self) -> bool {
        self.amount > 0
    }

    pub fn checked_add(&self, other: Money) -> Result<Money, MoneyError> {
        if self.currency != other.currency {
            return Err(MoneyError::CurrencyMismatch {
                expected: self.currency,
                found: other.currency,
            });
        }
        let amount = self
            .amount
            .checked_add(other.amount)
            .ok_or(MoneyError::Overflow)?;
        Ok(Money {
            amount,
            currency: self.currency,
        })
    }

    pub fn checked_mul(&self, quantity: Quantity) -> Result<Money, MoneyError> {
        let amount = self
            .amount
            .checked_mul(i64::from(quantity.get()))
            .ok_or(MoneyError::Overflow)?;
        Ok(Money {
            amount,
            currency: self.currency,
        })
    }
}

/// The wire shape of [`Money`], validated into it on deserialization.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct MoneyFields {
    amount: i64,
    currency: Currency,
}

impl TryFrom<MoneyFields> for Money {
    type Error = ValueError;

    fn try_from(fields: MoneyFields) -> Result<Self, Self::Error> {
        Money::new(fields.amount, fields.currency)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn eur(amount: i64) -> Money {
        Money::new(amount, Currency::EUR).unwrap()
    }

    #[test]
    fn the_code_list_is_sorted_unique_and_well_formed() {
        assert!(Currency::ACTIVE_CODES.windows(2).all(|w| w[0] < w[1]));
        assert!(Currency::ACTIVE_CODES
            .iter()
            .all(|c| c.len() == 3 && c.bytes().all(|b| b.is_ascii_uppercase())));
        for constant in [Currency::EUR, Currency::USD, Currency::GBP] {
            assert_eq!(Currency::parse(constant.as_str()), Ok(constant));
        }
    }

    #[test]
    fn currency_must_be_a_known_uppercase_code() {
        assert_eq!(Currency::parse("JPY").unwrap().as_str(), "JPY");
        assert_eq!(Currency::parse("eur"), Err(ValueError::CurrencyInvalid));
        assert_eq!(Currency::parse("EURO"), Err(ValueError::CurrencyInvalid));
        assert_eq!(Currency::parse(""), Err(ValueError::CurrencyInvalid));
        assert_eq!(Currency::parse("ABC"), Err(ValueError::CurrencyUnknown));
        assert_eq!(Currency::parse("XTS"), Err(ValueError::CurrencyUnknown));
        assert_eq!(Currency::parse("HRK"), Err(ValueError::CurrencyUnknown));
    }

    #[test]
    fn negative_amounts_are_refused() {
        assert_eq!(
            Money::new(-1, Currency::EUR),
            Err(ValueError::AmountNegative)
        );
        assert!(!Money::zero(Currency::EUR).is_positive());
        assert!(eur(1).is_positive());
    }

    #[test]
    fn addition_checks_currency_and_overflow() {
        assert_eq!(eur(150).checked_add(eur(250)), Ok(eur(400)));
        assert_eq!(
            eur(1).checked_add(Money::new(1, Currency::USD).unwrap()),
            Err(MoneyError::CurrencyMismatch {
                expected: Currency::EUR,
                found: Currency::USD
            })
        );
        assert_eq!(eur(i64::MAX).checked_add(eur(1)), Err(MoneyError::Overflow));
    }

    #[test]
    fn multiplication_checks_overflow() {
        let three = Quantity::new(3).unwrap();
        assert_eq!(eur(1999).checked_mul(three), Ok(eur(5997)));
        assert_eq!(
            eur(i64::MAX / 2).checked_mul(three),
            Err(MoneyError::Overflow)
        );
    }

    #[test]
    fn serializes_as_amount_and_currency() {
        assert_eq!(
            serde_json::to_value(eur(1999)).unwrap(),
            serde_json::json!({"amount": 1999, "currency": "EUR"})
        );
        let back: Money =
            serde_json::from_value(serde_json::json!({"amount": 1999, "currency": "EUR"})).unwrap();
        assert_eq!(back, eur(1999));
    }

    #[test]
    fn deserialization_validates() {
        for invalid in [
            serde_json::json!({"amount": -5, "currency": "EUR"}),
            serde_json::json!({"amount": 5, "currency": "eur"}),
            serde_json::json!({"amount": 5, "currency": "ZZZ"}),
            serde_json::json!({"amount": 19.99, "currency": "EUR"}),
            serde_json::json!({"amount": 5}),
            serde_json::json!({"amount": 5, "currency": "EUR", "extra": 1}),
        ] {
            assert!(
                serde_json::from_value::<Money>(invalid.clone()).is_err(),
                "{invalid}"
            );
        }
    }
}
