//! Pipelines in the core: a pipeline is a record (never queued) holding its steps,
//! each a job template; a step's job is made when the steps it reads from have
//! completed (`advance`, after submit and after each step's end in `end_job`), so
//! the graph needs no task of its own and a restarted coordinator, reading the
//! record, makes no step twice. A step reading another's output is given that
//! step's job (`DataSource::Output`), whose named output the API serves.

use super::*;
use crate::data::DataSource;
use crate::model::{
    ParallelStep, PipelineRequest, PipelineState, PipelineStep, StepOf, StepOutput,
};

/// A parallel step whose input (another step's output) is ready to be cut: the
/// cutter reads the output, cuts it and hands the mini-batches back (`StepCut`).
#[derive(Clone, Debug)]
pub struct CutOrder {
    pub pipeline: String,
    pub index: u32,
    /// The job whose named output it cuts.
    pub job: String,
    pub output: String,
    pub spec: crate::parallel::ParallelSpec,
}

impl Control {
    /// Checks a pipeline's steps against their clusters, keeps its record (running
    /// at once) and makes the steps that read from no other.
    pub(super) fn submit_pipeline(
        &mut self,
        mut record: JobRequest,
        pipeline: PipelineRequest,
        now: Millis,
    ) -> Result<Job> {
        if pipeline.steps.is_empty() {
            return Err(Error::invalid("jobs", "a pipeline needs at least one step"));
        }
        let mut steps = Vec::with_capacity(pipeline.steps.len());
        for (index, step) in pipeline.steps.into_iter().enumerate() {
            let field = format!("jobs.{}", step.name);
            if step.after.iter().any(|&a| a as usize >= index) {
                return Err(Error::invalid(
                    field,
                    "a step reads only from steps before it (the graph has a cycle)",
                ));
            }
            let mut request = step.request;
            if request.array.is_some() {
                return Err(Error::invalid(field, "a pipeline's step is not an array"));
            }
            let sweep = request.sweep.take();
            let cuts = request
                .parallel
                .as_mut()
                .map(|(_, cuts)| std::mem::take(cuts));
            let spec = self.spec_of(request).map_err(|e| e.in_field(&field))?;
            // A parallel step's mini-batches are kept now, under the job it will be.
            let parallel = match cuts {
                None => None,
                Some(cuts) => {
                    let job_seq = self.take_job_seq();
                    let counts = match &step.cut_from {
                        Some(_) => None,
                        None => {
                            let counts = cuts.iter().map(|c| c.count).collect();
                            self.new_cuts.push((job_table::job_id(job_seq), cuts));
                            Some(counts)
                        }
                    };
                    Some(ParallelStep {
                        job_seq,
                        from: step.cut_from,
                        counts,
                    })
                }
            };
            steps.push(PipelineStep {
                name: step.name,
                spec,
                after: step.after,
                seq: None,
                ended: None,
                skipped: None,
                fingerprint: step.fingerprint,
                reused: false,
                sweep,
                parallel,
            });
        }
        // The record runs nothing; its spec keeps its name, cluster and extras.
        record.argv = vec!["pipeline".into()];
        record.command.clear();
        let mut spec = self.spec_of(record)?;
        spec.argv.clear();
        let seq = self.take_job_seq();
        let id = job_table::job_id(seq);
        let job = Job {
            status: JobStatus::Running,
            started_at: now,
            reason: JobReason::said("running its steps"),
            pipeline: Some(Box::new(PipelineState {
                steps,
                continue_on_step_failure: pipeline.continue_on_step_failure,
                outputs: pipeline.outputs,
                force_rerun: pipeline.force_rerun,
            })),
            ..super::jobs::fresh_job(seq, spec, now)
        };
        info!(job = %id, steps = job.pipeline.as_ref().map_or(0, |p| p.steps.len()), "pipeline submitted");
        self.jobs.insert(job).map_err(Error::Internal)?;
        self.pipelines.insert(seq);
        self.dirty_jobs.insert(id.clone());
        self.advance_pipeline(seq, now)?;
        self.job(&id).map(|j| self.job_out(j, now))
    }

    /// Goes through the steps in order (each after those it reads from): one
    /// whose inputs exist is made (or an identical completed step's job reused),
    /// one that can no longer run is marked with why; running steps are stopped
    /// when the pipeline stops; and the pipeline ends once every step has ended or
    /// been passed over.
    fn advance_pipeline(&mut self, seq: u64, now: Millis) -> Result<()> {
        let Some(record) = self.jobs.by_seq(seq) else {
            return Ok(());
        };
        let Some(state) = record.pipeline.as_deref() else {
            return Ok(());
        };
        if record.status.is_final() {
            return Ok(());
        }
        let id = record.id.to_string();
        let canceling = record.status == JobStatus::Canceling;
        let experiment = record.spec.extras.experiment_name.clone();
        let failed = |s: &PipelineStep| s.ended.is_some_and(|e| e != JobStatus::Completed);
        let first_failure = state
            .steps
            .iter()
            .find(|s| failed(s))
            .map(|s| s.name.clone());
        let stopping = canceling || (first_failure.is_some() && !state.continue_on_step_failure);
        for index in 0..state.steps.len() {
            let Some(state) = self.jobs.by_seq(seq).and_then(|j| j.pipeline.as_deref()) else {
                return Ok(());
            };
            let step = &state.steps[index];
            if step.seq.is_some() || step.skipped.is_some() {
                continue;
            }
            // Steps before it are settled (made, reused or passed over) already.
            let blocked = step.after.iter().find_map(|&a| {
                let before = &state.steps[a as usize];
                (before.skipped.is_some() || failed(before)).then(|| before.name.clone())
            });
            let skip = match blocked {
                Some(before) => Some(format!("not run: step `{before}` did not complete")),
                None if stopping => Some("not run: the pipeline stopped".to_string()),
                None => None,
            };
            if let Some(why) = skip {
                if let Some(step) = self.pipeline_mut(seq).and_then(|p| p.steps.get_mut(index)) {
                    step.skipped = Some(why);
                }
                continue;
            }
            if !step
                .after
                .iter()
                .all(|&a| state.steps[a as usize].ended == Some(JobStatus::Completed))
            {
                continue;
            }
            let reuse = self.reusable(state, index);
            // A parallel step waits for its input's mini-batches too (the cutter's),
            // unless an identical step's job stands for it.
            if reuse.is_none() && step.parallel.as_ref().is_some_and(|p| p.counts.is_none()) {
                continue;
            }
            match reuse {
                Some(earlier) => {
                    info!(pipeline = %id, step = %step.name, reused = %job_table::job_id(earlier), "step reused");
                    if let Some(step) = self.pipeline_mut(seq).and_then(|p| p.steps.get_mut(index))
                    {
                        step.seq = Some(earlier);
                        step.ended = Some(JobStatus::Completed);
                        step.reused = true;
                    }
                }
                None => self.make_step(seq, index, &experiment, now)?,
            }
        }
        if stopping {
            let why = match &first_failure {
                Some(step) if !canceling => format!("canceled: step `{step}` failed"),
                _ => "canceled with its pipeline".to_string(),
            };
            let live: Vec<String> = self
                .jobs
                .by_seq(seq)
                .and_then(|j| j.pipeline.as_deref())
                .map(|p| {
                    p.steps
                        .iter()
                        .filter(|s| s.ended.is_none())
                        .filter_map(|s| s.seq.map(job_table::job_id))
                        .collect()
                })
                .unwrap_or_default();
            for step in live {
                match self.jobs.get(&step) {
                    Some(job) if job.sweep.is_some() && !job.status.is_final() => {
                        self.cancel_sweep(&step, &why, now)?;
                    }
                    Some(job) if !job.status.is_ending() => {
                        self.cancel(&step, why.clone(), "job canceled", now);
                    }
                    _ => {}
                }
            }
        }
        self.dirty_jobs.insert(id.clone());
        // Canceling a step may have ended it (and advanced the pipeline) already.
        let Some(record) = self.jobs.by_seq(seq) else {
            return Ok(());
        };
        let Some(state) = record.pipeline.as_deref() else {
            return Ok(());
        };
        if record.status.is_final() || !state.settled() {
            return Ok(());
        }
        let (status, reason) = if canceling {
            (JobStatus::Canceled, record.reason.clone())
        } else if let Some(step) = first_failure {
            // Passed over (a step that failed before it ran is failed, not passed over).
            let skipped = state
                .steps
                .iter()
                .filter(|s| s.skipped.is_some() && s.ended.is_none())
                .count();
            let reason = match skipped {
                0 => format!("step `{step}` failed"),
                n => format!("step `{step}` failed; {n} step(s) not run"),
            };
            (JobStatus::Failed, JobReason::said(reason))
        } else {
            let reused = state.steps.iter().filter(|s| s.reused).count();
            match reused {
                0 => (JobStatus::Completed, JobReason::None),
                n => (
                    JobStatus::Completed,
                    JobReason::said(format!("{n} of {} step(s) reused", state.steps.len())),
                ),
            }
        };
        self.end_job(&id, status, reason, now);
        Ok(())
    }

    /// An earlier completed step identical to step `index` (same fingerprint)
    /// whose job is still held, unless the pipeline forces reruns.
    fn reusable(&self, state: &PipelineState, index: usize) -> Option<u64> {
        let fingerprint = &state.steps[index].fingerprint;
        if state.force_rerun || fingerprint.is_empty() {
            return None;
        }
        let earlier = *self.completed_steps.get(fingerprint)?;
        self.jobs
            .by_seq(earlier)
            .is_some_and(|j| j.status == JobStatus::Completed)
            .then_some(earlier)
    }

    /// Completed steps of a pipeline, indexed for reuse.
    pub(super) fn remember_completed_steps(&mut self, state: &PipelineState) {
        for step in &state.steps {
            if let (Some(seq), Some(JobStatus::Completed), false) =
                (step.seq, step.ended, step.fingerprint.is_empty())
            {
                self.completed_steps.insert(step.fingerprint.clone(), seq);
            }
        }
    }

    fn pipeline_mut(&mut self, seq: u64) -> Option<&mut PipelineState> {
        self.jobs
            .by_seq_mut(seq)
            .and_then(|j| j.pipeline.as_deref_mut())
    }

    /// Step `index`'s job, queued: its inputs from earlier steps name their jobs.
    fn make_step(
        &mut self,
        pipeline_seq: u64,
        index: usize,
        experiment: &str,
        now: Millis,
    ) -> Result<()> {
        let Some(state) = self
            .jobs
            .by_seq(pipeline_seq)
            .and_then(|j| j.pipeline.as_deref())
        else {
            return Ok(());
        };
        let step = &state.steps[index];
        let mut spec = step.spec.clone();
        if spec.name.is_empty() {
            spec.name = step.name.clone();
        }
        let mut extras: crate::model::JobExtras = spec.extras.clone().into();
        for input in extras.inputs.values_mut() {
            if let DataSource::Step { step, output } = &input.source {
                let job = state
                    .index_of(step)
                    .and_then(|i| state.steps[i].seq)
                    .map(job_table::job_id)
                    .ok_or_else(|| {
                        Error::Internal(format!("step `{step}` has no job before its readers"))
                    })?;
                input.source = DataSource::Output {
                    job,
                    output: output.clone(),
                };
            }
        }
        if extras.experiment_name.is_empty() {
            extras.experiment_name = experiment.to_string();
        }
        spec.extras = extras.into();
        let step_of = StepOf {
            pipeline_seq,
            index: index as u32,
        };
        let parallel = step.parallel.clone();
        let seq = match step.sweep.clone() {
            // A sweep step: a sweep's record, its trials made by the conductor.
            Some(sweep) => self.submit_sweep(spec, sweep, Some(step_of), now)?.seq,
            None => {
                let seq = match &parallel {
                    Some(p) => p.job_seq,
                    None => self.take_job_seq(),
                };
                let job = Job {
                    step: Some(step_of),
                    ..super::jobs::fresh_job(seq, spec, now)
                };
                self.jobs.insert(job).map_err(Error::Internal)?;
                if let Some(job) = self.jobs.by_seq(seq) {
                    self.queue.push(job);
                }
                seq
            }
        };
        let id = job_table::job_id(seq);
        debug!(job = %id, pipeline = pipeline_seq, index, "step made");
        // Its mini-batches were kept when they were cut: now they are handed out.
        if let (Some(counts), Some(spec)) = (
            parallel.and_then(|p| p.counts),
            self.jobs.by_seq(seq).and_then(|j| j.spec.parallel.clone()),
        ) {
            self.parallel.insert(
                id.clone(),
                crate::parallel::Batches::new(&id, *spec, &counts),
            );
        }
        if let Some(step) = self
            .pipeline_mut(pipeline_seq)
            .and_then(|p| p.steps.get_mut(index))
        {
            step.seq = Some(seq);
        }
        self.dirty_jobs.insert(id);
        Ok(())
    }

    /// The parallel steps of running pipelines whose input step has completed and
    /// whose mini-batches are not cut yet (the pipelines that have ended leave the
    /// index here).
    pub(super) fn steps_to_cut(&mut self) -> Vec<CutOrder> {
        let jobs = &self.jobs;
        self.pipelines
            .retain(|seq| jobs.by_seq(*seq).is_some_and(|j| !j.status.is_final()));
        let mut orders = Vec::new();
        for seq in &self.pipelines {
            let Some(record) = self.jobs.by_seq(*seq) else {
                continue;
            };
            let Some(state) = record.pipeline.as_deref() else {
                continue;
            };
            if record.status != JobStatus::Running {
                continue;
            }
            for (index, step) in state.steps.iter().enumerate() {
                let Some(ParallelStep {
                    from: Some(StepOutput { step: from, output }),
                    counts: None,
                    ..
                }) = &step.parallel
                else {
                    continue;
                };
                if step.seq.is_some() || step.skipped.is_some() {
                    continue;
                }
                let producer = state.index_of(from).map(|i| &state.steps[i]);
                let Some(job) = producer
                    .filter(|p| p.ended == Some(JobStatus::Completed))
                    .and_then(|p| p.seq)
                else {
                    continue;
                };
                let Some(spec) = step.spec.parallel.as_deref() else {
                    continue;
                };
                orders.push(CutOrder {
                    pipeline: record.id.to_string(),
                    index: index as u32,
                    job: job_table::job_id(job),
                    output: output.clone(),
                    spec: spec.clone(),
                });
            }
        }
        orders
    }

    /// A parallel step's input, cut by the cutter: its mini-batches are kept and
    /// the step made; an input that could not be cut fails the step, saying why.
    pub(super) fn step_cut(
        &mut self,
        id: &str,
        index: u32,
        cuts: std::result::Result<Vec<crate::parallel::Cut>, String>,
        now: Millis,
    ) -> Result<()> {
        let seq = self.job(id)?.seq;
        let Some(step) = self
            .pipeline_mut(seq)
            .and_then(|p| p.steps.get_mut(index as usize))
        else {
            return Err(Error::NotFound(format!("{id} has no step {index}")));
        };
        let Some(parallel) = step.parallel.as_mut().filter(|p| p.counts.is_none()) else {
            return Err(Error::FailedPrecondition(format!(
                "step `{}` of {id} is cut already",
                step.name
            )));
        };
        if step.seq.is_some() || step.skipped.is_some() {
            return Err(Error::FailedPrecondition(format!(
                "step `{}` of {id} has moved on",
                step.name
            )));
        }
        match cuts {
            Ok(cuts) => {
                parallel.counts = Some(cuts.iter().map(|c| c.count).collect());
                let job = job_table::job_id(parallel.job_seq);
                self.new_cuts.push((job, cuts));
            }
            Err(why) => {
                info!(pipeline = %id, step = %step.name, %why, "step input not cut");
                step.skipped = Some(format!("its input could not be cut: {why}"));
                step.ended = Some(JobStatus::Failed);
            }
        }
        self.dirty_jobs.insert(id.to_string());
        self.advance_pipeline(seq, now)
    }

    /// A step has ended: its pipeline's entry says so, and the pipeline goes on.
    pub(super) fn step_ended(&mut self, step: StepOf, status: JobStatus, now: Millis) {
        let Some(entry) = self
            .pipeline_mut(step.pipeline_seq)
            .and_then(|p| p.steps.get_mut(step.index as usize))
        else {
            return;
        };
        entry.ended = Some(status);
        if let (JobStatus::Completed, Some(seq), false) =
            (status, entry.seq, entry.fingerprint.is_empty())
        {
            let fingerprint = entry.fingerprint.clone();
            self.completed_steps.insert(fingerprint, seq);
        }
        if let Err(e) = self.advance_pipeline(step.pipeline_seq, now) {
            warn!(pipeline = step.pipeline_seq, error = %e, "pipeline could not go on");
        }
    }

    /// Cancels a pipeline: its running steps, then the pipeline once they have ended.
    pub(super) fn cancel_pipeline(&mut self, id: &str, now: Millis) -> Result<Job> {
        let seq = self.job(id)?.seq;
        if let Some(record) = self.jobs.get_mut(id) {
            record.status = JobStatus::Canceling;
            record.reason = JobReason::said("canceled by user");
        }
        self.dirty_jobs.insert(id.to_string());
        self.advance_pipeline(seq, now)?;
        self.job(id).map(|j| self.job_out(j, now))
    }
}
