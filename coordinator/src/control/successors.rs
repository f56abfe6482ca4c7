//! Successors: a node that runs a short task of an array is told the array's
//! next tasks before the current one ends, and starts each as soon as it has
//! reported the end of the one before. Its slot is never idle for a round trip
//! through the coordinator (the exit in, its commit, the next launch out),
//! which is most of a short task's cost when each node runs one at a time.
//!
//! A successor is booked only where nothing else would take it sooner: its
//! cluster is at `max_nodes` with every node up (no node is coming), it is the
//! oldest queued job (nothing is passed over), and the array's last task to
//! complete ran under `QUICK_TASK_MS`. Behind each running instance is a chain
//! of at most `chain_length` successors, as many as that last task's time fits
//! in `QUICK_TASK_MS`: the last of a chain waits about that long at most while
//! another node could go idle. A node holds at most `MAX_CHAIN` successors in
//! all, the shortest chain grown first; a chain grows back only once half of it
//! has started, so one booking (one commit) tells a node many tasks, whose
//! ends wait for a later batch too (`effects.rs`, `write_task_end_later`). A booking holds nothing
//! until the instance it follows ends (`Node::room`); each instance has at most
//! one follower, and the follower of one that ends unstarted follows what that
//! one followed (`Node::release`).

use super::*;

/// A task that runs longer than this gets no successor booked behind it.
pub const QUICK_TASK_MS: Millis = 1_000;

/// The most successors booked on one node, over all its chains: a node that
/// runs many tasks at once has its round trips hidden by them already.
pub const MAX_CHAIN: usize = 16;

/// How many successors may wait behind one instance of an array whose last
/// task ran `millis`: as many as fit in `QUICK_TASK_MS`, one at least.
pub fn chain_length(millis: Millis) -> usize {
    let fit = QUICK_TASK_MS / millis.max(1);
    usize::try_from(fit)
        .unwrap_or(MAX_CHAIN)
        .clamp(1, MAX_CHAIN)
}

impl Control {
    /// Books successors on the cluster's nodes, as far as its queue allows.
    pub(super) fn book_successors(&mut self, cluster: &str, now: Millis) {
        // Nothing queued, or no array's tasks known to be short: nothing to
        // walk (this runs on every pass that touches the cluster).
        let Some(queue) = self.queue.cluster(cluster) else {
            return;
        };
        if self.quick_arrays.is_empty() || queue.seqs().next().is_none() {
            return;
        }
        if !self.cluster_is_complete(cluster) {
            return;
        }
        // The end of each chain that may grow: a running instance, or the last
        // successor behind it, with its array, its share and the chain's length.
        let mut leaders: Vec<Leader> = Vec::new();
        // What each node may still take ahead: `MAX_CHAIN` over all its chains.
        let mut room: HashMap<String, usize> = HashMap::new();
        for node in self.nodes.values() {
            if node.cluster != cluster || !node.is_open() {
                continue;
            }
            // A node is topped up once half of what it may hold has started,
            // so one booking (and one commit) tells it many tasks.
            if node.waiting() > MAX_CHAIN / 2 {
                continue;
            }
            let left = MAX_CHAIN - node.waiting();
            for end in node.chain_ends() {
                let Some((job, instance)) = self.instance(end.slot) else {
                    continue;
                };
                let Some(task) = job.task else {
                    continue;
                };
                let Some(&millis) = self.quick_arrays.get(&task.array_seq) else {
                    continue;
                };
                let live = matches!(
                    instance.status,
                    InstanceStatus::Launching | InstanceStatus::Running
                ) && matches!(job.status, JobStatus::Preparing | JobStatus::Running);
                let most = chain_length(millis);
                // Grown once half of the chain has started (to its length).
                if live && may_follow(job) && end.behind <= most / 2 {
                    leaders.push(Leader {
                        node: node.id.clone(),
                        slot: end.slot.clone(),
                        array: task.array_seq,
                        share: job.spec.resources,
                        behind: end.behind,
                        most,
                    });
                }
            }
            room.insert(node.id.clone(), left);
        }
        if leaders.is_empty() {
            return;
        }
        // The oldest queued jobs, in order, each behind a chain of its array
        // (the shortest first); the first that cannot follow any stops the booking.
        let mut bookings: Vec<(scheduler::Placement, Slot)> = Vec::new();
        for seq in queue.seqs() {
            if leaders.is_empty() {
                break;
            }
            let Some(job) = self.jobs.by_seq(seq) else {
                break;
            };
            let Some(task) = job.task else {
                break;
            };
            let settled = job.current_attempt().is_none_or(Attempt::is_settled);
            let at = leaders
                .iter()
                .enumerate()
                .filter(|(_, l)| {
                    l.array == task.array_seq
                        && l.share == job.spec.resources
                        && self
                            .nodes
                            .get(&l.node)
                            .is_some_and(|n| n.can_run(&job.spec))
                })
                .min_by_key(|(_, l)| l.behind)
                .map(|(at, _)| at);
            let Some(at) = at.filter(|_| settled && may_follow(job)) else {
                break;
            };
            let leader = leaders.swap_remove(at);
            let left = room.get_mut(&leader.node).map_or(0, |left| {
                *left = left.saturating_sub(1);
                *left
            });
            if left == 0 {
                leaders.retain(|l| l.node != leader.node);
            }
            // The new successor is the chain's end now: it may be followed too.
            let slot = Slot {
                attempt_id: job.next_attempt_id(),
                instance: 0,
            };
            if left > 0 && leader.behind + 1 < leader.most {
                leaders.push(Leader {
                    slot: slot.clone(),
                    behind: leader.behind + 1,
                    ..leader.clone()
                });
            }
            bookings.push((
                scheduler::Placement {
                    job_id: job.id.to_string(),
                    nodes: vec![leader.node],
                },
                leader.slot,
            ));
        }
        for (placement, after) in bookings {
            self.start_attempt(&placement, Some(after), now);
            self.successors_booked += 1;
        }
    }

    /// Every node the cluster may have is up: none is coming that could take
    /// a queued job sooner than a successor would start.
    fn cluster_is_complete(&self, cluster: &str) -> bool {
        let Some(max_nodes) = self.clusters.get(cluster).map(|c| c.spec.max_nodes) else {
            return false;
        };
        let mut up = 0;
        for node in self.nodes.values().filter(|n| n.cluster == cluster) {
            match node.state {
                NodeState::Preparing => return false,
                NodeState::Idle | NodeState::Running if node.connected => up += 1,
                _ => {}
            }
        }
        up >= max_nodes
    }

    /// A task of an array completed: whether the next ones are quick enough to
    /// be booked ahead.
    pub(super) fn task_ran(&mut self, array_seq: u64, millis: Millis) {
        if millis < QUICK_TASK_MS {
            self.quick_arrays.insert(array_seq, millis);
        } else {
            self.quick_arrays.remove(&array_seq);
        }
    }
}

/// One instance, no GPUs, no workers or ranks of its own: a job that can take
/// over another's share on a node as it is.
fn may_follow(job: &Job) -> bool {
    job.spec.instance_count == 1
        && job.spec.gpus_per_instance == 0
        && job.spec.distribution.is_none()
        && job.spec.parallel.is_none()
}

/// The end of a chain on a node: a running instance, or the last successor
/// booked behind it.
#[derive(Clone)]
struct Leader {
    node: String,
    slot: Slot,
    array: u64,
    share: Resources,
    /// Successors already booked between the running instance and this one.
    behind: usize,
    /// The most the chain may hold (`chain_length`).
    most: usize,
}
