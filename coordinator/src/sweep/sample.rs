//! Drawing a trial's hyperparameters: at random (each trial from the sweep's seed
//! and its index, so a restarted coordinator draws the same ones), every grid
//! combination in order, or by tree-structured Parzen estimators (TPE, as
//! Hyperopt and Optuna use): the trials so far are split into the best quarter
//! and the rest, each hyperparameter gets a density for each group (a mixture of
//! its prior and a Gaussian around every value seen), and of candidates drawn
//! from the good density the one where good/rest is highest is run next.

use std::collections::BTreeMap;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use rand_distr::{Distribution, Normal};
use serde_json::Value;

use super::{Goal, Param, Params, Sampling, SweepSpec};
use crate::{Error, Result};

/// Random trials before TPE has enough to go on.
const STARTUP_TRIALS: usize = 5;
/// Candidates TPE weighs for each trial.
const CANDIDATES: usize = 64;
/// The share of trials TPE counts as good.
const GAMMA: f64 = 0.25;

/// How many combinations a grid has; refused, with the reason, unless every
/// hyperparameter is a choice.
pub fn grid_size(space: &BTreeMap<String, Param>) -> Result<u32> {
    let mut size: u64 = 1;
    for (name, param) in space {
        let Param::Choice { values } = param else {
            return Err(Error::invalid(
                format!("search_space.{name}"),
                format!(
                    "grid sampling tries every combination, so each hyperparameter must be a choice; `{name}` is {}, a continuous range with no list of values: use random or bayesian sampling, or list its values with choice",
                    param.kind()
                ),
            ));
        };
        size = size.saturating_mul(values.len() as u64);
    }
    u32::try_from(size)
        .ok()
        .filter(|n| *n <= super::MAX_TRIALS)
        .ok_or_else(|| {
            Error::invalid(
                "search_space",
                format!(
                    "the grid has {size} combinations; at most {} trials in one sweep",
                    super::MAX_TRIALS
                ),
            )
        })
}

/// The generator of trial `index` of a sweep seeded `seed`.
fn rng(seed: u64, index: u32) -> StdRng {
    StdRng::seed_from_u64(seed ^ (u64::from(index) + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15))
}

/// Trial `index`'s hyperparameters, given the scores of the trials that have
/// one (bayesian sampling uses them); None when a grid is done.
pub fn sample(
    spec: &SweepSpec,
    seed: u64,
    index: u32,
    observed: &[(&Params, f64)],
) -> Option<Params> {
    let mut rng = rng(seed, index);
    match spec.sampling {
        Sampling::Grid => grid_point(&spec.search_space, index),
        Sampling::Random => Some(draw_all(&spec.search_space, &mut rng)),
        Sampling::Bayesian if observed.len() < STARTUP_TRIALS => {
            Some(draw_all(&spec.search_space, &mut rng))
        }
        Sampling::Bayesian => Some(tpe(spec, observed, &mut rng)),
    }
}

fn grid_point(space: &BTreeMap<String, Param>, index: u32) -> Option<Params> {
    let mut rest = index as usize;
    let mut params = Params::new();
    // The last hyperparameter turns fastest.
    for (name, param) in space.iter().rev() {
        let Param::Choice { values } = param else {
            return None;
        };
        params.insert(name.clone(), values[rest % values.len()].clone());
        rest /= values.len();
    }
    (rest == 0).then_some(params)
}

fn draw_all(space: &BTreeMap<String, Param>, rng: &mut StdRng) -> Params {
    space
        .iter()
        .map(|(name, param)| (name.clone(), outward(param, draw(param, rng))))
        .collect()
}

/// Where TPE works: a choice's position, or a number on the scale its prior is
/// uniform or normal on (a log-distribution's logarithm).
#[derive(Clone, Copy, Debug, PartialEq)]
enum Inner {
    Choice(usize),
    Number(f64),
}

#[derive(Clone, Copy, Debug)]
enum Prior {
    Categories(usize),
    Uniform(f64, f64),
    Normal(f64, f64),
}

fn prior(param: &Param) -> Prior {
    match *param {
        Param::Choice { ref values } => Prior::Categories(values.len()),
        Param::Randint { upper } => Prior::Uniform(0.0, upper as f64),
        Param::Uniform {
            min_value,
            max_value,
        }
        | Param::Quniform {
            min_value,
            max_value,
            ..
        }
        | Param::Loguniform {
            min_value,
            max_value,
        }
        | Param::Qloguniform {
            min_value,
            max_value,
            ..
        } => Prior::Uniform(min_value, max_value),
        Param::Normal { mu, sigma }
        | Param::Qnormal { mu, sigma, .. }
        | Param::Lognormal { mu, sigma }
        | Param::Qlognormal { mu, sigma, .. } => Prior::Normal(mu, sigma),
    }
}

fn draw_prior(prior: Prior, rng: &mut StdRng) -> Inner {
    match prior {
        Prior::Categories(n) => Inner::Choice(rng.random_range(0..n)),
        Prior::Uniform(lo, hi) if hi > lo => Inner::Number(rng.random_range(lo..hi)),
        Prior::Uniform(lo, _) => Inner::Number(lo),
        Prior::Normal(mu, sigma) => Inner::Number(gaussian(mu, sigma, rng)),
    }
}

fn gaussian(mu: f64, sigma: f64, rng: &mut StdRng) -> f64 {
    Normal::new(mu, sigma).map_or(mu, |n| n.sample(rng))
}

fn draw(param: &Param, rng: &mut StdRng) -> Inner {
    draw_prior(prior(param), rng)
}

fn quantize(x: f64, q: f64) -> f64 {
    (x / q).round() * q
}

fn number(x: f64) -> Value {
    serde_json::Number::from_f64(x).map_or(Value::Null, Value::Number)
}

/// A point of the inner space as the trial gets it.
fn outward(param: &Param, inner: Inner) -> Value {
    let x = match inner {
        Inner::Choice(i) => {
            return match param {
                Param::Choice { values } => values[i.min(values.len() - 1)].clone(),
                _ => Value::Null,
            };
        }
        Inner::Number(x) => x,
    };
    match *param {
        Param::Choice { ref values } => values[0].clone(),
        Param::Randint { upper } => Value::from((x.floor() as i64).clamp(0, upper - 1)),
        Param::Uniform { .. } | Param::Normal { .. } => number(x),
        Param::Quniform { q, .. } | Param::Qnormal { q, .. } => number(quantize(x, q)),
        Param::Loguniform { .. } | Param::Lognormal { .. } => number(x.exp()),
        Param::Qloguniform { q, .. } | Param::Qlognormal { q, .. } => number(quantize(x.exp(), q)),
    }
}

/// A trial's value back in the inner space (None: not one this space gives).
fn inward(param: &Param, value: &Value) -> Option<Inner> {
    if let Param::Choice { values } = param {
        return values.iter().position(|v| v == value).map(Inner::Choice);
    }
    let x = value.as_f64()?;
    let inner = match param {
        Param::Randint { .. } => x + 0.5,
        Param::Loguniform { .. }
        | Param::Qloguniform { .. }
        | Param::Lognormal { .. }
        | Param::Qlognormal { .. } => x.max(f64::MIN_POSITIVE).ln(),
        _ => x,
    };
    Some(Inner::Number(inner))
}

/// A Parzen density of one hyperparameter over one group of trials.
struct Parzen {
    prior: Prior,
    points: Vec<Inner>,
    width: f64,
}

impl Parzen {
    fn new(prior: Prior, points: Vec<Inner>) -> Self {
        let span = match prior {
            Prior::Categories(_) => 1.0,
            Prior::Uniform(lo, hi) => (hi - lo).max(f64::EPSILON),
            Prior::Normal(_, sigma) => 4.0 * sigma,
        };
        // Narrower as evidence grows (Scott's rule's n^-1/5), never below 1% of the range.
        let n = points.len().max(1) as f64;
        let width = (span * 0.2 * n.powf(-0.2)).max(span * 0.01);
        Parzen {
            prior,
            points,
            width,
        }
    }

    fn draw(&self, rng: &mut StdRng) -> Inner {
        if let Prior::Categories(n) = self.prior {
            // Each category in proportion to its count, plus one.
            let mut weights = vec![1.0; n];
            for p in &self.points {
                if let Inner::Choice(i) = p {
                    weights[(*i).min(n - 1)] += 1.0;
                }
            }
            let mut pick = rng.random_range(0.0..weights.iter().sum::<f64>());
            for (i, w) in weights.iter().enumerate() {
                if pick < *w {
                    return Inner::Choice(i);
                }
                pick -= w;
            }
            return Inner::Choice(n - 1);
        }
        // A component at random: the prior, or a Gaussian at a point seen.
        let k = rng.random_range(0..=self.points.len());
        let Some(Inner::Number(center)) = self.points.get(k).copied() else {
            return draw_prior(self.prior, rng);
        };
        // Truncated to the range (redrawn, not clamped: clamping would pile
        // candidates on the bounds).
        for _ in 0..16 {
            let x = gaussian(center, self.width, rng);
            match self.prior {
                Prior::Uniform(lo, hi) if !(lo..=hi).contains(&x) => continue,
                _ => return Inner::Number(x),
            }
        }
        Inner::Number(center)
    }

    fn log_density(&self, at: Inner) -> f64 {
        match (self.prior, at) {
            (Prior::Categories(n), Inner::Choice(i)) => {
                let count = self
                    .points
                    .iter()
                    .filter(|p| **p == Inner::Choice(i))
                    .count() as f64;
                ((count + 1.0) / (self.points.len() as f64 + n as f64)).ln()
            }
            (prior, Inner::Number(x)) => {
                let prior_density = match prior {
                    Prior::Uniform(lo, hi) => 1.0 / (hi - lo).max(f64::EPSILON),
                    Prior::Normal(mu, sigma) => normal_pdf(x, mu, sigma),
                    Prior::Categories(_) => 0.0,
                };
                let sum = self
                    .points
                    .iter()
                    .filter_map(|p| match p {
                        Inner::Number(c) => Some(normal_pdf(x, *c, self.width)),
                        Inner::Choice(_) => None,
                    })
                    .sum::<f64>();
                ((prior_density + sum) / (self.points.len() as f64 + 1.0))
                    .max(f64::MIN_POSITIVE)
                    .ln()
            }
            _ => 0.0,
        }
    }
}

fn normal_pdf(x: f64, mu: f64, sigma: f64) -> f64 {
    let z = (x - mu) / sigma;
    (-0.5 * z * z).exp() / (sigma * (2.0 * std::f64::consts::PI).sqrt())
}

fn tpe(spec: &SweepSpec, observed: &[(&Params, f64)], rng: &mut StdRng) -> Params {
    let goal = spec.objective.goal;
    let mut ranked: Vec<&(&Params, f64)> = observed.iter().filter(|(_, s)| !s.is_nan()).collect();
    ranked.sort_by(|a, b| {
        let order = a.1.total_cmp(&b.1);
        if goal == Goal::Maximize {
            order.reverse()
        } else {
            order
        }
    });
    let n_good = ((ranked.len() as f64 * GAMMA).ceil() as usize).clamp(1, ranked.len());
    let (good, rest) = ranked.split_at(n_good);
    let densities: Vec<(&String, &Param, Parzen, Parzen)> = spec
        .search_space
        .iter()
        .map(|(name, param)| {
            let points = |group: &[&(&Params, f64)]| {
                group
                    .iter()
                    .filter_map(|(params, _)| params.get(name).and_then(|v| inward(param, v)))
                    .collect::<Vec<_>>()
            };
            (
                name,
                param,
                Parzen::new(prior(param), points(good)),
                Parzen::new(prior(param), points(rest)),
            )
        })
        .collect();
    let mut best: Option<(f64, Vec<Inner>)> = None;
    for _ in 0..CANDIDATES {
        let candidate: Vec<Inner> = densities.iter().map(|(_, _, l, _)| l.draw(rng)).collect();
        let score: f64 = densities
            .iter()
            .zip(&candidate)
            .map(|((_, _, l, g), x)| l.log_density(*x) - g.log_density(*x))
            .sum();
        if best.as_ref().is_none_or(|(s, _)| score > *s) {
            best = Some((score, candidate));
        }
    }
    let chosen = best.map(|(_, c)| c).unwrap_or_default();
    densities
        .iter()
        .zip(chosen)
        .map(|((name, param, _, _), x)| ((*name).clone(), outward(param, x)))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sweep::Objective;
    use serde_json::json;

    fn spec(space: &[(&str, Param)], sampling: Sampling, goal: Goal) -> SweepSpec {
        SweepSpec {
            search_space: space
                .iter()
                .map(|(n, p)| (n.to_string(), p.clone()))
                .collect(),
            sampling,
            seed: None,
            objective: Objective {
                goal,
                primary_metric: "m".into(),
            },
            max_total_trials: 100,
            max_concurrent_trials: 1,
            timeout_seconds: None,
            early_termination: None,
        }
    }

    #[test]
    fn each_distribution_draws_within_its_support() {
        let space = [
            (
                "c",
                Param::Choice {
                    values: vec![json!("a"), json!(2)],
                },
            ),
            ("r", Param::Randint { upper: 4 }),
            (
                "u",
                Param::Uniform {
                    min_value: -1.0,
                    max_value: 1.0,
                },
            ),
            (
                "qu",
                Param::Quniform {
                    min_value: 0.0,
                    max_value: 10.0,
                    q: 2.5,
                },
            ),
            (
                "lu",
                Param::Loguniform {
                    min_value: -6.0,
                    max_value: -1.0,
                },
            ),
            (
                "qlu",
                Param::Qloguniform {
                    min_value: 0.0,
                    max_value: 3.0,
                    q: 1.0,
                },
            ),
            (
                "n",
                Param::Normal {
                    mu: 10.0,
                    sigma: 1.0,
                },
            ),
            (
                "qn",
                Param::Qnormal {
                    mu: 0.0,
                    sigma: 5.0,
                    q: 2.0,
                },
            ),
            (
                "ln",
                Param::Lognormal {
                    mu: 0.0,
                    sigma: 0.5,
                },
            ),
            (
                "qln",
                Param::Qlognormal {
                    mu: 1.0,
                    sigma: 0.5,
                    q: 0.5,
                },
            ),
        ];
        let spec = spec(&space, Sampling::Random, Goal::Maximize);
        let mut normal_sum = 0.0;
        for index in 0..500 {
            let p = sample(&spec, 1, index, &[]).expect("random never runs out");
            assert!(p["c"] == json!("a") || p["c"] == json!(2));
            let r = p["r"].as_i64().expect("an integer");
            assert!((0..4).contains(&r), "{r}");
            let u = p["u"].as_f64().expect("u");
            assert!((-1.0..1.0).contains(&u));
            let qu = p["qu"].as_f64().expect("qu");
            assert!(
                (qu / 2.5).fract() == 0.0 && (0.0..=10.0).contains(&qu),
                "{qu}"
            );
            let lu = p["lu"].as_f64().expect("lu");
            assert!(lu >= (-6f64).exp() && lu <= (-1f64).exp(), "{lu}");
            assert_eq!(p["qlu"].as_f64().expect("qlu").fract(), 0.0);
            normal_sum += p["n"].as_f64().expect("n");
            assert_eq!((p["qn"].as_f64().expect("qn") / 2.0).fract(), 0.0);
            assert!(p["ln"].as_f64().expect("ln") > 0.0);
            assert_eq!((p["qln"].as_f64().expect("qln") / 0.5).fract(), 0.0);
        }
        let mean = normal_sum / 500.0;
        assert!((mean - 10.0).abs() < 0.2, "normal(10, 1) averaged {mean}");
    }

    #[test]
    fn the_same_seed_and_index_draw_the_same_trial() {
        let space = [(
            "u",
            Param::Uniform {
                min_value: 0.0,
                max_value: 1.0,
            },
        )];
        let spec = spec(&space, Sampling::Random, Goal::Maximize);
        assert_eq!(sample(&spec, 9, 3, &[]), sample(&spec, 9, 3, &[]));
        assert_ne!(sample(&spec, 9, 3, &[]), sample(&spec, 9, 4, &[]));
        assert_ne!(sample(&spec, 9, 3, &[]), sample(&spec, 10, 3, &[]));
    }

    #[test]
    fn a_grid_visits_every_combination_once_then_ends() {
        let space = [
            (
                "a",
                Param::Choice {
                    values: vec![json!(1), json!(2), json!(3)],
                },
            ),
            (
                "b",
                Param::Choice {
                    values: vec![json!("x"), json!("y")],
                },
            ),
        ];
        let spec = spec(&space, Sampling::Grid, Goal::Maximize);
        let points: std::collections::BTreeSet<String> = (0..6)
            .map(|i| {
                serde_json::to_string(&sample(&spec, 0, i, &[]).expect("in the grid"))
                    .expect("json")
            })
            .collect();
        assert_eq!(points.len(), 6);
        assert_eq!(sample(&spec, 0, 6, &[]), None);
    }

    /// Over many seeds, TPE gets closer to a known optimum than random draws do
    /// with the same number of trials.
    #[test]
    fn bayesian_sampling_beats_random_on_a_known_function() {
        let f = |p: &Params| {
            let x = p["x"].as_f64().expect("x");
            let k = if p["k"] == json!("good") { 0.0 } else { 0.3 };
            -(x - 0.73).powi(2) - k
        };
        let space = [
            (
                "x",
                Param::Uniform {
                    min_value: 0.0,
                    max_value: 1.0,
                },
            ),
            (
                "k",
                Param::Choice {
                    values: vec![json!("bad"), json!("good"), json!("worse")],
                },
            ),
        ];
        let regret = |sampling| {
            let spec = spec(&space, sampling, Goal::Maximize);
            let mut total = 0.0;
            for seed in 0..30 {
                let mut seen: Vec<(Params, f64)> = Vec::new();
                for index in 0..25 {
                    let observed: Vec<(&Params, f64)> = seen.iter().map(|(p, s)| (p, *s)).collect();
                    let p = sample(&spec, seed, index, &observed).expect("a trial");
                    let score = f(&p);
                    seen.push((p, score));
                }
                let best = seen.iter().map(|(_, s)| *s).fold(f64::MIN, f64::max);
                total += -best;
            }
            total / 30.0
        };
        let (random, bayesian) = (regret(Sampling::Random), regret(Sampling::Bayesian));
        assert!(
            bayesian < random * 0.2,
            "bayesian regret {bayesian}, random {random}"
        );
    }

    #[test]
    fn minimizing_tpe_prefers_the_low_choice() {
        let space = [(
            "k",
            Param::Choice {
                values: vec![json!(1), json!(2), json!(3)],
            },
        )];
        let spec = spec(&space, Sampling::Bayesian, Goal::Minimize);
        let mut seen: Vec<(Params, f64)> = Vec::new();
        for index in 0..40 {
            let observed: Vec<(&Params, f64)> = seen.iter().map(|(p, s)| (p, *s)).collect();
            let p = sample(&spec, 5, index, &observed).expect("a trial");
            let score = p["k"].as_f64().expect("k");
            seen.push((p, score));
        }
        let ones = seen[STARTUP_TRIALS..]
            .iter()
            .filter(|(_, s)| *s == 1.0)
            .count();
        assert!(
            ones * 2 > seen.len() - STARTUP_TRIALS,
            "{ones} of {}",
            seen.len() - STARTUP_TRIALS
        );
    }
}
