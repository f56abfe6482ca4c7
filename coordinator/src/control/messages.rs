//! What goes in and out of the control core: the commands API handlers and
//! agent sessions send it, what it tells agents, and what it answers with.

use super::*;

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
    /// What its environment is written from (`LaunchEnv::into_vars`, when the
    /// order is put on the wire).
    pub env: Box<LaunchEnv>,
    pub timeout_seconds: Option<u64>,
    pub has_code: bool,
    pub image: Option<String>,
    /// A rerun: the instance starts from the outputs of the last attempt.
    pub restore_outputs: bool,
    /// GPUs the agent assigns to it.
    pub gpus: u32,
    /// Its share of the node's cores and memory, which the agent enforces.
    pub share: Resources,
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
    /// A successor: the node starts it once its instance `after` has ended.
    pub after: Option<Slot>,
}

impl LaunchOrder {
    /// No one waits on one array task's end (an array's progress may read a
    /// moment late): when its successor starts at once, its node may hold the
    /// end back to send it with what follows. A single job's end leaves at once.
    pub fn end_may_wait(&self) -> bool {
        self.env.task.is_some()
    }
}

#[cfg(test)]
impl LaunchOrder {
    /// The instance's variables, as its node is sent them (for the machine tests).
    pub fn environment(&self) -> BTreeMap<String, String> {
        self.env.clone().into_vars(&self.job_id, &self.slot)
    }
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
    /// The GPUs it holds while it runs (its agent chose them): a coordinator
    /// that restarted before it committed the instance's start learns them here.
    pub gpus: Vec<u32>,
    /// A successor its agent holds until its predecessor ends: wanted, not started.
    pub held: bool,
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

pub(super) type Reply<T> = oneshot::Sender<Result<T>>;

#[derive(Debug)]
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
    /// The sweeps still making trials (their records).
    RunningSweeps(Reply<Vec<Job>>),
    /// Pipelines' parallel steps whose input step has completed, to be cut.
    StepsToCut(Reply<Vec<super::pipelines::CutOrder>>),
    /// A parallel step's input cut (or why it could not be).
    StepCut {
        id: String,
        index: u32,
        cuts: std::result::Result<Vec<crate::parallel::Cut>, String>,
        reply: Reply<()>,
    },
    /// A conductor's plan for one sweep, applied in one commit.
    StepSweep {
        id: String,
        plan: crate::sweep::Plan,
        reply: Reply<()>,
    },
    ListNodes(Option<String>, Reply<Vec<Node>>),
    /// Locks a cluster (None: unlocks it).
    LockCluster {
        cluster: String,
        kind: Option<LockKind>,
        reply: Reply<ClusterInfo>,
    },
    /// Preempts a node now, with this notice (None: the configured one).
    PreemptNode {
        node_id: String,
        notice_seconds: Option<u64>,
        reply: Reply<Node>,
    },
    /// An agent joins a cluster with a join token: as a new node (started by
    /// hand), or as the node a provider made the token for (`node_id`).
    JoinNode {
        cluster: String,
        node_id: Option<String>,
        hostname: String,
        cores: u32,
        memory_bytes: u64,
        reply: Reply<Node>,
    },
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
    CreateComponent(Box<crate::model::Component>, Reply<crate::model::Component>),
    GetComponent {
        name: String,
        version: Option<String>,
        reply: Reply<crate::model::Component>,
    },
    ListComponents(Reply<Vec<crate::model::Component>>),
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
    /// The agent is stopping on its own (its machine or allocation is ending).
    AgentLeaving {
        node_id: String,
        reason: String,
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
        handle: String,
    },
    /// A provider's word on a node coming up (a Slurm allocation's pending reason).
    NodeNote {
        node_id: String,
        note: String,
    },
    /// The node ended by itself (or never started); `preempted`: its owner took
    /// it back, so its work is requeued without counting an attempt.
    NodeFailed {
        node_id: String,
        error: String,
        preempted: bool,
    },
    NodeRemoved {
        node_id: String,
    },
}
