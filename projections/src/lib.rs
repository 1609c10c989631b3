//! Hindsight's read side. Projection workers consume the events the relay publishes to
//! JetStream and fold them into read models in Postgres, applying each batch and advancing
//! the projection's checkpoint in one transaction so every event is applied exactly once.
//!
//! [`read_model`] defines what a read model is; one module per read model (`users`,
//! `products`, `orders`, `sales`, `audit_trail`) holds its apply logic and its queries.

pub mod progress;
pub mod read_model;
pub mod worker;
