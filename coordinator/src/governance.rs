//! Cost and governance: core quotas (dedicated per VM family, low-priority for the
//! whole deployment, and a total) and what blocks a cluster from growing, as pure
//! functions of the nodes, the catalog and the limits.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::model::{Cluster, LockKind, Node, Priority};
use crate::vmsize::Catalog;

/// Core limits. Usage counts the cores of allocated nodes (preparing, idle, running,
/// leaving, preempted: a node counts until it is gone).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Quotas {
    /// Dedicated cores per VM family; families not listed get `default_family_cores`.
    #[serde(default)]
    pub family_cores: BTreeMap<String, u32>,
    #[serde(default = "default_family")]
    pub default_family_cores: u32,
    #[serde(default = "default_low_priority")]
    pub low_priority_cores: u32,
    #[serde(default = "default_total")]
    pub total_cores: u32,
}

fn default_family() -> u32 {
    200
}
fn default_low_priority() -> u32 {
    200
}
fn default_total() -> u32 {
    400
}

impl Default for Quotas {
    fn default() -> Self {
        Quotas {
            family_cores: BTreeMap::new(),
            default_family_cores: default_family(),
            low_priority_cores: default_low_priority(),
            total_cores: default_total(),
        }
    }
}

impl Quotas {
    pub fn family_limit(&self, family: &str) -> u32 {
        self.family_cores
            .get(family)
            .copied()
            .unwrap_or(self.default_family_cores)
    }
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Usage {
    /// Dedicated cores per family.
    pub family: BTreeMap<String, u32>,
    pub low_priority: u32,
    pub total: u32,
}

/// Cores in use now, by scope: every node that exists, a node out of contact
/// too (it may come back, and its machine is still there until it is removed),
/// but not one that failed.
pub fn usage(clusters: &BTreeMap<String, Cluster>, nodes: &[&Node], catalog: &Catalog) -> Usage {
    let mut used = Usage::default();
    for node in nodes
        .iter()
        .filter(|n| n.state != crate::model::NodeState::Unusable || n.lost_contact)
    {
        let Some(cluster) = clusters.get(&node.cluster) else {
            continue;
        };
        used.total += node.cores;
        match cluster.spec.vm_priority {
            Priority::LowPriority => used.low_priority += node.cores,
            Priority::Dedicated => {
                let family = catalog
                    .get(&cluster.spec.vm_size)
                    .map(|s| s.family.clone())
                    .unwrap_or_default();
                *used.family.entry(family).or_default() += node.cores;
            }
        }
    }
    used
}

/// How many more nodes of `cores` cores the quotas allow for a cluster of this
/// family and tier, and, when that is fewer than `wanted`, which quota says so.
/// What keeps a cluster from growing: a value in the loop, words at the edge.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Block {
    /// Locked read-only.
    Locked { cluster: String },
    /// A quota has no room for one more node.
    Quota {
        /// `family NAME`, `low-priority` or `total`.
        scope: String,
        used: u32,
        limit: u32,
        node_cores: u32,
    },
}

impl std::fmt::Display for Block {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Block::Locked { cluster } => write!(
                f,
                "cluster locked read-only; `shoal cluster unlock {cluster}` lets it scale"
            ),
            Block::Quota {
                scope,
                used,
                limit,
                node_cores,
            } => write!(
                f,
                "quota: {scope} {used}/{limit} cores used; a node needs {node_cores}"
            ),
        }
    }
}

pub fn room(
    quotas: &Quotas,
    used: &Usage,
    family: &str,
    priority: Priority,
    cores: u32,
    wanted: u32,
) -> (u32, Option<Block>) {
    let cores = cores.max(1);
    let (scope, limit, in_use) = match priority {
        Priority::Dedicated => (
            format!("family {family}"),
            quotas.family_limit(family),
            used.family.get(family).copied().unwrap_or(0),
        ),
        Priority::LowPriority => (
            "low-priority".to_string(),
            quotas.low_priority_cores,
            used.low_priority,
        ),
    };
    let by_scope = limit.saturating_sub(in_use) / cores;
    let by_total = quotas.total_cores.saturating_sub(used.total) / cores;
    let fits = by_scope.min(by_total);
    if fits >= wanted {
        return (wanted, None);
    }
    let why = if by_scope <= by_total {
        Block::Quota {
            scope,
            used: in_use,
            limit,
            node_cores: cores,
        }
    } else {
        Block::Quota {
            scope: "total".into(),
            used: used.total,
            limit: quotas.total_cores,
            node_cores: cores,
        }
    };
    (fits, Some(why))
}

/// Tracks low GPU utilization: returns when it has been low since (None: it is not)
/// and whether it has now been low for `after` milliseconds or more.
pub fn idle_gpu(
    low_since: Option<i64>,
    utilization_percent: f64,
    threshold_percent: f64,
    now: i64,
    after: i64,
) -> (Option<i64>, bool) {
    if utilization_percent >= threshold_percent {
        return (None, false);
    }
    let since = low_since.unwrap_or(now);
    (Some(since), now - since >= after)
}

/// What stops a cluster from scaling at all.
pub fn lock_block(cluster: &Cluster) -> Option<Block> {
    (cluster.lock == Some(LockKind::ReadOnly)).then(|| Block::Locked {
        cluster: cluster.spec.name.clone(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::{ClusterBuilder, NodeBuilder};

    fn clusters(priority: Priority) -> BTreeMap<String, Cluster> {
        let mut spec = ClusterBuilder::new("c").build();
        spec.vm_priority = priority;
        spec.vm_size = "Standard_D3_v2".into();
        BTreeMap::from([(
            "c".to_string(),
            Cluster {
                spec,
                created_at: 0,
                errors: vec![],
                lock: None,
                identities: vec![],
            },
        )])
    }

    fn four_core_nodes(n: usize) -> Vec<Node> {
        (0..n)
            .map(|i| {
                let mut node = NodeBuilder::new(&format!("n{i}")).build();
                node.cores = 4;
                node
            })
            .collect()
    }

    #[test]
    fn family_quota_caps_dedicated_nodes_and_names_itself() {
        let catalog = Catalog::default();
        let quotas = Quotas {
            family_cores: BTreeMap::from([("standardDv2Family".to_string(), 8)]),
            ..Quotas::default()
        };
        let nodes = four_core_nodes(2);
        let refs: Vec<&Node> = nodes.iter().collect();
        let used = usage(&clusters(Priority::Dedicated), &refs, &catalog);
        assert_eq!(used.family.get("standardDv2Family"), Some(&8));
        let (fits, why) = room(
            &quotas,
            &used,
            "standardDv2Family",
            Priority::Dedicated,
            4,
            1,
        );
        assert_eq!(fits, 0);
        assert_eq!(
            why.map(|b| b.to_string()).as_deref(),
            Some("quota: family standardDv2Family 8/8 cores used; a node needs 4")
        );
        let (fits, why) = room(
            &quotas,
            &Usage::default(),
            "standardDv2Family",
            Priority::Dedicated,
            4,
            3,
        );
        assert_eq!((fits, why.is_some()), (2, true), "two of three fit");
    }

    #[test]
    fn low_priority_and_total_quotas_apply_too() {
        let catalog = Catalog::default();
        let quotas = Quotas {
            low_priority_cores: 4,
            total_cores: 100,
            ..Quotas::default()
        };
        let nodes = four_core_nodes(1);
        let refs: Vec<&Node> = nodes.iter().collect();
        let used = usage(&clusters(Priority::LowPriority), &refs, &catalog);
        let (fits, why) = room(&quotas, &used, "x", Priority::LowPriority, 4, 1);
        assert_eq!(fits, 0);
        assert!(why.is_some_and(|w| w.to_string().starts_with("quota: low-priority 4/4")));
        let tight = Quotas {
            total_cores: 4,
            ..Quotas::default()
        };
        let (fits, why) = room(&tight, &used, "x", Priority::Dedicated, 4, 1);
        assert_eq!(fits, 0);
        assert!(why.is_some_and(|w| w.to_string().starts_with("quota: total 4/4")));
    }

    #[test]
    fn idle_gpu_is_flagged_exactly_after_the_configured_time() {
        let after = 600_000;
        let (since, idle) = idle_gpu(None, 2.0, 5.0, 1_000, after);
        assert_eq!((since, idle), (Some(1_000), false));
        let (since, idle) = idle_gpu(since, 4.9, 5.0, 1_000 + after - 1, after);
        assert_eq!((since, idle), (Some(1_000), false), "one millisecond early");
        let (_, idle) = idle_gpu(since, 0.0, 5.0, 1_000 + after, after);
        assert!(idle, "exactly at the configured time");
        // Busy again: the clock starts over.
        let (since, idle) = idle_gpu(since, 60.0, 5.0, 1_000 + after + 1, after);
        assert_eq!((since, idle), (None, false));
    }

    #[test]
    fn only_a_read_only_lock_blocks_scaling() {
        let mut cluster = clusters(Priority::Dedicated).remove("c").expect("cluster");
        assert!(lock_block(&cluster).is_none());
        cluster.lock = Some(LockKind::CannotDelete);
        assert!(lock_block(&cluster).is_none());
        cluster.lock = Some(LockKind::ReadOnly);
        assert_eq!(
            lock_block(&cluster).map(|b| b.to_string()).as_deref(),
            Some("cluster locked read-only; `shoal cluster unlock c` lets it scale")
        );
    }

    proptest::proptest! {
        /// Creating what `room` allows never takes usage past a limit.
        #[test]
        fn room_never_exceeds_a_quota(
            family_limit in 0u32..64, total in 0u32..96, used_family in 0u32..64,
            used_total_extra in 0u32..32, cores in 1u32..9, wanted in 0u32..20,
        ) {
            let quotas = Quotas {
                family_cores: BTreeMap::from([("f".to_string(), family_limit)]),
                total_cores: total,
                ..Quotas::default()
            };
            let used = Usage {
                family: BTreeMap::from([("f".to_string(), used_family)]),
                low_priority: 0,
                total: used_family + used_total_extra,
            };
            let (fits, _) = room(&quotas, &used, "f", Priority::Dedicated, cores, wanted);
            proptest::prop_assert!(fits <= wanted);
            if fits > 0 {
                proptest::prop_assert!(used_family + fits * cores <= family_limit);
                proptest::prop_assert!(used.total + fits * cores <= total);
            }
        }
    }
}
