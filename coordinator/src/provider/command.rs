//! The `command` provider: the user's own scripts make and remove nodes, so any
//! cloud CLI, IPMI or in-house tool can back a cluster.
//!
//! - `create` gets the node as JSON on stdin (node_id, cluster, join_token,
//!   endpoint, ca_file, cores, memory_bytes, gpus, vm_size), starts
//!   `shoal agent --endpoint … --join-token … --work-dir …` there, and prints the
//!   node's address (its last line of output);
//! - `delete` gets node_id, cluster and address as JSON on stdin;
//! - `list` (optional) gets the cluster as JSON and prints the addresses of the
//!   nodes that exist, one per line: a node it stops listing has ended, and its
//!   work is rerun. Without it, a node that vanishes is found by its silence
//!   (the lease).

use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;
use serde_json::json;
use tracing::{info, warn};

use super::remote::{RemoteAgents, run_program};
use super::{NodeExit, NodeLaunch, NodeProvider, NodeRemoval, Notes, StartedNode};

#[derive(Clone, Debug)]
pub struct CommandProvider {
    pub remote: RemoteAgents,
    /// How often `list` is run for each node.
    pub poll: Duration,
    /// How long `create` may take (the node start timeout bounds it too).
    pub create_limit: Duration,
}

impl CommandProvider {
    /// Until `list` stops listing the node (never, without a `list` script).
    async fn watch(self, node: NodeRemoval) -> NodeExit {
        let Some(list) = node.settings.get("list").cloned() else {
            return std::future::pending().await;
        };
        let address = node.handle;
        let input = json!({ "cluster": node.cluster }).to_string();
        loop {
            tokio::time::sleep(self.poll).await;
            match run_program(&list, &[], Some(input.clone()), self.create_limit).await {
                Ok(listed) if listed.lines().any(|l| l.trim() == address) => {}
                Ok(_) => {
                    return NodeExit::gone(format!(
                        "the list script no longer lists it ({address})"
                    ));
                }
                Err(why) => warn!(node = %node.node_id, %why, "the list script failed"),
            }
        }
    }
}

impl NodeProvider for CommandProvider {
    fn create(&self, launch: NodeLaunch) -> BoxFuture<'static, Result<StartedNode, String>> {
        let this = self.clone();
        async move {
            let create = launch
                .settings
                .get("create")
                .cloned()
                .ok_or("the cluster's provider settings have no `create` script")?;
            let token = this.remote.join_token(&launch)?;
            let input = json!({
                "node_id": launch.node_id,
                "cluster": launch.cluster,
                "join_token": token,
                "endpoint": this.remote.endpoint,
                "ca_file": this.remote.ca_file,
                "cores": launch.cores,
                "memory_bytes": launch.memory_bytes,
                "gpus": launch.gpus,
                "vm_size": launch.vm_size,
            })
            .to_string();
            let out = run_program(&create, &[], Some(input), this.create_limit).await?;
            let address = out
                .lines()
                .map(str::trim)
                .rfind(|l| !l.is_empty())
                .ok_or_else(|| format!("{create} printed no address for the node"))?
                .to_string();
            info!(node = %launch.node_id, address, "command node created");
            let exited = this
                .watch(NodeRemoval {
                    provider: launch.provider,
                    node_id: launch.node_id,
                    cluster: launch.cluster,
                    pid: None,
                    handle: address.clone(),
                    settings: launch.settings,
                })
                .boxed();
            Ok(StartedNode {
                pid: None,
                handle: address,
                exited,
            })
        }
        .boxed()
    }

    fn adopt(&self, node: NodeRemoval, _: Notes) -> Option<BoxFuture<'static, NodeExit>> {
        (!node.handle.is_empty() && node.settings.contains_key("list"))
            .then(|| self.clone().watch(node).boxed())
    }

    fn remove(&self, node: NodeRemoval) -> BoxFuture<'static, ()> {
        let limit = self.remote.job_stop_grace + Duration::from_secs(60);
        async move {
            let Some(delete) = node.settings.get("delete") else {
                warn!(node = %node.node_id, "no delete script: the node is left as it is");
                return;
            };
            let input = json!({
                "node_id": node.node_id,
                "cluster": node.cluster,
                "address": node.handle,
            })
            .to_string();
            match run_program(delete, &[], Some(input), limit).await {
                Ok(_) => info!(node = %node.node_id, "command node deleted"),
                Err(why) => warn!(node = %node.node_id, %why, "the delete script failed"),
            }
        }
        .boxed()
    }
}
