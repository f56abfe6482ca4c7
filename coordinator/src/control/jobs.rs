//! Jobs: submit, cancel (canceling until every instance has stopped), end.

use super::*;

/// A job just made: queued, no attempts yet.
pub(super) fn fresh_job(seq: u64, spec: JobSpec, now: Millis) -> Job {
    Job {
        id: job_table::job_id(seq).into(),
        seq,
        spec,
        status: JobStatus::Queued,
        attempts: Default::default(),
        created_at: now,
        started_at: 0,
        ended_at: 0,
        reason: JobReason::Queued,
        preemptions: 0,
        flags: Default::default(),
        array: None,
        task: None,
        sweep: None,
        trial: None,
        pipeline: None,
        step: None,
        progress: None,
    }
}

impl Control {
    /// The next job's sequence number, taken (written with the batch).
    pub(super) fn take_job_seq(&mut self) -> u64 {
        let seq = self.next_job_seq;
        self.next_job_seq += 1;
        self.seqs_dirty = true;
        seq
    }

    /// A request checked against the cluster it names.
    pub(super) fn spec_of(&self, request: JobRequest) -> Result<JobSpec> {
        let (cluster, size) = self.cluster_and_size(&request.cluster)?;
        JobSpec::from_request(request, &cluster.spec, size)
    }

    fn cluster_and_size(&self, name: &str) -> Result<(&Cluster, &crate::vmsize::VmSize)> {
        let cluster = self.clusters.get(name).ok_or_else(|| {
            Error::invalid(
                "compute",
                format!(
                    "cluster `{name}` does not exist; create it with `shoal cluster create` or see `shoal cluster list`"
                ),
            )
        })?;
        let size = self
            .config
            .catalog
            .get(&cluster.spec.vm_size)
            .ok_or_else(|| {
                Error::Internal(format!(
                    "cluster `{name}` has a vm size the catalog no longer knows"
                ))
            })?;
        Ok((cluster, size))
    }

    pub(super) fn submit_job(&mut self, mut request: JobRequest, now: Millis) -> Result<Job> {
        if let Some(pipeline) = request.pipeline.take() {
            return self.submit_pipeline(request, pipeline, now);
        }
        let cuts = request
            .parallel
            .as_mut()
            .map(|(_, cuts)| std::mem::take(cuts));
        let array = request.array;
        if let Some(array) = &array {
            array.check()?;
            if request.parallel.is_some() {
                return Err(Error::invalid(
                    "array",
                    "a parallel job spreads its mini-batches itself; it cannot be an array",
                ));
            }
        }
        let sweep = request.sweep.take();
        if sweep.is_some() && (array.is_some() || request.parallel.is_some()) {
            return Err(Error::invalid(
                "type",
                "a sweep makes its own trials; it cannot be an array or a parallel job",
            ));
        }
        let spec = self.spec_of(request)?;
        if let Some(sweep) = sweep {
            return self.submit_sweep(spec, sweep, None, now);
        }
        let seq = self.next_job_seq;
        let tasks = array.map_or(0, |a| u64::from(a.count()));
        self.next_job_seq += 1 + tasks;
        self.seqs_dirty = true;
        let id = job_table::job_id(seq);
        let fresh = |seq: u64, spec: JobSpec| fresh_job(seq, spec, now);
        let Some(array) = array else {
            let job = fresh(seq, spec);
            debug!(job = %id, cluster = %job.spec.cluster, instances = job.spec.instance_count, "job submitted");
            // Held first: a job the table refused must not be left on the queue.
            self.jobs.insert(job.clone()).map_err(Error::Internal)?;
            self.queue.push(&job);
            if let Some(cuts) = cuts {
                self.add_parallel(&id, cuts);
            }
            let job = self.job_out(&job, now);
            self.dirty_jobs.insert(id);
            return Ok(job);
        };
        // An array: its own record, and a job per task (one commit for all).
        let count = array.count();
        let released = match array.max_concurrent {
            0 => count,
            max => max.min(count),
        };
        for position in 0..count {
            let task_seq = Task::seq(seq, position);
            let mut task = fresh(task_seq, spec.clone());
            task.task = Some(Task {
                array_seq: seq,
                index: array.index(position),
                counted: Some(JobStatus::Queued),
            });
            self.dirty_jobs.insert(task.id.to_string());
            self.jobs.insert(task).map_err(Error::Internal)?;
            if position < released
                && let Some(task) = self.jobs.by_seq(task_seq)
            {
                self.queue.push(task);
            }
        }
        let mut job = fresh(seq, spec);
        job.array = Some(Box::new(ArrayState {
            spec: array,
            released,
            counts: BTreeMap::from([(JobStatus::Queued, count)]),
            canceled: false,
            ended_held: 0,
        }));
        info!(job = %id, cluster = %job.spec.cluster, tasks = count, "job array submitted");
        self.jobs.insert(job.clone()).map_err(Error::Internal)?;
        let job = self.job_out(&job, now);
        self.dirty_jobs.insert(id);
        Ok(job)
    }

    /// Counts the tasks whose status changed into their arrays, releases held
    /// tasks as others end (`max_concurrent`), and sets each touched array's
    /// own status. The one place an array's record changes after submit.
    pub(super) fn account_arrays(&mut self, now: Millis) {
        // Tasks written later (started) change their array's counts, written later too.
        let lazy = self
            .lazy_jobs
            .iter()
            .filter(|id| !self.dirty_jobs.contains(*id));
        let changed: Vec<(String, u64, u32, JobStatus, Option<JobStatus>, bool)> = self
            .dirty_jobs
            .iter()
            .map(|id| (id, true))
            .chain(lazy.map(|id| (id, false)))
            .filter_map(|(id, urgent)| Some((self.jobs.get(id)?, urgent)))
            .filter_map(|(j, urgent)| {
                let task = j.task?;
                (task.counted != Some(j.status)).then(|| {
                    let position = task.position(j.seq);
                    (
                        j.id.to_string(),
                        task.array_seq,
                        position,
                        j.status,
                        task.counted,
                        urgent,
                    )
                })
            })
            .collect();
        let mut arrays: BTreeMap<u64, bool> = BTreeMap::new();
        for (id, array_seq, position, status, counted, urgent) in changed {
            if let Some(task) = self.jobs.get_mut(&id).and_then(|j| j.task.as_mut()) {
                task.counted = Some(status);
            }
            let Some(state) = self
                .jobs
                .by_seq_mut(array_seq)
                .and_then(|a| a.array.as_deref_mut())
            else {
                continue;
            };
            if let Some(before) = counted
                && let Some(n) = state.counts.get_mut(&before)
            {
                *n = n.saturating_sub(1);
            }
            *state.counts.entry(status).or_default() += 1;
            state.counts.retain(|_, n| *n > 0);
            // A held task that ended (canceled alone) was never in flight.
            if status.is_final()
                && !counted.is_some_and(JobStatus::is_final)
                && position >= state.released
            {
                state.ended_held += 1;
            }
            *arrays.entry(array_seq).or_default() |= urgent;
        }
        for (array_seq, urgent) in arrays {
            self.release_tasks(array_seq);
            let Some(array) = self.jobs.by_seq_mut(array_seq) else {
                continue;
            };
            let Some(state) = array.array.as_deref() else {
                continue;
            };
            let status = state.status();
            if status != JobStatus::Queued && array.started_at == 0 {
                array.started_at = now;
            }
            if status.is_final() && !array.status.is_final() {
                self.quick.remove(&successors::Family::Array(array_seq));
                array.ended_at = now;
                *self.ended_counts.entry(status).or_default() += 1;
            }
            array.reason = if status.is_final() || status == JobStatus::Running {
                JobReason::Said(state.summary())
            } else {
                array.reason.clone()
            };
            array.status = status;
            let id = array.id.to_string();
            // An array's end is told at once, whatever its tasks' ends wait for.
            if urgent || status.is_final() {
                self.dirty_jobs.insert(id);
            } else {
                self.write_later(id, now);
            }
        }
    }

    /// Queues an array's held tasks while fewer than its `max_concurrent` are
    /// queued or running.
    fn release_tasks(&mut self, array_seq: u64) {
        loop {
            let Some(state) = self
                .jobs
                .by_seq_mut(array_seq)
                .and_then(|a| a.array.as_deref_mut())
            else {
                return;
            };
            let count = state.spec.count();
            if state.released >= count || state.in_flight() >= state.spec.max_concurrent {
                return;
            }
            let seq = Task::seq(array_seq, state.released);
            state.released += 1;
            let ended = match self.jobs.by_seq(seq) {
                Some(task) if task.status == JobStatus::Queued => {
                    self.queue.push(task);
                    self.dirty_jobs.insert(task.id.to_string());
                    false
                }
                task => task.is_some_and(|t| t.status.is_final()),
            };
            // Ended while held: released now, it counts among the released.
            if ended
                && let Some(state) = self
                    .jobs
                    .by_seq_mut(array_seq)
                    .and_then(|a| a.array.as_deref_mut())
            {
                state.ended_held = state.ended_held.saturating_sub(1);
            }
        }
    }

    /// A task its array holds back (`max_concurrent`): queued, not yet eligible.
    pub(super) fn is_held(&self, job: &Job) -> bool {
        job.task.is_some_and(|t| {
            self.jobs
                .by_seq(t.array_seq)
                .and_then(|a| a.array.as_deref())
                .is_some_and(|state| t.position(job.seq) >= state.released)
        })
    }

    pub(super) fn cancel_job(&mut self, id: &str, now: Millis) -> Result<Job> {
        let job = self.job(id)?;
        if job.status.is_final() {
            return Err(Error::FailedPrecondition(format!(
                "job `{id}` already ended ({}); nothing to cancel",
                job.status.as_str()
            )));
        }
        if job.sweep.is_some() {
            return self.cancel_sweep(id, "canceled by user", now);
        }
        if job.pipeline.is_some() {
            return self.cancel_pipeline(id, now);
        }
        if let Some(state) = job.array.as_deref() {
            // The whole array: every task that has not ended, held ones too.
            let (first, count) = (Task::seq(job.seq, 0), state.spec.count());
            let job_id = job.id.to_string();
            if let Some(state) = self
                .jobs
                .get_mut(&job_id)
                .and_then(|j| j.array.as_deref_mut())
            {
                state.canceled = true;
                state.released = count;
                state.ended_held = 0;
            }
            for seq in first..first + u64::from(count) {
                let live = self
                    .jobs
                    .by_seq(seq)
                    .filter(|t| !t.status.is_ending())
                    .map(|t| t.id.to_string());
                if let Some(task) = live {
                    self.cancel(&task, "canceled with its array".into(), "job canceled", now);
                }
            }
            self.dirty_jobs.insert(job_id.clone());
            self.account_arrays(now);
            return self.job(&job_id).map(|j| self.job_out(j, now));
        }
        if job.status != JobStatus::Canceling {
            self.cancel(id, "canceled by user".into(), "job canceled", now);
        }
        self.job(id).map(|j| self.job_out(j, now))
    }

    /// Cancels a job: `canceled` at once when nothing of it runs, else `canceling`
    /// until every instance has stopped (`finish_canceling`).
    pub(super) fn cancel(&mut self, job_id: &str, reason: String, tell_agent: &str, now: Millis) {
        let Some(job) = self.jobs.get_mut(job_id) else {
            return;
        };
        self.queue.remove(job);
        let live = job
            .current_attempt()
            .is_some_and(|attempt| !attempt.is_settled());
        if !live {
            self.end_job(job_id, JobStatus::Canceled, reason, now);
            return;
        }
        info!(job = %job_id, %reason, "job canceling");
        job.status = JobStatus::Canceling;
        job.reason = JobReason::said(reason);
        self.dirty_jobs.insert(job_id.to_string());
        self.stop_live_instances(job_id, tell_agent);
    }

    /// Canceling jobs of this batch whose instances have all stopped are canceled.
    pub(super) fn finish_canceling(&mut self, now: Millis) {
        let stopped: Vec<(String, JobReason)> = self
            .dirty_jobs
            .iter()
            .filter_map(|id| self.jobs.get(id))
            // A record has no attempts: its tasks decide (`account_arrays`), or its trials (`trial_ended`).
            .filter(|j| {
                j.status == JobStatus::Canceling
                    && !j.is_record()
                    && j.attempts.iter().all(Attempt::is_settled)
            })
            .map(|j| (j.id.to_string(), j.reason.clone()))
            .collect();
        for (id, reason) in stopped {
            self.end_job(&id, JobStatus::Canceled, reason, now);
        }
    }

    /// Tells every instance of the job's current attempt that still runs to stop;
    /// each shows `stopping` until its agent says it has.
    pub(super) fn stop_live_instances(&mut self, job_id: &str, reason: &str) {
        let Some(attempt) = self
            .jobs
            .get_mut(job_id)
            .and_then(|j| j.attempts.last_mut())
        else {
            return;
        };
        for instance in attempt
            .instances
            .iter_mut()
            .filter(|i| !i.status.is_final())
        {
            instance.status = InstanceStatus::Stopping;
            let slot = Slot {
                attempt_id: attempt.id.clone(),
                instance: instance.index,
            };
            tell(
                &self.links,
                &mut self.outbox,
                &instance.node,
                ToAgent::Cancel {
                    slot,
                    reason: reason.to_string(),
                },
            );
        }
        self.dirty_jobs.insert(job_id.to_string());
    }

    pub(super) fn end_job(
        &mut self,
        job_id: &str,
        status: JobStatus,
        reason: impl Into<JobReason>,
        now: Millis,
    ) {
        let reason = reason.into();
        if let Some(job) = self.jobs.get_mut(job_id) {
            self.queue.remove(job);
            // One line a job that did not complete; a completed one's is a debug
            // line, as its start is (at info, this line was 5% of the loop's time
            // when each of thousands of short jobs a second wrote one).
            if status == JobStatus::Completed {
                debug!(job = %job_id, status = status.as_str(), %reason, "job ended");
            } else {
                info!(job = %job_id, status = status.as_str(), %reason, "job ended");
            }
            let newly = !job.status.is_final();
            job.status = status;
            if newly {
                *self.ended_counts.entry(status).or_default() += 1;
            }
            job.reason = reason;
            job.ended_at = now;
            let (trial, step) = (job.trial.filter(|_| newly), job.step.filter(|_| newly));
            self.dirty_jobs.insert(job_id.to_string());
            if let Some(trial) = trial {
                self.trial_ended(trial, status, now);
            }
            if let Some(step) = step {
                self.step_ended(step, status, now);
            }
        }
    }
}
