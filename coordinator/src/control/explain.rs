//! `shoal job why`: every fact the scheduler and autoscaler used.

use super::*;

impl Control {
    /// Why a job is where it is: every fact the scheduler and autoscaler used.
    pub(super) fn explain(&self, job_id: &str, now: Millis) -> Result<Vec<String>> {
        let job = self.job(job_id)?;
        let mut lines = vec![format!("{} is {}", job.id, job.status.as_str())];
        if let Some(state) = job.array.as_deref() {
            // An array runs nothing itself: its tasks do, each a job of its own.
            lines.push(format!("array {}: {}", state.spec, state.summary()));
            if state.released < state.spec.count() {
                lines.push(format!(
                    "{} task(s) held back: at most {} run at once",
                    state.spec.count() - state.released,
                    state.spec.max_concurrent
                ));
            }
            lines.push(format!(
                "a task's own story: `shoal job why {} --task K`",
                job.id
            ));
            return Ok(lines);
        }
        let reason = match job.status {
            JobStatus::Queued => self.queued_reason(job),
            _ => None,
        }
        .unwrap_or_else(|| job.reason.to_string());
        if !reason.is_empty() {
            lines.push(format!("reason: {reason}"));
        }
        if let Some(attempt) = job.current_attempt() {
            let stopping: Vec<String> = attempt
                .instances
                .iter()
                .filter(|i| i.status == InstanceStatus::Stopping)
                .map(|i| format!("instance {} on {}", i.index, i.node))
                .collect();
            if !stopping.is_empty() {
                lines.push(format!(
                    "waits for {} to stop: {}",
                    if stopping.len() == 1 {
                        "an instance"
                    } else {
                        "instances"
                    },
                    stopping.join(", ")
                ));
            }
        }
        let attempts = job.attempts.len();
        if attempts > 0 {
            let lost = job.attempts.iter().filter(|a| a.was_lost()).count();
            lines.push(format!(
                "attempts: {attempts} ({lost} lost, {} preemptions of at most {})",
                job.preemptions, job.spec.max_preemptions
            ));
        }
        let Ok(info) = self.cluster_info(&job.spec.cluster) else {
            lines.push(format!("cluster `{}` no longer exists", job.spec.cluster));
            return Ok(lines);
        };
        let spec = &info.cluster.spec;
        let counts = &info.counts;
        lines.push(format!(
            "cluster {}: {} {}, {} node(s) now (idle {}, running {}, preparing {}, leaving {}, preempted {}, unusable {}), target {}, min {}, max {}",
            spec.name, spec.vm_size, spec.vm_priority.as_str(), info.current_node_count, counts.idle, counts.running,
            counts.preparing, counts.leaving, counts.preempted, counts.unusable, info.target_node_count, spec.min_nodes, spec.max_nodes
        ));
        if job.status == JobStatus::Queued {
            // What the scheduler itself would say of it.
            let nodes: Vec<&Node> = self
                .nodes
                .values()
                .filter(|n| n.cluster == spec.name)
                .collect();
            lines.push(scheduler::fit(job, &nodes).describe());
            let ahead = self
                .queue
                .cluster(&spec.name)
                .map_or(0, |q| q.ahead_of(job.seq));
            lines.push(format!("queue: {ahead} job(s) of this cluster ahead of it"));
            if let Some(current) = job.current_attempt()
                && !current.is_settled()
            {
                lines.push(format!(
                    "waits for attempt {} to finish stopping",
                    current.id
                ));
            }
        }
        lines.push(format!(
            "lock: {}",
            info.cluster.lock.map_or("none", LockKind::as_str)
        ));
        if let Some(size) = self.config.catalog.get(&spec.vm_size) {
            let report = self.quota_report();
            let scope = match spec.vm_priority {
                Priority::Dedicated => format!("family {}", size.family),
                Priority::LowPriority => "low-priority".to_string(),
            };
            for (name, limit, used) in report
                .lines
                .iter()
                .filter(|(n, _, _)| *n == scope || n == "total")
            {
                lines.push(format!(
                    "quota {name}: {used}/{limit} cores used; a node needs {}",
                    size.cores
                ));
            }
        }
        if let Some(block) = self.blocked.get(&spec.name) {
            lines.push(format!("autoscaler: blocked: {block}"));
        }
        if let Some(backoff) = self.create_backoff.get(&spec.name)
            && now < backoff.until
        {
            lines.push(format!(
                "autoscaler: {} node(s) failed to start in a row; next try in {} s (the last: {})",
                backoff.failures,
                (backoff.until - now) / 1000 + 1,
                backoff.last
            ));
        }
        for error in &info.cluster.errors {
            lines.push(format!("cluster error: {error}"));
        }
        Ok(lines)
    }
}
