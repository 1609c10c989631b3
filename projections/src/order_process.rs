//! The order process: the process manager that drives every placed order to a decision
//! across the order and product aggregates.
//!
//! It runs as the projection `order_process` under the ordinary
//! [`ProjectionWorker`](crate::worker::ProjectionWorker), so it follows the event stream
//! with a durable consumer and checkpoint like any read model, but instead of writing
//! tables it executes commands:
//!
//! - `OrderPlaced`: reserve every line's quantity on its product, then confirm the order;
//!   when a reservation is refused (`INSUFFICIENT_STOCK`, `PRODUCT_DISCONTINUED`,
//!   `PRODUCT_NOT_FOUND`), reject the order with that code and release what was reserved;
//! - `OrderCancelled`: release the order's reservation on every product;
//! - `OrderShipped`: commit the order's reservation on every product (the stock is sold).
//!
//! # Redoing a step is safe
//!
//! The checkpoint moves only after `apply` returns, so a step interrupted half-way (a
//! crash, a lost database) is redone from the start of its event. Every command is
//! idempotent per order (a repeated reservation takes nothing, releasing or committing a
//! reservation that already ended changes nothing), or its refusal says the work is done
//! (a decision refused with `ORDER_NOT_PENDING`). Two rules keep a redo from doubling,
//! losing or leaking a reservation:
//!
//! - The order is decided before any of its reservations is released. The product answers
//!   a repeated reservation of an order whose reservation already ended as done, so a
//!   release made before the decision could be mistaken for a reservation on the redo.
//! - The decision recorded on the order wins. Whenever the order turns out to be decided
//!   already (a redo, a replay, or a customer who cancelled meanwhile), the reservations
//!   are made to agree with it: released for a rejected or cancelled order, kept for a
//!   confirmed one.
//!
//! Every command carries [`EventMetadata::caused_by`] the event it reacts to, so the
//! audit trail leads from each reservation and decision back to the customer's request.
//! A store failure or lasting contention is [`ApplyError::Unavailable`] (the worker
//! retries later); a refusal that consistent aggregates cannot produce is
//! [`ApplyError::Invariant`] (the projection stops, `failed`, for someone to look at).

use std::error::Error as StdError;

use futures::future::BoxFuture;
use hindsight_commands::{Actor, CommandBus, EventMetadata, Refusal, StoredEvent};
use hindsight_domain::ids::OrderId;
use hindsight_domain::order::{
    Order, OrderCommand, OrderError, OrderEvent, OrderLine, OrderStatus,
};
use hindsight_domain::product::{ProductCommand, ProductError};
use hindsight_domain::{Aggregate, RuleViolation};
use sqlx::PgConnection;

use crate::page::aggregate_uuid;
use crate::read_model::{ApplyError, ReadModel};

/// The order process's projection name, under which its checkpoint is kept.
pub const NAME: &str = "order_process";

/// The `order_process` process manager.
#[derive(Debug, Clone)]
pub struct OrderProcess {
    commands: CommandBus,
}

impl OrderProcess {
    pub fn new(commands: CommandBus) -> Self {
        Self { commands }
    }

    async fn apply_events(&self, events: &[StoredEvent]) -> Result<(), ApplyError> {
        for event in events.iter().filter(|event| self.concerns(event)) {
            let step = Step {
                commands: &self.commands,
                position: event.position,
                order_id: OrderId::from_uuid(aggregate_uuid(event)?),
                metadata: EventMetadata::caused_by(
                    Actor::system(),
                    format!("order-process:{}", event.event_id),
                    event.event_id,
                    &event.metadata,
                ),
            };
            match event.decode::<OrderEvent>()? {
                OrderEvent::OrderPlaced { lines, .. } => step.decide(&lines).await?,
                OrderEvent::OrderCancelled { .. } => {
                    let order = step.order().await?;
                    step.release(order.lines()).await?;
                }
                OrderEvent::OrderShipped => {
                    let order = step.order().await?;
                    step.commit(order.lines()).await?;
                }
                OrderEvent::OrderConfirmed
                | OrderEvent::OrderRejected { .. }
                | OrderEvent::OrderPaid { .. } => {}
            }
        }
        Ok(())
    }
}

impl ReadModel for OrderProcess {
    fn name(&self) -> &'static str {
        NAME
    }

    /// None: the order lines it needs are loaded from the order aggregate, and everything
    /// it decides is recorded as events.
    fn tables(&self) -> Vec<String> {
        Vec::new()
    }

    /// Only order events start or end a step; the rest of the stream (restocks, users, the
    /// reservations it causes itself) passes it by without a transaction.
    fn concerns(&self, event: &StoredEvent) -> bool {
        event.aggregate_type == Order::TYPE
    }

    fn apply<'a>(
        &'a self,
        _connection: &'a mut PgConnection,
        events: &'a [StoredEvent],
    ) -> BoxFuture<'a, Result<(), ApplyError>> {
        Box::pin(self.apply_events(events))
    }
}

/// Reacting to one order event: the order it concerns and the metadata of every command
/// it causes.
struct Step<'a> {
    commands: &'a CommandBus,
    position: i64,
    order_id: OrderId,
    metadata: EventMetadata,
}

impl Step<'_> {
    /// Reserves the lines and records the decision, or, when the order is decided
    /// already, makes the reservations agree with that decision.
    async fn decide(&self, lines: &[OrderLine]) -> Result<(), ApplyError> {
        // A redo or a replay must not reserve for an order that is decided (or was
        // cancelled before its turn came): that would hold stock other orders could get.
        let status = self.status_of(&self.order().await?)?;
        if status != OrderStatus::Pending {
            return self.settle(lines, status).await;
        }
        let (decision, decided) = match self.reserve(lines).await? {
            None => (OrderCommand::Confirm, OrderStatus::Confirmed),
            Some(code) => (
                OrderCommand::Reject {
                    reason: code.to_owned(),
                },
                OrderStatus::Rejected,
            ),
        };
        let status = match self
            .commands
            .orders
            .execute(self.order_id.as_uuid(), decision, &self.metadata, None)
            .await?
        {
            Ok(_) => decided,
            // Cancelled by the customer while stock was being reserved.
            Err(Refusal::Rule(OrderError::OrderNotPending { status })) => status,
            Err(refusal) => return Err(self.unexpected("deciding the order", refusal)),
        };
        tracing::debug!(order_id = %self.order_id, %status, "order decided");
        self.settle(lines, status).await
    }

    /// Reserves every line in order, stopping at the first refusal; answers the code of
    /// the rule that refused, if one did.
    async fn reserve(&self, lines: &[OrderLine]) -> Result<Option<&'static str>, ApplyError> {
        for line in lines {
            let command = ProductCommand::ReserveStock {
                order_id: self.order_id,
                quantity: line.quantity,
            };
            match self
                .commands
                .products
                .execute(line.product_id.as_uuid(), command, &self.metadata, None)
                .await?
            {
                Ok(_) => {}
                Err(Refusal::Rule(
                    rule @ (ProductError::InsufficientStock { .. }
                    | ProductError::ProductDiscontinued
                    | ProductError::ProductNotFound),
                )) => return Ok(Some(rule.code())),
                Err(refusal) => return Err(self.unexpected("reserving stock", refusal)),
            }
        }
        Ok(None)
    }

    /// Makes the reservations agree with the order's recorded decision.
    async fn settle(&self, lines: &[OrderLine], status: OrderStatus) -> Result<(), ApplyError> {
        match status {
            OrderStatus::Rejected | OrderStatus::Cancelled => self.release(lines).await,
            // The reservations stand until the order ships or is cancelled, each of which
            // is handled on its own event.
            OrderStatus::Confirmed | OrderStatus::Paid | OrderStatus::Shipped => Ok(()),
            OrderStatus::Pending => Err(self.invariant(format!(
                "order {} is still pending after its decision",
                self.order_id
            ))),
        }
    }

    /// Releases the order's reservation on every line's product; a line that holds none
    /// (never reserved, or already released) is left as it is.
    async fn release(&self, lines: &[OrderLine]) -> Result<(), ApplyError> {
        for line in lines {
            let command = ProductCommand::ReleaseReservation {
                order_id: self.order_id,
            };
            match self
                .commands
                .products
                .execute(line.product_id.as_uuid(), command, &self.metadata, None)
                .await?
            {
                Ok(_) => {}
                // A product that does not exist refused the reservation: it holds nothing.
                Err(Refusal::Rule(ProductError::ProductNotFound)) => {}
                Err(refusal) => return Err(self.unexpected("releasing stock", refusal)),
            }
        }
        Ok(())
    }

    /// Commits the order's reservation on every line's product.
    async fn commit(&self, lines: &[OrderLine]) -> Result<(), ApplyError> {
        for line in lines {
            let command = ProductCommand::CommitReservation {
                order_id: self.order_id,
            };
            if let Err(refusal) = self
                .commands
                .products
                .execute(line.product_id.as_uuid(), command, &self.metadata, None)
                .await?
            {
                return Err(self.unexpected("committing stock", refusal));
            }
        }
        Ok(())
    }

    /// The order as it stands now.
    async fn order(&self) -> Result<Order, ApplyError> {
        self.commands
            .orders
            .load(self.order_id.as_uuid())
            .await?
            .map(|loaded| loaded.state)
            .ok_or_else(|| self.invariant(format!("order {} has no events", self.order_id)))
    }

    fn status_of(&self, order: &Order) -> Result<OrderStatus, ApplyError> {
        order
            .status()
            .ok_or_else(|| self.invariant(format!("order {} was never placed", self.order_id)))
    }

    /// A refusal the process does not expect: contention passes (the batch is retried),
    /// anything else means the aggregates disagree with the process.
    fn unexpected<E>(&self, doing: &str, refusal: Refusal<E>) -> ApplyError
    where
        E: RuleViolation + StdError + Send + Sync + 'static,
    {
        match refusal {
            Refusal::Contention => ApplyError::Unavailable(Box::new(refusal)),
            refusal => self.invariant(format!(
                "{doing} for order {} was refused with {}: {refusal}",
                self.order_id,
                refusal.code()
            )),
        }
    }

    fn invariant(&self, reason: String) -> ApplyError {
        ApplyError::Invariant {
            position: self.position,
            reason,
        }
    }
}
