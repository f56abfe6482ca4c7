//! Instances on this node: launch (inputs and code first), run (one process,
//! ranks, an MPI sandbox), stop, and finish (outputs up, the exit reported).

use super::*;

impl Agent {
    pub(super) fn running_count(&self) -> usize {
        let attempts = self.attempts.lock().unwrap_or_else(|p| p.into_inner());
        attempts.values().filter(|e| e.exited.is_none()).count()
    }

    pub(super) fn cancel(&self, slot: &Slot, reason: &str) {
        let mut attempts = self.attempts.lock().unwrap_or_else(|p| p.into_inner());
        let successor = {
            let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
            let after = held
                .iter()
                .find(|(_, l)| l.attempt_id == slot.attempt_id && l.instance == slot.instance)
                .map(|(after, _)| after.clone());
            after.and_then(|after| {
                let launch = held.remove(&after)?;
                // What followed it follows what it followed.
                if let Some(next) = held.remove(slot) {
                    held.insert(after, next);
                }
                Some(launch)
            })
        };
        if let Some(launch) = successor {
            info!(attempt = %slot.attempt_id, instance = slot.instance, reason, "canceled before it started");
            let stop = Stop::Cancel(reason.to_string());
            self.end_unstarted(launch, &stop, &mut attempts);
            return;
        }
        if let Some(entry) = attempts.get(slot) {
            info!(attempt = %slot.attempt_id, instance = slot.instance, reason, "canceling");
            entry
                .stop
                .send_replace(Some(Stop::Cancel(reason.to_string())));
        }
    }

    pub(super) fn cancel_all(&self, reason: &str) {
        self.stop_every(Stop::Cancel(reason.to_string()));
    }

    pub(super) fn stop_every(&self, stop: Stop) {
        let mut attempts = self.attempts.lock().unwrap_or_else(|p| p.into_inner());
        // Successors end as they are: the instances they follow are stopping.
        let held: Vec<pb::Launch> = {
            let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
            held.drain().map(|(_, launch)| launch).collect()
        };
        for launch in held {
            self.end_unstarted(launch, &stop, &mut attempts);
        }
        for entry in attempts.values().filter(|e| e.exited.is_none()) {
            entry.stop.send_replace(Some(stop.clone()));
        }
    }

    /// Stops everything with no session to report to, and waits (bounded) for it.
    pub(super) async fn stop_all(&self, reason: &str) {
        self.cancel_all(reason);
        let deadline = Instant::now() + self.config.stop_grace * 2;
        while self.running_count() > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub(super) fn launch(&self, mut launch: pb::Launch) {
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
            // A successor waits for the instance it follows, if that still runs
            // or waits itself.
            if let Some(after) = launch.after.take() {
                let after = Slot {
                    attempt_id: after.attempt_id,
                    instance: after.instance,
                };
                let mut held = self.held.lock().unwrap_or_else(|p| p.into_inner());
                let waits = held
                    .values()
                    .any(|l| l.attempt_id == after.attempt_id && l.instance == after.instance);
                if waits || attempts.get(&after).is_some_and(|e| e.exited.is_none()) {
                    let repeated = held
                        .values()
                        .any(|l| l.attempt_id == slot.attempt_id && l.instance == slot.instance);
                    if !repeated {
                        debug!(attempt = %slot.attempt_id, after = %after.attempt_id, "held until the instance it follows ends");
                        held.insert(after, launch);
                    }
                    return;
                }
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
            entry.mpi = launch.mpi;
            entry.end_may_wait = launch.end_may_wait;
            if self.config.zero_work && gpus.is_some() {
                self.complete_at_once(slot, entry, &mut attempts);
                return;
            }
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
        // A job that goes well writes its launch and its end at debug
        // (`SHOAL_LOG=debug`): a node may run thousands a minute, each line a
        // write. What goes wrong is said at info or above.
        debug!(attempt = %slot.attempt_id, instance = slot.instance, "launching");
        let agent = self.clone();
        tokio::spawn(async move { agent.run_instance(slot, launch, stop_rx).await });
    }

    /// A successor that never started: its end is recorded (a re-registration
    /// reports it) and sent, as the stop says.
    fn end_unstarted(&self, launch: pb::Launch, stop: &Stop, attempts: &mut HashMap<Slot, Entry>) {
        let slot = Slot {
            attempt_id: launch.attempt_id,
            instance: launch.instance,
        };
        let (_, outcome, message) = stop.terms(Duration::ZERO);
        let exited = Outcome {
            exit_code: None,
            outcome,
            message,
        }
        .to_wire();
        let (stop, _) = watch::channel(None);
        let mut entry = Entry::new(stop, Vec::new(), launch.token);
        entry.exited = Some((exited.clone(), Instant::now()));
        attempts.insert(slot.clone(), entry);
        let sink = EventSink {
            slot,
            tx: self.events.clone(),
            gpus: Vec::new(),
            rank_failure: None,
        };
        sink.exited(exited, false);
    }

    /// `--zero-work`: the instance is reported started and completed, with
    /// nothing run.
    fn complete_at_once(&self, slot: Slot, mut entry: Entry, attempts: &mut HashMap<Slot, Entry>) {
        let sink = EventSink {
            slot: slot.clone(),
            tx: self.events.clone(),
            gpus: entry.gpus.clone(),
            rank_failure: None,
        };
        sink.started(0);
        let exited = Outcome {
            exit_code: Some(0),
            outcome: "completed",
            message: String::new(),
        }
        .to_wire();
        self.gpu_allocator
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .release(&std::mem::take(&mut entry.gpus));
        entry.exited = Some((exited.clone(), Instant::now()));
        attempts.insert(slot, entry);
        sink.exited(exited, false);
    }

    pub(super) async fn run_instance(
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
                let mut env = std::mem::take(&mut launch.env);
                env.insert(
                    "SHOAL_OUTPUT_DIR".into(),
                    dir.join("outputs").to_string_lossy().into_owned(),
                );
                env.extend(gpu_env(&gpus));
                // Processes reach the agent on loopback; containers where it
                // listens for them (or not at all).
                if let Some((identity_url, tracking_url)) =
                    self.identity.urls(!launch.image.is_empty())
                {
                    if let Some(secret) = env.get("IDENTITY_HEADER").cloned() {
                        self.identity
                            .admit(&secret, slot.clone(), launch.token.clone());
                        env.insert("IDENTITY_ENDPOINT".into(), identity_url);
                    }
                    if let Some(secret) = env.get("MLFLOW_TRACKING_TOKEN").cloned() {
                        self.identity
                            .admit_tracking(&secret, slot.clone(), launch.token.clone());
                        env.insert("MLFLOW_TRACKING_URI".into(), tracking_url);
                    }
                } else {
                    // No way to the run: mlflow logs to the container's ./mlruns.
                    for key in [
                        "MLFLOW_TRACKING_TOKEN",
                        "MLFLOW_RUN_ID",
                        "MLFLOW_EXPERIMENT_NAME",
                    ] {
                        env.remove(key);
                    }
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
                    millicpus: launch.millicpus,
                    memory_limit: (launch.memory_bytes > 0).then_some(launch.memory_bytes),
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
    pub(super) async fn run_one(
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
    /// in a PyTorch job (NODE_RANK set) each gets LOCAL_RANK and RANK, one process
    /// per node included; the first to fail stops the others and names itself in
    /// the outcome.
    pub(super) async fn run_ranks(
        &self,
        mut spec: RunSpec,
        processes: u32,
        sink: EventSink,
        stop: watch::Receiver<Option<Stop>>,
    ) -> Outcome {
        use futures::StreamExt;
        if processes <= 1 {
            if let Some(node_rank) = spec.env.get("NODE_RANK").cloned() {
                spec.env.insert("LOCAL_RANK".into(), "0".into());
                spec.env.insert("RANK".into(), node_rank);
            }
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
    pub(super) fn mpi_sandbox(
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
    pub(super) async fn finish(&self, slot: Slot, sink: EventSink, mut outcome: Outcome) {
        self.execs.instance_ended(&slot);
        self.identity.forget(&slot);
        if outcome.outcome == "failed"
            && let Some(line) = sink.rank_failure()
        {
            outcome.message = format!("mpirun: {line}");
        }
        let (token, named, mpi, end_may_wait) = {
            let attempts = self.attempts.lock().unwrap_or_else(|p| p.into_inner());
            attempts
                .get(&slot)
                .map(|e| (e.token.clone(), e.outputs.clone(), e.mpi, e.end_may_wait))
                .unwrap_or_default()
        };
        let run = self
            .config
            .work_dir
            .join("run")
            .join(format!("{}-{}", slot.attempt_id, slot.instance));
        if mpi && run.exists() {
            let _ = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(run)).await;
        }
        let dir = self
            .config
            .work_dir
            .join("attempts")
            .join(format!("{}-{}", slot.attempt_id, slot.instance));
        let outputs_empty = match self.upload_outputs(&slot, &dir.join("outputs")).await {
            Ok(uploaded) => !uploaded,
            Err(why) => {
                warn!(attempt = %slot.attempt_id, %why, "outputs not uploaded");
                outcome.message = format!("{} (outputs not uploaded: {why})", outcome.message)
                    .trim()
                    .to_string();
                false
            }
        };
        if let Err(why) = self.upload_named(&slot, &token, &dir, &named).await {
            warn!(attempt = %slot.attempt_id, %why, "named outputs not uploaded");
            outcome.message = format!("{} (named outputs not uploaded: {why})", outcome.message)
                .trim()
                .to_string();
        }
        if outcome.outcome == "completed" {
            debug!(attempt = %slot.attempt_id, instance = slot.instance, outcome = outcome.outcome, code = ?outcome.exit_code, "instance ended");
        } else {
            info!(attempt = %slot.attempt_id, instance = slot.instance, outcome = outcome.outcome, code = ?outcome.exit_code, "instance ended");
        }
        let mut exited = outcome.to_wire();
        let sample = self.telemetry.latest();
        let successor = {
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
            // Its successor, if it has one, from now on starts at once.
            self.held
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&slot)
        };
        // A completed task whose successor starts now is no news yet: its end
        // goes with the successor's start, and with the ends that follow.
        let may_wait = end_may_wait && successor.is_some() && exited.outcome == "completed";
        sink.exited(exited, may_wait);
        if let Some(launch) = successor {
            self.launch(launch);
        }
        // The report leaves first: checking the folder and putting it aside
        // (three folder reads and a rename) is no part of the job's end.
        tokio::task::yield_now().await;
        if !self.workdirs.keep(&dir, outputs_empty) {
            let _ = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(dir)).await;
        }
    }

    /// The working dir: a fresh copy of the job's code, with an empty `outputs/`.
    pub(super) async fn prepare(
        &self,
        dir: &std::path::Path,
        launch: &pb::Launch,
    ) -> Result<(), String> {
        let instance = pb::AttemptRef {
            attempt_id: launch.attempt_id.clone(),
            instance: launch.instance,
            token: launch.token.clone(),
        };
        let code = if launch.has_code {
            let artifact = self
                .until_answered(|mut client| {
                    let request = instance.clone();
                    async move { client.fetch_code(request).await }
                })
                .await
                .map_err(|s| format!("could not fetch the job's code: {}", s.message()))?;
            Some(artifact.data)
        } else {
            None
        };
        // A rerun (after a preemption or a lost node) starts from the outputs, and so
        // the checkpoints, that this instance's last attempt left.
        let previous = if launch.restore_outputs {
            let outputs = self
                .until_answered(|mut client| {
                    let request = instance.clone();
                    async move { client.restore_outputs(request).await }
                })
                .await
                .map_err(|s| {
                    format!(
                        "could not fetch the last attempt's outputs: {}",
                        s.message()
                    )
                })?;
            Some(outputs.data).filter(|data| !data.is_empty())
        } else {
            None
        };
        let inputs = self.fetch_inputs(launch).await?;
        let layout = (launch.inputs.clone(), launch.outputs.clone());
        let dir = dir.to_path_buf();
        // Containers keep their own user; process jobs may run as an unprivileged one.
        let run_as = if launch.image.is_empty() {
            self.process.run_as.clone()
        } else {
            None
        };
        // A spare folder is owned as process jobs' are: reused for those, or by all
        // where every job's folder has the agent's owner.
        let reuse = run_as.is_some() || self.process.run_as.is_none();
        let workdirs = self.workdirs.clone();
        // With nothing to unpack or copy, laying out is a few folder operations:
        // done here, with no hand-off to a thread.
        let existed = dir.exists();
        let small = code.is_none() && previous.is_none() && launch.inputs.is_empty() && !existed;
        let lay_out = move || -> Result<(), String> {
            if existed {
                let _ = std::fs::remove_dir_all(&dir);
            }
            workdirs
                .make(&dir, reuse)
                .map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
            if let Some(code) = code {
                archive::unpack(&code, &dir)
                    .map_err(|e| format!("cannot unpack the job's code: {e}"))?;
            }
            if let Some(outputs) = previous {
                archive::unpack(&outputs, &dir.join("outputs"))
                    .map_err(|e| format!("cannot restore the last attempt's outputs: {e}"))?;
            }
            data::lay_out(&dir, &layout.0, &layout.1, inputs)?;
            if let Some(user) = &run_as {
                user.own(&dir)
                    .map_err(|e| format!("cannot give {} to {}: {e}", dir.display(), user.name))?;
            }
            Ok(())
        };
        if small {
            return lay_out();
        }
        tokio::task::spawn_blocking(lay_out)
            .await
            .map_err(|e| format!("preparing the working dir failed: {e}"))?
    }

    /// Uploads what the job left in `outputs`; whether it held anything.
    pub(super) async fn upload_outputs(
        &self,
        slot: &Slot,
        outputs: &std::path::Path,
    ) -> Result<bool, String> {
        // Most small jobs write nothing: one read here, no hand-off to a thread.
        if !archive::has_entries(outputs).map_err(|e| format!("cannot read outputs: {e}"))? {
            return Ok(false);
        }
        let outputs = outputs.to_path_buf();
        let packed = tokio::task::spawn_blocking(move || archive::pack_dir(&outputs))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| format!("cannot pack outputs: {e}"))?;
        let Some(data) = packed else {
            return Ok(true);
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
        self.until_answered(|mut client| {
            let upload = upload.clone();
            async move { client.upload_outputs(upload).await }
        })
        .await
        .map(|_| true)
        .map_err(|status| status.message().to_string())
    }
}
