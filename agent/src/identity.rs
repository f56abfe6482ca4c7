//! The node's managed-identity endpoint, as App Service and the managed service's
//! compute have it: `GET $IDENTITY_ENDPOINT?resource=R[&client_id=C]` with the
//! header `X-IDENTITY-HEADER: $IDENTITY_HEADER` returns `{access_token, expires_on,
//! resource, token_type, client_id}`. The header is a secret of one attempt's
//! instance (from its launch); it dies with the instance. The token itself comes
//! from the coordinator, which checks the cluster's identities and signs it.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::Json;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Deserialize;
use shoal_proto::AuthChannel;
use shoal_proto::v1 as pb;
use shoal_proto::v1::agent_client::AgentClient;
use tracing::warn;

use crate::runtime::Slot;

#[derive(Clone)]
pub struct TokenEndpoint {
    secrets: Arc<Mutex<HashMap<String, (Slot, String)>>>,
    pub url: String,
}

#[derive(Clone)]
struct Shared {
    secrets: Arc<Mutex<HashMap<String, (Slot, String)>>>,
    client: AgentClient<AuthChannel>,
}

#[derive(Deserialize)]
struct Asked {
    resource: Option<String>,
    client_id: Option<String>,
}

fn error(code: StatusCode, why: &str) -> Response {
    (code, Json(serde_json::json!({"error": why}))).into_response()
}

async fn token(
    State(shared): State<Shared>,
    headers: HeaderMap,
    Query(asked): Query<Asked>,
) -> Response {
    let Some(secret) = headers
        .get("x-identity-header")
        .and_then(|v| v.to_str().ok())
    else {
        return error(
            StatusCode::UNAUTHORIZED,
            "missing the X-IDENTITY-HEADER header ($IDENTITY_HEADER)",
        );
    };
    let slot = shared
        .secrets
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(secret)
        .cloned();
    let Some((slot, token)) = slot else {
        return error(
            StatusCode::UNAUTHORIZED,
            "unknown X-IDENTITY-HEADER (its job has ended?)",
        );
    };
    let Some(resource) = asked.resource.filter(|r| !r.is_empty()) else {
        return error(
            StatusCode::BAD_REQUEST,
            "give the resource: ?resource=https://...",
        );
    };
    let request = pb::JobTokenRequest {
        attempt_id: slot.attempt_id,
        instance: slot.instance,
        resource,
        client_id: asked.client_id.unwrap_or_default(),
        token,
    };
    let mut client = shared.client.clone();
    match client.issue_token(request).await {
        Ok(reply) => {
            let token = reply.into_inner();
            Json(serde_json::json!({
                "access_token": token.access_token,
                "expires_on": token.expires_on.to_string(),
                "resource": token.resource,
                "token_type": "Bearer",
                "client_id": token.client_id,
            }))
            .into_response()
        }
        Err(status) => {
            let code = match status.code() {
                tonic::Code::InvalidArgument | tonic::Code::FailedPrecondition => {
                    StatusCode::BAD_REQUEST
                }
                tonic::Code::PermissionDenied => StatusCode::FORBIDDEN,
                tonic::Code::Unauthenticated | tonic::Code::NotFound => StatusCode::UNAUTHORIZED,
                _ => StatusCode::BAD_GATEWAY,
            };
            error(code, status.message())
        }
    }
}

impl TokenEndpoint {
    /// Serves on a free port of loopback: the node's own jobs (processes, and
    /// containers that share the node's network) reach it; others have no secret.
    pub async fn start(client: AgentClient<AuthChannel>) -> std::io::Result<Self> {
        let secrets: Arc<Mutex<HashMap<String, (Slot, String)>>> = Arc::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}/msi/token", listener.local_addr()?);
        let app = axum::Router::new()
            .route("/msi/token", axum::routing::get(token))
            .with_state(Shared {
                secrets: secrets.clone(),
                client,
            });
        tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                warn!(error = %e, "identity endpoint stopped");
            }
        });
        Ok(TokenEndpoint { secrets, url })
    }

    /// The job's `IDENTITY_HEADER` secret stands for its instance (and the
    /// instance's token, shown to the coordinator).
    pub fn admit(&self, secret: &str, slot: Slot, token: String) {
        self.secrets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(secret.to_string(), (slot, token));
    }

    pub fn forget(&self, slot: &Slot) {
        self.secrets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|_, (s, _)| s != slot);
    }
}
