//! Prometheus metrics of the whole deployment, encoded (OpenMetrics text, via
//! prometheus-client) from one consistent view of the control loop's state, with
//! each family's series in a stable order; served as the classic Prometheus text
//! format unless the scraper asks for OpenMetrics.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::{Registry, Unit};

type Labels = Vec<(String, String)>;
type Gauges = Family<Labels, Gauge<f64, AtomicU64>>;

/// Buckets for the control loop's timings: 50 µs to 2.5 s.
pub fn loop_histogram() -> Histogram {
    Histogram::new([
        0.000_05, 0.000_1, 0.000_25, 0.000_5, 0.001, 0.002_5, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
        0.5, 1.0, 2.5,
    ])
}

/// Builds gauges label set by label set, then encodes them.
pub struct MetricsBuilder {
    registry: Registry,
    families: Vec<(&'static str, Gauges)>,
}

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

impl Default for MetricsBuilder {
    fn default() -> Self {
        MetricsBuilder {
            registry: Registry::with_prefix("shoal"),
            families: Vec::new(),
        }
    }
}

impl MetricsBuilder {
    fn family(&mut self, name: &'static str, help: &str, unit: Option<Unit>) -> Gauges {
        if let Some((_, family)) = self.families.iter().find(|(n, _)| *n == name) {
            return family.clone();
        }
        let family = Gauges::default();
        match unit {
            Some(unit) => self
                .registry
                .register_with_unit(name, help, unit, family.clone()),
            None => self.registry.register(name, help, family.clone()),
        }
        self.families.push((name, family.clone()));
        family
    }

    pub fn gauge(
        &mut self,
        name: &'static str,
        help: &str,
        unit: Option<Unit>,
        label_pairs: &[(&str, &str)],
        value: f64,
    ) {
        self.family(name, help, unit)
            .get_or_create(&labels(label_pairs))
            .set(value);
    }

    pub fn counter(&mut self, name: &'static str, help: &str, value: u64) {
        let counter: Counter = Counter::default();
        counter.inc_by(value);
        self.registry.register(name, help, counter);
    }

    pub fn counter_seconds(&mut self, name: &'static str, help: &str, value: f64) {
        let counter: Counter<f64, AtomicU64> = Counter::default();
        counter.inc_by(value);
        self.registry
            .register_with_unit(name, help, Unit::Seconds, counter);
    }

    /// A histogram kept by its owner (it is shared, not copied).
    pub fn histogram_seconds(&mut self, name: &'static str, help: &str, histogram: Histogram) {
        self.registry
            .register_with_unit(name, help, Unit::Seconds, histogram);
    }

    /// OpenMetrics text, each family's series sorted (the families come in the
    /// order they were first used).
    pub fn encode(self) -> String {
        let mut text = String::new();
        if encode(&mut text, &self.registry).is_err() {
            text.clear();
        }
        sort_series(&text)
    }
}

/// The samples of each family (the lines after its metadata) in sorted order:
/// label sets live in a hash map, and scrapes should not reorder from one to the next.
fn sort_series(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut samples: Vec<&str> = Vec::new();
    let flush = |samples: &mut Vec<&str>, out: &mut String| {
        samples.sort_unstable();
        for line in samples.drain(..) {
            out.push_str(line);
            out.push('\n');
        }
    };
    // A histogram's buckets stay in the order of their bounds.
    let mut histogram = false;
    for line in text.lines() {
        if line.starts_with('#') {
            flush(&mut samples, &mut out);
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                histogram = rest.ends_with(" histogram");
            }
            out.push_str(line);
            out.push('\n');
        } else if histogram {
            out.push_str(line);
            out.push('\n');
        } else if !line.is_empty() {
            samples.push(line);
        }
    }
    flush(&mut samples, &mut out);
    out
}

/// The classic Prometheus text format (0.0.4) of OpenMetrics text: what
/// Prometheus scrapes by default and `promtool check metrics` reads. Counters'
/// metadata names carry the `_total` their samples have; `# UNIT` and `# EOF`
/// have no place there.
pub fn to_prometheus_text(openmetrics: &str) -> String {
    let mut out = String::with_capacity(openmetrics.len());
    let mut counters = std::collections::HashSet::new();
    for line in openmetrics.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ")
            && let Some(name) = rest.strip_suffix(" counter")
        {
            counters.insert(name.to_string());
        }
    }
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let metadata = ["# HELP ", "# TYPE "]
            .into_iter()
            .find_map(|prefix| line.strip_prefix(prefix).map(|rest| (prefix, rest)));
        match metadata {
            Some((prefix, rest)) => {
                let (name, tail) = rest.split_once(' ').unwrap_or((rest, ""));
                let name = if counters.contains(name) {
                    format!("{name}_total")
                } else {
                    name.to_string()
                };
                out.push_str(&format!("{prefix}{name} {tail}\n"));
            }
            None => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_come_sorted_and_the_text_format_names_counters_with_total() {
        let mut m = MetricsBuilder::default();
        for node in ["n3", "n1", "n2"] {
            m.gauge("nodes", "Nodes", None, &[("node", node)], 1.0);
        }
        m.counter("control_batches", "Batches applied", 7);
        let open = m.encode();
        let series: Vec<&str> = open
            .lines()
            .filter(|l| l.starts_with("shoal_nodes{"))
            .collect();
        assert_eq!(
            series,
            vec![
                "shoal_nodes{node=\"n1\"} 1.0",
                "shoal_nodes{node=\"n2\"} 1.0",
                "shoal_nodes{node=\"n3\"} 1.0"
            ]
        );
        assert!(open.trim_end().ends_with("# EOF"));
        let text = to_prometheus_text(&open);
        assert!(
            text.contains("# HELP shoal_control_batches_total Batches applied"),
            "{text}"
        );
        assert!(
            text.contains("# TYPE shoal_control_batches_total counter"),
            "{text}"
        );
        assert!(text.contains("shoal_control_batches_total 7"), "{text}");
        assert!(text.contains("# TYPE shoal_nodes gauge"), "{text}");
        assert!(!text.contains("# EOF"), "{text}");
    }

    #[test]
    fn a_loop_histogram_counts_each_observation_in_its_bucket() {
        let histogram = loop_histogram();
        for seconds in [0.000_01, 0.000_3, 0.003, 7.0] {
            histogram.observe(seconds);
        }
        let mut m = MetricsBuilder::default();
        m.histogram_seconds("scheduler_decide", "Passes", histogram);
        let text = to_prometheus_text(&m.encode());
        for line in [
            "shoal_scheduler_decide_seconds_bucket{le=\"0.00005\"} 1",
            "shoal_scheduler_decide_seconds_bucket{le=\"0.0005\"} 2",
            "shoal_scheduler_decide_seconds_bucket{le=\"0.005\"} 3",
            "shoal_scheduler_decide_seconds_bucket{le=\"2.5\"} 3",
            "shoal_scheduler_decide_seconds_bucket{le=\"+Inf\"} 4",
            "shoal_scheduler_decide_seconds_count 4",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} not in\n{text}");
        }
        let bounds: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("shoal_scheduler_decide_seconds_bucket{le=\""))
            .filter_map(|l| l.split_once('"').map(|(bound, _)| bound))
            .collect();
        assert_eq!(bounds.first(), Some(&"0.00005"), "{text}");
        assert_eq!(bounds.last(), Some(&"+Inf"), "{text}");
    }
}
