//! The `local` provider: each node is a `shoal agent` process on this machine with
//! its own work dir, in its own process group (Ctrl-C in a terminal reaches the
//! coordinator, which then stops its agents cleanly). An agent that crashes is
//! restarted, as systemd would: it finds its containers again and re-registers.

use std::collections::HashMap;
use std::path::PathBuf;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tracing::{info, warn};

use super::{NodeLaunch, NodeProvider, NodeRemoval, StartedNode, docker};

/// Node id → the pid of its agent now, and whether it is being removed.
type AgentProcess = (Option<u32>, bool);

/// Restarts of one node's agent before the node is given up.
const MAX_RESTARTS: u32 = 5;

#[derive(Clone, Debug)]
pub struct LocalProvider {
    /// The `shoal` binary to run as `shoal agent`.
    pub program: PathBuf,
    /// Where agents reach the coordinator.
    pub endpoint: String,
    /// Each node works in `<root>/<node id>`.
    pub work_root: PathBuf,
    /// How long an agent gets to stop before it is killed.
    pub stop_grace: Duration,
    /// How long a job gets between SIGTERM and SIGKILL (passed to the agents).
    pub job_stop_grace: Duration,
    /// This coordinator's id (see `server::owner_id`).
    pub owner: String,
    /// Mints each node's credential (None: the coordinator asks for none).
    pub auth: Option<crate::auth::Auth>,
    /// The unprivileged user agents run process jobs as (None: theirs).
    pub run_as: Option<String>,
    /// Passed to the agents (they fence themselves after about this long alone).
    pub lease: Duration,
    nodes: Arc<Mutex<HashMap<String, AgentProcess>>>,
    /// Node id → its slice of this machine's GPUs (nodes of GPU sizes only).
    gpu_slices: Arc<Mutex<HashMap<String, u32>>>,
}

impl LocalProvider {
    pub fn new(
        owner: String,
        program: PathBuf,
        endpoint: String,
        work_root: PathBuf,
        job_stop_grace: Duration,
    ) -> Self {
        LocalProvider {
            owner,
            program,
            endpoint,
            work_root,
            stop_grace: job_stop_grace + Duration::from_secs(5),
            job_stop_grace,
            auth: None,
            run_as: None,
            lease: Duration::from_secs(30),
            nodes: Arc::default(),
            gpu_slices: Arc::default(),
        }
    }

    /// The lowest GPU slice no other node of this machine holds.
    fn gpu_slice(&self, node_id: &str) -> u32 {
        let mut slices = self.gpu_slices.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(slice) = slices.get(node_id) {
            return *slice;
        }
        let taken: std::collections::BTreeSet<u32> = slices.values().copied().collect();
        let slice = (0..).find(|s| !taken.contains(s)).unwrap_or(0);
        slices.insert(node_id.to_string(), slice);
        slice
    }

    /// Starts the node's agent; its work dir and log file are made off the runtime.
    async fn spawn(&self, launch: &NodeLaunch) -> Result<tokio::process::Child, String> {
        let work_dir = self.work_root.join(&launch.node_id);
        let dir = work_dir.clone();
        let (log, log_err) = tokio::task::spawn_blocking(move || -> Result<_, String> {
            std::fs::create_dir_all(&dir)
                .map_err(|e| format!("cannot create work dir {}: {e}", dir.display()))?;
            let log_path = dir.join("agent.log");
            let log = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log_path)
                .map_err(|e| format!("cannot open {}: {e}", log_path.display()))?;
            let log_err = log
                .try_clone()
                .map_err(|e| format!("cannot open {}: {e}", log_path.display()))?;
            Ok((log, log_err))
        })
        .await
        .map_err(|e| format!("preparing the node's work dir failed: {e}"))??;
        // Nodes share this machine: each gets its own GPUs (none for CPU sizes).
        let slice = if launch.gpus > 0 {
            self.gpu_slice(&launch.node_id)
        } else {
            0
        };
        let mut command = tokio::process::Command::new(&self.program);
        if let Some(auth) = &self.auth {
            let credential = auth
                .node_credential(&launch.node_id)
                .map_err(|e| format!("cannot issue the node's credential: {e}"))?;
            command.env("SHOAL_NODE_TOKEN", credential);
        }
        command.arg("agent");
        if let Some(user) = &self.run_as {
            command.args(["--run-as", user]);
        }
        command
            .args(["--gpu-slice", &slice.to_string()])
            .args(["--gpus-per-node", &launch.gpus.to_string()])
            .args(["--endpoint", &self.endpoint])
            .args(["--node-id", &launch.node_id])
            .args(["--cluster", &launch.cluster])
            .args(super::agent_flags(
                &self.owner,
                &work_dir.to_string_lossy(),
                launch,
                self.job_stop_grace,
                self.lease,
            ))
            .stdin(Stdio::null())
            .stdout(Stdio::from(log))
            .stderr(Stdio::from(log_err))
            .process_group(0)
            .spawn()
            .map_err(|e| format!("cannot start {}: {e}", self.program.display()))
    }

    fn set(&self, node_id: &str, pid: Option<u32>) {
        if let Ok(mut nodes) = self.nodes.lock() {
            let removing = nodes.get(node_id).is_some_and(|(_, r)| *r);
            nodes.insert(node_id.to_string(), (pid, removing));
        }
    }

    fn removing(&self, node_id: &str) -> bool {
        self.nodes
            .lock()
            .map(|n| n.get(node_id).is_some_and(|(_, r)| *r))
            .unwrap_or(true)
    }
}

impl NodeProvider for LocalProvider {
    fn create(&self, launch: NodeLaunch) -> BoxFuture<'static, Result<StartedNode, String>> {
        let this = self.clone();
        async move {
            let mut child = this.spawn(&launch).await?;
            let pid = child.id();
            this.set(&launch.node_id, pid);
            info!(node = %launch.node_id, ?pid, "local node started");
            let exited = async move {
                let node = launch.node_id.clone();
                let mut restarts = 0;
                loop {
                    let status = match child.wait().await {
                        Ok(status) => status,
                        Err(e) => break format!("agent could not be waited for: {e}"),
                    };
                    if this.removing(&node) || status.success() {
                        break format!("agent exited ({status})");
                    }
                    restarts += 1;
                    if restarts > MAX_RESTARTS {
                        break format!("agent crashed {restarts} times; last: {status}");
                    }
                    warn!(node = %node, %status, restarts, "agent crashed; restarting it");
                    tokio::time::sleep(Duration::from_millis(100 * u64::from(restarts))).await;
                    match this.spawn(&launch).await {
                        Ok(next) => {
                            child = next;
                            this.set(&node, child.id());
                        }
                        Err(e) => {
                            break format!("agent crashed ({status}) and could not restart: {e}");
                        }
                    }
                }
            }
            .map(super::NodeExit::gone)
            .boxed();
            Ok(StartedNode {
                pid,
                handle: String::new(),
                exited,
            })
        }
        .boxed()
    }

    fn remove(&self, node: NodeRemoval) -> BoxFuture<'static, ()> {
        let NodeRemoval { node_id, pid, .. } = node;
        let grace = self.stop_grace;
        let known = self.nodes.lock().ok().and_then(|mut nodes| {
            let entry = nodes.entry(node_id.clone()).or_insert((pid, true));
            entry.1 = true;
            entry.0
        });
        let nodes = self.nodes.clone();
        let gpu_slices = self.gpu_slices.clone();
        let owner = self.owner.clone();
        async move {
            if let Some(pid) = known
                .or(pid)
                .and_then(|p| i32::try_from(p).ok())
                .map(Pid::from_raw)
            {
                stop_process(&node_id, pid, grace).await;
            }
            // Containers the node's jobs ran in go with it.
            docker::remove_node_containers(&owner, &node_id).await;
            if let Ok(mut nodes) = nodes.lock() {
                nodes.remove(&node_id);
            }
            if let Ok(mut slices) = gpu_slices.lock() {
                slices.remove(&node_id);
            }
        }
        .boxed()
    }
}

async fn stop_process(node_id: &str, pid: Pid, grace: Duration) {
    if kill(pid, Signal::SIGTERM).is_err() {
        return; // already gone
    }
    let deadline = tokio::time::Instant::now() + grace;
    while tokio::time::Instant::now() < deadline {
        if !is_alive(pid) {
            info!(node = %node_id, "local node stopped");
            return;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    warn!(node = %node_id, "agent did not stop in time; killing it");
    let _ = kill(pid, Signal::SIGKILL);
}

/// A zombie (exited, not yet reaped by its waiter) counts as gone.
fn is_alive(pid: Pid) -> bool {
    if kill(pid, None).is_err() {
        return false;
    }
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    let state = stat
        .rsplit_once(')')
        .and_then(|(_, rest)| rest.split_whitespace().next());
    !matches!(state, Some("Z") | Some("X") | None)
}
