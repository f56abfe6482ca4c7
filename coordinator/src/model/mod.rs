//! Domain types: clusters, nodes, jobs and attempts, and the rules that check a
//! user's input before anything is stored. Wire types never leak in here.

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::vmsize::Catalog;
use crate::{Error, Result};

/// Unix milliseconds: the one clock unit of the model (0 = not yet).
pub type Millis = i64;

/// Whether a stored field holds its default, and is left out of the row
/// (`skip_serializing_if`; `#[serde(default)]` reads it back).
pub(crate) fn is_zero<T: Default + PartialEq>(value: &T) -> bool {
    *value == T::default()
}

pub fn now_ms() -> Millis {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as Millis)
        .unwrap_or(0)
}

/// Time limits (job timeout, idle timeout) above a year are refused: they are typos,
/// and they would overflow clock arithmetic.
pub const MAX_TIMEOUT_SECONDS: u64 = 366 * 24 * 3600;
/// Processes one instance of a distributed job may run.
pub const MAX_PROCESSES_PER_INSTANCE: u32 = 1024;

/// A cluster has at most this many nodes with inter-node communication on.
pub const MAX_NODES_WITH_INTERNODE: u32 = 100;
/// ... and at most this many with it off.
pub const MAX_NODES_WITHOUT_INTERNODE: u32 = 4000;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Priority {
    Dedicated,
    #[serde(alias = "low_priority")]
    LowPriority,
}

impl Priority {
    pub fn parse(text: &str) -> Result<Self> {
        match text.to_ascii_lowercase().as_str() {
            "" | "dedicated" => Ok(Priority::Dedicated),
            "lowpriority" | "low_priority" | "low-priority" => Ok(Priority::LowPriority),
            other => Err(Error::invalid(
                "vm_priority",
                format!("`{other}` is neither `dedicated` nor `lowpriority`"),
            )),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Priority::Dedicated => "dedicated",
            Priority::LowPriority => "lowpriority",
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ProviderKind {
    #[default]
    Local,
    Docker,
    /// An agent started by hand on its own machine, joined with a join token.
    Joined,
    /// Each node a Slurm allocation (`sbatch`) running `shoal agent`.
    Slurm,
    /// Each node made and removed by the user's own scripts (any cloud CLI, IPMI).
    Command,
}

impl ProviderKind {
    pub fn parse(text: &str) -> Result<Self> {
        match text.to_ascii_lowercase().as_str() {
            "" | "local" => Ok(ProviderKind::Local),
            "docker" => Ok(ProviderKind::Docker),
            "slurm" => Ok(ProviderKind::Slurm),
            "command" => Ok(ProviderKind::Command),
            other => Err(Error::invalid(
                "provider",
                format!(
                    "unknown provider `{other}`; the providers are: local, docker, slurm, command"
                ),
            )),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ProviderKind::Local => "local",
            ProviderKind::Docker => "docker",
            ProviderKind::Joined => "joined",
            ProviderKind::Slurm => "slurm",
            ProviderKind::Command => "command",
        }
    }

    /// Nodes whose agents run on other machines, started with a one-use join token.
    pub fn is_remote(self) -> bool {
        matches!(self, ProviderKind::Slurm | ProviderKind::Command)
    }

    /// Checks a cluster's `provider_settings` for this provider: known keys only,
    /// the required ones present, paths absolute.
    pub fn check_settings(self, settings: &BTreeMap<String, String>) -> Result<()> {
        let (known, required): (&[&str], &[&str]) = match self {
            ProviderKind::Slurm => (SLURM_SETTINGS, &[]),
            ProviderKind::Command => (COMMAND_SETTINGS, &["create", "delete"]),
            ProviderKind::Local | ProviderKind::Docker | ProviderKind::Joined => (&[], &[]),
        };
        for key in settings.keys() {
            if !known.contains(&key.as_str()) {
                let expected = if known.is_empty() {
                    format!("the `{}` provider takes no settings", self.as_str())
                } else {
                    format!(
                        "the `{}` provider's settings are: {}",
                        self.as_str(),
                        known.join(", ")
                    )
                };
                return Err(Error::invalid(
                    "provider_settings",
                    format!("unknown setting `{key}`; {expected}"),
                ));
            }
        }
        for key in required {
            if settings.get(*key).is_none_or(|v| v.trim().is_empty()) {
                return Err(Error::invalid(
                    "provider_settings",
                    format!(
                        "the `{}` provider needs `{key}` (the path of a script; `shoal cluster create --help` shows what it is given)",
                        self.as_str()
                    ),
                ));
            }
        }
        for key in ["create", "delete", "list", "agent_program", "work_dir"] {
            if let Some(path) = settings.get(key)
                && !std::path::Path::new(path).is_absolute()
            {
                return Err(Error::invalid(
                    "provider_settings",
                    format!("`{key}` must be an absolute path, not `{path}`"),
                ));
            }
        }
        if let Some(args) = settings.get("sbatch_args")
            && shlex::split(args).is_none()
        {
            return Err(Error::invalid(
                "provider_settings",
                format!("`sbatch_args` is not a shell word list: {args}"),
            ));
        }
        Ok(())
    }
}

/// The slurm provider's settings: where and as whom allocations are asked for
/// (`sbatch --partition --account --qos --time`, then `sbatch_args` as written),
/// and where the `shoal` binary and the agents' work dirs are on its machines.
pub const SLURM_SETTINGS: &[&str] = &[
    "partition",
    "account",
    "qos",
    "time_limit",
    "sbatch_args",
    "agent_program",
    "work_dir",
];

/// The command provider's settings: the scripts that make, remove and list nodes.
pub const COMMAND_SETTINGS: &[&str] = &["create", "delete", "list"];

mod cluster;
mod identity;
mod job;
mod node;
pub use cluster::*;
pub use identity::*;
pub use job::*;
pub use node::*;

#[cfg(test)]
mod tests {
    use super::*;

    fn request(name: &str) -> ClusterRequest {
        ClusterRequest {
            name: name.into(),
            vm_size: "standard_d2_v2".into(),
            ..Default::default()
        }
    }

    #[test]
    fn cluster_defaults_match_the_managed_service() {
        let spec =
            ClusterSpec::from_request(request("cpu-cluster"), &Catalog::default()).expect("valid");
        assert_eq!((spec.min_nodes, spec.max_nodes), (0, 4));
        assert_eq!(spec.idle_seconds_before_scaledown, 120);
        assert_eq!(spec.vm_priority, Priority::Dedicated);
        assert_eq!(spec.vm_size, "Standard_D2_v2");
        assert!(spec.internode_communication);
    }

    #[test]
    fn bad_cluster_names_are_refused() {
        for bad in ["a", "1abc", "has_underscore", "seventeen-chars-x", "sp ace"] {
            let err = ClusterSpec::from_request(request(bad), &Catalog::default()).unwrap_err();
            assert!(err.to_string().starts_with("invalid name"), "{bad}: {err}");
        }
    }

    #[test]
    fn node_cap_depends_on_internode_communication() {
        let mut req = request("big");
        req.max_nodes = Some(101);
        let err = ClusterSpec::from_request(req.clone(), &Catalog::default()).unwrap_err();
        assert!(err.to_string().contains("max_nodes"), "{err}");
        req.internode_communication = Some(false);
        assert!(ClusterSpec::from_request(req, &Catalog::default()).is_ok());
    }

    #[test]
    fn immutable_fields_refuse_updates() {
        let spec = ClusterSpec::from_request(request("c1"), &Catalog::default()).expect("valid");
        let update = ClusterUpdate {
            vm_size: Some("Standard_D3_v2".into()),
            ..Default::default()
        };
        let err = spec.apply(&update).unwrap_err();
        assert!(err.to_string().contains("vm_size"), "{err}");
        let update = ClusterUpdate {
            min_nodes: Some(9),
            ..Default::default()
        };
        assert!(
            spec.apply(&update)
                .unwrap_err()
                .to_string()
                .contains("min_nodes")
        );
    }

    #[test]
    fn absurd_numbers_are_refused_not_overflowed() {
        let catalog = Catalog::default();
        let cluster = ClusterSpec::from_request(request("c1"), &catalog).expect("valid");
        let size = catalog.get(&cluster.vm_size).expect("a known size");
        let forever = JobRequest {
            command: "true".into(),
            timeout_seconds: u64::MAX,
            ..Default::default()
        };
        let err = JobSpec::from_request(forever, &cluster, size).unwrap_err();
        assert!(err.to_string().contains("limits.timeout"), "{err}");
        let ranks = JobRequest {
            command: "true".into(),
            distribution: Some(Distribution::Pytorch {
                process_count_per_instance: u32::MAX,
            }),
            ..Default::default()
        };
        let err = JobSpec::from_request(ranks, &cluster, size).unwrap_err();
        assert!(
            err.to_string().contains("process_count_per_instance"),
            "{err}"
        );
        let tasks = JobRequest {
            command: "true".into(),
            distribution: Some(Distribution::Tensorflow {
                worker_count: u32::MAX,
                parameter_server_count: u32::MAX,
            }),
            ..Default::default()
        };
        let err = JobSpec::from_request(tasks, &cluster, size).unwrap_err();
        assert!(err.to_string().contains("instance_count"), "{err}");
        let mut idle = request("c2");
        idle.idle_seconds_before_scaledown = Some(u64::MAX);
        let err = ClusterSpec::from_request(idle, &Catalog::default()).unwrap_err();
        assert!(
            err.to_string().contains("idle_seconds_before_scaledown"),
            "{err}"
        );
    }

    #[test]
    fn job_needs_a_command_and_fits_the_cluster() {
        let catalog = Catalog::default();
        let cluster = ClusterSpec::from_request(request("c1"), &catalog).expect("valid");
        let size = catalog.get(&cluster.vm_size).expect("a known size");
        let empty = JobRequest::default();
        assert!(
            JobSpec::from_request(empty, &cluster, size)
                .unwrap_err()
                .to_string()
                .contains("command")
        );
        let too_wide = JobRequest {
            command: "true".into(),
            instance_count: 5,
            ..Default::default()
        };
        let err = JobSpec::from_request(too_wide, &cluster, size).unwrap_err();
        assert!(err.to_string().contains("instance_count"), "{err}");
        let shell = JobRequest {
            command: "echo hi".into(),
            ..Default::default()
        };
        let spec = JobSpec::from_request(shell, &cluster, size).expect("valid");
        assert_eq!(spec.argv, vec!["sh", "-c", "echo hi"]);
        assert_eq!(spec.instance_count, 1);
    }
}
