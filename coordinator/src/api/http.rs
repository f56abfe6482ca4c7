//! The JSON HTTP API under `/api/v1/`: the same operations as gRPC, through the
//! same code paths, with the JSON shapes of `view`.

use std::collections::BTreeMap;

use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;

use super::{Api, convert};
use crate::model::{ClusterRequest, ClusterUpdate};
use crate::view;

/// The public keys that verify jobs' managed-identity tokens.
async fn jwks(State(api): State<Api>) -> Json<serde_json::Value> {
    Json(
        api.signer
            .as_ref()
            .map_or_else(|| serde_json::json!({"keys": []}), |s| s.jwks()),
    )
}

pub fn router(api: Api) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/.well-known/jwks.json", get(jwks))
        .route("/metrics", get(metrics))
        .route("/api/v1/clusters", get(list_clusters).post(create_cluster))
        .route(
            "/api/v1/clusters/{name}",
            get(get_cluster)
                .patch(update_cluster)
                .delete(delete_cluster),
        )
        .route("/api/v1/jobs", get(list_jobs).post(submit_job))
        .route("/api/v1/jobs/{id}", get(get_job).delete(delete_job))
        .route("/api/v1/jobs/{id}/cancel", post(cancel_job))
        .route("/api/v1/jobs/{id}/logs", get(job_logs))
        .route("/api/v1/jobs/{id}/metrics", get(job_metrics))
        .route("/api/v1/jobs/{id}/outputs/{instance}", get(job_outputs))
        .route(
            "/api/v1/jobs/{id}/named-outputs/{name}",
            get(job_named_output),
        )
        .route(
            "/api/v1/datastores",
            get(list_datastores).post(create_datastore),
        )
        .route("/api/v1/data", get(list_data).post(create_data))
        .route(
            "/api/v1/environments",
            get(list_environments).post(create_environment),
        )
        .route(
            "/api/v1/components",
            get(list_components).post(create_component),
        )
        .route("/api/v1/defaults", get(get_defaults).put(set_defaults))
        .route("/api/v1/nodes", get(list_nodes))
        .route("/api/v1/vm-sizes", get(list_vm_sizes))
        .with_state(api)
}

/// Errors as `{"error": "...", "code": "..."}` with the status that fits.
pub struct ApiError(tonic::Status);

impl From<crate::Error> for ApiError {
    fn from(e: crate::Error) -> Self {
        ApiError(e.into())
    }
}

impl From<tonic::Status> for ApiError {
    fn from(s: tonic::Status) -> Self {
        ApiError(s)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = match self.0.code() {
            tonic::Code::InvalidArgument => StatusCode::BAD_REQUEST,
            tonic::Code::NotFound => StatusCode::NOT_FOUND,
            tonic::Code::AlreadyExists => StatusCode::CONFLICT,
            tonic::Code::FailedPrecondition => StatusCode::CONFLICT,
            tonic::Code::Unauthenticated => StatusCode::UNAUTHORIZED,
            tonic::Code::PermissionDenied => StatusCode::FORBIDDEN,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        let body = serde_json::json!({
            "error": self.0.message(),
            "code": format!("{:?}", self.0.code()),
        });
        (status, Json(body)).into_response()
    }
}

type ApiResult<T> = Result<Json<T>, ApiError>;

/// A body that does not parse is a 400 naming the problem, never a panic.
/// A body of YAML or JSON text (job, environment and data files).
fn text(body: &[u8]) -> Result<&str, ApiError> {
    std::str::from_utf8(body)
        .map_err(|_| ApiError(crate::Error::invalid("body", "not UTF-8 text").into()))
}

fn parse<T: serde::de::DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body)
        .map_err(|e| ApiError(crate::Error::invalid("body", e.to_string()).into()))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ClusterBody {
    name: String,
    #[serde(alias = "size")]
    vm_size: String,
    #[serde(default, alias = "tier")]
    vm_priority: String,
    #[serde(default, alias = "min_instances")]
    min_nodes: Option<u32>,
    #[serde(default, alias = "max_instances")]
    max_nodes: Option<u32>,
    #[serde(default, alias = "idle_time_before_scale_down")]
    idle_seconds_before_scaledown: Option<u64>,
    #[serde(default)]
    description: String,
    #[serde(default)]
    tags: BTreeMap<String, String>,
    #[serde(default)]
    provider: String,
    #[serde(default)]
    internode_communication: Option<bool>,
    #[serde(default)]
    cancel_idle_gpu_jobs: Option<bool>,
    /// `[system]` and/or user-assigned identities (names, client ids, resource ids).
    #[serde(default)]
    identities: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ClusterPatch {
    #[serde(default, alias = "min_instances")]
    min_nodes: Option<u32>,
    #[serde(default, alias = "max_instances")]
    max_nodes: Option<u32>,
    #[serde(default, alias = "idle_time_before_scale_down")]
    idle_seconds_before_scaledown: Option<u64>,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    tags: BTreeMap<String, String>,
    #[serde(default, alias = "size")]
    vm_size: Option<String>,
    #[serde(default, alias = "tier")]
    vm_priority: Option<String>,
    #[serde(default)]
    provider: Option<String>,
    #[serde(default)]
    internode_communication: Option<bool>,
    #[serde(default)]
    cancel_idle_gpu_jobs: Option<bool>,
}

async fn list_clusters(State(api): State<Api>) -> ApiResult<Vec<view::Cluster>> {
    let clusters = api.control.list_clusters().await?;
    Ok(Json(
        clusters
            .iter()
            .map(|c| view::Cluster::from(&convert::cluster(c)))
            .collect(),
    ))
}

async fn create_cluster(
    State(api): State<Api>,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<view::Cluster>), ApiError> {
    let body: ClusterBody = parse(&body)?;
    let request = ClusterRequest {
        name: body.name,
        vm_size: body.vm_size,
        vm_priority: body.vm_priority,
        min_nodes: body.min_nodes,
        max_nodes: body.max_nodes,
        idle_seconds_before_scaledown: body.idle_seconds_before_scaledown,
        description: body.description,
        tags: body.tags,
        provider: body.provider,
        internode_communication: body.internode_communication,
        cancel_idle_gpu_jobs: body.cancel_idle_gpu_jobs,
        identities: body.identities,
    };
    let info = api.create_cluster(request).await?;
    Ok((
        StatusCode::CREATED,
        Json(view::Cluster::from(&convert::cluster(&info))),
    ))
}

async fn get_cluster(State(api): State<Api>, Path(name): Path<String>) -> ApiResult<view::Cluster> {
    let info = api.control.get_cluster(name).await?;
    Ok(Json(view::Cluster::from(&convert::cluster(&info))))
}

async fn update_cluster(
    State(api): State<Api>,
    Path(name): Path<String>,
    body: axum::body::Bytes,
) -> ApiResult<view::Cluster> {
    let patch: ClusterPatch = parse(&body)?;
    let update = ClusterUpdate {
        name,
        min_nodes: patch.min_nodes,
        max_nodes: patch.max_nodes,
        idle_seconds_before_scaledown: patch.idle_seconds_before_scaledown,
        description: patch.description,
        set_tags: patch.tags,
        vm_size: patch.vm_size,
        vm_priority: patch.vm_priority,
        provider: patch.provider,
        internode_communication: patch.internode_communication,
        cancel_idle_gpu_jobs: patch.cancel_idle_gpu_jobs,
    };
    let info = api.control.update_cluster(update).await?;
    Ok(Json(view::Cluster::from(&convert::cluster(&info))))
}

async fn delete_cluster(
    State(api): State<Api>,
    Path(name): Path<String>,
) -> ApiResult<view::Cluster> {
    let info = api.control.delete_cluster(name).await?;
    Ok(Json(view::Cluster::from(&convert::cluster(&info))))
}

#[derive(Deserialize)]
struct ClusterFilter {
    #[serde(default)]
    cluster: Option<String>,
}

#[derive(Deserialize)]
struct JobPage {
    #[serde(default)]
    cluster: Option<String>,
    #[serde(default)]
    limit: Option<usize>,
    #[serde(default)]
    after: Option<String>,
    /// A record's children: a sweep's trials (`?parent=job-N`), an array's tasks.
    #[serde(default, alias = "array")]
    parent: Option<String>,
}

/// Newest first, a page at a time: `?limit=N&after=job-K` (the last of the page
/// before); the header `x-next-after` names where the next page starts.
async fn list_jobs(
    State(api): State<Api>,
    Query(page): Query<JobPage>,
) -> Result<Response, ApiError> {
    let (jobs, next) = api
        .list_jobs(
            page.cluster,
            page.parent.as_deref(),
            page.limit.unwrap_or(0),
            page.after.as_deref(),
        )
        .await?;
    let views: Vec<view::Job> = jobs
        .iter()
        .map(|j| view::Job::from(&convert::job(j)))
        .collect();
    let mut response = Json(views).into_response();
    if let Some(next) = next
        && let Ok(value) = axum::http::HeaderValue::from_str(&next)
    {
        response.headers_mut().insert("x-next-after", value);
    }
    Ok(response)
}

async fn delete_job(State(api): State<Api>, Path(id): Path<String>) -> ApiResult<view::Job> {
    let job = api.delete_job(&id).await?;
    Ok(Json(view::Job::from(&convert::job(&job))))
}

/// A job file, as JSON (or YAML): admitted as `shoal job submit -f` admits it,
/// by the same function; local paths are refused (nothing is uploaded here).
async fn submit_job(
    State(api): State<Api>,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<view::Job>), ApiError> {
    let text = text(&body)?;
    let (job, _warnings) = api.create_job(text, &[], Default::default()).await?;
    Ok((
        StatusCode::CREATED,
        Json(view::Job::from(&convert::job(&job))),
    ))
}

async fn get_job(State(api): State<Api>, Path(id): Path<String>) -> ApiResult<view::Job> {
    let job = api.job(&id).await?;
    Ok(Json(view::Job::from(&api.job_wire(&job).await?)))
}

async fn cancel_job(State(api): State<Api>, Path(id): Path<String>) -> ApiResult<view::Job> {
    let job = api.control.cancel_job(id).await?;
    Ok(Json(view::Job::from(&convert::job(&job))))
}

#[derive(Deserialize)]
struct LogQuery {
    #[serde(default)]
    instance: Option<u32>,
}

/// The stored log as text (all instances interleaved in arrival order, or one).
#[derive(Deserialize)]
struct MetricsQuery {
    /// Comma-separated metric names (none: all).
    #[serde(default)]
    name: String,
    #[serde(default)]
    latest_only: bool,
}

/// What the job logged with MLflow: runs, params, tags, metric histories.
async fn job_metrics(
    State(api): State<Api>,
    Path(id): Path<String>,
    Query(query): Query<MetricsQuery>,
) -> ApiResult<crate::tracking::JobMetrics> {
    let names = query
        .name
        .split(',')
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .map(String::from)
        .collect();
    Ok(Json(api.job_metrics(&id, names, query.latest_only).await?))
}

async fn job_logs(
    State(api): State<Api>,
    Path(id): Path<String>,
    Query(query): Query<LogQuery>,
) -> Result<String, ApiError> {
    api.job(&id).await?;
    let mut text = Vec::new();
    let mut after = 0;
    loop {
        let chunk = api.reader.logs(&id, query.instance, after, 10_000).await?;
        let Some(last) = chunk.last() else { break };
        after = last.seq;
        for log in &chunk {
            text.extend_from_slice(&log.data);
        }
    }
    Ok(String::from_utf8_lossy(&text).into_owned())
}

/// One instance's ./outputs as a tar.gz (the latest attempt that uploaded any).
async fn job_outputs(
    State(api): State<Api>,
    Path((id, instance)): Path<(String, u32)>,
) -> Result<Response, ApiError> {
    let outputs = api.outputs(id.clone()).await?;
    let Some(found) = outputs.outputs.into_iter().find(|o| o.instance == instance) else {
        return Err(crate::Error::NotFound(format!(
            "job `{id}` has no outputs of instance {instance}"
        ))
        .into());
    };
    let disposition = format!("attachment; filename=\"{id}-instance-{instance}.tar.gz\"");
    Ok((
        [
            (
                axum::http::header::CONTENT_TYPE,
                "application/gzip".to_string(),
            ),
            (axum::http::header::CONTENT_DISPOSITION, disposition),
        ],
        found.data,
    )
        .into_response())
}

async fn list_nodes(
    State(api): State<Api>,
    Query(filter): Query<ClusterFilter>,
) -> ApiResult<Vec<view::Node>> {
    let nodes = api.control.list_nodes(filter.cluster).await?;
    Ok(Json(
        nodes
            .iter()
            .map(|n| view::Node::from(&convert::node(n)))
            .collect(),
    ))
}

/// OpenMetrics for scrapers that ask for it (`Accept: application/openmetrics-text`,
/// as Prometheus does), else the classic text format.
async fn metrics(
    State(api): State<Api>,
    headers: axum::http::HeaderMap,
) -> Result<Response, ApiError> {
    let text = api.control.metrics().await?;
    let openmetrics = headers
        .get(axum::http::header::ACCEPT)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|accept| accept.contains("application/openmetrics-text"));
    let (content_type, body) = if openmetrics {
        (
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            text,
        )
    } else {
        (
            "text/plain; version=0.0.4; charset=utf-8",
            crate::metrics::to_prometheus_text(&text),
        )
    };
    Ok(([(axum::http::header::CONTENT_TYPE, content_type)], body).into_response())
}

async fn list_vm_sizes(State(api): State<Api>) -> ApiResult<Vec<view::VmSize>> {
    Ok(Json(
        api.catalog
            .all()
            .iter()
            .map(|s| view::VmSize::from(&convert::vm_size(s)))
            .collect(),
    ))
}

/// A named output of a job as a tar.gz (the first instance that wrote it).
async fn job_named_output(
    State(api): State<Api>,
    Path((id, name)): Path<(String, String)>,
) -> Result<Response, ApiError> {
    let outputs = api.outputs(id.clone()).await?;
    let Some(found) = outputs.named.into_iter().find(|o| o.name == name) else {
        return Err(
            crate::Error::NotFound(format!("job `{id}` has no output `{name}` (yet)")).into(),
        );
    };
    let disposition = format!("attachment; filename=\"{id}-{name}.tar.gz\"");
    Ok((
        [
            (
                axum::http::header::CONTENT_TYPE,
                "application/gzip".to_string(),
            ),
            (axum::http::header::CONTENT_DISPOSITION, disposition),
        ],
        found.data,
    )
        .into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DatastoreBody {
    name: String,
    path: String,
    #[serde(default)]
    description: String,
}

async fn list_datastores(State(api): State<Api>) -> ApiResult<Vec<crate::data::Datastore>> {
    Ok(Json(api.control.datastores().await?))
}

async fn create_datastore(
    State(api): State<Api>,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<crate::data::Datastore>), ApiError> {
    let body: DatastoreBody = parse(&body)?;
    let made = api
        .create_datastore(&body.name, &body.path, &body.description)
        .await?;
    Ok((StatusCode::CREATED, Json(made)))
}

async fn list_data(State(api): State<Api>) -> ApiResult<Vec<crate::data::DataAsset>> {
    Ok(Json(api.control.data_assets().await?))
}

async fn create_data(
    State(api): State<Api>,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<crate::data::DataAsset>), ApiError> {
    let text = text(&body)?;
    let file = crate::admission::DataFile::from_yaml(text)?;
    let made = api.create_data_asset(file.into_request(None)).await?;
    Ok((StatusCode::CREATED, Json(made)))
}

async fn list_environments(State(api): State<Api>) -> ApiResult<Vec<crate::model::Environment>> {
    Ok(Json(api.control.environments().await?))
}

/// The environment schema as JSON or YAML (an image, a host, a conda file on an
/// image; build contexts need `shoal environment create`, which uploads them).
async fn create_environment(
    State(api): State<Api>,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<crate::model::Environment>), ApiError> {
    let text = text(&body)?;
    let mut log = |line: String| tracing::debug!(%line, "environment build");
    let (made, _) = api
        .create_environment(text, Default::default(), &mut log)
        .await?;
    Ok((StatusCode::CREATED, Json(made)))
}

async fn list_components(State(api): State<Api>) -> ApiResult<Vec<crate::model::Component>> {
    Ok(Json(api.control.components().await?))
}

/// The commandComponent schema as JSON or YAML, without a local code folder
/// (`shoal component create -f` uploads one).
async fn create_component(
    State(api): State<Api>,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<crate::model::Component>), ApiError> {
    let made = api
        .create_component(text(&body)?, Default::default(), None)
        .await?;
    Ok((StatusCode::CREATED, Json(made)))
}

async fn get_defaults(State(api): State<Api>) -> ApiResult<BTreeMap<String, String>> {
    Ok(Json(api.control.defaults().await?))
}

/// `{"compute": "cpu-cluster"}`; an empty value clears one.
async fn set_defaults(
    State(api): State<Api>,
    body: axum::body::Bytes,
) -> ApiResult<BTreeMap<String, String>> {
    let set: BTreeMap<String, String> = parse(&body)?;
    Ok(Json(api.set_defaults(set).await?))
}
