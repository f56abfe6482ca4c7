//! Domain types: clusters, nodes, jobs and attempts, and the rules that check a
//! user's input before anything is stored. Wire types never leak in here.

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::vmsize::Catalog;
use crate::{Error, Result};

/// Unix milliseconds: the one clock unit of the model (0 = not yet).
pub type Millis = i64;

pub fn now_ms() -> Millis {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as Millis)
        .unwrap_or(0)
}

/// Time limits (job timeout, idle timeout) above a year are refused: they are typos,
/// and they would overflow clock arithmetic.
pub const MAX_TIMEOUT_SECONDS: u64 = 366 * 24 * 3600;
/// Processes one instance of a distributed job may run.
pub const MAX_PROCESSES_PER_INSTANCE: u32 = 1024;

/// A cluster has at most this many nodes with inter-node communication on.
pub const MAX_NODES_WITH_INTERNODE: u32 = 100;
/// ... and at most this many with it off.
pub const MAX_NODES_WITHOUT_INTERNODE: u32 = 4000;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    Dedicated,
    #[serde(alias = "low_priority")]
    LowPriority,
}

impl Priority {
    pub fn parse(text: &str) -> Result<Self> {
        match text.to_ascii_lowercase().as_str() {
            "" | "dedicated" => Ok(Priority::Dedicated),
            "lowpriority" | "low_priority" | "low-priority" => Ok(Priority::LowPriority),
            other => Err(Error::invalid(
                "vm_priority",
                format!("`{other}` is neither `dedicated` nor `lowpriority`"),
            )),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Priority::Dedicated => "dedicated",
            Priority::LowPriority => "lowpriority",
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProviderKind {
    #[default]
    Local,
    Docker,
    /// An agent started by hand on its own machine, joined with a join token.
    Joined,
}

impl ProviderKind {
    pub fn parse(text: &str) -> Result<Self> {
        match text.to_ascii_lowercase().as_str() {
            "" | "local" => Ok(ProviderKind::Local),
            "docker" => Ok(ProviderKind::Docker),
            "static" | "command" => Err(Error::invalid(
                "provider",
                format!(
                    "the `{text}` provider is not available in this build yet; use `local` or `docker`"
                ),
            )),
            other => Err(Error::invalid(
                "provider",
                format!("unknown provider `{other}`; the providers are: local, docker"),
            )),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ProviderKind::Local => "local",
            ProviderKind::Docker => "docker",
            ProviderKind::Joined => "joined",
        }
    }
}

/// What a user asks for; `Option`s are "use the default".
#[derive(Clone, Debug, Default)]
pub struct ClusterRequest {
    pub name: String,
    pub vm_size: String,
    pub vm_priority: String,
    pub min_nodes: Option<u32>,
    pub max_nodes: Option<u32>,
    pub idle_seconds_before_scaledown: Option<u64>,
    pub description: String,
    pub tags: BTreeMap<String, String>,
    pub provider: String,
    pub internode_communication: Option<bool>,
    pub cancel_idle_gpu_jobs: Option<bool>,
    /// Managed identities its jobs may use: `[system]` (its own), user-assigned
    /// ones by name, client id or resource id.
    pub identities: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClusterSpec {
    pub name: String,
    pub vm_size: String,
    pub vm_priority: Priority,
    pub min_nodes: u32,
    pub max_nodes: u32,
    pub idle_seconds_before_scaledown: u64,
    pub description: String,
    pub tags: BTreeMap<String, String>,
    pub provider: ProviderKind,
    pub internode_communication: bool,
    /// Policy: cancel a job whose GPUs sit idle past the idle-GPU time.
    #[serde(default)]
    pub cancel_idle_gpu_jobs: bool,
}

impl ClusterSpec {
    /// Checks a request and fills in the defaults (min 0, max 4, idle 120 s, dedicated, local).
    pub fn from_request(request: ClusterRequest, catalog: &Catalog) -> Result<Self> {
        validate_cluster_name(&request.name)?;
        if request.vm_size.is_empty() {
            return Err(Error::invalid(
                "vm_size",
                "required; `shoal vm-size list` shows the sizes",
            ));
        }
        let size = catalog.resolve(&request.vm_size)?;
        let spec = ClusterSpec {
            name: request.name,
            vm_size: size.name.clone(),
            vm_priority: Priority::parse(&request.vm_priority)?,
            min_nodes: request.min_nodes.unwrap_or(0),
            max_nodes: request.max_nodes.unwrap_or(4),
            idle_seconds_before_scaledown: request.idle_seconds_before_scaledown.unwrap_or(120),
            description: request.description,
            tags: request.tags,
            provider: ProviderKind::parse(&request.provider)?,
            internode_communication: request.internode_communication.unwrap_or(true),
            cancel_idle_gpu_jobs: request.cancel_idle_gpu_jobs.unwrap_or(false),
        };
        spec.validate_sizes()?;
        validate_tags(&spec.tags)?;
        Ok(spec)
    }

    /// The node-count rules, checked at creation and after every update.
    pub fn validate_sizes(&self) -> Result<()> {
        let cap = self.node_cap();
        if self.idle_seconds_before_scaledown > MAX_TIMEOUT_SECONDS {
            return Err(Error::invalid(
                "idle_seconds_before_scaledown",
                format!(
                    "{} s is more than a year; use min_nodes to keep nodes",
                    self.idle_seconds_before_scaledown
                ),
            ));
        }
        if self.max_nodes == 0 {
            return Err(Error::invalid("max_nodes", "must be at least 1"));
        }
        if self.min_nodes > self.max_nodes {
            return Err(Error::invalid(
                "min_nodes",
                format!(
                    "{} is above max_nodes {}; min_nodes must be <= max_nodes",
                    self.min_nodes, self.max_nodes
                ),
            ));
        }
        if self.max_nodes > cap {
            let why = if self.internode_communication {
                "the cap with internode_communication on; turn it off for up to 4000 nodes"
            } else {
                "the cap for a cluster"
            };
            return Err(Error::invalid(
                "max_nodes",
                format!("{} is above {cap}, {why}", self.max_nodes),
            ));
        }
        Ok(())
    }

    pub fn node_cap(&self) -> u32 {
        if self.internode_communication {
            MAX_NODES_WITH_INTERNODE
        } else {
            MAX_NODES_WITHOUT_INTERNODE
        }
    }

    /// Applies an update; the immutable fields are refused with a reason.
    pub fn apply(&self, update: &ClusterUpdate) -> Result<Self> {
        let immutable = [
            ("vm_size", update.vm_size.is_some()),
            ("vm_priority", update.vm_priority.is_some()),
            ("provider", update.provider.is_some()),
            (
                "internode_communication",
                update.internode_communication.is_some(),
            ),
        ];
        if let Some((field, _)) = immutable.iter().find(|(_, set)| *set) {
            return Err(Error::invalid(
                *field,
                "is fixed when the cluster is created; create a new cluster to change it",
            ));
        }
        let mut next = self.clone();
        if let Some(min) = update.min_nodes {
            next.min_nodes = min;
        }
        if let Some(max) = update.max_nodes {
            next.max_nodes = max;
        }
        if let Some(idle) = update.idle_seconds_before_scaledown {
            next.idle_seconds_before_scaledown = idle;
        }
        if let Some(description) = &update.description {
            next.description = description.clone();
        }
        next.tags.extend(update.set_tags.clone());
        if let Some(cancel) = update.cancel_idle_gpu_jobs {
            next.cancel_idle_gpu_jobs = cancel;
        }
        next.validate_sizes()?;
        validate_tags(&next.tags)?;
        Ok(next)
    }
}

#[derive(Clone, Debug, Default)]
pub struct ClusterUpdate {
    pub name: String,
    pub min_nodes: Option<u32>,
    pub max_nodes: Option<u32>,
    pub idle_seconds_before_scaledown: Option<u64>,
    pub description: Option<String>,
    pub set_tags: BTreeMap<String, String>,
    pub vm_size: Option<String>,
    pub vm_priority: Option<String>,
    pub provider: Option<String>,
    pub internode_communication: Option<bool>,
    pub cancel_idle_gpu_jobs: Option<bool>,
}

/// The instance count a job gets, once its distribution checks out.
fn check_distribution(request: &JobRequest, cluster: &ClusterSpec) -> Result<u32> {
    let asked = request.instance_count;
    let Some(distribution) = &request.distribution else {
        return Ok(asked.max(1));
    };
    if !cluster.internode_communication {
        return Err(Error::invalid(
            "distribution",
            format!(
                "cluster `{}` has internode_communication off, so its nodes cannot talk to each other; run {} jobs on a cluster created with --internode-communication true",
                cluster.name,
                distribution.kind()
            ),
        ));
    }
    match distribution {
        Distribution::Pytorch {
            process_count_per_instance,
        }
        | Distribution::Mpi {
            process_count_per_instance,
        } if !(1..=MAX_PROCESSES_PER_INSTANCE).contains(process_count_per_instance) => {
            Err(Error::invalid(
                "distribution.process_count_per_instance",
                format!("must be 1 to {MAX_PROCESSES_PER_INSTANCE}"),
            ))
        }
        Distribution::Pytorch { .. } | Distribution::Mpi { .. } => Ok(asked.max(1)),
        Distribution::Tensorflow {
            worker_count,
            parameter_server_count,
        } => {
            if *worker_count == 0 {
                return Err(Error::invalid(
                    "distribution.worker_count",
                    "must be at least 1",
                ));
            }
            // Saturating: absurd counts are refused below, never an overflow.
            let tasks = worker_count.saturating_add(*parameter_server_count);
            if asked != 0 && asked != tasks {
                return Err(Error::invalid(
                    "resources.instance_count",
                    format!(
                        "{asked}, but worker_count {worker_count} + parameter_server_count {parameter_server_count} = {tasks}: one instance per task"
                    ),
                ));
            }
            Ok(tasks)
        }
    }
}

/// 2-16 characters: letters, digits and hyphens, starting with a letter.
pub fn validate_cluster_name(name: &str) -> Result<()> {
    let reason = if name.len() < 2 || name.len() > 16 {
        Some(format!("`{name}` must be 2 to 16 characters long"))
    } else if !name.starts_with(|c: char| c.is_ascii_alphabetic()) {
        Some(format!("`{name}` must start with a letter"))
    } else if !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
        Some(format!(
            "`{name}` may hold only letters, digits and hyphens"
        ))
    } else {
        None
    };
    match reason {
        Some(reason) => Err(Error::invalid("name", reason)),
        None => Ok(()),
    }
}

fn validate_tags(tags: &BTreeMap<String, String>) -> Result<()> {
    if tags.len() > 50 {
        return Err(Error::invalid("tags", "at most 50 tags"));
    }
    if let Some(key) = tags.keys().find(|k| k.is_empty() || k.len() > 128) {
        return Err(Error::invalid(
            "tags",
            format!("key `{key}` must be 1 to 128 characters"),
        ));
    }
    Ok(())
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Cluster {
    pub spec: ClusterSpec,
    pub created_at: Millis,
    /// Problems that stop the cluster from reaching its target (kept current).
    #[serde(default)]
    pub errors: Vec<String>,
    #[serde(default)]
    pub lock: Option<LockKind>,
    /// The managed identities its jobs may get tokens for; its own (system-assigned)
    /// one first. They live and die with the cluster.
    #[serde(default)]
    pub identities: Vec<ClusterIdentity>,
}

// ------------------------------------------------------------- identities

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum IdentityKind {
    SystemAssigned,
    UserAssigned,
}

impl IdentityKind {
    pub fn as_str(self) -> &'static str {
        match self {
            IdentityKind::SystemAssigned => "SystemAssigned",
            IdentityKind::UserAssigned => "UserAssigned",
        }
    }
}

/// A user-assigned managed identity (`shoal identity create`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Identity {
    pub name: String,
    pub client_id: String,
    pub created_at: Millis,
}

/// An identity a cluster's jobs may use.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ClusterIdentity {
    pub kind: IdentityKind,
    pub client_id: String,
}

/// `[system]` (or `system`), the cluster's own identity.
pub fn is_system_identity(which: &str) -> bool {
    which == "[system]" || which.eq_ignore_ascii_case("system")
}

/// A user-assigned identity named the way people name it: its name, its client
/// id, or the resource id the managed service uses
/// (`/subscriptions/…/userAssignedIdentities/NAME`), whose last segment names it.
pub fn identity_name_of(which: &str) -> &str {
    which
        .trim_end_matches('/')
        .rsplit('/')
        .next()
        .unwrap_or(which)
}

/// 1 to 64 letters, digits, `-` or `_`.
pub fn validate_identity_name(name: &str) -> Result<()> {
    let fine = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if fine {
        Ok(())
    } else {
        Err(Error::invalid(
            "name",
            format!("`{name}`: 1 to 64 letters, digits, - or _"),
        ))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum LockKind {
    /// No scaling, no updates, no deletion.
    ReadOnly,
    /// No deletion.
    CannotDelete,
}

impl LockKind {
    pub fn parse(text: &str) -> Result<Self> {
        match text.to_ascii_lowercase().replace('_', "-").as_str() {
            "read-only" | "readonly" => Ok(LockKind::ReadOnly),
            "cannot-delete" | "cannotdelete" => Ok(LockKind::CannotDelete),
            other => Err(Error::invalid(
                "kind",
                format!("`{other}` is neither `read-only` nor `cannot-delete`"),
            )),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            LockKind::ReadOnly => "read-only",
            LockKind::CannotDelete => "cannot-delete",
        }
    }
}

// ------------------------------------------------------------------ nodes

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeState {
    Preparing,
    Idle,
    Running,
    Leaving,
    Preempted,
    Unusable,
}

impl NodeState {
    pub fn as_str(self) -> &'static str {
        match self {
            NodeState::Preparing => "preparing",
            NodeState::Idle => "idle",
            NodeState::Running => "running",
            NodeState::Leaving => "leaving",
            NodeState::Preempted => "preempted",
            NodeState::Unusable => "unusable",
        }
    }
}

/// One instance of one attempt, as placed on a node.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Slot {
    pub attempt_id: String,
    pub instance: u32,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Node {
    pub id: String,
    pub cluster: String,
    pub state: NodeState,
    pub cores: u32,
    pub memory_bytes: u64,
    pub created_at: Millis,
    /// When the node entered its current state (idle since, preparing since, ...).
    pub state_since: Millis,
    pub running: Option<Slot>,
    #[serde(default)]
    pub hostname: String,
    #[serde(default)]
    pub pid: Option<u32>,
    #[serde(default)]
    pub message: String,
    /// What its agent can run jobs with (`process`, `docker`), from registration.
    #[serde(default)]
    pub runtimes: Vec<String>,
    /// What created it (and so removes it).
    #[serde(default)]
    pub provider: ProviderKind,
    /// Its GPUs, as its agent found them.
    #[serde(default)]
    pub gpus: Vec<GpuStat>,
    /// Why its agent found none.
    #[serde(default)]
    pub gpu_reason: String,
    /// Unusable because its agent went silent for a lease: it may come back.
    #[serde(default)]
    pub lost_contact: bool,
    /// The latest telemetry beyond CPU and memory.
    #[serde(skip)]
    pub stats: NodeStats,
    /// Runtime-only facts, rebuilt from heartbeats and sessions.
    #[serde(skip)]
    pub connected: bool,
    #[serde(skip)]
    pub cpu_percent: f32,
    #[serde(skip)]
    pub memory_used_bytes: u64,
    #[serde(skip)]
    pub last_heartbeat: Millis,
}

impl Node {
    /// A node about to come up (its agent has not registered yet).
    pub fn preparing(
        id: &str,
        cluster: &str,
        cores: u32,
        memory_bytes: u64,
        provider: ProviderKind,
        now: Millis,
    ) -> Self {
        Node {
            id: id.to_string(),
            cluster: cluster.to_string(),
            state: NodeState::Preparing,
            cores,
            memory_bytes,
            created_at: now,
            state_since: now,
            running: None,
            hostname: String::new(),
            pid: None,
            message: String::new(),
            runtimes: Vec::new(),
            provider,
            gpus: Vec::new(),
            gpu_reason: String::new(),
            lost_contact: false,
            stats: NodeStats::default(),
            connected: false,
            cpu_percent: 0.0,
            memory_used_bytes: 0,
            last_heartbeat: 0,
        }
    }
}

/// One GPU, as registered or sampled.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct GpuStat {
    pub index: u32,
    pub uuid: String,
    pub model: String,
    pub utilization_percent: u32,
    pub memory_used_bytes: u64,
    pub memory_total_bytes: u64,
    pub temperature_c: u32,
    pub power_milliwatts: u32,
    pub energy_millijoules: u64,
    pub process_ids: Vec<u32>,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct NodeStats {
    pub per_core_percent: Vec<f32>,
    pub disk_free_bytes: u64,
    pub disk_total_bytes: u64,
    pub network_rx_bytes: u64,
    pub network_tx_bytes: u64,
    pub gpus: Vec<GpuStat>,
}

/// What an instance used (live while it runs, final after).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Usage {
    pub samples: u32,
    pub gpu_utilization_avg_percent: f64,
    pub gpu_utilization_peak_percent: u32,
    pub gpu_memory_peak_bytes: u64,
    pub gpu_energy_joules: f64,
    pub cpu_seconds: f64,
    pub gpu_utilization_percent: u32,
    pub gpu_memory_bytes: u64,
}

impl Node {
    /// Has the GPUs the job asks for (a hard requirement, unlike the runtime).
    pub fn has_gpus_for(&self, job: &JobSpec) -> bool {
        self.gpus.len() as u32 >= job.gpus_per_instance
    }

    /// Can take an instance now.
    pub fn is_free(&self) -> bool {
        self.state == NodeState::Idle && self.connected && self.running.is_none()
    }

    /// Can run this job's instances: containers need the docker runtime.
    pub fn can_run(&self, job: &JobSpec) -> bool {
        job.image.is_none() || self.runtimes.iter().any(|r| r == "docker")
    }

    /// Counts toward the cluster's size (and so toward max_nodes).
    pub fn is_allocated(&self) -> bool {
        matches!(
            self.state,
            NodeState::Preparing | NodeState::Idle | NodeState::Running | NodeState::Leaving
        )
    }
}

// ------------------------------------------------------------------- jobs

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
    pub name: String,
    pub cluster: String,
    /// The exact argv each instance runs (a YAML `command` becomes `sh -c <command>`).
    pub argv: Vec<String>,
    /// The command line as the user wrote it, when given as one.
    pub command: String,
    pub environment_variables: BTreeMap<String, String>,
    pub instance_count: u32,
    pub timeout_seconds: Option<u64>,
    /// Where the coordinator keeps the code snapshot, when there is one.
    pub code_path: Option<String>,
    /// The container image it runs in; None: a plain process.
    #[serde(default)]
    pub image: Option<String>,
    /// Preemptions it is requeued after before it fails.
    #[serde(default = "default_max_preemptions")]
    pub max_preemptions: u32,
    #[serde(default)]
    pub gpus_per_instance: u32,
    #[serde(default)]
    pub distribution: Option<Distribution>,
    /// A parallel (batch inference) job: how its mini-batches run.
    #[serde(default)]
    pub parallel: Option<Box<crate::parallel::ParallelSpec>>,
    /// Boxed: most jobs have none of it, and every queued job is held in memory.
    #[serde(flatten)]
    pub extras: Box<JobExtras>,
}

/// What admission adds to a job from its job file (never from a bare request):
/// its data, where its environment came from, and what people wrote about it.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct JobExtras {
    #[serde(default)]
    pub inputs: BTreeMap<String, crate::data::DataInput>,
    #[serde(default)]
    pub outputs: BTreeMap<String, crate::data::DataOutput>,
    /// Keys of the job file that have no effect here, each with why.
    #[serde(default)]
    pub warnings: Vec<String>,
    #[serde(default)]
    pub experiment_name: String,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    #[serde(default)]
    pub properties: BTreeMap<String, String>,
    /// How its environment was named (`azureml:sklearn@latest`), when it was.
    #[serde(default)]
    pub environment: String,
    /// A host environment's venv or conda prefix, first on PATH.
    #[serde(default)]
    pub path_prefix: Option<String>,
    /// A container's shared memory.
    #[serde(default)]
    pub shm_size_bytes: Option<u64>,
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

fn one() -> u32 {
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

fn default_max_preemptions() -> u32 {
    DEFAULT_MAX_PREEMPTIONS
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
    pub distribution: Option<Distribution>,
    /// A parallel job, with its input already cut into mini-batches.
    pub parallel: Option<(crate::parallel::ParallelSpec, Vec<crate::parallel::Cut>)>,
    pub extras: JobExtras,
}

impl JobSpec {
    /// Checks a request against the cluster it names (whose VM size has `vm_gpus`).
    pub fn from_request(request: JobRequest, cluster: &ClusterSpec, vm_gpus: u32) -> Result<Self> {
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
            cluster: cluster.name.clone(),
            argv,
            command: request.command,
            environment_variables: request.environment_variables,
            instance_count,
            timeout_seconds: (request.timeout_seconds > 0).then_some(request.timeout_seconds),
            code_path: request.code_path,
            image: (!image.is_empty()).then_some(image),
            max_preemptions: request.max_preemptions.unwrap_or(DEFAULT_MAX_PREEMPTIONS),
            gpus_per_instance: request.gpus_per_instance,
            distribution: request.distribution,
            parallel: request.parallel.map(|(spec, _)| Box::new(spec)),
            extras: Box::new(request.extras),
        })
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct InstanceRun {
    pub index: u32,
    pub node: String,
    pub status: InstanceStatus,
    pub exit_code: Option<i32>,
    pub message: String,
    /// GPU indices it holds on its node.
    #[serde(default)]
    pub gpus: Vec<u32>,
    #[serde(default)]
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

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Job {
    pub id: String,
    pub seq: u64,
    pub spec: JobSpec,
    pub status: JobStatus,
    pub attempts: Vec<Attempt>,
    pub created_at: Millis,
    pub started_at: Millis,
    pub ended_at: Millis,
    /// Why it waits, or why it ended.
    pub reason: String,
    /// Times a preemption sent it back to the queue.
    #[serde(default)]
    pub preemptions: u32,
    /// Things worth a look (an idle GPU).
    #[serde(default)]
    pub flags: Vec<String>,
    /// A parallel job's progress (derived, filled in for readers).
    #[serde(skip)]
    pub progress: Option<crate::parallel::Progress>,
}

impl Job {
    pub fn current_attempt(&self) -> Option<&Attempt> {
        self.attempts.last()
    }

    /// Final, and no instance of any attempt still runs: nothing more can happen to it.
    pub fn is_settled(&self) -> bool {
        self.status.is_final() && self.attempts.iter().all(Attempt::is_settled)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(name: &str) -> ClusterRequest {
        ClusterRequest {
            name: name.into(),
            vm_size: "standard_d2_v2".into(),
            ..Default::default()
        }
    }

    #[test]
    fn cluster_defaults_match_the_managed_service() {
        let spec =
            ClusterSpec::from_request(request("cpu-cluster"), &Catalog::default()).expect("valid");
        assert_eq!((spec.min_nodes, spec.max_nodes), (0, 4));
        assert_eq!(spec.idle_seconds_before_scaledown, 120);
        assert_eq!(spec.vm_priority, Priority::Dedicated);
        assert_eq!(spec.vm_size, "Standard_D2_v2");
        assert!(spec.internode_communication);
    }

    #[test]
    fn bad_cluster_names_are_refused() {
        for bad in ["a", "1abc", "has_underscore", "seventeen-chars-x", "sp ace"] {
            let err = ClusterSpec::from_request(request(bad), &Catalog::default()).unwrap_err();
            assert!(err.to_string().starts_with("invalid name"), "{bad}: {err}");
        }
    }

    #[test]
    fn node_cap_depends_on_internode_communication() {
        let mut req = request("big");
        req.max_nodes = Some(101);
        let err = ClusterSpec::from_request(req.clone(), &Catalog::default()).unwrap_err();
        assert!(err.to_string().contains("max_nodes"), "{err}");
        req.internode_communication = Some(false);
        assert!(ClusterSpec::from_request(req, &Catalog::default()).is_ok());
    }

    #[test]
    fn immutable_fields_refuse_updates() {
        let spec = ClusterSpec::from_request(request("c1"), &Catalog::default()).expect("valid");
        let update = ClusterUpdate {
            vm_size: Some("Standard_D3_v2".into()),
            ..Default::default()
        };
        let err = spec.apply(&update).unwrap_err();
        assert!(err.to_string().contains("vm_size"), "{err}");
        let update = ClusterUpdate {
            min_nodes: Some(9),
            ..Default::default()
        };
        assert!(
            spec.apply(&update)
                .unwrap_err()
                .to_string()
                .contains("min_nodes")
        );
    }

    #[test]
    fn absurd_numbers_are_refused_not_overflowed() {
        let cluster = ClusterSpec::from_request(request("c1"), &Catalog::default()).expect("valid");
        let forever = JobRequest {
            command: "true".into(),
            timeout_seconds: u64::MAX,
            ..Default::default()
        };
        let err = JobSpec::from_request(forever, &cluster, 0).unwrap_err();
        assert!(err.to_string().contains("limits.timeout"), "{err}");
        let ranks = JobRequest {
            command: "true".into(),
            distribution: Some(Distribution::Pytorch {
                process_count_per_instance: u32::MAX,
            }),
            ..Default::default()
        };
        let err = JobSpec::from_request(ranks, &cluster, 0).unwrap_err();
        assert!(
            err.to_string().contains("process_count_per_instance"),
            "{err}"
        );
        let tasks = JobRequest {
            command: "true".into(),
            distribution: Some(Distribution::Tensorflow {
                worker_count: u32::MAX,
                parameter_server_count: u32::MAX,
            }),
            ..Default::default()
        };
        let err = JobSpec::from_request(tasks, &cluster, 0).unwrap_err();
        assert!(err.to_string().contains("instance_count"), "{err}");
        let mut idle = request("c2");
        idle.idle_seconds_before_scaledown = Some(u64::MAX);
        let err = ClusterSpec::from_request(idle, &Catalog::default()).unwrap_err();
        assert!(
            err.to_string().contains("idle_seconds_before_scaledown"),
            "{err}"
        );
    }

    #[test]
    fn job_needs_a_command_and_fits_the_cluster() {
        let cluster = ClusterSpec::from_request(request("c1"), &Catalog::default()).expect("valid");
        let empty = JobRequest::default();
        assert!(
            JobSpec::from_request(empty, &cluster, 0)
                .unwrap_err()
                .to_string()
                .contains("command")
        );
        let too_wide = JobRequest {
            command: "true".into(),
            instance_count: 5,
            ..Default::default()
        };
        let err = JobSpec::from_request(too_wide, &cluster, 0).unwrap_err();
        assert!(err.to_string().contains("instance_count"), "{err}");
        let shell = JobRequest {
            command: "echo hi".into(),
            ..Default::default()
        };
        let spec = JobSpec::from_request(shell, &cluster, 0).expect("valid");
        assert_eq!(spec.argv, vec!["sh", "-c", "echo hi"]);
        assert_eq!(spec.instance_count, 1);
    }
}
