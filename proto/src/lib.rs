//! Generated `shoal.v1` types and services. Not edited, not linted: domain code
//! converts these at the edge (see `shoal_coordinator::api::convert`).
#![allow(clippy::all, clippy::pedantic, missing_docs)]

pub mod v1 {
    tonic::include_proto!("shoal.v1");
}

/// Bumped on any incompatible change of the agent session; checked at registration.
pub const PROTOCOL_VERSION: u32 = 3;

/// Adds `authorization: Bearer <token>` to every call (no token: nothing).
#[derive(Clone, Debug, Default)]
pub struct Bearer(Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>>);

impl Bearer {
    /// None when there is no token; an error when it cannot be a header value.
    pub fn new(token: Option<&str>) -> Result<Self, String> {
        match token.map(str::trim).filter(|t| !t.is_empty()) {
            None => Ok(Bearer(None)),
            Some(token) => format!("Bearer {token}")
                .parse()
                .map(|v| Bearer(Some(v)))
                .map_err(|_| "the token has characters a header cannot carry".to_string()),
        }
    }
}

impl tonic::service::Interceptor for Bearer {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = &self.0 {
            request
                .metadata_mut()
                .insert("authorization", value.clone());
        }
        Ok(request)
    }
}

/// A channel whose calls carry a bearer token.
pub type AuthChannel =
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, Bearer>;
