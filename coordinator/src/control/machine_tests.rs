//! The state machine driven by hand: commands in, time advanced explicitly,
//! effects inspected — no runtime, no waiting on a wall clock.
use super::*;
use crate::store::SqlStore;
use rand::SeedableRng;
use tokio::sync::mpsc::UnboundedReceiver;

struct Machine {
    control: Control,
    store: SqlStore,
    now: Millis,
    /// Nodes the provider was asked for, and to remove, so far.
    created: Vec<String>,
    removed: Vec<String>,
    /// What the provider says back (a removal done), for the next step.
    pending: Vec<Command>,
    /// The jobs the last step's batch wrote.
    written: Vec<String>,
}

impl Machine {
    fn new(config: ControlConfig) -> Machine {
        let mut store = SqlStore::in_memory().expect("store");
        let snapshot = store.load().expect("load");
        let rng = rand::rngs::StdRng::seed_from_u64(1);
        Machine {
            control: Control::new(config, snapshot, 1_000, rng),
            store,
            now: 1_000,
            created: Vec::new(),
            removed: Vec::new(),
            pending: Vec::new(),
            written: Vec::new(),
        }
    }

    /// One batch: the commands, the timeouts, the decisions, the commit, the effects.
    fn step(&mut self, commands: Vec<Command>) {
        let commands: Vec<Command> = self.pending.drain(..).chain(commands).collect();
        for command in commands {
            self.control.apply(command, self.now);
        }
        self.control.tick(self.now);
        self.control.decide(self.now);
        let mut effects = self.control.effects();
        let committed = self.store.commit(&effects.batch).expect("commit");
        self.written = effects
            .batch
            .jobs
            .iter()
            .map(|j| j.id.to_string())
            .collect();
        self.control
            .committed(&committed, &effects.jobs_touched, self.now);
        for reply in effects.replies.drain(..) {
            reply(None);
        }
        for (link, message) in effects.messages.drain(..) {
            let _ = link.send(message);
        }
        self.created
            .extend(effects.create.drain(..).map(|l| l.node_id));
        for gone in effects.remove.drain(..) {
            self.pending.push(Command::NodeRemoved {
                node_id: gone.node_id.clone(),
            });
            self.removed.push(gone.node_id);
        }
    }

    fn advance(&mut self, ms: Millis) {
        self.now += ms;
        self.step(Vec::new());
    }

    fn ask<T: std::fmt::Debug>(&mut self, make: impl FnOnce(Reply<T>) -> Command) -> Result<T> {
        let (reply, mut answer) = oneshot::channel();
        self.step(vec![make(reply)]);
        answer.try_recv().expect("answered in the same batch")
    }

    fn cluster(&mut self, name: &str, max: u32, idle_seconds: u64) {
        self.create_cluster(ClusterRequest {
            name: name.into(),
            vm_size: "Standard_D2_v2".into(),
            max_nodes: Some(max),
            idle_seconds_before_scaledown: Some(idle_seconds),
            ..Default::default()
        });
    }

    fn create_cluster(&mut self, request: ClusterRequest) {
        self.ask(|reply| Command::CreateCluster(request, reply))
            .expect("cluster");
    }

    fn submit(&mut self, cluster: &str, instances: u32) -> String {
        self.submit_request(JobRequest {
            cluster: cluster.into(),
            argv: vec!["true".into()],
            instance_count: instances,
            ..Default::default()
        })
    }

    fn submit_request(&mut self, request: JobRequest) -> String {
        self.ask(|reply| Command::SubmitJob(Box::new(request), reply))
            .expect("submit")
            .id
            .to_string()
    }

    fn job(&mut self, id: &str) -> Job {
        let id = id.to_string();
        self.ask(|reply| Command::GetJob(id, reply)).expect("job")
    }

    /// The node's agent registers; its link.
    fn register(&mut self, node: &str, cluster: &str) -> UnboundedReceiver<ToAgent> {
        self.register_with(registration(node, cluster), 1)
            .expect("registered")
    }

    fn register_with(
        &mut self,
        registration: Registration,
        session: u64,
    ) -> Result<UnboundedReceiver<ToAgent>> {
        let (link, agent) = mpsc::unbounded_channel();
        self.ask(|reply| Command::AgentRegister {
            registration,
            session,
            link,
            reply,
        })
        .map(|()| agent)
    }

    fn node(&mut self, id: &str) -> Node {
        let nodes = self
            .ask(|reply| Command::ListNodes(None, reply))
            .expect("nodes");
        nodes.into_iter().find(|n| n.id == id).expect("the node")
    }

    fn started(&mut self, node: &str, order: &LaunchOrder) {
        self.step(vec![Command::InstanceStarted {
            node_id: node.into(),
            slot: order.slot.clone(),
            gpus: (0..order.gpus).collect(),
        }]);
    }

    /// A job on cluster `cl` (made with at least one node), placed on its first
    /// node and running there.
    fn one_running(&mut self) -> (String, String, UnboundedReceiver<ToAgent>, LaunchOrder) {
        let id = self.submit("cl", 1);
        let node = self.created[0].clone();
        let mut agent = self.register(&node, "cl");
        let order = launches(&mut agent).pop().expect("launched");
        self.started(&node, &order);
        assert_eq!(self.job(&id).status, JobStatus::Running);
        (id, node, agent, order)
    }
}

fn registration(node: &str, cluster: &str) -> Registration {
    Registration {
        node_id: node.into(),
        cluster: cluster.into(),
        cores: 2,
        memory_bytes: 1 << 30,
        hostname: "localhost".into(),
        pid: 1,
        runtimes: vec!["process".into()],
        attempts: Vec::new(),
        gpus: Vec::new(),
        gpu_reason: String::new(),
    }
}

fn cancels(agent: &mut UnboundedReceiver<ToAgent>) -> Vec<Slot> {
    let mut out = Vec::new();
    while let Ok(message) = agent.try_recv() {
        if let ToAgent::Cancel { slot, .. } = message {
            out.push(slot);
        }
    }
    out
}

/// Launches the agent was told about, in order.
fn launches(agent: &mut UnboundedReceiver<ToAgent>) -> Vec<LaunchOrder> {
    let mut out = Vec::new();
    while let Ok(message) = agent.try_recv() {
        if let ToAgent::Launch(order) = message {
            out.push(order);
        }
    }
    out
}

fn exit(node: &str, slot: Slot, outcome: &str) -> Command {
    Command::InstanceExited {
        node_id: node.into(),
        slot,
        exit: ExitReport {
            exit_code: (outcome == "completed").then_some(0),
            outcome: outcome.into(),
            message: String::new(),
            usage: None,
        },
    }
}

#[test]
fn a_node_that_fails_to_start_is_retried_after_its_backoff_and_not_before() {
    let mut m = Machine::new(ControlConfig::default());
    m.cluster("cl", 1, 60);
    let id = m.submit("cl", 1);
    assert_eq!(m.created.len(), 1, "one node asked for");
    let first = m.created[0].clone();
    m.step(vec![Command::NodeFailed {
        node_id: first.clone(),
        error: "cannot start the agent".into(),
        preempted: false,
    }]);
    // The first failure waits 2 s: not one millisecond less.
    m.advance(1_999);
    assert_eq!(m.created.len(), 1, "no new node inside the backoff");
    assert_eq!(m.job(&id).status, JobStatus::Queued);
    assert!(
        m.job(&id).reason.to_string().contains("failed to start"),
        "{}",
        m.job(&id).reason
    );
    let cluster = m
        .ask(|reply| Command::GetCluster("cl".into(), reply))
        .expect("cluster");
    let error = cluster.cluster.errors.first().cloned();
    assert!(
        matches!(&error, Some(ClusterError::NodeFailed { node, why, wait_seconds: 2 })
            if *node == first && why.contains("cannot start the agent")),
        "{error:?}"
    );
    m.advance(2);
    assert_eq!(m.created.len(), 2, "retried once the backoff is over");
    assert_ne!(m.created[1], first);
    // A second failure in a row doubles the wait.
    let second = m.created[1].clone();
    m.step(vec![Command::NodeFailed {
        node_id: second,
        error: "cannot start the agent".into(),
        preempted: false,
    }]);
    m.advance(3_999);
    assert_eq!(m.created.len(), 2);
    m.advance(2);
    assert_eq!(m.created.len(), 3);
}

#[test]
fn a_silent_node_has_its_work_rerun_exactly_a_lease_after_it_was_last_heard() {
    let config = ControlConfig {
        lease: Duration::from_secs(6),
        ..ControlConfig::default()
    };
    let mut m = Machine::new(config);
    m.cluster("cl", 2, 600);
    let id = m.submit("cl", 1);
    let node = m.created[0].clone();
    let mut agent = m.register(&node, "cl");
    let order = launches(&mut agent).pop().expect("launched");
    m.step(vec![Command::InstanceStarted {
        node_id: node.clone(),
        slot: order.slot.clone(),
        gpus: Vec::new(),
    }]);
    let heard = m.now;
    m.advance(6_000 - (m.now - heard));
    assert_eq!(m.job(&id).status, JobStatus::Running, "within the lease");
    m.advance(1);
    let job = m.job(&id);
    assert_eq!(job.status, JobStatus::Queued, "rerun: {}", job.reason);
    assert!(
        matches!(&job.reason, JobReason::Requeued(r) if matches!(**r, Requeue::Lost { lost: 1, .. })),
        "{}",
        job.reason
    );
    assert_eq!(job.attempts[0].instances[0].status, InstanceStatus::Lost);
    let silent = m.node(&node);
    assert_eq!(silent.state, NodeState::Unusable);
    assert!(
        silent.message.contains("no word from its agent"),
        "{}",
        silent.message
    );
    // It comes back, having stopped the work itself: the old attempt's exit
    // changes nothing, and the node is usable again.
    let mut back = registration(&node, "cl");
    back.attempts = vec![AttemptReport {
        slot: order.slot.clone(),
        exited: Some(ExitReport {
            exit_code: Some(143),
            outcome: "canceled".into(),
            message: "fenced".into(),
            usage: None,
        }),
        gpus: Vec::new(),
        held: false,
    }];
    m.register_with(back, 2).expect("back");
    assert!(
        matches!(m.node(&node).state, NodeState::Idle | NodeState::Running),
        "{:?}",
        m.node(&node).state
    );
    assert_eq!(
        m.job(&id).attempts[0].instances[0].status,
        InstanceStatus::Lost
    );
}

#[test]
fn a_gang_whose_instance_is_lost_is_requeued_not_failed_when_the_others_stop() {
    let mut m = Machine::new(ControlConfig::default());
    m.cluster("cl", 2, 600);
    let id = m.submit("cl", 2);
    let nodes = m.created.clone();
    let mut a = m.register(&nodes[0], "cl");
    let mut b = m.register(&nodes[1], "cl");
    let mut orders = launches(&mut a);
    orders.extend(launches(&mut b));
    assert_eq!(orders.len(), 2);
    for order in &orders {
        let node = if launches_for(&nodes[0], order) {
            &nodes[0]
        } else {
            &nodes[1]
        };
        m.step(vec![Command::InstanceStarted {
            node_id: node.clone(),
            slot: order.slot.clone(),
            gpus: Vec::new(),
        }]);
    }
    // Node 0's agent restarts without its instance: lost; the sibling is stopped.
    let lost_on = nodes[0].clone();
    let (link, _again) = mpsc::unbounded_channel();
    let registration = Registration {
        node_id: lost_on.clone(),
        cluster: "cl".into(),
        cores: 2,
        memory_bytes: 1 << 30,
        hostname: "localhost".into(),
        pid: 2,
        runtimes: vec!["process".into()],
        attempts: Vec::new(),
        gpus: Vec::new(),
        gpu_reason: String::new(),
    };
    m.ask(|reply| Command::AgentRegister {
        registration,
        session: 2,
        link,
        reply,
    })
    .expect("registered again");
    assert_eq!(m.job(&id).status, JobStatus::Queued);
    // The sibling says it stopped, as it was told: the job stays queued.
    let sibling = orders
        .iter()
        .find(|o| !launches_for(&lost_on, o))
        .expect("the other instance");
    let other_node = if lost_on == nodes[0] {
        &nodes[1]
    } else {
        &nodes[0]
    };
    m.step(vec![exit(other_node, sibling.slot.clone(), "canceled")]);
    let job = m.job(&id);
    assert_ne!(job.status, JobStatus::Failed, "{}", job.reason);
    assert!(
        matches!(job.status, JobStatus::Queued | JobStatus::Preparing),
        "{:?}: {}",
        job.status,
        job.reason
    );
}

fn launches_for(node: &str, order: &LaunchOrder) -> bool {
    order.environment().get("SHOAL_NODE_ID").map(String::as_str) == Some(node)
}

#[test]
fn jobs_waiting_on_a_locked_cluster_cost_the_others_nothing_and_say_why() {
    let mut m = Machine::new(ControlConfig::default());
    m.cluster("parked", 4, 600);
    m.ask(|reply| Command::LockCluster {
        cluster: "parked".into(),
        kind: Some(LockKind::ReadOnly),
        reply,
    })
    .expect("lock");
    let parked: Vec<String> = (0..2_000).map(|_| m.submit("parked", 1)).collect();
    m.cluster("warm", 1, 600);
    let id = m.submit("warm", 1);
    let node = m.created.last().cloned().expect("a warm node");
    let mut agent = m.register(&node, "warm");
    assert_eq!(
        launches(&mut agent).len(),
        1,
        "the warm job is placed at once"
    );
    // Only the warm cluster changed: the parked one is not looked at.
    m.step(vec![Command::InstanceStarted {
        node_id: node.clone(),
        slot: Slot {
            attempt_id: format!("{id}.1"),
            instance: 0,
        },
        gpus: Vec::new(),
    }]);
    assert_eq!(m.control.clusters_to_place(), BTreeSet::new());
    // Every parked job gives the cluster's reason, stored once for them all.
    let last = parked.last().expect("parked jobs").clone();
    let reason = m.job(&last).reason;
    assert!(reason.to_string().contains("locked read-only"), "{reason}");
    assert_eq!(m.job(&parked[0]).reason, reason);
    assert_eq!(m.created.len(), 1, "the locked cluster never grew");
}

#[test]
fn an_idle_node_goes_at_its_idle_timeout_and_not_before() {
    let mut m = Machine::new(ControlConfig::default());
    m.cluster("cl", 1, 30);
    let id = m.submit("cl", 1);
    let node = m.created[0].clone();
    let mut agent = m.register(&node, "cl");
    let order = launches(&mut agent).pop().expect("launched");
    assert_eq!(order.slot.attempt_id, format!("{id}.1"));
    assert_eq!(
        order
            .environment()
            .get("SHOAL_NUM_NODES")
            .map(String::as_str),
        Some("1")
    );
    m.step(vec![
        Command::InstanceStarted {
            node_id: node.clone(),
            slot: order.slot.clone(),
            gpus: Vec::new(),
        },
        exit(&node, order.slot.clone(), "completed"),
    ]);
    assert_eq!(m.job(&id).status, JobStatus::Completed);
    assert_eq!(m.job(&id).attempts[0].instances[0].exit_code, Some(0));
    let idle_from = m.now;
    // Heartbeats keep the node in contact; only the idle time counts.
    while m.now < idle_from + 29_000 {
        m.now += 1_000;
        m.step(vec![Command::Heartbeat {
            node_id: node.clone(),
            cpu_percent: 0.0,
            memory_used_bytes: 0,
            stats: Default::default(),
            usage: Vec::new(),
        }]);
    }
    assert!(m.removed.is_empty(), "not before the idle timeout");
    m.advance(idle_from + 30_001 - m.now);
    assert_eq!(m.removed, vec![node], "removed at the idle timeout");
}

#[test]
fn an_agent_restarted_without_its_attempt_gets_the_job_again_as_attempt_2() {
    let mut m = Machine::new(ControlConfig::default());
    m.cluster("cl", 1, 60);
    let id = m.submit("cl", 1);
    let node = m.created[0].clone();
    let mut first = m.register(&node, "cl");
    let order = launches(&mut first).pop().expect("launched");
    let mut second = m
        .register_with(registration(&node, "cl"), 2)
        .expect("registered again");
    let again = launches(&mut second).pop().expect("launched again");
    assert_eq!(again.slot.attempt_id, format!("{id}.2"));
    assert_ne!(order.slot, again.slot);
    assert_eq!(
        again.environment().get("SHOAL_ATTEMPT").map(String::as_str),
        Some("2")
    );
    assert!(
        again.restore_outputs,
        "a rerun starts from the last outputs"
    );
    assert_eq!(
        m.job(&id).attempts[0].instances[0].status,
        InstanceStatus::Lost
    );
}

#[test]
fn an_exit_reported_at_registration_is_applied_once() {
    let mut m = Machine::new(ControlConfig::default());
    m.cluster("cl", 1, 60);
    let id = m.submit("cl", 1);
    let node = m.created[0].clone();
    let mut first = m.register(&node, "cl");
    let order = launches(&mut first).pop().expect("launched");
    let mut with_exit = registration(&node, "cl");
    with_exit.attempts = vec![AttemptReport {
        slot: order.slot.clone(),
        exited: Some(ExitReport {
            exit_code: Some(3),
            outcome: "failed".into(),
            message: String::new(),
            usage: None,
        }),
        gpus: Vec::new(),
        held: false,
    }];
    m.register_with(with_exit.clone(), 2).expect("registered");
    let job = m.job(&id);
    assert_eq!(job.status, JobStatus::Failed);
    assert!(
        job.reason.to_string().contains("exit code 3"),
        "{}",
        job.reason
    );
    // Reported again (the agent did not know it was delivered): nothing changes.
    m.advance(5_000);
    m.register_with(with_exit, 3).expect("registered again");
    let again = m.job(&id);
    assert_eq!(again.attempts.len(), 1);
    assert_eq!(again.ended_at, job.ended_at);
}

#[test]
fn an_unknown_agent_is_refused() {
    let mut m = Machine::new(ControlConfig::default());
    let err = m
        .register_with(registration("stranger", "cl"), 1)
        .expect_err("refused");
    assert!(err.to_string().contains("stranger"), "{err}");
}

#[test]
fn preemption_requeues_the_job_until_max_preemptions() {
    let mut m = Machine::new(ControlConfig::default());
    let request = ClusterRequest {
        name: "cl".into(),
        vm_size: "Standard_D2_v2".into(),
        vm_priority: "lowpriority".into(),
        max_nodes: Some(1),
        ..Default::default()
    };
    m.create_cluster(request);
    let request = JobRequest {
        cluster: "cl".into(),
        command: "true".into(),
        max_preemptions: Some(1),
        ..Default::default()
    };
    let id = m.submit_request(request);
    for round in 0..2 {
        let node = m.created[round].clone();
        let mut agent = m
            .register_with(registration(&node, "cl"), round as u64 + 1)
            .expect("registered");
        let order = launches(&mut agent).pop().expect("launched");
        assert_eq!(
            order
                .environment()
                .get("SHOAL_PREEMPTION_DEADLINE")
                .map(String::as_str),
            Some("30")
        );
        assert_eq!(order.restore_outputs, round > 0);
        m.started(&node, &order);
        let preempted = m
            .ask(|reply| Command::PreemptNode {
                node_id: node.clone(),
                notice_seconds: Some(5),
                reply,
            })
            .expect("preempt");
        assert_eq!(preempted.state, NodeState::Preempted);
        m.step(vec![exit(&node, order.slot, "preempted")]);
        if round == 0 {
            let job = m.job(&id);
            assert_eq!(job.status, JobStatus::Queued, "{}", job.reason);
            assert!(
                matches!(&job.reason, JobReason::Requeued(r) if matches!(&**r, Requeue::Preempted { node: on, count: 1, limit: 1, .. } if *on == node)),
                "{}",
                job.reason
            );
            assert!(
                job.reason.to_string().contains("preempted on node"),
                "{}",
                job.reason
            );
            // The preempted node goes; once the provider has removed it (the
            // next step here), a new one comes for the requeued job.
            assert_eq!(m.removed, vec![node.clone()]);
            assert_eq!(m.created.len(), 2);
            assert_ne!(m.created[1], node);
        }
    }
    let job = m.job(&id);
    assert_eq!(job.status, JobStatus::Failed);
    assert_eq!(job.preemptions, 2);
    assert!(
        job.reason.to_string().contains("max_preemptions 1"),
        "{}",
        job.reason
    );
}

#[test]
fn a_job_whose_gpu_idles_is_flagged_exactly_at_the_limit_and_canceled_by_the_policy() {
    let mut m = Machine::new(ControlConfig {
        idle_gpu_after: Duration::from_secs(600),
        ..ControlConfig::default()
    });
    let request = ClusterRequest {
        name: "cl".into(),
        vm_size: "Standard_NC6".into(),
        max_nodes: Some(1),
        cancel_idle_gpu_jobs: Some(true),
        ..Default::default()
    };
    m.create_cluster(request);
    let request = JobRequest {
        cluster: "cl".into(),
        command: "train".into(),
        gpus_per_instance: 1,
        ..Default::default()
    };
    let id = m.submit_request(request);
    let node = m.created[0].clone();
    let mut with_gpu = registration(&node, "cl");
    with_gpu.gpus = vec![crate::model::GpuStat {
        index: 0,
        model: "Fake".into(),
        ..Default::default()
    }];
    let mut agent = m.register_with(with_gpu, 1).expect("registered");
    let order = launches(&mut agent).pop().expect("launched");
    assert_eq!(order.gpus, 1);
    m.started(&node, &order);
    let idle = Usage {
        samples: 3,
        gpu_utilization_percent: 1,
        ..Default::default()
    };
    let beat = |usage: Usage| Command::Heartbeat {
        node_id: node.clone(),
        cpu_percent: 1.0,
        memory_used_bytes: 0,
        stats: NodeStats::default(),
        usage: vec![(order.slot.clone(), usage)],
    };
    m.step(vec![beat(idle.clone())]);
    let low_from = m.now;
    m.now = low_from + 599_999;
    m.step(vec![beat(idle.clone())]);
    assert_eq!(
        m.job(&id).status,
        JobStatus::Running,
        "1 ms short of the limit"
    );
    assert!(m.job(&id).flags.is_empty());
    m.now = low_from + 600_000;
    m.step(vec![beat(idle)]);
    let job = m.job(&id);
    assert_eq!(job.status, JobStatus::Canceling, "{}", job.reason);
    assert_eq!(cancels(&mut agent), vec![order.slot.clone()]);
    m.step(vec![exit(&node, order.slot.clone(), "canceled")]);
    let job = m.job(&id);
    assert_eq!(job.status, JobStatus::Canceled);
    assert!(
        job.flags
            .iter()
            .any(|f| f.starts_with("idle GPU: instance 0 below 5% GPU utilization")),
        "{:?}",
        job.flags
    );
    assert!(
        job.reason.to_string().contains("idle-GPU policy"),
        "{}",
        job.reason
    );
}

#[test]
fn a_canceled_job_shows_canceling_until_its_instance_has_stopped() {
    let mut m = Machine::new(ControlConfig::default());
    m.cluster("cl", 1, 60);
    let (id, node, mut agent, order) = m.one_running();
    let answer = m
        .ask(|reply| Command::CancelJob(id.clone(), reply))
        .expect("cancel");
    assert_eq!(answer.status, JobStatus::Canceling, "still running");
    assert_eq!(
        answer.attempts[0].instances[0].status,
        InstanceStatus::Stopping
    );
    assert_eq!(answer.attempts[0].status(), "stopping");
    let again = m
        .ask(|reply| Command::CancelJob(id.clone(), reply))
        .expect("a second cancel");
    assert_eq!(
        again.status,
        JobStatus::Canceling,
        "idempotent while stopping"
    );
    assert_eq!(cancels(&mut agent), vec![order.slot.clone()]);
    // Only the agent's word ends it, however long it takes.
    m.advance(25_000);
    assert_eq!(m.job(&id).status, JobStatus::Canceling);
    m.step(vec![exit(&node, order.slot, "canceled")]);
    let job = m.job(&id);
    assert_eq!(job.status, JobStatus::Canceled);
    assert_eq!(job.reason.to_string(), "canceled by user");
    assert_eq!(job.attempts[0].status(), "canceled");
    assert!(
        m.ask(|reply| Command::CancelJob(id, reply)).is_err(),
        "an ended job cannot be canceled"
    );
}

#[test]
fn a_queued_job_is_canceled_at_once() {
    let mut m = Machine::new(ControlConfig::default());
    m.cluster("cl", 1, 60);
    let id = m.submit("cl", 1);
    let answer = m
        .ask(|reply| Command::CancelJob(id, reply))
        .expect("cancel");
    assert_eq!(answer.status, JobStatus::Canceled, "nothing of it runs");
}

#[test]
fn a_read_only_lock_holds_scaling_and_says_so() {
    let mut m = Machine::new(ControlConfig::default());
    m.cluster("cl", 2, 60);
    m.ask(|reply| Command::LockCluster {
        cluster: "cl".into(),
        kind: Some(LockKind::ReadOnly),
        reply,
    })
    .expect("lock");
    let id = m.submit("cl", 1);
    assert_eq!(
        m.job(&id).reason.to_string(),
        "cluster locked read-only; `shoal cluster unlock cl` lets it scale"
    );
    m.advance(60_000);
    assert!(m.created.is_empty(), "a minute later, still no node");
    let cluster = m
        .ask(|reply| Command::GetCluster("cl".into(), reply))
        .expect("cluster");
    assert_eq!(
        cluster
            .cluster
            .errors
            .first()
            .map(ToString::to_string)
            .as_deref(),
        Some("scale-up blocked: cluster locked read-only; `shoal cluster unlock cl` lets it scale")
    );
    m.ask(|reply| Command::LockCluster {
        cluster: "cl".into(),
        kind: None,
        reply,
    })
    .expect("unlock");
    assert_eq!(m.created.len(), 1, "unlocked: it scales in the same pass");
    let cluster = m
        .ask(|reply| Command::GetCluster("cl".into(), reply))
        .expect("cluster");
    assert!(
        cluster.cluster.errors.is_empty(),
        "{:?}",
        cluster.cluster.errors
    );
}

#[test]
fn a_quota_names_the_scope_and_the_numbers() {
    let mut m = Machine::new(ControlConfig {
        quotas: crate::governance::Quotas {
            total_cores: 2,
            ..Default::default()
        },
        ..ControlConfig::default()
    });
    m.cluster("cl", 4, 60);
    let id = m.submit("cl", 2);
    assert_eq!(
        m.job(&id).reason.to_string(),
        "quota: total 2/2 cores used; a node needs 2"
    );
    assert_eq!(m.created.len(), 1, "one node fits the quota, not two");
    let report = m.ask(Command::GetQuotas).expect("quotas");
    assert!(
        report.lines.contains(&("total".to_string(), 2, 2)),
        "{report:?}"
    );
}

#[test]
fn an_mpi_job_completes_with_its_launcher_and_releases_the_holders() {
    let mut m = Machine::new(ControlConfig::default());
    m.cluster("cl", 2, 60);
    let request = JobRequest {
        cluster: "cl".into(),
        command: "train".into(),
        instance_count: 2,
        distribution: Some(crate::model::Distribution::Mpi {
            process_count_per_instance: 3,
        }),
        ..Default::default()
    };
    let id = m.submit_request(request);
    let nodes = m.created.clone();
    let mut links = [m.register(&nodes[0], "cl"), m.register(&nodes[1], "cl")];
    let mut orders: Vec<LaunchOrder> = links.iter_mut().flat_map(launches).collect();
    orders.sort_by_key(|o| o.slot.instance);
    assert_eq!(orders.len(), 2);
    for order in &orders {
        // mpirun starts the ranks: the agent starts one process per instance.
        assert!(order.mpi);
        assert_eq!(order.processes, 1);
        let env = order.environment();
        assert_eq!(env["SHOAL_MPI_PROCESSES_PER_NODE"], "3");
        assert_eq!(env["OMPI_MCA_plm_rsh_no_tree_spawn"], "1");
        assert_eq!(env["SHOAL_NODE_IDS"].split(',').count(), 2);
    }
    let node_of = |order: &LaunchOrder| order.environment()["SHOAL_NODE_ID"].clone();
    for order in &orders {
        m.started(&node_of(order), order);
    }
    assert_eq!(m.job(&id).status, JobStatus::Running);
    // The launcher (instance 0) ends well: the job is done, the holder released.
    m.step(vec![exit(
        &node_of(&orders[0]),
        orders[0].slot.clone(),
        "completed",
    )]);
    assert_eq!(m.job(&id).status, JobStatus::Completed);
    let holder = node_of(&orders[1]);
    let link = if holder == nodes[0] {
        &mut links[0]
    } else {
        &mut links[1]
    };
    let mut released = None;
    while let Ok(message) = link.try_recv() {
        if let ToAgent::Cancel { slot, reason } = message {
            released = Some((slot, reason));
        }
    }
    let (slot, reason) = released.expect("the holder is told to stop");
    assert_eq!(slot, orders[1].slot);
    assert_eq!(reason, super::MPI_RELEASE);
    m.step(vec![Command::InstanceExited {
        node_id: holder,
        slot,
        exit: ExitReport {
            exit_code: Some(0),
            outcome: "canceled".into(),
            message: reason,
            usage: None,
        },
    }]);
    let job = m.job(&id);
    assert_eq!(job.status, JobStatus::Completed);
    assert_eq!(
        job.attempts[0].instances[1].status,
        InstanceStatus::Completed,
        "released when the work was done: its part is done"
    );
}

#[test]
fn identities_are_made_with_their_cluster_and_go_with_it() {
    let mut m = Machine::new(ControlConfig::default());
    let bot = m
        .ask(|reply| Command::CreateIdentity {
            name: "reader-bot".into(),
            reply,
        })
        .expect("identity");
    assert!(
        m.ask(|reply| Command::CreateIdentity {
            name: "reader-bot".into(),
            reply,
        })
        .is_err(),
        "names are unique"
    );
    let request = |identities: &[&str]| ClusterRequest {
        name: "cl".into(),
        vm_size: "Standard_D2_v2".into(),
        identities: identities.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    };
    // An unknown identity refuses the whole create: no cluster is left behind.
    let wanted = request(&["[system]", "nobody"]);
    let err = m
        .ask(|reply| Command::CreateCluster(wanted, reply))
        .expect_err("unknown identity");
    assert!(err.to_string().contains("no identity `nobody`"), "{err}");
    assert!(
        m.ask(|reply| Command::GetCluster("cl".into(), reply))
            .is_err(),
        "nothing was created"
    );
    // By resource id, as the managed service's examples name them; system first.
    let resource = "/subscriptions/0000/resourceGroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/reader-bot";
    let wanted = request(&[resource, "[system]"]);
    let info = m
        .ask(|reply| Command::CreateCluster(wanted, reply))
        .expect("cluster");
    let kinds: Vec<_> = info
        .identities
        .iter()
        .map(|a| (a.kind, a.name.clone()))
        .collect();
    assert_eq!(
        kinds,
        vec![
            (crate::model::IdentityKind::SystemAssigned, "cl".to_string()),
            (
                crate::model::IdentityKind::UserAssigned,
                "reader-bot".to_string()
            ),
        ]
    );
    assert_eq!(info.identities[1].client_id, bot.client_id);
    let info = m
        .ask(|reply| Command::RemoveIdentity {
            cluster: "cl".into(),
            identity: "[system]".into(),
            reply,
        })
        .expect("remove");
    assert_eq!(info.identities.len(), 1);
    // Deleted with the cluster: a new cluster of the same name inherits nothing.
    m.ask(|reply| Command::DeleteCluster("cl".into(), reply))
        .expect("delete");
    let wanted = request(&[]);
    let info = m
        .ask(|reply| Command::CreateCluster(wanted, reply))
        .expect("again");
    assert!(info.identities.is_empty(), "{:?}", info.identities);
    let info = m
        .ask(|reply| Command::AssignIdentity {
            cluster: "cl".into(),
            identity: bot.client_id.clone(),
            reply,
        })
        .expect("by client id");
    assert_eq!(info.identities[0].name, "reader-bot");
}

#[test]
fn only_live_and_recent_jobs_stay_in_memory() {
    let mut m = Machine::new(ControlConfig {
        recent_jobs: 2,
        ..ControlConfig::default()
    });
    m.cluster("cl", 1, 60);
    let ids: Vec<String> = (0..4).map(|_| m.submit("cl", 1)).collect();
    let node = m.created[0].clone();
    let mut agent = m.register(&node, "cl");
    for id in &ids {
        let order = launches(&mut agent).pop().expect("the next launch");
        m.step(vec![exit(&node, order.slot, "completed")]);
        assert_eq!(m.job(id).status, JobStatus::Completed);
    }
    // The two oldest are in the store only; every one is counted.
    for old in &ids[..2] {
        let old = old.clone();
        let err = m
            .ask(|reply| Command::GetJob(old, reply))
            .expect_err("evicted");
        assert!(matches!(err, Error::NotFound(_)), "{err}");
    }
    assert_eq!(m.job(&ids[3]).status, JobStatus::Completed);
    let counts = m.ask(Command::JobCounts).expect("counts");
    assert_eq!(counts.get(&JobStatus::Completed), Some(&4));
    // Deleting a live job is refused; an ended one is forgotten at once.
    let live = m.submit("cl", 1);
    assert!(m.ask(|reply| Command::DeleteJob(live, reply)).is_err());
    let last = ids[3].clone();
    m.ask(|reply| Command::DeleteJob(last, reply))
        .expect("delete");
    let last = ids[3].clone();
    assert!(m.ask(|reply| Command::GetJob(last, reply)).is_err());
    let counts = m.ask(Command::JobCounts).expect("counts");
    assert_eq!(counts.get(&JobStatus::Completed), Some(&3));
}

/// Found by the simulator (seed 125): a coordinator that restarted before it
/// committed an instance's start learned it runs from the agent's
/// registration, but not which GPUs it holds.
#[test]
fn a_running_instance_reported_at_registration_keeps_its_gpus() {
    let mut m = Machine::new(ControlConfig::default());
    m.create_cluster(ClusterRequest {
        name: "cl".into(),
        vm_size: "Standard_NC6".into(),
        max_nodes: Some(1),
        ..Default::default()
    });
    let id = m.submit_request(JobRequest {
        cluster: "cl".into(),
        command: "train".into(),
        gpus_per_instance: 1,
        ..Default::default()
    });
    let node = m.created[0].clone();
    let with_gpu = || {
        let mut registration = registration(&node, "cl");
        registration.gpus = vec![crate::model::GpuStat {
            index: 0,
            model: "Fake".into(),
            ..Default::default()
        }];
        registration
    };
    let mut agent = m.register_with(with_gpu(), 1).expect("registered");
    let order = launches(&mut agent).pop().expect("launched");
    // Its start never reached the coordinator; the agent comes back running it.
    let mut back = with_gpu();
    back.attempts = vec![AttemptReport {
        slot: order.slot.clone(),
        exited: None,
        gpus: vec![0],
        held: false,
    }];
    m.register_with(back, 2).expect("back");
    let job = m.job(&id);
    assert_eq!(job.status, JobStatus::Running, "{}", job.reason);
    assert_eq!(job.attempts[0].instances[0].gpus, vec![0]);
    assert!(m.control.invariant_violations().is_empty());
}

/// Found by the simulator at 300 nodes: a node back after it lost contact,
/// once its replacement was made, pushed its cluster over max_nodes and the
/// quotas over their limit. A node out of contact now counts against the
/// quotas, and one that comes back to a full cluster is sent away.
#[test]
fn a_node_replaced_while_out_of_contact_is_sent_away_when_it_comes_back() {
    let config = ControlConfig {
        lease: Duration::from_secs(6),
        ..ControlConfig::default()
    };
    let mut m = Machine::new(config);
    m.cluster("cl", 1, 600);
    m.submit("cl", 1);
    let node = m.created[0].clone();
    let mut agent = m.register(&node, "cl");
    let order = launches(&mut agent).pop().expect("launched");
    m.started(&node, &order);
    let used = |m: &mut Machine| {
        let report = m.ask(Command::GetQuotas).expect("quotas");
        report
            .lines
            .iter()
            .find(|(scope, _, _)| scope == "total")
            .map(|(_, _, used)| *used)
    };
    assert_eq!(used(&mut m), Some(2));
    m.advance(6_001);
    assert_eq!(m.node(&node).state, NodeState::Unusable);
    // The job is rerun on a replacement (max_nodes 1: the lost node is not
    // allocated), and the lost node's cores still count beside its own.
    assert_eq!(m.created.len(), 2, "a replacement: {:?}", m.created);
    assert_eq!(
        used(&mut m),
        Some(4),
        "out of contact, its cores still count"
    );
    let replacement = m.created[1].clone();
    let mut second = m.register(&replacement, "cl");
    assert_eq!(launches(&mut second).len(), 1, "the rerun runs there");
    let refused = m
        .register_with(registration(&node, "cl"), 2)
        .expect_err("a full cluster sends it away");
    assert!(
        refused
            .to_string()
            .contains("replaced while it was out of contact"),
        "{refused}"
    );
    assert!(m.removed.contains(&node), "removed: {:?}", m.removed);
    m.step(Vec::new());
    let nodes = m
        .ask(|reply| Command::ListNodes(None, reply))
        .expect("nodes");
    assert!(nodes.iter().all(|n| n.id != node), "it is gone");
    assert!(m.control.invariant_violations().is_empty());
    assert!(m.control.allocated_nodes("cl") <= 1);
}

#[test]
fn shares_pack_one_node_and_it_scales_for_the_cores_wanted_and_idles_only_when_empty() {
    let mut m = Machine::new(ControlConfig::default());
    m.cluster("cl", 3, 30);
    let half = |m: &mut Machine| {
        m.submit_request(JobRequest {
            cluster: "cl".into(),
            argv: vec!["true".into()],
            resources: Resources::share(0.5, 0).expect("a share"),
            ..Default::default()
        })
    };
    // Five half-core instances want 2.5 cores: two 2-core nodes, not five.
    let ids: Vec<String> = (0..5).map(|_| half(&mut m)).collect();
    assert_eq!(m.created.len(), 2, "{:?}", m.created);
    let node = m.created[0].clone();
    let mut agent = m.register(&node, "cl");
    let orders = launches(&mut agent);
    assert_eq!(
        orders.len(),
        4,
        "four halves fill the first node's two cores"
    );
    assert!(orders.iter().all(|o| o.share.millicpus == 500));
    let booked = m.node(&node);
    assert_eq!(booked.running.len(), 4);
    assert_eq!(booked.state, NodeState::Running);
    assert!(booked.room().is_full());
    // One ends: its half core is free and the fifth takes it, on the same node.
    for order in &orders {
        m.started(&node, order);
    }
    m.step(vec![exit(&node, orders[0].slot.clone(), "completed")]);
    let next = launches(&mut agent);
    assert_eq!(next.len(), 1);
    assert_eq!(next[0].slot.attempt_id, format!("{}.1", ids[4]));
    // Until the last one ends the node is running, not idle.
    m.started(&node, &next[0]);
    for order in orders[1..].iter().chain(&next) {
        assert_eq!(m.node(&node).state, NodeState::Running);
        m.step(vec![exit(&node, order.slot.clone(), "completed")]);
    }
    let idle = m.node(&node);
    assert_eq!((idle.state, idle.running.len()), (NodeState::Idle, 0));
    for id in &ids {
        assert_eq!(m.job(id).status, JobStatus::Completed);
    }
    assert!(m.control.invariant_violations().is_empty());
}

#[test]
fn an_array_runs_each_index_once_at_most_max_concurrent_at_a_time_and_cancels_whole() {
    let mut m = Machine::new(ControlConfig::default());
    m.cluster("cl", 3, 30);
    let array = m.submit_request(JobRequest {
        cluster: "cl".into(),
        argv: vec!["true".into()],
        array: Some(ArraySpec::parse("10-22:2%2").expect("an array")),
        ..Default::default()
    });
    let job = m.job(&array);
    let state = job.array.as_deref().expect("an array's record").clone();
    assert_eq!((state.spec.count(), state.released), (7, 2));
    assert_eq!(job.status, JobStatus::Queued);
    // Two at once: two nodes, not seven.
    assert_eq!(m.created.len(), 2, "{:?}", m.created);
    let held = crate::control::job_id(Task::seq(job.seq, 2));
    assert_eq!(
        m.job(&held).reason.to_string(),
        format!("held: array {array} runs at most 2 tasks at once")
    );
    let nodes = m.created.clone();
    let mut agents: Vec<_> = nodes.iter().map(|n| m.register(n, "cl")).collect();
    let mut seen = Vec::new();
    for _ in 0..7 {
        // Whatever was launched runs and completes; the next is released.
        let mut ran = false;
        for (node, agent) in nodes.iter().zip(agents.iter_mut()) {
            for order in launches(agent) {
                let env = order.environment();
                seen.push(env["SHOAL_ARRAY_INDEX"].clone());
                assert!(order.end_may_wait(), "no one waits on one task's end");
                assert_eq!(env["SLURM_ARRAY_TASK_ID"], env["SHOAL_ARRAY_INDEX"]);
                assert_eq!(env["SHOAL_ARRAY_JOB_ID"], array);
                m.started(node, &order);
                let running = m
                    .job(&array)
                    .array
                    .expect("state")
                    .count(JobStatus::Running);
                assert!(running <= 2, "{running} tasks run at once");
                m.step(vec![exit(node, order.slot.clone(), "completed")]);
                ran = true;
            }
        }
        assert!(
            m.control.invariant_violations().is_empty(),
            "{:?}",
            m.control.invariant_violations()
        );
        if !ran {
            break;
        }
    }
    seen.sort_by_key(|i| i.parse::<u32>().expect("an index"));
    assert_eq!(
        seen,
        ["10", "12", "14", "16", "18", "20", "22"],
        "each index once"
    );
    let done = m.job(&array);
    assert_eq!(done.status, JobStatus::Completed);
    assert_eq!(done.reason.to_string(), "7 of 7 tasks completed");

    // Canceled whole: the running task stops, the queued and held ones end now.
    let second = m.submit_request(JobRequest {
        cluster: "cl".into(),
        argv: vec!["true".into()],
        array: Some(ArraySpec::parse("0-4%1").expect("an array")),
        ..Default::default()
    });
    let order = launches(&mut agents[0])
        .into_iter()
        .chain(launches(&mut agents[1]))
        .next()
        .expect("one task launched");
    let node = nodes
        .iter()
        .find(|n| m.node(n).runs(&order.slot))
        .expect("its node")
        .clone();
    m.started(&node, &order);
    let canceled = m
        .ask(|reply| Command::CancelJob(second.clone(), reply))
        .expect("cancel");
    assert_eq!(canceled.status, JobStatus::Canceling);
    assert_eq!(
        canceled
            .array
            .as_deref()
            .expect("state")
            .count(JobStatus::Canceled),
        4
    );
    m.step(vec![exit(&node, order.slot.clone(), "canceled")]);
    let over = m.job(&second);
    assert_eq!(over.status, JobStatus::Canceled);
    assert_eq!(over.array.expect("state").count(JobStatus::Canceled), 5);
    assert!(m.control.invariant_violations().is_empty());
}

#[test]
fn a_held_task_canceled_alone_does_not_let_its_array_run_more_at_once() {
    let mut m = Machine::new(ControlConfig::default());
    m.cluster("cl", 3, 30);
    let array = m.submit_request(JobRequest {
        cluster: "cl".into(),
        argv: vec!["true".into()],
        array: Some(ArraySpec::parse("0-5%2").expect("an array")),
        ..Default::default()
    });
    let array_seq = m.job(&array).seq;
    let held = crate::control::job_id(Task::seq(array_seq, 4));
    let canceled = m
        .ask(|reply| Command::CancelJob(held.clone(), reply))
        .expect("cancel");
    assert_eq!(canceled.status, JobStatus::Canceled);
    let nodes = m.created.clone();
    assert_eq!(nodes.len(), 2);
    let mut agents: Vec<_> = nodes.iter().map(|n| m.register(n, "cl")).collect();
    let mut ran = Vec::new();
    loop {
        let mut orders = Vec::new();
        for (node, agent) in nodes.iter().zip(agents.iter_mut()) {
            for order in launches(agent) {
                m.started(node, &order);
                orders.push((node.clone(), order));
            }
        }
        if orders.is_empty() {
            break;
        }
        let state = m.job(&array).array.expect("state");
        let live = state.count(JobStatus::Running) + state.count(JobStatus::Preparing);
        assert!(live <= 2, "{live} tasks at once: {state:?}");
        for (node, order) in orders {
            ran.push(order.environment()["SHOAL_ARRAY_INDEX"].clone());
            m.step(vec![exit(&node, order.slot.clone(), "completed")]);
        }
    }
    ran.sort();
    assert_eq!(ran, ["0", "1", "2", "3", "5"]);
    let done = m.job(&array);
    assert_eq!(
        done.status,
        JobStatus::Canceled,
        "one task canceled, none failed"
    );
    assert_eq!(
        done.reason.to_string(),
        "5 of 6 tasks completed, 1 canceled"
    );
    assert!(m.control.invariant_violations().is_empty());
}

#[test]
fn a_start_is_written_with_the_next_batch_that_writes_or_a_tenth_of_a_second_later() {
    let mut m = Machine::new(ControlConfig::default());
    m.cluster("cl", 2, 600);
    let id = m.submit("cl", 1);
    let node = m.created[0].clone();
    let mut agent = m.register(&node, "cl");
    let order = launches(&mut agent).pop().expect("launched");
    m.started(&node, &order);
    assert!(
        m.written.is_empty(),
        "a start alone costs no commit: {:?}",
        m.written
    );
    assert_eq!(m.control.wake_at(), Some(m.now + 100), "woken to write it");
    assert_eq!(
        m.job(&id).status,
        JobStatus::Running,
        "running at once in memory"
    );
    m.advance(99);
    assert!(m.written.is_empty(), "{:?}", m.written);
    m.advance(1);
    assert_eq!(m.written, vec![id.clone()]);
    let stored = m.store.load().expect("load");
    let job = stored
        .jobs
        .iter()
        .find(|j| j.id.as_str() == id)
        .expect("stored");
    assert_eq!(job.status, JobStatus::Running);
    // A second start goes with the next batch that writes anything: a submit.
    let other = m.submit("cl", 1);
    let node = m.created[1].clone();
    let mut agent = m.register(&node, "cl");
    let order = launches(&mut agent).pop().expect("launched");
    m.started(&node, &order);
    assert!(m.written.is_empty(), "{:?}", m.written);
    let third = m.submit("cl", 1);
    assert!(
        m.written.contains(&other) && m.written.contains(&third),
        "{:?}",
        m.written
    );
    assert!(m.control.lazy_jobs.is_empty(), "nothing left to write");
}

/// An array of `true` tasks (`range`) on a one-node cluster, its first task
/// run for 0.1 s and ended: the array, the node, its agent and that first launch.
fn quick_array(
    m: &mut Machine,
    range: &str,
) -> (String, String, UnboundedReceiver<ToAgent>, LaunchOrder) {
    m.cluster("cl", 1, 30);
    let array = m.submit_request(JobRequest {
        cluster: "cl".into(),
        argv: vec!["true".into()],
        array: Some(ArraySpec::parse(range).expect("an array")),
        ..Default::default()
    });
    let node = m.created[0].clone();
    let mut agent = m.register(&node, "cl");
    let first = launches(&mut agent).pop().expect("launched");
    m.started(&node, &first);
    m.advance(100);
    m.step(vec![exit(&node, first.slot.clone(), "completed")]);
    (array, node, agent, first)
}

/// Single jobs alike (the same command on the same cluster) follow one another
/// as an array's tasks do, once one of them ran quick: the node starts each as
/// the one before ends. A job unlike them is not booked, and nothing queued
/// behind it is passed over; each end is written at once (someone may wait).
#[test]
fn quick_single_jobs_alike_are_booked_behind_each_other_and_an_unlike_one_is_not() {
    let mut m = Machine::new(ControlConfig::default());
    m.cluster("cl", 1, 30);
    let first = m.submit("cl", 1);
    let node = m.created[0].clone();
    let mut agent = m.register(&node, "cl");
    let order = launches(&mut agent).pop().expect("launched");
    // Three more alike wait, then one of another command, then one alike.
    let alike: Vec<String> = (0..3).map(|_| m.submit("cl", 1)).collect();
    let unlike = m.submit_request(JobRequest {
        cluster: "cl".into(),
        argv: vec!["sleep".into(), "1".into()],
        ..Default::default()
    });
    let last = m.submit("cl", 1);
    // Nothing is booked before one of them has run: no time known yet.
    assert!(launches(&mut agent).is_empty());
    m.started(&node, &order);
    m.advance(100);
    m.step(vec![exit(&node, order.slot.clone(), "completed")]);
    assert!(
        m.written.contains(&first),
        "a single job's end is written at once"
    );
    // It ran in 0.1 s: the next is placed, and the other two alike are booked
    // behind it, each behind the one before; the unlike one stops the booking.
    let orders = launches(&mut agent);
    let ids: Vec<&str> = orders.iter().map(|o| o.slot.job_id()).collect();
    assert_eq!(ids, alike.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(orders[0].after.is_none());
    for pair in orders.windows(2) {
        assert_eq!(pair[1].after.as_ref(), Some(&pair[0].slot), "{orders:?}");
    }
    assert!(
        orders.iter().all(|o| !o.end_may_wait()),
        "someone may wait on a single job's end: its node sends it at once"
    );
    let violations = m.control.invariant_violations();
    assert!(violations.is_empty(), "{violations:?}");
    // Each ends in turn, the agent starting the next itself; the unlike one
    // is placed only when the node is free, and the last alike one after it.
    for order in &orders {
        m.started(&node, order);
        m.advance(100);
        m.step(vec![exit(&node, order.slot.clone(), "completed")]);
        let id = order.slot.job_id().to_string();
        assert_eq!(m.job(&id).status, JobStatus::Completed);
    }
    let next = launches(&mut agent);
    let ids: Vec<&str> = next.iter().map(|o| o.slot.job_id()).collect();
    assert_eq!(
        ids,
        vec![unlike.as_str()],
        "the unlike one alone, on the free node"
    );
    m.started(&node, &next[0]);
    m.advance(2_000);
    m.step(vec![exit(&node, next[0].slot.clone(), "completed")]);
    let ids: Vec<String> = launches(&mut agent)
        .iter()
        .map(|o| o.slot.job_id().to_string())
        .collect();
    assert_eq!(
        ids,
        vec![last],
        "then the last alike one, placed as any job"
    );
    let violations = m.control.invariant_violations();
    assert!(violations.is_empty(), "{violations:?}");
}

/// Which jobs share a family: an array's tasks; single jobs only when the
/// same work (a job with data of its own, a sweep's trial or a pipeline's step
/// is never alike).
#[test]
fn single_jobs_are_alike_only_when_they_are_the_same_work() {
    let mut m = Machine::new(ControlConfig::default());
    m.cluster("cl", 1, 30);
    m.cluster("other", 1, 30);
    let request = |cluster: &str, argv: &[&str]| JobRequest {
        cluster: cluster.into(),
        argv: argv.iter().map(|a| a.to_string()).collect(),
        ..Default::default()
    };
    let a = m.submit_request(request("cl", &["python", "eval.py"]));
    let b = m.submit_request(request("cl", &["python", "eval.py"]));
    let other_args = m.submit_request(request("cl", &["python", "eval.py", "--fast"]));
    let other_cluster = m.submit_request(request("other", &["python", "eval.py"]));
    let mut with_env = request("cl", &["python", "eval.py"]);
    with_env
        .environment_variables
        .insert("SHARD".into(), "3".into());
    let with_env = m.submit_request(with_env);
    let family = |m: &mut Machine, id: &str| successors::family(&m.job(id));
    assert!(family(&mut m, &a).is_some());
    assert_eq!(family(&mut m, &a), family(&mut m, &b));
    for unlike in [&other_args, &other_cluster, &with_env] {
        assert_ne!(family(&mut m, &a), family(&mut m, unlike), "{unlike}");
    }
    let array = m.submit_request(JobRequest {
        cluster: "cl".into(),
        argv: vec!["python".into(), "eval.py".into()],
        array: Some(ArraySpec::parse("0-1").expect("an array")),
        ..Default::default()
    });
    assert_eq!(
        family(&mut m, &array),
        None,
        "an array's own record runs nothing"
    );
}

#[test]
fn a_completed_task_is_written_with_its_node_in_a_later_batch_and_its_arrays_end_at_once() {
    let mut m = Machine::new(ControlConfig::default());
    let (array, node, mut agent, first) = quick_array(&mut m, "0-11");
    // The next runs with ten booked behind it (that booking was written).
    let orders = launches(&mut agent);
    assert_eq!(orders.len(), 11);
    assert!(m.written.contains(&first.slot.job_id().to_string()));
    // The next ends: nothing waits on that being written, so no batch is.
    m.started(&node, &orders[0]);
    m.advance(100);
    m.step(vec![exit(&node, orders[0].slot.clone(), "completed")]);
    let task = orders[0].slot.job_id().to_string();
    assert!(m.written.is_empty(), "{:?}", m.written);
    assert_eq!(m.job(&task).status, JobStatus::Completed, "ended in memory");
    assert_eq!(m.control.wake_at(), Some(m.now + 100), "woken to write it");
    // What is stored agrees with itself: the job still runs on the node.
    let stored = m.store.load().expect("load");
    let row = stored.jobs.iter().find(|j| j.id.as_str() == task);
    assert_eq!(row.map(|j| j.status), Some(JobStatus::Running));
    let on_node = |stored: &crate::store::Snapshot| {
        stored
            .nodes
            .iter()
            .find(|n| n.id == node)
            .is_some_and(|n| n.running.iter().any(|b| b.slot == orders[0].slot))
    };
    assert!(on_node(&stored), "the node's row still holds it");
    // A tenth of a second on, both are written, in one batch.
    m.advance(100);
    assert!(m.written.contains(&task), "{:?}", m.written);
    let stored = m.store.load().expect("load");
    let row = stored.jobs.iter().find(|j| j.id.as_str() == task);
    assert_eq!(row.map(|j| j.status), Some(JobStatus::Completed));
    assert!(!on_node(&stored), "the node's row let it go");
    // The rest end; the last one's batch writes the array's end with it.
    for order in &orders[1..] {
        m.started(&node, order);
        m.step(vec![exit(&node, order.slot.clone(), "completed")]);
    }
    let written = m.written.clone();
    let last = orders[10].slot.job_id().to_string();
    assert!(
        written.contains(&array) && written.contains(&last),
        "{written:?}"
    );
    assert_eq!(m.job(&array).status, JobStatus::Completed);
    let stored = m.store.load().expect("load");
    let ended = stored
        .jobs
        .iter()
        .filter(|j| j.task.is_some() && j.status == JobStatus::Completed)
        .count();
    assert_eq!(ended, 12, "every task's end is stored with the array's");
    assert!(m.control.lazy_jobs.is_empty() && m.control.lazy_nodes.is_empty());
}

#[test]
fn a_node_is_told_its_next_quick_task_ahead_and_starts_it_only_after_the_one_before() {
    let mut m = Machine::new(ControlConfig::default());
    m.cluster("cl", 1, 30);
    let array = m.submit_request(JobRequest {
        cluster: "cl".into(),
        argv: vec!["true".into()],
        array: Some(ArraySpec::parse("0-5").expect("an array")),
        ..Default::default()
    });
    let node = m.created[0].clone();
    let mut agent = m.register(&node, "cl");
    // Nothing is known of the tasks yet: one at a time.
    let first = launches(&mut agent);
    assert_eq!(first.len(), 1);
    assert!(first[0].after.is_none());
    m.started(&node, &first[0]);
    m.advance(600);
    // A task ran in 0.6 s: the next is placed, and one more (as many as fit in
    // a second) booked behind it.
    m.step(vec![exit(&node, first[0].slot.clone(), "completed")]);
    let orders = launches(&mut agent);
    assert_eq!(orders.len(), 2, "{orders:?}");
    let (second, third) = (&orders[0], &orders[1]);
    assert!(second.after.is_none());
    assert_eq!(third.after.as_ref(), Some(&second.slot));
    assert_eq!(third.environment()["SHOAL_ARRAY_INDEX"], "2");
    let waiting = m.job(third.slot.job_id());
    assert_eq!(
        waiting.reason.to_string(),
        format!(
            "next on {node}: starts when {} ends there",
            second.slot.job_id()
        )
    );
    let booked = m.node(&node);
    assert_eq!(booked.running.len(), 2);
    assert!(
        booked.room().is_full(),
        "the successor holds nothing yet, the one before all"
    );
    assert!(
        m.control.invariant_violations().is_empty(),
        "{:?}",
        m.control.invariant_violations()
    );
    // One booked behind each instance, not more.
    m.advance(50);
    assert!(launches(&mut agent).is_empty());
    // The second ends: the third holds the node, and the fourth is booked behind it.
    m.started(&node, second);
    m.advance(600);
    m.step(vec![exit(&node, second.slot.clone(), "completed")]);
    let promoted = m.node(&node);
    assert!(promoted.running.iter().all(|b| b.slot != second.slot));
    assert!(
        promoted
            .running
            .iter()
            .any(|b| b.slot == third.slot && b.after.is_none()),
        "{:?}",
        promoted.running
    );
    let fourth = launches(&mut agent)
        .pop()
        .expect("the fourth, booked ahead");
    assert_eq!(fourth.after.as_ref(), Some(&third.slot));
    assert!(
        m.control.invariant_violations().is_empty(),
        "{:?}",
        m.control.invariant_violations()
    );
    // Canceled whole: the running third and the held fourth are both stopped;
    // the held one ends without having started.
    m.started(&node, third);
    m.ask(|reply| Command::CancelJob(array.clone(), reply))
        .expect("cancel");
    let stopped = cancels(&mut agent);
    assert!(
        stopped.contains(&third.slot) && stopped.contains(&fourth.slot),
        "{stopped:?}"
    );
    m.step(vec![exit(&node, fourth.slot.clone(), "canceled")]);
    m.step(vec![exit(&node, third.slot.clone(), "canceled")]);
    let over = m.job(&array);
    assert_eq!(over.status, JobStatus::Canceled);
    let state = over.array.expect("state");
    assert_eq!(
        (
            state.count(JobStatus::Completed),
            state.count(JobStatus::Canceled)
        ),
        (2, 4)
    );
    assert!(m.node(&node).running.is_empty());
    assert!(
        m.control.invariant_violations().is_empty(),
        "{:?}",
        m.control.invariant_violations()
    );
}

#[test]
fn tasks_ten_times_shorter_than_a_second_are_booked_ten_deep_and_a_canceled_one_leaves_the_chain_whole()
 {
    let mut m = Machine::new(ControlConfig::default());
    let (array, node, mut agent, _) = quick_array(&mut m, "0-39");
    // A task ran in 0.1 s: the next is placed and ten are booked behind it,
    // each behind the one before.
    let orders = launches(&mut agent);
    assert_eq!(
        orders.len(),
        1 + successors::chain_length(100),
        "{orders:?}"
    );
    assert_eq!(successors::chain_length(100), 10);
    assert!(orders[0].after.is_none());
    for pair in orders.windows(2) {
        assert_eq!(pair[1].after.as_ref(), Some(&pair[0].slot), "{orders:?}");
    }
    let violations = m.control.invariant_violations();
    assert!(violations.is_empty(), "{violations:?}");
    assert!(
        m.node(&node).room().is_full(),
        "one share held, by the first"
    );
    // One waiting in the middle is canceled: the one behind it now follows
    // the one before it.
    let (before, canceled, behind) = (&orders[4], &orders[5], &orders[6]);
    m.ask(|reply| Command::CancelJob(canceled.slot.job_id().to_string(), reply))
        .expect("cancel one task");
    assert_eq!(cancels(&mut agent), vec![canceled.slot.clone()]);
    m.step(vec![exit(&node, canceled.slot.clone(), "canceled")]);
    let relinked = m.node(&node);
    let follows = relinked
        .running
        .iter()
        .find(|b| b.slot == behind.slot)
        .and_then(|b| b.after.clone());
    assert_eq!(follows.as_ref(), Some(&before.slot));
    // The chain is one short, and is not topped up until half of it has
    // started: one booking then tells the node many tasks (one commit).
    assert!(launches(&mut agent).is_empty());
    assert_eq!(m.node(&node).running.len(), 10);
    let violations = m.control.invariant_violations();
    assert!(violations.is_empty(), "{violations:?}");
    // Tasks end one by one, each next started by the agent: once five wait
    // behind the running one, the chain grows back to ten, at its end.
    let waiting: Vec<&LaunchOrder> = orders.iter().filter(|o| o.slot != canceled.slot).collect();
    let mut ended = 0;
    let grown = loop {
        let head = waiting[ended];
        m.started(&node, head);
        m.advance(100);
        m.step(vec![exit(&node, head.slot.clone(), "completed")]);
        ended += 1;
        let grown = launches(&mut agent);
        if !grown.is_empty() {
            break grown;
        }
        assert!(ended < waiting.len() - 1, "the chain was never topped up");
    };
    assert_eq!(ended, 4, "topped up once five wait behind the running one");
    assert_eq!(grown.len(), 5, "{grown:?}");
    assert_eq!(grown[0].after.as_ref(), Some(&orders[10].slot));
    for pair in grown.windows(2) {
        assert_eq!(pair[1].after.as_ref(), Some(&pair[0].slot), "{grown:?}");
    }
    let chain = m.node(&node);
    assert!(
        chain
            .running
            .iter()
            .any(|b| b.slot == waiting[4].slot && b.after.is_none())
    );
    assert_eq!(chain.chain_behind(&grown[4].slot), 10);
    let violations = m.control.invariant_violations();
    assert!(violations.is_empty(), "{violations:?}");
    let state = m.job(&array).array.expect("state");
    assert_eq!(state.count(JobStatus::Canceled), 1);
    assert_eq!(state.count(JobStatus::Completed), 5);
}

#[test]
fn a_node_running_many_tasks_at_once_holds_at_most_max_chain_ahead_spread_over_its_chains() {
    let mut m = Machine::new(ControlConfig::default());
    m.cluster("cl", 1, 30);
    m.submit_request(JobRequest {
        cluster: "cl".into(),
        argv: vec!["true".into()],
        resources: Resources::share(0.25, 0).expect("a share"),
        array: Some(ArraySpec::parse("0-199").expect("an array")),
        ..Default::default()
    });
    let node = m.created[0].clone();
    let mut agent = m.register(&node, "cl");
    // Eight quarter-core tasks fill the node's two cores.
    let first = launches(&mut agent);
    assert_eq!(first.len(), 8);
    m.started(&node, &first[0]);
    m.advance(10);
    m.step(vec![exit(&node, first[0].slot.clone(), "completed")]);
    // Tasks of 10 ms: chains could be 100 deep, but the node holds 64 ahead in
    // all, eight behind each of its eight running tasks.
    let orders = launches(&mut agent);
    let ahead: Vec<_> = orders.iter().filter(|o| o.after.is_some()).collect();
    assert_eq!(ahead.len(), successors::MAX_CHAIN, "{orders:?}");
    let booked = m.node(&node);
    let running: Vec<_> = booked
        .running
        .iter()
        .filter(|b| b.after.is_none())
        .collect();
    assert_eq!(running.len(), 8);
    let ends = booked.chain_ends();
    for lead in running {
        let chain = ends.iter().find(|e| e.head == &lead.slot).map(|e| e.behind);
        assert_eq!(chain, Some(8), "eight behind {:?}: {ends:?}", lead.slot);
    }
    let violations = m.control.invariant_violations();
    assert!(violations.is_empty(), "{violations:?}");
}

#[test]
fn no_task_is_booked_ahead_behind_a_slow_one_or_while_a_node_is_coming() {
    let mut m = Machine::new(ControlConfig::default());
    m.cluster("cl", 2, 30);
    let array = m.submit_request(JobRequest {
        cluster: "cl".into(),
        argv: vec!["true".into()],
        array: Some(ArraySpec::parse("0-9").expect("an array")),
        ..Default::default()
    });
    assert_eq!(m.created.len(), 2);
    let (a, b) = (m.created[0].clone(), m.created[1].clone());
    // One node up, the other still coming: quick tasks wait for it, not ahead.
    let mut agent = m.register(&a, "cl");
    let first = launches(&mut agent).pop().expect("launched");
    m.started(&a, &first);
    m.advance(600);
    m.step(vec![exit(&a, first.slot.clone(), "completed")]);
    let next = launches(&mut agent);
    assert_eq!(next.len(), 1, "{next:?}");
    assert!(next[0].after.is_none());
    // Both up: the next is booked ahead on each.
    let mut other = m.register(&b, "cl");
    let on_b = launches(&mut other);
    let ahead: Vec<_> = launches(&mut agent)
        .into_iter()
        .chain(on_b.clone())
        .filter(|o| o.after.is_some())
        .collect();
    assert_eq!(ahead.len(), 2, "{ahead:?} (b got {on_b:?})");
    // A task that ran 1.5 s: the array's tasks are no longer booked ahead.
    m.started(&a, &next[0]);
    m.advance(1_500);
    m.step(vec![exit(&a, next[0].slot.clone(), "completed")]);
    let after_slow: Vec<_> = launches(&mut agent);
    assert!(
        after_slow.iter().all(|o| o.after.is_none()),
        "{after_slow:?}"
    );
    assert!(
        m.control.invariant_violations().is_empty(),
        "{:?}",
        m.control.invariant_violations()
    );
    let _ = array;
}

fn sweep_spec(total: u32, concurrent: u32) -> crate::sweep::SweepSpec {
    use crate::sweep::{Goal, Objective, Param, Sampling, SweepSpec};
    SweepSpec {
        search_space: [(
            "lr".to_string(),
            Param::Uniform {
                min_value: 0.0,
                max_value: 1.0,
            },
        )]
        .into(),
        sampling: Sampling::Random,
        seed: None,
        objective: Objective {
            goal: Goal::Maximize,
            primary_metric: "accuracy".into(),
        },
        max_total_trials: total,
        max_concurrent_trials: concurrent,
        timeout_seconds: None,
        early_termination: None,
    }
}

/// The conductor's side, by hand: plans from the record as it stands, metrics given.
fn plan_sweep(m: &mut Machine, id: &str, metrics: &[f64]) -> crate::sweep::Plan {
    let record = m.job(id);
    let state = record.sweep.as_deref().expect("a sweep");
    let trials: Vec<crate::sweep::TrialState> = state
        .trials
        .iter()
        .enumerate()
        .map(|(i, t)| crate::sweep::TrialState {
            index: i as u32,
            params: t.params.clone(),
            ended: t.ended,
            settled: t.settled,
            score: t.score,
            series: metrics.get(i).map(|v| vec![*v]).unwrap_or_default(),
        })
        .collect();
    crate::sweep::plan(&state.spec, record.seq, &trials, 0)
}

#[test]
fn a_sweep_makes_trials_as_planned_refuses_a_stale_plan_and_cancels_whole() {
    let mut m = Machine::new(ControlConfig::default());
    m.cluster("cl", 3, 30);
    let sweep = m.submit_request(JobRequest {
        cluster: "cl".into(),
        argv: vec![
            "sh".into(),
            "-c".into(),
            "train --lr ${{search_space.lr}}".into(),
        ],
        sweep: Some(sweep_spec(5, 2)),
        ..Default::default()
    });
    assert_eq!(m.job(&sweep).status, JobStatus::Running);
    let plan = plan_sweep(&mut m, &sweep, &[]);
    assert_eq!(plan.start.len(), 2);
    let stale = plan.clone();
    m.ask(|reply| Command::StepSweep {
        id: sweep.clone(),
        plan,
        reply,
    })
    .expect("applied");
    // The same plan again would make trials 0 and 1 twice: refused.
    let err = m
        .ask(|reply| Command::StepSweep {
            id: sweep.clone(),
            plan: stale,
            reply,
        })
        .unwrap_err();
    assert!(err.to_string().contains("moved on"), "{err}");
    let record = m.job(&sweep);
    let state = record.sweep.as_deref().expect("a sweep");
    assert_eq!(state.trials.len(), 2);
    let first = job_id(state.trials[0].seq);
    let trial = m.job(&first);
    assert_eq!(
        trial.trial.map(|t| (t.sweep_seq, t.index)),
        Some((record.seq, 0))
    );
    let lr = crate::sweep::value_text(&state.trials[0].params["lr"]);
    assert_eq!(trial.spec.argv[2], format!("train --lr {lr}"));
    assert_eq!(trial.spec.environment_variables["AZUREML_SWEEP_lr"], lr);
    assert_eq!(trial.status, JobStatus::Queued);

    // Canceling the sweep cancels its trials (queued: at once), then the sweep.
    let canceled = m
        .ask(|reply| Command::CancelJob(sweep.clone(), reply))
        .expect("cancel");
    assert_eq!(canceled.status, JobStatus::Canceled);
    for entry in &m.job(&sweep).sweep.expect("a sweep").trials {
        let trial = m.job(&job_id(entry.seq));
        assert_eq!(trial.status, JobStatus::Canceled);
        assert_eq!(trial.reason.to_string(), "canceled with its sweep");
        assert_eq!(entry.ended, Some(JobStatus::Canceled));
    }
    // A canceled sweep takes no more plans.
    let late = plan_sweep(&mut m, &sweep, &[]);
    let err = m
        .ask(|reply| Command::StepSweep {
            id: sweep.clone(),
            plan: late,
            reply,
        })
        .unwrap_err();
    assert!(err.to_string().contains("makes no more trials"), "{err}");
    assert!(m.control.invariant_violations().is_empty());
}

#[test]
fn a_completed_trial_without_its_metric_fails_and_the_sweep_ends_with_its_best() {
    let mut m = Machine::new(ControlConfig::default());
    m.cluster("cl", 2, 30);
    let sweep = m.submit_request(JobRequest {
        cluster: "cl".into(),
        argv: vec!["true".into()],
        sweep: Some(sweep_spec(2, 2)),
        ..Default::default()
    });
    let plan = plan_sweep(&mut m, &sweep, &[]);
    m.ask(|reply| Command::StepSweep {
        id: sweep.clone(),
        plan,
        reply,
    })
    .expect("applied");
    let nodes = m.created.clone();
    let mut agents: Vec<_> = nodes.iter().map(|n| m.register(n, "cl")).collect();
    for (node, agent) in nodes.iter().zip(agents.iter_mut()) {
        for order in launches(agent) {
            m.started(node, &order);
            m.step(vec![exit(node, order.slot.clone(), "completed")]);
        }
    }
    let trials = m.job(&sweep).sweep.expect("a sweep").trials;
    assert!(
        trials.iter().all(|t| t.ended == Some(JobStatus::Completed)),
        "{trials:?}"
    );
    let before = m.control.job_counts();
    // Trial 0 logged 0.7; trial 1 logged nothing.
    let plan = plan_sweep(&mut m, &sweep, &[0.7]);
    m.ask(|reply| Command::StepSweep {
        id: sweep.clone(),
        plan,
        reply,
    })
    .expect("applied");
    let silent = m.job(&job_id(trials[1].seq));
    assert_eq!(silent.status, JobStatus::Failed);
    assert!(
        silent
            .reason
            .to_string()
            .starts_with("primary metric `accuracy` was never logged")
    );
    // The silent trial moved from completed to failed; the sweep completed.
    let counts = m.control.job_counts();
    assert_eq!(counts[&JobStatus::Completed], before[&JobStatus::Completed]);
    assert_eq!(
        counts.get(&JobStatus::Failed).copied().unwrap_or(0),
        before.get(&JobStatus::Failed).copied().unwrap_or(0) + 1
    );
    let record = m.job(&sweep);
    assert_eq!(record.status, JobStatus::Completed);
    assert_eq!(record.sweep.as_deref().and_then(|s| s.best), Some(0));
    assert!(
        record.reason.to_string().contains(&job_id(trials[0].seq)),
        "{}",
        record.reason
    );
    assert!(m.control.invariant_violations().is_empty());
}

/// A pipeline request: each step `(name, reads from)` runs `true` on `cl`, with
/// an output `out` and, for each step it reads, an input of that step's `out`.
fn pipeline_request(steps: &[(&str, &[&str])], continue_on_step_failure: bool) -> JobRequest {
    use crate::data::{DataInput, DataKind, DataOutput, DataSource, InputMode, OutputMode};
    let position = |name: &str| steps.iter().position(|(n, _)| *n == name).expect("a step") as u32;
    let steps = steps
        .iter()
        .map(|(name, reads)| {
            let mut extras = JobExtras::default();
            extras.outputs.insert(
                "out".into(),
                DataOutput {
                    kind: DataKind::UriFolder,
                    mode: OutputMode::RwMount,
                    destination: None,
                    uri: String::new(),
                },
            );
            for read in *reads {
                extras.inputs.insert(
                    format!("from_{read}"),
                    DataInput {
                        kind: DataKind::UriFolder,
                        mode: InputMode::RoMount,
                        source: DataSource::Step {
                            step: read.to_string(),
                            output: "out".into(),
                        },
                        uri: String::new(),
                        file_name: "out".into(),
                    },
                );
            }
            let request = JobRequest {
                cluster: "cl".into(),
                argv: vec!["true".into()],
                extras,
                ..Default::default()
            };
            crate::model::StepRequest {
                name: name.to_string(),
                request,
                after: reads.iter().map(|r| position(r)).collect(),
                fingerprint: format!("fp-{name}"),
                cut_from: None,
            }
        })
        .collect();
    JobRequest {
        name: "pipe".into(),
        cluster: "cl".into(),
        pipeline: Some(crate::model::PipelineRequest {
            steps,
            continue_on_step_failure,
            force_rerun: false,
            outputs: Default::default(),
        }),
        ..Default::default()
    }
}

/// Runs every launch the agents were told of to its end: `outcome(job name)`.
fn run_launched(
    m: &mut Machine,
    agents: &mut [(String, UnboundedReceiver<ToAgent>)],
    outcome: impl Fn(&str) -> &'static str,
) -> usize {
    // Those told so far, then each run: what their ends launch waits for the next call.
    let told: Vec<(String, LaunchOrder)> = agents
        .iter_mut()
        .flat_map(|(node, agent)| launches(agent).into_iter().map(|o| (node.clone(), o)))
        .collect();
    for (node, order) in &told {
        let name = m.job(&order.job_id).spec.name.clone();
        m.started(node, order);
        m.step(vec![exit(node, order.slot.clone(), outcome(&name))]);
    }
    told.len()
}

fn steps_of(m: &mut Machine, id: &str) -> Vec<crate::model::PipelineStep> {
    m.job(id).pipeline.expect("a pipeline").steps
}

#[test]
fn a_pipeline_makes_each_step_once_the_steps_it_reads_have_completed() {
    let mut m = Machine::new(ControlConfig::default());
    m.cluster("cl", 3, 30);
    let id = m.submit_request(pipeline_request(
        &[
            ("prep", &[]),
            ("other", &[]),
            ("score", &["prep"]),
            ("sum", &["score", "other"]),
        ],
        false,
    ));
    let record = m.job(&id);
    assert_eq!(record.status, JobStatus::Running);
    assert!(record.is_record());
    let steps = steps_of(&mut m, &id);
    // The two that read nothing are queued at once; the others wait.
    assert!(steps[0].seq.is_some() && steps[1].seq.is_some());
    assert!(steps[2].seq.is_none() && steps[3].seq.is_none());
    let prep = job_id(steps[0].seq.expect("made"));
    assert_eq!(m.job(&prep).status, JobStatus::Queued);
    assert_eq!(m.job(&prep).spec.name, "prep");
    assert_eq!(m.job(&prep).parent_seq(), Some(record.seq));

    let nodes = m.created.clone();
    let mut agents: Vec<_> = nodes
        .iter()
        .map(|n| (n.clone(), m.register(n, "cl")))
        .collect();
    assert_eq!(run_launched(&mut m, &mut agents, |_| "completed"), 2);
    // prep completed: score is made, reading prep's job's output.
    let steps = steps_of(&mut m, &id);
    let score = m.job(&job_id(steps[2].seq.expect("score made")));
    assert_eq!(
        score.spec.extras.inputs["from_prep"].source,
        crate::data::DataSource::Output {
            job: prep.clone(),
            output: "out".into()
        }
    );
    assert_eq!(score.spec.extras.experiment_name, "");
    assert!(steps[3].seq.is_none(), "sum waits for score");
    assert_eq!(run_launched(&mut m, &mut agents, |_| "completed"), 1);
    assert_eq!(run_launched(&mut m, &mut agents, |_| "completed"), 1);
    let record = m.job(&id);
    assert_eq!(record.status, JobStatus::Completed, "{}", record.reason);
    let steps = record.pipeline.expect("a pipeline").steps;
    assert!(steps.iter().all(|s| s.ended == Some(JobStatus::Completed)));
    assert!(m.control.invariant_violations().is_empty());

    // The core comes back from the store with the record as it was: nothing made twice.
    let snapshot = m.store.load().expect("load");
    let back = Control::new(
        ControlConfig::default(),
        snapshot,
        m.now,
        rand::rngs::StdRng::seed_from_u64(2),
    );
    let again = back.jobs.get(&id).expect("kept");
    assert_eq!(again.pipeline.as_deref().map(|p| p.steps.len()), Some(4));
}

#[test]
fn a_failed_step_fails_the_pipeline_and_stops_the_rest_unless_told_to_go_on() {
    for go_on in [false, true] {
        let mut m = Machine::new(ControlConfig::default());
        m.cluster("cl", 2, 30);
        let id = m.submit_request(pipeline_request(
            &[
                ("bad", &[]),
                ("slow", &[]),
                ("after_bad", &["bad"]),
                ("after_slow", &["slow"]),
            ],
            go_on,
        ));
        let nodes = m.created.clone();
        let mut agents: Vec<_> = nodes
            .iter()
            .map(|n| (n.clone(), m.register(n, "cl")))
            .collect();
        // `bad` fails; `slow` is started and still running.
        let mut slow = None;
        for (node, agent) in agents.iter_mut() {
            for order in launches(agent) {
                m.started(node, &order);
                if m.job(&order.job_id).spec.name == "bad" {
                    m.step(vec![exit(node, order.slot.clone(), "failed")]);
                } else {
                    slow = Some((node.clone(), order));
                }
            }
        }
        let (slow_node, slow_order) = slow.expect("slow launched");
        let steps = steps_of(&mut m, &id);
        assert_eq!(
            steps[2].skipped.as_deref(),
            Some("not run: step `bad` did not complete"),
            "go_on {go_on}"
        );
        let slow_job = m.job(&slow_order.job_id);
        if go_on {
            // The other branch goes on to the end.
            assert_eq!(slow_job.status, JobStatus::Running);
            assert_eq!(m.job(&id).status, JobStatus::Running);
            m.step(vec![exit(&slow_node, slow_order.slot.clone(), "completed")]);
            assert_eq!(run_launched(&mut m, &mut agents, |_| "completed"), 1);
            let steps = steps_of(&mut m, &id);
            assert_eq!(steps[3].ended, Some(JobStatus::Completed));
        } else {
            // The running step is stopped: canceling until its agent says so.
            assert_eq!(slow_job.status, JobStatus::Canceling);
            assert_eq!(slow_job.reason.to_string(), "canceled: step `bad` failed");
            assert_eq!(m.job(&id).status, JobStatus::Running);
            m.step(vec![exit(&slow_node, slow_order.slot.clone(), "canceled")]);
            let steps = steps_of(&mut m, &id);
            assert_eq!(
                steps[3].skipped.as_deref(),
                Some("not run: the pipeline stopped")
            );
        }
        let record = m.job(&id);
        assert_eq!(record.status, JobStatus::Failed, "go_on {go_on}");
        assert_eq!(
            record.reason.to_string(),
            if go_on {
                "step `bad` failed; 1 step(s) not run"
            } else {
                "step `bad` failed; 2 step(s) not run"
            }
        );
        assert!(m.control.invariant_violations().is_empty());
    }
}

#[test]
fn canceling_a_pipeline_cancels_its_steps_then_the_pipeline() {
    let mut m = Machine::new(ControlConfig::default());
    m.cluster("cl", 1, 30);
    let id = m.submit_request(pipeline_request(
        &[("a", &[]), ("b", &["a"]), ("c", &[])],
        false,
    ));
    let node = m.created[0].clone();
    let mut agent = m.register(&node, "cl");
    let order = launches(&mut agent).pop().expect("one launched");
    m.started(&node, &order);
    let canceled = m
        .ask(|reply| Command::CancelJob(id.clone(), reply))
        .expect("cancel");
    // One step runs: the pipeline waits for it to stop.
    assert_eq!(canceled.status, JobStatus::Canceling);
    let steps = steps_of(&mut m, &id);
    let queued = steps
        .iter()
        .find(|s| s.seq.is_some() && job_id(s.seq.unwrap_or(0)) != order.job_id);
    let queued = job_id(queued.and_then(|s| s.seq).expect("the other first step"));
    assert_eq!(m.job(&queued).status, JobStatus::Canceled);
    assert_eq!(
        m.job(&queued).reason.to_string(),
        "canceled with its pipeline"
    );
    assert!(cancels(&mut agent).contains(&order.slot));
    m.step(vec![exit(&node, order.slot.clone(), "canceled")]);
    let record = m.job(&id);
    assert_eq!(record.status, JobStatus::Canceled);
    assert_eq!(record.reason.to_string(), "canceled by user");
    let steps = record.pipeline.expect("a pipeline").steps;
    assert_eq!(
        steps[1].skipped.as_deref(),
        Some("not run: the pipeline stopped")
    );
    assert!(m.control.invariant_violations().is_empty());
}

#[test]
fn a_pipeline_whose_step_names_no_cluster_is_refused_whole() {
    let mut m = Machine::new(ControlConfig::default());
    m.cluster("cl", 1, 30);
    let mut request = pipeline_request(&[("a", &[]), ("b", &[])], false);
    if let Some(p) = request.pipeline.as_mut() {
        p.steps[1].request.cluster = "gpu".into();
    }
    let before = m.control.job_counts();
    let err = m
        .ask(|reply| Command::SubmitJob(Box::new(request), reply))
        .unwrap_err();
    assert!(err.to_string().contains("jobs.b.compute"), "{err}");
    assert_eq!(m.control.job_counts(), before, "nothing made");
}

#[test]
fn an_identical_completed_step_is_reused_unless_the_pipeline_forces_reruns() {
    let mut m = Machine::new(ControlConfig::default());
    m.cluster("cl", 1, 30);
    let node_steps: &[(&str, &[&str])] = &[("prep", &[]), ("train", &["prep"])];
    let first = m.submit_request(pipeline_request(node_steps, false));
    let node = m.created[0].clone();
    let mut agents = vec![(node.clone(), m.register(&node, "cl"))];
    while m.job(&first).status == JobStatus::Running {
        assert!(run_launched(&mut m, &mut agents, |_| "completed") > 0);
    }
    let earlier = steps_of(&mut m, &first);
    // The same steps again: both reused at once, no job made, nothing launched.
    let jobs_before = m.control.job_counts();
    let second = m.submit_request(pipeline_request(node_steps, false));
    let record = m.job(&second);
    assert_eq!(record.status, JobStatus::Completed);
    assert_eq!(record.reason.to_string(), "2 of 2 step(s) reused");
    let steps = record.pipeline.expect("a pipeline").steps;
    for (now, then) in steps.iter().zip(&earlier) {
        assert!(now.reused);
        assert_eq!(now.seq, then.seq, "the earlier step's job");
    }
    assert!(launches(&mut agents[0].1).is_empty());
    let counts = m.control.job_counts();
    assert_eq!(
        counts[&JobStatus::Completed],
        jobs_before[&JobStatus::Completed] + 1,
        "only the new record"
    );
    // force_rerun: every step runs again.
    let mut request = pipeline_request(node_steps, false);
    if let Some(p) = request.pipeline.as_mut() {
        p.force_rerun = true;
    }
    let third = m.submit_request(request);
    assert_eq!(m.job(&third).status, JobStatus::Running);
    while m.job(&third).status == JobStatus::Running {
        assert!(run_launched(&mut m, &mut agents, |_| "completed") > 0);
    }
    let steps = steps_of(&mut m, &third);
    assert!(steps.iter().all(|s| !s.reused));
    assert_ne!(steps[0].seq, earlier[0].seq);
    // A step that changed runs; the steps after it run too (their input changed).
    let mut request = pipeline_request(node_steps, false);
    if let Some(p) = request.pipeline.as_mut() {
        p.steps[0].fingerprint = "fp-prep-2".into();
        p.steps[1].fingerprint = "fp-train-after-prep-2".into();
    }
    let fourth = m.submit_request(request);
    assert_eq!(m.job(&fourth).status, JobStatus::Running);
    assert!(m.control.invariant_violations().is_empty());
}

#[test]
fn a_failed_step_cancels_a_running_sweep_step_with_its_trials() {
    let mut m = Machine::new(ControlConfig::default());
    m.cluster("cl", 3, 30);
    let mut request = pipeline_request(&[("bad", &[]), ("tune", &[])], false);
    if let Some(p) = request.pipeline.as_mut() {
        p.steps[1].request.sweep = Some(sweep_spec(4, 2));
    }
    let id = m.submit_request(request);
    let steps = steps_of(&mut m, &id);
    let tune = job_id(steps[1].seq.expect("made"));
    let sweep = m.job(&tune);
    assert!(sweep.sweep.is_some(), "a sweep step is a sweep's record");
    assert_eq!(sweep.parent_seq(), Some(m.job(&id).seq));
    let plan = plan_sweep(&mut m, &tune, &[]);
    m.ask(|reply| Command::StepSweep {
        id: tune.clone(),
        plan,
        reply,
    })
    .expect("trials made");
    let trials: Vec<String> = m
        .job(&tune)
        .sweep
        .expect("a sweep")
        .trials
        .iter()
        .map(|t| job_id(t.seq))
        .collect();
    assert_eq!(trials.len(), 2);
    let nodes = m.created.clone();
    let mut agents: Vec<_> = nodes
        .iter()
        .map(|n| (n.clone(), m.register(n, "cl")))
        .collect();
    // `bad` fails while the trials are launched: the sweep step is stopped whole.
    let mut running = Vec::new();
    for (node, agent) in agents.iter_mut() {
        for order in launches(agent) {
            m.started(node, &order);
            if order.job_id == job_id(steps[0].seq.expect("made")) {
                m.step(vec![exit(node, order.slot.clone(), "failed")]);
            } else {
                running.push((node.clone(), order));
            }
        }
    }
    assert_eq!(running.len(), 2, "both trials ran");
    assert_eq!(m.job(&tune).status, JobStatus::Canceling);
    assert_eq!(
        m.job(&tune).reason.to_string(),
        "canceled: step `bad` failed"
    );
    for (node, order) in running {
        assert_eq!(m.job(&order.job_id).status, JobStatus::Canceling);
        m.step(vec![exit(&node, order.slot.clone(), "canceled")]);
    }
    for trial in &trials {
        assert_eq!(m.job(trial).status, JobStatus::Canceled);
    }
    assert_eq!(m.job(&tune).status, JobStatus::Canceled);
    let record = m.job(&id);
    assert_eq!(record.status, JobStatus::Failed);
    assert_eq!(record.reason.to_string(), "step `bad` failed");
    assert!(m.control.invariant_violations().is_empty());
}

#[test]
fn a_parallel_step_reading_a_step_is_cut_once_that_step_has_completed() {
    use crate::parallel::{BatchSize, Cut, InputType, ParallelSpec};
    let spec = ParallelSpec {
        input_type: InputType::UriFolder,
        input_name: "${{parent.jobs.a.outputs.out}}".into(),
        size: BatchSize::Items(2),
        concurrency: 1,
        max_retries: 1,
        timeout_seconds: None,
        error_threshold: -1,
        allowed_failed_percent: 100,
        append_row_to: None,
        worker_mode: true,
        rows_output: None,
        table: None,
        item_error_threshold: None,
    };
    for cut_fails in [false, true] {
        let mut m = Machine::new(ControlConfig::default());
        m.cluster("cl", 2, 30);
        let mut request = pipeline_request(&[("a", &[]), ("score", &["a"])], false);
        if let Some(p) = request.pipeline.as_mut() {
            p.steps[1].request.parallel = Some((spec.clone(), Vec::new()));
            p.steps[1].cut_from = Some(crate::model::StepOutput {
                step: "a".into(),
                output: "out".into(),
            });
        }
        let id = m.submit_request(request);
        let orders = m.ask(Command::StepsToCut).expect("asked");
        assert!(orders.is_empty(), "a has not completed");
        let nodes = m.created.clone();
        let mut agents: Vec<_> = nodes
            .iter()
            .map(|n| (n.clone(), m.register(n, "cl")))
            .collect();
        assert_eq!(run_launched(&mut m, &mut agents, |_| "completed"), 1);
        let orders = m.ask(Command::StepsToCut).expect("asked");
        assert_eq!(orders.len(), 1);
        let reserved = steps_of(&mut m, &id)[1]
            .parallel
            .clone()
            .expect("a parallel step")
            .job_seq;
        assert_eq!(
            orders[0].job,
            job_id(steps_of(&mut m, &id)[0].seq.expect("a"))
        );
        assert!(
            steps_of(&mut m, &id)[1].seq.is_none(),
            "not made before its cut"
        );
        let cuts = if cut_fails {
            Err("a wrote nothing to its output `out`".to_string())
        } else {
            Ok(vec![
                Cut {
                    items: b"x\ny\n".to_vec(),
                    count: 2,
                },
                Cut {
                    items: b"z\n".to_vec(),
                    count: 1,
                },
            ])
        };
        m.ask(|reply| Command::StepCut {
            id: id.clone(),
            index: 1,
            cuts,
            reply,
        })
        .expect("cut");
        let steps = steps_of(&mut m, &id);
        if cut_fails {
            let record = m.job(&id);
            assert_eq!(record.status, JobStatus::Failed);
            assert_eq!(record.reason.to_string(), "step `score` failed");
            assert_eq!(
                steps[1].skipped.as_deref(),
                Some("its input could not be cut: a wrote nothing to its output `out`")
            );
        } else {
            // Made under the job reserved at submit, with its mini-batches.
            assert_eq!(steps[1].seq, Some(reserved));
            let made = m.job(&job_id(reserved));
            assert_eq!(made.progress.as_deref().map(|p| p.total), Some(2));
            // A second cut of the same step is refused.
            let err = m
                .ask(|reply| Command::StepCut {
                    id: id.clone(),
                    index: 1,
                    cuts: Ok(Vec::new()),
                    reply,
                })
                .unwrap_err();
            assert!(err.to_string().contains("cut already"), "{err}");
            assert!(m.ask(Command::StepsToCut).expect("asked").is_empty());
        }
        assert!(m.control.invariant_violations().is_empty());
    }
}

#[test]
fn a_node_its_provider_takes_back_requeues_its_work_as_preempted_and_goes() {
    let mut m = Machine::new(ControlConfig::default());
    m.cluster("cl", 1, 600);
    let id = m.submit("cl", 1);
    let node = m.created[0].clone();
    // While it comes up, the provider's words are the node's message.
    m.step(vec![Command::NodeNote {
        node_id: node.clone(),
        note: "Slurm allocation 7 is pending: Resources".into(),
    }]);
    assert_eq!(
        m.node(&node).message,
        "Slurm allocation 7 is pending: Resources"
    );
    let mut agent = m.register(&node, "cl");
    let order = launches(&mut agent).pop().expect("launched");
    m.started(&node, &order);
    // Once up, a late note changes nothing.
    m.step(vec![Command::NodeNote {
        node_id: node.clone(),
        note: "Slurm allocation 7 is pending: Priority".into(),
    }]);
    assert!(!m.node(&node).message.contains("Priority"));
    m.step(vec![Command::NodeFailed {
        node_id: node.clone(),
        error: "Slurm allocation 7 ended: PREEMPTED".into(),
        preempted: true,
    }]);
    let job = m.job(&id);
    assert_eq!(job.status, JobStatus::Queued, "{}", job.reason);
    assert_eq!(
        job.attempts[0].instances[0].status,
        InstanceStatus::Preempted
    );
    assert!(
        matches!(&job.reason, JobReason::Requeued(r) if matches!(&**r, Requeue::Preempted { .. })),
        "{}",
        job.reason
    );
    assert_eq!(m.removed, vec![node.clone()], "the node goes");
}

#[test]
fn an_agent_that_leaves_takes_no_more_work_and_its_work_reruns_on_another_node() {
    let mut m = Machine::new(ControlConfig::default());
    m.cluster("cl", 2, 600);
    let (id, node, _agent, order) = m.one_running();
    m.step(vec![Command::AgentLeaving {
        node_id: node.clone(),
        reason: "it got a stop signal".into(),
    }]);
    let left = m.control.nodes[&node].clone();
    assert_eq!(left.state, NodeState::Leaving);
    assert!(left.message.contains("it got a stop signal"), "{left:?}");
    assert_eq!(
        m.removed,
        vec![node.clone()],
        "removed through its provider"
    );
    // The work the agent stopped is rerun, and not on the leaving node.
    let mut stopped = exit(&node, order.slot.clone(), "canceled");
    if let Command::InstanceExited { exit, .. } = &mut stopped {
        exit.message = "the agent is stopping".into();
    }
    m.step(vec![stopped]);
    let job = m.job(&id);
    assert_eq!(job.attempts[0].instances[0].status, InstanceStatus::Lost);
    assert_eq!(job.status, JobStatus::Queued, "{}", job.reason);
    assert_eq!(m.created.len(), 2, "a new node for the rerun");
    let mut other = m.register(&m.created[1].clone(), "cl");
    let rerun = launches(&mut other)
        .pop()
        .expect("launched on the new node");
    assert_ne!(rerun.slot.attempt_id, order.slot.attempt_id);
    assert!(m.control.invariant_violations().is_empty());
}
