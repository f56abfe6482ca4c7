//! Prometheus metrics of the whole deployment, encoded (OpenMetrics text, via
//! prometheus-client) from one consistent view of the control loop's state.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::{Registry, Unit};

type Labels = Vec<(String, String)>;
type Gauges = Family<Labels, Gauge<f64, AtomicU64>>;

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

    pub fn encode(self) -> String {
        let mut text = String::new();
        if encode(&mut text, &self.registry).is_err() {
            text.clear();
        }
        text
    }
}
