//! Clusters: what is asked for, what is kept, and the rules for both.

use super::*;

/// What a user asks for; `Option`s are "use the default".
#[derive(Clone, Debug, Default)]
pub struct ClusterRequest {
    pub name: String,
    pub vm_size: String,
    pub vm_priority: String,
    pub min_nodes: Option<u32>,
    pub max_nodes: Option<u32>,
    pub idle_seconds_before_scaledown: Option<u64>,
    pub description: String,
    pub tags: BTreeMap<String, String>,
    pub provider: String,
    /// The provider's own settings (slurm: partition, account, …; command: its scripts).
    pub provider_settings: BTreeMap<String, String>,
    pub internode_communication: Option<bool>,
    pub cancel_idle_gpu_jobs: Option<bool>,
    /// Managed identities its jobs may use: `[system]` (its own), user-assigned
    /// ones by name, client id or resource id.
    pub identities: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClusterSpec {
    pub name: String,
    pub vm_size: String,
    pub vm_priority: Priority,
    pub min_nodes: u32,
    pub max_nodes: u32,
    pub idle_seconds_before_scaledown: u64,
    pub description: String,
    pub tags: BTreeMap<String, String>,
    pub provider: ProviderKind,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub provider_settings: BTreeMap<String, String>,
    pub internode_communication: bool,
    /// Policy: cancel a job whose GPUs sit idle past the idle-GPU time.
    #[serde(default)]
    pub cancel_idle_gpu_jobs: bool,
}

impl ClusterSpec {
    /// Checks a request and fills in the defaults (min 0, max 4, idle 120 s, dedicated, local).
    pub fn from_request(request: ClusterRequest, catalog: &Catalog) -> Result<Self> {
        validate_cluster_name(&request.name)?;
        if request.vm_size.is_empty() {
            return Err(Error::invalid(
                "vm_size",
                "required; `shoal vm-size list` shows the sizes",
            ));
        }
        let size = catalog.resolve(&request.vm_size)?;
        let spec = ClusterSpec {
            name: request.name,
            vm_size: size.name.clone(),
            vm_priority: Priority::parse(&request.vm_priority)?,
            min_nodes: request.min_nodes.unwrap_or(0),
            max_nodes: request.max_nodes.unwrap_or(4),
            idle_seconds_before_scaledown: request.idle_seconds_before_scaledown.unwrap_or(120),
            description: request.description,
            tags: request.tags,
            provider: ProviderKind::parse(&request.provider)?,
            provider_settings: request.provider_settings,
            internode_communication: request.internode_communication.unwrap_or(true),
            cancel_idle_gpu_jobs: request.cancel_idle_gpu_jobs.unwrap_or(false),
        };
        spec.validate_sizes()?;
        spec.provider.check_settings(&spec.provider_settings)?;
        validate_tags(&spec.tags)?;
        Ok(spec)
    }

    /// The node-count rules, checked at creation and after every update.
    pub fn validate_sizes(&self) -> Result<()> {
        let cap = self.node_cap();
        if self.idle_seconds_before_scaledown > MAX_TIMEOUT_SECONDS {
            return Err(Error::invalid(
                "idle_seconds_before_scaledown",
                format!(
                    "{} s is more than a year; use min_nodes to keep nodes",
                    self.idle_seconds_before_scaledown
                ),
            ));
        }
        if self.max_nodes == 0 {
            return Err(Error::invalid("max_nodes", "must be at least 1"));
        }
        if self.min_nodes > self.max_nodes {
            return Err(Error::invalid(
                "min_nodes",
                format!(
                    "{} is above max_nodes {}; min_nodes must be <= max_nodes",
                    self.min_nodes, self.max_nodes
                ),
            ));
        }
        if self.max_nodes > cap {
            let why = if self.internode_communication {
                "the cap with internode_communication on; turn it off for up to 4000 nodes"
            } else {
                "the cap for a cluster"
            };
            return Err(Error::invalid(
                "max_nodes",
                format!("{} is above {cap}, {why}", self.max_nodes),
            ));
        }
        Ok(())
    }

    pub fn node_cap(&self) -> u32 {
        if self.internode_communication {
            MAX_NODES_WITH_INTERNODE
        } else {
            MAX_NODES_WITHOUT_INTERNODE
        }
    }

    /// Applies an update; the immutable fields are refused with a reason.
    pub fn apply(&self, update: &ClusterUpdate) -> Result<Self> {
        let immutable = [
            ("vm_size", update.vm_size.is_some()),
            ("vm_priority", update.vm_priority.is_some()),
            ("provider", update.provider.is_some()),
            (
                "internode_communication",
                update.internode_communication.is_some(),
            ),
        ];
        if let Some((field, _)) = immutable.iter().find(|(_, set)| *set) {
            return Err(Error::invalid(
                *field,
                "is fixed when the cluster is created; create a new cluster to change it",
            ));
        }
        let mut next = self.clone();
        if let Some(min) = update.min_nodes {
            next.min_nodes = min;
        }
        if let Some(max) = update.max_nodes {
            next.max_nodes = max;
        }
        if let Some(idle) = update.idle_seconds_before_scaledown {
            next.idle_seconds_before_scaledown = idle;
        }
        if let Some(description) = &update.description {
            next.description = description.clone();
        }
        next.tags.extend(update.set_tags.clone());
        if let Some(cancel) = update.cancel_idle_gpu_jobs {
            next.cancel_idle_gpu_jobs = cancel;
        }
        next.validate_sizes()?;
        validate_tags(&next.tags)?;
        Ok(next)
    }
}

#[derive(Clone, Debug, Default)]
pub struct ClusterUpdate {
    pub name: String,
    pub min_nodes: Option<u32>,
    pub max_nodes: Option<u32>,
    pub idle_seconds_before_scaledown: Option<u64>,
    pub description: Option<String>,
    pub set_tags: BTreeMap<String, String>,
    pub vm_size: Option<String>,
    pub vm_priority: Option<String>,
    pub provider: Option<String>,
    pub internode_communication: Option<bool>,
    pub cancel_idle_gpu_jobs: Option<bool>,
}

/// The instance count a job gets, once its distribution checks out.
pub(super) fn check_distribution(request: &JobRequest, cluster: &ClusterSpec) -> Result<u32> {
    let asked = request.instance_count;
    let Some(distribution) = &request.distribution else {
        return Ok(asked.max(1));
    };
    if !cluster.internode_communication {
        return Err(Error::invalid(
            "distribution",
            format!(
                "cluster `{}` has internode_communication off, so its nodes cannot talk to each other; run {} jobs on a cluster created with --internode-communication true",
                cluster.name,
                distribution.kind()
            ),
        ));
    }
    match distribution {
        Distribution::Pytorch {
            process_count_per_instance,
        }
        | Distribution::Mpi {
            process_count_per_instance,
        } if !(1..=MAX_PROCESSES_PER_INSTANCE).contains(process_count_per_instance) => {
            Err(Error::invalid(
                "distribution.process_count_per_instance",
                format!("must be 1 to {MAX_PROCESSES_PER_INSTANCE}"),
            ))
        }
        Distribution::Pytorch { .. } | Distribution::Mpi { .. } => Ok(asked.max(1)),
        Distribution::Tensorflow {
            worker_count,
            parameter_server_count,
        } => {
            if *worker_count == 0 {
                return Err(Error::invalid(
                    "distribution.worker_count",
                    "must be at least 1",
                ));
            }
            // Saturating: absurd counts are refused below, never an overflow.
            let tasks = worker_count.saturating_add(*parameter_server_count);
            if asked != 0 && asked != tasks {
                return Err(Error::invalid(
                    "resources.instance_count",
                    format!(
                        "{asked}, but worker_count {worker_count} + parameter_server_count {parameter_server_count} = {tasks}: one instance per task"
                    ),
                ));
            }
            Ok(tasks)
        }
    }
}

/// 2-16 characters: letters, digits and hyphens, starting with a letter.
pub fn validate_cluster_name(name: &str) -> Result<()> {
    let reason = if name.len() < 2 || name.len() > 16 {
        Some(format!("`{name}` must be 2 to 16 characters long"))
    } else if !name.starts_with(|c: char| c.is_ascii_alphabetic()) {
        Some(format!("`{name}` must start with a letter"))
    } else if !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
        Some(format!(
            "`{name}` may hold only letters, digits and hyphens"
        ))
    } else {
        None
    };
    match reason {
        Some(reason) => Err(Error::invalid("name", reason)),
        None => Ok(()),
    }
}

pub(super) fn validate_tags(tags: &BTreeMap<String, String>) -> Result<()> {
    if tags.len() > 50 {
        return Err(Error::invalid("tags", "at most 50 tags"));
    }
    if let Some(key) = tags.keys().find(|k| k.is_empty() || k.len() > 128) {
        return Err(Error::invalid(
            "tags",
            format!("key `{key}` must be 1 to 128 characters"),
        ));
    }
    Ok(())
}

/// A problem that stops a cluster from reaching its target: a value in the
/// core, words at the edge. Stored as its words (as it always was); read back,
/// they are `Said`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(into = "String", from = "String")]
pub enum ClusterError {
    /// What blocks its growth now (a lock, a quota); never stored, it is
    /// added when the cluster is read.
    Blocked(crate::governance::Block),
    /// A node failed to start or broke; new nodes wait `wait_seconds`.
    NodeFailed {
        node: String,
        why: String,
        wait_seconds: i64,
    },
    /// A node's agent stopped answering (it may come back).
    LostContact { node: String, why: String },
    /// Words, as stored by an earlier run.
    Said(String),
}

impl std::fmt::Display for ClusterError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ClusterError::Blocked(block) => write!(f, "scale-up blocked: {block}"),
            ClusterError::NodeFailed {
                node,
                why,
                wait_seconds,
            } => write!(f, "node {node}: {why} (new nodes wait {wait_seconds} s)"),
            ClusterError::LostContact { node, why } => write!(f, "node {node}: {why}"),
            ClusterError::Said(text) => f.write_str(text),
        }
    }
}

impl From<ClusterError> for String {
    fn from(error: ClusterError) -> String {
        error.to_string()
    }
}

impl From<String> for ClusterError {
    fn from(text: String) -> Self {
        ClusterError::Said(text)
    }
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Cluster {
    pub spec: ClusterSpec,
    pub created_at: Millis,
    /// Problems that stop the cluster from reaching its target (kept current).
    #[serde(default)]
    pub errors: Vec<ClusterError>,
    #[serde(default)]
    pub lock: Option<LockKind>,
    /// The managed identities its jobs may get tokens for; its own (system-assigned)
    /// one first. They live and die with the cluster.
    #[serde(default)]
    pub identities: Vec<ClusterIdentity>,
}
