//! Parallel (batch inference) jobs, the decision core: the input is cut into
//! mini-batches with stable indexes and deterministic boundaries; workers lease
//! them one at a time; a result is taken only from the lease it was handed out
//! with (so a retried, timed-out or orphaned run can never add rows twice);
//! failures are retried up to `max_retries` and counted against the thresholds.
//! No I/O here: the control loop persists what changes.

use std::collections::VecDeque;
use std::io::Read;

use serde::{Deserialize, Serialize};

use crate::model::Millis;
use crate::{Error, Result};

/// After its own timeout, how long a lease may stay silent before the coordinator
/// takes the mini-batch back (the agent is expected to report the timeout itself).
pub const LEASE_GRACE_MS: i64 = 30_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InputType {
    /// One item per line of a file (CSV, JSONL...).
    UriFile,
    /// One item per file of a folder.
    UriFolder,
    /// One item per row of a table (CSV, or an MLTable's delimited files): each
    /// mini-batch is a CSV with the header (run_function: a pandas DataFrame).
    Tabular,
}

impl InputType {
    pub fn parse(text: &str) -> Result<Self> {
        match text {
            "uri_file" => Ok(InputType::UriFile),
            "uri_folder" => Ok(InputType::UriFolder),
            "tabular" => Ok(InputType::Tabular),
            other => Err(Error::invalid(
                "inputs.data.type",
                format!("`{other}` is not uri_file, uri_folder or tabular"),
            )),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            InputType::UriFile => "uri_file",
            InputType::UriFolder => "uri_folder",
            InputType::Tabular => "tabular",
        }
    }
}

/// Items (lines or files) per mini-batch, or bytes per mini-batch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BatchSize {
    Items(u64),
    Bytes(u64),
}

impl BatchSize {
    /// `10` (items), or `"1mb"`, `"512kb"`, `"2gb"`, `"100b"` (bytes, 1 kb = 1024 b).
    pub fn parse(text: &str) -> Result<Self> {
        let field = "mini_batch_size";
        let lower = text.trim().to_ascii_lowercase();
        if let Ok(n) = lower.parse::<i64>() {
            return match u64::try_from(n) {
                Ok(n) if n > 0 => Ok(BatchSize::Items(n)),
                _ => Err(Error::invalid(field, format!("{n}: must be above 0"))),
            };
        }
        let (number, unit) = lower.split_at(
            lower
                .find(|c: char| c.is_ascii_alphabetic())
                .unwrap_or(lower.len()),
        );
        let scale: u64 = match unit.trim() {
            "b" => 1,
            "kb" | "k" => 1 << 10,
            "mb" | "m" => 1 << 20,
            "gb" | "g" => 1 << 30,
            _ => {
                return Err(Error::invalid(
                    field,
                    format!("`{text}` is neither a count nor a size like 1mb, 512kb or 100b"),
                ));
            }
        };
        let value: f64 = number.trim().parse().map_err(|_| {
            Error::invalid(
                field,
                format!("`{text}` is neither a count nor a size like 1mb, 512kb or 100b"),
            )
        })?;
        let bytes = value * scale as f64;
        if !(bytes >= 1.0 && bytes < u64::MAX as f64) {
            return Err(Error::invalid(
                field,
                format!("`{text}` must be at least 1 byte"),
            ));
        }
        Ok(BatchSize::Bytes(bytes as u64))
    }
}

/// What a parallel job asks for (its input lives in the mini-batches).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ParallelSpec {
    pub input_type: InputType,
    /// Where the input came from, for people.
    pub input_name: String,
    pub size: BatchSize,
    pub concurrency: u32,
    pub max_retries: u32,
    pub timeout_seconds: Option<u64>,
    /// Failed mini-batches tolerated; -1: any number.
    pub error_threshold: i64,
    pub allowed_failed_percent: u32,
    /// The output file of result rows; None: summary only.
    pub append_row_to: Option<String>,
    /// One long-lived process per worker, fed mini-batches on its stdin (task
    /// mode `worker`); otherwise the command runs once per mini-batch.
    #[serde(default)]
    pub worker_mode: bool,
    /// The named output `append_row_to` is in (run_function's
    /// `${{outputs.NAME}}/FILE`): the rows are that output's file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rows_output: Option<String>,
    /// A tabular input's: its delimiter, and the columns whose values make one
    /// mini-batch each (none: `size` rows a mini-batch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub table: Option<TableSpec>,
    /// Failed items tolerated (`error_threshold`; -1: any): those a run gave no
    /// result for, and those of failed mini-batches. None: not counted.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub item_error_threshold: Option<i64>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableSpec {
    pub delimiter: u8,
    #[serde(default)]
    pub partition_keys: Vec<String>,
}

/// Cuts a parallel job's input as its spec says (a table by rows or by its
/// partition keys; a file by lines; a folder by files).
pub fn cut(spec: &ParallelSpec, input: &[u8]) -> Result<Vec<Cut>> {
    match (&spec.table, spec.input_type) {
        (Some(table), InputType::Tabular) => partition_table(input, spec.size, table),
        (None, InputType::Tabular) => {
            Err(Error::Internal("a tabular input without its table".into()))
        }
        (_, input_type) => partition(input_type, input, spec.size),
    }
}

/// A table's rows cut into mini-batches, each a CSV with the header: `size` rows
/// (or bytes) a mini-batch, or one mini-batch per value of the partition keys (in
/// the order each value first appears).
pub fn partition_table(input: &[u8], size: BatchSize, table: &TableSpec) -> Result<Vec<Cut>> {
    let bad = |e: csv::Error| Error::invalid("input_data", format!("not a readable table: {e}"));
    let mut reader = csv::ReaderBuilder::new()
        .delimiter(table.delimiter)
        .from_reader(input);
    let header = reader.byte_headers().map_err(bad)?.clone();
    let positions = table
        .partition_keys
        .iter()
        .map(|key| {
            header
                .iter()
                .position(|h| h == key.as_bytes())
                .ok_or_else(|| {
                    let columns: Vec<String> = header
                        .iter()
                        .map(|h| String::from_utf8_lossy(h).into_owned())
                        .collect();
                    Error::invalid(
                        "partition_keys",
                        format!(
                            "`{key}` is not a column; the columns are {}",
                            columns.join(", ")
                        ),
                    )
                })
        })
        .collect::<Result<Vec<usize>>>()?;
    let mut rows = Vec::new();
    for record in reader.byte_records() {
        rows.push(record.map_err(bad)?);
    }
    let groups: Vec<Vec<csv::ByteRecord>> = if positions.is_empty() {
        group(&rows, size, |r| r.as_slice().len() as u64)
    } else {
        let mut order: Vec<Vec<u8>> = Vec::new();
        let mut by_key: std::collections::HashMap<Vec<u8>, Vec<csv::ByteRecord>> =
            std::collections::HashMap::new();
        for row in rows {
            let key: Vec<u8> = positions
                .iter()
                .flat_map(|&p| row.get(p).unwrap_or_default().iter().copied().chain([0]))
                .collect();
            if !by_key.contains_key(&key) {
                order.push(key.clone());
            }
            by_key.entry(key).or_default().push(row);
        }
        order
            .into_iter()
            .filter_map(|k| by_key.remove(&k))
            .collect()
    };
    let mut cuts = Vec::with_capacity(groups.len());
    for rows in groups {
        let mut writer = csv::WriterBuilder::new()
            .delimiter(table.delimiter)
            .from_writer(Vec::new());
        writer.write_byte_record(&header).map_err(bad)?;
        for row in &rows {
            writer.write_byte_record(row).map_err(bad)?;
        }
        let items = writer
            .into_inner()
            .map_err(|e| Error::Internal(format!("writing a mini-batch: {e}")))?;
        cuts.push(Cut {
            items,
            count: rows.len() as u64,
        });
    }
    if cuts.is_empty() {
        return Err(Error::invalid("input_data", "the table has no rows"));
    }
    Ok(cuts)
}

/// An MLTable folder (tar.gz) read as the service reads it: its `paths` (files
/// and folders) with `read_delimited` (delimiter, header, encoding), as one CSV
/// (the header once) and its delimiter. A folder with no MLTable file: its CSV
/// files, sorted. Other transformations are refused, naming them.
pub fn table_of_folder(folder: &[u8]) -> Result<(Vec<u8>, u8)> {
    let files = read_folder(folder)?;
    let find = |name: &str| files.iter().find(|(p, _)| p == name).map(|(_, d)| d);
    let (paths, delimiter): (Vec<String>, u8) = match find("MLTable") {
        None => {
            let mut csvs: Vec<String> = files
                .iter()
                .map(|(p, _)| p.clone())
                .filter(|p| p.ends_with(".csv"))
                .collect();
            csvs.sort();
            (csvs, b',')
        }
        Some(text) => mltable_paths(text, &files)?,
    };
    if paths.is_empty() {
        return Err(Error::invalid(
            "input_data",
            "the folder has no table (no MLTable file, no .csv)",
        ));
    }
    let mut out = Vec::new();
    let mut header: Option<Vec<u8>> = None;
    for path in paths {
        let data = find(&path).ok_or_else(|| {
            Error::invalid(
                "input_data",
                format!("MLTable names `{path}`, not in the folder"),
            )
        })?;
        let text = data
            .strip_prefix(b"\xef\xbb\xbf".as_slice())
            .unwrap_or(data);
        let (first, rest) = match text.iter().position(|b| *b == b'\n') {
            Some(at) => (&text[..=at], &text[at + 1..]),
            None => (text, &[][..]),
        };
        match &header {
            None => {
                out.extend_from_slice(first);
                if !first.ends_with(b"\n") {
                    out.push(b'\n');
                }
                header = Some(first.to_vec());
            }
            Some(h) if h.trim_ascii_end() != first.trim_ascii_end() => {
                return Err(Error::invalid(
                    "input_data",
                    format!(
                        "`{path}` has another header than the first file (all_files_same_headers)"
                    ),
                ));
            }
            Some(_) => {}
        }
        out.extend_from_slice(rest);
        if !rest.is_empty() && !rest.ends_with(b"\n") {
            out.push(b'\n');
        }
    }
    Ok((out, delimiter))
}

/// The files an MLTable reads, in order, and the delimiter.
fn mltable_paths(text: &[u8], files: &[(String, Vec<u8>)]) -> Result<(Vec<String>, u8)> {
    let field = "input_data";
    let doc: serde_json::Value = serde_saphyr::from_str(&String::from_utf8_lossy(text))
        .map_err(|e| Error::invalid(field, format!("its MLTable file: {e}")))?;
    let mut delimiter = b',';
    for step in doc
        .get("transformations")
        .and_then(|t| t.as_array())
        .into_iter()
        .flatten()
    {
        let (name, settings) = match step {
            serde_json::Value::String(name) => (name.as_str(), None),
            serde_json::Value::Object(map) if map.len() == 1 => {
                let (name, settings) = map.iter().next().expect("one");
                (name.as_str(), Some(settings))
            }
            _ => {
                return Err(Error::invalid(
                    field,
                    "an MLTable transformation is a name or {name: settings}",
                ));
            }
        };
        if name != "read_delimited" {
            return Err(Error::invalid(
                field,
                format!(
                    "MLTable transformation `{name}` is not read here; read_delimited is (delimiter, header, encoding)"
                ),
            ));
        }
        let get = |key: &str| settings.and_then(|s| s.get(key)).and_then(|v| v.as_str());
        if let Some(d) = get("delimiter") {
            let d = match d {
                "\\t" => "\t",
                other => other,
            };
            let [byte] = d.as_bytes() else {
                return Err(Error::invalid(
                    field,
                    format!("delimiter `{d}` is not one character"),
                ));
            };
            delimiter = *byte;
        }
        if let Some(header) = get("header")
            && !matches!(header, "all_files_same_headers" | "from_first_file")
        {
            return Err(Error::invalid(
                field,
                format!(
                    "MLTable header `{header}` is not read here; all_files_same_headers and from_first_file are"
                ),
            ));
        }
        if let Some(encoding) = get("encoding")
            && !matches!(
                encoding.to_ascii_lowercase().as_str(),
                "utf8" | "utf-8" | "ascii"
            )
        {
            return Err(Error::invalid(
                field,
                format!("encoding `{encoding}`: utf8 and ascii are read here"),
            ));
        }
    }
    let mut paths = Vec::new();
    for entry in doc
        .get("paths")
        .and_then(|p| p.as_array())
        .into_iter()
        .flatten()
    {
        let clean = |p: &str| p.trim_start_matches("./").trim_end_matches('/').to_string();
        if let Some(file) = entry.get("file").and_then(|f| f.as_str()) {
            paths.push(clean(file));
        } else if let Some(folder) = entry.get("folder").and_then(|f| f.as_str()) {
            let folder = clean(folder);
            let mut inside: Vec<String> = files
                .iter()
                .map(|(p, _)| p.clone())
                .filter(|p| {
                    p.starts_with(&format!("{folder}/")) || folder.is_empty() || folder == "."
                })
                .filter(|p| p != "MLTable")
                .collect();
            inside.sort();
            paths.extend(inside);
        } else {
            return Err(Error::invalid(
                field,
                "MLTable paths here are `file:` or `folder:` (a `pattern:` is not read here)",
            ));
        }
    }
    Ok((paths, delimiter))
}

pub const DEFAULT_MAX_RETRIES: u32 = 3;
pub const MAX_CONCURRENCY: u32 = 64;

impl ParallelSpec {
    pub fn check(&self) -> Result<()> {
        if self.concurrency == 0 || self.concurrency > MAX_CONCURRENCY {
            return Err(Error::invalid(
                "max_concurrency_per_instance",
                format!("must be 1 to {MAX_CONCURRENCY}"),
            ));
        }
        if let Some(timeout) = self.timeout_seconds
            && timeout > crate::model::MAX_TIMEOUT_SECONDS
        {
            return Err(Error::invalid(
                "retry_settings.timeout",
                format!(
                    "{timeout} s is more than a year ({} s); leave it out for no limit",
                    crate::model::MAX_TIMEOUT_SECONDS
                ),
            ));
        }
        if self.allowed_failed_percent > 100 {
            return Err(Error::invalid("allowed_failed_percent", "must be 0 to 100"));
        }
        if self.error_threshold < -1 {
            return Err(Error::invalid(
                "mini_batch_error_threshold",
                "must be -1 (ignore failures) or a count",
            ));
        }
        if let Some(name) = &self.append_row_to
            && (name.is_empty() || name.contains('/') || name.starts_with('.'))
        {
            return Err(Error::invalid(
                "output.append_row_to",
                format!("`{name}` must be a plain file name (results.csv)"),
            ));
        }
        Ok(())
    }
}

/// One mini-batch as cut: its items (the lines, newline-ended, or a tar of the files).
#[derive(Clone, Debug, PartialEq)]
pub struct Cut {
    pub items: Vec<u8>,
    pub count: u64,
}

/// Cuts the input into mini-batches. A file: its lines, in order (a last line
/// without a newline counts). A folder (tar.gz): its files sorted by path.
pub fn partition(input_type: InputType, input: &[u8], size: BatchSize) -> Result<Vec<Cut>> {
    let cuts = match input_type {
        InputType::Tabular => {
            let comma = TableSpec {
                delimiter: b',',
                partition_keys: Vec::new(),
            };
            return partition_table(input, size, &comma);
        }
        InputType::UriFile => {
            let lines: Vec<&[u8]> = input
                .split_inclusive(|b| *b == b'\n')
                .filter(|l| !l.iter().all(|b| b.is_ascii_whitespace()))
                .collect();
            group(&lines, size, |l| l.len() as u64)
                .into_iter()
                .map(|chunk| {
                    let mut items = Vec::new();
                    for line in &chunk {
                        items.extend_from_slice(line);
                        if !line.ends_with(b"\n") {
                            items.push(b'\n');
                        }
                    }
                    Cut {
                        items,
                        count: chunk.len() as u64,
                    }
                })
                .collect()
        }
        InputType::UriFolder => {
            let mut files = read_folder(input)?;
            files.sort_by(|a, b| a.0.cmp(&b.0));
            let groups = group(&files, size, |(_, data)| data.len() as u64);
            let mut cuts = Vec::with_capacity(groups.len());
            for chunk in groups {
                let mut builder = tar::Builder::new(Vec::new());
                for (path, data) in &chunk {
                    let mut header = tar::Header::new_gnu();
                    header.set_size(data.len() as u64);
                    header.set_mode(0o644);
                    header.set_cksum();
                    builder
                        .append_data(&mut header, path, data.as_slice())
                        .map_err(|e| Error::invalid("inputs.data", format!("{path}: {e}")))?;
                }
                let items = builder
                    .into_inner()
                    .map_err(|e| Error::invalid("inputs.data", e.to_string()))?;
                cuts.push(Cut {
                    items,
                    count: chunk.len() as u64,
                });
            }
            cuts
        }
    };
    if cuts.is_empty() {
        return Err(Error::invalid(
            "inputs.data",
            format!(
                "the input has no items (an empty {})",
                match input_type {
                    InputType::UriFolder => "folder",
                    _ => "file",
                }
            ),
        ));
    }
    Ok(cuts)
}

fn group<T: Clone>(items: &[T], size: BatchSize, bytes: impl Fn(&T) -> u64) -> Vec<Vec<T>> {
    let mut groups: Vec<Vec<T>> = Vec::new();
    let mut current: Vec<T> = Vec::new();
    let mut current_bytes = 0u64;
    for item in items {
        current.push(item.clone());
        current_bytes += bytes(item);
        let full = match size {
            BatchSize::Items(n) => current.len() as u64 >= n,
            BatchSize::Bytes(n) => current_bytes >= n,
        };
        if full {
            groups.push(std::mem::take(&mut current));
            current_bytes = 0;
        }
    }
    if !current.is_empty() {
        groups.push(current);
    }
    groups
}

/// The regular files of a tar.gz, with their paths.
fn read_folder(input: &[u8]) -> Result<Vec<(String, Vec<u8>)>> {
    let bad = |e: std::io::Error| {
        Error::invalid("inputs.data", format!("not a readable folder archive: {e}"))
    };
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(input));
    let mut files = Vec::new();
    for entry in archive.entries().map_err(bad)? {
        let mut entry = entry.map_err(bad)?;
        if !entry.header().entry_type().is_file() {
            continue;
        }
        let path = entry.path().map_err(bad)?.to_string_lossy().into_owned();
        let path = path.trim_start_matches("./").to_string();
        let mut data = Vec::new();
        entry.read_to_end(&mut data).map_err(bad)?;
        files.push((path, data));
    }
    Ok(files)
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BatchStatus {
    Pending,
    Running,
    Done,
    Failed,
}

impl BatchStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            BatchStatus::Pending => "pending",
            BatchStatus::Running => "running",
            BatchStatus::Done => "done",
            BatchStatus::Failed => "failed",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Some(match text {
            "pending" => BatchStatus::Pending,
            "running" => BatchStatus::Running,
            "done" => BatchStatus::Done,
            "failed" => BatchStatus::Failed,
            _ => return None,
        })
    }
}

/// One mini-batch's state (its items and rows live in the store only).
#[derive(Clone, Debug, PartialEq)]
pub struct MiniBatch {
    pub index: u32,
    pub items: u64,
    pub status: BatchStatus,
    /// Runs started, retries included.
    pub executions: u32,
    /// Runs that failed or timed out.
    pub failures: u32,
    /// The lease of the run in flight (also kept after it is done: a repeated
    /// report of the same run is acknowledged, not applied twice).
    pub lease: Option<String>,
    pub node: Option<String>,
    pub deadline: Option<Millis>,
    /// Why its last run failed.
    pub message: String,
    /// Items its run gave no result for (run_function), once done.
    pub failed_items: u64,
}

/// What became of a report.
#[derive(Debug, PartialEq, Eq)]
pub enum Reported {
    /// Not the lease in force (a run that was timed out or taken back): ignored.
    Stale,
    /// The same report again (its acknowledgment was lost): already applied.
    Repeat,
    Done,
    Retry,
    Failed,
}

/// A parallel job's mini-batches and the queue of those waiting.
#[derive(Clone, Debug)]
pub struct Batches {
    pub job_id: String,
    pub spec: ParallelSpec,
    pub list: Vec<MiniBatch>,
    pending: VecDeque<u32>,
}

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Progress {
    pub total: u32,
    pub done: u32,
    pub failed: u32,
    pub running: u32,
    pub items_total: u64,
    pub items_done: u64,
    pub items_per_second: f64,
    pub eta_seconds: Option<u64>,
    pub executions: u32,
}

/// How the job ends, once it can.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Completed(String),
    Failed(String),
}

impl Batches {
    pub fn new(job_id: &str, spec: ParallelSpec, counts: &[u64]) -> Self {
        let list = counts
            .iter()
            .enumerate()
            .map(|(index, items)| MiniBatch {
                index: index as u32,
                items: *items,
                status: BatchStatus::Pending,
                executions: 0,
                failures: 0,
                lease: None,
                node: None,
                deadline: None,
                message: String::new(),
                failed_items: 0,
            })
            .collect();
        Self::restore(job_id, spec, list)
    }

    /// From stored state (after a restart: running leases stay in force).
    pub fn restore(job_id: &str, spec: ParallelSpec, mut list: Vec<MiniBatch>) -> Self {
        list.sort_by_key(|b| b.index);
        let pending = list
            .iter()
            .filter(|b| b.status == BatchStatus::Pending)
            .map(|b| b.index)
            .collect();
        Batches {
            job_id: job_id.to_string(),
            spec,
            list,
            pending,
        }
    }

    /// Hands the next waiting mini-batch to a worker on `node`; `secret` (random)
    /// makes its lease unguessable.
    pub fn lease(&mut self, node: &str, secret: &str, now: Millis) -> Option<&MiniBatch> {
        let index = self.pending.pop_front()?;
        let timeout = self.spec.timeout_seconds;
        let job_id = self.job_id.clone();
        let batch = &mut self.list[index as usize];
        batch.status = BatchStatus::Running;
        batch.executions += 1;
        // Unguessable: only the worker it was handed to can report it.
        batch.lease = Some(format!("{job_id}/{index}/{}/{secret}", batch.executions));
        batch.node = Some(node.to_string());
        batch.deadline = timeout.map(|t| {
            let ms = i64::try_from(t).unwrap_or(i64::MAX).saturating_mul(1000);
            now.saturating_add(ms).saturating_add(LEASE_GRACE_MS)
        });
        Some(batch)
    }

    /// `job/index/run/secret` (or `job/index/run`, as earlier versions made them).
    pub fn index_of_lease(&self, lease: &str) -> Option<u32> {
        let index: u32 = lease.split('/').nth(1)?.parse().ok()?;
        self.list.get(index as usize).map(|b| b.index)
    }

    /// A worker's result for `lease`, from a worker on `node`: taken only from the
    /// node the lease was handed to.
    pub fn report(&mut self, lease: &str, node: &str, ok: bool, message: &str) -> Reported {
        let Some(index) = self.index_of_lease(lease) else {
            return Reported::Stale;
        };
        let max_retries = self.spec.max_retries;
        let batch = &mut self.list[index as usize];
        if batch.lease.as_deref() != Some(lease) || batch.node.as_deref() != Some(node) {
            return Reported::Stale;
        }
        match batch.status {
            BatchStatus::Done | BatchStatus::Failed => return Reported::Repeat,
            BatchStatus::Pending => return Reported::Stale,
            BatchStatus::Running => {}
        }
        batch.deadline = None;
        if ok {
            batch.status = BatchStatus::Done;
            return Reported::Done;
        }
        batch.failures += 1;
        batch.message = message.to_string();
        if batch.failures > max_retries {
            batch.status = BatchStatus::Failed;
            Reported::Failed
        } else {
            batch.status = BatchStatus::Pending;
            batch.lease = None;
            self.pending.push_back(index);
            Reported::Retry
        }
    }

    /// Runs past their deadline count as failed runs ("timed out").
    pub fn expire(&mut self, now: Millis) -> Vec<(u32, Reported)> {
        let expired: Vec<(String, String)> = self
            .list
            .iter()
            .filter(|b| b.status == BatchStatus::Running && b.deadline.is_some_and(|d| d <= now))
            .filter_map(|b| Some((b.lease.clone()?, b.node.clone()?)))
            .collect();
        expired
            .into_iter()
            .filter_map(|(lease, node)| {
                let index = self.index_of_lease(&lease)?;
                let limit = self.spec.timeout_seconds.unwrap_or(0);
                let outcome = self.report(
                    &lease,
                    &node,
                    false,
                    &format!("timed out after {limit} s (no report)"),
                );
                Some((index, outcome))
            })
            .collect()
    }

    /// Runs in flight on `node` (or anywhere, for None) go back to the queue, not
    /// counted as failures: the node went away, not the mini-batch.
    pub fn take_back(&mut self, node: Option<&str>) -> Vec<u32> {
        let mut taken = Vec::new();
        for batch in self
            .list
            .iter_mut()
            .filter(|b| b.status == BatchStatus::Running)
        {
            if node.is_none_or(|n| batch.node.as_deref() == Some(n)) {
                batch.status = BatchStatus::Pending;
                batch.lease = None;
                batch.deadline = None;
                taken.push(batch.index);
            }
        }
        // Ahead of the never-run ones: they were next anyway.
        for index in taken.iter().rev() {
            self.pending.push_front(*index);
        }
        taken
    }

    pub fn counts(&self) -> (u32, u32, u32) {
        let count = |s| self.list.iter().filter(|b| b.status == s).count() as u32;
        (
            count(BatchStatus::Done),
            count(BatchStatus::Failed),
            count(BatchStatus::Running),
        )
    }

    pub fn settled(&self) -> bool {
        self.list
            .iter()
            .all(|b| matches!(b.status, BatchStatus::Done | BatchStatus::Failed))
    }

    /// The job's end, as soon as it is known: failed the moment failures pass a
    /// threshold, completed (failures listed) once every mini-batch is settled.
    pub fn verdict(&self) -> Option<Verdict> {
        let total = self.list.len() as u32;
        let (done, failed, _) = self.counts();
        let failures = || {
            let named: Vec<String> = self
                .list
                .iter()
                .filter(|b| b.status == BatchStatus::Failed)
                .take(10)
                .map(|b| format!("{} ({} runs: {})", b.index, b.executions, b.message))
                .collect();
            let more = failed.saturating_sub(10);
            let mut text = named.join("; ");
            if more > 0 {
                text.push_str(&format!("; and {more} more"));
            }
            text
        };
        if let Some(limit) = self.spec.item_error_threshold.filter(|t| *t >= 0) {
            let failed_items: u64 = self
                .list
                .iter()
                .map(|b| match b.status {
                    BatchStatus::Done => b.failed_items,
                    BatchStatus::Failed => b.items,
                    _ => 0,
                })
                .sum();
            if failed_items as i64 > limit {
                return Some(Verdict::Failed(format!(
                    "{failed_items} item(s) failed, above error_threshold {limit} ({done} of {total} mini-batches done)"
                )));
            }
        }
        let threshold = self.spec.error_threshold;
        if threshold >= 0 && i64::from(failed) > threshold {
            return Some(Verdict::Failed(format!(
                "{failed} mini-batch(es) failed, above mini_batch_error_threshold {threshold} ({done} of {total} done): {}",
                failures()
            )));
        }
        if u64::from(failed) * 100 > u64::from(self.spec.allowed_failed_percent) * u64::from(total)
        {
            return Some(Verdict::Failed(format!(
                "{failed} of {total} mini-batches failed, above allowed_failed_percent {}: {}",
                self.spec.allowed_failed_percent,
                failures()
            )));
        }
        if !self.settled() {
            return None;
        }
        Some(Verdict::Completed(if failed == 0 {
            format!("{done} of {total} mini-batches done")
        } else {
            format!(
                "{done} of {total} mini-batches done; {failed} failed: {}",
                failures()
            )
        }))
    }

    pub fn progress(&self, started: Millis, now: Millis) -> Progress {
        let (done, failed, running) = self.counts();
        let items_total: u64 = self.list.iter().map(|b| b.items).sum();
        let items_done: u64 = self
            .list
            .iter()
            .filter(|b| b.status == BatchStatus::Done)
            .map(|b| b.items)
            .sum();
        let settled_items: u64 = self
            .list
            .iter()
            .filter(|b| matches!(b.status, BatchStatus::Done | BatchStatus::Failed))
            .map(|b| b.items)
            .sum();
        let seconds = if started > 0 {
            (now - started).max(1) as f64 / 1000.0
        } else {
            0.0
        };
        let rate = if seconds > 0.0 {
            settled_items as f64 / seconds
        } else {
            0.0
        };
        let remaining = items_total - settled_items;
        Progress {
            total: self.list.len() as u32,
            done,
            failed,
            running,
            items_total,
            items_done,
            items_per_second: rate,
            eta_seconds: (rate > 0.0).then(|| (remaining as f64 / rate).ceil() as u64),
            executions: self.list.iter().map(|b| b.executions).sum(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> ParallelSpec {
        ParallelSpec {
            input_type: InputType::UriFile,
            input_name: "rows.csv".into(),
            size: BatchSize::Items(2),
            concurrency: 2,
            max_retries: 1,
            timeout_seconds: Some(10),
            error_threshold: -1,
            allowed_failed_percent: 100,
            append_row_to: Some("results.csv".into()),
            worker_mode: false,
            rows_output: None,
            table: None,
            item_error_threshold: None,
        }
    }

    #[test]
    fn absurd_timeouts_are_refused_and_never_overflow() {
        let mut absurd = spec();
        absurd.timeout_seconds = Some(u64::MAX);
        assert!(absurd.check().is_err());
        // Even unchecked, a lease's deadline saturates instead of overflowing.
        let mut batches = Batches::new("job-1", absurd, &[1]);
        let lease = batches.lease("n1", "s3cr3t", i64::MAX - 5).expect("lease");
        assert_eq!(lease.deadline, Some(i64::MAX));
    }

    #[test]
    fn sizes_are_counts_or_bytes() {
        assert_eq!(BatchSize::parse("10").unwrap(), BatchSize::Items(10));
        assert_eq!(BatchSize::parse("1mb").unwrap(), BatchSize::Bytes(1 << 20));
        assert_eq!(
            BatchSize::parse("512KB").unwrap(),
            BatchSize::Bytes(512 << 10)
        );
        assert_eq!(BatchSize::parse("100b").unwrap(), BatchSize::Bytes(100));
        for bad in ["0", "-3", "1xb", "mb", "0kb", ""] {
            assert!(BatchSize::parse(bad).is_err(), "{bad} accepted");
        }
    }

    #[test]
    fn a_file_is_cut_by_lines_or_bytes_deterministically() {
        let input = b"a\nbb\n\nccc\ndddd";
        let cuts = partition(InputType::UriFile, input, BatchSize::Items(2)).unwrap();
        assert_eq!(cuts.len(), 2);
        assert_eq!(cuts[0].items, b"a\nbb\n");
        assert_eq!(cuts[1].items, b"ccc\ndddd\n");
        assert_eq!(cuts.iter().map(|c| c.count).sum::<u64>(), 4);
        let by_bytes = partition(InputType::UriFile, input, BatchSize::Bytes(5)).unwrap();
        assert_eq!(by_bytes.len(), 2, "{by_bytes:?}");
        assert_eq!(
            partition(InputType::UriFile, input, BatchSize::Items(2)).unwrap(),
            cuts
        );
        assert!(partition(InputType::UriFile, b"\n\n", BatchSize::Items(1)).is_err());
    }

    fn folder(files: &[(&str, &str)]) -> Vec<u8> {
        let mut builder = tar::Builder::new(flate2::write::GzEncoder::new(
            Vec::new(),
            flate2::Compression::fast(),
        ));
        for (name, text) in files {
            let mut header = tar::Header::new_gnu();
            header.set_size(text.len() as u64);
            header.set_mode(0o644);
            header.set_cksum();
            builder
                .append_data(&mut header, name, text.as_bytes())
                .unwrap();
        }
        builder.into_inner().unwrap().finish().unwrap()
    }

    #[test]
    fn items_without_a_result_and_failed_mini_batches_count_against_error_threshold() {
        let mut spec = spec();
        spec.item_error_threshold = Some(3);
        spec.max_retries = 0;
        let mut batches = Batches::new("job-1", spec, &[2, 2, 2]);
        let first = batches
            .lease("n1", "s", 0)
            .expect("a lease")
            .lease
            .clone()
            .expect("lease");
        assert_eq!(batches.report(&first, "n1", true, ""), Reported::Done);
        batches.list[0].failed_items = 1;
        let second = batches
            .lease("n1", "s", 0)
            .expect("a lease")
            .lease
            .clone()
            .expect("lease");
        assert_eq!(
            batches.report(&second, "n1", false, "boom"),
            Reported::Failed
        );
        // 1 without a result + 2 of a failed mini-batch = 3: within the threshold.
        assert_eq!(batches.verdict(), None);
        let third = batches
            .lease("n1", "s", 0)
            .expect("a lease")
            .lease
            .clone()
            .expect("lease");
        assert_eq!(batches.report(&third, "n1", true, ""), Reported::Done);
        batches.list[2].failed_items = 1;
        match batches.verdict() {
            Some(Verdict::Failed(why)) => {
                assert!(
                    why.starts_with("4 item(s) failed, above error_threshold 3"),
                    "{why}"
                )
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_table_is_cut_by_rows_or_by_its_partition_keys_each_with_the_header() {
        let table = "store,item,qty\nb,\"x, y\",1\na,z,2\nb,\"multi\nline\",3\na,w,4\nc,v,5\n";
        let rows = TableSpec {
            delimiter: b',',
            partition_keys: Vec::new(),
        };
        let cuts = partition_table(table.as_bytes(), BatchSize::Items(2), &rows).unwrap();
        assert_eq!(cuts.iter().map(|c| c.count).collect::<Vec<_>>(), [2, 2, 1]);
        assert_eq!(
            String::from_utf8(cuts[1].items.clone()).unwrap(),
            "store,item,qty\nb,\"multi\nline\",3\na,w,4\n",
            "a quoted newline stays inside its row"
        );
        let by_store = TableSpec {
            delimiter: b',',
            partition_keys: vec!["store".into()],
        };
        let cuts = partition_table(table.as_bytes(), BatchSize::Items(100), &by_store).unwrap();
        assert_eq!(cuts.iter().map(|c| c.count).collect::<Vec<_>>(), [2, 2, 1]);
        assert_eq!(
            String::from_utf8(cuts[1].items.clone()).unwrap(),
            "store,item,qty\na,z,2\na,w,4\n",
            "one mini-batch per store, in the order each first appears"
        );
        let unknown = TableSpec {
            delimiter: b',',
            partition_keys: vec!["shop".into()],
        };
        let err = partition_table(table.as_bytes(), BatchSize::Items(1), &unknown).unwrap_err();
        assert!(
            err.to_string()
                .contains("`shop` is not a column; the columns are store, item, qty"),
            "{err}"
        );
        assert!(partition_table(b"a,b\n", BatchSize::Items(1), &rows).is_err());
    }

    #[test]
    fn an_mltable_folder_is_read_as_the_service_reads_it() {
        let mltable = "paths:\n  - file: ./part1.tsv\n  - folder: ./more\ntransformations:\n  - read_delimited:\n      delimiter: \"\\t\"\n      header: all_files_same_headers\n      encoding: utf8\n";
        let gz = folder(&[
            ("MLTable", mltable),
            ("part1.tsv", "a\tb\n1\t2\n"),
            ("more/part3.tsv", "a\tb\n5\t6"),
            ("more/part2.tsv", "a\tb\n3\t4\n"),
        ]);
        let (table, delimiter) = table_of_folder(&gz).unwrap();
        assert_eq!(delimiter, b'\t');
        assert_eq!(
            String::from_utf8(table).unwrap(),
            "a\tb\n1\t2\n3\t4\n5\t6\n"
        );
        // A folder without an MLTable: its CSV files.
        let plain = folder(&[("y.csv", "k\n2\n"), ("x.csv", "k\n1\n"), ("notes.txt", "-")]);
        assert_eq!(
            table_of_folder(&plain).unwrap(),
            (b"k\n1\n2\n".to_vec(), b',')
        );
        let other = folder(&[(
            "MLTable",
            "paths: [{file: a.csv}]\ntransformations: [{read_parquet: {}}]\n",
        )]);
        let err = table_of_folder(&other).unwrap_err();
        assert!(
            err.to_string().contains("`read_parquet` is not read here"),
            "{err}"
        );
        let headers = folder(&[("a.csv", "k\n1\n"), ("b.csv", "j\n2\n")]);
        assert!(
            table_of_folder(&headers)
                .unwrap_err()
                .to_string()
                .contains("another header")
        );
    }

    #[test]
    fn a_folder_is_cut_by_files_in_path_order() {
        let mut builder = tar::Builder::new(flate2::write::GzEncoder::new(
            Vec::new(),
            flate2::Compression::fast(),
        ));
        for name in ["b.txt", "a.txt", "c.txt"] {
            let mut header = tar::Header::new_gnu();
            header.set_size(1);
            header.set_mode(0o644);
            header.set_cksum();
            builder.append_data(&mut header, name, &b"x"[..]).unwrap();
        }
        let gz = builder.into_inner().unwrap().finish().unwrap();
        let cuts = partition(InputType::UriFolder, &gz, BatchSize::Items(2)).unwrap();
        assert_eq!(cuts.len(), 2);
        let names = |cut: &Cut| -> Vec<String> {
            tar::Archive::new(cut.items.as_slice())
                .entries()
                .unwrap()
                .map(|e| e.unwrap().path().unwrap().to_string_lossy().into_owned())
                .collect()
        };
        assert_eq!(names(&cuts[0]), ["a.txt", "b.txt"]);
        assert_eq!(names(&cuts[1]), ["c.txt"]);
    }

    #[test]
    fn only_the_lease_in_force_is_taken_and_failures_retry_then_fail() {
        let mut batches = Batches::new("job-1", spec(), &[2, 2]);
        let first = batches
            .lease("n1", "s3cr3t", 0)
            .unwrap()
            .lease
            .clone()
            .unwrap();
        let second = batches
            .lease("n2", "s3cr3t", 0)
            .unwrap()
            .lease
            .clone()
            .unwrap();
        assert!(batches.lease("n1", "s3cr3t", 0).is_none());
        // Another node cannot report a lease it was not handed, nor guess one.
        assert_eq!(batches.report(&first, "n2", true, ""), Reported::Stale);
        let guessed = first.rsplit_once('/').unwrap().0;
        assert_eq!(batches.report(guessed, "n1", true, ""), Reported::Stale);
        assert_eq!(batches.report(&first, "n1", true, ""), Reported::Done);
        assert_eq!(batches.report(&first, "n1", true, ""), Reported::Repeat);
        // Fails once: retried under a new lease; the old one is stale.
        assert_eq!(
            batches.report(&second, "n2", false, "exit 1"),
            Reported::Retry
        );
        assert_eq!(batches.report(&second, "n2", true, ""), Reported::Stale);
        let retry = batches
            .lease("n1", "s3cr3t", 0)
            .unwrap()
            .lease
            .clone()
            .unwrap();
        assert_ne!(retry, second);
        assert_eq!(
            batches.report(&retry, "n1", false, "exit 1"),
            Reported::Failed
        );
        let verdict = batches.verdict().unwrap();
        assert!(
            matches!(&verdict, Verdict::Completed(r) if r.contains("1 of 2") && r.contains("1 (2 runs: exit 1)")),
            "{verdict:?}"
        );
        let progress = batches.progress(0, 2000);
        assert_eq!(
            (progress.done, progress.failed, progress.executions),
            (1, 1, 3)
        );
    }

    #[test]
    fn thresholds_fail_the_job_as_soon_as_they_are_passed() {
        let mut strict = spec();
        strict.max_retries = 0;
        strict.error_threshold = 0;
        let mut batches = Batches::new("job-1", strict, &[1, 1, 1]);
        let lease = batches
            .lease("n1", "s3cr3t", 0)
            .unwrap()
            .lease
            .clone()
            .unwrap();
        assert_eq!(batches.verdict(), None);
        batches.report(&lease, "n1", false, "boom");
        assert!(
            matches!(batches.verdict(), Some(Verdict::Failed(r)) if r.contains("mini_batch_error_threshold 0"))
        );

        let mut percent = spec();
        percent.max_retries = 0;
        percent.allowed_failed_percent = 50;
        let mut batches = Batches::new("job-2", percent, &[1, 1, 1, 1]);
        for _ in 0..2 {
            let lease = batches
                .lease("n1", "s3cr3t", 0)
                .unwrap()
                .lease
                .clone()
                .unwrap();
            batches.report(&lease, "n1", false, "boom");
        }
        assert_eq!(batches.verdict(), None, "2 of 4 is 50%: allowed");
        let lease = batches
            .lease("n1", "s3cr3t", 0)
            .unwrap()
            .lease
            .clone()
            .unwrap();
        batches.report(&lease, "n1", false, "boom");
        assert!(
            matches!(batches.verdict(), Some(Verdict::Failed(r)) if r.contains("allowed_failed_percent 50"))
        );
    }

    #[test]
    fn lost_nodes_give_their_runs_back_and_silent_runs_time_out() {
        let mut batches = Batches::new("job-1", spec(), &[1, 1, 1]);
        let on_n1 = batches
            .lease("n1", "s3cr3t", 0)
            .unwrap()
            .lease
            .clone()
            .unwrap();
        batches.lease("n2", "s3cr3t", 0).unwrap();
        assert_eq!(batches.take_back(Some("n1")), vec![0]);
        assert_eq!(
            batches.report(&on_n1, "n1", true, ""),
            Reported::Stale,
            "a taken-back run's rows are ignored"
        );
        assert_eq!(batches.list[0].failures, 0);
        assert_eq!(
            batches.lease("n2", "s3cr3t", 0).unwrap().index,
            0,
            "taken-back runs go first"
        );
        let expired = batches.expire(10_000 + LEASE_GRACE_MS);
        assert_eq!(expired.len(), 2, "{expired:?}");
        assert!(
            batches
                .list
                .iter()
                .take(2)
                .all(|b| b.failures == 1 && b.message.contains("timed out"))
        );
    }
}
