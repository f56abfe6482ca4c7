//! Successors: a node that runs a short job of a `Family` (the tasks of one
//! array, or single jobs alike) is told the family's next jobs before the
//! current one ends, and starts each as soon as it has reported the end of the
//! one before. Its slot is never idle for a round trip through the coordinator
//! (the exit in, its commit, the next launch out), which is most of a short
//! job's cost when each node runs one at a time.
//!
//! A successor is booked only where nothing else would take it sooner: its
//! cluster is at `max_nodes` with every node up (no node is coming), it is the
//! oldest queued job (nothing is passed over), and its family's last job to
//! complete ran under `QUICK_TASK_MS`. Single jobs are alike when they are the
//! same work (command line, image, code, variables and share on one cluster)
//! with no data of their own: the same evaluation run again, jobs that differ
//! only in name or tags (not a loop over seeds, whose arguments differ: that is
//! an array). A family only predicts a job's time; each successor still runs
//! its own spec. Behind each running
//! instance is a chain of at most `chain_length` successors, as many as that
//! last job's time fits in `QUICK_TASK_MS`: the last of a chain waits about
//! that long at most while another node could go idle. A node holds at most
//! `MAX_CHAIN` successors in all, the shortest chain grown first; a chain grows
//! back only once half of it has started, so one booking (one commit) tells a
//! node many jobs. An array task's end waits for a later batch too
//! (`effects.rs`, `write_task_end_later`); a single job's is written at once.
//! A booking holds nothing until the instance it follows ends (`Node::room`);
//! each instance has at most one follower, and the follower of one that ends
//! unstarted follows what that one followed (`Node::release`).

use std::hash::{Hash, Hasher};

use super::*;

/// A task that runs longer than this gets no successor booked behind it.
pub const QUICK_TASK_MS: Millis = 1_000;

/// The most successors booked on one node, over all its chains: a node that
/// runs many tasks at once has its round trips hidden by them already. A node
/// is topped up once half of it has started, so one booking (one commit) tells
/// it half of it at least: at 16, the commits of a booking every 8 tasks were a
/// quarter of the coordinator's CPU in `shoal-bench arrays`. `chain_length`
/// still keeps a chain within about a second.
pub const MAX_CHAIN: usize = 64;

/// How long an alike family's last run is remembered without another: the
/// quick families stay as few as the commands run of late.
pub const ALIKE_MEMORY_MS: Millis = 10 * 60 * 1_000;

/// Jobs one may follow another of: an array's tasks, or single jobs alike.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Family {
    Array(u64),
    /// A hash of what makes single jobs the same work (`family`).
    Alike(u64),
}

/// The family a job may be booked in as a successor: its array's, or, for a
/// plain single job (no sweep, pipeline, parallel run or data), its work's.
pub fn family(job: &Job) -> Option<Family> {
    if let Some(task) = job.task {
        return Some(Family::Array(task.array_seq));
    }
    let extras = &*job.spec.extras;
    let plain = job.array.is_none()
        && job.sweep.is_none()
        && job.trial.is_none()
        && job.pipeline.is_none()
        && job.step.is_none()
        && job.spec.parallel.is_none()
        && extras.inputs.is_empty()
        && extras.outputs.is_empty();
    if !plain {
        return None;
    }
    // SipHash with its fixed keys: the same family for one build on every
    // pass and replay (the families are never stored).
    let mut hash = std::hash::DefaultHasher::new();
    let spec = &job.spec;
    (
        &spec.cluster,
        &spec.argv,
        &spec.command,
        &spec.environment_variables,
    )
        .hash(&mut hash);
    (
        &spec.code_path,
        &spec.image,
        &extras.environment,
        &extras.path_prefix,
    )
        .hash(&mut hash);
    (spec.instance_count, spec.timeout_seconds, spec.resources).hash(&mut hash);
    Some(Family::Alike(hash.finish()))
}

/// How many successors may wait behind one instance of a family whose last
/// job ran `millis`: as many as fit in `QUICK_TASK_MS`, one at least.
pub fn chain_length(millis: Millis) -> usize {
    let fit = QUICK_TASK_MS / millis.max(1);
    usize::try_from(fit)
        .unwrap_or(MAX_CHAIN)
        .clamp(1, MAX_CHAIN)
}

impl Control {
    /// Books successors on the cluster's nodes, as far as its queue allows.
    pub(super) fn book_successors(&mut self, cluster: &str, now: Millis) {
        // Nothing queued, or no family's jobs known to be short: nothing to
        // walk (this runs on every pass that touches the cluster).
        let Some(queue) = self.queue.cluster(cluster) else {
            return;
        };
        if self.quick.is_empty() || queue.seqs().next().is_none() {
            return;
        }
        if !self.cluster_is_complete(cluster) {
            return;
        }
        // The end of each chain that may grow: a running instance, or the last
        // successor behind it, with its family, its share and the chain's length.
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
                let Some(family) = family(job) else {
                    continue;
                };
                let Some(&(millis, _)) = self.quick.get(&family) else {
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
                        family,
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
        // The oldest queued jobs, in order, each behind a chain of its family
        // (the shortest first); the first that cannot follow any stops the booking.
        let mut bookings: Vec<(scheduler::Placement, Slot)> = Vec::new();
        for seq in queue.seqs() {
            if leaders.is_empty() {
                break;
            }
            let Some(job) = self.jobs.by_seq(seq) else {
                break;
            };
            let Some(family) = family(job) else {
                break;
            };
            let settled = job.current_attempt().is_none_or(Attempt::is_settled);
            let at = leaders
                .iter()
                .enumerate()
                .filter(|(_, l)| {
                    l.family == family
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

    /// A job of a family completed in `millis`: whether the next ones are
    /// quick enough to be booked ahead.
    pub(super) fn family_ran(&mut self, family: Family, millis: Millis, now: Millis) {
        if millis < QUICK_TASK_MS {
            self.quick.insert(family, (millis, now));
        } else {
            self.quick.remove(&family);
        }
    }

    /// Alike families not run for `ALIKE_MEMORY_MS` are forgotten (an array's
    /// goes with its end).
    pub(super) fn forget_old_families(&mut self, now: Millis) {
        self.quick.retain(|family, (_, at)| {
            matches!(family, Family::Array(_)) || now - *at < ALIKE_MEMORY_MS
        });
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
    family: Family,
    share: Resources,
    /// Successors already booked between the running instance and this one.
    behind: usize,
    /// The most the chain may hold (`chain_length`).
    most: usize,
}
