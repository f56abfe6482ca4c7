//! Node providers: what creates and removes the machines (or processes) a cluster
//! is made of. The control loop decides; a provider only carries it out.

mod command;
pub mod docker;
mod local;
mod remote;
mod slurm;

pub use command::CommandProvider;
pub use docker::DockerProvider;
pub use local::LocalProvider;
pub use remote::RemoteAgents;
pub use slurm::SlurmProvider;

use std::collections::BTreeMap;
use std::sync::Arc;

use futures::FutureExt;
use futures::future::BoxFuture;

use crate::model::ProviderKind;

/// What a provider needs to bring up one node.
#[derive(Clone, Debug)]
pub struct NodeLaunch {
    pub provider: ProviderKind,
    pub node_id: String,
    pub cluster: String,
    pub cores: u32,
    pub memory_bytes: u64,
    /// GPUs its VM size has.
    pub gpus: u32,
    pub vm_size: String,
    /// The cluster's `provider_settings` when the node was made.
    pub settings: BTreeMap<String, String>,
    /// What the provider has to say while the node comes up (a Slurm allocation's
    /// pending reason): shown as the preparing node's message.
    pub notes: Notes,
}

/// The `shoal agent` flags every provider passes: who owns the node, where it
/// works, what it offers, and its stop grace and lease.
pub fn agent_flags(
    owner: &str,
    work_dir: &str,
    launch: &NodeLaunch,
    job_stop_grace: std::time::Duration,
    lease: std::time::Duration,
) -> Vec<String> {
    vec![
        "--owner".into(),
        owner.into(),
        "--work-dir".into(),
        work_dir.into(),
        "--cores".into(),
        launch.cores.to_string(),
        "--memory-bytes".into(),
        launch.memory_bytes.to_string(),
        "--stop-grace-seconds".into(),
        job_stop_grace.as_secs().to_string(),
        "--lease-seconds".into(),
        lease.as_secs().to_string(),
    ]
}

/// A node to stop and remove.
#[derive(Clone, Debug)]
pub struct NodeRemoval {
    pub provider: ProviderKind,
    pub node_id: String,
    pub cluster: String,
    /// The agent's host pid (local nodes), also for nodes of an earlier run.
    pub pid: Option<u32>,
    /// What the provider called it when it made it (a Slurm job id, the address a
    /// create script printed); empty when it never started.
    pub handle: String,
    pub settings: BTreeMap<String, String>,
}

/// A node the provider started.
pub struct StartedNode {
    pub pid: Option<u32>,
    /// What the provider calls it (kept with the node, given back to `remove`).
    pub handle: String,
    /// Resolves when the node is gone, with how it ended.
    pub exited: BoxFuture<'static, NodeExit>,
}

/// How a node ended by itself.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeExit {
    pub why: String,
    /// Taken back by its owner (a Slurm preemption): its work is requeued
    /// without counting against the job's attempts.
    pub preempted: bool,
}

impl NodeExit {
    pub fn gone(why: impl Into<String>) -> Self {
        NodeExit {
            why: why.into(),
            preempted: false,
        }
    }
}

/// Where a provider's words about a node go (the control loop, as a command).
#[derive(Clone)]
pub struct Notes(Arc<dyn Fn(String) + Send + Sync>);

impl Notes {
    pub fn new(say: impl Fn(String) + Send + Sync + 'static) -> Self {
        Notes(Arc::new(say))
    }

    pub fn say(&self, note: String) {
        (self.0)(note)
    }
}

impl Default for Notes {
    fn default() -> Self {
        Notes::new(|_| {})
    }
}

impl std::fmt::Debug for Notes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Notes")
    }
}

pub trait NodeProvider: Send + Sync + 'static {
    fn create(&self, launch: NodeLaunch) -> BoxFuture<'static, Result<StartedNode, String>>;
    /// Stops the node (its agent first gets a chance to stop its work) and returns
    /// once it is gone.
    fn remove(&self, node: NodeRemoval) -> BoxFuture<'static, ()>;
    /// At start: removes what an earlier run left behind, except the nodes in `keep`.
    fn cleanup(&self, keep: Vec<String>) -> BoxFuture<'static, ()> {
        let _ = keep;
        async {}.boxed()
    }
    /// At start, for each node an earlier run made that stays: resolves when it
    /// ends by itself, as `StartedNode::exited` does (None: only its silence,
    /// the lease, tells).
    fn adopt(&self, node: NodeRemoval, notes: Notes) -> Option<BoxFuture<'static, NodeExit>> {
        let _ = (node, notes);
        None
    }
}

/// Every provider of this coordinator; nodes go to their cluster's.
/// Joined nodes are started and stopped by their owners: nothing to do here.
struct Joined;

impl NodeProvider for Joined {
    fn create(&self, _: NodeLaunch) -> BoxFuture<'static, Result<StartedNode, String>> {
        async { Err("joined nodes are started by hand (`shoal agent --join-token`)".to_string()) }
            .boxed()
    }

    fn remove(&self, _: NodeRemoval) -> BoxFuture<'static, ()> {
        async {}.boxed()
    }
}

pub struct Providers {
    pub local: LocalProvider,
    pub docker: DockerProvider,
    pub slurm: SlurmProvider,
    pub command: CommandProvider,
}

impl Providers {
    fn of(&self, kind: ProviderKind) -> &dyn NodeProvider {
        match kind {
            ProviderKind::Local => &self.local,
            ProviderKind::Docker => &self.docker,
            ProviderKind::Joined => &Joined,
            ProviderKind::Slurm => &self.slurm,
            ProviderKind::Command => &self.command,
        }
    }
}

impl NodeProvider for Providers {
    fn create(&self, launch: NodeLaunch) -> BoxFuture<'static, Result<StartedNode, String>> {
        self.of(launch.provider).create(launch)
    }

    fn remove(&self, node: NodeRemoval) -> BoxFuture<'static, ()> {
        // A node that is gone keeps no credential.
        if let Some(auth) = &self.local.auth {
            let _ = auth.revoke_node(&node.node_id);
        }
        self.of(node.provider).remove(node)
    }

    fn adopt(&self, node: NodeRemoval, notes: Notes) -> Option<BoxFuture<'static, NodeExit>> {
        self.of(node.provider).adopt(node, notes)
    }

    fn cleanup(&self, keep: Vec<String>) -> BoxFuture<'static, ()> {
        let docker = self.docker.cleanup(keep.clone());
        let slurm = self.slurm.cleanup(keep);
        async move {
            futures::join!(docker, slurm);
        }
        .boxed()
    }
}
