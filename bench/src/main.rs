//! Shoal's benchmarks. Run from the repository root:
//!
//!   cargo build --release && cargo run --release -p shoal-bench -- all
//!
//! `placements`: durable job placements per second through the real control loop
//! and SQLite store (synchronous=FULL), with in-process agents that finish each
//! instance at once (zero-work jobs): the coordinator's own cost.
//! `placements-postgres [JOBS] [RUNS]`: the same on SQLite and on PostgreSQL
//! (`scripts/pg-up.sh`), alternating, RUNS runs each (default 20,000 jobs, 5 runs).
//! `history [N]`: N (default 1,000,000) zero-work jobs through the same loop in
//! ten waves, with the process's RSS after each: memory holds only live and
//! recent jobs, the store the rest.
//! `latency`: submit → completed for a trivial job (`true`) on a warm local node,
//! through gRPC on loopback to a `shoal coordinator` process with a real agent
//! process; and the same through the `shoal job submit --wait` CLI process.
//! `cli-latency [RUNS]`: that CLI process RUNS (default 30) times after each of 0,
//! 20 and 100 ms of quiet; with `HQ=../shared/peers/hq`, `hq submit --wait -- true`
//! alternated with it and timed the same way (a server and two one-cpu workers).
//! `backlog [N]`: N (default 100,000) jobs queued on a cluster locked read-only,
//! beside a warm cluster: submit rate as the queue grows, then with the queue
//! full the warm cluster's latency, the idle coordinator process's CPU and RSS
//! (its own, as `bench/peer-backlog.sh` reads HyperQueue's server), and the
//! decision pass's time (from /metrics): what waits elsewhere must cost nothing.
//! `fleet [NODES] [JOBS]`: NODES (default 5,000) in-process agents heartbeating
//! every 5 s, idle and then running JOBS (default 100,000) zero-work jobs: the
//! process's CPU and RSS, and the decision pass's time.
//! `sim [SEEDS] [--rough | --nodes N]`: the deterministic simulator over SEEDS seeds
//! (default 1,000); `--rough`: twice the jobs, three times the faults
//! (`Scale::rough`); `--nodes N`: a fleet of up to N nodes, three jobs a node and
//! faults in proportion (`Scale::fleet`).
//! `grpc-fleet [NODES] [JOBS]`: a real coordinator process and NODES agents that
//! join with a join token and keep a real gRPC session each (register, heartbeats
//! every 5 s with a real agent's telemetry, launches answered at once), over 50
//! HTTP/2 connections: the
//! coordinator process's own CPU and RSS, idle and while JOBS zero-work jobs run.
//! `arrays [N] [RUNS]`: N `true` tasks as one array on 2 one-core local nodes,
//! beside the machine's fork/exec ceiling measured in the same run.
//! `zero-work [N] [RUNS]`: N tasks through the real API to 2 `--zero-work` agent
//! processes, as one array and as single-job requests, one and 64 tasks a node
//! (`SHOAL_BENCH_LAYOUT=one` or `many`: that layout only, to profile it).
//! `tracking [POINTS] [RUNS] [sqlite|postgres]`: a job sends POINTS metric points
//! through its agent's MLflow endpoint (log-batch calls of 1,000 over 4
//! connections), as fast as it can and paced at 50,000/s, while `true` jobs
//! measure latency beside it; `postgres` keeps the coordinator's state in a fresh
//! database of `scripts/pg-up.sh` (`SHOAL_STORE`).

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use futures::FutureExt;
use futures::future::BoxFuture;
use shoal_coordinator::control::{
    Command, ControlConfig, ControlHandle, Driver, ExitReport, Registration, ToAgent,
};
use shoal_coordinator::model::{ClusterRequest, JobRequest, JobStatus};
use shoal_coordinator::provider::{NodeLaunch, NodeProvider, NodeRemoval, StartedNode};
use shoal_coordinator::store::SqlStore;
use shoal_proto::v1 as pb;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::StreamExt;

/// Nodes come up as in-process agents registered by the bench itself.
#[derive(Clone)]
struct InProcessProvider {
    created: mpsc::UnboundedSender<(String, String)>,
}

impl NodeProvider for InProcessProvider {
    fn create(&self, launch: NodeLaunch) -> BoxFuture<'static, Result<StartedNode, String>> {
        let _ = self.created.send((launch.node_id, launch.cluster));
        async {
            Ok(StartedNode {
                pid: None,
                handle: String::new(),
                exited: std::future::pending().boxed(),
            })
        }
        .boxed()
    }

    fn remove(&self, _node: NodeRemoval) -> BoxFuture<'static, ()> {
        async {}.boxed()
    }
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// An agent that "runs" each launch by reporting it started and exited 0 at once.
async fn instant_agent(handle: ControlHandle, node_id: String, cluster: String, session: u64) {
    let (link, mut orders) = mpsc::unbounded_channel();
    let registration = Registration {
        node_id: node_id.clone(),
        cluster,
        cores: 2,
        memory_bytes: 1 << 30,
        hostname: "localhost".into(),
        pid: std::process::id(),
        runtimes: vec!["process".into()],
        attempts: vec![],
        gpus: Vec::new(),
        gpu_reason: String::new(),
    };
    if handle
        .register_agent(registration, session, link)
        .await
        .is_err()
    {
        return;
    }
    // Heard from, as a real agent is: a silent node's work is rerun after a lease.
    let beating = {
        let handle = handle.clone();
        let node_id = node_id.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_secs(5));
            loop {
                every.tick().await;
                let beat = Command::Heartbeat {
                    node_id: node_id.clone(),
                    cpu_percent: 0.0,
                    memory_used_bytes: 0,
                    stats: Default::default(),
                    usage: Vec::new(),
                };
                if !handle.send(beat).await {
                    return;
                }
            }
        })
    };
    let _stop_beating = AbortOnDrop(beating);
    while let Some(order) = orders.recv().await {
        if let ToAgent::Launch(order) = order {
            handle
                .send(Command::InstanceStarted {
                    node_id: node_id.clone(),
                    slot: order.slot.clone(),
                    gpus: Vec::new(),
                })
                .await;
            handle
                .send(Command::InstanceExited {
                    node_id: node_id.clone(),
                    slot: order.slot,
                    exit: ExitReport {
                        exit_code: Some(0),
                        outcome: "completed".into(),
                        message: String::new(),
                        usage: None,
                    },
                })
                .await;
        }
    }
}

/// The real control loop and SQLite store (synchronous=FULL) with `nodes`
/// in-process agents that finish each instance at once.
struct InProcess {
    _dir: tempfile::TempDir,
    clusters: Vec<String>,
    handle: ControlHandle,
    stop: oneshot::Sender<()>,
    control_thread: tokio::task::JoinHandle<()>,
}

impl InProcess {
    async fn start(nodes: u32) -> anyhow::Result<Self> {
        Self::start_with(nodes, ControlConfig::default()).await
    }

    async fn start_with(nodes: u32, config: ControlConfig) -> anyhow::Result<Self> {
        Self::start_on(nodes, config, None).await
    }

    /// With the store in the PostgreSQL database at `postgres` (None: SQLite in
    /// a temporary folder).
    async fn start_on(
        nodes: u32,
        config: ControlConfig,
        postgres: Option<&str>,
    ) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let store = match postgres {
            None => SqlStore::open(&dir.path().join("shoal.db"))?,
            Some(url) => SqlStore::connect_postgres(url)?,
        };
        let (created_tx, mut created) = mpsc::unbounded_channel();
        let provider = InProcessProvider {
            created: created_tx,
        };
        let (control, handle, inbox) = Driver::new(config, Box::new(store), Arc::new(provider))?;
        let (stop, stopped) = oneshot::channel::<()>();
        let runtime = tokio::runtime::Handle::current();
        let control_thread = tokio::task::spawn_blocking(move || {
            runtime.block_on(control.run(inbox, async move {
                let _ = stopped.await;
            }))
        });
        // Clusters of at most 2,500 nodes (without internode communication past
        // 100, as the service caps them).
        let count = nodes.div_ceil(2_500).max(1);
        let clusters: Vec<String> = (0..count)
            .map(|i| {
                if i == 0 {
                    "bench".to_string()
                } else {
                    format!("bench-{}", i + 1)
                }
            })
            .collect();
        for (i, name) in clusters.iter().enumerate() {
            let share = nodes / count + u32::from((i as u32) < nodes % count);
            handle
                .create_cluster(ClusterRequest {
                    name: name.clone(),
                    vm_size: "Standard_D2_v2".into(),
                    min_nodes: Some(share),
                    max_nodes: Some(share),
                    internode_communication: Some(share <= 100),
                    ..Default::default()
                })
                .await?;
        }
        for session in 0..nodes {
            let (node_id, cluster) = created.recv().await.context("node creation")?;
            tokio::spawn(instant_agent(
                handle.clone(),
                node_id,
                cluster,
                u64::from(session),
            ));
        }
        // Let every agent register before the clock starts.
        loop {
            let nodes_up = handle.list_nodes(None).await?;
            if nodes_up.iter().all(|n| n.connected) && nodes_up.len() == nodes as usize {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(InProcess {
            _dir: dir,
            clusters,
            handle,
            stop,
            control_thread,
        })
    }

    /// Completed jobs so far.
    async fn completed(&self) -> anyhow::Result<u64> {
        let counts = self.handle.job_counts().await?;
        Ok(counts.get(&JobStatus::Completed).copied().unwrap_or(0))
    }

    /// Submits `jobs` zero-work jobs from 64 clients and waits until `expected`
    /// jobs have completed in all; how long the submits took.
    async fn run(&self, jobs: usize, expected: u64) -> anyhow::Result<Duration> {
        let started = Instant::now();
        self.submit(jobs).await?;
        let submit_time = started.elapsed();
        self.wait_completed(expected, started).await?;
        Ok(submit_time)
    }

    async fn wait_completed(&self, expected: u64, started: Instant) -> anyhow::Result<()> {
        loop {
            let done = self.completed().await?;
            if done >= expected {
                return Ok(());
            }
            if started.elapsed() > Duration::from_secs(300) {
                bail!("only {done} of {expected} jobs completed in 300 s");
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Submits `jobs` zero-work jobs from 64 clients (each waits for its ack).
    async fn submit(&self, jobs: usize) -> anyhow::Result<()> {
        let submitters = 64;
        let mut tasks = Vec::new();
        for worker in 0..submitters {
            let handle = self.handle.clone();
            let share = jobs / submitters + usize::from(worker < jobs % submitters);
            let cluster = self.clusters[worker % self.clusters.len()].clone();
            tasks.push(tokio::spawn(async move {
                for _ in 0..share {
                    let request = JobRequest {
                        cluster: cluster.clone(),
                        argv: vec!["true".into()],
                        ..Default::default()
                    };
                    handle.submit_job(request).await?;
                }
                anyhow::Ok(())
            }));
        }
        for task in tasks {
            task.await??;
        }
        Ok(())
    }

    async fn stop(self) {
        let _ = self.stop.send(());
        let _ = self.control_thread.await;
    }
}

async fn placements(jobs: usize, nodes: u32) -> anyhow::Result<()> {
    let bench = InProcess::start(nodes).await?;
    let started = Instant::now();
    let submit_time = bench.run(jobs, jobs as u64).await?;
    let total = started.elapsed();
    let submitted = jobs;
    println!(
        "placements: {submitted} zero-work jobs on {nodes} nodes: submitted in {:.2} s ({:.0}/s, each acked after its commit), all completed in {:.2} s ({:.0} jobs/s placed, run and recorded)",
        submit_time.as_secs_f64(),
        submitted as f64 / submit_time.as_secs_f64(),
        total.as_secs_f64(),
        submitted as f64 / total.as_secs_f64()
    );
    bench.stop().await;
    Ok(())
}

/// A fresh database of the PostgreSQL `scripts/pg-up.sh` starts: its URL.
fn bench_database(name: &str) -> anyhow::Result<String> {
    Ok(shoal_coordinator::db::scratch_database(
        std::path::Path::new("scripts/pg-up.sh"),
        name,
    )?)
}

/// Durable placements per second, SQLite and PostgreSQL alternating in one run.
async fn placements_postgres(jobs: usize, runs: usize) -> anyhow::Result<()> {
    let mut lite = Vec::new();
    let mut pg = Vec::new();
    for run in 0..runs {
        for postgres in [false, true] {
            let url = if postgres {
                Some(bench_database(&format!("shoal_bench_{run}"))?)
            } else {
                None
            };
            let bench = InProcess::start_on(100, ControlConfig::default(), url.as_deref()).await?;
            let started = Instant::now();
            bench.run(jobs, jobs as u64).await?;
            let rate = jobs as f64 / started.elapsed().as_secs_f64();
            bench.stop().await;
            println!(
                "run {}: {} {rate:.0} jobs/s",
                run + 1,
                if postgres { "postgres" } else { "sqlite  " }
            );
            if postgres { &mut pg } else { &mut lite }.push(rate);
        }
    }
    for (name, mut rates) in [("sqlite", lite), ("postgres", pg)] {
        rates.sort_by(f64::total_cmp);
        println!(
            "placements-postgres: {name}: {jobs} zero-work jobs on 100 in-process nodes, {runs} runs: median {:.0} jobs/s placed, run and recorded (min {:.0}, max {:.0})",
            rates[rates.len() / 2],
            rates[0],
            rates[rates.len() - 1]
        );
    }
    Ok(())
}

/// This process's resident memory, in MiB.
fn rss_mib() -> f64 {
    proc_usage(std::process::id()).1
}

/// Bounded history: `total` zero-work jobs pass through the control loop, at
/// most `IN_FLIGHT` at a time (so that what is measured is history, not a
/// queue); the process's RSS at every tenth (the store keeps every job; memory
/// only the live and the recent ones).
async fn history(total: usize, nodes: u32) -> anyhow::Result<()> {
    const CHUNK: usize = 2_000;
    const IN_FLIGHT: u64 = 10_000;
    let bench = InProcess::start(nodes).await?;
    let wave = (total / 10).max(1);
    let before = rss_mib();
    println!(
        "history: {total} zero-work jobs on {nodes} in-process nodes, at most {IN_FLIGHT} in flight"
    );
    println!("  jobs through   RSS MiB   jobs/s (last tenth)");
    println!("  {:>12}   {:>7.1}", 0, before);
    let mut through = 0;
    let mut peak = before;
    let mut after_first = None;
    while through < total {
        let count = wave.min(total - through);
        let started = Instant::now();
        let mut sent = 0;
        while sent < count {
            let chunk = CHUNK.min(count - sent);
            let in_flight_ok = (through + sent) as u64;
            bench
                .wait_completed(in_flight_ok.saturating_sub(IN_FLIGHT), started)
                .await?;
            bench.submit(chunk).await?;
            sent += chunk;
        }
        bench
            .wait_completed((through + count) as u64, started)
            .await?;
        through += count;
        let rss = rss_mib();
        peak = peak.max(rss);
        after_first.get_or_insert(rss);
        println!(
            "  {through:>12}   {rss:>7.1}   {:>8.0}",
            count as f64 / started.elapsed().as_secs_f64()
        );
    }
    let first = after_first.unwrap_or(before);
    println!(
        "history: RSS {before:.1} MiB before, {first:.1} after the first wave, {:.1} at the end (peak {peak:.1}): {:+.1} MiB from the first wave to the last",
        rss_mib(),
        rss_mib() - first
    );
    bench.stop().await;
    Ok(())
}

/// A `shoal coordinator` process on a loopback port, with its own data dir:
/// what is measured of it (CPU, RSS) is the server's alone, as a peer's server
/// is measured.
struct CoordinatorProcess {
    _dir: tempfile::TempDir,
    child: tokio::process::Child,
    pid: u32,
    address: String,
    /// The admin token it made.
    token: String,
    /// An admin channel to it.
    channel: shoal_proto::AuthChannel,
}

impl CoordinatorProcess {
    async fn start(shoal: &std::path::Path) -> anyhow::Result<Self> {
        Self::start_with(shoal, &[]).await
    }

    /// With extra environment (its local nodes' agents inherit it).
    async fn start_with(shoal: &std::path::Path, env: &[(&str, &str)]) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let data = dir.path().join("data");
        let address = {
            let probe = std::net::TcpListener::bind("127.0.0.1:0")?;
            probe.local_addr()?.to_string()
        };
        let child = tokio::process::Command::new(shoal)
            .args(["coordinator", "--listen", &address, "--data-dir"])
            .arg(&data)
            .envs(env.iter().copied())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", shoal.display()))?;
        let pid = child.id().context("the coordinator's pid")?;
        let token_file = data.join("admin.token");
        let started = Instant::now();
        let channel = loop {
            if token_file.exists()
                && let Ok(channel) =
                    tonic::transport::Endpoint::from_shared(format!("http://{address}"))?
                        .tcp_nodelay(true)
                        .connect()
                        .await
            {
                break channel;
            }
            if started.elapsed() > Duration::from_secs(30) {
                bail!("the coordinator did not come up");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let token = std::fs::read_to_string(&token_file)?.trim().to_string();
        let admin = shoal_proto::Bearer::new(Some(&token)).map_err(|e| anyhow::anyhow!(e))?;
        let channel = tonic::service::interceptor::InterceptedService::new(channel, admin);
        Ok(CoordinatorProcess {
            _dir: dir,
            child,
            pid,
            address,
            token,
            channel,
        })
    }

    /// Its CPU seconds and RSS (MiB).
    fn usage(&self) -> (f64, f64) {
        proc_usage(self.pid)
    }

    /// SIGTERM, then waits: it stops its nodes as `shoal coordinator` does.
    async fn stop(mut self) {
        if let Ok(pid) = i32::try_from(self.pid) {
            let _ = nix::sys::signal::kill(
                nix::unistd::Pid::from_raw(pid),
                nix::sys::signal::Signal::SIGTERM,
            );
        }
        if tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .is_err()
        {
            let _ = self.child.start_kill();
            let _ = self.child.wait().await;
        }
    }
}

/// A coordinator process with a cluster `warm` of one local node (min 1, max 1).
struct Warm {
    coordinator: CoordinatorProcess,
    address: String,
    clusters: pb::clusters_client::ClustersClient<shoal_proto::AuthChannel>,
    jobs: pb::jobs_client::JobsClient<shoal_proto::AuthChannel>,
    /// The admin token the coordinator made.
    token: String,
}

impl Warm {
    async fn start(shoal: std::path::PathBuf) -> anyhow::Result<Self> {
        Self::start_with(shoal, &[]).await
    }

    /// With extra environment for the coordinator.
    async fn start_with(shoal: std::path::PathBuf, env: &[(&str, &str)]) -> anyhow::Result<Self> {
        let coordinator = CoordinatorProcess::start_with(&shoal, env).await?;
        let mut clusters = pb::clusters_client::ClustersClient::new(coordinator.channel.clone());
        let jobs = pb::jobs_client::JobsClient::new(coordinator.channel.clone());
        clusters
            .create(pb::ClusterSpec {
                name: "warm".into(),
                vm_size: "Standard_D2_v2".into(),
                min_nodes: Some(1),
                max_nodes: Some(1),
                ..Default::default()
            })
            .await?;
        Ok(Warm {
            address: coordinator.address.clone(),
            token: coordinator.token.clone(),
            coordinator,
            clusters,
            jobs,
        })
    }

    async fn stop(self) {
        self.coordinator.stop().await;
    }
}

type JobsClient = pb::jobs_client::JobsClient<shoal_proto::AuthChannel>;

/// Submits `count` zero-work `true` jobs from 16 concurrent gRPC clients, spread
/// over `clusters`; each client's last job id.
async fn submit_spread(
    client: &JobsClient,
    clusters: &[String],
    count: usize,
) -> anyhow::Result<Vec<String>> {
    let mut tasks = Vec::new();
    for worker in 0..16 {
        let mut client = client.clone();
        let clusters = clusters.to_vec();
        let share = count / 16 + usize::from(worker < count % 16);
        tasks.push(tokio::spawn(async move {
            let mut last = String::new();
            for i in 0..share {
                last = client
                    .submit(pb::JobSpec {
                        cluster: clusters[(worker + i) % clusters.len()].clone(),
                        argv: vec!["true".into()],
                        ..Default::default()
                    })
                    .await?
                    .into_inner()
                    .id;
            }
            anyhow::Ok(last)
        }));
    }
    let mut lasts = Vec::new();
    for task in tasks {
        lasts.push(task.await??);
    }
    Ok(lasts)
}

/// `shoal job submit --wait -- true` on cluster `warm`, `runs` times: each start to exit.
async fn cli_round_trips(
    shoal: &std::path::Path,
    warm: &Warm,
    runs: usize,
) -> anyhow::Result<Vec<Duration>> {
    let mut samples = Vec::new();
    for _ in 0..runs {
        samples.push(timed_run(&mut shoal_submit_wait(shoal, warm)).await?);
    }
    Ok(samples)
}

/// The CLI's `submit --wait` of `true` on the warm cluster.
fn shoal_submit_wait(shoal: &std::path::Path, warm: &Warm) -> tokio::process::Command {
    let mut command = tokio::process::Command::new(shoal);
    command.env("SHOAL_TOKEN", &warm.token).args([
        "job",
        "submit",
        "--cluster",
        "warm",
        "--wait",
        "--endpoint",
        &warm.address,
        "-o",
        "json",
        "--",
        "true",
    ]);
    command
}

/// One run of `command`, its output dropped: start to exit (it must succeed).
async fn timed_run(command: &mut tokio::process::Command) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let status = command
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .await?;
    let took = started.elapsed();
    if !status.success() {
        bail!("{:?} failed: {status}", command.as_std());
    }
    Ok(took)
}

/// HyperQueue beside Shoal for `cli-latency`: a server and two one-cpu workers
/// on loopback in a folder of their own, as `../shared/peers/hq-bench.sh`
/// starts them.
struct HqPeer {
    hq: std::path::PathBuf,
    dir: tempfile::TempDir,
    _processes: Vec<tokio::process::Child>,
}

impl HqPeer {
    async fn start(hq: std::path::PathBuf) -> anyhow::Result<Self> {
        let dir = tempfile::tempdir()?;
        let mut peer = HqPeer {
            hq,
            dir,
            _processes: Vec::new(),
        };
        let server = peer.command(&["server", "start", "--host", "127.0.0.1"]);
        peer._processes.push(spawn_quiet(server)?);
        tokio::time::sleep(Duration::from_secs(2)).await;
        for _ in 0..2 {
            let worker = peer.command(&["worker", "start", "--cpus", "1"]);
            peer._processes.push(spawn_quiet(worker)?);
        }
        tokio::time::sleep(Duration::from_secs(3)).await;
        timed_run(&mut peer.command(&["submit", "--array", "1-50", "--wait", "--", "true"]))
            .await
            .context("HyperQueue's first array")?;
        Ok(peer)
    }

    fn command(&self, args: &[&str]) -> tokio::process::Command {
        let mut command = tokio::process::Command::new(&self.hq);
        command.env("HQ_SERVER_DIR", self.dir.path()).args(args);
        command
    }
}

fn spawn_quiet(mut command: tokio::process::Command) -> anyhow::Result<tokio::process::Child> {
    command
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("starting {:?}", command.as_std()))
}

/// (c) of issue 17, CLI to CLI: `shoal job submit --wait -- true` on a warm
/// node, `runs` times after each of 0, 20 and 100 ms of quiet; with `HQ` set (a
/// HyperQueue binary), `hq submit --wait -- true` alternated with it, started
/// and timed the same way. A machine that was idle a moment answers slower (its
/// processors and caches wake up), and the two differ in how: each figure is
/// said with the quiet before it.
async fn cli_latency(runs: usize, shoal: std::path::PathBuf) -> anyhow::Result<()> {
    let warm = Warm::start(shoal.clone()).await?;
    let mut jobs = warm.jobs.clone();
    // The first run also waits for the node to come up.
    warm_round_trip(&mut jobs).await?;
    cli_round_trips(&shoal, &warm, 5).await?;
    let peer = match std::env::var_os("HQ") {
        Some(hq) => Some(HqPeer::start(hq.into()).await?),
        None => None,
    };
    for quiet_ms in [0, 20, 100] {
        let quiet = Duration::from_millis(quiet_ms);
        let (mut ours, mut theirs) = (Vec::new(), Vec::new());
        for _ in 0..runs {
            tokio::time::sleep(quiet).await;
            ours.push(timed_run(&mut shoal_submit_wait(&shoal, &warm)).await?);
            if let Some(peer) = &peer {
                tokio::time::sleep(quiet).await;
                theirs
                    .push(timed_run(&mut peer.command(&["submit", "--wait", "--", "true"])).await?);
            }
        }
        let ours_median = summary(
            &format!(
                "cli-latency, {quiet_ms} ms quiet before each: `shoal job submit --wait -- true`"
            ),
            ours,
        );
        if !theirs.is_empty() {
            let theirs_median = summary(
                &format!(
                    "cli-latency, {quiet_ms} ms quiet before each: `hq submit --wait -- true`"
                ),
                theirs,
            );
            println!(
                "cli-latency, {quiet_ms} ms quiet before each: hq's median ÷ shoal's = {:.2}",
                theirs_median / ours_median
            );
        }
    }
    warm.stop().await;
    Ok(())
}

/// Submit → completed of one `true` job on cluster `warm`, watched over gRPC.
async fn warm_round_trip(jobs: &mut JobsClient) -> anyhow::Result<Duration> {
    let started = Instant::now();
    let job = jobs
        .submit(pb::JobSpec {
            cluster: "warm".into(),
            argv: vec!["true".into()],
            ..Default::default()
        })
        .await?
        .into_inner();
    let mut watch = jobs.watch(pb::JobRef { id: job.id }).await?.into_inner();
    while let Some(update) = watch.next().await {
        let job = update?;
        if job.status == "completed" {
            let took = started.elapsed();
            // The stream ends right after the final state: read to its end, so
            // no cancel of a closing stream counts against the connection (h2
            // gives up on a connection after 1024 such resets).
            let _ = tokio::time::timeout(Duration::from_secs(1), watch.next()).await;
            return Ok(took);
        }
        if job.status == "failed" {
            bail!("the trivial job failed: {}", job.reason);
        }
    }
    bail!("the watch ended early")
}

/// The machine's ceiling for short processes: `count` fork + exec + wait of
/// /bin/true in two loops side by side (one per node of the array bench).
fn fork_exec_ceiling(count: usize) -> anyhow::Result<f64> {
    let started = Instant::now();
    let loops: Vec<_> = (0..2)
        .map(|i| {
            let share = count / 2 + usize::from(i < count % 2);
            std::thread::spawn(move || -> std::io::Result<()> {
                for _ in 0..share {
                    std::process::Command::new("/bin/true").status()?;
                }
                Ok(())
            })
        })
        .collect();
    for one in loops {
        one.join()
            .map_err(|_| anyhow::anyhow!("a loop panicked"))??;
    }
    Ok(count as f64 / started.elapsed().as_secs_f64())
}

/// Submits an array of `count` `true` tasks (`cpus` each) to `cluster` and
/// waits for it to complete; tasks a second, submit to completed.
async fn one_array(
    jobs: &mut JobsClient,
    cluster: &str,
    count: u32,
    cpus: f64,
) -> anyhow::Result<f64> {
    let started = Instant::now();
    let array = jobs
        .submit(pb::JobSpec {
            cluster: cluster.into(),
            argv: vec!["true".into()],
            cpus,
            array: Some(pb::ArraySpec {
                start: 0,
                end: count - 1,
                step: 1,
                max_concurrent: 0,
            }),
            ..Default::default()
        })
        .await?
        .into_inner();
    let mut watch = jobs.watch(pb::JobRef { id: array.id }).await?.into_inner();
    while let Some(update) = watch.next().await {
        let job = update?;
        if job.status == "completed" {
            return Ok(f64::from(count) / started.elapsed().as_secs_f64());
        }
        if job.status.as_str() == "failed" {
            bail!("the array failed: {}", job.reason);
        }
    }
    bail!("the watch ended early")
}

/// (a) of issue 17: `count` `true` tasks as one array on 2 local one-core nodes
/// (1-cpu tasks), `runs` times, each beside the machine's fork/exec ceiling
/// measured just before it.
async fn arrays(count: u32, runs: usize, shoal: std::path::PathBuf) -> anyhow::Result<()> {
    let coordinator = CoordinatorProcess::start(&shoal).await?;
    let mut clusters = pb::clusters_client::ClustersClient::new(coordinator.channel.clone());
    let mut jobs = pb::jobs_client::JobsClient::new(coordinator.channel.clone());
    clusters
        .create(pb::ClusterSpec {
            name: "arrays".into(),
            vm_size: "Standard_D1_v2".into(),
            min_nodes: Some(2),
            max_nodes: Some(2),
            ..Default::default()
        })
        .await?;
    // Each task's cores (SHOAL_BENCH_CPUS, 1 by default: one task a node at a time).
    let cpus: f64 = std::env::var("SHOAL_BENCH_CPUS")
        .ok()
        .map(|c| c.parse())
        .transpose()
        .context("SHOAL_BENCH_CPUS is a number of cores")?
        .unwrap_or(1.0);
    // Warm: both nodes up, and a first array run through them.
    one_array(&mut jobs, "arrays", 200, cpus).await?;
    let mut ratios = Vec::new();
    for run in 1..=runs {
        let before = stat_fields("/proc/self/stat").reaped_cpu();
        let ceiling = fork_exec_ceiling(count as usize)?;
        let after = stat_fields("/proc/self/stat").reaped_cpu();
        let ceiling_task = (after - before) * 1e6 / f64::from(count);
        let ((p0, c0), cpu0) = (loop_counts(&coordinator).await?, coordinator.usage().0);
        let (agents0, jobs0) = children_cpu(coordinator.pid);
        let rate = one_array(&mut jobs, "arrays", count, cpus).await?;
        let ((p1, c1), cpu1) = (loop_counts(&coordinator).await?, coordinator.usage().0);
        let (agents1, jobs1) = children_cpu(coordinator.pid);
        let n = f64::from(count);
        // Where the CPU went, a task: the coordinator, the two agents, and the
        // `true` processes themselves (the agents' reaped children).
        println!(
            "arrays run {run}: {count} `true` tasks as one array on 2 one-core local nodes: {rate:.0} tasks/s; fork/exec ceiling (2 loops) {ceiling:.0}/s; {:.0}% of it ({:.2} passes and {:.2} commits a task; CPU a task: coordinator {:.0} µs, agents {:.0} µs, the tasks {:.0} µs; a ceiling's `true` {ceiling_task:.0} µs)",
            rate / ceiling * 100.0,
            (p1 - p0) as f64 / n,
            (c1 - c0) as f64 / n,
            (cpu1 - cpu0) * 1e6 / n,
            (agents1 - agents0) * 1e6 / n,
            (jobs1 - jobs0) * 1e6 / n,
        );
        ratios.push((rate, ceiling));
    }
    let mut rates: Vec<f64> = ratios.iter().map(|(r, _)| *r).collect();
    rates.sort_by(f64::total_cmp);
    let mut shares: Vec<f64> = ratios.iter().map(|(r, c)| r / c * 100.0).collect();
    shares.sort_by(f64::total_cmp);
    println!(
        "arrays: n={runs} median {:.0} tasks/s (min {:.0}, max {:.0}); {:.0}% of the ceiling (min {:.0}%, max {:.0}%); coordinator RSS {:.1} MiB",
        rates[rates.len() / 2],
        rates[0],
        rates[rates.len() - 1],
        shares[shares.len() / 2],
        shares[0],
        shares[shares.len() - 1],
        coordinator.usage().1
    );
    coordinator.stop().await;
    Ok(())
}

/// How many jobs have completed, from /metrics.
async fn completed_count(
    http: &reqwest::Client,
    address: &str,
    token: &str,
) -> anyhow::Result<u64> {
    metric(http, address, token, "completed count", |l| {
        l.starts_with("shoal_jobs{") && l.contains("state=\"completed\"")
    })
    .await
}

/// The value of the first line of /metrics that `line` picks (`what`, for
/// the error if there is none).
async fn metric(
    http: &reqwest::Client,
    address: &str,
    token: &str,
    what: &str,
    line: impl Fn(&str) -> bool,
) -> anyhow::Result<u64> {
    let text = http
        .get(format!("http://{address}/metrics"))
        .bearer_auth(token)
        .send()
        .await?
        .error_for_status()?
        .text()
        .await?;
    let line = text
        .lines()
        .find(|l| line(l))
        .with_context(|| format!("no {what} in /metrics"))?;
    let value = line.rsplit(' ').next().unwrap_or("0");
    Ok(value.parse::<f64>()? as u64)
}

/// The control loop's passes and the store's commits so far, from /metrics.
async fn loop_counts(coordinator: &CoordinatorProcess) -> anyhow::Result<(u64, u64)> {
    let http = reqwest::Client::new();
    let (address, token) = (&coordinator.address, &coordinator.token);
    let passes = metric(&http, address, token, "pass count", |l| {
        l.starts_with("shoal_control_batches_total ")
    })
    .await?;
    let commits = metric(&http, address, token, "commit count", |l| {
        l.starts_with("shoal_store_commit_seconds_count ")
    })
    .await?;
    Ok((passes, commits))
}

/// `count` single-job requests (`true`, `cpus` each, 64 in flight) to `cluster`;
/// tasks a second, first submit to the last completed.
async fn singles(
    coordinator: &CoordinatorProcess,
    cluster: &str,
    count: u32,
    cpus: f64,
) -> anyhow::Result<f64> {
    let http = reqwest::Client::new();
    let before = completed_count(&http, &coordinator.address, &coordinator.token).await?;
    let jobs = pb::jobs_client::JobsClient::new(coordinator.channel.clone());
    let started = Instant::now();
    let submits = futures::StreamExt::map(futures::stream::iter(0..count), |_| {
        let mut jobs = jobs.clone();
        async move {
            jobs.submit(pb::JobSpec {
                cluster: cluster.into(),
                argv: vec!["true".into()],
                cpus,
                ..Default::default()
            })
            .await
        }
    });
    let mut submits = futures::StreamExt::buffer_unordered(submits, 64);
    while let Some(submitted) = futures::StreamExt::next(&mut submits).await {
        submitted?;
    }
    loop {
        let done = completed_count(&http, &coordinator.address, &coordinator.token).await?;
        if done >= before + u64::from(count) {
            return Ok(f64::from(count) / started.elapsed().as_secs_f64());
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// (b) of issue 17: `count` tasks end to end through the real API to 2 real
/// agent processes started with `--zero-work` (each launch reported completed
/// at once, nothing run): as one array and as single-job requests, with one
/// task a node at a time (1-core nodes, 1-cpu tasks) and with 64 (8-core nodes,
/// 1/8-cpu tasks), `runs` times each. HyperQueue's zero-worker build on the same
/// workload: `HQ=../shared/peers/hq-zero-worker [CPUS=64] ../shared/peers/hq-bench.sh N`.
async fn zero_work(count: u32, runs: usize, shoal: std::path::PathBuf) -> anyhow::Result<()> {
    let coordinator =
        CoordinatorProcess::start_with(&shoal, &[("SHOAL_AGENT_ZERO_WORK", "1")]).await?;
    let mut clusters = pb::clusters_client::ClustersClient::new(coordinator.channel.clone());
    let mut jobs = pb::jobs_client::JobsClient::new(coordinator.channel.clone());
    let layouts = [
        ("zw-one", "Standard_D1_v2", 1.0, "1 task a node"),
        ("zw-many", "Standard_D4_v2", 0.125, "64 tasks a node"),
    ];
    // SHOAL_BENCH_LAYOUT=one|many runs only that layout (to profile one).
    let only = std::env::var("SHOAL_BENCH_LAYOUT").ok();
    for (cluster, size, cpus, said) in layouts {
        if only
            .as_deref()
            .is_some_and(|o| format!("zw-{o}") != cluster)
        {
            continue;
        }
        clusters
            .create(pb::ClusterSpec {
                name: cluster.into(),
                vm_size: size.into(),
                min_nodes: Some(2),
                max_nodes: Some(2),
                ..Default::default()
            })
            .await?;
        one_array(&mut jobs, cluster, 200, cpus).await?; // both nodes up
        let (mut arrays, mut single) = (Vec::new(), Vec::new());
        for run in 1..=runs {
            let before = (loop_counts(&coordinator).await?, coordinator.usage().0);
            let rate = one_array(&mut jobs, cluster, count, cpus).await?;
            arrays.push(rate);
            let between = (loop_counts(&coordinator).await?, coordinator.usage().0);
            let rate_single = singles(&coordinator, cluster, count, cpus).await?;
            single.push(rate_single);
            let after = (loop_counts(&coordinator).await?, coordinator.usage().0);
            // The coordinator's CPU (all its threads) a task: steadier than a
            // rate when the client and the agents share the machine with it.
            let per_task = |((p0, c0), cpu0): ((u64, u64), f64),
                            ((p1, c1), cpu1): ((u64, u64), f64)| {
                let n = f64::from(count);
                format!(
                    "{:.2} passes and {:.2} commits a task, coordinator CPU {:.0} µs a task",
                    (p1 - p0) as f64 / n,
                    (c1 - c0) as f64 / n,
                    (cpu1 - cpu0) * 1e6 / n
                )
            };
            println!(
                "zero-work run {run}, {said}: {count} tasks as one array {rate:.0}/s ({}); as {count} single-job requests {rate_single:.0}/s ({})",
                per_task(before, between),
                per_task(between, after),
            );
        }
        for (how, mut rates) in [("one array", arrays), ("single-job requests", single)] {
            rates.sort_by(f64::total_cmp);
            println!(
                "zero-work, {said}, {count} tasks as {how}: n={runs} median {:.0} tasks/s (min {:.0}, max {:.0})",
                rates[rates.len() / 2],
                rates[0],
                rates[rates.len() - 1],
            );
        }
        clusters
            .delete(pb::ClusterRef {
                name: cluster.into(),
            })
            .await?;
    }
    println!(
        "zero-work: coordinator CPU {:.1} s, RSS {:.1} MiB",
        coordinator.usage().0,
        coordinator.usage().1
    );
    coordinator.stop().await;
    Ok(())
}

/// A cluster `parked`, locked read-only: what is submitted to it waits for good.
async fn park_cluster(
    clusters: &mut pb::clusters_client::ClustersClient<shoal_proto::AuthChannel>,
) -> anyhow::Result<()> {
    clusters
        .create(pb::ClusterSpec {
            name: "parked".into(),
            vm_size: "Standard_D2_v2".into(),
            max_nodes: Some(4),
            ..Default::default()
        })
        .await?;
    clusters
        .lock(pb::ClusterLock {
            name: "parked".into(),
            kind: "read-only".into(),
        })
        .await?;
    Ok(())
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let index = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

/// Prints the samples' count, median, p95 and minimum; the median, in ms.
fn summary(name: &str, mut samples: Vec<Duration>) -> f64 {
    samples.sort();
    let median = percentile(&samples, 0.5).as_secs_f64() * 1000.0;
    println!(
        "{name}: n={} median {median:.1} ms, p95 {:.1} ms, min {:.1} ms",
        samples.len(),
        percentile(&samples, 0.95).as_secs_f64() * 1000.0,
        samples[0].as_secs_f64() * 1000.0
    );
    median
}

async fn latency(runs: usize, shoal: std::path::PathBuf) -> anyhow::Result<()> {
    let warm = Warm::start(shoal.clone()).await?;
    let (mut clusters, mut jobs) = (warm.clusters.clone(), warm.jobs.clone());
    let mut run_once = async || warm_round_trip(&mut jobs).await;
    // The first run also waits for the node to come up: not counted.
    run_once().await?;
    let mut samples = Vec::new();
    for _ in 0..runs {
        samples.push(run_once().await?);
    }
    summary(
        "latency (gRPC submit → watch completed, `true` on a warm node)",
        samples,
    );

    let cli = cli_round_trips(&shoal, &warm, runs.min(30)).await?;
    summary(
        "latency (`shoal job submit --wait -- true` process, start to exit, back to back: `cli-latency` times it beside hq)",
        cli,
    );

    // Throughput of real `true` processes on two warm local nodes.
    clusters
        .update(pb::ClusterUpdate {
            name: "warm".into(),
            min_nodes: Some(2),
            max_nodes: Some(2),
            ..Default::default()
        })
        .await?;
    let mut warming = clusters
        .watch(pb::ClusterRef {
            name: "warm".into(),
        })
        .await?
        .into_inner();
    while let Some(update) = warming.next().await {
        let c = update?;
        if c.node_state_counts.is_some_and(|n| n.idle + n.running == 2) {
            break;
        }
    }
    let count = 2_000;
    let started = Instant::now();
    let mut last = String::new();
    for _ in 0..count {
        last = jobs
            .submit(pb::JobSpec {
                cluster: "warm".into(),
                argv: vec!["true".into()],
                ..Default::default()
            })
            .await?
            .into_inner()
            .id;
    }
    // Jobs run in order of submission on two nodes: wait for every one.
    let listing = loop {
        let all = jobs
            .list(pb::ListJobsRequest {
                cluster: "warm".into(),
                limit: 10_000,
                after: String::new(),
                array: String::new(),
            })
            .await?
            .into_inner()
            .jobs;
        if all.iter().all(|j| j.status == "completed") {
            break all;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    let elapsed = started.elapsed();
    println!(
        "processes: {count} `true` jobs on 2 warm local nodes (one instance per node at a time) in {:.2} s: {:.0} processes/s (last {last}, {} jobs total)",
        elapsed.as_secs_f64(),
        count as f64 / elapsed.as_secs_f64(),
        listing.len()
    );
    warm.stop().await;
    Ok(())
}

/// What the tracking bench's job runs: `threads` connections to its
/// MLFLOW_TRACKING_URI, each sending log-batch calls of 1000 points (10 metrics,
/// 100 steps each) until `points` are sent, as fast as it can or paced at a rate
/// (points/s, 0: not paced); prints the rate it saw.
const TRACKING_LOGGER: &str = r#"
import http.client, json, os, sys, threading, time, urllib.parse
points, threads, pace = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
uri = urllib.parse.urlparse(os.environ["MLFLOW_TRACKING_URI"])
headers = {"Authorization": "Bearer " + os.environ["MLFLOW_TRACKING_TOKEN"],
           "Content-Type": "application/json"}
run = os.environ["MLFLOW_RUN_ID"]
calls = points // 1000
def send(first, count):
    conn = http.client.HTTPConnection(uri.hostname, uri.port)
    for n, call in enumerate(range(first, first + count)):
        if pace > 0:
            # Paced: this connection's share of `pace` points/s.
            ahead = started + n * 1000 * threads / pace - time.time()
            if ahead > 0:
                time.sleep(ahead)
        step0 = call * 100
        metrics = [{"key": "m%d" % k, "value": (step0 + s) * 0.001, "timestamp": 1, "step": step0 + s}
                   for k in range(10) for s in range(100)]
        conn.request("POST", "/api/2.0/mlflow/runs/log-batch",
                     json.dumps({"run_id": run, "metrics": metrics}), headers)
        answer = conn.getresponse()
        body = answer.read()
        if answer.status != 200:
            sys.exit("log-batch: %d %s" % (answer.status, body))
started = time.time()
share = calls // threads
workers = [threading.Thread(target=send, args=(i * share, share)) for i in range(threads)]
for w in workers: w.start()
for w in workers: w.join()
elapsed = time.time() - started
print("RATE %d %.3f" % (share * threads * 1000, elapsed))
"#;

/// Metric ingestion: a job on its own node sends `points` through log-batch
/// (`runs` times) as fast as it can, then paced at the goal (50,000 points/s),
/// while gRPC submit → completed of `true` on another warm node is
/// measured before and during.
async fn tracking(
    points: u64,
    runs: usize,
    postgres: bool,
    shoal: std::path::PathBuf,
) -> anyhow::Result<()> {
    // The coordinator keeps its state (tracking's tables with it) in a fresh
    // PostgreSQL database instead of its data dir.
    let store = if postgres {
        vec![("SHOAL_STORE", bench_database("shoal_bench_tracking")?)]
    } else {
        Vec::new()
    };
    let env: Vec<(&str, &str)> = store.iter().map(|(k, v)| (*k, v.as_str())).collect();
    let warm = Warm::start_with(shoal.clone(), &env).await?;
    let (mut clusters, mut jobs) = (warm.clusters.clone(), warm.jobs.clone());
    clusters
        .create(pb::ClusterSpec {
            name: "logger".into(),
            vm_size: "Standard_D2_v2".into(),
            min_nodes: Some(1),
            max_nodes: Some(1),
            ..Default::default()
        })
        .await?;
    warm_round_trip(&mut jobs).await?;
    let mut quiet = Vec::new();
    for _ in 0..50 {
        quiet.push(warm_round_trip(&mut jobs).await?);
    }
    summary(
        "latency, nothing logging (gRPC submit → completed, `true`)",
        quiet,
    );
    for pace in [0u64, 50_000] {
        let how = if pace == 0 {
            "as fast as it can".to_string()
        } else {
            format!("paced at {pace} points/s")
        };
        let mut rates = Vec::new();
        let mut busy = Vec::new();
        for run in 0..runs {
            let job = jobs
                .submit(pb::JobSpec {
                    cluster: "logger".into(),
                    argv: vec![
                        "python3".into(),
                        "-c".into(),
                        TRACKING_LOGGER.into(),
                        points.to_string(),
                        "4".into(),
                        pace.to_string(),
                    ],
                    ..Default::default()
                })
                .await?
                .into_inner();
            // Latency samples while it runs (the first run also waits for its node).
            loop {
                let now = jobs
                    .get(pb::JobRef { id: job.id.clone() })
                    .await?
                    .into_inner();
                match now.status.as_str() {
                    "completed" => break,
                    "failed" | "canceled" => {
                        bail!("the logging job {}: {}", now.status, now.reason)
                    }
                    "running" => busy.push(warm_round_trip(&mut jobs).await?),
                    _ => tokio::time::sleep(Duration::from_millis(20)).await,
                }
            }
            let mut log = String::new();
            let mut chunks = jobs
                .logs(pb::LogsRequest {
                    job_id: job.id.clone(),
                    instance: None,
                    follow: false,
                })
                .await?
                .into_inner();
            while let Some(chunk) = chunks.next().await {
                log.push_str(&String::from_utf8_lossy(&chunk?.data));
            }
            let rate = log
                .lines()
                .find_map(|l| l.strip_prefix("RATE "))
                .and_then(|l| {
                    let (sent, seconds) = l.split_once(' ')?;
                    Some(sent.parse::<f64>().ok()? / seconds.parse::<f64>().ok()?)
                })
                .with_context(|| format!("the logging job printed no rate: {log}"))?;
            let stored = jobs
                .metrics(pb::MetricsRequest {
                    job_id: job.id.clone(),
                    names: vec!["m0".into()],
                    latest_only: false,
                })
                .await?
                .into_inner();
            let kept = stored
                .runs
                .first()
                .and_then(|r| r.metrics.first())
                .map_or(0, |m| m.points.len());
            if kept as u64 != points / 10 {
                bail!("{} kept {kept} points of m0, not {}", job.id, points / 10);
            }
            println!(
                "run {}: {points} points in log-batch calls of 1000 from 4 connections, {how}: {rate:.0} points/s",
                run + 1
            );
            rates.push(rate);
        }
        rates.sort_by(f64::total_cmp);
        println!(
            "ingestion: median {:.0} points/s (min {:.0}, max {:.0}) over {runs} runs",
            rates[rates.len() / 2],
            rates[0],
            rates[rates.len() - 1]
        );
        summary(
            &format!("latency while a job logs {how} (gRPC submit → completed, `true`)"),
            busy,
        );
    }
    warm.stop().await;
    Ok(())
}

/// Submit → running and submit → completed of a `true` container on a warm local
/// node, side by side with `docker run --rm` of the same image.
async fn docker(runs: usize, shoal: std::path::PathBuf) -> anyhow::Result<()> {
    let warm = Warm::start(shoal).await?;
    let mut jobs = warm.jobs.clone();
    let mut to_running = Vec::new();
    let mut to_done = Vec::new();
    // One more than counted: the first also waits for the node to come up.
    for run in 0..=runs {
        let started = Instant::now();
        let job = jobs
            .submit(pb::JobSpec {
                cluster: "warm".into(),
                image: "shoal/base".into(),
                argv: vec!["true".into()],
                ..Default::default()
            })
            .await?
            .into_inner();
        let mut watch = jobs.watch(pb::JobRef { id: job.id }).await?.into_inner();
        let mut running_at = None;
        while let Some(update) = watch.next().await {
            let job = update?;
            if running_at.is_none() && (job.started_at_ms > 0 || job.status == "completed") {
                running_at = Some(started.elapsed());
            }
            if job.status == "completed" {
                break;
            }
            if job.status == "failed" {
                bail!(
                    "the container job failed: {} (build the image: images/build.sh base)",
                    job.reason
                );
            }
        }
        if run > 0 {
            to_running.push(running_at.unwrap_or_else(|| started.elapsed()));
            to_done.push(started.elapsed());
        }
    }
    summary(
        "docker: shoal submit → running (container started), warm node",
        to_running,
    );
    summary(
        "docker: shoal submit → completed (`true`, container removed)",
        to_done,
    );
    let mut plain = Vec::new();
    for _ in 0..runs {
        let started = Instant::now();
        let status = tokio::process::Command::new("docker")
            .args(["run", "--rm", "shoal/base", "true"])
            .status()
            .await?;
        if !status.success() {
            bail!("docker run failed");
        }
        plain.push(started.elapsed());
    }
    summary("docker: plain `docker run --rm shoal/base true`", plain);
    warm.stop().await;
    Ok(())
}

/// CPU seconds (user + system) this process has used.
fn cpu_seconds() -> f64 {
    proc_usage(std::process::id()).0
}

/// A histogram's buckets from Prometheus text: (upper bound, cumulative count).
fn buckets(metrics: &str, name: &str) -> Vec<(f64, f64)> {
    let prefix = format!("{name}_bucket{{le=\"");
    metrics
        .lines()
        .filter_map(|line| line.strip_prefix(&prefix))
        .filter_map(|rest| {
            let (bound, count) = rest.split_once("\"} ")?;
            let bound = if bound == "+Inf" {
                f64::INFINITY
            } else {
                bound.parse().ok()?
            };
            Some((bound, count.trim().parse().ok()?))
        })
        .collect()
}

/// The bucket bound under which a share `p` of the observations between two
/// scrapes fall (an upper bound on that percentile).
fn bucket_percentile(before: &[(f64, f64)], after: &[(f64, f64)], p: f64) -> (f64, f64) {
    let diff: Vec<(f64, f64)> = after
        .iter()
        .map(|(bound, count)| {
            let earlier = before
                .iter()
                .find(|(b, _)| b == bound)
                .map_or(0.0, |(_, c)| *c);
            (*bound, count - earlier)
        })
        .collect::<Vec<_>>();
    let mut diff = diff;
    diff.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total = diff.iter().map(|(_, c)| *c).fold(0.0, f64::max);
    let bound = diff
        .iter()
        .find(|(_, count)| *count >= p * total)
        .map_or(f64::INFINITY, |(b, _)| *b);
    (bound, total)
}

async fn backlog(queued: usize, shoal: std::path::PathBuf) -> anyhow::Result<()> {
    const DECIDE: &str = "shoal_scheduler_decide_seconds";
    let warm = Warm::start(shoal.clone()).await?;
    let (mut clusters, mut jobs) = (warm.clusters.clone(), warm.jobs.clone());
    let http = reqwest::Client::new();
    let metrics = async || -> anyhow::Result<String> {
        Ok(http
            .get(format!("http://{}/metrics", warm.address))
            .bearer_auth(&warm.token)
            .send()
            .await?
            .error_for_status()?
            .text()
            .await?)
    };
    park_cluster(&mut clusters).await?;
    let mut run_once = async || warm_round_trip(&mut jobs).await;
    run_once().await?; // the node comes up
    let idle_cpu = async || {
        let (cpu, wall) = (warm.coordinator.usage().0, Instant::now());
        tokio::time::sleep(Duration::from_secs(10)).await;
        100.0 * (warm.coordinator.usage().0 - cpu) / wall.elapsed().as_secs_f64()
    };
    let mut phases = Vec::new();
    for (phase, backlog) in [("empty queue", 0), ("backlog", queued)] {
        if backlog > 0 {
            println!(
                "backlog: submitting {backlog} jobs to `parked` (locked read-only) from 16 gRPC clients"
            );
            let chunk = 20_000.min(backlog);
            let mut sent = 0;
            while sent < backlog {
                let count = chunk.min(backlog - sent);
                let started = Instant::now();
                submit_spread(&warm.jobs, &["parked".to_string()], count).await?;
                println!(
                    "  jobs {:>6} to {:>6}: {:>6.0} submits/s",
                    sent + 1,
                    sent + count,
                    count as f64 / started.elapsed().as_secs_f64()
                );
                sent += count;
            }
        }
        let before = buckets(&metrics().await?, DECIDE);
        let mut samples = Vec::new();
        for _ in 0..50 {
            samples.push(run_once().await?);
        }
        let after = buckets(&metrics().await?, DECIDE);
        summary(
            &format!("backlog ({phase}): gRPC submit → completed on `warm`"),
            samples,
        );
        let cli = cli_round_trips(&shoal, &warm, 20).await?;
        summary(
            &format!("backlog ({phase}): `shoal job submit --wait -- true`"),
            cli,
        );
        let (p50, passes) = bucket_percentile(&before, &after, 0.5);
        let (p99, _) = bucket_percentile(&before, &after, 0.99);
        let cpu = idle_cpu().await;
        let rss = warm.coordinator.usage().1;
        println!(
            "backlog ({phase}): {passes} decision passes during those 50 jobs: p50 ≤ {:.2} ms, p99 ≤ {:.2} ms (bucket bounds); idle coordinator process {cpu:.2}% of a core over 10 s; its RSS {rss:.1} MiB",
            p50 * 1000.0,
            p99 * 1000.0
        );
        phases.push((phase, rss));
    }
    if let [(_, empty), (_, full)] = phases[..] {
        println!(
            "backlog: {queued} queued jobs cost {:.1} MiB of RSS ({:.0} bytes each)",
            full - empty,
            (full - empty) * 1024.0 * 1024.0 / queued as f64
        );
    }
    warm.stop().await;
    Ok(())
}

/// Decision-pass percentiles between two scrapes of /metrics.
fn decide_percentiles(before: &str, after: &str) -> String {
    const DECIDE: &str = "shoal_scheduler_decide_seconds";
    let (b, a) = (buckets(before, DECIDE), buckets(after, DECIDE));
    let (p50, passes) = bucket_percentile(&b, &a, 0.5);
    let (p99, _) = bucket_percentile(&b, &a, 0.99);
    format!(
        "{passes} decision passes, p50 ≤ {:.2} ms, p99 ≤ {:.2} ms (bucket bounds)",
        p50 * 1000.0,
        p99 * 1000.0
    )
}

async fn fleet(nodes: u32, jobs: usize) -> anyhow::Result<()> {
    let config = ControlConfig {
        heartbeat_interval: Duration::from_secs(5),
        quotas: shoal_coordinator::governance::Quotas {
            default_family_cores: u32::MAX / 4,
            low_priority_cores: u32::MAX / 4,
            total_cores: u32::MAX / 4,
            ..Default::default()
        },
        ..ControlConfig::default()
    };
    let started = Instant::now();
    let bench = InProcess::start_with(nodes, config).await?;
    println!(
        "fleet: {nodes} in-process agents registered in {:.1} s; RSS {:.1} MiB",
        started.elapsed().as_secs_f64(),
        rss_mib()
    );
    let before = bench.handle.metrics().await?;
    let (cpu, wall) = (cpu_seconds(), Instant::now());
    tokio::time::sleep(Duration::from_secs(20)).await;
    let idle_cpu = 100.0 * (cpu_seconds() - cpu) / wall.elapsed().as_secs_f64();
    let after = bench.handle.metrics().await?;
    println!(
        "fleet: idle, heartbeats every 5 s ({:.0}/s): {idle_cpu:.1}% of a core (loop and agents), RSS {:.1} MiB; {}",
        f64::from(nodes) / 5.0,
        rss_mib(),
        decide_percentiles(&before, &after)
    );
    let before = after;
    let (cpu, wall) = (cpu_seconds(), Instant::now());
    bench.run(jobs, jobs as u64).await?;
    let elapsed = wall.elapsed().as_secs_f64();
    let after = bench.handle.metrics().await?;
    println!(
        "fleet: {jobs} zero-work jobs on {nodes} nodes in {elapsed:.1} s ({:.0} jobs/s): {:.0}% of a core, RSS {:.1} MiB; {}",
        jobs as f64 / elapsed,
        100.0 * (cpu_seconds() - cpu) / elapsed,
        rss_mib(),
        decide_percentiles(&before, &after)
    );
    bench.stop().await;
    Ok(())
}

fn sim(seeds: u64, rough: bool, nodes: Option<u32>) -> anyhow::Result<()> {
    let scale = match (nodes, rough) {
        (Some(nodes), _) => shoal_coordinator::sim::Scale::fleet(nodes),
        (None, true) => shoal_coordinator::sim::Scale::rough(),
        (None, false) => shoal_coordinator::sim::Scale::default(),
    };
    let started = Instant::now();
    let mut steps = 0;
    let mut simulated = 0;
    for seed in 0..seeds {
        match shoal_coordinator::sim::run(seed, &scale) {
            Ok(report) => {
                steps += report.steps;
                simulated += report.simulated_ms;
            }
            Err(failure) => bail!("{failure}"),
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    println!(
        "sim: {seeds} seeds held every invariant: {steps} steps, {:.0} simulated minutes, in {elapsed:.1} s ({:.2} seeds/s); {} jobs a seed, at most {} nodes a cluster",
        simulated as f64 / 60_000.0,
        seeds as f64 / elapsed,
        scale.jobs,
        scale.max_nodes
    );
    Ok(())
}

/// A process's CPU seconds (user + system) and RSS (MiB), from /proc. In
/// `stat`, utime and stime are the 14th and 15th fields (clock ticks, 100 a
/// second here), counted after the command's closing parenthesis.
fn proc_usage(pid: u32) -> (f64, f64) {
    let fields = stat_fields(&format!("/proc/{pid}/stat"));
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0);
    (fields.own_cpu(), rss)
}

/// The numeric fields of a `/proc/<pid>/stat` after the command's name (so
/// index 1 is the parent's pid, 11 and 12 the process's user and system ticks,
/// 13 and 14 those of its reaped children); empty if it cannot be read.
struct StatFields(Vec<f64>);

fn stat_fields(path: &str) -> StatFields {
    let stat = std::fs::read_to_string(path).unwrap_or_default();
    let rest = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    StatFields(
        rest.split_whitespace()
            .map(|v| v.parse::<f64>().unwrap_or(0.0))
            .collect(),
    )
}

impl StatFields {
    fn at(&self, i: usize) -> f64 {
        self.0.get(i).copied().unwrap_or(0.0)
    }

    fn parent(&self) -> f64 {
        self.at(1)
    }

    /// CPU seconds of the process itself.
    fn own_cpu(&self) -> f64 {
        (self.at(11) + self.at(12)) / 100.0
    }

    /// CPU seconds of the children it has reaped.
    fn reaped_cpu(&self) -> f64 {
        (self.at(13) + self.at(14)) / 100.0
    }
}

/// The CPU seconds of `pid`'s child processes (its local agents): their own, and
/// that of the processes they started and reaped (their jobs).
fn children_cpu(pid: u32) -> (f64, f64) {
    let (mut own, mut reaped) = (0.0, 0.0);
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return (own, reaped);
    };
    for entry in entries.flatten() {
        let fields = stat_fields(&entry.path().join("stat").to_string_lossy());
        if fields.parent() == f64::from(pid) {
            own += fields.own_cpu();
            reaped += fields.reaped_cpu();
        }
    }
    (own, reaped)
}

/// One joined agent on its own gRPC session: it finishes every launch at once.
/// What a real agent's heartbeat carries on a 2-core node with one GPU: CPU
/// (whole and per core), memory, disk, network and the GPU's readings, a little
/// different each beat (so nothing is cached away).
fn telemetry(node: usize, beat: u64) -> pb::Heartbeat {
    let wobble = ((node as u64 * 7 + beat * 13) % 100) as f32;
    pb::Heartbeat {
        cpu_percent: wobble,
        memory_used_bytes: (1 << 29) + beat * 4096,
        memory_total_bytes: 1 << 30,
        per_core_percent: vec![wobble, 100.0 - wobble],
        disk_free_bytes: 50 << 30,
        disk_total_bytes: 100 << 30,
        network_rx_bytes: beat * 1_000_000,
        network_tx_bytes: beat * 500_000,
        gpus: vec![pb::GpuStat {
            index: 0,
            uuid: format!("GPU-{node:08x}-0000-0000-0000-000000000000"),
            model: "NVIDIA H100 80GB HBM3".into(),
            utilization_percent: wobble as u32,
            memory_used_bytes: 1 << 30,
            memory_total_bytes: 80 << 30,
            temperature_c: 40 + (beat % 20) as u32,
            power_milliwatts: 120_000 + (beat % 50) as u32 * 1000,
            energy_millijoules: beat * 600_000,
            process_ids: Vec::new(),
        }],
        usage: Vec::new(),
    }
}

async fn session_agent(
    channel: tonic::transport::Channel,
    join_token: String,
    index: usize,
) -> anyhow::Result<()> {
    let mut joining = pb::agent_client::AgentClient::new(channel.clone());
    let joined = joining
        .join(pb::JoinRequest {
            join_token,
            hostname: format!("fake-{index}"),
            cores: 2,
            memory_bytes: 1 << 30,
        })
        .await?
        .into_inner();
    let bearer =
        shoal_proto::Bearer::new(Some(&joined.credential)).map_err(|e| anyhow::anyhow!(e))?;
    let mut client = pb::agent_client::AgentClient::new(
        tonic::service::interceptor::InterceptedService::new(channel, bearer),
    );
    let (tx, rx) = mpsc::channel::<pb::AgentMessage>(64);
    let up = |msg| pb::AgentMessage { msg: Some(msg) };
    tx.send(up(pb::agent_message::Msg::Register(pb::Register {
        protocol_version: shoal_proto::PROTOCOL_VERSION,
        node_id: joined.node_id.clone(),
        cluster: joined.cluster.clone(),
        cores: 2,
        memory_bytes: 1 << 30,
        runtimes: vec!["process".into()],
        hostname: format!("fake-{index}"),
        pid: 1,
        ..Default::default()
    })))
    .await?;
    let mut down = client
        .session(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await?
        .into_inner();
    let beating = {
        let tx = tx.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(Duration::from_secs(5));
            for beat in 0u64.. {
                every.tick().await;
                let beat = pb::AgentMessage {
                    msg: Some(pb::agent_message::Msg::Heartbeat(telemetry(index, beat))),
                };
                if tx.send(beat).await.is_err() {
                    return;
                }
            }
        })
    };
    let _stop_beating = AbortOnDrop(beating);
    while let Some(message) = down.next().await {
        let Some(pb::coordinator_message::Msg::Launch(launch)) = message?.msg else {
            continue;
        };
        let event = |kind| {
            up(pb::agent_message::Msg::Event(pb::AttemptEvent {
                attempt_id: launch.attempt_id.clone(),
                instance: launch.instance,
                kind: Some(kind),
            }))
        };
        tx.send(event(pb::attempt_event::Kind::Started(
            pb::Started::default(),
        )))
        .await?;
        tx.send(event(pb::attempt_event::Kind::Exited(pb::Exited {
            exit_code: Some(0),
            outcome: "completed".into(),
            ..Default::default()
        })))
        .await?;
    }
    Ok(())
}

async fn grpc_fleet(nodes: usize, jobs: usize, shoal: std::path::PathBuf) -> anyhow::Result<()> {
    let coordinator = CoordinatorProcess::start(&shoal).await?;
    let (address, pid, admin) = (
        coordinator.address.clone(),
        coordinator.pid,
        coordinator.channel.clone(),
    );
    let mut clusters = pb::clusters_client::ClustersClient::new(admin.clone());
    let mut join_tokens = pb::join_tokens_client::JoinTokensClient::new(admin.clone());
    let mut jobs_client = pb::jobs_client::JobsClient::new(admin.clone());
    let nodes_client = pb::nodes_client::NodesClient::new(admin);
    // Clusters of at most 2,500 joined nodes, each with a join token.
    let count = nodes.div_ceil(2_500).max(1);
    let mut tokens = Vec::new();
    for i in 0..count {
        let name = format!("fleet-{i}");
        clusters
            .create(pb::ClusterSpec {
                name: name.clone(),
                vm_size: "Standard_D2_v2".into(),
                max_nodes: Some(4_000),
                idle_seconds_before_scaledown: Some(86_400),
                internode_communication: Some(false),
                ..Default::default()
            })
            .await?;
        let created = join_tokens
            .create(pb::JoinTokenRequest {
                cluster: name.clone(),
                uses: nodes.div_ceil(count) as u32,
                ..Default::default()
            })
            .await?
            .into_inner();
        tokens.push((name, created.token));
    }
    // 50 connections, each carrying its share of the sessions.
    let mut connections = Vec::new();
    for _ in 0..50 {
        connections.push(
            tonic::transport::Endpoint::from_shared(format!("http://{address}"))?
                .tcp_nodelay(true)
                .connect()
                .await?,
        );
    }
    let joined = Instant::now();
    let mut agents = Vec::new();
    for index in 0..nodes {
        let channel = connections[index % connections.len()].clone();
        let join_token = tokens[index % tokens.len()].1.clone();
        agents.push(AbortOnDrop(tokio::spawn(async move {
            if let Err(e) = session_agent(channel, join_token, index).await {
                eprintln!("agent {index}: {e}");
            }
        })));
    }
    loop {
        let mut nodes_client = nodes_client.clone();
        let listed = nodes_client
            .list(pb::ListNodesRequest::default())
            .await?
            .into_inner()
            .nodes;
        let idle = listed.iter().filter(|n| n.state == "idle").count();
        if idle >= nodes {
            break;
        }
        if joined.elapsed() > Duration::from_secs(600) {
            bail!("only {idle} of {nodes} agents registered in 600 s");
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let (_, rss) = proc_usage(pid);
    println!(
        "grpc-fleet: {nodes} agents joined and registered over 50 connections in {:.1} s; coordinator RSS {rss:.1} MiB",
        joined.elapsed().as_secs_f64()
    );
    let (cpu, wall) = (proc_usage(pid).0, Instant::now());
    tokio::time::sleep(Duration::from_secs(30)).await;
    let (cpu_after, rss) = proc_usage(pid);
    println!(
        "grpc-fleet: idle, {:.0} heartbeats/s: coordinator {:.1}% of a core over 30 s, RSS {rss:.1} MiB",
        nodes as f64 / 5.0,
        100.0 * (cpu_after - cpu) / wall.elapsed().as_secs_f64()
    );
    // The issue's steady state: 100,000 jobs queued (on a locked cluster) while
    // the fleet heartbeats.
    park_cluster(&mut clusters).await?;
    let parking = Instant::now();
    submit_spread(&jobs_client, &["parked".to_string()], 100_000).await?;
    let parked_in = parking.elapsed().as_secs_f64();
    let (cpu, wall) = (proc_usage(pid).0, Instant::now());
    tokio::time::sleep(Duration::from_secs(30)).await;
    let (cpu_after, rss) = proc_usage(pid);
    println!(
        "grpc-fleet: 100000 jobs queued on a locked cluster (submitted in {parked_in:.1} s), {:.0} heartbeats/s: coordinator {:.1}% of a core over 30 s, RSS {rss:.1} MiB",
        nodes as f64 / 5.0,
        100.0 * (cpu_after - cpu) / wall.elapsed().as_secs_f64()
    );
    let (cpu, wall) = (proc_usage(pid).0, Instant::now());
    let names: Vec<String> = tokens.iter().map(|(n, _)| n.clone()).collect();
    let lasts = submit_spread(&jobs_client, &names, jobs).await?;
    let submitted = wall.elapsed().as_secs_f64();
    // Each submitter's last job done, then every node idle: all of them are done.
    for id in lasts.into_iter().filter(|id| !id.is_empty()) {
        loop {
            let job = jobs_client
                .get(pb::JobRef { id: id.clone() })
                .await?
                .into_inner();
            if job.status == "completed" {
                break;
            }
            if job.status == "failed" {
                bail!("{id} failed: {}", job.reason);
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    loop {
        let mut nodes_client = nodes_client.clone();
        let listed = nodes_client
            .list(pb::ListNodesRequest::default())
            .await?
            .into_inner()
            .nodes;
        if listed.iter().all(|n| n.state == "idle") {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let elapsed = wall.elapsed().as_secs_f64();
    let (cpu_after, rss) = proc_usage(pid);
    println!(
        "grpc-fleet: {jobs} zero-work jobs submitted over gRPC in {submitted:.1} s, all done in {elapsed:.1} s ({:.0} jobs/s): coordinator {:.0}% of a core, RSS {rss:.1} MiB",
        jobs as f64 / elapsed,
        100.0 * (cpu_after - cpu) / elapsed
    );
    drop(agents);
    coordinator.stop().await;
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let what = args.first().map(String::as_str).unwrap_or("all");
    let number = |i: usize| args.get(i).map(|n| n.parse::<u64>()).transpose();
    let shoal = std::env::var_os("SHOAL_BIN")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| std::path::PathBuf::from("target/release/shoal"));
    if matches!(what, "placements" | "all") {
        placements(20_000, 100).await?;
    }
    if what == "placements-postgres" {
        let jobs = number(1)
            .context("placements-postgres takes a job count")?
            .unwrap_or(20_000);
        let runs = number(2).context("and a number of runs")?.unwrap_or(5);
        placements_postgres(jobs as usize, runs as usize).await?;
    }
    if what == "history" {
        let total = number(1)
            .context("history takes a job count")?
            .unwrap_or(1_000_000);
        history(total as usize, 100).await?;
    }
    if matches!(
        what,
        "latency"
            | "cli-latency"
            | "docker"
            | "backlog"
            | "grpc-fleet"
            | "arrays"
            | "zero-work"
            | "tracking"
            | "all"
    ) && !shoal.exists()
    {
        bail!(
            "{} not found: run `cargo build --release` first, or set SHOAL_BIN",
            shoal.display()
        );
    }
    if matches!(what, "latency" | "all") {
        latency(50, shoal.clone()).await?;
    }
    if what == "cli-latency" {
        let runs = number(1)
            .context("cli-latency takes a run count")?
            .unwrap_or(30)
            .max(1);
        cli_latency(runs as usize, shoal.clone()).await?;
    }
    if matches!(what, "docker" | "all") {
        docker(20, shoal.clone()).await?;
    }
    if what == "fleet" {
        let nodes = number(1)
            .context("fleet takes a node count")?
            .unwrap_or(5_000);
        let jobs = number(2).context("and a job count")?.unwrap_or(100_000);
        fleet(nodes as u32, jobs as usize).await?;
    }
    if what == "grpc-fleet" {
        let nodes = number(1)
            .context("grpc-fleet takes a node count")?
            .unwrap_or(5_000);
        let jobs = number(2).context("and a job count")?.unwrap_or(100_000);
        grpc_fleet(nodes as usize, jobs as usize, shoal.clone()).await?;
    }
    if what == "sim" {
        let rough = args.iter().any(|a| a == "--rough");
        let nodes = args
            .iter()
            .position(|a| a == "--nodes")
            .map(|i| args.get(i + 1).map_or("", String::as_str).parse::<u32>())
            .transpose()
            .context("--nodes takes a node count")?;
        let count = args
            .get(1)
            .filter(|a| !a.starts_with("--"))
            .map(|n| n.parse::<u64>())
            .transpose()
            .context("sim takes a seed count")?;
        sim(count.unwrap_or(1_000), rough, nodes)?;
    }
    if what == "arrays" {
        let count = number(1)
            .context("arrays takes a task count")?
            .unwrap_or(10_000);
        let runs = number(2).context("and a run count")?.unwrap_or(5);
        arrays(count as u32, runs as usize, shoal.clone()).await?;
    }
    if what == "zero-work" {
        let count = number(1)
            .context("zero-work takes a task count")?
            .unwrap_or(10_000);
        let runs = number(2).context("and a run count")?.unwrap_or(5);
        zero_work(count as u32, runs as usize, shoal.clone()).await?;
    }
    if what == "tracking" {
        let points = number(1)
            .context("tracking takes a point count")?
            .unwrap_or(1_000_000);
        let runs = number(2).context("and a run count")?.unwrap_or(5);
        let postgres = match args.get(3).map(String::as_str) {
            None | Some("sqlite") => false,
            Some("postgres") => true,
            Some(other) => bail!("tracking's store is sqlite or postgres, not {other}"),
        };
        tracking(points, runs as usize, postgres, shoal.clone()).await?;
    }
    if what == "backlog" {
        let queued = args
            .get(1)
            .map(|n| n.parse::<usize>())
            .transpose()
            .context("backlog takes a job count")?
            .unwrap_or(100_000);
        backlog(queued, shoal).await?;
    }
    Ok(())
}
