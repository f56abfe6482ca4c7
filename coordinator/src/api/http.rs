//! The JSON HTTP API under `/api/v1/`: the same operations as gRPC, through the
//! same code paths, with the JSON shapes of `view`.

use std::collections::BTreeMap;

use axum::extract::{DefaultBodyLimit, FromRequest, Multipart, Path, Query, Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post, put};
use axum::{Json, Router};
use futures::StreamExt;
use serde::Deserialize;

use shoal_proto::v1 as pb;

use super::admit::{Upload, Uploads};
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
        .route("/api/v1/local-paths", post(local_paths))
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
        .route(
            "/api/v1/identities",
            get(list_identities).post(create_identity),
        )
        .route(
            "/api/v1/clusters/{name}/identities",
            get(cluster_identities).post(assign_identity),
        )
        .route(
            "/api/v1/clusters/{name}/identities/{identity}",
            delete(remove_identity),
        )
        .route(
            "/api/v1/clusters/{name}/lock",
            put(lock_cluster).delete(unlock_cluster),
        )
        .route("/api/v1/jobs/{id}/why", get(job_why))
        .route("/api/v1/quotas", get(get_quotas).put(set_quotas))
        .route("/api/v1/tokens", get(list_tokens).post(create_token))
        .route("/api/v1/tokens/{id}", delete(revoke_token))
        .route("/api/v1/nodes/{id}", delete(revoke_node))
        .route("/api/v1/nodes/{id}/preempt", post(preempt_node))
        // Job files come with their code and data (as gRPC's messages may).
        .layer(DefaultBodyLimit::max(crate::server::MAX_MESSAGE_BYTES))
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

fn invalid(what: &str, why: impl std::fmt::Display) -> ApiError {
    ApiError(crate::Error::invalid(what, why.to_string()).into())
}

/// What a create call sends: a file's text (JSON or YAML), `--set` lines, and the
/// local paths the file names with their content. A plain body is the text alone.
/// A `multipart/form-data` body carries the text as the part `spec`, each `--set`
/// line as a part `set`, and each local path as a part `file` (its bytes) or
/// `folder` (a tar.gz) whose filename is the path as the file writes it.
struct Submission {
    text: String,
    sets: Vec<String>,
    files: Uploads,
}

impl<S: Send + Sync> FromRequest<S> for Submission {
    type Rejection = ApiError;

    async fn from_request(request: Request, state: &S) -> Result<Self, ApiError> {
        let multipart = request
            .headers()
            .get(axum::http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|c| c.starts_with("multipart/form-data"));
        if !multipart {
            let body = axum::body::Bytes::from_request(request, state)
                .await
                .map_err(|e| invalid("body", e.body_text()))?;
            return Ok(Submission {
                text: text(&body)?.to_string(),
                sets: Vec::new(),
                files: Uploads::new(),
            });
        }
        let mut form = Multipart::from_request(request, state)
            .await
            .map_err(|e| invalid("body", e.body_text()))?;
        let mut spec = None;
        let mut sets = Vec::new();
        let mut files = Uploads::new();
        while let Some(part) = form
            .next_field()
            .await
            .map_err(|e| invalid("body", e.body_text()))?
        {
            let name = part.name().unwrap_or_default().to_string();
            let filename = part.file_name().map(str::to_string);
            let data = part
                .bytes()
                .await
                .map_err(|e| invalid("body", e.body_text()))?;
            match name.as_str() {
                "spec" => spec = Some(text(&data)?.to_string()),
                "set" => sets.push(text(&data)?.to_string()),
                "file" | "folder" => {
                    let path = filename.filter(|f| !f.is_empty()).ok_or_else(|| {
                        invalid(
                            "body",
                            format!(
                                "a `{name}` part needs a filename: the path as the file writes it"
                            ),
                        )
                    })?;
                    let folder = name == "folder";
                    files.insert(
                        path,
                        Upload {
                            data: data.to_vec(),
                            folder,
                        },
                    );
                }
                other => {
                    return Err(invalid(
                        "body",
                        format!("unknown part `{other}`: the parts are spec, set, file and folder"),
                    ));
                }
            }
        }
        let text = spec.ok_or_else(|| invalid("body", "no `spec` part: the file's text"))?;
        Ok(Submission { text, sets, files })
    }
}

/// Warnings (keys that have no effect here, and why) as `x-shoal-warning` headers,
/// percent-encoded (UTF-8): a header value is visible ASCII.
fn with_warnings(mut response: Response, warnings: &[String]) -> Response {
    const ENCODED: &percent_encoding::AsciiSet = &percent_encoding::CONTROLS.add(b'%');
    for warning in warnings {
        let line = percent_encoding::utf8_percent_encode(warning, ENCODED).to_string();
        if let Ok(value) = axum::http::HeaderValue::from_str(&line) {
            response.headers_mut().append("x-shoal-warning", value);
        }
    }
    response
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
    provider_settings: BTreeMap<String, String>,
    #[serde(default)]
    internode_communication: Option<bool>,
    #[serde(default)]
    cancel_idle_gpu_jobs: Option<bool>,
    /// `[system]` and/or user-assigned identities (names, client ids, resource ids).
    #[serde(default)]
    identities: Vec<String>,
    /// The amlCompute file's `identity: {type, user_assigned_identities}`, added
    /// to `identities`.
    #[serde(default)]
    identity: Option<crate::computefile::IdentitySection>,
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
    let mut identities = body.identities;
    if let Some(section) = &body.identity {
        identities.extend(section.assigned()?);
    }
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
        provider_settings: body.provider_settings,
        internode_communication: body.internode_communication,
        cancel_idle_gpu_jobs: body.cancel_idle_gpu_jobs,
        identities,
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

/// A job file, as JSON or YAML, admitted as `shoal job submit -f` admits it, by
/// the same function: alone, or multipart with the local paths it names
/// (`Submission`; `POST /api/v1/local-paths` tells which).
async fn submit_job(State(api): State<Api>, body: Submission) -> Result<Response, ApiError> {
    let (job, warnings) = api.create_job(&body.text, &body.sets, body.files).await?;
    let response = (
        StatusCode::CREATED,
        Json(view::Job::from(&convert::job(&job))),
    )
        .into_response();
    Ok(with_warnings(response, &warnings))
}

/// The local paths a job file names (its code, local data, build contexts), each
/// to be sent with it: `[{"field": "code", "path": "./src", "folder": true}]`.
/// Component files must be read into it first (they are the submitter's too).
async fn local_paths(body: Submission) -> ApiResult<Vec<serde_json::Value>> {
    let doc = crate::admission::jobfile::document(&body.text)?;
    let drafted = crate::admission::read(doc, &body.sets)?;
    Ok(Json(
        drafted
            .local_paths()
            .into_iter()
            .filter(|p| !p.path.starts_with("azureml:"))
            .map(|p| serde_json::json!({"field": p.field, "path": p.path, "folder": p.folder}))
            .collect(),
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
    #[serde(default)]
    follow: bool,
}

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

/// The log as text (all instances interleaved in arrival order, or `?instance=N`);
/// `?follow=true` streams it as the job writes, until the job ends.
async fn job_logs(
    State(api): State<Api>,
    Path(id): Path<String>,
    Query(query): Query<LogQuery>,
) -> Result<Response, ApiError> {
    api.job(&id).await?;
    let chunks = api.log_stream(shoal_proto::v1::LogsRequest {
        job_id: id,
        instance: query.instance,
        follow: query.follow,
    });
    let body = tokio_stream::wrappers::ReceiverStream::new(chunks).map(|chunk| {
        chunk
            .map(|c| axum::body::Bytes::from(c.data))
            .map_err(|e| std::io::Error::other(e.message().to_string()))
    });
    Ok((
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; charset=utf-8",
        )],
        axum::body::Body::from_stream(body),
    )
        .into_response())
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
pub(crate) async fn job_named_output(
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

/// The data schema as JSON or YAML; a local `path` comes as a multipart part.
async fn create_data(
    State(api): State<Api>,
    body: Submission,
) -> Result<(StatusCode, Json<crate::data::DataAsset>), ApiError> {
    let file = crate::admission::DataFile::from_yaml(&body.text)?;
    let mut files = body.files;
    let upload = files
        .remove(&file.path)
        .map(|u| shoal_proto::v1::LocalFile {
            data: u.data,
            folder: u.folder,
        });
    let made = api.create_data_asset(file.into_request(upload)).await?;
    Ok((StatusCode::CREATED, Json(made)))
}

async fn list_environments(State(api): State<Api>) -> ApiResult<Vec<crate::model::Environment>> {
    Ok(Json(api.control.environments().await?))
}

/// The environment schema as JSON or YAML (an image, a host, a conda file on an
/// image, a build context sent as a multipart `folder` part).
async fn create_environment(
    State(api): State<Api>,
    body: Submission,
) -> Result<Response, ApiError> {
    let mut log = |line: String| tracing::debug!(%line, "environment build");
    let (made, warnings) = api
        .create_environment(&body.text, body.files, &mut log)
        .await?;
    let response = (StatusCode::CREATED, Json(made)).into_response();
    Ok(with_warnings(response, &warnings))
}

async fn list_components(State(api): State<Api>) -> ApiResult<Vec<crate::model::Component>> {
    Ok(Json(api.control.components().await?))
}

/// The commandComponent schema as JSON or YAML; a local code folder comes as a
/// multipart `folder` part. `?version=V` gives it a version the file does not.
async fn create_component(
    State(api): State<Api>,
    Query(query): Query<VersionQuery>,
    body: Submission,
) -> Result<(StatusCode, Json<crate::model::Component>), ApiError> {
    let made = api
        .create_component(&body.text, body.files, query.version)
        .await?;
    Ok((StatusCode::CREATED, Json(made)))
}

#[derive(Deserialize)]
struct VersionQuery {
    #[serde(default)]
    version: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct IdentityBody {
    name: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AssignBody {
    /// `[system]`, or a user-assigned identity's name, client id or resource id.
    identity: String,
}

// The calls below are the gRPC services' own, spelled over HTTP: each runs the
// service method itself, and answers with its `view`.

/// User-assigned identities (`shoal identity list`).
async fn list_identities(State(api): State<Api>) -> ApiResult<Vec<view::Identity>> {
    let list = pb::identities_server::Identities::list(
        &api,
        tonic::Request::new(pb::ListIdentitiesRequest {}),
    )
    .await?
    .into_inner();
    Ok(Json(
        list.identities.iter().map(view::Identity::from).collect(),
    ))
}

async fn create_identity(
    State(api): State<Api>,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<view::Identity>), ApiError> {
    let body: IdentityBody = parse(&body)?;
    let made = pb::identities_server::Identities::create(
        &api,
        tonic::Request::new(pb::IdentityRequest { name: body.name }),
    )
    .await?
    .into_inner();
    Ok((StatusCode::CREATED, Json(view::Identity::from(&made))))
}

async fn cluster_identities(
    State(api): State<Api>,
    Path(name): Path<String>,
) -> ApiResult<view::ClusterIdentities> {
    let found =
        pb::identities_server::Identities::get(&api, tonic::Request::new(pb::ClusterRef { name }))
            .await?
            .into_inner();
    Ok(Json(view::ClusterIdentities::from(&found)))
}

/// `{"identity": ID}` (`[system]`, or a user-assigned identity's name, client id or
/// resource id), or the amlCompute file's section
/// `{"type": "system_assigned,user_assigned", "user_assigned_identities": [...]}`.
async fn assign_identity(
    State(api): State<Api>,
    Path(name): Path<String>,
    body: axum::body::Bytes,
) -> ApiResult<view::ClusterIdentities> {
    let value: serde_json::Value = parse(&body)?;
    let wanted = if value.get("type").is_some() {
        let section: crate::computefile::IdentitySection =
            serde_json::from_value(value).map_err(|e| invalid("identity", e))?;
        section.assigned()?
    } else {
        let one: AssignBody = serde_json::from_value(value).map_err(|e| invalid("body", e))?;
        vec![one.identity]
    };
    let mut now = pb::identities_server::Identities::get(
        &api,
        tonic::Request::new(pb::ClusterRef { name: name.clone() }),
    )
    .await?
    .into_inner();
    for identity in wanted {
        let asked = pb::ClusterIdentity {
            cluster: name.clone(),
            identity,
        };
        now = pb::identities_server::Identities::assign(&api, tonic::Request::new(asked))
            .await?
            .into_inner();
    }
    Ok(Json(view::ClusterIdentities::from(&now)))
}

/// `DELETE /api/v1/clusters/NAME/identities/ID` (ID percent-encoded: resource
/// ids hold slashes).
async fn remove_identity(
    State(api): State<Api>,
    Path((cluster, identity)): Path<(String, String)>,
) -> ApiResult<view::ClusterIdentities> {
    let asked = pb::ClusterIdentity { cluster, identity };
    let now = pb::identities_server::Identities::remove(&api, tonic::Request::new(asked))
        .await?
        .into_inner();
    Ok(Json(view::ClusterIdentities::from(&now)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LockBody {
    /// `cannot-delete` or `read-only`.
    kind: String,
}

/// `PUT /api/v1/clusters/NAME/lock {"kind": "cannot-delete" | "read-only"}`.
async fn lock_cluster(
    State(api): State<Api>,
    Path(name): Path<String>,
    body: axum::body::Bytes,
) -> ApiResult<view::Cluster> {
    let body: LockBody = parse(&body)?;
    let asked = pb::ClusterLock {
        name,
        kind: body.kind,
    };
    let cluster = pb::clusters_server::Clusters::lock(&api, tonic::Request::new(asked))
        .await?
        .into_inner();
    Ok(Json(view::Cluster::from(&cluster)))
}

async fn unlock_cluster(
    State(api): State<Api>,
    Path(name): Path<String>,
) -> ApiResult<view::Cluster> {
    let cluster =
        pb::clusters_server::Clusters::unlock(&api, tonic::Request::new(pb::ClusterRef { name }))
            .await?
            .into_inner();
    Ok(Json(view::Cluster::from(&cluster)))
}

/// `shoal job why`: why it waits, where it runs, or why it ended.
async fn job_why(State(api): State<Api>, Path(id): Path<String>) -> ApiResult<serde_json::Value> {
    let lines = api.explain(&id).await?;
    Ok(Json(serde_json::json!({"job": id, "lines": lines})))
}

async fn get_quotas(State(api): State<Api>) -> ApiResult<Vec<view::QuotaLine>> {
    let report = pb::quotas_server::Quotas::get(&api, tonic::Request::new(pb::QuotaRequest {}))
        .await?
        .into_inner();
    Ok(Json(
        report.lines.iter().map(view::QuotaLine::from).collect(),
    ))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct QuotaBody {
    #[serde(default)]
    family: String,
    #[serde(default)]
    family_cores: Option<u32>,
    #[serde(default)]
    low_priority_cores: Option<u32>,
    #[serde(default)]
    total_cores: Option<u32>,
}

/// `PUT /api/v1/quotas {"family": NAME, "family_cores": N}` (and/or
/// `low_priority_cores`, `total_cores`).
async fn set_quotas(
    State(api): State<Api>,
    body: axum::body::Bytes,
) -> ApiResult<Vec<view::QuotaLine>> {
    let body: QuotaBody = parse(&body)?;
    let update = pb::QuotaUpdate {
        family: body.family,
        family_cores: body.family_cores,
        low_priority_cores: body.low_priority_cores,
        total_cores: body.total_cores,
    };
    let report = pb::quotas_server::Quotas::set(&api, tonic::Request::new(update))
        .await?
        .into_inner();
    Ok(Json(
        report.lines.iter().map(view::QuotaLine::from).collect(),
    ))
}

async fn list_tokens(State(api): State<Api>) -> ApiResult<Vec<view::Token>> {
    let list = pb::tokens_server::Tokens::list(&api, tonic::Request::new(pb::ListTokensRequest {}))
        .await?
        .into_inner();
    Ok(Json(list.tokens.iter().map(view::Token::from).collect()))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenBody {
    /// reader, user or admin (default user).
    #[serde(default)]
    role: String,
    #[serde(default)]
    name: String,
}

/// The new token's secret is in the answer, once (`token`).
async fn create_token(
    State(api): State<Api>,
    body: axum::body::Bytes,
) -> Result<(StatusCode, Json<serde_json::Value>), ApiError> {
    let body: TokenBody = parse(&body)?;
    let role = if body.role.is_empty() {
        "user".to_string()
    } else {
        body.role
    };
    let created = pb::tokens_server::Tokens::create(
        &api,
        tonic::Request::new(pb::TokenRequest {
            role,
            name: body.name,
        }),
    )
    .await?
    .into_inner();
    let info = created.info.as_ref().map(view::Token::from);
    Ok((
        StatusCode::CREATED,
        Json(serde_json::json!({"token": created.token, "info": info})),
    ))
}

async fn revoke_token(State(api): State<Api>, Path(id): Path<String>) -> ApiResult<view::Token> {
    let info = pb::tokens_server::Tokens::revoke(&api, tonic::Request::new(pb::TokenRef { id }))
        .await?
        .into_inner();
    Ok(Json(view::Token::from(&info)))
}

/// `DELETE /api/v1/nodes/ID`: its credential revoked, the node gone from the cluster.
async fn revoke_node(State(api): State<Api>, Path(id): Path<String>) -> ApiResult<view::Node> {
    let node = pb::nodes_server::Nodes::revoke(&api, tonic::Request::new(pb::NodeRef { id }))
        .await?
        .into_inner();
    Ok(Json(view::Node::from(&node)))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct PreemptBody {
    #[serde(default)]
    notice_seconds: Option<u32>,
}

/// `POST /api/v1/nodes/ID/preempt {"notice_seconds": 30}`: as a low-priority
/// node's eviction notice would.
async fn preempt_node(
    State(api): State<Api>,
    Path(node_id): Path<String>,
    body: axum::body::Bytes,
) -> ApiResult<view::Node> {
    let body: PreemptBody = if body.is_empty() {
        PreemptBody::default()
    } else {
        parse(&body)?
    };
    let asked = pb::PreemptRequest {
        node_id,
        notice_seconds: body.notice_seconds,
    };
    let node = pb::nodes_server::Nodes::preempt(&api, tonic::Request::new(asked))
        .await?
        .into_inner();
    Ok(Json(view::Node::from(&node)))
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warnings_travel_as_percent_encoded_utf8_headers() {
        let warnings = vec![
            "a — b is 100% ignored".to_string(),
            "plain `key`".to_string(),
        ];
        let response = with_warnings(().into_response(), &warnings);
        let values: Vec<&str> = response
            .headers()
            .get_all("x-shoal-warning")
            .iter()
            .map(|v| v.to_str().expect("visible ASCII"))
            .collect();
        assert_eq!(values, ["a %E2%80%94 b is 100%25 ignored", "plain `key`"]);
        let decoded = percent_encoding::percent_decode_str(values[0])
            .decode_utf8()
            .expect("UTF-8");
        assert_eq!(decoded, warnings[0]);
    }
}
