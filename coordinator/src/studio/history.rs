//! What the studio draws over time: each node's readings and each cluster's
//! scale events for the last hour, sampled from the control loop every few
//! seconds. The studio's own state: nothing else reads or writes it, and a
//! restart starts it afresh.

use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::Duration;

use crate::control::ControlHandle;

/// How often nodes are read, and how much is kept (an hour).
pub const EVERY: Duration = Duration::from_secs(5);
const KEEP: usize = 720;
const KEEP_EVENTS: usize = 200;

#[derive(Clone, Debug, PartialEq)]
pub struct Sample {
    pub at_ms: i64,
    pub cpu_percent: f64,
    pub memory_percent: f64,
    /// Per GPU: (utilization %, memory %, watts, °C).
    pub gpus: Vec<(f64, f64, f64, f64)>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct ScaleEvent {
    pub at_ms: i64,
    pub what: String,
}

#[derive(Default)]
pub struct History {
    nodes: Mutex<HashMap<String, VecDeque<Sample>>>,
    events: Mutex<HashMap<String, VecDeque<ScaleEvent>>>,
    /// Each cluster's (current, target) at the last look.
    sizes: Mutex<HashMap<String, (u32, u32)>>,
}

impl History {
    pub fn record_node(&self, node: &str, sample: Sample) {
        let mut nodes = self.nodes.lock().unwrap_or_else(|e| e.into_inner());
        let samples = nodes.entry(node.to_string()).or_default();
        if samples.len() == KEEP {
            samples.pop_front();
        }
        samples.push_back(sample);
    }

    pub fn node(&self, node: &str) -> Vec<Sample> {
        let nodes = self.nodes.lock().unwrap_or_else(|e| e.into_inner());
        nodes
            .get(node)
            .map(|s| s.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// A cluster's size now: a change from the last look is an event, with why.
    pub fn record_size(&self, cluster: &str, current: u32, target: u32, idle_s: u64, at_ms: i64) {
        let before = {
            let mut sizes = self.sizes.lock().unwrap_or_else(|e| e.into_inner());
            sizes.insert(cluster.to_string(), (current, target))
        };
        let what = match before {
            None => return,
            Some((_, was)) if target > was => {
                format!("target {was} → {target} nodes: work is waiting")
            }
            Some((_, was)) if target < was => format!(
                "target {was} → {target} nodes: nodes idle past {idle_s} s (or the bounds changed)"
            ),
            Some((now, _)) if current != now => {
                format!("{now} → {current} nodes ready (target {target})")
            }
            Some(_) => return,
        };
        let mut events = self.events.lock().unwrap_or_else(|e| e.into_inner());
        let list = events.entry(cluster.to_string()).or_default();
        if list.len() == KEEP_EVENTS {
            list.pop_front();
        }
        list.push_back(ScaleEvent { at_ms, what });
    }

    /// Newest first.
    pub fn events(&self, cluster: &str) -> Vec<ScaleEvent> {
        let events = self.events.lock().unwrap_or_else(|e| e.into_inner());
        events
            .get(cluster)
            .map(|s| s.iter().rev().cloned().collect())
            .unwrap_or_default()
    }

    /// Nodes gone are forgotten.
    fn keep_only(&self, alive: &[String]) {
        let mut nodes = self.nodes.lock().unwrap_or_else(|e| e.into_inner());
        nodes.retain(|id, _| alive.contains(id));
    }

    /// One look at the control loop.
    pub async fn sample(&self, control: &ControlHandle) {
        let now = crate::model::now_ms();
        if let Ok(nodes) = control.list_nodes(None).await {
            let mut alive = Vec::with_capacity(nodes.len());
            for node in &nodes {
                let wire = crate::api::convert::node(node);
                let view = crate::view::Node::from(&wire);
                let percent = |used: u64, total: u64| {
                    if total == 0 {
                        0.0
                    } else {
                        used as f64 / total as f64 * 100.0
                    }
                };
                self.record_node(
                    &view.id,
                    Sample {
                        at_ms: now,
                        cpu_percent: f64::from(view.cpu_percent),
                        memory_percent: percent(view.memory_used_bytes, view.memory_bytes),
                        gpus: view
                            .gpus
                            .iter()
                            .map(|g| {
                                (
                                    f64::from(g.utilization_percent),
                                    percent(g.memory_used_bytes, g.memory_total_bytes),
                                    g.power_watts,
                                    f64::from(g.temperature_c),
                                )
                            })
                            .collect(),
                    },
                );
                alive.push(view.id);
            }
            self.keep_only(&alive);
        }
        if let Ok(clusters) = control.list_clusters().await {
            for info in &clusters {
                self.record_size(
                    &info.cluster.spec.name,
                    info.current_node_count,
                    info.target_node_count,
                    info.cluster.spec.idle_seconds_before_scaledown,
                    now,
                );
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keeps_an_hour_of_samples_and_names_why_a_cluster_changed_size() {
        let history = History::default();
        for i in 0..(KEEP as i64 + 10) {
            history.record_node(
                "n1",
                Sample {
                    at_ms: i,
                    cpu_percent: 1.0,
                    memory_percent: 2.0,
                    gpus: vec![],
                },
            );
        }
        let kept = history.node("n1");
        assert_eq!(kept.len(), KEEP);
        assert_eq!(kept[0].at_ms, 10);
        history.record_size("c", 0, 0, 3, 1);
        history.record_size("c", 0, 2, 3, 2);
        history.record_size("c", 2, 2, 3, 3);
        history.record_size("c", 2, 0, 3, 4);
        let events = history.events("c");
        assert_eq!(events.len(), 3, "{events:?}");
        assert!(events[2].what.contains("0 → 2") && events[2].what.contains("waiting"));
        assert!(events[1].what.contains("ready"));
        assert!(events[0].what.contains("idle past 3 s"));
    }
}
