//! The `process` runtime: the job's command as a child process in a process group
//! of its own, so cancel and timeout reach every process it started.

use std::time::Duration;

use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use tokio::io::AsyncReadExt;
use tokio::sync::watch;
use tracing::{debug, warn};

use super::{EventSink, Outcome, RunFuture, RunSpec, Runtime, Stop};

#[derive(Clone, Debug, Default)]
pub struct ProcessRuntime {
    /// The unprivileged user jobs run as (None: the agent's own user).
    pub run_as: Option<RunAs>,
}

/// A user to run jobs as.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RunAs {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
}

impl RunAs {
    /// Looks `name` up in the user database.
    pub fn lookup(name: &str) -> Result<Self, String> {
        match nix::unistd::User::from_name(name) {
            Ok(Some(user)) => Ok(RunAs {
                name: name.to_string(),
                uid: user.uid.as_raw(),
                gid: user.gid.as_raw(),
            }),
            Ok(None) => Err(format!("no user `{name}` on this machine")),
            Err(e) => Err(format!("cannot look up user `{name}`: {e}")),
        }
    }

    /// The command runs as this user (and its group, with no others).
    pub fn apply(&self, command: &mut tokio::process::Command) {
        command
            .uid(self.uid)
            .gid(self.gid)
            .env("USER", &self.name)
            .env("LOGNAME", &self.name);
    }

    /// Gives `dir` and everything in it to this user (the job writes its outputs).
    pub fn own(&self, dir: &std::path::Path) -> std::io::Result<()> {
        let (uid, gid) = (
            Some(nix::unistd::Uid::from_raw(self.uid)),
            Some(nix::unistd::Gid::from_raw(self.gid)),
        );
        nix::unistd::chown(dir, uid, gid).map_err(std::io::Error::from)?;
        if dir.is_dir() && !dir.is_symlink() {
            for entry in std::fs::read_dir(dir)? {
                self.own(&entry?.path())?;
            }
        }
        Ok(())
    }
}

impl Runtime for ProcessRuntime {
    fn name(&self) -> &'static str {
        "process"
    }

    fn run(
        &self,
        spec: RunSpec,
        sink: EventSink,
        stop: watch::Receiver<Option<Stop>>,
    ) -> RunFuture {
        Box::pin(run(spec, sink, stop, self.run_as.clone()))
    }
}

/// If the agent dies, the child dies with it rather than running on unsupervised
/// (and again, elsewhere, once its attempt is requeued).
pub(crate) fn die_with_agent(command: &mut tokio::process::Command) {
    // SAFETY: runs between fork and exec, and calls only prctl(2), which is
    // async-signal-safe; it touches no memory of the parent.
    #[allow(unsafe_code)]
    unsafe {
        command.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from)
        });
    }
}

pub(crate) fn signal_group(pid: Pid, signal: Signal) {
    // ESRCH: the whole group is gone already.
    let _ = killpg(pid, signal);
}

async fn pump(mut reader: super::spawn::Output, stream: &'static str, sink: EventSink) {
    // Most short jobs write nothing: the first read, which sees the end of
    // those, needs no buffer of its own.
    let mut first = [0u8; 512];
    match reader.read(&mut first).await {
        Ok(0) | Err(_) => return,
        Ok(n) => sink.log(stream, first[..n].to_vec()),
    }
    // Not zeroed: `read_buf` writes only into what it reads.
    let mut buffer = Vec::with_capacity(64 * 1024);
    loop {
        match reader.read_buf(&mut buffer).await {
            Ok(0) | Err(_) => return,
            Ok(_) => {
                sink.log(stream, buffer.clone());
                buffer.clear();
            }
        }
    }
}

async fn run(
    spec: RunSpec,
    sink: EventSink,
    mut stop: watch::Receiver<Option<Stop>>,
    run_as: Option<RunAs>,
) -> Outcome {
    let Some(program) = spec.argv.first() else {
        return Outcome::failed("the job has an empty command");
    };
    let started = super::spawn::spawn(&super::spawn::SpawnSpec {
        program,
        args: &spec.argv[1..],
        env: &spec.env,
        cwd: &spec.cwd,
        user: run_as.as_ref(),
    });
    let (mut child, stdout, stderr) = match started {
        Ok(started) => started,
        Err(super::spawn::SpawnError::NotFound) => {
            return Outcome {
                exit_code: Some(127),
                outcome: "failed",
                message: format!(
                    "cannot start `{program}`: not found (is it installed on the node and on PATH?)"
                ),
            };
        }
        Err(super::spawn::SpawnError::Other(e)) => {
            return Outcome {
                exit_code: Some(127),
                outcome: "failed",
                message: format!("cannot start `{program}`: {e}"),
            };
        }
    };
    let pid = child.pid as u32;
    let group = Pid::from_raw(pid as i32);
    sink.started(pid);
    let pumps = [(stdout, "stdout"), (stderr, "stderr")]
        .map(|(reader, stream)| tokio::spawn(pump(reader, stream, sink.clone())));

    let timeout = async {
        match spec.timeout {
            Some(limit) => tokio::time::sleep(limit).await,
            None => std::future::pending().await,
        }
    };
    let stop_asked = async {
        loop {
            if let Some(reason) = stop.borrow_and_update().clone() {
                return reason;
            }
            if stop.changed().await.is_err() {
                return std::future::pending().await;
            }
        }
    };
    // A memory limit is watched: the group's resident memory, every 100 ms.
    let over_memory = async {
        let Some(limit) = spec.memory_limit else {
            return std::future::pending().await;
        };
        loop {
            tokio::time::sleep(Duration::from_millis(100)).await;
            let used = tokio::task::spawn_blocking(move || {
                crate::telemetry::group_resident_bytes(group.as_raw())
            })
            .await
            .unwrap_or(0);
            if used > limit {
                return (limit, used);
            }
        }
    };
    enum End {
        Exited(std::io::Result<std::process::ExitStatus>),
        TimedOut,
        Stopped(Stop),
        OverMemory(u64, u64),
    }
    let end = tokio::select! {
        status = child.wait() => End::Exited(status),
        _ = timeout => End::TimedOut,
        reason = stop_asked => End::Stopped(reason),
        (limit, used) = over_memory => End::OverMemory(limit, used),
    };
    let (status, outcome, message) = match end {
        End::Exited(status) => (status, None, String::new()),
        End::OverMemory(limit, used) => {
            // As the kernel's OOM killer would: at once, no grace.
            warn!(attempt = %spec.slot.attempt_id, limit, used, "over its memory limit; killing");
            signal_group(group, Signal::SIGKILL);
            (
                child.wait().await,
                Some("failed"),
                super::over_memory(limit, Some(used)),
            )
        }
        other => {
            let grace = match &other {
                End::Stopped(stop) => stop.terms(spec.stop_grace).0,
                _ => spec.stop_grace,
            };
            signal_group(group, Signal::SIGTERM);
            let status = match tokio::time::timeout(grace, child.wait()).await {
                Ok(status) => status,
                Err(_) => {
                    warn!(attempt = %spec.slot.attempt_id, "still running after the grace period; killing");
                    signal_group(group, Signal::SIGKILL);
                    child.wait().await
                }
            };
            match other {
                End::TimedOut => {
                    let limit = spec.timeout.unwrap_or_default().as_secs();
                    (
                        status,
                        Some("timed_out"),
                        format!("ran past its {limit} s timeout"),
                    )
                }
                End::Stopped(stop) => {
                    let (_, outcome, reason) = stop.terms(spec.stop_grace);
                    (status, Some(outcome), reason)
                }
                End::Exited(_) | End::OverMemory(..) => unreachable!("handled above"),
            }
        }
    };
    // Whatever the command left behind in its group goes with it.
    signal_group(group, Signal::SIGKILL);
    for pump in pumps {
        // A process that escaped the group may hold the pipe open: do not wait forever.
        if tokio::time::timeout(Duration::from_secs(2), pump)
            .await
            .is_err()
        {
            debug!(attempt = %spec.slot.attempt_id, "output still open after exit; stopped reading");
        }
    }
    let exit_code = match &status {
        Ok(status) => {
            use std::os::unix::process::ExitStatusExt;
            status.code().or_else(|| status.signal().map(|s| 128 + s))
        }
        Err(_) => None,
    };
    let outcome = outcome.unwrap_or(if exit_code == Some(0) {
        "completed"
    } else {
        "failed"
    });
    let message = match (&status, message.is_empty()) {
        (Err(e), _) => format!("could not wait for the process: {e}"),
        (Ok(status), true) if outcome == "failed" => format!("exited with {status}"),
        _ => message,
    };
    Outcome {
        exit_code,
        outcome,
        message,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::Slot;
    use shoal_proto::v1 as pb;
    use std::collections::BTreeMap;
    use tokio::sync::mpsc;

    fn spec(script: &str, timeout: Option<Duration>) -> RunSpec {
        RunSpec {
            slot: Slot {
                attempt_id: "job-1.1".into(),
                instance: 0,
            },
            argv: vec!["sh".into(), "-c".into(), script.into()],
            env: BTreeMap::from([("GREETING".to_string(), "hello".to_string())]),
            cwd: std::env::temp_dir(),
            timeout,
            stop_grace: Duration::from_millis(500),
            image: None,
            gpus: Vec::new(),
            rank: None,
            mounts: Vec::new(),
            token: String::new(),
            shm_size_bytes: None,
            millicpus: 0,
            memory_limit: None,
        }
    }

    fn sink() -> (EventSink, mpsc::UnboundedReceiver<crate::runtime::Outgoing>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let slot = Slot {
            attempt_id: "job-1.1".into(),
            instance: 0,
        };
        (
            EventSink {
                slot,
                tx,
                gpus: Vec::new(),
                rank_failure: None,
            },
            rx,
        )
    }

    fn output(rx: &mut mpsc::UnboundedReceiver<crate::runtime::Outgoing>) -> String {
        let mut text = Vec::new();
        while let Ok(sent) = rx.try_recv() {
            if let Some(pb::agent_message::Msg::Log(log)) = sent.message.msg {
                text.extend(log.data);
            }
        }
        String::from_utf8_lossy(&text).into_owned()
    }

    #[tokio::test]
    async fn runs_with_env_and_reports_the_exit_code() {
        let (sink, mut rx) = sink();
        let (_stop_tx, stop) = watch::channel(None);
        let outcome = run(spec("echo $GREETING; exit 3", None), sink, stop, None).await;
        assert_eq!(outcome.exit_code, Some(3));
        assert_eq!(outcome.outcome, "failed");
        assert_eq!(output(&mut rx), "hello\n");
    }

    #[tokio::test]
    async fn timeout_kills_the_whole_tree() {
        let (sink, _rx) = sink();
        let (_stop_tx, stop) = watch::channel(None);
        let marker = std::env::temp_dir().join(format!("shoal-tree-{}", std::process::id()));
        let script = format!("(sleep 30; touch {}) & sleep 30", marker.display());
        let outcome = run(
            spec(&script, Some(Duration::from_millis(300))),
            sink,
            stop,
            None,
        )
        .await;
        assert_eq!(outcome.outcome, "timed_out");
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert!(!marker.exists());
        let leftover = std::process::Command::new("pgrep")
            .args(["-f", &format!("touch {}", marker.display())])
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        assert!(!leftover, "a background child survived the timeout");
    }

    #[tokio::test]
    async fn cancel_escalates_to_sigkill_after_the_grace_period() {
        let (sink, _rx) = sink();
        let (stop_tx, stop) = watch::channel(None);
        let started = std::time::Instant::now();
        let task = tokio::spawn(run(spec("trap '' TERM; sleep 30", None), sink, stop, None));
        tokio::time::sleep(Duration::from_millis(200)).await;
        stop_tx.send_replace(Some(Stop::Cancel("test".into())));
        let outcome = task.await.expect("joined");
        assert_eq!(outcome.outcome, "canceled");
        assert_eq!(outcome.exit_code, Some(128 + 9));
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[tokio::test]
    async fn a_missing_program_is_a_clear_failure() {
        let (sink, _rx) = sink();
        let (_stop_tx, stop) = watch::channel(None);
        let mut missing = spec("", None);
        missing.argv = vec!["definitely-not-a-program-xyz".into()];
        let outcome = run(missing, sink, stop, None).await;
        assert_eq!(outcome.exit_code, Some(127));
        assert!(outcome.message.contains("not found"), "{}", outcome.message);
    }

    #[tokio::test]
    async fn a_process_over_its_memory_limit_is_killed_and_says_so() {
        let (sink, _rx) = sink();
        let (_stop_tx, stop) = watch::channel(None);
        // A child of the shell holds 200 MiB (the whole group is counted).
        let mut hungry = spec(
            "python3 -c 'import time; x = bytearray(200 << 20); time.sleep(30)'; echo survived",
            Some(Duration::from_secs(20)),
        );
        hungry.memory_limit = Some(64 << 20);
        let started = std::time::Instant::now();
        let outcome = run(hungry, sink, stop, None).await;
        assert_eq!(outcome.outcome, "failed", "{}", outcome.message);
        assert_eq!(outcome.exit_code, Some(128 + 9));
        assert!(
            outcome.message.contains("over its memory limit of 64 MiB"),
            "{}",
            outcome.message
        );
        assert!(started.elapsed() < Duration::from_secs(10));
        // Within its limit, the same job runs to the end.
        let (modest_sink, _rx) = super::tests::sink();
        let (_stop_tx, stop) = watch::channel(None);
        let mut modest = spec(
            "python3 -c 'import time; x = bytearray(16 << 20); time.sleep(0.5)'",
            None,
        );
        modest.memory_limit = Some(256 << 20);
        let outcome = run(modest, modest_sink, stop, None).await;
        assert_eq!(outcome.outcome, "completed", "{}", outcome.message);
    }
}
