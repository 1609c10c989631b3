//! Typed aggregate ids, so a `UserId` can never be passed where an `OrderId` is meant.
//!
//! Each is a UUID on the wire (`"0190..."`) and in the database. New ids are UUIDv7:
//! time-ordered, so they index well and sort roughly by creation.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::values::ValueError;

macro_rules! typed_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(
            Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
        )]
        #[serde(transparent)]
        pub struct $name(Uuid);

        impl $name {
            /// A fresh, time-ordered id.
            // No `Default`: an id that silently differs on every call is a trap.
            #[allow(clippy::new_without_default)]
            pub fn new() -> Self {
                Self(Uuid::now_v7())
            }

            pub const fn from_uuid(uuid: Uuid) -> Self {
                Self(uuid)
            }

            pub const fn as_uuid(&self) -> Uuid {
                self.0
            }
        }

        impl From<Uuid> for $name {
            fn from(uuid: Uuid) -> Self {
                Self(uuid)
            }
        }

        impl From<$name> for Uuid {
            fn from(id: $name) -> Self {
                id.0
            }
        }

        impl FromStr for $name {
            type Err = ValueError;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                Uuid::parse_str(s).map(Self).map_err(|_| ValueError::IdInvalid)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }
    };
}

typed_id!(
    /// Identifies a user aggregate.
    UserId
);
typed_id!(
    /// Identifies a product aggregate.
    ProductId
);
typed_id!(
    /// Identifies an order aggregate.
    OrderId
);

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn new_ids_are_version_7_and_distinct() {
        let (a, b) = (OrderId::new(), OrderId::new());
        assert_ne!(a, b);
        assert_eq!(a.as_uuid().get_version_num(), 7);
    }

    #[test]
    fn display_and_from_str_round_trip() {
        let id = UserId::new();
        assert_eq!(id.to_string().parse::<UserId>().unwrap(), id);
        assert_eq!("not-a-uuid".parse::<UserId>(), Err(ValueError::IdInvalid));
    }

    #[test]
    fn serializes_as_a_plain_uuid_string() {
        let uuid = Uuid::from_u128(0x0190_0000_0000_7000_8000_0000_0000_0001);
        let id = ProductId::from_uuid(uuid);
        assert_eq!(serde_json::to_string(&id).unwrap(), format!("\"{uuid}\""));
        let back: ProductId = serde_json::from_str(&format!("\"{uuid}\"")).unwrap();
        assert_eq!(back, id);
        assert_eq!(Uuid::from(back), uuid);
    }
}
