//! Early termination, as the service defines its policies. Each time a trial logs
//! its primary metric is one report ("interval"); a policy looks at a trial when
//! its reports reach a multiple of `evaluation_interval` at or past
//! `delay_evaluation`, comparing it with every trial that reached the same report.

use super::{Goal, Policy, Slack};

/// A trial's primary metric, report by report.
pub struct Series<'a> {
    pub index: u32,
    pub values: &'a [f64],
    /// Still running (only these can be stopped).
    pub live: bool,
}

/// The latest report at which the policy evaluates a trial that has made `reports`.
fn evaluation_point(reports: usize, interval: u32, delay: u32) -> Option<usize> {
    let interval = interval.max(1) as usize;
    let k = reports - reports % interval;
    (k >= 1 && k >= delay as usize).then_some(k)
}

fn fmt(x: f64) -> String {
    let text = format!("{x:.4}");
    text.trim_end_matches('0').trim_end_matches('.').to_string()
}

/// The trials the policy stops now, each with why.
pub fn early_stops(
    policy: &Policy,
    goal: Goal,
    metric: &str,
    trials: &[Series],
) -> Vec<(u32, String)> {
    let (interval, delay) = match *policy {
        Policy::Bandit {
            evaluation_interval,
            delay_evaluation,
            ..
        }
        | Policy::MedianStopping {
            evaluation_interval,
            delay_evaluation,
        }
        | Policy::TruncationSelection {
            evaluation_interval,
            delay_evaluation,
            ..
        } => (evaluation_interval, delay_evaluation),
    };
    let best_until = |values: &[f64], k: usize| goal.best(values[..k].iter().copied());
    let mut stops = Vec::new();
    for trial in trials.iter().filter(|t| t.live) {
        let Some(k) = evaluation_point(trial.values.len(), interval, delay) else {
            continue;
        };
        let Some(own) = best_until(trial.values, k) else {
            continue;
        };
        let peers: Vec<&Series> = trials
            .iter()
            .filter(|t| t.index != trial.index && t.values.len() >= k)
            .collect();
        if peers.is_empty() {
            continue;
        }
        let verdict = match *policy {
            Policy::Bandit { slack, .. } => {
                let Some(leader) = goal.best(peers.iter().filter_map(|t| best_until(t.values, k)))
                else {
                    continue;
                };
                let (allowed, how) = match (slack, goal) {
                    (Slack::Factor(f), Goal::Maximize) => {
                        (leader / (1.0 + f), format!("slack_factor {f}"))
                    }
                    (Slack::Factor(f), Goal::Minimize) => {
                        (leader * (1.0 + f), format!("slack_factor {f}"))
                    }
                    (Slack::Amount(a), Goal::Maximize) => (leader - a, format!("slack_amount {a}")),
                    (Slack::Amount(a), Goal::Minimize) => (leader + a, format!("slack_amount {a}")),
                };
                goal.better(allowed, own).then(|| {
                    format!(
                        "stopped early by the bandit policy: its best {metric} after {k} reports, {}, is outside the {how} of the best trial's {} (the limit is {})",
                        fmt(own),
                        fmt(leader),
                        fmt(allowed)
                    )
                })
            }
            Policy::MedianStopping { .. } => {
                let mut averages: Vec<f64> = peers
                    .iter()
                    .map(|t| t.values[..k].iter().sum::<f64>() / k as f64)
                    .collect();
                averages.push(trial.values[..k].iter().sum::<f64>() / k as f64);
                averages.sort_by(f64::total_cmp);
                let n = averages.len();
                let median = if n % 2 == 1 {
                    averages[n / 2]
                } else {
                    (averages[n / 2 - 1] + averages[n / 2]) / 2.0
                };
                goal.better(median, own).then(|| {
                    format!(
                        "stopped early by the median stopping policy: its best {metric} after {k} reports, {}, is worse than the median of the trials' running averages, {}",
                        fmt(own),
                        fmt(median)
                    )
                })
            }
            Policy::TruncationSelection {
                truncation_percentage,
                exclude_finished_jobs,
                ..
            } => {
                let mut field: Vec<(f64, u32)> = peers
                    .iter()
                    .filter(|t| t.live || !exclude_finished_jobs)
                    .map(|t| (t.values[k - 1], t.index))
                    .collect();
                field.push((trial.values[k - 1], trial.index));
                // Worst first.
                field.sort_by(|a, b| {
                    let order = a.0.total_cmp(&b.0);
                    if goal == Goal::Maximize {
                        order
                    } else {
                        order.reverse()
                    }
                });
                let cut = field.len() * truncation_percentage as usize / 100;
                field[..cut].iter().any(|(_, i)| *i == trial.index).then(|| {
                    format!(
                        "stopped early by the truncation selection policy: at report {k} its {metric}, {}, is in the worst {truncation_percentage}% of {} trials",
                        fmt(trial.values[k - 1]),
                        field.len()
                    )
                })
            }
        };
        if let Some(reason) = verdict {
            stops.push((trial.index, reason));
        }
    }
    stops
}

#[cfg(test)]
mod tests {
    use super::*;

    fn series(index: u32, values: &[f64], live: bool) -> Series<'_> {
        Series {
            index,
            values,
            live,
        }
    }

    #[test]
    fn bandit_stops_a_trial_outside_the_slack_of_the_leader() {
        let policy = Policy::Bandit {
            slack: Slack::Factor(0.1),
            evaluation_interval: 1,
            delay_evaluation: 2,
        };
        let leader = [0.5, 0.8, 0.9];
        let close = [0.4, 0.75, 0.85];
        let laggard = [0.2, 0.3, 0.35];
        let trials = [
            series(0, &leader, true),
            series(1, &close, true),
            series(2, &laggard, true),
        ];
        let stops = early_stops(&policy, Goal::Maximize, "accuracy", &trials);
        assert_eq!(stops.len(), 1, "{stops:?}");
        assert_eq!(stops[0].0, 2);
        assert!(stops[0].1.contains("bandit"), "{}", stops[0].1);
        // Before the delay nothing is stopped.
        let early = [
            series(0, &leader[..1], true),
            series(2, &laggard[..1], true),
        ];
        assert!(early_stops(&policy, Goal::Maximize, "accuracy", &early).is_empty());
        // Minimizing a loss: the high one goes.
        let policy = Policy::Bandit {
            slack: Slack::Amount(0.5),
            evaluation_interval: 1,
            delay_evaluation: 0,
        };
        let (low, high) = ([1.0, 0.5], [3.0, 2.5]);
        let trials = [series(0, &low, true), series(1, &high, true)];
        let stops = early_stops(&policy, Goal::Minimize, "loss", &trials);
        assert_eq!(stops.iter().map(|s| s.0).collect::<Vec<_>>(), vec![1]);
    }

    #[test]
    fn median_stopping_stops_below_the_median_of_averages() {
        let policy = Policy::MedianStopping {
            evaluation_interval: 1,
            delay_evaluation: 1,
        };
        let (a, b, c) = ([0.9, 0.9], [0.8, 0.85], [0.1, 0.2]);
        let trials = [
            series(0, &a, false),
            series(1, &b, true),
            series(2, &c, true),
        ];
        let stops = early_stops(&policy, Goal::Maximize, "acc", &trials);
        assert_eq!(stops.iter().map(|s| s.0).collect::<Vec<_>>(), vec![2]);
    }

    #[test]
    fn truncation_selection_stops_the_worst_share() {
        let policy = Policy::TruncationSelection {
            truncation_percentage: 50,
            evaluation_interval: 2,
            delay_evaluation: 0,
            exclude_finished_jobs: false,
        };
        let v: Vec<[f64; 2]> = vec![[0.1, 0.9], [0.1, 0.7], [0.1, 0.3], [0.1, 0.2]];
        let trials: Vec<Series> = v
            .iter()
            .enumerate()
            .map(|(i, s)| series(i as u32, s, true))
            .collect();
        let mut stopped: Vec<u32> = early_stops(&policy, Goal::Maximize, "acc", &trials)
            .into_iter()
            .map(|s| s.0)
            .collect();
        stopped.sort();
        assert_eq!(stopped, vec![2, 3]);
        // At an odd report (interval 2), the policy looks at report 2 only once there.
        let one: Vec<Series> = v
            .iter()
            .enumerate()
            .map(|(i, s)| series(i as u32, &s[..1], true))
            .collect();
        assert!(early_stops(&policy, Goal::Maximize, "acc", &one).is_empty());
    }
}
