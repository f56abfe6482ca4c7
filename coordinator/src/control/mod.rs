//! The control loop: the one owner of cluster, node and job state. API handlers and
//! agent sessions send it commands; it drains its inbox, applies the batch, asks the
//! scheduler and autoscaler (pure functions) what to do, commits everything in one
//! transaction, and only then replies, launches, and calls providers.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{broadcast, mpsc, oneshot};
use tracing::{debug, error, info, warn};

use crate::autoscaler;
use crate::model::*;
use crate::provider::{NodeLaunch, NodeProvider, NodeRemoval};
use crate::scheduler;
use crate::store::{Batch, NewLog, Store, StoredLog};
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
            datastores_root: None,
            recent_jobs: crate::store::RECENT_JOBS,
        }
    }
}

/// What the coordinator tells an agent (converted to the wire in `api`).
#[derive(Clone, Debug)]
pub enum ToAgent {
    Registered {
        heartbeat_interval: Duration,
        lease: Duration,
    },
    /// The answer to a heartbeat: the coordinator is there.
    Pong,
    Launch(LaunchOrder),
    Cancel {
        slot: Slot,
        reason: String,
    },
    Shutdown {
        reason: String,
    },
    /// Stop everything: SIGTERM now, SIGKILL after `notice`.
    Preempt {
        notice: Duration,
        reason: String,
    },
    /// A frame of a remote exec (an MPI daemon's launch), relayed as is.
    Exec(shoal_proto::v1::ExecFrame),
}

#[derive(Clone, Debug)]
pub struct LaunchOrder {
    pub slot: Slot,
    pub job_id: String,
    pub argv: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub timeout_seconds: Option<u64>,
    pub has_code: bool,
    pub image: Option<String>,
    /// A rerun: the instance starts from the outputs of the last attempt.
    pub restore_outputs: bool,
    /// GPUs the agent assigns to it.
    pub gpus: u32,
    /// Processes the instance runs (each with LOCAL_RANK and RANK); 1 for most jobs.
    pub processes: u32,
    /// An MPI job: instance 0 runs mpirun, the others hold a sandbox for its daemons.
    pub mpi: bool,
    /// A parallel job: this many workers pull mini-batches on the instance.
    pub parallel_workers: u32,
    /// ...each a long-lived process fed mini-batches on its stdin.
    pub parallel_worker_mode: bool,
    /// The instance's secret, shown by its agent on every call about it.
    pub token: String,
    /// Data inputs to make before the command runs, and named outputs to upload.
    pub inputs: Vec<LaunchInput>,
    pub outputs: Vec<(String, bool)>,
    /// A host environment's prefix, first on PATH.
    pub path_prefix: Option<String>,
    pub shm_size_bytes: Option<u64>,
}

/// An input as a node makes it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LaunchInput {
    pub name: String,
    pub folder: bool,
    pub file_name: String,
    pub source: LaunchSource,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LaunchSource {
    /// From the coordinator (`Agent.FetchInput`).
    Fetch,
    Url(String),
    /// Direct mode: the URI itself.
    Direct(String),
}

/// What a node needs to make a job's inputs.
fn launch_inputs(spec: &JobSpec) -> Vec<LaunchInput> {
    use crate::data::{DataSource, InputMode};
    spec.extras
        .inputs
        .iter()
        .map(|(name, input)| LaunchInput {
            name: name.clone(),
            folder: !input.kind.is_file(),
            file_name: input.file_name.clone(),
            source: match (&input.mode, &input.source) {
                (InputMode::Direct, _) => LaunchSource::Direct(input.uri.clone()),
                (_, DataSource::Url { url }) => LaunchSource::Url(url.clone()),
                _ => LaunchSource::Fetch,
            },
        })
        .collect()
}

#[derive(Clone, Debug)]
pub struct ExitReport {
    pub exit_code: Option<i32>,
    pub outcome: String,
    pub message: String,
    pub usage: Option<Usage>,
}

#[derive(Clone, Debug)]
pub struct AttemptReport {
    pub slot: Slot,
    /// None: still running.
    pub exited: Option<ExitReport>,
}

#[derive(Clone, Debug)]
pub struct Registration {
    pub node_id: String,
    pub cluster: String,
    pub cores: u32,
    pub memory_bytes: u64,
    pub hostname: String,
    pub pid: u32,
    pub runtimes: Vec<String>,
    pub attempts: Vec<AttemptReport>,
    pub gpus: Vec<GpuStat>,
    pub gpu_reason: String,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeCounts {
    pub idle: u32,
    pub running: u32,
    pub preparing: u32,
    pub leaving: u32,
    pub preempted: u32,
    pub unusable: u32,
}

/// A cluster with what the autoscaler and nodes say about it now.
#[derive(Clone, Debug)]
pub struct ClusterInfo {
    pub cluster: Cluster,
    pub counts: NodeCounts,
    pub current_node_count: u32,
    pub target_node_count: u32,
    pub resizing: bool,
    /// The identities its jobs may use, with their names.
    pub identities: Vec<crate::identity::Assigned>,
}

/// Quota limits with what is used now, scope by scope.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QuotaReport {
    /// (scope, limit, used): `family NAME`, `low-priority`, `total`.
    pub lines: Vec<(String, u32, u32)>,
}

#[derive(Clone, Debug, Default)]
pub struct QuotaChange {
    pub family: Option<(String, u32)>,
    pub low_priority_cores: Option<u32>,
    pub total_cores: Option<u32>,
}

/// Something changed; watchers fetch what they care about.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    Job(String),
    Cluster(String),
}

type Reply<T> = oneshot::Sender<Result<T>>;

pub enum Command {
    CreateCluster(ClusterRequest, Reply<ClusterInfo>),
    UpdateCluster(ClusterUpdate, Reply<ClusterInfo>),
    DeleteCluster(String, Reply<ClusterInfo>),
    GetCluster(String, Reply<ClusterInfo>),
    ListClusters(Reply<Vec<ClusterInfo>>),
    SubmitJob(Box<JobRequest>, Reply<Job>),
    GetJob(String, Reply<Job>),
    /// The in-memory state of those of these jobs that are live or recent (with
    /// progress): what a page read from the store is brought up to date with.
    LiveJobs(Vec<String>, Reply<Vec<Job>>),
    /// Jobs by status, all of them (ended ones counted, not held).
    JobCounts(Reply<BTreeMap<JobStatus, u64>>),
    /// Deletes an ended job with its logs, rows and files.
    DeleteJob(String, Reply<()>),
    CancelJob(String, Reply<Job>),
    ListNodes(Option<String>, Reply<Vec<Node>>),
    LockCluster(String, Option<LockKind>, Reply<ClusterInfo>),
    PreemptNode(String, Option<u64>, Reply<Node>),
    /// An agent started by hand joins a cluster: (cluster, hostname, cores, memory).
    JoinNode(String, String, u32, u64, Reply<Node>),
    /// The node is ended: its agent told to stop, its work requeued.
    RevokeNode(String, Reply<Node>),
    GetQuotas(Reply<QuotaReport>),
    SetQuotas(QuotaChange, Reply<QuotaReport>),
    CreateIdentity {
        name: String,
        reply: Reply<Identity>,
    },
    ListIdentities(Reply<Vec<Identity>>),
    /// Gives the cluster an identity (`[system]`, a name, client id or resource id).
    AssignIdentity {
        cluster: String,
        identity: String,
        reply: Reply<ClusterInfo>,
    },
    RemoveIdentity {
        cluster: String,
        identity: String,
        reply: Reply<ClusterInfo>,
    },
    CreateDatastore(crate::data::Datastore, Reply<crate::data::Datastore>),
    GetDatastore(String, Reply<crate::data::Datastore>),
    ListDatastores(Reply<Vec<crate::data::Datastore>>),
    CreateDataAsset(crate::data::DataAsset, Reply<crate::data::DataAsset>),
    /// A data asset by name and version (None: the latest).
    GetDataAsset {
        name: String,
        version: Option<String>,
        reply: Reply<crate::data::DataAsset>,
    },
    ListDataAssets(Reply<Vec<crate::data::DataAsset>>),
    CreateEnvironment(Environment, Reply<Environment>),
    GetEnvironment {
        name: String,
        version: Option<String>,
        reply: Reply<Environment>,
    },
    ListEnvironments(Reply<Vec<Environment>>),
    ArchiveEnvironment {
        name: String,
        version: Option<String>,
        reply: Reply<Environment>,
    },
    /// Sets (Some) or clears (None) defaults; all of them after.
    SetDefaults(
        BTreeMap<String, Option<String>>,
        Reply<BTreeMap<String, String>>,
    ),
    GetDefaults(Reply<BTreeMap<String, String>>),
    Explain(String, Reply<Vec<String>>),
    Metrics(Reply<String>),
    /// A parallel job's worker: its last result, and maybe the next mini-batch.
    Work(WorkRequest, Reply<WorkReply>),

    AgentRegister {
        registration: Registration,
        session: u64,
        link: mpsc::UnboundedSender<ToAgent>,
        reply: Reply<()>,
    },
    AgentGone {
        node_id: String,
        session: u64,
    },
    Heartbeat {
        node_id: String,
        cpu_percent: f32,
        memory_used_bytes: u64,
        stats: NodeStats,
        usage: Vec<(Slot, Usage)>,
    },
    InstanceStarted {
        node_id: String,
        slot: Slot,
        gpus: Vec<u32>,
    },
    InstanceExited {
        node_id: String,
        slot: Slot,
        exit: ExitReport,
    },
    Log {
        node_id: String,
        slot: Slot,
        stream: String,
        data: Vec<u8>,
    },
    /// May this node make this call about this instance? (`ownership::check`)
    Authorize {
        claim: Claim,
        call: AgentCall,
        reply: Reply<Granted>,
    },
    NodeStarted {
        node_id: String,
        pid: Option<u32>,
    },
    NodeFailed {
        node_id: String,
        error: String,
    },
    NodeRemoved {
        node_id: String,
    },
}

/// Cheap to clone; every API handler holds one.
#[derive(Clone)]
pub struct ControlHandle {
    tx: mpsc::Sender<Command>,
    changes: broadcast::Sender<Change>,
    logs: broadcast::Sender<Arc<StoredLog>>,
}

fn stopped() -> Error {
    Error::Internal("the coordinator is shutting down".into())
}

impl ControlHandle {
    async fn ask<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Result<T> {
        let (reply, answer) = oneshot::channel();
        self.tx.send(make(reply)).await.map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }

    /// Fire-and-forget (agent events); false once the loop is gone.
    pub async fn send(&self, command: Command) -> bool {
        self.tx.send(command).await.is_ok()
    }

    pub fn subscribe_changes(&self) -> broadcast::Receiver<Change> {
        self.changes.subscribe()
    }

    pub fn subscribe_logs(&self) -> broadcast::Receiver<Arc<StoredLog>> {
        self.logs.subscribe()
    }

    pub async fn create_cluster(&self, request: ClusterRequest) -> Result<ClusterInfo> {
        self.ask(|r| Command::CreateCluster(request, r)).await
    }
    pub async fn update_cluster(&self, update: ClusterUpdate) -> Result<ClusterInfo> {
        self.ask(|r| Command::UpdateCluster(update, r)).await
    }
    pub async fn delete_cluster(&self, name: String) -> Result<ClusterInfo> {
        self.ask(|r| Command::DeleteCluster(name, r)).await
    }
    pub async fn get_cluster(&self, name: String) -> Result<ClusterInfo> {
        self.ask(|r| Command::GetCluster(name, r)).await
    }
    pub async fn list_clusters(&self) -> Result<Vec<ClusterInfo>> {
        self.ask(Command::ListClusters).await
    }
    pub async fn submit_job(&self, request: JobRequest) -> Result<Job> {
        self.ask(|r| Command::SubmitJob(Box::new(request), r)).await
    }
    pub async fn work(&self, request: WorkRequest) -> Result<WorkReply> {
        self.ask(|r| Command::Work(request, r)).await
    }

    pub async fn get_job(&self, id: String) -> Result<Job> {
        self.ask(|r| Command::GetJob(id, r)).await
    }
    pub async fn live_jobs(&self, ids: Vec<String>) -> Result<Vec<Job>> {
        self.ask(|r| Command::LiveJobs(ids, r)).await
    }
    pub async fn job_counts(&self) -> Result<BTreeMap<JobStatus, u64>> {
        self.ask(Command::JobCounts).await
    }
    pub async fn delete_job(&self, id: String) -> Result<()> {
        self.ask(|r| Command::DeleteJob(id, r)).await
    }
    pub async fn cancel_job(&self, id: String) -> Result<Job> {
        self.ask(|r| Command::CancelJob(id, r)).await
    }
    /// `None` unlocks.
    pub async fn lock_cluster(&self, name: String, kind: Option<LockKind>) -> Result<ClusterInfo> {
        self.ask(|r| Command::LockCluster(name, kind, r)).await
    }
    pub async fn join_node(
        &self,
        cluster: String,
        hostname: String,
        cores: u32,
        memory_bytes: u64,
    ) -> Result<Node> {
        self.ask(|r| Command::JoinNode(cluster, hostname, cores, memory_bytes, r))
            .await
    }
    pub async fn revoke_node(&self, node_id: String) -> Result<Node> {
        self.ask(|r| Command::RevokeNode(node_id, r)).await
    }
    pub async fn preempt_node(&self, node_id: String, notice_seconds: Option<u64>) -> Result<Node> {
        self.ask(|r| Command::PreemptNode(node_id, notice_seconds, r))
            .await
    }
    pub async fn create_identity(&self, name: String) -> Result<Identity> {
        self.ask(|reply| Command::CreateIdentity { name, reply })
            .await
    }
    pub async fn list_identities(&self) -> Result<Vec<Identity>> {
        self.ask(Command::ListIdentities).await
    }
    pub async fn assign_identity(&self, cluster: String, identity: String) -> Result<ClusterInfo> {
        self.ask(|reply| Command::AssignIdentity {
            cluster,
            identity,
            reply,
        })
        .await
    }
    pub async fn remove_identity(&self, cluster: String, identity: String) -> Result<ClusterInfo> {
        self.ask(|reply| Command::RemoveIdentity {
            cluster,
            identity,
            reply,
        })
        .await
    }
    pub async fn create_datastore(
        &self,
        datastore: crate::data::Datastore,
    ) -> Result<crate::data::Datastore> {
        self.ask(|r| Command::CreateDatastore(datastore, r)).await
    }
    pub async fn datastore(&self, name: String) -> Result<crate::data::Datastore> {
        self.ask(|r| Command::GetDatastore(name, r)).await
    }
    pub async fn datastores(&self) -> Result<Vec<crate::data::Datastore>> {
        self.ask(Command::ListDatastores).await
    }
    pub async fn create_data_asset(
        &self,
        asset: crate::data::DataAsset,
    ) -> Result<crate::data::DataAsset> {
        self.ask(|r| Command::CreateDataAsset(asset, r)).await
    }
    pub async fn data_asset(
        &self,
        name: String,
        version: Option<String>,
    ) -> Result<crate::data::DataAsset> {
        self.ask(|reply| Command::GetDataAsset {
            name,
            version,
            reply,
        })
        .await
    }
    pub async fn data_assets(&self) -> Result<Vec<crate::data::DataAsset>> {
        self.ask(Command::ListDataAssets).await
    }
    pub async fn create_environment(&self, environment: Environment) -> Result<Environment> {
        self.ask(|r| Command::CreateEnvironment(environment, r))
            .await
    }
    pub async fn environment(&self, name: String, version: Option<String>) -> Result<Environment> {
        self.ask(|reply| Command::GetEnvironment {
            name,
            version,
            reply,
        })
        .await
    }
    pub async fn environments(&self) -> Result<Vec<Environment>> {
        self.ask(Command::ListEnvironments).await
    }
    pub async fn archive_environment(
        &self,
        name: String,
        version: Option<String>,
    ) -> Result<Environment> {
        self.ask(|reply| Command::ArchiveEnvironment {
            name,
            version,
            reply,
        })
        .await
    }
    pub async fn set_defaults(
        &self,
        changes: BTreeMap<String, Option<String>>,
    ) -> Result<BTreeMap<String, String>> {
        self.ask(|r| Command::SetDefaults(changes, r)).await
    }
    pub async fn defaults(&self) -> Result<BTreeMap<String, String>> {
        self.ask(Command::GetDefaults).await
    }
    pub async fn quotas(&self) -> Result<QuotaReport> {
        self.ask(Command::GetQuotas).await
    }
    pub async fn set_quotas(&self, change: QuotaChange) -> Result<QuotaReport> {
        self.ask(|r| Command::SetQuotas(change, r)).await
    }
    /// Prometheus text of the whole deployment.
    pub async fn metrics(&self) -> Result<String> {
        self.ask(Command::Metrics).await
    }
    pub async fn explain(&self, job_id: String) -> Result<Vec<String>> {
        self.ask(|r| Command::Explain(job_id, r)).await
    }
    /// Whether an agent may make `call` about the instance it claims.
    pub async fn authorize(&self, claim: Claim, call: AgentCall) -> Result<Granted> {
        self.ask(|reply| Command::Authorize { claim, call, reply })
            .await
    }
    pub async fn list_nodes(&self, cluster: Option<String>) -> Result<Vec<Node>> {
        self.ask(|r| Command::ListNodes(cluster, r)).await
    }
    pub async fn register_agent(
        &self,
        registration: Registration,
        session: u64,
        link: mpsc::UnboundedSender<ToAgent>,
    ) -> Result<()> {
        self.ask(|reply| Command::AgentRegister {
            registration,
            session,
            link,
            reply,
        })
        .await
    }
}

type Deferred = Box<dyn FnOnce(Option<&str>) + Send>;

/// Nodes of a cluster that failed to start in a row: no new one before `until`.
#[derive(Clone, Debug)]
struct Backoff {
    failures: u32,
    until: Millis,
    /// The last failure, for the waiting jobs' reason.
    last: String,
}

pub struct Control {
    config: ControlConfig,
    store: Box<dyn Store>,
    provider: Arc<dyn NodeProvider>,
    own_tx: mpsc::Sender<Command>,
    changes_tx: broadcast::Sender<Change>,
    logs_tx: broadcast::Sender<Arc<StoredLog>>,

    clusters: BTreeMap<String, Cluster>,
    /// User-assigned identities, by name.
    identities: BTreeMap<String, Identity>,
    datastores: BTreeMap<String, crate::data::Datastore>,
    /// By (name, version).
    data_assets: BTreeMap<(String, String), crate::data::DataAsset>,
    environments: BTreeMap<(String, String), Environment>,
    defaults: BTreeMap<String, String>,
    defaults_dirty: bool,
    new_datastores: Vec<crate::data::Datastore>,
    new_data_assets: Vec<crate::data::DataAsset>,
    new_environments: Vec<Environment>,
    nodes: BTreeMap<String, Node>,
    jobs: HashMap<String, Job>,
    /// Queued jobs, oldest first: seq -> id.
    queue: BTreeMap<u64, String>,
    links: HashMap<String, (u64, mpsc::UnboundedSender<ToAgent>)>,
    targets: HashMap<String, u32>,
    /// Per cluster: node failures in a row, and no new node before this time.
    create_backoff: HashMap<String, Backoff>,
    next_job_seq: u64,
    next_node_seq: u64,
    wake_at: Option<Millis>,
    quotas: crate::governance::Quotas,
    quotas_dirty: bool,
    /// Per cluster: what blocks scale-up now (lock, quota), for reasons and `why`.
    blocked: HashMap<String, String>,
    /// Preempted nodes: when their notice ends.
    preempt_deadlines: HashMap<String, Millis>,
    /// Nodes taken by a preemption, until they are gone: whatever of theirs ends
    /// unfinished was preempted, not lost.
    preempted_nodes: HashSet<String>,
    next_chaos: Millis,
    chaos_state: u64,
    /// Instances holding GPUs: since when their utilization has been low.
    gpu_low_since: HashMap<Slot, Millis>,
    /// Control-loop timings, for /metrics.
    batches_total: u64,
    decide_seconds_total: f64,
    commit_seconds_total: f64,

    // What this batch changed, written and announced by `flush`.
    dirty_clusters: BTreeSet<String>,
    deleted_clusters: BTreeSet<String>,
    dirty_nodes: BTreeSet<String>,
    deleted_nodes: BTreeSet<String>,
    dirty_jobs: BTreeSet<String>,
    seqs_dirty: bool,
    new_logs: Vec<NewLog>,
    replies: Vec<Deferred>,
    outbox: Vec<(String, ToAgent)>,
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
}

impl Control {
    /// Loads the stored state; returns the loop (to `run`) and a handle to it.
    pub fn new(
        config: ControlConfig,
        mut store: Box<dyn Store>,
        provider: Arc<dyn NodeProvider>,
    ) -> Result<(Control, ControlHandle, mpsc::Receiver<Command>)> {
        let snapshot = store.load()?;
        let (tx, rx) = mpsc::channel(16_384);
        let (changes_tx, _) = broadcast::channel(4096);
        let (logs_tx, _) = broadcast::channel(4096);
        let handle = ControlHandle {
            tx: tx.clone(),
            changes: changes_tx.clone(),
            logs: logs_tx.clone(),
        };
        let now = now_ms();
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
            store,
            provider,
            own_tx: tx,
            changes_tx,
            logs_tx,
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
            defaults: snapshot.defaults,
            defaults_dirty: false,
            new_datastores: Vec::new(),
            new_data_assets: Vec::new(),
            new_environments: Vec::new(),
            nodes: BTreeMap::new(),
            jobs: HashMap::new(),
            queue: BTreeMap::new(),
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
            decide_seconds_total: 0.0,
            commit_seconds_total: 0.0,
            chaos_state: (now as u64) | 1,
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
        for job in snapshot.jobs {
            if job.status == JobStatus::Queued {
                control.queue.insert(job.seq, job.id.clone());
            }
            control.jobs.insert(job.id.clone(), job);
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
        Ok((control, handle, rx))
    }

    /// Runs until `shutdown` resolves, then stops every node and returns.
    pub async fn run(
        mut self,
        mut inbox: mpsc::Receiver<Command>,
        shutdown: impl std::future::Future<Output = ()>,
    ) {
        tokio::pin!(shutdown);
        // Leftovers of an earlier run (containers of nodes no longer known) go.
        let keep: Vec<String> = self.nodes.keys().cloned().collect();
        tokio::spawn(self.provider.cleanup(keep));
        let mut housekeeping = tokio::time::interval(Duration::from_millis(500));
        housekeeping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut commands = Vec::with_capacity(1024);
        loop {
            let now = now_ms();
            let started = std::time::Instant::now();
            self.decide(now);
            self.decide_seconds_total += started.elapsed().as_secs_f64();
            let started = std::time::Instant::now();
            self.flush().await;
            self.commit_seconds_total += started.elapsed().as_secs_f64();
            self.batches_total += 1;
            let wake_in = self
                .wake_at
                .map(|at| Duration::from_millis((at - now_ms()).max(0) as u64))
                .unwrap_or(Duration::from_secs(3600));
            tokio::select! {
                received = inbox.recv_many(&mut commands, 1024) => {
                    if received == 0 { break; }
                }
                _ = housekeeping.tick() => {}
                _ = tokio::time::sleep(wake_in) => {}
                _ = &mut shutdown => break,
            }
            let now = now_ms();
            for command in commands.drain(..) {
                self.handle(command, now);
            }
            self.housekeep(now);
        }
        self.stop_all_nodes().await;
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

    fn handle(&mut self, command: Command, now: Millis) {
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
            Command::NodeStarted { node_id, pid } => {
                if let Some(node) = self.nodes.get_mut(&node_id) {
                    node.pid = pid;
                    self.dirty_nodes.insert(node_id);
                }
            }
            Command::NodeFailed { node_id, error } => {
                if self
                    .nodes
                    .get(&node_id)
                    .is_some_and(|n| n.state == NodeState::Leaving)
                {
                    self.forget_node(&node_id);
                } else {
                    self.node_unusable(&node_id, &error, now);
                }
            }
            Command::NodeRemoved { node_id } => self.forget_node(&node_id),
            Command::LockCluster(name, kind, reply) => {
                let result = self.lock_cluster(&name, kind);
                self.defer(reply, result);
            }
            Command::JoinNode(cluster, hostname, cores, memory, reply) => {
                let result = self.join_node(&cluster, &hostname, cores, memory, now);
                self.defer(reply, result);
            }
            Command::RevokeNode(node_id, reply) => {
                let result = match self.nodes.get(&node_id).cloned() {
                    None => Err(Error::NotFound(format!("node `{node_id}` not found"))),
                    Some(node) => {
                        // Told now: marking it unusable drops its link.
                        if let Some((_, link)) = self.links.get(&node_id) {
                            let _ = link.send(ToAgent::Shutdown {
                                reason: "this node was revoked".into(),
                            });
                        }
                        self.node_unusable(&node_id, "revoked", now);
                        Ok(self.nodes.get(&node_id).cloned().unwrap_or(node))
                    }
                };
                self.defer(reply, result);
            }
            Command::PreemptNode(node_id, notice, reply) => {
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
                let result = self.explain(&job_id);
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

    fn cluster_info(&self, name: &str) -> Result<ClusterInfo> {
        let cluster = self.cluster(name)?.clone();
        let mut counts = NodeCounts::default();
        for node in self.nodes.values().filter(|n| n.cluster == name) {
            let counter = match node.state {
                NodeState::Idle => &mut counts.idle,
                NodeState::Running => &mut counts.running,
                NodeState::Preparing => &mut counts.preparing,
                NodeState::Leaving => &mut counts.leaving,
                NodeState::Preempted => &mut counts.preempted,
                NodeState::Unusable => &mut counts.unusable,
            };
            *counter += 1;
        }
        let current = counts.idle + counts.running + counts.preparing + counts.leaving;
        let target = self
            .targets
            .get(name)
            .copied()
            .unwrap_or(cluster.spec.min_nodes);
        // Idle nodes waiting out their idle timeout are not a resize in progress.
        let active = counts.idle + counts.running + counts.preparing;
        Ok(ClusterInfo {
            resizing: active < target || counts.preparing > 0 || counts.leaving > 0,
            identities: self.assigned(&cluster),
            cluster,
            counts,
            current_node_count: current,
            target_node_count: target,
        })
    }

    fn create_cluster(&mut self, mut request: ClusterRequest, now: Millis) -> Result<ClusterInfo> {
        let wanted = std::mem::take(&mut request.identities);
        let spec = ClusterSpec::from_request(request, &self.config.catalog)?;
        if self.clusters.contains_key(&spec.name) {
            return Err(Error::AlreadyExists(format!(
                "cluster `{}` already exists; pick another name or `shoal cluster update` it",
                spec.name
            )));
        }
        // An unknown identity refuses the whole create: nothing is made.
        let identities = self.with_identities(&[], &wanted)?;
        let name = spec.name.clone();
        info!(cluster = %name, size = %spec.vm_size, min = spec.min_nodes, max = spec.max_nodes, "cluster created");
        self.clusters.insert(
            name.clone(),
            Cluster {
                spec,
                created_at: now,
                errors: Vec::new(),
                lock: None,
                identities,
            },
        );
        self.dirty_clusters.insert(name.clone());
        self.cluster_info(&name)
    }

    fn update_cluster(&mut self, update: ClusterUpdate) -> Result<ClusterInfo> {
        let cluster = self.cluster(&update.name)?;
        if cluster.lock == Some(LockKind::ReadOnly) {
            return Err(Error::FailedPrecondition(format!(
                "cluster `{}` is locked read-only; `shoal cluster unlock {}` first",
                update.name, update.name
            )));
        }
        let next = cluster.spec.apply(&update)?;
        if let Some(cluster) = self.clusters.get_mut(&update.name) {
            cluster.spec = next;
        }
        self.dirty_clusters.insert(update.name.clone());
        self.cluster_info(&update.name)
    }

    fn delete_cluster(&mut self, name: &str) -> Result<ClusterInfo> {
        let info = self.cluster_info(name)?;
        if let Some(lock) = info.cluster.lock {
            return Err(Error::FailedPrecondition(format!(
                "cluster `{name}` is locked {}; `shoal cluster unlock {name}` first",
                lock.as_str()
            )));
        }
        let active = self
            .jobs
            .values()
            .filter(|j| j.spec.cluster == name && !j.status.is_final())
            .count();
        if active > 0 {
            return Err(Error::FailedPrecondition(format!(
                "cluster `{name}` has {active} job(s) queued or running; cancel them first (`shoal job list --cluster {name}`)"
            )));
        }
        let node_ids: Vec<String> = self
            .nodes
            .values()
            .filter(|n| n.cluster == name && n.state != NodeState::Leaving)
            .map(|n| n.id.clone())
            .collect();
        for id in node_ids {
            self.remove_node(&id, "cluster deleted");
        }
        self.clusters.remove(name);
        self.targets.remove(name);
        self.deleted_clusters.insert(name.to_string());
        info!(cluster = %name, "cluster deleted");
        Ok(info)
    }

    fn submit_job(&mut self, request: JobRequest, now: Millis) -> Result<Job> {
        let cluster = self.clusters.get(&request.cluster).ok_or_else(|| {
            Error::invalid(
                "compute",
                format!(
                    "cluster `{}` does not exist; create it with `shoal cluster create` or see `shoal cluster list`",
                    request.cluster
                ),
            )
        })?;
        let vm_gpus = self
            .config
            .catalog
            .get(&cluster.spec.vm_size)
            .map_or(0, |s| s.gpus);
        let mut request = request;
        let cuts = request
            .parallel
            .as_mut()
            .map(|(_, cuts)| std::mem::take(cuts));
        let spec = JobSpec::from_request(request, &cluster.spec, vm_gpus)?;
        let seq = self.next_job_seq;
        self.next_job_seq += 1;
        self.seqs_dirty = true;
        let id = format!("job-{seq}");
        let job = Job {
            id: id.clone(),
            seq,
            spec: JobSpec {
                name: if spec.name.is_empty() {
                    id.clone()
                } else {
                    spec.name.clone()
                },
                ..spec
            },
            status: JobStatus::Queued,
            attempts: Vec::new(),
            created_at: now,
            started_at: 0,
            ended_at: 0,
            reason: "queued".into(),
            preemptions: 0,
            flags: Vec::new(),
            progress: None,
        };
        debug!(job = %id, cluster = %job.spec.cluster, instances = job.spec.instance_count, "job submitted");
        self.queue.insert(seq, id.clone());
        self.jobs.insert(id.clone(), job.clone());
        if let Some(cuts) = cuts {
            self.add_parallel(&id, cuts);
        }
        let job = self.job_out(&job, now);
        self.dirty_jobs.insert(id);
        Ok(job)
    }

    fn cancel_job(&mut self, id: &str, now: Millis) -> Result<Job> {
        let job = self.job(id)?;
        if job.status.is_final() {
            return Err(Error::FailedPrecondition(format!(
                "job `{id}` already ended ({}); nothing to cancel",
                job.status.as_str()
            )));
        }
        if job.status != JobStatus::Canceling {
            self.cancel(id, "canceled by user".into(), "job canceled", now);
        }
        self.job(id).map(|j| self.job_out(j, now))
    }

    /// Cancels a job: `canceled` at once when nothing of it runs, else `canceling`
    /// until every instance has stopped (`finish_canceling`).
    fn cancel(&mut self, job_id: &str, reason: String, tell_agent: &str, now: Millis) {
        let Some(job) = self.jobs.get_mut(job_id) else {
            return;
        };
        self.queue.remove(&job.seq);
        let live = job
            .current_attempt()
            .is_some_and(|attempt| !attempt.is_settled());
        if !live {
            self.end_job(job_id, JobStatus::Canceled, reason, now);
            return;
        }
        info!(job = %job_id, %reason, "job canceling");
        job.status = JobStatus::Canceling;
        job.reason = reason;
        self.dirty_jobs.insert(job_id.to_string());
        self.stop_live_instances(job_id, tell_agent);
    }

    /// Canceling jobs of this batch whose instances have all stopped are canceled.
    fn finish_canceling(&mut self, now: Millis) {
        let stopped: Vec<(String, String)> = self
            .dirty_jobs
            .iter()
            .filter_map(|id| self.jobs.get(id))
            .filter(|j| {
                j.status == JobStatus::Canceling && j.attempts.iter().all(Attempt::is_settled)
            })
            .map(|j| (j.id.clone(), j.reason.clone()))
            .collect();
        for (id, reason) in stopped {
            self.end_job(&id, JobStatus::Canceled, reason, now);
        }
    }

    // ---------------------------------------------------------- agent events

    fn register(
        &mut self,
        registration: Registration,
        session: u64,
        link: mpsc::UnboundedSender<ToAgent>,
        now: Millis,
    ) -> Result<()> {
        let node_id = registration.node_id.clone();
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
        self.outbox.push((
            node_id.clone(),
            ToAgent::Registered {
                heartbeat_interval: self.config.heartbeat_interval,
                lease: self.config.lease,
            },
        ));
        self.create_backoff.remove(&cluster);
        // A node that starts clears the node failures; what blocks scaling stays.
        if let Some(c) = self.clusters.get_mut(&cluster) {
            let before = c.errors.len();
            c.errors.retain(|e| e.starts_with("scale-up blocked: "));
            if c.errors.len() != before {
                self.dirty_clusters.insert(cluster);
            }
        }
        info!(node = %node_id, reported = registration.attempts.len(), "agent registered");
        self.reconcile(&node_id, registration.attempts, now);
        Ok(())
    }

    /// Brings what the agent says it runs and what we think it runs together.
    fn reconcile(&mut self, node_id: &str, reports: Vec<AttemptReport>, now: Millis) {
        let mut reported = BTreeSet::new();
        for report in reports {
            reported.insert(report.slot.clone());
            let wanted = self.instance_wanted_on(node_id, &report.slot);
            match (report.exited, wanted) {
                (Some(exit), _) => self.instance_exited(node_id, &report.slot, exit, now),
                (None, true) => self.instance_started(node_id, &report.slot, now),
                (None, false) => {
                    warn!(node = %node_id, attempt = %report.slot.attempt_id, "agent runs an attempt that is no longer wanted; canceling it");
                    self.outbox.push((
                        node_id.to_string(),
                        ToAgent::Cancel {
                            slot: report.slot,
                            reason: "this attempt is no longer wanted".into(),
                        },
                    ));
                }
            }
        }
        let expected = self.nodes.get(node_id).and_then(|n| n.running.clone());
        if let Some(slot) = expected
            && !reported.contains(&slot)
        {
            self.instance_lost(&slot, &format!("node {node_id} restarted without it"), now);
        }
    }

    /// The instance is placed on this node and should still run.
    fn instance_wanted_on(&self, node_id: &str, slot: &Slot) -> bool {
        self.instance(slot).is_some_and(|(job, instance)| {
            instance.node == node_id && !instance.status.is_final() && !job.status.is_ending()
        })
    }

    fn instance(&self, slot: &Slot) -> Option<(&Job, &InstanceRun)> {
        let job = self.jobs.get(job_of_attempt(&slot.attempt_id)?)?;
        let attempt = job.attempts.iter().find(|a| a.id == slot.attempt_id)?;
        let instance = attempt.instances.get(slot.instance as usize)?;
        Some((job, instance))
    }

    fn instance_mut(&mut self, slot: &Slot) -> Option<(&mut Job, usize)> {
        let job = self.jobs.get_mut(job_of_attempt(&slot.attempt_id)?)?;
        let index = job.attempts.iter().position(|a| a.id == slot.attempt_id)?;
        job.attempts[index].instances.get(slot.instance as usize)?;
        Some((job, index))
    }

    /// The session ended; a lease after the agent was last heard from, its work
    /// is rerun (`housekeep`).
    fn agent_gone(&mut self, node_id: &str, session: u64) {
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

    fn instance_started(&mut self, node_id: &str, slot: &Slot, now: Millis) {
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
            job.reason.clear();
            if job.started_at == 0 {
                job.started_at = now;
            }
        }
        let id = job.id.clone();
        self.dirty_jobs.insert(id);
    }

    fn instance_exited(&mut self, node_id: &str, slot: &Slot, exit: ExitReport, now: Millis) {
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
        let job_id = job.id.clone();
        let job_final = job.status.is_ending();
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
        self.dirty_jobs.insert(job_id.clone());
        if job_final {
            return;
        }
        match status {
            InstanceStatus::Completed => {
                let done = self.jobs[&job_id].attempts[index]
                    .instances
                    .iter()
                    .all(|i| i.status == InstanceStatus::Completed);
                if done {
                    self.end_job(&job_id, JobStatus::Completed, String::new(), now);
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
    fn free_node(&mut self, node_id: &str, slot: &Slot, now: Millis) {
        if let Some(node) = self.nodes.get_mut(node_id)
            && node.running.as_ref() == Some(slot)
        {
            node.running = None;
            if node.state == NodeState::Running {
                node.state = NodeState::Idle;
                node.state_since = now;
            }
            self.dirty_nodes.insert(node_id.to_string());
        }
    }

    /// An instance's node went away: the attempt is over, and the job is requeued
    /// as a new attempt (a gang as a whole) unless it used up its attempts.
    fn instance_lost(&mut self, slot: &Slot, why: &str, now: Millis) {
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
        let job_id = job.id.clone();
        let attempts_used = job.attempts.iter().filter(|a| a.was_lost()).count() as u32;
        let job_final = job.status.is_ending();
        let seq = job.seq;
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
            job.reason = format!("requeued: attempt {} lost ({why})", attempts_used);
            self.queue.insert(seq, job_id);
        }
    }

    /// Tells every instance of the job's current attempt that still runs to stop;
    /// each shows `stopping` until its agent says it has.
    fn stop_live_instances(&mut self, job_id: &str, reason: &str) {
        let Some(attempt) = self
            .jobs
            .get_mut(job_id)
            .and_then(|j| j.attempts.last_mut())
        else {
            return;
        };
        for instance in attempt
            .instances
            .iter_mut()
            .filter(|i| !i.status.is_final())
        {
            instance.status = InstanceStatus::Stopping;
            let slot = Slot {
                attempt_id: attempt.id.clone(),
                instance: instance.index,
            };
            self.outbox.push((
                instance.node.clone(),
                ToAgent::Cancel {
                    slot,
                    reason: reason.to_string(),
                },
            ));
        }
        self.dirty_jobs.insert(job_id.to_string());
    }

    fn end_job(&mut self, job_id: &str, status: JobStatus, reason: String, now: Millis) {
        if let Some(job) = self.jobs.get_mut(job_id) {
            info!(job = %job_id, status = status.as_str(), %reason, "job ended");
            let newly = !job.status.is_final();
            job.status = status;
            if newly {
                *self.ended_counts.entry(status).or_default() += 1;
            }
            job.reason = reason;
            job.ended_at = now;
            self.dirty_jobs.insert(job_id.to_string());
        }
    }

    // ------------------------------------------------------------ nodes

    fn node_unusable(&mut self, node_id: &str, why: &str, now: Millis) {
        self.node_out(node_id, why, false, now);
    }

    /// The agent has not been heard from for a lease: its work is rerun elsewhere
    /// (the agent has stopped it by now, or never got it). The node may come back:
    /// its agent re-registers and the node is idle again; else it is removed when
    /// unusable nodes are forgotten.
    fn node_lost_contact(&mut self, node_id: &str, now: Millis) {
        let lease = self.config.lease.as_secs();
        let why = format!(
            "no word from its agent for {lease} s (lease_seconds); its work was rerun elsewhere"
        );
        self.node_out(node_id, &why, true, now);
    }

    fn node_out(&mut self, node_id: &str, why: &str, lost_contact: bool, now: Millis) {
        let Some(node) = self.nodes.get_mut(node_id) else {
            return;
        };
        warn!(node = %node_id, why, "node unusable");
        node.state = NodeState::Unusable;
        node.state_since = now;
        node.message = why.to_string();
        node.connected = false;
        node.lost_contact = lost_contact;
        let running = node.running.clone();
        let cluster = node.cluster.clone();
        let gone = removal(node);
        self.dirty_nodes.insert(node_id.to_string());
        self.links.remove(node_id);
        if let Some(slot) = running {
            self.instance_lost(&slot, &format!("node {node_id} is unusable: {why}"), now);
        }
        if lost_contact {
            if let Some(c) = self.clusters.get_mut(&cluster) {
                c.errors.push(format!("node {node_id}: {why}"));
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
            c.errors.push(format!(
                "node {node_id}: {why} (new nodes wait {} s)",
                delay_ms / 1000
            ));
            let excess = c.errors.len().saturating_sub(5);
            c.errors.drain(..excess);
            self.dirty_clusters.insert(cluster);
        }
        // Make sure nothing of it keeps running.
        self.to_remove.push(gone);
    }

    fn remove_node(&mut self, node_id: &str, why: &str) {
        let Some(node) = self.nodes.get_mut(node_id) else {
            return;
        };
        info!(node = %node_id, why, "removing node");
        node.state = NodeState::Leaving;
        node.message = why.to_string();
        let gone = removal(node);
        self.dirty_nodes.insert(node_id.to_string());
        self.outbox.push((
            node_id.to_string(),
            ToAgent::Shutdown {
                reason: why.to_string(),
            },
        ));
        self.to_remove.push(gone);
    }

    fn forget_node(&mut self, node_id: &str) {
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
    fn housekeep(&mut self, now: Millis) {
        self.parallel_housekeep(now);
        self.retention(now);
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
                (n.id.clone(), n.running.is_none() || overdue)
            })
            .collect();
        for (id, gone) in preempted {
            if gone {
                let running = self.nodes.get(&id).and_then(|n| n.running.clone());
                if let Some(slot) = running {
                    self.instance_lost(&slot, &format!("node {id} was preempted"), now);
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

    // ----------------------------------------------------------- decisions

    fn decide(&mut self, now: Millis) {
        self.finish_canceling(now);
        let schedulable: Vec<&Job> = self
            .queue
            .values()
            .filter_map(|id| self.jobs.get(id))
            .filter(|j| j.current_attempt().is_none_or(Attempt::is_settled))
            .collect();
        let node_refs: Vec<&Node> = self.nodes.values().collect();
        let placements = scheduler::place(schedulable, &node_refs);
        for placement in placements {
            self.start_attempt(&placement, now);
        }

        let mut waiting: HashMap<String, (u32, u32)> = HashMap::new();
        for job in self.queue.values().filter_map(|id| self.jobs.get(id)) {
            let entry = waiting.entry(job.spec.cluster.clone()).or_default();
            entry.0 += job.spec.instance_count;
            entry.1 = entry.1.max(job.spec.instance_count);
        }
        self.wake_at = None;
        let names: Vec<String> = self.clusters.keys().cloned().collect();
        for name in names {
            let (waiting_instances, widest) = waiting.get(&name).copied().unwrap_or_default();
            let spec = self.clusters[&name].spec.clone();
            let nodes: Vec<&Node> = self.nodes.values().filter(|n| n.cluster == name).collect();
            let free = nodes.iter().filter(|n| n.is_free()).count();
            let decision = autoscaler::decide(&spec, &nodes, waiting_instances, now);
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
            let previous = self.targets.insert(name.clone(), decision.target);
            if previous != Some(decision.target) {
                self.dirty_clusters.insert(name.clone());
            }
            // Read-only: neither up nor down, and say so; else the quotas decide.
            let (allowed, block, removals) =
                match crate::governance::lock_block(&self.clusters[&name]) {
                    Some(block) => {
                        let wanted = decision.create > 0 || !decision.remove.is_empty();
                        (0, wanted.then_some(block), Vec::new())
                    }
                    None => {
                        let (allowed, block) = self.quota_room(&name, decision.create);
                        (allowed, block, decision.remove.clone())
                    }
                };
            let backoff_until = self.create_backoff.get(&name).map(|b| b.until);
            match backoff_until {
                Some(until) if allowed > 0 && now < until => {
                    self.wake_at = Some(self.wake_at.map_or(until, |w| w.min(until)));
                }
                _ => {
                    for _ in 0..allowed {
                        self.create_node(&name, now);
                    }
                }
            }
            // A quota's words count the nodes just created too.
            let block = match block {
                Some(quota) if quota.starts_with("quota:") => {
                    self.quota_room(&name, 1).1.or(Some(quota))
                }
                other => other,
            };
            self.set_block(&name, block);
            for id in &removals {
                self.remove_node(id, "idle past idle_seconds_before_scaledown");
            }
            if waiting_instances > 0 {
                let reason = match (self.blocked.get(&name), self.create_backoff.get(&name)) {
                    (Some(block), _) => block.clone(),
                    (None, Some(backoff)) => format!(
                        "{}; {} node(s) failed to start in a row, the last: {}",
                        waiting_reason(&spec, active, decision.target, free as u32, widest),
                        backoff.failures,
                        backoff.last
                    ),
                    (None, None) => {
                        waiting_reason(&spec, active, decision.target, free as u32, widest)
                    }
                };
                self.set_queued_reasons(&name, &reason);
                self.explain_missing_gpus(&name);
            }
        }
    }

    /// Live usage of a running instance; flags (and, by the cluster's policy,
    /// cancels) a job whose GPUs sit idle too long.
    fn observe_usage(&mut self, node_id: &str, slot: &Slot, used: Usage, now: Millis) {
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
            .and_then(|j| self.clusters.get(&j.spec.cluster))
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

    /// Records (or clears) what blocks a cluster's scale-up, in its errors too.
    fn set_block(&mut self, cluster: &str, block: Option<String>) {
        let previous = match &block {
            Some(why) => self.blocked.insert(cluster.to_string(), why.clone()),
            None => self.blocked.remove(cluster),
        };
        if previous == block {
            return;
        }
        if let Some(c) = self.clusters.get_mut(cluster) {
            c.errors.retain(|e| !e.starts_with("scale-up blocked: "));
            if let Some(why) = &block {
                info!(cluster, why = %why, "scale-up blocked");
                c.errors.push(format!("scale-up blocked: {why}"));
            }
            self.dirty_clusters.insert(cluster.to_string());
        }
    }

    /// How many of `wanted` new nodes the quotas allow, and which quota says no.
    fn quota_room(&self, cluster: &str, wanted: u32) -> (u32, Option<String>) {
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

    fn quota_report(&self) -> QuotaReport {
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

    fn set_quotas(&mut self, change: QuotaChange) -> Result<QuotaReport> {
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

    fn lock_cluster(&mut self, name: &str, kind: Option<LockKind>) -> Result<ClusterInfo> {
        let cluster = self.clusters.get_mut(name).ok_or_else(|| {
            Error::NotFound(format!(
                "cluster `{name}` not found; `shoal cluster list` shows the clusters"
            ))
        })?;
        cluster.lock = kind;
        if kind != Some(LockKind::ReadOnly) {
            cluster
                .errors
                .retain(|e| !e.starts_with("scale-up blocked: cluster locked"));
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
    fn preempt_node(
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
        let busy = node.running.is_some();
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
        self.outbox.push((
            node_id.to_string(),
            ToAgent::Preempt {
                notice,
                reason: why.to_string(),
            },
        ));
        let node = self.nodes.get(node_id).cloned();
        if !busy {
            self.preempt_deadlines.remove(node_id);
            self.remove_node(node_id, "preempted");
        }
        node.ok_or_else(|| Error::Internal("preempted node vanished".into()))
    }

    /// An instance whose node was preempted before it could report its own end.
    fn instance_preempted(&mut self, slot: &Slot, now: Millis) {
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
        let job_id = job.id.clone();
        let job_final = job.status.is_ending();
        self.dirty_jobs.insert(job_id.clone());
        self.free_node(&node_id, slot, now);
        if !job_final {
            self.requeue_preempted(&job_id, &node_id, slot, now);
        }
    }

    /// A preempted instance: the job goes back to the queue as a whole (the rest of
    /// a gang is stopped), unless it used up `max_preemptions`.
    fn requeue_preempted(&mut self, job_id: &str, node_id: &str, slot: &Slot, now: Millis) {
        let Some(job) = self.jobs.get_mut(job_id) else {
            return;
        };
        if job.status == JobStatus::Queued {
            return; // another instance of the gang got here first
        }
        job.preemptions += 1;
        let count = job.preemptions;
        let limit = job.spec.max_preemptions;
        let seq = job.seq;
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
            job.reason = format!(
                "requeued: preempted on node {node_id} (attempt {}, preemption {count} of at most {limit})",
                slot.attempt_id
            );
            self.queue.insert(seq, job_id.to_string());
        }
    }

    /// Chaos: now and then a random low-priority node is preempted.
    fn chaos(&mut self, now: Millis) {
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
        // xorshift: no need for more randomness than this.
        self.chaos_state ^= self.chaos_state << 13;
        self.chaos_state ^= self.chaos_state >> 7;
        self.chaos_state ^= self.chaos_state << 17;
        let pick = candidates[(self.chaos_state % candidates.len() as u64) as usize].clone();
        let notice = self.config.preemption_notice;
        let _ = self.preempt_node(&pick, notice, "preempted by chaos", now);
    }

    fn metrics(&self) -> String {
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
                    .as_ref()
                    .and_then(|slot| self.instance(slot))
                    .filter(|(_, run)| run.gpus.contains(&index))
                    .map(|(job, _)| job.id.clone())
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
        m.counter_seconds(
            "scheduler_decide",
            "Time spent in scheduling and autoscaling decisions",
            self.decide_seconds_total,
        );
        m.counter_seconds(
            "store_commit",
            "Time spent committing batches to the store",
            self.commit_seconds_total,
        );
        m.encode()
    }

    /// Why a job is where it is: every fact the scheduler and autoscaler used.
    fn explain(&self, job_id: &str) -> Result<Vec<String>> {
        let job = self.job(job_id)?;
        let mut lines = vec![format!("{} is {}", job.id, job.status.as_str())];
        if !job.reason.is_empty() {
            lines.push(format!("reason: {}", job.reason));
        }
        if let Some(attempt) = job.current_attempt() {
            let stopping: Vec<String> = attempt
                .instances
                .iter()
                .filter(|i| i.status == InstanceStatus::Stopping)
                .map(|i| format!("instance {} on {}", i.index, i.node))
                .collect();
            if !stopping.is_empty() {
                lines.push(format!(
                    "waits for {} to stop: {}",
                    if stopping.len() == 1 {
                        "an instance"
                    } else {
                        "instances"
                    },
                    stopping.join(", ")
                ));
            }
        }
        let attempts = job.attempts.len();
        if attempts > 0 {
            let lost = job.attempts.iter().filter(|a| a.was_lost()).count();
            lines.push(format!(
                "attempts: {attempts} ({lost} lost, {} preemptions of at most {})",
                job.preemptions, job.spec.max_preemptions
            ));
        }
        let Ok(info) = self.cluster_info(&job.spec.cluster) else {
            lines.push(format!("cluster `{}` no longer exists", job.spec.cluster));
            return Ok(lines);
        };
        let spec = &info.cluster.spec;
        let counts = &info.counts;
        lines.push(format!(
            "cluster {}: {} {}, {} node(s) now (idle {}, running {}, preparing {}, leaving {}, preempted {}, unusable {}), target {}, min {}, max {}",
            spec.name, spec.vm_size, spec.vm_priority.as_str(), info.current_node_count, counts.idle, counts.running,
            counts.preparing, counts.leaving, counts.preempted, counts.unusable, info.target_node_count, spec.min_nodes, spec.max_nodes
        ));
        if job.status == JobStatus::Queued {
            let free = self
                .nodes
                .values()
                .filter(|n| n.cluster == spec.name && n.is_free())
                .count();
            let need = job.spec.instance_count;
            let gang = if need > 1 {
                format!(" at once (a gang of {need})")
            } else {
                String::new()
            };
            lines.push(format!("needs {need} free node(s){gang}; {free} free now"));
            let ahead = self
                .queue
                .iter()
                .take_while(|(seq, _)| **seq < job.seq)
                .filter(|(_, id)| {
                    self.jobs
                        .get(*id)
                        .is_some_and(|j| j.spec.cluster == spec.name)
                })
                .count();
            lines.push(format!("queue: {ahead} job(s) of this cluster ahead of it"));
            if let Some(current) = job.current_attempt()
                && !current.is_settled()
            {
                lines.push(format!(
                    "waits for attempt {} to finish stopping",
                    current.id
                ));
            }
        }
        lines.push(format!(
            "lock: {}",
            info.cluster.lock.map_or("none", LockKind::as_str)
        ));
        if let Some(size) = self.config.catalog.get(&spec.vm_size) {
            let report = self.quota_report();
            let scope = match spec.vm_priority {
                Priority::Dedicated => format!("family {}", size.family),
                Priority::LowPriority => "low-priority".to_string(),
            };
            for (name, limit, used) in report
                .lines
                .iter()
                .filter(|(n, _, _)| *n == scope || n == "total")
            {
                lines.push(format!(
                    "quota {name}: {used}/{limit} cores used; a node needs {}",
                    size.cores
                ));
            }
        }
        if let Some(block) = self.blocked.get(&spec.name) {
            lines.push(format!("autoscaler: blocked: {block}"));
        }
        if let Some(backoff) = self.create_backoff.get(&spec.name)
            && now_ms() < backoff.until
        {
            lines.push(format!(
                "autoscaler: {} node(s) failed to start in a row; next try in {} s (the last: {})",
                backoff.failures,
                (backoff.until - now_ms()) / 1000 + 1,
                backoff.last
            ));
        }
        for error in &info.cluster.errors {
            lines.push(format!("cluster error: {error}"));
        }
        Ok(lines)
    }

    /// Queued GPU jobs of a cluster whose live nodes have too few GPUs say so.
    fn explain_missing_gpus(&mut self, cluster: &str) {
        let live: Vec<&Node> = self
            .nodes
            .values()
            .filter(|n| {
                n.cluster == cluster && matches!(n.state, NodeState::Idle | NodeState::Running)
            })
            .collect();
        if live.is_empty() {
            return;
        }
        let most = live.iter().map(|n| n.gpus.len() as u32).max().unwrap_or(0);
        let why = live
            .iter()
            .find(|n| !n.gpu_reason.is_empty())
            .map(|n| format!(" ({}: {})", n.id, n.gpu_reason))
            .unwrap_or_default();
        for id in self.queue.values() {
            if let Some(job) = self.jobs.get_mut(id)
                && job.spec.cluster == cluster
                && job.spec.gpus_per_instance > most
            {
                let reason = if most == 0 {
                    format!("no node in cluster {cluster} has GPUs{why}")
                } else {
                    format!(
                        "no node in cluster {cluster} has {} GPUs (at most {most})",
                        job.spec.gpus_per_instance
                    )
                };
                if job.reason != reason {
                    job.reason = reason;
                    self.dirty_jobs.insert(id.clone());
                }
            }
        }
    }

    fn set_queued_reasons(&mut self, cluster: &str, reason: &str) {
        // Jobs no live node has the GPUs for get their own reason.
        let most_gpus = self
            .nodes
            .values()
            .filter(|n| {
                n.cluster == cluster && matches!(n.state, NodeState::Idle | NodeState::Running)
            })
            .map(|n| n.gpus.len() as u32)
            .max();
        for id in self.queue.values() {
            if let Some(job) = self.jobs.get_mut(id)
                && job.spec.cluster == cluster
                && most_gpus.is_none_or(|most| job.spec.gpus_per_instance <= most)
                && job.reason != reason
                && !job.reason.starts_with("requeued")
            {
                job.reason = reason.to_string();
                self.dirty_jobs.insert(id.clone());
            }
        }
    }

    /// A node of an agent started by hand (its machine's own cores and memory).
    fn join_node(
        &mut self,
        cluster: &str,
        hostname: &str,
        cores: u32,
        memory_bytes: u64,
        now: Millis,
    ) -> Result<Node> {
        if !self.clusters.contains_key(cluster) {
            return Err(Error::NotFound(format!(
                "cluster `{cluster}` does not exist"
            )));
        }
        let id = format!("{cluster}-j{}", self.next_node_seq);
        self.next_node_seq += 1;
        self.seqs_dirty = true;
        let mut node = Node::preparing(
            &id,
            cluster,
            cores.max(1),
            memory_bytes,
            ProviderKind::Joined,
            now,
        );
        node.hostname = hostname.to_string();
        info!(node = %id, cluster, hostname, "node joined");
        self.nodes.insert(id.clone(), node.clone());
        self.dirty_nodes.insert(id);
        Ok(node)
    }

    fn create_node(&mut self, cluster: &str, now: Millis) {
        let provider = self
            .clusters
            .get(cluster)
            .map(|c| c.spec.provider)
            .unwrap_or_default();
        let size = self
            .clusters
            .get(cluster)
            .and_then(|c| self.config.catalog.get(&c.spec.vm_size).cloned());
        let Some(size) = size else {
            error!(cluster, "cluster has a vm size the catalog no longer knows");
            return;
        };
        let id = format!("{cluster}-n{}", self.next_node_seq);
        self.next_node_seq += 1;
        self.seqs_dirty = true;
        let node = Node::preparing(&id, cluster, size.cores, size.memory_bytes(), provider, now);
        info!(node = %id, cluster, "creating node");
        self.to_create.push(NodeLaunch {
            provider,
            node_id: id.clone(),
            cluster: cluster.to_string(),
            cores: node.cores,
            memory_bytes: node.memory_bytes,
            gpus: size.gpus,
        });
        self.nodes.insert(id.clone(), node);
        self.dirty_nodes.insert(id);
    }

    fn start_attempt(&mut self, placement: &scheduler::Placement, now: Millis) {
        let Some(job) = self.jobs.get_mut(&placement.job_id) else {
            return;
        };
        let number = job.attempts.len() as u32 + 1;
        let attempt_id = format!("{}.{number}", job.id);
        let low_priority = self
            .clusters
            .get(&job.spec.cluster)
            .is_some_and(|c| c.spec.vm_priority == Priority::LowPriority);
        let preemption_notice = self.config.preemption_notice.as_secs().to_string();
        // How instances reach each other: local nodes share this machine's loopback;
        // other nodes are reached by the name their agent registered.
        let hosts: Vec<String> = placement
            .nodes
            .iter()
            .map(|id| match self.nodes.get(id) {
                Some(n) if n.provider != ProviderKind::Local && !n.hostname.is_empty() => {
                    n.hostname.clone()
                }
                _ => "127.0.0.1".to_string(),
            })
            .collect();
        let master = hosts.first().cloned().unwrap_or_default();
        let distributed = distribution_env(&job.spec, &hosts);
        let processes = job
            .spec
            .distribution
            .as_ref()
            .map_or(1, Distribution::agent_processes);
        // Managed identity: the cluster's default identity, and a secret per
        // instance that the node's token endpoint asks for.
        let default_identity = self
            .clusters
            .get(&job.spec.cluster)
            .and_then(|c| c.identities.first())
            .map(|a| a.client_id.clone());
        let mpi = matches!(job.spec.distribution, Some(Distribution::Mpi { .. }));
        let mut instances = Vec::new();
        for (index, node_id) in placement.nodes.iter().enumerate() {
            let slot = Slot {
                attempt_id: attempt_id.clone(),
                instance: index as u32,
            };
            let token = crate::auth::random_hex(16);
            let mut env = job.spec.environment_variables.clone();
            for (key, value) in [
                ("SHOAL_JOB_ID", job.id.clone()),
                ("SHOAL_ATTEMPT", number.to_string()),
                ("SHOAL_ATTEMPT_ID", attempt_id.clone()),
                ("SHOAL_INSTANCE", index.to_string()),
                ("SHOAL_NODE_RANK", index.to_string()),
                ("SHOAL_NUM_NODES", job.spec.instance_count.to_string()),
                ("SHOAL_NODE_ID", node_id.clone()),
                ("SHOAL_CLUSTER", job.spec.cluster.clone()),
                ("SHOAL_MASTER_NODE", master.clone()),
                ("SHOAL_PREEMPTION_DEADLINE", preemption_notice.clone()),
            ] {
                env.insert(key.to_string(), value);
            }
            if !low_priority {
                env.remove("SHOAL_PREEMPTION_DEADLINE");
            }
            env.insert("SHOAL_NODES".into(), hosts.join(","));
            env.insert("SHOAL_NODE_IDS".into(), placement.nodes.join(","));
            if self.config.identity_tokens {
                // Every instance may ask; a cluster with no identity gets a clear 400.
                env.insert("IDENTITY_HEADER".into(), crate::auth::random_hex(24));
            }
            if let Some(client_id) = &default_identity {
                env.insert("DEFAULT_IDENTITY_CLIENT_ID".into(), client_id.clone());
            }
            if let Some(per_instance) = distributed.get(index) {
                for (key, value) in per_instance {
                    // The job's own settings win (MASTER_PORT, say).
                    env.entry(key.clone()).or_insert_with(|| value.clone());
                }
            }
            self.outbox.push((
                node_id.clone(),
                ToAgent::Launch(LaunchOrder {
                    slot: slot.clone(),
                    job_id: job.id.clone(),
                    argv: job.spec.argv.clone(),
                    env,
                    timeout_seconds: job.spec.timeout_seconds,
                    has_code: job.spec.code_path.is_some(),
                    image: job.spec.image.clone(),
                    restore_outputs: number > 1,
                    gpus: job.spec.gpus_per_instance,
                    processes,
                    mpi,
                    parallel_workers: job.spec.parallel.as_ref().map_or(0, |p| p.concurrency),
                    parallel_worker_mode: job.spec.parallel.as_ref().is_some_and(|p| p.worker_mode),
                    token: token.clone(),
                    inputs: launch_inputs(&job.spec),
                    outputs: job
                        .spec
                        .extras
                        .outputs
                        .iter()
                        .map(|(name, output)| (name.clone(), !output.kind.is_file()))
                        .collect(),
                    path_prefix: job.spec.extras.path_prefix.clone(),
                    shm_size_bytes: job.spec.extras.shm_size_bytes,
                }),
            ));
            if let Some(node) = self.nodes.get_mut(node_id) {
                node.state = NodeState::Running;
                node.state_since = now;
                node.running = Some(slot);
                self.dirty_nodes.insert(node_id.clone());
            }
            instances.push(InstanceRun {
                index: index as u32,
                node: node_id.clone(),
                status: InstanceStatus::Launching,
                exit_code: None,
                message: String::new(),
                gpus: Vec::new(),
                usage: None,
                token,
            });
        }
        debug!(job = %job.id, attempt = %attempt_id, nodes = ?placement.nodes, "placed");
        job.attempts.push(Attempt {
            id: attempt_id,
            number,
            instances,
            started_at: 0,
            ended_at: 0,
            reason: String::new(),
        });
        job.status = JobStatus::Preparing;
        job.reason = format!("starting on {}", placement.nodes.join(", "));
        self.queue.remove(&job.seq);
        self.dirty_jobs.insert(placement.job_id.clone());
    }

    // ---------------------------------------------------------------- apply

    /// Commits the batch, then (and only then) answers, launches and scales.
    async fn flush(&mut self) {
        let clusters_touched: BTreeSet<String> = self
            .dirty_nodes
            .iter()
            .chain(self.deleted_nodes.iter())
            .filter_map(|id| self.nodes.get(id).map(|n| n.cluster.clone()))
            .chain(self.dirty_clusters.iter().cloned())
            .chain(self.deleted_clusters.iter().cloned())
            .collect();
        let batch = Batch {
            clusters: self
                .dirty_clusters
                .iter()
                .filter_map(|n| self.clusters.get(n).cloned())
                .collect(),
            deleted_clusters: self.deleted_clusters.iter().cloned().collect(),
            nodes: self
                .dirty_nodes
                .iter()
                .filter_map(|id| self.nodes.get(id).cloned())
                .collect(),
            deleted_nodes: self.deleted_nodes.iter().cloned().collect(),
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
            defaults: std::mem::take(&mut self.defaults_dirty).then(|| self.defaults.clone()),
        };
        let mut batch = batch;
        self.parallel_changes(&mut batch);
        let committed = if batch.is_empty() {
            Ok(crate::store::Committed::default())
        } else {
            self.store.commit(&batch)
        };
        let failure = committed.as_ref().err().map(|e| e.to_string());
        if let Some(why) = &failure {
            error!(error = %why, "commit failed; replying with errors");
        }
        for reply in self.replies.drain(..) {
            reply(failure.as_deref());
        }
        self.dirty_clusters.clear();
        self.deleted_clusters.clear();
        self.dirty_nodes.clear();
        self.deleted_nodes.clear();
        self.seqs_dirty = false;
        let mut jobs_touched = std::mem::take(&mut self.dirty_jobs);
        jobs_touched.append(&mut self.notify_jobs);
        if failure.is_some() {
            self.outbox.clear();
            return;
        }
        if let Ok(committed) = committed {
            self.purged(&committed, now_ms());
            self.forget_old_jobs(&jobs_touched);
            for (log, seq) in batch.logs.into_iter().zip(committed.log_seqs) {
                let _ = self.logs_tx.send(Arc::new(StoredLog {
                    seq,
                    job_id: log.job_id,
                    attempt_id: log.attempt_id,
                    instance: log.instance,
                    stream: log.stream,
                    data: log.data,
                }));
            }
        }
        for (node_id, message) in self.outbox.drain(..) {
            if let Some((_, link)) = self.links.get(&node_id) {
                let _ = link.send(message);
            }
        }
        for id in jobs_touched {
            let _ = self.changes_tx.send(Change::Job(id));
        }
        for name in clusters_touched {
            let _ = self.changes_tx.send(Change::Cluster(name));
        }
        let start_limit = self.config.register_timeout;
        for launch in self.to_create.drain(..) {
            let provider = self.provider.clone();
            let events = self.own_tx.clone();
            tokio::spawn(async move {
                let node_id = launch.node_id.clone();
                // A provider that hangs fails the node, as one that says no.
                let created = tokio::time::timeout(start_limit, provider.create(launch))
                    .await
                    .unwrap_or_else(|_| {
                        Err(format!(
                            "the provider did not start it within {} s",
                            start_limit.as_secs()
                        ))
                    });
                match created {
                    Ok(started) => {
                        let _ = events
                            .send(Command::NodeStarted {
                                node_id: node_id.clone(),
                                pid: started.pid,
                            })
                            .await;
                        let how = started.exited.await;
                        let _ = events
                            .send(Command::NodeFailed {
                                node_id,
                                error: how,
                            })
                            .await;
                    }
                    Err(error) => {
                        let _ = events.send(Command::NodeFailed { node_id, error }).await;
                    }
                }
            });
        }
        for gone in self.to_remove.drain(..) {
            let provider = self.provider.clone();
            let events = self.own_tx.clone();
            tokio::spawn(async move {
                let node_id = gone.node_id.clone();
                provider.remove(gone).await;
                let _ = events.send(Command::NodeRemoved { node_id }).await;
            });
        }
    }

    /// Clean shutdown: running attempts are requeued (their processes stop with
    /// their nodes), and every node is stopped and forgotten.
    async fn stop_all_nodes(&mut self) {
        let now = now_ms();
        let running: Vec<Slot> = self
            .nodes
            .values()
            .filter_map(|n| n.running.clone())
            .collect();
        for slot in running {
            self.instance_lost(&slot, "the coordinator stopped", now);
        }
        let removals: Vec<NodeRemoval> = self.nodes.values().map(removal).collect();
        for id in removals.iter().map(|r| &r.node_id) {
            if let Some((_, link)) = self.links.get(id) {
                let _ = link.send(ToAgent::Shutdown {
                    reason: "the coordinator is stopping".into(),
                });
            }
            self.deleted_nodes.insert(id.clone());
        }
        self.nodes.clear();
        self.outbox.clear();
        self.to_create.clear();
        self.to_remove.clear();
        self.flush().await;
        info!(nodes = removals.len(), "stopping nodes");
        let removals = removals.into_iter().map(|r| self.provider.remove(r));
        futures::future::join_all(removals).await;
    }
}

fn removal(node: &Node) -> NodeRemoval {
    NodeRemoval {
        provider: node.provider,
        node_id: node.id.clone(),
        pid: node.pid,
    }
}

/// Why an MPI job's workers are stopped once mpirun has finished.
pub const MPI_RELEASE: &str = "released: the MPI launcher finished";

/// PyTorch master port unless the job sets MASTER_PORT.
pub const PYTORCH_MASTER_PORT: u16 = 6105;
/// TensorFlow task i listens on this port plus i (distinct on a shared machine).
pub const TENSORFLOW_BASE_PORT: u16 = 2222;

/// The environment of each instance of a distributed job, instance by instance.
/// PyTorch's per-process RANK and LOCAL_RANK are the agent's to add.
pub fn distribution_env(spec: &JobSpec, hosts: &[String]) -> Vec<Vec<(String, String)>> {
    let Some(distribution) = &spec.distribution else {
        return Vec::new();
    };
    let pairs = |items: Vec<(&str, String)>| -> Vec<(String, String)> {
        items.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
    };
    match distribution {
        Distribution::Mpi {
            process_count_per_instance,
        } => {
            let common = pairs(vec![
                (
                    "SHOAL_MPI_PROCESSES_PER_NODE",
                    process_count_per_instance.to_string(),
                ),
                // Containers run as root; Open MPI refuses that unless told twice.
                ("OMPI_ALLOW_RUN_AS_ROOT", "1".into()),
                ("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1".into()),
                // Daemons are started one by one through the agents (no tree of
                // remote shells) and stay attached to their exec, so that they
                // end with it and their output is carried back.
                ("OMPI_MCA_plm_rsh_no_tree_spawn", "1".into()),
                ("OMPI_MCA_orte_leave_session_attached", "1".into()),
                // Each daemon keeps its own node's settings (temporary dirs).
                ("OMPI_MCA_plm_rsh_pass_environ_mca_params", "0".into()),
            ]);
            vec![common; hosts.len()]
        }
        Distribution::Pytorch {
            process_count_per_instance,
        } => {
            let per = *process_count_per_instance;
            let master_port = spec
                .environment_variables
                .get("MASTER_PORT")
                .cloned()
                .unwrap_or_else(|| PYTORCH_MASTER_PORT.to_string());
            (0..hosts.len())
                .map(|rank| {
                    pairs(vec![
                        ("MASTER_ADDR", hosts[0].clone()),
                        ("MASTER_PORT", master_port.clone()),
                        ("WORLD_SIZE", (hosts.len() as u32 * per).to_string()),
                        ("NODE_RANK", rank.to_string()),
                        ("LOCAL_WORLD_SIZE", per.to_string()),
                    ])
                })
                .collect()
        }
        Distribution::Tensorflow { worker_count, .. } => {
            let workers = *worker_count as usize;
            let address = |i: usize| format!("{}:{}", hosts[i], TENSORFLOW_BASE_PORT as usize + i);
            let cluster = serde_json::json!({
                "worker": (0..workers.min(hosts.len())).map(address).collect::<Vec<_>>(),
                "ps": (workers..hosts.len()).map(address).collect::<Vec<_>>(),
            });
            (0..hosts.len())
                .map(|i| {
                    let (kind, index) = if i < workers {
                        ("worker", i)
                    } else {
                        ("ps", i - workers)
                    };
                    let config = serde_json::json!({
                        "cluster": cluster,
                        "task": {"type": kind, "index": index},
                    });
                    pairs(vec![("TF_CONFIG", config.to_string())])
                })
                .collect()
        }
    }
}

/// `job-12.3` -> `job-12`.
pub fn job_of_attempt(attempt_id: &str) -> Option<&str> {
    attempt_id.rsplit_once('.').map(|(job, _)| job)
}

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

mod assets;
mod history;
mod identities;
pub mod ownership;
mod parallel;
pub use ownership::{AgentCall, Claim, Granted};

pub use parallel::{Leased, MiniBatchResult, PARALLEL_RELEASE, WorkReply, WorkRequest};

#[cfg(test)]
mod tests;

#[cfg(test)]
mod distribution_tests {
    use super::*;
    use crate::testing::JobBuilder;

    #[test]
    fn pytorch_env_names_master_world_and_node_rank() {
        let mut job = JobBuilder::new("job-1").instances(2).build();
        job.spec.distribution = Some(Distribution::Pytorch {
            process_count_per_instance: 4,
        });
        job.spec
            .environment_variables
            .insert("MASTER_PORT".into(), "7000".into());
        let hosts = vec!["a".to_string(), "b".to_string()];
        let env = distribution_env(&job.spec, &hosts);
        let second: BTreeMap<_, _> = env[1].iter().cloned().collect();
        assert_eq!(second["MASTER_ADDR"], "a");
        assert_eq!(second["MASTER_PORT"], "7000", "the job's own port wins");
        assert_eq!(second["WORLD_SIZE"], "8");
        assert_eq!(second["NODE_RANK"], "1");
        assert_eq!(second["LOCAL_WORLD_SIZE"], "4");
    }

    #[test]
    fn tensorflow_env_lists_workers_then_parameter_servers() {
        let mut job = JobBuilder::new("job-1").instances(3).build();
        job.spec.distribution = Some(Distribution::Tensorflow {
            worker_count: 2,
            parameter_server_count: 1,
        });
        let hosts = vec!["h".to_string(); 3];
        let env = distribution_env(&job.spec, &hosts);
        let config: serde_json::Value = serde_json::from_str(&env[2][0].1).expect("json");
        assert_eq!(
            config["task"],
            serde_json::json!({"type": "ps", "index": 0})
        );
        assert_eq!(
            config["cluster"]["worker"],
            serde_json::json!(["h:2222", "h:2223"])
        );
        assert_eq!(config["cluster"]["ps"], serde_json::json!(["h:2224"]));
    }
}
