//! The HTTP routes, one module per concept.

pub mod auth;
pub mod health;
pub mod orders;
pub mod products;
pub mod support;
pub mod users;
