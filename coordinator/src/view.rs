//! The JSON shapes people and scripts see (`-o json`, the HTTP API): snake_case
//! fields, RFC 3339 times, built from the wire types so both APIs print the same.

use std::collections::BTreeMap;
use std::time::{Duration, UNIX_EPOCH};

use serde::Serialize;
use shoal_proto::v1 as pb;

/// RFC 3339 for a Unix-millisecond time; None for "not yet".
pub fn time(ms: i64) -> Option<String> {
    (ms > 0).then(|| {
        humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms as u64)).to_string()
    })
}

#[derive(Serialize)]
pub struct NodeStateCounts {
    pub idle: u32,
    pub running: u32,
    pub preparing: u32,
    pub leaving: u32,
    pub preempted: u32,
    pub unusable: u32,
}

#[derive(Serialize)]
pub struct Cluster {
    pub name: String,
    pub vm_size: String,
    pub vm_priority: String,
    pub min_nodes: u32,
    pub max_nodes: u32,
    pub idle_seconds_before_scaledown: u64,
    pub description: String,
    pub tags: BTreeMap<String, String>,
    pub provider: String,
    pub internode_communication: bool,
    pub allocation_state: String,
    pub current_node_count: u32,
    pub target_node_count: u32,
    pub node_state_counts: NodeStateCounts,
    pub errors: Vec<String>,
    pub lock: Option<String>,
    pub created_at: Option<String>,
}

impl From<&pb::Cluster> for Cluster {
    fn from(c: &pb::Cluster) -> Self {
        let counts = c.node_state_counts.unwrap_or_default();
        Cluster {
            name: c.name.clone(),
            vm_size: c.vm_size.clone(),
            vm_priority: c.vm_priority.clone(),
            min_nodes: c.min_nodes,
            max_nodes: c.max_nodes,
            idle_seconds_before_scaledown: c.idle_seconds_before_scaledown,
            description: c.description.clone(),
            tags: c.tags.clone().into_iter().collect(),
            provider: c.provider.clone(),
            internode_communication: c.internode_communication,
            allocation_state: c.allocation_state.clone(),
            current_node_count: c.current_node_count,
            target_node_count: c.target_node_count,
            node_state_counts: NodeStateCounts {
                idle: counts.idle,
                running: counts.running,
                preparing: counts.preparing,
                leaving: counts.leaving,
                preempted: counts.preempted,
                unusable: counts.unusable,
            },
            errors: c.errors.clone(),
            lock: (!c.lock.is_empty()).then(|| c.lock.clone()),
            created_at: time(c.created_at_ms),
        }
    }
}

#[derive(Serialize)]
pub struct Instance {
    pub index: u32,
    pub node: String,
    pub status: String,
    pub exit_code: Option<i32>,
    pub message: String,
}

impl From<&pb::Instance> for Instance {
    fn from(i: &pb::Instance) -> Self {
        Instance {
            index: i.index,
            node: i.node.clone(),
            status: i.status.clone(),
            exit_code: i.exit_code,
            message: i.message.clone(),
        }
    }
}

#[derive(Serialize)]
pub struct Attempt {
    pub id: String,
    pub number: u32,
    pub status: String,
    pub instances: Vec<Instance>,
    pub started_at: Option<String>,
    pub ended_at: Option<String>,
    pub reason: String,
}

#[derive(Serialize)]
pub struct Job {
    pub id: String,
    pub name: String,
    pub cluster: String,
    pub status: String,
    pub reason: String,
    pub command: String,
    pub argv: Vec<String>,
    pub environment_variables: BTreeMap<String, String>,
    pub instance_count: u32,
    pub timeout_seconds: Option<u64>,
    pub has_code: bool,
    pub image: Option<String>,
    pub preemptions: u32,
    pub max_preemptions: u32,
    /// The instances of the latest attempt.
    pub instances: Vec<Instance>,
    pub attempts: Vec<Attempt>,
    pub created_at: Option<String>,
    pub started_at: Option<String>,
    pub ended_at: Option<String>,
}

impl From<&pb::Job> for Job {
    fn from(j: &pb::Job) -> Self {
        let attempts: Vec<Attempt> = j
            .attempts
            .iter()
            .map(|a| Attempt {
                id: a.id.clone(),
                number: a.number,
                status: a.status.clone(),
                instances: a.instances.iter().map(Instance::from).collect(),
                started_at: time(a.started_at_ms),
                ended_at: time(a.ended_at_ms),
                reason: a.reason.clone(),
            })
            .collect();
        let instances = j
            .attempts
            .last()
            .map(|a| a.instances.iter().map(Instance::from).collect())
            .unwrap_or_default();
        Job {
            id: j.id.clone(),
            name: j.name.clone(),
            cluster: j.cluster.clone(),
            status: j.status.clone(),
            reason: j.reason.clone(),
            command: j.command.clone(),
            argv: j.argv.clone(),
            environment_variables: j.environment_variables.clone().into_iter().collect(),
            instance_count: j.instance_count,
            timeout_seconds: (j.timeout_seconds > 0).then_some(j.timeout_seconds),
            has_code: j.has_code,
            image: (!j.image.is_empty()).then(|| j.image.clone()),
            preemptions: j.preemptions,
            max_preemptions: j.max_preemptions,
            instances,
            attempts,
            created_at: time(j.created_at_ms),
            started_at: time(j.started_at_ms),
            ended_at: time(j.ended_at_ms),
        }
    }
}

#[derive(Serialize)]
pub struct Node {
    pub id: String,
    pub cluster: String,
    pub state: String,
    pub attempt_id: Option<String>,
    pub instance: Option<u32>,
    pub cores: u32,
    pub memory_bytes: u64,
    pub cpu_percent: f32,
    pub memory_used_bytes: u64,
    pub hostname: String,
    pub message: String,
    pub last_heartbeat: Option<String>,
    pub created_at: Option<String>,
}

impl From<&pb::Node> for Node {
    fn from(n: &pb::Node) -> Self {
        let busy = !n.attempt_id.is_empty();
        Node {
            id: n.id.clone(),
            cluster: n.cluster.clone(),
            state: n.state.clone(),
            attempt_id: busy.then(|| n.attempt_id.clone()),
            instance: busy.then_some(n.instance),
            cores: n.cores,
            memory_bytes: n.memory_bytes,
            cpu_percent: n.cpu_percent,
            memory_used_bytes: n.memory_used_bytes,
            hostname: n.hostname.clone(),
            message: n.message.clone(),
            last_heartbeat: time(n.last_heartbeat_ms),
            created_at: time(n.created_at_ms),
        }
    }
}

#[derive(Serialize)]
pub struct VmSize {
    pub name: String,
    pub cores: u32,
    pub memory_gib: f64,
    pub gpus: u32,
    pub gpu_model: String,
    pub family: String,
}

impl From<&pb::VmSize> for VmSize {
    fn from(s: &pb::VmSize) -> Self {
        VmSize {
            name: s.name.clone(),
            cores: s.cores,
            memory_gib: s.memory_gib,
            gpus: s.gpus,
            gpu_model: s.gpu_model.clone(),
            family: s.family.clone(),
        }
    }
}
