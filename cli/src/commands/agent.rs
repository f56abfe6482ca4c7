//! `shoal agent`: the node agent in the foreground.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use shoal_agent::AgentConfig;

#[derive(clap::Args)]
pub struct Args {
    /// The coordinator's address (host:port, or https://host:port); several,
    /// comma-separated (a leader and its standby), are tried in turn: a session
    /// that cannot reach one goes on to the next.
    #[arg(long, env = "SHOAL_ENDPOINT", default_value = "127.0.0.1:7070")]
    endpoint: String,
    /// This node's id, as the coordinator knows it (providers pass it; a joined
    /// node gets its own from the coordinator).
    #[arg(long, required_unless_present = "join_token")]
    node_id: Option<String>,
    /// The cluster this node belongs to.
    #[arg(long, required_unless_present = "join_token")]
    cluster: Option<String>,
    /// Join a cluster from any machine with a token from `shoal join-token create`
    /// (used once: the node's own credential is kept in the work dir).
    #[arg(long, env = "SHOAL_JOIN_TOKEN", hide_env_values = true)]
    join_token: Option<String>,
    /// The CA that signed the coordinator's certificate (https:// endpoints).
    #[arg(long, env = "SHOAL_CA_FILE")]
    ca_file: Option<PathBuf>,
    /// The id of the coordinator that owns this node (it labels the node's containers).
    #[arg(long, default_value = "default")]
    owner: String,
    /// Where attempts get their working dirs.
    #[arg(long)]
    work_dir: PathBuf,
    /// Cores to advertise (default: this machine's).
    #[arg(long)]
    cores: Option<u32>,
    /// Memory to advertise, in bytes (default: this machine's).
    #[arg(long)]
    memory_bytes: Option<u64>,
    /// Seconds a stopped job gets between SIGTERM and SIGKILL.
    #[arg(long, default_value_t = 10)]
    stop_grace_seconds: u64,
    /// Stop and exit after this many seconds without a coordinator.
    #[arg(long, default_value_t = 600)]
    give_up_after_seconds: u64,
    /// Hearing nothing from the coordinator for about this long, stop the work:
    /// the coordinator reruns it elsewhere after exactly this long (it tells the
    /// agent its own `lease_seconds` when it registers).
    #[arg(long, default_value_t = 30)]
    lease_seconds: u64,
    /// A Docker network that job containers join.
    #[arg(long, env = "SHOAL_DOCKER_NETWORK")]
    docker_network: Option<String>,
    /// Use only slice N of this machine's GPUs (with --gpus-per-node).
    #[arg(long, requires = "gpus_per_node")]
    gpu_slice: Option<u32>,
    /// GPUs in each slice (the VM size's GPU count; 0: none).
    #[arg(long, requires = "gpu_slice")]
    gpus_per_node: Option<u32>,
    /// Run process jobs as this unprivileged user (the agent must be root to).
    #[arg(long, env = "SHOAL_RUN_AS")]
    run_as: Option<String>,
    /// This node's credential (the provider that starts the agent passes it).
    #[arg(long, env = "SHOAL_NODE_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// Seconds between telemetry samples (CPU, memory, disk, network, GPUs).
    #[arg(long, env = "SHOAL_TELEMETRY_INTERVAL_SECONDS", default_value_t = 5)]
    telemetry_interval_seconds: u64,
    /// For benchmarks only: complete every instance at once without running it
    /// (measures the control plane, as HyperQueue's zero-worker build does).
    #[arg(long, env = "SHOAL_AGENT_ZERO_WORK", value_parser = clap::builder::BoolishValueParser::new())]
    zero_work: bool,
}

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let endpoint_url = crate::client::normalize_all(&args.endpoint);
    let (node_id, cluster, token) = match &args.join_token {
        Some(join_token) => {
            let joined = shoal_agent::join(
                &endpoint_url,
                args.ca_file.as_deref(),
                &args.work_dir,
                join_token,
                Duration::from_secs(args.lease_seconds.max(1)),
            )
            .await?;
            eprintln!(
                "joined cluster {} as node {}",
                joined.cluster, joined.node_id
            );
            (joined.node_id, joined.cluster, Some(joined.credential))
        }
        None => (
            args.node_id.unwrap_or_default(),
            args.cluster.unwrap_or_default(),
            args.token.clone(),
        ),
    };
    let config = AgentConfig {
        endpoint: endpoint_url,
        node_id,
        cluster,
        owner: args.owner,
        work_dir: args.work_dir,
        cores: args.cores,
        memory_bytes: args.memory_bytes,
        stop_grace: Duration::from_secs(args.stop_grace_seconds),
        give_up_after: Duration::from_secs(args.give_up_after_seconds),
        docker_network: args.docker_network,
        telemetry_interval: Duration::from_secs(args.telemetry_interval_seconds.max(1)),
        gpu_slice: args.gpu_slice.zip(args.gpus_per_node),
        token,
        run_as: args.run_as,
        ca_file: args.ca_file,
        lease: Duration::from_secs(args.lease_seconds.max(1)),
        zero_work: args.zero_work,
    };
    shoal_agent::run(config, super::stop_signal()).await?;
    Ok(ExitCode::SUCCESS)
}
