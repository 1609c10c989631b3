//! Hindsight's system tests: one test binary, one module per capability. Each test makes
//! its own database (and stream names) and cleans up; see `hindsight_tests`.

#![allow(clippy::expect_used, clippy::unwrap_used)]

mod api;
mod audit;
mod authorization;
mod batches;
mod chaos;
mod dependencies;
mod distribution;
mod event_store;
mod health;
mod idempotency;
mod integrity;
mod openapi;
mod order_process;
mod orders;
mod pool;
mod protections;
mod read_models;
mod rebuild;
mod schema_evolution;
