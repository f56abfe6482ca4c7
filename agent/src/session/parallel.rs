//! A parallel job's instance: `workers` workers each ask the coordinator for the
//! next mini-batch when free (so fast nodes do more), run the task command on it
//! with `$SHOAL_MINI_BATCH` naming a file of its items (one per line: the lines
//! of a uri_file input, or the paths of a uri_folder input's files), and report
//! its stdout as the result rows together with the request for the next one. A
//! report is retried until the coordinator answers (it survives a coordinator
//! restart); the coordinator takes it only from the lease in force.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use shoal_proto::v1 as pb;
use tokio::sync::{mpsc, watch};
use tracing::warn;

use super::Agent;
use crate::runtime::{EventSink, Outcome, RunSpec, Stop, process};

/// The worker protocol's end-of-mini-batch lines (task mode `worker`).
const DONE: &[u8] = b"SHOAL_MINI_BATCH_DONE";
const FAILED: &[u8] = b"SHOAL_MINI_BATCH_FAILED";

/// A long-lived worker process (task mode `worker`): Shoal writes the path of each
/// mini-batch's item file as a line on its stdin; it prints the result rows, then
/// `SHOAL_MINI_BATCH_DONE` (or `SHOAL_MINI_BATCH_FAILED reason`) on a line.
struct Resident {
    stdin: std::pin::Pin<Box<dyn tokio::io::AsyncWrite + Send>>,
    /// Its stdout, a line at a time (newline included); closed when it exits.
    lines: mpsc::UnboundedReceiver<Vec<u8>>,
    kill: Kill,
}

enum Kill {
    Group(i32),
    Container(String),
}

/// Splits a byte stream into lines.
#[derive(Default)]
struct LineSplitter {
    partial: Vec<u8>,
}

impl LineSplitter {
    fn push(&mut self, data: &[u8], mut line: impl FnMut(Vec<u8>)) {
        for byte in data {
            self.partial.push(*byte);
            if *byte == b'\n' {
                line(std::mem::take(&mut self.partial));
            }
        }
    }
}

fn worker_mode(spec: &RunSpec) -> bool {
    spec.env
        .get("SHOAL_TASK_MODE")
        .is_some_and(|m| m == "worker")
}

/// Where the instance's code copy is seen by the command (the docker runtime
/// mounts it at /job).
fn seen_at(container: bool, dir: &Path, path: &Path) -> PathBuf {
    match (container, path.strip_prefix(dir)) {
        (true, Ok(rest)) => Path::new("/job").join(rest),
        _ => path.to_path_buf(),
    }
}

impl Agent {
    pub(super) async fn run_parallel(
        &self,
        spec: RunSpec,
        workers: u32,
        sink: EventSink,
        stop: watch::Receiver<Option<Stop>>,
    ) -> Outcome {
        sink.started(std::process::id());
        let mut runs = Vec::new();
        for worker in 0..workers {
            let agent = self.clone();
            let spec = spec.clone();
            let sink = sink.clone();
            let stop = stop.clone();
            runs.push(tokio::spawn(async move {
                agent.worker(spec, worker, sink, stop).await
            }));
        }
        let mut first_bad = None;
        for run in runs {
            match run.await {
                Ok(Ok(())) => {}
                Ok(Err(outcome)) => {
                    first_bad.get_or_insert(outcome);
                }
                Err(e) => {
                    first_bad.get_or_insert(Outcome::failed(format!("a worker panicked: {e}")));
                }
            }
        }
        first_bad.unwrap_or(Outcome {
            exit_code: Some(0),
            outcome: "completed",
            message: String::new(),
        })
    }

    /// One worker: lease, run, report, until the coordinator says it is finished or
    /// the instance is stopped.
    async fn worker(
        &self,
        spec: RunSpec,
        worker: u32,
        sink: EventSink,
        mut stop: watch::Receiver<Option<Stop>>,
    ) -> Result<(), Outcome> {
        let mut report: Option<pb::MiniBatchReport> = None;
        let mut resident: Option<Resident> = None;
        let ended = self
            .work_loop(&spec, worker, &sink, &mut stop, &mut report, &mut resident)
            .await;
        if let Some(resident) = resident.take() {
            self.end_resident(resident).await;
        }
        ended
    }

    async fn work_loop(
        &self,
        spec: &RunSpec,
        worker: u32,
        sink: &EventSink,
        stop: &mut watch::Receiver<Option<Stop>>,
        report: &mut Option<pb::MiniBatchReport>,
        resident: &mut Option<Resident>,
    ) -> Result<(), Outcome> {
        loop {
            if let Some(why) = stop.borrow().clone() {
                let (_, outcome, message) = why.terms(Duration::ZERO);
                return Err(Outcome {
                    exit_code: None,
                    outcome,
                    message,
                });
            }
            let request = pb::WorkRequest {
                node_id: self.config.node_id.clone(),
                attempt_id: spec.slot.attempt_id.clone(),
                instance: spec.slot.instance,
                report: report.clone(),
                want_next: true,
                token: spec.token.clone(),
            };
            let lease = tokio::select! {
                lease = self.ask_for_work(request) => lease,
                _ = stop.changed() => continue,
            };
            let lease = match lease {
                Ok(lease) => lease,
                Err(why) => return Err(Outcome::failed(why)),
            };
            *report = None;
            if lease.finished {
                return Ok(());
            }
            if lease.lease.is_empty() {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(lease.wait_ms.max(50))) => {}
                    _ = stop.changed() => {}
                }
                continue;
            }
            *report = Some(
                self.run_mini_batch(spec, worker, &lease, sink, stop.clone(), resident)
                    .await,
            );
        }
    }

    async fn start_resident(&self, spec: &RunSpec, sink: &EventSink) -> Result<Resident, String> {
        let (tx, lines) = mpsc::unbounded_channel();
        let mut env = spec.env.clone();
        env.insert("SHOAL_WORKER_PROTOCOL".into(), "1".into());
        let spec = RunSpec {
            env,
            ..spec.clone()
        };
        match (&spec.image, &self.docker) {
            (Some(_), Ok(docker)) => {
                let (id, attached) = docker.start_interactive(&spec).await?;
                let mut output = attached.output;
                let sink = sink.clone();
                tokio::spawn(async move {
                    use futures::StreamExt;
                    let mut splitter = LineSplitter::default();
                    while let Some(Ok(chunk)) = output.next().await {
                        use bollard::container::LogOutput;
                        match chunk {
                            LogOutput::StdOut { message } | LogOutput::Console { message } => {
                                splitter.push(&message, |line| {
                                    let _ = tx.send(line);
                                });
                            }
                            LogOutput::StdErr { message } => sink.log("stderr", message.to_vec()),
                            LogOutput::StdIn { .. } => {}
                        }
                    }
                });
                Ok(Resident {
                    stdin: attached.input,
                    lines,
                    kill: Kill::Container(id),
                })
            }
            (Some(image), Err(why)) => Err(format!("cannot run image `{image}`: {why}")),
            (None, _) => {
                let Some(program) = spec.argv.first() else {
                    return Err("the task has an empty command".into());
                };
                let mut command = tokio::process::Command::new(program);
                command
                    .args(&spec.argv[1..])
                    .envs(&spec.env)
                    .current_dir(&spec.cwd)
                    .stdin(std::process::Stdio::piped())
                    .stdout(std::process::Stdio::piped())
                    .stderr(std::process::Stdio::piped())
                    .process_group(0)
                    .kill_on_drop(true);
                if let Some(user) = &self.process.run_as {
                    user.apply(&mut command);
                }
                process::die_with_agent(&mut command);
                let mut child = command
                    .spawn()
                    .map_err(|e| format!("cannot start `{program}`: {e}"))?;
                let group = child.id().and_then(|p| i32::try_from(p).ok()).unwrap_or(0);
                let (Some(stdin), Some(mut stdout), Some(mut stderr)) =
                    (child.stdin.take(), child.stdout.take(), child.stderr.take())
                else {
                    return Err("no pipes to the worker".into());
                };
                tokio::spawn(async move {
                    use tokio::io::AsyncReadExt;
                    let mut splitter = LineSplitter::default();
                    let mut buffer = vec![0u8; 64 * 1024];
                    while let Ok(n) = stdout.read(&mut buffer).await {
                        if n == 0 {
                            break;
                        }
                        splitter.push(&buffer[..n], |line| {
                            let _ = tx.send(line);
                        });
                    }
                    let _ = child.wait().await;
                });
                let sink = sink.clone();
                tokio::spawn(async move {
                    use tokio::io::AsyncReadExt;
                    let mut buffer = vec![0u8; 64 * 1024];
                    while let Ok(n) = stderr.read(&mut buffer).await {
                        if n == 0 {
                            break;
                        }
                        sink.log("stderr", buffer[..n].to_vec());
                    }
                });
                Ok(Resident {
                    stdin: Box::pin(stdin),
                    lines,
                    kill: Kill::Group(group),
                })
            }
        }
    }

    /// Closes its stdin (the end of the work), gives it a moment, then kills it.
    async fn end_resident(&self, mut resident: Resident) {
        use tokio::io::AsyncWriteExt;
        let _ = resident.stdin.shutdown().await;
        drop(resident.stdin);
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            while resident.lines.recv().await.is_some() {}
        })
        .await;
        match resident.kill {
            Kill::Group(group) if group > 0 => process::signal_group(
                nix::unistd::Pid::from_raw(group),
                nix::sys::signal::Signal::SIGKILL,
            ),
            Kill::Group(_) => {}
            Kill::Container(id) => {
                if let Ok(docker) = &self.docker {
                    docker.remove_now(&id).await;
                }
            }
        }
    }

    /// One mini-batch through the resident worker (started if need be). A worker
    /// that dies, hangs past the timeout or is stopped is ended; the next mini-batch
    /// starts a new one.
    async fn run_in_resident(
        &self,
        spec: &RunSpec,
        list: &Path,
        timeout: Option<Duration>,
        sink: &EventSink,
        mut stop: watch::Receiver<Option<Stop>>,
        resident: &mut Option<Resident>,
    ) -> (bool, Vec<u8>, String, u64) {
        use tokio::io::AsyncWriteExt;
        if resident.is_none() {
            match self.start_resident(spec, sink).await {
                Ok(started) => *resident = Some(started),
                Err(why) => return (false, Vec::new(), why, 0),
            }
        }
        let Some(worker) = resident.as_mut() else {
            return (false, Vec::new(), "no worker".into(), 0);
        };
        let mut request = list.to_string_lossy().into_owned().into_bytes();
        request.push(b'\n');
        let written = async {
            worker.stdin.write_all(&request).await?;
            worker.stdin.flush().await
        }
        .await;
        let mut rows = Vec::new();
        let outcome = if let Err(e) = written {
            Err(format!("the worker does not read its stdin: {e}"))
        } else {
            let deadline = timeout.map(|t| tokio::time::Instant::now() + t);
            loop {
                let next = async {
                    match deadline {
                        Some(at) => tokio::time::timeout_at(at, worker.lines.recv()).await.ok(),
                        None => Some(worker.lines.recv().await),
                    }
                };
                tokio::select! {
                    line = next => match line {
                        None => break Err(format!(
                            "timed out after {} s",
                            timeout.map_or(0, |t| t.as_secs())
                        )),
                        Some(None) => break Err("the worker exited".to_string()),
                        Some(Some(line)) => {
                            let bare = line.strip_suffix(b"\n").unwrap_or(&line);
                            // `SHOAL_MINI_BATCH_DONE`, or `... missing=N`: N items
                            // got no result (run_function's run returned fewer).
                            if let Some(rest) = bare.strip_prefix(DONE)
                                && (rest.is_empty() || rest.starts_with(b" "))
                            {
                                let missing = String::from_utf8_lossy(rest)
                                    .trim()
                                    .strip_prefix("missing=")
                                    .and_then(|n| n.parse().ok())
                                    .unwrap_or(0);
                                break Ok(missing);
                            }
                            if let Some(reason) = bare.strip_prefix(FAILED) {
                                // It said so itself: it goes on with the next one.
                                let reason = String::from_utf8_lossy(reason).trim().to_string();
                                let reason = if reason.is_empty() {
                                    "the worker reported a failure".to_string()
                                } else {
                                    reason
                                };
                                return (false, Vec::new(), reason, 0);
                            }
                            rows.extend_from_slice(&line);
                        }
                    },
                    _ = stop.changed() => break Err("stopped".to_string()),
                }
            }
        };
        match outcome {
            Ok(missing) => (true, rows, String::new(), missing),
            Err(why) => {
                if let Some(gone) = resident.take() {
                    self.end_resident(gone).await;
                }
                (false, Vec::new(), why, 0)
            }
        }
    }

    /// Asks until the coordinator answers: a result must not be lost to a
    /// coordinator restart.
    async fn ask_for_work(&self, request: pb::WorkRequest) -> Result<pb::MiniBatchLease, String> {
        self.until_answered(|mut client| {
            let request = request.clone();
            async move { client.work(request).await }
        })
        .await
        .map_err(|status| format!("the coordinator refused this worker: {}", status.message()))
    }

    async fn run_mini_batch(
        &self,
        spec: &RunSpec,
        worker: u32,
        lease: &pb::MiniBatchLease,
        sink: &EventSink,
        stop: watch::Receiver<Option<Stop>>,
        resident: &mut Option<Resident>,
    ) -> pb::MiniBatchReport {
        let container = spec.image.is_some();
        let dir = spec
            .cwd
            .join(".shoal-mini-batches")
            .join(format!("{}-{}", lease.index, lease.execution));
        // Files are written off the async workers.
        let prepared = {
            let (dir, lease, cwd) = (dir.clone(), lease.clone(), spec.cwd.clone());
            tokio::task::spawn_blocking(move || {
                prepare(&dir, &lease, |p| seen_at(container, &cwd, p))
            })
            .await
            .unwrap_or_else(|e| Err(std::io::Error::other(e.to_string())))
        };
        let list = match prepared {
            Ok(list) => list,
            Err(why) => {
                return pb::MiniBatchReport {
                    lease: lease.lease.clone(),
                    ok: false,
                    rows: Vec::new(),
                    message: format!("cannot prepare the mini-batch: {why}"),
                    failed_items: 0,
                };
            }
        };
        if resident.is_some() || worker_mode(spec) {
            let timeout =
                (lease.timeout_seconds > 0).then(|| Duration::from_secs(lease.timeout_seconds));
            let seen = seen_at(container, &spec.cwd, &list);
            let (ok, rows, message, failed_items) = self
                .run_in_resident(spec, &seen, timeout, sink, stop, resident)
                .await;
            let dir_to_remove = dir.clone();
            let _ =
                tokio::task::spawn_blocking(move || std::fs::remove_dir_all(dir_to_remove)).await;
            return pb::MiniBatchReport {
                lease: lease.lease.clone(),
                ok,
                rows,
                message,
                failed_items,
            };
        }
        let mut env: BTreeMap<String, String> = spec.env.clone();
        env.insert(
            "SHOAL_MINI_BATCH".into(),
            seen_at(container, &spec.cwd, &list)
                .to_string_lossy()
                .into_owned(),
        );
        env.insert("SHOAL_MINI_BATCH_ID".into(), lease.index.to_string());
        env.insert(
            "SHOAL_MINI_BATCH_TYPE".into(),
            if lease.folder {
                "uri_folder"
            } else {
                "uri_file"
            }
            .into(),
        );
        env.insert("SHOAL_MINI_BATCH_RUN".into(), lease.execution.to_string());
        env.insert("SHOAL_WORKER".into(), worker.to_string());
        let run = RunSpec {
            env,
            timeout: (lease.timeout_seconds > 0)
                .then(|| Duration::from_secs(lease.timeout_seconds)),
            rank: Some(worker),
            ..spec.clone()
        };
        // stdout is the result; stderr goes to the job's log.
        let (tx, mut rx) = mpsc::unbounded_channel();
        let private = EventSink {
            slot: spec.slot.clone(),
            tx,
            gpus: Vec::new(),
            rank_failure: None,
        };
        let rows = Arc::new(Mutex::new(Vec::new()));
        let collector = {
            let rows = rows.clone();
            let sink = sink.clone();
            tokio::spawn(async move {
                while let Some(sent) = rx.recv().await {
                    if let Some(pb::agent_message::Msg::Log(log)) = sent.message.msg {
                        if log.stream == "stdout" {
                            rows.lock()
                                .unwrap_or_else(|p| p.into_inner())
                                .extend(log.data);
                        } else {
                            sink.log(&log.stream, log.data);
                        }
                    }
                }
            })
        };
        let outcome = self.run_one(run, private, stop).await;
        let _ = collector.await;
        let mut rows = std::mem::take(&mut *rows.lock().unwrap_or_else(|p| p.into_inner()));
        if !rows.is_empty() && !rows.ends_with(b"\n") {
            rows.push(b'\n');
        }
        let dir_to_remove = dir.clone();
        let _ = tokio::task::spawn_blocking(move || std::fs::remove_dir_all(dir_to_remove)).await;
        let ok = outcome.outcome == "completed";
        if !ok {
            warn!(
                index = lease.index,
                run = lease.execution,
                outcome = outcome.outcome,
                "mini-batch failed"
            );
        }
        pb::MiniBatchReport {
            lease: lease.lease.clone(),
            ok,
            rows: if ok { rows } else { Vec::new() },
            failed_items: 0,
            message: match (outcome.outcome, outcome.exit_code) {
                ("completed", _) => String::new(),
                ("timed_out", _) => format!("timed out after {} s", lease.timeout_seconds),
                (_, Some(code))
                    if outcome.message.is_empty() || outcome.message.starts_with("exited with") =>
                {
                    format!("exit code {code}")
                }
                (_, Some(code)) => format!("exit code {code}: {}", outcome.message),
                (what, None) => format!("{what}: {}", outcome.message),
            },
        }
    }
}

/// Writes the mini-batch's items under `dir`; returns the list file's path. Items
/// of a folder are its files, listed by their paths as the command sees them.
fn prepare(
    dir: &Path,
    lease: &pb::MiniBatchLease,
    seen: impl Fn(&Path) -> PathBuf,
) -> std::io::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let list = dir.join("items");
    if !lease.folder {
        std::fs::write(&list, &lease.items)?;
        return Ok(list);
    }
    let files = dir.join("files");
    std::fs::create_dir_all(&files)?;
    let mut archive = tar::Archive::new(lease.items.as_slice());
    let mut lines = String::new();
    for entry in archive.entries()? {
        let mut entry = entry?;
        let path = entry.path()?.into_owned();
        // Inside `files`, never above it.
        if !entry.unpack_in(&files)? {
            continue;
        }
        lines.push_str(&seen(&files.join(&path)).to_string_lossy());
        lines.push('\n');
    }
    std::fs::write(&list, lines)?;
    Ok(list)
}
