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
//! crash, a lost database) is redone from the start of its event (a batch is stored whole
//! or not at all, but a crash can fall between its append and the checkpoint). Every command is
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
//! # Orders are decided in batches
//!
//! The commands for up to [`BATCH`] consecutive order events are decided one
//! after another in a [`Batch`], each on the state the ones before it left, and their
//! events appended in one statement: one commit for a run of decisions instead of two per
//! order, and the same outcome as deciding them one by one (first placed, first served).
//! An order whose placement is the event in hand and that is not cached is presumed
//! pending at version 1 instead of read; the decision's append at sequence 2 proves it.
//! When another writer changed one of the batch's aggregates first (a customer cancelled
//! an order still pending, another process restocked a product), the statement fails and
//! stores nothing. The run is decided again on what the store holds; should that conflict
//! too, it is split in halves, down to single events, which are retried a bounded number
//! of times (docs/adr/0006-order-process-decides-in-batches.md).
//!
//! Every command carries [`EventMetadata::caused_by`] the event it reacts to, so the
//! audit trail leads from each reservation and decision back to the customer's request.
//! A store failure or lasting contention is [`ApplyError::Unavailable`] (the worker
//! retries later); a refusal that consistent aggregates cannot produce is
//! [`ApplyError::Invariant`] (the projection stops, `failed`, for someone to look at).

use std::error::Error as StdError;
use std::time::Duration;

use futures::future::BoxFuture;
use hindsight_commands::batch::{Batch, Conflict, Read};
use hindsight_commands::{Actor, CommandBus, EventMetadata, Refusal, StoredEvent};
use hindsight_domain::ids::OrderId;
use hindsight_domain::order::{
    Order, OrderCommand, OrderError, OrderEvent, OrderLine, OrderStatus,
};
use hindsight_domain::product::{Product, ProductCommand, ProductError};
use hindsight_domain::{Aggregate, RuleViolation};
use sqlx::PgConnection;

use crate::page::aggregate_uuid;
use crate::read_model::{ApplyError, ReadModel};

/// The order process's projection name, under which its checkpoint is kept.
pub const NAME: &str = "order_process";

/// Order events whose commands are decided in one batch, at most.
pub const BATCH: usize = 128;

/// The `order_process` process manager.
#[derive(Debug, Clone)]
pub struct OrderProcess {
    commands: CommandBus,
}

/// A run of order events to decide in one batch.
struct Run<'e> {
    events: &'e [&'e StoredEvent],
    /// Whether orders may be presumed from their placement (only before any conflict).
    presume: bool,
    /// How many times this run was tried and conflicted.
    conflicts: u32,
}

impl OrderProcess {
    pub fn new(commands: CommandBus) -> Self {
        Self { commands }
    }

    async fn apply_events(&self, events: &[StoredEvent]) -> Result<(), ApplyError> {
        let concerned: Vec<&StoredEvent> =
            events.iter().filter(|event| self.concerns(event)).collect();
        // A stack of runs, the next to decide on top, so splits keep the stream's order.
        let mut runs: Vec<Run<'_>> = concerned
            .chunks(BATCH)
            .rev()
            .map(|events| Run {
                events,
                presume: true,
                conflicts: 0,
            })
            .collect();
        let max_attempts = self.commands.orders.settings().max_attempts.max(1);
        while let Some(run) = runs.pop() {
            match self.decide_run(&run).await? {
                Ok(()) => {}
                // Most likely a presumption that did not hold (an order cancelled, or
                // decided already on a replay): the same run, decided on the store.
                Err(Conflict) if run.presume => runs.push(Run {
                    presume: false,
                    ..run
                }),
                Err(Conflict) if run.events.len() > 1 => {
                    let (first, second) = run.events.split_at(run.events.len() / 2);
                    tracing::debug!(
                        events = run.events.len(),
                        "a batch conflicted, splitting it"
                    );
                    for events in [second, first] {
                        runs.push(Run {
                            events,
                            presume: false,
                            conflicts: 0,
                        });
                    }
                }
                Err(Conflict) if run.conflicts + 1 < max_attempts => {
                    let pause = 2u64 << run.conflicts.min(6);
                    tokio::time::sleep(Duration::from_millis(pause)).await;
                    runs.push(Run {
                        presume: false,
                        conflicts: run.conflicts + 1,
                        ..run
                    });
                }
                Err(conflict) => return Err(ApplyError::Unavailable(Box::new(conflict))),
            }
        }
        Ok(())
    }

    /// Decides the commands of `run` in one batch and appends them.
    async fn decide_run(&self, run: &Run<'_>) -> Result<Result<(), Conflict>, ApplyError> {
        let mut batch = self.commands.batch().await;
        for event in run.events {
            let step = Step {
                position: event.position,
                order_id: OrderId::from_uuid(aggregate_uuid(event)?),
                metadata: EventMetadata::caused_by(
                    Actor::system(),
                    format!("order-process:{}", event.event_id),
                    event.event_id,
                    &event.metadata,
                ),
            };
            let decoded = event.decode::<OrderEvent>()?;
            match &decoded {
                OrderEvent::OrderPlaced { lines, .. } => {
                    // Its own placement is all an order has until it is decided.
                    let placed = (run.presume && event.sequence == 1).then(|| {
                        let mut order = Order::default();
                        order.apply(decoded.clone());
                        order
                    });
                    step.decide(&mut batch, lines, placed).await?;
                }
                OrderEvent::OrderCancelled { .. } => {
                    let lines = step.lines(&mut batch).await?;
                    step.release(&mut batch, &lines).await?;
                }
                OrderEvent::OrderShipped => {
                    let lines = step.lines(&mut batch).await?;
                    step.commit(&mut batch, &lines).await?;
                }
                OrderEvent::OrderConfirmed
                | OrderEvent::OrderRejected { .. }
                | OrderEvent::OrderPaid { .. } => {}
            }
        }
        Ok(batch.commit().await?.map(|_| ()))
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
/// it causes, which are staged on the run's batch.
struct Step {
    position: i64,
    order_id: OrderId,
    metadata: EventMetadata,
}

impl Step {
    /// Reserves the lines and records the decision, or, when the order is decided
    /// already, makes the reservations agree with that decision. `placed`: the order as
    /// its placement left it, presumed current unless the batch knows better.
    async fn decide(
        &self,
        batch: &mut Batch<'_>,
        lines: &[OrderLine],
        placed: Option<Order>,
    ) -> Result<(), ApplyError> {
        let id = self.order_id.as_uuid();
        if let Some(order) = placed {
            batch.presume(id, order, 1).await?;
        }
        // A redo or a replay must not reserve for an order that is decided (or was
        // cancelled before its turn came): that would hold stock other orders could get.
        // Pending as presumed or cached is proven by the decision's append; anything else
        // is read from the store before it is acted on.
        let mut status = self.status_of(batch.state::<Order>(id, Read::AsHeld).await?)?;
        if status != OrderStatus::Pending {
            status = self.status_of(batch.state::<Order>(id, Read::Current).await?)?;
        }
        if status != OrderStatus::Pending {
            return self.settle(batch, lines, status).await;
        }
        let (decision, decided) = match self.reserve(batch, lines).await? {
            None => (OrderCommand::Confirm, OrderStatus::Confirmed),
            Some(code) => (
                OrderCommand::Reject {
                    reason: code.to_owned(),
                },
                OrderStatus::Rejected,
            ),
        };
        let status = match batch.execute::<Order>(id, decision, &self.metadata).await? {
            Ok(()) => decided,
            // Cancelled by the customer while stock was being reserved.
            Err(Refusal::Rule(OrderError::OrderNotPending { status })) => status,
            Err(refusal) => return Err(self.unexpected("deciding the order", refusal)),
        };
        tracing::debug!(order_id = %self.order_id, %status, "order decided");
        self.settle(batch, lines, status).await
    }

    /// Reserves every line in order, stopping at the first refusal; answers the code of
    /// the rule that refused, if one did.
    async fn reserve(
        &self,
        batch: &mut Batch<'_>,
        lines: &[OrderLine],
    ) -> Result<Option<&'static str>, ApplyError> {
        for line in lines {
            let command = ProductCommand::ReserveStock {
                order_id: self.order_id,
                quantity: line.quantity,
            };
            match batch
                .execute::<Product>(line.product_id.as_uuid(), command, &self.metadata)
                .await?
            {
                Ok(()) => {}
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
    async fn settle(
        &self,
        batch: &mut Batch<'_>,
        lines: &[OrderLine],
        status: OrderStatus,
    ) -> Result<(), ApplyError> {
        match status {
            OrderStatus::Rejected | OrderStatus::Cancelled => self.release(batch, lines).await,
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
    async fn release(&self, batch: &mut Batch<'_>, lines: &[OrderLine]) -> Result<(), ApplyError> {
        for line in lines {
            let command = ProductCommand::ReleaseReservation {
                order_id: self.order_id,
            };
            match batch
                .execute::<Product>(line.product_id.as_uuid(), command, &self.metadata)
                .await?
            {
                Ok(()) => {}
                // A product that does not exist refused the reservation: it holds nothing.
                Err(Refusal::Rule(ProductError::ProductNotFound)) => {}
                Err(refusal) => return Err(self.unexpected("releasing stock", refusal)),
            }
        }
        Ok(())
    }

    /// Commits the order's reservation on every line's product.
    async fn commit(&self, batch: &mut Batch<'_>, lines: &[OrderLine]) -> Result<(), ApplyError> {
        for line in lines {
            let command = ProductCommand::CommitReservation {
                order_id: self.order_id,
            };
            if let Err(refusal) = batch
                .execute::<Product>(line.product_id.as_uuid(), command, &self.metadata)
                .await?
            {
                return Err(self.unexpected("committing stock", refusal));
            }
        }
        Ok(())
    }

    /// The order's lines. They never change once placed, so a cached copy serves.
    async fn lines(&self, batch: &mut Batch<'_>) -> Result<Vec<OrderLine>, ApplyError> {
        batch
            .state::<Order>(self.order_id.as_uuid(), Read::AsHeld)
            .await?
            .map(|order| order.lines().to_vec())
            .ok_or_else(|| self.invariant(format!("order {} has no events", self.order_id)))
    }

    fn status_of(&self, order: Option<&Order>) -> Result<OrderStatus, ApplyError> {
        order
            .and_then(Order::status)
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
