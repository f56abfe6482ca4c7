//! The `docker` runtime (bollard): the job runs in a container of its image, with
//! its working dir (the code copy) mounted read-only at /job and its outputs dir
//! read-write at /job/outputs, CPU and memory limits of the node, and labels that
//! let a restarted agent find it again. The container is removed when it ends.

use std::collections::HashMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bollard::Docker;
use bollard::errors::Error as DockerError;
use bollard::models::{ContainerCreateBody, DeviceRequest, HostConfig};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, InspectContainerOptions, ListContainersOptionsBuilder,
    LogsOptionsBuilder, RemoveContainerOptionsBuilder, StopContainerOptionsBuilder,
};
use futures::StreamExt;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use super::{EventSink, Outcome, RunFuture, RunSpec, Runtime, Slot, Stop};

pub const LABEL_NODE: &str = "shoal.node";
/// The coordinator that owns the node (several may share one Docker Engine).
pub const LABEL_OWNER: &str = "shoal.owner";
pub const LABEL_JOB: &str = "shoal.job";
pub const LABEL_ATTEMPT: &str = "shoal.attempt";
pub const LABEL_INSTANCE: &str = "shoal.instance";
/// Unix seconds after which the instance is timed out (absent: no limit).
pub const LABEL_DEADLINE: &str = "shoal.deadline";
/// The instance's token, for the agent that recovers the container.
pub const LABEL_TOKEN: &str = "shoal.token";

#[derive(Clone)]
pub struct DockerRuntime {
    docker: Docker,
    node_id: String,
    owner: String,
    nano_cpus: i64,
    memory_bytes: i64,
    /// A Docker network the job containers join (the docker provider's).
    network: Option<String>,
}

/// A container an earlier agent of this node started.
#[derive(Clone, Debug)]
pub struct Recovered {
    pub slot: Slot,
    pub container: String,
    pub deadline: Option<SystemTime>,
    pub token: String,
}

fn not_found(error: &DockerError) -> bool {
    matches!(
        error,
        DockerError::DockerResponseServerError {
            status_code: 404,
            ..
        }
    )
}

fn conflict(error: &DockerError) -> bool {
    matches!(
        error,
        DockerError::DockerResponseServerError {
            status_code: 409,
            ..
        }
    )
}

/// `shoal/train:1` → `train`: the folder of `images/` that builds it.
pub fn image_folder(image: &str) -> &str {
    let name = image.rsplit('/').next().unwrap_or(image);
    name.split(':').next().unwrap_or(name)
}

impl DockerRuntime {
    /// Connects to the engine (honouring DOCKER_HOST) and checks that it answers.
    pub async fn connect(
        owner: &str,
        node_id: &str,
        cores: u32,
        memory_bytes: u64,
        network: Option<String>,
    ) -> Result<Self, String> {
        let docker = Docker::connect_with_defaults()
            .map_err(|e| format!("cannot connect to the Docker Engine: {e}"))?;
        let docker = tokio::time::timeout(Duration::from_secs(5), docker.negotiate_version())
            .await
            .map_err(|_| "the Docker Engine did not answer within 5 s".to_string())?
            .map_err(|e| format!("the Docker Engine is unreachable: {e}"))?;
        docker
            .ping()
            .await
            .map_err(|e| format!("the Docker Engine is unreachable: {e}"))?;
        Ok(DockerRuntime {
            docker,
            node_id: node_id.to_string(),
            owner: owner.to_string(),
            nano_cpus: i64::from(cores.max(1)) * 1_000_000_000,
            memory_bytes: i64::try_from(memory_bytes).unwrap_or(i64::MAX),
            network,
        })
    }

    /// Where job containers reach this agent's endpoint (managed identity and
    /// MLflow tracking): on the default bridge (a local node), the bridge's
    /// gateway; on a cluster's network (a docker-provider node, itself a
    /// container), any of its addresses, by its name there (the node id). The
    /// address to listen on, and the host jobs are given. None: not found.
    pub async fn address_for_jobs(&self, node_id: &str) -> Option<(std::net::IpAddr, String)> {
        match &self.network {
            Some(_) => Some((std::net::Ipv4Addr::UNSPECIFIED.into(), node_id.to_string())),
            None => {
                let bridge = self
                    .docker
                    .inspect_network(
                        "bridge",
                        None::<bollard::query_parameters::InspectNetworkOptions>,
                    )
                    .await
                    .ok()?;
                // Older engines name only the subnet: the gateway is its first address.
                let gateway = bridge.ipam?.config?.into_iter().find_map(|c| {
                    if let Some(gateway) = c.gateway.and_then(|g| g.parse().ok()) {
                        return Some(gateway);
                    }
                    let subnet = c.subnet?;
                    let base: std::net::Ipv4Addr = subnet.split_once('/')?.0.parse().ok()?;
                    Some(std::net::IpAddr::V4((u32::from(base) + 1).into()))
                })?;
                Some((gateway, gateway.to_string()))
            }
        }
    }

    pub fn container_name(&self, slot: &Slot, rank: Option<u32>) -> String {
        let base = format!("shoal-{}-{}-{}", self.owner, slot.attempt_id, slot.instance);
        match rank {
            Some(rank) => format!("{base}-r{rank}"),
            None => base,
        }
    }

    /// Runs `sh -c command` inside the container (an MPI daemon) with `env` added;
    /// each chunk of output goes to `output(stream, data)`; the exit code at the end.
    pub async fn exec(
        &self,
        container: &str,
        command: &str,
        env: Vec<String>,
        output: impl Fn(&'static str, Vec<u8>),
    ) -> Result<i64, String> {
        use bollard::container::LogOutput;
        use bollard::exec::{CreateExecOptions, StartExecOptions, StartExecResults};
        let created = self
            .docker
            .create_exec(
                container,
                CreateExecOptions {
                    attach_stdout: Some(true),
                    attach_stderr: Some(true),
                    cmd: Some(vec![
                        "sh".to_string(),
                        "-c".to_string(),
                        command.to_string(),
                    ]),
                    env: Some(env),
                    ..Default::default()
                },
            )
            .await
            .map_err(|e| format!("docker exec in {container}: {e}"))?;
        let started = self
            .docker
            .start_exec(
                &created.id,
                Some(StartExecOptions {
                    detach: false,
                    tty: false,
                    output_capacity: None,
                }),
            )
            .await
            .map_err(|e| format!("docker exec in {container}: {e}"))?;
        if let StartExecResults::Attached {
            output: mut stream, ..
        } = started
        {
            while let Some(Ok(chunk)) = stream.next().await {
                match chunk {
                    LogOutput::StdErr { message } => output("stderr", message.to_vec()),
                    LogOutput::StdOut { message } | LogOutput::Console { message } => {
                        output("stdout", message.to_vec())
                    }
                    LogOutput::StdIn { .. } => {}
                }
            }
        }
        let inspected = self
            .docker
            .inspect_exec(&created.id)
            .await
            .map_err(|e| format!("docker exec in {container}: {e}"))?;
        inspected
            .exit_code
            .ok_or_else(|| format!("docker exec in {container} ended with no exit code"))
    }

    /// Containers of this node left by an earlier agent, running or ended.
    pub async fn recover(&self) -> Vec<Recovered> {
        let filters = HashMap::from([(
            "label",
            vec![
                format!("{LABEL_NODE}={}", self.node_id),
                format!("{LABEL_OWNER}={}", self.owner),
            ],
        )]);
        let options = ListContainersOptionsBuilder::default()
            .all(true)
            .filters(&filters)
            .build();
        let containers = match self.docker.list_containers(Some(options)).await {
            Ok(containers) => containers,
            Err(e) => {
                warn!(error = %e, "cannot list this node's containers");
                return Vec::new();
            }
        };
        containers
            .into_iter()
            .filter_map(|c| {
                let labels = c.labels.unwrap_or_default();
                let slot = Slot {
                    attempt_id: labels.get(LABEL_ATTEMPT)?.clone(),
                    instance: labels.get(LABEL_INSTANCE)?.parse().ok()?,
                };
                let deadline = labels
                    .get(LABEL_DEADLINE)
                    .and_then(|d| d.parse::<u64>().ok())
                    .map(|secs| UNIX_EPOCH + Duration::from_secs(secs));
                let container = c.id?;
                Some(Recovered {
                    slot,
                    container,
                    deadline,
                    token: labels.get(LABEL_TOKEN).cloned().unwrap_or_default(),
                })
            })
            .collect()
    }

    async fn start(&self, spec: &RunSpec, image: &str) -> Result<String, String> {
        self.start_with(spec, image, false).await.map(|(id, _)| id)
    }

    /// A long-lived container reading its stdin (a parallel job's worker): its id,
    /// its output, and a writer to its stdin. Removed by `remove_now`.
    pub async fn start_interactive(
        &self,
        spec: &RunSpec,
    ) -> Result<(String, bollard::container::AttachContainerResults), String> {
        let image = spec.image.clone().unwrap_or_default();
        let (id, attached) = self.start_with(spec, &image, true).await?;
        attached
            .map(|a| (id, a))
            .ok_or_else(|| "docker: the container was not attached".to_string())
    }

    /// Stops and removes a container at once.
    pub async fn remove_now(&self, container: &str) {
        self.remove(container).await;
    }

    async fn start_with(
        &self,
        spec: &RunSpec,
        image: &str,
        interactive: bool,
    ) -> Result<(String, Option<bollard::container::AttachContainerResults>), String> {
        match self.docker.inspect_image(image).await {
            Ok(_) => {}
            Err(e) if not_found(&e) => {
                return Err(format!(
                    "image `{image}` not found on node {}; build it with `images/build.sh {}` (no registry is used)",
                    self.node_id,
                    image_folder(image)
                ));
            }
            Err(e) => return Err(format!("docker: cannot inspect image `{image}`: {e}")),
        }
        let name = self.container_name(&spec.slot, spec.rank);
        let host_dir = spec.cwd.to_string_lossy().into_owned();
        let mut env: Vec<String> = spec
            .env
            .iter()
            .filter(|(k, _)| k.as_str() != "SHOAL_OUTPUT_DIR")
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        env.push("SHOAL_OUTPUT_DIR=/job/outputs".into());
        let mut labels = HashMap::from([
            (LABEL_NODE.to_string(), self.node_id.clone()),
            (LABEL_OWNER.to_string(), self.owner.clone()),
            (LABEL_ATTEMPT.to_string(), spec.slot.attempt_id.clone()),
            (LABEL_INSTANCE.to_string(), spec.slot.instance.to_string()),
            (LABEL_TOKEN.to_string(), spec.token.clone()),
            (
                LABEL_JOB.to_string(),
                spec.env.get("SHOAL_JOB_ID").cloned().unwrap_or_default(),
            ),
        ]);
        if let Some(limit) = spec.timeout {
            let deadline = SystemTime::now() + limit;
            let secs = deadline
                .duration_since(UNIX_EPOCH)
                .map(|d| d.as_secs())
                .unwrap_or(0);
            labels.insert(LABEL_DEADLINE.to_string(), secs.to_string());
        }
        let device_requests = device_requests(&spec.gpus);
        let mut binds = vec![
            format!("{host_dir}:/job:ro"),
            format!("{host_dir}/outputs:/job/outputs:rw"),
        ];
        // Named outputs are written in place, like ./outputs.
        if spec.cwd.join("named-outputs").is_dir() {
            binds.push(format!("{host_dir}/named-outputs:/job/named-outputs:rw"));
        }
        binds.extend(
            spec.mounts
                .iter()
                .map(|(host, inside)| format!("{}:{inside}:ro", host.display())),
        );
        let body = ContainerCreateBody {
            image: Some(image.to_string()),
            cmd: Some(spec.argv.clone()),
            env: Some(env),
            working_dir: Some("/job".into()),
            labels: Some(labels),
            open_stdin: interactive.then_some(true),
            attach_stdin: interactive.then_some(true),
            attach_stdout: interactive.then_some(true),
            attach_stderr: interactive.then_some(true),
            host_config: Some(HostConfig {
                binds: Some(binds),
                // Its share of the node, or the whole node.
                nano_cpus: Some(if spec.millicpus > 0 {
                    i64::from(spec.millicpus) * 1_000_000
                } else {
                    self.nano_cpus
                }),
                memory: Some(
                    spec.memory_limit
                        .and_then(|b| i64::try_from(b).ok())
                        .unwrap_or(self.memory_bytes),
                ),
                network_mode: self.network.clone(),
                // Unprivileged: no capabilities, no privilege gain, the
                // cluster's network (never the host's).
                security_opt: Some(vec!["no-new-privileges".into()]),
                cap_drop: Some(vec!["ALL".into()]),
                privileged: Some(false),
                device_requests,
                shm_size: spec.shm_size_bytes.and_then(|b| i64::try_from(b).ok()),
                ..Default::default()
            }),
            ..Default::default()
        };
        let options = CreateContainerOptionsBuilder::default().name(&name).build();
        let created = match self
            .docker
            .create_container(Some(options.clone()), body.clone())
            .await
        {
            Err(e) if conflict(&e) => {
                // A leftover of an earlier try of this very instance.
                self.remove(&name).await;
                self.docker.create_container(Some(options), body).await
            }
            other => other,
        };
        let id = created
            .map_err(|e| format!("docker: cannot create the container: {e}"))?
            .id;
        // Attached before it starts: no output is missed.
        let attached = if interactive {
            let options = bollard::query_parameters::AttachContainerOptionsBuilder::default()
                .stream(true)
                .stdin(true)
                .stdout(true)
                .stderr(true)
                .build();
            match self.docker.attach_container(&id, Some(options)).await {
                Ok(attached) => Some(attached),
                Err(e) => {
                    self.remove(&id).await;
                    return Err(format!("docker: cannot attach to the container: {e}"));
                }
            }
        } else {
            None
        };
        if let Err(e) = self.docker.start_container(&id, None).await {
            self.remove(&id).await;
            return Err(format!("docker: cannot start the container: {e}"));
        }
        Ok((id, attached))
    }

    /// Removes the container; the engine sometimes refuses while it is still
    /// tearing the container down, so a refusal is retried a few times.
    async fn remove(&self, container: &str) {
        for attempt in 1..=5u64 {
            let options = RemoveContainerOptionsBuilder::default().force(true).build();
            match self.docker.remove_container(container, Some(options)).await {
                Ok(()) => return,
                Err(e) if not_found(&e) => return,
                Err(e) if attempt == 5 => warn!(container, error = %e, "cannot remove container"),
                Err(e) => {
                    debug!(container, error = %e, "container removal refused; retrying");
                    tokio::time::sleep(Duration::from_millis(100 * attempt)).await;
                }
            }
        }
    }

    async fn exit_code(&self, container: &str) -> Result<i64, String> {
        let mut wait = self.docker.wait_container(container, None);
        match wait.next().await {
            Some(Ok(response)) => Ok(response.status_code),
            Some(Err(DockerError::DockerContainerWaitError { code, .. })) => Ok(code),
            Some(Err(e)) if not_found(&e) => {
                let inspected = self
                    .docker
                    .inspect_container(container, None::<InspectContainerOptions>)
                    .await;
                inspected
                    .ok()
                    .and_then(|c| c.state?.exit_code)
                    .ok_or_else(|| "the container is gone".to_string())
            }
            Some(Err(e)) => Err(format!("docker: {e}")),
            None => Err("docker: the wait ended without an exit code".into()),
        }
    }

    /// Streams the container's output, obeys stop and the deadline, and removes
    /// the container at the end. `since`: log lines from this Unix time on.
    pub async fn follow(
        &self,
        container: String,
        sink: EventSink,
        mut stop: watch::Receiver<Option<Stop>>,
        deadline: Option<SystemTime>,
        grace: Duration,
        since: i32,
    ) -> Outcome {
        let logs_options = LogsOptionsBuilder::default()
            .follow(true)
            .stdout(true)
            .stderr(true)
            .since(since)
            .build();
        let mut logs = self.docker.logs(&container, Some(logs_options));
        let pump_sink = sink.clone();
        let pump = tokio::spawn(async move {
            while let Some(Ok(output)) = logs.next().await {
                use bollard::container::LogOutput;
                match output {
                    LogOutput::StdErr { message } => pump_sink.log("stderr", message.to_vec()),
                    LogOutput::StdOut { message } | LogOutput::Console { message } => {
                        pump_sink.log("stdout", message.to_vec())
                    }
                    LogOutput::StdIn { .. } => {}
                }
            }
        });
        let until_deadline = async {
            match deadline {
                Some(at) => {
                    let left = at.duration_since(SystemTime::now()).unwrap_or_default();
                    tokio::time::sleep(left).await
                }
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
        let (exit, outcome, message) = tokio::select! {
            exit = self.exit_code(&container) => (exit, None, String::new()),
            _ = until_deadline => {
                let exit = self.stop(&container, grace).await;
                (exit, Some("timed_out"), "ran past its timeout".to_string())
            }
            stop = stop_asked => {
                let (grace, outcome, reason) = stop.terms(grace);
                let exit = self.stop(&container, grace).await;
                (exit, Some(outcome), reason)
            }
        };
        if tokio::time::timeout(Duration::from_secs(2), pump)
            .await
            .is_err()
        {
            debug!(container, "log stream still open after exit");
        }
        // Killed by the engine for going over its memory: say so.
        let oom = match &exit {
            Ok(code) if *code != 0 => self
                .docker
                .inspect_container(&container, None::<InspectContainerOptions>)
                .await
                .ok()
                .filter(|c| c.state.as_ref().and_then(|s| s.oom_killed) == Some(true))
                .map(|c| {
                    let limit = c.host_config.and_then(|h| h.memory).unwrap_or(0);
                    crate::runtime::over_memory(u64::try_from(limit).unwrap_or(0), None)
                }),
            _ => None,
        };
        self.remove(&container).await;
        let (outcome, message) = match oom {
            Some(why) => (Some("failed"), why),
            None => (outcome, message),
        };
        match exit {
            Ok(code) => {
                let exit_code = i32::try_from(code).unwrap_or(i32::MAX);
                let outcome = outcome.unwrap_or(if exit_code == 0 {
                    "completed"
                } else {
                    "failed"
                });
                let message = if message.is_empty() && outcome == "failed" {
                    format!("the container exited with code {exit_code}")
                } else {
                    message
                };
                Outcome {
                    exit_code: Some(exit_code),
                    outcome,
                    message,
                }
            }
            Err(why) => Outcome::failed(why),
        }
    }

    /// SIGTERM, the grace period, then SIGKILL (Docker's own stop); returns the exit code.
    async fn stop(&self, container: &str, grace: Duration) -> Result<i64, String> {
        let seconds = i32::try_from(grace.as_secs()).unwrap_or(i32::MAX).max(1);
        let options = StopContainerOptionsBuilder::default().t(seconds).build();
        if let Err(e) = self.docker.stop_container(container, Some(options)).await
            && !not_found(&e)
        {
            warn!(container, error = %e, "docker stop failed");
        }
        self.exit_code(container).await
    }
}

/// The GPUs assigned to an instance, as a Docker device request for exactly those ids.
pub fn device_requests(gpus: &[String]) -> Option<Vec<DeviceRequest>> {
    (!gpus.is_empty()).then(|| {
        vec![DeviceRequest {
            driver: Some("nvidia".into()),
            device_ids: Some(gpus.to_vec()),
            capabilities: Some(vec![vec!["gpu".into()]]),
            ..Default::default()
        }]
    })
}

fn now_unix() -> i32 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| i32::try_from(d.as_secs()).unwrap_or(i32::MAX))
        .unwrap_or(0)
}

impl Runtime for DockerRuntime {
    fn name(&self) -> &'static str {
        "docker"
    }

    fn run(
        &self,
        spec: RunSpec,
        sink: EventSink,
        stop: watch::Receiver<Option<Stop>>,
    ) -> RunFuture {
        let this = self.clone();
        Box::pin(async move {
            let Some(image) = spec.image.clone() else {
                return Outcome::failed("the docker runtime needs an image");
            };
            let container = match this.start(&spec, &image).await {
                Ok(container) => container,
                Err(why) => return Outcome::failed(why),
            };
            info!(attempt = %spec.slot.attempt_id, instance = spec.slot.instance, image, "container started");
            let pid = this
                .docker
                .inspect_container(&container, None::<InspectContainerOptions>)
                .await
                .ok()
                .and_then(|c| c.state?.pid)
                .and_then(|p| u32::try_from(p).ok())
                .unwrap_or(0);
            sink.started(pid);
            let deadline = spec.timeout.map(|t| SystemTime::now() + t);
            this.follow(container, sink, stop, deadline, spec.stop_grace, 0)
                .await
        })
    }
}

/// Log lines of a recovered container from now on (earlier ones were shipped, or lost
/// with the agent that died).
pub fn recovery_since() -> i32 {
    now_unix()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gpus_become_an_nvidia_device_request_for_exactly_those_ids() {
        assert!(device_requests(&[]).is_none());
        let requests = device_requests(&["1".into(), "3".into()]).expect("a request");
        assert_eq!(requests.len(), 1);
        assert_eq!(requests[0].driver.as_deref(), Some("nvidia"));
        assert_eq!(
            requests[0].device_ids,
            Some(vec!["1".to_string(), "3".to_string()])
        );
        assert_eq!(requests[0].count, None, "ids, not a count");
    }

    #[test]
    fn image_folders_name_the_build_target() {
        assert_eq!(image_folder("shoal/train:1"), "train");
        assert_eq!(image_folder("shoal/base"), "base");
        assert_eq!(image_folder("busybox"), "busybox");
    }
}
