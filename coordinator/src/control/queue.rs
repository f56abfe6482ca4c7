//! The queue, by cluster, with what the autoscaler needs kept up to date as jobs
//! come and go: a decision pass costs what changed, not how many jobs wait.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use crate::model::Job;

/// Queued jobs of one cluster, oldest first, and their totals.
#[derive(Debug, Default)]
pub(super) struct ClusterQueue {
    /// Sequence numbers (a job's id is `job-<seq>`).
    jobs: BTreeSet<u64>,
    /// Instances the queued jobs want, in all.
    instances: u64,
    /// Jobs by instance count: the widest gang is the last key.
    widths: BTreeMap<u32, u32>,
}

impl ClusterQueue {
    /// Sequence numbers, oldest first.
    pub(super) fn seqs(&self) -> impl Iterator<Item = u64> {
        self.jobs.iter().copied()
    }

    /// Jobs queued before `seq`.
    pub(super) fn ahead_of(&self, seq: u64) -> usize {
        self.jobs.range(..seq).count()
    }

    /// (instances wanted in all, the widest gang).
    pub(super) fn waiting(&self) -> (u64, u32) {
        let widest = self.widths.keys().next_back().copied().unwrap_or(0);
        (self.instances, widest)
    }
}

#[derive(Debug, Default)]
pub(super) struct Queue {
    clusters: HashMap<String, ClusterQueue>,
    len: usize,
}

impl Queue {
    /// Queues a job (again); a job already queued stays as it is.
    pub(super) fn push(&mut self, job: &Job) {
        let queue = self
            .clusters
            .entry(job.spec.cluster.to_string())
            .or_default();
        if queue.jobs.insert(job.seq) {
            let width = job.spec.instance_count;
            queue.instances += u64::from(width);
            *queue.widths.entry(width).or_default() += 1;
            self.len += 1;
        }
    }

    /// Takes a job off the queue, if it is on it.
    pub(super) fn remove(&mut self, job: &Job) {
        let Some(queue) = self.clusters.get_mut(job.spec.cluster.as_str()) else {
            return;
        };
        if !queue.jobs.remove(&job.seq) {
            return;
        }
        let width = job.spec.instance_count;
        queue.instances -= u64::from(width);
        if let Some(count) = queue.widths.get_mut(&width) {
            *count -= 1;
            if *count == 0 {
                queue.widths.remove(&width);
            }
        }
        self.len -= 1;
        if queue.jobs.is_empty() {
            self.clusters.remove(job.spec.cluster.as_str());
        }
    }

    pub(super) fn cluster(&self, name: &str) -> Option<&ClusterQueue> {
        self.clusters.get(name)
    }

    pub(super) fn len(&self) -> usize {
        self.len
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::JobBuilder;
    use proptest::prelude::*;

    proptest! {
        /// The kept totals are always what a walk over the queue would count.
        #[test]
        fn totals_match_a_walk(ops in proptest::collection::vec((0u64..40, 1u32..5, any::<bool>(), 0usize..3), 1..200)) {
            let clusters = ["a", "b", "c"];
            let mut queue = Queue::default();
            let mut model: BTreeMap<u64, (String, u32)> = BTreeMap::new();
            for (seq, width, push, cluster) in ops {
                // One job per seq, whatever the op: its cluster and width are fixed.
                let (cluster, width) = model
                    .get(&seq)
                    .cloned()
                    .unwrap_or((clusters[cluster].to_string(), width));
                let mut job = JobBuilder::new(&format!("job-{seq}")).cluster(&cluster).instances(width).build();
                job.seq = seq;
                if push {
                    queue.push(&job);
                    model.insert(seq, (cluster, width));
                } else {
                    queue.remove(&job);
                    model.remove(&seq);
                }
            }
            prop_assert_eq!(queue.len(), model.len());
            for name in clusters {
                let mine: Vec<(&u64, &(String, u32))> = model.iter().filter(|(_, (c, _))| c == name).collect();
                let instances: u64 = mine.iter().map(|(_, (_, w))| u64::from(*w)).sum();
                let widest = mine.iter().map(|(_, (_, w))| *w).max().unwrap_or(0);
                let got = queue.cluster(name).map_or((0, 0), ClusterQueue::waiting);
                prop_assert_eq!(got, (instances, widest));
                let seqs: Vec<u64> = queue.cluster(name).map_or(Vec::new(), |q| q.seqs().collect());
                let want: Vec<u64> = mine.iter().map(|(s, _)| **s).collect();
                prop_assert_eq!(seqs, want);
            }
        }
    }
}
