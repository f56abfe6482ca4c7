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
}

#[derive(clap::Subcommand)]
pub enum VmSizeCommand {
    /// List the VM sizes (built in, plus those in the coordinator's config).
    List,
}

pub async fn run(command: Command, endpoint: &str, format: Format) -> anyhow::Result<ExitCode> {
    let Command::List { cluster } = command;
    let client = Client::connect(endpoint).await?;
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
