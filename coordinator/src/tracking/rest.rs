//! MLflow's tracking REST API (`/api/2.0/mlflow/...`) and its artifacts proxy
//! (`/api/2.0/mlflow-artifacts/artifacts/...`), as the official client calls them.
//! People reach it on the coordinator's port with their tokens (the guard checks
//! the role); jobs reach it through their node's agent (`Agent.Track`), which
//! calls this same router with the job as the `Caller`.

use std::collections::HashMap;

use axum::body::Bytes;
use axum::extract::{FromRequestParts, Path, Query, State};
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde::de::DeserializeOwned;
use serde_json::{Value, json};

use super::model::{Metric, RUN_STATUSES, Tag, read_opt_i64};
use super::search::{Filter, sort_runs};
use super::store::{self, NewRun, parse_experiment_id};
use super::{Caller, Tracking};
use crate::Error;
use crate::auth::Principal;

/// MLflow's limits on one log-batch call.
const MAX_BATCH_METRICS: usize = 1000;
const MAX_BATCH_PARAMS: usize = 100;
const MAX_BATCH_TAGS: usize = 100;
const MAX_PARAM_VALUE: usize = 6000;
const MAX_RESULTS: usize = 50_000;

pub fn router(tracking: Tracking) -> Router {
    let m = |path: &str| format!("/api/2.0/mlflow/{path}");
    Router::new()
        .route(&m("experiments/create"), post(create_experiment))
        .route(&m("experiments/get"), get(get_experiment))
        .route(&m("experiments/get-by-name"), get(get_experiment_by_name))
        .route(
            &m("experiments/search"),
            post(search_experiments).get(search_experiments_get),
        )
        .route(&m("experiments/delete"), post(delete_experiment))
        .route(&m("experiments/restore"), post(restore_experiment))
        .route(&m("experiments/update"), post(rename_experiment))
        .route(
            &m("experiments/set-experiment-tag"),
            post(set_experiment_tag),
        )
        .route(&m("runs/create"), post(create_run))
        .route(&m("runs/get"), get(get_run))
        .route(&m("runs/update"), post(update_run))
        .route(&m("runs/delete"), post(delete_run))
        .route(&m("runs/restore"), post(restore_run))
        .route(&m("runs/search"), post(search_runs))
        .route(&m("runs/log-metric"), post(log_metric))
        .route(&m("runs/log-parameter"), post(log_param))
        .route(&m("runs/log-batch"), post(log_batch))
        .route(&m("runs/set-tag"), post(set_tag))
        .route(&m("runs/delete-tag"), post(delete_tag))
        .route(&m("metrics/get-history"), get(metric_history))
        .route("/api/2.0/mlflow-artifacts/artifacts", get(list_artifacts))
        .route(
            "/api/2.0/mlflow-artifacts/artifacts/{*path}",
            get(download_artifact).put(upload_artifact),
        )
        .merge(super::models::routes())
        .with_state(tracking)
}

/// An error as MLflow's server writes it: `{error_code, message}`, with its status.
pub struct MlflowError(pub Error);

impl From<Error> for MlflowError {
    fn from(e: Error) -> Self {
        MlflowError(e)
    }
}

impl IntoResponse for MlflowError {
    fn into_response(self) -> Response {
        let (status, code) = match &self.0 {
            Error::InvalidArgument { .. } => (StatusCode::BAD_REQUEST, "INVALID_PARAMETER_VALUE"),
            Error::NotFound(_) => (StatusCode::NOT_FOUND, "RESOURCE_DOES_NOT_EXIST"),
            Error::AlreadyExists(_) => (StatusCode::BAD_REQUEST, "RESOURCE_ALREADY_EXISTS"),
            Error::FailedPrecondition(_) => (StatusCode::BAD_REQUEST, "INVALID_STATE"),
            Error::PermissionDenied(_) => (StatusCode::FORBIDDEN, "PERMISSION_DENIED"),
            Error::Store(_) | Error::Internal(_) => {
                (StatusCode::INTERNAL_SERVER_ERROR, "INTERNAL_ERROR")
            }
        };
        let message = match &self.0 {
            Error::InvalidArgument { field, reason } => format!("{field}: {reason}"),
            other => other.to_string(),
        };
        (
            status,
            Json(json!({"error_code": code, "message": message})),
        )
            .into_response()
    }
}

pub(super) type Answer = Result<Json<Value>, MlflowError>;

impl<S: Send + Sync> FromRequestParts<S> for Caller {
    type Rejection = MlflowError;

    async fn from_request_parts(parts: &mut Parts, _: &S) -> Result<Self, Self::Rejection> {
        if let Some(caller) = parts.extensions.get::<Caller>() {
            return Ok(caller.clone());
        }
        match parts.extensions.get::<Principal>() {
            Some(Principal::Node { .. }) => Err(MlflowError(Error::PermissionDenied(
                "a node credential cannot call the tracking API; jobs reach it through their agent"
                    .into(),
            ))),
            _ => Ok(Caller::Person),
        }
    }
}

pub(super) fn body<T: DeserializeOwned>(bytes: &Bytes) -> Result<T, MlflowError> {
    let bytes: &[u8] = if bytes.iter().all(u8::is_ascii_whitespace) {
        b"{}"
    } else {
        bytes
    };
    serde_json::from_slice(bytes).map_err(|e| MlflowError(Error::invalid("body", e.to_string())))
}

fn people_only(caller: &Caller, what: &str) -> Result<(), MlflowError> {
    match caller {
        Caller::Person => Ok(()),
        Caller::Job(job) => Err(MlflowError(Error::PermissionDenied(format!(
            "a job's token may not {what}; job {} writes only its own runs",
            job.job_id
        )))),
    }
}

fn param<'a>(query: &'a HashMap<String, String>, names: &[&str]) -> Result<&'a str, MlflowError> {
    names
        .iter()
        .find_map(|n| query.get(*n).filter(|v| !v.is_empty()))
        .map(String::as_str)
        .ok_or_else(|| MlflowError(Error::invalid(names[0], "missing")))
}

pub(super) fn now() -> i64 {
    crate::model::now_ms() as i64
}

fn check_key(what: &str, key: &str) -> Result<(), MlflowError> {
    if key.trim().is_empty() {
        return Err(MlflowError(Error::invalid(what, "a key cannot be empty")));
    }
    if key.chars().count() > 250 {
        return Err(MlflowError(Error::invalid(
            what,
            format!(
                "key `{}…` is longer than 250 characters",
                key.chars().take(40).collect::<String>()
            ),
        )));
    }
    Ok(())
}

// ------------------------------------------------------------------ experiments

#[derive(Deserialize)]
struct CreateExperiment {
    name: String,
    #[serde(default)]
    tags: Vec<Tag>,
}

async fn create_experiment(State(t): State<Tracking>, _caller: Caller, raw: Bytes) -> Answer {
    let asked: CreateExperiment = body(&raw)?;
    let id = t
        .write(move |sql| store::create_experiment(sql, &asked.name, &asked.tags, now()))
        .await?;
    Ok(Json(json!({"experiment_id": id.to_string()})))
}

async fn get_experiment(
    State(t): State<Tracking>,
    Query(q): Query<HashMap<String, String>>,
) -> Answer {
    let id = parse_experiment_id(param(&q, &["experiment_id"])?)?;
    let experiment = t.read(move |sql| store::experiment(sql, id)).await?;
    Ok(Json(json!({"experiment": experiment})))
}

async fn get_experiment_by_name(
    State(t): State<Tracking>,
    Query(q): Query<HashMap<String, String>>,
) -> Answer {
    let name = param(&q, &["experiment_name"])?.to_string();
    let experiment = t
        .read(move |sql| store::experiment_by_name(sql, &name))
        .await?;
    Ok(Json(json!({"experiment": experiment})))
}

#[derive(Deserialize, Default)]
struct SearchExperiments {
    #[serde(default, deserialize_with = "read_opt_i64")]
    max_results: Option<i64>,
    #[serde(default)]
    filter: String,
    #[serde(default)]
    order_by: Vec<String>,
    #[serde(default)]
    view_type: String,
    #[serde(default)]
    page_token: String,
}

fn stages(view: &str) -> Result<&'static [&'static str], MlflowError> {
    match view {
        "" | "ACTIVE_ONLY" | "1" => Ok(&["active"]),
        "DELETED_ONLY" | "2" => Ok(&["deleted"]),
        "ALL" | "3" => Ok(&["active", "deleted"]),
        other => Err(MlflowError(Error::invalid(
            "view_type",
            format!("`{other}` is not ACTIVE_ONLY, DELETED_ONLY or ALL"),
        ))),
    }
}

/// One page of `items` from the offset `token` names; the next token, if any.
pub(super) fn page<T>(
    items: Vec<T>,
    token: &str,
    max: Option<i64>,
    default: usize,
) -> Result<(Vec<T>, Option<String>), MlflowError> {
    let start: usize = if token.is_empty() {
        0
    } else {
        token.parse().map_err(|_| {
            MlflowError(Error::invalid(
                "page_token",
                format!("`{token}` is not a page token from this server"),
            ))
        })?
    };
    let max = match max {
        None | Some(0) => default,
        Some(n) if n < 0 || n as usize > MAX_RESULTS => {
            return Err(MlflowError(Error::invalid(
                "max_results",
                format!("{n} is not between 1 and {MAX_RESULTS}"),
            )));
        }
        Some(n) => n as usize,
    };
    let total = items.len();
    let items: Vec<T> = items.into_iter().skip(start).take(max).collect();
    let next = (start + items.len() < total).then(|| (start + items.len()).to_string());
    Ok((items, next))
}

async fn search_experiments(State(t): State<Tracking>, raw: Bytes) -> Answer {
    let asked: SearchExperiments = body(&raw)?;
    experiments_page(t, asked).await
}

async fn search_experiments_get(
    State(t): State<Tracking>,
    Query(q): Query<HashMap<String, String>>,
) -> Answer {
    let asked = SearchExperiments {
        max_results: q.get("max_results").and_then(|m| m.parse().ok()),
        filter: q.get("filter").cloned().unwrap_or_default(),
        order_by: q.get("order_by").cloned().into_iter().collect(),
        view_type: q.get("view_type").cloned().unwrap_or_default(),
        page_token: q.get("page_token").cloned().unwrap_or_default(),
    };
    experiments_page(t, asked).await
}

async fn experiments_page(t: Tracking, asked: SearchExperiments) -> Answer {
    let stages = stages(&asked.view_type)?;
    let filter = Filter::parse(&asked.filter)?;
    let mut found = t.read(move |sql| store::experiments(sql, stages)).await?;
    found.retain(|e| filter.matches_experiment(e));
    if let Some(order) = asked.order_by.first() {
        let descending = order.to_ascii_uppercase().ends_with(" DESC");
        let by_name = order.trim_start().starts_with("name");
        found.sort_by(|a, b| {
            let o = if by_name {
                a.name.cmp(&b.name)
            } else {
                a.creation_time.cmp(&b.creation_time)
            };
            if descending { o.reverse() } else { o }
        });
    }
    let (experiments, next) = page(found, &asked.page_token, asked.max_results, 1000)?;
    let mut answer = json!({"experiments": experiments});
    if let Some(next) = next {
        answer["next_page_token"] = json!(next);
    }
    Ok(Json(answer))
}

#[derive(Deserialize)]
struct ExperimentRef {
    experiment_id: String,
    #[serde(default)]
    new_name: String,
    #[serde(default)]
    key: String,
    #[serde(default)]
    value: String,
}

async fn experiment_write(
    t: Tracking,
    caller: Caller,
    raw: Bytes,
    what: &str,
    f: fn(&mut crate::db::Sql, i64, &ExperimentRef) -> crate::Result<()>,
) -> Answer {
    people_only(&caller, what)?;
    let asked: ExperimentRef = body(&raw)?;
    let id = parse_experiment_id(&asked.experiment_id)?;
    if id == 0 && what == "delete experiments" {
        return Err(MlflowError(Error::FailedPrecondition(
            "the Default experiment (0) cannot be deleted".into(),
        )));
    }
    t.write(move |sql| f(sql, id, &asked)).await?;
    Ok(Json(json!({})))
}

async fn delete_experiment(State(t): State<Tracking>, caller: Caller, raw: Bytes) -> Answer {
    experiment_write(t, caller, raw, "delete experiments", |c, id, _| {
        store::set_experiment_lifecycle(c, id, "deleted", now())
    })
    .await
}

async fn restore_experiment(State(t): State<Tracking>, caller: Caller, raw: Bytes) -> Answer {
    experiment_write(t, caller, raw, "restore experiments", |c, id, _| {
        store::set_experiment_lifecycle(c, id, "active", now())
    })
    .await
}

async fn rename_experiment(State(t): State<Tracking>, caller: Caller, raw: Bytes) -> Answer {
    experiment_write(t, caller, raw, "rename experiments", |c, id, asked| {
        if asked.new_name.trim().is_empty() {
            return Err(Error::invalid("new_name", "give the experiment's new name"));
        }
        store::rename_experiment(c, id, asked.new_name.trim(), now())
    })
    .await
}

async fn set_experiment_tag(State(t): State<Tracking>, caller: Caller, raw: Bytes) -> Answer {
    experiment_write(t, caller, raw, "tag experiments", |c, id, asked| {
        store::experiment(c, id)?;
        store::set_experiment_tag(
            c,
            id,
            &Tag {
                key: asked.key.clone(),
                value: asked.value.clone(),
            },
        )
    })
    .await
}

// ------------------------------------------------------------------------ runs

#[derive(Deserialize)]
struct CreateRun {
    #[serde(default)]
    experiment_id: String,
    #[serde(default)]
    user_id: String,
    #[serde(default, deserialize_with = "read_opt_i64")]
    start_time: Option<i64>,
    #[serde(default)]
    tags: Vec<Tag>,
    #[serde(default)]
    run_name: String,
}

async fn create_run(State(t): State<Tracking>, caller: Caller, raw: Bytes) -> Answer {
    let asked: CreateRun = body(&raw)?;
    let experiment_id = if asked.experiment_id.is_empty() {
        0
    } else {
        parse_experiment_id(&asked.experiment_id)?
    };
    let run_id = crate::auth::random_hex(16);
    let mut tags = asked.tags;
    let name = if asked.run_name.is_empty() {
        tags.iter()
            .find(|t| t.key == "mlflow.runName")
            .map_or_else(|| run_id.clone(), |t| t.value.clone())
    } else {
        asked.run_name
    };
    tags.retain(|t| t.key != "mlflow.runName");
    tags.push(Tag {
        key: "mlflow.runName".into(),
        value: name.clone(),
    });
    let job_id = match &caller {
        Caller::Person => String::new(),
        Caller::Job(job) => {
            tags.push(Tag {
                key: "shoal.job_id".into(),
                value: job.job_id.clone(),
            });
            job.job_id.clone()
        }
    };
    let new = NewRun {
        run_id: run_id.clone(),
        experiment_id,
        name,
        user_id: asked.user_id,
        start_ms: asked.start_time.unwrap_or_else(now),
        tags,
        job_id,
    };
    let run = t
        .write(move |sql| {
            store::create_run(sql, &new)?;
            store::run(sql, &new.run_id)
        })
        .await?;
    Ok(Json(json!({"run": run})))
}

async fn get_run(State(t): State<Tracking>, Query(q): Query<HashMap<String, String>>) -> Answer {
    let run_id = param(&q, &["run_id", "run_uuid"])?.to_string();
    let run = t.read(move |sql| store::run(sql, &run_id)).await?;
    Ok(Json(json!({"run": run})))
}

/// Which run a write names (`run_id`, or the older `run_uuid`).
#[derive(Deserialize)]
struct RunRef {
    #[serde(default)]
    run_id: String,
    #[serde(default)]
    run_uuid: String,
}

impl RunRef {
    fn id(&self) -> Result<String, MlflowError> {
        let id = if self.run_id.is_empty() {
            &self.run_uuid
        } else {
            &self.run_id
        };
        if id.is_empty() {
            return Err(MlflowError(Error::invalid("run_id", "missing")));
        }
        Ok(id.clone())
    }
}

#[derive(Deserialize)]
struct UpdateRun {
    #[serde(flatten)]
    run: RunRef,
    #[serde(default)]
    status: Option<String>,
    #[serde(default, deserialize_with = "read_opt_i64")]
    end_time: Option<i64>,
    #[serde(default)]
    run_name: Option<String>,
}

async fn update_run(State(t): State<Tracking>, caller: Caller, raw: Bytes) -> Answer {
    let asked: UpdateRun = body(&raw)?;
    let run_id = asked.run.id()?;
    let status = asked.status.filter(|s| !s.is_empty());
    if let Some(status) = &status
        && !RUN_STATUSES.contains(&status.as_str())
    {
        return Err(MlflowError(Error::invalid(
            "status",
            format!("`{status}` is not one of {}", RUN_STATUSES.join(", ")),
        )));
    }
    let name = asked.run_name.filter(|n| !n.is_empty());
    let info = t
        .write_run(&caller, run_id, false, move |sql, run_id| {
            store::update_run(
                sql,
                run_id,
                status.as_deref(),
                asked.end_time,
                name.as_deref(),
            )?;
            Ok(store::run(sql, run_id)?.info)
        })
        .await?;
    Ok(Json(json!({"run_info": info})))
}

async fn delete_run(State(t): State<Tracking>, caller: Caller, raw: Bytes) -> Answer {
    let run_id = body::<RunRef>(&raw)?.id()?;
    t.write_run(&caller, run_id, true, |sql, id| {
        store::set_run_lifecycle(sql, id, "deleted")
    })
    .await?;
    Ok(Json(json!({})))
}

async fn restore_run(State(t): State<Tracking>, caller: Caller, raw: Bytes) -> Answer {
    let run_id = body::<RunRef>(&raw)?.id()?;
    t.write_run(&caller, run_id, true, |sql, id| {
        store::set_run_lifecycle(sql, id, "active")
    })
    .await?;
    Ok(Json(json!({})))
}

#[derive(Deserialize)]
struct SearchRuns {
    #[serde(default)]
    experiment_ids: Vec<String>,
    #[serde(default)]
    filter: String,
    #[serde(default)]
    run_view_type: String,
    #[serde(default, deserialize_with = "read_opt_i64")]
    max_results: Option<i64>,
    #[serde(default)]
    order_by: Vec<String>,
    #[serde(default)]
    page_token: String,
}

async fn search_runs(State(t): State<Tracking>, raw: Bytes) -> Answer {
    let asked: SearchRuns = body(&raw)?;
    let stages = stages(&asked.run_view_type)?;
    let filter = Filter::parse(&asked.filter)?;
    let experiments = asked
        .experiment_ids
        .iter()
        .map(|id| parse_experiment_id(id))
        .collect::<crate::Result<Vec<_>>>()?;
    let mut runs = t
        .read(move |sql| {
            let mut runs = Vec::new();
            for id in experiments {
                runs.extend(store::runs_of_experiment(sql, id)?);
            }
            Ok(runs)
        })
        .await?;
    runs.retain(|r| stages.contains(&r.info.lifecycle_stage.as_str()) && filter.matches_run(r));
    sort_runs(&mut runs, &asked.order_by)?;
    let (runs, next) = page(runs, &asked.page_token, asked.max_results, 1000)?;
    let mut answer = json!({"runs": runs});
    if let Some(next) = next {
        answer["next_page_token"] = json!(next);
    }
    Ok(Json(answer))
}

// --------------------------------------------------------------------- logging

#[derive(Deserialize)]
struct LogMetric {
    #[serde(flatten)]
    run: RunRef,
    #[serde(flatten)]
    metric: Metric,
}

async fn log_metric(State(t): State<Tracking>, caller: Caller, raw: Bytes) -> Answer {
    let asked: LogMetric = body(&raw)?;
    check_key("key", &asked.metric.key)?;
    let run_id = asked.run.id()?;
    t.log(&caller, run_id, vec![asked.metric], vec![], vec![])
        .await?;
    Ok(Json(json!({})))
}

#[derive(Deserialize)]
struct KeyValue {
    #[serde(flatten)]
    run: RunRef,
    key: String,
    #[serde(default)]
    value: String,
}

async fn log_param(State(t): State<Tracking>, caller: Caller, raw: Bytes) -> Answer {
    let asked: KeyValue = body(&raw)?;
    check_key("key", &asked.key)?;
    if asked.value.len() > MAX_PARAM_VALUE {
        return Err(MlflowError(Error::invalid(
            "value",
            format!(
                "param `{}` is longer than {MAX_PARAM_VALUE} characters",
                asked.key
            ),
        )));
    }
    let run_id = asked.run.id()?;
    let param = Tag {
        key: asked.key,
        value: asked.value,
    };
    t.log(&caller, run_id, vec![], vec![param], vec![]).await?;
    Ok(Json(json!({})))
}

async fn set_tag(State(t): State<Tracking>, caller: Caller, raw: Bytes) -> Answer {
    let asked: KeyValue = body(&raw)?;
    check_key("key", &asked.key)?;
    let run_id = asked.run.id()?;
    let tag = Tag {
        key: asked.key,
        value: asked.value,
    };
    t.log(&caller, run_id, vec![], vec![], vec![tag]).await?;
    Ok(Json(json!({})))
}

async fn delete_tag(State(t): State<Tracking>, caller: Caller, raw: Bytes) -> Answer {
    let asked: KeyValue = body(&raw)?;
    let run_id = asked.run.id()?;
    t.write_run(&caller, run_id, false, move |sql, id| {
        store::delete_tag(sql, id, &asked.key)
    })
    .await?;
    Ok(Json(json!({})))
}

#[derive(Deserialize)]
struct LogBatch {
    #[serde(flatten)]
    run: RunRef,
    #[serde(default)]
    metrics: Vec<Metric>,
    #[serde(default)]
    params: Vec<Tag>,
    #[serde(default)]
    tags: Vec<Tag>,
}

async fn log_batch(State(t): State<Tracking>, caller: Caller, raw: Bytes) -> Answer {
    let asked: LogBatch = body(&raw)?;
    for (what, count, most) in [
        ("metrics", asked.metrics.len(), MAX_BATCH_METRICS),
        ("params", asked.params.len(), MAX_BATCH_PARAMS),
        ("tags", asked.tags.len(), MAX_BATCH_TAGS),
    ] {
        if count > most {
            return Err(MlflowError(Error::invalid(
                what,
                format!("{count} in one batch; at most {most}"),
            )));
        }
    }
    for key in asked
        .metrics
        .iter()
        .map(|m| &m.key)
        .chain(asked.params.iter().map(|p| &p.key))
        .chain(asked.tags.iter().map(|t| &t.key))
    {
        check_key("key", key)?;
    }
    let run_id = asked.run.id()?;
    t.log(&caller, run_id, asked.metrics, asked.params, asked.tags)
        .await?;
    Ok(Json(json!({})))
}

async fn metric_history(
    State(t): State<Tracking>,
    Query(q): Query<HashMap<String, String>>,
) -> Answer {
    let run_id = param(&q, &["run_id", "run_uuid"])?.to_string();
    let key = param(&q, &["metric_key"])?.to_string();
    let max = q.get("max_results").and_then(|m| m.parse().ok());
    let token = q.get("page_token").cloned().unwrap_or_default();
    let points = t
        .read(move |sql| store::metric_history(sql, &run_id, &key))
        .await?;
    let (metrics, next) = page(points, &token, max, MAX_RESULTS)?;
    let mut answer = json!({"metrics": metrics});
    if let Some(next) = next {
        answer["next_page_token"] = json!(next);
    }
    Ok(Json(answer))
}

// ------------------------------------------------------------------- artifacts

async fn list_artifacts(
    State(t): State<Tracking>,
    Query(q): Query<HashMap<String, String>>,
) -> Result<Json<Value>, MlflowError> {
    let path = q.get("path").cloned().unwrap_or_default();
    let (dir, _) = t.artifact_path(&path)?;
    let files = tokio::task::spawn_blocking(move || -> std::io::Result<Vec<Value>> {
        let mut files = Vec::new();
        let entries = match std::fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(files),
            Err(e) if e.kind() == std::io::ErrorKind::NotADirectory => return Ok(files),
            Err(e) => return Err(e),
        };
        for entry in entries {
            let entry = entry?;
            let meta = entry.metadata()?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if name.starts_with(".upload-") {
                continue;
            }
            files.push(if meta.is_dir() {
                json!({"path": name, "is_dir": true})
            } else {
                json!({"path": name, "is_dir": false, "file_size": meta.len()})
            });
        }
        files.sort_by(|a, b| a["path"].as_str().cmp(&b["path"].as_str()));
        Ok(files)
    })
    .await
    .map_err(|e| MlflowError(Error::Internal(e.to_string())))?
    .map_err(|e| MlflowError(Error::Internal(format!("cannot list artifacts: {e}"))))?;
    Ok(Json(json!({"files": files})))
}

async fn download_artifact(
    State(t): State<Tracking>,
    Path(path): Path<String>,
) -> Result<Response, MlflowError> {
    let (file, _) = t.artifact_path(&path)?;
    match tokio::fs::read(&file).await {
        Ok(bytes) => {
            Ok(([(header::CONTENT_TYPE, "application/octet-stream")], bytes).into_response())
        }
        Err(e)
            if matches!(
                e.kind(),
                std::io::ErrorKind::NotFound | std::io::ErrorKind::IsADirectory
            ) =>
        {
            Err(MlflowError(Error::NotFound(format!(
                "no artifact `{path}`"
            ))))
        }
        Err(e) => Err(MlflowError(Error::Internal(format!(
            "cannot read artifact `{path}`: {e}"
        )))),
    }
}

async fn upload_artifact(
    State(t): State<Tracking>,
    caller: Caller,
    Path(path): Path<String>,
    data: Bytes,
) -> Result<Json<Value>, MlflowError> {
    let (file, run) = t.artifact_path(&path)?;
    let Some(run_id) = run else {
        return Err(MlflowError(Error::invalid(
            "path",
            format!("`{path}` is not under a run (<experiment>/<run>/artifacts/...)"),
        )));
    };
    // The run (or logged model) must exist, be in the experiment the path names,
    // and be the caller's to write.
    let mut parts = path.trim_start_matches('/').split('/');
    let experiment = parts.next().unwrap_or_default().to_string();
    if run_id == "models" {
        let model = parts.nth(1).unwrap_or_default().to_string();
        t.write(move |sql| {
            super::models::may_write(sql, &caller, &model)?;
            let info = super::models::model(sql, &model)?;
            if info["info"]["experiment_id"] != experiment.as_str() {
                return Err(Error::invalid(
                    "path",
                    format!("logged model {model} is not in experiment {experiment}"),
                ));
            }
            Ok(())
        })
        .await?;
    } else {
        t.write_run(&caller, run_id, false, move |sql, id| {
            let actual = store::run_experiment(sql, id)?;
            if actual.to_string() != experiment {
                return Err(Error::invalid(
                    "path",
                    format!("run {id} is in experiment {actual}, not {experiment}"),
                ));
            }
            Ok(())
        })
        .await?;
    }
    tokio::task::spawn_blocking(move || -> std::io::Result<()> {
        let dir = file.parent().unwrap_or(&file);
        std::fs::create_dir_all(dir)?;
        let mut tmp = tempfile::Builder::new()
            .prefix(".upload-")
            .tempfile_in(dir)?;
        std::io::Write::write_all(&mut tmp, &data)?;
        tmp.persist(&file).map_err(|e| e.error)?;
        Ok(())
    })
    .await
    .map_err(|e| MlflowError(Error::Internal(e.to_string())))?
    .map_err(|e| {
        MlflowError(Error::Internal(format!(
            "cannot store artifact `{path}`: {e}"
        )))
    })?;
    Ok(Json(json!({})))
}

#[cfg(test)]
mod tests {
    use axum::body::Body;
    use tower::ServiceExt;

    use super::*;
    use crate::tracking::JobCaller;

    fn job(id: &str) -> JobCaller {
        JobCaller {
            job_id: id.into(),
            attempt_id: format!("{id}.1"),
            instance: 0,
            node: "n1".into(),
            cluster: "cpu".into(),
            experiment: "exp".into(),
            run_name: id.into(),
        }
    }

    async fn call(
        routes: &Router,
        caller: Option<&JobCaller>,
        method: &str,
        path: &str,
        body: &str,
    ) -> (u16, Value) {
        let mut request = axum::http::Request::builder()
            .method(method)
            .uri(path)
            .body(Body::from(body.to_string()))
            .expect("request");
        if let Some(job) = caller {
            request
                .extensions_mut()
                .insert(Caller::Job(Box::new(job.clone())));
        }
        let answer = routes.clone().oneshot(request).await.expect("answer");
        let status = answer.status().as_u16();
        let bytes = axum::body::to_bytes(answer.into_body(), 1 << 20)
            .await
            .expect("body");
        (
            status,
            serde_json::from_slice(&bytes).unwrap_or(Value::Null),
        )
    }

    #[tokio::test]
    async fn a_job_writes_its_own_run_and_is_refused_anothers() {
        let dir = tempfile::tempdir().expect("dir");
        let tracking = Tracking::open(dir.path(), None).expect("open");
        let routes = router(tracking.clone());
        let (one, two) = (job("job-1"), job("job-2"));
        tracking.ensure_job_run(&one).await.expect("ensure");
        tracking.ensure_job_run(&one).await.expect("again");
        tracking.ensure_job_run(&two).await.expect("ensure");
        let metric = |run: &str| {
            format!(r#"{{"run_id":"{run}","key":"loss","value":"NaN","timestamp":"5","step":1}}"#)
        };
        let log = "/api/2.0/mlflow/runs/log-metric";
        let (code, _) = call(&routes, Some(&one), "POST", log, &metric("job-1-1")).await;
        assert_eq!(code, 200);
        let (code, body) = call(&routes, Some(&two), "POST", log, &metric("job-1-1")).await;
        assert_eq!(code, 403, "{body}");
        assert_eq!(body["error_code"], "PERMISSION_DENIED");
        // A run the job starts itself is its own, too.
        let (code, made) = call(
            &routes,
            Some(&two),
            "POST",
            "/api/2.0/mlflow/runs/create",
            r#"{"experiment_id":"0","run_name":"child"}"#,
        )
        .await;
        assert_eq!(code, 200, "{made}");
        let child = made["run"]["info"]["run_id"]
            .as_str()
            .expect("id")
            .to_string();
        let (code, _) = call(&routes, Some(&two), "POST", log, &metric(&child)).await;
        assert_eq!(code, 200);
        let (code, _) = call(&routes, Some(&one), "POST", log, &metric(&child)).await;
        assert_eq!(code, 403);
        // People (the guard checked their role) write anywhere; jobs may not
        // manage experiments.
        let (code, _) = call(&routes, None, "POST", log, &metric("job-2-1")).await;
        assert_eq!(code, 200);
        let (code, _) = call(
            &routes,
            Some(&one),
            "POST",
            "/api/2.0/mlflow/experiments/delete",
            r#"{"experiment_id":"1"}"#,
        )
        .await;
        assert_eq!(code, 403);
        let (_, run) = call(
            &routes,
            None,
            "GET",
            "/api/2.0/mlflow/runs/get?run_id=job-1-1",
            "",
        )
        .await;
        assert_eq!(run["run"]["data"]["metrics"][0]["value"], "NaN", "{run}");
        assert_eq!(
            run["run"]["info"]["experiment_id"], "1",
            "the job's experiment, made for it"
        );
        let jobs = tracking.job_runs("job-2").await.expect("runs");
        assert_eq!(jobs.len(), 2);
    }

    #[tokio::test]
    async fn a_logged_model_is_its_jobs_to_finalize_and_fill() {
        let dir = tempfile::tempdir().expect("dir");
        let routes = router(Tracking::open(dir.path(), None).expect("open"));
        let (one, two) = (job("job-1"), job("job-2"));
        let (code, made) = call(
            &routes,
            Some(&one),
            "POST",
            "/api/2.0/mlflow/logged-models",
            r#"{"experiment_id":"0","name":"m","params":[{"key":"k","value":"v"}]}"#,
        )
        .await;
        assert_eq!(code, 200, "{made}");
        let id = made["model"]["info"]["model_id"]
            .as_str()
            .expect("id")
            .to_string();
        assert_eq!(made["model"]["info"]["status"], "LOGGED_MODEL_PENDING");
        let file = format!("/api/2.0/mlflow-artifacts/artifacts/0/models/{id}/artifacts/MLmodel");
        assert_eq!(call(&routes, Some(&two), "PUT", &file, "x").await.0, 403);
        assert_eq!(call(&routes, Some(&one), "PUT", &file, "x").await.0, 200);
        let path = format!("/api/2.0/mlflow/logged-models/{id}");
        let ready = r#"{"status":"LOGGED_MODEL_READY"}"#;
        assert_eq!(
            call(&routes, Some(&two), "PATCH", &path, ready).await.0,
            403
        );
        let (code, done) = call(&routes, Some(&one), "PATCH", &path, ready).await;
        assert_eq!(code, 200, "{done}");
        assert_eq!(done["model"]["info"]["status"], "LOGGED_MODEL_READY");
        assert_eq!(done["model"]["data"]["params"][0]["value"], "v");
        let (code, _) = call(&routes, Some(&one), "PATCH", &path, r#"{"status":"GOOD"}"#).await;
        assert_eq!(code, 400);
    }

    #[tokio::test]
    async fn bad_calls_get_mlflows_error_codes() {
        let dir = tempfile::tempdir().expect("dir");
        let routes = router(Tracking::open(dir.path(), None).expect("open"));
        let (code, body) = call(
            &routes,
            None,
            "GET",
            "/api/2.0/mlflow/experiments/get-by-name?experiment_name=nope",
            "",
        )
        .await;
        assert_eq!(
            (code, body["error_code"].as_str()),
            (404, Some("RESOURCE_DOES_NOT_EXIST"))
        );
        let create = "/api/2.0/mlflow/experiments/create";
        assert_eq!(
            call(&routes, None, "POST", create, r#"{"name":"a"}"#)
                .await
                .0,
            200
        );
        let (code, body) = call(&routes, None, "POST", create, r#"{"name":"a"}"#).await;
        assert_eq!(
            (code, body["error_code"].as_str()),
            (400, Some("RESOURCE_ALREADY_EXISTS"))
        );
        let (code, body) = call(
            &routes,
            None,
            "POST",
            "/api/2.0/mlflow/runs/create",
            r#"{"experiment_id":"1"}"#,
        )
        .await;
        assert_eq!(code, 200);
        let run = body["run"]["info"]["run_id"]
            .as_str()
            .expect("id")
            .to_string();
        let metrics: Vec<Value> = (0..1001)
            .map(|i| json!({"key": "x", "value": i, "timestamp": i, "step": i}))
            .collect();
        let batch = json!({"run_id": run, "metrics": metrics}).to_string();
        let (code, body) = call(
            &routes,
            None,
            "POST",
            "/api/2.0/mlflow/runs/log-batch",
            &batch,
        )
        .await;
        assert_eq!(code, 400, "{body}");
        assert!(
            body["message"]
                .as_str()
                .unwrap_or_default()
                .contains("at most 1000"),
            "{body}"
        );
        // A long key of characters wider than a byte is refused, not a panic.
        let long = json!({"run_id": run, "key": "é".repeat(300), "value": "1"}).to_string();
        let (code, body) = call(&routes, None, "POST", "/api/2.0/mlflow/runs/set-tag", &long).await;
        assert_eq!(code, 400, "{body}");
        assert!(
            body["message"].as_str().unwrap_or_default().contains("250"),
            "{body}"
        );
        let (code, body) = call(
            &routes,
            None,
            "PUT",
            "/api/2.0/mlflow-artifacts/artifacts/1/x/../../../etc/passwd",
            "x",
        )
        .await;
        assert_eq!(code, 400, "{body}");
        let (code, _) = call(
            &routes,
            None,
            "PUT",
            &format!("/api/2.0/mlflow-artifacts/artifacts/0/{run}/artifacts/a.txt"),
            "x",
        )
        .await;
        assert_eq!(code, 400, "the run is in experiment 1, not 0");
        let (code, body) = call(
            &routes,
            None,
            "POST",
            "/api/2.0/mlflow/runs/update",
            &json!({"run_id": run, "status": "DONE"}).to_string(),
        )
        .await;
        assert_eq!(code, 400, "{body}");
    }
}
