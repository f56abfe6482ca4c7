//! A deterministic simulator of the control core: simulated nodes and agents, a
//! simulated clock and network, and faults — agent crashes and restarts, broken
//! sessions, partitions, coordinator crashes recovered from the store, provider
//! failures, preemptions — all drawn from one seed. The core's invariants are
//! checked after every step; at the end every accepted job has ended, once, and
//! every cluster is back at `min_nodes`. A failing seed reproduces exactly.
//!
//! The core and the store are the real ones (SQLite, in memory); only the world
//! around them is simulated.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap, HashMap};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::sync::{mpsc, oneshot};

use crate::control::{
    AttemptReport, Command, Control, ControlConfig, Effects, ExitReport, LaunchOrder, Registration,
    ToAgent,
};
use crate::model::{ClusterRequest, GpuStat, JobRequest, JobStatus, Millis, Slot};
use crate::store::{SqlStore, Store};

/// How big a world, and how rough.
#[derive(Clone, Debug)]
pub struct Scale {
    pub jobs: usize,
    /// Jobs are submitted over this long.
    pub submit_over: Duration,
    /// Faults happen during this long (none when zero).
    pub faults_over: Duration,
    pub coordinator_crashes: u32,
    pub agent_crashes: u32,
    pub partitions: u32,
    pub broken_sessions: u32,
    pub preemptions: u32,
    /// A node the provider is asked for fails to start this often.
    pub provider_failure: f64,
    pub max_nodes: u32,
    /// Every quota (total, per family, low-priority), in cores; None: the
    /// defaults (400 in all).
    pub quota_cores: Option<u32>,
    /// The invariants are checked after every this many steps (and at the
    /// end): 1, every step, but for a fleet, where a check walks every node and
    /// job and would cost more than the step.
    pub check_every: u64,
}

impl Default for Scale {
    fn default() -> Self {
        Scale {
            jobs: 30,
            submit_over: Duration::from_secs(20),
            faults_over: Duration::from_secs(40),
            coordinator_crashes: 1,
            agent_crashes: 3,
            partitions: 2,
            broken_sessions: 3,
            preemptions: 2,
            provider_failure: 0.1,
            max_nodes: 4,
            quota_cores: None,
            check_every: 1,
        }
    }
}

impl Scale {
    /// Twice the jobs and three times the faults: three coordinator crashes, eight
    /// agent crashes and broken sessions, five partitions, six preemptions, and a
    /// provider that fails three starts in ten.
    pub fn rough() -> Scale {
        Scale {
            jobs: 60,
            coordinator_crashes: 3,
            agent_crashes: 8,
            partitions: 5,
            broken_sessions: 8,
            preemptions: 6,
            provider_failure: 0.3,
            max_nodes: 6,
            ..Scale::default()
        }
    }

    /// A fleet: up to `nodes` nodes in all (a third per cluster), three jobs a
    /// node submitted over the same 20 s (so that most nodes are busy at once),
    /// quotas of 2 cores a node (a node has 2; a GPU node counts 6 until its
    /// agent says otherwise, so they bind now and then), and faults in
    /// proportion: 2 coordinator crashes, and per 100 nodes two agent crashes,
    /// one partition, two broken sessions and one preemption.
    pub fn fleet(nodes: u32) -> Scale {
        let per_hundred = |n: u32| (nodes / 100).max(1) * n;
        Scale {
            jobs: nodes as usize * 3,
            coordinator_crashes: 2,
            agent_crashes: per_hundred(2),
            partitions: per_hundred(1),
            broken_sessions: per_hundred(2),
            preemptions: per_hundred(1),
            max_nodes: nodes.div_ceil(3).max(1),
            quota_cores: Some(nodes.saturating_mul(2)),
            check_every: 100,
            ..Scale::default()
        }
    }
}

/// What a run did.
#[derive(Clone, Debug, Default)]
pub struct Report {
    pub seed: u64,
    pub steps: u64,
    pub simulated_ms: Millis,
    pub accepted: usize,
    pub ended: BTreeMap<String, usize>,
    pub coordinator_restarts: u32,
    /// Successor launches agents heard, and those held until their
    /// predecessor ended.
    pub successors: u32,
    pub held: u32,
    /// Of those held, the ones whose predecessor was itself held (a chain).
    pub held_in_chains: u32,
}

/// A broken invariant, with the seed that reproduces it.
#[derive(Debug)]
pub struct Failure {
    pub seed: u64,
    pub at_ms: Millis,
    pub step: u64,
    pub what: String,
    /// The last events before it.
    pub trace: Vec<String>,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "seed {} broke at {} ms (step {}): {}",
            self.seed, self.at_ms, self.step, self.what
        )?;
        writeln!(
            f,
            "reproduce: SHOAL_SIM_SEED={} cargo test -p shoal-coordinator sim::",
            self.seed
        )?;
        for line in &self.trace {
            writeln!(f, "  {line}")?;
        }
        Ok(())
    }
}

const CLUSTERS: [(&str, &str, &str, u32); 3] = [
    // name, size, priority, min_nodes
    ("cpu", "Standard_D2_v2", "dedicated", 0),
    ("low", "Standard_D2_v2", "lowpriority", 1),
    ("gpu", "Standard_NC6", "dedicated", 0),
];
const IDLE_SECONDS: u64 = 10;
const TICK_MS: Millis = 500;
const STOP_GRACE: Duration = Duration::from_secs(1);

#[derive(Debug)]
enum Event {
    Tick,
    /// A command reaches the coordinator of this epoch (lost if it crashed since).
    Deliver {
        epoch: u32,
        command: Command,
    },
    /// A message reaches a node's agent on this session.
    ToAgent {
        node: String,
        session: u64,
        message: ToAgent,
    },
    /// The heartbeat's answer.
    Pong {
        node: String,
        session: u64,
    },
    /// The provider has started the node's agent.
    Boot {
        node: String,
    },
    Connect {
        node: String,
    },
    InstanceEnds {
        node: String,
        slot: Slot,
    },
    Heartbeat {
        node: String,
        session: u64,
    },
    Submit {
        index: usize,
    },
    Cancel {
        index: usize,
    },
    AgentCrash,
    AgentRestart {
        node: String,
    },
    PartitionStart,
    PartitionEnd {
        node: String,
    },
    BreakSession,
    CoordinatorCrash,
    Preempt,
}

#[derive(Default)]
struct Agent {
    cluster: String,
    gpus: u32,
    /// Its machine's size, as the provider made it.
    cores: u32,
    memory_bytes: u64,
    /// The process runs.
    up: bool,
    /// Removed by the provider, or told to stop for good.
    gone: bool,
    session: u64,
    connected: bool,
    link: Option<mpsc::UnboundedReceiver<ToAgent>>,
    partitioned: bool,
    last_heard: Millis,
    /// Instances running here: when each ends, and how.
    /// Instances it runs: when each ends, its exit code, the GPUs it holds.
    running: BTreeMap<Slot, (Millis, i32, Vec<u32>)>,
    /// Exits, reported again at each registration.
    finished: Vec<(Slot, ExitReport)>,
    /// Successors, by the instance each follows: started when it ends.
    held: BTreeMap<Slot, LaunchOrder>,
    /// When the last message on each direction arrives (sessions keep order).
    up_clear: Millis,
    down_clear: Millis,
}

struct World {
    seed: u64,
    rng: StdRng,
    scale: Scale,
    config: ControlConfig,
    now: Millis,
    seq: u64,
    events: BinaryHeap<Reverse<(Millis, u64, usize)>>,
    slots: HashMap<usize, Event>,
    store: SqlStore,
    control: Option<Control>,
    epoch: u32,
    agents: BTreeMap<String, Agent>,
    next_session: u64,
    jobs: Vec<JobRequest>,
    submits: Vec<(usize, oneshot::Receiver<crate::Result<crate::model::Job>>)>,
    accepted: BTreeMap<String, usize>,
    /// The status an accepted job was first seen to end with.
    ended: BTreeMap<String, JobStatus>,
    last_end: Millis,
    /// The last time the provider failed to start a node (a fault too: the
    /// cluster waits out its start backoff, up to 64 s, before the next try).
    last_provider_failure: Millis,
    trace: Vec<String>,
    steps: u64,
    restarts: u32,
    successors: u32,
    held: u32,
    held_in_chains: u32,
}

fn fence_after(lease: Duration) -> Millis {
    lease
        .saturating_sub(STOP_GRACE + Duration::from_secs(1))
        .max(lease / 2)
        .as_millis() as Millis
}

/// Runs one seed to the end; the report, or the first broken invariant.
pub fn run(seed: u64, scale: &Scale) -> Result<Report, Box<Failure>> {
    let mut world = World::new(seed, scale.clone());
    world.start();
    world.run_to_end()?;
    Ok(world.report())
}

impl World {
    fn new(seed: u64, scale: Scale) -> World {
        let config = ControlConfig {
            lease: Duration::from_secs(6),
            register_timeout: Duration::from_secs(10),
            heartbeat_interval: Duration::from_secs(1),
            preemption_notice: Duration::from_secs(2),
            job_retention: None,
            recent_jobs: 1_000_000,
            quotas: scale
                .quota_cores
                .map(|cores| crate::governance::Quotas {
                    family_cores: BTreeMap::new(),
                    default_family_cores: cores,
                    low_priority_cores: cores,
                    total_cores: cores,
                })
                .unwrap_or_default(),
            ..ControlConfig::default()
        };
        World {
            seed,
            rng: StdRng::seed_from_u64(seed),
            scale,
            config,
            now: 0,
            seq: 0,
            events: BinaryHeap::new(),
            slots: HashMap::new(),
            store: SqlStore::in_memory().expect("an in-memory store"),
            control: None,
            epoch: 0,
            agents: BTreeMap::new(),
            next_session: 1,
            jobs: Vec::new(),
            submits: Vec::new(),
            accepted: BTreeMap::new(),
            ended: BTreeMap::new(),
            last_end: 0,
            last_provider_failure: 0,
            trace: Vec::new(),
            steps: 0,
            restarts: 0,
            successors: 0,
            held: 0,
            held_in_chains: 0,
        }
    }

    fn at(&mut self, time: Millis, event: Event) {
        let id = self.seq as usize;
        self.seq += 1;
        self.slots.insert(id, event);
        self.events.push(Reverse((time, self.seq, id)));
    }

    fn delay(&mut self) -> Millis {
        self.rng.random_range(1..20)
    }

    fn coordinator(&mut self) -> &mut Control {
        self.control.as_mut().expect("the coordinator runs")
    }

    fn boot_coordinator(&mut self) {
        let snapshot = self.store.load().expect("the store loads");
        let rng = StdRng::seed_from_u64(self.rng.random());
        self.control = Some(Control::new(self.config.clone(), snapshot, self.now, rng));
        self.epoch += 1;
    }

    /// Sends a command to the coordinator after a network delay.
    fn send(&mut self, command: Command) {
        let at = self.now + self.delay();
        let epoch = self.epoch;
        self.at(at, Event::Deliver { epoch, command });
    }

    /// Sends a command from a node's agent on its session, in order.
    fn send_from(&mut self, node: &str, command: Command) {
        let delay = self.delay();
        let Some(agent) = self.agents.get_mut(node) else {
            return;
        };
        if !agent.up || !agent.connected || agent.partitioned {
            return;
        }
        let at = (self.now + delay).max(agent.up_clear);
        agent.up_clear = at;
        let epoch = self.epoch;
        self.at(at, Event::Deliver { epoch, command });
    }

    fn start(&mut self) {
        self.boot_coordinator();
        for (name, size, priority, min) in CLUSTERS {
            let (reply, _) = oneshot::channel();
            let request = ClusterRequest {
                name: name.into(),
                vm_size: size.into(),
                vm_priority: priority.into(),
                min_nodes: Some(min),
                max_nodes: Some(self.scale.max_nodes),
                // Past its cap, a fleet's clusters leave it off (as a user would).
                internode_communication: Some(
                    self.scale.max_nodes <= crate::model::MAX_NODES_WITH_INTERNODE,
                ),
                idle_seconds_before_scaledown: Some(IDLE_SECONDS),
                ..Default::default()
            };
            let now = self.now;
            self.coordinator()
                .apply(Command::CreateCluster(request, reply), now);
        }
        for index in 0..self.scale.jobs {
            let (cluster, _, _, _) = CLUSTERS[self.rng.random_range(0..CLUSTERS.len())];
            let width = self.rng.random_range(1..=self.scale.max_nodes.min(3));
            let duration: Millis = self.rng.random_range(100..6_000);
            let code = i32::from(self.rng.random_bool(0.1));
            // Some ask for a share of a node (packed beside others), the rest for
            // whole nodes.
            let resources = if self.rng.random_bool(0.4) {
                let cpus = [0.5, 1.0, 2.0][self.rng.random_range(0..3)];
                let memory = self.rng.random_range(0..3u64) << 30;
                crate::model::Resources::share(cpus, memory).expect("a share")
            } else {
                crate::model::Resources::WHOLE
            };
            // Some are arrays of a few tasks, some of them held to two at once.
            let array = self.rng.random_bool(0.15).then(|| crate::model::ArraySpec {
                start: 0,
                end: self.rng.random_range(1..12),
                step: 1,
                max_concurrent: if self.rng.random_bool(0.5) { 2 } else { 0 },
            });
            // Half the arrays' tasks are short: their nodes are told the next
            // one ahead (successors).
            let duration = match array {
                Some(_) if self.rng.random_bool(0.5) => self.rng.random_range(20..900),
                _ => duration,
            };
            // Some single jobs are the same short work, over and over: they
            // follow one another as successors too (`successors::Family::Alike`).
            let (width, duration, code) = if array.is_none() && self.rng.random_bool(0.2) {
                (1, [150, 400][self.rng.random_range(0..2)], 0)
            } else {
                (width, duration, code)
            };
            self.jobs.push(JobRequest {
                cluster: cluster.into(),
                argv: vec!["sim".into(), duration.to_string(), code.to_string()],
                instance_count: width,
                resources,
                array,
                gpus_per_instance: u32::from(cluster == "gpu"),
                max_preemptions: Some(100),
                ..Default::default()
            });
            let at = self
                .rng
                .random_range(0..=self.scale.submit_over.as_millis() as Millis);
            self.at(at, Event::Submit { index });
            if self.rng.random_bool(0.1) {
                let later = at + self.rng.random_range(0..10_000);
                self.at(later, Event::Cancel { index });
            }
        }
        let faults = self.scale.faults_over.as_millis() as Millis;
        if faults > 0 {
            let mut plan = Vec::new();
            for _ in 0..self.scale.coordinator_crashes {
                plan.push(Event::CoordinatorCrash);
            }
            for _ in 0..self.scale.agent_crashes {
                plan.push(Event::AgentCrash);
            }
            for _ in 0..self.scale.partitions {
                plan.push(Event::PartitionStart);
            }
            for _ in 0..self.scale.broken_sessions {
                plan.push(Event::BreakSession);
            }
            for _ in 0..self.scale.preemptions {
                plan.push(Event::Preempt);
            }
            for event in plan {
                let at = self.rng.random_range(1..faults);
                self.at(at, event);
            }
        }
        self.at(0, Event::Tick);
    }

    fn run_to_end(&mut self) -> Result<(), Box<Failure>> {
        // Long enough for every job, retry and scale-down; a job still open by
        // then is stuck.
        let horizon = 600_000;
        while let Some(Reverse((time, _, id))) = self.events.pop() {
            if time > horizon {
                break;
            }
            self.now = time;
            let event = self.slots.remove(&id).expect("a scheduled event");
            self.trace_event(&event);
            let mut commands = Vec::new();
            self.handle(event, &mut commands);
            // Everything due at this instant is one batch, as the driver's inbox.
            while let Some(Reverse((next, _, id))) = self.events.peek().copied() {
                if next != time {
                    break;
                }
                self.events.pop();
                let event = self.slots.remove(&id).expect("a scheduled event");
                self.trace_event(&event);
                self.handle(event, &mut commands);
            }
            self.step(commands)?;
            if self.done() {
                return self.final_checks();
            }
        }
        self.final_checks()
    }

    fn trace_event(&mut self, event: &Event) {
        let line = match event {
            Event::Tick | Event::Heartbeat { .. } | Event::Pong { .. } => return,
            Event::Deliver {
                command: Command::Heartbeat { .. },
                ..
            } => return,
            Event::Deliver { command, .. } => format!("deliver {}", command_name(command)),
            Event::ToAgent { node, message, .. } => {
                format!("to {node}: {}", agent_message_name(message))
            }
            other => format!("{other:?}"),
        };
        self.trace.push(format!("{:>7} ms {line}", self.now));
        if self.trace.len() > 60 {
            self.trace.remove(0);
        }
    }

    fn handle(&mut self, event: Event, commands: &mut Vec<Command>) {
        match event {
            Event::Tick => {
                self.fence();
                self.at(self.now + TICK_MS, Event::Tick);
            }
            Event::Deliver { epoch, command } => {
                if epoch != self.epoch {
                    return; // sent to a coordinator that crashed since
                }
                if let Command::Heartbeat { node_id, .. } = &command {
                    let node = node_id.clone();
                    if let Some(agent) = self.agents.get(&node) {
                        let session = agent.session;
                        let at = self.now + self.delay();
                        self.at(at, Event::Pong { node, session });
                    }
                }
                commands.push(command);
            }
            Event::Pong { node, session } => {
                let now = self.now;
                if let Some(agent) = self.agents.get_mut(&node)
                    && agent.session == session
                    && agent.connected
                    && !agent.partitioned
                {
                    agent.last_heard = now;
                }
            }
            Event::ToAgent {
                node,
                session,
                message,
            } => self.agent_hears(&node, session, message),
            Event::Boot { node } => {
                if let Some(agent) = self.agents.get_mut(&node)
                    && !agent.gone
                {
                    agent.up = true;
                    self.connect(&node);
                }
            }
            Event::Connect { node } => self.connect(&node),
            Event::InstanceEnds { node, slot } => {
                let Some(agent) = self.agents.get_mut(&node) else {
                    return;
                };
                let Some((_, code, _)) = agent.running.remove(&slot) else {
                    return; // stopped before
                };
                let outcome = if code == 0 { "completed" } else { "failed" };
                self.exited(&node, slot, outcome, Some(code));
            }
            Event::Heartbeat { node, session } => {
                let Some(agent) = self.agents.get(&node) else {
                    return;
                };
                if agent.session != session || !agent.up || !agent.connected {
                    return;
                }
                self.send_from(
                    &node,
                    Command::Heartbeat {
                        node_id: node.clone(),
                        cpu_percent: 0.0,
                        memory_used_bytes: 0,
                        stats: Default::default(),
                        usage: Vec::new(),
                    },
                );
                let every = self.config.heartbeat_interval.as_millis() as Millis;
                self.at(self.now + every, Event::Heartbeat { node, session });
            }
            Event::Submit { index } => {
                let (reply, answer) = oneshot::channel();
                let request = Box::new(self.jobs[index].clone());
                self.submits.push((index, answer));
                self.send(Command::SubmitJob(request, reply));
            }
            Event::Cancel { index } => {
                let id = self
                    .accepted
                    .iter()
                    .find(|(_, i)| **i == index)
                    .map(|(id, _)| id.clone());
                if let Some(id) = id {
                    let (reply, _) = oneshot::channel();
                    self.send(Command::CancelJob(id, reply));
                }
            }
            Event::AgentCrash => {
                if let Some(node) = self.pick_agent() {
                    self.crash_agent(&node);
                    let at = self.now + self.rng.random_range(200..4_000);
                    self.at(at, Event::AgentRestart { node });
                }
            }
            Event::AgentRestart { node } => {
                if let Some(agent) = self.agents.get_mut(&node)
                    && !agent.gone
                {
                    agent.up = true;
                    self.connect(&node);
                }
            }
            Event::PartitionStart => {
                if let Some(node) = self.pick_agent() {
                    if let Some(agent) = self.agents.get_mut(&node) {
                        agent.partitioned = true;
                    }
                    let at = self.now + self.rng.random_range(500..12_000);
                    self.at(at, Event::PartitionEnd { node });
                }
            }
            Event::PartitionEnd { node } => {
                // The session timed out meanwhile: the agent connects anew.
                if let Some(agent) = self.agents.get_mut(&node) {
                    agent.partitioned = false;
                }
                self.break_session(&node);
            }
            Event::BreakSession => {
                if let Some(node) = self.pick_agent() {
                    self.break_session(&node);
                }
            }
            Event::CoordinatorCrash => {
                // Its inbox and whatever it had not committed are lost; agents
                // keep their work and connect to the new one.
                commands.clear();
                self.control = None;
                self.restarts += 1;
                self.submits.clear();
                self.boot_coordinator();
                let nodes: Vec<String> = self.agents.keys().cloned().collect();
                for node in nodes {
                    if let Some(agent) = self.agents.get_mut(&node) {
                        agent.connected = false;
                        agent.link = None;
                    }
                    let at = self.now + self.rng.random_range(100..3_000);
                    self.at(at, Event::Connect { node });
                }
            }
            Event::Preempt => {
                let low: Vec<String> = self
                    .agents
                    .iter()
                    .filter(|(_, a)| a.cluster == "low" && a.up && !a.gone)
                    .map(|(id, _)| id.clone())
                    .collect();
                if !low.is_empty() {
                    let node = low[self.rng.random_range(0..low.len())].clone();
                    let (reply, _) = oneshot::channel();
                    self.send(Command::PreemptNode {
                        node_id: node,
                        notice_seconds: Some(2),
                        reply,
                    });
                }
            }
        }
    }

    fn pick_agent(&mut self) -> Option<String> {
        let up: Vec<String> = self
            .agents
            .iter()
            .filter(|(_, a)| a.up && !a.gone)
            .map(|(id, _)| id.clone())
            .collect();
        (!up.is_empty()).then(|| up[self.rng.random_range(0..up.len())].clone())
    }

    /// The agent's process dies with its work (process jobs die with it).
    fn crash_agent(&mut self, node: &str) {
        let session = self.agents.get(node).map(|a| (a.session, a.connected));
        if let Some((session, true)) = session {
            self.send(Command::AgentGone {
                node_id: node.to_string(),
                session,
            });
        }
        if let Some(agent) = self.agents.get_mut(node) {
            agent.up = false;
            agent.connected = false;
            agent.link = None;
            agent.running.clear();
            agent.finished.clear();
            agent.held.clear();
        }
    }

    fn break_session(&mut self, node: &str) {
        let Some(agent) = self.agents.get_mut(node) else {
            return;
        };
        if !agent.up || agent.gone {
            return;
        }
        let (session, connected) = (agent.session, agent.connected);
        agent.connected = false;
        agent.link = None;
        if connected {
            self.send(Command::AgentGone {
                node_id: node.to_string(),
                session,
            });
        }
        let at = self.now + self.rng.random_range(50..1_000);
        self.at(
            at,
            Event::Connect {
                node: node.to_string(),
            },
        );
    }

    /// A new session: the agent registers with what it runs and what ended.
    fn connect(&mut self, node: &str) {
        let session = self.next_session;
        self.next_session += 1;
        let now = self.now;
        let Some(agent) = self.agents.get_mut(node) else {
            return;
        };
        if !agent.up || agent.gone || agent.connected || agent.partitioned {
            return;
        }
        let (link, receiver) = mpsc::unbounded_channel();
        agent.session = session;
        agent.connected = true;
        agent.link = Some(receiver);
        agent.last_heard = now;
        let mut attempts: Vec<AttemptReport> = agent
            .running
            .iter()
            .map(|(slot, running)| AttemptReport {
                slot: slot.clone(),
                exited: None,
                gpus: running.2.clone(),
                held: false,
            })
            .collect();
        attempts.extend(agent.finished.iter().map(|(slot, exit)| AttemptReport {
            slot: slot.clone(),
            exited: Some(exit.clone()),
            gpus: Vec::new(),
            held: false,
        }));
        attempts.extend(agent.held.values().map(|order| AttemptReport {
            slot: order.slot.clone(),
            exited: None,
            gpus: Vec::new(),
            held: true,
        }));
        let gpus = (0..agent.gpus)
            .map(|index| GpuStat {
                index,
                uuid: format!("GPU-{node}-{index}"),
                model: "simulated".into(),
                ..Default::default()
            })
            .collect();
        let registration = Registration {
            node_id: node.to_string(),
            cluster: agent.cluster.clone(),
            cores: agent.cores,
            memory_bytes: agent.memory_bytes,
            hostname: node.to_string(),
            pid: 1,
            runtimes: vec!["process".into()],
            attempts,
            gpus,
            gpu_reason: String::new(),
        };
        let (reply, _) = oneshot::channel();
        self.send_from(
            node,
            Command::AgentRegister {
                registration,
                session,
                link,
                reply,
            },
        );
        let every = self.config.heartbeat_interval.as_millis() as Millis;
        self.at(
            now + every,
            Event::Heartbeat {
                node: node.to_string(),
                session,
            },
        );
    }

    fn exited(&mut self, node: &str, slot: Slot, outcome: &str, code: Option<i32>) {
        let exit = ExitReport {
            exit_code: code,
            outcome: outcome.into(),
            message: String::new(),
            usage: None,
        };
        let successor = self.agents.get_mut(node).and_then(|agent| {
            agent.finished.push((slot.clone(), exit.clone()));
            agent.held.remove(&slot)
        });
        self.send_from(
            node,
            Command::InstanceExited {
                node_id: node.to_string(),
                slot,
                exit,
            },
        );
        // Its successor starts once the end is sent.
        if let Some(order) = successor {
            self.start_launch(node, order);
        }
    }

    /// Stops every instance on the node, reporting each with `outcome`.
    fn stop_all(&mut self, node: &str, outcome: &str) {
        // Successors are not started: they end as they are, first.
        let held: Vec<Slot> = self
            .agents
            .get_mut(node)
            .map(|a| {
                std::mem::take(&mut a.held)
                    .into_values()
                    .map(|o| o.slot)
                    .collect()
            })
            .unwrap_or_default();
        for slot in held {
            self.exited(node, slot, outcome, None);
        }
        let running: Vec<Slot> = self
            .agents
            .get_mut(node)
            .map(|a| std::mem::take(&mut a.running).into_keys().collect())
            .unwrap_or_default();
        for slot in running {
            self.exited(node, slot, outcome, None);
        }
    }

    /// Agents that heard nothing for too long stop their work themselves.
    fn fence(&mut self) {
        let after = fence_after(self.config.lease);
        let silent: Vec<String> = self
            .agents
            .iter()
            .filter(|(_, a)| a.up && !a.running.is_empty() && self.now - a.last_heard >= after)
            .map(|(id, _)| id.clone())
            .collect();
        for node in silent {
            self.stop_all(&node, "canceled");
        }
    }

    fn agent_hears(&mut self, node: &str, session: u64, message: ToAgent) {
        let now = self.now;
        let Some(agent) = self.agents.get_mut(node) else {
            return;
        };
        if agent.session != session || !agent.up || !agent.connected || agent.partitioned {
            return;
        }
        agent.last_heard = now;
        match message {
            ToAgent::Registered { .. } | ToAgent::Pong | ToAgent::Exec(_) => {}
            ToAgent::Launch(order) => {
                let known = agent.running.contains_key(&order.slot)
                    || agent.finished.iter().any(|(s, _)| *s == order.slot)
                    || agent.held.values().any(|h| h.slot == order.slot);
                if known {
                    return;
                }
                let successor = order.after.is_some();
                match order.after.clone() {
                    Some(after)
                        if agent.running.contains_key(&after)
                            || agent.held.values().any(|h| h.slot == after) =>
                    {
                        let chained = !agent.running.contains_key(&after);
                        agent.held.insert(after, order);
                        self.held += 1;
                        self.held_in_chains += u32::from(chained);
                    }
                    _ => self.start_launch(node, order),
                }
                self.successors += u32::from(successor);
            }
            ToAgent::Cancel { slot, .. } => {
                let held = agent
                    .held
                    .iter()
                    .find(|(_, h)| h.slot == slot)
                    .map(|(k, _)| k.clone());
                if let Some(after) = held {
                    agent.held.remove(&after);
                    // What followed it follows what it followed.
                    if let Some(next) = agent.held.remove(&slot) {
                        agent.held.insert(after, next);
                    }
                    self.exited(node, slot, "canceled", None);
                } else if agent.running.remove(&slot).is_some() {
                    self.exited(node, slot, "canceled", None);
                }
            }
            ToAgent::Preempt { .. } => self.stop_all(node, "preempted"),
            ToAgent::Shutdown { .. } => {
                self.stop_all(node, "canceled");
                if let Some(agent) = self.agents.get_mut(node) {
                    agent.gone = true;
                }
            }
        }
    }

    /// The agent starts an instance: it reports the start, and its end is due.
    fn start_launch(&mut self, node: &str, order: LaunchOrder) {
        let now = self.now;
        let Some(agent) = self.agents.get_mut(node) else {
            return;
        };
        let duration: Millis = order.argv.get(1).and_then(|d| d.parse().ok()).unwrap_or(0);
        let code: i32 = order.argv.get(2).and_then(|c| c.parse().ok()).unwrap_or(0);
        // The lowest GPUs no instance of this node holds.
        let held: BTreeSet<u32> = agent
            .running
            .values()
            .flat_map(|(_, _, gpus)| gpus.iter().copied())
            .collect();
        let gpus: Vec<u32> = (0..)
            .filter(|g| !held.contains(g))
            .take(order.gpus as usize)
            .collect();
        agent
            .running
            .insert(order.slot.clone(), (now + duration, code, gpus.clone()));
        self.send_from(
            node,
            Command::InstanceStarted {
                node_id: node.to_string(),
                slot: order.slot.clone(),
                gpus,
            },
        );
        self.at(
            now + duration,
            Event::InstanceEnds {
                node: node.to_string(),
                slot: order.slot,
            },
        );
    }

    /// One batch through the core, then its effects, then the invariants.
    fn step(&mut self, commands: Vec<Command>) -> Result<(), Box<Failure>> {
        self.steps += 1;
        let now = self.now;
        let control = self.coordinator();
        for command in commands {
            control.apply(command, now);
        }
        control.tick(now);
        control.decide(now);
        let effects = control.effects();
        self.execute(effects);
        self.observe()?;
        Ok(())
    }

    fn execute(&mut self, mut effects: Effects) {
        let committed = self.store.commit(&effects.batch).expect("the commit");
        let now = self.now;
        self.coordinator()
            .committed(&committed, &effects.jobs_touched, now);
        for reply in effects.replies.drain(..) {
            reply(None);
        }
        for (link, message) in effects.messages.drain(..) {
            let _ = link.send(message);
        }
        // Messages go out on each session in order.
        let nodes: Vec<String> = self.agents.keys().cloned().collect();
        for node in nodes {
            loop {
                let delay = self.delay();
                let Some(agent) = self.agents.get_mut(&node) else {
                    break;
                };
                let Some(Ok(message)) = agent.link.as_mut().map(|l| l.try_recv()) else {
                    break;
                };
                let at = (now + delay).max(agent.down_clear);
                agent.down_clear = at;
                let session = agent.session;
                self.at(
                    at,
                    Event::ToAgent {
                        node: node.clone(),
                        session,
                        message,
                    },
                );
            }
        }
        for launch in effects.create.drain(..) {
            if self.rng.random_bool(self.scale.provider_failure) {
                self.last_provider_failure = now;
                self.send(Command::NodeFailed {
                    node_id: launch.node_id,
                    error: "the simulated provider failed".into(),
                    preempted: false,
                });
                continue;
            }
            let gpus = launch.gpus;
            self.agents.insert(
                launch.node_id.clone(),
                Agent {
                    cluster: launch.cluster,
                    gpus,
                    cores: launch.cores,
                    memory_bytes: launch.memory_bytes,
                    ..Default::default()
                },
            );
            self.send(Command::NodeStarted {
                node_id: launch.node_id.clone(),
                pid: None,
                handle: String::new(),
            });
            let at = now + self.rng.random_range(50..800);
            self.at(
                at,
                Event::Boot {
                    node: launch.node_id,
                },
            );
        }
        for gone in effects.remove.drain(..) {
            self.crash_agent(&gone.node_id);
            if let Some(agent) = self.agents.get_mut(&gone.node_id) {
                agent.gone = true;
            }
            self.send(Command::NodeRemoved {
                node_id: gone.node_id,
            });
        }
    }

    fn fail(&self, what: String) -> Box<Failure> {
        Box::new(Failure {
            seed: self.seed,
            at_ms: self.now,
            step: self.steps,
            what,
            trace: self.trace.clone(),
        })
    }

    /// The invariants after a step.
    fn observe(&mut self) -> Result<(), Box<Failure>> {
        for (index, mut answer) in std::mem::take(&mut self.submits) {
            match answer.try_recv() {
                Ok(Ok(job)) => {
                    self.accepted.insert(job.id.to_string(), index);
                }
                Ok(Err(e)) => return Err(self.fail(format!("a submit was refused: {e}"))),
                Err(oneshot::error::TryRecvError::Empty) => self.submits.push((index, answer)),
                Err(oneshot::error::TryRecvError::Closed) => {}
            }
        }
        let control = self.control.as_ref().expect("the coordinator runs");
        let check_all = self.steps.is_multiple_of(self.scale.check_every.max(1));
        let broken = if check_all {
            control.invariant_violations()
        } else {
            Vec::new()
        };
        if let Some(first) = broken.into_iter().next() {
            return Err(self.fail(first));
        }
        // No job runs two attempts at once on the agents.
        let mut attempts: HashMap<&str, &str> = HashMap::new();
        let agents = self.agents.iter().filter(|_| check_all);
        for (node, agent) in agents {
            if !agent.up {
                continue;
            }
            for slot in agent.running.keys() {
                let job = crate::control::job_of_attempt(&slot.attempt_id).unwrap_or("");
                if let Some(other) = attempts.insert(job, &slot.attempt_id)
                    && other != slot.attempt_id
                {
                    return Err(self.fail(format!(
                        "{job} runs twice: attempts {other} and {} (one on {node})",
                        slot.attempt_id
                    )));
                }
            }
        }
        // Every accepted job ends once and stays ended (the ended ones are
        // looked at again on full checks).
        let mut newly = Vec::new();
        let watched = self
            .accepted
            .keys()
            .filter(|id| check_all || !self.ended.contains_key(*id));
        for id in watched {
            let Some(status) = control.job_status(id) else {
                if self.ended.contains_key(id) {
                    // Ended jobs leave memory after a restart when more than
                    // the most recent are stored (a fleet's); the store has them.
                    continue;
                }
                return Err(self.fail(format!("accepted job {id} is gone")));
            };
            match self.ended.get(id) {
                Some(first) if *first != status => {
                    return Err(self.fail(format!(
                        "{id} ended {} and then became {}",
                        first.as_str(),
                        status.as_str()
                    )));
                }
                None if status.is_final() => newly.push((id.clone(), status)),
                _ => {}
            }
        }
        if !newly.is_empty() {
            self.last_end = self.now;
        }
        self.ended.extend(newly);
        Ok(())
    }

    fn done(&self) -> bool {
        let all_ended =
            self.accepted.len() == self.scale.jobs && self.ended.len() == self.scale.jobs;
        // Once the last job has ended and the last fault has healed (a restart,
        // a reconnection and a lease at most): the idle time, a tick, and the
        // provider's removal.
        let healed = (self.scale.faults_over.as_millis() as Millis + 4_000 + 3_000 + 6_000)
            .max(self.last_provider_failure + 64_000 + 1_000);
        let quiet = self.last_end.max(healed);
        all_ended && self.now > quiet + (IDLE_SECONDS as Millis) * 1_000 + 3 * TICK_MS + 1_000
    }

    fn final_checks(&self) -> Result<(), Box<Failure>> {
        let control = self.control.as_ref().expect("the coordinator runs");
        if let Some(first) = control.invariant_violations().into_iter().next() {
            return Err(self.fail(first));
        }
        if self.accepted.len() != self.scale.jobs {
            // Submits lost to a coordinator crash were never acknowledged: fine.
            let acked_and_open: Vec<&String> = self
                .accepted
                .keys()
                .filter(|id| !self.ended.contains_key(*id))
                .collect();
            if !acked_and_open.is_empty() {
                return Err(self.fail(format!("jobs never ended: {acked_and_open:?}")));
            }
        }
        let open: Vec<&String> = self
            .accepted
            .keys()
            .filter(|id| !self.ended.contains_key(*id))
            .collect();
        if !open.is_empty() {
            return Err(self.fail(format!("jobs never ended: {open:?}")));
        }
        let control = self.control.as_ref().expect("the coordinator runs");
        for (name, _, _, min) in CLUSTERS {
            let allocated = control.allocated_nodes(name);
            if allocated != min {
                return Err(self.fail(format!(
                    "cluster {name} has {allocated} nodes {} ms after the last job ended and the faults healed (min_nodes {min}, idle {IDLE_SECONDS} s)",
                    self.now - self.last_end
                )));
            }
        }
        Ok(())
    }

    fn report(&self) -> Report {
        let mut ended = BTreeMap::new();
        for status in self.ended.values() {
            *ended.entry(status.as_str().to_string()).or_default() += 1;
        }
        Report {
            seed: self.seed,
            steps: self.steps,
            simulated_ms: self.now,
            accepted: self.accepted.len(),
            ended,
            coordinator_restarts: self.restarts,
            successors: self.successors,
            held: self.held,
            held_in_chains: self.held_in_chains,
        }
    }
}

fn command_name(command: &Command) -> String {
    let text = format!("{command:?}");
    text.chars().take(160).collect()
}

fn agent_message_name(message: &ToAgent) -> String {
    match message {
        ToAgent::Launch(order) => {
            format!("launch {}/{}", order.slot.attempt_id, order.slot.instance)
        }
        ToAgent::Cancel { slot, reason } => {
            format!("cancel {}/{} ({reason})", slot.attempt_id, slot.instance)
        }
        other => format!("{other:?}").chars().take(120).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Seeds `from..from + count` at `scale`, or the one in SHOAL_SIM_SEED.
    fn seeds(from: u64, count: u64, scale: &Scale) {
        let only: Option<u64> = std::env::var("SHOAL_SIM_SEED")
            .ok()
            .and_then(|s| s.parse().ok());
        let range: Vec<u64> = match only {
            Some(seed) => vec![seed],
            None => (from..from + count).collect(),
        };
        for seed in range {
            if let Err(failure) = run(seed, scale) {
                panic!("{failure}");
            }
        }
    }

    /// 2,000 seeds at the default scale and 200 rough ones, in tests of 250 and
    /// 50 so that they share the cores (`cargo test` optimizes the core: about
    /// 4 s per 100 default seeds on one core of the CI machine).
    macro_rules! seed_tests {
        ($($name:ident: $from:literal + $count:literal at $scale:expr;)*) => {$(
            #[test]
            fn $name() {
                seeds($from, $count, &$scale);
            }
        )*};
    }

    seed_tests! {
        seeds_0_to_249_hold_every_invariant: 0 + 250 at Scale::default();
        seeds_250_to_499_hold_every_invariant: 250 + 250 at Scale::default();
        seeds_500_to_749_hold_every_invariant: 500 + 250 at Scale::default();
        seeds_750_to_999_hold_every_invariant: 750 + 250 at Scale::default();
        seeds_1000_to_1249_hold_every_invariant: 1000 + 250 at Scale::default();
        seeds_1250_to_1499_hold_every_invariant: 1250 + 250 at Scale::default();
        seeds_1500_to_1749_hold_every_invariant: 1500 + 250 at Scale::default();
        seeds_1750_to_1999_hold_every_invariant: 1750 + 250 at Scale::default();
        rough_seeds_0_to_49_hold_every_invariant: 0 + 50 at Scale::rough();
        rough_seeds_50_to_99_hold_every_invariant: 50 + 50 at Scale::rough();
        rough_seeds_100_to_149_hold_every_invariant: 100 + 50 at Scale::rough();
        rough_seeds_150_to_199_hold_every_invariant: 150 + 50 at Scale::rough();
    }

    /// The seeds reach successors, held and started at once alike, and chains
    /// of them (else they would check nothing of them).
    #[test]
    fn seeds_book_successors() {
        let (mut successors, mut held, mut chained) = (0, 0, 0);
        for seed in 0..100 {
            let report = run(seed, &Scale::default()).expect("seed");
            successors += report.successors;
            held += report.held;
            chained += report.held_in_chains;
        }
        assert!(
            chained > 0 && held > chained && successors > held,
            "{successors} successors, {held} held, {chained} behind another held one"
        );
    }

    #[test]
    fn a_seed_replays_exactly() {
        let first = run(7, &Scale::default()).expect("seed 7");
        let second = run(7, &Scale::default()).expect("seed 7 again");
        assert_eq!(first.steps, second.steps);
        assert_eq!(first.simulated_ms, second.simulated_ms);
        assert_eq!(first.ended, second.ended);
    }
}
