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
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub provider_settings: BTreeMap<String, String>,
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
            provider_settings: c.provider_settings.clone().into_iter().collect(),
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
    pub gpus: Vec<u32>,
    pub usage: Option<Usage>,
}

#[derive(Serialize)]
pub struct Usage {
    pub samples: u32,
    pub cpu_seconds: f64,
    pub gpu_utilization_avg_percent: f64,
    pub gpu_utilization_peak_percent: u32,
    pub gpu_memory_peak_bytes: u64,
    pub gpu_energy_joules: f64,
    pub gpu_utilization_percent: u32,
    pub gpu_memory_bytes: u64,
}

impl From<&pb::Usage> for Usage {
    fn from(u: &pb::Usage) -> Self {
        Usage {
            samples: u.samples,
            cpu_seconds: u.cpu_seconds,
            gpu_utilization_avg_percent: u.gpu_utilization_avg_percent,
            gpu_utilization_peak_percent: u.gpu_utilization_peak_percent,
            gpu_memory_peak_bytes: u.gpu_memory_peak_bytes,
            gpu_energy_joules: u.gpu_energy_joules,
            gpu_utilization_percent: u.gpu_utilization_percent,
            gpu_memory_bytes: u.gpu_memory_bytes,
        }
    }
}

#[derive(Serialize)]
pub struct Gpu {
    pub index: u32,
    pub uuid: String,
    pub model: String,
    pub utilization_percent: u32,
    pub memory_used_bytes: u64,
    pub memory_total_bytes: u64,
    pub temperature_c: u32,
    pub power_watts: f64,
    pub energy_joules: f64,
    pub process_ids: Vec<u32>,
}

impl From<&pb::GpuStat> for Gpu {
    fn from(g: &pb::GpuStat) -> Self {
        Gpu {
            index: g.index,
            uuid: g.uuid.clone(),
            model: g.model.clone(),
            utilization_percent: g.utilization_percent,
            memory_used_bytes: g.memory_used_bytes,
            memory_total_bytes: g.memory_total_bytes,
            temperature_c: g.temperature_c,
            power_watts: f64::from(g.power_milliwatts) / 1000.0,
            energy_joules: g.energy_millijoules as f64 / 1000.0,
            process_ids: g.process_ids.clone(),
        }
    }
}

impl From<&pb::Instance> for Instance {
    fn from(i: &pb::Instance) -> Self {
        Instance {
            index: i.index,
            node: i.node.clone(),
            status: i.status.clone(),
            exit_code: i.exit_code,
            message: i.message.clone(),
            gpus: i.gpus.clone(),
            usage: i.usage.as_ref().map(Usage::from),
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
    pub gpus_per_instance: u32,
    /// Each instance's cores and memory; None: a whole node each.
    pub cpus: Option<f64>,
    pub memory_bytes: Option<u64>,
    pub flags: Vec<String>,
    /// The instances of the latest attempt.
    pub instances: Vec<Instance>,
    pub attempts: Vec<Attempt>,
    pub created_at: Option<String>,
    pub started_at: Option<String>,
    pub ended_at: Option<String>,
    /// A parallel job's mini-batches.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub progress: Option<Progress>,
    /// A job array's own record: its tasks, counted by status.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub array: Option<ArrayView>,
    /// A task of an array.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub task: Option<TaskView>,
    /// A sweep's record: its search and its trials.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sweep: Option<SweepView>,
    /// A trial of a sweep.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub trial: Option<TrialOfView>,
    /// A pipeline's record: its steps.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pipeline: Option<PipelineView>,
    /// A step of a pipeline.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub step: Option<StepOfView>,
    /// Data inputs: name → {type, mode, uri}.
    pub inputs: BTreeMap<String, JobInput>,
    pub outputs: Vec<String>,
    /// Keys of its job file that have no effect here, and why.
    pub warnings: Vec<String>,
    pub experiment_name: String,
    pub description: String,
    pub tags: BTreeMap<String, String>,
    pub properties: BTreeMap<String, String>,
    pub environment: String,
}

#[derive(Debug, Serialize)]
pub struct JobInput {
    #[serde(rename = "type")]
    pub kind: String,
    pub mode: String,
    pub uri: String,
}

/// How far a parallel job is.
#[derive(Debug, Serialize)]
pub struct Progress {
    pub mini_batches: u32,
    pub done: u32,
    pub failed: u32,
    pub running: u32,
    pub items: u64,
    pub items_done: u64,
    pub items_per_second: f64,
    pub eta_seconds: Option<u64>,
    /// Mini-batch runs started, retries included.
    pub executions: u32,
    pub input: String,
    pub output: Option<String>,
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
            inputs: j
                .inputs
                .iter()
                .map(|(name, input)| {
                    (
                        name.clone(),
                        JobInput {
                            kind: input.r#type.clone(),
                            mode: input.mode.clone(),
                            uri: input.uri.clone(),
                        },
                    )
                })
                .collect(),
            outputs: j.outputs.clone(),
            warnings: j.warnings.clone(),
            experiment_name: j.experiment_name.clone(),
            description: j.description.clone(),
            tags: j.tags.clone().into_iter().collect(),
            properties: j.properties.clone().into_iter().collect(),
            environment: j.environment.clone(),
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
            gpus_per_instance: j.gpus_per_instance,
            cpus: (j.millicpus > 0).then(|| f64::from(j.millicpus) / 1000.0),
            memory_bytes: (j.memory_bytes > 0).then_some(j.memory_bytes),
            flags: j.flags.clone(),
            instances,
            attempts,
            progress: j.progress.as_ref().map(|p| Progress {
                mini_batches: p.total,
                done: p.done,
                failed: p.failed,
                running: p.running,
                items: p.items_total,
                items_done: p.items_done,
                items_per_second: (p.items_per_second * 10.0).round() / 10.0,
                eta_seconds: p.eta_seconds,
                executions: p.executions,
                input: j
                    .parallel
                    .as_ref()
                    .map(|x| x.input_name.clone())
                    .unwrap_or_default(),
                output: j
                    .parallel
                    .as_ref()
                    .filter(|x| !x.append_row_to.is_empty())
                    .map(|x| x.append_row_to.clone()),
            }),
            array: j.array.as_ref().map(|a| {
                let spec = a.spec.unwrap_or_default();
                ArrayView {
                    start: spec.start,
                    end: spec.end,
                    step: spec.step.max(1),
                    max_concurrent: spec.max_concurrent,
                    tasks: a.total,
                    counts: a.counts.clone().into_iter().collect(),
                    first_task_id: a.first_task_id.clone(),
                }
            }),
            task: j.task.as_ref().map(|t| TaskView {
                array_id: t.array_id.clone(),
                index: t.index,
            }),
            sweep: j.sweep.as_ref().map(|s| SweepView {
                primary_metric: s.primary_metric.clone(),
                goal: s.goal.clone(),
                sampling: s.sampling.clone(),
                max_total_trials: s.max_total_trials,
                max_concurrent_trials: s.max_concurrent_trials,
                early_termination: (!s.early_termination.is_empty())
                    .then(|| s.early_termination.clone()),
                best_trial: s
                    .best
                    .and_then(|b| s.trials.get(b as usize))
                    .map(|t| t.job_id.clone()),
                trials: s
                    .trials
                    .iter()
                    .map(|t| TrialView {
                        index: t.index,
                        id: t.job_id.clone(),
                        params: t.params.clone().into_iter().collect(),
                        status: t.status.clone(),
                        score: t.score,
                    })
                    .collect(),
            }),
            trial: j.trial.as_ref().map(|t| TrialOfView {
                sweep_id: t.sweep_id.clone(),
                index: t.index,
            }),
            pipeline: j.pipeline.as_ref().map(|p| PipelineView {
                continue_on_step_failure: p.continue_on_step_failure,
                outputs: p.outputs.clone().into_iter().collect(),
                steps: p
                    .steps
                    .iter()
                    .map(|s| StepView {
                        name: s.name.clone(),
                        id: (!s.job_id.is_empty()).then(|| s.job_id.clone()),
                        status: s.status.clone(),
                        after: s.after.clone(),
                        reason: (!s.reason.is_empty()).then(|| s.reason.clone()),
                    })
                    .collect(),
            }),
            step: j.step.as_ref().map(|s| StepOfView {
                pipeline_id: s.pipeline_id.clone(),
                name: s.name.clone(),
            }),
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
    pub gpus: Vec<Gpu>,
    pub gpu_reason: String,
    pub per_core_percent: Vec<f32>,
    pub disk_free_bytes: u64,
    pub disk_total_bytes: u64,
    pub network_rx_bytes: u64,
    pub network_tx_bytes: u64,
    /// What it runs, and the share each instance holds.
    pub allocations: Vec<Allocation>,
    /// What its provider calls it: a Slurm job id, a command node's address.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub provider_id: String,
}

#[derive(Serialize)]
pub struct Allocation {
    pub job_id: String,
    pub attempt_id: String,
    pub instance: u32,
    /// None: the whole node.
    pub cpus: Option<f64>,
    pub memory_bytes: Option<u64>,
    pub gpus: u32,
    /// A successor: it starts when this instance (`attempt#instance`) ends,
    /// and holds nothing before.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub after: Option<String>,
}

impl From<&pb::Allocation> for Allocation {
    fn from(a: &pb::Allocation) -> Self {
        Allocation {
            job_id: a.job_id.clone(),
            attempt_id: a.attempt_id.clone(),
            instance: a.instance,
            cpus: (a.millicpus > 0).then(|| f64::from(a.millicpus) / 1000.0),
            memory_bytes: (a.memory_bytes > 0).then_some(a.memory_bytes),
            gpus: a.gpus,
            after: (!a.after.is_empty()).then(|| a.after.clone()),
        }
    }
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
            gpus: n.gpus.iter().map(Gpu::from).collect(),
            gpu_reason: n.gpu_reason.clone(),
            per_core_percent: n.per_core_percent.clone(),
            disk_free_bytes: n.disk_free_bytes,
            disk_total_bytes: n.disk_total_bytes,
            network_rx_bytes: n.network_rx_bytes,
            network_tx_bytes: n.network_tx_bytes,
            allocations: n.allocations.iter().map(Allocation::from).collect(),
            provider_id: n.provider_id.clone(),
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

#[derive(Serialize)]
pub struct ArrayView {
    pub start: u32,
    pub end: u32,
    pub step: u32,
    /// 0: no limit.
    pub max_concurrent: u32,
    pub tasks: u32,
    /// Status → tasks.
    pub counts: BTreeMap<String, u32>,
    pub first_task_id: String,
}

#[derive(Serialize)]
pub struct TaskView {
    pub array_id: String,
    pub index: u32,
}

#[derive(Serialize)]
pub struct SweepView {
    pub primary_metric: String,
    pub goal: String,
    pub sampling: String,
    pub max_total_trials: u32,
    pub max_concurrent_trials: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub early_termination: Option<String>,
    /// The best trial's id: once the sweep has ended, or the best so far.
    pub best_trial: Option<String>,
    pub trials: Vec<TrialView>,
}

#[derive(Serialize)]
pub struct TrialView {
    pub index: u32,
    pub id: String,
    pub params: BTreeMap<String, String>,
    pub status: String,
    /// Its primary metric: the final value, or the latest while it runs.
    pub score: Option<f64>,
}

#[derive(Serialize)]
pub struct PipelineView {
    pub continue_on_step_failure: bool,
    /// Each pipeline output: the step output it is (`STEP.OUTPUT`).
    pub outputs: BTreeMap<String, String>,
    /// In an order where each step follows those it reads from.
    pub steps: Vec<StepView>,
}

#[derive(Serialize)]
pub struct StepView {
    pub name: String,
    /// Its job, once its inputs exist.
    pub id: Option<String>,
    /// Its job's status; `waiting` (not made yet) or `not run`.
    pub status: String,
    pub after: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
}

#[derive(Serialize)]
pub struct StepOfView {
    pub pipeline_id: String,
    pub name: String,
}

#[derive(Serialize)]
pub struct TrialOfView {
    pub sweep_id: String,
    pub index: u32,
}

/// A managed identity: `[system]` (a cluster's own) or user-assigned.
#[derive(Serialize)]
pub struct Identity {
    pub name: String,
    pub client_id: String,
    /// `SystemAssigned` or `UserAssigned`.
    #[serde(rename = "type")]
    pub kind: String,
}

impl From<&pb::IdentityInfo> for Identity {
    fn from(i: &pb::IdentityInfo) -> Self {
        Identity {
            name: i.name.clone(),
            client_id: i.client_id.clone(),
            kind: i.r#type.clone(),
        }
    }
}

#[derive(Serialize)]
pub struct ClusterIdentities {
    pub cluster: String,
    pub identities: Vec<Identity>,
}

impl From<&pb::ClusterIdentities> for ClusterIdentities {
    fn from(c: &pb::ClusterIdentities) -> Self {
        ClusterIdentities {
            cluster: c.cluster.clone(),
            identities: c.identities.iter().map(Identity::from).collect(),
        }
    }
}

/// A core quota: `family NAME`, `low-priority` or `total`.
#[derive(Serialize)]
pub struct QuotaLine {
    pub scope: String,
    pub limit: u32,
    pub used: u32,
    pub available: u32,
}

impl From<&pb::QuotaLine> for QuotaLine {
    fn from(l: &pb::QuotaLine) -> Self {
        QuotaLine {
            scope: l.scope.clone(),
            limit: l.limit,
            used: l.used,
            available: l.limit.saturating_sub(l.used),
        }
    }
}

/// An API token as listed (never its secret).
#[derive(Serialize)]
pub struct Token {
    pub id: String,
    pub role: String,
    pub name: String,
    pub revoked: bool,
    pub created_at: Option<String>,
}

impl From<&pb::TokenInfo> for Token {
    fn from(t: &pb::TokenInfo) -> Self {
        Token {
            id: t.id.clone(),
            role: t.role.clone(),
            name: t.name.clone(),
            revoked: t.revoked,
            created_at: time(t.created_at_ms),
        }
    }
}
