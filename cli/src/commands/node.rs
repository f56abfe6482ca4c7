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
        "HEARTBEAT",
        "MESSAGE",
    ]);
    for n in &nodes {
        let running = if n.attempt_id.is_empty() {
            "-".to_string()
        } else {
            format!("{}#{}", n.attempt_id, n.instance)
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
        let lines: Vec<serde_json::Value> = report
            .lines
            .iter()
            .map(|l| serde_json::json!({"scope": l.scope, "limit": l.limit, "used": l.used, "available": l.limit.saturating_sub(l.used)}))
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
