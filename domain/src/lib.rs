//! The pure heart of Hindsight: the `user`, `product` and `order` aggregates, their
//! commands, events and business-rule errors, and the validated value objects they are
//! made of (`Email`, `Sku`, `Money`, `Quantity`, typed ids).
//!
//! Nothing in this crate performs IO. A command is decided from the aggregate's current
//! state and the command alone; anything that must be looked up elsewhere (a product's
//! price, a password hash) is computed by the caller and carried on the command. The
//! write side (`hindsight-commands`) adapts [`Aggregate`] to cqrs-es and stores the events
//! in Postgres; the read side folds the same events into read models.
//!
//! Modules: [`ids`] and [`values`] hold the value objects, [`role`] the access roles, and
//! [`user`], [`product`] and [`order`] one aggregate each, with its error enum whose
//! variants carry the stable codes the HTTP API answers with.

use std::fmt::Debug;

use serde::de::DeserializeOwned;
use serde::Serialize;

pub mod ids;
pub mod order;
pub mod product;
pub mod role;
pub mod user;
pub mod values;

/// An event-sourced aggregate: decides commands against its state and folds events.
///
/// `handle` must be deterministic and side-effect free; `apply` must never fail, because
/// it replays history that has already been accepted.
pub trait Aggregate:
    Default + Clone + Debug + Serialize + DeserializeOwned + Send + Sync + 'static
{
    /// The aggregate type as stored and as spelled in the API: `user`, `product`, `order`.
    const TYPE: &'static str;
    type Command: Clone + Debug + Send + 'static;
    type Event: DomainEvent;
    type Error: RuleViolation + std::error::Error + PartialEq + Send + Sync + 'static;

    /// Decides a command. An empty vector means the command was an accepted no-op.
    fn handle(&self, command: Self::Command) -> Result<Vec<Self::Event>, Self::Error>;

    /// Folds one accepted event into the state.
    fn apply(&mut self, event: Self::Event);
}

/// An event as stored: a stable type name and a schema version per variant.
pub trait DomainEvent:
    Serialize + DeserializeOwned + Clone + PartialEq + Debug + Send + Sync + 'static
{
    /// The stable name stored in the event table, e.g. `OrderPlaced`.
    fn event_type(&self) -> &'static str;
    /// The payload schema version of this event type, e.g. `1`.
    fn event_version(&self) -> &'static str;
}

/// A refused command: every variant names the business rule and its stable API code.
pub trait RuleViolation {
    /// The stable, upper-snake-case code the API answers with, e.g. `INSUFFICIENT_STOCK`.
    fn code(&self) -> &'static str;
    /// Whether the refusal means "the aggregate does not exist" (answered as 404).
    fn is_not_found(&self) -> bool {
        false
    }
}
