//! Placement: a pure function from queued jobs and nodes to placements. An
//! instance asks for a share of a node (cores, memory, GPUs) or the whole node;
//! shares are packed onto nodes, never over; a job is placed whole (a gang) or
//! not at all, each of its instances on a node of its own.

use std::collections::{HashMap, HashSet};

use crate::model::{Job, Node, Resources, Room, cpus_words, human_bytes};

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Placement {
    pub job_id: String,
    /// Node of instance 0, 1, ... in order.
    pub nodes: Vec<String>,
}

/// What a job asks of each node it is placed on: jobs of one shape fit, or do
/// not, alike.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Shape {
    pub share: Resources,
    pub gpus: u32,
    /// Instances, each on a node of its own.
    pub width: u32,
}

impl Shape {
    pub fn of(job: &Job) -> Self {
        Shape {
            share: job.spec.resources,
            gpus: job.spec.gpus_per_instance,
            width: job.spec.instance_count,
        }
    }
}

/// Whether a job's gang fits on the open nodes of its cluster now, and if not,
/// why: what `place` acts on and what `shoal job why` says, from one function.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Fit {
    Fits,
    /// Fewer free nodes than instances (each wants a whole node).
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
    /// Each instance asks for a share: too few nodes have that much left.
    TooFewWithRoom {
        wanted: u32,
        share: Resources,
        gpus: u32,
        /// The open nodes and what each has left.
        rooms: Vec<(String, Room)>,
    },
}

fn gang(wanted: u32) -> String {
    if wanted > 1 {
        format!(" at once (a gang of {wanted})")
    } else {
        String::new()
    }
}

impl Fit {
    /// In words, for `job why`.
    pub fn describe(&self) -> String {
        match self {
            Fit::Fits => "fits on the open nodes now: placed on the next pass".into(),
            Fit::TooFewFree { wanted, free } => {
                format!(
                    "needs {wanted} free node(s){}; {free} free now",
                    gang(*wanted)
                )
            }
            Fit::TooFewWithGpus {
                wanted,
                free,
                with_gpus,
                gpus,
            } => format!(
                "needs {wanted} free node(s) with {gpus} GPU(s) each{}; {free} free now, {with_gpus} of them with enough GPUs",
                gang(*wanted)
            ),
            Fit::TooFewWithRoom {
                wanted,
                share,
                gpus,
                rooms,
            } => {
                let wants_gpus = *gpus > 0;
                let gpus = if wants_gpus {
                    format!(", {gpus} GPU(s)")
                } else {
                    String::new()
                };
                let each = if *wanted > 1 {
                    format!(" on each of {wanted} nodes{}", gang(*wanted))
                } else {
                    String::new()
                };
                let nodes = if rooms.is_empty() {
                    "no node is open now".to_string()
                } else {
                    const SHOWN: usize = 8;
                    let mut said: Vec<String> = rooms
                        .iter()
                        .take(SHOWN)
                        .map(|(id, room)| format!("{id} {}", left(room, wants_gpus)))
                        .collect();
                    if rooms.len() > SHOWN {
                        said.push(format!("{} more", rooms.len() - SHOWN));
                    }
                    said.join(", ")
                };
                format!("needs {share}{gpus}{each}; {nodes}")
            }
        }
    }
}

/// What a node has left, in words: `has 1 cpu and 2 GiB free`, `is full`;
/// its free GPUs too when some are there or the job wants some.
fn left(room: &Room, gpus_wanted: bool) -> String {
    if room.is_full() {
        return "is full".into();
    }
    let cpus = cpus_words(room.millicpus);
    let memory = human_bytes(room.memory_bytes);
    if room.gpus > 0 || gpus_wanted {
        format!("has {cpus}, {memory} and {} GPU(s) free", room.gpus)
    } else {
        format!("has {cpus} and {memory} free")
    }
}

/// A node open to placement, and what it has left as this pass books it.
struct Open<'a> {
    node: &'a Node,
    room: Room,
}

/// Does `job` fit on `nodes` (its cluster's) now?
pub fn fit(job: &Job, nodes: &[&Node]) -> Fit {
    let open: Vec<Open> = nodes
        .iter()
        .filter(|n| n.is_open())
        .map(|n| Open {
            node: n,
            room: n.room(),
        })
        .collect();
    fit_open(job, &open)
}

fn fit_open(job: &Job, open: &[Open]) -> Fit {
    let wanted = job.spec.instance_count;
    let gpus = job.spec.gpus_per_instance;
    let share = job.spec.resources;
    if share.is_whole() {
        let free: Vec<&Open> = open.iter().filter(|o| o.room.empty).collect();
        let count = free.len() as u32;
        if count < wanted {
            return Fit::TooFewFree {
                wanted,
                free: count,
            };
        }
        // GPUs are a hard requirement; the runtime is a preference.
        let with_gpus = free.iter().filter(|o| o.room.gpus >= gpus).count() as u32;
        if with_gpus < wanted {
            return Fit::TooFewWithGpus {
                wanted,
                free: count,
                with_gpus,
                gpus,
            };
        }
        return Fit::Fits;
    }
    let takers = open.iter().filter(|o| o.room.takes(share, gpus)).count() as u32;
    if takers < wanted {
        return Fit::TooFewWithRoom {
            wanted,
            share,
            gpus,
            rooms: open.iter().map(|o| (o.node.id.clone(), o.room)).collect(),
        };
    }
    Fit::Fits
}

/// Places `queued` (oldest first) on the open nodes of their cluster. A whole-
/// node instance goes to the warmest free node; a share to the fullest node it
/// fits on (so idle nodes stay idle and can scale down), then the warmest free
/// one; either way nodes with the job's runtime first.
///
/// A job that does not fit is skipped, and later jobs may still use the room
/// (backfill); the autoscaler sizes the cluster for everything that waits. Jobs
/// of a shape that did not fit are not tried again this pass (rooms only
/// shrink), and once every one of the queue's `shapes` has missed, the rest
/// of the queue is not read.
pub fn place<'a>(
    queued: impl IntoIterator<Item = &'a Job>,
    nodes: &[&Node],
    shapes: usize,
) -> Vec<Placement> {
    let mut open: HashMap<&str, Vec<Open>> = HashMap::new();
    for node in nodes.iter().filter(|n| n.is_open()) {
        let room = node.room();
        if !room.is_full() {
            open.entry(node.cluster.as_str())
                .or_default()
                .push(Open { node, room });
        }
    }
    // Most recently busy last: the warmest are tried first, and the longest-idle
    // ones can reach their scale-down time.
    for list in open.values_mut() {
        list.sort_by(|a, b| {
            (a.node.state_since, &a.node.id).cmp(&(b.node.state_since, &b.node.id))
        });
    }
    let mut missed: HashSet<(&str, Shape)> = HashSet::new();
    let mut placements = Vec::new();
    for job in queued {
        // Nothing is open any more, or nothing waiting fits: the rest stays queued unread.
        if open.values().all(Vec::is_empty) || missed.len() >= shapes {
            break;
        }
        let cluster = job.spec.cluster.as_str();
        let Some(list) = open.get_mut(cluster) else {
            continue;
        };
        let shape = Shape::of(job);
        if missed.contains(&(cluster, shape)) {
            continue;
        }
        let Some(chosen) = choose(job, list) else {
            missed.insert((cluster, shape));
            continue;
        };
        let mut ids = Vec::with_capacity(chosen.len());
        for &index in &chosen {
            list[index].room.book(shape.share, shape.gpus);
            ids.push(list[index].node.id.clone());
        }
        list.retain(|o| !o.room.is_full());
        placements.push(Placement {
            job_id: job.id.to_string(),
            nodes: ids,
        });
    }
    placements
}

/// The nodes (indices into `list`) one placement of `job` takes, or None if
/// fewer than its instances have room (what `fit_open` says, without its words).
fn choose(job: &Job, list: &[Open]) -> Option<Vec<usize>> {
    let (share, gpus) = (job.spec.resources, job.spec.gpus_per_instance);
    let wanted = job.spec.instance_count as usize;
    let mut candidates: Vec<usize> = (0..list.len())
        .filter(|&i| list[i].room.takes(share, gpus))
        .collect();
    // The runtime first; then, for a share, busy nodes before free ones and the
    // fullest first; then the warmest (the list is coldest first).
    candidates.sort_by_key(|&i| {
        let o = &list[i];
        let capable = o.node.can_run(&job.spec);
        let packing = if share.is_whole() {
            (false, 0)
        } else {
            (o.room.empty, o.room.millicpus)
        };
        (!capable, packing, std::cmp::Reverse(i))
    });
    candidates.truncate(wanted);
    (candidates.len() == wanted).then_some(candidates)
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
        let placements = place([&job], &node_refs, usize::MAX);
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
        let placements = place([&wide, &narrow], &node_refs, usize::MAX);
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
        assert!(place([&job], &node_refs, usize::MAX).is_empty());
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
        let placements = place([&boxed, &plain], &node_refs, usize::MAX);
        assert_eq!(placements[0].nodes, vec!["docker".to_string()]);
        assert_eq!(placements[1].nodes, vec!["plain".to_string()]);
        // With no docker node at all, the job still goes out (and fails with why).
        let plain_only = [NodeBuilder::new("plain").build()];
        let refs: Vec<&Node> = plain_only.iter().collect();
        assert_eq!(
            place([&boxed], &refs, usize::MAX)[0].nodes,
            vec!["plain".to_string()]
        );
    }

    #[test]
    fn two_gangs_on_room_for_one_take_turns_without_deadlock() {
        let mut nodes = [
            NodeBuilder::new("n1").build(),
            NodeBuilder::new("n2").build(),
        ];
        let first = JobBuilder::new("job-1").instances(2).build();
        let second = JobBuilder::new("job-2").instances(2).build();
        let refs: Vec<&Node> = nodes.iter().collect();
        let round1 = place([&first, &second], &refs, usize::MAX);
        assert_eq!(round1.len(), 1);
        assert_eq!(
            round1[0].job_id, "job-1",
            "the older gang goes first, whole"
        );
        // While job-1 runs, job-2 holds nothing and waits.
        let slot = |instance| crate::model::Slot {
            attempt_id: "job-1.1".into(),
            instance,
        };
        for (instance, node) in nodes.iter_mut().enumerate() {
            let booked = crate::model::Booked {
                slot: slot(instance as u32),
                share: Resources::WHOLE,
                gpus: 0,
                after: None,
            };
            node.book(booked, 1);
        }
        let refs: Vec<&Node> = nodes.iter().collect();
        assert!(place([&second], &refs, usize::MAX).is_empty());
        // job-1 ends: job-2 gets both nodes.
        for (instance, node) in nodes.iter_mut().enumerate() {
            assert!(node.release(&slot(instance as u32), 2));
            assert_eq!(node.state, NodeState::Idle);
        }
        let refs: Vec<&Node> = nodes.iter().collect();
        let round3 = place([&second], &refs, usize::MAX);
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
        let placements = place([&wants_three, &wants_two], &refs, usize::MAX);
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
        assert!(place([&gang], &free, usize::MAX).is_empty());
        let wide = JobBuilder::new("job-2").instances(3).build();
        assert_eq!(fit(&wide, &free), Fit::TooFewFree { wanted: 3, free: 2 });
        let narrow = JobBuilder::new("job-3").instances(2).build();
        assert_eq!(fit(&narrow, &free), Fit::Fits);
        assert_eq!(place([&narrow], &free, usize::MAX).len(), 1);
    }

    #[test]
    fn warm_nodes_are_reused_first() {
        let nodes = [
            NodeBuilder::new("old").idle_since(1_000).build(),
            NodeBuilder::new("warm").idle_since(9_000).build(),
        ];
        let node_refs: Vec<&Node> = nodes.iter().collect();
        let job = JobBuilder::new("job-1").build();
        assert_eq!(
            place([&job], &node_refs, usize::MAX)[0].nodes,
            vec!["warm".to_string()]
        );
    }

    fn share(job: &str, cpus: f64, memory: u64) -> Job {
        let mut job = JobBuilder::new(job).build();
        job.spec.resources = Resources::share(cpus, memory).expect("a share");
        job
    }

    fn sized(id: &str, cores: u32, memory: u64) -> Node {
        let mut node = NodeBuilder::new(id).build();
        node.cores = cores;
        node.memory_bytes = memory;
        node
    }

    #[test]
    fn a_four_core_node_takes_four_one_cpu_jobs_and_the_fifth_waits() {
        let node = sized("n1", 4, 8 << 30);
        let jobs: Vec<Job> = (1..=5)
            .map(|i| share(&format!("job-{i}"), 1.0, 0))
            .collect();
        let placements = place(jobs.iter(), &[&node], 1);
        assert_eq!(placements.len(), 4, "{placements:?}");
        assert!(placements.iter().all(|p| p.nodes == vec!["n1".to_string()]));
        assert_eq!(placements[3].job_id, "job-4", "oldest first");
        // Booked, the node says so, and the fifth is told why.
        let mut node = node;
        for (i, p) in placements.iter().enumerate() {
            let slot = crate::model::Slot {
                attempt_id: format!("{}.1", p.job_id),
                instance: 0,
            };
            let booked = crate::model::Booked {
                slot,
                share: jobs[i].spec.resources,
                gpus: 0,
                after: None,
            };
            node.book(booked, 1);
        }
        assert_eq!(node.state, NodeState::Running);
        assert!(place([&jobs[4]], &[&node], 1).is_empty());
        assert_eq!(
            fit(&jobs[4], &[&node]).describe(),
            "needs 1 cpu; n1 is full"
        );
    }

    #[test]
    fn shares_pack_onto_busy_nodes_and_say_what_each_node_has_left() {
        let mut busy = sized("busy", 4, 8 << 30);
        busy.book(
            crate::model::Booked {
                slot: crate::model::Slot {
                    attempt_id: "job-9.1".into(),
                    instance: 0,
                },
                share: Resources::share(3.0, 2 << 30).expect("a share"),
                gpus: 0,
                after: None,
            },
            5,
        );
        let idle = sized("idle", 4, 8 << 30);
        let small = share("job-1", 1.0, 1 << 30);
        // The busy node has one core left: the small job packs there, and the
        // idle node stays idle (it can scale down).
        let placements = place([&small], &[&busy, &idle], 1);
        assert_eq!(placements[0].nodes, vec!["busy".to_string()]);
        // Two cpus fit only on the idle node; a whole-node job too.
        let two = share("job-2", 2.0, 0);
        assert_eq!(
            place([&two], &[&busy, &idle], 1)[0].nodes,
            vec!["idle".to_string()]
        );
        let whole = JobBuilder::new("job-3").build();
        assert_eq!(
            place([&whole], &[&busy, &idle], 1)[0].nodes,
            vec!["idle".to_string()]
        );
        // A gang of two 2-cpu instances does not fit: the words say why.
        let mut gang = share("job-4", 2.0, 4 << 30);
        gang.spec.instance_count = 2;
        assert_eq!(
            fit(&gang, &[&busy, &idle]).describe(),
            "needs 2 cpus, 4 GiB on each of 2 nodes at once (a gang of 2); busy has 1 cpu and 6 GiB free, idle has 4 cpus and 8 GiB free"
        );
    }

    #[test]
    fn a_shape_that_missed_is_not_tried_again_and_smaller_jobs_backfill() {
        let node = sized("n1", 2, 4 << 30);
        // A job wanting a GPU hears how many each node has free.
        let mut gpu = share("job-9", 1.0, 0);
        gpu.spec.gpus_per_instance = 1;
        assert_eq!(
            fit(&gpu, &[&node]).describe(),
            "needs 1 cpu, 1 GPU(s); n1 has 2 cpus, 4 GiB and 0 GPU(s) free"
        );
        let big = share("job-1", 4.0, 0);
        let big_again = share("job-2", 4.0, 0);
        let small = share("job-3", 0.5, 0);
        let placements = place([&big, &big_again, &small], &[&node], 2);
        assert_eq!(placements.len(), 1);
        assert_eq!(placements[0].job_id, "job-3");
        // Every shape missed: what waits behind is not read at all.
        let more = share("job-4", 0.5, 0);
        assert!(place([&big, &big_again, &more], &[&node], 1).is_empty());
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
            let placements = place(jobs.iter(), &node_refs, usize::MAX);
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

        /// However shares, whole-node jobs, gangs and node sizes mix, no node is
        /// booked over (a whole-node instance alone; cores, memory and GPUs
        /// within its size), gangs are whole on distinct nodes, and a job left
        /// waiting does not fit in what is left.
        #[test]
        fn packing_never_over_commits(
            sizes in proptest::collection::vec((1u32..9, 1u64..17, 0u32..3), 1..6),
            asks in proptest::collection::vec((0u32..5, 0u64..9, 0u32..3, 1u32..3), 1..16),
        ) {
            let mut nodes: Vec<Node> = sizes
                .iter()
                .enumerate()
                .map(|(i, (cores, gib, gpus))| {
                    let mut node = sized(&format!("n{i}"), *cores, gib << 30);
                    node.gpus = (0..*gpus).map(|index| crate::model::GpuStat { index, ..Default::default() }).collect();
                    node
                })
                .collect();
            let jobs: Vec<Job> = asks
                .iter()
                .enumerate()
                .map(|(i, (quarters, gib, gpus, width))| {
                    // 0 quarters and no memory: the whole node.
                    let mut job = share(&format!("job-{i}"), f64::from(*quarters) / 4.0, if *quarters == 0 { 0 } else { gib << 29 });
                    job.spec.gpus_per_instance = *gpus;
                    job.spec.instance_count = *width;
                    job
                })
                .collect();
            let shapes: HashSet<Shape> = jobs.iter().map(Shape::of).collect();
            let refs: Vec<&Node> = nodes.iter().collect();
            let placements = place(jobs.iter(), &refs, shapes.len());
            for p in &placements {
                let job = jobs.iter().find(|j| j.id == p.job_id).expect("placed job exists");
                let distinct: HashSet<&String> = p.nodes.iter().collect();
                proptest::prop_assert_eq!(distinct.len(), job.spec.instance_count as usize);
                for (instance, id) in p.nodes.iter().enumerate() {
                    let node = nodes.iter_mut().find(|n| &n.id == id).expect("a node");
                    let booked = crate::model::Booked {
                        slot: crate::model::Slot { attempt_id: format!("{}.1", job.id), instance: instance as u32 },
                        share: job.spec.resources,
                        gpus: job.spec.gpus_per_instance,
                        after: None,
                    };
                    node.book(booked, 1);
                }
            }
            for node in &nodes {
                let whole = node.running.iter().filter(|b| b.share.is_whole()).count();
                proptest::prop_assert!(whole == 0 || node.running.len() == 1, "{} holds a whole-node instance and more", node.id);
                let cpus: u32 = node.running.iter().map(|b| b.share.millicpus).sum();
                let memory: u64 = node.running.iter().map(|b| b.share.memory_bytes()).sum();
                let gpus: u32 = node.running.iter().map(|b| b.gpus).sum();
                proptest::prop_assert!(cpus <= node.cores * 1000, "{}: {} millicpus of {} cores", node.id, cpus, node.cores);
                proptest::prop_assert!(memory <= node.memory_bytes);
                proptest::prop_assert!(gpus as usize <= node.gpus.len());
            }
            let refs: Vec<&Node> = nodes.iter().collect();
            for job in &jobs {
                if placements.iter().all(|p| p.job_id != job.id) {
                    proptest::prop_assert!(fit(job, &refs) != Fit::Fits, "{} waits but fits", job.id);
                }
            }
        }
    }
}
