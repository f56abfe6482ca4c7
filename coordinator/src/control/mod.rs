//! The control core: the one owner of cluster, node and job state, as a
//! synchronous state machine. `Control::apply` takes a command at a time,
//! `tick` the timeouts no event announces, `decide` places and scales; `effects`
//! hands the driver what must happen in the world (the commit batch, then the
//! replies, agent messages, change notices and provider calls). The clock and
//! the random source come from outside; no store, network or file is touched
//! here. `Driver` (driver.rs) runs it in the coordinator; `crate::sim` runs it
//! under a simulated world.
//!
//! Files by concern: `messages` (commands in, messages out), `handle` (the
//! API's way in), `clusters`, `jobs`, `agents` (what agents report), `nodes`
//! (node lifecycle and `tick`), `decide` (placement and scaling) with `queue`,
//! `governance` (quotas, locks, preemption, chaos), `launch` (attempts and their
//! environment), `explain` (`job why`), `metrics`, `effects`, `ownership`,
//! `history`, `identities`, `parallel`, `assets`, `invariants`, `successors`
//! (a node told its next short task before the current one ends).

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{broadcast, mpsc, oneshot};
use tracing::{debug, error, info, warn};

use crate::autoscaler;
use crate::model::*;
use crate::provider::{NodeLaunch, NodeProvider, NodeRemoval};
use crate::scheduler;
use crate::store::{Batch, Committed, NewLog, Store, StoredLog};
use crate::vmsize::Catalog;
use crate::{Error, Result};

#[derive(Clone, Debug)]
pub struct ControlConfig {
    pub catalog: Catalog,
    /// A node whose agent has not been heard from for this long has its work
    /// rerun elsewhere; its agent, on its side, has stopped that work by then
    /// (it fences itself after the same bound, less the stop grace).
    pub lease: Duration,
    /// A new node must register within this.
    pub register_timeout: Duration,
    pub heartbeat_interval: Duration,
    /// Attempts a job may use up through lost nodes before it fails.
    pub max_attempts: u32,
    /// Quotas until `shoal quota set` stores others.
    pub quotas: crate::governance::Quotas,
    /// Notice a preempted node's jobs get between SIGTERM and SIGKILL.
    pub preemption_notice: Duration,
    /// Chaos: preempt a random low-priority node this often.
    pub chaos_preempt_every: Option<Duration>,
    /// A job whose GPUs stay below this utilization ...
    pub idle_gpu_threshold_percent: f64,
    /// ... this long is flagged.
    pub idle_gpu_after: Duration,
    /// Jobs get managed-identity settings (IDENTITY_HEADER...): the coordinator
    /// signs their tokens.
    pub identity_tokens: bool,
    /// Ended jobs are deleted, with their logs, rows and files, this long after
    /// they ended (None: kept for good).
    pub job_retention: Option<Duration>,
    /// Where jobs' files (code snapshots, outputs) are, to delete them with the job.
    pub artifacts: Option<crate::artifacts::Artifacts>,
    /// MLflow tracking (None: not served): jobs are given their run
    /// (MLFLOW_RUN_ID...), and deleted jobs' runs go with them.
    pub tracking: Option<crate::tracking::Tracking>,
    /// Where the built-in datastores live (None: there are none).
    pub datastores_root: Option<std::path::PathBuf>,
    /// Ended jobs kept in memory beside the live ones (older ones are read from
    /// the store).
    pub recent_jobs: usize,
}

impl Default for ControlConfig {
    fn default() -> Self {
        ControlConfig {
            catalog: Catalog::default(),
            lease: Duration::from_secs(30),
            register_timeout: Duration::from_secs(60),
            heartbeat_interval: Duration::from_secs(5),
            max_attempts: 5,
            quotas: crate::governance::Quotas::default(),
            preemption_notice: Duration::from_secs(30),
            chaos_preempt_every: None,
            idle_gpu_threshold_percent: 5.0,
            idle_gpu_after: Duration::from_secs(600),
            identity_tokens: false,
            job_retention: Some(Duration::from_secs(30 * 24 * 3600)),
            artifacts: None,
            tracking: None,
            datastores_root: None,
            recent_jobs: crate::store::RECENT_JOBS,
        }
    }
}

/// A reply held until the batch is committed: called with the commit's failure.
pub type Deferred = Box<dyn FnOnce(Option<&str>) + Send>;

/// Why a cluster's queued jobs wait.
#[derive(Clone, Debug, PartialEq, Eq)]
struct QueueReason {
    reason: String,
    /// The most GPUs a live node of the cluster has (None: no live node).
    most_gpus: Option<u32>,
    /// What a node said of its GPUs (no driver...), for jobs that want some.
    gpu_why: String,
    /// The biggest live node's cores (thousandths) and memory, for shares
    /// that want more (a joined machine may be smaller than the VM size).
    most_room: Option<(u32, u64)>,
}

/// Nodes of a cluster that failed to start in a row: no new one before `until`.
#[derive(Clone, Debug)]
struct Backoff {
    failures: u32,
    until: Millis,
    /// The last failure, for the waiting jobs' reason.
    last: String,
}

/// The control core: a synchronous state machine. Commands go in with the time
/// (`apply`, `tick`, `decide`); what must happen in the world comes out as
/// `Effects`, which the driver carries out. No store, clock or network here.
pub struct Control {
    config: ControlConfig,
    /// Tokens, leases and chaos draw from this (seeded in the simulator).
    rng: rand::rngs::StdRng,

    clusters: BTreeMap<String, Cluster>,
    /// User-assigned identities, by name.
    identities: BTreeMap<String, Identity>,
    datastores: BTreeMap<String, crate::data::Datastore>,
    /// By (name, version).
    data_assets: BTreeMap<(String, String), crate::data::DataAsset>,
    environments: BTreeMap<(String, String), Environment>,
    components: BTreeMap<(String, String), crate::model::Component>,
    defaults: BTreeMap<String, String>,
    defaults_dirty: bool,
    new_datastores: Vec<crate::data::Datastore>,
    new_data_assets: Vec<crate::data::DataAsset>,
    new_environments: Vec<Environment>,
    new_components: Vec<crate::model::Component>,
    nodes: BTreeMap<String, Node>,
    jobs: job_table::JobTable,
    /// Queued jobs, by cluster, oldest first.
    queue: queue::Queue,
    /// Why each cluster's queued jobs wait (one reason for them all), given to
    /// them as they are read.
    queue_reasons: HashMap<String, QueueReason>,
    /// Every cluster is looked at by the next placement pass (after loading);
    /// afterwards only those whose jobs or nodes changed.
    place_all: bool,
    /// Clusters whose readers should look again, with nothing to write.
    notify_clusters: BTreeSet<String>,
    /// Each connected agent's session and the way to it.
    links: HashMap<String, (u64, Link)>,
    targets: HashMap<String, u32>,
    /// Per cluster: node failures in a row, and no new node before this time.
    create_backoff: HashMap<String, Backoff>,
    next_job_seq: u64,
    next_node_seq: u64,
    wake_at: Option<Millis>,
    quotas: crate::governance::Quotas,
    quotas_dirty: bool,
    /// Per cluster: what blocks scale-up now (lock, quota), for reasons and `why`.
    blocked: HashMap<String, crate::governance::Block>,
    /// Preempted nodes: when their notice ends.
    preempt_deadlines: HashMap<String, Millis>,
    /// Nodes taken by a preemption, until they are gone: whatever of theirs ends
    /// unfinished was preempted, not lost.
    preempted_nodes: HashSet<String>,
    next_chaos: Millis,
    /// Instances holding GPUs: since when their utilization has been low.
    gpu_low_since: HashMap<Slot, Millis>,
    /// Control-loop timings, for /metrics.
    batches_total: u64,
    /// The driver's timings of each pass, shown in /metrics.
    timings: Timings,

    // What this batch changed, written and announced by `flush`.
    dirty_clusters: BTreeSet<String>,
    deleted_clusters: BTreeSet<String>,
    dirty_nodes: BTreeSet<String>,
    deleted_nodes: BTreeSet<String>,
    dirty_jobs: BTreeSet<String>,
    seqs_dirty: bool,
    new_logs: Vec<NewLog>,
    replies: Vec<Deferred>,
    outbox: Vec<(Link, ToAgent)>,
    to_create: Vec<NodeLaunch>,
    to_remove: Vec<NodeRemoval>,

    /// Parallel jobs' mini-batches.
    parallel: HashMap<String, crate::parallel::Batches>,
    dirty_batches: BTreeSet<(String, u32)>,
    new_cuts: Vec<(String, Vec<crate::parallel::Cut>)>,
    new_rows: Vec<(String, u32, Vec<u8>)>,
    new_identities: Vec<Identity>,
    /// Ended jobs still in memory, oldest first (see `history`).
    recent: VecDeque<String>,
    recent_set: HashSet<String>,
    /// Ended jobs by status, held or not.
    ended_counts: BTreeMap<JobStatus, u64>,
    /// Jobs to delete in this batch, and retention's cut-off.
    delete_jobs: Vec<String>,
    purge_before: Option<Millis>,
    next_purge: Millis,
    /// Jobs whose readers should look again, with nothing of the job itself to write.
    notify_jobs: BTreeSet<String>,
    /// Jobs changed in a way no one waits on (an instance started), written with
    /// the next batch that writes anything, or `LAZY_WRITE_MS` after the first.
    lazy_jobs: BTreeSet<String>,
    /// Nodes changed in a way no one waits on (an array task's slot freed),
    /// written with the lazy jobs, so a commit never shows a node without a
    /// task its job's row still runs there.
    lazy_nodes: BTreeSet<String>,
    /// Clusters where a placement may change with nothing of theirs to write
    /// yet (a lazy node's slot freed).
    place_again: BTreeSet<String>,
    lazy_since: Option<Millis>,
    /// Families (an array's tasks, single jobs alike) whose last job to
    /// complete ran under `successors::QUICK_TASK_MS`, with that job's time and
    /// when it ended: their nodes are told the next ones ahead.
    quick: HashMap<successors::Family, (Millis, Millis)>,
    /// Sweeps that may still be running (by seq; ended ones leave lazily), so
    /// the conductor's question does not walk every job.
    sweeps: BTreeSet<u64>,
    /// Completed pipeline steps by fingerprint (the newest), for reuse: those of
    /// the pipelines held in memory.
    completed_steps: HashMap<String, u64>,
    /// Pipelines that may still be running (by seq; ended ones leave lazily), so
    /// the cutter's question does not walk every job.
    pipelines: BTreeSet<u64>,
    /// Successors booked since the coordinator started (for /metrics).
    successors_booked: u64,
}

/// How long a change no one waits on may wait for a batch to go with.
const LAZY_WRITE_MS: Millis = 100;

impl Control {
    /// The state machine over a loaded snapshot, at `now`.
    pub fn new(
        config: ControlConfig,
        snapshot: crate::store::Snapshot,
        now: Millis,
        rng: rand::rngs::StdRng,
    ) -> Control {
        let quotas = snapshot
            .quotas
            .clone()
            .unwrap_or_else(|| config.quotas.clone());
        let next_chaos = now
            + config
                .chaos_preempt_every
                .map_or(0, |d| d.as_millis() as i64);
        let mut control = Control {
            config,
            rng,
            clusters: snapshot
                .clusters
                .into_iter()
                .map(|c| (c.spec.name.clone(), c))
                .collect(),
            identities: snapshot
                .identities
                .into_iter()
                .map(|i| (i.name.clone(), i))
                .collect(),
            datastores: snapshot
                .datastores
                .into_iter()
                .map(|d| (d.name.clone(), d))
                .collect(),
            data_assets: snapshot
                .data_assets
                .into_iter()
                .map(|a| ((a.name.clone(), a.version.clone()), a))
                .collect(),
            environments: snapshot
                .environments
                .into_iter()
                .map(|e| ((e.name.clone(), e.version.clone()), e))
                .collect(),
            components: snapshot
                .components
                .into_iter()
                .map(|c| ((c.name.clone(), c.version.clone()), c))
                .collect(),
            defaults: snapshot.defaults,
            defaults_dirty: false,
            new_datastores: Vec::new(),
            new_data_assets: Vec::new(),
            new_environments: Vec::new(),
            new_components: Vec::new(),
            nodes: BTreeMap::new(),
            jobs: job_table::JobTable::default(),
            queue: queue::Queue::default(),
            queue_reasons: HashMap::new(),
            place_all: true,
            notify_clusters: BTreeSet::new(),
            links: HashMap::new(),
            targets: HashMap::new(),
            create_backoff: HashMap::new(),
            next_job_seq: snapshot.next_job_seq,
            next_node_seq: snapshot.next_node_seq,
            wake_at: None,
            quotas,
            quotas_dirty: false,
            blocked: HashMap::new(),
            preempt_deadlines: HashMap::new(),
            preempted_nodes: HashSet::new(),
            next_chaos,
            gpu_low_since: HashMap::new(),
            batches_total: 0,
            timings: Timings::default(),
            dirty_clusters: BTreeSet::new(),
            deleted_clusters: BTreeSet::new(),
            dirty_nodes: BTreeSet::new(),
            deleted_nodes: BTreeSet::new(),
            dirty_jobs: BTreeSet::new(),
            seqs_dirty: false,
            new_logs: Vec::new(),
            replies: Vec::new(),
            outbox: Vec::new(),
            to_create: Vec::new(),
            to_remove: Vec::new(),
            parallel: HashMap::new(),
            dirty_batches: BTreeSet::new(),
            new_cuts: Vec::new(),
            new_rows: Vec::new(),
            new_identities: Vec::new(),
            recent: VecDeque::new(),
            recent_set: HashSet::new(),
            ended_counts: snapshot.ended_counts,
            delete_jobs: Vec::new(),
            purge_before: None,
            next_purge: now,
            notify_jobs: BTreeSet::new(),
            lazy_jobs: BTreeSet::new(),
            lazy_nodes: BTreeSet::new(),
            place_again: BTreeSet::new(),
            lazy_since: None,
            quick: HashMap::new(),
            sweeps: BTreeSet::new(),
            completed_steps: HashMap::new(),
            pipelines: BTreeSet::new(),
            successors_booked: 0,
        };
        for mut node in snapshot.nodes {
            // Agents of an earlier run reconnect on their own; until then they are
            // disconnected, and their work is rerun a lease after now.
            node.connected = false;
            node.last_heartbeat = now;
            if node.state == NodeState::Leaving {
                control.to_remove.push(removal(&node));
            }
            control.nodes.insert(node.id.clone(), node);
        }
        let mut queued = Vec::new();
        for mut job in snapshot.jobs {
            let status = job.status;
            if let Some(task) = job.task.as_mut() {
                // Its array's counts were committed with its status.
                task.counted = Some(status);
            }
            if job.status == JobStatus::Queued && !job.is_record() {
                queued.push(job.seq);
            }
            if job.sweep.is_some() && !job.status.is_final() {
                control.sweeps.insert(job.seq);
            }
            if let Some(pipeline) = job.pipeline.as_deref() {
                control.remember_completed_steps(pipeline);
                if !job.status.is_final() {
                    control.pipelines.insert(job.seq);
                }
            }
            if let Err(e) = control.jobs.insert(job) {
                error!("stored job left out: {e}");
            }
        }
        for seq in queued {
            if let Some(job) = control.jobs.by_seq(seq)
                && !control.is_held(job)
            {
                control.queue.push(job);
            }
        }
        control.load_parallel(snapshot.mini_batches);
        control.remember_loaded();
        if let Some(root) = control.config.datastores_root.clone() {
            control.built_in_datastores(&root, now);
        }
        info!(
            clusters = control.clusters.len(),
            nodes = control.nodes.len(),
            jobs = control.jobs.len(),
            queued = control.queue.len(),
            "state loaded"
        );
        control
    }

    /// Ids of every node known (the provider's leftovers beside them go).
    pub fn node_ids(&self) -> Vec<String> {
        self.nodes.keys().cloned().collect()
    }

    /// Nodes of an earlier run that stay (neither leaving nor unusable): their
    /// providers watch them again.
    pub fn kept_nodes(&self) -> Vec<NodeRemoval> {
        self.nodes
            .values()
            .filter(|n| !matches!(n.state, NodeState::Leaving | NodeState::Unusable))
            .map(removal)
            .collect()
    }

    /// The earliest time something is due with nothing else happening.
    pub fn wake_at(&self) -> Option<Millis> {
        self.wake_at
    }

    /// The histograms the driver fills, shared with /metrics.
    pub fn timings(&self) -> Timings {
        self.timings.clone()
    }

    /// Queues a message to a node's agent, by the link it has now.
    fn tell(&mut self, node_id: &str, message: ToAgent) {
        tell(&self.links, &mut self.outbox, node_id, message);
    }

    // ------------------------------------------------------------- commands

    fn defer<T: Send + 'static>(&mut self, reply: Reply<T>, result: Result<T>) {
        self.replies.push(Box::new(move |failed: Option<&str>| {
            let answer = match failed {
                Some(why) => Err(Error::Internal(format!("not stored: {why}"))),
                None => result,
            };
            let _ = reply.send(answer);
        }));
    }

    /// One command, at `now`.
    pub fn apply(&mut self, command: Command, now: Millis) {
        match command {
            Command::CreateCluster(request, reply) => {
                let result = self.create_cluster(request, now);
                self.defer(reply, result);
            }
            Command::UpdateCluster(update, reply) => {
                let result = self.update_cluster(update);
                self.defer(reply, result);
            }
            Command::DeleteCluster(name, reply) => {
                let result = self.delete_cluster(&name);
                self.defer(reply, result);
            }
            Command::GetCluster(name, reply) => {
                let result = self.cluster_info(&name);
                self.defer(reply, result);
            }
            Command::ListClusters(reply) => {
                let names: Vec<String> = self.clusters.keys().cloned().collect();
                let result = names.iter().map(|n| self.cluster_info(n)).collect();
                self.defer(reply, result);
            }
            Command::SubmitJob(request, reply) => {
                let result = self.submit_job(*request, now);
                self.defer(reply, result);
            }
            Command::GetJob(id, reply) => {
                let result = self.job(&id).map(|j| self.job_out(j, now));
                self.defer(reply, result);
            }
            Command::Work(request, reply) => {
                let result = self.work(request, now);
                self.defer(reply, result);
            }
            Command::LiveJobs(ids, reply) => {
                let jobs = ids
                    .iter()
                    .filter_map(|id| self.jobs.get(id))
                    .map(|j| self.job_out(j, now))
                    .collect();
                self.defer(reply, Ok(jobs));
            }
            Command::JobCounts(reply) => {
                let _ = reply.send(Ok(self.job_counts()));
            }
            Command::DeleteJob(id, reply) => {
                let result = self.delete_job(&id);
                self.defer(reply, result);
            }
            Command::StepsToCut(reply) => {
                let _ = reply.send(Ok(self.steps_to_cut()));
            }
            Command::StepCut {
                id,
                index,
                cuts,
                reply,
            } => {
                let result = self.step_cut(&id, index, cuts, now);
                self.defer(reply, result);
            }
            Command::RunningSweeps(reply) => {
                let _ = reply.send(Ok(self.running_sweeps()));
            }
            Command::StepSweep { id, plan, reply } => {
                let result = self.step_sweep(&id, plan, now);
                self.defer(reply, result);
            }
            Command::CancelJob(id, reply) => {
                let result = self.cancel_job(&id, now);
                self.defer(reply, result);
            }
            Command::ListNodes(cluster, reply) => {
                let nodes = self
                    .nodes
                    .values()
                    .filter(|n| cluster.as_ref().is_none_or(|c| &n.cluster == c))
                    .cloned()
                    .collect();
                self.defer(reply, Ok(nodes));
            }
            Command::AgentRegister {
                registration,
                session,
                link,
                reply,
            } => {
                let result = self.register(registration, session, link, now);
                self.defer(reply, result);
            }
            Command::AgentGone { node_id, session } => self.agent_gone(&node_id, session),
            Command::AgentLeaving { node_id, reason } => self.agent_leaving(&node_id, &reason),
            Command::Heartbeat {
                node_id,
                cpu_percent,
                memory_used_bytes,
                stats,
                usage,
            } => {
                if let Some(node) = self.nodes.get_mut(&node_id) {
                    node.cpu_percent = cpu_percent;
                    node.memory_used_bytes = memory_used_bytes;
                    node.last_heartbeat = now;
                    node.stats = stats;
                }
                for (slot, used) in usage {
                    if self.reported(&node_id, &slot).is_ok() {
                        self.observe_usage(&node_id, &slot, used, now);
                    }
                }
            }
            Command::InstanceStarted {
                node_id,
                slot,
                gpus,
            } => {
                if self.reported(&node_id, &slot).is_err() {
                    return;
                }
                if let Some((job, index)) = self.instance_mut(&slot) {
                    job.attempts[index].instances[slot.instance as usize].gpus = gpus;
                }
                self.instance_started(&node_id, &slot, now)
            }
            Command::InstanceExited {
                node_id,
                slot,
                exit,
            } => {
                if self.reported(&node_id, &slot).is_ok() {
                    self.instance_exited(&node_id, &slot, exit, now);
                }
            }
            Command::Log {
                node_id,
                slot,
                stream,
                data,
            } => {
                if let Ok(granted) = self.reported(&node_id, &slot) {
                    self.new_logs.push(NewLog {
                        job_id: granted.job_id,
                        attempt_id: slot.attempt_id,
                        instance: slot.instance,
                        stream,
                        data,
                    });
                }
            }
            Command::Authorize { claim, call, reply } => {
                // Reads only: no need to wait for the batch's commit.
                let _ = reply.send(self.authorize(&claim, &call));
            }
            Command::NodeStarted {
                node_id,
                pid,
                handle,
            } => {
                if let Some(node) = self.nodes.get_mut(&node_id) {
                    node.pid = pid;
                    node.handle = handle;
                    self.dirty_nodes.insert(node_id);
                }
            }
            Command::NodeNote { node_id, note } => {
                if let Some(node) = self.nodes.get_mut(&node_id)
                    && node.state == NodeState::Preparing
                    && node.message != note
                {
                    node.message = note;
                    self.dirty_nodes.insert(node_id);
                }
            }
            Command::NodeFailed {
                node_id,
                error,
                preempted,
            } => {
                if self
                    .nodes
                    .get(&node_id)
                    .is_some_and(|n| n.state == NodeState::Leaving)
                {
                    self.forget_node(&node_id);
                } else if preempted {
                    self.node_taken_back(&node_id, &error, now);
                } else {
                    self.node_unusable(&node_id, &error, now);
                }
            }
            Command::NodeRemoved { node_id } => self.forget_node(&node_id),
            Command::LockCluster {
                cluster: name,
                kind,
                reply,
            } => {
                let result = self.lock_cluster(&name, kind);
                self.defer(reply, result);
            }
            Command::JoinNode {
                cluster,
                node_id,
                hostname,
                cores,
                memory_bytes: memory,
                reply,
            } => {
                let result = match node_id {
                    Some(id) => self.provided_node_joins(&cluster, &id, &hostname),
                    None => self.join_node(&cluster, &hostname, cores, memory, now),
                };
                self.defer(reply, result);
            }
            Command::RevokeNode(node_id, reply) => {
                let result = match self.nodes.get(&node_id).cloned() {
                    None => Err(Error::NotFound(format!("node `{node_id}` not found"))),
                    Some(node) => {
                        // Told before marking it unusable drops its link.
                        self.tell(
                            &node_id,
                            ToAgent::Shutdown {
                                reason: "this node was revoked".into(),
                            },
                        );
                        self.node_unusable(&node_id, "revoked", now);
                        Ok(self.nodes.get(&node_id).cloned().unwrap_or(node))
                    }
                };
                self.defer(reply, result);
            }
            Command::PreemptNode {
                node_id,
                notice_seconds: notice,
                reply,
            } => {
                let notice = notice.map_or(self.config.preemption_notice, Duration::from_secs);
                let result = self.preempt_node(&node_id, notice, "preempted on request", now);
                self.defer(reply, result);
            }
            Command::GetQuotas(reply) => {
                let result = Ok(self.quota_report());
                self.defer(reply, result);
            }
            Command::SetQuotas(change, reply) => {
                let result = self.set_quotas(change);
                self.defer(reply, result);
            }
            Command::Explain(job_id, reply) => {
                let result = self.explain(&job_id, now);
                self.defer(reply, result);
            }
            Command::CreateIdentity { name, reply } => {
                let result = self.create_identity(&name, now);
                self.defer(reply, result);
            }
            Command::ListIdentities(reply) => {
                let _ = reply.send(Ok(self.list_identities()));
            }
            Command::AssignIdentity {
                cluster,
                identity,
                reply,
            } => {
                let result = self.assign_identity(&cluster, &identity);
                self.defer(reply, result);
            }
            Command::RemoveIdentity {
                cluster,
                identity,
                reply,
            } => {
                let result = self.remove_identity(&cluster, &identity);
                self.defer(reply, result);
            }
            Command::CreateDatastore(datastore, reply) => {
                let result = self.create_datastore(datastore, now);
                self.defer(reply, result);
            }
            Command::GetDatastore(name, reply) => {
                let result = self.datastore(&name);
                self.defer(reply, result);
            }
            Command::ListDatastores(reply) => {
                let all = self.datastores.values().cloned().collect();
                self.defer(reply, Ok(all));
            }
            Command::CreateDataAsset(asset, reply) => {
                let result = self.create_data_asset(asset, now);
                self.defer(reply, result);
            }
            Command::GetDataAsset {
                name,
                version,
                reply,
            } => {
                let result = self.data_asset(&name, version.as_deref());
                self.defer(reply, result);
            }
            Command::ListDataAssets(reply) => {
                let all = self.list_data_assets();
                self.defer(reply, Ok(all));
            }
            Command::CreateEnvironment(environment, reply) => {
                let result = self.create_environment(environment, now);
                self.defer(reply, result);
            }
            Command::GetEnvironment {
                name,
                version,
                reply,
            } => {
                let result = self.environment(&name, version.as_deref());
                self.defer(reply, result);
            }
            Command::ListEnvironments(reply) => {
                let all = self.list_environments();
                self.defer(reply, Ok(all));
            }
            Command::CreateComponent(component, reply) => {
                let result = self.create_component(*component, now);
                self.defer(reply, result);
            }
            Command::GetComponent {
                name,
                version,
                reply,
            } => {
                let result = self.component(&name, version.as_deref());
                let _ = reply.send(result);
            }
            Command::ListComponents(reply) => {
                let _ = reply.send(Ok(self.components.values().cloned().collect()));
            }
            Command::ArchiveEnvironment {
                name,
                version,
                reply,
            } => {
                let result = self.archive_environment(&name, version.as_deref());
                self.defer(reply, result);
            }
            Command::SetDefaults(changes, reply) => {
                let result = self.set_defaults(changes);
                self.defer(reply, result);
            }
            Command::GetDefaults(reply) => {
                let defaults = self.defaults.clone();
                self.defer(reply, Ok(defaults));
            }
            Command::Metrics(reply) => {
                // Read-only: no need to wait for the batch's commit.
                let _ = reply.send(Ok(self.metrics()));
            }
        }
    }

    /// The one check of an agent's call about an instance (see `ownership`).
    fn authorize(&self, claim: &Claim, call: &AgentCall) -> Result<Granted> {
        let job = job_of_attempt(&claim.slot.attempt_id).and_then(|id| self.jobs.get(id));
        ownership::check(job, claim, call).map_err(|refusal| {
            warn!(node = %claim.node_id, attempt = %claim.slot.attempt_id, instance = claim.slot.instance, call = ?call, %refusal, "agent call refused");
            Error::from(refusal)
        })
    }

    /// A report on a node's own session (an event, a log chunk, usage).
    fn reported(&self, node_id: &str, slot: &Slot) -> Result<Granted> {
        let claim = Claim {
            node_id: node_id.to_string(),
            slot: slot.clone(),
            token: None,
        };
        self.authorize(&claim, &AgentCall::Report)
    }

    fn cluster(&self, name: &str) -> Result<&Cluster> {
        self.clusters.get(name).ok_or_else(|| {
            Error::NotFound(format!(
                "cluster `{name}` not found; `shoal cluster list` shows the clusters"
            ))
        })
    }

    fn job(&self, id: &str) -> Result<&Job> {
        self.jobs.get(id).ok_or_else(|| {
            Error::NotFound(format!(
                "job `{id}` not found; `shoal job list` shows the jobs"
            ))
        })
    }
}

/// `Control::tell`, for where a job is borrowed.
fn tell(
    links: &HashMap<String, (u64, Link)>,
    outbox: &mut Vec<(Link, ToAgent)>,
    node_id: &str,
    message: ToAgent,
) {
    if let Some((_, link)) = links.get(node_id) {
        outbox.push((link.clone(), message));
    }
}

/// A random hex string of `bytes` bytes (tokens, leases, client ids).
fn random_hex(rng: &mut rand::rngs::StdRng, bytes: usize) -> String {
    use rand::RngCore;
    let mut buffer = vec![0u8; bytes];
    rng.fill_bytes(&mut buffer);
    hex::encode(buffer)
}

fn removal(node: &Node) -> NodeRemoval {
    NodeRemoval {
        provider: node.provider,
        node_id: node.id.clone(),
        cluster: node.cluster.clone(),
        pid: node.pid,
        handle: node.handle.clone(),
        settings: node.settings.clone(),
    }
}

/// `job-12.3` -> `job-12`.
pub fn job_of_attempt(attempt_id: &str) -> Option<&str> {
    attempt_id.rsplit_once('.').map(|(job, _)| job)
}

mod agents;
mod assets;
mod clusters;
mod decide;
mod driver;
mod effects;
mod explain;
mod governance;
mod handle;
mod history;
mod identities;
mod invariants;
mod job_table;
mod jobs;
mod launch;
mod messages;
mod metrics;
mod nodes;
pub mod ownership;
mod parallel;
mod pipelines;
mod queue;
mod successors;
mod sweeps;
pub use decide::waiting_reason;
pub use driver::Driver;
pub use effects::{Effects, Link, Timings};
pub use handle::ControlHandle;
pub use job_table::{job_id, job_seq};
pub use launch::{
    LaunchEnv, MPI_RELEASE, PYTORCH_MASTER_PORT, TENSORFLOW_BASE_PORT, TrackingEnv,
    distribution_env,
};
pub use messages::*;
pub use ownership::{AgentCall, Claim, Granted};

pub use parallel::{Leased, MiniBatchResult, PARALLEL_RELEASE, WorkReply, WorkRequest};
pub use pipelines::CutOrder;

#[cfg(test)]
mod machine_tests;
#[cfg(test)]
mod tests;
