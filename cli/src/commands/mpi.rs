//! `shoal mpi`: the helpers an MPI job runs inside its sandboxes. The agents
//! start them; people do not need to.
//!
//! - `launch` (instance 0): waits until every node's sandbox answers through the
//!   agents (the readiness barrier), writes the hostfile, and becomes `mpirun`.
//! - `rsh` (Open MPI's `plm_rsh_agent`): runs mpirun's daemon command on another
//!   node of the job through the agents, as `ssh host cmd` would, with no SSH.
//! - `hold` (the other instances): keeps the sandbox up until the job ends.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, anyhow, bail};
use clap::Subcommand;
use shoal_proto::v1 as pb;
use shoal_proto::v1::exec_client::ExecClient;
use shoal_proto::v1::exec_frame::Kind;
use tokio::io::AsyncWriteExt;
use tonic::transport::{Channel, Endpoint};

#[derive(Subcommand)]
pub enum Command {
    /// Instance 0 of an MPI job: wait for every node, then exec mpirun with the job's command.
    Launch {
        /// The MPI program and its arguments.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
        command: Vec<String>,
    },
    /// Open MPI's remote shell: run COMMAND on NODE of this job, through the agents.
    Rsh {
        /// A node id of this job (a hostfile line).
        node: String,
        /// The command, joined with spaces and run by `sh -c` there (as ssh does).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true, required = true)]
        command: Vec<String>,
    },
    /// The other instances of an MPI job: hold the sandbox until told to stop.
    Hold {
        /// Ignored: the job's command, which mpirun starts here as ranks.
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        command: Vec<String>,
    },
}

pub async fn run(command: Command) -> anyhow::Result<ExitCode> {
    match command {
        Command::Launch { command } => launch(command).await,
        Command::Rsh { node, command } => rsh(&node, &command.join(" ")).await,
        Command::Hold { .. } => {
            super::stop_signal().await;
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn env(name: &str) -> anyhow::Result<String> {
    std::env::var(name).map_err(|_| {
        anyhow!("${name} is not set: `shoal mpi` runs inside an MPI job that Shoal started")
    })
}

async fn connect() -> anyhow::Result<ExecClient<Channel>> {
    let socket = env("SHOAL_EXEC_SOCKET")?;
    let channel = Endpoint::from_shared(format!("unix://{socket}"))?
        .connect()
        .await
        .with_context(|| format!("cannot reach this node's agent at {socket}"))?;
    Ok(ExecClient::new(channel))
}

/// Runs `command` on `node`; its output goes to `output`, and the exit code (or
/// why it could not run) comes back.
async fn exec(
    client: &mut ExecClient<Channel>,
    node: &str,
    command: &str,
    mut output: impl FnMut(&str, &[u8]),
) -> anyhow::Result<Result<i32, String>> {
    let open = pb::ExecOpen {
        target_node: node.to_string(),
        command: command.to_string(),
        ..Default::default()
    };
    let mut frames = client.run(open).await?.into_inner();
    while let Some(frame) = frames.message().await? {
        match frame.kind {
            Some(Kind::Output(out)) => output(&out.stream, &out.data),
            Some(Kind::Exit(exit)) => {
                return Ok(exit.exit_code.ok_or(exit.message));
            }
            _ => {}
        }
    }
    Ok(Err(format!(
        "the exec on node {node} ended without an exit status"
    )))
}

async fn rsh(node: &str, command: &str) -> anyhow::Result<ExitCode> {
    let mut client = connect().await?;
    let (out_tx, mut out_rx) = tokio::sync::mpsc::unbounded_channel::<(bool, Vec<u8>)>();
    let writer = tokio::spawn(async move {
        let (mut stdout, mut stderr) = (tokio::io::stdout(), tokio::io::stderr());
        while let Some((is_err, data)) = out_rx.recv().await {
            let _ = if is_err {
                stderr.write_all(&data).await
            } else {
                stdout.write_all(&data).await
            };
            let _ = stdout.flush().await;
        }
    });
    let ended = exec(&mut client, node, command, |stream, data| {
        let _ = out_tx.send((stream == "stderr", data.to_vec()));
    })
    .await?;
    drop(out_tx);
    let _ = writer.await;
    match ended {
        Ok(code) => Ok(ExitCode::from(u8::try_from(code).unwrap_or(255))),
        Err(why) => {
            eprintln!("shoal mpi rsh {node}: {why}");
            // What ssh exits with when it cannot run the command.
            Ok(ExitCode::from(255))
        }
    }
}

/// Open MPI settings that differ from node to node (folders of nodes that share
/// a machine, network interfaces).
const PER_NODE_SETTINGS: [&str; 4] = [
    "OMPI_MCA_orte_tmpdir_base",
    "OMPI_MCA_btl_vader_backing_directory",
    "OMPI_MCA_btl_tcp_if_include",
    "OMPI_MCA_oob_tcp_if_include",
];

/// `mpirun` on PATH, or None.
fn find_on_path(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|dir| dir.join(program))
        .find(|candidate| candidate.is_file())
}

async fn launch(command: Vec<String>) -> anyhow::Result<ExitCode> {
    use std::os::unix::process::CommandExt;
    let nodes: Vec<String> = env("SHOAL_NODE_IDS")?
        .split(',')
        .filter(|n| !n.is_empty())
        .map(str::to_string)
        .collect();
    let per_node: u32 = env("SHOAL_MPI_PROCESSES_PER_NODE")?
        .parse()
        .context("$SHOAL_MPI_PROCESSES_PER_NODE")?;
    let Some(mpirun) = find_on_path("mpirun") else {
        bail!(
            "mpirun is not on PATH here; an MPI job needs Open MPI where it runs (apt-get install openmpi-bin, or an image like shoal/mpi-train built by images/build.sh)"
        );
    };
    let timeout = std::env::var("SHOAL_MPI_READY_TIMEOUT_SECONDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .map_or(Duration::from_secs(120), Duration::from_secs);
    let started = Instant::now();
    barrier(&nodes, timeout).await?;
    eprintln!(
        "shoal: all {} node(s) ready in {} ms",
        nodes.len(),
        started.elapsed().as_millis()
    );
    let tmp = std::env::var("TMPDIR").unwrap_or_else(|_| "/tmp".into());
    let hostfile = Path::new(&tmp).join("shoal-hostfile");
    let lines: String = nodes
        .iter()
        .map(|n| format!("{n} slots={per_node}\n"))
        .collect();
    std::fs::write(&hostfile, lines).with_context(|| format!("{}", hostfile.display()))?;
    let ranks = per_node as usize * nodes.len();
    let mut mpi = std::process::Command::new(&mpirun);
    // mpirun hands its OMPI_* variables to every rank; these are each node's own
    // (its agent set them in its sandbox, where the daemon and ranks start).
    for per_node in PER_NODE_SETTINGS {
        mpi.env_remove(per_node);
    }
    mpi.arg("-np")
        .arg(ranks.to_string())
        .arg("--hostfile")
        .arg(&hostfile)
        .args(&command);
    eprintln!(
        "shoal: {} -np {ranks} --hostfile {} {}",
        mpirun.display(),
        hostfile.display(),
        command.join(" ")
    );
    // Becomes mpirun: its exit status is the instance's.
    let error = mpi.exec();
    Err(anyhow!("cannot start {}: {error}", mpirun.display()))
}

/// Every node's sandbox runs `true` through the agents, or the launch fails
/// naming the nodes that never did.
async fn barrier(nodes: &[String], timeout: Duration) -> anyhow::Result<()> {
    let client = connect().await?;
    let deadline = Instant::now() + timeout;
    let checks = nodes.iter().map(|node| {
        let mut client = client.clone();
        async move {
            let mut last;
            loop {
                match exec(&mut client, node, "true", |_, _| {}).await {
                    Ok(Ok(0)) => return Ok(()),
                    Ok(Ok(code)) => last = format!("`true` exited with {code}"),
                    Ok(Err(why)) => last = why,
                    Err(e) => last = e.to_string(),
                }
                if Instant::now() >= deadline {
                    return Err(format!("{node} ({last})"));
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    });
    let failed: Vec<String> = futures::future::join_all(checks)
        .await
        .into_iter()
        .filter_map(Result::err)
        .collect();
    if failed.is_empty() {
        Ok(())
    } else {
        bail!(
            "MPI launch: node(s) never became ready within {} s: {}",
            timeout.as_secs(),
            failed.join("; ")
        )
    }
}
