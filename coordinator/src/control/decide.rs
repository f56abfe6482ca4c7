//! The decisions: placement (only where something changed) and scaling, each
//! cluster on its own, and why its queued jobs wait.

use super::*;

/// Why queued jobs of a cluster still wait, in words a person can act on.
pub fn waiting_reason(
    spec: &ClusterSpec,
    active: u32,
    target: u32,
    free: u32,
    widest: u32,
) -> String {
    if active < target {
        return format!("waiting for nodes: scaling {active} → {target}");
    }
    if active >= spec.max_nodes && free < widest {
        return format!(
            "max_nodes {} reached; waiting for running jobs to free nodes ({free} free, {widest} needed)",
            spec.max_nodes
        );
    }
    if widest > 1 && free < widest {
        return format!("gang of {widest} needs {widest} nodes, {free} ready");
    }
    format!("waiting for nodes to start ({free} ready)")
}

impl Control {
    /// Placement and scaling: what the jobs and nodes that changed now allow.
    pub fn decide(&mut self, now: Millis) {
        self.finish_canceling(now);
        // Tasks that ended make room for their array's held ones, placed now.
        self.account_arrays(now);
        for name in self.clusters_to_place() {
            self.place(&name, now);
            self.book_successors(&name, now);
        }
        self.wake_at = None;
        let names: Vec<String> = self.clusters.keys().cloned().collect();
        for name in names {
            self.scale(&name, now);
        }
        self.lazy_writes_due(now);
        // What placement started counts too, before it is committed.
        self.account_arrays(now);
    }

    /// The clusters where a placement could change: those whose queued jobs or
    /// nodes changed since the last pass (every one after loading).
    pub(super) fn clusters_to_place(&mut self) -> BTreeSet<String> {
        let again = std::mem::take(&mut self.place_again);
        if std::mem::take(&mut self.place_all) {
            return self.clusters.keys().cloned().collect();
        }
        let jobs = self
            .dirty_jobs
            .iter()
            .filter_map(|id| self.jobs.get(id))
            .filter(|j| j.status == JobStatus::Queued)
            .map(|j| j.spec.cluster.as_str());
        let nodes = self
            .dirty_nodes
            .iter()
            .filter_map(|id| self.nodes.get(id))
            .map(|n| n.cluster.as_str());
        jobs.chain(nodes)
            .chain(self.dirty_clusters.iter().map(String::as_str))
            .map(str::to_string)
            .chain(again)
            .collect()
    }

    /// Places what fits on the cluster's free nodes; a cluster with none costs
    /// nothing, however many jobs wait on it.
    pub(super) fn place(&mut self, cluster: &str, now: Millis) {
        let Some(queue) = self.queue.cluster(cluster) else {
            return;
        };
        let nodes: Vec<&Node> = self
            .nodes
            .values()
            .filter(|n| n.cluster == cluster)
            .collect();
        if !nodes.iter().any(|n| n.is_open() && !n.room().is_full()) {
            return;
        }
        let schedulable = queue
            .seqs()
            .filter_map(|seq| self.jobs.by_seq(seq))
            .filter(|j| j.current_attempt().is_none_or(Attempt::is_settled));
        let placements = scheduler::place(schedulable, &nodes, queue.shapes());
        for placement in placements {
            self.start_attempt(&placement, None, now);
        }
    }

    /// The autoscaler's decision for one cluster, carried out within its lock,
    /// quotas and start backoff; and why its queued jobs wait.
    pub(super) fn scale(&mut self, name: &str, now: Millis) {
        let spec = self.clusters[name].spec.clone();
        let queued = self.queue.cluster(name);
        let (waiting_instances, widest) = queued.map_or((0, 0), queue::ClusterQueue::waiting);
        let waiting_nodes = match (queued, self.config.catalog.get(&spec.vm_size)) {
            (Some(queued), Some(size)) => queued.nodes_wanted(size),
            _ => waiting_instances,
        };
        let waiting_nodes = u32::try_from(waiting_nodes).unwrap_or(u32::MAX);
        let nodes: Vec<&Node> = self.nodes.values().filter(|n| n.cluster == name).collect();
        let free = nodes.iter().filter(|n| n.is_free()).count();
        let decision = autoscaler::decide(&spec, &nodes, waiting_nodes, now);
        if let Some(at) = decision.wake_at {
            self.wake_at = Some(self.wake_at.map_or(at, |w| w.min(at)));
        }
        let active = nodes
            .iter()
            .filter(|n| {
                matches!(
                    n.state,
                    NodeState::Preparing | NodeState::Idle | NodeState::Running
                )
            })
            .count() as u32;
        // What live nodes have in GPUs, for jobs that want more.
        let live_gpus = nodes
            .iter()
            .filter(|n| matches!(n.state, NodeState::Idle | NodeState::Running))
            .map(|n| (n.gpus.len() as u32, n))
            .collect::<Vec<_>>();
        let most_gpus = live_gpus.iter().map(|(count, _)| *count).max();
        let most_room = live_gpus
            .iter()
            .map(|(_, n)| (n.cores.saturating_mul(1000), n.memory_bytes))
            .reduce(|a, b| (a.0.max(b.0), a.1.max(b.1)));
        let gpu_why = live_gpus
            .iter()
            .find(|(_, n)| !n.gpu_reason.is_empty())
            .map(|(_, n)| format!(" ({}: {})", n.id, n.gpu_reason))
            .unwrap_or_default();
        let previous = self.targets.insert(name.to_string(), decision.target);
        if previous != Some(decision.target) {
            self.dirty_clusters.insert(name.to_string());
        }
        // Read-only: neither up nor down, and say so; else the quotas decide.
        let (allowed, block, removals) = match crate::governance::lock_block(&self.clusters[name]) {
            Some(block) => {
                let wanted = decision.create > 0 || !decision.remove.is_empty();
                (0, wanted.then_some(block), Vec::new())
            }
            None => {
                let (allowed, block) = self.quota_room(name, decision.create);
                (allowed, block, decision.remove.clone())
            }
        };
        let backoff_until = self.create_backoff.get(name).map(|b| b.until);
        match backoff_until {
            Some(until) if allowed > 0 && now < until => {
                self.wake_at = Some(self.wake_at.map_or(until, |w| w.min(until)));
            }
            _ => {
                for _ in 0..allowed {
                    self.create_node(name, now);
                }
            }
        }
        // A quota's words count the nodes just created too.
        let block = match block {
            Some(quota @ crate::governance::Block::Quota { .. }) => {
                self.quota_room(name, 1).1.or(Some(quota))
            }
            other => other,
        };
        self.set_block(name, block);
        for id in &removals {
            self.remove_node(id, "idle past idle_seconds_before_scaledown");
        }
        let reason = (waiting_instances > 0).then(|| {
            let reason = match (self.blocked.get(name), self.create_backoff.get(name)) {
                (Some(block), _) => block.to_string(),
                (None, Some(backoff)) => format!(
                    "{}; {} node(s) failed to start in a row, the last: {}",
                    waiting_reason(&spec, active, decision.target, free as u32, widest),
                    backoff.failures,
                    backoff.last
                ),
                (None, None) => waiting_reason(&spec, active, decision.target, free as u32, widest),
            };
            QueueReason {
                reason,
                most_gpus,
                gpu_why,
                most_room,
            }
        });
        let changed = match reason {
            Some(reason) => {
                self.queue_reasons.insert(name.to_string(), reason.clone()) != Some(reason)
            }
            None => self.queue_reasons.remove(name).is_some(),
        };
        if changed {
            // Watchers of its queued jobs look again (nothing of theirs is written).
            self.notify_clusters.insert(name.to_string());
        }
    }

    /// A queued job's reason: a task its array holds back says so; else its
    /// own (a requeue says why) or its cluster's, and a job no live node has the
    /// GPUs or the room for says so.
    pub(super) fn queued_reason(&self, job: &Job) -> Option<String> {
        if let Some(task) = job.task
            && self.is_held(job)
            && let Some(array) = self.jobs.by_seq(task.array_seq)
        {
            let max = array.array.as_deref().map_or(0, |s| s.spec.max_concurrent);
            return Some(format!(
                "held: array {} runs at most {max} tasks at once",
                array.id
            ));
        }
        let cluster = job.spec.cluster.as_str();
        let waiting = self.queue_reasons.get(cluster)?;
        if let Some(most) = waiting.most_gpus
            && job.spec.gpus_per_instance > most
        {
            return Some(if most == 0 {
                format!("no node in cluster {cluster} has GPUs{}", waiting.gpu_why)
            } else {
                format!(
                    "no node in cluster {cluster} has {} GPUs (at most {most})",
                    job.spec.gpus_per_instance
                )
            });
        }
        let share = job.spec.resources;
        if let Some((cores, memory)) = waiting.most_room
            && !share.is_whole()
            && (share.millicpus > cores || share.memory_bytes() > memory)
        {
            return Some(format!(
                "no node in cluster {cluster} has room for {share} (the biggest has {} cpus, {})",
                cores / 1000,
                human_bytes(memory)
            ));
        }
        // A requeued job says why itself; one waiting its turn has its cluster's reason.
        let own = matches!(job.reason, JobReason::Requeued(_) | JobReason::Said(_));
        (!own).then(|| waiting.reason.clone())
    }
}
