//! Access roles. What each may do is decided by the API; the domain only records which
//! role a user holds.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::values::ValueError;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Shops: places, pays and cancels their own orders. What self-registration creates.
    Customer,
    /// Runs the shop: products, roles, shipping, any order.
    Admin,
    /// Reads everything, writes nothing.
    Auditor,
    /// Runs the system: projections and health.
    Operator,
}

impl Role {
    pub const ALL: [Role; 4] = [Role::Customer, Role::Admin, Role::Auditor, Role::Operator];

    pub fn as_str(&self) -> &'static str {
        match self {
            Role::Customer => "customer",
            Role::Admin => "admin",
            Role::Auditor => "auditor",
            Role::Operator => "operator",
        }
    }
}

impl FromStr for Role {
    type Err = ValueError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Role::ALL
            .into_iter()
            .find(|role| role.as_str() == s)
            .ok_or(ValueError::RoleUnknown)
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn text_forms_agree_with_serde() {
        for role in Role::ALL {
            assert_eq!(role.as_str().parse::<Role>().unwrap(), role);
            assert_eq!(role.to_string(), role.as_str());
            assert_eq!(
                serde_json::to_string(&role).unwrap(),
                format!("\"{}\"", role.as_str())
            );
            let back: Role = serde_json::from_str(&format!("\"{role}\"")).unwrap();
            assert_eq!(back, role);
        }
    }

    #[test]
    fn unknown_or_differently_cased_names_are_refused() {
        assert_eq!("Admin".parse::<Role>(), Err(ValueError::RoleUnknown));
        assert_eq!("root".parse::<Role>(), Err(ValueError::RoleUnknown));
        assert!(serde_json::from_str::<Role>("\"root\"").is_err());
    }
}
