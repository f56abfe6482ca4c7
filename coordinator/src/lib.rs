//! Shoal's control plane: the domain model, the decision core (scheduler and
//! autoscaler, pure functions), the control loop that owns all state, node
//! providers, the SQLite store, and the gRPC + HTTP APIs on one port.

pub mod admission;
pub mod api;
pub mod artifacts;
pub mod auth;
pub mod autoscaler;
pub mod computefile;
pub mod control;
pub mod data;
pub mod db;
pub mod error;
pub mod governance;
pub mod identity;
pub mod leader;
pub mod metrics;
pub mod model;
pub mod parallel;
pub mod provider;
pub mod scheduler;
pub mod server;
pub mod sim;
pub mod store;
pub mod studio;
pub mod sweep;
pub mod tls;
pub mod tracking;
pub mod view;
pub mod vmsize;

#[cfg(test)]
mod fuzz_tests;
#[cfg(test)]
mod testing;

pub use error::{Error, Result};
