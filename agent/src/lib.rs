//! The node agent: one long-lived session with the coordinator (register, heartbeat,
//! launches in, events and logs out), runtimes that run the work, and telemetry.
//! It reconnects with backoff and, after a coordinator restart, re-registers and
//! reports the attempts it still runs.

pub mod archive;
pub mod coordinators;
pub mod exec;
pub mod gpu;
pub mod identity;
pub mod runtime;
mod session;
pub mod telemetry;

use std::path::PathBuf;
use std::time::Duration;

pub use session::run;

#[derive(Clone, Debug)]
pub struct AgentConfig {
    /// `http://host:port` of the coordinator.
    pub endpoint: String,
    pub node_id: String,
    pub cluster: String,
    /// The id of the coordinator that owns this node (labels its containers).
    pub owner: String,
    /// Attempts work in `<work_dir>/attempts/<attempt>-<instance>`.
    pub work_dir: PathBuf,
    /// Capacity to advertise; None: what this machine has.
    pub cores: Option<u32>,
    pub memory_bytes: Option<u64>,
    /// Between SIGTERM and SIGKILL when a job is stopped.
    pub stop_grace: Duration,
    /// With no coordinator for this long, stop the work and exit.
    pub give_up_after: Duration,
    /// A Docker network job containers join (set by the docker provider).
    pub docker_network: Option<String>,
    /// How often CPU, memory, disk, network and GPUs are sampled.
    pub telemetry_interval: Duration,
    /// This node's share of the machine's GPUs: (slice, GPUs per node); None: all.
    pub gpu_slice: Option<(u32, u32)>,
    /// This node's credential, presented on every call to the coordinator.
    pub token: Option<String>,
    /// The unprivileged user process jobs run as (None: the agent's user).
    pub run_as: Option<String>,
    /// The CA that signed the coordinator's certificate (https:// endpoints).
    pub ca_file: Option<PathBuf>,
    /// Heard nothing from the coordinator for about this long, the agent stops its
    /// work: the coordinator reruns it elsewhere after exactly this long. The
    /// coordinator's own value (sent at registration) wins.
    pub lease: Duration,
    /// For benchmarks only: each launch is reported started and completed at
    /// once, with nothing run (the control plane's own throughput).
    pub zero_work: bool,
}

/// When an agent that hears nothing starts stopping its work: early enough that
/// the stop grace is over a second before the coordinator reruns it.
pub fn fence_after(lease: Duration, stop_grace: Duration) -> Duration {
    lease
        .saturating_sub(stop_grace + Duration::from_secs(1))
        .max(lease / 2)
}

/// What a join token is traded for, kept in the agent's work dir.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Joined {
    pub node_id: String,
    pub cluster: String,
    pub credential: String,
}

/// A channel to the coordinator (TLS with `ca_file` for https:// endpoints).
/// Keep-alive pings find a dead connection (a cut network) well inside `lease`.
pub fn endpoint(
    url: &str,
    ca_file: Option<&std::path::Path>,
    lease: Duration,
) -> Result<tonic::transport::Endpoint, AgentError> {
    let ping = (lease / 6).clamp(Duration::from_millis(500), Duration::from_secs(10));
    let mut endpoint = tonic::transport::Endpoint::from_shared(url.to_string())
        .map_err(|e| AgentError::Endpoint(url.to_string(), e.to_string()))?
        .tcp_nodelay(true)
        .connect_timeout(Duration::from_secs(3))
        .http2_keep_alive_interval(ping)
        .keep_alive_timeout(ping * 2)
        .keep_alive_while_idle(true);
    if url.starts_with("https://") {
        let mut tls = tonic::transport::ClientTlsConfig::new();
        if let Some(ca) = ca_file {
            let pem = std::fs::read(ca).map_err(|e| AgentError::WorkDir(ca.to_path_buf(), e))?;
            tls = tls.ca_certificate(tonic::transport::Certificate::from_pem(pem));
        }
        endpoint = endpoint
            .tls_config(tls)
            .map_err(|e| AgentError::Endpoint(url.to_string(), e.to_string()))?;
    }
    Ok(endpoint)
}

/// Joins a cluster with a join token, once: the node id and credential it gets are
/// kept in `<work_dir>/joined.json` (0600) and used by every later start.
pub async fn join(
    url: &str,
    ca_file: Option<&std::path::Path>,
    work_dir: &std::path::Path,
    join_token: &str,
    lease: Duration,
) -> Result<Joined, AgentError> {
    let path = work_dir.join("joined.json");
    if let Ok(text) = std::fs::read_to_string(&path)
        && let Ok(joined) = serde_json::from_str::<Joined>(&text)
    {
        return Ok(joined);
    }
    std::fs::create_dir_all(work_dir)
        .map_err(|e| AgentError::WorkDir(work_dir.to_path_buf(), e))?;
    // The first endpoint that answers (a list: a leader and its standby).
    let mut reached = None;
    let mut why = String::from("no endpoint given");
    for one in coordinators::endpoints(url) {
        match endpoint(one, ca_file, lease)?.connect().await {
            Ok(channel) => {
                reached = Some(channel);
                break;
            }
            Err(e) => why = format!("{one}: {e}"),
        }
    }
    let channel = reached.ok_or_else(|| AgentError::Endpoint(url.to_string(), why))?;
    let (cores, memory_bytes) = telemetry::capacity();
    let reply = shoal_proto::v1::agent_client::AgentClient::new(channel)
        .join(shoal_proto::v1::JoinRequest {
            join_token: join_token.to_string(),
            hostname: telemetry::hostname(),
            cores,
            memory_bytes,
        })
        .await
        .map_err(|s| AgentError::Rejected(s.message().to_string()))?
        .into_inner();
    let joined = Joined {
        node_id: reply.node_id,
        cluster: reply.cluster,
        credential: reply.credential,
    };
    let text = serde_json::to_string(&joined).unwrap_or_default();
    {
        use std::io::Write;
        use std::os::unix::fs::OpenOptionsExt;
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .mode(0o600)
            .open(&path)
            .map_err(|e| AgentError::WorkDir(path.clone(), e))?;
        file.write_all(text.as_bytes())
            .map_err(|e| AgentError::WorkDir(path.clone(), e))?;
    }
    Ok(joined)
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("the coordinator refused this agent: {0}")]
    Rejected(String),
    #[error("no coordinator at {endpoint} for {seconds} s; giving up (last error: {last})")]
    CoordinatorLost {
        endpoint: String,
        seconds: u64,
        last: String,
    },
    #[error("bad endpoint `{0}`: {1}")]
    Endpoint(String, String),
    #[error("--run-as: {0}")]
    RunAs(String),
    #[error("node credential: {0}")]
    Token(String),
    #[error("work dir {0}: {1}")]
    WorkDir(PathBuf, std::io::Error),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fencing_is_over_a_second_before_the_lease_ends() {
        let s = Duration::from_secs;
        // Default: start stopping at 19 s, SIGKILL at 29 s, rerun elsewhere at 30 s.
        assert_eq!(fence_after(s(30), s(10)), s(19));
        assert!(fence_after(s(30), s(10)) + s(10) < s(30));
        assert_eq!(fence_after(s(6), s(1)), s(4));
        // A grace as long as the lease: never before half of it.
        assert_eq!(fence_after(s(10), s(30)), s(5));
    }
}
