//! The door: every request but `/healthz` shows a bearer token that allows it
//! (`auth::needs`), for gRPC and HTTP alike; who it is rides along in the
//! request's extensions. Refusals say why: gRPC as UNAUTHENTICATED or
//! PERMISSION_DENIED, HTTP as 401 or 403 with a JSON error.

use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use tracing::info;

use crate::auth::{Auth, Needs, Principal, bearer, needs};

pub async fn guard(State(auth): State<Auth>, mut request: Request, next: Next) -> Response {
    let path = request.uri().path().to_string();
    let rule = needs(&path, request.method());
    if rule == Needs::Nothing {
        return next.run(request).await;
    }
    let grpc = path.starts_with("/shoal.v1.");
    let principal = match bearer(request.headers()) {
        None => {
            return refuse(
                grpc,
                false,
                "no token: pass one with --token or SHOAL_TOKEN, or run `shoal login` (`shoal up` makes an admin token for you)",
            );
        }
        Some(token) => match auth.verify(token) {
            Ok(principal) => principal,
            Err(why) => {
                info!(path = %path, why, "request refused");
                return refuse(
                    grpc,
                    false,
                    &format!("{why}: this coordinator does not accept it"),
                );
            }
        },
    };
    let allowed = match (&rule, &principal) {
        (Needs::Node, Principal::Node { .. }) => Ok(()),
        (Needs::Node, Principal::Person { .. }) => {
            Err("only a node's agent may call this".to_string())
        }
        (Needs::Role(_), Principal::Node { .. }) => {
            Err("a node credential cannot call this".to_string())
        }
        (Needs::Role(needed), Principal::Person { role, .. }) if role >= needed => Ok(()),
        (Needs::Role(needed), Principal::Person { role, .. }) => Err(format!(
            "a {} token may not do this; it needs {}",
            role.as_str(),
            needed.as_str()
        )),
        (Needs::Nothing, _) => Ok(()),
    };
    if let Err(why) = allowed {
        info!(path = %path, %why, "request refused");
        return refuse(grpc, true, &why);
    }
    request.extensions_mut().insert(principal);
    next.run(request).await
}

fn refuse(grpc: bool, known: bool, why: &str) -> Response {
    if grpc {
        let status = if known {
            tonic::Status::permission_denied(why)
        } else {
            tonic::Status::unauthenticated(why)
        };
        let (parts, ()) = status.into_http::<()>().into_parts();
        return Response::from_parts(parts, Body::empty());
    }
    let code = if known {
        StatusCode::FORBIDDEN
    } else {
        StatusCode::UNAUTHORIZED
    };
    let body = serde_json::json!({ "error": why }).to_string();
    (code, [(header::CONTENT_TYPE, "application/json")], body).into_response()
}
