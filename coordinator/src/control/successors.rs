//! Successors: a node that runs a short task of an array is told the array's
//! next task before the current one ends, and starts it as soon as it has
//! reported the end. Its slot is never idle for a round trip through the
//! coordinator (the exit in, its commit, the next launch out), which is most of
//! a short task's cost when each node runs one at a time.
//!
//! A successor is booked only where nothing else would take it sooner: its
//! cluster is at `max_nodes` with every node up (no node is coming), it is the
//! oldest queued job (nothing is passed over), and the array's last task to
//! complete ran under `QUICK_TASK_MS` (it waits at most about that long while
//! another node could go idle). Its booking holds nothing until the instance it
//! follows ends (`Node::room`, `Node::release`); each instance has at most one.

use super::*;

/// A task that runs longer than this gets no successor booked behind it.
pub const QUICK_TASK_MS: Millis = 1_000;

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
        // Each instance that may be followed, with its array and its share.
        let mut leaders: Vec<(String, Slot, u64, Resources)> = Vec::new();
        for node in self.nodes.values() {
            if node.cluster != cluster || !node.is_open() {
                continue;
            }
            let followed: HashSet<&Slot> = node
                .running
                .iter()
                .filter_map(|b| b.after.as_ref())
                .collect();
            for booked in node.running.iter().filter(|b| b.after.is_none()) {
                if followed.contains(&booked.slot) {
                    continue;
                }
                let Some((job, instance)) = self.instance(&booked.slot) else {
                    continue;
                };
                let Some(task) = job.task else {
                    continue;
                };
                let live = matches!(
                    instance.status,
                    InstanceStatus::Launching | InstanceStatus::Running
                ) && matches!(job.status, JobStatus::Preparing | JobStatus::Running);
                if live && may_follow(job) && self.quick_arrays.contains(&task.array_seq) {
                    leaders.push((
                        node.id.clone(),
                        booked.slot.clone(),
                        task.array_seq,
                        job.spec.resources,
                    ));
                }
            }
        }
        if leaders.is_empty() {
            return;
        }
        // The oldest queued jobs, in order, each behind an instance of its
        // array; the first that cannot follow any stops the booking.
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
            let fits = |(node, _, array, share): &(String, Slot, u64, Resources)| {
                *array == task.array_seq
                    && *share == job.spec.resources
                    && self.nodes.get(node).is_some_and(|n| n.can_run(&job.spec))
            };
            let settled = job.current_attempt().is_none_or(Attempt::is_settled);
            let Some(at) = leaders
                .iter()
                .position(fits)
                .filter(|_| settled && may_follow(job))
            else {
                break;
            };
            let (node, slot, ..) = leaders.swap_remove(at);
            bookings.push((
                scheduler::Placement {
                    job_id: job.id.to_string(),
                    nodes: vec![node],
                },
                slot,
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
            self.quick_arrays.insert(array_seq);
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
