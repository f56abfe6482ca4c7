//! The jobs held in memory (live ones and the recent ended ones), by their
//! sequence number. A job's id is `job-<seq>`, so the table keeps no second
//! copy of it: with 100,000 jobs queued, every byte a job costs is 100 kB.

use std::collections::HashMap;

use crate::model::Job;

/// A job's id, from its sequence number.
pub fn job_id(seq: u64) -> String {
    format!("job-{seq}")
}

/// The sequence number an id names, if it is a job id (`job-<seq>`, as
/// `job_id` writes it: no sign, no leading zeros).
pub fn job_seq(id: &str) -> Option<u64> {
    let digits = id.strip_prefix("job-")?;
    let canonical = digits == "0" || (!digits.is_empty() && !digits.starts_with('0'));
    if !canonical || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

#[derive(Debug, Default)]
pub(super) struct JobTable {
    /// Boxed: the table's spare slots then cost a pointer each, not a job.
    by_seq: HashMap<u64, Box<Job>>,
}

impl JobTable {
    // A job held under `seq` has the id `job_id(seq)` (`insert` sees to it),
    // and `job_seq` reads only that spelling: a lookup by id needs no compare.
    pub(super) fn get(&self, id: &str) -> Option<&Job> {
        self.by_seq(job_seq(id)?)
    }

    pub(super) fn get_mut(&mut self, id: &str) -> Option<&mut Job> {
        self.by_seq.get_mut(&job_seq(id)?).map(Box::as_mut)
    }

    pub(super) fn by_seq(&self, seq: u64) -> Option<&Job> {
        self.by_seq.get(&seq).map(Box::as_ref)
    }

    pub(super) fn by_seq_mut(&mut self, seq: u64) -> Option<&mut Job> {
        self.by_seq.get_mut(&seq).map(Box::as_mut)
    }

    /// Holds a job, replacing the one of the same id. A job whose id is not
    /// `job_id(seq)` is refused: it could never be found (no such job is ever
    /// made here; the store's and the tests' are checked).
    pub(super) fn insert(&mut self, job: Job) -> Result<(), String> {
        if job_seq(&job.id) != Some(job.seq) {
            return Err(format!(
                "job `{}` has sequence number {}: its id should be {}",
                job.id,
                job.seq,
                job_id(job.seq)
            ));
        }
        self.by_seq.insert(job.seq, Box::new(job));
        Ok(())
    }

    pub(super) fn remove(&mut self, id: &str) -> Option<Job> {
        self.by_seq.remove(&job_seq(id)?).map(|job| *job)
    }

    pub(super) fn values(&self) -> impl Iterator<Item = &Job> {
        self.by_seq.values().map(Box::as_ref)
    }

    pub(super) fn len(&self) -> usize {
        self.by_seq.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::JobBuilder;

    #[test]
    fn ids_and_sequence_numbers_are_one_thing() {
        for seq in [0, 1, 9, 10, 12_345, u64::MAX] {
            assert_eq!(job_seq(&job_id(seq)), Some(seq));
        }
        for not_an_id in [
            "job-", "job-01", "job-+1", "job--1", "job-1x", "jobs-1", "1", "",
        ] {
            assert_eq!(job_seq(not_an_id), None, "{not_an_id}");
        }
    }

    #[test]
    fn a_job_is_found_by_its_id_and_only_by_it() {
        let mut table = JobTable::default();
        table
            .insert(JobBuilder::new("job-7").build())
            .expect("a canonical job");
        assert_eq!(table.get("job-7").map(|j| j.seq), Some(7));
        assert!(table.get("job-07").is_none());
        assert!(table.get_mut("job-8").is_none());
        let mut odd = JobBuilder::new("job-9").build();
        odd.seq = 3;
        assert!(table.insert(odd).is_err(), "an id that is not its seq");
        assert_eq!(table.len(), 1);
        assert_eq!(table.remove("job-7").map(|j| j.id), Some("job-7".into()));
        assert_eq!(table.len(), 0);
    }
}
