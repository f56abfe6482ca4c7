//! Scaling: a pure function of one cluster's spec, its nodes, what waits and `now`.
//! Scale up when instances wait (never above `max_nodes`), keep `min_nodes`, and
//! remove a node idle for `idle_seconds_before_scaledown`; never a busy one.

use crate::model::{ClusterSpec, Millis, Node, NodeState};

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ScaleDecision {
    /// Nodes to create now.
    pub create: u32,
    /// Idle nodes to remove now, longest idle first.
    pub remove: Vec<String>,
    /// The node count the cluster is heading for.
    pub target: u32,
    /// When to look again even if nothing happens (an idle node's timeout).
    pub wake_at: Option<Millis>,
}

/// `waiting_nodes`: nodes that the queued jobs the scheduler could not place
/// would fill (one per whole-node instance, shares packed).
pub fn decide(
    spec: &ClusterSpec,
    nodes: &[&Node],
    waiting_nodes: u32,
    now: Millis,
) -> ScaleDecision {
    let count = |state: NodeState| nodes.iter().filter(|n| n.state == state).count() as u32;
    let running = count(NodeState::Running);
    let leaving = count(NodeState::Leaving);
    let active = count(NodeState::Preparing) + count(NodeState::Idle) + running;

    let wanted = running.saturating_add(waiting_nodes);
    let target = wanted.clamp(spec.min_nodes, spec.max_nodes);
    let mut decision = ScaleDecision {
        target,
        ..Default::default()
    };

    if active < target {
        let room = spec.max_nodes.saturating_sub(active + leaving);
        decision.create = (target - active).min(room);
        return decision;
    }

    let excess = (active - target) as usize;
    if excess == 0 {
        return decision;
    }
    let idle_ms = (spec.idle_seconds_before_scaledown as i64).saturating_mul(1000);
    let mut idle: Vec<&&Node> = nodes
        .iter()
        .filter(|n| n.state == NodeState::Idle && n.running.is_empty())
        // Joined machines are the user's own: never scaled away.
        .filter(|n| n.provider != crate::model::ProviderKind::Joined)
        .collect();
    idle.sort_by(|a, b| a.state_since.cmp(&b.state_since).then(a.id.cmp(&b.id)));
    for node in idle {
        let expires_at = node.state_since.saturating_add(idle_ms);
        if expires_at <= now {
            if decision.remove.len() < excess {
                decision.remove.push(node.id.clone());
            }
        } else {
            decision.wake_at = Some(decision.wake_at.map_or(expires_at, |w| w.min(expires_at)));
        }
    }
    decision
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{ClusterBuilder, NodeBuilder};

    fn refs(nodes: &[Node]) -> Vec<&Node> {
        nodes.iter().collect()
    }

    #[test]
    fn scales_from_zero_on_demand() {
        let spec = ClusterBuilder::new("c").max(4).build();
        let decision = decide(&spec, &[], 3, 0);
        assert_eq!((decision.create, decision.target), (3, 3));
    }

    #[test]
    fn never_above_max_nodes() {
        let spec = ClusterBuilder::new("c").max(2).build();
        assert_eq!(decide(&spec, &[], 10, 0).create, 2);
        let nodes = [
            NodeBuilder::new("a").state(NodeState::Running).build(),
            NodeBuilder::new("b").state(NodeState::Leaving).build(),
        ];
        assert_eq!(
            decide(&spec, &refs(&nodes), 5, 0).create,
            0,
            "leaving nodes still count"
        );
    }

    #[test]
    fn keeps_min_nodes_when_idle() {
        let spec = ClusterBuilder::new("c").min(2).max(4).build();
        assert_eq!(decide(&spec, &[], 0, 0).create, 2);
        let nodes = [
            NodeBuilder::new("a").idle_since(0).build(),
            NodeBuilder::new("b").idle_since(0).build(),
        ];
        let decision = decide(&spec, &refs(&nodes), 0, 10_000_000);
        assert!(decision.remove.is_empty());
    }

    #[test]
    fn scales_down_exactly_at_the_idle_timeout() {
        let spec = ClusterBuilder::new("c").idle_seconds(120).build();
        let nodes = [NodeBuilder::new("a").idle_since(1_000).build()];
        let before = decide(&spec, &refs(&nodes), 0, 1_000 + 119_999);
        assert!(before.remove.is_empty());
        assert_eq!(
            before.wake_at,
            Some(121_000),
            "wakes exactly at the timeout"
        );
        let at = decide(&spec, &refs(&nodes), 0, 121_000);
        assert_eq!(at.remove, vec!["a".to_string()]);
    }

    #[test]
    fn never_removes_a_busy_node() {
        let spec = ClusterBuilder::new("c").idle_seconds(1).build();
        let nodes = [
            NodeBuilder::new("busy")
                .state(NodeState::Running)
                .idle_since(0)
                .build(),
            NodeBuilder::new("warming")
                .state(NodeState::Preparing)
                .idle_since(0)
                .build(),
        ];
        let decision = decide(&spec, &refs(&nodes), 0, 1_000_000);
        assert!(decision.remove.is_empty(), "{decision:?}");
    }

    #[test]
    fn waiting_work_keeps_idle_nodes() {
        let spec = ClusterBuilder::new("c").idle_seconds(1).build();
        let nodes = [NodeBuilder::new("a").idle_since(0).build()];
        // A 2-instance gang waits: the idle node is part of its future placement.
        let decision = decide(&spec, &refs(&nodes), 2, 1_000_000);
        assert_eq!(decision.create, 1);
        assert!(decision.remove.is_empty());
    }

    #[test]
    fn removes_only_the_excess_longest_idle_first() {
        let spec = ClusterBuilder::new("c").min(1).idle_seconds(1).build();
        let nodes = [
            NodeBuilder::new("young").idle_since(500).build(),
            NodeBuilder::new("old").idle_since(0).build(),
            NodeBuilder::new("mid").idle_since(200).build(),
        ];
        let decision = decide(&spec, &refs(&nodes), 0, 10_000);
        assert_eq!(decision.remove, vec!["old".to_string(), "mid".to_string()]);
    }
}
