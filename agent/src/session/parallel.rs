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
use tracing::{debug, warn};

use super::Agent;
use crate::runtime::{EventSink, Outcome, RunSpec, Stop};

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
            };
            let lease = tokio::select! {
                lease = self.ask_for_work(request) => lease,
                _ = stop.changed() => continue,
            };
            let lease = match lease {
                Ok(lease) => lease,
                Err(why) => return Err(Outcome::failed(why)),
            };
            report = None;
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
            report = Some(
                self.run_mini_batch(&spec, worker, &lease, &sink, stop.clone())
                    .await,
            );
        }
    }

    /// Asks until the coordinator answers: a result must not be lost to a
    /// coordinator restart. Gives up after the agent's give-up time.
    async fn ask_for_work(&self, request: pb::WorkRequest) -> Result<pb::MiniBatchLease, String> {
        let started = std::time::Instant::now();
        let mut backoff = Duration::from_millis(50);
        loop {
            let mut client = self.client.clone();
            match client.work(request.clone()).await {
                Ok(reply) => return Ok(reply.into_inner()),
                Err(status)
                    if matches!(
                        status.code(),
                        tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled
                    ) && started.elapsed() < self.config.give_up_after =>
                {
                    debug!(%status, "coordinator unavailable; asking again");
                    tokio::time::sleep(backoff).await;
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
                Err(status) => {
                    return Err(format!(
                        "the coordinator refused this worker: {}",
                        status.message()
                    ));
                }
            }
        }
    }

    async fn run_mini_batch(
        &self,
        spec: &RunSpec,
        worker: u32,
        lease: &pb::MiniBatchLease,
        sink: &EventSink,
        stop: watch::Receiver<Option<Stop>>,
    ) -> pb::MiniBatchReport {
        let container = spec.image.is_some();
        let dir = spec
            .cwd
            .join(".shoal-mini-batches")
            .join(format!("{}-{}", lease.index, lease.execution));
        let prepared = prepare(&dir, lease, |p| seen_at(container, &spec.cwd, p));
        let list = match prepared {
            Ok(list) => list,
            Err(why) => {
                return pb::MiniBatchReport {
                    lease: lease.lease.clone(),
                    ok: false,
                    rows: Vec::new(),
                    message: format!("cannot prepare the mini-batch: {why}"),
                };
            }
        };
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
                while let Some(message) = rx.recv().await {
                    if let Some(pb::agent_message::Msg::Log(log)) = message.msg {
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
