//! The tracking tables, in `tracking.db` beside the control loop's store: a file of
//! their own, so a job logging thousands of metrics never holds the lock the
//! control loop commits under. Plain functions on a connection; the writer
//! (`super::Writer`) calls them inside its transactions, readers on read-only
//! connections.

use std::collections::BTreeMap;
use std::path::Path;

use rusqlite::{Connection, OptionalExtension, params};

use super::model::{
    Experiment, Metric, Run, RunData, RunInfo, Tag, experiment_artifact_location, run_artifact_uri,
};
use crate::{Error, Result};

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS experiments (
  id INTEGER PRIMARY KEY,
  name TEXT NOT NULL UNIQUE,
  lifecycle TEXT NOT NULL DEFAULT 'active',
  created_ms INTEGER NOT NULL,
  updated_ms INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS experiment_tags (
  experiment_id INTEGER NOT NULL, key TEXT NOT NULL, value TEXT NOT NULL,
  PRIMARY KEY (experiment_id, key)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS runs (
  run_id TEXT PRIMARY KEY,
  experiment_id INTEGER NOT NULL,
  name TEXT NOT NULL,
  user_id TEXT NOT NULL DEFAULT '',
  status TEXT NOT NULL,
  start_ms INTEGER NOT NULL,
  end_ms INTEGER,
  lifecycle TEXT NOT NULL DEFAULT 'active',
  -- The job whose token made it ('' for a person's run): only that job writes it.
  job_id TEXT NOT NULL DEFAULT ''
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS runs_by_job ON runs (job_id) WHERE job_id != '';
CREATE INDEX IF NOT EXISTS runs_by_experiment ON runs (experiment_id, start_ms);
CREATE TABLE IF NOT EXISTS params (
  run_id TEXT NOT NULL, key TEXT NOT NULL, value TEXT NOT NULL, PRIMARY KEY (run_id, key)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS tags (
  run_id TEXT NOT NULL, key TEXT NOT NULL, value TEXT NOT NULL, PRIMARY KEY (run_id, key)
) WITHOUT ROWID;
-- Every point, in the order logged. SQLite keeps NaN as NULL: read back as NaN.
CREATE TABLE IF NOT EXISTS metrics (
  run_id TEXT NOT NULL, key TEXT NOT NULL, step INTEGER NOT NULL,
  timestamp INTEGER NOT NULL, value REAL
);
-- A point logged twice (the same key, step, timestamp and value) is kept once, as
-- MLflow's server keeps it (log_model logs the run's points again, for its model).
CREATE UNIQUE INDEX IF NOT EXISTS metrics_once ON metrics (run_id, key, step, timestamp, value);
-- Each metric's latest point (highest step, then timestamp, then value), as MLflow's.
CREATE TABLE IF NOT EXISTS latest_metrics (
  run_id TEXT NOT NULL, key TEXT NOT NULL, step INTEGER NOT NULL,
  timestamp INTEGER NOT NULL, value REAL, PRIMARY KEY (run_id, key)
) WITHOUT ROWID;
";

/// Opens (and makes, or brings up to date) the tracking database for writing.
pub fn open(path: &Path, now_ms: i64) -> Result<Connection> {
    let conn = Connection::open(path)?;
    conn.execute_batch("PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL;")?;
    conn.execute_batch(SCHEMA)?;
    conn.execute_batch(super::models::SCHEMA)?;
    // MLflow's experiment 0, where runs go that name no experiment.
    conn.execute(
        "INSERT OR IGNORE INTO experiments (id, name, created_ms, updated_ms)
         VALUES (0, 'Default', ?1, ?1)",
        [now_ms],
    )?;
    Ok(conn)
}

fn value_of(value: f64) -> Option<f64> {
    (!value.is_nan()).then_some(value)
}

fn read_value(value: Option<f64>) -> f64 {
    value.unwrap_or(f64::NAN)
}

pub fn parse_experiment_id(id: &str) -> Result<i64> {
    id.trim()
        .parse()
        .map_err(|_| Error::invalid("experiment_id", format!("`{id}` is not an experiment id")))
}

fn no_experiment(id: &str) -> Error {
    Error::NotFound(format!("no experiment with id {id}"))
}

fn no_run(run_id: &str) -> Error {
    Error::NotFound(format!("no run with id {run_id}"))
}

pub fn create_experiment(conn: &Connection, name: &str, tags: &[Tag], now: i64) -> Result<i64> {
    let name = name.trim();
    if name.is_empty() {
        return Err(Error::invalid("name", "an experiment needs a name"));
    }
    if experiment_id_by_name(conn, name)?.is_some() {
        return Err(Error::AlreadyExists(format!(
            "experiment `{name}` already exists"
        )));
    }
    conn.execute(
        "INSERT INTO experiments (name, created_ms, updated_ms) VALUES (?1, ?2, ?2)",
        params![name, now],
    )?;
    let id = conn.last_insert_rowid();
    for tag in tags {
        set_experiment_tag(conn, id, tag)?;
    }
    Ok(id)
}

/// The experiment of this name, made if there is none.
pub fn experiment_named(conn: &Connection, name: &str, now: i64) -> Result<i64> {
    match experiment_id_by_name(conn, name)? {
        Some(id) => Ok(id),
        None => create_experiment(conn, name, &[], now),
    }
}

pub fn experiment_id_by_name(conn: &Connection, name: &str) -> Result<Option<i64>> {
    Ok(conn
        .prepare_cached("SELECT id FROM experiments WHERE name = ?1")?
        .query_row([name], |r| r.get(0))
        .optional()?)
}

/// The key-value pairs (tags, params) of one owner in `table`, by key.
pub fn pairs(
    conn: &Connection,
    table: &str,
    owner_column: &str,
    owner: &dyn rusqlite::ToSql,
) -> rusqlite::Result<Vec<Tag>> {
    conn.prepare_cached(&format!(
        "SELECT key, value FROM {table} WHERE {owner_column} = ?1 ORDER BY key"
    ))?
    .query_map([owner], |r| {
        Ok(Tag {
            key: r.get(0)?,
            value: r.get(1)?,
        })
    })?
    .collect()
}

/// Sets pairs of one owner in `table`, a value given again replacing the old.
pub fn upsert_pairs(
    conn: &Connection,
    table: &str,
    owner_column: &str,
    owner: &dyn rusqlite::ToSql,
    items: &[Tag],
) -> Result<()> {
    let mut stmt = conn.prepare_cached(&format!(
        "INSERT INTO {table} ({owner_column}, key, value) VALUES (?1, ?2, ?3)
         ON CONFLICT ({owner_column}, key) DO UPDATE SET value = excluded.value"
    ))?;
    for item in items {
        stmt.execute(params![owner, item.key, item.value])?;
    }
    Ok(())
}

pub fn set_experiment_tag(conn: &Connection, id: i64, tag: &Tag) -> Result<()> {
    upsert_pairs(
        conn,
        "experiment_tags",
        "experiment_id",
        &id,
        std::slice::from_ref(tag),
    )
}

pub fn set_experiment_lifecycle(conn: &Connection, id: i64, stage: &str, now: i64) -> Result<()> {
    let changed = conn.execute(
        "UPDATE experiments SET lifecycle = ?2, updated_ms = ?3 WHERE id = ?1",
        params![id, stage, now],
    )?;
    if changed == 0 {
        return Err(no_experiment(&id.to_string()));
    }
    Ok(())
}

pub fn rename_experiment(conn: &Connection, id: i64, name: &str, now: i64) -> Result<()> {
    if experiment_id_by_name(conn, name)?.is_some_and(|other| other != id) {
        return Err(Error::AlreadyExists(format!(
            "experiment `{name}` already exists"
        )));
    }
    let changed = conn.execute(
        "UPDATE experiments SET name = ?2, updated_ms = ?3 WHERE id = ?1",
        params![id, name, now],
    )?;
    if changed == 0 {
        return Err(no_experiment(&id.to_string()));
    }
    Ok(())
}

fn experiment_row(conn: &Connection, row: &rusqlite::Row<'_>) -> rusqlite::Result<Experiment> {
    let id: i64 = row.get(0)?;
    let tags = pairs(conn, "experiment_tags", "experiment_id", &id)?;
    Ok(Experiment {
        experiment_id: id.to_string(),
        name: row.get(1)?,
        artifact_location: experiment_artifact_location(id),
        lifecycle_stage: row.get(2)?,
        creation_time: row.get(3)?,
        last_update_time: row.get(4)?,
        tags,
    })
}

const EXPERIMENT_COLUMNS: &str = "id, name, lifecycle, created_ms, updated_ms";

pub fn experiment(conn: &Connection, id: i64) -> Result<Experiment> {
    conn.prepare_cached(&format!(
        "SELECT {EXPERIMENT_COLUMNS} FROM experiments WHERE id = ?1"
    ))?
    .query_row([id], |r| experiment_row(conn, r))
    .optional()?
    .ok_or_else(|| no_experiment(&id.to_string()))
}

pub fn experiment_by_name(conn: &Connection, name: &str) -> Result<Experiment> {
    let id = experiment_id_by_name(conn, name)?
        .ok_or_else(|| Error::NotFound(format!("no experiment named `{name}`")))?;
    experiment(conn, id)
}

/// Experiments in `stages`, newest first.
pub fn experiments(conn: &Connection, stages: &[&str]) -> Result<Vec<Experiment>> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {EXPERIMENT_COLUMNS} FROM experiments ORDER BY created_ms DESC, id DESC"
    ))?;
    let all = stmt
        .query_map([], |r| experiment_row(conn, r))?
        .collect::<rusqlite::Result<Vec<_>>>()?;
    Ok(all
        .into_iter()
        .filter(|e| stages.contains(&e.lifecycle_stage.as_str()))
        .collect())
}

/// A run about to be made.
#[derive(Clone, Debug)]
pub struct NewRun {
    pub run_id: String,
    pub experiment_id: i64,
    pub name: String,
    pub user_id: String,
    pub start_ms: i64,
    pub tags: Vec<Tag>,
    pub job_id: String,
}

pub fn create_run(conn: &Connection, run: &NewRun) -> Result<()> {
    let stage: String = conn
        .prepare_cached("SELECT lifecycle FROM experiments WHERE id = ?1")?
        .query_row([run.experiment_id], |r| r.get(0))
        .optional()?
        .ok_or_else(|| no_experiment(&run.experiment_id.to_string()))?;
    if stage != "active" {
        return Err(Error::FailedPrecondition(format!(
            "experiment {} is deleted: restore it before adding runs",
            run.experiment_id
        )));
    }
    conn.prepare_cached(
        "INSERT INTO runs (run_id, experiment_id, name, user_id, status, start_ms, job_id)
         VALUES (?1, ?2, ?3, ?4, 'RUNNING', ?5, ?6)",
    )?
    .execute(params![
        run.run_id,
        run.experiment_id,
        run.name,
        run.user_id,
        run.start_ms,
        run.job_id
    ])?;
    set_tags(conn, &run.run_id, &run.tags)?;
    Ok(())
}

pub fn run_exists(conn: &Connection, run_id: &str) -> Result<bool> {
    Ok(conn
        .prepare_cached("SELECT 1 FROM runs WHERE run_id = ?1")?
        .query_row([run_id], |_| Ok(()))
        .optional()?
        .is_some())
}

/// Jobs' runs not ended yet.
pub fn running_job_runs(conn: &Connection) -> Result<Vec<String>> {
    let mut stmt =
        conn.prepare("SELECT run_id FROM runs WHERE status = 'RUNNING' AND job_id != ''")?;
    let ids = stmt
        .query_map([], |row| row.get(0))?
        .collect::<rusqlite::Result<Vec<String>>>()?;
    Ok(ids)
}

/// Ends a run still `RUNNING`; one ended already keeps its status and end.
pub fn end_run_if_running(
    conn: &Connection,
    run_id: &str,
    status: &str,
    end_ms: i64,
) -> Result<()> {
    conn.prepare_cached(
        "UPDATE runs SET status = ?2, end_ms = ?3 WHERE run_id = ?1 AND status = 'RUNNING'",
    )?
    .execute(params![run_id, status, end_ms])?;
    Ok(())
}

/// Who may write a run: the job that made it ('' for people), and whether it is active.
pub fn run_owner(conn: &Connection, run_id: &str) -> Result<(String, bool)> {
    conn.prepare_cached("SELECT job_id, lifecycle FROM runs WHERE run_id = ?1")?
        .query_row([run_id], |r| {
            Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)? == "active"))
        })
        .optional()?
        .ok_or_else(|| no_run(run_id))
}

/// The experiment a run belongs to.
pub fn run_experiment(conn: &Connection, run_id: &str) -> Result<i64> {
    conn.prepare_cached("SELECT experiment_id FROM runs WHERE run_id = ?1")?
        .query_row([run_id], |r| r.get(0))
        .optional()?
        .ok_or_else(|| no_run(run_id))
}

pub fn update_run(
    conn: &Connection,
    run_id: &str,
    status: Option<&str>,
    end_ms: Option<i64>,
    name: Option<&str>,
) -> Result<()> {
    conn.prepare_cached(
        "UPDATE runs SET status = COALESCE(?2, status), end_ms = COALESCE(?3, end_ms),
         name = COALESCE(?4, name) WHERE run_id = ?1",
    )?
    .execute(params![run_id, status, end_ms, name])?;
    if let Some(name) = name {
        set_tags(
            conn,
            run_id,
            &[Tag {
                key: "mlflow.runName".into(),
                value: name.into(),
            }],
        )?;
    }
    Ok(())
}

pub fn set_run_lifecycle(conn: &Connection, run_id: &str, stage: &str) -> Result<()> {
    conn.execute(
        "UPDATE runs SET lifecycle = ?2 WHERE run_id = ?1",
        params![run_id, stage],
    )?;
    Ok(())
}

pub fn set_tags(conn: &Connection, run_id: &str, tags: &[Tag]) -> Result<()> {
    upsert_pairs(conn, "tags", "run_id", &run_id, tags)
}

pub fn delete_tag(conn: &Connection, run_id: &str, key: &str) -> Result<()> {
    let gone = conn.execute(
        "DELETE FROM tags WHERE run_id = ?1 AND key = ?2",
        params![run_id, key],
    )?;
    if gone == 0 {
        return Err(Error::NotFound(format!("run {run_id} has no tag `{key}`")));
    }
    Ok(())
}

/// A param, once logged, keeps its value (as MLflow's): the same value again is fine.
pub fn log_params(conn: &Connection, run_id: &str, params: &[Tag]) -> Result<()> {
    let mut existing =
        conn.prepare_cached("SELECT value FROM params WHERE run_id = ?1 AND key = ?2")?;
    let mut insert =
        conn.prepare_cached("INSERT INTO params (run_id, key, value) VALUES (?1, ?2, ?3)")?;
    for param in params {
        let old: Option<String> = existing
            .query_row(params![run_id, param.key], |r| r.get(0))
            .optional()?;
        match old {
            None => {
                insert.execute(params![run_id, param.key, param.value])?;
            }
            Some(old) if old == param.value => {}
            Some(old) => {
                return Err(Error::invalid(
                    "params",
                    format!(
                        "param `{}` of run {run_id} is `{old}` already; a param's value cannot change (log a metric, or a new param)",
                        param.key
                    ),
                ));
            }
        }
    }
    Ok(())
}

pub fn log_metrics(conn: &Connection, run_id: &str, metrics: &[Metric]) -> Result<()> {
    let mut insert = conn.prepare_cached(
        "INSERT OR IGNORE INTO metrics (run_id, key, step, timestamp, value) VALUES (?1, ?2, ?3, ?4, ?5)",
    )?;
    // The newest point of each key in this batch, then compared with the kept one.
    let mut newest: BTreeMap<&str, &Metric> = BTreeMap::new();
    for metric in metrics {
        insert.execute(params![
            run_id,
            metric.key,
            metric.step,
            metric.timestamp,
            value_of(metric.value)
        ])?;
        let slot = newest.entry(&metric.key).or_insert(metric);
        if later(metric, slot) {
            *slot = metric;
        }
    }
    let mut kept = conn.prepare_cached(
        "SELECT step, timestamp, value FROM latest_metrics WHERE run_id = ?1 AND key = ?2",
    )?;
    let mut upsert = conn.prepare_cached(
        "INSERT INTO latest_metrics (run_id, key, step, timestamp, value) VALUES (?1, ?2, ?3, ?4, ?5)
         ON CONFLICT (run_id, key) DO UPDATE SET step = excluded.step,
           timestamp = excluded.timestamp, value = excluded.value",
    )?;
    for (key, metric) in newest {
        let old = kept
            .query_row(params![run_id, key], |r| {
                Ok(Metric {
                    key: key.to_string(),
                    step: r.get(0)?,
                    timestamp: r.get(1)?,
                    value: read_value(r.get(2)?),
                })
            })
            .optional()?;
        if old.as_ref().is_none_or(|old| later(metric, old)) {
            upsert.execute(params![
                run_id,
                key,
                metric.step,
                metric.timestamp,
                value_of(metric.value)
            ])?;
        }
    }
    Ok(())
}

/// MLflow's order of "latest": step, then timestamp, then value (NaN first).
fn later(a: &Metric, b: &Metric) -> bool {
    (a.step, a.timestamp)
        .cmp(&(b.step, b.timestamp))
        .then_with(|| {
            a.value
                .partial_cmp(&b.value)
                .unwrap_or_else(|| b.value.is_nan().cmp(&a.value.is_nan()))
        })
        == std::cmp::Ordering::Greater
}

/// Every point of one metric of a run, in the order logged.
pub fn metric_history(conn: &Connection, run_id: &str, key: &str) -> Result<Vec<Metric>> {
    if !run_exists(conn, run_id)? {
        return Err(no_run(run_id));
    }
    let mut stmt = conn.prepare_cached(
        "SELECT step, timestamp, value FROM metrics WHERE run_id = ?1 AND key = ?2 ORDER BY rowid",
    )?;
    let points = stmt
        .query_map(params![run_id, key], |r| {
            Ok(Metric {
                key: key.to_string(),
                step: r.get(0)?,
                timestamp: r.get(1)?,
                value: read_value(r.get(2)?),
            })
        })?
        .collect::<rusqlite::Result<_>>()?;
    Ok(points)
}

/// One metric of a job, value by value in the order logged, from the newest of
/// its runs that logged it (a rerun attempt's run replaces the one before).
pub fn job_metric_values(conn: &Connection, job_id: &str, key: &str) -> Result<Vec<f64>> {
    let runs: Vec<String> = conn
        .prepare_cached("SELECT run_id FROM runs WHERE job_id = ?1 ORDER BY start_ms DESC, run_id")?
        .query_map([job_id], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    let mut points = conn.prepare_cached(
        "SELECT value FROM metrics WHERE run_id = ?1 AND key = ?2 ORDER BY rowid",
    )?;
    for run_id in runs {
        let values: Vec<f64> = points
            .query_map(params![run_id, key], |r| Ok(read_value(r.get(0)?)))?
            .collect::<rusqlite::Result<_>>()?;
        if !values.is_empty() {
            return Ok(values);
        }
    }
    Ok(Vec::new())
}

/// The names of a run's metrics.
pub fn metric_keys(conn: &Connection, run_id: &str) -> Result<Vec<String>> {
    let mut stmt =
        conn.prepare_cached("SELECT key FROM latest_metrics WHERE run_id = ?1 ORDER BY key")?;
    let keys = stmt
        .query_map([run_id], |r| r.get(0))?
        .collect::<rusqlite::Result<_>>()?;
    Ok(keys)
}

const RUN_COLUMNS: &str =
    "run_id, experiment_id, name, user_id, status, start_ms, end_ms, lifecycle";

fn run_row(conn: &Connection, r: &rusqlite::Row<'_>) -> Result<Run> {
    let run_id: String = r.get(0)?;
    let experiment_id: i64 = r.get(1)?;
    let params = pairs(conn, "params", "run_id", &run_id)?;
    let tags = pairs(conn, "tags", "run_id", &run_id)?;
    let metrics = conn
        .prepare_cached(
            "SELECT key, step, timestamp, value FROM latest_metrics WHERE run_id = ?1 ORDER BY key",
        )?
        .query_map([&run_id], |r| {
            Ok(Metric {
                key: r.get(0)?,
                step: r.get(1)?,
                timestamp: r.get(2)?,
                value: read_value(r.get(3)?),
            })
        })?
        .collect::<rusqlite::Result<_>>()?;
    let outputs = serde_json::json!({"model_outputs": super::models::run_outputs(conn, &run_id)?});
    Ok(Run {
        info: RunInfo {
            run_uuid: run_id.clone(),
            run_name: r.get(2)?,
            experiment_id: experiment_id.to_string(),
            user_id: r.get(3)?,
            status: r.get(4)?,
            start_time: r.get(5)?,
            end_time: r.get(6)?,
            artifact_uri: run_artifact_uri(experiment_id, &run_id),
            lifecycle_stage: r.get(7)?,
            run_id,
        },
        data: RunData {
            metrics,
            params,
            tags,
        },
        inputs: serde_json::json!({}),
        outputs,
    })
}

fn runs_where(conn: &Connection, clause: &str, arg: &dyn rusqlite::ToSql) -> Result<Vec<Run>> {
    let mut stmt = conn.prepare_cached(&format!(
        "SELECT {RUN_COLUMNS} FROM runs WHERE {clause} ORDER BY start_ms DESC, run_id"
    ))?;
    let mut rows = stmt.query([arg])?;
    let mut runs = Vec::new();
    while let Some(row) = rows.next()? {
        runs.push(run_row(conn, row)?);
    }
    Ok(runs)
}

pub fn run(conn: &Connection, run_id: &str) -> Result<Run> {
    runs_where(conn, "run_id = ?1", &run_id)?
        .pop()
        .ok_or_else(|| no_run(run_id))
}

/// The runs a job's token made (its attempts', and any it started itself).
pub fn runs_of_job(conn: &Connection, job_id: &str) -> Result<Vec<Run>> {
    runs_where(conn, "job_id = ?1", &job_id)
}

pub fn runs_of_experiment(conn: &Connection, experiment_id: i64) -> Result<Vec<Run>> {
    runs_where(conn, "experiment_id = ?1", &experiment_id)
}

/// Forgets the runs and logged models of deleted jobs, with their points; the
/// folders of their files (`<run id>`, `models/<model id>`) by experiment.
pub fn delete_job_runs(conn: &Connection, job_ids: &[String]) -> Result<Vec<(i64, String)>> {
    let mut gone = Vec::new();
    let mut find =
        conn.prepare_cached("SELECT experiment_id, run_id FROM runs WHERE job_id = ?1")?;
    for job in job_ids {
        let runs = find
            .query_map([job], |r| Ok((r.get::<_, i64>(0)?, r.get::<_, String>(1)?)))?
            .collect::<rusqlite::Result<Vec<_>>>()?;
        for (_, run_id) in &runs {
            for table in [
                "metrics",
                "latest_metrics",
                "params",
                "tags",
                "run_outputs",
                "runs",
            ] {
                conn.prepare_cached(&format!("DELETE FROM {table} WHERE run_id = ?1"))?
                    .execute([run_id])?;
            }
        }
        gone.extend(runs);
        for (experiment, model) in super::models::models_of_job(conn, job)? {
            for table in ["logged_model_params", "logged_model_tags", "logged_models"] {
                conn.prepare_cached(&format!("DELETE FROM {table} WHERE model_id = ?1"))?
                    .execute([&model])?;
            }
            gone.push((experiment, format!("models/{model}")));
        }
    }
    Ok(gone)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn db() -> (tempfile::TempDir, Connection) {
        let dir = tempfile::tempdir().expect("dir");
        let conn = open(&dir.path().join("tracking.db"), 1).expect("open");
        (dir, conn)
    }

    fn run_in(conn: &Connection, experiment_id: i64, run_id: &str, job: &str) {
        create_run(
            conn,
            &NewRun {
                run_id: run_id.into(),
                experiment_id,
                name: run_id.into(),
                user_id: String::new(),
                start_ms: 5,
                tags: vec![],
                job_id: job.into(),
            },
        )
        .expect("run");
    }

    fn point(key: &str, step: i64, timestamp: i64, value: f64) -> Metric {
        Metric {
            key: key.into(),
            value,
            timestamp,
            step,
        }
    }

    #[test]
    fn latest_is_the_highest_step_whatever_the_order_logged() {
        let (_dir, conn) = db();
        run_in(&conn, 0, "r1", "");
        log_metrics(
            &conn,
            "r1",
            &[point("loss", 2, 10, 0.5), point("loss", 0, 11, 0.9)],
        )
        .expect("log");
        log_metrics(&conn, "r1", &[point("loss", 1, 12, 0.7)]).expect("log");
        log_metrics(&conn, "r1", &[point("loss", 1, 12, 0.7)]).expect("the same point again");
        log_metrics(&conn, "r1", &[point("acc", 0, 1, f64::NAN)]).expect("log");
        let run = run(&conn, "r1").expect("run");
        let latest: BTreeMap<_, _> = run
            .data
            .metrics
            .iter()
            .map(|m| (m.key.as_str(), m.value))
            .collect();
        assert_eq!(latest["loss"], 0.5);
        assert!(latest["acc"].is_nan(), "NaN survives the store");
        let history: Vec<_> = metric_history(&conn, "r1", "loss")
            .expect("history")
            .iter()
            .map(|m| m.step)
            .collect();
        assert_eq!(history, vec![2, 0, 1], "in the order logged");
    }

    #[test]
    fn a_param_keeps_its_first_value() {
        let (_dir, conn) = db();
        run_in(&conn, 0, "r1", "");
        let p = |v: &str| Tag {
            key: "lr".into(),
            value: v.into(),
        };
        log_params(&conn, "r1", &[p("0.1")]).expect("first");
        log_params(&conn, "r1", &[p("0.1")]).expect("the same again");
        let err = log_params(&conn, "r1", &[p("0.2")]).expect_err("changed");
        assert!(err.to_string().contains("cannot change"), "{err}");
    }

    #[test]
    fn experiments_are_unique_by_name_and_default_exists() {
        let (_dir, conn) = db();
        assert_eq!(
            experiment_by_name(&conn, "Default")
                .expect("default")
                .experiment_id,
            "0"
        );
        let id = create_experiment(&conn, "mnist", &[], 2).expect("create");
        assert!(matches!(
            create_experiment(&conn, "mnist", &[], 3),
            Err(Error::AlreadyExists(_))
        ));
        assert_eq!(experiment_named(&conn, "mnist", 4).expect("named"), id);
        set_experiment_lifecycle(&conn, id, "deleted", 5).expect("delete");
        assert_eq!(experiments(&conn, &["active"]).expect("list").len(), 1);
        let err = create_run(
            &conn,
            &NewRun {
                run_id: "r".into(),
                experiment_id: id,
                name: "r".into(),
                user_id: String::new(),
                start_ms: 1,
                tags: vec![],
                job_id: String::new(),
            },
        )
        .expect_err("deleted experiment");
        assert!(err.to_string().contains("restore"), "{err}");
    }

    #[test]
    fn a_deleted_job_takes_its_runs_and_points() {
        let (_dir, conn) = db();
        run_in(&conn, 0, "job-1-1", "job-1");
        run_in(&conn, 0, "mine", "");
        log_metrics(&conn, "job-1-1", &[point("x", 0, 0, 1.0)]).expect("log");
        let gone = delete_job_runs(&conn, &["job-1".into()]).expect("delete");
        assert_eq!(gone, vec![(0, "job-1-1".to_string())]);
        assert!(!run_exists(&conn, "job-1-1").expect("exists"));
        assert!(run_exists(&conn, "mine").expect("exists"));
        let points: i64 = conn
            .query_row("SELECT COUNT(*) FROM metrics", [], |r| r.get(0))
            .expect("count");
        assert_eq!(points, 0);
    }
}
