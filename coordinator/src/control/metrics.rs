//! /metrics: one consistent view of the loop's state, encoded.

use super::*;

impl Control {
    pub(super) fn metrics(&self) -> String {
        use crate::metrics::MetricsBuilder;
        use prometheus_client::registry::Unit;
        let mut m = MetricsBuilder::default();
        let states = [
            NodeState::Idle,
            NodeState::Running,
            NodeState::Preparing,
            NodeState::Leaving,
            NodeState::Preempted,
            NodeState::Unusable,
        ];
        for name in self.clusters.keys() {
            for state in states {
                let count = self
                    .nodes
                    .values()
                    .filter(|n| &n.cluster == name && n.state == state)
                    .count();
                m.gauge(
                    "nodes",
                    "Nodes by cluster and state",
                    None,
                    &[("cluster", name), ("state", state.as_str())],
                    count as f64,
                );
            }
            let cores: u32 = self
                .nodes
                .values()
                .filter(|n| &n.cluster == name && n.state != NodeState::Unusable)
                .map(|n| n.cores)
                .sum();
            m.gauge(
                "cluster_cores",
                "Cores of a cluster's allocated nodes",
                None,
                &[("cluster", name)],
                f64::from(cores),
            );
        }
        for (scope, limit, used) in self.quota_report().lines {
            m.gauge(
                "quota_limit_cores",
                "Core quota by scope",
                None,
                &[("scope", &scope)],
                f64::from(limit),
            );
            m.gauge(
                "quota_used_cores",
                "Cores counted against a quota",
                None,
                &[("scope", &scope)],
                f64::from(used),
            );
        }
        for node in self.nodes.values() {
            let labels = [
                ("cluster", node.cluster.as_str()),
                ("node", node.id.as_str()),
            ];
            m.gauge(
                "node_cpu_utilization_ratio",
                "CPU busy, 0 to 1",
                None,
                &labels,
                f64::from(node.cpu_percent) / 100.0,
            );
            m.gauge(
                "node_memory_used",
                "Memory in use",
                Some(Unit::Bytes),
                &labels,
                node.memory_used_bytes as f64,
            );
            m.gauge(
                "node_memory",
                "Memory of the node",
                Some(Unit::Bytes),
                &labels,
                node.memory_bytes as f64,
            );
            let job_of_gpu = |index: u32| -> String {
                node.running
                    .iter()
                    .filter_map(|b| self.instance(&b.slot))
                    .find(|(_, run)| run.gpus.contains(&index))
                    .map(|(job, _)| job.id.to_string())
                    .unwrap_or_default()
            };
            for gpu in &node.stats.gpus {
                let index = gpu.index.to_string();
                let job = job_of_gpu(gpu.index);
                let labels = [
                    ("cluster", node.cluster.as_str()),
                    ("node", node.id.as_str()),
                    ("gpu", index.as_str()),
                    ("job", job.as_str()),
                ];
                m.gauge(
                    "gpu_utilization_ratio",
                    "GPU busy, 0 to 1",
                    None,
                    &labels,
                    f64::from(gpu.utilization_percent) / 100.0,
                );
                m.gauge(
                    "gpu_memory_used",
                    "GPU memory in use",
                    Some(Unit::Bytes),
                    &labels,
                    gpu.memory_used_bytes as f64,
                );
                m.gauge(
                    "gpu_power",
                    "GPU power draw",
                    Some(Unit::Other("watts".into())),
                    &labels,
                    f64::from(gpu.power_milliwatts) / 1000.0,
                );
                m.gauge(
                    "gpu_temperature",
                    "GPU temperature",
                    Some(Unit::Celsius),
                    &labels,
                    f64::from(gpu.temperature_c),
                );
            }
        }
        let counts = self.job_counts();
        for status in JobStatus::ALL {
            let count = counts.get(&status).copied().unwrap_or(0);
            m.gauge(
                "jobs",
                "Jobs by state",
                None,
                &[("state", status.as_str())],
                count as f64,
            );
        }
        m.counter(
            "control_batches",
            "Batches the control loop has applied",
            self.batches_total,
        );
        m.counter(
            "successors_booked",
            "Tasks a node was told ahead, to start when the one before ends",
            self.successors_booked,
        );
        m.histogram_seconds(
            "scheduler_decide",
            "Time of each placement and autoscaling pass",
            self.timings.decide.clone(),
        );
        m.histogram_seconds(
            "store_commit",
            "Time of each commit to the store (and what follows it); passes that write nothing are not counted",
            self.timings.commit.clone(),
        );
        m.encode()
    }
}
