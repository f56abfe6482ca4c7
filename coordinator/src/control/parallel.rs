//! The control loop's side of parallel jobs: leases and results arrive as `Work`
//! commands; a result's rows are committed with its mini-batch's new state in the
//! batch's one transaction (exactly once: only the lease in force is taken); the
//! verdict ends the job as soon as it is known.

use super::*;
use crate::parallel::{Batches, Reported, Verdict};

/// Why a parallel job's workers are stopped once its mini-batches are settled.
pub const PARALLEL_RELEASE: &str = "released: every mini-batch is settled";

/// How long a worker with nothing to do waits before it asks again.
const IDLE_WAIT_MS: u64 = 200;

/// A worker's call: the result of its last mini-batch, and whether it wants one more.
#[derive(Debug)]
pub struct WorkRequest {
    pub node_id: String,
    pub slot: Slot,
    /// The instance's token.
    pub token: String,
    pub report: Option<MiniBatchResult>,
    pub want_next: bool,
}

#[derive(Debug)]
pub struct MiniBatchResult {
    pub lease: String,
    pub ok: bool,
    pub rows: Vec<u8>,
    pub message: String,
    /// Items its run gave no result for (run_function).
    pub failed_items: u64,
}

#[derive(Debug, Default)]
pub struct WorkReply {
    pub accepted: bool,
    pub lease: Option<Leased>,
    pub finished: bool,
    pub wait_ms: u64,
}

#[derive(Debug)]
pub struct Leased {
    /// The items are read from the store (`Reader::items`), not by the loop.
    pub job_id: String,
    pub lease: String,
    pub index: u32,
    pub execution: u32,
    pub folder: bool,
    pub timeout_seconds: Option<u64>,
}

impl Control {
    pub(super) fn load_parallel(&mut self, stored: Vec<(String, crate::parallel::MiniBatch)>) {
        let mut by_job: HashMap<String, Vec<crate::parallel::MiniBatch>> = HashMap::new();
        for (job_id, batch) in stored {
            by_job.entry(job_id).or_default().push(batch);
        }
        for (job_id, list) in by_job {
            if let Some(spec) = self.jobs.get(&job_id).and_then(|j| j.spec.parallel.clone()) {
                self.parallel
                    .insert(job_id.clone(), Batches::restore(&job_id, *spec, list));
            }
        }
    }

    pub(super) fn add_parallel(&mut self, job_id: &str, cuts: Vec<crate::parallel::Cut>) {
        let Some(spec) = self.jobs.get(job_id).and_then(|j| j.spec.parallel.clone()) else {
            return;
        };
        let counts: Vec<u64> = cuts.iter().map(|c| c.count).collect();
        self.parallel
            .insert(job_id.to_string(), Batches::new(job_id, *spec, &counts));
        self.new_cuts.push((job_id.to_string(), cuts));
    }

    /// The job as readers see it: with its progress, when it is a parallel job.
    pub(super) fn job_out(&self, job: &Job, now: Millis) -> Job {
        let mut out = job.clone();
        if job.status == JobStatus::Queued
            && !job.is_record()
            && let Some(reason) = self.queued_reason(job)
        {
            out.reason = JobReason::Said(reason);
        }
        if let Some(batches) = self.parallel.get(job.id.as_str()) {
            let until = if job.ended_at > 0 { job.ended_at } else { now };
            out.progress = Some(Box::new(batches.progress(job.started_at, until)));
        }
        out
    }

    pub(super) fn work(&mut self, request: WorkRequest, now: Millis) -> Result<WorkReply> {
        let claim = Claim {
            node_id: request.node_id.clone(),
            slot: request.slot.clone(),
            token: Some(request.token.clone()),
        };
        let job_id = self.authorize(&claim, &AgentCall::Work)?.job_id;
        if !self.parallel.contains_key(&job_id) {
            return Err(Error::NotFound(format!(
                "job `{job_id}` is not a parallel job"
            )));
        }
        let mut reply = WorkReply::default();
        if let Some(result) = request.report {
            reply.accepted = self.take_result(&job_id, &request.node_id, result, now);
        }
        if !request.want_next {
            return Ok(reply);
        }
        let job = self.job(&job_id)?;
        let live = !job.status.is_ending()
            && job
                .current_attempt()
                .filter(|a| a.id == request.slot.attempt_id)
                .and_then(|a| a.instances.get(request.slot.instance as usize))
                .is_some_and(|i| i.node == request.node_id && !i.status.is_final());
        if !live {
            reply.finished = true;
            return Ok(reply);
        }
        let secret = random_hex(&mut self.rng, 12);
        let Some(batches) = self.parallel.get_mut(&job_id) else {
            return Ok(reply);
        };
        let folder = batches.spec.input_type == crate::parallel::InputType::UriFolder;
        let timeout_seconds = batches.spec.timeout_seconds;
        let Some(batch) = batches.lease(&request.node_id, &secret, now).cloned() else {
            if batches.settled() {
                reply.finished = true;
            } else {
                reply.wait_ms = IDLE_WAIT_MS;
            }
            return Ok(reply);
        };
        self.dirty_batches.insert((job_id.clone(), batch.index));
        self.notify_jobs.insert(job_id.clone());
        reply.lease = Some(Leased {
            job_id,
            lease: batch.lease.clone().unwrap_or_default(),
            index: batch.index,
            execution: batch.executions,
            folder,
            timeout_seconds,
        });
        Ok(reply)
    }

    /// Applies a worker's result; whether it was taken.
    fn take_result(
        &mut self,
        job_id: &str,
        node_id: &str,
        result: MiniBatchResult,
        now: Millis,
    ) -> bool {
        let Some(batches) = self.parallel.get_mut(job_id) else {
            return false;
        };
        let Some(index) = batches.index_of_lease(&result.lease) else {
            return false;
        };
        let outcome = batches.report(&result.lease, node_id, result.ok, &result.message);
        let execution = batches.list[index as usize].executions;
        let accepted = match outcome {
            Reported::Stale => {
                debug!(job = %job_id, lease = %result.lease, "stale mini-batch result ignored");
                false
            }
            Reported::Repeat => true,
            Reported::Done => {
                if result.failed_items > 0 {
                    let batch = &mut batches.list[index as usize];
                    batch.failed_items = result.failed_items.min(batch.items);
                }
                self.new_rows.push((job_id.to_string(), index, result.rows));
                true
            }
            Reported::Retry | Reported::Failed => {
                let what = if outcome == Reported::Retry {
                    "retried"
                } else {
                    "failed for good"
                };
                self.parallel_note(
                    job_id,
                    &format!(
                        "shoal: mini-batch {index} run {execution} on node {node_id} failed ({}); {what}\n",
                        result.message
                    ),
                );
                true
            }
        };
        if matches!(outcome, Reported::Done | Reported::Retry | Reported::Failed) {
            self.dirty_batches.insert((job_id.to_string(), index));
            self.notify_jobs.insert(job_id.to_string());
            self.parallel_verdict(job_id, now);
        }
        accepted
    }

    /// A line in the job's log (stderr of instance 0's stream), from Shoal itself.
    fn parallel_note(&mut self, job_id: &str, line: &str) {
        let attempt_id = self
            .jobs
            .get(job_id)
            .and_then(Job::current_attempt)
            .map(|a| a.id.clone())
            .unwrap_or_default();
        self.new_logs.push(crate::store::NewLog {
            job_id: job_id.to_string(),
            attempt_id,
            instance: 0,
            stream: "stderr".into(),
            data: line.as_bytes().to_vec(),
        });
    }

    /// Ends the job once its verdict is known, and releases its workers.
    fn parallel_verdict(&mut self, job_id: &str, now: Millis) {
        let Some(verdict) = self.parallel.get(job_id).and_then(Batches::verdict) else {
            return;
        };
        if self.jobs.get(job_id).is_none_or(|j| j.status.is_ending()) {
            return;
        }
        match verdict {
            Verdict::Completed(summary) => {
                self.end_job(job_id, JobStatus::Completed, summary, now);
                self.stop_live_instances(job_id, PARALLEL_RELEASE);
            }
            Verdict::Failed(summary) => {
                self.end_job(job_id, JobStatus::Failed, summary, now);
                self.stop_live_instances(job_id, "the job failed: too many mini-batches failed");
            }
        }
    }

    /// Runs of a parallel job in flight on `node` (None: anywhere) go back to the
    /// queue: their node, or their attempt, is gone.
    pub(super) fn parallel_take_back(&mut self, job_id: &str, node: Option<&str>) {
        let Some(batches) = self.parallel.get_mut(job_id) else {
            return;
        };
        for index in batches.take_back(node) {
            self.dirty_batches.insert((job_id.to_string(), index));
        }
        self.notify_jobs.insert(job_id.to_string());
    }

    /// Runs silent past their timeout count as failed runs.
    pub(super) fn parallel_housekeep(&mut self, now: Millis) {
        let mut touched = Vec::new();
        for (job_id, batches) in self.parallel.iter_mut() {
            for (index, _) in batches.expire(now) {
                self.dirty_batches.insert((job_id.clone(), index));
                touched.push(job_id.clone());
            }
        }
        for job_id in touched {
            self.notify_jobs.insert(job_id.clone());
            self.parallel_verdict(&job_id, now);
        }
    }

    /// What this batch changed of mini-batches, into the commit.
    pub(super) fn parallel_changes(&mut self, batch: &mut crate::store::Batch) {
        batch.mini_batches = std::mem::take(&mut self.dirty_batches)
            .into_iter()
            .filter_map(|(job_id, index)| {
                let changed = self
                    .parallel
                    .get(&job_id)?
                    .list
                    .get(index as usize)?
                    .clone();
                Some((job_id, changed))
            })
            .collect();
        batch.new_mini_batches = std::mem::take(&mut self.new_cuts);
        batch.mini_batch_rows = std::mem::take(&mut self.new_rows);
    }
}
