//! Runtimes start one instance of an attempt and see it to its end: output
//! streamed as it comes, cancel and timeout obeyed (SIGTERM, a grace period, then
//! SIGKILL of the whole tree), and an outcome at the end.

pub mod docker;
pub(crate) mod process;
pub(crate) mod spawn;

use std::collections::BTreeMap;
use std::future::Future;
use std::path::PathBuf;
use std::pin::Pin;
use std::time::Duration;

use shoal_proto::v1 as pb;
use tokio::sync::{mpsc, watch};

pub use docker::DockerRuntime;
pub use process::{ProcessRuntime, RunAs};

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Slot {
    pub attempt_id: String,
    pub instance: u32,
}

#[derive(Clone, Debug)]
pub struct RunSpec {
    pub slot: Slot,
    pub argv: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub cwd: PathBuf,
    pub timeout: Option<Duration>,
    /// Between SIGTERM and SIGKILL.
    pub stop_grace: Duration,
    /// The container image (docker runtime); None for a process.
    pub image: Option<String>,
    /// GPU ids assigned to this instance.
    pub gpus: Vec<String>,
    /// Which process of the instance, when it runs several.
    pub rank: Option<u32>,
    /// Extra read-only mounts (host path, path inside) for the docker runtime.
    pub mounts: Vec<(PathBuf, String)>,
    /// The instance's token (its agent shows it on every call about it); kept on
    /// its container so a restarted agent can go on speaking for it.
    pub token: String,
    /// A container's /dev/shm (None: the engine's).
    pub shm_size_bytes: Option<u64>,
    /// Its share of the node's cores, in thousandths (0: the whole node):
    /// a container's CPU limit.
    pub millicpus: u32,
    /// Its memory limit (None: the node's): a container's, or watched for a
    /// process, which is killed when its group goes over.
    pub memory_limit: Option<u64>,
}

/// Why an instance was killed for its memory, in words: `used 80 MiB, over its
/// memory limit of 64 MiB`.
pub fn over_memory(limit: u64, used: Option<u64>) -> String {
    let mib = |b: u64| format!("{} MiB", b.div_ceil(1 << 20));
    let used = used
        .map(|u| format!("used {}, ", mib(u)))
        .unwrap_or_default();
    format!(
        "killed: {used}over its memory limit of {} (ask for more with resources.memory or --memory)",
        mib(limit)
    )
}

/// Why an instance is being stopped before it ends on its own.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Stop {
    Cancel(String),
    /// The node is preempted: SIGTERM now, SIGKILL once `notice` is over.
    Preempt {
        reason: String,
        notice: Duration,
    },
}

impl Stop {
    /// Between SIGTERM and SIGKILL, and the outcome and message it ends with.
    pub fn terms(&self, grace: Duration) -> (Duration, &'static str, String) {
        match self {
            Stop::Cancel(reason) => (grace, "canceled", reason.clone()),
            Stop::Preempt { reason, notice } => (*notice, "preempted", reason.clone()),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Outcome {
    pub exit_code: Option<i32>,
    /// completed | failed | canceled | timed_out
    pub outcome: &'static str,
    pub message: String,
}

impl Outcome {
    pub fn failed(message: impl Into<String>) -> Self {
        Outcome {
            exit_code: None,
            outcome: "failed",
            message: message.into(),
        }
    }

    pub fn to_wire(&self) -> pb::Exited {
        pb::Exited {
            exit_code: self.exit_code,
            outcome: self.outcome.to_string(),
            message: self.message.clone(),
            usage: None,
        }
    }
}

/// A message for the coordinator, and whether it must leave at once.
#[derive(Debug)]
pub struct Outgoing {
    pub message: pb::AgentMessage,
    /// It may wait a moment (the session's `WAIT_AT_MOST`) to leave with what
    /// follows it: a start, or an array task's end whose successor starts now. The
    /// first message that may not wait takes the waiting ones with it, in order.
    pub may_wait: bool,
}

impl From<pb::AgentMessage> for Outgoing {
    fn from(message: pb::AgentMessage) -> Self {
        Outgoing {
            message,
            may_wait: false,
        }
    }
}

/// Where a runtime sends what happens (it ends up on the agent's session).
#[derive(Clone)]
pub struct EventSink {
    pub slot: Slot,
    pub tx: mpsc::UnboundedSender<Outgoing>,
    /// The GPUs the instance holds (reported with its start).
    pub gpus: Vec<u32>,
    /// An MPI launcher's output is watched for mpirun's word on a failed rank.
    pub rank_failure: Option<std::sync::Arc<std::sync::Mutex<Option<String>>>>,
}

impl EventSink {
    /// A start may wait for the next message: nothing waits on it.
    pub fn started(&self, pid: u32) {
        let started = pb::Started {
            pid,
            gpus: self.gpus.clone(),
        };
        self.event(pb::attempt_event::Kind::Started(started), true);
    }

    /// An end leaves at once unless it `may_wait` (the end of an array task
    /// whose successor starts at once): a node running a chain of short tasks
    /// then reports their ends a few at a time.
    pub fn exited(&self, exited: pb::Exited, may_wait: bool) {
        self.event(pb::attempt_event::Kind::Exited(exited), may_wait);
    }

    fn event(&self, kind: pb::attempt_event::Kind, may_wait: bool) {
        let event = pb::AttemptEvent {
            attempt_id: self.slot.attempt_id.clone(),
            instance: self.slot.instance,
            kind: Some(kind),
        };
        let message = pb::AgentMessage {
            msg: Some(pb::agent_message::Msg::Event(event)),
        };
        let _ = self.tx.send(Outgoing { message, may_wait });
    }

    pub fn log(&self, stream: &str, data: Vec<u8>) {
        if let Some(found) = &self.rank_failure {
            note_rank_failure(found, &data);
        }
        let log = pb::LogUp {
            attempt_id: self.slot.attempt_id.clone(),
            instance: self.slot.instance,
            stream: stream.to_string(),
            data,
        };
        let _ = self.tx.send(
            pb::AgentMessage {
                msg: Some(pb::agent_message::Msg::Log(log)),
            }
            .into(),
        );
    }
}

/// Keeps mpirun's first word on a failed rank: "mpirun noticed that process rank
/// R ... on node N exited on signal S", or its "Process name: [[job,1],R]" and
/// "Exit code: C" lines, said as "rank R exited with code C".
fn note_rank_failure(found: &std::sync::Mutex<Option<String>>, data: &[u8]) {
    let text = String::from_utf8_lossy(data);
    let mut found = found.lock().unwrap_or_else(|p| p.into_inner());
    for line in text.lines().map(str::trim) {
        if found.as_deref().is_some_and(|f| !f.ends_with("exited")) {
            return;
        }
        if line.starts_with("mpirun noticed that process rank") {
            *found = Some(line.trim_end_matches('.').to_string());
        } else if let Some(name) = line.strip_prefix("Process name:") {
            let rank = name
                .trim()
                .trim_end_matches(']')
                .rsplit(',')
                .next()
                .unwrap_or("?");
            *found = Some(format!("rank {rank} exited"));
        } else if let Some(code) = line.strip_prefix("Exit code:")
            && found.is_some()
        {
            *found = Some(format!(
                "{} with code {}",
                found.take().unwrap_or_default(),
                code.trim()
            ));
        }
    }
}

/// What the sink noticed of a failed rank, if anything.
impl EventSink {
    pub fn rank_failure(&self) -> Option<String> {
        let found = self.rank_failure.as_ref()?;
        found.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

pub type RunFuture = Pin<Box<dyn Future<Output = Outcome> + Send>>;

pub trait Runtime: Send + Sync + 'static {
    fn name(&self) -> &'static str;
    /// Runs the instance to its end. `stop` turning `Some` asks it to stop early.
    fn run(&self, spec: RunSpec, sink: EventSink, stop: watch::Receiver<Option<Stop>>)
    -> RunFuture;
}

#[cfg(test)]
mod rank_failure_tests {
    use super::note_rank_failure;
    use std::sync::Mutex;

    fn noticed(chunks: &[&str]) -> Option<String> {
        let found = Mutex::new(None);
        for chunk in chunks {
            note_rank_failure(&found, chunk.as_bytes());
        }
        found.into_inner().unwrap_or_else(|p| p.into_inner())
    }

    #[test]
    fn mpirun_naming_a_killed_rank_is_kept() {
        let line = "mpirun noticed that process rank 3 with PID 0 on node n-2 exited on signal 9 (Killed).";
        assert_eq!(
            noticed(&["epoch 1\n", line, "\nmore\n"]).as_deref(),
            Some(
                "mpirun noticed that process rank 3 with PID 0 on node n-2 exited on signal 9 (Killed)"
            )
        );
    }

    #[test]
    fn a_rank_exit_code_is_put_in_words() {
        let report = "the job to be terminated. The first process to do so was:\n\n  Process name: [[16682,1],5]\n";
        assert_eq!(
            noticed(&[report, "  Exit code:    139\n"]).as_deref(),
            Some("rank 5 exited with code 139")
        );
        assert_eq!(noticed(&["all good\n"]), None);
    }
}
