//! The HTTP routes, one module per concept.

pub mod health;
