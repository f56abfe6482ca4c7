//! `shoal job metrics`, and the metrics part of `shoal job show`: what a job
//! logged with MLflow, as tables with a sparkline per metric.

use serde_json::{Value, json};
use shoal_proto::v1 as pb;

use crate::output;

/// ▁▂▃▄▅▆▇█ of at most `width` points, evenly picked; NaN and infinities as spaces.
pub fn sparkline(values: &[f64], width: usize) -> String {
    const BARS: [char; 8] = ['▁', '▂', '▃', '▄', '▅', '▆', '▇', '█'];
    if values.is_empty() || width == 0 {
        return String::new();
    }
    let picked: Vec<f64> = if values.len() <= width {
        values.to_vec()
    } else {
        (0..width)
            .map(|i| values[i * (values.len() - 1) / (width - 1).max(1)])
            .collect()
    };
    let finite = picked.iter().copied().filter(|v| v.is_finite());
    let (low, high) = finite.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
        (lo.min(v), hi.max(v))
    });
    picked
        .iter()
        .map(|v| {
            if !v.is_finite() {
                ' '
            } else if high <= low {
                BARS[3]
            } else {
                let at = ((v - low) / (high - low) * 7.0).round() as usize;
                BARS[at.min(7)]
            }
        })
        .collect()
}

/// A value as people read it: up to 6 significant digits.
pub fn number(value: f64) -> String {
    if value.is_nan() {
        return "NaN".into();
    }
    if value.is_infinite() {
        return if value > 0.0 { "inf" } else { "-inf" }.into();
    }
    if value != 0.0 && (value.abs() >= 1e6 || value.abs() < 1e-4) {
        return format!("{value:.4e}");
    }
    let text = format!("{value:.6}");
    let text = text.trim_end_matches('0').trim_end_matches('.');
    if text.is_empty() || text == "-" {
        "0".into()
    } else {
        text.to_string()
    }
}

fn point(p: &pb::MetricPoint) -> Value {
    let value = if p.value.is_finite() {
        json!(p.value)
    } else {
        json!(number(p.value))
    };
    json!({"step": p.step, "value": value, "timestamp_ms": p.timestamp_ms})
}

/// The JSON of `GET /api/v1/jobs/ID/metrics`.
pub fn to_json(metrics: &pb::JobMetrics) -> Value {
    let runs: Vec<Value> = metrics
        .runs
        .iter()
        .map(|run| {
            json!({
                "run_id": run.run_id,
                "run_name": run.run_name,
                "attempt_id": run.attempt_id,
                "experiment_id": run.experiment_id,
                "status": run.status,
                "start_ms": run.start_ms,
                "end_ms": (run.end_ms > 0).then_some(run.end_ms),
                "params": run.params.iter().collect::<std::collections::BTreeMap<_, _>>(),
                "tags": run.tags.iter().collect::<std::collections::BTreeMap<_, _>>(),
                "metrics": run.metrics.iter().map(|m| json!({
                    "name": m.name,
                    "latest": m.latest.as_ref().map(point),
                    "points": m.points.iter().map(point).collect::<Vec<_>>(),
                })).collect::<Vec<_>>(),
            })
        })
        .collect();
    json!({"job_id": metrics.job_id, "runs": runs})
}

fn run_title(run: &pb::TrackedRun) -> String {
    let whose = if run.attempt_id.is_empty() {
        "started by the job".to_string()
    } else {
        format!("attempt {}", run.attempt_id)
    };
    format!(
        "run {} ({whose}, {})",
        run.run_id,
        run.status.to_lowercase()
    )
}

fn params_line(run: &pb::TrackedRun) -> Option<String> {
    let mut params: Vec<_> = run.params.iter().collect();
    params.sort();
    (!params.is_empty()).then(|| {
        params
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect::<Vec<_>>()
            .join("  ")
    })
}

/// `shoal job metrics`: each run's params, then a table of its metrics with
/// their histories drawn; with `points`, every point of each metric below it.
pub fn print(metrics: &pb::JobMetrics, points: bool) {
    if metrics.runs.is_empty() {
        println!(
            "{} has logged nothing (jobs log with MLflow: `mlflow.log_metric(\"loss\", 0.3)`; \
             MLFLOW_TRACKING_URI and MLFLOW_RUN_ID are set for them)",
            metrics.job_id
        );
        return;
    }
    for (i, run) in metrics.runs.iter().enumerate() {
        if i > 0 {
            println!();
        }
        println!("{}", run_title(run));
        if let Some(params) = params_line(run) {
            println!("params: {params}");
        }
        if run.metrics.is_empty() {
            println!("no metrics");
            continue;
        }
        let mut table =
            output::table(&["METRIC", "LAST", "STEP", "POINTS", "MIN", "MAX", "HISTORY"]);
        for m in &run.metrics {
            let latest = m.latest.unwrap_or_default();
            let values: Vec<f64> = m.points.iter().map(|p| p.value).collect();
            let finite = values.iter().copied().filter(|v| v.is_finite());
            let (low, high) = finite.fold((f64::INFINITY, f64::NEG_INFINITY), |(lo, hi), v| {
                (lo.min(v), hi.max(v))
            });
            let range = |v: f64| if v.is_finite() { number(v) } else { "-".into() };
            table.add_row(vec![
                m.name.clone(),
                number(latest.value),
                latest.step.to_string(),
                values.len().to_string(),
                range(low),
                range(high),
                sparkline(&values, 40),
            ]);
        }
        println!("{table}");
        if points {
            for m in &run.metrics {
                println!("\n{}:", m.name);
                let mut table = output::table(&["STEP", "VALUE", "LOGGED"]);
                for p in &m.points {
                    table.add_row(vec![
                        p.step.to_string(),
                        number(p.value),
                        output::ago(p.timestamp_ms),
                    ]);
                }
                println!("{table}");
            }
        }
    }
}

/// The lines `shoal job show` adds: each run's params and latest metrics.
pub fn print_latest(metrics: &pb::JobMetrics) {
    for run in &metrics.runs {
        println!("{}:", run_title(run));
        if let Some(params) = params_line(run) {
            println!("  params:  {params}");
        }
        if !run.metrics.is_empty() {
            let latest: Vec<String> = run
                .metrics
                .iter()
                .map(|m| {
                    let p = m.latest.unwrap_or_default();
                    format!("{}={} (step {})", m.name, number(p.value), p.step)
                })
                .collect();
            println!("  metrics: {}", latest.join("  "));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sparkline_spans_low_to_high() {
        assert_eq!(
            sparkline(&[0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0], 40),
            "▁▂▃▄▅▆▇█"
        );
        assert_eq!(sparkline(&[2.0, 2.0], 40), "▄▄");
        assert_eq!(sparkline(&[1.0, f64::NAN, 0.0], 40), "█ ▁");
        let long: Vec<f64> = (0..1000).map(f64::from).collect();
        let line = sparkline(&long, 40);
        assert_eq!(line.chars().count(), 40);
        assert!(line.starts_with('▁') && line.ends_with('█'), "{line}");
    }

    #[test]
    fn numbers_read_well() {
        assert_eq!(number(0.5), "0.5");
        assert_eq!(number(3.0), "3");
        assert_eq!(number(1.0 / 3.0), "0.333333");
        assert_eq!(number(1.5e-7), "1.5000e-7");
        assert_eq!(number(f64::NAN), "NaN");
    }
}
