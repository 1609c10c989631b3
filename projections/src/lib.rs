//! Hindsight's read side. Projection workers consume the events the relay publishes to
//! JetStream and fold them into read models in Postgres, applying each batch and advancing
//! the projection's checkpoint in one transaction so every event is applied exactly once.
//!
//! [`worker`] runs projections (catch-up from the store, then one durable consumer for a
//! group of read models),
//! [`progress`] lets queries wait for a position, and [`read_model`] defines what a read
//! model is. One module per read model ([`users`], [`products`], [`orders`], [`sales`],
//! [`audit_trail`]) holds its tables' apply logic and its queries; [`page`] holds the
//! keyset pagination and opaque cursors their lists share.
//!
//! The same workers also run the process managers, which react to events by executing
//! commands rather than by writing tables: [`order_process`] reserves stock for every
//! placed order and confirms or rejects it, releases the stock of cancelled orders and
//! commits that of shipped ones.

pub mod audit_trail;
pub mod order_process;
pub mod orders;
pub mod page;
pub mod products;
pub mod progress;
pub mod read_model;
pub mod rebuild;
pub mod sales;
pub mod schema;
pub mod status;
pub mod users;
pub mod worker;

use std::sync::Arc;

use hindsight_commands::CommandBus;
use read_model::ReadModel;

/// The name of the worker (and of its JetStream consumer) that runs every read model.
pub const READ_MODELS_WORKER: &str = "read_models";

/// Every read model, writing its live tables: what the process runs one worker for, as
/// the group [`READ_MODELS_WORKER`].
pub fn live_read_models() -> Vec<Arc<dyn ReadModel>> {
    vec![
        Arc::new(users::Users::live()),
        Arc::new(products::Products::live()),
        Arc::new(orders::Orders::live()),
        Arc::new(sales::Sales::live()),
        Arc::new(audit_trail::AuditTrail::live()),
    ]
}

/// A read model by name, writing to its tables with `suffix` (for rebuilds).
pub fn read_model_with_suffix(name: &str, suffix: &str) -> Option<Arc<dyn ReadModel>> {
    Some(match name {
        "users" => Arc::new(users::Users::with_suffix(suffix)),
        "products" => Arc::new(products::Products::with_suffix(suffix)),
        "orders" => Arc::new(orders::Orders::with_suffix(suffix)),
        "sales" => Arc::new(sales::Sales::with_suffix(suffix)),
        "audit_trail" => Arc::new(audit_trail::AuditTrail::with_suffix(suffix)),
        _ => return None,
    })
}

/// Every process manager, executing its commands through `commands`: what the process
/// runs one worker for each, beside the read models.
pub fn process_managers(commands: CommandBus) -> Vec<Arc<dyn ReadModel>> {
    vec![Arc::new(order_process::OrderProcess::new(commands))]
}
