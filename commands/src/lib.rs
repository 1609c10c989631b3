//! Hindsight's write side. A command from the API arrives here with its
//! [`metadata::EventMetadata`] envelope, is decided by the pure domain aggregate loaded
//! from the Postgres event store ([`store`], cqrs-es over postgres-es with snapshots), and
//! its events are appended with a global position. Uniqueness of e-mail addresses and SKUs
//! is claimed in the same transaction as the creating event (see `migrations/`).
//!
//! [`aggregate`] adapts the domain aggregates to cqrs-es, [`db`] connects and migrates,
//! and [`CommandBus`] bundles one [`store::AggregateStore`] per aggregate type;
//! [`batch`] decides commands on several aggregates in order and appends them together.
//! [`history`] reads the stored history back for auditors and exports.

use std::sync::Arc;

use hindsight_domain::{order::Order, product::Product, user::User};
use sqlx::PgPool;
use statements::StatementPool;
use wakeup::AppendSignal;

pub mod aggregate;
pub mod batch;
pub mod db;
pub mod event;
pub mod history;
pub mod integrity;
pub mod metadata;
pub mod relay;
pub mod statements;
pub mod store;
pub mod turns;
pub mod upcast;
pub mod wakeup;

pub use event::StoredEvent;
pub use metadata::{Actor, ActorRole, EventMetadata};
pub use store::{AggregateStore, Executed, ReadAt, Refusal, StoreError, StoreSettings, UniqueKey};

/// The write path of every aggregate type, cheap to clone.
#[derive(Debug, Clone)]
pub struct CommandBus {
    pub users: Arc<AggregateStore<User>>,
    pub products: Arc<AggregateStore<Product>>,
    pub orders: Arc<AggregateStore<Order>>,
    pool: PgPool,
    statements: StatementPool,
    appends: AppendSignal,
    /// Held by the one [`batch::Batch`] that may run at a time.
    batching: Arc<tokio::sync::Mutex<()>>,
}

/// One aggregate type's write path, sharing the bus's pools and append signal.
fn store<A: hindsight_domain::Aggregate>(
    pool: &PgPool,
    statements: &StatementPool,
    settings: StoreSettings,
    appends: &AppendSignal,
) -> Arc<AggregateStore<A>> {
    Arc::new(AggregateStore::new(
        pool.clone(),
        statements.clone(),
        settings,
        appends.clone(),
    ))
}

impl CommandBus {
    /// A bus on `pool`, with a [`StatementPool`] of the same size beside it for the
    /// statements a command runs on their own (its append, the checks of a cached
    /// aggregate's version).
    pub fn new(pool: PgPool, settings: StoreSettings) -> Self {
        let appends = AppendSignal::new(pool.clone());
        let statements = StatementPool::beside(&pool);
        Self {
            users: store(&pool, &statements, settings, &appends),
            products: store(&pool, &statements, settings, &appends),
            orders: store(&pool, &statements, settings, &appends),
            pool,
            statements,
            appends,
            batching: Arc::default(),
        }
    }

    /// Raised after each committed append of this bus; a relay in the same process
    /// watches it (see [`wakeup`]).
    pub fn appends(&self) -> &AppendSignal {
        &self.appends
    }

    pub fn pool(&self) -> &PgPool {
        &self.pool
    }

    /// The pool for statements that run on their own (see [`statements`]); the API's
    /// reads share it.
    pub fn statements(&self) -> &StatementPool {
        &self.statements
    }
}
