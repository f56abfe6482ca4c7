//! The session with the coordinator: connect, register (with what still runs
//! or ended unreported), heartbeats, fencing when nothing is heard, and the
//! messages in and out.

use super::*;

/// How long a message that may wait (a start, or the end of an array task whose
/// successor starts at once) is held for the next; and how many are held at
/// most. A node running a chain of short tasks reports them a batch at a time:
/// one frame to write and one pass of the coordinator's loop for each batch,
/// not for each task. An array's progress reads up to this late.
const WAIT_AT_MOST: Duration = Duration::from_millis(5);
const WAIT_FOR_AT_MOST: usize = 64;

/// Messages held to leave together (`Outgoing::may_wait`), in the order sent.
#[derive(Default)]
struct Outbox {
    held: Vec<pb::AgentMessage>,
}

impl Outbox {
    /// Holds `sent`; true if it and all held before it must leave now: it may
    /// not wait, or `WAIT_FOR_AT_MOST` are held.
    fn hold(&mut self, sent: Outgoing) -> bool {
        self.held.push(sent.message);
        !sent.may_wait || self.held.len() >= WAIT_FOR_AT_MOST
    }

    fn is_empty(&self) -> bool {
        self.held.is_empty()
    }

    /// Sends all it holds, in order; false if the session's stream is closed.
    async fn send(&mut self, out: &mpsc::Sender<pb::AgentMessage>) -> bool {
        for message in self.held.drain(..) {
            if out.send(message).await.is_err() {
                return false;
            }
        }
        true
    }
}

/// Runs the agent until it is told to stop, `shutdown` resolves, or it gives up.
pub async fn run(
    config: AgentConfig,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), AgentError> {
    std::fs::create_dir_all(config.work_dir.join("attempts"))
        .map_err(|e| AgentError::WorkDir(config.work_dir.clone(), e))?;
    let bearer = Bearer::new(config.token.as_deref()).map_err(AgentError::Token)?;
    let mut clients = Vec::new();
    for url in crate::coordinators::endpoints(&config.endpoint) {
        let channel = crate::endpoint(url, config.ca_file.as_deref(), config.lease)?.connect_lazy();
        clients.push(
            AgentClient::with_interceptor(channel, bearer.clone())
                .max_decoding_message_size(MAX_MESSAGE_BYTES)
                .max_encoding_message_size(MAX_MESSAGE_BYTES),
        );
    }
    if clients.is_empty() {
        return Err(AgentError::Endpoint(
            config.endpoint.clone(),
            "no endpoint given".into(),
        ));
    }
    let coordinators = Coordinators::new(clients);
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
    let workdirs = workdirs::WorkDirs::new(
        &config.work_dir,
        run_as.as_ref().map(|user| (user.uid, user.gid)),
    )
    .map_err(|e| AgentError::WorkDir(config.work_dir.clone(), e))?;
    let for_containers = match &docker {
        Ok(docker) => docker.address_for_jobs(&config.node_id).await,
        Err(_) => None,
    };
    let identity = crate::identity::TokenEndpoint::start(coordinators.clone(), for_containers)
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
        workdirs: Arc::new(workdirs),
        config: Arc::new(config),
        coordinators,
        process: Arc::new(ProcessRuntime { run_as }),
        attempts: Arc::default(),
        held: Arc::default(),
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
        let (at, _) = agent.coordinators.pick();
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
                // The next session tries the next endpoint (a standby, a new address).
                agent.coordinators.unreachable(at);
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
                // With a standby to find, ask more often: it listens the moment it leads.
                let most = if agent.coordinators.len() > 1 {
                    Duration::from_millis(500)
                } else {
                    Duration::from_secs(2)
                };
                backoff = (backoff * 2).min(most);
            }
        }
    }
}

impl Agent {
    /// Fencing: having heard nothing from the coordinator for most of a lease,
    /// the agent stops its work itself, so that when the coordinator reruns it
    /// elsewhere (a lease after it last heard from this agent) it no longer runs
    /// here. The exits are reported once the coordinator is back.
    pub(super) fn fence_when_alone(&self) -> tokio::task::JoinHandle<()> {
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

    pub(super) fn register_message(&self) -> pb::AgentMessage {
        let mut attempts = self.attempts.lock().unwrap_or_else(|p| p.into_inner());
        attempts.retain(|_, e| {
            e.exited
                .as_ref()
                .is_none_or(|(_, at)| at.elapsed() < EXIT_MEMORY)
        });
        let held = self.held.lock().unwrap_or_else(|p| p.into_inner());
        let reports = attempts
            .iter()
            .map(|(slot, entry)| pb::AttemptReport {
                attempt_id: slot.attempt_id.clone(),
                instance: slot.instance,
                exited: entry.exited.as_ref().map(|(e, _)| e.clone()),
                gpus: entry.gpus.clone(),
                held: false,
            })
            .chain(held.values().map(|launch| pb::AttemptReport {
                attempt_id: launch.attempt_id.clone(),
                instance: launch.instance,
                exited: None,
                gpus: Vec::new(),
                held: true,
            }))
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

    pub(super) fn runtimes(&self) -> Vec<String> {
        let mut runtimes = vec![self.process.name().to_string()];
        if let Ok(docker) = &self.docker {
            runtimes.push(docker.name().to_string());
        }
        runtimes
    }

    /// Containers an earlier agent of this node started: watched to their end as if
    /// this agent had launched them, and reported at registration.
    pub(super) async fn recover_containers(&self) {
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
    pub(super) fn heartbeat(&self) -> pb::AgentMessage {
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
    pub(super) fn note_start(&self, event: &pb::AgentMessage) {
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
    pub(super) async fn session(
        &self,
        events_rx: &mut mpsc::UnboundedReceiver<Outgoing>,
        shutdown: &mut Pin<Box<dyn Future<Output = ()> + Send + '_>>,
    ) -> (SessionEnd, bool) {
        use pb::coordinator_message::Msg;
        let (out_tx, out_rx) = mpsc::channel(4096);
        let _ = out_tx.send(self.register_message()).await;
        let (_, mut client) = self.coordinators.pick();
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
        // Messages that may wait, and when they must leave at the latest.
        let mut outbox = Outbox::default();
        let send_by = tokio::time::sleep(WAIT_AT_MOST);
        tokio::pin!(send_by);
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
                Some(sent) = events_rx.recv() => {
                    // What is queued already is taken too: a start followed at
                    // once by its end (or by anything that may not wait) goes
                    // without a timer set.
                    let was_empty = outbox.is_empty();
                    let mut must_send = false;
                    let mut next = Some(sent);
                    while let Some(sent) = next {
                        self.note_start(&sent.message);
                        must_send |= outbox.hold(sent);
                        next = events_rx.try_recv().ok();
                    }
                    if !must_send {
                        if was_empty {
                            send_by.as_mut().reset(tokio::time::Instant::now() + WAIT_AT_MOST);
                        }
                        continue;
                    }
                    if !outbox.send(&out_tx).await {
                        return (SessionEnd::Lost("the session's stream closed".into()), true);
                    }
                }
                _ = send_by.as_mut(), if !outbox.is_empty() => {
                    if !outbox.send(&out_tx).await {
                        return (SessionEnd::Lost("the session's stream closed".into()), true);
                    }
                }
                _ = heartbeat.tick() => {
                    outbox.hold(self.heartbeat().into());
                    if !outbox.send(&out_tx).await {
                        return (SessionEnd::Lost("the session's stream closed".into()), true);
                    }
                }
                _ = shutdown.as_mut(), if stopping.is_none() => {
                    info!("stopping on signal");
                    // First the node leaves (nothing more is placed on it), then
                    // the exits of its stopped work follow on the same stream.
                    let leaving = pb::AgentMessage {
                        msg: Some(pb::agent_message::Msg::Leaving(pb::Leaving {
                            reason: "it got a stop signal (its machine or allocation is ending)".into(),
                        })),
                    };
                    outbox.hold(leaving.into());
                    outbox.send(&out_tx).await;
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
                        outbox.send(&out_tx).await;
                        drop(out_tx);
                        tokio::time::sleep(Duration::from_millis(200)).await;
                        let reason = stopping.map(|(r, _)| r).unwrap_or_default();
                        return (SessionEnd::Stopped(reason), true);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn log(n: u8, may_wait: bool) -> Outgoing {
        let message = pb::AgentMessage {
            msg: Some(pb::agent_message::Msg::Log(pb::LogUp {
                data: vec![n],
                ..Default::default()
            })),
        };
        Outgoing { message, may_wait }
    }

    fn data(message: pb::AgentMessage) -> u8 {
        match message.msg {
            Some(pb::agent_message::Msg::Log(log)) => log.data[0],
            other => panic!("not a log: {other:?}"),
        }
    }

    #[tokio::test]
    async fn messages_that_may_wait_leave_with_the_first_that_may_not_in_order() {
        let mut outbox = Outbox::default();
        assert!(!outbox.hold(log(1, true)));
        assert!(!outbox.hold(log(2, true)));
        assert!(
            outbox.hold(log(3, false)),
            "one that may not wait sends all"
        );
        let (tx, mut rx) = mpsc::channel(16);
        assert!(outbox.send(&tx).await);
        assert!(outbox.is_empty());
        drop(tx);
        let mut sent = Vec::new();
        while let Some(message) = rx.recv().await {
            sent.push(data(message));
        }
        assert_eq!(sent, [1, 2, 3]);
    }

    #[tokio::test]
    async fn no_more_than_wait_for_at_most_are_held() {
        let mut outbox = Outbox::default();
        for n in 1..WAIT_FOR_AT_MOST {
            assert!(!outbox.hold(log(n as u8, true)), "message {n} may wait");
        }
        assert!(outbox.hold(log(0, true)), "the last that fits sends all");
        let (tx, rx) = mpsc::channel(WAIT_FOR_AT_MOST);
        assert!(outbox.send(&tx).await);
        assert_eq!(rx.len(), WAIT_FOR_AT_MOST);
        drop(rx);
        assert!(outbox.hold(log(1, false)));
        assert!(!outbox.send(&tx).await, "a closed stream is said");
    }
}
