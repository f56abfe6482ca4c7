//! Nodes, their telemetry, and the slots instances run in.

use super::*;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NodeState {
    Preparing,
    Idle,
    Running,
    Leaving,
    Preempted,
    Unusable,
}

impl NodeState {
    pub fn as_str(self) -> &'static str {
        match self {
            NodeState::Preparing => "preparing",
            NodeState::Idle => "idle",
            NodeState::Running => "running",
            NodeState::Leaving => "leaving",
            NodeState::Preempted => "preempted",
            NodeState::Unusable => "unusable",
        }
    }
}

/// One instance of one attempt, as placed on a node.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Slot {
    pub attempt_id: String,
    pub instance: u32,
}

impl Slot {
    /// The job it is of (an attempt's id is `<job>.<number>`).
    pub fn job_id(&self) -> &str {
        self.attempt_id
            .rsplit_once('.')
            .map_or(self.attempt_id.as_str(), |(job, _)| job)
    }
}

/// An instance booked on a node, with the share it holds there. Stored
/// beside the slot; a slot stored without one (as earlier versions did, one
/// instance a node) holds the whole node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Booked {
    #[serde(flatten)]
    pub slot: Slot,
    #[serde(default, skip_serializing_if = "Resources::is_whole")]
    pub share: Resources,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub gpus: u32,
    /// A successor: it takes this instance's share when it ends (the node
    /// starts it then), and holds nothing before.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub after: Option<Slot>,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

/// What a node has left: cores (in thousandths), memory, GPUs; and whether it
/// runs nothing at all (a whole-node instance needs that).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Room {
    pub millicpus: u32,
    pub memory_bytes: u64,
    pub gpus: u32,
    pub empty: bool,
}

impl Room {
    /// Can one instance of `share` with `gpus` GPUs go here?
    pub fn takes(&self, share: Resources, gpus: u32) -> bool {
        if share.is_whole() {
            return self.empty && self.gpus >= gpus;
        }
        self.millicpus >= share.millicpus
            && self.memory_bytes >= share.memory_bytes()
            && self.gpus >= gpus
    }

    /// Books one instance of `share` with `gpus` GPUs (the whole node: all its
    /// cores and memory).
    pub fn book(&mut self, share: Resources, gpus: u32) {
        self.empty = false;
        if share.is_whole() {
            self.millicpus = 0;
            self.memory_bytes = 0;
        } else {
            self.millicpus = self.millicpus.saturating_sub(share.millicpus);
            self.memory_bytes = self.memory_bytes.saturating_sub(share.memory_bytes());
        }
        self.gpus = self.gpus.saturating_sub(gpus);
    }

    /// Nothing more fits: no core left, or a whole-node instance holds it.
    pub fn is_full(&self) -> bool {
        !self.empty && self.millicpus == 0
    }
}

/// `running`, as stored: a list of bookings, or (earlier versions) one slot or none.
#[derive(Deserialize)]
#[serde(untagged)]
enum StoredRunning {
    Many(Vec<Booked>),
    One(Option<Booked>),
}

fn running_from_store<'de, D: serde::Deserializer<'de>>(
    d: D,
) -> std::result::Result<Vec<Booked>, D::Error> {
    Ok(match StoredRunning::deserialize(d)? {
        StoredRunning::Many(all) => all,
        StoredRunning::One(one) => one.into_iter().collect(),
    })
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Node {
    pub id: String,
    pub cluster: String,
    pub state: NodeState,
    pub cores: u32,
    pub memory_bytes: u64,
    pub created_at: Millis,
    /// When the node entered its current state (idle since, preparing since, ...).
    pub state_since: Millis,
    /// The instances it runs (several, when each holds a share).
    #[serde(default, deserialize_with = "running_from_store")]
    pub running: Vec<Booked>,
    #[serde(default)]
    pub hostname: String,
    #[serde(default)]
    pub pid: Option<u32>,
    #[serde(default)]
    pub message: String,
    /// What its agent can run jobs with (`process`, `docker`), from registration.
    #[serde(default)]
    pub runtimes: Vec<String>,
    /// What created it (and so removes it).
    #[serde(default)]
    pub provider: ProviderKind,
    /// What its provider calls it (a Slurm job id, a create script's address).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub handle: String,
    /// Its cluster's provider settings when it was made (what removes it).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub settings: BTreeMap<String, String>,
    /// Its GPUs, as its agent found them.
    #[serde(default)]
    pub gpus: Vec<GpuStat>,
    /// Why its agent found none.
    #[serde(default)]
    pub gpu_reason: String,
    /// Unusable because its agent went silent for a lease: it may come back.
    #[serde(default)]
    pub lost_contact: bool,
    /// The latest telemetry beyond CPU and memory.
    #[serde(skip)]
    pub stats: NodeStats,
    /// Runtime-only facts, rebuilt from heartbeats and sessions.
    #[serde(skip)]
    pub connected: bool,
    #[serde(skip)]
    pub cpu_percent: f32,
    #[serde(skip)]
    pub memory_used_bytes: u64,
    #[serde(skip)]
    pub last_heartbeat: Millis,
}

impl Node {
    /// A node about to come up (its agent has not registered yet).
    pub fn preparing(
        id: &str,
        cluster: &str,
        cores: u32,
        memory_bytes: u64,
        provider: ProviderKind,
        now: Millis,
    ) -> Self {
        Node {
            id: id.to_string(),
            cluster: cluster.to_string(),
            state: NodeState::Preparing,
            cores,
            memory_bytes,
            created_at: now,
            state_since: now,
            running: Vec::new(),
            hostname: String::new(),
            pid: None,
            message: String::new(),
            runtimes: Vec::new(),
            provider,
            handle: String::new(),
            settings: BTreeMap::new(),
            gpus: Vec::new(),
            gpu_reason: String::new(),
            lost_contact: false,
            stats: NodeStats::default(),
            connected: false,
            cpu_percent: 0.0,
            memory_used_bytes: 0,
            last_heartbeat: 0,
        }
    }
}

/// One GPU, as registered or sampled.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct GpuStat {
    pub index: u32,
    pub uuid: String,
    pub model: String,
    pub utilization_percent: u32,
    pub memory_used_bytes: u64,
    pub memory_total_bytes: u64,
    pub temperature_c: u32,
    pub power_milliwatts: u32,
    pub energy_millijoules: u64,
    pub process_ids: Vec<u32>,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct NodeStats {
    pub per_core_percent: Vec<f32>,
    pub disk_free_bytes: u64,
    pub disk_total_bytes: u64,
    pub network_rx_bytes: u64,
    pub network_tx_bytes: u64,
    pub gpus: Vec<GpuStat>,
}

/// What an instance used (live while it runs, final after).
/// Stored without its zeros (a CPU job's GPU figures, a quick job's all).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Usage {
    #[serde(skip_serializing_if = "super::is_zero")]
    pub samples: u32,
    #[serde(skip_serializing_if = "super::is_zero")]
    pub gpu_utilization_avg_percent: f64,
    #[serde(skip_serializing_if = "super::is_zero")]
    pub gpu_utilization_peak_percent: u32,
    #[serde(skip_serializing_if = "super::is_zero")]
    pub gpu_memory_peak_bytes: u64,
    #[serde(skip_serializing_if = "super::is_zero")]
    pub gpu_energy_joules: f64,
    #[serde(skip_serializing_if = "super::is_zero")]
    pub cpu_seconds: f64,
    #[serde(skip_serializing_if = "super::is_zero")]
    pub gpu_utilization_percent: u32,
    #[serde(skip_serializing_if = "super::is_zero")]
    pub gpu_memory_bytes: u64,
}

impl Node {
    /// Runs nothing, and can take an instance now.
    pub fn is_free(&self) -> bool {
        self.is_open() && self.running.is_empty()
    }

    /// Can take instances now (if they fit in its room).
    pub fn is_open(&self) -> bool {
        matches!(self.state, NodeState::Idle | NodeState::Running) && self.connected
    }

    /// What it has left, whatever its state.
    pub fn room(&self) -> Room {
        let mut room = Room {
            millicpus: self.cores.saturating_mul(1000),
            memory_bytes: self.memory_bytes,
            gpus: self.gpus.len() as u32,
            empty: true,
        };
        for booked in self.running.iter().filter(|b| b.after.is_none()) {
            room.book(booked.share, booked.gpus);
        }
        room
    }

    /// How many successors wait before `slot` here: 0 for one that runs
    /// (more than it books for a loop, which is never built).
    pub fn chain_behind(&self, slot: &Slot) -> usize {
        walk_chain(&self.after_of(), slot).0
    }

    /// The end of each chain here (a booked slot no successor follows): how
    /// many successors wait up to it, and the slot its chain starts at.
    pub fn chain_ends(&self) -> Vec<ChainEnd<'_>> {
        let after_of = self.after_of();
        let followed: std::collections::HashSet<&Slot> = after_of.values().copied().collect();
        self.running
            .iter()
            .filter(|b| !followed.contains(&b.slot))
            .map(|b| {
                let (behind, head) = walk_chain(&after_of, &b.slot);
                ChainEnd {
                    slot: &b.slot,
                    behind,
                    head,
                }
            })
            .collect()
    }

    /// Successors booked here, waiting for the slot each follows.
    pub fn waiting(&self) -> usize {
        self.running.iter().filter(|b| b.after.is_some()).count()
    }

    fn after_of(&self) -> std::collections::HashMap<&Slot, &Slot> {
        self.running
            .iter()
            .filter_map(|b| b.after.as_ref().map(|after| (&b.slot, after)))
            .collect()
    }

    /// The slots it runs.
    pub fn slots(&self) -> Vec<Slot> {
        self.running.iter().map(|b| b.slot.clone()).collect()
    }

    /// Runs this slot.
    pub fn runs(&self, slot: &Slot) -> bool {
        self.running.iter().any(|b| &b.slot == slot)
    }

    /// Books an instance here: the node is running from now, if it was idle.
    pub fn book(&mut self, booked: Booked, now: Millis) {
        if self.state != NodeState::Running {
            self.state = NodeState::Running;
            self.state_since = now;
        }
        self.running.push(booked);
    }

    /// Frees a slot's share: its successor, if any, follows what the slot
    /// followed (so takes the share of a running one); a node that runs
    /// nothing more is idle from now. False if it did not run it.
    pub fn release(&mut self, slot: &Slot, now: Millis) -> bool {
        let Some(at) = self.running.iter().position(|b| &b.slot == slot) else {
            return false;
        };
        let released = self.running.remove(at);
        for booked in &mut self.running {
            if booked.after.as_ref() == Some(slot) {
                booked.after.clone_from(&released.after);
            }
        }
        if self.running.is_empty() && self.state == NodeState::Running {
            self.state = NodeState::Idle;
            self.state_since = now;
        }
        true
    }

    /// Can run this job's instances: containers need the docker runtime.
    pub fn can_run(&self, job: &JobSpec) -> bool {
        job.image.is_none() || self.runtimes.iter().any(|r| r == "docker")
    }

    /// Counts toward the cluster's size (and so toward max_nodes).
    pub fn is_allocated(&self) -> bool {
        matches!(
            self.state,
            NodeState::Preparing | NodeState::Idle | NodeState::Running | NodeState::Leaving
        )
    }
}

/// The end of a chain of successors on a node (`Node::chain_ends`).
#[derive(Debug)]
pub struct ChainEnd<'a> {
    pub slot: &'a Slot,
    /// Successors waiting up to and including `slot` (0: it runs).
    pub behind: usize,
    /// The slot the chain starts at: the one that runs.
    pub head: &'a Slot,
}

/// Walks from `slot` to the head of its chain: the successors on the way, and
/// the head. Stops past as many steps as there are links (a loop).
fn walk_chain<'a>(
    after_of: &std::collections::HashMap<&'a Slot, &'a Slot>,
    slot: &'a Slot,
) -> (usize, &'a Slot) {
    let mut behind = 0;
    let mut at = slot;
    while let Some(&after) = after_of.get(at) {
        behind += 1;
        at = after;
        if behind > after_of.len() {
            break;
        }
    }
    (behind, at)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(id: &str) -> Slot {
        Slot {
            attempt_id: id.into(),
            instance: 0,
        }
    }

    #[test]
    fn a_chain_is_walked_to_its_head_and_a_loop_walks_past_its_links() {
        let (a, b, c, d, e) = (slot("a"), slot("b"), slot("c"), slot("d"), slot("e"));
        // a runs; b follows a, c follows b.
        let chain = std::collections::HashMap::from([(&b, &a), (&c, &b)]);
        assert_eq!(walk_chain(&chain, &c), (2, &a));
        assert_eq!(walk_chain(&chain, &a), (0, &a));
        // d and e follow each other: more steps than links, and it ends.
        let looped = std::collections::HashMap::from([(&d, &e), (&e, &d)]);
        assert!(walk_chain(&looped, &d).0 > looped.len());
    }
}
