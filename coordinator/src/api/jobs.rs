//! Jobs as people read them: live and recent ones from the control loop, older
//! ones (and logs and result rows) from the store's reader, never through the
//! loop; pages of the job list; deletion. Shared by gRPC and HTTP.

use shoal_proto::v1 as pb;
use tokio::sync::{broadcast, mpsc};
use tonic::Status;

use super::Api;
use super::convert;
use super::grpc::wait_for;
use crate::control::Change;
use crate::model::{Job, JobStatus};
use crate::{Error, Result};

/// Log chunks read from the store per query.
const LOG_PAGE: usize = 10_000;
/// Jobs a page holds unless asked for fewer, and at most.
pub const DEFAULT_PAGE: usize = 100;
pub const MAX_PAGE: usize = 10_000;

fn not_found(id: &str) -> Error {
    Error::NotFound(format!(
        "job `{id}` not found; `shoal job list` shows the jobs"
    ))
}

/// `job-12` -> 12.
fn seq_of(id: &str) -> Option<u64> {
    id.strip_prefix("job-")?.parse().ok()
}

impl Api {
    /// The job: from the control loop while it is live or recent, else as stored.
    pub async fn job(&self, id: &str) -> Result<Job> {
        match self.control.get_job(id.to_string()).await {
            Err(Error::NotFound(_)) => self.reader.job(id).await?.ok_or_else(|| not_found(id)),
            other => other,
        }
    }

    /// A job as the wire has it; a running sweep's live trials carry their
    /// primary metric's latest value, read from tracking.
    pub async fn job_wire(&self, job: &Job) -> Result<pb::Job> {
        let mut wire = convert::job(job);
        if let (Some(state), Some(progress), Some(tracking)) =
            (job.sweep.as_deref(), wire.sweep.as_mut(), &self.tracking)
        {
            let live: Vec<usize> = (0..state.trials.len())
                .filter(|i| !state.trials[*i].settled)
                .collect();
            let ids = live
                .iter()
                .map(|i| crate::control::job_id(state.trials[*i].seq))
                .collect();
            let values = tracking
                .metric_values(ids, &state.spec.objective.primary_metric)
                .await?;
            for (i, series) in live.into_iter().zip(values) {
                progress.trials[i].score = series.last().copied();
            }
        }
        // A pipeline's live steps: their jobs' own status (queued, running...).
        if let Some(progress) = wire.pipeline.as_mut() {
            for step in &mut progress.steps {
                if step.status == "running"
                    && let Ok(job) = self.job(&step.job_id).await
                {
                    step.status = job.status.as_str().to_string();
                }
            }
        }
        Ok(wire)
    }

    /// A page of jobs, newest first, after the job `after` (the last of the page
    /// before); and the job to continue after when there may be more.
    pub async fn list_jobs(
        &self,
        cluster: Option<String>,
        parent: Option<&str>,
        limit: usize,
        after: Option<&str>,
    ) -> Result<(Vec<Job>, Option<String>)> {
        // A sweep's trials or an array's tasks.
        let parent = match parent {
            None => None,
            Some(id) => Some(seq_of(id).ok_or_else(|| {
                Error::invalid("parent", format!("`{id}` is not a job id (job-N)"))
            })?),
        };
        let limit = match limit {
            0 => DEFAULT_PAGE,
            n => n.min(MAX_PAGE),
        };
        let before = match after.filter(|a| !a.is_empty()) {
            None => None,
            Some(id) => Some(seq_of(id).ok_or_else(|| {
                Error::invalid("after", format!("`{id}` is not a job id (job-N)"))
            })?),
        };
        let mut page = self.reader.jobs(cluster, parent, before, limit).await?;
        // Live jobs as the loop has them now (progress included).
        let live: Vec<String> = page
            .iter()
            .filter(|j| !j.is_settled() || j.spec.parallel.is_some())
            .map(|j| j.id.to_string())
            .collect();
        if !live.is_empty() {
            for fresh in self.control.live_jobs(live).await? {
                if let Some(slot) = page.iter_mut().find(|j| j.id == fresh.id) {
                    *slot = fresh;
                }
            }
        }
        let next = (page.len() == limit)
            .then(|| page.last().map(|j| j.id.to_string()))
            .flatten();
        Ok((page, next))
    }

    /// What the job logged with MLflow (nothing where tracking is not served).
    pub async fn job_metrics(
        &self,
        id: &str,
        names: Vec<String>,
        latest_only: bool,
    ) -> Result<crate::tracking::JobMetrics> {
        let job = self.job(id).await?;
        match &self.tracking {
            Some(tracking) => tracking.job_metrics(&job.id, names, latest_only).await,
            None => Ok(crate::tracking::JobMetrics {
                job_id: job.id.to_string(),
                runs: Vec::new(),
            }),
        }
    }

    /// Deletes an ended job with its logs, rows and files; the job as it was.
    pub async fn delete_job(&self, id: &str) -> Result<Job> {
        let job = self.job(id).await?;
        if !job.is_settled() {
            return Err(Error::FailedPrecondition(format!(
                "job `{id}` is {}; cancel it first (`shoal job cancel --wait {id}`)",
                job.status.as_str()
            )));
        }
        self.control.delete_job(id.to_string()).await?;
        Ok(job)
    }

    /// Keeps what an instance wrote to a named output, and writes it to the
    /// output's datastore, when it has one.
    pub async fn keep_named(
        &self,
        job_id: &str,
        attempt_id: &str,
        instance: u32,
        name: &str,
        data: Vec<u8>,
    ) -> Result<()> {
        let job = self.job(job_id).await?;
        let output = job
            .spec
            .extras
            .outputs
            .get(name)
            .cloned()
            .ok_or_else(|| Error::NotFound(format!("job {job_id} has no output `{name}`")))?;
        self.artifacts
            .put_named(attempt_id, instance, name, data.clone())
            .await?;
        if let Some(destination) = output.destination {
            let file = output.kind.is_file();
            let written = tokio::task::spawn_blocking(move || -> Result<()> {
                let dest = std::path::PathBuf::from(&destination);
                if !file {
                    return crate::artifacts::unpack_into(&data, &dest);
                }
                // A file output: the one file of the archive, at the destination.
                let scratch = tempfile::tempdir()
                    .map_err(|e| Error::Internal(format!("unpacking an output: {e}")))?;
                crate::artifacts::unpack_into(&data, scratch.path())?;
                let only = std::fs::read_dir(scratch.path())
                    .ok()
                    .and_then(|mut d| d.next())
                    .and_then(|e| e.ok())
                    .ok_or_else(|| {
                        Error::invalid("outputs", format!("output `{destination}` is empty"))
                    })?;
                if let Some(parent) = dest.parent() {
                    std::fs::create_dir_all(parent)
                        .map_err(|e| Error::Internal(format!("{}: {e}", parent.display())))?;
                }
                std::fs::copy(only.path(), &dest)
                    .map_err(|e| Error::Internal(format!("{}: {e}", dest.display())))?;
                Ok(())
            })
            .await
            .map_err(|e| Error::Internal(format!("writing output {name}: {e}")))?;
            written?;
        }
        Ok(())
    }

    /// Why the job is where it is (an ended job no longer held: how it ended).
    pub async fn explain(&self, id: &str) -> Result<Vec<String>> {
        match self.control.explain(id.to_string()).await {
            Err(Error::NotFound(_)) => {
                let job = self.reader.job(id).await?.ok_or_else(|| not_found(id))?;
                let mut lines = vec![format!("{} is {}", job.id, job.status.as_str())];
                if !job.reason.is_none() {
                    lines.push(format!("reason: {}", job.reason));
                }
                lines.push(format!("attempts: {}", job.attempts.len()));
                Ok(lines)
            }
            other => other,
        }
    }

    pub async fn outputs(&self, job_id: String) -> Result<pb::OutputsList, Status> {
        let mut job = self.job(&job_id).await?;
        // A sweep's outputs are its best trial's.
        if let Some(best) = job
            .sweep
            .as_deref()
            .and_then(|s| s.best.and_then(|b| s.trials.get(b as usize)))
        {
            job = self.job(&crate::control::job_id(best.seq)).await?;
        }
        // A pipeline's outputs are the step outputs bound to them.
        if let Some(state) = job.pipeline.as_deref() {
            let mut named = Vec::new();
            for (name, bound) in &state.outputs {
                let Some(seq) = state.index_of(&bound.step).and_then(|i| state.steps[i].seq) else {
                    continue;
                };
                let step = self.job(&crate::control::job_id(seq)).await?;
                named.extend(
                    self.named_outputs(&step)
                        .await?
                        .into_iter()
                        .filter(|o| o.name == bound.output)
                        .map(|o| pb::NamedOutput {
                            name: name.clone(),
                            ..o
                        }),
                );
            }
            return Ok(pb::OutputsList {
                named,
                ..Default::default()
            });
        }
        let mut list = pb::OutputsList {
            outputs: Vec::new(),
            files: self.output_files(&job).await?,
            named: self.named_outputs(&job).await?,
            logged: match &self.tracking {
                None => Vec::new(),
                Some(tracking) => tracking
                    .job_artifacts(&job.id)
                    .await?
                    .into_iter()
                    .map(|(run_id, path, data)| pb::LoggedArtifact { run_id, path, data })
                    .collect(),
            },
        };
        for attempt in job.attempts.iter().rev() {
            let found = self
                .artifacts
                .outputs(&attempt.id, attempt.instances.len() as u32)
                .await?;
            if !found.is_empty() {
                list.outputs = found
                    .into_iter()
                    .map(|(instance, data)| pb::InstanceOutputs {
                        attempt_id: attempt.id.clone(),
                        instance,
                        data,
                    })
                    .collect();
                break;
            }
        }
        Ok(list)
    }

    /// Each named output, from the latest attempt that wrote it.
    async fn named_outputs(&self, job: &Job) -> Result<Vec<pb::NamedOutput>, Status> {
        let mut named = Vec::new();
        let rows = self.rows_output(job).await?;
        for name in job.spec.extras.outputs.keys() {
            // run_function's rows are their output (what the instances wrote there aside).
            if let Some((output, data)) = &rows
                && output == name
            {
                named.push(pb::NamedOutput {
                    name: name.clone(),
                    instance: 0,
                    data: data.clone(),
                });
                continue;
            }
            for attempt in job.attempts.iter().rev() {
                let found = self
                    .artifacts
                    .named(&attempt.id, attempt.instances.len() as u32, name)
                    .await?;
                if !found.is_empty() {
                    named.extend(found.into_iter().map(|(instance, data)| pb::NamedOutput {
                        name: name.clone(),
                        instance,
                        data,
                    }));
                    break;
                }
            }
        }
        Ok(named)
    }

    /// The job's own output files: a parallel job's rows.
    async fn output_files(&self, job: &Job) -> Result<Vec<pb::OutputFile>, Status> {
        // run_function's rows in a named output are that output's (`named_outputs`).
        let Some(name) = job
            .spec
            .parallel
            .as_ref()
            .filter(|p| p.rows_output.is_none())
            .and_then(|p| p.append_row_to.clone())
        else {
            return Ok(Vec::new());
        };
        let data = self.reader.rows(&job.id).await?;
        Ok(vec![pb::OutputFile { name, data }])
    }

    /// Every chunk of the job's log, then (with `follow`) new chunks until the job
    /// is settled. Subscribes before reading, so nothing falls between the two.
    pub fn log_stream(
        &self,
        request: pb::LogsRequest,
    ) -> mpsc::Receiver<Result<pb::LogChunk, Status>> {
        let (tx, rx) = mpsc::channel(256);
        let mut live = self.control.subscribe_logs();
        let mut changes = self.control.subscribe_changes();
        let follower = LogFollower {
            api: self.clone(),
            tx,
            job_id: request.job_id.clone(),
            instance: request.instance,
        };
        tokio::spawn(async move {
            let mut last_seq = match follower.send_stored(0).await {
                Ok(seq) => seq,
                Err(e) => {
                    let _ = follower.tx.send(Err(e.into())).await;
                    return;
                }
            };
            if !request.follow || follower.settled().await {
                let _ = follower.send_stored(last_seq).await;
                return;
            }
            loop {
                tokio::select! {
                    log = live.recv() => match log {
                        Ok(log) => {
                            if log.job_id == follower.job_id && log.seq > last_seq && follower.wants(log.instance) {
                                last_seq = log.seq;
                                if follower.tx.send(Ok(chunk(&log))).await.is_err() {
                                    return;
                                }
                            }
                        }
                        // Fell behind the broadcast: catch up from the store.
                        Err(broadcast::error::RecvError::Lagged(_)) => match follower.send_stored(last_seq).await {
                            Ok(seq) => last_seq = seq,
                            Err(_) => return,
                        },
                        Err(broadcast::error::RecvError::Closed) => return,
                    },
                    change = changes.recv() => {
                        let ours = match change {
                            Ok(Change::Job(id)) => id == follower.job_id,
                            Ok(_) => false,
                            Err(broadcast::error::RecvError::Lagged(_)) => true,
                            Err(broadcast::error::RecvError::Closed) => return,
                        };
                        if ours && follower.settled().await {
                            let _ = follower.send_stored(last_seq).await;
                            return;
                        }
                    }
                }
            }
        });
        rx
    }

    /// The job now, then each time it changes, until it is settled.
    pub fn job_watch(&self, job_id: String) -> mpsc::Receiver<Result<pb::Job, Status>> {
        let (tx, rx) = mpsc::channel(16);
        let api = self.clone();
        let mut changes = api.control.subscribe_changes();
        tokio::spawn(async move {
            loop {
                let job = match api.job(&job_id).await {
                    Ok(job) => job,
                    Err(e) => {
                        let _ = tx.send(Err(e.into())).await;
                        return;
                    }
                };
                let settled = job.is_settled();
                let wire = match api.job_wire(&job).await {
                    Ok(wire) => wire,
                    Err(_) => convert::job(&job),
                };
                if tx.send(Ok(wire)).await.is_err() || settled {
                    return;
                }
                // A queued job's reason is its cluster's: it changes with the cluster.
                let cluster =
                    (job.status == JobStatus::Queued).then(|| job.spec.cluster.to_string());
                let mine = |c: &Change| match c {
                    Change::Job(id) => *id == job_id,
                    Change::Cluster(name) => cluster.as_ref() == Some(name),
                };
                if !wait_for(&mut changes, mine).await {
                    return;
                }
            }
        });
        rx
    }
}

fn chunk(log: &crate::store::StoredLog) -> pb::LogChunk {
    pb::LogChunk {
        attempt_id: log.attempt_id.clone(),
        instance: log.instance,
        stream: log.stream.clone(),
        data: log.data.clone(),
    }
}

/// One `logs` call: what it follows and where it sends.
struct LogFollower {
    api: Api,
    tx: mpsc::Sender<Result<pb::LogChunk, Status>>,
    job_id: String,
    instance: Option<u32>,
}

impl LogFollower {
    fn wants(&self, instance: u32) -> bool {
        self.instance.is_none_or(|i| i == instance)
    }

    /// Nothing more can be logged: the job ended and no instance still runs.
    async fn settled(&self) -> bool {
        self.api
            .job(&self.job_id)
            .await
            .map_or(true, |job| job.is_settled())
    }

    /// Sends the stored chunks after `after`; returns the last sequence sent.
    async fn send_stored(&self, after: i64) -> crate::Result<i64> {
        let mut cursor = after;
        loop {
            let stored = self
                .api
                .reader
                .logs(&self.job_id, self.instance, cursor, LOG_PAGE)
                .await?;
            let full = stored.len() >= LOG_PAGE;
            for log in &stored {
                cursor = log.seq;
                if self.tx.send(Ok(chunk(log))).await.is_err() {
                    return Ok(cursor);
                }
            }
            if !full {
                return Ok(cursor);
            }
        }
    }
}
