//! The `local` provider: each node is a `shoal agent` process on this machine with
//! its own work dir, in its own process group (Ctrl-C in a terminal reaches the
//! coordinator, which then stops its agents cleanly).

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tracing::{info, warn};

use super::{NodeLaunch, NodeProvider, StartedNode};

#[derive(Clone, Debug)]
pub struct LocalProvider {
    /// The `shoal` binary to run as `shoal agent`.
    pub program: PathBuf,
    /// Where agents reach the coordinator.
    pub endpoint: String,
    /// Each node works in `<root>/<node id>`.
    pub work_root: PathBuf,
    /// How long an agent gets to stop its jobs before it is killed.
    pub stop_grace: Duration,
}

impl NodeProvider for LocalProvider {
    fn create(&self, launch: NodeLaunch) -> BoxFuture<'static, Result<StartedNode, String>> {
        let this = self.clone();
        async move {
            let work_dir = this.work_root.join(&launch.node_id);
            std::fs::create_dir_all(&work_dir)
                .map_err(|e| format!("cannot create work dir {}: {e}", work_dir.display()))?;
            let log_path = work_dir.join("agent.log");
            let log = std::fs::File::create(&log_path)
                .map_err(|e| format!("cannot create {}: {e}", log_path.display()))?;
            let log_err = log
                .try_clone()
                .map_err(|e| format!("cannot open {}: {e}", log_path.display()))?;
            let mut command = tokio::process::Command::new(&this.program);
            command
                .arg("agent")
                .args(["--endpoint", &this.endpoint])
                .args(["--node-id", &launch.node_id])
                .args(["--cluster", &launch.cluster])
                .arg("--work-dir")
                .arg(&work_dir)
                .args(["--cores", &launch.cores.to_string()])
                .args(["--memory-bytes", &launch.memory_bytes.to_string()])
                .stdin(Stdio::null())
                .stdout(Stdio::from(log))
                .stderr(Stdio::from(log_err))
                .process_group(0);
            let mut child = command
                .spawn()
                .map_err(|e| format!("cannot start {}: {e}", this.program.display()))?;
            let pid = child.id();
            info!(node = %launch.node_id, ?pid, "local node started");
            let exited = async move {
                match child.wait().await {
                    Ok(status) => format!("agent exited ({status})"),
                    Err(e) => format!("agent could not be waited for: {e}"),
                }
            }
            .boxed();
            Ok(StartedNode { pid, exited })
        }
        .boxed()
    }

    fn remove(&self, node_id: String, pid: Option<u32>) -> BoxFuture<'static, ()> {
        let grace = self.stop_grace;
        async move {
            let Some(pid) = pid.and_then(|p| i32::try_from(p).ok()).map(Pid::from_raw) else {
                return;
            };
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
        .boxed()
    }
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
