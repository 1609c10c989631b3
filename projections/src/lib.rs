//! Hindsight's read side. Projection workers consume the events the relay publishes to
//! JetStream and fold them into read models in Postgres, applying each batch and advancing
//! the projection's checkpoint in one transaction so every event is applied exactly once.
//!
//! [`worker`] runs projections (catch-up from the store, then one durable consumer for a
//! group of read models; [`read_model_groups`] says which run together),
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
use sqlx::PgPool;
use worker::{ProjectionWorker, WorkerSettings};

/// Every read model, writing its live tables.
pub fn live_read_models() -> Vec<Arc<dyn ReadModel>> {
    vec![
        Arc::new(users::Users::live()),
        Arc::new(products::Products::live()),
        Arc::new(orders::Orders::live()),
        Arc::new(sales::Sales::live()),
        Arc::new(audit_trail::AuditTrail::live()),
    ]
}

/// How the process runs the read models: each group is one worker with one JetStream
/// consumer (named as the group) and one transaction per batch. The audit trail, which
/// writes the most per event, has a worker of its own, so its statements do not add to the
/// latency of the other read models' batches.
pub fn read_model_groups() -> Vec<(&'static str, Vec<Arc<dyn ReadModel>>)> {
    let (audit, others): (Vec<_>, Vec<_>) = live_read_models()
        .into_iter()
        .partition(|model| model.name() == audit_trail::NAME);
    vec![("read_models", others), (audit_trail::NAME, audit)]
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

/// Every worker a process runs for the read side, following `settings`'s stream: one per
/// group of [`read_model_groups`], and one per process manager with small batches (its
/// commands run inside the batch, so short batches keep the work redone after a crash
/// short).
pub fn workers(
    pool: &PgPool,
    client: &async_nats::Client,
    commands: CommandBus,
    settings: &WorkerSettings,
) -> Vec<ProjectionWorker> {
    let mut workers: Vec<ProjectionWorker> = read_model_groups()
        .into_iter()
        .map(|(name, models)| {
            ProjectionWorker::group(pool.clone(), client.clone(), name, models, settings.clone())
        })
        .collect();
    let manager_settings = manager_settings(settings);
    workers.extend(process_managers(commands).into_iter().map(|manager| {
        ProjectionWorker::new(
            pool.clone(),
            client.clone(),
            manager,
            manager_settings.clone(),
        )
    }));
    workers
}

/// A process manager's worker settings: `settings` with short batches. A batch is what a
/// crash between its commands and its checkpoint makes the manager redo, and a product
/// remembers only its most recent reservation endings (`SETTLEMENTS_KEPT`): a redo must
/// span fewer of them than that.
fn manager_settings(settings: &WorkerSettings) -> WorkerSettings {
    let mut manager_settings = settings.clone();
    manager_settings.batch_size = 50;
    manager_settings.catch_up_batch = 200;
    manager_settings
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_process_managers_redo_spans_fewer_endings_than_a_product_remembers() {
        let settings = manager_settings(&WorkerSettings::new("events", "events"));
        let kept = hindsight_domain::product::SETTLEMENTS_KEPT;
        assert!(settings.batch_size < kept);
        assert!(usize::try_from(settings.catch_up_batch).is_ok_and(|batch| batch < kept));
    }

    #[test]
    fn every_read_model_runs_in_exactly_one_group() {
        let mut grouped: Vec<&str> = read_model_groups()
            .iter()
            .flat_map(|(_, models)| models.iter().map(|model| model.name()))
            .collect();
        grouped.sort_unstable();
        let mut live: Vec<&str> = live_read_models()
            .iter()
            .map(|model| model.name())
            .collect();
        live.sort_unstable();
        assert_eq!(grouped, live);
    }

    #[test]
    fn a_group_consumer_is_named_after_no_other_groups_read_model() {
        let groups = read_model_groups();
        for (name, models) in &groups {
            assert!(!models.is_empty(), "group {name} is empty");
            // A group may keep the consumer of its only member; it must never take over
            // (or delete) the consumer of a read model of another group.
            for (other, other_models) in &groups {
                if other != name {
                    assert!(other_models.iter().all(|model| model.name() != *name));
                }
            }
        }
    }
}
