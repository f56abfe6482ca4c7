//! What a sweep does next, from its trials as they stand: which ended trials'
//! results to record, which running ones to stop, which new ones to start, and
//! whether the sweep is done. Pure; `plan` is called again and again with the
//! latest view, and what it returns is applied in one commit by the core.

use serde_json::Value;

use super::stop::{Series, early_stops};
use super::{Params, SweepSpec, sample};
use crate::model::JobStatus;

/// A trial as the conductor sees it.
#[derive(Clone, Debug)]
pub struct TrialState {
    pub index: u32,
    pub params: Params,
    /// Its final status, once it has ended.
    pub ended: Option<JobStatus>,
    /// Its result has been recorded (the core has it).
    pub settled: bool,
    pub score: Option<f64>,
    /// The primary metric, report by report (from tracking).
    pub series: Vec<f64>,
}

/// An ended trial's outcome, to be recorded once.
#[derive(Clone, Debug, PartialEq)]
pub struct TrialResult {
    pub index: u32,
    /// Its primary metric's last value; None when it never logged one.
    pub score: Option<f64>,
    /// Completed without ever logging the primary metric: the trial fails with this.
    pub failure: Option<String>,
}

#[derive(Clone, Debug, PartialEq)]
pub struct End {
    pub status: JobStatus,
    pub reason: String,
    pub best: Option<u32>,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Plan {
    pub results: Vec<TrialResult>,
    pub stop: Vec<(u32, String)>,
    pub start: Vec<(u32, Params)>,
    pub end: Option<End>,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.results.is_empty()
            && self.stop.is_empty()
            && self.start.is_empty()
            && self.end.is_none()
    }
}

/// The best trial among those with a score.
pub fn best(spec: &SweepSpec, trials: &[(u32, f64)]) -> Option<(u32, f64)> {
    trials
        .iter()
        .copied()
        .filter(|(_, s)| !s.is_nan())
        .fold(None, |best, (i, s)| match best {
            Some((_, b)) if !spec.objective.goal.better(s, b) => best,
            _ => Some((i, s)),
        })
}

pub fn plan(spec: &SweepSpec, seed: u64, trials: &[TrialState], elapsed_ms: i64) -> Plan {
    let metric = &spec.objective.primary_metric;
    let mut plan = Plan::default();
    // Ended trials' results, once.
    let mut scores: Vec<(u32, f64)> = Vec::new();
    for trial in trials {
        if trial.settled {
            if let Some(score) = trial.score {
                scores.push((trial.index, score));
            }
            continue;
        }
        let Some(status) = trial.ended else {
            continue;
        };
        let last = trial.series.last().copied();
        let completed = status == JobStatus::Completed;
        let failure = (completed && last.is_none()).then(|| {
            format!("primary metric `{metric}` was never logged (log it with mlflow.log_metric(\"{metric}\", value))")
        });
        let score = last.filter(|_| completed);
        if let Some(score) = score {
            scores.push((trial.index, score));
        }
        plan.results.push(TrialResult {
            index: trial.index,
            score,
            failure,
        });
    }
    let live: Vec<&TrialState> = trials.iter().filter(|t| t.ended.is_none()).collect();
    let timed_out = spec
        .timeout_seconds
        .is_some_and(|t| elapsed_ms >= i64::try_from(t.saturating_mul(1000)).unwrap_or(i64::MAX));
    if timed_out {
        let seconds = spec.timeout_seconds.unwrap_or_default();
        for trial in &live {
            plan.stop.push((
                trial.index,
                format!("the sweep's timeout ({seconds} s) passed"),
            ));
        }
        let best = best(spec, &scores);
        plan.end = Some(End {
            status: JobStatus::TimedOut,
            reason: format!(
                "the sweep ran past its timeout ({seconds} s) after {} trials",
                trials.len()
            ),
            best: best.map(|(i, _)| i),
        });
        return plan;
    }
    if let Some(policy) = &spec.early_termination {
        let series: Vec<Series> = trials
            .iter()
            .map(|t| Series {
                index: t.index,
                values: &t.series,
                live: t.ended.is_none(),
            })
            .collect();
        plan.stop = early_stops(policy, spec.objective.goal, metric, &series);
    }
    // New trials, while there is room.
    let seed = spec.seed.unwrap_or(seed);
    let observed: Vec<(&Params, f64)> = scores
        .iter()
        .filter_map(|(i, s)| trials.get(*i as usize).map(|t| (&t.params, *s)))
        .collect();
    let mut next = trials.len() as u32;
    let mut running = live.len() as u32;
    let mut exhausted = next >= spec.max_total_trials;
    while !exhausted && running < spec.max_concurrent_trials {
        match sample(spec, seed, next, &observed) {
            Some(params) => {
                plan.start.push((next, params));
                next += 1;
                running += 1;
                exhausted = next >= spec.max_total_trials;
            }
            None => exhausted = true,
        }
    }
    if exhausted && live.is_empty() && plan.start.is_empty() {
        plan.end = Some(match best(spec, &scores) {
            Some((index, score)) => End {
                status: JobStatus::Completed,
                reason: format!(
                    "{} trials ran; the best, trial {index}, logged {metric} {score}",
                    trials.len()
                ),
                best: Some(index),
            },
            None => End {
                status: JobStatus::Failed,
                reason: if trials.iter().all(|t| t.ended != Some(JobStatus::Completed)) {
                    format!("none of the {} trials completed", trials.len())
                } else {
                    format!("no trial logged the primary metric `{metric}`")
                },
                best: None,
            },
        });
    }
    plan
}

/// A trial's values in one line: `lr=0.01 opt=adam`.
pub fn params_line(params: &Params) -> String {
    params
        .iter()
        .map(|(k, v)| match v {
            Value::String(s) => format!("{k}={s}"),
            other => format!("{k}={other}"),
        })
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sweep::{Goal, Objective, Param, Policy, Sampling, Slack};
    use serde_json::json;

    fn spec(total: u32, concurrent: u32) -> SweepSpec {
        SweepSpec {
            search_space: [(
                "x".to_string(),
                Param::Choice {
                    values: vec![json!(1), json!(2), json!(3), json!(4)],
                },
            )]
            .into(),
            sampling: Sampling::Random,
            seed: Some(1),
            objective: Objective {
                goal: Goal::Maximize,
                primary_metric: "accuracy".into(),
            },
            max_total_trials: total,
            max_concurrent_trials: concurrent,
            timeout_seconds: None,
            early_termination: None,
        }
    }

    fn trial(index: u32, ended: Option<JobStatus>, series: &[f64]) -> TrialState {
        TrialState {
            index,
            params: Params::from([("x".to_string(), json!(index + 1))]),
            ended,
            settled: false,
            score: None,
            series: series.to_vec(),
        }
    }

    #[test]
    fn starts_no_more_than_max_concurrent_and_max_total() {
        let spec = spec(5, 2);
        let plan = plan(&spec, 0, &[], 0);
        assert_eq!(
            plan.start.iter().map(|s| s.0).collect::<Vec<_>>(),
            vec![0, 1]
        );
        let running = [
            trial(0, None, &[]),
            trial(1, Some(JobStatus::Completed), &[0.5]),
        ];
        let next = super::plan(&spec, 0, &running, 0);
        assert_eq!(next.start.iter().map(|s| s.0).collect::<Vec<_>>(), vec![2]);
        assert_eq!(
            next.results,
            vec![TrialResult {
                index: 1,
                score: Some(0.5),
                failure: None
            }]
        );
        let full: Vec<TrialState> = (0..5).map(|i| trial(i, None, &[])).collect();
        assert!(super::plan(&spec, 0, &full, 0).start.is_empty());
    }

    #[test]
    fn ends_with_the_best_trial_once_all_have_ended() {
        let spec = spec(3, 3);
        let mut trials = vec![
            trial(0, Some(JobStatus::Completed), &[0.1, 0.7]),
            trial(1, Some(JobStatus::Completed), &[0.9, 0.8]),
            trial(2, Some(JobStatus::Failed), &[0.99]),
        ];
        let plan = super::plan(&spec, 0, &trials, 0);
        let end = plan.end.expect("done");
        assert_eq!((end.status, end.best), (JobStatus::Completed, Some(1)));
        // Settled results are not recorded twice.
        for t in &mut trials {
            t.settled = true;
            t.score = t
                .series
                .last()
                .copied()
                .filter(|_| t.ended == Some(JobStatus::Completed));
        }
        let again = super::plan(&spec, 0, &trials, 0);
        assert!(again.results.is_empty());
        assert_eq!(again.end.map(|e| e.best), Some(Some(1)));
    }

    #[test]
    fn a_completed_trial_without_the_metric_fails_saying_so() {
        let spec = spec(1, 1);
        let plan = super::plan(&spec, 0, &[trial(0, Some(JobStatus::Completed), &[])], 0);
        let failure = plan.results[0].failure.clone().expect("a failure");
        assert!(
            failure.starts_with("primary metric `accuracy` was never logged"),
            "{failure}"
        );
        let end = plan.end.expect("done");
        assert_eq!(end.status, JobStatus::Failed);
        assert!(
            end.reason
                .contains("no trial logged the primary metric `accuracy`"),
            "{}",
            end.reason
        );
    }

    #[test]
    fn the_timeout_stops_what_runs_and_ends_the_sweep() {
        let mut spec = spec(10, 2);
        spec.timeout_seconds = Some(60);
        let trials = [
            trial(0, Some(JobStatus::Completed), &[0.3]),
            trial(1, None, &[0.1]),
        ];
        let plan = super::plan(&spec, 0, &trials, 61_000);
        assert_eq!(plan.stop.iter().map(|s| s.0).collect::<Vec<_>>(), vec![1]);
        assert!(plan.start.is_empty());
        let end = plan.end.expect("ended");
        assert_eq!((end.status, end.best), (JobStatus::TimedOut, Some(0)));
    }

    #[test]
    fn early_termination_is_applied_to_running_trials() {
        let mut spec = spec(3, 3);
        spec.early_termination = Some(Policy::Bandit {
            slack: Slack::Factor(0.1),
            evaluation_interval: 1,
            delay_evaluation: 0,
        });
        let trials = [
            trial(0, Some(JobStatus::Completed), &[0.9]),
            trial(1, None, &[0.2]),
            trial(2, None, &[0.85]),
        ];
        let plan = super::plan(&spec, 0, &trials, 0);
        assert_eq!(plan.stop.iter().map(|s| s.0).collect::<Vec<_>>(), vec![1]);
    }
}
