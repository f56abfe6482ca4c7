//! The one place where wire types meet domain types, in both directions.
//! Anything malformed becomes `Error::InvalidArgument` naming the field.

use std::time::Duration;

use shoal_proto::v1 as pb;

use crate::control::{AttemptReport, ClusterInfo, ExitReport, Registration, ToAgent};
use crate::model::{
    ClusterRequest, ClusterUpdate, Distribution, GpuStat, InstanceRun, Job, JobRequest, Node,
    NodeStats, Slot, Usage,
};
use crate::vmsize::VmSize;

pub fn cluster_request(spec: pb::ClusterSpec) -> ClusterRequest {
    ClusterRequest {
        name: spec.name,
        vm_size: spec.vm_size,
        vm_priority: spec.vm_priority,
        min_nodes: spec.min_nodes,
        max_nodes: spec.max_nodes,
        idle_seconds_before_scaledown: spec.idle_seconds_before_scaledown,
        description: spec.description,
        tags: spec.tags.into_iter().collect(),
        provider: spec.provider,
        provider_settings: spec.provider_settings.into_iter().collect(),
        internode_communication: spec.internode_communication,
        cancel_idle_gpu_jobs: spec.cancel_idle_gpu_jobs,
        identities: spec.identities,
    }
}

pub fn cluster_update(update: pb::ClusterUpdate) -> ClusterUpdate {
    ClusterUpdate {
        name: update.name,
        min_nodes: update.min_nodes,
        max_nodes: update.max_nodes,
        idle_seconds_before_scaledown: update.idle_seconds_before_scaledown,
        description: update.description,
        set_tags: update.set_tags.into_iter().collect(),
        vm_size: update.vm_size,
        vm_priority: update.vm_priority,
        provider: update.provider,
        internode_communication: update.internode_communication,
        cancel_idle_gpu_jobs: update.cancel_idle_gpu_jobs,
    }
}

/// A pipeline's record as people read it: steps made and live say "running"
/// here (the API puts in their jobs' own status).
pub fn pipeline_progress(state: &crate::model::PipelineState) -> pb::PipelineProgress {
    pb::PipelineProgress {
        steps: state
            .steps
            .iter()
            .map(|step| pb::StepSummary {
                name: step.name.clone(),
                job_id: step.seq.map(crate::control::job_id).unwrap_or_default(),
                status: match (&step.ended, &step.skipped, step.seq) {
                    (Some(status), _, _) => status.as_str().to_string(),
                    (None, Some(_), _) => "not run".into(),
                    (None, None, Some(_)) => "running".into(),
                    (None, None, None) => "waiting".into(),
                },
                after: step
                    .after
                    .iter()
                    .filter_map(|&a| state.steps.get(a as usize))
                    .map(|s| s.name.clone())
                    .collect(),
                reason: match (&step.skipped, step.reused) {
                    (Some(why), _) => why.clone(),
                    (None, true) => "reused: an identical step completed before".into(),
                    (None, false) => String::new(),
                },
            })
            .collect(),
        continue_on_step_failure: state.continue_on_step_failure,
        outputs: state
            .outputs
            .iter()
            .map(|(name, o)| (name.clone(), format!("{}.{}", o.step, o.output)))
            .collect(),
    }
}

/// A sweep's record as people read it: the trials' final scores (live trials'
/// latest ones are filled in by the API from tracking), and the best so far.
pub fn sweep_progress(state: &crate::model::SweepState) -> pb::SweepProgress {
    use crate::sweep::{Goal, Policy, Sampling, Slack, value_text};
    let spec = &state.spec;
    let policy = match &spec.early_termination {
        None => String::new(),
        Some(Policy::Bandit {
            slack,
            evaluation_interval,
            delay_evaluation,
        }) => {
            let slack = match slack {
                Slack::Factor(f) => format!("slack_factor {f}"),
                Slack::Amount(a) => format!("slack_amount {a}"),
            };
            format!(
                "bandit ({slack}, every {evaluation_interval} reports after {delay_evaluation})"
            )
        }
        Some(Policy::MedianStopping {
            evaluation_interval,
            delay_evaluation,
        }) => format!(
            "median stopping (every {evaluation_interval} reports after {delay_evaluation})"
        ),
        Some(Policy::TruncationSelection {
            truncation_percentage,
            evaluation_interval,
            delay_evaluation,
            ..
        }) => format!(
            "truncation selection ({truncation_percentage}%, every {evaluation_interval} reports after {delay_evaluation})"
        ),
    };
    let scored: Vec<(u32, f64)> = state
        .trials
        .iter()
        .enumerate()
        .filter_map(|(i, t)| t.score.map(|s| (i as u32, s)))
        .collect();
    pb::SweepProgress {
        primary_metric: spec.objective.primary_metric.clone(),
        goal: match spec.objective.goal {
            Goal::Maximize => "maximize",
            Goal::Minimize => "minimize",
        }
        .into(),
        sampling: match spec.sampling {
            Sampling::Random => "random",
            Sampling::Grid => "grid",
            Sampling::Bayesian => "bayesian",
        }
        .into(),
        max_total_trials: spec.max_total_trials,
        max_concurrent_trials: spec.max_concurrent_trials,
        early_termination: policy,
        trials: state
            .trials
            .iter()
            .enumerate()
            .map(|(index, t)| pb::TrialSummary {
                index: index as u32,
                job_id: crate::control::job_id(t.seq),
                params: t
                    .params
                    .iter()
                    .map(|(k, v)| (k.clone(), value_text(v)))
                    .collect(),
                status: t.ended.map_or("running", |s| s.as_str()).into(),
                score: t.score,
            })
            .collect(),
        best: state
            .best
            .or_else(|| crate::sweep::best(spec, &scored).map(|(i, _)| i)),
    }
}

/// The code bytes are taken out by the API first (they go to the artifact store).
pub fn job_request(spec: pb::JobSpec, code_path: Option<String>) -> crate::Result<JobRequest> {
    let distribution = spec.distribution.map(distribution).transpose()?;
    let parallel = spec.parallel.map(parallel).transpose()?;
    Ok(JobRequest {
        name: spec.name,
        cluster: spec.cluster,
        argv: spec.argv,
        command: spec.command,
        environment_variables: spec.environment_variables.into_iter().collect(),
        instance_count: spec.instance_count,
        timeout_seconds: spec.timeout_seconds,
        code_path,
        image: spec.image,
        max_preemptions: spec.max_preemptions,
        gpus_per_instance: spec.gpus_per_instance,
        resources: crate::model::Resources::share(spec.cpus, spec.memory_bytes)?,
        array: spec.array.as_ref().map(array_spec_from_wire),
        sweep: None,
        pipeline: None,
        distribution,
        parallel,
        extras: Default::default(),
    })
}

/// A parallel job's settings, checked, and its input cut into mini-batches.
fn parallel(
    wire: pb::Parallel,
) -> crate::Result<(crate::parallel::ParallelSpec, Vec<crate::parallel::Cut>)> {
    use crate::parallel::{BatchSize, DEFAULT_MAX_RETRIES, InputType, ParallelSpec};
    let input_type = InputType::parse(&wire.input_type)?;
    let size = match (wire.mini_batch_size, wire.mini_batch_bytes) {
        (0, 0) => {
            return Err(crate::Error::invalid(
                "mini_batch_size",
                "must be above 0 (items per mini-batch, or a size like 1mb)",
            ));
        }
        (n, 0) => BatchSize::Items(n),
        (0, bytes) => BatchSize::Bytes(bytes),
        _ => {
            return Err(crate::Error::invalid(
                "mini_batch_size",
                "give a count or a size, not both",
            ));
        }
    };
    let spec = ParallelSpec {
        input_type,
        input_name: wire.input_name,
        size,
        concurrency: wire.max_concurrency_per_instance.max(1),
        max_retries: wire.max_retries.unwrap_or(DEFAULT_MAX_RETRIES),
        timeout_seconds: (wire.mini_batch_timeout_seconds > 0)
            .then_some(wire.mini_batch_timeout_seconds),
        error_threshold: wire.mini_batch_error_threshold.unwrap_or(-1),
        allowed_failed_percent: wire.allowed_failed_percent.unwrap_or(100),
        append_row_to: (!wire.append_row_to.is_empty()).then_some(wire.append_row_to),
        worker_mode: wire.worker_mode,
        rows_output: (!wire.rows_output.is_empty()).then_some(wire.rows_output),
        item_error_threshold: wire.error_threshold,
        table: (input_type == InputType::Tabular).then(|| crate::parallel::TableSpec {
            delimiter: wire.delimiter.bytes().next().unwrap_or(b','),
            partition_keys: wire.partition_keys.clone(),
        }),
    };
    spec.check()?;
    let cuts = if wire.deferred {
        Vec::new()
    } else {
        crate::parallel::cut(&spec, &wire.input)?
    };
    Ok((spec, cuts))
}

pub fn parallel_to_wire(spec: &crate::parallel::ParallelSpec) -> pb::Parallel {
    use crate::parallel::BatchSize;
    let (mini_batch_size, mini_batch_bytes) = match spec.size {
        BatchSize::Items(n) => (n, 0),
        BatchSize::Bytes(n) => (0, n),
    };
    pb::Parallel {
        input_type: spec.input_type.as_str().into(),
        input: Vec::new(),
        mini_batch_size,
        mini_batch_bytes,
        max_concurrency_per_instance: spec.concurrency,
        max_retries: Some(spec.max_retries),
        mini_batch_timeout_seconds: spec.timeout_seconds.unwrap_or(0),
        mini_batch_error_threshold: Some(spec.error_threshold),
        allowed_failed_percent: Some(spec.allowed_failed_percent),
        append_row_to: spec.append_row_to.clone().unwrap_or_default(),
        input_name: spec.input_name.clone(),
        worker_mode: spec.worker_mode,
        rows_output: spec.rows_output.clone().unwrap_or_default(),
        deferred: false,
        delimiter: spec
            .table
            .as_ref()
            .map(|t| (t.delimiter as char).to_string())
            .unwrap_or_default(),
        partition_keys: spec
            .table
            .as_ref()
            .map(|t| t.partition_keys.clone())
            .unwrap_or_default(),
        error_threshold: spec.item_error_threshold,
    }
}

pub fn progress(p: &crate::parallel::Progress) -> pb::Progress {
    pb::Progress {
        total: p.total,
        done: p.done,
        failed: p.failed,
        running: p.running,
        items_total: p.items_total,
        items_done: p.items_done,
        items_per_second: p.items_per_second,
        eta_seconds: p.eta_seconds,
        executions: p.executions,
    }
}

/// The wire's distribution, checked: an unknown type is an error naming it.
pub fn distribution(d: pb::Distribution) -> crate::Result<Distribution> {
    match d.r#type.to_ascii_lowercase().as_str() {
        "pytorch" => Ok(Distribution::Pytorch {
            process_count_per_instance: d.process_count_per_instance,
        }),
        "tensorflow" => Ok(Distribution::Tensorflow {
            worker_count: d.worker_count,
            parameter_server_count: d.parameter_server_count,
        }),
        "mpi" => Ok(Distribution::Mpi {
            process_count_per_instance: d.process_count_per_instance,
        }),
        other => Err(crate::Error::invalid(
            "distribution.type",
            format!("`{other}` is not one of pytorch, tensorflow, mpi"),
        )),
    }
}

pub fn distribution_to_wire(d: &Distribution) -> pb::Distribution {
    match d {
        Distribution::Pytorch {
            process_count_per_instance,
        }
        | Distribution::Mpi {
            process_count_per_instance,
        } => pb::Distribution {
            r#type: d.kind().into(),
            process_count_per_instance: *process_count_per_instance,
            ..Default::default()
        },
        Distribution::Tensorflow {
            worker_count,
            parameter_server_count,
        } => pb::Distribution {
            r#type: d.kind().into(),
            worker_count: *worker_count,
            parameter_server_count: *parameter_server_count,
            ..Default::default()
        },
    }
}

pub fn cluster(info: &ClusterInfo) -> pb::Cluster {
    let spec = &info.cluster.spec;
    let counts = &info.counts;
    pb::Cluster {
        name: spec.name.clone(),
        vm_size: spec.vm_size.clone(),
        vm_priority: spec.vm_priority.as_str().into(),
        min_nodes: spec.min_nodes,
        max_nodes: spec.max_nodes,
        idle_seconds_before_scaledown: spec.idle_seconds_before_scaledown,
        description: spec.description.clone(),
        tags: spec.tags.clone().into_iter().collect(),
        provider: spec.provider.as_str().into(),
        provider_settings: spec.provider_settings.clone().into_iter().collect(),
        internode_communication: spec.internode_communication,
        allocation_state: if info.resizing { "resizing" } else { "steady" }.into(),
        current_node_count: info.current_node_count,
        target_node_count: info.target_node_count,
        node_state_counts: Some(pb::NodeStateCounts {
            idle: counts.idle,
            running: counts.running,
            preparing: counts.preparing,
            leaving: counts.leaving,
            preempted: counts.preempted,
            unusable: counts.unusable,
        }),
        errors: info
            .cluster
            .errors
            .iter()
            .map(ToString::to_string)
            .collect(),
        created_at_ms: info.cluster.created_at,
        lock: info
            .cluster
            .lock
            .map(|l| l.as_str().to_string())
            .unwrap_or_default(),
        cancel_idle_gpu_jobs: spec.cancel_idle_gpu_jobs,
    }
}

fn instance(run: &InstanceRun) -> pb::Instance {
    pb::Instance {
        index: run.index,
        node: run.node.clone(),
        status: run.status.as_str().into(),
        exit_code: run.exit_code,
        message: run.message.clone(),
        gpus: run.gpus.clone(),
        usage: run.usage.as_ref().map(usage),
    }
}

/// What a job logged (tracking), for the wire.
pub fn job_metrics(metrics: crate::tracking::JobMetrics) -> pb::JobMetrics {
    let point = |m: &crate::tracking::model::Metric| pb::MetricPoint {
        step: m.step,
        value: m.value,
        timestamp_ms: m.timestamp,
    };
    pb::JobMetrics {
        job_id: metrics.job_id,
        runs: metrics
            .runs
            .into_iter()
            .map(|run| pb::TrackedRun {
                run_id: run.run_id,
                run_name: run.run_name,
                experiment_id: run.experiment_id,
                status: run.status,
                start_ms: run.start_ms,
                end_ms: run.end_ms.unwrap_or_default(),
                params: run.params.into_iter().collect(),
                tags: run.tags.into_iter().collect(),
                metrics: run
                    .metrics
                    .iter()
                    .map(|series| pb::MetricSeries {
                        name: series.name.clone(),
                        latest: Some(point(&series.latest)),
                        points: series.points.iter().map(point).collect(),
                    })
                    .collect(),
                attempt_id: run.attempt_id,
            })
            .collect(),
    }
}

pub fn job(job: &Job) -> pb::Job {
    pb::Job {
        id: job.id.to_string(),
        name: job.name().to_string(),
        cluster: job.spec.cluster.to_string(),
        status: job.status.as_str().into(),
        argv: job.spec.argv.iter().map(ToString::to_string).collect(),
        command: job.spec.command.clone(),
        environment_variables: job.spec.environment_variables.clone().into_iter().collect(),
        instance_count: job.spec.instance_count,
        timeout_seconds: job
            .spec
            .timeout_seconds
            .map_or(0, std::num::NonZeroU64::get),
        has_code: job.spec.code_path.is_some(),
        attempts: job
            .attempts
            .iter()
            .map(|a| pb::Attempt {
                id: a.id.clone(),
                number: a.number,
                status: a.status().into(),
                instances: a.instances.iter().map(instance).collect(),
                started_at_ms: a.started_at,
                ended_at_ms: a.ended_at,
                reason: a.reason.clone(),
            })
            .collect(),
        created_at_ms: job.created_at,
        started_at_ms: job.started_at,
        ended_at_ms: job.ended_at,
        reason: job.reason.to_string(),
        image: job.spec.image.clone().unwrap_or_default(),
        preemptions: job.preemptions,
        max_preemptions: job.spec.max_preemptions,
        gpus_per_instance: job.spec.gpus_per_instance,
        millicpus: job.spec.resources.millicpus,
        memory_bytes: job.spec.resources.memory_bytes(),
        array: job.array.as_deref().map(|state| pb::ArrayProgress {
            spec: Some(array_spec(&state.spec)),
            total: state.spec.count(),
            counts: state
                .counts
                .iter()
                .map(|(s, n)| (s.as_str().to_string(), *n))
                .collect(),
            first_task_id: crate::control::job_id(crate::model::Task::seq(job.seq, 0)),
        }),
        task: job.task.map(|t| pb::TaskOf {
            array_id: crate::control::job_id(t.array_seq),
            index: t.index,
        }),
        sweep: job.sweep.as_deref().map(sweep_progress),
        trial: job.trial.map(|t| pb::TrialOf {
            sweep_id: crate::control::job_id(t.sweep_seq),
            index: t.index,
        }),
        pipeline: job.pipeline.as_deref().map(pipeline_progress),
        step: job.step.map(|s| pb::StepOf {
            pipeline_id: crate::control::job_id(s.pipeline_seq),
            name: job.spec.name.clone(),
            index: s.index,
        }),
        flags: job.flags.to_vec(),
        distribution: job.spec.distribution.as_ref().map(distribution_to_wire),
        parallel: job.spec.parallel.as_deref().map(parallel_to_wire),
        progress: job.progress.as_deref().map(progress),
        inputs: job
            .spec
            .extras
            .inputs
            .iter()
            .map(|(name, input)| {
                (
                    name.clone(),
                    pb::JobInput {
                        r#type: input.kind.as_str().into(),
                        mode: input.mode.as_str().into(),
                        uri: input.uri.clone(),
                    },
                )
            })
            .collect(),
        outputs: job.spec.extras.outputs.keys().cloned().collect(),
        warnings: job.spec.extras.warnings.clone(),
        experiment_name: job.spec.extras.experiment_name.clone(),
        description: job.spec.extras.description.clone(),
        tags: job.spec.extras.tags.clone().into_iter().collect(),
        properties: job.spec.extras.properties.clone().into_iter().collect(),
        environment: job.spec.extras.environment.clone(),
    }
}

pub fn datastore(d: &crate::data::Datastore) -> pb::Datastore {
    pb::Datastore {
        name: d.name.clone(),
        path: d.path.clone(),
        description: d.description.clone(),
        created_at_ms: d.created_at,
    }
}

pub fn data_asset(a: &crate::data::DataAsset) -> pb::DataAsset {
    pb::DataAsset {
        name: a.name.clone(),
        version: a.version.clone(),
        r#type: a.kind.as_str().into(),
        path: a.uri.clone(),
        description: a.description.clone(),
        tags: a.tags.clone().into_iter().collect(),
        created_at_ms: a.created_at,
    }
}

pub fn environment(e: &crate::model::Environment) -> pb::Environment {
    use crate::model::EnvironmentKind;
    let (image, host, prefix) = match &e.kind {
        EnvironmentKind::Image { image } => (image.clone(), false, String::new()),
        EnvironmentKind::Host { prefix } => {
            (String::new(), true, prefix.clone().unwrap_or_default())
        }
    };
    pb::Environment {
        name: e.name.clone(),
        version: e.version.clone(),
        description: e.description.clone(),
        image,
        host,
        prefix,
        defined_by: e.defined_by.clone(),
        archived: e.archived,
        created_at_ms: e.created_at,
        tags: e.tags.clone().into_iter().collect(),
    }
}

pub fn node(node: &Node) -> pb::Node {
    let (attempt_id, instance) = node
        .running
        .first()
        .map(|b| (b.slot.attempt_id.clone(), b.slot.instance))
        .unwrap_or_default();
    let allocations = node
        .running
        .iter()
        .map(|b| pb::Allocation {
            job_id: b.slot.job_id().to_string(),
            attempt_id: b.slot.attempt_id.clone(),
            instance: b.slot.instance,
            millicpus: b.share.millicpus,
            memory_bytes: b.share.memory_bytes(),
            gpus: b.gpus,
            after: b
                .after
                .as_ref()
                .map(|s| format!("{}#{}", s.attempt_id, s.instance))
                .unwrap_or_default(),
        })
        .collect();
    pb::Node {
        id: node.id.clone(),
        cluster: node.cluster.clone(),
        state: node.state.as_str().into(),
        attempt_id,
        instance,
        allocations,
        cores: node.cores,
        memory_bytes: node.memory_bytes,
        cpu_percent: node.cpu_percent,
        memory_used_bytes: node.memory_used_bytes,
        last_heartbeat_ms: node.last_heartbeat,
        hostname: node.hostname.clone(),
        message: node.message.clone(),
        created_at_ms: node.created_at,
        gpus: if node.stats.gpus.is_empty() {
            node.gpus.iter().map(gpu_to_wire).collect()
        } else {
            node.stats.gpus.iter().map(gpu_to_wire).collect()
        },
        gpu_reason: node.gpu_reason.clone(),
        per_core_percent: node.stats.per_core_percent.clone(),
        disk_free_bytes: node.stats.disk_free_bytes,
        disk_total_bytes: node.stats.disk_total_bytes,
        network_rx_bytes: node.stats.network_rx_bytes,
        network_tx_bytes: node.stats.network_tx_bytes,
        provider_id: node.handle.clone(),
    }
}

pub fn quota_report(report: &crate::control::QuotaReport) -> pb::QuotaReport {
    pb::QuotaReport {
        lines: report
            .lines
            .iter()
            .map(|(scope, limit, used)| pb::QuotaLine {
                scope: scope.clone(),
                limit: *limit,
                used: *used,
            })
            .collect(),
    }
}

pub fn vm_size(size: &VmSize) -> pb::VmSize {
    pb::VmSize {
        name: size.name.clone(),
        cores: size.cores,
        memory_gib: size.memory_gib,
        gpus: size.gpus,
        gpu_model: size.gpu_model.clone(),
        family: size.family.clone(),
    }
}

pub fn exited(exited: pb::Exited) -> ExitReport {
    ExitReport {
        exit_code: exited.exit_code,
        outcome: exited.outcome,
        message: exited.message,
        usage: exited.usage.map(usage_from_wire),
    }
}

pub fn usage(u: &Usage) -> pb::Usage {
    pb::Usage {
        samples: u.samples,
        gpu_utilization_avg_percent: u.gpu_utilization_avg_percent,
        gpu_utilization_peak_percent: u.gpu_utilization_peak_percent,
        gpu_memory_peak_bytes: u.gpu_memory_peak_bytes,
        gpu_energy_joules: u.gpu_energy_joules,
        cpu_seconds: u.cpu_seconds,
        gpu_utilization_percent: u.gpu_utilization_percent,
        gpu_memory_bytes: u.gpu_memory_bytes,
    }
}

pub fn usage_from_wire(u: pb::Usage) -> Usage {
    Usage {
        samples: u.samples,
        gpu_utilization_avg_percent: u.gpu_utilization_avg_percent,
        gpu_utilization_peak_percent: u.gpu_utilization_peak_percent,
        gpu_memory_peak_bytes: u.gpu_memory_peak_bytes,
        gpu_energy_joules: u.gpu_energy_joules,
        cpu_seconds: u.cpu_seconds,
        gpu_utilization_percent: u.gpu_utilization_percent,
        gpu_memory_bytes: u.gpu_memory_bytes,
    }
}

pub fn gpu_to_wire(g: &GpuStat) -> pb::GpuStat {
    pb::GpuStat {
        index: g.index,
        uuid: g.uuid.clone(),
        model: g.model.clone(),
        utilization_percent: g.utilization_percent,
        memory_used_bytes: g.memory_used_bytes,
        memory_total_bytes: g.memory_total_bytes,
        temperature_c: g.temperature_c,
        power_milliwatts: g.power_milliwatts,
        energy_millijoules: g.energy_millijoules,
        process_ids: g.process_ids.clone(),
    }
}

pub fn gpu_from_wire(g: pb::GpuStat) -> GpuStat {
    GpuStat {
        index: g.index,
        uuid: g.uuid,
        model: g.model,
        utilization_percent: g.utilization_percent,
        memory_used_bytes: g.memory_used_bytes,
        memory_total_bytes: g.memory_total_bytes,
        temperature_c: g.temperature_c,
        power_milliwatts: g.power_milliwatts,
        energy_millijoules: g.energy_millijoules,
        process_ids: g.process_ids,
    }
}

/// The node stats and per-instance usage a heartbeat carries.
pub fn heartbeat(hb: pb::Heartbeat) -> (NodeStats, Vec<(Slot, Usage)>) {
    let usage = hb
        .usage
        .into_iter()
        .map(|u| {
            let slot = Slot {
                attempt_id: u.attempt_id,
                instance: u.instance,
            };
            (slot, u.usage.map(usage_from_wire).unwrap_or_default())
        })
        .collect();
    let stats = NodeStats {
        per_core_percent: hb.per_core_percent,
        disk_free_bytes: hb.disk_free_bytes,
        disk_total_bytes: hb.disk_total_bytes,
        network_rx_bytes: hb.network_rx_bytes,
        network_tx_bytes: hb.network_tx_bytes,
        gpus: hb.gpus.into_iter().map(gpu_from_wire).collect(),
    };
    (stats, usage)
}

pub fn registration(register: pb::Register) -> Registration {
    Registration {
        node_id: register.node_id,
        cluster: register.cluster,
        cores: register.cores,
        memory_bytes: register.memory_bytes,
        hostname: register.hostname,
        pid: register.pid,
        runtimes: register.runtimes,
        gpus: register.gpus.into_iter().map(gpu_from_wire).collect(),
        gpu_reason: register.gpu_reason,
        attempts: register
            .attempts
            .into_iter()
            .map(|r| AttemptReport {
                slot: Slot {
                    attempt_id: r.attempt_id,
                    instance: r.instance,
                },
                exited: r.exited.map(exited),
                gpus: r.gpus,
                held: r.held,
            })
            .collect(),
    }
}

pub fn to_agent(message: ToAgent) -> pb::CoordinatorMessage {
    use pb::coordinator_message::Msg;
    let msg = match message {
        ToAgent::Registered {
            heartbeat_interval,
            lease,
        } => Msg::Registered(pb::Registered {
            node_id: String::new(),
            heartbeat_interval_ms: duration_ms(heartbeat_interval),
            lease_ms: duration_ms(lease),
        }),
        ToAgent::Pong => Msg::Pong(pb::Pong {}),
        ToAgent::Launch(order) => Msg::Launch(pb::Launch {
            end_may_wait: order.end_may_wait(),
            env: order.env.into_vars(&order.job_id, &order.slot),
            attempt_id: order.slot.attempt_id,
            job_id: order.job_id,
            instance: order.slot.instance,
            argv: order.argv,
            timeout_seconds: order.timeout_seconds.unwrap_or(0),
            has_code: order.has_code,
            image: order.image.unwrap_or_default(),
            restore_outputs: order.restore_outputs,
            gpus: order.gpus,
            millicpus: order.share.millicpus,
            memory_bytes: order.share.memory_bytes(),
            processes: order.processes,
            mpi: order.mpi,
            parallel_workers: order.parallel_workers,
            parallel_worker_mode: order.parallel_worker_mode,
            token: order.token,
            inputs: order
                .inputs
                .into_iter()
                .map(|input| {
                    use crate::control::LaunchSource;
                    use pb::launch_input::Source;
                    pb::LaunchInput {
                        name: input.name,
                        folder: input.folder,
                        file_name: input.file_name,
                        source: Some(match input.source {
                            LaunchSource::Fetch => Source::Fetch(true),
                            LaunchSource::Url(url) => Source::Url(url),
                            LaunchSource::Direct(uri) => Source::Direct(uri),
                        }),
                    }
                })
                .collect(),
            outputs: order
                .outputs
                .into_iter()
                .map(|(name, folder)| pb::LaunchOutput { name, folder })
                .collect(),
            path_prefix: order.path_prefix.unwrap_or_default(),
            shm_size_bytes: order.shm_size_bytes.unwrap_or(0),
            after: order.after.map(|slot| pb::Slot {
                attempt_id: slot.attempt_id,
                instance: slot.instance,
            }),
        }),
        ToAgent::Cancel { slot, reason } => Msg::Cancel(pb::Cancel {
            attempt_id: slot.attempt_id,
            instance: slot.instance,
            reason,
        }),
        ToAgent::Shutdown { reason } => Msg::Shutdown(pb::Shutdown { reason }),
        ToAgent::Preempt { notice, reason } => Msg::Preempt(pb::Preempt {
            notice_ms: duration_ms(notice),
            reason,
        }),
        ToAgent::Exec(frame) => Msg::Exec(frame),
    };
    pb::CoordinatorMessage { msg: Some(msg) }
}

fn duration_ms(duration: Duration) -> u64 {
    duration.as_millis() as u64
}

/// The wire's array (a step of 0 is 1).
pub fn array_spec_from_wire(a: &pb::ArraySpec) -> crate::model::ArraySpec {
    crate::model::ArraySpec {
        start: a.start,
        end: a.end,
        step: a.step.max(1),
        max_concurrent: a.max_concurrent,
    }
}

pub fn array_spec(a: &crate::model::ArraySpec) -> pb::ArraySpec {
    pb::ArraySpec {
        start: a.start,
        end: a.end,
        step: a.step,
        max_concurrent: a.max_concurrent,
    }
}
