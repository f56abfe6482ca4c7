//! The thin async driver around the state machine: it owns the store, the
//! provider and the channels, feeds the machine its inbox with the time, and
//! carries out what the machine asks — committing the batch first, and only
//! then telling agents, replying and calling providers.

use super::*;
use rand::SeedableRng;

/// The control loop as it runs in the coordinator.
pub struct Driver {
    control: Control,
    store: Box<dyn Store>,
    provider: Arc<dyn NodeProvider>,
    own_tx: mpsc::Sender<Command>,
    changes_tx: broadcast::Sender<Change>,
    logs_tx: broadcast::Sender<Arc<StoredLog>>,
}

impl Driver {
    /// Loads the stored state; returns the loop (to `run`), a handle to it and
    /// its inbox.
    pub fn new(
        config: ControlConfig,
        mut store: Box<dyn Store>,
        provider: Arc<dyn NodeProvider>,
    ) -> Result<(Driver, ControlHandle, mpsc::Receiver<Command>)> {
        let snapshot = store.load()?;
        let (tx, rx) = mpsc::channel(16_384);
        let (changes_tx, _) = broadcast::channel(4096);
        let (logs_tx, _) = broadcast::channel(4096);
        let handle = ControlHandle {
            tx: tx.clone(),
            changes: changes_tx.clone(),
            logs: logs_tx.clone(),
        };
        let control = Control::new(
            config,
            snapshot,
            now_ms(),
            rand::rngs::StdRng::from_os_rng(),
        );
        let driver = Driver {
            control,
            store,
            provider,
            own_tx: tx,
            changes_tx,
            logs_tx,
        };
        Ok((driver, handle, rx))
    }

    /// Identities an earlier version kept in `auth.db`, committed now.
    pub fn import_identities(
        &mut self,
        users: Vec<Identity>,
        assignments: Vec<(String, crate::model::ClusterIdentity)>,
    ) -> Result<()> {
        let batch = self.control.import_identities(users, assignments);
        if batch.is_empty() {
            return Ok(());
        }
        self.store.commit(&batch).map(|_| ())
    }

    /// Runs until `shutdown` resolves, then stops every node and returns.
    pub async fn run(
        mut self,
        mut inbox: mpsc::Receiver<Command>,
        shutdown: impl std::future::Future<Output = ()>,
    ) {
        tokio::pin!(shutdown);
        // Leftovers of an earlier run (containers of nodes no longer known) go.
        tokio::spawn(self.provider.cleanup(self.control.node_ids()));
        // Nodes of an earlier run that their provider can watch (a Slurm
        // allocation, a listed command node) end as they would have.
        for node in self.control.kept_nodes() {
            let notes = self.notes_about(&node.node_id);
            if let Some(exited) = self.provider.adopt(node.clone(), notes) {
                tokio::spawn(report_exit(node.node_id, exited, self.own_tx.clone()));
            }
        }
        let mut housekeeping = tokio::time::interval(Duration::from_millis(500));
        housekeeping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut commands = Vec::with_capacity(1024);
        let timings = self.control.timings();
        loop {
            let now = now_ms();
            let started = std::time::Instant::now();
            self.control.decide(now);
            timings.decide.observe(started.elapsed().as_secs_f64());
            let started = std::time::Instant::now();
            let effects = self.control.effects();
            // Only a pass that writes is a commit: most passes of a busy loop
            // (an exit whose end is written later) write nothing.
            let writes = !effects.batch.is_empty();
            self.execute(effects, now);
            if writes {
                timings.commit.observe(started.elapsed().as_secs_f64());
            }
            let wake_in = self
                .control
                .wake_at()
                .map(|at| Duration::from_millis((at - now_ms()).max(0) as u64))
                .unwrap_or(Duration::from_secs(3600));
            tokio::select! {
                received = inbox.recv_many(&mut commands, 1024) => {
                    if received == 0 { break; }
                }
                _ = housekeeping.tick() => {}
                _ = tokio::time::sleep(wake_in) => {}
                _ = &mut shutdown => break,
            }
            let now = now_ms();
            for command in commands.drain(..) {
                self.control.apply(command, now);
            }
            self.control.tick(now);
        }
        // Clean shutdown: running attempts are requeued (their processes stop with
        // their nodes), and every node is stopped and forgotten.
        let removals = self.control.stop_all(now_ms());
        let effects = self.control.effects();
        self.execute(effects, now_ms());
        info!(nodes = removals.len(), "stopping nodes");
        let removals = removals.into_iter().map(|r| self.provider.remove(r));
        futures::future::join_all(removals).await;
    }

    /// Commits the batch, then (and only then) tells agents, answers and scales.
    fn execute(&mut self, mut effects: Effects, now: Millis) {
        let committed = if effects.batch.is_empty() {
            Ok(Committed::default())
        } else {
            self.store.commit(&effects.batch)
        };
        let failure = committed.as_ref().err().map(|e| e.to_string());
        if let Some(why) = &failure {
            error!(error = %why, "commit failed; replying with errors");
            effects.messages.clear();
        }
        // The agents first: a launch is the start of the work a caller waits
        // for, so it leaves before the replies and the bookkeeping below.
        for (link, message) in effects.messages.drain(..) {
            let _ = link.send(message);
        }
        for reply in effects.replies.drain(..) {
            reply(failure.as_deref());
        }
        if let Ok(committed) = committed {
            self.control
                .committed(&committed, &effects.jobs_touched, now);
            self.after_commit(&mut effects, committed);
        }
        for change in effects.changes.drain(..) {
            let _ = self.changes_tx.send(change);
        }
        self.call_providers(&mut effects);
    }

    /// Logs are announced with the sequence numbers the store gave them; the
    /// files of deleted jobs go.
    fn after_commit(&self, effects: &mut Effects, committed: Committed) {
        let logs = std::mem::take(&mut effects.batch.logs);
        for (log, seq) in logs.into_iter().zip(committed.log_seqs) {
            let _ = self.logs_tx.send(Arc::new(StoredLog {
                seq,
                job_id: log.job_id,
                attempt_id: log.attempt_id,
                instance: log.instance,
                stream: log.stream,
                data: log.data,
            }));
        }
        if let Some(tracking) = &self.control.config.tracking {
            tracking.end_attempt_runs(effects.batch.jobs.iter().flat_map(|job| &job.attempts));
        }
        if let Some(tracking) = self.control.config.tracking.clone()
            && !committed.purged.is_empty()
        {
            let jobs = committed.purged.iter().map(|p| p.id.clone()).collect();
            tokio::spawn(async move { tracking.forget_jobs(jobs).await });
        }
        if let Some(artifacts) = self.control.config.artifacts.clone()
            && !committed.purged.is_empty()
        {
            let purged = committed.purged;
            tokio::task::spawn_blocking(move || {
                for gone in purged {
                    artifacts.remove_job_files(&gone.code_paths, &gone.inputs, &gone.attempts);
                }
            });
        }
    }

    /// What a provider says about a node while it comes up goes to its message.
    fn notes_about(&self, node_id: &str) -> crate::provider::Notes {
        let notes = self.own_tx.clone();
        let about = node_id.to_string();
        crate::provider::Notes::new(move |note| {
            let _ = notes.try_send(Command::NodeNote {
                node_id: about.clone(),
                note,
            });
        })
    }

    fn call_providers(&self, effects: &mut Effects) {
        let start_limit = self.control.config.register_timeout;
        for mut launch in effects.create.drain(..) {
            let provider = self.provider.clone();
            let events = self.own_tx.clone();
            launch.notes = self.notes_about(&launch.node_id);
            tokio::spawn(async move {
                let node_id = launch.node_id.clone();
                // A provider that hangs fails the node, as one that says no.
                let created = tokio::time::timeout(start_limit, provider.create(launch))
                    .await
                    .unwrap_or_else(|_| {
                        Err(format!(
                            "the provider did not start it within {} s",
                            start_limit.as_secs()
                        ))
                    });
                match created {
                    Ok(started) => {
                        let _ = events
                            .send(Command::NodeStarted {
                                node_id: node_id.clone(),
                                pid: started.pid,
                                handle: started.handle,
                            })
                            .await;
                        report_exit(node_id, started.exited, events).await;
                    }
                    Err(error) => {
                        let _ = events
                            .send(Command::NodeFailed {
                                node_id,
                                error,
                                preempted: false,
                            })
                            .await;
                    }
                }
            });
        }
        for gone in effects.remove.drain(..) {
            let provider = self.provider.clone();
            let events = self.own_tx.clone();
            tokio::spawn(async move {
                let node_id = gone.node_id.clone();
                provider.remove(gone).await;
                let _ = events.send(Command::NodeRemoved { node_id }).await;
            });
        }
    }
}

/// When a node ends by itself, the core hears how.
async fn report_exit(
    node_id: String,
    exited: futures::future::BoxFuture<'static, crate::provider::NodeExit>,
    events: mpsc::Sender<Command>,
) {
    let how = exited.await;
    let _ = events
        .send(Command::NodeFailed {
            node_id,
            error: how.why,
            preempted: how.preempted,
        })
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Snapshot, SqlStore};
    use crate::testing::FakeProvider;
    use std::sync::Mutex;

    /// A store whose every commit fails.
    struct Refusing;

    impl Store for Refusing {
        fn load(&mut self) -> Result<Snapshot> {
            Ok(Snapshot::default())
        }
        fn commit(&mut self, _: &Batch) -> Result<Committed> {
            Err(Error::Internal("the disk is full".into()))
        }
    }

    /// A pass that tells an agent something and answers a caller, carried out by
    /// a driver on `store`: what the caller's reply found (the commit's failure,
    /// and whether the agent had its message already), and what the agent got.
    fn carry_out(store: Box<dyn Store>) -> (Option<(Option<String>, bool)>, Vec<ToAgent>) {
        let (mut driver, _handle, _inbox) = Driver::new(
            ControlConfig::default(),
            store,
            Arc::new(FakeProvider::default()),
        )
        .unwrap();
        let (link, agent) = mpsc::unbounded_channel();
        let agent = Arc::new(Mutex::new(agent));
        let found = Arc::new(Mutex::new(None));
        let (at_reply, agent_at_reply) = (found.clone(), agent.clone());
        let effects = Effects {
            // Something to write, so that the store is asked to commit.
            batch: Batch {
                next_job_seq: Some(7),
                ..Batch::default()
            },
            replies: vec![Box::new(move |failure: Option<&str>| {
                let sent = agent_at_reply.lock().unwrap().try_recv().ok();
                *at_reply.lock().unwrap() = Some((failure.map(str::to_string), sent.is_some()));
            })],
            messages: vec![(
                link,
                ToAgent::Shutdown {
                    reason: "a test".into(),
                },
            )],
            create: Vec::new(),
            remove: Vec::new(),
            changes: Vec::new(),
            jobs_touched: BTreeSet::new(),
        };
        driver.execute(effects, 0);
        let mut rest = Vec::new();
        while let Ok(message) = agent.lock().unwrap().try_recv() {
            rest.push(message);
        }
        let found = found.lock().unwrap().take();
        (found, rest)
    }

    #[tokio::test]
    async fn a_pass_tells_its_agents_before_it_answers_its_callers() {
        let (reply, _) = carry_out(Box::new(SqlStore::in_memory().unwrap()));
        assert_eq!(
            reply,
            Some((None, true)),
            "the launch had left when the caller was answered"
        );
    }

    #[tokio::test]
    async fn a_pass_whose_commit_fails_tells_its_agents_nothing() {
        let (reply, agent) = carry_out(Box::new(Refusing));
        let (failure, sent) = reply.expect("the caller was answered");
        assert!(failure.is_some_and(|f| f.contains("the disk is full")));
        assert!(!sent);
        assert!(
            agent.is_empty(),
            "an agent was told of what was not written"
        );
    }
}
