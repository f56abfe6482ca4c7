//! Bounded history: ended jobs stay in memory only while they are recent (the
//! store keeps them, and the API reads them from there); `shoal job delete` and
//! `job_retention_days` delete them for good, with their logs, rows and files.

use super::*;
use crate::store::{Committed, PURGE_PER_BATCH};

/// How often retention looks for jobs past their time: a tenth of the retention,
/// from a second to a minute (sooner while it finds full batches).
fn purge_every(keep: Duration) -> Millis {
    let every = (keep / 10).clamp(Duration::from_secs(1), Duration::from_secs(60));
    every.as_millis() as Millis
}

impl Control {
    /// Every job by status: the live ones held here, the ended ones counted.
    pub(super) fn job_counts(&self) -> BTreeMap<JobStatus, u64> {
        let mut counts = self.ended_counts.clone();
        for job in self.jobs.values().filter(|j| !j.status.is_final()) {
            *counts.entry(job.status).or_default() += 1;
        }
        counts
    }

    /// Ended jobs loaded at start are the first to go when memory is full.
    pub(super) fn remember_loaded(&mut self) {
        let mut ended: Vec<(Millis, String)> = self
            .jobs
            .values()
            .filter(|j| j.is_settled())
            .map(|j| (j.ended_at, j.id.to_string()))
            .collect();
        ended.sort();
        for (_, id) in ended {
            self.recent_set.insert(id.clone());
            self.recent.push_back(id);
        }
    }

    /// After a commit: jobs of the batch that are settled now join the recent
    /// ones; the oldest of those leave memory (the store has them).
    pub(super) fn forget_old_jobs(&mut self, touched: &BTreeSet<String>) {
        for id in touched {
            if self.jobs.get(id).is_some_and(Job::is_settled) && self.recent_set.insert(id.clone())
            {
                self.recent.push_back(id.clone());
            }
        }
        while self.recent.len() > self.config.recent_jobs {
            let Some(id) = self.recent.pop_front() else {
                break;
            };
            self.recent_set.remove(&id);
            if self.jobs.get(&id).is_some_and(Job::is_settled) {
                self.drop_job(&id);
            }
        }
    }

    fn drop_job(&mut self, id: &str) {
        self.jobs.remove(id);
        self.parallel.remove(id);
        self.recent_set.remove(id);
    }

    /// `shoal job delete`: only a job that has ended and stopped.
    pub(super) fn delete_job(&mut self, id: &str) -> Result<()> {
        if let Some(job) = self.jobs.get(id) {
            if !job.is_settled() {
                return Err(Error::FailedPrecondition(format!(
                    "job `{id}` is {}; cancel it first (`shoal job cancel --wait {id}`)",
                    job.status.as_str()
                )));
            }
            if job.sweep.as_deref().is_some_and(|s| s.live() > 0) {
                return Err(Error::FailedPrecondition(format!(
                    "sweep `{id}` has trials still stopping; delete it once they have ended"
                )));
            }
            self.drop_job(id);
        }
        self.delete_jobs.push(id.to_string());
        Ok(())
    }

    /// Retention: now and then, jobs that ended too long ago are deleted.
    pub(super) fn retention(&mut self, now: Millis) {
        let Some(keep) = self.config.job_retention else {
            return;
        };
        if now < self.next_purge {
            return;
        }
        self.next_purge = now + purge_every(keep);
        let keep_ms = i64::try_from(keep.as_millis()).unwrap_or(i64::MAX);
        self.purge_before = Some(now.saturating_sub(keep_ms));
    }

    /// After a commit: what it deleted leaves memory, the counts and the disk.
    pub(super) fn purged(&mut self, committed: &Committed, now: Millis) {
        if committed.purged.len() >= PURGE_PER_BATCH {
            self.next_purge = now; // more are due
        }
        for gone in &committed.purged {
            if let Some(count) = self.ended_counts.get_mut(&gone.status) {
                *count = count.saturating_sub(1);
            }
            if self.jobs.get(&gone.id).is_some_and(Job::is_settled) {
                self.drop_job(&gone.id);
            }
            debug!(job = %gone.id, "job deleted");
        }
    }
}
