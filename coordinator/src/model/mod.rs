//! Domain types: clusters, nodes, jobs and attempts, and the rules that check a
//! user's input before anything is stored. Wire types never leak in here.

use std::collections::BTreeMap;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::vmsize::Catalog;
use crate::{Error, Result};

/// Unix milliseconds: the one clock unit of the model (0 = not yet).
pub type Millis = i64;

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
}

impl ProviderKind {
    pub fn parse(text: &str) -> Result<Self> {
        match text.to_ascii_lowercase().as_str() {
            "" | "local" => Ok(ProviderKind::Local),
            "docker" => Ok(ProviderKind::Docker),
            "static" | "command" => Err(Error::invalid(
                "provider",
                format!(
                    "the `{text}` provider is not available in this build yet; use `local` or `docker`"
                ),
            )),
            other => Err(Error::invalid(
                "provider",
                format!("unknown provider `{other}`; the providers are: local, docker"),
            )),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            ProviderKind::Local => "local",
            ProviderKind::Docker => "docker",
            ProviderKind::Joined => "joined",
        }
    }
}

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
