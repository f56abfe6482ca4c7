//! MLflow 3's logged models: what `mlflow.<flavor>.log_model` makes (a model with
//! its params and tags, its files under `<experiment>/models/<id>/artifacts`, its
//! status PENDING until finalized READY or FAILED), and a run's outputs naming it.

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::routing::{delete, patch, post};
use axum::{Json, Router};
use serde::Deserialize;
use serde_json::{Value, json};

use super::model::{Tag, read_opt_i64};
use super::rest::{Answer, MlflowError, body, now};
use super::store::{self, parse_experiment_id};
use super::{Caller, Tracking};
use crate::db::Sql;
use crate::{Error, Result};

pub const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS logged_models (
  model_id TEXT PRIMARY KEY,
  experiment_id INTEGER NOT NULL,
  name TEXT NOT NULL,
  source_run_id TEXT NOT NULL DEFAULT '',
  model_type TEXT NOT NULL DEFAULT '',
  status TEXT NOT NULL,
  status_message TEXT NOT NULL DEFAULT '',
  created_ms INTEGER NOT NULL,
  updated_ms INTEGER NOT NULL,
  lifecycle TEXT NOT NULL DEFAULT 'active',
  job_id TEXT NOT NULL DEFAULT ''
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS logged_model_params (
  model_id TEXT NOT NULL, key TEXT NOT NULL, value TEXT NOT NULL, PRIMARY KEY (model_id, key)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS logged_model_tags (
  model_id TEXT NOT NULL, key TEXT NOT NULL, value TEXT NOT NULL, PRIMARY KEY (model_id, key)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS run_outputs (
  run_id TEXT NOT NULL, model_id TEXT NOT NULL, step INTEGER NOT NULL,
  PRIMARY KEY (run_id, model_id, step)
) WITHOUT ROWID;
";

/// The same tables in PostgreSQL.
pub const PG_SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS logged_models (
  model_id TEXT PRIMARY KEY,
  experiment_id BIGINT NOT NULL,
  name TEXT NOT NULL,
  source_run_id TEXT NOT NULL DEFAULT '',
  model_type TEXT NOT NULL DEFAULT '',
  status TEXT NOT NULL,
  status_message TEXT NOT NULL DEFAULT '',
  created_ms BIGINT NOT NULL,
  updated_ms BIGINT NOT NULL,
  lifecycle TEXT NOT NULL DEFAULT 'active',
  job_id TEXT NOT NULL DEFAULT ''
);
CREATE TABLE IF NOT EXISTS logged_model_params (
  model_id TEXT NOT NULL, key TEXT NOT NULL, value TEXT NOT NULL, PRIMARY KEY (model_id, key)
);
CREATE TABLE IF NOT EXISTS logged_model_tags (
  model_id TEXT NOT NULL, key TEXT NOT NULL, value TEXT NOT NULL, PRIMARY KEY (model_id, key)
);
CREATE TABLE IF NOT EXISTS run_outputs (
  run_id TEXT NOT NULL, model_id TEXT NOT NULL, step BIGINT NOT NULL,
  PRIMARY KEY (run_id, model_id, step)
);
";

const STATUSES: [&str; 4] = [
    "LOGGED_MODEL_STATUS_UNSPECIFIED",
    "LOGGED_MODEL_PENDING",
    "LOGGED_MODEL_READY",
    "LOGGED_MODEL_UPLOAD_FAILED",
];

pub fn routes() -> Router<Tracking> {
    let m = |path: &str| format!("/api/2.0/mlflow/{path}");
    Router::new()
        .route(&m("logged-models"), post(create))
        .route(&m("logged-models/search"), post(search))
        .route(
            &m("logged-models/{id}"),
            axum::routing::get(get).patch(finalize).delete(remove),
        )
        .route(&m("logged-models/{id}/params"), post(log_params))
        .route(&m("logged-models/{id}/tags"), patch(set_tags))
        .route(&m("logged-models/{id}/tags/{key}"), delete(delete_tag))
        .route(&m("runs/outputs"), post(log_outputs))
        .route(&m("runs/log-model"), post(record_in_run))
}

fn no_model(id: &str) -> Error {
    Error::NotFound(format!("no logged model with id {id}"))
}

/// A logged model as MLflow's JSON has it.
pub fn model(sql: &mut Sql, id: &str) -> Result<Value> {
    let row = sql
        .first(
            "SELECT experiment_id, name, source_run_id, model_type, status, status_message,
                    created_ms, updated_ms, lifecycle FROM logged_models WHERE model_id = ?1",
            &[&id],
            |r| {
                Ok((
                    r.get::<i64>(0)?,
                    r.get::<String>(1)?,
                    r.get::<String>(2)?,
                    r.get::<String>(3)?,
                    r.get::<String>(4)?,
                    r.get::<String>(5)?,
                    r.get::<i64>(6)?,
                    r.get::<i64>(7)?,
                    r.get::<String>(8)?,
                ))
            },
        )?
        .ok_or_else(|| no_model(id))?;
    let (experiment, name, source_run, model_type, status, message, created, updated, stage) = row;
    Ok(json!({
        "info": {
            "model_id": id,
            "experiment_id": experiment.to_string(),
            "name": name,
            "artifact_uri": format!("mlflow-artifacts:/{experiment}/models/{id}/artifacts"),
            "creation_timestamp_ms": created,
            "last_updated_timestamp_ms": updated,
            "model_type": model_type,
            "source_run_id": source_run,
            "status": status,
            "status_message": message,
            "lifecycle_stage": stage,
            "tags": store::pairs(sql, "logged_model_tags", "model_id", &id)?,
        },
        "data": {
            "params": store::pairs(sql, "logged_model_params", "model_id", &id)?,
            "metrics": [],
        },
    }))
}

/// The one check of writes to a model: a job's token writes only its job's models.
pub fn may_write(sql: &mut Sql, caller: &Caller, id: &str) -> Result<()> {
    let owner: String = sql
        .first(
            "SELECT job_id FROM logged_models WHERE model_id = ?1",
            &[&id],
            |r| r.get(0),
        )?
        .ok_or_else(|| no_model(id))?;
    if let Caller::Job(job) = caller
        && owner != job.job_id
    {
        return Err(Error::PermissionDenied(format!(
            "logged model {id} is not job {}'s; a job's token writes only its own job's models",
            job.job_id
        )));
    }
    Ok(())
}

fn upsert(sql: &mut Sql, table: &str, id: &str, items: &[Tag]) -> Result<()> {
    store::upsert_pairs(sql, table, "model_id", &id, items)
}

#[derive(Deserialize)]
struct Create {
    experiment_id: String,
    #[serde(default)]
    name: String,
    #[serde(default)]
    model_type: String,
    #[serde(default)]
    source_run_id: String,
    #[serde(default)]
    params: Vec<Tag>,
    #[serde(default)]
    tags: Vec<Tag>,
}

async fn create(State(t): State<Tracking>, caller: Caller, raw: Bytes) -> Answer {
    let asked: Create = body(&raw)?;
    let experiment = parse_experiment_id(&asked.experiment_id)?;
    let id = format!("m-{}", crate::auth::random_hex(16));
    let job = match &caller {
        Caller::Person => String::new(),
        Caller::Job(job) => job.job_id.clone(),
    };
    let made = t
        .write(move |sql| {
            store::experiment(sql, experiment)?;
            let name = if asked.name.is_empty() {
                id.clone()
            } else {
                asked.name
            };
            let at = now();
            sql.execute(
                "INSERT INTO logged_models (model_id, experiment_id, name, source_run_id,
                   model_type, status, created_ms, updated_ms, job_id)
                 VALUES (?1, ?2, ?3, ?4, ?5, 'LOGGED_MODEL_PENDING', ?6, ?6, ?7)",
                &[
                    &id,
                    &experiment,
                    &name,
                    &asked.source_run_id,
                    &asked.model_type,
                    &at,
                    &job,
                ],
            )?;
            upsert(sql, "logged_model_params", &id, &asked.params)?;
            upsert(sql, "logged_model_tags", &id, &asked.tags)?;
            model(sql, &id)
        })
        .await?;
    Ok(Json(json!({"model": made})))
}

async fn get(State(t): State<Tracking>, Path(id): Path<String>) -> Answer {
    let found = t.read(move |sql| model(sql, &id)).await?;
    Ok(Json(json!({"model": found})))
}

#[derive(Deserialize)]
struct Finalize {
    status: String,
}

async fn finalize(
    State(t): State<Tracking>,
    caller: Caller,
    Path(id): Path<String>,
    raw: Bytes,
) -> Answer {
    let asked: Finalize = body(&raw)?;
    if !STATUSES.contains(&asked.status.as_str()) {
        return Err(MlflowError::from(Error::invalid(
            "status",
            format!("`{}` is not one of {}", asked.status, STATUSES.join(", ")),
        )));
    }
    let done = t
        .write(move |sql| {
            may_write(sql, &caller, &id)?;
            sql.execute(
                "UPDATE logged_models SET status = ?2, updated_ms = ?3 WHERE model_id = ?1",
                &[&id, &asked.status, &now()],
            )?;
            model(sql, &id)
        })
        .await?;
    Ok(Json(json!({"model": done})))
}

async fn remove(State(t): State<Tracking>, caller: Caller, Path(id): Path<String>) -> Answer {
    t.write(move |sql| {
        may_write(sql, &caller, &id)?;
        sql.execute(
            "UPDATE logged_models SET lifecycle = 'deleted', updated_ms = ?2 WHERE model_id = ?1",
            &[&id, &now()],
        )?;
        Ok(())
    })
    .await?;
    Ok(Json(json!({})))
}

#[derive(Deserialize)]
struct Items {
    #[serde(default)]
    params: Vec<Tag>,
    #[serde(default)]
    tags: Vec<Tag>,
}

/// Params or tags of a model, set by a caller who may write it.
async fn set_pairs(
    t: Tracking,
    caller: Caller,
    id: String,
    table: &'static str,
    items: Vec<Tag>,
) -> Answer {
    t.write(move |sql| {
        may_write(sql, &caller, &id)?;
        upsert(sql, table, &id, &items)
    })
    .await?;
    Ok(Json(json!({})))
}

async fn log_params(
    State(t): State<Tracking>,
    caller: Caller,
    Path(id): Path<String>,
    raw: Bytes,
) -> Answer {
    let asked: Items = body(&raw)?;
    set_pairs(t, caller, id, "logged_model_params", asked.params).await
}

async fn set_tags(
    State(t): State<Tracking>,
    caller: Caller,
    Path(id): Path<String>,
    raw: Bytes,
) -> Answer {
    let asked: Items = body(&raw)?;
    set_pairs(t, caller, id, "logged_model_tags", asked.tags).await
}

async fn delete_tag(
    State(t): State<Tracking>,
    caller: Caller,
    Path((id, key)): Path<(String, String)>,
) -> Answer {
    t.write(move |sql| {
        may_write(sql, &caller, &id)?;
        sql.execute(
            "DELETE FROM logged_model_tags WHERE model_id = ?1 AND key = ?2",
            &[&id, &key],
        )?;
        Ok(())
    })
    .await?;
    Ok(Json(json!({})))
}

#[derive(Deserialize)]
struct Search {
    #[serde(default)]
    experiment_ids: Vec<String>,
    #[serde(default, deserialize_with = "read_opt_i64")]
    max_results: Option<i64>,
    #[serde(default)]
    page_token: String,
}

/// Models of the experiments, newest first (filters and orders are not read here).
async fn search(State(t): State<Tracking>, raw: Bytes) -> Answer {
    let asked: Search = body(&raw)?;
    let experiments = asked
        .experiment_ids
        .iter()
        .map(|id| parse_experiment_id(id))
        .collect::<Result<Vec<_>>>()?;
    let found = t
        .read(move |sql| {
            let mut models = Vec::new();
            for experiment in experiments {
                let ids = sql.query(
                    "SELECT model_id FROM logged_models WHERE experiment_id = ?1 AND lifecycle = 'active'
                     ORDER BY created_ms DESC, model_id",
                    &[&experiment],
                    |r| r.get::<String>(0),
                )?;
                for id in ids {
                    models.push(model(sql, &id)?);
                }
            }
            Ok(models)
        })
        .await?;
    let (models, next) = super::rest::page(found, &asked.page_token, asked.max_results, 100)?;
    let mut answer = json!({"models": models});
    if let Some(next) = next {
        answer["next_page_token"] = json!(next);
    }
    Ok(Json(answer))
}

#[derive(Deserialize)]
struct Output {
    model_id: String,
    #[serde(default, deserialize_with = "read_opt_i64")]
    step: Option<i64>,
}

#[derive(Deserialize)]
struct Outputs {
    run_id: String,
    #[serde(default)]
    models: Vec<Output>,
}

/// A run's outputs: the models it logged (`log_model` inside a run).
async fn log_outputs(State(t): State<Tracking>, caller: Caller, raw: Bytes) -> Answer {
    let asked: Outputs = body(&raw)?;
    t.write_run(&caller, asked.run_id, false, move |sql, run_id| {
        for output in &asked.models {
            model(sql, &output.model_id)?;
            sql.execute(
                "INSERT INTO run_outputs (run_id, model_id, step) VALUES (?1, ?2, ?3)
                 ON CONFLICT DO NOTHING",
                &[&run_id, &output.model_id, &output.step.unwrap_or(0)],
            )?;
        }
        Ok(())
    })
    .await?;
    Ok(Json(json!({})))
}

#[derive(Deserialize)]
struct LogModel {
    run_id: String,
    model_json: String,
}

/// `runs/log-model`: the model's description joins the run's
/// `mlflow.log-model.history` tag (a JSON list), as MLflow's server keeps it.
async fn record_in_run(State(t): State<Tracking>, caller: Caller, raw: Bytes) -> Answer {
    let asked: LogModel = body(&raw)?;
    let described: Value = serde_json::from_str(&asked.model_json)
        .map_err(|e| Error::invalid("model_json", e.to_string()))?;
    t.write_run(&caller, asked.run_id, false, move |sql, run_id| {
        let key = "mlflow.log-model.history";
        let old = store::tag(sql, run_id, key)?;
        let mut history: Vec<Value> = old
            .and_then(|o| serde_json::from_str(&o).ok())
            .unwrap_or_default();
        history.push(described);
        store::set_tags(
            sql,
            run_id,
            &[Tag {
                key: key.into(),
                value: Value::Array(history).to_string(),
            }],
        )
    })
    .await?;
    Ok(Json(json!({})))
}

/// The models a run's outputs name, for its JSON (`outputs.model_outputs`).
pub fn run_outputs(sql: &mut Sql, run_id: &str) -> Result<Vec<Value>> {
    sql.query(
        "SELECT model_id, step FROM run_outputs WHERE run_id = ?1 ORDER BY step",
        &[&run_id],
        |r| Ok(json!({"model_id": r.get::<String>(0)?, "step": r.get::<i64>(1)?})),
    )
}

/// The ids of a job's models (deleted with it).
pub fn models_of_job(sql: &mut Sql, job: &str) -> Result<Vec<(i64, String)>> {
    sql.query(
        "SELECT experiment_id, model_id FROM logged_models WHERE job_id = ?1",
        &[&job],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )
}
