//! OpenAPI schemas of the domain values that views show (roles, statuses, money, order
//! lines). The domain stays free of documentation dependencies, so its types are
//! described here, next to the views that expose them, and built from the domain's own
//! lists (`Role::ALL`, `Currency::ACTIVE_CODES`...) so they cannot drift from it.
//!
//! Each type below is a name for a schema, used through `#[schema(value_type = ...)]` on
//! the views' fields; none is ever constructed.

use std::borrow::Cow;

use hindsight_commands::history::AGGREGATE_TYPES;
use hindsight_commands::ActorRole;
use hindsight_domain::ids::ProductId;
use hindsight_domain::order::OrderStatus;
use hindsight_domain::product::ProductStatus;
use hindsight_domain::role::Role;
use hindsight_domain::user::UserStatus;
use hindsight_domain::values::{Currency, Money, ProductName, Quantity, Sku};
use utoipa::openapi::schema::{AdditionalProperties, ObjectBuilder, Schema, Type};
use utoipa::openapi::RefOr;
use utoipa::{PartialSchema, ToSchema};

use crate::products::ProductSort;

/// A string schema with exactly these values.
fn text_enum(description: &str, values: impl IntoIterator<Item = &'static str>) -> RefOr<Schema> {
    ObjectBuilder::new()
        .schema_type(Type::String)
        .enum_values(Some(values))
        .description(Some(description))
        .into()
}

macro_rules! named_schema {
    ($(#[$doc:meta])* $type:ident, $name:literal, $schema:expr) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy)]
        pub struct $type;

        impl PartialSchema for $type {
            fn schema() -> RefOr<Schema> {
                $schema
            }
        }

        impl ToSchema for $type {
            fn name() -> Cow<'static, str> {
                Cow::Borrowed($name)
            }
        }
    };
}

/// The user statuses, in declaration order.
pub const USER_STATUSES: [UserStatus; 2] = [UserStatus::Active, UserStatus::Deactivated];
/// The product statuses, in declaration order.
pub const PRODUCT_STATUSES: [ProductStatus; 2] =
    [ProductStatus::Active, ProductStatus::Discontinued];
/// The roles an event's actor can have acted in.
pub const ACTOR_ROLES: [ActorRole; 6] = [
    ActorRole::Customer,
    ActorRole::Admin,
    ActorRole::Auditor,
    ActorRole::Operator,
    ActorRole::System,
    ActorRole::Anonymous,
];
/// What a projection can be doing, as `GET /admin/projections` reports it.
pub const PROJECTION_STATES: [&str; 4] = ["live", "catching_up", "rebuilding", "failed"];

named_schema!(
    /// `customer`, `admin`, `auditor` or `operator`.
    RoleSchema,
    "Role",
    text_enum("A user's access role.", Role::ALL.iter().map(Role::as_str))
);

named_schema!(
    /// `active` or `deactivated`.
    UserStatusSchema,
    "UserStatus",
    text_enum(
        "Whether the user may sign in and act.",
        USER_STATUSES.iter().map(UserStatus::as_str)
    )
);

named_schema!(
    /// `active` or `discontinued`.
    ProductStatusSchema,
    "ProductStatus",
    text_enum(
        "Whether the product can still be sold.",
        PRODUCT_STATUSES.iter().map(ProductStatus::as_str)
    )
);

named_schema!(
    /// The order state machine's states.
    OrderStatusSchema,
    "OrderStatus",
    text_enum(
        "`pending` until stock is reserved, then `confirmed` or `rejected`; a confirmed \
         order is `paid`, then `shipped`; an open order can be `cancelled`.",
        OrderStatus::ALL.iter().map(OrderStatus::as_str)
    )
);

named_schema!(
    /// The role an event's actor acted in.
    ActorRoleSchema,
    "ActorRole",
    text_enum(
        "The role the actor acted in: a user's role, `system` for Hindsight's own \
         processes, `anonymous` for a caller without a session.",
        ACTOR_ROLES.iter().map(|role| role.as_str())
    )
);

named_schema!(
    /// The sort orders of the product list.
    ProductSortSchema,
    "ProductSort",
    text_enum(
        "`name`, `price` (ascending), `-price` (descending), `created_at` (the default) or \
         `-created_at`; ties are broken by id.",
        ProductSort::ALL.iter().map(ProductSort::as_str)
    )
);

named_schema!(
    /// How aggregate types are spelled.
    AggregateTypeSchema,
    "AggregateType",
    text_enum(
        "The type of an aggregate: `user`, `product` or `order`.",
        AGGREGATE_TYPES.iter().copied()
    )
);

named_schema!(
    /// What a projection is doing.
    ProjectionStateSchema,
    "ProjectionState",
    text_enum(
        "`live` (following the head), `catching_up`, `rebuilding` or `failed`.",
        PROJECTION_STATES
    )
);

named_schema!(
    /// An ISO 4217 code Hindsight accepts.
    CurrencySchema,
    "Currency",
    text_enum(
        "An ISO 4217 currency in circulation.",
        Currency::ACTIVE_CODES.iter().copied()
    )
);

named_schema!(
    /// `Money` as the API shows it.
    MoneySchema,
    "Money",
    ObjectBuilder::new()
        .schema_type(Type::Object)
        .description(Some(
            "An amount in integer minor units of its currency (cents for EUR), never \
             negative and never a floating-point number.",
        ))
        .property(
            "amount",
            ObjectBuilder::new()
                .schema_type(Type::Integer)
                .format(Some(utoipa::openapi::SchemaFormat::KnownFormat(
                    utoipa::openapi::KnownFormat::Int64,
                )))
                .minimum(Some(0)),
        )
        .required("amount")
        .property("currency", CurrencySchema::schema())
        .required("currency")
        .additional_properties(Some(AdditionalProperties::FreeForm(false)))
        .into()
);

named_schema!(
    /// A positive whole number of items.
    QuantitySchema,
    "Quantity",
    ObjectBuilder::new()
        .schema_type(Type::Integer)
        .format(Some(utoipa::openapi::SchemaFormat::KnownFormat(
            utoipa::openapi::KnownFormat::Int64,
        )))
        .minimum(Some(1))
        .maximum(Some(u32::MAX))
        .into()
);

/// `OrderLine` (domain) as the API shows it: what the customer pays for one product.
#[derive(Debug, ToSchema)]
#[schema(as = OrderLine)]
#[allow(dead_code)]
pub struct OrderLineSchema {
    #[schema(value_type = uuid::Uuid)]
    product_id: ProductId,
    /// The product's SKU when the order was placed.
    #[schema(value_type = String, max_length = 64)]
    sku: Sku,
    /// The product's name when the order was placed.
    #[schema(value_type = String)]
    name: ProductName,
    #[schema(value_type = QuantitySchema)]
    quantity: Quantity,
    /// The product's price when the order was placed.
    #[schema(value_type = MoneySchema)]
    unit_price: Money,
    /// `unit_price` × `quantity`.
    #[schema(value_type = MoneySchema)]
    line_total: Money,
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use hindsight_domain::order::OrderLine;

    use super::*;

    fn json<T: PartialSchema>() -> serde_json::Value {
        serde_json::to_value(T::schema()).unwrap()
    }

    fn enum_values<T: PartialSchema>() -> Vec<serde_json::Value> {
        json::<T>()["enum"].as_array().unwrap().clone()
    }

    /// Every listed value is what serde writes for a variant, and every variant is listed
    /// (adding a variant fails to compile here until it is).
    #[test]
    fn status_lists_cover_every_variant() {
        for status in USER_STATUSES {
            match status {
                UserStatus::Active | UserStatus::Deactivated => {}
            }
        }
        for status in PRODUCT_STATUSES {
            match status {
                ProductStatus::Active | ProductStatus::Discontinued => {}
            }
        }
        for role in ACTOR_ROLES {
            match role {
                ActorRole::Customer
                | ActorRole::Admin
                | ActorRole::Auditor
                | ActorRole::Operator
                | ActorRole::System
                | ActorRole::Anonymous => {}
            }
        }
        assert_eq!(
            enum_values::<UserStatusSchema>(),
            USER_STATUSES
                .map(|s| serde_json::to_value(s).unwrap())
                .to_vec()
        );
        assert_eq!(
            enum_values::<ProductStatusSchema>(),
            PRODUCT_STATUSES
                .map(|s| serde_json::to_value(s).unwrap())
                .to_vec()
        );
        assert_eq!(
            enum_values::<OrderStatusSchema>(),
            OrderStatus::ALL
                .map(|s| serde_json::to_value(s).unwrap())
                .to_vec()
        );
        assert_eq!(
            enum_values::<RoleSchema>(),
            Role::ALL.map(|r| serde_json::to_value(r).unwrap()).to_vec()
        );
        assert_eq!(
            enum_values::<ActorRoleSchema>(),
            ACTOR_ROLES
                .map(|r| serde_json::to_value(r).unwrap())
                .to_vec()
        );
        assert_eq!(
            enum_values::<ProductSortSchema>(),
            ProductSort::ALL
                .map(|s| serde_json::to_value(s).unwrap())
                .to_vec()
        );
        assert_eq!(
            enum_values::<CurrencySchema>().len(),
            Currency::ACTIVE_CODES.len()
        );
    }

    #[test]
    fn order_line_and_money_describe_what_serde_writes() {
        let price = Money::new(1999, Currency::EUR).unwrap();
        let line = OrderLine {
            product_id: ProductId::new(),
            sku: Sku::parse("TEA-1").unwrap(),
            name: ProductName::parse("Tea").unwrap(),
            quantity: Quantity::new(2).unwrap(),
            unit_price: price,
            line_total: price.checked_mul(Quantity::new(2).unwrap()).unwrap(),
        };
        let written = serde_json::to_value(&line).unwrap();
        let keys = |value: &serde_json::Value| {
            let mut keys: Vec<String> = value.as_object().unwrap().keys().cloned().collect();
            keys.sort();
            keys
        };
        assert_eq!(
            keys(&written),
            keys(&json::<OrderLineSchema>()["properties"])
        );
        assert_eq!(
            keys(&written["unit_price"]),
            keys(&json::<MoneySchema>()["properties"])
        );
        assert_eq!(
            json::<OrderLineSchema>()["properties"]["quantity"]["$ref"],
            "#/components/schemas/Quantity"
        );
    }
}
