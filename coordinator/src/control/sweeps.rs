//! Sweeps in the core: a sweep is a record (never queued) and its trials are
//! ordinary jobs made one by one as the conductor's plans say (`step_sweep`).
//! The record keeps one entry per trial, brought up to date here as trials end
//! (`trial_ended`), so a sweep never needs its trials in memory; a plan made
//! from an older view is refused, so no trial is made twice.

use super::*;
use crate::sweep::{Plan, substitute, value_text};

impl Control {
    /// A sweep's record: running at once (its trials queue as it makes them).
    pub(super) fn submit_sweep(
        &mut self,
        spec: JobSpec,
        sweep: crate::sweep::SweepSpec,
        step: Option<crate::model::StepOf>,
        now: Millis,
    ) -> Result<Job> {
        let seq = self.take_job_seq();
        let id = job_table::job_id(seq);
        let job = Job {
            status: JobStatus::Running,
            started_at: now,
            reason: JobReason::said("sweeping"),
            sweep: Some(Box::new(SweepState {
                spec: sweep,
                trials: Vec::new(),
                best: None,
            })),
            step,
            ..super::jobs::fresh_job(seq, spec, now)
        };
        info!(job = %id, cluster = %job.spec.cluster, "sweep submitted");
        self.jobs.insert(job.clone()).map_err(Error::Internal)?;
        self.sweeps.insert(seq);
        self.dirty_jobs.insert(id);
        Ok(self.job_out(&job, now))
    }

    /// The sweeps still making trials, as their records stand (those that have
    /// ended leave the index here).
    pub(super) fn running_sweeps(&mut self) -> Vec<Job> {
        let jobs = &self.jobs;
        self.sweeps.retain(|seq| {
            jobs.by_seq(*seq)
                .is_some_and(|j| j.sweep.is_some() && !j.status.is_final())
        });
        self.sweeps
            .iter()
            .filter_map(|seq| self.jobs.by_seq(*seq))
            .filter(|j| j.status == JobStatus::Running)
            .cloned()
            .collect()
    }

    /// Applies a conductor's plan for one sweep: results recorded (a trial that
    /// completed without its metric fails), trials stopped, new ones made, and the
    /// sweep ended. All or nothing: a plan for trials the record does not expect
    /// (made from an older view) is refused.
    pub(super) fn step_sweep(&mut self, id: &str, plan: Plan, now: Millis) -> Result<()> {
        let record = self.job(id)?;
        let Some(state) = record.sweep.as_deref() else {
            return Err(Error::invalid("job", format!("`{id}` is not a sweep")));
        };
        if record.status != JobStatus::Running {
            return Err(Error::FailedPrecondition(format!(
                "sweep `{id}` is {}; it makes no more trials",
                record.status.as_str()
            )));
        }
        let made = state.trials.len() as u32;
        if plan
            .start
            .iter()
            .enumerate()
            .any(|(k, (index, _))| *index != made + k as u32)
            || plan
                .results
                .iter()
                .any(|r| state.trials.get(r.index as usize).is_none_or(|t| t.settled))
        {
            return Err(Error::FailedPrecondition(format!(
                "sweep `{id}` moved on; plan again from its current state"
            )));
        }
        let seqs: Vec<u64> = state.trials.iter().map(|t| t.seq).collect();
        let (record_seq, template, name) =
            (record.seq, record.spec.clone(), record.name().to_string());
        for result in &plan.results {
            let seq = seqs[result.index as usize];
            if let Some(failure) = &result.failure {
                self.fail_completed(&job_table::job_id(seq), failure.clone());
            }
            if let Some(entry) = self
                .sweep_mut(record_seq)
                .and_then(|s| s.trials.get_mut(result.index as usize))
            {
                entry.settled = true;
                entry.score = result.score;
                if result.failure.is_some() {
                    entry.ended = Some(JobStatus::Failed);
                }
            }
        }
        for (index, reason) in &plan.stop {
            let Some(&seq) = seqs.get(*index as usize) else {
                continue;
            };
            let trial = job_table::job_id(seq);
            if self.jobs.get(&trial).is_some_and(|j| !j.status.is_ending()) {
                self.cancel(&trial, reason.clone(), "stopped by the sweep", now);
            }
        }
        for (index, params) in plan.start {
            self.make_trial(record_seq, &template, &name, index, params, now)?;
        }
        if let Some(end) = plan.end {
            if let Some(state) = self.sweep_mut(record_seq) {
                state.best = end.best;
            }
            let reason = match end.best.and_then(|b| self.trial_id(record_seq, b)) {
                Some(best) => format!("{}; best trial: {best}", end.reason),
                None => end.reason,
            };
            self.end_job(id, end.status, JobReason::said(reason), now);
        }
        self.dirty_jobs.insert(id.to_string());
        Ok(())
    }

    fn sweep_mut(&mut self, seq: u64) -> Option<&mut SweepState> {
        self.jobs
            .by_seq_mut(seq)
            .and_then(|j| j.sweep.as_deref_mut())
    }

    fn trial_id(&self, sweep_seq: u64, index: u32) -> Option<String> {
        self.jobs
            .by_seq(sweep_seq)
            .and_then(|j| j.sweep.as_deref())
            .and_then(|s| s.trials.get(index as usize))
            .map(|t| job_table::job_id(t.seq))
    }

    /// Trial `index` of the sweep: its template with the values put in, queued.
    fn make_trial(
        &mut self,
        sweep_seq: u64,
        template: &JobSpec,
        sweep_name: &str,
        index: u32,
        params: crate::sweep::Params,
        now: Millis,
    ) -> Result<()> {
        let mut spec = template.clone();
        spec.name = format!("{sweep_name}_{index}");
        spec.argv = spec
            .argv
            .iter()
            .map(|word| substitute(word, &params).into())
            .collect();
        spec.command = substitute(&spec.command, &params);
        for (name, value) in &params {
            // As the service gives them.
            spec.environment_variables
                .insert(format!("AZUREML_SWEEP_{name}"), value_text(value));
        }
        let seq = self.take_job_seq();
        let id = job_table::job_id(seq);
        let job = Job {
            trial: Some(Trial { sweep_seq, index }),
            ..super::jobs::fresh_job(seq, spec, now)
        };
        debug!(job = %id, sweep = sweep_seq, index, "trial made");
        self.jobs.insert(job).map_err(Error::Internal)?;
        if let Some(job) = self.jobs.by_seq(seq) {
            self.queue.push(job);
        }
        if let Some(state) = self.sweep_mut(sweep_seq) {
            state.trials.push(TrialEntry {
                seq,
                params,
                ended: None,
                settled: false,
                score: None,
            });
        }
        self.dirty_jobs.insert(id);
        Ok(())
    }

    /// A trial that completed without what its sweep needs fails, saying why.
    fn fail_completed(&mut self, id: &str, reason: String) {
        let Some(job) = self.jobs.get_mut(id) else {
            return;
        };
        if job.status != JobStatus::Completed {
            return;
        }
        job.status = JobStatus::Failed;
        job.reason = JobReason::said(reason);
        if let Some(n) = self.ended_counts.get_mut(&JobStatus::Completed) {
            *n = n.saturating_sub(1);
        }
        *self.ended_counts.entry(JobStatus::Failed).or_default() += 1;
        self.dirty_jobs.insert(id.to_string());
    }

    /// A trial has ended: its sweep's entry says so; a canceling sweep whose
    /// trials have all ended is canceled.
    pub(super) fn trial_ended(&mut self, trial: Trial, status: JobStatus, now: Millis) {
        let Some(record) = self.jobs.by_seq_mut(trial.sweep_seq) else {
            return;
        };
        let Some(state) = record.sweep.as_deref_mut() else {
            return;
        };
        if let Some(entry) = state.trials.get_mut(trial.index as usize) {
            entry.ended = Some(status);
        }
        let done = state.live() == 0;
        let (id, canceling, reason) = (
            record.id.to_string(),
            record.status == JobStatus::Canceling,
            record.reason.clone(),
        );
        self.dirty_jobs.insert(id.clone());
        if canceling && done {
            self.end_job(&id, JobStatus::Canceled, reason, now);
        }
    }

    /// Cancels a sweep: every trial that has not ended, then the sweep once they have.
    pub(super) fn cancel_sweep(&mut self, id: &str, why: &str, now: Millis) -> Result<Job> {
        let record = self.job(id)?;
        let live: Vec<String> = record
            .sweep
            .as_deref()
            .map(|s| {
                s.trials
                    .iter()
                    .filter(|t| t.ended.is_none())
                    .map(|t| job_table::job_id(t.seq))
                    .collect()
            })
            .unwrap_or_default();
        if let Some(record) = self.jobs.get_mut(id) {
            record.status = JobStatus::Canceling;
            record.reason = JobReason::said(why);
        }
        self.dirty_jobs.insert(id.to_string());
        for trial in &live {
            if self.jobs.get(trial).is_some_and(|j| !j.status.is_ending()) {
                self.cancel(trial, "canceled with its sweep".into(), "job canceled", now);
            }
        }
        let record = self.job(id)?;
        if record.status == JobStatus::Canceling
            && record.sweep.as_deref().is_some_and(|s| s.live() == 0)
        {
            self.end_job(id, JobStatus::Canceled, JobReason::said(why), now);
        }
        self.job(id).map(|j| self.job_out(j, now))
    }
}
