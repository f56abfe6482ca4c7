//! What must hold after every step of the control core, whatever happened: the
//! simulator checks it after each one (`crate::sim`).

use super::*;

impl Control {
    /// Every broken invariant, described; empty when all hold.
    pub fn invariant_violations(&self) -> Vec<String> {
        let mut broken = Vec::new();
        // Each instance a node runs is placed on it, and on no other node.
        let mut running_on: HashMap<&Slot, &str> = HashMap::new();
        // Successors hold nothing until the instance each follows ends: each
        // follows another booked on its node, in a chain that starts at one
        // that holds its share, and none has two followers.
        let mut successors: HashSet<&Slot> = HashSet::new();
        for node in self.nodes.values() {
            for booked in node.running.iter().filter(|b| b.after.is_some()) {
                successors.insert(&booked.slot);
                let after = booked.after.as_ref().expect("a successor");
                let behind = node.chain_behind(&booked.slot);
                // More links walked than there are successors: a loop.
                let leads =
                    behind <= node.waiting() && node.running.iter().any(|b| &b.slot == after);
                let followers = node
                    .running
                    .iter()
                    .filter(|b| b.after.as_ref() == Some(after))
                    .count();
                let started = self
                    .instance(&booked.slot)
                    .is_some_and(|(_, i)| i.status == InstanceStatus::Running);
                if !leads || followers > 1 || started {
                    broken.push(format!(
                        "node {}: {}/{} follows {}/{}, which it does not run first ({followers} follow it; started: {started})",
                        node.id, booked.slot.attempt_id, booked.slot.instance, after.attempt_id, after.instance
                    ));
                }
            }
            for Booked { slot, .. } in &node.running {
                if let Some(other) = running_on.insert(slot, &node.id) {
                    broken.push(format!(
                        "{}/{} runs on two nodes: {other} and {}",
                        slot.attempt_id, slot.instance, node.id
                    ));
                }
                match self.instance(slot) {
                    Some((_, instance)) if instance.node == node.id => {}
                    Some((_, instance)) => broken.push(format!(
                        "node {} runs {}/{}, placed on {}",
                        node.id, slot.attempt_id, slot.instance, instance.node
                    )),
                    None => broken.push(format!(
                        "node {} runs {}/{}, which is unknown",
                        node.id, slot.attempt_id, slot.instance
                    )),
                }
            }
        }
        // No node is booked over: a whole-node instance alone, shares within
        // its cores, memory and GPUs; and no GPU of a node is held by two.
        let mut booked: HashMap<&str, Vec<(String, Resources, u32)>> = HashMap::new();
        let mut gpus_held: HashMap<(&str, u32), Vec<String>> = HashMap::new();
        for job in self.jobs.values() {
            for attempt in &job.attempts {
                // Gangs are whole: every instance, each on a node of its own.
                let nodes: BTreeSet<&str> =
                    attempt.instances.iter().map(|i| i.node.as_str()).collect();
                if attempt.instances.len() != job.spec.instance_count as usize
                    || nodes.len() != attempt.instances.len()
                {
                    broken.push(format!(
                        "attempt {} has {} instances on {} nodes; the job wants {}",
                        attempt.id,
                        attempt.instances.len(),
                        nodes.len(),
                        job.spec.instance_count
                    ));
                }
                for instance in attempt.instances.iter().filter(|i| !i.status.is_final()) {
                    let slot = Slot {
                        attempt_id: attempt.id.clone(),
                        instance: instance.index,
                    };
                    if successors.contains(&slot) {
                        continue;
                    }
                    booked.entry(instance.node.as_str()).or_default().push((
                        format!("{}/{}", attempt.id, instance.index),
                        job.spec.resources,
                        job.spec.gpus_per_instance,
                    ));
                    for gpu in &instance.gpus {
                        gpus_held
                            .entry((instance.node.as_str(), *gpu))
                            .or_default()
                            .push(format!("{}/{}", attempt.id, instance.index));
                    }
                    // Once started it holds the GPUs it asked for (its agent
                    // says which), and they are its node's.
                    let node_gpus = self.nodes.get(&instance.node).map(|n| n.gpus.len());
                    let started = instance.status == InstanceStatus::Running;
                    if started && instance.gpus.len() != job.spec.gpus_per_instance as usize
                        || node_gpus
                            .is_some_and(|count| instance.gpus.iter().any(|g| *g as usize >= count))
                    {
                        broken.push(format!(
                            "{}/{} on {} holds GPUs {:?}, wanting {} of the node's {:?}",
                            attempt.id,
                            instance.index,
                            instance.node,
                            instance.gpus,
                            job.spec.gpus_per_instance,
                            node_gpus
                        ));
                    }
                }
            }
        }
        for ((node, gpu), slots) in gpus_held {
            if slots.len() > 1 {
                broken.push(format!(
                    "GPU {gpu} of node {node} is held by {}",
                    slots.join(", ")
                ));
            }
        }
        for (node, held) in booked {
            let names = || {
                held.iter()
                    .map(|(name, share, _)| format!("{name} ({share})"))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            let whole = held.iter().any(|(_, share, _)| share.is_whole());
            if whole && held.len() > 1 {
                broken.push(format!("node {node} is booked by {}", names()));
                continue;
            }
            let Some(node) = self.nodes.get(node) else {
                continue;
            };
            let cpus: u64 = held.iter().map(|(_, s, _)| u64::from(s.millicpus)).sum();
            let memory: u64 = held.iter().map(|(_, s, _)| s.memory_bytes()).sum();
            let gpus: u32 = held.iter().map(|(_, _, g)| g).sum();
            if !whole
                && (cpus > u64::from(node.cores) * 1000
                    || memory > node.memory_bytes
                    || (gpus > 0 && gpus as usize > node.gpus.len()))
            {
                broken.push(format!(
                    "node {} ({} cores, {}, {} GPUs) is booked over by {}",
                    node.id,
                    node.cores,
                    human_bytes(node.memory_bytes),
                    node.gpus.len(),
                    names()
                ));
            }
        }
        // Quotas are never exceeded.
        for (scope, limit, used) in self.quota_report().lines {
            if used > limit {
                // Which nodes hold the cores, by cluster and state.
                let mut holders: BTreeMap<(String, &str, u32), u32> = BTreeMap::new();
                for node in self.nodes.values() {
                    *holders
                        .entry((node.cluster.clone(), node.state.as_str(), node.cores))
                        .or_default() += 1;
                }
                let holders: Vec<String> = holders
                    .iter()
                    .map(|((cluster, state, cores), count)| {
                        format!("{cluster} {state} {count}×{cores}")
                    })
                    .collect();
                broken.push(format!(
                    "quota {scope}: {used} cores used of {limit} ({})",
                    holders.join(", ")
                ));
            }
        }
        // The queue holds exactly the queued jobs (not an array's own record,
        // nor the tasks it holds back).
        let queued = self
            .jobs
            .values()
            .filter(|j| j.status == JobStatus::Queued && !j.is_record() && !self.is_held(j))
            .count();
        if queued != self.queue.len() {
            broken.push(format!(
                "{queued} jobs are queued but the queue holds {}",
                self.queue.len()
            ));
        }
        // An array's counts are its tasks' statuses (those still in memory:
        // every task that has not ended is).
        for job in self.jobs.values() {
            let Some(state) = job.array.as_deref() else {
                continue;
            };
            let mut live: BTreeMap<JobStatus, u32> = BTreeMap::new();
            for position in 0..state.spec.count() {
                let seq = Task::seq(job.seq, position);
                if let Some(task) = self.jobs.by_seq(seq)
                    && !task.status.is_final()
                {
                    *live.entry(task.status).or_default() += 1;
                }
            }
            let counted: BTreeMap<JobStatus, u32> = state
                .counts
                .iter()
                .filter(|(s, _)| !s.is_final())
                .map(|(s, n)| (*s, *n))
                .collect();
            if live != counted {
                broken.push(format!(
                    "array {} counts {counted:?} of its live tasks, which are {live:?}",
                    job.id
                ));
            }
        }
        broken
    }

    /// A job's status, if it is held in memory.
    pub fn job_status(&self, id: &str) -> Option<JobStatus> {
        self.jobs.get(id).map(|j| j.status)
    }

    /// Nodes of a cluster that count toward its size.
    pub fn allocated_nodes(&self, cluster: &str) -> u32 {
        self.nodes
            .values()
            .filter(|n| n.cluster == cluster && n.is_allocated())
            .count() as u32
    }
}
