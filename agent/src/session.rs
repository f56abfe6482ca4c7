//! The agent's session with the coordinator (`link`) and the life of each launched
//! instance (`instances`); inputs and outputs (`data`); parallel workers (`parallel`).

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use shoal_proto::PROTOCOL_VERSION;
use shoal_proto::v1 as pb;
use shoal_proto::v1::agent_client::AgentClient;
use shoal_proto::{AuthChannel, Bearer};
use tokio::sync::{mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tracing::{debug, info, warn};

use crate::coordinators::Coordinators;
use crate::gpu::{GpuAllocator, Usage};
use crate::runtime::docker::{self, DockerRuntime};
use crate::runtime::{EventSink, Outcome, Outgoing, ProcessRuntime, RunSpec, Runtime, Slot, Stop};
use crate::telemetry::{self, Telemetry};
use crate::{AgentConfig, AgentError, archive};

mod data;
mod instances;
mod link;
mod parallel;
mod workdirs;
pub use link::run;

/// How long an exit is remembered for re-registration, in case it was never delivered.
const EXIT_MEMORY: Duration = Duration::from_secs(300);
const MAX_MESSAGE_BYTES: usize = 256 << 20;

struct Entry {
    stop: watch::Sender<Option<Stop>>,
    exited: Option<(pb::Exited, Instant)>,
    /// GPUs it holds.
    gpus: Vec<u32>,
    /// Its process group (its leader's pid), once started.
    group: Option<i32>,
    usage: Usage,
    /// Its token, shown on every call about it.
    token: String,
    /// Its named outputs (name, a folder?), uploaded when it ends.
    outputs: Vec<(String, bool)>,
    /// An MPI job's (its `run/` folder, if made, is removed when it ends).
    mpi: bool,
    /// `Launch.end_may_wait`: its end, when its successor starts at once, may
    /// wait a moment to leave with what follows.
    end_may_wait: bool,
}

impl Entry {
    fn new(stop: watch::Sender<Option<Stop>>, gpus: Vec<u32>, token: String) -> Self {
        Entry {
            stop,
            exited: None,
            gpus,
            group: None,
            usage: Usage::default(),
            token,
            outputs: Vec::new(),
            mpi: false,
            end_may_wait: false,
        }
    }
}

/// The variables that show a process exactly its GPUs.
fn gpu_env(gpus: &[u32]) -> Vec<(String, String)> {
    if gpus.is_empty() {
        return Vec::new();
    }
    let ids: Vec<String> = gpus.iter().map(u32::to_string).collect();
    let ids = ids.join(",");
    vec![
        ("CUDA_VISIBLE_DEVICES".into(), ids.clone()),
        ("NVIDIA_VISIBLE_DEVICES".into(), ids),
    ]
}

fn usage_to_wire(usage: &Usage) -> pb::Usage {
    pb::Usage {
        samples: usage.samples,
        gpu_utilization_avg_percent: usage.average_utilization_percent(),
        gpu_utilization_peak_percent: usage.peak_utilization_percent,
        gpu_memory_peak_bytes: usage.peak_memory_bytes,
        gpu_energy_joules: usage.energy_joules(),
        cpu_seconds: usage.cpu_seconds,
        gpu_utilization_percent: usage.current_utilization_percent,
        gpu_memory_bytes: usage.current_memory_bytes,
    }
}

fn gpu_stat(s: &crate::gpu::GpuSample) -> pb::GpuStat {
    pb::GpuStat {
        index: s.index,
        uuid: s.uuid.clone(),
        model: s.model.clone(),
        utilization_percent: s.utilization_percent,
        memory_used_bytes: s.memory_used_bytes,
        memory_total_bytes: s.memory_total_bytes,
        temperature_c: s.temperature_c,
        power_milliwatts: s.power_milliwatts,
        energy_millijoules: s.energy_millijoules,
        process_ids: s.process_ids.clone(),
    }
}

#[derive(Clone)]
struct Agent {
    config: Arc<AgentConfig>,
    coordinators: Coordinators<AgentClient<AuthChannel>>,
    process: Arc<ProcessRuntime>,
    /// The docker runtime, or why this node has none.
    docker: Result<DockerRuntime, String>,
    attempts: Arc<Mutex<HashMap<Slot, Entry>>>,
    /// Successors (`Launch.after`) by the instance each follows, started when
    /// it ends. Locked inside `attempts`, never the other way round.
    held: Arc<Mutex<HashMap<Slot, pb::Launch>>>,
    events: mpsc::UnboundedSender<Outgoing>,
    telemetry: Telemetry,
    gpu_allocator: Arc<Mutex<GpuAllocator>>,
    execs: crate::exec::Execs,
    identity: crate::identity::TokenEndpoint,
    cores: u32,
    memory_bytes: u64,
    hostname: String,
    contact: Arc<Contact>,
    workdirs: Arc<workdirs::WorkDirs>,
}

impl Agent {
    /// Calls the coordinator until it answers (`until_answered`).
    async fn until_answered<T, F, Fut>(&self, call: F) -> Result<T, tonic::Status>
    where
        F: FnMut(AgentClient<AuthChannel>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
    {
        until_answered(&self.coordinators, self.config.give_up_after, call).await
    }
}

/// Calls the coordinator until it answers: a restart (or a moment without it)
/// must not fail the work that asked. Transport failures are asked again with
/// backoff for up to `give_up_after`, at the next endpoint when there are
/// several; an answer, a refusal included, is returned as it came.
async fn until_answered<C, T, F, Fut>(
    coordinators: &Coordinators<C>,
    give_up_after: Duration,
    mut call: F,
) -> Result<T, tonic::Status>
where
    C: Clone,
    F: FnMut(C) -> Fut,
    Fut: Future<Output = Result<tonic::Response<T>, tonic::Status>>,
{
    let started = Instant::now();
    let mut backoff = Duration::from_millis(50);
    loop {
        match coordinators.call(&mut call).await {
            Ok(reply) => return Ok(reply.into_inner()),
            Err(status)
                if matches!(
                    status.code(),
                    tonic::Code::Unavailable | tonic::Code::Unknown | tonic::Code::Cancelled
                ) && started.elapsed() < give_up_after =>
            {
                debug!(%status, retry_in = ?backoff, "coordinator unavailable; asking again");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(1));
            }
            Err(status) => return Err(status),
        }
    }
}

/// When the coordinator was last heard from, and the lease it set.
struct Contact {
    last: Mutex<Instant>,
    lease_ms: std::sync::atomic::AtomicU64,
}

impl Contact {
    fn heard(&self) {
        *self.last.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
    }

    fn silent(&self) -> Duration {
        self.last
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .elapsed()
    }

    fn lease(&self) -> Duration {
        Duration::from_millis(self.lease_ms.load(std::sync::atomic::Ordering::Relaxed))
    }
}

enum SessionEnd {
    /// Told to stop (by the coordinator or a signal); the work is stopped.
    Stopped(String),
    Rejected(String),
    Lost(String),
}

struct AbortOnDrop(tokio::task::JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Sizes;

    #[tonic::async_trait]
    impl pb::vm_sizes_server::VmSizes for Sizes {
        async fn list(
            &self,
            _: tonic::Request<pb::ListVmSizesRequest>,
        ) -> Result<tonic::Response<pb::VmSizeList>, tonic::Status> {
            Ok(tonic::Response::new(pb::VmSizeList {
                sizes: vec![pb::VmSize {
                    name: "answered".into(),
                    ..Default::default()
                }],
            }))
        }
    }

    /// A port nothing listens on yet (bound, then let go), and a client for it.
    fn client_of_free_port() -> (
        std::net::SocketAddr,
        Coordinators<pb::vm_sizes_client::VmSizesClient<tonic::transport::Channel>>,
    ) {
        let addr = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port");
        let channel = tonic::transport::Channel::from_shared(format!("http://{addr}"))
            .expect("endpoint")
            .connect_lazy();
        (
            addr,
            Coordinators::new(vec![pb::vm_sizes_client::VmSizesClient::new(channel)]),
        )
    }

    #[tokio::test]
    async fn a_call_made_while_the_coordinator_is_away_is_answered_once_it_is_back() {
        let (addr, client) = client_of_free_port();
        // Nothing listens for the first 400 ms: those calls are refused connections.
        let server = tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(400)).await;
            tonic::transport::Server::builder()
                .add_service(pb::vm_sizes_server::VmSizesServer::new(Sizes))
                .serve(addr)
                .await
        });
        let mut calls = 0;
        let answer = until_answered(&client, Duration::from_secs(20), |mut c| {
            calls += 1;
            async move { c.list(pb::ListVmSizesRequest {}).await }
        })
        .await
        .expect("answered once the server is up");
        assert_eq!(answer.sizes[0].name, "answered");
        assert!(
            calls > 1,
            "the first call found no server, so it was asked again"
        );
        server.abort();
    }

    #[tokio::test]
    async fn a_coordinator_that_stays_away_fails_the_call_after_the_give_up_time() {
        let (_, client) = client_of_free_port();
        let started = Instant::now();
        let status = until_answered(&client, Duration::from_millis(300), |mut c| async move {
            c.list(pb::ListVmSizesRequest {}).await
        })
        .await
        .expect_err("no server ever listens");
        assert_eq!(status.code(), tonic::Code::Unavailable, "{status}");
        assert!(started.elapsed() >= Duration::from_millis(300));
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn gpu_env_names_exactly_the_assigned_ids() {
        assert!(gpu_env(&[]).is_empty());
        let env = gpu_env(&[1, 3]);
        assert_eq!(
            env,
            vec![
                ("CUDA_VISIBLE_DEVICES".to_string(), "1,3".to_string()),
                ("NVIDIA_VISIBLE_DEVICES".to_string(), "1,3".to_string()),
            ]
        );
    }
}
