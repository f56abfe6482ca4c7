//! Jobs: requests, specs, attempts, instances, environments, distribution.

use compact_str::CompactString;

use super::*;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum JobStatus {
    Queued,
    Preparing,
    Running,
    /// Canceled by a person or a policy; some instance is still stopping.
    Canceling,
    Completed,
    Failed,
    Canceled,
    TimedOut,
}

impl JobStatus {
    pub fn is_final(self) -> bool {
        matches!(
            self,
            JobStatus::Completed | JobStatus::Failed | JobStatus::Canceled | JobStatus::TimedOut
        )
    }

    /// Final, or on its way there (canceling): it wants no more work.
    pub fn is_ending(self) -> bool {
        self.is_final() || self == JobStatus::Canceling
    }

    pub const ALL: [JobStatus; 8] = [
        JobStatus::Queued,
        JobStatus::Preparing,
        JobStatus::Running,
        JobStatus::Canceling,
        JobStatus::Completed,
        JobStatus::Failed,
        JobStatus::Canceled,
        JobStatus::TimedOut,
    ];

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|s| s.as_str() == text)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Queued => "queued",
            JobStatus::Preparing => "preparing",
            JobStatus::Running => "running",
            JobStatus::Canceling => "canceling",
            JobStatus::Completed => "completed",
            JobStatus::Failed => "failed",
            JobStatus::Canceled => "canceled",
            JobStatus::TimedOut => "timed_out",
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InstanceStatus {
    /// Sent to the node, not yet started.
    Launching,
    Running,
    /// Told to stop; its agent has not said it has.
    Stopping,
    Completed,
    Failed,
    Canceled,
    TimedOut,
    /// Its node went away: the attempt is requeued.
    Lost,
    /// Its low-priority node was preempted: the job is requeued.
    Preempted,
}

impl InstanceStatus {
    pub fn is_final(self) -> bool {
        !matches!(
            self,
            InstanceStatus::Launching | InstanceStatus::Running | InstanceStatus::Stopping
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            InstanceStatus::Launching => "launching",
            InstanceStatus::Running => "running",
            InstanceStatus::Stopping => "stopping",
            InstanceStatus::Completed => "completed",
            InstanceStatus::Failed => "failed",
            InstanceStatus::Canceled => "canceled",
            InstanceStatus::TimedOut => "timed_out",
            InstanceStatus::Lost => "lost",
            InstanceStatus::Preempted => "preempted",
        }
    }

    /// The outcome words agents report.
    pub fn from_outcome(outcome: &str, exit_code: Option<i32>) -> Self {
        match outcome {
            "canceled" => InstanceStatus::Canceled,
            "timed_out" => InstanceStatus::TimedOut,
            "preempted" => InstanceStatus::Preempted,
            "completed" if exit_code == Some(0) => InstanceStatus::Completed,
            _ => InstanceStatus::Failed,
        }
    }
}

/// What a job runs, after validation.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct JobSpec {
    /// Empty when none was given: `Job::name` is then its id.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub name: String,
    pub cluster: CompactString,
    /// The exact argv each instance runs (a YAML `command` becomes `sh -c <command>`);
    /// short words (most are) are kept inline.
    pub argv: Vec<CompactString>,
    /// The command line as the user wrote it, when given as one.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub command: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub environment_variables: BTreeMap<String, String>,
    pub instance_count: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeout_seconds: Option<std::num::NonZeroU64>,
    /// Where the coordinator keeps the code snapshot, when there is one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code_path: Option<String>,
    /// The container image it runs in; None: a plain process.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<String>,
    /// Preemptions it is requeued after before it fails.
    #[serde(
        default = "default_max_preemptions",
        skip_serializing_if = "is_default_max_preemptions"
    )]
    pub max_preemptions: u32,
    #[serde(default, skip_serializing_if = "super::is_zero")]
    pub gpus_per_instance: u32,
    /// The share of a node each instance gets; the whole node when none is asked.
    #[serde(default, skip_serializing_if = "Resources::is_whole")]
    pub resources: Resources,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub distribution: Option<Distribution>,
    /// A parallel (batch inference) job: how its mini-batches run.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parallel: Option<Box<crate::parallel::ParallelSpec>>,
    /// Most jobs have none of it, and every queued job is held in memory: a
    /// job without any holds no allocation for it.
    #[serde(flatten)]
    pub extras: Extras,
}

/// What each instance of a job asks of its node besides GPUs: a share of its
/// cores and memory, or (nothing asked) the whole node, the service's model.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Resources {
    /// Thousandths of a core (1000: one core); 0: the whole node.
    #[serde(default)]
    pub millicpus: u32,
    /// Memory reserved and enforced, in MiB (a queued job holds this, so it is
    /// kept small); 0: none reserved, and no limit.
    #[serde(default)]
    pub memory_mib: u32,
}

impl Resources {
    /// The whole node: nothing else runs beside it.
    pub const WHOLE: Resources = Resources {
        millicpus: 0,
        memory_mib: 0,
    };

    /// As the wire has it: thousandths of a core, and bytes (rounded up to MiB).
    pub fn from_wire(millicpus: u32, memory_bytes: u64) -> Self {
        Resources {
            millicpus,
            memory_mib: u32::try_from(memory_bytes.div_ceil(1 << 20)).unwrap_or(u32::MAX),
        }
    }

    pub fn memory_bytes(&self) -> u64 {
        u64::from(self.memory_mib) << 20
    }

    pub fn is_whole(&self) -> bool {
        self.millicpus == 0
    }

    /// A share of `cpus` cores (fractions to the thousandth) and `memory_bytes`;
    /// memory alone asks for one core. Nothing asked: the whole node.
    pub fn share(cpus: f64, memory_bytes: u64) -> Result<Self> {
        if !(cpus.is_finite() && cpus >= 0.0) {
            return Err(Error::invalid(
                "resources.cpus",
                format!("`{cpus}` is not a number of cores"),
            ));
        }
        let millicpus = (cpus * 1000.0).round();
        if cpus > 0.0 && millicpus < 1.0 {
            return Err(Error::invalid(
                "resources.cpus",
                "at least 0.001 (a thousandth of a core)",
            ));
        }
        if millicpus > f64::from(u32::MAX) {
            return Err(Error::invalid(
                "resources.cpus",
                format!("{cpus} cores is too many"),
            ));
        }
        let millicpus = millicpus as u32;
        Ok(Resources::from_wire(
            if millicpus == 0 && memory_bytes > 0 {
                1000
            } else {
                millicpus
            },
            memory_bytes,
        ))
    }

    /// Cores, as people write them (`0.5`, `2`).
    pub fn cpus(&self) -> f64 {
        f64::from(self.millicpus) / 1000.0
    }
}

impl std::fmt::Display for Resources {
    /// `2 cpus, 4 GiB`; `the whole node`.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.is_whole() {
            return f.write_str("the whole node");
        }
        f.write_str(&cpus_words(self.millicpus))?;
        if self.memory_mib > 0 {
            write!(f, ", {}", human_bytes(self.memory_bytes()))?;
        }
        Ok(())
    }
}

/// `1 cpu`, `0.5 cpus`, `4 cpus`: thousandths of a core as people read them.
pub fn cpus_words(millicpus: u32) -> String {
    let cpus = f64::from(millicpus) / 1000.0;
    format!("{cpus} cpu{}", if millicpus == 1000 { "" } else { "s" })
}

/// `512 MiB`, `4 GiB`, `1.5 GiB`: memory as people read it.
pub fn human_bytes(bytes: u64) -> String {
    const UNITS: [&str; 4] = ["KiB", "MiB", "GiB", "TiB"];
    if bytes < 1024 {
        return format!("{bytes} B");
    }
    let mut value = bytes as f64;
    let mut unit = "B";
    for next in UNITS {
        if value < 1024.0 {
            break;
        }
        value /= 1024.0;
        unit = next;
    }
    let rounded = (value * 10.0).round() / 10.0;
    format!("{rounded} {unit}")
}

/// A job array: one submission of tasks `start, start+step, ... ≤ end`, each
/// a job of its own that knows its index; at most `max_concurrent` at once
/// (0: no limit).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArraySpec {
    pub start: u32,
    pub end: u32,
    #[serde(default = "one")]
    pub step: u32,
    #[serde(default)]
    pub max_concurrent: u32,
}

/// The most tasks one array may have.
pub const MAX_ARRAY_TASKS: u32 = 1_000_000;

impl ArraySpec {
    /// Slurm's spelling: `0-9999`, `1-100:2`, `0-999%10`, `7`.
    pub fn parse(text: &str) -> Result<Self> {
        let bad = || {
            Error::invalid(
                "array",
                format!("`{text}` is not an array like 0-9999, 1-100:2 or 0-999%10"),
            )
        };
        let number = |s: &str| s.trim().parse::<u32>().map_err(|_| bad());
        let (range, max_concurrent) = match text.split_once('%') {
            Some((range, max)) => (range, number(max)?),
            None => (text, 0),
        };
        let (range, step) = match range.split_once(':') {
            Some((range, step)) => (range, number(step)?),
            None => (range, 1),
        };
        let (start, end) = match range.split_once('-') {
            Some((start, end)) => (number(start)?, number(end)?),
            None => (number(range)?, number(range)?),
        };
        let spec = ArraySpec {
            start,
            end,
            step,
            max_concurrent,
        };
        spec.check()?;
        Ok(spec)
    }

    pub fn check(&self) -> Result<()> {
        if self.step == 0 {
            return Err(Error::invalid("array.step", "must be at least 1"));
        }
        if self.end < self.start {
            return Err(Error::invalid(
                "array",
                format!("ends ({}) before it starts ({})", self.end, self.start),
            ));
        }
        let count = u64::from((self.end - self.start) / self.step) + 1;
        if count > u64::from(MAX_ARRAY_TASKS) {
            return Err(Error::invalid(
                "array",
                format!("{count} tasks; at most {MAX_ARRAY_TASKS} in one array"),
            ));
        }
        Ok(())
    }

    /// Tasks in it (`check` keeps it within `MAX_ARRAY_TASKS`).
    pub fn count(&self) -> u32 {
        (self.end.saturating_sub(self.start) / self.step.max(1)).saturating_add(1)
    }

    /// The index of its `k`th task (`SHOAL_ARRAY_INDEX`).
    pub fn index(&self, k: u32) -> u32 {
        self.start + k * self.step
    }

    /// Which task has this index, if one does.
    pub fn position(&self, index: u32) -> Option<u32> {
        (index >= self.start && index <= self.end && (index - self.start).is_multiple_of(self.step))
            .then(|| (index - self.start) / self.step)
    }
}

impl std::fmt::Display for ArraySpec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}-{}", self.start, self.end)?;
        if self.step != 1 {
            write!(f, ":{}", self.step)?;
        }
        if self.max_concurrent > 0 {
            write!(f, "%{}", self.max_concurrent)?;
        }
        Ok(())
    }
}

/// An array's own record: its tasks are the jobs right after it, in index
/// order (`Task::seq`), counted by status as they change (one place:
/// `Control::account_arrays`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ArrayState {
    pub spec: ArraySpec,
    /// Tasks eligible to run: the first `released` (all, with no limit).
    pub released: u32,
    /// Tasks by status.
    pub counts: BTreeMap<JobStatus, u32>,
    /// Canceled as a whole: tasks still running are stopping.
    #[serde(default)]
    pub canceled: bool,
    /// Tasks that ended while held back (canceled alone): ended, never in flight.
    #[serde(default)]
    pub ended_held: u32,
}

impl ArrayState {
    pub fn count(&self, status: JobStatus) -> u32 {
        self.counts.get(&status).copied().unwrap_or(0)
    }

    /// Released tasks that have not ended: queued to run, or running.
    pub fn in_flight(&self) -> u32 {
        (self.released + self.ended_held).saturating_sub(self.ended())
    }

    /// Tasks that have ended.
    pub fn ended(&self) -> u32 {
        self.counts
            .iter()
            .filter(|(s, _)| s.is_final())
            .map(|(_, n)| n)
            .sum()
    }

    /// The array's own status, from its tasks'.
    pub fn status(&self) -> JobStatus {
        let total = self.spec.count();
        if self.ended() >= total {
            return if self.count(JobStatus::Completed) == total {
                JobStatus::Completed
            } else if self.count(JobStatus::Failed) + self.count(JobStatus::TimedOut) > 0 {
                JobStatus::Failed
            } else {
                JobStatus::Canceled
            };
        }
        if self.canceled {
            return JobStatus::Canceling;
        }
        let started = [
            JobStatus::Preparing,
            JobStatus::Running,
            JobStatus::Canceling,
        ]
        .iter()
        .map(|s| self.count(*s))
        .sum::<u32>();
        if started + self.ended() > 0 {
            JobStatus::Running
        } else {
            JobStatus::Queued
        }
    }

    /// How it stands, in words: `7 of 10 tasks completed, 1 failed, 2 running`.
    pub fn summary(&self) -> String {
        let mut parts = vec![format!(
            "{} of {} tasks completed",
            self.count(JobStatus::Completed),
            self.spec.count()
        )];
        for status in JobStatus::ALL {
            let n = self.count(status);
            if n > 0 && status != JobStatus::Completed {
                parts.push(format!("{n} {}", status.as_str()));
            }
        }
        parts.join(", ")
    }
}

/// A task of an array: its array's sequence number and its index. It is the
/// array's `k`th task, `job-<array_seq + 1 + k>`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Task {
    pub array_seq: u64,
    pub index: u32,
    /// The status its array last counted it as (rebuilt on load).
    #[serde(skip)]
    pub counted: Option<JobStatus>,
}

impl Task {
    /// The sequence number of the task at `position` of the array `array_seq`.
    pub fn seq(array_seq: u64, position: u32) -> u64 {
        array_seq + 1 + u64::from(position)
    }

    /// Its position in its array, from its own sequence number.
    pub fn position(&self, seq: u64) -> u32 {
        u32::try_from(seq.saturating_sub(Task::seq(self.array_seq, 0))).unwrap_or(u32::MAX)
    }
}

/// A sweep's own record: its spec, and one entry per trial made so far (trial
/// `k` is the job `trials[k].seq`), kept by the core as trials end and as the
/// conductor records their results, so the sweep never needs its trials in memory.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SweepState {
    pub spec: crate::sweep::SweepSpec,
    pub trials: Vec<TrialEntry>,
    /// The best trial, once the sweep has ended with one.
    #[serde(default)]
    pub best: Option<u32>,
}

impl SweepState {
    /// Trials that have not ended.
    pub fn live(&self) -> usize {
        self.trials.iter().filter(|t| t.ended.is_none()).count()
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct TrialEntry {
    pub seq: u64,
    pub params: crate::sweep::Params,
    #[serde(default)]
    pub ended: Option<JobStatus>,
    /// Its result is recorded (`score`, or that it has none).
    #[serde(default)]
    pub settled: bool,
    /// Its primary metric's last value, when it completed with one.
    #[serde(default)]
    pub score: Option<f64>,
}

/// A trial of a sweep: the sweep's sequence number and the trial's index.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Trial {
    pub sweep_seq: u64,
    pub index: u32,
}

/// A pipeline's own record: its steps, each a job made when the steps it reads
/// from have completed (so a restarted coordinator makes none twice), kept by the
/// core as steps end. Steps are in an order where each comes after those it reads.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PipelineState {
    pub steps: Vec<PipelineStep>,
    /// A failed step does not stop the others (those that read from it never run).
    #[serde(default)]
    pub continue_on_step_failure: bool,
    /// The pipeline's outputs: each is a step's named output.
    #[serde(default)]
    pub outputs: BTreeMap<String, StepOutput>,
    /// Every step runs, even one identical to a completed earlier step.
    #[serde(default)]
    pub force_rerun: bool,
}

impl PipelineState {
    /// Steps made and not ended.
    pub fn live(&self) -> usize {
        self.steps
            .iter()
            .filter(|s| s.seq.is_some() && s.ended.is_none())
            .count()
    }

    /// Every step has ended or will never run.
    pub fn settled(&self) -> bool {
        self.steps
            .iter()
            .all(|s| s.ended.is_some() || s.skipped.is_some())
    }

    pub fn index_of(&self, name: &str) -> Option<usize> {
        self.steps.iter().position(|s| s.name == name)
    }
}

/// One step of a pipeline: the job it runs, and what became of it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PipelineStep {
    pub name: String,
    /// What it runs; an input read from another step is `DataSource::Step` here,
    /// and that step's job's output (`DataSource::Output`) in the job made.
    pub spec: JobSpec,
    /// The steps whose outputs it reads (each before it in the list).
    pub after: Vec<u32>,
    /// Its job, once made.
    #[serde(default)]
    pub seq: Option<u64>,
    #[serde(default)]
    pub ended: Option<JobStatus>,
    /// Why it never ran: a step it reads from did not complete, or the pipeline stopped.
    #[serde(default)]
    pub skipped: Option<String>,
    /// What makes a run of it the same as another's (what it runs and reads, by
    /// content); empty: never reused.
    #[serde(default)]
    pub fingerprint: String,
    /// Its job is an earlier identical step's, reused (`seq` is that job).
    #[serde(default)]
    pub reused: bool,
    /// A sweep step: its job is a sweep of `spec`'s trials.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sweep: Option<crate::sweep::SweepSpec>,
    /// A parallel step: its input's mini-batches, kept under its job's id before
    /// the job is made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parallel: Option<ParallelStep>,
}

/// A parallel step's input: cut at submit, or (read from another step) once that
/// step has completed.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ParallelStep {
    /// Its job's sequence number, reserved at submit (its mini-batches are kept under it).
    pub job_seq: u64,
    /// The step output it cuts, when it reads one.
    #[serde(default)]
    pub from: Option<StepOutput>,
    /// Items per mini-batch, once cut.
    #[serde(default)]
    pub counts: Option<Vec<u64>>,
}

/// A step's named output.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepOutput {
    pub step: String,
    pub output: String,
}

/// A step of a pipeline: the pipeline's sequence number and the step's index.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepOf {
    pub pipeline_seq: u64,
    pub index: u32,
}

/// A pipeline as submitted: its steps as requests, checked by the core against
/// their clusters.
#[derive(Clone, Debug, Default)]
pub struct PipelineRequest {
    pub steps: Vec<StepRequest>,
    pub continue_on_step_failure: bool,
    pub force_rerun: bool,
    pub outputs: BTreeMap<String, StepOutput>,
}

#[derive(Clone, Debug, Default)]
pub struct StepRequest {
    pub name: String,
    pub request: JobRequest,
    /// The steps it reads from (each before it).
    pub after: Vec<u32>,
    /// See `PipelineStep::fingerprint`.
    pub fingerprint: String,
    /// A parallel step whose input is another step's output (cut once it exists).
    pub cut_from: Option<StepOutput>,
}

/// A job's `JobExtras`, allocated only when it has some: reads see the empty
/// ones otherwise. Stored flattened into the spec, as `JobExtras` always was.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(from = "JobExtras", into = "JobExtras")]
pub struct Extras(Option<Box<JobExtras>>);

static NO_EXTRAS: JobExtras = JobExtras::EMPTY;

impl From<JobExtras> for Extras {
    fn from(extras: JobExtras) -> Self {
        Extras((extras != JobExtras::EMPTY).then(|| Box::new(extras)))
    }
}

impl std::ops::Deref for Extras {
    type Target = JobExtras;

    fn deref(&self) -> &JobExtras {
        self.0.as_deref().unwrap_or(&NO_EXTRAS)
    }
}

impl From<Extras> for JobExtras {
    fn from(extras: Extras) -> Self {
        extras.0.map(|boxed| *boxed).unwrap_or_default()
    }
}

/// What admission adds to a job from its job file (never from a bare request):
/// its data, where its environment came from, and what people wrote about it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct JobExtras {
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub inputs: BTreeMap<String, crate::data::DataInput>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub outputs: BTreeMap<String, crate::data::DataOutput>,
    /// Keys of the job file that have no effect here, each with why.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub experiment_name: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub description: String,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub tags: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub properties: BTreeMap<String, String>,
    /// How its environment was named (`azureml:sklearn@latest`), when it was.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub environment: String,
    /// A host environment's venv or conda prefix, first on PATH.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path_prefix: Option<String>,
    /// A container's shared memory.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shm_size_bytes: Option<u64>,
}

impl JobExtras {
    /// None of it: what a bare request has.
    pub const EMPTY: JobExtras = JobExtras {
        inputs: BTreeMap::new(),
        outputs: BTreeMap::new(),
        warnings: Vec::new(),
        experiment_name: String::new(),
        description: String::new(),
        tags: BTreeMap::new(),
        properties: BTreeMap::new(),
        environment: String::new(),
        path_prefix: None,
        shm_size_bytes: None,
    };
}

/// An environment registered here (`shoal environment create`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Environment {
    pub name: String,
    pub version: String,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    pub kind: EnvironmentKind,
    /// How it was defined (an image, a build context, a conda file on an image).
    #[serde(default)]
    pub defined_by: String,
    #[serde(default)]
    pub archived: bool,
    pub created_at: Millis,
}

/// A registered command component (the commandComponent schema), named and
/// versioned: pipeline steps name it (`component: azureml:NAME:VERSION`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Component {
    pub name: String,
    pub version: String,
    #[serde(default)]
    pub display_name: String,
    #[serde(default)]
    pub description: String,
    /// Its definition as written, `code` left out (kept apart: `code_path`).
    pub definition: serde_json::Value,
    /// Its code folder's snapshot, kept by the coordinator.
    #[serde(default)]
    pub code_path: Option<String>,
    pub created_at: Millis,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EnvironmentKind {
    /// Jobs run in containers of this image (built here, if it was built).
    Image { image: String },
    /// Jobs run as processes on the node's own software.
    Host { prefix: Option<String> },
}

/// How a distributed job's processes find each other.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "lowercase", deny_unknown_fields)]
pub enum Distribution {
    /// P processes per instance with MASTER_ADDR/PORT, WORLD_SIZE, RANK, LOCAL_RANK...
    Pytorch {
        #[serde(default = "one")]
        process_count_per_instance: u32,
    },
    /// One task per instance: workers first, then parameter servers; TF_CONFIG.
    Tensorflow {
        #[serde(default = "one")]
        worker_count: u32,
        #[serde(default)]
        parameter_server_count: u32,
    },
    Mpi {
        #[serde(default = "one")]
        process_count_per_instance: u32,
    },
}

pub(super) fn one() -> u32 {
    1
}

impl Distribution {
    /// Processes each instance runs.
    pub fn processes_per_instance(&self) -> u32 {
        match self {
            Distribution::Pytorch {
                process_count_per_instance,
            }
            | Distribution::Mpi {
                process_count_per_instance,
            } => *process_count_per_instance,
            Distribution::Tensorflow { .. } => 1,
        }
    }

    /// Processes the agent starts per instance: mpirun starts an MPI job's ranks.
    pub fn agent_processes(&self) -> u32 {
        match self {
            Distribution::Mpi { .. } => 1,
            other => other.processes_per_instance(),
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Distribution::Pytorch { .. } => "pytorch",
            Distribution::Tensorflow { .. } => "tensorflow",
            Distribution::Mpi { .. } => "mpi",
        }
    }
}

pub const DEFAULT_MAX_PREEMPTIONS: u32 = 10;

pub(super) fn default_max_preemptions() -> u32 {
    DEFAULT_MAX_PREEMPTIONS
}

fn is_default_max_preemptions(n: &u32) -> bool {
    *n == DEFAULT_MAX_PREEMPTIONS
}

#[derive(Clone, Debug, Default)]
pub struct JobRequest {
    pub name: String,
    pub cluster: String,
    pub argv: Vec<String>,
    pub command: String,
    pub environment_variables: BTreeMap<String, String>,
    pub instance_count: u32,
    pub timeout_seconds: u64,
    pub code_path: Option<String>,
    pub image: String,
    pub max_preemptions: Option<u32>,
    pub gpus_per_instance: u32,
    /// Each instance's share of its node (`Resources::WHOLE`: the whole node).
    pub resources: Resources,
    /// Many tasks of this job in one submission.
    pub array: Option<ArraySpec>,
    /// A sweep: this job is its trials' template (`${{search_space.X}}` in its command).
    pub sweep: Option<crate::sweep::SweepSpec>,
    /// A pipeline: this request is its record's, and runs nothing itself.
    pub pipeline: Option<PipelineRequest>,
    pub distribution: Option<Distribution>,
    /// A parallel job, with its input already cut into mini-batches.
    pub parallel: Option<(crate::parallel::ParallelSpec, Vec<crate::parallel::Cut>)>,
    pub extras: JobExtras,
}

impl JobSpec {
    /// Checks a request against the cluster it names (whose nodes are of `size`).
    pub fn from_request(
        request: JobRequest,
        cluster: &ClusterSpec,
        size: &crate::vmsize::VmSize,
    ) -> Result<Self> {
        let vm_gpus = size.gpus;
        let instance_count = check_distribution(&request, cluster)?;
        if let Some((parallel, _)) = &request.parallel {
            parallel.check()?;
            if request.distribution.is_some() {
                return Err(Error::invalid(
                    "distribution",
                    "a parallel job spreads mini-batches itself; leave distribution out",
                ));
            }
        }
        if request.gpus_per_instance > vm_gpus {
            return Err(Error::invalid(
                "resources.gpus_per_instance",
                format!(
                    "{} GPU(s) per instance, but cluster `{}` is made of {} with {vm_gpus}",
                    request.gpus_per_instance, cluster.name, cluster.vm_size
                ),
            ));
        }
        let share = request.resources;
        if share.millicpus > size.cores.saturating_mul(1000) {
            return Err(Error::invalid(
                "resources.cpus",
                format!(
                    "{} cpus per instance, but cluster `{}` is made of {} with {}",
                    share.cpus(),
                    cluster.name,
                    cluster.vm_size,
                    size.cores
                ),
            ));
        }
        if share.memory_bytes() > size.memory_bytes() {
            return Err(Error::invalid(
                "resources.memory",
                format!(
                    "{} per instance, but cluster `{}` is made of {} with {}",
                    human_bytes(share.memory_bytes()),
                    cluster.name,
                    cluster.vm_size,
                    human_bytes(size.memory_bytes())
                ),
            ));
        }
        if !share.is_whole() && request.distribution.is_some() {
            return Err(Error::invalid(
                "resources.cpus",
                "a distributed job takes whole nodes (its ranks are laid out per node); leave cpus and memory out",
            ));
        }
        let argv = match (request.argv.is_empty(), request.command.trim().is_empty()) {
            (false, true) => request.argv,
            (true, false) => vec!["sh".into(), "-c".into(), request.command.clone()],
            (false, false) => {
                return Err(Error::invalid(
                    "command",
                    "give either a command line or an argv, not both",
                ));
            }
            (true, true) => {
                return Err(Error::invalid(
                    "command",
                    "a job needs a command (YAML `command:`, or the words after `--`)",
                ));
            }
        };
        if argv[0].is_empty() {
            return Err(Error::invalid("command", "the program name is empty"));
        }
        if instance_count > cluster.max_nodes {
            return Err(Error::invalid(
                "resources.instance_count",
                format!(
                    "{instance_count} instances need {instance_count} nodes, but cluster `{}` has max_nodes {}",
                    cluster.name, cluster.max_nodes
                ),
            ));
        }
        if let Some(key) = request
            .environment_variables
            .keys()
            .find(|k| k.is_empty() || k.contains('=') || k.contains('\0'))
        {
            return Err(Error::invalid(
                "environment_variables",
                format!("`{key}` is not a valid variable name"),
            ));
        }
        let image = request.image.trim().to_string();
        if image.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(Error::invalid(
                "environment.image",
                format!("`{image}` is not an image name"),
            ));
        }
        if request.timeout_seconds > MAX_TIMEOUT_SECONDS {
            return Err(Error::invalid(
                "limits.timeout",
                format!(
                    "{} s is more than a year ({MAX_TIMEOUT_SECONDS} s); leave it out for no limit",
                    request.timeout_seconds
                ),
            ));
        }
        if request.name.len() > 256 {
            return Err(Error::invalid("name", "at most 256 characters"));
        }
        Ok(JobSpec {
            name: request.name,
            cluster: cluster.name.as_str().into(),
            argv: argv.into_iter().map(CompactString::from).collect(),
            command: request.command,
            environment_variables: request.environment_variables,
            instance_count,
            timeout_seconds: std::num::NonZeroU64::new(request.timeout_seconds),
            code_path: request.code_path,
            image: (!image.is_empty()).then_some(image),
            max_preemptions: request.max_preemptions.unwrap_or(DEFAULT_MAX_PREEMPTIONS),
            gpus_per_instance: request.gpus_per_instance,
            resources: share,
            distribution: request.distribution,
            parallel: request.parallel.map(|(spec, _)| Box::new(spec)),
            extras: request.extras.into(),
        })
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct InstanceRun {
    pub index: u32,
    pub node: String,
    pub status: InstanceStatus,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
    /// GPU indices it holds on its node.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub gpus: Vec<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    /// The secret its node's agent shows on every call about it (sent with its
    /// Launch; never shown to people).
    #[serde(default)]
    pub token: String,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Attempt {
    pub id: String,
    pub number: u32,
    pub instances: Vec<InstanceRun>,
    pub started_at: Millis,
    pub ended_at: Millis,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
}

impl Attempt {
    pub fn is_settled(&self) -> bool {
        self.instances.iter().all(|i| i.status.is_final())
    }

    /// Ended because a node went away (not preempted): counts against max_attempts.
    pub fn was_lost(&self) -> bool {
        let any = |status| self.instances.iter().any(|i| i.status == status);
        any(InstanceStatus::Lost) && !any(InstanceStatus::Preempted)
    }

    /// The attempt's status, derived from its instances.
    pub fn status(&self) -> &'static str {
        let statuses = || self.instances.iter().map(|i| i.status);
        // Told to stop, not stopped yet: what it ends as comes after.
        if statuses().any(|s| s == InstanceStatus::Stopping) {
            return "stopping";
        }
        if statuses().any(|s| s == InstanceStatus::Preempted) {
            return "preempted";
        }
        if statuses().any(|s| s == InstanceStatus::Lost) {
            return "lost";
        }
        for bad in [
            InstanceStatus::TimedOut,
            InstanceStatus::Failed,
            InstanceStatus::Canceled,
        ] {
            if statuses().any(|s| s == bad) {
                return bad.as_str();
            }
        }
        if statuses().all(|s| s == InstanceStatus::Completed) {
            "completed"
        } else if statuses().all(|s| s == InstanceStatus::Running) {
            "running"
        } else {
            "preparing"
        }
    }
}

/// Why a job waits, or why it ended: a value in the core, words at the edge.
/// Stored as its words, as it always was; read back, "queued" and "" are
/// themselves again, and any other words are the job's own (`Said`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "String", from = "String")]
pub enum JobReason {
    /// Nothing to say (running, or completed).
    #[default]
    None,
    /// Waiting its turn: readers are given its cluster's reason (one for all of
    /// them, kept by the scheduler) instead of a copy in every job.
    Queued,
    /// Back in the queue after an attempt ended early: its own reason, not the
    /// cluster's, until it starts again. (Boxed: it is rare, and every queued
    /// job holds a reason.)
    Requeued(Box<Requeue>),
    /// Placed; its instances are starting on these nodes.
    Starting { nodes: Vec<String> },
    /// Booked on a node to start there when the job before it ends (a successor).
    Next { node: String, after: String },
    /// In words: why it is stopping or why it ended, or what it was told.
    Said(String),
}

/// Why a job went back to the queue.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Requeue {
    /// A node of its attempt went away (`lost` attempts so far, counted
    /// against max_attempts).
    Lost { lost: u32, why: String },
    /// Its low-priority node was preempted (the `count`th time, of at most `limit`).
    Preempted {
        node: String,
        attempt: String,
        count: u32,
        limit: u32,
    },
}

impl JobReason {
    /// Words, or nothing: `Said` of an empty text is no reason.
    pub fn said(text: impl Into<String>) -> Self {
        let text = text.into();
        if text.is_empty() {
            JobReason::None
        } else {
            JobReason::Said(text)
        }
    }

    pub fn is_none(&self) -> bool {
        *self == JobReason::None
    }
}

/// Words back into a reason: "queued" is `Queued` again, any other words the
/// job's own.
impl From<String> for JobReason {
    fn from(text: String) -> Self {
        if text == "queued" {
            JobReason::Queued
        } else {
            JobReason::said(text)
        }
    }
}

impl From<JobReason> for String {
    fn from(reason: JobReason) -> String {
        reason.to_string()
    }
}

impl std::fmt::Display for JobReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            JobReason::None => Ok(()),
            JobReason::Queued => f.write_str("queued"),
            JobReason::Requeued(requeue) => write!(f, "requeued: {requeue}"),
            JobReason::Starting { nodes } => write!(f, "starting on {}", nodes.join(", ")),
            JobReason::Next { node, after } => {
                write!(f, "next on {node}: starts when {after} ends there")
            }
            JobReason::Said(text) => f.write_str(text),
        }
    }
}

impl std::fmt::Display for Requeue {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Requeue::Lost { lost, why } => write!(f, "attempt {lost} lost ({why})"),
            Requeue::Preempted {
                node,
                attempt,
                count,
                limit,
            } => write!(
                f,
                "preempted on node {node} (attempt {attempt}, preemption {count} of at most {limit})"
            ),
        }
    }
}

/// Every queued job is held in memory: its short strings (its id, its
/// cluster's name) are `CompactString`s, kept inline up to 24 bytes.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Job {
    pub id: CompactString,
    pub seq: u64,
    pub spec: JobSpec,
    pub status: JobStatus,
    /// A pointer's worth when empty (as every queued job's are).
    pub attempts: thin_vec::ThinVec<Attempt>,
    pub created_at: Millis,
    pub started_at: Millis,
    pub ended_at: Millis,
    /// Why it waits, or why it ended.
    pub reason: JobReason,
    /// Times a preemption sent it back to the queue.
    #[serde(default, skip_serializing_if = "super::is_zero")]
    pub preemptions: u32,
    /// Things worth a look (an idle GPU).
    #[serde(default, skip_serializing_if = "thin_vec::ThinVec::is_empty")]
    pub flags: thin_vec::ThinVec<String>,
    /// An array's own record (it runs nothing itself: its tasks do).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub array: Option<Box<ArrayState>>,
    /// A task of an array.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub task: Option<Task>,
    /// A sweep's own record (it runs nothing itself: its trials do).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sweep: Option<Box<SweepState>>,
    /// A trial of a sweep.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub trial: Option<Trial>,
    /// A pipeline's own record (it runs nothing itself: its steps do).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pipeline: Option<Box<PipelineState>>,
    /// A step of a pipeline.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub step: Option<StepOf>,
    /// A parallel job's progress (derived, filled in for readers; boxed, as
    /// only readers' copies have it).
    #[serde(skip)]
    pub progress: Option<Box<crate::parallel::Progress>>,
}

impl Job {
    /// Its name: the one it was given, else its id (not kept twice).
    pub fn name(&self) -> &str {
        if self.spec.name.is_empty() {
            &self.id
        } else {
            &self.spec.name
        }
    }

    pub fn current_attempt(&self) -> Option<&Attempt> {
        self.attempts.last()
    }

    /// The id its next attempt gets: `<job>.<number>`, numbered from 1.
    pub fn next_attempt_id(&self) -> String {
        format!("{}.{}", self.id, self.attempts.len() + 1)
    }

    /// An array's, a sweep's or a pipeline's own record: it runs nothing itself.
    pub fn is_record(&self) -> bool {
        self.array.is_some() || self.sweep.is_some() || self.pipeline.is_some()
    }

    /// The record it belongs to: its array's, its sweep's or its pipeline's.
    pub fn parent_seq(&self) -> Option<u64> {
        self.task
            .map(|t| t.array_seq)
            .or(self.trial.map(|t| t.sweep_seq))
            .or(self.step.map(|s| s.pipeline_seq))
    }

    /// Final, and no instance of any attempt still runs: nothing more can happen to it.
    pub fn is_settled(&self) -> bool {
        self.status.is_final() && self.attempts.iter().all(Attempt::is_settled)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A job as an earlier version stored it: reason in words, the name a copy
    /// of the id, every `JobExtras` key flattened into the spec.
    fn stored(reason: &str, experiment: &str) -> String {
        format!(
            r#"{{"id":"job-3","seq":3,"spec":{{"name":"job-3","cluster":"cpu","argv":["sh","-c","echo hi"],
            "command":"echo hi","environment_variables":{{}},"instance_count":1,"timeout_seconds":null,
            "code_path":null,"image":null,"max_preemptions":10,"gpus_per_instance":0,"distribution":null,
            "parallel":null,"inputs":{{}},"outputs":{{}},"warnings":[],"experiment_name":"{experiment}",
            "description":"","tags":{{}},"properties":{{}},"environment":"","path_prefix":null,
            "shm_size_bytes":null}},"status":"queued","attempts":[],"created_at":1,"started_at":0,
            "ended_at":0,"reason":"{reason}","preemptions":0,"flags":[]}}"#
        )
    }

    #[test]
    fn jobs_stored_by_an_earlier_version_read_back_with_their_meaning() {
        let queued: Job = serde_json::from_str(&stored("queued", "")).expect("a queued job");
        assert_eq!(queued.reason, JobReason::Queued);
        assert_eq!(queued.name(), "job-3");
        assert_eq!(queued.spec.argv, vec!["sh", "-c", "echo hi"]);
        assert_eq!(
            queued.spec.extras,
            Extras::default(),
            "no extras, no allocation"
        );
        let requeued: Job = serde_json::from_str(&stored("requeued: attempt 1 lost (gone)", "exp"))
            .expect("a requeued job");
        assert_eq!(
            requeued.reason,
            JobReason::Said("requeued: attempt 1 lost (gone)".into()),
            "its own words, not its cluster's reason"
        );
        assert_eq!(requeued.spec.extras.experiment_name, "exp");
        let none: Job = serde_json::from_str(&stored("", "")).expect("a job with no reason");
        assert!(none.reason.is_none());
    }

    #[test]
    fn a_job_is_stored_as_before() {
        let mut job: Job = serde_json::from_str(&stored("queued", "exp")).expect("a job");
        job.reason = JobReason::Requeued(Box::new(Requeue::Preempted {
            node: "n1".into(),
            attempt: "job-3.1".into(),
            count: 1,
            limit: 10,
        }));
        let body: serde_json::Value = serde_json::to_value(&job).expect("encoded");
        assert_eq!(
            body["reason"],
            "requeued: preempted on node n1 (attempt job-3.1, preemption 1 of at most 10)"
        );
        assert_eq!(
            body["spec"]["experiment_name"], "exp",
            "extras stay flattened"
        );
        assert_eq!(body["spec"]["argv"][2], "echo hi");
        let plain = JobSpec {
            extras: JobExtras::default().into(),
            ..job.spec.clone()
        };
        let body = serde_json::to_value(&plain).expect("encoded");
        assert!(body.get("inputs").is_none(), "empty extras are left out");
        let back: JobSpec = serde_json::from_value(body).expect("decoded");
        assert_eq!(back, plain);
    }

    #[test]
    fn a_row_leaves_out_what_holds_its_default_and_reads_back_the_same() {
        // As an earlier version wrote it, every default spelled out; then run.
        let mut job: Job = serde_json::from_str(&stored("", "")).expect("a job");
        job.spec.name.clear();
        job.spec.command.clear();
        job.attempts.push(Attempt {
            id: "job-3.1".into(),
            number: 1,
            instances: vec![InstanceRun {
                index: 0,
                node: "n1".into(),
                status: InstanceStatus::Completed,
                exit_code: Some(0),
                message: String::new(),
                gpus: Vec::new(),
                usage: Some(Usage {
                    cpu_seconds: 0.25,
                    ..Usage::default()
                }),
                token: "t".into(),
            }],
            started_at: 2,
            ended_at: 3,
            reason: String::new(),
        });
        let row = serde_json::to_string(&job).expect("encoded");
        for left_out in [
            "\"name\"",
            "\"command\"",
            "environment_variables",
            "timeout_seconds",
            "max_preemptions",
            "inputs",
            "tags",
            "preemptions",
            "flags",
            "message",
            "gpu_energy_joules",
        ] {
            assert!(!row.contains(left_out), "{left_out} in {row}");
        }
        assert!(row.len() < 400, "{} bytes: {row}", row.len());
        let back: Job = serde_json::from_str(&row).expect("decoded");
        assert_eq!(back.spec, job.spec);
        assert_eq!(back.spec.max_preemptions, DEFAULT_MAX_PREEMPTIONS);
        let instance = &back.attempts[0].instances[0];
        assert_eq!(instance.exit_code, Some(0));
        assert_eq!(instance.usage.as_ref().map(|u| u.cpu_seconds), Some(0.25));
        assert_eq!(serde_json::to_string(&back).expect("encoded"), row);
        // What is not a default is written: a spec's own preemption limit.
        job.spec.max_preemptions = 0;
        let row = serde_json::to_string(&job).expect("encoded");
        let back: Job = serde_json::from_str(&row).expect("decoded");
        assert_eq!(back.spec.max_preemptions, 0);
    }
}
