//! Docker helpers shared by the providers: the containers a node's jobs ran in.

use std::collections::HashMap;
use std::time::Duration;

use bollard::Docker;
use bollard::query_parameters::{ListContainersOptionsBuilder, RemoveContainerOptionsBuilder};
use tracing::{debug, warn};

/// The label the agent puts on every job container.
pub const LABEL_NODE: &str = "shoal.node";
pub const LABEL_OWNER: &str = "shoal.owner";

/// The engine, if one answers (DOCKER_HOST honoured).
pub async fn connect() -> Result<Docker, String> {
    let docker = Docker::connect_with_defaults()
        .map_err(|e| format!("cannot connect to the Docker Engine: {e}"))?;
    tokio::time::timeout(Duration::from_secs(5), docker.negotiate_version())
        .await
        .map_err(|_| "the Docker Engine did not answer within 5 s".to_string())?
        .map_err(|e| format!("the Docker Engine is unreachable: {e}"))
}

/// Removes every container labelled with this node (its job containers), so no
/// attempt keeps running after its node is gone. No engine: nothing to remove.
pub async fn remove_node_containers(owner: &str, node_id: &str) {
    let Ok(docker) = connect().await else {
        return;
    };
    let labels = vec![
        format!("{LABEL_NODE}={node_id}"),
        format!("{LABEL_OWNER}={owner}"),
    ];
    let filters = HashMap::from([("label", labels)]);
    let options = ListContainersOptionsBuilder::default()
        .all(true)
        .filters(&filters)
        .build();
    let containers = match docker.list_containers(Some(options)).await {
        Ok(containers) => containers,
        Err(e) => {
            warn!(node = node_id, error = %e, "cannot list the node's containers");
            return;
        }
    };
    for id in containers.into_iter().filter_map(|c| c.id) {
        let options = RemoveContainerOptionsBuilder::default().force(true).build();
        match docker.remove_container(&id, Some(options)).await {
            Ok(()) => debug!(node = node_id, container = %id, "removed a container of a gone node"),
            Err(e) => warn!(node = node_id, container = %id, error = %e, "cannot remove container"),
        }
    }
}

/// The image node containers run (`images/build.sh node`): a shell and the C
/// libraries `shoal` links; the binary itself is mounted from this coordinator.
pub const NODE_IMAGE: &str = "shoal/node";
/// Marks a node container (value: the node id).
pub const LABEL_NODE_CONTAINER: &str = "shoal.node-container";

/// Checks that the docker provider can work here, in words a person can act on.
pub async fn check_ready() -> Result<(), String> {
    let docker = connect().await?;
    match docker.inspect_image(NODE_IMAGE).await {
        Ok(_) => Ok(()),
        Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 404, ..
        }) => Err(format!(
            "image `{NODE_IMAGE}` is missing; build it with `images/build.sh node`"
        )),
        Err(e) => Err(format!("cannot inspect `{NODE_IMAGE}`: {e}")),
    }
}

/// Whether `image` has `program` in a folder of its PATH: Ok(None) if it has,
/// Ok(Some(why not)) if it has not, Err when the engine cannot tell.
pub async fn image_lacks(image: &str, program: &str) -> Result<Option<String>, String> {
    use futures::StreamExt;
    let docker = connect().await?;
    let inspected = match docker.inspect_image(image).await {
        Ok(inspected) => inspected,
        Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 404, ..
        }) => {
            return Ok(Some(format!(
                "image `{image}` is not on this machine; build it (images/build.sh) first"
            )));
        }
        Err(e) => return Err(format!("cannot inspect `{image}`: {e}")),
    };
    let path = inspected
        .config
        .and_then(|c| c.env)
        .unwrap_or_default()
        .into_iter()
        .find_map(|e| e.strip_prefix("PATH=").map(str::to_string))
        .unwrap_or_else(|| "/usr/local/bin:/usr/bin:/bin".into());
    // A created (never started) container's files can be read.
    let body = bollard::models::ContainerCreateBody {
        image: Some(image.to_string()),
        cmd: Some(vec!["true".into()]),
        ..Default::default()
    };
    let created = docker
        .create_container(
            None::<bollard::query_parameters::CreateContainerOptions>,
            body,
        )
        .await
        .map_err(|e| format!("cannot look inside `{image}`: {e}"))?;
    let mut found = false;
    for dir in path.split(':').filter(|d| !d.is_empty()) {
        let options = bollard::query_parameters::DownloadFromContainerOptionsBuilder::new()
            .path(&format!("{dir}/{program}"))
            .build();
        let mut archive = docker.download_from_container(&created.id, Some(options));
        if matches!(archive.next().await, Some(Ok(_))) {
            found = true;
            break;
        }
    }
    let options = RemoveContainerOptionsBuilder::default().force(true).build();
    let _ = docker.remove_container(&created.id, Some(options)).await;
    Ok((!found).then(|| format!("image `{image}` has no `{program}` on its PATH ({path})")))
}

/// Whether `image` is on this machine's engine.
pub async fn image_exists(image: &str) -> Result<bool, String> {
    let docker = connect().await?;
    match docker.inspect_image(image).await {
        Ok(_) => Ok(true),
        Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 404, ..
        }) => Ok(false),
        Err(e) => Err(format!("cannot inspect `{image}`: {e}")),
    }
}

/// Builds `tag` from a build context (tar.gz) with the Dockerfile at `dockerfile`
/// on this machine's engine (the one its nodes use; no registry: a `FROM` must be
/// an image built here). Each line of the build goes to `log`; a failure says
/// which step and why.
pub async fn build_image(
    context: Vec<u8>,
    dockerfile: &str,
    tag: &str,
    log: &mut (dyn FnMut(String) + Send),
) -> Result<(), String> {
    use futures::StreamExt;
    let docker = connect().await?;
    let options = bollard::query_parameters::BuildImageOptionsBuilder::default()
        .dockerfile(dockerfile)
        .t(tag)
        .rm(true)
        .forcerm(true)
        .pull("false")
        .build();
    let mut stream = docker.build_image(options, None, Some(bollard::body_full(context.into())));
    let mut last = String::new();
    while let Some(item) = stream.next().await {
        match item {
            Ok(info) => {
                if let Some(text) = info.stream {
                    for line in text.lines().filter(|l| !l.trim().is_empty()) {
                        last = line.to_string();
                        log(line.to_string());
                    }
                }
                if let Some(error) = info.error_detail.and_then(|d| d.message) {
                    return Err(format!(
                        "the build of {tag} failed: {error} (after: {last})"
                    ));
                }
            }
            Err(e) => return Err(format!("the build of {tag} failed: {e} (after: {last})")),
        }
    }
    match image_exists(tag).await? {
        true => Ok(()),
        false => Err(format!(
            "the build of {tag} ended without an image (last: {last})"
        )),
    }
}

/// The `docker` provider: each node is a container running `shoal agent` on a
/// private network of its cluster (its own hostname and IP), with the Docker socket
/// mounted so its jobs run as sibling containers on the same network. The agent
/// reaches the coordinator over that network, at its gateway address, with TLS
/// (`NodeLink`): a node cut off its network is cut off the coordinator.
#[derive(Clone, Debug)]
pub struct DockerProvider {
    pub owner: String,
    /// The `shoal` binary mounted into node containers.
    pub program: std::path::PathBuf,
    /// Node work dirs: `<root>/<node id>`, mounted at the same path (job containers
    /// are siblings: the engine resolves their mounts on the host).
    pub work_root: std::path::PathBuf,
    pub job_stop_grace: Duration,
    /// One network creation at a time: the engine allows two networks of one name.
    pub network_lock: std::sync::Arc<tokio::sync::Mutex<()>>,
    /// Mints each node's credential (None: the coordinator asks for none).
    pub auth: Option<crate::auth::Auth>,
    /// Where node containers reach the coordinator.
    pub link: std::sync::Arc<crate::api::node_link::NodeLink>,
    /// Passed to the agents (they fence themselves after about this long alone).
    pub lease: Duration,
}

impl DockerProvider {
    pub fn network(&self, cluster: &str) -> String {
        format!("shoal-{}-{cluster}", self.owner)
    }

    fn container_name(&self, node_id: &str) -> String {
        format!("shoal-{}-node-{node_id}", self.owner)
    }

    /// The cluster's network, made if need be, and the coordinator served on its
    /// gateway: (name, gateway, port).
    async fn ensure_network(
        &self,
        docker: &Docker,
        cluster: &str,
    ) -> Result<(String, std::net::IpAddr, u16), String> {
        let _one_at_a_time = self.network_lock.lock().await;
        let name = self.made_network(docker, cluster).await?;
        let network = docker
            .inspect_network(
                &name,
                None::<bollard::query_parameters::InspectNetworkOptions>,
            )
            .await
            .map_err(|e| format!("cannot inspect network {name}: {e}"))?;
        let gateway = crate::api::node_link::gateway_of(&network).map_err(|e| e.to_string())?;
        let port = self.link.serve_on(gateway).await?;
        Ok((name, gateway, port))
    }

    async fn made_network(&self, docker: &Docker, cluster: &str) -> Result<String, String> {
        let name = self.network(cluster);
        let filters = HashMap::from([("name", vec![name.clone()])]);
        let options = bollard::query_parameters::ListNetworksOptionsBuilder::default()
            .filters(&filters)
            .build();
        let existing = docker
            .list_networks(Some(options))
            .await
            .map_err(|e| format!("cannot list networks: {e}"))?;
        // `name` filters by substring: keep exact matches.
        let mut same: Vec<String> = existing
            .into_iter()
            .filter(|n| n.name.as_deref() == Some(name.as_str()))
            .filter_map(|n| n.id)
            .collect();
        if !same.is_empty() {
            // Duplicates (left by an older race) make the name ambiguous: keep one.
            for extra in same.split_off(1) {
                let _ = docker.remove_network(&extra).await;
            }
            return Ok(name);
        }
        let request = bollard::models::NetworkCreateRequest {
            name: name.clone(),
            driver: Some("bridge".into()),
            labels: Some(HashMap::from([(
                LABEL_OWNER.to_string(),
                self.owner.clone(),
            )])),
            ..Default::default()
        };
        match docker.create_network(request).await {
            Ok(_) => Ok(name),
            // Created meanwhile by the creation of another node.
            Err(bollard::errors::Error::DockerResponseServerError {
                status_code: 409, ..
            }) => Ok(name),
            Err(e) => Err(format!("cannot create network {name}: {e}")),
        }
    }

    async fn start_node(
        &self,
        docker: &Docker,
        launch: &super::NodeLaunch,
    ) -> Result<String, String> {
        let (network, gateway, port) = self.ensure_network(docker, &launch.cluster).await?;
        let work_dir = self.work_root.join(&launch.node_id);
        tokio::fs::create_dir_all(&work_dir)
            .await
            .map_err(|e| format!("cannot create work dir {}: {e}", work_dir.display()))?;
        let work = work_dir.to_string_lossy().into_owned();
        // At its own path, as on the host: MPI jobs' containers (siblings) mount it too.
        let program = self.program.to_string_lossy().into_owned();
        let cmd = vec![
            program.clone(),
            "agent".into(),
            "--endpoint".into(),
            format!("https://{}:{port}", crate::api::node_link::COORDINATOR_HOST),
            "--ca-file".into(),
            "/run/shoal/ca.pem".into(),
            "--node-id".into(),
            launch.node_id.clone(),
            "--cluster".into(),
            launch.cluster.clone(),
            // Job containers share the node container's network namespace: the node's
            // address (and name on the cluster network) is theirs, for process and
            // container jobs alike.
            "--docker-network".into(),
            format!("container:{}", self.container_name(&launch.node_id)),
        ];
        let cmd = [
            cmd,
            super::agent_flags(&self.owner, &work, launch, self.job_stop_grace, self.lease),
        ]
        .concat();
        let mut env = vec!["SHOAL_LOG=info".to_string()];
        if let Some(auth) = &self.auth {
            let credential = auth
                .node_credential(&launch.node_id)
                .map_err(|e| format!("cannot issue the node's credential: {e}"))?;
            env.push(format!("SHOAL_NODE_TOKEN={credential}"));
        }
        let labels = HashMap::from([
            (LABEL_OWNER.to_string(), self.owner.clone()),
            (LABEL_NODE_CONTAINER.to_string(), launch.node_id.clone()),
            ("shoal.cluster".to_string(), launch.cluster.clone()),
        ]);
        let endpoint = bollard::models::EndpointSettings {
            aliases: Some(vec![launch.node_id.clone()]),
            ..Default::default()
        };
        let body = bollard::models::ContainerCreateBody {
            image: Some(NODE_IMAGE.into()),
            hostname: Some(launch.node_id.clone()),
            cmd: Some(cmd),
            env: Some(env),
            labels: Some(labels),
            host_config: Some(bollard::models::HostConfig {
                binds: Some(vec![
                    format!("{program}:{program}:ro"),
                    "/var/run/docker.sock:/var/run/docker.sock".into(),
                    format!("{}:/run/shoal/ca.pem:ro", self.link.ca_file().display()),
                    format!("{work}:{work}"),
                ]),
                extra_hosts: Some(vec![format!(
                    "{}:{gateway}",
                    crate::api::node_link::COORDINATOR_HOST
                )]),
                nano_cpus: Some(i64::from(launch.cores.max(1)) * 1_000_000_000),
                memory: i64::try_from(launch.memory_bytes).ok(),
                network_mode: Some(network.clone()),
                ..Default::default()
            }),
            networking_config: Some(bollard::models::NetworkingConfig {
                endpoints_config: Some(HashMap::from([(network, endpoint)])),
            }),
            ..Default::default()
        };
        let name = self.container_name(&launch.node_id);
        let options = bollard::query_parameters::CreateContainerOptionsBuilder::default()
            .name(&name)
            .build();
        let id = docker
            .create_container(Some(options), body)
            .await
            .map_err(|e| format!("cannot create node container {name}: {e}"))?
            .id;
        if let Err(e) = docker.start_container(&id, None).await {
            let _ = remove_container(docker, &id).await;
            return Err(format!("cannot start node container {name}: {e}"));
        }
        Ok(id)
    }
}

async fn remove_container(docker: &Docker, id: &str) -> Result<(), bollard::errors::Error> {
    let options = RemoveContainerOptionsBuilder::default().force(true).build();
    match docker.remove_container(id, Some(options)).await {
        Err(bollard::errors::Error::DockerResponseServerError {
            status_code: 404, ..
        }) => Ok(()),
        other => other,
    }
}

impl DockerProvider {
    /// Removes the network if no container uses it any more (the engine refuses
    /// otherwise), and stops serving its gateway.
    async fn remove_network(&self, docker: &Docker, name: &str) {
        let gateway = docker
            .inspect_network(
                name,
                None::<bollard::query_parameters::InspectNetworkOptions>,
            )
            .await
            .ok()
            .and_then(|n| crate::api::node_link::gateway_of(&n).ok());
        if docker.remove_network(name).await.is_ok()
            && let Some(gateway) = gateway
        {
            self.link.stop(gateway);
        }
    }
}

impl super::NodeProvider for DockerProvider {
    fn create(
        &self,
        launch: super::NodeLaunch,
    ) -> futures::future::BoxFuture<'static, Result<super::StartedNode, String>> {
        use futures::{FutureExt, StreamExt};
        let this = self.clone();
        async move {
            let docker = connect().await?;
            let id = this.start_node(&docker, &launch).await?;
            tracing::info!(node = %launch.node_id, container = %id, "docker node started");
            let exited = async move {
                let mut wait = docker
                    .wait_container(&id, None::<bollard::query_parameters::WaitContainerOptions>);
                match wait.next().await {
                    Some(Ok(r)) => format!("node container exited with code {}", r.status_code),
                    Some(Err(bollard::errors::Error::DockerContainerWaitError {
                        code, ..
                    })) => {
                        format!("node container exited with code {code}")
                    }
                    Some(Err(e)) => format!("node container is gone: {e}"),
                    None => "node container is gone".to_string(),
                }
            }
            .map(super::NodeExit::gone)
            .boxed();
            Ok(super::StartedNode {
                pid: None,
                handle: String::new(),
                exited,
            })
        }
        .boxed()
    }

    fn remove(&self, node: super::NodeRemoval) -> futures::future::BoxFuture<'static, ()> {
        use futures::FutureExt;
        let this = self.clone();
        let node_id = node.node_id;
        async move {
            let Ok(docker) = connect().await else {
                return;
            };
            let name = this.container_name(&node_id);
            let cluster = docker
                .inspect_container(
                    &name,
                    None::<bollard::query_parameters::InspectContainerOptions>,
                )
                .await
                .ok()
                .and_then(|c| c.config?.labels?.get("shoal.cluster").cloned());
            let seconds = i32::try_from(this.job_stop_grace.as_secs() + 5).unwrap_or(15);
            let options = bollard::query_parameters::StopContainerOptionsBuilder::default()
                .t(seconds)
                .build();
            let _ = docker.stop_container(&name, Some(options)).await;
            remove_node_containers(&this.owner, &node_id).await;
            // Removal and the network check under one lock: of nodes removed together,
            // the last one finds the network unused and removes it (the engine
            // refuses while any container still uses it).
            let _one_at_a_time = this.network_lock.lock().await;
            if let Err(e) = remove_container(&docker, &name).await {
                warn!(node = %node_id, error = %e, "cannot remove node container");
            }
            if let Some(cluster) = cluster {
                this.remove_network(&docker, &this.network(&cluster)).await;
            }
        }
        .boxed()
    }

    fn cleanup(&self, keep: Vec<String>) -> futures::future::BoxFuture<'static, ()> {
        use futures::FutureExt;
        let owner = self.owner.clone();
        let this = self.clone();
        async move {
            let Ok(docker) = connect().await else {
                return;
            };
            let filters = HashMap::from([("label", vec![format!("{LABEL_OWNER}={owner}")])]);
            let options = ListContainersOptionsBuilder::default()
                .all(true)
                .filters(&filters)
                .build();
            let Ok(containers) = docker.list_containers(Some(options)).await else {
                return;
            };
            // Networks of clusters whose nodes are all gone (in use: the engine refuses).
            let filters = HashMap::from([("label", vec![format!("{LABEL_OWNER}={owner}")])]);
            let options = bollard::query_parameters::ListNetworksOptionsBuilder::default()
                .filters(&filters)
                .build();
            let networks = docker
                .list_networks(Some(options))
                .await
                .unwrap_or_default();
            for container in containers {
                let labels = container.labels.unwrap_or_default();
                let node = labels
                    .get(LABEL_NODE_CONTAINER)
                    .or_else(|| labels.get(LABEL_NODE))
                    .cloned()
                    .unwrap_or_default();
                if keep.contains(&node) {
                    continue;
                }
                if let Some(id) = container.id {
                    tracing::info!(node = %node, container = %id, "removing a leftover container");
                    let _ = remove_container(&docker, &id).await;
                }
            }
            // The others still have nodes: serve their gateways again, so that
            // the agents of an earlier run come back.
            for name in networks.into_iter().filter_map(|n| n.name) {
                let _one_at_a_time = this.network_lock.lock().await;
                this.remove_network(&docker, &name).await;
                if let Ok(network) = docker
                    .inspect_network(
                        &name,
                        None::<bollard::query_parameters::InspectNetworkOptions>,
                    )
                    .await
                    && let Ok(gateway) = crate::api::node_link::gateway_of(&network)
                    && let Err(why) = this.link.serve_on(gateway).await
                {
                    warn!(network = %name, %why, "cannot serve the nodes of a network");
                }
            }
        }
        .boxed()
    }
}
