//! Jobs: submit, cancel (canceling until every instance has stopped), end.

use super::*;

impl Control {
    pub(super) fn submit_job(&mut self, request: JobRequest, now: Millis) -> Result<Job> {
        let cluster = self.clusters.get(&request.cluster).ok_or_else(|| {
            Error::invalid(
                "compute",
                format!(
                    "cluster `{}` does not exist; create it with `shoal cluster create` or see `shoal cluster list`",
                    request.cluster
                ),
            )
        })?;
        let size = self
            .config
            .catalog
            .get(&cluster.spec.vm_size)
            .ok_or_else(|| {
                Error::Internal(format!(
                    "cluster `{}` has a vm size the catalog no longer knows",
                    cluster.spec.name
                ))
            })?;
        let mut request = request;
        let cuts = request
            .parallel
            .as_mut()
            .map(|(_, cuts)| std::mem::take(cuts));
        let spec = JobSpec::from_request(request, &cluster.spec, size)?;
        let seq = self.next_job_seq;
        self.next_job_seq += 1;
        self.seqs_dirty = true;
        let id = job_table::job_id(seq);
        let job = Job {
            id: id.as_str().into(),
            seq,
            spec,
            status: JobStatus::Queued,
            attempts: Vec::new(),
            created_at: now,
            started_at: 0,
            ended_at: 0,
            reason: JobReason::Queued,
            preemptions: 0,
            flags: Vec::new(),
            progress: None,
        };
        debug!(job = %id, cluster = %job.spec.cluster, instances = job.spec.instance_count, "job submitted");
        // Held first: a job the table refused must not be left on the queue.
        self.jobs.insert(job.clone()).map_err(Error::Internal)?;
        self.queue.push(&job);
        if let Some(cuts) = cuts {
            self.add_parallel(&id, cuts);
        }
        let job = self.job_out(&job, now);
        self.dirty_jobs.insert(id);
        Ok(job)
    }

    pub(super) fn cancel_job(&mut self, id: &str, now: Millis) -> Result<Job> {
        let job = self.job(id)?;
        if job.status.is_final() {
            return Err(Error::FailedPrecondition(format!(
                "job `{id}` already ended ({}); nothing to cancel",
                job.status.as_str()
            )));
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
            .filter(|j| {
                j.status == JobStatus::Canceling && j.attempts.iter().all(Attempt::is_settled)
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
            info!(job = %job_id, status = status.as_str(), %reason, "job ended");
            let newly = !job.status.is_final();
            job.status = status;
            if newly {
                *self.ended_counts.entry(status).or_default() += 1;
            }
            job.reason = reason;
            job.ended_at = now;
            self.dirty_jobs.insert(job_id.to_string());
        }
    }
}
