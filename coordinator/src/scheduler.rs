//! Placement: a pure function from queued jobs and nodes to placements. Each
//! instance gets a node of its own; a job is placed whole (a gang) or not at all.

use std::collections::HashMap;

use crate::model::{Job, Node};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placement {
    pub job_id: String,
    /// Node of instance 0, 1, ... in order.
    pub nodes: Vec<String>,
}

/// Whether a job's gang fits on the free nodes of its cluster now, and if not,
/// why: what `place` acts on and what `shoal job why` says, from one function.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fit {
    Fits,
    /// Fewer free nodes than instances.
    TooFewFree {
        wanted: u32,
        free: u32,
    },
    /// Free nodes enough, but too few of them with the GPUs each instance needs.
    TooFewWithGpus {
        wanted: u32,
        free: u32,
        with_gpus: u32,
        gpus: u32,
    },
}

impl Fit {
    /// In words, for `job why`.
    pub fn describe(&self) -> String {
        let gang = |wanted: u32| {
            if wanted > 1 {
                format!(" at once (a gang of {wanted})")
            } else {
                String::new()
            }
        };
        match *self {
            Fit::Fits => "fits on the free nodes now: placed on the next pass".into(),
            Fit::TooFewFree { wanted, free } => {
                format!(
                    "needs {wanted} free node(s){}; {free} free now",
                    gang(wanted)
                )
            }
            Fit::TooFewWithGpus {
                wanted,
                free,
                with_gpus,
                gpus,
            } => format!(
                "needs {wanted} free node(s) with {gpus} GPU(s) each{}; {free} free now, {with_gpus} of them with enough GPUs",
                gang(wanted)
            ),
        }
    }
}

/// Does `job` fit on `free` (free nodes of its cluster)?
pub fn fit(job: &Job, free: &[&Node]) -> Fit {
    let wanted = job.spec.instance_count;
    let count = free.len() as u32;
    if count < wanted {
        return Fit::TooFewFree {
            wanted,
            free: count,
        };
    }
    // GPUs are a hard requirement; the runtime is a preference.
    let with_gpus = free.iter().filter(|n| n.has_gpus_for(&job.spec)).count() as u32;
    if with_gpus < wanted {
        return Fit::TooFewWithGpus {
            wanted,
            free: count,
            with_gpus,
            gpus: job.spec.gpus_per_instance,
        };
    }
    Fit::Fits
}

/// Places `queued` (oldest first) on free nodes of their own cluster, preferring
/// nodes that have the job's runtime.
///
/// A job that does not fit is skipped, and later jobs may still use the free nodes
/// (backfill); the autoscaler sizes the cluster for everything that waits.
pub fn place<'a>(queued: impl IntoIterator<Item = &'a Job>, nodes: &[&Node]) -> Vec<Placement> {
    let mut free: HashMap<&str, Vec<&Node>> = HashMap::new();
    for node in nodes.iter().filter(|n| n.is_free()) {
        free.entry(node.cluster.as_str()).or_default().push(node);
    }
    // Most recently busy last, so `pop` reuses warm nodes and the longest-idle ones
    // can reach their scale-down time.
    for list in free.values_mut() {
        list.sort_by(|a, b| a.state_since.cmp(&b.state_since).then(a.id.cmp(&b.id)));
    }
    let mut placements = Vec::new();
    for job in queued {
        // Nothing is free any more: what waits behind stays queued unread.
        if free.values().all(Vec::is_empty) {
            break;
        }
        let Some(list) = free.get_mut(job.spec.cluster.as_str()) else {
            continue;
        };
        let wanted = job.spec.instance_count as usize;
        if fit(job, list) != Fit::Fits {
            continue;
        }
        // The warmest nodes that have the job's runtime first; then others, whose
        // agent fails the job with the reason rather than leave it waiting forever.
        let mut chosen = Vec::with_capacity(wanted);
        for capable in [true, false] {
            let mut index = list.len();
            while chosen.len() < wanted && index > 0 {
                index -= 1;
                let node = &list[index];
                if node.has_gpus_for(&job.spec) && node.can_run(&job.spec) == capable {
                    chosen.push(list.remove(index).id.clone());
                }
            }
        }
        placements.push(Placement {
            job_id: job.id.to_string(),
            nodes: chosen,
        });
    }
    placements
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::NodeState;
    use crate::testing::{JobBuilder, NodeBuilder};
    use std::collections::HashSet;

    #[test]
    fn instances_go_to_distinct_nodes() {
        let nodes = [
            NodeBuilder::new("n1").build(),
            NodeBuilder::new("n2").build(),
            NodeBuilder::new("n3").build(),
        ];
        let node_refs: Vec<&Node> = nodes.iter().collect();
        let job = JobBuilder::new("job-1").instances(3).build();
        let placements = place([&job], &node_refs);
        assert_eq!(placements.len(), 1);
        let distinct: HashSet<&String> = placements[0].nodes.iter().collect();
        assert_eq!(distinct.len(), 3);
    }

    #[test]
    fn a_gang_is_placed_whole_or_not_at_all() {
        let nodes = [
            NodeBuilder::new("n1").build(),
            NodeBuilder::new("n2").build(),
        ];
        let node_refs: Vec<&Node> = nodes.iter().collect();
        let wide = JobBuilder::new("job-1").instances(3).build();
        let narrow = JobBuilder::new("job-2").instances(2).build();
        let placements = place([&wide, &narrow], &node_refs);
        assert_eq!(placements.len(), 1, "{placements:?}");
        assert_eq!(placements[0].job_id, "job-2");
    }

    #[test]
    fn busy_preparing_and_other_cluster_nodes_are_not_used() {
        let nodes = [
            NodeBuilder::new("busy").state(NodeState::Running).build(),
            NodeBuilder::new("warming")
                .state(NodeState::Preparing)
                .build(),
            NodeBuilder::new("elsewhere").cluster("other").build(),
            NodeBuilder::new("gone").disconnected().build(),
        ];
        let node_refs: Vec<&Node> = nodes.iter().collect();
        let job = JobBuilder::new("job-1").build();
        assert!(place([&job], &node_refs).is_empty());
    }

    #[test]
    fn container_jobs_go_to_nodes_with_docker_first() {
        let mut docker = NodeBuilder::new("docker").idle_since(1).build();
        docker.runtimes.push("docker".into());
        let nodes = [docker, NodeBuilder::new("plain").idle_since(9).build()];
        let node_refs: Vec<&Node> = nodes.iter().collect();
        let mut boxed = JobBuilder::new("job-1").build();
        boxed.spec.image = Some("shoal/base".into());
        let plain = JobBuilder::new("job-2").build();
        let placements = place([&boxed, &plain], &node_refs);
        assert_eq!(placements[0].nodes, vec!["docker".to_string()]);
        assert_eq!(placements[1].nodes, vec!["plain".to_string()]);
        // With no docker node at all, the job still goes out (and fails with why).
        let plain_only = [NodeBuilder::new("plain").build()];
        let refs: Vec<&Node> = plain_only.iter().collect();
        assert_eq!(place([&boxed], &refs)[0].nodes, vec!["plain".to_string()]);
    }

    #[test]
    fn two_gangs_on_room_for_one_take_turns_without_deadlock() {
        let mut nodes = vec![
            NodeBuilder::new("n1").build(),
            NodeBuilder::new("n2").build(),
        ];
        let first = JobBuilder::new("job-1").instances(2).build();
        let second = JobBuilder::new("job-2").instances(2).build();
        let refs: Vec<&Node> = nodes.iter().collect();
        let round1 = place([&first, &second], &refs);
        assert_eq!(round1.len(), 1);
        assert_eq!(
            round1[0].job_id, "job-1",
            "the older gang goes first, whole"
        );
        // While job-1 runs, job-2 holds nothing and waits.
        for node in &mut nodes {
            node.state = NodeState::Running;
        }
        let refs: Vec<&Node> = nodes.iter().collect();
        assert!(place([&second], &refs).is_empty());
        // job-1 ends: job-2 gets both nodes.
        for node in &mut nodes {
            node.state = NodeState::Idle;
        }
        let refs: Vec<&Node> = nodes.iter().collect();
        let round3 = place([&second], &refs);
        assert_eq!(round3[0].nodes.len(), 2);
    }

    #[test]
    fn gpu_jobs_go_only_to_nodes_with_enough_gpus() {
        let gpu = |index| crate::model::GpuStat {
            index,
            ..Default::default()
        };
        let mut two = NodeBuilder::new("two-gpus").build();
        two.gpus = vec![gpu(0), gpu(1)];
        let mut one = NodeBuilder::new("one-gpu").idle_since(9).build();
        one.gpus = vec![gpu(0)];
        let nodes = [
            two,
            one,
            NodeBuilder::new("cpu-only").idle_since(10).build(),
        ];
        let refs: Vec<&Node> = nodes.iter().collect();
        let mut wants_two = JobBuilder::new("job-1").build();
        wants_two.spec.gpus_per_instance = 2;
        let mut wants_three = JobBuilder::new("job-2").build();
        wants_three.spec.gpus_per_instance = 3;
        let placements = place([&wants_three, &wants_two], &refs);
        assert_eq!(placements.len(), 1, "{placements:?}");
        assert_eq!(placements[0].nodes, vec!["two-gpus".to_string()]);
    }

    #[test]
    fn what_does_not_fit_says_why_in_the_schedulers_own_terms() {
        let mut one_gpu = NodeBuilder::new("g").build();
        one_gpu.gpus = vec![crate::model::GpuStat::default()];
        let plain = NodeBuilder::new("p").build();
        let free = [&one_gpu, &plain];
        let mut gang = JobBuilder::new("job-1").instances(2).build();
        gang.spec.gpus_per_instance = 1;
        let verdict = fit(&gang, &free);
        assert_eq!(
            verdict,
            Fit::TooFewWithGpus {
                wanted: 2,
                free: 2,
                with_gpus: 1,
                gpus: 1
            }
        );
        assert_eq!(
            verdict.describe(),
            "needs 2 free node(s) with 1 GPU(s) each at once (a gang of 2); 2 free now, 1 of them with enough GPUs"
        );
        // What `fit` refuses, `place` does not place; what it accepts, it does.
        assert!(place([&gang], &free).is_empty());
        let wide = JobBuilder::new("job-2").instances(3).build();
        assert_eq!(fit(&wide, &free), Fit::TooFewFree { wanted: 3, free: 2 });
        let narrow = JobBuilder::new("job-3").instances(2).build();
        assert_eq!(fit(&narrow, &free), Fit::Fits);
        assert_eq!(place([&narrow], &free).len(), 1);
    }

    #[test]
    fn warm_nodes_are_reused_first() {
        let nodes = [
            NodeBuilder::new("old").idle_since(1_000).build(),
            NodeBuilder::new("warm").idle_since(9_000).build(),
        ];
        let node_refs: Vec<&Node> = nodes.iter().collect();
        let job = JobBuilder::new("job-1").build();
        assert_eq!(place([&job], &node_refs)[0].nodes, vec!["warm".to_string()]);
    }

    proptest::proptest! {
        /// However jobs and nodes are mixed, no node is given twice and every
        /// placement is whole.
        #[test]
        fn never_double_books_and_places_gangs_whole(
            free in 0usize..12,
            widths in proptest::collection::vec(1u32..5, 0..10),
        ) {
            let nodes: Vec<Node> = (0..free).map(|i| NodeBuilder::new(&format!("n{i}")).build()).collect();
            let node_refs: Vec<&Node> = nodes.iter().collect();
            let jobs: Vec<Job> = widths
                .iter()
                .enumerate()
                .map(|(i, w)| JobBuilder::new(&format!("job-{i}")).instances(*w).build())
                .collect();
            let placements = place(jobs.iter(), &node_refs);
            let mut used = HashSet::new();
            for p in &placements {
                let job = jobs.iter().find(|j| j.id == p.job_id).expect("placed job exists");
                proptest::prop_assert_eq!(p.nodes.len(), job.spec.instance_count as usize);
                for node in &p.nodes {
                    proptest::prop_assert!(used.insert(node.clone()), "node {} used twice", node);
                }
            }
            // Nothing that fits in what is left was skipped.
            let left = free - used.len();
            for job in &jobs {
                if placements.iter().all(|p| p.job_id != job.id) {
                    proptest::prop_assert!(job.spec.instance_count as usize > left);
                }
            }
        }
    }
}
