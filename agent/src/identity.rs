//! The node's managed-identity endpoint, as App Service and the managed service's
//! compute have it: `GET $IDENTITY_ENDPOINT?resource=R[&client_id=C]` with the
//! header `X-IDENTITY-HEADER: $IDENTITY_HEADER` returns `{access_token, expires_on,
//! resource, token_type, client_id}`. The header is a secret of one attempt's
//! instance (from its launch); it dies with the instance. The token itself comes
//! from the coordinator, which checks the cluster's identities and signs it.
//!
//! The same endpoint is the jobs' `MLFLOW_TRACKING_URI`: MLflow's calls
//! (`/api/2.0/mlflow...`, with `MLFLOW_TRACKING_TOKEN` as the bearer token, again a
//! secret of one instance) are relayed to the coordinator as `Agent.Track`, which
//! answers them as its tracking API does, writing only the job's own runs.

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

use crate::coordinators::Coordinators;
use crate::runtime::Slot;

/// Each instance's secret, with its slot and the token its launch carried.
type Secrets = Arc<Mutex<HashMap<String, (Slot, String)>>>;

#[derive(Clone)]
pub struct TokenEndpoint {
    secrets: Secrets,
    tracking: Secrets,
    pub url: String,
    /// MLFLOW_TRACKING_URI for this node's jobs.
    pub tracking_url: String,
    /// The same endpoint where this node's job containers reach it (the URL's
    /// scheme, host and port: `http://172.17.0.1:41234`); None: they cannot.
    pub container_base: Option<String>,
}

#[derive(Clone)]
struct Shared {
    secrets: Secrets,
    tracking: Secrets,
    coordinators: Coordinators<AgentClient<AuthChannel>>,
}

/// Largest MLflow call relayed (an artifact travels in one).
const MAX_TRACKING_BODY: usize = 256 << 20;

/// An MLflow error, as its server writes them.
fn mlflow_error(code: StatusCode, error_code: &str, why: &str) -> Response {
    (
        code,
        Json(serde_json::json!({"error_code": error_code, "message": why})),
    )
        .into_response()
}

/// One MLflow call of a job, relayed to the coordinator with its instance's token.
async fn track(State(shared): State<Shared>, request: axum::extract::Request) -> Response {
    let (parts, body) = request.into_parts();
    let secret = parts
        .headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    let Some(secret) = secret else {
        return mlflow_error(
            StatusCode::UNAUTHORIZED,
            "UNAUTHENTICATED",
            "no MLFLOW_TRACKING_TOKEN: this endpoint answers the jobs of this node only",
        );
    };
    let known = shared
        .tracking
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get(secret)
        .cloned();
    let Some((slot, token)) = known else {
        return mlflow_error(
            StatusCode::UNAUTHORIZED,
            "UNAUTHENTICATED",
            "unknown MLFLOW_TRACKING_TOKEN (its job has ended?)",
        );
    };
    let body = match axum::body::to_bytes(body, MAX_TRACKING_BODY).await {
        Ok(body) => body,
        Err(e) => {
            return mlflow_error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "INVALID_PARAMETER_VALUE",
                &format!(
                    "cannot read the call (at most {} MiB): {e}",
                    MAX_TRACKING_BODY >> 20
                ),
            );
        }
    };
    let call = pb::TrackCall {
        attempt_id: slot.attempt_id,
        instance: slot.instance,
        token,
        method: parts.method.to_string(),
        path_and_query: parts
            .uri
            .path_and_query()
            .map(ToString::to_string)
            .unwrap_or_default(),
        content_type: parts
            .headers
            .get(axum::http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_string(),
        body: body.to_vec(),
    };
    // The MLflow client retries a 503; its next call goes to the next endpoint.
    let answer = shared
        .coordinators
        .call(|mut client| async move { client.track(call).await })
        .await;
    match answer {
        Ok(reply) => {
            let reply = reply.into_inner();
            let status =
                StatusCode::from_u16(reply.status as u16).unwrap_or(StatusCode::BAD_GATEWAY);
            let mut response = (status, reply.body).into_response();
            if let Ok(kind) = axum::http::HeaderValue::from_str(&reply.content_type) {
                response
                    .headers_mut()
                    .insert(axum::http::header::CONTENT_TYPE, kind);
            }
            response
        }
        Err(status) => {
            // Refused by the coordinator: not a retryable 5xx, so the client says why.
            let (code, error_code) = match status.code() {
                tonic::Code::PermissionDenied => (StatusCode::FORBIDDEN, "PERMISSION_DENIED"),
                tonic::Code::Unauthenticated | tonic::Code::NotFound => {
                    (StatusCode::UNAUTHORIZED, "UNAUTHENTICATED")
                }
                tonic::Code::InvalidArgument | tonic::Code::FailedPrecondition => {
                    (StatusCode::BAD_REQUEST, "INVALID_PARAMETER_VALUE")
                }
                _ => (StatusCode::SERVICE_UNAVAILABLE, "TEMPORARILY_UNAVAILABLE"),
            };
            mlflow_error(code, error_code, status.message())
        }
    }
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
    let answer = shared
        .coordinators
        .call(|mut client| async move { client.issue_token(request).await })
        .await;
    match answer {
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
    /// `for_containers`: also listens where job containers reach this agent
    /// (the address to bind, and the host they know it by).
    pub async fn start(
        coordinators: Coordinators<AgentClient<AuthChannel>>,
        for_containers: Option<(std::net::IpAddr, String)>,
    ) -> std::io::Result<Self> {
        let secrets = Secrets::default();
        let tracking = Secrets::default();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let address = listener.local_addr()?;
        let url = format!("http://{address}/msi/token");
        let app = axum::Router::new()
            .route("/msi/token", axum::routing::get(token))
            .route("/api/2.0/{*call}", axum::routing::any(track))
            .with_state(Shared {
                secrets: secrets.clone(),
                tracking: tracking.clone(),
                coordinators,
            });
        let mut container_base = None;
        if let Some((bind, host)) = for_containers {
            match tokio::net::TcpListener::bind((bind, 0)).await {
                Ok(second) => {
                    let port = second.local_addr()?.port();
                    container_base = Some(format!("http://{host}:{port}"));
                    let app = app.clone();
                    tokio::spawn(async move {
                        if let Err(e) = axum::serve(second, app).await {
                            warn!(error = %e, "the containers' identity endpoint stopped");
                        }
                    });
                }
                Err(e) => warn!(address = %bind, error = %e,
                    "cannot listen where job containers would reach this agent: containers get no identity or tracking endpoint"),
            }
        }
        tokio::spawn(async move {
            if let Err(e) = axum::serve(listener, app).await {
                warn!(error = %e, "identity endpoint stopped");
            }
        });
        Ok(TokenEndpoint {
            secrets,
            tracking,
            url,
            tracking_url: format!("http://{address}"),
            container_base,
        })
    }

    /// The job's `IDENTITY_HEADER` secret stands for its instance (and the
    /// instance's token, shown to the coordinator).
    pub fn admit(&self, secret: &str, slot: Slot, token: String) {
        self.secrets
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(secret.to_string(), (slot, token));
    }

    /// The job's `MLFLOW_TRACKING_TOKEN` stands for its instance, likewise.
    pub fn admit_tracking(&self, secret: &str, slot: Slot, token: String) {
        self.tracking
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(secret.to_string(), (slot, token));
    }

    /// The identity endpoint's URL and the tracking URI for a job: a container's
    /// (None: containers cannot reach this agent), or a process's.
    pub fn urls(&self, container: bool) -> Option<(String, String)> {
        if !container {
            return Some((self.url.clone(), self.tracking_url.clone()));
        }
        let base = self.container_base.as_ref()?;
        Some((format!("{base}/msi/token"), base.clone()))
    }

    pub fn forget(&self, slot: &Slot) {
        for secrets in [&self.secrets, &self.tracking] {
            secrets
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .retain(|_, (s, _)| s != slot);
        }
    }
}
