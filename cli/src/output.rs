//! Tables for people, JSON for scripts.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use clap::ValueEnum;
use comfy_table::{Table, presets};
use serde::Serialize;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum Format {
    Table,
    Json,
}

pub fn table(header: &[&str]) -> Table {
    let mut table = Table::new();
    table
        .load_preset(presets::NOTHING)
        .set_header(header.to_vec());
    table
}

pub fn json<T: Serialize + ?Sized>(value: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(value)?);
    Ok(())
}

/// "12s ago", "3m ago"; "-" for never.
pub fn ago(ms: i64) -> String {
    if ms <= 0 {
        return "-".into();
    }
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    format!("{} ago", short_duration((now - ms).max(0)))
}

/// 850ms, 12.3s, 4m05s, 2h10m.
pub fn short_duration(ms: i64) -> String {
    let d = Duration::from_millis(ms.max(0) as u64);
    let secs = d.as_secs();
    if secs < 1 {
        format!("{}ms", d.as_millis())
    } else if secs < 60 {
        format!("{:.1}s", d.as_secs_f64())
    } else if secs < 3600 {
        format!("{}m{:02}s", secs / 60, secs % 60)
    } else {
        format!("{}h{:02}m", secs / 3600, (secs % 3600) / 60)
    }
}

/// Bytes as people read them (`520 MiB`, `56 GiB`): the coordinator's words.
pub fn bytes(n: u64) -> String {
    shoal_coordinator::model::human_bytes(n)
}
