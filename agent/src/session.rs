//! The agent's session loop and the life of each launched instance.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use shoal_proto::PROTOCOL_VERSION;
use shoal_proto::v1 as pb;
use shoal_proto::v1::agent_client::AgentClient;
use shoal_proto::{AuthChannel, Bearer};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tracing::{debug, info, warn};

use crate::gpu::{GpuAllocator, Usage};
use crate::runtime::docker::{self, DockerRuntime};
use crate::runtime::{EventSink, Outcome, ProcessRuntime, RunSpec, Runtime, Slot, Stop};
use crate::telemetry::{self, Telemetry};
use crate::{AgentConfig, AgentError, archive};

mod data;
mod parallel;

/// How long an exit is remembered for re-registration, in case it was never delivered.
const EXIT_MEMORY: Duration = Duration::from_secs(300);
const MAX_MESSAGE_BYTES: usize = 256 << 20;

struct Entry {
    stop: watch::Sender<Option<Stop>>,
    exited: Option<(pb::Exited, Instant)>,
    /// GPUs it holds.
    gpus: Vec<u32>,
    /// Its process group (its leader's pid), once started.
    group: Option<i32>,
    usage: Usage,
    /// Its token, shown on every call about it.
    token: String,
    /// Its named outputs (name, a folder?), uploaded when it ends.
    outputs: Vec<(String, bool)>,
}

impl Entry {
    fn new(stop: watch::Sender<Option<Stop>>, gpus: Vec<u32>, token: String) -> Self {
        Entry {
            stop,
            exited: None,
            gpus,
            group: None,
            usage: Usage::default(),
            token,
            outputs: Vec::new(),
        }
    }
}

/// The variables that show a process exactly its GPUs.
fn gpu_env(gpus: &[u32]) -> Vec<(String, String)> {
    if gpus.is_empty() {
        return Vec::new();
    }
    let ids: Vec<String> = gpus.iter().map(u32::to_string).collect();
    let ids = ids.join(",");
    vec![
        ("CUDA_VISIBLE_DEVICES".into(), ids.clone()),
        ("NVIDIA_VISIBLE_DEVICES".into(), ids),
    ]
}

fn usage_to_wire(usage: &Usage) -> pb::Usage {
    pb::Usage {
        samples: usage.samples,
        gpu_utilization_avg_percent: usage.average_utilization_percent(),
        gpu_utilization_peak_percent: usage.peak_utilization_percent,
        gpu_memory_peak_bytes: usage.peak_memory_bytes,
        gpu_energy_joules: usage.energy_joules(),
        cpu_seconds: usage.cpu_seconds,
        gpu_utilization_percent: usage.current_utilization_percent,
        gpu_memory_bytes: usage.current_memory_bytes,
    }
}

fn gpu_stat(s: &crate::gpu::GpuSample) -> pb::GpuStat {
    pb::GpuStat {
        index: s.index,
        uuid: s.uuid.clone(),
        model: s.model.clone(),
        utilization_percent: s.utilization_percent,
        memory_used_bytes: s.memory_used_bytes,
        memory_total_bytes: s.memory_total_bytes,
        temperature_c: s.temperature_c,
        power_milliwatts: s.power_milliwatts,
        energy_millijoules: s.energy_millijoules,
        process_ids: s.process_ids.clone(),
    }
}

#[derive(Clone)]
struct Agent {
    config: Arc<AgentConfig>,
    client: AgentClient<AuthChannel>,
    process: Arc<ProcessRuntime>,
    /// The docker runtime, or why this node has none.
    docker: Result<DockerRuntime, String>,
    attempts: Arc<Mutex<HashMap<Slot, Entry>>>,
    events: mpsc::UnboundedSender<pb::AgentMessage>,
    telemetry: Telemetry,
    gpu_allocator: Arc<Mutex<GpuAllocator>>,
    execs: crate::exec::Execs,
    identity: crate::identity::TokenEndpoint,
    cores: u32,
    memory_bytes: u64,
    hostname: String,
    contact: Arc<Contact>,
}

/// When the coordinator was last heard from, and the lease it set.
struct Contact {
    last: Mutex<Instant>,
    lease_ms: std::sync::atomic::AtomicU64,
}

impl Contact {
    fn heard(&self) {
        *self.last.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
    }

    fn silent(&self) -> Duration {
        self.last
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .elapsed()
    }

    fn lease(&self) -> Duration {
        Duration::from_millis(self.lease_ms.load(std::sync::atomic::Ordering::Relaxed))
    }
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
    let endpoint = crate::endpoint(&config.endpoint, config.ca_file.as_deref(), config.lease)?;
    let channel = endpoint.connect_lazy();
    let bearer = Bearer::new(config.token.as_deref()).map_err(AgentError::Token)?;
    let client = AgentClient::with_interceptor(channel, bearer)
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
    let (gpus, mut gpu_reason) = crate::gpu::detect();
    let gpus: Box<dyn crate::gpu::GpuSource> = match config.gpu_slice {
        Some((slice, per_node)) if gpu_reason.is_none() => {
            let (sliced, short) = crate::gpu::Slice::of(gpus, slice, per_node);
            gpu_reason = short;
            Box::new(sliced)
        }
        _ => gpus,
    };
    let telemetry = Telemetry::start(
        config.telemetry_interval,
        config.work_dir.clone(),
        gpus,
        gpu_reason,
    );
    let run_as = config
        .run_as
        .as_deref()
        .map(crate::runtime::RunAs::lookup)
        .transpose()
        .map_err(AgentError::RunAs)?;
    if let Some(user) = &run_as {
        info!(user = %user.name, uid = user.uid, "process jobs run as an unprivileged user");
    }
    let execs = crate::exec::Execs::new(
        &config.node_id,
        events.clone(),
        docker.clone().ok(),
        run_as.clone(),
    );
    let identity = crate::identity::TokenEndpoint::start(client.clone())
        .await
        .map_err(|e| AgentError::WorkDir(config.work_dir.clone(), e))?;
    let contact = Arc::new(Contact {
        last: Mutex::new(Instant::now()),
        lease_ms: (config.lease.as_millis() as u64).into(),
    });
    let agent = Agent {
        contact,
        identity,
        execs,
        cores,
        memory_bytes,
        docker,
        hostname: telemetry::hostname(),
        config: Arc::new(config),
        client,
        process: Arc::new(ProcessRuntime { run_as }),
        attempts: Arc::default(),
        events,
        gpu_allocator: Arc::default(),
        telemetry,
    };
    *agent
        .gpu_allocator
        .lock()
        .unwrap_or_else(|p| p.into_inner()) =
        GpuAllocator::new(agent.telemetry.gpus.iter().map(|g| g.index));
    match &agent.telemetry.gpu_reason {
        Some(why) => info!(%why, "this node reports 0 GPUs"),
        None => info!(gpus = agent.telemetry.gpus.len(), "GPUs found"),
    }
    info!(node = %agent.config.node_id, endpoint = %agent.config.endpoint, cores = agent.cores, "agent starting");

    agent.recover_containers().await;
    let fencing = agent.fence_when_alone();
    let _stop_fencing = AbortOnDrop(fencing);
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

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

impl Agent {
    /// Fencing: having heard nothing from the coordinator for most of a lease,
    /// the agent stops its work itself, so that when the coordinator reruns it
    /// elsewhere (a lease after it last heard from this agent) it no longer runs
    /// here. The exits are reported once the coordinator is back.
    fn fence_when_alone(&self) -> tokio::task::JoinHandle<()> {
        let agent = self.clone();
        tokio::spawn(async move {
            let mut fenced = false;
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            loop {
                tick.tick().await;
                let silent = agent.contact.silent();
                let after = crate::fence_after(agent.contact.lease(), agent.config.stop_grace);
                if silent < after {
                    fenced = false;
                    continue;
                }
                if fenced {
                    continue;
                }
                fenced = true;
                let running = agent.running_count();
                if running > 0 {
                    warn!(
                        silent_s = silent.as_secs(),
                        running,
                        "no word from the coordinator: stopping this node's work (it is rerun elsewhere)"
                    );
                    agent.stop_every(Stop::Cancel(format!(
                        "fenced: no word from the coordinator for {} s; the work is rerun elsewhere",
                        silent.as_secs()
                    )));
                }
            }
        })
    }

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
                gpus: self
                    .telemetry
                    .gpus
                    .iter()
                    .map(|g| pb::GpuStat {
                        index: g.index,
                        uuid: g.uuid.clone(),
                        model: g.model.clone(),
                        memory_total_bytes: g.memory_total_bytes,
                        ..Default::default()
                    })
                    .collect(),
                gpu_reason: self.telemetry.gpu_reason.clone().unwrap_or_default(),
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
                attempts.insert(
                    found.slot.clone(),
                    Entry::new(stop, Vec::new(), found.token.clone()),
                );
            }
            info!(attempt = %found.slot.attempt_id, instance = found.slot.instance, "recovered a container");
            let agent = self.clone();
            let docker = docker.clone();
            tokio::spawn(async move {
                let sink = EventSink {
                    slot: found.slot.clone(),
                    tx: agent.events.clone(),
                    gpus: Vec::new(),
                    rank_failure: None,
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

    /// The latest sample, with each running instance's usage brought up to date.
    fn heartbeat(&self) -> pb::AgentMessage {
        let sample = self.telemetry.latest();
        let mut usage = Vec::new();
        {
            let mut attempts = self.attempts.lock().unwrap_or_else(|p| p.into_inner());
            for (slot, entry) in attempts.iter_mut().filter(|(_, e)| e.exited.is_none()) {
                entry.usage.observe(&sample.gpus, &entry.gpus);
                if let Some(seconds) = entry
                    .group
                    .and_then(|g| sample.cpu_seconds_by_group.get(&g))
                {
                    entry.usage.cpu_seconds = entry.usage.cpu_seconds.max(*seconds);
                }
                usage.push(pb::InstanceUsage {
                    attempt_id: slot.attempt_id.clone(),
                    instance: slot.instance,
                    usage: Some(usage_to_wire(&entry.usage)),
                });
            }
        }
        pb::AgentMessage {
            msg: Some(pb::agent_message::Msg::Heartbeat(pb::Heartbeat {
                cpu_percent: sample.cpu_percent,
                memory_used_bytes: sample.memory_used_bytes,
                memory_total_bytes: sample.memory_total_bytes,
                per_core_percent: sample.per_core_percent,
                disk_free_bytes: sample.disk_free_bytes,
                disk_total_bytes: sample.disk_total_bytes,
                network_rx_bytes: sample.network_rx_bytes,
                network_tx_bytes: sample.network_tx_bytes,
                gpus: sample.gpus.iter().map(gpu_stat).collect(),
                usage,
            })),
        }
    }

    /// Remembers an instance's process group when it starts (for its CPU time).
    fn note_start(&self, event: &pb::AgentMessage) {
        if let Some(pb::agent_message::Msg::Event(pb::AttemptEvent {
            attempt_id,
            instance,
            kind: Some(pb::attempt_event::Kind::Started(started)),
        })) = &event.msg
        {
            let slot = Slot {
                attempt_id: attempt_id.clone(),
                instance: *instance,
            };
            let mut attempts = self.attempts.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(entry) = attempts.get_mut(&slot) {
                entry.group = i32::try_from(started.pid).ok().filter(|p| *p > 0);
            }
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
                    | tonic::Code::InvalidArgument
                    | tonic::Code::Unauthenticated
                    | tonic::Code::PermissionDenied => {
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
        let mut alone = tokio::time::interval(Duration::from_millis(250));
        self.contact.heard();
        loop {
            tokio::select! {
                message = inbound.message() => {
                    let message = match message {
                        Ok(Some(message)) => message,
                        Ok(None) => return (SessionEnd::Lost("the coordinator closed the session".into()), true),
                        Err(status) => return (SessionEnd::Lost(status.to_string()), true),
                    };
                    self.contact.heard();
                    match message.msg {
                        Some(Msg::Registered(registered)) => {
                            let period = Duration::from_millis(registered.heartbeat_interval_ms.max(200));
                            heartbeat = tokio::time::interval(period);
                            if registered.lease_ms > 0 {
                                self.contact.lease_ms.store(registered.lease_ms, std::sync::atomic::Ordering::Relaxed);
                            }
                        }
                        Some(Msg::Pong(_)) => {}
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
                        Some(Msg::Exec(frame)) => self.execs.frame(frame),
                        Some(Msg::Shutdown(shutdown)) => {
                            info!(reason = %shutdown.reason, "coordinator asked this agent to stop");
                            self.cancel_all(&shutdown.reason);
                            stopping.get_or_insert((shutdown.reason, Instant::now()));
                        }
                        None => {}
                    }
                }
                Some(event) = events_rx.recv() => {
                    self.note_start(&event);
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
                // A session that hears nothing (a cut network leaves it open) is
                // given up, and a fresh one tried.
                _ = alone.tick(), if stopping.is_none() => {
                    let silent = self.contact.silent();
                    if silent > crate::fence_after(self.contact.lease(), self.config.stop_grace) {
                        return (SessionEnd::Lost(format!("no word from the coordinator for {} s", silent.as_secs())), true);
                    }
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
            // Exact GPUs, never shared; None if this node has too few free.
            let gpus = self
                .gpu_allocator
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .allocate(launch.gpus);
            let mut entry =
                Entry::new(stop, gpus.clone().unwrap_or_default(), launch.token.clone());
            entry.outputs = launch
                .outputs
                .iter()
                .map(|o| (o.name.clone(), o.folder))
                .collect();
            attempts.insert(slot.clone(), entry);
            if gpus.is_none() {
                let free = self.gpu_allocator.lock().map(|g| g.free()).unwrap_or(0);
                let why = format!(
                    "node {} has {free} free GPU(s); the job needs {} per instance",
                    self.config.node_id, launch.gpus
                );
                let agent = self.clone();
                tokio::spawn(async move {
                    let sink = EventSink {
                        slot: slot.clone(),
                        tx: agent.events.clone(),
                        gpus: Vec::new(),
                        rank_failure: None,
                    };
                    agent.finish(slot, sink, Outcome::failed(why)).await;
                });
                return;
            }
        }
        info!(attempt = %slot.attempt_id, instance = slot.instance, "launching");
        let agent = self.clone();
        tokio::spawn(async move { agent.run_instance(slot, launch, stop_rx).await });
    }

    async fn run_instance(
        self,
        slot: Slot,
        mut launch: pb::Launch,
        stop: watch::Receiver<Option<Stop>>,
    ) {
        let gpus = {
            let attempts = self.attempts.lock().unwrap_or_else(|p| p.into_inner());
            attempts
                .get(&slot)
                .map(|e| e.gpus.clone())
                .unwrap_or_default()
        };
        let sink = EventSink {
            slot: slot.clone(),
            tx: self.events.clone(),
            gpus: gpus.clone(),
            rank_failure: (launch.mpi && slot.instance == 0).then(Arc::default),
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
                    std::mem::take(&mut launch.env).into_iter().collect();
                env.insert(
                    "SHOAL_OUTPUT_DIR".into(),
                    dir.join("outputs").to_string_lossy().into_owned(),
                );
                env.extend(gpu_env(&gpus));
                if let Some(secret) = env.get("IDENTITY_HEADER").cloned() {
                    self.identity
                        .admit(&secret, slot.clone(), launch.token.clone());
                    env.insert("IDENTITY_ENDPOINT".into(), self.identity.url.clone());
                }
                let image = (!launch.image.is_empty()).then_some(launch.image.clone());
                let root = if image.is_some() {
                    "/job".to_string()
                } else {
                    dir.to_string_lossy().into_owned()
                };
                let mut argv = data::substitute(std::mem::take(&mut launch.argv), &launch, &root);
                if image.is_none() && !launch.path_prefix.is_empty() {
                    // A host environment: its prefix's programs come first.
                    let path = std::env::var("PATH").unwrap_or_default();
                    let prefix = launch.path_prefix.trim_end_matches('/');
                    env.insert("PATH".into(), format!("{prefix}/bin:{path}"));
                    env.insert("VIRTUAL_ENV".into(), prefix.to_string());
                }
                let mut mounts = Vec::new();
                if launch.mpi {
                    let job = (launch.job_id.as_str(), launch.token.as_str());
                    match self.mpi_sandbox(&slot, job, image.is_some(), &mut env) {
                        Ok((wrapped, extra)) => {
                            argv = wrapped.into_iter().chain(argv).collect();
                            mounts = extra;
                        }
                        Err(why) => {
                            self.finish(slot, sink, Outcome::failed(why)).await;
                            return;
                        }
                    }
                }
                let spec = RunSpec {
                    slot: slot.clone(),
                    argv,
                    env,
                    cwd: dir.clone(),
                    timeout: (launch.timeout_seconds > 0)
                        .then(|| Duration::from_secs(launch.timeout_seconds)),
                    stop_grace: self.config.stop_grace,
                    image,
                    gpus: gpus.iter().map(u32::to_string).collect(),
                    rank: None,
                    mounts,
                    token: launch.token.clone(),
                    shm_size_bytes: (launch.shm_size_bytes > 0).then_some(launch.shm_size_bytes),
                };
                if launch.mpi {
                    let sandbox = match (&spec.image, &self.docker) {
                        (Some(_), Ok(docker)) => crate::exec::Sandbox::Container {
                            name: docker.container_name(&slot, None),
                            env: spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect(),
                        },
                        _ => crate::exec::Sandbox::Process {
                            env: spec.env.clone(),
                            cwd: dir.clone(),
                        },
                    };
                    self.execs.sandbox_ready(slot.clone(), sandbox);
                }
                if launch.parallel_workers > 0 {
                    let mut spec = spec;
                    if launch.parallel_worker_mode {
                        spec.env.insert("SHOAL_TASK_MODE".into(), "worker".into());
                    }
                    self.run_parallel(spec, launch.parallel_workers, sink.clone(), stop)
                        .await
                } else {
                    self.run_ranks(spec, launch.processes, sink.clone(), stop)
                        .await
                }
            }
        };
        self.finish(slot, sink, outcome).await;
    }

    /// One process of an instance, in the runtime its image asks for.
    async fn run_one(
        &self,
        spec: RunSpec,
        sink: EventSink,
        stop: watch::Receiver<Option<Stop>>,
    ) -> Outcome {
        match (&spec.image, &self.docker) {
            (None, _) => self.process.run(spec, sink, stop).await,
            (Some(_), Ok(docker)) => docker.run(spec, sink, stop).await,
            (Some(image), Err(why)) => Outcome::failed(format!(
                "node {} cannot run image `{image}`: {why}",
                self.config.node_id
            )),
        }
    }

    /// `processes` processes of one instance (a distributed job's ranks on this node):
    /// each gets LOCAL_RANK and RANK; the first to fail stops the others and names
    /// itself in the outcome.
    async fn run_ranks(
        &self,
        spec: RunSpec,
        processes: u32,
        sink: EventSink,
        stop: watch::Receiver<Option<Stop>>,
    ) -> Outcome {
        use futures::StreamExt;
        if processes <= 1 {
            return self.run_one(spec, sink, stop).await;
        }
        let node_rank: u32 = spec
            .env
            .get("NODE_RANK")
            .and_then(|r| r.parse().ok())
            .unwrap_or(0);
        let (ranks_stop, ranks_stop_rx) = watch::channel(None);
        let forward = {
            let ranks_stop = ranks_stop.clone();
            let mut stop = stop;
            tokio::spawn(async move {
                loop {
                    if let Some(reason) = stop.borrow_and_update().clone() {
                        ranks_stop.send_replace(Some(reason));
                        return;
                    }
                    if stop.changed().await.is_err() {
                        return;
                    }
                }
            })
        };
        let mut runs = futures::stream::FuturesUnordered::new();
        for local in 0..processes {
            let mut spec = spec.clone();
            let rank = node_rank.saturating_mul(processes).saturating_add(local);
            spec.env.insert("LOCAL_RANK".into(), local.to_string());
            spec.env.insert("RANK".into(), rank.to_string());
            spec.rank = Some(local);
            let run = self.run_one(spec, sink.clone(), ranks_stop_rx.clone());
            runs.push(async move { (rank, local, run.await) });
        }
        let mut first_bad: Option<(u32, u32, Outcome)> = None;
        while let Some((rank, local, outcome)) = runs.next().await {
            if outcome.outcome != "completed" && first_bad.is_none() {
                ranks_stop.send_replace(Some(Stop::Cancel(format!(
                    "rank {rank} ended: {}",
                    outcome.outcome
                ))));
                first_bad = Some((rank, local, outcome));
            }
        }
        forward.abort();
        match first_bad {
            None => Outcome {
                exit_code: Some(0),
                outcome: "completed",
                message: String::new(),
            },
            Some((rank, local, outcome)) => Outcome {
                exit_code: outcome.exit_code,
                outcome: outcome.outcome,
                message: format!("rank {rank} (local rank {local}): {}", outcome.message),
            },
        }
    }

    /// An MPI instance's sandbox: the command to put before the job's (the launcher
    /// on instance 0, a holder on the others), the settings that give each node's
    /// daemons their own folders, and the mounts a container needs for them.
    #[allow(clippy::type_complexity)]
    fn mpi_sandbox(
        &self,
        slot: &Slot,
        (job_id, token): (&str, &str),
        container: bool,
        env: &mut std::collections::BTreeMap<String, String>,
    ) -> Result<(Vec<String>, Vec<(std::path::PathBuf, String)>), String> {
        let exe = std::env::current_exe()
            .map_err(|e| format!("cannot find the shoal binary for the MPI helper: {e}"))?;
        // Replaced while running (a rebuild, an upgrade): the new one is at the path.
        let exe = match exe.to_string_lossy().strip_suffix(" (deleted)") {
            Some(path) => std::path::PathBuf::from(path),
            None => exe,
        };
        let run = self
            .config
            .work_dir
            .join("run")
            .join(format!("{}-{}", slot.attempt_id, slot.instance));
        let tmp = run.join("tmp");
        std::fs::create_dir_all(&tmp).map_err(|e| format!("{}: {e}", tmp.display()))?;
        if let (false, Some(user)) = (container, &self.process.run_as) {
            user.own(&run)
                .map_err(|e| format!("{}: {e}", run.display()))?;
        }
        let socket = run.join("exec.sock");
        let (helper, socket_inside, tmp_inside, mounts) = if container {
            (
                "/shoal/bin/shoal".to_string(),
                "/shoal/run/exec.sock".to_string(),
                "/tmp".to_string(),
                vec![
                    (exe.clone(), "/shoal/bin/shoal".to_string()),
                    (run.clone(), "/shoal/run".to_string()),
                ],
            )
        } else {
            let tmp = tmp.to_string_lossy().into_owned();
            (
                exe.to_string_lossy().into_owned(),
                socket.to_string_lossy().into_owned(),
                tmp,
                Vec::new(),
            )
        };
        let mut set = |key: &str, value: String| {
            env.entry(key.to_string()).or_insert(value);
        };
        set("OMPI_MCA_plm_rsh_agent", format!("{helper} mpi rsh"));
        set("TMPDIR", tmp_inside.clone());
        set("OMPI_MCA_orte_tmpdir_base", tmp_inside.clone());
        set("OMPI_MCA_btl_vader_backing_directory", tmp_inside);
        if container {
            // Containers have no CAP_SYS_PTRACE: no cross-memory attach between ranks.
            set("OMPI_MCA_btl_vader_single_copy_mechanism", "none".into());
        }
        if !container && let Some(interface) = crate::telemetry::default_route_interface() {
            set("OMPI_MCA_btl_tcp_if_include", interface.clone());
            set("OMPI_MCA_oob_tcp_if_include", interface);
        }
        if slot.instance == 0 {
            self.execs
                .serve_launcher(slot.clone(), job_id.to_string(), token.to_string(), &socket)
                .map_err(|e| {
                    format!(
                        "cannot open the MPI launcher socket {}: {e}",
                        socket.display()
                    )
                })?;
            env.insert("SHOAL_EXEC_SOCKET".into(), socket_inside);
            Ok((
                vec![helper, "mpi".into(), "launch".into(), "--".into()],
                mounts,
            ))
        } else {
            // The holder replaces the job's command: mpirun starts the ranks here.
            Ok((
                vec![helper, "mpi".into(), "hold".into(), "--".into()],
                mounts,
            ))
        }
    }

    /// Uploads outputs, records and reports the exit, and clears the working dir.
    async fn finish(&self, slot: Slot, sink: EventSink, mut outcome: Outcome) {
        self.execs.instance_ended(&slot);
        self.identity.forget(&slot);
        if outcome.outcome == "failed"
            && let Some(line) = sink.rank_failure()
        {
            outcome.message = format!("mpirun: {line}");
        }
        let run = self
            .config
            .work_dir
            .join("run")
            .join(format!("{}-{}", slot.attempt_id, slot.instance));
        if run.exists() {
            let _ = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(run)).await;
        }
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
        let (token, named) = {
            let attempts = self.attempts.lock().unwrap_or_else(|p| p.into_inner());
            attempts
                .get(&slot)
                .map(|e| (e.token.clone(), e.outputs.clone()))
                .unwrap_or_default()
        };
        if let Err(why) = self.upload_named(&slot, &token, &dir, &named).await {
            warn!(attempt = %slot.attempt_id, %why, "named outputs not uploaded");
            outcome.message = format!("{} (named outputs not uploaded: {why})", outcome.message)
                .trim()
                .to_string();
        }
        info!(attempt = %slot.attempt_id, instance = slot.instance, outcome = outcome.outcome, code = ?outcome.exit_code, "instance ended");
        let mut exited = outcome.to_wire();
        let sample = self.telemetry.latest();
        {
            let mut attempts = self.attempts.lock().unwrap_or_else(|p| p.into_inner());
            if let Some(entry) = attempts.get_mut(&slot) {
                // The last sample may be newer than the last heartbeat.
                if let Some(seconds) = entry
                    .group
                    .and_then(|g| sample.cpu_seconds_by_group.get(&g))
                {
                    entry.usage.cpu_seconds = entry.usage.cpu_seconds.max(*seconds);
                }
                exited.usage = Some(usage_to_wire(&entry.usage));
                self.gpu_allocator
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .release(&std::mem::take(&mut entry.gpus));
                entry.exited = Some((exited.clone(), Instant::now()));
            }
        }
        sink.exited(exited);
        let _ = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(dir)).await;
    }

    /// The working dir: a fresh copy of the job's code, with an empty `outputs/`.
    async fn prepare(&self, dir: &std::path::Path, launch: &pb::Launch) -> Result<(), String> {
        let instance = pb::AttemptRef {
            attempt_id: launch.attempt_id.clone(),
            instance: launch.instance,
            token: launch.token.clone(),
        };
        let code = if launch.has_code {
            let mut client = self.client.clone();
            let request = instance.clone();
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
            let mut client = self.client.clone();
            let outputs = client.restore_outputs(instance).await.map_err(|s| {
                format!(
                    "could not fetch the last attempt's outputs: {}",
                    s.message()
                )
            })?;
            Some(outputs.into_inner().data).filter(|data| !data.is_empty())
        } else {
            None
        };
        let inputs = self.fetch_inputs(launch).await?;
        let layout = launch.clone();
        let dir = dir.to_path_buf();
        // Containers keep their own user; process jobs may run as an unprivileged one.
        let run_as = if launch.image.is_empty() {
            self.process.run_as.clone()
        } else {
            None
        };
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
            data::lay_out(&dir, &layout, inputs)?;
            if let Some(user) = &run_as {
                user.own(&dir)
                    .map_err(|e| format!("cannot give {} to {}: {e}", dir.display(), user.name))?;
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
        let token = {
            let attempts = self.attempts.lock().unwrap_or_else(|p| p.into_inner());
            attempts
                .get(slot)
                .map(|e| e.token.clone())
                .unwrap_or_default()
        };
        let upload = pb::OutputsUpload {
            attempt_id: slot.attempt_id.clone(),
            instance: slot.instance,
            data,
            token,
            output_name: String::new(),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpu_env_names_exactly_the_assigned_ids() {
        assert!(gpu_env(&[]).is_empty());
        let env = gpu_env(&[1, 3]);
        assert_eq!(
            env,
            vec![
                ("CUDA_VISIBLE_DEVICES".to_string(), "1,3".to_string()),
                ("NVIDIA_VISIBLE_DEVICES".to_string(), "1,3".to_string()),
            ]
        );
    }
}
