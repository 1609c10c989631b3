//! The product aggregate: catalogue details, price and stock.
//!
//! Stock is split in two: `available` can be reserved by new orders, `reserved` is held
//! for orders that have not yet been paid or dropped. A reservation belongs to one order
//! and ends exactly once, either released back to available stock or committed (sold).
//! Reservation commands are idempotent per order, because the order process retries them:
//! a repeated reserve never takes stock twice, and does not take it again after the
//! reservation ended, nor does a repeated commit fail, as long as the product remembers
//! how that reservation ended. It remembers the most recent [`SETTLEMENTS_KEPT`] endings,
//! so that its state stays bounded however many orders it has had; the order process,
//! which alone ends reservations, redoes one short batch of its events after a crash
//! (docs/adr/0006-order-process-decides-in-batches.md, addendum).

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::ids::{OrderId, ProductId};
use crate::values::{Currency, Description, Money, ProductName, Quantity, Sku, ValueError};
use crate::{Aggregate, DomainEvent, RuleViolation};

/// The most stock a product can hold on hand (available plus reserved). Keeps every stock
/// figure within `u32`, and so within any integer column that stores it.
pub const MAX_STOCK: u64 = u32::MAX as u64;

/// Whether a product can still be sold.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProductStatus {
    Active,
    Discontinued,
}

impl ProductStatus {
    pub fn as_str(&self) -> &'static str {
        match self {
            ProductStatus::Active => "active",
            ProductStatus::Discontinued => "discontinued",
        }
    }
}

impl FromStr for ProductStatus {
    type Err = ValueError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        [ProductStatus::Active, ProductStatus::Discontinued]
            .into_iter()
            .find(|status| status.as_str() == s)
            .ok_or(ValueError::StatusUnknown)
    }
}

impl fmt::Display for ProductStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The events that change a product's listing: what an order line takes from it (SKU,
/// name, price) and whether it can be ordered at all (its status). Stock movements, which
/// the order process appends all the time, leave it as it was.
pub const LISTING_EVENTS: &[&str] = &[
    "ProductCreated",
    "ProductDetailsUpdated",
    "ProductPriceChanged",
    "ProductDiscontinued",
];

/// How many ended reservations a product remembers (the most recent ones). A retry the
/// order process makes after a crash repeats one batch of its events (at most 200 but for
/// a gap it fills), so it finds the ending it repeats.
pub const SETTLEMENTS_KEPT: usize = 1024;

/// How an order's reservation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Settlement {
    /// The stock went back to available.
    Released,
    /// The stock was sold.
    Committed,
}

#[derive(Debug, Clone, PartialEq)]
pub enum ProductCommand {
    Create {
        product_id: ProductId,
        sku: Sku,
        name: ProductName,
        description: Description,
        price: Money,
        stock: u32,
    },
    /// Changes the given fields; `None` leaves a field as it is.
    /// Details and price together, decided as one change (what `PATCH` sends).
    Revise {
        name: Option<ProductName>,
        description: Option<Description>,
        price: Option<Money>,
    },
    UpdateDetails {
        name: Option<ProductName>,
        description: Option<Description>,
    },
    ChangePrice {
        price: Money,
    },
    Restock {
        quantity: Quantity,
    },
    ReserveStock {
        order_id: OrderId,
        quantity: Quantity,
    },
    ReleaseReservation {
        order_id: OrderId,
    },
    CommitReservation {
        order_id: OrderId,
    },
    Discontinue,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum ProductEvent {
    ProductCreated {
        product_id: ProductId,
        sku: Sku,
        name: ProductName,
        description: Description,
        price: Money,
        stock: u32,
    },
    /// Carries only the fields that changed.
    ProductDetailsUpdated {
        name: Option<ProductName>,
        description: Option<Description>,
    },
    ProductPriceChanged {
        price: Money,
    },
    ProductRestocked {
        quantity: Quantity,
    },
    StockReserved {
        order_id: OrderId,
        quantity: Quantity,
    },
    StockReleased {
        order_id: OrderId,
        quantity: Quantity,
    },
    ReservationCommitted {
        order_id: OrderId,
        quantity: Quantity,
    },
    ProductDiscontinued,
}

impl DomainEvent for ProductEvent {
    fn event_type(&self) -> &'static str {
        match self {
            ProductEvent::ProductCreated { .. } => "ProductCreated",
            ProductEvent::ProductDetailsUpdated { .. } => "ProductDetailsUpdated",
            ProductEvent::ProductPriceChanged { .. } => "ProductPriceChanged",
            ProductEvent::ProductRestocked { .. } => "ProductRestocked",
            ProductEvent::StockReserved { .. } => "StockReserved",
            ProductEvent::StockReleased { .. } => "StockReleased",
            ProductEvent::ReservationCommitted { .. } => "ReservationCommitted",
            ProductEvent::ProductDiscontinued => "ProductDiscontinued",
        }
    }

    fn event_version(&self) -> &'static str {
        "1"
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProductError {
    #[error("the product does not exist")]
    ProductNotFound,
    #[error("the product already exists")]
    ProductAlreadyExists,
    #[error("the price must be greater than zero")]
    PriceNotPositive,
    #[error("the price must stay in {expected}, not {found}")]
    CurrencyMismatch { expected: Currency, found: Currency },
    #[error("the product is discontinued")]
    ProductDiscontinued,
    #[error("the product is already discontinued")]
    ProductAlreadyDiscontinued,
    #[error("not enough stock: {requested} requested, {available} available")]
    InsufficientStock { requested: Quantity, available: u64 },
    #[error("the order holds no reservation of this product")]
    ReservationNotFound,
    #[error("the product cannot hold more than {max} items", max = MAX_STOCK)]
    StockOverflow,
}

impl RuleViolation for ProductError {
    fn code(&self) -> &'static str {
        match self {
            ProductError::ProductNotFound => "PRODUCT_NOT_FOUND",
            ProductError::ProductAlreadyExists => "PRODUCT_ALREADY_EXISTS",
            ProductError::PriceNotPositive => "PRICE_NOT_POSITIVE",
            ProductError::CurrencyMismatch { .. } => "CURRENCY_MISMATCH",
            ProductError::ProductDiscontinued => "PRODUCT_DISCONTINUED",
            ProductError::ProductAlreadyDiscontinued => "PRODUCT_ALREADY_DISCONTINUED",
            ProductError::InsufficientStock { .. } => "INSUFFICIENT_STOCK",
            ProductError::ReservationNotFound => "RESERVATION_NOT_FOUND",
            ProductError::StockOverflow => "STOCK_OVERFLOW",
        }
    }

    fn is_not_found(&self) -> bool {
        matches!(self, ProductError::ProductNotFound)
    }
}

/// The product aggregate's state: nothing until created.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Product {
    listing: Option<Listing>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct Listing {
    id: ProductId,
    sku: Sku,
    name: ProductName,
    description: Description,
    price: Money,
    status: ProductStatus,
    stock_available: u64,
    /// Active reservations, one per order.
    reservations: BTreeMap<OrderId, Quantity>,
    /// Orders whose reservation has ended, and how: the most recent ones.
    settled: Settlements,
}

/// The most recent [`SETTLEMENTS_KEPT`] ended reservations, by order.
///
/// Stored (in snapshots) as a list of `[order, settlement]` pairs, oldest first. A
/// snapshot made before the list was bounded holds a map from order to settlement; it is
/// read too, and cut to the bound.
#[derive(Debug, Clone, Default, PartialEq)]
struct Settlements {
    /// Oldest first.
    order: VecDeque<OrderId>,
    by_order: BTreeMap<OrderId, Settlement>,
}

impl Settlements {
    fn get(&self, order_id: &OrderId) -> Option<Settlement> {
        self.by_order.get(order_id).copied()
    }

    fn contains(&self, order_id: &OrderId) -> bool {
        self.by_order.contains_key(order_id)
    }

    /// Records how `order_id`'s reservation ended, forgetting the oldest ending beyond
    /// the bound. A reservation ends once: an order already remembered keeps its place.
    fn record(&mut self, order_id: OrderId, settlement: Settlement) {
        if self.by_order.insert(order_id, settlement).is_none() {
            self.order.push_back(order_id);
        }
        while self.order.len() > SETTLEMENTS_KEPT {
            if let Some(oldest) = self.order.pop_front() {
                self.by_order.remove(&oldest);
            }
        }
    }

    fn ids(&self) -> impl Iterator<Item = OrderId> + '_ {
        self.order.iter().copied()
    }
}

impl Serialize for Settlements {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(
            self.order
                .iter()
                .filter_map(|id| self.by_order.get(id).map(|settlement| (id, settlement))),
        )
    }
}

impl<'de> Deserialize<'de> for Settlements {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Stored {
            Recent(Vec<(OrderId, Settlement)>),
            Unbounded(BTreeMap<OrderId, Settlement>),
        }
        let pairs: Vec<(OrderId, Settlement)> = match Stored::deserialize(deserializer)? {
            Stored::Recent(pairs) => pairs,
            Stored::Unbounded(map) => map.into_iter().collect(),
        };
        let mut settlements = Settlements::default();
        for (order_id, settlement) in pairs {
            settlements.record(order_id, settlement);
        }
        Ok(settlements)
    }
}

impl Listing {
    fn stock_reserved(&self) -> u64 {
        self.reservations.values().map(|q| u64::from(*q)).sum()
    }

    fn ensure_active(&self) -> Result<(), ProductError> {
        match self.status {
            ProductStatus::Active => Ok(()),
            ProductStatus::Discontinued => Err(ProductError::ProductDiscontinued),
        }
    }
}

impl Product {
    pub fn is_created(&self) -> bool {
        self.listing.is_some()
    }

    pub fn id(&self) -> Option<ProductId> {
        self.listing.as_ref().map(|l| l.id)
    }

    pub fn sku(&self) -> Option<&Sku> {
        self.listing.as_ref().map(|l| &l.sku)
    }

    pub fn name(&self) -> Option<&ProductName> {
        self.listing.as_ref().map(|l| &l.name)
    }

    pub fn description(&self) -> Option<&Description> {
        self.listing.as_ref().map(|l| &l.description)
    }

    pub fn price(&self) -> Option<Money> {
        self.listing.as_ref().map(|l| l.price)
    }

    pub fn status(&self) -> Option<ProductStatus> {
        self.listing.as_ref().map(|l| l.status)
    }

    pub fn is_discontinued(&self) -> bool {
        self.status() == Some(ProductStatus::Discontinued)
    }

    /// Stock that new orders can reserve.
    pub fn stock_available(&self) -> u64 {
        self.listing.as_ref().map_or(0, |l| l.stock_available)
    }

    /// Stock held for orders: the sum of the active reservations.
    pub fn stock_reserved(&self) -> u64 {
        self.listing.as_ref().map_or(0, Listing::stock_reserved)
    }

    /// The quantity an order currently holds, if it holds a reservation.
    pub fn reservation(&self, order_id: OrderId) -> Option<Quantity> {
        self.listing
            .as_ref()
            .and_then(|l| l.reservations.get(&order_id).copied())
    }

    /// The active reservations, by order.
    pub fn reservations(&self) -> impl Iterator<Item = (OrderId, Quantity)> + '_ {
        self.listing
            .iter()
            .flat_map(|l| l.reservations.iter().map(|(id, q)| (*id, *q)))
    }

    /// How an order's reservation ended, if it has and the product still remembers it
    /// (the most recent [`SETTLEMENTS_KEPT`]).
    pub fn settlement(&self, order_id: OrderId) -> Option<Settlement> {
        self.listing.as_ref().and_then(|l| l.settled.get(&order_id))
    }

    /// The orders whose reservation has ended, of those the product remembers.
    pub fn settled(&self) -> BTreeSet<OrderId> {
        self.listing.iter().flat_map(|l| l.settled.ids()).collect()
    }

    fn existing(&self) -> Result<&Listing, ProductError> {
        self.listing.as_ref().ok_or(ProductError::ProductNotFound)
    }
}

impl Aggregate for Product {
    const TYPE: &'static str = "product";
    type Command = ProductCommand;
    type Event = ProductEvent;
    type Error = ProductError;

    fn handle(&self, command: ProductCommand) -> Result<Vec<ProductEvent>, ProductError> {
        match command {
            ProductCommand::Create {
                product_id,
                sku,
                name,
                description,
                price,
                stock,
            } => {
                if self.listing.is_some() {
                    return Err(ProductError::ProductAlreadyExists);
                }
                if !price.is_positive() {
                    return Err(ProductError::PriceNotPositive);
                }
                Ok(vec![ProductEvent::ProductCreated {
                    product_id,
                    sku,
                    name,
                    description,
                    price,
                    stock,
                }])
            }
            ProductCommand::Revise {
                name,
                description,
                price,
            } => {
                let mut events =
                    self.handle(ProductCommand::UpdateDetails { name, description })?;
                if let Some(price) = price {
                    events.extend(self.handle(ProductCommand::ChangePrice { price })?);
                }
                Ok(events)
            }
            ProductCommand::UpdateDetails { name, description } => {
                let listing = self.existing()?;
                listing.ensure_active()?;
                let name = name.filter(|n| *n != listing.name);
                let description = description.filter(|d| *d != listing.description);
                if name.is_none() && description.is_none() {
                    return Ok(vec![]);
                }
                Ok(vec![ProductEvent::ProductDetailsUpdated {
                    name,
                    description,
                }])
            }
            ProductCommand::ChangePrice { price } => {
                let listing = self.existing()?;
                listing.ensure_active()?;
                if !price.is_positive() {
                    return Err(ProductError::PriceNotPositive);
                }
                if price.currency() != listing.price.currency() {
                    return Err(ProductError::CurrencyMismatch {
                        expected: listing.price.currency(),
                        found: price.currency(),
                    });
                }
                if price == listing.price {
                    return Ok(vec![]);
                }
                Ok(vec![ProductEvent::ProductPriceChanged { price }])
            }
            ProductCommand::Restock { quantity } => {
                let listing = self.existing()?;
                listing.ensure_active()?;
                let on_hand = listing.stock_available + listing.stock_reserved();
                if on_hand + u64::from(quantity) > MAX_STOCK {
                    return Err(ProductError::StockOverflow);
                }
                Ok(vec![ProductEvent::ProductRestocked { quantity }])
            }
            ProductCommand::ReserveStock { order_id, quantity } => {
                let listing = self.existing()?;
                // A retry of a reservation that was already made, or already ended, is
                // answered as done, whatever the product's state since.
                if listing.reservations.contains_key(&order_id)
                    || listing.settled.contains(&order_id)
                {
                    return Ok(vec![]);
                }
                listing.ensure_active()?;
                if u64::from(quantity) > listing.stock_available {
                    return Err(ProductError::InsufficientStock {
                        requested: quantity,
                        available: listing.stock_available,
                    });
                }
                Ok(vec![ProductEvent::StockReserved { order_id, quantity }])
            }
            ProductCommand::ReleaseReservation { order_id } => {
                let listing = self.existing()?;
                Ok(listing
                    .reservations
                    .get(&order_id)
                    .map(|&quantity| ProductEvent::StockReleased { order_id, quantity })
                    .into_iter()
                    .collect())
            }
            ProductCommand::CommitReservation { order_id } => {
                let listing = self.existing()?;
                if let Some(&quantity) = listing.reservations.get(&order_id) {
                    return Ok(vec![ProductEvent::ReservationCommitted {
                        order_id,
                        quantity,
                    }]);
                }
                match listing.settled.get(&order_id) {
                    Some(Settlement::Committed) => Ok(vec![]),
                    Some(Settlement::Released) | None => Err(ProductError::ReservationNotFound),
                }
            }
            ProductCommand::Discontinue => match self.existing()?.status {
                ProductStatus::Active => Ok(vec![ProductEvent::ProductDiscontinued]),
                ProductStatus::Discontinued => Err(ProductError::ProductAlreadyDiscontinued),
            },
        }
    }

    fn apply(&mut self, event: ProductEvent) {
        if let ProductEvent::ProductCreated {
            product_id,
            sku,
            name,
            description,
            price,
            stock,
        } = event
        {
            self.listing = Some(Listing {
                id: product_id,
                sku,
                name,
                description,
                price,
                status: ProductStatus::Active,
                stock_available: u64::from(stock),
                reservations: BTreeMap::new(),
                settled: Settlements::default(),
            });
            return;
        }
        // `handle` never emits a later event for a product that was not created.
        let Some(listing) = self.listing.as_mut() else {
            return;
        };
        match event {
            ProductEvent::ProductCreated { .. } => {}
            ProductEvent::ProductDetailsUpdated { name, description } => {
                if let Some(name) = name {
                    listing.name = name;
                }
                if let Some(description) = description {
                    listing.description = description;
                }
            }
            ProductEvent::ProductPriceChanged { price } => listing.price = price,
            ProductEvent::ProductRestocked { quantity } => {
                listing.stock_available = listing.stock_available.saturating_add(quantity.into());
            }
            ProductEvent::StockReserved { order_id, quantity } => {
                // `handle` only reserves what is available, so this never saturates.
                listing.stock_available = listing.stock_available.saturating_sub(quantity.into());
                listing.reservations.insert(order_id, quantity);
            }
            ProductEvent::StockReleased { order_id, quantity } => {
                listing.reservations.remove(&order_id);
                listing.stock_available = listing.stock_available.saturating_add(quantity.into());
                listing.settled.record(order_id, Settlement::Released);
            }
            ProductEvent::ReservationCommitted { order_id, .. } => {
                listing.reservations.remove(&order_id);
                listing.settled.record(order_id, Settlement::Committed);
            }
            ProductEvent::ProductDiscontinued => listing.status = ProductStatus::Discontinued,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use proptest::prelude::*;
    use uuid::Uuid;

    use super::*;

    fn created(stock: u32) -> ProductEvent {
        ProductEvent::ProductCreated {
            product_id: ProductId::from_uuid(Uuid::from_u128(1)),
            sku: Sku::parse("TEA-1").unwrap(),
            name: ProductName::parse("Green tea").unwrap(),
            description: Description::parse("Loose leaf").unwrap(),
            price: Money::new(1999, Currency::EUR).unwrap(),
            stock,
        }
    }

    fn order(n: u128) -> OrderId {
        OrderId::from_uuid(Uuid::from_u128(n))
    }

    fn qty(n: u32) -> Quantity {
        Quantity::new(n).unwrap()
    }

    fn product_from(events: impl IntoIterator<Item = ProductEvent>) -> Product {
        let mut product = Product::default();
        for event in events {
            product.apply(event);
        }
        product
    }

    /// What an order line takes from a product, and whether it can be ordered.
    fn listing(product: &Product) -> (Option<Sku>, Option<ProductName>, Option<Money>, bool) {
        (
            product.sku().cloned(),
            product.name().cloned(),
            product.price(),
            product.is_discontinued(),
        )
    }

    #[test]
    fn only_the_listing_events_change_a_products_listing() {
        let later = [
            ProductEvent::ProductDetailsUpdated {
                name: Some(ProductName::parse("Black tea").unwrap()),
                description: None,
            },
            ProductEvent::ProductPriceChanged {
                price: Money::new(2499, Currency::EUR).unwrap(),
            },
            ProductEvent::ProductRestocked { quantity: qty(3) },
            ProductEvent::StockReserved {
                order_id: order(3),
                quantity: qty(1),
            },
            ProductEvent::StockReleased {
                order_id: order(1),
                quantity: qty(1),
            },
            ProductEvent::ReservationCommitted {
                order_id: order(2),
                quantity: qty(1),
            },
            ProductEvent::ProductDiscontinued,
        ];
        // A new kind of event does not compile here until it is listed above.
        for event in &later {
            match event {
                ProductEvent::ProductCreated { .. }
                | ProductEvent::ProductDetailsUpdated { .. }
                | ProductEvent::ProductPriceChanged { .. }
                | ProductEvent::ProductRestocked { .. }
                | ProductEvent::StockReserved { .. }
                | ProductEvent::StockReleased { .. }
                | ProductEvent::ReservationCommitted { .. }
                | ProductEvent::ProductDiscontinued => {}
            }
        }
        let mut product = product_from([
            created(5),
            ProductEvent::StockReserved {
                order_id: order(1),
                quantity: qty(1),
            },
            ProductEvent::StockReserved {
                order_id: order(2),
                quantity: qty(1),
            },
        ]);
        assert_ne!(listing(&product), listing(&Product::default()));
        assert!(LISTING_EVENTS.contains(&created(5).event_type()));
        for event in later {
            let kind = event.event_type();
            let before = listing(&product);
            product.apply(event);
            assert_eq!(
                listing(&product) != before,
                LISTING_EVENTS.contains(&kind),
                "{kind}"
            );
        }
    }

    #[test]
    fn reserving_moves_stock_from_available_to_reserved() {
        let product = product_from([
            created(10),
            ProductEvent::StockReserved {
                order_id: order(1),
                quantity: qty(3),
            },
            ProductEvent::StockReserved {
                order_id: order(2),
                quantity: qty(4),
            },
        ]);
        assert_eq!(product.stock_available(), 3);
        assert_eq!(product.stock_reserved(), 7);
        assert_eq!(product.reservation(order(1)), Some(qty(3)));
        assert_eq!(product.reservations().count(), 2);
    }

    #[test]
    fn releasing_returns_stock_and_committing_sells_it() {
        let product = product_from([
            created(10),
            ProductEvent::StockReserved {
                order_id: order(1),
                quantity: qty(3),
            },
            ProductEvent::StockReserved {
                order_id: order(2),
                quantity: qty(4),
            },
            ProductEvent::StockReleased {
                order_id: order(1),
                quantity: qty(3),
            },
            ProductEvent::ReservationCommitted {
                order_id: order(2),
                quantity: qty(4),
            },
        ]);
        assert_eq!(product.stock_available(), 6);
        assert_eq!(product.stock_reserved(), 0);
        assert_eq!(product.settlement(order(1)), Some(Settlement::Released));
        assert_eq!(product.settlement(order(2)), Some(Settlement::Committed));
        assert_eq!(product.settled(), BTreeSet::from([order(1), order(2)]));
    }

    /// Reserves and ends (released for odd numbers, committed for even) the reservations
    /// of orders `from..to`, one unit each.
    fn settle_orders(product: &mut Product, orders: std::ops::Range<u128>) {
        for n in orders {
            let order_id = order(n);
            let end = if n % 2 == 1 {
                ProductCommand::ReleaseReservation { order_id }
            } else {
                ProductCommand::CommitReservation { order_id }
            };
            for command in [
                ProductCommand::ReserveStock {
                    order_id,
                    quantity: qty(1),
                },
                end,
            ] {
                for event in product.handle(command).unwrap() {
                    product.apply(event);
                }
            }
        }
    }

    #[test]
    fn a_product_remembers_the_most_recent_endings_only_and_answers_their_retries() {
        let kept = SETTLEMENTS_KEPT as u128;
        let mut product = product_from([created(u32::try_from(3 * kept).unwrap())]);
        settle_orders(&mut product, 1..kept + 11);

        assert_eq!(product.settled().len(), SETTLEMENTS_KEPT);
        assert_eq!(product.settled().first(), Some(&order(11)));
        assert_eq!(product.settlement(order(10)), None, "forgotten");
        assert_eq!(product.settlement(order(11)), Some(Settlement::Released));
        assert_eq!(product.settlement(order(12)), Some(Settlement::Committed));
        // Every unit is either available or sold: nothing is held.
        assert_eq!(product.stock_reserved(), 0);
        assert_eq!(
            product.stock_available(),
            3 * kept as u64 - (kept as u64 + 10) / 2
        );

        // Retries of a remembered ending take nothing and refuse nothing.
        for order_id in [order(11), order(12), order(kept + 10)] {
            assert_eq!(
                product.handle(ProductCommand::ReserveStock {
                    order_id,
                    quantity: qty(1),
                }),
                Ok(vec![])
            );
        }
        assert_eq!(
            product.handle(ProductCommand::CommitReservation {
                order_id: order(12)
            }),
            Ok(vec![])
        );
        assert_eq!(
            product.handle(ProductCommand::CommitReservation {
                order_id: order(11)
            }),
            Err(ProductError::ReservationNotFound)
        );

        // The state, as a snapshot stores it, stays the same size however many orders
        // the product has had.
        let size = |product: &Product| serde_json::to_string(product).unwrap().len();
        let before = size(&product);
        settle_orders(&mut product, kept + 11..3 * kept);
        assert_eq!(product.settled().len(), SETTLEMENTS_KEPT);
        assert_eq!(size(&product), before);
    }

    #[test]
    fn a_snapshot_that_kept_every_ending_loads_cut_to_the_most_recent() {
        let mut product = product_from([created(10)]);
        settle_orders(&mut product, 1..5);
        let mut json = serde_json::to_value(&product).unwrap();
        assert_eq!(
            json["settled"],
            serde_json::json!([
                [order(1), "released"],
                [order(2), "committed"],
                [order(3), "released"],
                [order(4), "committed"]
            ])
        );
        // The former shape: a map from order to how its reservation ended.
        json["settled"] = serde_json::json!({
            order(1).to_string(): "released",
            order(2).to_string(): "committed",
            order(3).to_string(): "released",
            order(4).to_string(): "committed",
        });
        let back: Product = serde_json::from_value(json).unwrap();
        assert_eq!(back, product);

        let many: serde_json::Map<String, serde_json::Value> = (1..=SETTLEMENTS_KEPT as u128 + 5)
            .map(|n| (order(n).to_string(), serde_json::json!("released")))
            .collect();
        let mut json = serde_json::to_value(&product).unwrap();
        json["settled"] = serde_json::Value::Object(many);
        let back: Product = serde_json::from_value(json).unwrap();
        assert_eq!(back.settled().len(), SETTLEMENTS_KEPT);
    }

    #[test]
    fn details_update_changes_only_what_differs() {
        let product = product_from([created(1)]);
        let same_name = ProductName::parse("Green tea").unwrap();
        let new_description = Description::parse("Sencha").unwrap();
        assert_eq!(
            product.handle(ProductCommand::UpdateDetails {
                name: Some(same_name.clone()),
                description: Some(new_description.clone()),
            }),
            Ok(vec![ProductEvent::ProductDetailsUpdated {
                name: None,
                description: Some(new_description),
            }])
        );
        assert_eq!(
            product.handle(ProductCommand::UpdateDetails {
                name: Some(same_name),
                description: None,
            }),
            Ok(vec![])
        );
    }

    #[test]
    fn a_revision_changes_details_and_price_in_one_decision_or_not_at_all() {
        let product = product_from([created(10)]);
        let new_price = Money::new(2500, Currency::EUR).unwrap();
        let events = product
            .handle(ProductCommand::Revise {
                name: Some(ProductName::parse("Renamed").unwrap()),
                description: None,
                price: Some(new_price),
            })
            .unwrap();
        assert_eq!(events.len(), 2);
        assert_eq!(
            events[1],
            ProductEvent::ProductPriceChanged { price: new_price }
        );
        let refused = product.handle(ProductCommand::Revise {
            name: Some(ProductName::parse("Renamed").unwrap()),
            description: None,
            price: Some(Money::new(0, Currency::EUR).unwrap()),
        });
        assert_eq!(refused, Err(ProductError::PriceNotPositive));
    }

    #[test]
    fn state_and_events_round_trip_through_json() {
        let product = product_from([
            created(10),
            ProductEvent::StockReserved {
                order_id: order(1),
                quantity: qty(3),
            },
            ProductEvent::StockReserved {
                order_id: order(2),
                quantity: qty(1),
            },
            ProductEvent::StockReleased {
                order_id: order(2),
                quantity: qty(1),
            },
            ProductEvent::ProductDiscontinued,
        ]);
        let json = serde_json::to_value(&product).unwrap();
        let back: Product = serde_json::from_value(json).unwrap();
        assert_eq!(back, product);

        let event = created(5);
        let json = serde_json::to_value(&event).unwrap();
        assert_eq!(
            json["ProductCreated"]["price"],
            serde_json::json!({"amount": 1999, "currency": "EUR"})
        );
        assert_eq!(serde_json::from_value::<ProductEvent>(json).unwrap(), event);
        assert_eq!(event.event_type(), "ProductCreated");
        assert_eq!(
            ProductEvent::ProductDiscontinued.event_type(),
            "ProductDiscontinued"
        );
    }

    #[test]
    fn error_codes_are_stable_and_unique() {
        let errors = [
            ProductError::ProductNotFound,
            ProductError::ProductAlreadyExists,
            ProductError::PriceNotPositive,
            ProductError::CurrencyMismatch {
                expected: Currency::EUR,
                found: Currency::USD,
            },
            ProductError::ProductDiscontinued,
            ProductError::ProductAlreadyDiscontinued,
            ProductError::InsufficientStock {
                requested: qty(2),
                available: 1,
            },
            ProductError::ReservationNotFound,
            ProductError::StockOverflow,
        ];
        let codes: BTreeSet<_> = errors.iter().map(RuleViolation::code).collect();
        assert_eq!(codes.len(), errors.len());
        assert!(errors
            .iter()
            .all(|e| e.is_not_found() == (*e == ProductError::ProductNotFound)));
        assert_eq!(
            errors[6].code(),
            "INSUFFICIENT_STOCK",
            "the API and the order process rely on this code"
        );
    }

    #[test]
    fn status_parses_from_its_text_form() {
        assert_eq!("discontinued".parse(), Ok(ProductStatus::Discontinued));
        assert_eq!("active".parse(), Ok(ProductStatus::Active));
        assert_eq!("x".parse::<ProductStatus>(), Err(ValueError::StatusUnknown));
    }

    #[derive(Debug, Clone)]
    enum Op {
        Restock(u32),
        Reserve(u128, u32),
        Release(u128),
        Commit(u128),
        Discontinue,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            2 => (1..50u32).prop_map(Op::Restock),
            4 => (0..6u128, 1..40u32).prop_map(|(o, q)| Op::Reserve(o, q)),
            2 => (0..6u128).prop_map(Op::Release),
            2 => (0..6u128).prop_map(Op::Commit),
            1 => Just(Op::Discontinue),
        ]
    }

    fn command(op: &Op) -> ProductCommand {
        match *op {
            Op::Restock(q) => ProductCommand::Restock { quantity: qty(q) },
            Op::Reserve(o, q) => ProductCommand::ReserveStock {
                order_id: order(o),
                quantity: qty(q),
            },
            Op::Release(o) => ProductCommand::ReleaseReservation { order_id: order(o) },
            Op::Commit(o) => ProductCommand::CommitReservation { order_id: order(o) },
            Op::Discontinue => ProductCommand::Discontinue,
        }
    }

    proptest! {
        /// Stock is conserved: every unit is available, reserved or sold, and nothing is
        /// created except by the initial stock and restocks.
        #[test]
        fn stock_is_conserved_and_never_double_reserved(
            initial in 0..100u32,
            ops in prop::collection::vec(op(), 0..60),
        ) {
            let mut product = product_from([created(initial)]);
            let mut restocked = 0u64;
            let mut committed = 0u64;
            let mut ever_reserved = BTreeSet::new();

            for op in &ops {
                // A refusal cannot change the state: `handle` only reads it.
                if let Ok(events) = product.handle(command(op)) {
                    for event in events {
                        match &event {
                            ProductEvent::ProductRestocked { quantity } => {
                                restocked += u64::from(*quantity);
                            }
                            ProductEvent::ReservationCommitted { quantity, .. } => {
                                committed += u64::from(*quantity);
                            }
                            ProductEvent::StockReserved { order_id, quantity } => {
                                prop_assert!(
                                    u64::from(*quantity) <= product.stock_available(),
                                    "reserved more than available"
                                );
                                prop_assert!(
                                    ever_reserved.insert(*order_id),
                                    "order {} reserved twice", order_id
                                );
                            }
                            _ => {}
                        }
                        product.apply(event);
                    }
                }

                let reserved: u64 = product.reservations().map(|(_, q)| u64::from(q)).sum();
                prop_assert_eq!(product.stock_reserved(), reserved);
                prop_assert_eq!(
                    product.stock_available() + product.stock_reserved() + committed,
                    u64::from(initial) + restocked
                );
                for (order_id, _) in product.reservations() {
                    prop_assert!(product.settlement(order_id).is_none());
                }
            }
        }
    }
}
