//! Node providers: what creates and removes the machines (or processes) a cluster
//! is made of. The control loop decides; a provider only carries it out.

pub mod docker;
mod local;

pub use local::LocalProvider;

use futures::future::BoxFuture;

/// What a provider needs to bring up one node.
#[derive(Clone, Debug)]
pub struct NodeLaunch {
    pub node_id: String,
    pub cluster: String,
    pub cores: u32,
    pub memory_bytes: u64,
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
    /// once it is gone. `pid` is what `create` reported, for nodes of an earlier run.
    fn remove(&self, node_id: String, pid: Option<u32>) -> BoxFuture<'static, ()>;
}
