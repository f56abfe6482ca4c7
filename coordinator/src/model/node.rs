//! Nodes, their telemetry, and the slots instances run in.

use super::*;

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
