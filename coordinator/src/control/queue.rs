//! The queue, by cluster, with what the autoscaler needs kept up to date as jobs
//! come and go: a decision pass costs what changed, not how many jobs wait.

use std::collections::{BTreeSet, HashMap};

use crate::model::Job;
use crate::scheduler::Shape;
use crate::vmsize::VmSize;

/// Queued jobs of one cluster, oldest first, and their totals.
#[derive(Debug, Default)]
pub(super) struct ClusterQueue {
    /// Sequence numbers (a job's id is `job-<seq>`).
    jobs: BTreeSet<u64>,
    /// Jobs by shape (what each asks of each node): few, however many jobs.
    shapes: HashMap<Shape, u64>,
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

    /// Distinct shapes of the queued jobs.
    pub(super) fn shapes(&self) -> usize {
        self.shapes.len()
    }

    /// (instances wanted in all, the widest gang).
    pub(super) fn waiting(&self) -> (u64, u32) {
        let instances = self
            .shapes
            .iter()
            .map(|(shape, count)| u64::from(shape.width) * count)
            .sum();
        let widest = self.shapes.keys().map(|s| s.width).max().unwrap_or(0);
        (instances, widest)
    }

    /// Nodes of `size` that what waits would fill: one per whole-node
    /// instance, and the shares packed by cores, memory and GPUs (whichever
    /// needs most), never fewer than the widest gang.
    pub(super) fn nodes_wanted(&self, size: &VmSize) -> u64 {
        let (mut whole, mut millicpus, mut memory, mut gpus, mut widest) =
            (0u64, 0u64, 0u64, 0u64, 0u64);
        for (shape, count) in &self.shapes {
            let instances = u64::from(shape.width) * count;
            widest = widest.max(u64::from(shape.width));
            if shape.share.is_whole() {
                whole += instances;
            } else {
                millicpus += u64::from(shape.share.millicpus) * instances;
                memory += shape.share.memory_bytes() * instances;
                gpus += u64::from(shape.gpus) * instances;
            }
        }
        let per = |wanted: u64, each: u64| if each == 0 { 0 } else { wanted.div_ceil(each) };
        let shared = per(millicpus, u64::from(size.cores) * 1000)
            .max(per(memory, size.memory_bytes()))
            .max(per(gpus, u64::from(size.gpus)));
        (whole + shared).max(widest)
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
            *queue.shapes.entry(Shape::of(job)).or_default() += 1;
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
        let shape = Shape::of(job);
        if let Some(count) = queue.shapes.get_mut(&shape) {
            *count -= 1;
            if *count == 0 {
                queue.shapes.remove(&shape);
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
    use std::collections::BTreeMap;

    #[test]
    fn nodes_wanted_packs_shares_and_counts_whole_nodes() {
        let size = VmSize {
            name: "s".into(),
            cores: 4,
            memory_gib: 16.0,
            gpus: 0,
            gpu_model: String::new(),
            family: "f".into(),
        };
        let mut queue = Queue::default();
        let mut seq = 0;
        let mut push = |queue: &mut Queue, cpus: f64, memory: u64, width: u32| {
            seq += 1;
            let mut job = JobBuilder::new(&format!("job-{seq}"))
                .instances(width)
                .build();
            job.seq = seq;
            job.spec.resources = crate::model::Resources::share(cpus, memory).expect("a share");
            queue.push(&job);
        };
        // Nine one-cpu instances fill two 4-core nodes and a quarter of a third.
        for _ in 0..9 {
            push(&mut queue, 1.0, 0, 1);
        }
        assert_eq!(queue.cluster("c").expect("queued").nodes_wanted(&size), 3);
        // Memory decides when it is what runs out first: 3 × 8 GiB on 16 GiB nodes.
        for _ in 0..3 {
            push(&mut queue, 0.5, 8 << 30, 1);
        }
        assert_eq!(queue.cluster("c").expect("queued").nodes_wanted(&size), 3);
        // A whole-node gang of 4 adds four nodes.
        push(&mut queue, 0.0, 0, 4);
        assert_eq!(queue.cluster("c").expect("queued").nodes_wanted(&size), 7);
        assert_eq!(queue.cluster("c").expect("queued").shapes(), 3);
    }

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
