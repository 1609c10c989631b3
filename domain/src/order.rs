//! The order aggregate: what a customer bought, for how much, and where it stands.
//!
//! ```text
//! Pending ──► Confirmed ──► Paid ──► Shipped
//!    │            │           │
//!    ├──► Rejected│           │
//!    └────────────┴───────────┴──► Cancelled
//! ```
//!
//! An order is placed `Pending` with prices already looked up by the caller; the order
//! process then reserves stock for every line and confirms it, or rejects it with the code
//! of the rule that refused a reservation. Every move not drawn above is refused with an
//! error naming why.

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use crate::ids::{OrderId, ProductId, UserId};
use crate::values::{Currency, Money, MoneyError, ProductName, Quantity, Sku, ValueError};
use crate::{Aggregate, DomainEvent, RuleViolation};

/// The most lines one order may have.
pub const MAX_ORDER_LINES: usize = 100;
/// The largest quantity one order line may have.
pub const MAX_LINE_QUANTITY: u32 = 1000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OrderStatus {
    Pending,
    Confirmed,
    Rejected,
    Paid,
    Shipped,
    Cancelled,
}

impl OrderStatus {
    pub const ALL: [OrderStatus; 6] = [
        OrderStatus::Pending,
        OrderStatus::Confirmed,
        OrderStatus::Rejected,
        OrderStatus::Paid,
        OrderStatus::Shipped,
        OrderStatus::Cancelled,
    ];

    pub fn as_str(&self) -> &'static str {
        match self {
            OrderStatus::Pending => "pending",
            OrderStatus::Confirmed => "confirmed",
            OrderStatus::Rejected => "rejected",
            OrderStatus::Paid => "paid",
            OrderStatus::Shipped => "shipped",
            OrderStatus::Cancelled => "cancelled",
        }
    }

    /// Whether the order can still move: not rejected, shipped or cancelled.
    pub fn is_open(&self) -> bool {
        matches!(
            self,
            OrderStatus::Pending | OrderStatus::Confirmed | OrderStatus::Paid
        )
    }
}

impl FromStr for OrderStatus {
    type Err = ValueError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        OrderStatus::ALL
            .into_iter()
            .find(|status| status.as_str() == s)
            .ok_or(ValueError::StatusUnknown)
    }
}

impl fmt::Display for OrderStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A line as the customer asked for it, with the product's details and current price
/// already looked up by the caller.
#[derive(Debug, Clone, PartialEq)]
pub struct NewOrderLine {
    pub product_id: ProductId,
    pub sku: Sku,
    pub name: ProductName,
    pub quantity: Quantity,
    pub unit_price: Money,
}

/// A line as placed: what the customer pays for it is fixed from here on.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OrderLine {
    pub product_id: ProductId,
    pub sku: Sku,
    pub name: ProductName,
    pub quantity: Quantity,
    pub unit_price: Money,
    /// `unit_price × quantity`.
    pub line_total: Money,
}

#[derive(Debug, Clone, PartialEq)]
pub enum OrderCommand {
    Place {
        order_id: OrderId,
        customer_id: UserId,
        lines: Vec<NewOrderLine>,
    },
    Confirm,
    /// `reason` is the code of the rule that refused the order, e.g. `INSUFFICIENT_STOCK`.
    Reject {
        reason: String,
    },
    Pay {
        amount: Money,
    },
    Ship,
    Cancel {
        reason: Option<String>,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum OrderEvent {
    OrderPlaced {
        order_id: OrderId,
        customer_id: UserId,
        lines: Vec<OrderLine>,
        total: Money,
    },
    OrderConfirmed,
    OrderRejected {
        reason: String,
    },
    OrderPaid {
        amount: Money,
    },
    OrderShipped,
    OrderCancelled {
        reason: Option<String>,
        /// The status the order was cancelled from, which says what must be undone
        /// (reserved stock, a payment).
        previous_status: OrderStatus,
    },
}

impl DomainEvent for OrderEvent {
    fn event_type(&self) -> &'static str {
        match self {
            OrderEvent::OrderPlaced { .. } => "OrderPlaced",
            OrderEvent::OrderConfirmed => "OrderConfirmed",
            OrderEvent::OrderRejected { .. } => "OrderRejected",
            OrderEvent::OrderPaid { .. } => "OrderPaid",
            OrderEvent::OrderShipped => "OrderShipped",
            OrderEvent::OrderCancelled { .. } => "OrderCancelled",
        }
    }

    fn event_version(&self) -> &'static str {
        match self {
            // Version 2 records the order's total; version 1 carried the lines only (the
            // write side's upcaster derives the total for stored version 1 events).
            OrderEvent::OrderPlaced { .. } => "2",
            _ => "1",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum OrderError {
    #[error("the order does not exist")]
    OrderNotFound,
    #[error("the order already exists")]
    OrderAlreadyExists,
    #[error("an order needs at least one line")]
    OrderEmpty,
    #[error("an order may have at most {max} lines, not {count}", max = MAX_ORDER_LINES)]
    TooManyOrderLines { count: usize },
    #[error(
        "each line's quantity must be between 1 and {max}, not {quantity}",
        max = MAX_LINE_QUANTITY
    )]
    QuantityOutOfRange {
        product_id: ProductId,
        quantity: Quantity,
    },
    #[error("a product may appear on only one line of an order")]
    DuplicateOrderLine { product_id: ProductId },
    #[error("all lines must be priced in {expected}, not {found}")]
    CurrencyMismatch { expected: Currency, found: Currency },
    #[error("the order total is too large")]
    AmountOverflow,
    #[error("the order is {status}, no longer pending")]
    OrderNotPending { status: OrderStatus },
    #[error("the order is not confirmed yet")]
    OrderNotConfirmed,
    #[error("the order is already paid")]
    OrderAlreadyPaid,
    #[error("the order is not paid")]
    OrderNotPaid,
    #[error("the order is already shipped")]
    OrderAlreadyShipped,
    #[error("the order was rejected")]
    OrderRejected,
    #[error("the order is cancelled")]
    OrderCancelled,
    #[error("the payment does not match the order total")]
    PaymentAmountMismatch { expected: Money, paid: Money },
}

impl RuleViolation for OrderError {
    fn code(&self) -> &'static str {
        match self {
            OrderError::OrderNotFound => "ORDER_NOT_FOUND",
            OrderError::OrderAlreadyExists => "ORDER_ALREADY_EXISTS",
            OrderError::OrderEmpty => "ORDER_EMPTY",
            OrderError::TooManyOrderLines { .. } => "TOO_MANY_ORDER_LINES",
            OrderError::QuantityOutOfRange { .. } => "QUANTITY_OUT_OF_RANGE",
            OrderError::DuplicateOrderLine { .. } => "DUPLICATE_ORDER_LINE",
            OrderError::CurrencyMismatch { .. } => "CURRENCY_MISMATCH",
            OrderError::AmountOverflow => "AMOUNT_OVERFLOW",
            OrderError::OrderNotPending { .. } => "ORDER_NOT_PENDING",
            OrderError::OrderNotConfirmed => "ORDER_NOT_CONFIRMED",
            OrderError::OrderAlreadyPaid => "ORDER_ALREADY_PAID",
            OrderError::OrderNotPaid => "ORDER_NOT_PAID",
            OrderError::OrderAlreadyShipped => "ORDER_ALREADY_SHIPPED",
            OrderError::OrderRejected => "ORDER_REJECTED",
            OrderError::OrderCancelled => "ORDER_CANCELLED",
            OrderError::PaymentAmountMismatch { .. } => "PAYMENT_AMOUNT_MISMATCH",
        }
    }

    fn is_not_found(&self) -> bool {
        matches!(self, OrderError::OrderNotFound)
    }
}

impl From<MoneyError> for OrderError {
    fn from(error: MoneyError) -> Self {
        match error {
            MoneyError::CurrencyMismatch { expected, found } => {
                OrderError::CurrencyMismatch { expected, found }
            }
            MoneyError::Overflow => OrderError::AmountOverflow,
        }
    }
}

/// The order aggregate's state: nothing until placed.
#[derive(Debug, Default, Clone, PartialEq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Order {
    placed: Option<PlacedOrder>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct PlacedOrder {
    id: OrderId,
    customer_id: UserId,
    lines: Vec<OrderLine>,
    total: Money,
    status: OrderStatus,
    rejection_reason: Option<String>,
    cancellation_reason: Option<String>,
}

impl Order {
    pub fn is_placed(&self) -> bool {
        self.placed.is_some()
    }

    pub fn id(&self) -> Option<OrderId> {
        self.placed.as_ref().map(|o| o.id)
    }

    pub fn status(&self) -> Option<OrderStatus> {
        self.placed.as_ref().map(|o| o.status)
    }

    pub fn customer_id(&self) -> Option<UserId> {
        self.placed.as_ref().map(|o| o.customer_id)
    }

    /// The placed lines; empty before the order is placed.
    pub fn lines(&self) -> &[OrderLine] {
        self.placed.as_ref().map_or(&[], |o| &o.lines)
    }

    pub fn total(&self) -> Option<Money> {
        self.placed.as_ref().map(|o| o.total)
    }

    /// The code of the rule that refused the order, once rejected.
    pub fn rejection_reason(&self) -> Option<&str> {
        self.placed.as_ref()?.rejection_reason.as_deref()
    }

    pub fn cancellation_reason(&self) -> Option<&str> {
        self.placed.as_ref()?.cancellation_reason.as_deref()
    }

    fn existing(&self) -> Result<&PlacedOrder, OrderError> {
        self.placed.as_ref().ok_or(OrderError::OrderNotFound)
    }
}

fn place(
    order_id: OrderId,
    customer_id: UserId,
    lines: Vec<NewOrderLine>,
) -> Result<OrderEvent, OrderError> {
    let Some(first) = lines.first() else {
        return Err(OrderError::OrderEmpty);
    };
    if lines.len() > MAX_ORDER_LINES {
        return Err(OrderError::TooManyOrderLines { count: lines.len() });
    }
    let currency = first.unit_price.currency();
    let mut total = Money::zero(currency);
    let mut products = BTreeSet::new();
    let mut placed = Vec::with_capacity(lines.len());
    for line in lines {
        if line.quantity.get() > MAX_LINE_QUANTITY {
            return Err(OrderError::QuantityOutOfRange {
                product_id: line.product_id,
                quantity: line.quantity,
            });
        }
        if !products.insert(line.product_id) {
            return Err(OrderError::DuplicateOrderLine {
                product_id: line.product_id,
            });
        }
        let line_total = line.unit_price.checked_mul(line.quantity)?;
        total = total.checked_add(line_total)?;
        placed.push(OrderLine {
            product_id: line.product_id,
            sku: line.sku,
            name: line.name,
            quantity: line.quantity,
            unit_price: line.unit_price,
            line_total,
        });
    }
    Ok(OrderEvent::OrderPlaced {
        order_id,
        customer_id,
        lines: placed,
        total,
    })
}

impl Aggregate for Order {
    const TYPE: &'static str = "order";
    type Command = OrderCommand;
    type Event = OrderEvent;
    type Error = OrderError;

    fn handle(&self, command: OrderCommand) -> Result<Vec<OrderEvent>, OrderError> {
        use OrderStatus::*;

        let event = match command {
            OrderCommand::Place {
                order_id,
                customer_id,
                lines,
            } => {
                if self.placed.is_some() {
                    return Err(OrderError::OrderAlreadyExists);
                }
                place(order_id, customer_id, lines)?
            }
            OrderCommand::Confirm => match self.existing()?.status {
                Pending => OrderEvent::OrderConfirmed,
                status => return Err(OrderError::OrderNotPending { status }),
            },
            OrderCommand::Reject { reason } => match self.existing()?.status {
                Pending => OrderEvent::OrderRejected { reason },
                status => return Err(OrderError::OrderNotPending { status }),
            },
            OrderCommand::Pay { amount } => {
                let order = self.existing()?;
                match order.status {
                    Confirmed if amount == order.total => OrderEvent::OrderPaid { amount },
                    Confirmed => {
                        return Err(OrderError::PaymentAmountMismatch {
                            expected: order.total,
                            paid: amount,
                        })
                    }
                    Pending => return Err(OrderError::OrderNotConfirmed),
                    Paid => return Err(OrderError::OrderAlreadyPaid),
                    Rejected => return Err(OrderError::OrderRejected),
                    Cancelled => return Err(OrderError::OrderCancelled),
                    Shipped => return Err(OrderError::OrderAlreadyShipped),
                }
            }
            OrderCommand::Ship => match self.existing()?.status {
                Paid => OrderEvent::OrderShipped,
                Pending | Confirmed => return Err(OrderError::OrderNotPaid),
                Shipped => return Err(OrderError::OrderAlreadyShipped),
                Rejected => return Err(OrderError::OrderRejected),
                Cancelled => return Err(OrderError::OrderCancelled),
            },
            OrderCommand::Cancel { reason } => match self.existing()?.status {
                previous_status @ (Pending | Confirmed | Paid) => OrderEvent::OrderCancelled {
                    reason,
                    previous_status,
                },
                Shipped => return Err(OrderError::OrderAlreadyShipped),
                Rejected => return Err(OrderError::OrderRejected),
                Cancelled => return Err(OrderError::OrderCancelled),
            },
        };
        Ok(vec![event])
    }

    fn apply(&mut self, event: OrderEvent) {
        if let OrderEvent::OrderPlaced {
            order_id,
            customer_id,
            lines,
            total,
        } = event
        {
            self.placed = Some(PlacedOrder {
                id: order_id,
                customer_id,
                lines,
                total,
                status: OrderStatus::Pending,
                rejection_reason: None,
                cancellation_reason: None,
            });
            return;
        }
        // `handle` never emits a later event for an order that was not placed.
        let Some(order) = self.placed.as_mut() else {
            return;
        };
        match event {
            OrderEvent::OrderPlaced { .. } => {}
            OrderEvent::OrderConfirmed => order.status = OrderStatus::Confirmed,
            OrderEvent::OrderRejected { reason } => {
                order.status = OrderStatus::Rejected;
                order.rejection_reason = Some(reason);
            }
            OrderEvent::OrderPaid { .. } => order.status = OrderStatus::Paid,
            OrderEvent::OrderShipped => order.status = OrderStatus::Shipped,
            OrderEvent::OrderCancelled { reason, .. } => {
                order.status = OrderStatus::Cancelled;
                order.cancellation_reason = reason;
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use proptest::prelude::*;
    use uuid::Uuid;

    use super::*;

    fn eur(amount: i64) -> Money {
        Money::new(amount, Currency::EUR).unwrap()
    }

    fn line(product: u128, quantity: u32, unit_price: Money) -> NewOrderLine {
        NewOrderLine {
            product_id: ProductId::from_uuid(Uuid::from_u128(product)),
            sku: Sku::parse(&format!("SKU-{product}")).unwrap(),
            name: ProductName::parse("Green tea").unwrap(),
            quantity: Quantity::new(quantity).unwrap(),
            unit_price,
        }
    }

    fn place_command(lines: Vec<NewOrderLine>) -> OrderCommand {
        OrderCommand::Place {
            order_id: OrderId::from_uuid(Uuid::from_u128(10)),
            customer_id: UserId::from_uuid(Uuid::from_u128(20)),
            lines,
        }
    }

    fn placed_order() -> Order {
        let mut order = Order::default();
        let events = order
            .handle(place_command(vec![
                line(1, 2, eur(1999)),
                line(2, 1, eur(500)),
            ]))
            .unwrap();
        for event in events {
            order.apply(event);
        }
        order
    }

    #[test]
    fn placing_computes_line_totals_and_the_total() {
        let order = placed_order();
        assert_eq!(order.status(), Some(OrderStatus::Pending));
        assert_eq!(order.total(), Some(eur(4498)));
        let totals: Vec<_> = order.lines().iter().map(|l| l.line_total).collect();
        assert_eq!(totals, [eur(3998), eur(500)]);
        assert_eq!(
            order.customer_id(),
            Some(UserId::from_uuid(Uuid::from_u128(20)))
        );
    }

    #[test]
    fn line_and_quantity_limits_are_inclusive() {
        let order = Order::default();
        let hundred: Vec<_> = (0..100).map(|p| line(p, 1, eur(1))).collect();
        assert!(order.handle(place_command(hundred)).is_ok());
        assert!(order
            .handle(place_command(vec![line(1, MAX_LINE_QUANTITY, eur(1))]))
            .is_ok());
    }

    #[test]
    fn rejection_and_cancellation_reasons_are_kept() {
        let mut rejected = placed_order();
        rejected.apply(OrderEvent::OrderRejected {
            reason: "INSUFFICIENT_STOCK".to_owned(),
        });
        assert_eq!(rejected.rejection_reason(), Some("INSUFFICIENT_STOCK"));

        let mut cancelled = placed_order();
        cancelled.apply(OrderEvent::OrderCancelled {
            reason: Some("changed my mind".to_owned()),
            previous_status: OrderStatus::Pending,
        });
        assert_eq!(cancelled.status(), Some(OrderStatus::Cancelled));
        assert_eq!(cancelled.cancellation_reason(), Some("changed my mind"));
    }

    #[test]
    fn state_and_events_round_trip_through_json() {
        let order = placed_order();
        let json = serde_json::to_value(&order).unwrap();
        assert_eq!(json["status"], serde_json::json!("pending"));
        assert_eq!(serde_json::from_value::<Order>(json).unwrap(), order);

        let event = OrderEvent::OrderCancelled {
            reason: None,
            previous_status: OrderStatus::Paid,
        };
        let json = serde_json::to_value(&event).unwrap();
        assert_eq!(
            json,
            serde_json::json!({"OrderCancelled": {"reason": null, "previous_status": "paid"}})
        );
        assert_eq!(serde_json::from_value::<OrderEvent>(json).unwrap(), event);
        assert_eq!(event.event_type(), "OrderCancelled");
        assert_eq!(OrderEvent::OrderShipped.event_version(), "1");
    }

    #[test]
    fn status_text_forms_agree_with_serde() {
        for status in OrderStatus::ALL {
            assert_eq!(status.as_str().parse(), Ok(status));
            assert_eq!(
                serde_json::to_value(status).unwrap(),
                serde_json::json!(status.as_str())
            );
        }
        assert_eq!(
            "lost".parse::<OrderStatus>(),
            Err(ValueError::StatusUnknown)
        );
    }

    #[test]
    fn every_error_has_its_own_code() {
        let errors = [
            OrderError::OrderNotFound,
            OrderError::OrderAlreadyExists,
            OrderError::OrderEmpty,
            OrderError::TooManyOrderLines { count: 101 },
            OrderError::QuantityOutOfRange {
                product_id: ProductId::from_uuid(Uuid::nil()),
                quantity: Quantity::ONE,
            },
            OrderError::DuplicateOrderLine {
                product_id: ProductId::from_uuid(Uuid::nil()),
            },
            OrderError::CurrencyMismatch {
                expected: Currency::EUR,
                found: Currency::USD,
            },
            OrderError::AmountOverflow,
            OrderError::OrderNotPending {
                status: OrderStatus::Paid,
            },
            OrderError::OrderNotConfirmed,
            OrderError::OrderAlreadyPaid,
            OrderError::OrderNotPaid,
            OrderError::OrderAlreadyShipped,
            OrderError::OrderRejected,
            OrderError::OrderCancelled,
            OrderError::PaymentAmountMismatch {
                expected: eur(2),
                paid: eur(1),
            },
        ];
        let codes: BTreeSet<_> = errors.iter().map(RuleViolation::code).collect();
        assert_eq!(codes.len(), errors.len());
        assert!(errors
            .iter()
            .all(|e| e.is_not_found() == (*e == OrderError::OrderNotFound)));
    }

    #[derive(Debug, Clone, Copy)]
    enum Op {
        Confirm,
        Reject,
        PayTotal,
        PayWrongAmount,
        Ship,
        Cancel,
    }

    /// The legal moves, written out independently of `handle`.
    fn legal(from: OrderStatus, op: Op) -> Option<OrderStatus> {
        use OrderStatus::*;
        match (from, op) {
            (Pending, Op::Confirm) => Some(Confirmed),
            (Pending, Op::Reject) => Some(Rejected),
            (Confirmed, Op::PayTotal) => Some(Paid),
            (Paid, Op::Ship) => Some(Shipped),
            (Pending | Confirmed | Paid, Op::Cancel) => Some(Cancelled),
            _ => None,
        }
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            Just(Op::Confirm),
            Just(Op::Reject),
            Just(Op::PayTotal),
            Just(Op::PayWrongAmount),
            Just(Op::Ship),
            Just(Op::Cancel),
        ]
    }

    proptest! {
        /// Whatever is attempted, the status only follows the drawn transitions, and a
        /// command is accepted exactly when its move is legal.
        #[test]
        fn status_only_moves_along_legal_transitions(ops in prop::collection::vec(op(), 0..30)) {
            let mut order = placed_order();
            let total = order.total().unwrap();
            for op in ops {
                let from = order.status().unwrap();
                let command = match op {
                    Op::Confirm => OrderCommand::Confirm,
                    Op::Reject => OrderCommand::Reject { reason: "INSUFFICIENT_STOCK".to_owned() },
                    Op::PayTotal => OrderCommand::Pay { amount: total },
                    Op::PayWrongAmount => OrderCommand::Pay {
                        amount: total.checked_add(eur(1)).unwrap(),
                    },
                    Op::Ship => OrderCommand::Ship,
                    Op::Cancel => OrderCommand::Cancel { reason: None },
                };
                match (order.handle(command), legal(from, op)) {
                    (Ok(events), Some(to)) => {
                        prop_assert_eq!(events.len(), 1);
                        for event in events {
                            order.apply(event);
                        }
                        prop_assert_eq!(order.status(), Some(to));
                    }
                    // A refusal cannot change the state: `handle` only reads it.
                    (Err(_), None) => {}
                    (result, expected) => prop_assert!(
                        false,
                        "{:?} from {:?}: got {:?}, legal move {:?}", op, from, result, expected
                    ),
                }
            }
        }
    }
}
