//! Generated `shoal.v1` types and services. Not edited, not linted: domain code
//! converts these at the edge (see `shoal_coordinator::api::convert`).
#![allow(clippy::all, clippy::pedantic, missing_docs)]

pub mod v1 {
    tonic::include_proto!("shoal.v1");
}

/// Bumped on any incompatible change of the agent session; checked at registration.
pub const PROTOCOL_VERSION: u32 = 2;
