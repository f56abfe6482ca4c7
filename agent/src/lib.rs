//! The node agent: one long-lived session with the coordinator (register, heartbeat,
//! launches in, events and logs out), runtimes that run the work, and telemetry.
//! It reconnects with backoff and, after a coordinator restart, re-registers and
//! reports the attempts it still runs.

pub mod archive;
pub mod exec;
pub mod gpu;
pub mod identity;
pub mod runtime;
mod session;
pub mod telemetry;

use std::path::PathBuf;
use std::time::Duration;

pub use session::run;

#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// `http://host:port` of the coordinator.
    pub endpoint: String,
    pub node_id: String,
    pub cluster: String,
    /// The id of the coordinator that owns this node (labels its containers).
    pub owner: String,
    /// Attempts work in `<work_dir>/attempts/<attempt>-<instance>`.
    pub work_dir: PathBuf,
    /// Capacity to advertise; None: what this machine has.
    pub cores: Option<u32>,
    pub memory_bytes: Option<u64>,
    /// Between SIGTERM and SIGKILL when a job is stopped.
    pub stop_grace: Duration,
    /// With no coordinator for this long, stop the work and exit.
    pub give_up_after: Duration,
    /// A Docker network job containers join (set by the docker provider).
    pub docker_network: Option<String>,
    /// How often CPU, memory, disk, network and GPUs are sampled.
    pub telemetry_interval: Duration,
    /// This node's share of the machine's GPUs: (slice, GPUs per node); None: all.
    pub gpu_slice: Option<(u32, u32)>,
    /// This node's credential, presented on every call to the coordinator.
    pub token: Option<String>,
    /// The unprivileged user process jobs run as (None: the agent's user).
    pub run_as: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("the coordinator refused this agent: {0}")]
    Rejected(String),
    #[error("no coordinator at {endpoint} for {seconds} s; giving up (last error: {last})")]
    CoordinatorLost {
        endpoint: String,
        seconds: u64,
        last: String,
    },
    #[error("bad endpoint `{0}`: {1}")]
    Endpoint(String, String),
    #[error("--run-as: {0}")]
    RunAs(String),
    #[error("node credential: {0}")]
    Token(String),
    #[error("work dir {0}: {1}")]
    WorkDir(PathBuf, std::io::Error),
}
