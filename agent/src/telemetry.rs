//! Node telemetry, sampled on a thread of its own (sysinfo and NVML block, and CPU
//! readings need time between them): CPU total and per core, memory, the work dir's
//! disk, network bytes, every GPU, and the CPU time of each job's process group.
//! The session reads the latest sample.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use sysinfo::{CpuRefreshKind, Disks, MemoryRefreshKind, Networks, RefreshKind, System};

use crate::gpu::{GpuInfo, GpuSample, GpuSource};

#[derive(Clone, Debug, Default)]
pub struct Sample {
    pub cpu_percent: f32,
    pub per_core_percent: Vec<f32>,
    pub memory_used_bytes: u64,
    pub memory_total_bytes: u64,
    pub disk_free_bytes: u64,
    pub disk_total_bytes: u64,
    pub network_rx_bytes: u64,
    pub network_tx_bytes: u64,
    pub gpus: Vec<GpuSample>,
    /// Process group → CPU seconds of its processes (and their reaped children).
    pub cpu_seconds_by_group: HashMap<i32, f64>,
}

#[derive(Clone, Default)]
pub struct Telemetry {
    latest: Arc<Mutex<Sample>>,
    /// The node's GPUs, read once at start.
    pub gpus: Vec<GpuInfo>,
    /// Why there are none, when there are none.
    pub gpu_reason: Option<String>,
}

impl Telemetry {
    /// Starts sampling every `interval` until the process ends.
    pub fn start(
        interval: Duration,
        work_dir: PathBuf,
        gpus: Box<dyn GpuSource>,
        gpu_reason: Option<String>,
    ) -> Self {
        let latest: Arc<Mutex<Sample>> = Arc::default();
        let telemetry = Telemetry {
            latest: latest.clone(),
            gpus: gpus.gpus(),
            gpu_reason,
        };
        let mut gpus = gpus;
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
                let mut disks = Disks::new_with_refreshed_list().ok();
                let mut networks = Networks::new_with_refreshed_list().ok();
                loop {
                    std::thread::sleep(interval.max(sysinfo::MINIMUM_CPU_UPDATE_INTERVAL));
                    system.refresh_specifics(kind);
                    let (disk_free_bytes, disk_total_bytes) = disks
                        .as_mut()
                        .map(|d| {
                            d.refresh(true);
                            disk_of(d, &work_dir)
                        })
                        .unwrap_or_default();
                    let (network_rx_bytes, network_tx_bytes) = networks
                        .as_mut()
                        .map(|n| {
                            n.refresh(true);
                            n.values().fold((0, 0), |(rx, tx), data| {
                                (rx + data.total_received(), tx + data.total_transmitted())
                            })
                        })
                        .unwrap_or_default();
                    let sample = Sample {
                        cpu_percent: system.global_cpu_usage(),
                        per_core_percent: system.cpus().iter().map(|c| c.usage()).collect(),
                        memory_used_bytes: system.used_memory(),
                        memory_total_bytes: system.total_memory(),
                        disk_free_bytes,
                        disk_total_bytes,
                        network_rx_bytes,
                        network_tx_bytes,
                        gpus: gpus.sample(),
                        cpu_seconds_by_group: cpu_seconds_by_group(),
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
        self.latest.lock().map(|s| s.clone()).unwrap_or_default()
    }
}

/// Free and total bytes of the disk holding `path` (the longest matching mount).
fn disk_of(disks: &Disks, path: &std::path::Path) -> (u64, u64) {
    disks
        .iter()
        .filter(|d| path.starts_with(d.mount_point()))
        .max_by_key(|d| d.mount_point().as_os_str().len())
        .map_or((0, 0), |d| (d.available_space(), d.total_space()))
}

/// Every process's group and the fields of its `/proc/PID/stat` after the
/// command (state ppid pgrp session tty tpgid flags minflt cminflt majflt
/// cmajflt utime stime cutime cstime priority nice threads itrealvalue
/// starttime vsize rss ...).
fn each_process(mut visit: impl FnMut(i32, &[&str])) {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        if !name.to_string_lossy().bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        if let Some(group) = fields.get(2).and_then(|f| f.parse::<i32>().ok()) {
            visit(group, &fields);
        }
    }
}

fn field(fields: &[&str], index: usize) -> f64 {
    fields
        .get(index)
        .and_then(|f| f.parse::<f64>().ok())
        .unwrap_or(0.0)
}

/// CPU seconds per process group, from /proc (utime + stime + the children reaped).
fn cpu_seconds_by_group() -> HashMap<i32, f64> {
    let ticks = nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .unwrap_or(100) as f64;
    let mut groups = HashMap::new();
    each_process(|group, fields| {
        let seconds = (11..=14).map(|i| field(fields, i)).sum::<f64>() / ticks;
        *groups.entry(group).or_insert(0.0) += seconds;
    });
    groups
}

/// The resident memory of a process group's processes, in bytes, from /proc.
pub fn group_resident_bytes(group: i32) -> u64 {
    let page = nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .unwrap_or(4096) as u64;
    let mut pages = 0u64;
    each_process(|of, fields| {
        if of == group {
            pages += field(fields, 21) as u64;
        }
    });
    pages * page
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_busy_process_group_accumulates_cpu_seconds() {
        use std::os::unix::process::CommandExt;
        let mut child = std::process::Command::new("sh")
            .args(["-c", "i=0; while [ $i -lt 300000 ]; do i=$((i+1)); done"])
            .process_group(0)
            .spawn()
            .expect("spawn");
        let group = child.id() as i32;
        std::thread::sleep(Duration::from_millis(600));
        let seconds = cpu_seconds_by_group().get(&group).copied().unwrap_or(0.0);
        let _ = child.kill();
        let _ = child.wait();
        assert!(
            seconds > 0.1,
            "a busy loop used {seconds} CPU seconds in 0.6 s"
        );
    }
}

/// The interface of the default route (where other machines are reached), from
/// /proc/net/route; None when there is none.
pub fn default_route_interface() -> Option<String> {
    let table = std::fs::read_to_string("/proc/net/route").ok()?;
    default_route_in(&table)
}

fn default_route_in(table: &str) -> Option<String> {
    table.lines().skip(1).find_map(|line| {
        let mut fields = line.split_whitespace();
        let interface = fields.next()?;
        (fields.next()? == "00000000").then(|| interface.to_string())
    })
}

#[cfg(test)]
mod route_tests {
    #[test]
    fn the_default_route_names_its_interface() {
        let table = "Iface\tDestination\tGateway\n\
                     docker0\t000011AC\t00000000\n\
                     eth0\t00000000\t010200C0\n";
        assert_eq!(super::default_route_in(table).as_deref(), Some("eth0"));
        assert_eq!(super::default_route_in("Iface\tDestination\n"), None);
    }
}
