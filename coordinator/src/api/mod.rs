//! The gRPC services (user API and agent session) and the JSON HTTP API, on one port.

pub mod admit;
mod assets;
pub mod convert;
pub mod cutter;
mod exec;
mod grpc;
pub mod guard;
pub mod http;
mod jobs;
pub mod node_link;

pub use grpc::Api;
