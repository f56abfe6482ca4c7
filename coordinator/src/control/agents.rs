//! What agents say: registration (and reconciling what they run), instances
//! started, exited and lost, usage, and sessions that end.

use super::*;

impl Control {
    pub(super) fn register(
        &mut self,
        registration: Registration,
        session: u64,
        link: mpsc::UnboundedSender<ToAgent>,
        now: Millis,
    ) -> Result<()> {
        let node_id = registration.node_id.clone();
        if let Some(refusal) = self.replaced_while_away(&node_id) {
            self.remove_node(&node_id, &refusal);
            return Err(Error::FailedPrecondition(format!(
                "{refusal}; the agent should stop"
            )));
        }
        let Some(node) = self.nodes.get_mut(&node_id) else {
            return Err(Error::NotFound(format!(
                "node `{node_id}` is not part of this coordinator's clusters; the agent should stop"
            )));
        };
        if node.cluster != registration.cluster {
            return Err(Error::FailedPrecondition(format!(
                "node `{node_id}` belongs to cluster `{}`, not `{}`",
                node.cluster, registration.cluster
            )));
        }
        let lost_contact = node.state == NodeState::Unusable && node.lost_contact;
        if matches!(node.state, NodeState::Leaving | NodeState::Unusable) && !lost_contact {
            return Err(Error::FailedPrecondition(format!(
                "node `{node_id}` is {} and may not rejoin; the agent should stop",
                node.state.as_str()
            )));
        }
        node.connected = true;
        node.cores = registration.cores;
        node.memory_bytes = registration.memory_bytes;
        node.hostname = registration.hostname.clone();
        if node.provider == ProviderKind::Local {
            // A container's agent reports a pid of its own namespace: not ours to signal.
            node.pid = Some(registration.pid);
        }
        node.runtimes = registration.runtimes.clone();
        node.gpus = registration.gpus.clone();
        node.gpu_reason = registration.gpu_reason.clone();
        node.last_heartbeat = now;
        if node.state == NodeState::Preparing || node.lost_contact {
            if node.lost_contact {
                info!(node = %node_id, "node back after it lost contact; its old work was rerun elsewhere");
            }
            node.state = NodeState::Idle;
            node.state_since = now;
            node.lost_contact = false;
        }
        node.message.clear();
        let cluster = node.cluster.clone();
        self.dirty_nodes.insert(node_id.clone());
        self.links.insert(node_id.clone(), (session, link));
        self.tell(
            &node_id,
            ToAgent::Registered {
                heartbeat_interval: self.config.heartbeat_interval,
                lease: self.config.lease,
            },
        );
        self.create_backoff.remove(&cluster);
        // A node that starts clears the node failures; what blocks scaling stays.
        if let Some(c) = self.clusters.get_mut(&cluster) {
            let before = c.errors.len();
            c.errors.clear();
            if c.errors.len() != before {
                self.dirty_clusters.insert(cluster);
            }
        }
        info!(node = %node_id, reported = registration.attempts.len(), "agent registered");
        self.reconcile(&node_id, registration.attempts, now);
        Ok(())
    }

    /// Brings what the agent says it runs and what we think it runs together.
    pub(super) fn reconcile(
        &mut self,
        node_id: &str,
        mut reports: Vec<AttemptReport>,
        now: Millis,
    ) {
        // Ends first: a successor that started took its predecessor's place.
        reports.sort_by_key(|r| r.exited.is_none());
        let mut reported = BTreeSet::new();
        for report in reports {
            reported.insert(report.slot.clone());
            let wanted = self.instance_wanted_on(node_id, &report.slot);
            match (report.exited, wanted) {
                (Some(exit), _) => self.instance_exited(node_id, &report.slot, exit, now),
                // Its agent holds it until the instance it follows ends.
                (None, true) if report.held => {}
                (None, true) => {
                    if let Some((job, index)) = self.instance_mut(&report.slot) {
                        let instance =
                            &mut job.attempts[index].instances[report.slot.instance as usize];
                        if instance.gpus.is_empty() {
                            instance.gpus = report.gpus;
                        }
                    }
                    self.instance_started(node_id, &report.slot, now)
                }
                (None, false) => {
                    warn!(node = %node_id, attempt = %report.slot.attempt_id, "agent runs an attempt that is no longer wanted; canceling it");
                    self.tell(
                        node_id,
                        ToAgent::Cancel {
                            slot: report.slot,
                            reason: "this attempt is no longer wanted".into(),
                        },
                    );
                }
            }
        }
        let expected: Vec<Slot> = self.nodes.get(node_id).map(Node::slots).unwrap_or_default();
        for slot in expected.iter().filter(|s| !reported.contains(s)) {
            self.instance_lost(slot, &format!("node {node_id} restarted without it"), now);
        }
    }

    /// A node back after it lost contact may have been replaced meanwhile: it
    /// comes back only if its cluster is still under max_nodes (else it would
    /// push the cluster over). Quotas always have room for it: a node out of
    /// contact still counts against them (`governance::usage`).
    fn replaced_while_away(&self, node_id: &str) -> Option<String> {
        let node = self.nodes.get(node_id)?;
        if !(node.state == NodeState::Unusable && node.lost_contact) {
            return None;
        }
        let max_nodes = self.clusters.get(&node.cluster)?.spec.max_nodes;
        (self.allocated_nodes(&node.cluster) >= max_nodes).then(|| {
            format!(
                "node `{node_id}` was replaced while it was out of contact (its cluster is at max_nodes {max_nodes})"
            )
        })
    }

    /// The instance is placed on this node and should still run.
    pub(super) fn instance_wanted_on(&self, node_id: &str, slot: &Slot) -> bool {
        self.instance(slot).is_some_and(|(job, instance)| {
            instance.node == node_id && !instance.status.is_final() && !job.status.is_ending()
        })
    }

    pub(super) fn instance(&self, slot: &Slot) -> Option<(&Job, &InstanceRun)> {
        let job = self.jobs.get(job_of_attempt(&slot.attempt_id)?)?;
        let attempt = job.attempts.iter().find(|a| a.id == slot.attempt_id)?;
        let instance = attempt.instances.get(slot.instance as usize)?;
        Some((job, instance))
    }

    pub(super) fn instance_mut(&mut self, slot: &Slot) -> Option<(&mut Job, usize)> {
        let job = self.jobs.get_mut(job_of_attempt(&slot.attempt_id)?)?;
        let index = job.attempts.iter().position(|a| a.id == slot.attempt_id)?;
        job.attempts[index].instances.get(slot.instance as usize)?;
        Some((job, index))
    }

    /// The session ended; a lease after the agent was last heard from, its work
    /// is rerun (`tick`).
    pub(super) fn agent_gone(&mut self, node_id: &str, session: u64) {
        if self.links.get(node_id).is_some_and(|(s, _)| *s == session) {
            self.links.remove(node_id);
            if let Some(node) = self.nodes.get_mut(node_id) {
                node.connected = false;
                if node.state == NodeState::Leaving {
                    debug!(node = %node_id, "leaving agent disconnected");
                } else {
                    warn!(node = %node_id, "agent disconnected");
                }
            }
        }
    }

    /// The agent stops on its own: its node takes no more work and is removed
    /// through its provider (which finds the machine or allocation ending); the
    /// work the agent stops is rerun when its exits come.
    pub(super) fn agent_leaving(&mut self, node_id: &str, reason: &str) {
        if self
            .nodes
            .get(node_id)
            .is_some_and(|n| matches!(n.state, NodeState::Idle | NodeState::Running))
        {
            self.remove_node(node_id, &format!("its agent is stopping: {reason}"));
        }
    }

    pub(super) fn instance_started(&mut self, node_id: &str, slot: &Slot, now: Millis) {
        if !self.instance_wanted_on(node_id, slot) {
            return;
        }
        let Some((job, index)) = self.instance_mut(slot) else {
            return;
        };
        let attempt = &mut job.attempts[index];
        let instance = &mut attempt.instances[slot.instance as usize];
        if instance.status != InstanceStatus::Launching {
            return; // a repeat, or it is being stopped already
        }
        instance.status = InstanceStatus::Running;
        let all_running = attempt
            .instances
            .iter()
            .all(|i| i.status == InstanceStatus::Running);
        if all_running && job.status == JobStatus::Preparing {
            attempt.started_at = now;
            job.status = JobStatus::Running;
            job.reason = JobReason::None;
            if job.started_at == 0 {
                job.started_at = now;
            }
        }
        let id = job.id.to_string();
        // No one waits on a start: a short job's start and end share a commit.
        self.write_later(id, now);
    }

    pub(super) fn instance_exited(
        &mut self,
        node_id: &str,
        slot: &Slot,
        exit: ExitReport,
        now: Millis,
    ) {
        let node_was_dirty = self.dirty_nodes.contains(node_id);
        self.free_node(node_id, slot, now);
        self.gpu_low_since.remove(slot);
        let Some((job, index)) = self.instance_mut(slot) else {
            return;
        };
        let instance = &mut job.attempts[index].instances[slot.instance as usize];
        if instance.status.is_final() || instance.node != node_id {
            return; // a repeat, or a stale report
        }
        let mut status = InstanceStatus::from_outcome(&exit.outcome, exit.exit_code);
        // Asked to stop: a cancel is what we wanted, not a loss.
        let was_stopping = instance.status == InstanceStatus::Stopping;
        let job_id = job.id.to_string();
        let job_final = job.status.is_ending();
        // Requeued (a sibling was lost or preempted): this attempt is over, and
        // how its instances stop says nothing about the job.
        let requeued = job.status == JobStatus::Queued;
        let mpi = matches!(job.spec.distribution, Some(Distribution::Mpi { .. }));
        let released = mpi || job.spec.parallel.is_some();
        if released && job.status == JobStatus::Completed && status == InstanceStatus::Canceled {
            // Released when the job's work was done (mpirun finished, or every
            // mini-batch settled): its part is done.
            status = InstanceStatus::Completed;
        }
        if status == InstanceStatus::Canceled && !job_final && !was_stopping {
            // Stopped under us (the agent shut down): not the job's fault.
            self.instance_lost(
                slot,
                &format!("stopped on node {node_id}: {}", exit.message),
                now,
            );
            return;
        }
        instance.status = status;
        instance.exit_code = exit.exit_code;
        if exit.usage.is_some() {
            instance.usage = exit.usage.clone();
        }
        instance.message = exit.message.clone();
        let attempt = &mut job.attempts[index];
        if attempt.is_settled() {
            attempt.ended_at = now;
        }
        // Only a completion tells how long the family's jobs take (its
        // family is a hash for a single job: made only then).
        let started_at = attempt.started_at;
        let quick = if status == InstanceStatus::Completed && started_at > 0 {
            successors::family(job).map(|family| (family, now - started_at))
        } else {
            None
        };
        if let Some((family, millis)) = quick {
            self.family_ran(family, millis, now);
        }
        let job_was_dirty = !self.dirty_jobs.insert(job_id.clone());
        if job_final || requeued {
            return;
        }
        match status {
            InstanceStatus::Completed => {
                let done = self.jobs.get(&job_id).is_some_and(|job| {
                    job.attempts[index]
                        .instances
                        .iter()
                        .all(|i| i.status == InstanceStatus::Completed)
                });
                if done {
                    self.end_job(&job_id, JobStatus::Completed, String::new(), now);
                    self.write_task_end_later(
                        &job_id,
                        node_id,
                        (job_was_dirty, node_was_dirty),
                        now,
                    );
                } else if mpi && slot.instance == 0 {
                    // mpirun ended well: every rank did; the workers only held sandboxes.
                    self.end_job(&job_id, JobStatus::Completed, String::new(), now);
                    self.stop_live_instances(&job_id, MPI_RELEASE);
                }
            }
            InstanceStatus::Preempted => {
                self.requeue_preempted(&job_id, node_id, slot, now);
            }
            InstanceStatus::TimedOut => {
                let reason = format!(
                    "instance {} on node {node_id} timed out: {}",
                    slot.instance, exit.message
                );
                self.end_job(&job_id, JobStatus::TimedOut, reason, now);
                self.stop_live_instances(&job_id, "another instance timed out");
            }
            _ => {
                let how = match (exit.exit_code, exit.message.is_empty()) {
                    (Some(code), true) => format!("failed with exit code {code}"),
                    (Some(code), false) => {
                        format!("failed with exit code {code}: {}", exit.message)
                    }
                    (None, _) => format!("failed: {}", exit.message),
                };
                let reason = format!("instance {} on node {node_id} {how}", slot.instance);
                self.end_job(&job_id, JobStatus::Failed, reason, now);
                self.stop_live_instances(&job_id, "another instance failed");
            }
        }
    }

    /// The node no longer runs `slot`.
    pub(super) fn free_node(&mut self, node_id: &str, slot: &Slot, now: Millis) {
        if let Some(node) = self.nodes.get_mut(node_id)
            && node.release(slot, now)
        {
            self.dirty_nodes.insert(node_id.to_string());
        }
    }

    /// An instance's node went away: the attempt is over, and the job is requeued
    /// as a new attempt (a gang as a whole) unless it used up its attempts.
    pub(super) fn instance_lost(&mut self, slot: &Slot, why: &str, now: Millis) {
        let on_preempted_node = self
            .instance(slot)
            .is_some_and(|(_, run)| self.preempted_nodes.contains(&run.node));
        if on_preempted_node {
            self.instance_preempted(slot, now);
            return;
        }
        let Some((job, index)) = self.instance_mut(slot) else {
            return;
        };
        let instance = &mut job.attempts[index].instances[slot.instance as usize];
        if instance.status.is_final() {
            return;
        }
        instance.status = InstanceStatus::Lost;
        instance.message = why.to_string();
        let node_id = instance.node.clone();
        let attempt = &mut job.attempts[index];
        attempt.reason = why.to_string();
        if attempt.is_settled() {
            attempt.ended_at = now;
        }
        let job_id = job.id.to_string();
        let attempts_used = job.attempts.iter().filter(|a| a.was_lost()).count() as u32;
        let job_final = job.status.is_ending();
        self.dirty_jobs.insert(job_id.clone());
        self.free_node(&node_id, slot, now);
        if job_final {
            return;
        }
        self.stop_live_instances(&job_id, "another instance was lost");
        if attempts_used >= self.config.max_attempts {
            let reason =
                format!("gave up after {attempts_used} attempts; the last one was lost: {why}");
            self.end_job(&job_id, JobStatus::Failed, reason, now);
            return;
        }
        self.parallel_take_back(&job_id, None);
        if let Some(job) = self.jobs.get_mut(&job_id)
            && job.status != JobStatus::Queued
        {
            warn!(job = %job_id, attempt = %slot.attempt_id, why, "attempt lost; requeued");
            job.status = JobStatus::Queued;
            job.reason = JobReason::Requeued(Box::new(Requeue::Lost {
                lost: attempts_used,
                why: why.to_string(),
            }));
            self.queue.push(job);
        }
    }

    /// Live usage of a running instance; flags (and, by the cluster's policy,
    /// cancels) a job whose GPUs sit idle too long.
    pub(super) fn observe_usage(&mut self, node_id: &str, slot: &Slot, used: Usage, now: Millis) {
        if !self.instance_wanted_on(node_id, slot) {
            return;
        }
        let holds_gpus = self
            .instance(slot)
            .is_some_and(|(_, instance)| !instance.gpus.is_empty());
        let utilization = f64::from(used.gpu_utilization_percent);
        let samples = used.samples;
        if let Some((job, index)) = self.instance_mut(slot) {
            job.attempts[index].instances[slot.instance as usize].usage = Some(used);
        }
        if !holds_gpus || samples == 0 {
            return;
        }
        let threshold = self.config.idle_gpu_threshold_percent;
        let after = self.config.idle_gpu_after.as_millis() as i64;
        let low_since = self.gpu_low_since.get(slot).copied();
        let (low_since, idle) =
            crate::governance::idle_gpu(low_since, utilization, threshold, now, after);
        match low_since {
            Some(since) => self.gpu_low_since.insert(slot.clone(), since),
            None => self.gpu_low_since.remove(slot),
        };
        if !idle {
            return;
        }
        let Some(job_id) = job_of_attempt(&slot.attempt_id).map(str::to_string) else {
            return;
        };
        let flag = format!(
            "idle GPU: instance {} below {threshold}% GPU utilization for {} min",
            slot.instance,
            after / 60_000
        );
        let cancel = self
            .jobs
            .get(&job_id)
            .and_then(|j| self.clusters.get(j.spec.cluster.as_str()))
            .is_some_and(|c| c.spec.cancel_idle_gpu_jobs);
        if let Some(job) = self.jobs.get_mut(&job_id)
            && !job.flags.contains(&flag)
        {
            warn!(job = %job_id, %flag, "job flagged");
            job.flags.push(flag.clone());
            self.dirty_jobs.insert(job_id.clone());
            self.new_logs.push(NewLog {
                job_id: job_id.clone(),
                attempt_id: slot.attempt_id.clone(),
                instance: slot.instance,
                stream: "shoal".into(),
                data: format!("[shoal] {flag}\n").into_bytes(),
            });
            if cancel {
                let reason = format!("canceled by the cluster's idle-GPU policy: {flag}");
                self.cancel(&job_id, reason, "idle GPU", now);
            }
        }
    }
}
