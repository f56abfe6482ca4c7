//! The exec relay: an MPI launcher on one node runs its daemons inside the other
//! nodes' sandboxes through the agents (no SSH). A source agent opens an exec
//! naming a target node of the same attempt; the relay checks that, then carries
//! frames between the two agent sessions: output and exit back to the source,
//! a kill to the target when the source goes away. Nothing here is stored: an
//! exec lives as long as both sessions do.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use shoal_proto::v1 as pb;
use shoal_proto::v1::exec_frame::Kind;
use tokio::sync::mpsc;
use tracing::{debug, warn};

use crate::control::{AgentCall, Claim, ControlHandle, ToAgent};
use crate::model::Slot;

type Link = mpsc::UnboundedSender<ToAgent>;

#[derive(Clone, Default)]
pub struct ExecRelay {
    inner: Arc<Mutex<Inner>>,
}

#[derive(Default)]
struct Inner {
    /// node id -> (session, link) of its current session.
    links: HashMap<String, (u64, Link)>,
    /// exec id -> (source node, target node).
    open: HashMap<String, (String, String)>,
}

impl ExecRelay {
    pub fn attach(&self, node: &str, session: u64, link: Link) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.links.insert(node.to_string(), (session, link));
    }

    /// The node's session ended: its execs end with it, on both sides.
    pub fn detach(&self, node: &str, session: u64) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if inner.links.get(node).is_none_or(|(s, _)| *s != session) {
            return; // a newer session took over
        }
        inner.links.remove(node);
        let ended: Vec<(String, (String, String))> = inner
            .open
            .iter()
            .filter(|(_, (source, target))| source == node || target == node)
            .map(|(id, ends)| (id.clone(), ends.clone()))
            .collect();
        for (id, (source, target)) in ended {
            inner.open.remove(&id);
            if source == node {
                inner.send(&target, kill(&id, "the MPI launcher's node went away"));
            } else {
                inner.send(
                    &source,
                    exit(
                        &id,
                        format!("node {target} went away while running the command"),
                    ),
                );
            }
        }
    }

    /// A frame from `node`'s agent.
    pub async fn frame(&self, node: &str, control: &ControlHandle, mut frame: pb::ExecFrame) {
        let id = frame.exec_id.clone();
        match frame.kind.take() {
            Some(Kind::Open(mut open)) => match target_instance(control, node, &open).await {
                Ok(instance) => {
                    open.target_instance = instance;
                    let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
                    if !inner.links.contains_key(&open.target_node) {
                        let why = format!("node {} is not connected", open.target_node);
                        inner.send(node, exit(&id, why));
                        return;
                    }
                    debug!(exec = %id, from = node, to = %open.target_node, "exec opened");
                    let target = open.target_node.clone();
                    inner
                        .open
                        .insert(id.clone(), (node.to_string(), target.clone()));
                    frame.kind = Some(Kind::Open(open));
                    inner.send(&target, frame);
                }
                Err(why) => {
                    warn!(exec = %id, from = node, %why, "exec refused");
                    let inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
                    inner.send(node, exit(&id, why));
                }
            },
            Some(kind @ (Kind::Output(_) | Kind::Exit(_))) => {
                let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
                let Some((source, target)) = inner.open.get(&id).cloned() else {
                    return;
                };
                if target != node {
                    return; // only the target answers
                }
                if matches!(kind, Kind::Exit(_)) {
                    inner.open.remove(&id);
                }
                frame.kind = Some(kind);
                inner.send(&source, frame);
            }
            Some(Kind::Kill(reason)) => {
                let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
                if let Some((source, target)) = inner.open.get(&id).cloned()
                    && source == node
                {
                    inner.open.remove(&id);
                    inner.send(&target, kill(&id, &reason));
                }
            }
            None => {}
        }
    }
}

impl Inner {
    fn send(&self, node: &str, frame: pb::ExecFrame) {
        if let Some((_, link)) = self.links.get(node) {
            let _ = link.send(ToAgent::Exec(frame));
        }
    }
}

fn kill(id: &str, reason: &str) -> pb::ExecFrame {
    pb::ExecFrame {
        exec_id: id.to_string(),
        kind: Some(Kind::Kill(reason.to_string())),
    }
}

fn exit(id: &str, message: String) -> pb::ExecFrame {
    pb::ExecFrame {
        exec_id: id.to_string(),
        kind: Some(Kind::Exit(pb::ExecExit {
            exit_code: None,
            message,
        })),
    }
}

/// Which instance of the attempt runs on the target node: the source must be a
/// live instance of an MPI job's current attempt (its node, its token), and the
/// target another live instance of it (`ownership::check`).
async fn target_instance(
    control: &ControlHandle,
    source_node: &str,
    open: &pb::ExecOpen,
) -> Result<u32, String> {
    let claim = Claim {
        node_id: source_node.to_string(),
        slot: Slot {
            attempt_id: open.attempt_id.clone(),
            instance: open.source_instance,
        },
        token: Some(open.token.clone()),
    };
    let call = AgentCall::Exec {
        target_node: open.target_node.clone(),
    };
    let granted = control
        .authorize(claim, call)
        .await
        .map_err(|e| e.to_string())?;
    granted
        .target_instance
        .ok_or_else(|| format!("node {} runs no live instance", open.target_node))
}
