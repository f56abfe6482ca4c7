//! Quotas, locks, preemption and chaos, as the loop applies them
//! (`crate::governance` holds the rules).

use super::*;

impl Control {
    /// Records (or clears) what blocks a cluster's scale-up (shown with its
    /// errors by `cluster_info`).
    pub(super) fn set_block(&mut self, cluster: &str, block: Option<crate::governance::Block>) {
        let previous = match &block {
            Some(why) => self.blocked.insert(cluster.to_string(), why.clone()),
            None => self.blocked.remove(cluster),
        };
        if previous == block {
            return;
        }
        if let Some(why) = &block {
            info!(cluster, why = %why, "scale-up blocked");
        }
        // Its readers look again; nothing of it is written.
        self.notify_clusters.insert(cluster.to_string());
    }

    /// How many of `wanted` new nodes the quotas allow, and which quota says no.
    pub(super) fn quota_room(
        &self,
        cluster: &str,
        wanted: u32,
    ) -> (u32, Option<crate::governance::Block>) {
        if wanted == 0 {
            return (0, None);
        }
        let Some(c) = self.clusters.get(cluster) else {
            return (0, None);
        };
        let Some(size) = self.config.catalog.get(&c.spec.vm_size) else {
            return (0, None);
        };
        let nodes: Vec<&Node> = self.nodes.values().collect();
        let used = crate::governance::usage(&self.clusters, &nodes, &self.config.catalog);
        crate::governance::room(
            &self.quotas,
            &used,
            &size.family,
            c.spec.vm_priority,
            size.cores,
            wanted,
        )
    }

    pub(super) fn quota_report(&self) -> QuotaReport {
        let nodes: Vec<&Node> = self.nodes.values().collect();
        let used = crate::governance::usage(&self.clusters, &nodes, &self.config.catalog);
        let mut families: BTreeSet<String> = self.quotas.family_cores.keys().cloned().collect();
        families.extend(used.family.keys().cloned());
        for cluster in self.clusters.values() {
            if cluster.spec.vm_priority == Priority::Dedicated
                && let Some(size) = self.config.catalog.get(&cluster.spec.vm_size)
            {
                families.insert(size.family.clone());
            }
        }
        let mut lines: Vec<(String, u32, u32)> = families
            .into_iter()
            .map(|f| {
                let in_use = used.family.get(&f).copied().unwrap_or(0);
                (format!("family {f}"), self.quotas.family_limit(&f), in_use)
            })
            .collect();
        lines.push((
            "low-priority".into(),
            self.quotas.low_priority_cores,
            used.low_priority,
        ));
        lines.push(("total".into(), self.quotas.total_cores, used.total));
        QuotaReport { lines }
    }

    pub(super) fn set_quotas(&mut self, change: QuotaChange) -> Result<QuotaReport> {
        if let Some((family, _)) = &change.family
            && family.trim().is_empty()
        {
            return Err(Error::invalid(
                "family",
                "name the VM family (`shoal vm-size list` shows them)",
            ));
        }
        if let Some((family, cores)) = change.family {
            self.quotas.family_cores.insert(family, cores);
        }
        if let Some(cores) = change.low_priority_cores {
            self.quotas.low_priority_cores = cores;
        }
        if let Some(cores) = change.total_cores {
            self.quotas.total_cores = cores;
        }
        self.quotas_dirty = true;
        info!(quotas = ?self.quotas, "quotas changed");
        Ok(self.quota_report())
    }

    pub(super) fn lock_cluster(
        &mut self,
        name: &str,
        kind: Option<LockKind>,
    ) -> Result<ClusterInfo> {
        let cluster = self.clusters.get_mut(name).ok_or_else(|| {
            Error::NotFound(format!(
                "cluster `{name}` not found; `shoal cluster list` shows the clusters"
            ))
        })?;
        cluster.lock = kind;
        if kind != Some(LockKind::ReadOnly) {
            self.blocked.remove(name);
        }
        info!(
            cluster = name,
            lock = kind.map_or("none", LockKind::as_str),
            "lock changed"
        );
        self.dirty_clusters.insert(name.to_string());
        self.cluster_info(name)
    }

    /// The real preemption path: the agent stops its jobs (SIGTERM now, SIGKILL when
    /// `notice` is over), the node goes, and the work is requeued.
    pub(super) fn preempt_node(
        &mut self,
        node_id: &str,
        notice: Duration,
        why: &str,
        now: Millis,
    ) -> Result<Node> {
        let node = self.nodes.get(node_id).ok_or_else(|| {
            Error::NotFound(format!(
                "node `{node_id}` not found; `shoal node list` shows the nodes"
            ))
        })?;
        let low_priority = self
            .clusters
            .get(&node.cluster)
            .is_some_and(|c| c.spec.vm_priority == Priority::LowPriority);
        if !low_priority {
            return Err(Error::FailedPrecondition(format!(
                "node `{node_id}` is in a dedicated cluster; only low-priority nodes are preempted"
            )));
        }
        if !matches!(
            node.state,
            NodeState::Idle | NodeState::Running | NodeState::Preparing
        ) {
            return Err(Error::FailedPrecondition(format!(
                "node `{node_id}` is {}; only a live node can be preempted",
                node.state.as_str()
            )));
        }
        let busy = !node.running.is_empty();
        warn!(
            node = node_id,
            notice_s = notice.as_secs(),
            why,
            "node preempted"
        );
        if let Some(node) = self.nodes.get_mut(node_id) {
            node.state = NodeState::Preempted;
            node.state_since = now;
            node.message = format!("{why}; {} s notice", notice.as_secs());
        }
        self.dirty_nodes.insert(node_id.to_string());
        self.preempt_deadlines
            .insert(node_id.to_string(), now + notice.as_millis() as i64);
        self.preempted_nodes.insert(node_id.to_string());
        self.tell(
            node_id,
            ToAgent::Preempt {
                notice,
                reason: why.to_string(),
            },
        );
        let node = self.nodes.get(node_id).cloned();
        if !busy {
            self.preempt_deadlines.remove(node_id);
            self.remove_node(node_id, "preempted");
        }
        node.ok_or_else(|| Error::Internal("preempted node vanished".into()))
    }

    /// An instance whose node was preempted before it could report its own end.
    pub(super) fn instance_preempted(&mut self, slot: &Slot, now: Millis) {
        let Some((job, index)) = self.instance_mut(slot) else {
            return;
        };
        let instance = &mut job.attempts[index].instances[slot.instance as usize];
        if instance.status.is_final() {
            return;
        }
        instance.status = InstanceStatus::Preempted;
        instance.message = "its node was preempted".into();
        let node_id = instance.node.clone();
        let attempt = &mut job.attempts[index];
        if attempt.is_settled() {
            attempt.ended_at = now;
        }
        let job_id = job.id.to_string();
        let job_final = job.status.is_ending();
        self.dirty_jobs.insert(job_id.clone());
        self.free_node(&node_id, slot, now);
        if !job_final {
            self.requeue_preempted(&job_id, &node_id, slot, now);
        }
    }

    /// A preempted instance: the job goes back to the queue as a whole (the rest of
    /// a gang is stopped), unless it used up `max_preemptions`.
    pub(super) fn requeue_preempted(
        &mut self,
        job_id: &str,
        node_id: &str,
        slot: &Slot,
        now: Millis,
    ) {
        let Some(job) = self.jobs.get_mut(job_id) else {
            return;
        };
        if job.status == JobStatus::Queued {
            return; // another instance of the gang got here first
        }
        job.preemptions += 1;
        let count = job.preemptions;
        let limit = job.spec.max_preemptions;
        self.dirty_jobs.insert(job_id.to_string());
        self.stop_live_instances(job_id, "another instance was preempted");
        if count > limit {
            let reason = format!("preempted {count} times, more than max_preemptions {limit}");
            self.end_job(job_id, JobStatus::Failed, reason, now);
            return;
        }
        self.parallel_take_back(job_id, None);
        if let Some(job) = self.jobs.get_mut(job_id) {
            job.status = JobStatus::Queued;
            job.reason = JobReason::Requeued(Box::new(Requeue::Preempted {
                node: node_id.to_string(),
                attempt: slot.attempt_id.clone(),
                count,
                limit,
            }));
            self.queue.push(job);
        }
    }

    /// Chaos: now and then a random low-priority node is preempted.
    pub(super) fn chaos(&mut self, now: Millis) {
        let Some(every) = self.config.chaos_preempt_every else {
            return;
        };
        if now < self.next_chaos {
            self.wake_at = Some(
                self.wake_at
                    .map_or(self.next_chaos, |w| w.min(self.next_chaos)),
            );
            return;
        }
        self.next_chaos = now + every.as_millis() as i64;
        let candidates: Vec<String> = self
            .nodes
            .values()
            .filter(|n| matches!(n.state, NodeState::Idle | NodeState::Running) && n.connected)
            // Not a node that just came up or just took work: every job gets at
            // least one interval, even when only one node is up.
            .filter(|n| now - n.state_since >= every.as_millis() as i64)
            .filter(|n| {
                self.clusters
                    .get(&n.cluster)
                    .is_some_and(|c| c.spec.vm_priority == Priority::LowPriority)
            })
            .map(|n| n.id.clone())
            .collect();
        if candidates.is_empty() {
            return;
        }
        let pick = candidates[rand::Rng::random_range(&mut self.rng, 0..candidates.len())].clone();
        let notice = self.config.preemption_notice;
        let _ = self.preempt_node(&pick, notice, "preempted by chaos", now);
    }
}
