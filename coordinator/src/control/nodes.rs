//! Node lifecycle: unusable, out of contact, removed, forgotten; and `tick`,
//! the timeouts no event announces.

use super::*;

impl Control {
    pub(super) fn node_unusable(&mut self, node_id: &str, why: &str, now: Millis) {
        self.node_out(node_id, why, false, now);
    }

    /// The agent has not been heard from for a lease: its work is rerun elsewhere
    /// (the agent has stopped it by now, or never got it). The node may come back:
    /// its agent re-registers and the node is idle again; else it is removed when
    /// unusable nodes are forgotten.
    pub(super) fn node_lost_contact(&mut self, node_id: &str, now: Millis) {
        let lease = self.config.lease.as_secs();
        let why = format!(
            "no word from its agent for {lease} s (lease_seconds); its work was rerun elsewhere"
        );
        self.node_out(node_id, &why, true, now);
    }

    pub(super) fn node_out(&mut self, node_id: &str, why: &str, lost_contact: bool, now: Millis) {
        let Some(node) = self.nodes.get_mut(node_id) else {
            return;
        };
        warn!(node = %node_id, why, "node unusable");
        node.state = NodeState::Unusable;
        node.state_since = now;
        node.message = why.to_string();
        node.connected = false;
        node.lost_contact = lost_contact;
        let running = node.slots();
        let cluster = node.cluster.clone();
        let gone = removal(node);
        self.dirty_nodes.insert(node_id.to_string());
        self.links.remove(node_id);
        for slot in &running {
            self.instance_lost(slot, &format!("node {node_id} is unusable: {why}"), now);
        }
        if lost_contact {
            if let Some(c) = self.clusters.get_mut(&cluster) {
                c.errors.push(ClusterError::LostContact {
                    node: node_id.to_string(),
                    why: why.to_string(),
                });
                let excess = c.errors.len().saturating_sub(5);
                c.errors.drain(..excess);
                self.dirty_clusters.insert(cluster);
            }
            return;
        }
        // Nodes that keep failing must not be replaced in a tight loop.
        let failures = self.create_backoff.get(&cluster).map_or(0, |b| b.failures) + 1;
        let delay_ms = 1000i64 << failures.min(6);
        self.create_backoff.insert(
            cluster.clone(),
            Backoff {
                failures,
                until: now + delay_ms,
                last: format!("node {node_id}: {why}"),
            },
        );
        if let Some(c) = self.clusters.get_mut(&cluster) {
            c.errors.push(ClusterError::NodeFailed {
                node: node_id.to_string(),
                why: why.to_string(),
                wait_seconds: delay_ms / 1000,
            });
            let excess = c.errors.len().saturating_sub(5);
            c.errors.drain(..excess);
            self.dirty_clusters.insert(cluster);
        }
        // Make sure nothing of it keeps running.
        self.to_remove.push(gone);
    }

    /// Its owner took the node back (a Slurm preemption): its instances end
    /// preempted (requeued, no attempt counted) and the node goes.
    pub(super) fn node_taken_back(&mut self, node_id: &str, why: &str, now: Millis) {
        let Some(node) = self.nodes.get(node_id) else {
            return;
        };
        warn!(node = %node_id, why, "node taken back by its provider");
        let running = node.slots();
        self.preempted_nodes.insert(node_id.to_string());
        for slot in &running {
            self.instance_lost(slot, &format!("node {node_id} was preempted: {why}"), now);
        }
        self.remove_node(node_id, why);
    }

    pub(super) fn remove_node(&mut self, node_id: &str, why: &str) {
        let Some(node) = self.nodes.get_mut(node_id) else {
            return;
        };
        info!(node = %node_id, why, "removing node");
        node.state = NodeState::Leaving;
        node.message = why.to_string();
        let gone = removal(node);
        self.dirty_nodes.insert(node_id.to_string());
        self.tell(
            node_id,
            ToAgent::Shutdown {
                reason: why.to_string(),
            },
        );
        self.to_remove.push(gone);
    }

    pub(super) fn forget_node(&mut self, node_id: &str) {
        let Some(node) = self.nodes.get(node_id) else {
            return;
        };
        if node.state == NodeState::Leaving {
            self.preempted_nodes.remove(node_id);
            // The cluster's counts change: it is rewritten and announced too.
            self.dirty_clusters.insert(node.cluster.clone());
            self.nodes.remove(node_id);
            self.links.remove(node_id);
            self.dirty_nodes.remove(node_id);
            self.deleted_nodes.insert(node_id.to_string());
        }
    }

    /// Timeouts that no event announces: agents that never register or never come
    /// back, and unusable nodes kept for a while so people can see them.
    pub fn tick(&mut self, now: Millis) {
        self.parallel_housekeep(now);
        self.retention(now);
        self.forget_old_families(now);
        let lease = self.config.lease.as_millis() as i64;
        let register = self.config.register_timeout.as_millis() as i64;
        let mut unusable = Vec::new();
        let mut silent = Vec::new();
        let mut forget = Vec::new();
        for node in self.nodes.values() {
            match node.state {
                NodeState::Preparing if now - node.state_since > register => unusable.push((
                    node.id.clone(),
                    format!("its agent did not register within {} s", register / 1000),
                )),
                // Disconnected, or connected but silent (a partition leaves the
                // session open): the same bound, from the last word heard.
                NodeState::Idle | NodeState::Running if now - node.last_heartbeat > lease => {
                    silent.push(node.id.clone())
                }
                NodeState::Unusable if now - node.state_since > 60_000 => {
                    forget.push(node.id.clone())
                }
                _ => {}
            }
        }
        for (id, why) in unusable {
            self.node_unusable(&id, &why, now);
        }
        for id in silent {
            self.node_lost_contact(&id, now);
        }
        // Preempted nodes go once their work has stopped, or when the notice is over.
        let preempted: Vec<(String, bool)> = self
            .nodes
            .values()
            .filter(|n| n.state == NodeState::Preempted)
            .map(|n| {
                let overdue = self
                    .preempt_deadlines
                    .get(&n.id)
                    .is_none_or(|deadline| now > deadline + 10_000);
                (n.id.clone(), n.running.is_empty() || overdue)
            })
            .collect();
        for (id, gone) in preempted {
            if gone {
                let running: Vec<Slot> = self.nodes.get(&id).map(Node::slots).unwrap_or_default();
                for slot in &running {
                    self.instance_lost(slot, &format!("node {id} was preempted"), now);
                }
                self.preempt_deadlines.remove(&id);
                self.remove_node(&id, "preempted");
            }
        }
        self.chaos(now);
        for id in forget {
            if let Some(node) = self.nodes.remove(&id) {
                if node.lost_contact {
                    // It never came back: make sure nothing of it runs on.
                    self.to_remove.push(removal(&node));
                }
                self.dirty_clusters.insert(node.cluster);
            }
            self.links.remove(&id);
            self.deleted_nodes.insert(id);
        }
    }
}
