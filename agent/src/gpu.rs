//! GPUs: what a node has and how busy it is (NVML through nvml-wrapper, behind the
//! `GpuSource` trait), which instance holds which GPU (`GpuAllocator`), and what an
//! instance used (`Usage`). No driver, no GPU: the node has 0 GPUs and says why.

use std::collections::BTreeSet;

use nvml_wrapper::Nvml;
use nvml_wrapper::enum_wrappers::device::TemperatureSensor;

#[derive(Clone, Debug, PartialEq)]
pub struct GpuInfo {
    pub index: u32,
    pub uuid: String,
    pub model: String,
    pub memory_total_bytes: u64,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct GpuSample {
    pub index: u32,
    pub uuid: String,
    pub model: String,
    pub utilization_percent: u32,
    pub memory_used_bytes: u64,
    pub memory_total_bytes: u64,
    pub temperature_c: u32,
    pub power_milliwatts: u32,
    /// Since the driver loaded; differences give energy.
    pub energy_millijoules: u64,
    pub process_ids: Vec<u32>,
}

pub trait GpuSource: Send {
    fn gpus(&self) -> Vec<GpuInfo>;
    fn sample(&mut self) -> Vec<GpuSample>;
}

/// The real thing: NVML loaded at run time (`libnvidia-ml.so.1`).
pub struct NvmlSource {
    nvml: Nvml,
}

impl NvmlSource {
    pub fn open() -> Result<Self, String> {
        let nvml = Nvml::init()
            .map_err(|e| format!("NVML unavailable ({e}); no NVIDIA driver on this node"))?;
        let count = nvml
            .device_count()
            .map_err(|e| format!("NVML cannot count GPUs: {e}"))?;
        if count == 0 {
            return Err("the NVIDIA driver reports no GPU".into());
        }
        Ok(NvmlSource { nvml })
    }
}

impl GpuSource for NvmlSource {
    fn gpus(&self) -> Vec<GpuInfo> {
        let count = self.nvml.device_count().unwrap_or(0);
        (0..count)
            .filter_map(|index| {
                let device = self.nvml.device_by_index(index).ok()?;
                Some(GpuInfo {
                    index,
                    uuid: device.uuid().unwrap_or_default(),
                    model: device.name().unwrap_or_default(),
                    memory_total_bytes: device.memory_info().map(|m| m.total).unwrap_or(0),
                })
            })
            .collect()
    }

    fn sample(&mut self) -> Vec<GpuSample> {
        let count = self.nvml.device_count().unwrap_or(0);
        (0..count)
            .filter_map(|index| {
                let device = self.nvml.device_by_index(index).ok()?;
                let memory = device.memory_info().ok();
                Some(GpuSample {
                    index,
                    uuid: device.uuid().unwrap_or_default(),
                    model: device.name().unwrap_or_default(),
                    utilization_percent: device.utilization_rates().map(|u| u.gpu).unwrap_or(0),
                    memory_used_bytes: memory.as_ref().map_or(0, |m| m.used),
                    memory_total_bytes: memory.as_ref().map_or(0, |m| m.total),
                    temperature_c: device.temperature(TemperatureSensor::Gpu).unwrap_or(0),
                    power_milliwatts: device.power_usage().unwrap_or(0),
                    energy_millijoules: device.total_energy_consumption().unwrap_or(0),
                    process_ids: device
                        .running_compute_processes()
                        .map(|ps| ps.into_iter().map(|p| p.pid).collect())
                        .unwrap_or_default(),
                })
            })
            .collect()
    }
}

/// A node without GPUs.
pub struct NoGpus;

impl GpuSource for NoGpus {
    fn gpus(&self) -> Vec<GpuInfo> {
        Vec::new()
    }
    fn sample(&mut self) -> Vec<GpuSample> {
        Vec::new()
    }
}

/// NVML if it works; else no GPUs, with the reason.
pub fn detect() -> (Box<dyn GpuSource>, Option<String>) {
    match NvmlSource::open() {
        Ok(source) => (Box::new(source), None),
        Err(why) => (Box::new(NoGpus), Some(why)),
    }
}

/// A node's share of a machine's GPUs: slice `slice` of `per_node` GPUs each, so
/// several nodes on one machine never see the same GPU.
pub struct Slice {
    inner: Box<dyn GpuSource>,
    allowed: Vec<u32>,
}

impl Slice {
    /// The source restricted to its slice, and why it has fewer GPUs than asked.
    pub fn of(inner: Box<dyn GpuSource>, slice: u32, per_node: u32) -> (Slice, Option<String>) {
        let mut all: Vec<u32> = inner.gpus().iter().map(|g| g.index).collect();
        all.sort_unstable();
        let start = slice.saturating_mul(per_node) as usize;
        let allowed: Vec<u32> = all
            .iter()
            .skip(start)
            .take(per_node as usize)
            .copied()
            .collect();
        let short = (allowed.len() < per_node as usize).then(|| {
            format!(
                "this node is slice {slice} of {per_node} GPU(s) each, and the machine has {} GPU(s)",
                all.len()
            )
        });
        (Slice { inner, allowed }, short)
    }
}

impl GpuSource for Slice {
    fn gpus(&self) -> Vec<GpuInfo> {
        self.inner
            .gpus()
            .into_iter()
            .filter(|g| self.allowed.contains(&g.index))
            .collect()
    }
    fn sample(&mut self) -> Vec<GpuSample> {
        self.inner
            .sample()
            .into_iter()
            .filter(|g| self.allowed.contains(&g.index))
            .collect()
    }
}

/// Which GPU indices are free on this node; instances get exact ids, never shared.
#[derive(Clone, Debug, Default)]
pub struct GpuAllocator {
    free: BTreeSet<u32>,
}

impl GpuAllocator {
    pub fn new(indices: impl IntoIterator<Item = u32>) -> Self {
        GpuAllocator {
            free: indices.into_iter().collect(),
        }
    }

    /// `count` GPUs, lowest indices first; None (and nothing taken) if too few are free.
    pub fn allocate(&mut self, count: u32) -> Option<Vec<u32>> {
        if (self.free.len() as u32) < count {
            return None;
        }
        let chosen: Vec<u32> = self.free.iter().take(count as usize).copied().collect();
        for index in &chosen {
            self.free.remove(index);
        }
        Some(chosen)
    }

    pub fn release(&mut self, indices: &[u32]) {
        self.free.extend(indices.iter().copied());
    }

    pub fn free(&self) -> usize {
        self.free.len()
    }
}

/// What one instance used, from the samples of its GPUs and its CPU time.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Usage {
    pub samples: u32,
    utilization_sum: f64,
    pub peak_utilization_percent: u32,
    pub peak_memory_bytes: u64,
    first_energy_mj: Option<u64>,
    last_energy_mj: u64,
    /// The latest sample, averaged over the instance's GPUs.
    pub current_utilization_percent: u32,
    pub current_memory_bytes: u64,
    pub cpu_seconds: f64,
}

impl Usage {
    /// Adds one round of samples of the GPUs this instance holds.
    pub fn observe(&mut self, samples: &[GpuSample], gpus: &[u32]) {
        let mine: Vec<&GpuSample> = samples.iter().filter(|s| gpus.contains(&s.index)).collect();
        if mine.is_empty() {
            return;
        }
        let utilization =
            mine.iter().map(|s| s.utilization_percent).sum::<u32>() / mine.len() as u32;
        let memory: u64 = mine.iter().map(|s| s.memory_used_bytes).sum();
        let energy: u64 = mine.iter().map(|s| s.energy_millijoules).sum();
        self.samples += 1;
        self.utilization_sum += f64::from(utilization);
        self.peak_utilization_percent = self.peak_utilization_percent.max(utilization);
        self.peak_memory_bytes = self.peak_memory_bytes.max(memory);
        self.first_energy_mj.get_or_insert(energy);
        self.last_energy_mj = energy;
        self.current_utilization_percent = utilization;
        self.current_memory_bytes = memory;
    }

    pub fn average_utilization_percent(&self) -> f64 {
        if self.samples == 0 {
            0.0
        } else {
            self.utilization_sum / f64::from(self.samples)
        }
    }

    pub fn energy_joules(&self) -> f64 {
        let first = self.first_energy_mj.unwrap_or(self.last_energy_mj);
        self.last_energy_mj.saturating_sub(first) as f64 / 1000.0
    }
}

#[cfg(test)]
pub mod fake {
    use super::*;

    /// Two GPUs whose utilization the test sets.
    pub struct FakeGpus {
        pub samples: Vec<GpuSample>,
    }

    impl FakeGpus {
        pub fn two() -> Self {
            let gpu = |index: u32| GpuSample {
                index,
                uuid: format!("GPU-fake-{index}"),
                model: "Fake H100".into(),
                memory_total_bytes: 80 << 30,
                ..Default::default()
            };
            FakeGpus {
                samples: vec![gpu(0), gpu(1)],
            }
        }
    }

    impl GpuSource for FakeGpus {
        fn gpus(&self) -> Vec<GpuInfo> {
            self.samples
                .iter()
                .map(|s| GpuInfo {
                    index: s.index,
                    uuid: s.uuid.clone(),
                    model: s.model.clone(),
                    memory_total_bytes: s.memory_total_bytes,
                })
                .collect()
        }
        fn sample(&mut self) -> Vec<GpuSample> {
            self.samples.clone()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::fake::FakeGpus;
    use super::*;

    #[test]
    fn gpus_or_a_reason_never_neither() {
        // Here (no NVIDIA driver): no GPUs and NVML's reason. On a GPU machine: GPUs
        // and no reason. Either way exactly one of the two.
        let (source, reason) = detect();
        let has_gpus = !source.gpus().is_empty();
        assert_ne!(
            has_gpus,
            reason.is_some(),
            "gpus: {has_gpus}, reason: {reason:?}"
        );
        assert!(reason.is_none_or(|r| !r.is_empty()));
    }

    #[test]
    fn slices_split_a_machine_without_overlap() {
        let (first, why) = Slice::of(Box::new(FakeGpus::two()), 0, 1);
        assert!(why.is_none());
        let (mut second, _) = Slice::of(Box::new(FakeGpus::two()), 1, 1);
        assert_eq!(
            first.gpus().iter().map(|g| g.index).collect::<Vec<_>>(),
            vec![0]
        );
        assert_eq!(
            second.sample().iter().map(|g| g.index).collect::<Vec<_>>(),
            vec![1]
        );
        let (third, why) = Slice::of(Box::new(FakeGpus::two()), 2, 1);
        assert!(third.gpus().is_empty());
        assert!(why.is_some_and(|w| w.contains("machine has 2")));
        let (cpu_only, _) = Slice::of(Box::new(FakeGpus::two()), 0, 0);
        assert!(cpu_only.gpus().is_empty(), "a CPU size sees no GPU");
    }

    #[test]
    fn usage_adds_up_from_known_samples() {
        let mut fake = FakeGpus::two();
        let mut usage = Usage::default();
        for (util, mem, energy) in [
            (50, 10u64 << 30, 1_000u64),
            (100, 20 << 30, 4_000),
            (30, 5 << 30, 9_000),
        ] {
            fake.samples[1].utilization_percent = util;
            fake.samples[1].memory_used_bytes = mem;
            fake.samples[1].energy_millijoules = energy;
            fake.samples[0].utilization_percent = 99; // not this instance's
            usage.observe(&fake.sample(), &[1]);
        }
        assert_eq!(usage.samples, 3);
        assert_eq!(usage.average_utilization_percent(), 60.0);
        assert_eq!(usage.peak_utilization_percent, 100);
        assert_eq!(usage.peak_memory_bytes, 20 << 30);
        assert_eq!(usage.energy_joules(), 8.0);
        assert_eq!(usage.current_utilization_percent, 30);
    }

    #[test]
    fn allocation_gives_exact_ids_and_refuses_what_is_not_free() {
        let mut gpus = GpuAllocator::new(0..2);
        assert_eq!(gpus.allocate(1), Some(vec![0]));
        assert_eq!(gpus.allocate(2), None, "only one left");
        assert_eq!(gpus.allocate(1), Some(vec![1]));
        gpus.release(&[0]);
        assert_eq!(gpus.allocate(1), Some(vec![0]));
    }

    proptest::proptest! {
        /// Whatever the order of allocations and releases, no GPU is held twice.
        #[test]
        fn never_double_allocates(ops in proptest::collection::vec((0u32..3, proptest::bool::ANY), 0..60)) {
            let mut gpus = GpuAllocator::new(0..4);
            let mut held: Vec<Vec<u32>> = Vec::new();
            for (count, release) in ops {
                if release && !held.is_empty() {
                    let ids = held.remove(0);
                    gpus.release(&ids);
                } else if let Some(ids) = gpus.allocate(count) {
                    held.push(ids);
                }
                let mut all: Vec<u32> = held.iter().flatten().copied().collect();
                let total = all.len();
                all.sort();
                all.dedup();
                proptest::prop_assert_eq!(all.len(), total, "a GPU is held twice");
                proptest::prop_assert_eq!(total + gpus.free(), 4);
            }
        }
    }
}
