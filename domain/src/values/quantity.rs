use std::fmt;
use std::num::NonZeroU32;

use serde::{Deserialize, Serialize};

use super::ValueError;

/// A count of items, at least 1. How many a particular command may carry (an order line
/// takes at most 1000) is that aggregate's rule, not the quantity's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "u32", into = "u32")]
pub struct Quantity(NonZeroU32);

impl Quantity {
    pub const ONE: Self = Self(NonZeroU32::MIN);

    pub fn new(value: u32) -> Result<Self, ValueError> {
        NonZeroU32::new(value)
            .map(Self)
            .ok_or(ValueError::QuantityNotPositive)
    }

    pub fn get(self) -> u32 {
        self.0.get()
    }
}

impl TryFrom<u32> for Quantity {
    type Error = ValueError;

    fn try_from(value: u32) -> Result<Self, Self::Error> {
        Self::new(value)
    }
}

impl From<Quantity> for u32 {
    fn from(quantity: Quantity) -> Self {
        quantity.get()
    }
}

impl From<Quantity> for u64 {
    fn from(quantity: Quantity) -> Self {
        u64::from(quantity.get())
    }
}

impl fmt::Display for Quantity {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn zero_is_refused_and_anything_else_accepted() {
        assert_eq!(Quantity::new(0), Err(ValueError::QuantityNotPositive));
        assert_eq!(Quantity::new(1).unwrap(), Quantity::ONE);
        assert_eq!(Quantity::new(u32::MAX).unwrap().get(), u32::MAX);
    }

    #[test]
    fn serializes_as_a_number_and_validates_on_deserialize() {
        let quantity: Quantity = serde_json::from_str("7").unwrap();
        assert_eq!(quantity.get(), 7);
        assert_eq!(serde_json::to_string(&quantity).unwrap(), "7");
        assert!(serde_json::from_str::<Quantity>("0").is_err());
        assert!(serde_json::from_str::<Quantity>("-1").is_err());
        assert!(serde_json::from_str::<Quantity>("1.5").is_err());
    }
}
