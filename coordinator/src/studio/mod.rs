//! The studio: the web UI, served by the coordinator under `/studio/` on its
//! HTTP port. Pages are HTML rendered here (askama templates in
//! `coordinator/templates/studio/`), charts are SVG drawn here (`charts`), and a
//! job page follows its job over Server-Sent Events with a few lines of plain
//! JavaScript. It reads and acts through the same `Api` and control handle as
//! gRPC and HTTP; whether a person may do something is `auth::needs` of the API
//! call it stands for, so the rules live in one place.
//!
//! People sign in with an API token; the studio keeps it in a server-side
//! session named by an HttpOnly, SameSite=Strict cookie (Secure under TLS), and
//! every form carries the session's CSRF token.

mod charts;
mod history;
mod pages;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{FromRef, FromRequest, Request, State};
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};

use crate::api::Api;
use crate::auth::{Needs, Principal, Role};

pub use history::History;

/// A session lasts this long without use.
const IDLE_LIMIT: Duration = Duration::from_secs(12 * 3600);
const COOKIE: &str = "shoal_studio";

#[derive(Clone)]
pub struct Studio {
    api: Api,
    sessions: Arc<Mutex<HashMap<String, Session>>>,
    history: Arc<History>,
    /// Under TLS: cookies are `Secure`.
    secure: bool,
}

impl FromRef<Studio> for Api {
    fn from_ref(studio: &Studio) -> Api {
        studio.api.clone()
    }
}

struct Session {
    token: String,
    csrf: String,
    last_seen: Instant,
}

/// Whether a form's secret is the one expected, in time that does not tell how
/// much of it matched.
fn same_secret(given: &str, expected: &str) -> bool {
    use subtle::ConstantTimeEq;
    bool::from(given.as_bytes().ct_eq(expected.as_bytes()))
}

/// Who is signed in, for the page being served.
#[derive(Clone)]
pub struct Signed {
    pub role: Role,
    pub csrf: String,
}

impl Signed {
    /// Whether this person may make the API call `path` with `method` stands for
    /// (the guard's own rule); the refusal names what it needs.
    pub fn may(&self, method: Method, path: &str) -> Result<(), String> {
        match crate::auth::needs(path, &method) {
            Needs::Role(needed) if self.role < needed => Err(format!(
                "a {} token may not do this; it needs {}",
                self.role.as_str(),
                needed.as_str()
            )),
            _ => Ok(()),
        }
    }
}

/// The studio's routes, and the task that samples nodes for its charts.
pub fn router(api: Api, secure: bool) -> Router {
    let history = Arc::new(History::default());
    {
        let history = history.clone();
        let control = api.control.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(history::EVERY);
            loop {
                every.tick().await;
                history.sample(&control).await;
            }
        });
    }
    let studio = Studio {
        api,
        sessions: Arc::default(),
        history,
        secure,
    };
    let signed_in = Router::new()
        .route(
            "/studio/clusters",
            get(pages::clusters).post(pages::create_cluster),
        )
        .route("/studio/clusters/{name}", get(pages::cluster))
        .route(
            "/studio/clusters/{name}/update",
            post(pages::update_cluster),
        )
        .route(
            "/studio/clusters/{name}/delete",
            post(pages::delete_cluster),
        )
        .route("/studio/jobs", get(pages::jobs))
        .route("/studio/jobs/{id}", get(pages::job))
        .route("/studio/jobs/{id}/cancel", post(pages::cancel_job))
        .route("/studio/jobs/{id}/events", get(pages::job_events))
        .route(
            "/studio/jobs/{id}/named-outputs/{name}",
            get(crate::api::http::job_named_output),
        )
        .route("/studio/nodes/{id}", get(pages::node))
        .route("/studio/logout", post(logout))
        .layer(axum::middleware::from_fn_with_state(
            studio.clone(),
            require_session,
        ));
    Router::new()
        .route("/", get(|| async { Redirect::to("/studio/clusters") }))
        .route(
            "/studio",
            get(|| async { Redirect::to("/studio/clusters") }),
        )
        .route(
            "/studio/",
            get(|| async { Redirect::to("/studio/clusters") }),
        )
        .route("/studio/login", get(login_page).post(login))
        .route("/studio/static/studio.css", get(css))
        .route("/studio/static/studio.js", get(js))
        .merge(signed_in)
        .layer(axum::middleware::from_fn(headers))
        .with_state(studio)
}

async fn css() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/css; charset=utf-8")],
        include_str!("static/studio.css"),
    )
}

async fn js() -> impl IntoResponse {
    (
        [(header::CONTENT_TYPE, "text/javascript; charset=utf-8")],
        include_str!("static/studio.js"),
    )
}

/// Every studio answer: no framing, no inline script, no caching of pages.
async fn headers(request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    let h = response.headers_mut();
    h.insert(
        header::CONTENT_SECURITY_POLICY,
        HeaderValue::from_static(
            "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; frame-ancestors 'none'; form-action 'self'",
        ),
    );
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(
        header::X_CONTENT_TYPE_OPTIONS,
        HeaderValue::from_static("nosniff"),
    );
    h.insert(
        header::REFERRER_POLICY,
        HeaderValue::from_static("same-origin"),
    );
    h.entry(header::CACHE_CONTROL)
        .or_insert(HeaderValue::from_static("no-store"));
    response
}

fn cookie_named(request: &Request, wanted: &str) -> Option<String> {
    request
        .headers()
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == wanted)
        .map(|(_, value)| value.to_string())
}

/// The session's id, from its cookie.
fn cookie(request: &Request) -> Option<String> {
    cookie_named(request, COOKIE)
}

/// A page needs a live session whose token still verifies (revoked: out).
async fn require_session(
    State(studio): State<Studio>,
    mut request: Request,
    next: Next,
) -> Response {
    let signed = cookie(&request).and_then(|id| {
        let mut sessions = studio.sessions.lock().unwrap_or_else(|e| e.into_inner());
        let session = sessions.get_mut(&id)?;
        if session.last_seen.elapsed() > IDLE_LIMIT {
            sessions.remove(&id);
            return None;
        }
        match studio.api.auth.verify(&session.token) {
            Ok(Principal::Person { role, .. }) => {
                session.last_seen = Instant::now();
                Some(Signed {
                    role,
                    csrf: session.csrf.clone(),
                })
            }
            _ => {
                sessions.remove(&id);
                None
            }
        }
    });
    let Some(signed) = signed else {
        if request.method() == Method::GET && !request.uri().path().ends_with("/events") {
            return Redirect::to("/studio/login").into_response();
        }
        return (StatusCode::UNAUTHORIZED, "sign in at /studio/login").into_response();
    };
    // Each form's handler checks the form's CSRF token against this session's.
    request.extensions_mut().insert(signed);
    next.run(request).await
}

const LOGIN_COOKIE: &str = "shoal_login";

/// The login form, with a CSRF token of its own: a cookie only this site can set,
/// echoed by the form (no session exists yet to hold one).
fn login_form(studio: &Studio, status: StatusCode, error: Option<String>) -> Response {
    let csrf = crate::auth::random_hex(16);
    let mut response = pages::render(
        status,
        &pages::LoginPage {
            error,
            csrf: csrf.clone(),
        },
    );
    let secure = if studio.secure { "; Secure" } else { "" };
    let set =
        format!("{LOGIN_COOKIE}={csrf}; Path=/studio/login; HttpOnly; SameSite=Strict{secure}");
    if let Ok(value) = HeaderValue::from_str(&set) {
        response.headers_mut().insert(header::SET_COOKIE, value);
    }
    response
}

async fn login_page(State(studio): State<Studio>) -> Response {
    login_form(&studio, StatusCode::OK, None)
}

#[derive(serde::Deserialize)]
struct LoginForm {
    token: String,
    #[serde(default)]
    csrf: String,
}

async fn login(State(studio): State<Studio>, request: Request) -> Response {
    let expected = cookie_named(&request, LOGIN_COOKIE);
    let Ok(axum::Form(form)) = axum::Form::<LoginForm>::from_request(request, &()).await else {
        return login_form(
            &studio,
            StatusCode::BAD_REQUEST,
            Some("sign in with a token".into()),
        );
    };
    if !expected.is_some_and(|e| same_secret(&form.csrf, &e)) {
        return login_form(
            &studio,
            StatusCode::FORBIDDEN,
            Some("stale sign-in form: sign in from this page".into()),
        );
    }
    let token = form.token.trim().to_string();
    let refused = |why: &str| {
        login_form(
            &studio,
            StatusCode::UNAUTHORIZED,
            Some(format!(
                "{why}: sign in with an API token of this coordinator"
            )),
        )
    };
    match studio.api.auth.verify(&token) {
        Ok(Principal::Person { .. }) => {}
        Ok(Principal::Node { .. }) => return refused("a node's credential"),
        Err(why) => return refused(why),
    }
    let id = crate::auth::random_hex(32);
    studio
        .sessions
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(
            id.clone(),
            Session {
                token,
                csrf: crate::auth::random_hex(16),
                last_seen: Instant::now(),
            },
        );
    let secure = if studio.secure { "; Secure" } else { "" };
    let set = format!(
        "{COOKIE}={id}; Path=/studio; HttpOnly; SameSite=Strict; Max-Age={}{secure}",
        IDLE_LIMIT.as_secs()
    );
    let mut response = Redirect::to("/studio/clusters").into_response();
    if let Ok(value) = HeaderValue::from_str(&set) {
        response.headers_mut().insert(header::SET_COOKIE, value);
    }
    response
}

#[derive(serde::Deserialize)]
struct CsrfForm {
    csrf: String,
}

async fn logout(
    State(studio): State<Studio>,
    axum::Extension(signed): axum::Extension<Signed>,
    request: Request,
) -> Response {
    let id = cookie(&request);
    let form = axum::Form::<CsrfForm>::from_request(request, &()).await;
    if !matches!(form, Ok(ref f) if same_secret(&f.csrf, &signed.csrf)) {
        return (StatusCode::FORBIDDEN, "stale form: reload the page").into_response();
    }
    if let Some(id) = id {
        studio
            .sessions
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
    }
    let mut response = Redirect::to("/studio/login").into_response();
    response.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static(
            "shoal_studio=; Path=/studio; HttpOnly; SameSite=Strict; Max-Age=0",
        ),
    );
    response
}
