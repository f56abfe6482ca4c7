//! Remote exec for MPI jobs, with no SSH: the launcher (instance 0) asks its own
//! agent, over a Unix socket only its sandbox sees, to run a command on another
//! node of the job; the agent relays the request through the coordinator to the
//! target node's agent, which runs it inside that node's sandbox of the same
//! attempt (its container, or the instance's environment and folder for the
//! process runtime) and streams output and exit status back the same way.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use futures::Stream;
use nix::sys::signal::Signal;
use nix::unistd::Pid;
use shoal_proto::v1 as pb;
use shoal_proto::v1::exec_frame::Kind;
use tokio::io::AsyncReadExt;
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::{UnboundedReceiverStream, UnixListenerStream};
use tonic::{Request, Response, Status};
use tracing::{debug, info, warn};

use crate::runtime::docker::DockerRuntime;
use crate::runtime::{Slot, process, spawn};

/// Where an instance's commands run.
#[derive(Clone, Debug)]
pub enum Sandbox {
    /// The process runtime: the instance's environment and working dir.
    Process {
        env: BTreeMap<String, String>,
        cwd: PathBuf,
    },
    /// The docker runtime: the instance's container, and its environment.
    Container { name: String, env: Vec<String> },
}

type FrameTx = mpsc::UnboundedSender<Result<pb::ExecFrame, Status>>;

struct Running {
    slot: Slot,
    /// The process group of a process-runtime exec.
    group: Option<i32>,
    task: tokio::task::AbortHandle,
}

#[derive(Default)]
struct State {
    sandboxes: HashMap<Slot, Sandbox>,
    /// Execs this node's launchers opened: exec id -> the launcher's stream.
    outgoing: HashMap<String, FrameTx>,
    /// Execs running here for another node's launcher.
    running: HashMap<String, Running>,
    /// Launcher sockets: slot -> what ends its server.
    servers: HashMap<Slot, oneshot::Sender<()>>,
}

#[derive(Clone)]
pub struct Execs {
    node_id: String,
    events: mpsc::UnboundedSender<crate::runtime::Outgoing>,
    docker: Option<DockerRuntime>,
    run_as: Option<crate::runtime::RunAs>,
    next: Arc<AtomicU64>,
    state: Arc<Mutex<State>>,
}

fn frame(id: &str, kind: Kind) -> pb::ExecFrame {
    pb::ExecFrame {
        exec_id: id.to_string(),
        kind: Some(kind),
    }
}

impl Execs {
    pub fn new(
        node_id: &str,
        events: mpsc::UnboundedSender<crate::runtime::Outgoing>,
        docker: Option<DockerRuntime>,
        run_as: Option<crate::runtime::RunAs>,
    ) -> Self {
        Execs {
            node_id: node_id.to_string(),
            events,
            docker,
            run_as,
            next: Arc::default(),
            state: Arc::default(),
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn send(&self, frame: pb::ExecFrame) {
        let _ = self.events.send(
            pb::AgentMessage {
                msg: Some(pb::agent_message::Msg::Exec(frame)),
            }
            .into(),
        );
    }

    /// The instance is up: other nodes' launchers may run commands in it.
    pub fn sandbox_ready(&self, slot: Slot, sandbox: Sandbox) {
        self.state().sandboxes.insert(slot, sandbox);
    }

    /// The instance ended: its sandbox closes, what runs in it is killed, and its
    /// launcher socket (if any) stops.
    pub fn instance_ended(&self, slot: &Slot) {
        let mut state = self.state();
        state.sandboxes.remove(slot);
        if let Some(stop) = state.servers.remove(slot) {
            let _ = stop.send(());
        }
        let ids: Vec<String> = state
            .running
            .iter()
            .filter(|(_, r)| &r.slot == slot)
            .map(|(id, _)| id.clone())
            .collect();
        for id in ids {
            if let Some(running) = state.running.remove(&id) {
                kill(&running);
            }
        }
    }

    /// Serves the launcher of `slot` (the MPI job's instance 0, whose token its
    /// execs show) on `socket`.
    pub fn serve_launcher(
        &self,
        slot: Slot,
        job_id: String,
        token: String,
        socket: &Path,
    ) -> std::io::Result<()> {
        let _ = std::fs::remove_file(socket);
        let listener = tokio::net::UnixListener::bind(socket)?;
        if let Some(user) = &self.run_as {
            // The launcher runs as this user: it must be able to connect.
            user.own(socket)?;
        }
        let (stop, stopped) = oneshot::channel();
        self.state().servers.insert(slot.clone(), stop);
        let service = Launcher {
            execs: self.clone(),
            slot,
            job_id,
            token,
        };
        tokio::spawn(async move {
            let served = tonic::transport::Server::builder()
                .add_service(pb::exec_server::ExecServer::new(service))
                .serve_with_incoming_shutdown(UnixListenerStream::new(listener), async {
                    let _ = stopped.await;
                })
                .await;
            if let Err(e) = served {
                warn!(error = %e, "launcher socket failed");
            }
        });
        Ok(())
    }

    /// A frame from the coordinator.
    pub fn frame(&self, incoming: pb::ExecFrame) {
        let id = incoming.exec_id;
        match incoming.kind {
            Some(Kind::Open(open)) => self.run_here(id, open),
            Some(kind @ Kind::Output(_)) => {
                if let Some(tx) = self.state().outgoing.get(&id) {
                    let _ = tx.send(Ok(frame(&id, kind)));
                }
            }
            Some(kind @ Kind::Exit(_)) => {
                if let Some(tx) = self.state().outgoing.remove(&id) {
                    let _ = tx.send(Ok(frame(&id, kind)));
                }
            }
            Some(Kind::Kill(reason)) => {
                if let Some(running) = self.state().running.remove(&id) {
                    info!(exec = %id, %reason, "killing exec");
                    kill(&running);
                }
            }
            None => {}
        }
    }

    /// The launcher went away before its exec ended.
    fn abandon(&self, id: &str) {
        if self.state().outgoing.remove(id).is_some() {
            self.send(frame(id, Kind::Kill("the launcher went away".into())));
        }
    }

    fn run_here(&self, id: String, open: pb::ExecOpen) {
        let slot = Slot {
            attempt_id: open.attempt_id.clone(),
            instance: open.target_instance,
        };
        let sandbox = self.state().sandboxes.get(&slot).cloned();
        let Some(sandbox) = sandbox else {
            let why = format!(
                "node {}: instance {} of attempt {} has no sandbox here (not started yet, or ended)",
                self.node_id, slot.instance, slot.attempt_id
            );
            self.send(frame(
                &id,
                Kind::Exit(pb::ExecExit {
                    exit_code: None,
                    message: why,
                }),
            ));
            return;
        };
        debug!(exec = %id, attempt = %slot.attempt_id, instance = slot.instance, command = %open.command, "exec");
        let this = self.clone();
        let task_id = id.clone();
        // Held while the task is spawned and recorded: it cannot end unrecorded.
        let mut state = self.state();
        let task = tokio::spawn(async move {
            let output = |stream: &'static str, data: Vec<u8>| {
                this.send(frame(
                    &task_id,
                    Kind::Output(pb::ExecOutput {
                        stream: stream.to_string(),
                        data,
                    }),
                ));
            };
            let started = |group: i32| {
                if let Some(running) = this.state().running.get_mut(&task_id) {
                    running.group = Some(group);
                }
            };
            let ended = match sandbox {
                Sandbox::Process { env, cwd } => {
                    let user = this.run_as.as_ref();
                    run_process(&open.command, &env, &cwd, user, started, &output).await
                }
                Sandbox::Container { name, env } => match &this.docker {
                    Some(docker) => docker
                        .exec(&name, &open.command, env, output)
                        .await
                        .map(|code| i32::try_from(code).unwrap_or(-1)),
                    None => Err("this node has no docker runtime".into()),
                },
            };
            let exit = match ended {
                Ok(code) => pb::ExecExit {
                    exit_code: Some(code),
                    message: String::new(),
                },
                Err(why) => pb::ExecExit {
                    exit_code: None,
                    message: why,
                },
            };
            if this.state().running.remove(&task_id).is_some() {
                this.send(frame(&task_id, Kind::Exit(exit)));
            }
        });
        state.running.insert(
            id,
            Running {
                slot,
                group: None,
                task: task.abort_handle(),
            },
        );
    }
}

fn kill(running: &Running) {
    if let Some(group) = running.group {
        process::signal_group(Pid::from_raw(group), Signal::SIGKILL);
    }
    running.task.abort();
}

/// `sh -c command` in the instance's environment and folder, in a process group of
/// its own (so a kill reaches its whole tree); its exit code.
async fn run_process(
    command: &str,
    env: &BTreeMap<String, String>,
    cwd: &Path,
    user: Option<&crate::runtime::RunAs>,
    started: impl FnOnce(i32),
    output: &(dyn Fn(&'static str, Vec<u8>) + Sync),
) -> Result<i32, String> {
    let argv = ["-c".to_string(), command.to_string()];
    let (mut child, mut stdout, mut stderr) = spawn::spawn(&spawn::SpawnSpec {
        program: "sh",
        args: &argv,
        env,
        cwd,
        user,
    })
    .map_err(|e| match e {
        spawn::SpawnError::NotFound => "cannot start sh: not found".to_string(),
        spawn::SpawnError::Other(e) => format!("cannot start sh: {e}"),
    })?;
    started(child.pid);
    let pump = |reader: &'static str| move |data: &[u8]| output(reader, data.to_vec());
    let out = pump("stdout");
    let err = pump("stderr");
    let mut out_buf = vec![0u8; 32 * 1024];
    let mut err_buf = vec![0u8; 32 * 1024];
    let (mut out_open, mut err_open) = (true, true);
    while out_open || err_open {
        tokio::select! {
            read = stdout.read(&mut out_buf), if out_open => match read {
                Ok(0) | Err(_) => out_open = false,
                Ok(n) => out(&out_buf[..n]),
            },
            read = stderr.read(&mut err_buf), if err_open => match read {
                Ok(0) | Err(_) => err_open = false,
                Ok(n) => err(&err_buf[..n]),
            },
        }
    }
    let status = child.wait().await.map_err(|e| format!("wait: {e}"))?;
    Ok(status.code().unwrap_or_else(|| {
        128 + std::os::unix::process::ExitStatusExt::signal(&status).unwrap_or(0)
    }))
}

/// The launcher-facing service: one per MPI launcher, bound to its slot, so a
/// caller can only reach the nodes of its own attempt.
struct Launcher {
    execs: Execs,
    slot: Slot,
    job_id: String,
    token: String,
}

/// The launcher's stream; dropping it early (the launcher died) kills the exec.
struct ExecStream {
    inner: UnboundedReceiverStream<Result<pb::ExecFrame, Status>>,
    id: String,
    execs: Execs,
}

impl Stream for ExecStream {
    type Item = Result<pb::ExecFrame, Status>;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        Pin::new(&mut self.inner).poll_next(cx)
    }
}

impl Drop for ExecStream {
    fn drop(&mut self) {
        self.execs.abandon(&self.id);
    }
}

#[tonic::async_trait]
impl pb::exec_server::Exec for Launcher {
    type RunStream = ExecStream;

    async fn run(&self, request: Request<pb::ExecOpen>) -> Result<Response<ExecStream>, Status> {
        let asked = request.into_inner();
        if asked.target_node.is_empty() || asked.command.is_empty() {
            return Err(Status::invalid_argument(
                "an exec needs a target node and a command",
            ));
        }
        let n = self.execs.next.fetch_add(1, Ordering::Relaxed);
        let id = format!("{}/{}/{n}", self.execs.node_id, self.slot.attempt_id);
        let (tx, rx) = mpsc::unbounded_channel();
        self.execs.state().outgoing.insert(id.clone(), tx);
        let open = pb::ExecOpen {
            job_id: self.job_id.clone(),
            attempt_id: self.slot.attempt_id.clone(),
            target_node: asked.target_node,
            target_instance: 0,
            command: asked.command,
            source_instance: self.slot.instance,
            token: self.token.clone(),
        };
        self.execs.send(frame(&id, Kind::Open(open)));
        Ok(Response::new(ExecStream {
            inner: UnboundedReceiverStream::new(rx),
            id,
            execs: self.execs.clone(),
        }))
    }
}
