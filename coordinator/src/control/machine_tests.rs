//! The state machine driven by hand: commands in, time advanced explicitly,
//! effects inspected — no runtime, no waiting on a wall clock.
use super::*;
use crate::store::SqliteStore;
use rand::SeedableRng;
use tokio::sync::mpsc::UnboundedReceiver;

struct Machine {
    control: Control,
    store: SqliteStore,
    now: Millis,
    /// Nodes the provider was asked for, and to remove, so far.
    created: Vec<String>,
    removed: Vec<String>,
}

impl Machine {
    fn new(config: ControlConfig) -> Machine {
        let mut store = SqliteStore::in_memory().expect("store");
        let snapshot = store.load().expect("load");
        let rng = rand::rngs::StdRng::seed_from_u64(1);
        Machine {
            control: Control::new(config, snapshot, 1_000, rng),
            store,
            now: 1_000,
            created: Vec::new(),
            removed: Vec::new(),
        }
    }

    /// One batch: the commands, the timeouts, the decisions, the commit, the effects.
    fn step(&mut self, commands: Vec<Command>) {
        for command in commands {
            self.control.apply(command, self.now);
        }
        self.control.tick(self.now);
        self.control.decide(self.now);
        let mut effects = self.control.effects();
        let committed = self.store.commit(&effects.batch).expect("commit");
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
        self.removed
            .extend(effects.remove.drain(..).map(|r| r.node_id));
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
        let request = ClusterRequest {
            name: name.into(),
            vm_size: "Standard_D2_v2".into(),
            max_nodes: Some(max),
            idle_seconds_before_scaledown: Some(idle_seconds),
            ..Default::default()
        };
        self.ask(|reply| Command::CreateCluster(request, reply))
            .expect("cluster");
    }

    fn submit(&mut self, cluster: &str, instances: u32) -> String {
        let request = JobRequest {
            cluster: cluster.into(),
            argv: vec!["true".into()],
            instance_count: instances,
            ..Default::default()
        };
        self.ask(|reply| Command::SubmitJob(Box::new(request), reply))
            .expect("submit")
            .id
    }

    fn job(&mut self, id: &str) -> Job {
        let id = id.to_string();
        self.ask(|reply| Command::GetJob(id, reply)).expect("job")
    }

    /// The node's agent registers; its link.
    fn register(&mut self, node: &str, cluster: &str) -> UnboundedReceiver<ToAgent> {
        let (link, agent) = mpsc::unbounded_channel();
        let registration = Registration {
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
        };
        self.ask(|reply| Command::AgentRegister {
            registration,
            session: 1,
            link,
            reply,
        })
        .expect("registered");
        agent
    }
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
    }]);
    // The first failure waits 2 s: not one millisecond less.
    m.advance(1_999);
    assert_eq!(m.created.len(), 1, "no new node inside the backoff");
    assert_eq!(m.job(&id).status, JobStatus::Queued);
    assert!(
        m.job(&id).reason.contains("failed to start"),
        "{}",
        m.job(&id).reason
    );
    m.advance(2);
    assert_eq!(m.created.len(), 2, "retried once the backoff is over");
    assert_ne!(m.created[1], first);
    // A second failure in a row doubles the wait.
    let second = m.created[1].clone();
    m.step(vec![Command::NodeFailed {
        node_id: second,
        error: "cannot start the agent".into(),
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
    assert!(job.reason.starts_with("requeued"), "{}", job.reason);
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
    order.env.get("SHOAL_NODE_ID").map(String::as_str) == Some(node)
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
    assert!(reason.contains("locked read-only"), "{reason}");
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
    m.step(vec![
        Command::InstanceStarted {
            node_id: node.clone(),
            slot: order.slot.clone(),
            gpus: Vec::new(),
        },
        exit(&node, order.slot.clone(), "completed"),
    ]);
    assert_eq!(m.job(&id).status, JobStatus::Completed);
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
