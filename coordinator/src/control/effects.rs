//! What a pass asks of the world (`Effects`), taken out for the driver; the
//! commit's outcome coming back; and a clean stop.

use super::*;

/// What one pass asks of the world, in the order the driver does it: commit
/// `batch`; then, once it is durable, the agent messages (a launch first: it
/// starts the work callers wait for), the replies, the change notices and the
/// provider calls.
pub struct Effects {
    pub batch: Batch,
    /// Each answers its caller: with its result, or with the commit's failure.
    pub replies: Vec<Deferred>,
    pub messages: Vec<(Link, ToAgent)>,
    pub create: Vec<NodeLaunch>,
    pub remove: Vec<NodeRemoval>,
    pub changes: Vec<Change>,
    /// Jobs the batch wrote or announced (`committed` needs them).
    pub jobs_touched: BTreeSet<String>,
}

/// Where a node's agent is reached: its session's channel.
pub type Link = mpsc::UnboundedSender<ToAgent>;

/// The loop's timings, kept by the driver and shown in /metrics.
#[derive(Clone, Debug)]
pub struct Timings {
    pub decide: prometheus_client::metrics::histogram::Histogram,
    pub commit: prometheus_client::metrics::histogram::Histogram,
}

impl Default for Timings {
    fn default() -> Self {
        Timings {
            decide: crate::metrics::loop_histogram(),
            commit: crate::metrics::loop_histogram(),
        }
    }
}

impl Control {
    /// `id` changed in a way no one waits on: it is written with the next
    /// batch that writes anything (or, at the latest, `LAZY_WRITE_MS` on).
    pub(super) fn write_later(&mut self, id: String, now: Millis) {
        if !self.dirty_jobs.contains(&id) {
            self.lazy_jobs.insert(id);
            self.lazy_since.get_or_insert(now);
        }
    }

    /// A node's change no one waits on, written as `write_later` writes jobs.
    pub(super) fn write_node_later(&mut self, id: String, now: Millis) {
        if !self.dirty_nodes.contains(&id) {
            self.lazy_nodes.insert(id);
            self.lazy_since.get_or_insert(now);
        }
    }

    /// A task of an array completed, and no one waits for that to be written:
    /// no caller (the array's own end is written at once, `account_arrays`),
    /// no pipeline step or trial. Its row and its node's freed slot go with the
    /// next batch that writes anything, or `LAZY_WRITE_MS` on, unless something
    /// else made them due in this pass (`was_dirty`: the job's, the node's). A
    /// coordinator that dies before then hears the end again from the agent,
    /// which reports what it ran when it reconnects (lost with its agent too, the
    /// task runs again, as an unwritten start's would). With chains of successors
    /// topped up by halves (`successors.rs`), a node's short tasks are committed
    /// a batch of them at a time instead of one commit each.
    pub(super) fn write_task_end_later(
        &mut self,
        job_id: &str,
        node_id: &str,
        was_dirty: (bool, bool),
        now: Millis,
    ) {
        let Some(job) = self.jobs.get(job_id) else {
            return;
        };
        if job.task.is_none()
            || job.trial.is_some()
            || job.step.is_some()
            || job.status != JobStatus::Completed
        {
            return;
        }
        let (job_was_dirty, node_was_dirty) = was_dirty;
        if !job_was_dirty && self.dirty_jobs.remove(job_id) {
            self.write_later(job_id.to_string(), now);
        }
        if !node_was_dirty && self.dirty_nodes.remove(node_id) {
            self.write_node_later(node_id.to_string(), now);
            // Its freed slot may take a queued job in this pass all the same.
            if let Some(node) = self.nodes.get(node_id) {
                self.place_again.insert(node.cluster.clone());
            }
        }
    }

    /// Changes that waited long enough are written in this pass; else the
    /// loop is woken for them.
    pub(super) fn lazy_writes_due(&mut self, now: Millis) {
        let Some(since) = self.lazy_since else {
            return;
        };
        let due = since + LAZY_WRITE_MS;
        if now >= due {
            self.dirty_jobs.append(&mut self.lazy_jobs);
            self.dirty_nodes.append(&mut self.lazy_nodes);
            self.lazy_since = None;
        } else {
            self.wake_at = Some(self.wake_at.map_or(due, |w| w.min(due)));
        }
    }

    /// What this pass decided, for the driver: the batch to commit, and what
    /// waits on that commit (replies, agent messages, provider calls, changes).
    pub fn effects(&mut self) -> Effects {
        self.batches_total += 1;
        let mut clusters_touched: BTreeSet<String> = self
            .dirty_nodes
            .iter()
            .chain(self.deleted_nodes.iter())
            .filter_map(|id| self.nodes.get(id).map(|n| n.cluster.clone()))
            .chain(self.dirty_clusters.iter().cloned())
            .chain(self.deleted_clusters.iter().cloned())
            .chain(std::mem::take(&mut self.notify_clusters))
            .collect();
        let mut batch = Batch {
            clusters: self
                .dirty_clusters
                .iter()
                .filter_map(|n| self.clusters.get(n).cloned())
                .collect(),
            deleted_clusters: std::mem::take(&mut self.deleted_clusters)
                .into_iter()
                .collect(),
            nodes: self
                .dirty_nodes
                .iter()
                .filter_map(|id| self.nodes.get(id).cloned())
                .collect(),
            deleted_nodes: std::mem::take(&mut self.deleted_nodes)
                .into_iter()
                .collect(),
            jobs: self
                .dirty_jobs
                .iter()
                .filter_map(|id| self.jobs.get(id).cloned())
                .collect(),
            logs: std::mem::take(&mut self.new_logs),
            next_job_seq: self.seqs_dirty.then_some(self.next_job_seq),
            next_node_seq: self.seqs_dirty.then_some(self.next_node_seq),
            quotas: std::mem::take(&mut self.quotas_dirty).then(|| self.quotas.clone()),
            new_mini_batches: Vec::new(),
            mini_batches: Vec::new(),
            mini_batch_rows: Vec::new(),
            identities: std::mem::take(&mut self.new_identities),
            delete_jobs: std::mem::take(&mut self.delete_jobs),
            purge_ended_before: self.purge_before.take(),
            datastores: std::mem::take(&mut self.new_datastores),
            data_assets: std::mem::take(&mut self.new_data_assets),
            environments: std::mem::take(&mut self.new_environments),
            components: std::mem::take(&mut self.new_components),
            defaults: std::mem::take(&mut self.defaults_dirty).then(|| self.defaults.clone()),
        };
        self.parallel_changes(&mut batch);
        // A batch is written anyway: what waited goes with it.
        if !batch.is_empty() && self.lazy_since.take().is_some() {
            for id in std::mem::take(&mut self.lazy_jobs) {
                if !self.dirty_jobs.contains(&id)
                    && let Some(job) = self.jobs.get(&id)
                {
                    batch.jobs.push(job.clone());
                    self.dirty_jobs.insert(id);
                }
            }
            for id in std::mem::take(&mut self.lazy_nodes) {
                if !self.dirty_nodes.contains(&id)
                    && let Some(node) = self.nodes.get(&id)
                {
                    clusters_touched.insert(node.cluster.clone());
                    batch.nodes.push(node.clone());
                }
            }
        }
        self.dirty_clusters.clear();
        self.dirty_nodes.clear();
        self.seqs_dirty = false;
        let mut jobs_touched = std::mem::take(&mut self.dirty_jobs);
        jobs_touched.append(&mut self.notify_jobs);
        let changes = jobs_touched
            .iter()
            .cloned()
            .map(Change::Job)
            .chain(clusters_touched.into_iter().map(Change::Cluster))
            .collect();
        Effects {
            batch,
            replies: std::mem::take(&mut self.replies),
            messages: std::mem::take(&mut self.outbox),
            create: std::mem::take(&mut self.to_create),
            remove: std::mem::take(&mut self.to_remove),
            changes,
            jobs_touched,
        }
    }

    /// The batch of `effects` is durable: what it deleted leaves memory, and the
    /// oldest ended jobs make room for the ones it settled.
    pub fn committed(
        &mut self,
        committed: &Committed,
        jobs_touched: &BTreeSet<String>,
        now: Millis,
    ) {
        self.purged(committed, now);
        self.forget_old_jobs(jobs_touched);
    }

    /// Clean shutdown: running attempts are requeued (their processes stop with
    /// their nodes), every agent is told to stop and every node is forgotten;
    /// what the provider must remove.
    pub fn stop_all(&mut self, now: Millis) -> Vec<NodeRemoval> {
        let running: Vec<Slot> = self.nodes.values().flat_map(Node::slots).collect();
        for slot in running {
            self.instance_lost(&slot, "the coordinator stopped", now);
        }
        self.account_arrays(now);
        self.outbox.clear();
        self.to_create.clear();
        self.to_remove.clear();
        let removals: Vec<NodeRemoval> = self.nodes.values().map(removal).collect();
        for id in removals.iter().map(|r| r.node_id.clone()) {
            self.tell(
                &id,
                ToAgent::Shutdown {
                    reason: "the coordinator is stopping".into(),
                },
            );
            self.deleted_nodes.insert(id);
        }
        self.nodes.clear();
        removals
    }
}
