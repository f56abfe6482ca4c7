//! Node telemetry from sysinfo, sampled on a thread of its own (sysinfo blocks and
//! needs time between CPU readings); the session reads the latest sample.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use sysinfo::{CpuRefreshKind, MemoryRefreshKind, RefreshKind, System};

#[derive(Clone, Copy, Debug, Default)]
pub struct Sample {
    pub cpu_percent: f32,
    pub memory_used_bytes: u64,
    pub memory_total_bytes: u64,
}

#[derive(Clone, Default)]
pub struct Telemetry {
    latest: Arc<Mutex<Sample>>,
}

impl Telemetry {
    /// Starts sampling every `interval` until the process ends.
    pub fn start(interval: Duration) -> Self {
        let telemetry = Telemetry::default();
        let latest = telemetry.latest.clone();
        let spawned = std::thread::Builder::new()
            .name("telemetry".into())
            .spawn(move || {
                let kind = RefreshKind::nothing()
                    .with_cpu(CpuRefreshKind::nothing().with_usage())
                    .with_memory(MemoryRefreshKind::nothing().with_ram());
                let mut system = match System::new_with_specifics(kind) {
                    Ok(system) => system,
                    Err(e) => {
                        tracing::warn!(error = %e, "no system telemetry; heartbeats carry zeros");
                        return;
                    }
                };
                loop {
                    std::thread::sleep(interval.max(sysinfo::MINIMUM_CPU_UPDATE_INTERVAL));
                    system.refresh_specifics(kind);
                    let sample = Sample {
                        cpu_percent: system.global_cpu_usage(),
                        memory_used_bytes: system.used_memory(),
                        memory_total_bytes: system.total_memory(),
                    };
                    if let Ok(mut slot) = latest.lock() {
                        *slot = sample;
                    }
                }
            });
        if let Err(e) = spawned {
            tracing::warn!(error = %e, "telemetry thread did not start; heartbeats carry zeros");
        }
        telemetry
    }

    pub fn latest(&self) -> Sample {
        self.latest.lock().map(|s| *s).unwrap_or_default()
    }
}

/// This machine's cores and memory, for an agent not told its capacity.
pub fn capacity() -> (u32, u64) {
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get() as u32);
    let kind = RefreshKind::nothing().with_memory(MemoryRefreshKind::nothing().with_ram());
    let memory = System::new_with_specifics(kind).map_or(0, |s| s.total_memory());
    (cores, memory)
}

/// This machine's name, as other nodes would reach it.
pub fn hostname() -> String {
    System::host_name().unwrap_or_else(|_| "localhost".into())
}
