//! Tracking: MLflow's tracking REST API, served by the coordinator, so a job's
//! `mlflow.log_metric` lands on the job (`shoal job metrics`). Its own owner of its
//! own state: its tables (`tracking.db` in the data dir, or the shared PostgreSQL
//! database with `--store postgres://…`) and `tracking/` (artifacts) in the data
//! dir, written by one writer thread that commits whatever is waiting as one
//! transaction (durable before the reply), read on read-only connections. Nothing
//! here goes through the control loop, so logging never slows it.
//!
//! Who may write what is decided here, in `Tracking::may_write`: a person's token
//! by its role (the guard), a job's token (`JobCaller`, from the agent's proxy)
//! only the runs its job made, its attempts' runs first of all.

pub mod model;
pub mod models;
pub mod rest;
pub mod search;
pub mod store;

use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use tracing::warn;

use crate::db::{Database, Sql};
use crate::leader::Lease;
use crate::model::Attempt;
use crate::{Error, Result};
use model::{Metric, Run, Tag};

/// A job's instance calling through its node's agent: who it is, and its run.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct JobCaller {
    pub job_id: String,
    pub attempt_id: String,
    pub instance: u32,
    pub node: String,
    pub cluster: String,
    /// The job's experiment (`experiment_name`, or its code folder's name).
    pub experiment: String,
    /// The job's name, as the run's name.
    pub run_name: String,
}

impl JobCaller {
    /// The run of this attempt (`MLFLOW_RUN_ID`).
    pub fn run_id(&self) -> String {
        model::run_id_of_attempt(&self.attempt_id)
    }
}

/// Whoever asks: a person's token (the guard checked its role), or a job's.
#[derive(Clone, Debug)]
pub enum Caller {
    Person,
    Job(Box<JobCaller>),
}

impl Caller {
    fn job_id(&self) -> Option<&str> {
        match self {
            Caller::Person => None,
            Caller::Job(job) => Some(&job.job_id),
        }
    }
}

/// What a job logged, as `shoal job metrics` and `GET /api/v1/jobs/ID/metrics` show it.
#[derive(Clone, Debug, serde::Serialize)]
pub struct JobMetrics {
    pub job_id: String,
    pub runs: Vec<TrackedRun>,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct TrackedRun {
    pub run_id: String,
    pub run_name: String,
    /// The attempt whose run it is (empty: a run the job started itself).
    pub attempt_id: String,
    pub experiment_id: String,
    pub status: String,
    pub start_ms: i64,
    pub end_ms: Option<i64>,
    pub params: std::collections::BTreeMap<String, String>,
    pub tags: std::collections::BTreeMap<String, String>,
    pub metrics: Vec<MetricSeries>,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct MetricSeries {
    pub name: String,
    pub latest: Metric,
    /// Every point, in the order logged (empty when only the latest was asked).
    pub points: Vec<Metric>,
}

type Reply = Box<dyn FnOnce(Option<String>) + Send>;
/// A write: run on the transaction (None: the transaction is lost before its
/// turn, and it only makes its reply); whether it went well, and its reply.
type Op = Box<dyn FnOnce(Option<&mut Sql>) -> (bool, Reply) + Send>;

/// Largest number of waiting writes one transaction takes.
const MAX_BATCH: usize = 512;

#[derive(Clone)]
pub struct Tracking {
    inner: Arc<Inner>,
}

struct Inner {
    writes: std::sync::mpsc::Sender<Op>,
    reader: crate::store::Reader,
    artifacts: PathBuf,
    /// Jobs' calls already let in, by node and slot, with the token they showed:
    /// a slot's node and token never change, so the next call skips the loop.
    grants: Mutex<std::collections::HashMap<GrantKey, (String, JobCaller)>>,
    /// Jobs' runs still `RUNNING` (read at open, added as they are made): an
    /// attempt's end looks here first, so the many attempts that never log cost
    /// no write.
    running: Mutex<std::collections::HashSet<String>>,
}

/// A job's calls by node, attempt and instance.
type GrantKey = (String, String, u32);

/// Grants remembered at most (then forgotten all at once, and asked again).
const MAX_GRANTS: usize = 100_000;

impl std::fmt::Debug for Tracking {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Tracking { .. }")
    }
}

/// A lock whose holder panicked is still good: each change to these sets and maps is one call.
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(|p| p.into_inner())
}

fn now_ms() -> i64 {
    crate::model::now_ms() as i64
}

impl Tracking {
    /// Opens the tables (`tracking.db` in `data_dir`, or those in the
    /// PostgreSQL database at `postgres`, written only while its lease holds)
    /// and `tracking/` in `data_dir`, and starts the writer.
    pub fn open(data_dir: &Path, postgres: Option<(&str, &Lease)>) -> Result<Self> {
        let (mut db, lease) = match postgres {
            None => (store::open(&data_dir.join("tracking.db"), now_ms())?, None),
            Some((url, lease)) => (store::connect_postgres(url, now_ms())?, Some(lease.clone())),
        };
        let running = db.transaction(store::running_job_runs)?;
        let running = Mutex::new(running.into_iter().collect());
        let reader = crate::store::Reader::of(&db)?;
        let artifacts = data_dir.join("tracking");
        std::fs::create_dir_all(&artifacts)
            .map_err(|e| Error::Internal(format!("cannot create {}: {e}", artifacts.display())))?;
        let (writes, queue) = std::sync::mpsc::channel::<Op>();
        let inner = Arc::new(Inner {
            writes,
            reader,
            artifacts,
            grants: Mutex::default(),
            running,
        });
        std::thread::Builder::new()
            .name("shoal-tracking".into())
            .spawn(move || write_loop(db, lease, queue))
            .map_err(|e| Error::Internal(format!("tracking writer: {e}")))?;
        Ok(Tracking { inner })
    }

    /// A job's call let in before, from the same node, for the same slot, with
    /// the same token.
    pub fn granted(
        &self,
        node: &str,
        attempt_id: &str,
        instance: u32,
        token: &str,
    ) -> Option<JobCaller> {
        let grants = lock(&self.inner.grants);
        let (known, caller) = grants.get(&(node.to_string(), attempt_id.to_string(), instance))?;
        let same: bool = subtle::ConstantTimeEq::ct_eq(known.as_bytes(), token.as_bytes()).into();
        same.then(|| caller.clone())
    }

    pub fn remember_grant(&self, token: &str, caller: &JobCaller) {
        let mut grants = lock(&self.inner.grants);
        if grants.len() >= MAX_GRANTS {
            grants.clear();
        }
        grants.insert(
            (
                caller.node.clone(),
                caller.attempt_id.clone(),
                caller.instance,
            ),
            (token.to_string(), caller.clone()),
        );
    }

    /// Runs `f` in the writer's next transaction (in a savepoint of its own: an
    /// error undoes only its own changes); answers once that is committed.
    pub async fn write<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Sql) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let op: Op = Box::new(move |sql| {
            let result = match sql {
                Some(sql) => f(sql),
                None => Err(Error::Internal("the tracking transaction was lost".into())),
            };
            let ok = result.is_ok();
            let reply: Reply = Box::new(move |failed| {
                let _ = tx.send(match failed {
                    Some(why) => Err(Error::Internal(format!("tracking commit: {why}"))),
                    None => result,
                });
            });
            (ok, reply)
        });
        self.inner
            .writes
            .send(op)
            .map_err(|_| Error::Internal("the tracking writer has stopped".into()))?;
        rx.await
            .map_err(|_| Error::Internal("the tracking writer has stopped".into()))?
    }

    /// Runs `f` on a read-only connection, off the async runtime.
    pub async fn read<T: Send + 'static>(
        &self,
        f: impl FnOnce(&mut Sql) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        self.inner.reader.with_sql(f).await
    }

    /// The one check of every write: a job's token writes only the runs its job
    /// made; a run that is deleted takes no more writes.
    fn may_write(sql: &mut Sql, caller: &Caller, run_id: &str) -> Result<()> {
        let (owner, active) = store::run_owner(sql, run_id)?;
        if let Some(job) = caller.job_id()
            && owner != job
        {
            let whose = if owner.is_empty() {
                "a person's run".to_string()
            } else {
                format!("job {owner}'s run")
            };
            return Err(Error::PermissionDenied(format!(
                "run {run_id} is {whose}; a job's token writes only its own job's runs"
            )));
        }
        if !active {
            return Err(Error::FailedPrecondition(format!(
                "run {run_id} is deleted: restore it before writing to it"
            )));
        }
        Ok(())
    }

    /// A job's own run (its attempt's), made the first time the job asks, in the
    /// job's experiment, tagged with the job, attempt, cluster and each instance's node.
    /// Called once per grant (`Agent.Track` remembers it), so not per call.
    pub async fn ensure_job_run(&self, job: &JobCaller) -> Result<()> {
        let job_owned = job.clone();
        let inner = self.inner.clone();
        self.write(move |sql| {
            let job = job_owned;
            let run_id = job.run_id();
            let now = now_ms();
            if !store::run_exists(sql, &run_id)? {
                let name = if job.experiment.is_empty() {
                    "Default"
                } else {
                    &job.experiment
                };
                let experiment_id = store::experiment_named(sql, name, now)?;
                let tag = |k: &str, v: &str| Tag {
                    key: k.into(),
                    value: v.into(),
                };
                store::create_run(
                    sql,
                    &store::NewRun {
                        run_id: run_id.clone(),
                        experiment_id,
                        name: job.run_name.clone(),
                        user_id: String::new(),
                        start_ms: now,
                        tags: vec![
                            tag("mlflow.runName", &job.run_name),
                            tag("shoal.job_id", &job.job_id),
                            tag("shoal.attempt_id", &job.attempt_id),
                            tag("shoal.cluster", &job.cluster),
                        ],
                        job_id: job.job_id.clone(),
                    },
                )?;
            }
            lock(&inner.running).insert(run_id.clone());
            store::set_tags(
                sql,
                &run_id,
                &[Tag {
                    key: format!("shoal.instance.{}.node", job.instance),
                    value: job.node.clone(),
                }],
            )
        })
        .await
    }

    /// Ends the runs of attempts that ended, as their attempts did, where the job
    /// left them `RUNNING` (a job stopped, canceled or lost never ends its own;
    /// one that ended its run keeps the status it set).
    /// Called after each commit with the attempts of the jobs it wrote; costs no
    /// write unless one of them ended with its run still open.
    pub fn end_attempt_runs<'a>(&self, attempts: impl IntoIterator<Item = &'a Attempt>) {
        let open: Vec<(String, &'static str, i64)> = {
            let mut running = lock(&self.inner.running);
            if running.is_empty() {
                return;
            }
            attempts
                .into_iter()
                .filter(|attempt| attempt.ended_at != 0)
                .filter_map(|attempt| {
                    let run_id = model::run_id_of_attempt(&attempt.id);
                    running.remove(&run_id).then(|| {
                        let status = model::run_status_of_attempt(attempt.status());
                        (run_id, status, attempt.ended_at)
                    })
                })
                .collect()
        };
        if open.is_empty() {
            return;
        }
        let tracking = self.clone();
        tokio::spawn(async move {
            let ended = tracking
                .write(move |sql| {
                    for (run_id, status, at) in &open {
                        store::end_run_if_running(sql, run_id, status, *at)?;
                    }
                    Ok(())
                })
                .await;
            if let Err(e) = ended {
                warn!(error = %e, "could not end the runs of ended attempts");
            }
        });
    }

    /// Metrics, params and tags of one run, in one transaction (log-metric,
    /// log-parameter, set-tag and log-batch all come here).
    pub async fn log(
        &self,
        caller: &Caller,
        run_id: String,
        metrics: Vec<Metric>,
        params: Vec<Tag>,
        tags: Vec<Tag>,
    ) -> Result<()> {
        let caller = caller.clone();
        self.write(move |sql| {
            Self::may_write(sql, &caller, &run_id)?;
            store::log_params(sql, &run_id, &params)?;
            store::log_metrics(sql, &run_id, &metrics)?;
            store::set_tags(sql, &run_id, &tags)
        })
        .await
    }

    /// Any other write to one run (update, delete, restore, delete-tag).
    pub async fn write_run<T: Send + 'static>(
        &self,
        caller: &Caller,
        run_id: String,
        deleted_ok: bool,
        f: impl FnOnce(&mut Sql, &str) -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let caller = caller.clone();
        self.write(move |sql| {
            match Self::may_write(sql, &caller, &run_id) {
                Err(Error::FailedPrecondition(_)) if deleted_ok => {}
                other => other?,
            }
            f(sql, &run_id)
        })
        .await
    }

    /// One metric of each of these jobs, value by value as logged (a sweep's
    /// trials' primary metric); a job that logged none has none.
    pub async fn metric_values(&self, job_ids: Vec<String>, key: &str) -> Result<Vec<Vec<f64>>> {
        let key = key.to_string();
        self.read(move |sql| {
            job_ids
                .iter()
                .map(|job| store::job_metric_values(sql, job, &key))
                .collect()
        })
        .await
    }

    /// The runs of one job (its attempts' and any it made), newest first.
    pub async fn job_runs(&self, job_id: &str) -> Result<Vec<Run>> {
        let job_id = job_id.to_string();
        self.read(move |sql| store::runs_of_job(sql, &job_id)).await
    }

    /// What the job logged: its runs, oldest first, each with its params, tags
    /// and metrics (only those in `names`, unless empty), with every point unless
    /// `latest_only`.
    pub async fn job_metrics(
        &self,
        job_id: &str,
        names: Vec<String>,
        latest_only: bool,
    ) -> Result<JobMetrics> {
        let job = job_id.to_string();
        let runs = self
            .read(move |sql| {
                let mut runs = store::runs_of_job(sql, &job)?;
                runs.reverse();
                let mut tracked = Vec::with_capacity(runs.len());
                for run in runs {
                    let mut metrics = Vec::new();
                    for latest in run.data.metrics {
                        if !names.is_empty() && !names.contains(&latest.key) {
                            continue;
                        }
                        let points = if latest_only {
                            Vec::new()
                        } else {
                            store::metric_history(sql, &run.info.run_id, &latest.key)?
                        };
                        metrics.push(MetricSeries {
                            name: latest.key.clone(),
                            latest,
                            points,
                        });
                    }
                    let pairs =
                        |list: Vec<Tag>| list.into_iter().map(|t| (t.key, t.value)).collect();
                    let tags: std::collections::BTreeMap<String, String> = pairs(run.data.tags);
                    tracked.push(TrackedRun {
                        attempt_id: tags.get("shoal.attempt_id").cloned().unwrap_or_default(),
                        run_id: run.info.run_id,
                        run_name: run.info.run_name,
                        experiment_id: run.info.experiment_id,
                        status: run.info.status,
                        start_ms: run.info.start_time,
                        end_ms: run.info.end_time,
                        params: pairs(run.data.params),
                        tags,
                        metrics,
                    });
                }
                Ok(tracked)
            })
            .await?;
        Ok(JobMetrics {
            job_id: job_id.to_string(),
            runs,
        })
    }

    /// Every artifact file the job's runs and logged models have: (run or model
    /// id, path under its artifacts, bytes).
    pub async fn job_artifacts(&self, job_id: &str) -> Result<Vec<(String, String, Vec<u8>)>> {
        let root = self.inner.artifacts.clone();
        let job = job_id.to_string();
        // Each run's artifacts, and each logged model's files, by the run's or
        // model's id.
        let folders = self
            .read(move |sql| {
                let mut folders: Vec<(String, PathBuf)> = store::runs_of_job(sql, &job)?
                    .into_iter()
                    .map(|run| {
                        let dir = PathBuf::from(&run.info.experiment_id).join(&run.info.run_id);
                        (run.info.run_id, dir)
                    })
                    .collect();
                for (experiment, model) in models::models_of_job(sql, &job)? {
                    let dir = PathBuf::from(experiment.to_string())
                        .join("models")
                        .join(&model);
                    folders.push((model, dir));
                }
                Ok(folders)
            })
            .await?;
        tokio::task::spawn_blocking(move || {
            let mut found = Vec::new();
            for (id, folder) in folders {
                let base = root.join(folder).join("artifacts");
                let mut stack = vec![base.clone()];
                while let Some(dir) = stack.pop() {
                    let entries = match std::fs::read_dir(&dir) {
                        Ok(entries) => entries,
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                        Err(e) => return Err(Error::Internal(format!("{}: {e}", dir.display()))),
                    };
                    for entry in entries.flatten() {
                        let path = entry.path();
                        if entry.file_type().is_ok_and(|t| t.is_dir()) {
                            stack.push(path);
                        } else if !entry.file_name().to_string_lossy().starts_with(".upload-") {
                            let data = std::fs::read(&path)
                                .map_err(|e| Error::Internal(format!("{}: {e}", path.display())))?;
                            let relative = path
                                .strip_prefix(&base)
                                .unwrap_or(&path)
                                .to_string_lossy()
                                .into_owned();
                            found.push((id.clone(), relative, data));
                        }
                    }
                }
            }
            found.sort_by(|a, b| (&a.0, &a.1).cmp(&(&b.0, &b.1)));
            Ok(found)
        })
        .await
        .map_err(|e| Error::Internal(e.to_string()))?
    }

    /// Forgets deleted jobs' runs, points and artifacts.
    pub async fn forget_jobs(&self, job_ids: Vec<String>) {
        let root = self.inner.artifacts.clone();
        match self
            .write(move |sql| store::delete_job_runs(sql, &job_ids))
            .await
        {
            Ok(gone) => {
                // Off the async workers: a run's files may be many.
                let _ = tokio::task::spawn_blocking(move || {
                    for (experiment, folder) in gone {
                        let dir = root.join(experiment.to_string()).join(&folder);
                        if let Err(e) = std::fs::remove_dir_all(&dir)
                            && e.kind() != std::io::ErrorKind::NotFound
                        {
                            warn!(dir = %dir.display(), error = %e, "cannot remove a deleted run's artifacts");
                        }
                    }
                })
                .await;
            }
            Err(e) => warn!(error = %e, "cannot forget deleted jobs' runs"),
        }
    }

    /// Where an artifact path (`<experiment>/<run>/artifacts/...`) is on disk; the
    /// run it belongs to. Refuses paths that climb out.
    pub fn artifact_path(&self, path: &str) -> Result<(PathBuf, Option<String>)> {
        let mut parts = Vec::new();
        for part in path.split('/') {
            match part {
                "" | "." => {}
                ".." => {
                    return Err(Error::invalid(
                        "path",
                        format!("`{path}` climbs out of the artifact store"),
                    ));
                }
                p if p.contains('\\') || p.contains('\0') => {
                    return Err(Error::invalid("path", format!("`{path}` is not a path")));
                }
                p => parts.push(p),
            }
        }
        let run = (parts.len() >= 2).then(|| parts[1].to_string());
        let mut full = self.inner.artifacts.clone();
        full.extend(&parts);
        Ok((full, run))
    }
}

/// Commits whatever writes are waiting as one transaction, each in a savepoint
/// of its own (one that fails undoes only its own changes); replies once the
/// transaction is committed, or says it failed. With a lease, only while it holds.
fn write_loop(mut db: Database, lease: Option<Lease>, queue: std::sync::mpsc::Receiver<Op>) {
    while let Ok(first) = queue.recv() {
        let mut ops = std::collections::VecDeque::from([first]);
        while ops.len() < MAX_BATCH {
            match queue.try_recv() {
                Ok(op) => ops.push_back(op),
                Err(_) => break,
            }
        }
        let mut replies = Vec::with_capacity(ops.len());
        let failed = db
            .transaction(|sql| {
                // A coordinator that no longer leads writes nothing.
                if let Some(lease) = &lease {
                    lease.holds(sql)?;
                }
                while let Some(op) = ops.pop_front() {
                    sql.batch("SAVEPOINT op")?;
                    let (ok, reply) = op(Some(&mut *sql));
                    replies.push(reply);
                    sql.batch(if ok {
                        "RELEASE SAVEPOINT op"
                    } else {
                        "ROLLBACK TO SAVEPOINT op; RELEASE SAVEPOINT op"
                    })?;
                }
                Ok(())
            })
            .err()
            .map(|e| e.to_string());
        // Those the lost transaction never reached only make their replies.
        replies.extend(ops.into_iter().map(|op| op(None).1));
        if let Some(why) = &failed {
            warn!(error = %why, "tracking commit failed");
        }
        for reply in replies {
            reply(failed.clone());
        }
    }
}
