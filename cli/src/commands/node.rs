//! `shoal node ...` and `shoal vm-size ...`.

use std::process::ExitCode;

use shoal_coordinator::view;
use shoal_proto::v1 as pb;

use crate::client::{Client, status};
use crate::output::{self, Format};

#[derive(clap::Subcommand)]
pub enum Command {
    /// List nodes with their state, current work, CPU and memory.
    List {
        /// Only this cluster's nodes.
        #[arg(long, visible_alias = "compute")]
        cluster: Option<String>,
    },
    /// Everything a node reports: CPU per core, memory, disk, network, every GPU.
    Show { node: String },
    /// Revoke a node: its credential stops working, its agent is told to stop,
    /// and its work is requeued elsewhere.
    Revoke { node: String },
    /// Preempt a low-priority node the way an eviction does: its jobs get SIGTERM,
    /// SIGKILL after the notice, and are requeued automatically.
    Preempt {
        node: String,
        /// Seconds of notice [default: the coordinator's, 30].
        #[arg(long)]
        notice: Option<u32>,
    },
}

#[derive(clap::Subcommand)]
pub enum QuotaCommand {
    /// Core quotas: limit, used and available per VM family, low-priority, total.
    Show,
    /// Change a quota at run time (kept across restarts).
    Set {
        /// A VM family (see `shoal vm-size list`), with --cores.
        #[arg(long, requires = "cores")]
        family: Option<String>,
        /// Dedicated cores for --family.
        #[arg(long, requires = "family")]
        cores: Option<u32>,
        /// Low-priority cores for the whole deployment.
        #[arg(long)]
        low_priority_cores: Option<u32>,
        /// Cores in all.
        #[arg(long)]
        total_cores: Option<u32>,
    },
}

#[derive(clap::Subcommand)]
pub enum VmSizeCommand {
    /// List the VM sizes (built in, plus those in the coordinator's config).
    List,
}

pub async fn run(command: Command, endpoint: &str, format: Format) -> anyhow::Result<ExitCode> {
    let client = Client::connect(endpoint).await?;
    let cluster = match command {
        Command::List { cluster } => cluster,
        Command::Show { node } => {
            let nodes = client
                .nodes()
                .list(pb::ListNodesRequest {
                    cluster: String::new(),
                })
                .await
                .map_err(status)?
                .into_inner()
                .nodes;
            let Some(n) = nodes.into_iter().find(|n| n.id == node) else {
                anyhow::bail!("node `{node}` not found; `shoal node list` shows the nodes");
            };
            if format == Format::Json {
                output::json(&view::Node::from(&n))?;
                return Ok(ExitCode::SUCCESS);
            }
            println!("node:      {} ({}, cluster {})", n.id, n.state, n.cluster);
            if !n.message.is_empty() {
                println!("message:   {}", n.message);
            }
            if !n.provider_id.is_empty() {
                println!("provider:  {}", n.provider_id);
            }
            let cores: Vec<String> = n
                .per_core_percent
                .iter()
                .map(|c| format!("{c:.0}%"))
                .collect();
            println!(
                "cpu:       {:.0}% of {} cores (per core: {})",
                n.cpu_percent,
                n.cores,
                cores.join(" ")
            );
            println!(
                "memory:    {} / {}",
                output::bytes(n.memory_used_bytes),
                output::bytes(n.memory_bytes)
            );
            println!(
                "disk:      {} free of {}",
                output::bytes(n.disk_free_bytes),
                output::bytes(n.disk_total_bytes)
            );
            println!(
                "network:   {} in, {} out",
                output::bytes(n.network_rx_bytes),
                output::bytes(n.network_tx_bytes)
            );
            if n.gpus.is_empty() {
                let why = if n.gpu_reason.is_empty() {
                    "-".to_string()
                } else {
                    n.gpu_reason.clone()
                };
                println!("gpus:      0 ({why})");
            }
            for g in &n.gpus {
                println!(
                    "gpu {}:     {} {} · {}% · {} / {} · {} C · {:.0} W · {:.0} J · pids {:?}",
                    g.index,
                    g.model,
                    g.uuid,
                    g.utilization_percent,
                    output::bytes(g.memory_used_bytes),
                    output::bytes(g.memory_total_bytes),
                    g.temperature_c,
                    f64::from(g.power_milliwatts) / 1000.0,
                    g.energy_millijoules as f64 / 1000.0,
                    g.process_ids
                );
            }
            for a in &n.allocations {
                if a.after.is_empty() {
                    println!("running:   {}", allocation(a, n.cores));
                } else {
                    println!("next:      {} after {}", allocation(a, n.cores), a.after);
                }
            }
            println!("heartbeat: {}", output::ago(n.last_heartbeat_ms));
            return Ok(ExitCode::SUCCESS);
        }
        Command::Revoke { node } => {
            let node = client
                .nodes()
                .revoke(pb::NodeRef { id: node })
                .await
                .map_err(status)?
                .into_inner();
            println!("revoked {} ({})", node.id, node.state);
            return Ok(ExitCode::SUCCESS);
        }
        Command::Preempt { node, notice } => {
            let node = client
                .nodes()
                .preempt(pb::PreemptRequest {
                    node_id: node,
                    notice_seconds: notice,
                })
                .await
                .map_err(status)?
                .into_inner();
            if format == Format::Json {
                output::json(&view::Node::from(&node))?;
            } else {
                println!("{} {}: {}", node.id, node.state, node.message);
            }
            return Ok(ExitCode::SUCCESS);
        }
    };
    let nodes = client
        .nodes()
        .list(pb::ListNodesRequest {
            cluster: cluster.unwrap_or_default(),
        })
        .await
        .map_err(status)?
        .into_inner()
        .nodes;
    if format == Format::Json {
        let views: Vec<view::Node> = nodes.iter().map(view::Node::from).collect();
        output::json(&views)?;
        return Ok(ExitCode::SUCCESS);
    }
    if nodes.is_empty() {
        eprintln!("no nodes: clusters scale up when jobs wait (or keep min_nodes)");
        return Ok(ExitCode::SUCCESS);
    }
    let mut table = output::table(&[
        "NODE",
        "CLUSTER",
        "STATE",
        "RUNNING",
        "CORES",
        "CPU",
        "MEMORY",
        "GPU",
        "HEARTBEAT",
        "MESSAGE",
    ]);
    for n in &nodes {
        // Successors hold nothing until the instance each follows ends.
        let running: Vec<&pb::Allocation> = n
            .allocations
            .iter()
            .filter(|a| a.after.is_empty())
            .collect();
        let running = match running.as_slice() {
            [] => "-".to_string(),
            [one] => format!("{}#{}", one.attempt_id, one.instance),
            many => {
                let cpus: u32 = many.iter().map(|a| a.millicpus).sum();
                format!(
                    "{} instances ({} of {} cpus)",
                    many.len(),
                    f64::from(cpus) / 1000.0,
                    n.cores
                )
            }
        };
        table.add_row(vec![
            n.id.clone(),
            n.cluster.clone(),
            n.state.clone(),
            running,
            n.cores.to_string(),
            format!("{:.0}%", n.cpu_percent),
            format!(
                "{} / {}",
                output::bytes(n.memory_used_bytes),
                output::bytes(n.memory_bytes)
            ),
            if n.gpus.is_empty() {
                "-".to_string()
            } else {
                let util: Vec<String> = n
                    .gpus
                    .iter()
                    .map(|g| format!("{}%", g.utilization_percent))
                    .collect();
                format!("{}× {}", n.gpus.len(), util.join(" "))
            },
            output::ago(n.last_heartbeat_ms),
            n.message.clone(),
        ]);
    }
    println!("{table}");
    Ok(ExitCode::SUCCESS)
}

pub async fn run_quota(
    command: QuotaCommand,
    endpoint: &str,
    format: Format,
) -> anyhow::Result<ExitCode> {
    let client = Client::connect(endpoint).await?;
    let mut quotas = client.quotas();
    let report = match command {
        QuotaCommand::Show => quotas.get(pb::QuotaRequest {}).await,
        QuotaCommand::Set {
            family,
            cores,
            low_priority_cores,
            total_cores,
        } => {
            if family.is_none() && low_priority_cores.is_none() && total_cores.is_none() {
                anyhow::bail!("nothing to set: give --family NAME --cores N, --low-priority-cores N or --total-cores N");
            }
            let update = pb::QuotaUpdate {
                family: family.unwrap_or_default(),
                family_cores: cores,
                low_priority_cores,
                total_cores,
            };
            quotas.set(update).await
        }
    }
    .map_err(status)?
    .into_inner();
    if format == Format::Json {
        let lines: Vec<shoal_coordinator::view::QuotaLine> = report
            .lines
            .iter()
            .map(shoal_coordinator::view::QuotaLine::from)
            .collect();
        output::json(&lines)?;
        return Ok(ExitCode::SUCCESS);
    }
    let mut table = output::table(&["SCOPE", "LIMIT", "USED", "AVAILABLE"]);
    for line in &report.lines {
        table.add_row(vec![
            line.scope.clone(),
            line.limit.to_string(),
            line.used.to_string(),
            line.limit.saturating_sub(line.used).to_string(),
        ]);
    }
    println!("{table}");
    Ok(ExitCode::SUCCESS)
}

pub async fn run_vm_sizes(
    command: VmSizeCommand,
    endpoint: &str,
    format: Format,
) -> anyhow::Result<ExitCode> {
    let VmSizeCommand::List = command;
    let client = Client::connect(endpoint).await?;
    let sizes = client
        .vm_sizes()
        .list(pb::ListVmSizesRequest {})
        .await
        .map_err(status)?
        .into_inner()
        .sizes;
    if format == Format::Json {
        let views: Vec<view::VmSize> = sizes.iter().map(view::VmSize::from).collect();
        output::json(&views)?;
        return Ok(ExitCode::SUCCESS);
    }
    let mut table = output::table(&["NAME", "CORES", "MEMORY GiB", "GPUS", "GPU MODEL", "FAMILY"]);
    for s in &sizes {
        table.add_row(vec![
            s.name.clone(),
            s.cores.to_string(),
            format!("{}", s.memory_gib),
            s.gpus.to_string(),
            if s.gpu_model.is_empty() {
                "-".into()
            } else {
                s.gpu_model.clone()
            },
            s.family.clone(),
        ]);
    }
    println!("{table}");
    Ok(ExitCode::SUCCESS)
}

/// One instance on a node and its share: `job-7.1#0 (job-7): 2 cpus, 4 GiB, 1 GPU(s)`.
fn allocation(a: &pb::Allocation, cores: u32) -> String {
    let share = if a.millicpus == 0 {
        format!("the whole node ({cores} cpus)")
    } else {
        shoal_coordinator::model::Resources::from_wire(a.millicpus, a.memory_bytes).to_string()
    };
    let gpus = if a.gpus > 0 {
        format!(", {} GPU(s)", a.gpus)
    } else {
        String::new()
    };
    format!(
        "{}#{} ({}): {share}{gpus}",
        a.attempt_id, a.instance, a.job_id
    )
}
