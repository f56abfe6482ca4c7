//! Node providers: what creates and removes the machines (or processes) a cluster
//! is made of. The control loop decides; a provider only carries it out.

pub mod docker;
mod local;

pub use docker::DockerProvider;
pub use local::LocalProvider;

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
}

/// A node to stop and remove.
#[derive(Clone, Debug)]
pub struct NodeRemoval {
    pub provider: ProviderKind,
    pub node_id: String,
    /// The agent's host pid (local nodes), also for nodes of an earlier run.
    pub pid: Option<u32>,
}

/// A node the provider started.
pub struct StartedNode {
    pub pid: Option<u32>,
    /// Resolves when the node's agent is gone, with how it ended.
    pub exited: BoxFuture<'static, String>,
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
}

impl Providers {
    fn of(&self, kind: ProviderKind) -> &dyn NodeProvider {
        match kind {
            ProviderKind::Local => &self.local,
            ProviderKind::Docker => &self.docker,
            ProviderKind::Joined => &Joined,
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

    fn cleanup(&self, keep: Vec<String>) -> BoxFuture<'static, ()> {
        self.docker.cleanup(keep)
    }
}
