//! The agent's session loop and the life of each launched instance.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use shoal_proto::PROTOCOL_VERSION;
use shoal_proto::v1 as pb;
use shoal_proto::v1::agent_client::AgentClient;
use shoal_proto::v1::jobs_client::JobsClient;
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::{Channel, Endpoint};
use tracing::{debug, info, warn};

use crate::runtime::docker::{self, DockerRuntime};
use crate::runtime::{EventSink, Outcome, ProcessRuntime, RunSpec, Runtime, Slot, Stop};
use crate::telemetry::{self, Telemetry};
use crate::{AgentConfig, AgentError, archive};

/// How long an exit is remembered for re-registration, in case it was never delivered.
const EXIT_MEMORY: Duration = Duration::from_secs(300);
const MAX_MESSAGE_BYTES: usize = 256 << 20;

struct Entry {
    stop: watch::Sender<Option<Stop>>,
    exited: Option<(pb::Exited, Instant)>,
}

#[derive(Clone)]
struct Agent {
    config: Arc<AgentConfig>,
    client: AgentClient<Channel>,
    jobs: JobsClient<Channel>,
    process: Arc<ProcessRuntime>,
    /// The docker runtime, or why this node has none.
    docker: Result<DockerRuntime, String>,
    attempts: Arc<Mutex<HashMap<Slot, Entry>>>,
    events: mpsc::UnboundedSender<pb::AgentMessage>,
    telemetry: Telemetry,
    cores: u32,
    memory_bytes: u64,
    hostname: String,
}

enum SessionEnd {
    /// Told to stop (by the coordinator or a signal); the work is stopped.
    Stopped(String),
    Rejected(String),
    Lost(String),
}

/// Runs the agent until it is told to stop, `shutdown` resolves, or it gives up.
pub async fn run(
    config: AgentConfig,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), AgentError> {
    std::fs::create_dir_all(config.work_dir.join("attempts"))
        .map_err(|e| AgentError::WorkDir(config.work_dir.clone(), e))?;
    let endpoint = Endpoint::from_shared(config.endpoint.clone())
        .map_err(|e| AgentError::Endpoint(config.endpoint.clone(), e.to_string()))?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(3))
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(20));
    let channel = endpoint.connect_lazy();
    let client = AgentClient::new(channel.clone())
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let jobs = JobsClient::new(channel)
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES);
    let (default_cores, default_memory) = telemetry::capacity();
    let (events, mut events_rx) = mpsc::unbounded_channel();
    let cores = config.cores.unwrap_or(default_cores);
    let memory_bytes = config.memory_bytes.unwrap_or(default_memory);
    let network = config.docker_network.clone();
    let docker =
        DockerRuntime::connect(&config.owner, &config.node_id, cores, memory_bytes, network).await;
    match &docker {
        Ok(_) => info!("docker runtime ready"),
        Err(why) => info!(%why, "no docker runtime: jobs with an image fail on this node"),
    }
    let agent = Agent {
        cores,
        memory_bytes,
        docker,
        hostname: telemetry::hostname(),
        config: Arc::new(config),
        client,
        jobs,
        process: Arc::new(ProcessRuntime),
        attempts: Arc::default(),
        events,
        telemetry: Telemetry::start(Duration::from_secs(2)),
    };
    info!(node = %agent.config.node_id, endpoint = %agent.config.endpoint, cores = agent.cores, "agent starting");

    agent.recover_containers().await;
    let mut shutdown: Pin<Box<dyn Future<Output = ()> + Send + '_>> = Box::pin(shutdown);
    let mut backoff = Duration::from_millis(50);
    let mut last_contact = Instant::now();
    loop {
        let (end, registered) = agent.session(&mut events_rx, &mut shutdown).await;
        if registered {
            last_contact = Instant::now();
            backoff = Duration::from_millis(50);
        }
        match end {
            SessionEnd::Stopped(reason) => {
                info!(%reason, "agent stopped");
                return Ok(());
            }
            SessionEnd::Rejected(reason) => {
                agent.stop_all("the coordinator refused this agent").await;
                return Err(AgentError::Rejected(reason));
            }
            SessionEnd::Lost(why) => {
                if last_contact.elapsed() > agent.config.give_up_after {
                    agent.stop_all("the coordinator is gone").await;
                    return Err(AgentError::CoordinatorLost {
                        endpoint: agent.config.endpoint.clone(),
                        seconds: agent.config.give_up_after.as_secs(),
                        last: why,
                    });
                }
                debug!(%why, retry_in = ?backoff, "session lost; reconnecting");
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = &mut shutdown => {
                        agent.stop_all("the agent is stopping").await;
                        return Ok(());
                    }
                }
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
        }
    }
}

impl Agent {
    fn register_message(&self) -> pb::AgentMessage {
        let mut attempts = self.attempts.lock().unwrap_or_else(|p| p.into_inner());
        attempts.retain(|_, e| {
            e.exited
                .as_ref()
                .is_none_or(|(_, at)| at.elapsed() < EXIT_MEMORY)
        });
        let reports = attempts
            .iter()
            .map(|(slot, entry)| pb::AttemptReport {
                attempt_id: slot.attempt_id.clone(),
                instance: slot.instance,
                exited: entry.exited.as_ref().map(|(e, _)| e.clone()),
            })
            .collect();
        pb::AgentMessage {
            msg: Some(pb::agent_message::Msg::Register(pb::Register {
                protocol_version: PROTOCOL_VERSION,
                node_id: self.config.node_id.clone(),
                cluster: self.config.cluster.clone(),
                cores: self.cores,
                memory_bytes: self.memory_bytes,
                runtimes: self.runtimes(),
                attempts: reports,
                hostname: self.hostname.clone(),
                pid: std::process::id(),
            })),
        }
    }

    fn runtimes(&self) -> Vec<String> {
        let mut runtimes = vec![self.process.name().to_string()];
        if let Ok(docker) = &self.docker {
            runtimes.push(docker.name().to_string());
        }
        runtimes
    }

    /// Containers an earlier agent of this node started: watched to their end as if
    /// this agent had launched them, and reported at registration.
    async fn recover_containers(&self) {
        let Ok(docker) = &self.docker else {
            return;
        };
        for found in docker.recover().await {
            let (stop, stop_rx) = watch::channel(None);
            {
                let mut attempts = self.attempts.lock().unwrap_or_else(|p| p.into_inner());
                attempts.insert(found.slot.clone(), Entry { stop, exited: None });
            }
            info!(attempt = %found.slot.attempt_id, instance = found.slot.instance, "recovered a container");
            let agent = self.clone();
            let docker = docker.clone();
            tokio::spawn(async move {
                let sink = EventSink {
                    slot: found.slot.clone(),
                    tx: agent.events.clone(),
                };
                let since = docker::recovery_since();
                let grace = agent.config.stop_grace;
                let outcome = docker
                    .follow(
                        found.container,
                        sink.clone(),
                        stop_rx,
                        found.deadline,
                        grace,
                        since,
                    )
                    .await;
                agent.finish(found.slot, sink, outcome).await;
            });
        }
    }

    fn heartbeat(&self) -> pb::AgentMessage {
        let sample = self.telemetry.latest();
        pb::AgentMessage {
            msg: Some(pb::agent_message::Msg::Heartbeat(pb::Heartbeat {
                cpu_percent: sample.cpu_percent,
                memory_used_bytes: sample.memory_used_bytes,
                memory_total_bytes: sample.memory_total_bytes,
            })),
        }
    }

    /// One session; returns how it ended and whether it got as far as registering.
    async fn session(
        &self,
        events_rx: &mut mpsc::UnboundedReceiver<pb::AgentMessage>,
        shutdown: &mut Pin<Box<dyn Future<Output = ()> + Send + '_>>,
    ) -> (SessionEnd, bool) {
        use pb::coordinator_message::Msg;
        let (out_tx, out_rx) = mpsc::channel(4096);
        let _ = out_tx.send(self.register_message()).await;
        let mut client = self.client.clone();
        let response = tokio::select! {
            response = client.session(ReceiverStream::new(out_rx)) => response,
            _ = shutdown.as_mut() => {
                self.stop_all("the agent is stopping").await;
                return (SessionEnd::Stopped("signal".into()), false);
            }
        };
        let mut inbound = match response {
            Ok(response) => response.into_inner(),
            Err(status) => {
                let end = match status.code() {
                    tonic::Code::NotFound
                    | tonic::Code::FailedPrecondition
                    | tonic::Code::InvalidArgument => {
                        SessionEnd::Rejected(status.message().to_string())
                    }
                    _ => SessionEnd::Lost(status.to_string()),
                };
                return (end, false);
            }
        };
        info!(node = %self.config.node_id, "registered");
        let mut heartbeat = tokio::time::interval(Duration::from_secs(5));
        let mut stopping: Option<(String, Instant)> = None;
        let mut check = tokio::time::interval(Duration::from_millis(50));
        loop {
            tokio::select! {
                message = inbound.message() => {
                    let message = match message {
                        Ok(Some(message)) => message,
                        Ok(None) => return (SessionEnd::Lost("the coordinator closed the session".into()), true),
                        Err(status) => return (SessionEnd::Lost(status.to_string()), true),
                    };
                    match message.msg {
                        Some(Msg::Registered(registered)) => {
                            let period = Duration::from_millis(registered.heartbeat_interval_ms.max(200));
                            heartbeat = tokio::time::interval(period);
                        }
                        Some(Msg::Launch(launch)) => self.launch(launch),
                        Some(Msg::Cancel(cancel)) => {
                            let slot = Slot { attempt_id: cancel.attempt_id, instance: cancel.instance };
                            self.cancel(&slot, &cancel.reason);
                        }
                        Some(Msg::Preempt(preempt)) => {
                            let notice = Duration::from_millis(preempt.notice_ms);
                            warn!(reason = %preempt.reason, notice_s = notice.as_secs(), "node preempted; stopping its jobs");
                            self.stop_every(Stop::Preempt { reason: preempt.reason, notice });
                        }
                        Some(Msg::Shutdown(shutdown)) => {
                            info!(reason = %shutdown.reason, "coordinator asked this agent to stop");
                            self.cancel_all(&shutdown.reason);
                            stopping.get_or_insert((shutdown.reason, Instant::now()));
                        }
                        None => {}
                    }
                }
                Some(event) = events_rx.recv() => {
                    if out_tx.send(event).await.is_err() {
                        return (SessionEnd::Lost("the session's stream closed".into()), true);
                    }
                }
                _ = heartbeat.tick() => {
                    if out_tx.send(self.heartbeat()).await.is_err() {
                        return (SessionEnd::Lost("the session's stream closed".into()), true);
                    }
                }
                _ = shutdown.as_mut(), if stopping.is_none() => {
                    info!("stopping on signal");
                    self.cancel_all("the agent is stopping");
                    stopping = Some(("signal".into(), Instant::now()));
                }
                _ = check.tick(), if stopping.is_some() => {
                    let all_exited = self.running_count() == 0;
                    let waited = stopping.as_ref().map(|(_, at)| at.elapsed()).unwrap_or_default();
                    if (all_exited && events_rx.is_empty()) || waited > self.config.stop_grace * 2 {
                        // Let the last events reach the wire before the process ends.
                        drop(out_tx);
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        let reason = stopping.map(|(r, _)| r).unwrap_or_default();
                        return (SessionEnd::Stopped(reason), true);
                    }
                }
            }
        }
    }

    fn running_count(&self) -> usize {
        let attempts = self.attempts.lock().unwrap_or_else(|p| p.into_inner());
        attempts.values().filter(|e| e.exited.is_none()).count()
    }

    fn cancel(&self, slot: &Slot, reason: &str) {
        let attempts = self.attempts.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(entry) = attempts.get(slot) {
            info!(attempt = %slot.attempt_id, instance = slot.instance, reason, "canceling");
            entry
                .stop
                .send_replace(Some(Stop::Cancel(reason.to_string())));
        }
    }

    fn cancel_all(&self, reason: &str) {
        self.stop_every(Stop::Cancel(reason.to_string()));
    }

    fn stop_every(&self, stop: Stop) {
        let attempts = self.attempts.lock().unwrap_or_else(|p| p.into_inner());
        for entry in attempts.values().filter(|e| e.exited.is_none()) {
            entry.stop.send_replace(Some(stop.clone()));
        }
    }

    /// Stops everything with no session to report to, and waits (bounded) for it.
    async fn stop_all(&self, reason: &str) {
        self.cancel_all(reason);
        let deadline = Instant::now() + self.config.stop_grace * 2;
        while self.running_count() > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn launch(&self, launch: pb::Launch) {
        let slot = Slot {
            attempt_id: launch.attempt_id.clone(),
            instance: launch.instance,
        };
        let (stop, stop_rx) = watch::channel(None);
        {
            let mut attempts = self.attempts.lock().unwrap_or_else(|p| p.into_inner());
            if attempts.contains_key(&slot) {
                debug!(attempt = %slot.attempt_id, "launch repeated; already running");
                return;
            }
            attempts.insert(slot.clone(), Entry { stop, exited: None });
        }
        info!(attempt = %slot.attempt_id, instance = slot.instance, "launching");
        let agent = self.clone();
        tokio::spawn(async move { agent.run_instance(slot, launch, stop_rx).await });
    }

    async fn run_instance(
        self,
        slot: Slot,
        launch: pb::Launch,
        stop: watch::Receiver<Option<Stop>>,
    ) {
        let sink = EventSink {
            slot: slot.clone(),
            tx: self.events.clone(),
        };
        let dir = self
            .config
            .work_dir
            .join("attempts")
            .join(format!("{}-{}", slot.attempt_id, slot.instance));
        let outcome = match self.prepare(&dir, &launch).await {
            Err(why) => Outcome::failed(why),
            Ok(()) => {
                let mut env: std::collections::BTreeMap<String, String> =
                    launch.env.into_iter().collect();
                env.insert(
                    "SHOAL_OUTPUT_DIR".into(),
                    dir.join("outputs").to_string_lossy().into_owned(),
                );
                let image = (!launch.image.is_empty()).then_some(launch.image);
                let spec = RunSpec {
                    slot: slot.clone(),
                    argv: launch.argv,
                    env,
                    cwd: dir.clone(),
                    timeout: (launch.timeout_seconds > 0)
                        .then(|| Duration::from_secs(launch.timeout_seconds)),
                    stop_grace: self.config.stop_grace,
                    image,
                    gpus: Vec::new(),
                };
                match (&spec.image, &self.docker) {
                    (None, _) => self.process.run(spec, sink.clone(), stop).await,
                    (Some(_), Ok(docker)) => docker.run(spec, sink.clone(), stop).await,
                    (Some(image), Err(why)) => Outcome::failed(format!(
                        "node {} cannot run image `{image}`: {why}",
                        self.config.node_id
                    )),
                }
            }
        };
        self.finish(slot, sink, outcome).await;
    }

    /// Uploads outputs, records and reports the exit, and clears the working dir.
    async fn finish(&self, slot: Slot, sink: EventSink, mut outcome: Outcome) {
        let dir = self
            .config
            .work_dir
            .join("attempts")
            .join(format!("{}-{}", slot.attempt_id, slot.instance));
        if let Err(why) = self.upload_outputs(&slot, &dir.join("outputs")).await {
            warn!(attempt = %slot.attempt_id, %why, "outputs not uploaded");
            outcome.message = format!("{} (outputs not uploaded: {why})", outcome.message)
                .trim()
                .to_string();
        }
        info!(attempt = %slot.attempt_id, instance = slot.instance, outcome = outcome.outcome, code = ?outcome.exit_code, "instance ended");
        {
            let mut attempts = self.attempts.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(entry) = attempts.get_mut(&slot) {
                entry.exited = Some((outcome.to_wire(), Instant::now()));
            }
        }
        sink.exited(&outcome);
        let _ = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(dir)).await;
    }

    /// The working dir: a fresh copy of the job's code, with an empty `outputs/`.
    async fn prepare(&self, dir: &std::path::Path, launch: &pb::Launch) -> Result<(), String> {
        let code = if launch.has_code {
            let mut client = self.client.clone();
            let request = pb::JobRef {
                id: launch.job_id.clone(),
            };
            let artifact = client
                .fetch_code(request)
                .await
                .map_err(|s| format!("could not fetch the job's code: {}", s.message()))?;
            Some(artifact.into_inner().data)
        } else {
            None
        };
        // A rerun (after a preemption or a lost node) starts from the outputs, and so
        // the checkpoints, that this instance's last attempt left.
        let previous = if launch.restore_outputs {
            let mut jobs = self.jobs.clone();
            let request = pb::JobRef {
                id: launch.job_id.clone(),
            };
            let outputs = jobs.download_outputs(request).await.map_err(|s| {
                format!(
                    "could not fetch the last attempt's outputs: {}",
                    s.message()
                )
            })?;
            outputs
                .into_inner()
                .outputs
                .into_iter()
                .find(|o| o.instance == launch.instance)
                .map(|o| o.data)
        } else {
            None
        };
        let dir = dir.to_path_buf();
        tokio::task::spawn_blocking(move || -> Result<(), String> {
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(dir.join("outputs"))
                .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
            if let Some(code) = code {
                archive::unpack(&code, &dir)
                    .map_err(|e| format!("cannot unpack the job's code: {e}"))?;
            }
            if let Some(outputs) = previous {
                archive::unpack(&outputs, &dir.join("outputs"))
                    .map_err(|e| format!("cannot restore the last attempt's outputs: {e}"))?;
            }
            Ok(())
        })
        .await
        .map_err(|e| format!("preparing the working dir failed: {e}"))?
    }

    async fn upload_outputs(&self, slot: &Slot, outputs: &std::path::Path) -> Result<(), String> {
        let outputs = outputs.to_path_buf();
        let packed = tokio::task::spawn_blocking(move || archive::pack_dir(&outputs))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("cannot pack outputs: {e}"))?;
        let Some(data) = packed else {
            return Ok(());
        };
        let upload = pb::OutputsUpload {
            attempt_id: slot.attempt_id.clone(),
            instance: slot.instance,
            data,
        };
        let mut last = String::new();
        for attempt in 0..5u32 {
            let mut client = self.client.clone();
            match client.upload_outputs(upload.clone()).await {
                Ok(_) => return Ok(()),
                Err(status) => last = status.message().to_string(),
            }
            tokio::time::sleep(Duration::from_millis(200 << attempt)).await;
        }
        Err(last)
    }
}
