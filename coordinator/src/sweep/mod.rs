//! Sweep jobs (hyperparameter search, the service's sweepJob): the search space,
//! how it is sampled (`sample`), when trials stop early (`stop`), and what a sweep
//! does next (`plan`). All of it pure: the conductor (`conductor.rs`) reads the
//! sweep from the control core and its trials' metrics from tracking, asks `plan`,
//! and hands the answer back to the core, which owns the sweep and its trials.

pub mod conductor;
mod plan;
mod sample;
mod stop;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::{Error, Result};
pub use plan::{End, Plan, TrialResult, TrialState, best, params_line, plan};
pub use sample::{grid_size, sample};

/// A trial's hyperparameters, by name: numbers or the choice's values as written.
pub type Params = BTreeMap<String, Value>;

/// One hyperparameter's distribution, as the service names them. `loguniform`
/// and `lognormal` take their bounds and moments in natural-log space, as the
/// service's do (`loguniform(-6, -1)` draws between e⁻⁶ and e⁻¹); the `q` forms
/// round to a multiple of `q`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Param {
    Choice {
        values: Vec<Value>,
    },
    /// An integer in `[0, upper)`.
    Randint {
        upper: i64,
    },
    Uniform {
        min_value: f64,
        max_value: f64,
    },
    Quniform {
        min_value: f64,
        max_value: f64,
        q: f64,
    },
    Loguniform {
        min_value: f64,
        max_value: f64,
    },
    Qloguniform {
        min_value: f64,
        max_value: f64,
        q: f64,
    },
    Normal {
        mu: f64,
        sigma: f64,
    },
    Qnormal {
        mu: f64,
        sigma: f64,
        q: f64,
    },
    Lognormal {
        mu: f64,
        sigma: f64,
    },
    Qlognormal {
        mu: f64,
        sigma: f64,
        q: f64,
    },
}

const DISTRIBUTIONS: &str = "choice, randint, uniform, quniform, loguniform, qloguniform, normal, qnormal, lognormal or qlognormal";

impl Param {
    /// `search_space.NAME` as written: `{type: uniform, min_value: 0, max_value: 1}`.
    pub fn parse(name: &str, value: &Value) -> Result<Self> {
        let field = format!("search_space.{name}");
        let Value::Object(map) = value else {
            return Err(Error::invalid(
                &field,
                format!(
                    "`{value}` is not a distribution: write {{type: choice, values: [...]}} or {{type: uniform, min_value: A, max_value: B}}"
                ),
            ));
        };
        let Some(kind) = map.get("type").and_then(Value::as_str) else {
            return Err(Error::invalid(
                format!("{field}.type"),
                format!("a distribution needs a type: {DISTRIBUTIONS}"),
            ));
        };
        let keys: &[&str] = match kind {
            "choice" => &["values"],
            "randint" => &["upper"],
            "uniform" | "loguniform" => &["min_value", "max_value"],
            "quniform" | "qloguniform" => &["min_value", "max_value", "q"],
            "normal" | "lognormal" => &["mu", "sigma"],
            "qnormal" | "qlognormal" => &["mu", "sigma", "q"],
            other => {
                return Err(Error::invalid(
                    format!("{field}.type"),
                    format!("`{other}` is not a distribution; use {DISTRIBUTIONS}"),
                ));
            }
        };
        if let Some(extra) = map
            .keys()
            .find(|k| *k != "type" && !keys.contains(&k.as_str()))
        {
            return Err(Error::invalid(
                &field,
                format!("unknown key `{extra}`; a {kind} has {}", keys.join(", ")),
            ));
        }
        let number = |key: &str| number(map, &field, kind, key);
        let param = match kind {
            "choice" => {
                let values = match map.get("values") {
                    Some(Value::Array(values)) => values.clone(),
                    Some(other) => {
                        return Err(Error::invalid(
                            format!("{field}.values"),
                            format!("`{other}` is not a list of values"),
                        ));
                    }
                    None => Vec::new(),
                };
                if values.is_empty() {
                    return Err(Error::invalid(
                        format!("{field}.values"),
                        "a choice needs at least one value: values: [0.01, 0.1]",
                    ));
                }
                if let Some(bad) = values
                    .iter()
                    .find(|v| matches!(v, Value::Object(_) | Value::Array(_) | Value::Null))
                {
                    return Err(Error::invalid(
                        format!("{field}.values"),
                        format!("`{bad}`: a choice's values are numbers, text or true/false"),
                    ));
                }
                Param::Choice { values }
            }
            "randint" => {
                let upper = number("upper")?;
                if upper.fract() != 0.0 || upper < 1.0 {
                    return Err(Error::invalid(
                        format!("{field}.upper"),
                        format!(
                            "`{upper}`: randint draws from 0 up to (not including) a whole number of at least 1"
                        ),
                    ));
                }
                Param::Randint {
                    upper: upper as i64,
                }
            }
            "uniform" | "quniform" | "loguniform" | "qloguniform" => {
                let (min_value, max_value) = (number("min_value")?, number("max_value")?);
                if min_value > max_value {
                    return Err(Error::invalid(
                        &field,
                        format!(
                            "the bounds are reversed: min_value ({min_value}) is above max_value ({max_value})"
                        ),
                    ));
                }
                let q = || positive(&field, "q", number("q")?);
                match kind {
                    "uniform" => Param::Uniform {
                        min_value,
                        max_value,
                    },
                    "quniform" => Param::Quniform {
                        min_value,
                        max_value,
                        q: q()?,
                    },
                    "loguniform" => Param::Loguniform {
                        min_value,
                        max_value,
                    },
                    _ => Param::Qloguniform {
                        min_value,
                        max_value,
                        q: q()?,
                    },
                }
            }
            _ => {
                let mu = number("mu")?;
                let sigma = positive(&field, "sigma", number("sigma")?)?;
                let q = || positive(&field, "q", number("q")?);
                match kind {
                    "normal" => Param::Normal { mu, sigma },
                    "qnormal" => Param::Qnormal { mu, sigma, q: q()? },
                    "lognormal" => Param::Lognormal { mu, sigma },
                    _ => Param::Qlognormal { mu, sigma, q: q()? },
                }
            }
        };
        Ok(param)
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Param::Choice { .. } => "choice",
            Param::Randint { .. } => "randint",
            Param::Uniform { .. } => "uniform",
            Param::Quniform { .. } => "quniform",
            Param::Loguniform { .. } => "loguniform",
            Param::Qloguniform { .. } => "qloguniform",
            Param::Normal { .. } => "normal",
            Param::Qnormal { .. } => "qnormal",
            Param::Lognormal { .. } => "lognormal",
            Param::Qlognormal { .. } => "qlognormal",
        }
    }
}

fn number(map: &Map<String, Value>, field: &str, kind: &str, key: &str) -> Result<f64> {
    match map.get(key) {
        Some(Value::Number(n)) => n
            .as_f64()
            .filter(|x| x.is_finite())
            .ok_or_else(|| Error::invalid(format!("{field}.{key}"), "not a finite number")),
        Some(other) => Err(Error::invalid(
            format!("{field}.{key}"),
            format!("`{other}` is not a number"),
        )),
        None => Err(Error::invalid(
            format!("{field}.{key}"),
            format!("a {kind} needs {key}"),
        )),
    }
}

fn positive(field: &str, key: &str, value: f64) -> Result<f64> {
    if value > 0.0 {
        Ok(value)
    } else {
        Err(Error::invalid(
            format!("{field}.{key}"),
            format!("`{value}`: must be above 0"),
        ))
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Sampling {
    /// Each trial drawn at random, from a seed (the sweep's own when none is given).
    Random,
    /// Every combination of the choices, in order.
    Grid,
    /// Tree-structured Parzen estimators: after a few random trials, each new
    /// one is drawn where the best trials so far are dense and the others sparse.
    Bayesian,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Goal {
    Maximize,
    Minimize,
}

impl Goal {
    /// `a` is better than `b`.
    pub fn better(self, a: f64, b: f64) -> bool {
        match self {
            Goal::Maximize => a > b,
            Goal::Minimize => a < b,
        }
    }

    /// The best of these values (None for none).
    pub fn best(self, values: impl IntoIterator<Item = f64>) -> Option<f64> {
        values
            .into_iter()
            .filter(|v| !v.is_nan())
            .fold(None, |best, v| match best {
                Some(b) if !self.better(v, b) => Some(b),
                _ => Some(v),
            })
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Objective {
    pub goal: Goal,
    pub primary_metric: String,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Policy {
    /// Stops a trial whose best value so far is not within the slack of the best
    /// trial's at the same report.
    Bandit {
        slack: Slack,
        evaluation_interval: u32,
        delay_evaluation: u32,
    },
    /// Stops a trial whose best value so far is worse than the median of every
    /// trial's running average at the same report.
    MedianStopping {
        evaluation_interval: u32,
        delay_evaluation: u32,
    },
    /// Stops the worst `truncation_percentage` of trials at each evaluation.
    TruncationSelection {
        truncation_percentage: u32,
        evaluation_interval: u32,
        delay_evaluation: u32,
        exclude_finished_jobs: bool,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Slack {
    Factor(f64),
    Amount(f64),
}

/// The whole sweep, as admitted.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SweepSpec {
    pub search_space: BTreeMap<String, Param>,
    pub sampling: Sampling,
    /// Random and bayesian draws come from it (the sweep's sequence number when
    /// none was given), so a sweep resumed after a restart draws the same trials.
    #[serde(default)]
    pub seed: Option<u64>,
    pub objective: Objective,
    pub max_total_trials: u32,
    pub max_concurrent_trials: u32,
    /// Seconds the whole sweep may run.
    #[serde(default)]
    pub timeout_seconds: Option<u64>,
    #[serde(default)]
    pub early_termination: Option<Policy>,
}

/// The most trials one sweep may run.
pub const MAX_TRIALS: u32 = 10_000;
/// The service's default for `max_total_trials`.
const DEFAULT_TOTAL_TRIALS: u32 = 1000;

/// The sweep keys of a job file, as written.
#[derive(Debug, Default)]
pub struct SweepKeys<'a> {
    pub search_space: Option<&'a Value>,
    pub sampling_algorithm: Option<&'a Value>,
    pub objective: Option<&'a Value>,
    pub early_termination: Option<&'a Value>,
    pub max_total_trials: Option<u32>,
    pub max_concurrent_trials: Option<u32>,
    pub timeout: Option<u64>,
}

impl SweepSpec {
    /// Reads a sweep job's keys; what has no effect here goes to `warnings`.
    pub fn parse(keys: &SweepKeys, warnings: &mut Vec<String>) -> Result<Self> {
        let search_space = match keys.search_space {
            Some(Value::Object(map)) if !map.is_empty() => map
                .iter()
                .map(|(name, value)| Ok((name.clone(), Param::parse(name, value)?)))
                .collect::<Result<BTreeMap<_, _>>>()?,
            Some(Value::Object(_)) | None | Some(Value::Null) => {
                return Err(Error::invalid(
                    "search_space",
                    "a sweep needs a search space: search_space: {lr: {type: uniform, min_value: 0.001, max_value: 0.1}}",
                ));
            }
            Some(other) => {
                return Err(Error::invalid(
                    "search_space",
                    format!("`{other}` is not a mapping of hyperparameters"),
                ));
            }
        };
        let (sampling, seed) = parse_sampling(keys.sampling_algorithm, warnings)?;
        let objective = parse_objective(keys.objective)?;
        let early_termination = keys
            .early_termination
            .filter(|v| !v.is_null())
            .map(parse_policy)
            .transpose()?;
        let grid = match sampling {
            Sampling::Grid => Some(grid_size(&search_space)?),
            _ => None,
        };
        let max_total_trials = match (keys.max_total_trials, grid) {
            (Some(0), _) => {
                return Err(Error::invalid(
                    "limits.max_total_trials",
                    "must be at least 1",
                ));
            }
            (Some(n), Some(size)) => n.min(size),
            (Some(n), None) => n,
            (None, Some(size)) => size,
            (None, None) => DEFAULT_TOTAL_TRIALS,
        };
        if max_total_trials > MAX_TRIALS {
            return Err(Error::invalid(
                "limits.max_total_trials",
                format!("{max_total_trials} trials; at most {MAX_TRIALS} in one sweep"),
            ));
        }
        let max_concurrent_trials = match keys.max_concurrent_trials {
            Some(0) => {
                return Err(Error::invalid(
                    "limits.max_concurrent_trials",
                    "must be at least 1",
                ));
            }
            Some(n) => n.min(max_total_trials),
            None => max_total_trials,
        };
        Ok(SweepSpec {
            search_space,
            sampling,
            seed,
            objective,
            max_total_trials,
            max_concurrent_trials,
            timeout_seconds: keys.timeout.filter(|t| *t > 0),
            early_termination,
        })
    }

    /// `${{search_space.X}}` names this hyperparameter.
    pub fn has(&self, name: &str) -> bool {
        self.search_space.contains_key(name)
    }
}

fn parse_sampling(
    value: Option<&Value>,
    warnings: &mut Vec<String>,
) -> Result<(Sampling, Option<u64>)> {
    let field = "sampling_algorithm";
    let (kind, map) = match value {
        None | Some(Value::Null) => {
            return Err(Error::invalid(
                field,
                "a sweep needs a sampling algorithm: random, grid or bayesian",
            ));
        }
        Some(Value::String(kind)) => (kind.as_str(), None),
        Some(Value::Object(map)) => match map.get("type").and_then(Value::as_str) {
            Some(kind) => (kind, Some(map)),
            None => {
                return Err(Error::invalid(
                    format!("{field}.type"),
                    "name the algorithm: random, grid or bayesian",
                ));
            }
        },
        Some(other) => {
            return Err(Error::invalid(
                field,
                format!("`{other}` is not random, grid or bayesian"),
            ));
        }
    };
    let sampling = match kind.to_ascii_lowercase().as_str() {
        "random" => Sampling::Random,
        "grid" => Sampling::Grid,
        "bayesian" => Sampling::Bayesian,
        _ => {
            return Err(Error::invalid(
                field,
                format!("`{kind}` is not a sampling algorithm; use random, grid or bayesian"),
            ));
        }
    };
    let mut seed = None;
    for (key, value) in map.into_iter().flatten() {
        match (key.as_str(), sampling) {
            ("type", _) => {}
            ("seed", Sampling::Random) => {
                seed = Some(value.as_u64().ok_or_else(|| {
                    Error::invalid(
                        format!("{field}.seed"),
                        format!("`{value}` is not a whole number"),
                    )
                })?);
            }
            ("rule", Sampling::Random) => match value.as_str() {
                Some("random") => {}
                Some("sobol") => warnings.push(
                    "sampling_algorithm.rule: sobol sequences are not drawn here; trials are drawn at random from the seed".into(),
                ),
                _ => {
                    return Err(Error::invalid(
                        format!("{field}.rule"),
                        format!("`{value}` is not random or sobol"),
                    ));
                }
            },
            ("logbase", Sampling::Random) => warnings.push(
                "sampling_algorithm.logbase: loguniform and lognormal use natural logarithms here".into(),
            ),
            (other, _) => {
                return Err(Error::invalid(
                    field,
                    format!("unknown key `{other}` for {kind} sampling"),
                ));
            }
        }
    }
    Ok((sampling, seed))
}

fn parse_objective(value: Option<&Value>) -> Result<Objective> {
    let Some(Value::Object(map)) = value else {
        return Err(Error::invalid(
            "objective",
            "a sweep needs an objective: {goal: maximize, primary_metric: accuracy}",
        ));
    };
    if let Some(extra) = map
        .keys()
        .find(|k| !matches!(k.as_str(), "goal" | "primary_metric"))
    {
        return Err(Error::invalid(
            "objective",
            format!("unknown key `{extra}`; an objective has goal and primary_metric"),
        ));
    }
    let goal = match map
        .get("goal")
        .and_then(Value::as_str)
        .map(str::to_ascii_lowercase)
    {
        Some(goal) if goal == "maximize" => Goal::Maximize,
        Some(goal) if goal == "minimize" => Goal::Minimize,
        _ => {
            return Err(Error::invalid(
                "objective.goal",
                "the goal is maximize or minimize",
            ));
        }
    };
    let primary_metric = match map.get("primary_metric").and_then(Value::as_str) {
        Some(name) if !name.trim().is_empty() => name.trim().to_string(),
        _ => {
            return Err(Error::invalid(
                "objective.primary_metric",
                "name the metric each trial logs with mlflow.log_metric",
            ));
        }
    };
    Ok(Objective {
        goal,
        primary_metric,
    })
}

fn parse_policy(value: &Value) -> Result<Policy> {
    let field = "early_termination";
    let Value::Object(map) = value else {
        return Err(Error::invalid(
            field,
            format!("`{value}` is not a policy: {{type: bandit, slack_factor: 0.1}}"),
        ));
    };
    let kind = map.get("type").and_then(Value::as_str).unwrap_or_default();
    let keys: &[&str] = match kind {
        "bandit" => &["slack_factor", "slack_amount"],
        "median_stopping" => &[],
        "truncation_selection" => &["truncation_percentage", "exclude_finished_jobs"],
        other => {
            return Err(Error::invalid(
                format!("{field}.type"),
                format!(
                    "`{other}` is not a policy; use bandit, median_stopping or truncation_selection"
                ),
            ));
        }
    };
    if let Some(extra) = map.keys().find(|k| {
        !matches!(
            k.as_str(),
            "type" | "evaluation_interval" | "delay_evaluation"
        ) && !keys.contains(&k.as_str())
    }) {
        return Err(Error::invalid(
            field,
            format!("unknown key `{extra}` for the {kind} policy"),
        ));
    }
    let whole = |key: &str| -> Result<u32> {
        match map.get(key) {
            None | Some(Value::Null) => Ok(0),
            Some(v) => v
                .as_u64()
                .and_then(|n| u32::try_from(n).ok())
                .ok_or_else(|| {
                    Error::invalid(
                        format!("{field}.{key}"),
                        format!("`{v}` is not a whole number"),
                    )
                }),
        }
    };
    // 0 (the service's default) evaluates at every report.
    let evaluation_interval = whole("evaluation_interval")?.max(1);
    let delay_evaluation = whole("delay_evaluation")?;
    let slack = |key: &str| -> Result<Option<f64>> {
        match map.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(v) => match v.as_f64() {
                Some(x) if x > 0.0 && x.is_finite() => Ok(Some(x)),
                _ => Err(Error::invalid(
                    format!("{field}.{key}"),
                    format!("`{v}`: must be a number above 0"),
                )),
            },
        }
    };
    Ok(match kind {
        "bandit" => {
            let slack = match (slack("slack_factor")?, slack("slack_amount")?) {
                (Some(f), None) => Slack::Factor(f),
                (None, Some(a)) => Slack::Amount(a),
                (Some(_), Some(_)) => {
                    return Err(Error::invalid(
                        field,
                        "give slack_factor or slack_amount, not both",
                    ));
                }
                (None, None) => {
                    return Err(Error::invalid(
                        field,
                        "a bandit policy needs slack_factor (a ratio) or slack_amount (a distance)",
                    ));
                }
            };
            Policy::Bandit {
                slack,
                evaluation_interval,
                delay_evaluation,
            }
        }
        "median_stopping" => Policy::MedianStopping {
            evaluation_interval,
            delay_evaluation,
        },
        _ => {
            let truncation_percentage = whole("truncation_percentage")?;
            if !(1..=99).contains(&truncation_percentage) {
                return Err(Error::invalid(
                    format!("{field}.truncation_percentage"),
                    "a percentage from 1 to 99",
                ));
            }
            let exclude_finished_jobs = match map.get("exclude_finished_jobs") {
                None | Some(Value::Null) => false,
                Some(Value::Bool(b)) => *b,
                Some(v) => {
                    return Err(Error::invalid(
                        format!("{field}.exclude_finished_jobs"),
                        format!("`{v}` is not true or false"),
                    ));
                }
            };
            Policy::TruncationSelection {
                truncation_percentage,
                evaluation_interval,
                delay_evaluation,
                exclude_finished_jobs,
            }
        }
    })
}

/// A hyperparameter's value as it goes into a command: text as written, numbers
/// as JSON writes them (`0.01`, `3`).
pub fn value_text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// `${{search_space.X}}` replaced by the trial's values.
pub fn substitute(text: &str, params: &Params) -> String {
    let mut out = text.to_string();
    for (name, value) in params {
        let needle = format!("${{{{search_space.{name}}}}}");
        if out.contains(&needle) {
            out = out.replace(&needle, &value_text(value));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(text: &str) -> Value {
        serde_saphyr::from_str(text).expect("yaml")
    }

    fn spec(text: &str) -> Result<SweepSpec> {
        let doc = doc(text);
        let limits = doc.get("limits");
        let keys = SweepKeys {
            search_space: doc.get("search_space"),
            sampling_algorithm: doc.get("sampling_algorithm"),
            objective: doc.get("objective"),
            early_termination: doc.get("early_termination"),
            max_total_trials: limits
                .and_then(|l| l.get("max_total_trials"))
                .and_then(Value::as_u64)
                .map(|n| n as u32),
            max_concurrent_trials: limits
                .and_then(|l| l.get("max_concurrent_trials"))
                .and_then(Value::as_u64)
                .map(|n| n as u32),
            timeout: None,
        };
        SweepSpec::parse(&keys, &mut Vec::new())
    }

    const OBJECTIVE: &str = "objective: {goal: maximize, primary_metric: accuracy}\n";

    #[test]
    fn reads_the_services_sweep_keys() {
        let spec = spec(&format!(
            "search_space:\n  lr: {{type: loguniform, min_value: -6, max_value: -1}}\n  opt: {{type: choice, values: [adam, sgd]}}\n\
             sampling_algorithm: {{type: random, seed: 7}}\n{OBJECTIVE}\
             limits: {{max_total_trials: 8, max_concurrent_trials: 2}}\n\
             early_termination: {{type: bandit, slack_factor: 0.1, evaluation_interval: 1, delay_evaluation: 2}}\n"
        ))
        .expect("valid");
        assert_eq!(spec.sampling, Sampling::Random);
        assert_eq!(spec.seed, Some(7));
        assert_eq!((spec.max_total_trials, spec.max_concurrent_trials), (8, 2));
        assert_eq!(spec.objective.goal, Goal::Maximize);
        assert_eq!(
            spec.early_termination,
            Some(Policy::Bandit {
                slack: Slack::Factor(0.1),
                evaluation_interval: 1,
                delay_evaluation: 2
            })
        );
        assert_eq!(spec.search_space["lr"].kind(), "loguniform");
    }

    #[test]
    fn bad_sweeps_are_refused_with_the_reason() {
        let refused = |space: &str, rest: &str| {
            spec(&format!("search_space:\n  x: {space}\n{rest}"))
                .unwrap_err()
                .to_string()
        };
        let random = format!("sampling_algorithm: random\n{OBJECTIVE}");
        let err = refused("{type: betta, min_value: 0, max_value: 1}", &random);
        assert!(err.contains("`betta` is not a distribution"), "{err}");
        let err = refused("{type: choice, values: []}", &random);
        assert!(err.contains("a choice needs at least one value"), "{err}");
        let err = refused("{type: uniform, min_value: 5, max_value: 1}", &random);
        assert!(err.contains("bounds are reversed"), "{err}");
        let err = refused(
            "{type: uniform, min_value: 0, max_value: 1}",
            &format!("sampling_algorithm: grid\n{OBJECTIVE}"),
        );
        assert!(err.contains("continuous"), "{err}");
        let err = refused("{type: normal, mu: 0, sigma: 0}", &random);
        assert!(err.contains("sigma"), "{err}");
        let err = refused("{type: uniform, min_value: 0}", &random);
        assert!(err.contains("needs max_value"), "{err}");
        let err = refused(
            "{type: choice, values: [1]}",
            "sampling_algorithm: random\n",
        );
        assert!(err.contains("needs an objective"), "{err}");
        let err = refused(
            "{type: choice, values: [1]}",
            &format!("sampling_algorithm: annealing\n{OBJECTIVE}"),
        );
        assert!(err.contains("not a sampling algorithm"), "{err}");
        let err = refused(
            "{type: choice, values: [1]}",
            &format!("{random}early_termination: {{type: bandit}}\n"),
        );
        assert!(err.contains("slack_factor"), "{err}");
    }

    #[test]
    fn grid_trials_default_to_every_combination() {
        let spec = spec(&format!(
            "search_space:\n  a: {{type: choice, values: [1, 2, 3]}}\n  b: {{type: choice, values: [x, y]}}\n\
             sampling_algorithm: grid\n{OBJECTIVE}"
        ))
        .expect("valid");
        assert_eq!(spec.max_total_trials, 6);
        assert_eq!(spec.max_concurrent_trials, 6);
    }

    #[test]
    fn values_go_into_the_command_as_written() {
        let params = Params::from([
            ("lr".to_string(), serde_json::json!(0.01)),
            ("opt".to_string(), serde_json::json!("adam")),
            ("layers".to_string(), serde_json::json!(3)),
        ]);
        assert_eq!(
            substitute(
                "python t.py --lr ${{search_space.lr}} --opt ${{search_space.opt}} -n ${{search_space.layers}}",
                &params
            ),
            "python t.py --lr 0.01 --opt adam -n 3"
        );
    }
}
