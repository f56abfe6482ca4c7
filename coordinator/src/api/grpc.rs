//! gRPC services. Handlers convert at the edge, ask the control loop, convert back.

use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use futures::Stream;
use shoal_proto::PROTOCOL_VERSION;
use shoal_proto::v1 as pb;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::StreamExt;
use tokio_stream::wrappers::UnboundedReceiverStream;
use tonic::{Request, Response, Status, Streaming};
use tracing::{debug, warn};

use super::convert;
use crate::artifacts::Artifacts;
use crate::control::{AgentCall, Change, Claim, Command, ControlHandle};
use crate::model::Slot;
use crate::vmsize::Catalog;

use crate::auth::Principal;

/// A node may speak only for itself. (No principal: the guard is not in front,
/// as in unit tests of the services.)
fn same_node(principal: Option<&Principal>, node_id: &str) -> Result<(), Status> {
    match principal {
        Some(Principal::Node { node_id: own }) if own != node_id => Err(Status::permission_denied(
            format!("this credential belongs to node {own}, not {node_id}"),
        )),
        _ => Ok(()),
    }
}

/// The node an agent's call comes from (the guard let only node credentials in).
fn caller_node<T>(request: &Request<T>) -> Result<String, Status> {
    match request.extensions().get::<Principal>() {
        Some(Principal::Node { node_id }) => Ok(node_id.clone()),
        _ => Err(Status::permission_denied(
            "only a node's agent may call this",
        )),
    }
}

/// The claim of an agent's call about one instance.
fn claim(node_id: String, attempt_id: String, instance: u32, token: String) -> Claim {
    Claim {
        node_id,
        slot: Slot {
            attempt_id,
            instance,
        },
        token: Some(token),
    }
}

fn identity_info(a: &crate::identity::Assigned) -> pb::IdentityInfo {
    pb::IdentityInfo {
        name: a.name.clone(),
        client_id: a.client_id.clone(),
        r#type: a.kind.as_str().into(),
    }
}

fn cluster_identities(info: &crate::control::ClusterInfo) -> pb::ClusterIdentities {
    pb::ClusterIdentities {
        cluster: info.cluster.spec.name.clone(),
        identities: info.identities.iter().map(identity_info).collect(),
    }
}

fn user_identity(identity: crate::model::Identity) -> pb::IdentityInfo {
    pb::IdentityInfo {
        name: identity.name,
        client_id: identity.client_id,
        r#type: crate::model::IdentityKind::UserAssigned.as_str().into(),
    }
}

#[tonic::async_trait]
impl pb::identities_server::Identities for Api {
    async fn create(
        &self,
        request: Request<pb::IdentityRequest>,
    ) -> Result<Response<pb::IdentityInfo>, Status> {
        let name = request.into_inner().name;
        let identity = self.control.create_identity(name).await?;
        Ok(Response::new(user_identity(identity)))
    }

    async fn list(
        &self,
        _: Request<pb::ListIdentitiesRequest>,
    ) -> Result<Response<pb::IdentityList>, Status> {
        let identities = self
            .control
            .list_identities()
            .await?
            .into_iter()
            .map(user_identity)
            .collect();
        Ok(Response::new(pb::IdentityList { identities }))
    }

    async fn assign(
        &self,
        request: Request<pb::ClusterIdentity>,
    ) -> Result<Response<pb::ClusterIdentities>, Status> {
        let asked = request.into_inner();
        let info = self
            .control
            .assign_identity(asked.cluster, asked.identity)
            .await?;
        Ok(Response::new(cluster_identities(&info)))
    }

    async fn remove(
        &self,
        request: Request<pb::ClusterIdentity>,
    ) -> Result<Response<pb::ClusterIdentities>, Status> {
        let asked = request.into_inner();
        let info = self
            .control
            .remove_identity(asked.cluster, asked.identity)
            .await?;
        Ok(Response::new(cluster_identities(&info)))
    }

    async fn get(
        &self,
        request: Request<pb::ClusterRef>,
    ) -> Result<Response<pb::ClusterIdentities>, Status> {
        let info = self.control.get_cluster(request.into_inner().name).await?;
        Ok(Response::new(cluster_identities(&info)))
    }
}

fn join_token_info(t: crate::auth::JoinTokenInfo) -> pb::JoinTokenInfo {
    pb::JoinTokenInfo {
        id: t.id,
        cluster: t.cluster,
        expires_at_ms: t.expires_at_ms,
        uses_left: t.uses_left,
        revoked: t.revoked,
    }
}

#[tonic::async_trait]
impl pb::join_tokens_server::JoinTokens for Api {
    async fn create(
        &self,
        request: Request<pb::JoinTokenRequest>,
    ) -> Result<Response<pb::JoinTokenCreated>, Status> {
        let asked = request.into_inner();
        self.control.get_cluster(asked.cluster.clone()).await?;
        let ttl_seconds = if asked.ttl_seconds == 0 {
            86_400
        } else {
            asked.ttl_seconds
        };
        let ttl_ms = i64::try_from(ttl_seconds.saturating_mul(1000)).unwrap_or(i64::MAX);
        let token = self
            .auth
            .create_join_token(&asked.cluster, ttl_ms, asked.uses.max(1))?;
        let id = token.split('_').nth(2).unwrap_or_default().to_string();
        let info = self.auth.join_tokens()?.into_iter().find(|t| t.id == id);
        Ok(Response::new(pb::JoinTokenCreated {
            info: info.map(join_token_info),
            token,
        }))
    }

    async fn list(
        &self,
        _: Request<pb::ListJoinTokensRequest>,
    ) -> Result<Response<pb::JoinTokenList>, Status> {
        let tokens = self
            .auth
            .join_tokens()?
            .into_iter()
            .map(join_token_info)
            .collect();
        Ok(Response::new(pb::JoinTokenList { tokens }))
    }

    async fn revoke(
        &self,
        request: Request<pb::TokenRef>,
    ) -> Result<Response<pb::JoinTokenInfo>, Status> {
        let id = request.into_inner().id;
        if !self.auth.revoke_join_token(&id)? {
            return Err(Status::not_found(format!("no live join token `{id}`")));
        }
        let info = self
            .auth
            .join_tokens()?
            .into_iter()
            .find(|t| t.id == id)
            .ok_or_else(|| Status::not_found(format!("no join token `{id}`")))?;
        Ok(Response::new(join_token_info(info)))
    }
}

fn token_info(t: crate::auth::TokenInfo) -> pb::TokenInfo {
    pb::TokenInfo {
        id: t.id,
        role: t.kind,
        name: t.subject,
        created_at_ms: t.created_at_ms,
        revoked: t.revoked,
    }
}

impl Api {
    /// The API token `id`, as listed.
    fn token(&self, id: &str) -> Result<pb::TokenInfo, Status> {
        self.auth
            .list()?
            .into_iter()
            .find(|t| t.id == id)
            .map(token_info)
            .ok_or_else(|| {
                Status::not_found(format!("no token `{id}`; `shoal token list` shows them"))
            })
    }
}

#[tonic::async_trait]
impl pb::tokens_server::Tokens for Api {
    async fn create(
        &self,
        request: Request<pb::TokenRequest>,
    ) -> Result<Response<pb::TokenCreated>, Status> {
        let asked = request.into_inner();
        let role = crate::auth::Role::parse(&asked.role)?;
        let token = self.auth.create_token(role, &asked.name)?;
        let id = token.split('_').nth(1).unwrap_or_default();
        Ok(Response::new(pb::TokenCreated {
            info: Some(self.token(id)?),
            token,
        }))
    }

    async fn list(
        &self,
        _: Request<pb::ListTokensRequest>,
    ) -> Result<Response<pb::TokenList>, Status> {
        let tokens = self.auth.list()?.into_iter().map(token_info).collect();
        Ok(Response::new(pb::TokenList { tokens }))
    }

    async fn revoke(
        &self,
        request: Request<pb::TokenRef>,
    ) -> Result<Response<pb::TokenInfo>, Status> {
        let id = request.into_inner().id;
        self.token(&id)?;
        self.auth.revoke(&id)?;
        Ok(Response::new(self.token(&id)?))
    }
}

type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

/// Shared by every service (and the HTTP API).
#[derive(Clone)]
pub struct Api {
    pub control: ControlHandle,
    pub catalog: Catalog,
    pub artifacts: Artifacts,
    pub max_code_bytes: usize,
    pub auth: crate::auth::Auth,
    /// Reads history (ended jobs, logs, rows) from the store, not through the loop.
    pub reader: crate::store::Reader,
    /// Signs jobs' managed-identity tokens (None: no identities here).
    pub signer: Option<crate::identity::Signer>,
    sessions: Arc<AtomicU64>,
    exec: super::exec::ExecRelay,
}

impl Api {
    pub fn new(
        control: ControlHandle,
        catalog: Catalog,
        artifacts: Artifacts,
        max_code_bytes: usize,
        auth: crate::auth::Auth,
        reader: crate::store::Reader,
    ) -> Self {
        Api {
            control,
            catalog,
            artifacts,
            max_code_bytes,
            auth,
            reader,
            signer: None,
            sessions: Arc::new(AtomicU64::new(1)),
            exec: super::exec::ExecRelay::default(),
        }
    }

    /// Creates a cluster; a docker-provider cluster only where that provider can work.
    pub async fn create_cluster(
        &self,
        request: crate::model::ClusterRequest,
    ) -> Result<crate::control::ClusterInfo, crate::Error> {
        if request.provider.eq_ignore_ascii_case("docker") {
            crate::provider::docker::check_ready()
                .await
                .map_err(|why| {
                    crate::Error::invalid(
                        "provider",
                        format!("the docker provider cannot work here: {why}"),
                    )
                })?;
        }
        self.control.create_cluster(request).await
    }

    pub async fn submit(&self, spec: pb::JobSpec) -> Result<pb::Job, Status> {
        let job = self
            .submit_with(spec, Default::default(), Vec::new())
            .await?;
        Ok(convert::job(&job))
    }

    /// Submits a job request with what admission resolved beside it (never from a
    /// bare request: `extras` can name files of this machine); `stored` are files
    /// kept for it already, discarded if it is refused.
    pub async fn submit_with(
        &self,
        mut spec: pb::JobSpec,
        extras: crate::model::JobExtras,
        stored: Vec<String>,
    ) -> Result<crate::model::Job, Status> {
        let discard = |paths: Vec<String>| async move {
            for path in paths {
                Artifacts::discard(&path).await;
            }
        };
        let mut stored = stored;
        if spec
            .distribution
            .as_ref()
            .is_some_and(|d| d.r#type == "mpi")
            && let Err(refused) = self.check_mpirun(&spec).await
        {
            discard(stored).await;
            return Err(refused);
        }
        let code = std::mem::take(&mut spec.code);
        if code.len() > self.max_code_bytes {
            discard(stored).await;
            return Err(crate::Error::invalid(
                "code",
                format!(
                    "the snapshot is {} MiB, above the {} MiB limit; keep data out of the code folder",
                    code.len() >> 20,
                    self.max_code_bytes >> 20
                ),
            )
            .into());
        }
        let code_path = if code.is_empty() {
            None
        } else {
            let path = self.artifacts.put_code(code).await?;
            stored.push(path.clone());
            Some(path)
        };
        let mut request = match convert::job_request(spec, code_path) {
            Ok(request) => request,
            Err(e) => {
                discard(stored).await;
                return Err(e.into());
            }
        };
        request.extras = extras;
        match self.control.submit_job(request).await {
            Ok(job) => Ok(job),
            Err(e) => {
                discard(stored).await;
                Err(e.into())
            }
        }
    }

    /// An MPI job needs `mpirun` where instance 0 runs: in its image, or on the
    /// machine for a process job on local nodes. Refused at submit, with the reason.
    async fn check_mpirun(&self, spec: &pb::JobSpec) -> Result<(), Status> {
        let refuse =
            |why: String| -> Status { crate::Error::invalid("distribution.type", why).into() };
        if !spec.image.is_empty() {
            return match crate::provider::docker::image_lacks(&spec.image, "mpirun").await {
                Ok(None) => Ok(()),
                Ok(Some(why)) => Err(refuse(format!(
                    "an mpi job runs mpirun in its image, but {why}; build one with Open MPI (images/build.sh mpi-train makes shoal/mpi-train)"
                ))),
                // No engine to ask: the agent reports it if the image cannot run.
                Err(_) => Ok(()),
            };
        }
        let Ok(cluster) = self.control.get_cluster(spec.cluster.clone()).await else {
            return Ok(()); // the submit names the missing cluster
        };
        if cluster.cluster.spec.provider != crate::model::ProviderKind::Local {
            return Err(refuse(
                "an mpi job on a docker-provider cluster needs an image with Open MPI (environment.image, e.g. shoal/mpi-train)".into(),
            ));
        }
        let on_path = std::env::var_os("PATH").is_some_and(|path| {
            std::env::split_paths(&path).any(|dir| dir.join("mpirun").is_file())
        });
        if on_path {
            Ok(())
        } else {
            Err(refuse(
                "an mpi job without an image runs mpirun on this machine, which has none; install Open MPI (apt-get install openmpi-bin) or give the job an image with it".into(),
            ))
        }
    }

    pub fn cluster_watch(&self, name: String) -> mpsc::Receiver<Result<pb::Cluster, Status>> {
        let (tx, rx) = mpsc::channel(16);
        let control = self.control.clone();
        let mut changes = control.subscribe_changes();
        tokio::spawn(async move {
            loop {
                let info = match control.get_cluster(name.clone()).await {
                    Ok(info) => info,
                    Err(e) => {
                        let _ = tx.send(Err(e.into())).await;
                        return;
                    }
                };
                if tx.send(Ok(convert::cluster(&info))).await.is_err() {
                    return;
                }
                if !wait_for(&mut changes, |c| *c == Change::Cluster(name.clone())).await {
                    return;
                }
            }
        });
        rx
    }
}

/// Waits for a matching change (or a lag, after which the caller re-reads anyway).
pub(super) async fn wait_for(
    changes: &mut broadcast::Receiver<Change>,
    matches: impl Fn(&Change) -> bool,
) -> bool {
    loop {
        match changes.recv().await {
            Ok(change) if matches(&change) => return true,
            Ok(_) => continue,
            Err(broadcast::error::RecvError::Lagged(_)) => return true,
            Err(broadcast::error::RecvError::Closed) => return false,
        }
    }
}

fn stream_of<T: Send + 'static>(rx: mpsc::Receiver<Result<T, Status>>) -> ResponseStream<T> {
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}

#[tonic::async_trait]
impl pb::clusters_server::Clusters for Api {
    async fn create(
        &self,
        request: Request<pb::ClusterSpec>,
    ) -> Result<Response<pb::Cluster>, Status> {
        let info = self
            .create_cluster(convert::cluster_request(request.into_inner()))
            .await?;
        Ok(Response::new(convert::cluster(&info)))
    }

    async fn get(&self, request: Request<pb::ClusterRef>) -> Result<Response<pb::Cluster>, Status> {
        let info = self.control.get_cluster(request.into_inner().name).await?;
        Ok(Response::new(convert::cluster(&info)))
    }

    async fn list(
        &self,
        _: Request<pb::ListClustersRequest>,
    ) -> Result<Response<pb::ClusterList>, Status> {
        let clusters = self.control.list_clusters().await?;
        Ok(Response::new(pb::ClusterList {
            clusters: clusters.iter().map(convert::cluster).collect(),
        }))
    }

    async fn update(
        &self,
        request: Request<pb::ClusterUpdate>,
    ) -> Result<Response<pb::Cluster>, Status> {
        let info = self
            .control
            .update_cluster(convert::cluster_update(request.into_inner()))
            .await?;
        Ok(Response::new(convert::cluster(&info)))
    }

    async fn delete(
        &self,
        request: Request<pb::ClusterRef>,
    ) -> Result<Response<pb::Cluster>, Status> {
        let info = self
            .control
            .delete_cluster(request.into_inner().name)
            .await?;
        Ok(Response::new(convert::cluster(&info)))
    }

    type WatchStream = ResponseStream<pb::Cluster>;

    async fn watch(
        &self,
        request: Request<pb::ClusterRef>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        Ok(Response::new(stream_of(
            self.cluster_watch(request.into_inner().name),
        )))
    }

    async fn lock(
        &self,
        request: Request<pb::ClusterLock>,
    ) -> Result<Response<pb::Cluster>, Status> {
        let lock = request.into_inner();
        let kind = crate::model::LockKind::parse(&lock.kind)?;
        let info = self.control.lock_cluster(lock.name, Some(kind)).await?;
        Ok(Response::new(convert::cluster(&info)))
    }

    async fn unlock(
        &self,
        request: Request<pb::ClusterRef>,
    ) -> Result<Response<pb::Cluster>, Status> {
        let info = self
            .control
            .lock_cluster(request.into_inner().name, None)
            .await?;
        Ok(Response::new(convert::cluster(&info)))
    }
}

#[tonic::async_trait]
impl pb::jobs_server::Jobs for Api {
    async fn submit(&self, request: Request<pb::JobSpec>) -> Result<Response<pb::Job>, Status> {
        Ok(Response::new(
            Api::submit(self, request.into_inner()).await?,
        ))
    }

    async fn get(&self, request: Request<pb::JobRef>) -> Result<Response<pb::Job>, Status> {
        let job = self.job(&request.into_inner().id).await?;
        Ok(Response::new(convert::job(&job)))
    }

    async fn list(
        &self,
        request: Request<pb::ListJobsRequest>,
    ) -> Result<Response<pb::JobList>, Status> {
        let asked = request.into_inner();
        let cluster = Some(asked.cluster).filter(|c| !c.is_empty());
        let (jobs, next) = self
            .list_jobs(cluster, asked.limit as usize, Some(&asked.after))
            .await?;
        Ok(Response::new(pb::JobList {
            jobs: jobs.iter().map(convert::job).collect(),
            next_after: next.unwrap_or_default(),
        }))
    }

    async fn create(
        &self,
        request: Request<pb::JobFileRequest>,
    ) -> Result<Response<pb::JobCreated>, Status> {
        let asked = request.into_inner();
        let files = asked
            .files
            .into_iter()
            .map(|(path, file)| {
                (
                    path,
                    super::admit::Upload {
                        data: file.data,
                        folder: file.folder,
                    },
                )
            })
            .collect();
        let (job, warnings) = self.create_job(&asked.text, &asked.set, files).await?;
        Ok(Response::new(pb::JobCreated {
            job: Some(convert::job(&job)),
            warnings,
        }))
    }

    async fn delete(&self, request: Request<pb::JobRef>) -> Result<Response<pb::Job>, Status> {
        let job = self.delete_job(&request.into_inner().id).await?;
        Ok(Response::new(convert::job(&job)))
    }

    async fn cancel(&self, request: Request<pb::JobRef>) -> Result<Response<pb::Job>, Status> {
        let job = self.control.cancel_job(request.into_inner().id).await?;
        Ok(Response::new(convert::job(&job)))
    }

    type WatchStream = ResponseStream<pb::Job>;

    async fn watch(
        &self,
        request: Request<pb::JobRef>,
    ) -> Result<Response<Self::WatchStream>, Status> {
        Ok(Response::new(stream_of(
            self.job_watch(request.into_inner().id),
        )))
    }

    type LogsStream = ResponseStream<pb::LogChunk>;

    async fn logs(
        &self,
        request: Request<pb::LogsRequest>,
    ) -> Result<Response<Self::LogsStream>, Status> {
        let request = request.into_inner();
        // Unknown job: fail the call itself, not the first stream item.
        self.job(&request.job_id).await?;
        Ok(Response::new(stream_of(self.log_stream(request))))
    }

    async fn why(&self, request: Request<pb::JobRef>) -> Result<Response<pb::Explanation>, Status> {
        let lines = self.explain(&request.into_inner().id).await?;
        Ok(Response::new(pb::Explanation { lines }))
    }

    async fn download_outputs(
        &self,
        request: Request<pb::JobRef>,
    ) -> Result<Response<pb::OutputsList>, Status> {
        let id = request.into_inner().id;
        Ok(Response::new(self.outputs(id).await?))
    }
}

#[tonic::async_trait]
impl pb::nodes_server::Nodes for Api {
    async fn list(
        &self,
        request: Request<pb::ListNodesRequest>,
    ) -> Result<Response<pb::NodeList>, Status> {
        let cluster = Some(request.into_inner().cluster).filter(|c| !c.is_empty());
        let nodes = self.control.list_nodes(cluster).await?;
        Ok(Response::new(pb::NodeList {
            nodes: nodes.iter().map(convert::node).collect(),
        }))
    }

    async fn revoke(&self, request: Request<pb::NodeRef>) -> Result<Response<pb::Node>, Status> {
        let id = request.into_inner().id;
        let node = self.control.revoke_node(id.clone()).await?;
        self.auth.revoke_node(&id)?;
        Ok(Response::new(convert::node(&node)))
    }

    async fn preempt(
        &self,
        request: Request<pb::PreemptRequest>,
    ) -> Result<Response<pb::Node>, Status> {
        let request = request.into_inner();
        let node = self
            .control
            .preempt_node(request.node_id, request.notice_seconds.map(u64::from))
            .await?;
        Ok(Response::new(convert::node(&node)))
    }
}

#[tonic::async_trait]
impl pb::vm_sizes_server::VmSizes for Api {
    async fn list(
        &self,
        _: Request<pb::ListVmSizesRequest>,
    ) -> Result<Response<pb::VmSizeList>, Status> {
        Ok(Response::new(pb::VmSizeList {
            sizes: self.catalog.all().iter().map(convert::vm_size).collect(),
        }))
    }
}

#[tonic::async_trait]
impl pb::agent_server::Agent for Api {
    type SessionStream = ResponseStream<pb::CoordinatorMessage>;

    async fn session(
        &self,
        request: Request<Streaming<pb::AgentMessage>>,
    ) -> Result<Response<Self::SessionStream>, Status> {
        use pb::agent_message::Msg;
        let principal = request.extensions().get::<Principal>().cloned();
        let mut inbound = request.into_inner();
        let Some(Msg::Register(register)) = inbound.message().await?.and_then(|m| m.msg) else {
            return Err(Status::invalid_argument(
                "an agent session must start with Register",
            ));
        };
        if register.protocol_version != PROTOCOL_VERSION {
            return Err(Status::failed_precondition(format!(
                "agent speaks protocol v{}, this coordinator v{PROTOCOL_VERSION}; run the same shoal version on both",
                register.protocol_version
            )));
        }
        let node_id = register.node_id.clone();
        same_node(principal.as_ref(), &node_id)?;
        let session = self.sessions.fetch_add(1, Ordering::Relaxed);
        let (link, outbound) = mpsc::unbounded_channel();
        self.control
            .register_agent(convert::registration(register), session, link.clone())
            .await?;
        self.exec.attach(&node_id, session, link.clone());
        let control = self.control.clone();
        let exec = self.exec.clone();
        tokio::spawn(async move {
            loop {
                let message = match inbound.message().await {
                    Ok(Some(message)) => message,
                    Ok(None) => break,
                    Err(status) => {
                        debug!(node = %node_id, %status, "agent stream ended");
                        break;
                    }
                };
                let command = match message.msg {
                    Some(Msg::Heartbeat(hb)) => {
                        // The agent fences itself when these stop coming.
                        let _ = link.send(crate::control::ToAgent::Pong);
                        let cpu_percent = hb.cpu_percent;
                        let memory_used_bytes = hb.memory_used_bytes;
                        let (stats, usage) = convert::heartbeat(hb);
                        Command::Heartbeat {
                            node_id: node_id.clone(),
                            cpu_percent,
                            memory_used_bytes,
                            stats,
                            usage,
                        }
                    }
                    Some(Msg::Event(event)) => {
                        let slot = Slot {
                            attempt_id: event.attempt_id,
                            instance: event.instance,
                        };
                        match event.kind {
                            Some(pb::attempt_event::Kind::Started(started)) => {
                                Command::InstanceStarted {
                                    node_id: node_id.clone(),
                                    slot,
                                    gpus: started.gpus,
                                }
                            }
                            Some(pb::attempt_event::Kind::Exited(exited)) => {
                                Command::InstanceExited {
                                    node_id: node_id.clone(),
                                    slot,
                                    exit: convert::exited(exited),
                                }
                            }
                            None => continue,
                        }
                    }
                    Some(Msg::Log(log)) => Command::Log {
                        node_id: node_id.clone(),
                        slot: Slot {
                            attempt_id: log.attempt_id,
                            instance: log.instance,
                        },
                        stream: log.stream,
                        data: log.data,
                    },
                    Some(Msg::Exec(frame)) => {
                        exec.frame(&node_id, &control, frame).await;
                        continue;
                    }
                    Some(Msg::Register(_)) => {
                        warn!(node = %node_id, "second Register on one session ignored");
                        continue;
                    }
                    None => continue,
                };
                if !control.send(command).await {
                    break;
                }
            }
            exec.detach(&node_id, session);
            control.send(Command::AgentGone { node_id, session }).await;
        });
        let stream = UnboundedReceiverStream::new(outbound).map(|m| Ok(convert::to_agent(m)));
        Ok(Response::new(Box::pin(stream)))
    }

    async fn fetch_code(
        &self,
        request: Request<pb::AttemptRef>,
    ) -> Result<Response<pb::Artifact>, Status> {
        let node = caller_node(&request)?;
        let asked = request.into_inner();
        let claim = claim(node, asked.attempt_id, asked.instance, asked.token);
        let granted = self.control.authorize(claim, AgentCall::FetchCode).await?;
        let Some(path) = granted.code_path else {
            return Err(Status::not_found(format!(
                "job `{}` has no code snapshot",
                granted.job_id
            )));
        };
        let data = Artifacts::read(&path).await?;
        Ok(Response::new(pb::Artifact { data }))
    }

    async fn fetch_input(
        &self,
        request: Request<pb::InputRef>,
    ) -> Result<Response<pb::Artifact>, Status> {
        let node = caller_node(&request)?;
        let asked = request.into_inner();
        let instance = asked.instance.unwrap_or_default();
        let claim = claim(node, instance.attempt_id, instance.instance, instance.token);
        let granted = self.control.authorize(claim, AgentCall::FetchInput).await?;
        let job = self.job(&granted.job_id).await?;
        let input = job.spec.extras.inputs.get(&asked.name).ok_or_else(|| {
            Status::not_found(format!("job {} has no input `{}`", job.id, asked.name))
        })?;
        let data = self
            .read_whole(&format!("inputs.{}", asked.name), input)
            .await?;
        Ok(Response::new(pb::Artifact { data }))
    }

    async fn restore_outputs(
        &self,
        request: Request<pb::AttemptRef>,
    ) -> Result<Response<pb::Artifact>, Status> {
        let node = caller_node(&request)?;
        let asked = request.into_inner();
        let instance = asked.instance;
        let claim = claim(node, asked.attempt_id, instance, asked.token);
        let granted = self
            .control
            .authorize(claim, AgentCall::RestoreOutputs)
            .await?;
        for attempt in &granted.earlier_attempts {
            if let Some(data) = self.artifacts.instance_outputs(attempt, instance).await? {
                return Ok(Response::new(pb::Artifact { data }));
            }
        }
        Ok(Response::new(pb::Artifact { data: Vec::new() }))
    }

    async fn work(
        &self,
        request: Request<pb::WorkRequest>,
    ) -> Result<Response<pb::MiniBatchLease>, Status> {
        let node_id = caller_node(&request)?;
        let work = request.into_inner();
        same_node(
            Some(&Principal::Node {
                node_id: node_id.clone(),
            }),
            &work.node_id,
        )?;
        let request = crate::control::WorkRequest {
            node_id,
            token: work.token,
            slot: Slot {
                attempt_id: work.attempt_id,
                instance: work.instance,
            },
            report: work.report.map(|r| crate::control::MiniBatchResult {
                lease: r.lease,
                ok: r.ok,
                rows: r.rows,
                message: r.message,
            }),
            want_next: work.want_next,
        };
        let reply = self.control.work(request).await?;
        let mut lease = pb::MiniBatchLease {
            accepted: reply.accepted,
            finished: reply.finished,
            wait_ms: reply.wait_ms,
            ..Default::default()
        };
        if let Some(leased) = reply.lease {
            lease.lease = leased.lease;
            lease.index = leased.index;
            lease.execution = leased.execution;
            lease.items = self.reader.items(&leased.job_id, leased.index).await?;
            lease.folder = leased.folder;
            lease.timeout_seconds = leased.timeout_seconds.unwrap_or(0);
        }
        Ok(Response::new(lease))
    }

    async fn join(
        &self,
        request: Request<pb::JoinRequest>,
    ) -> Result<Response<pb::JoinReply>, Status> {
        let asked = request.into_inner();
        let cluster = self.auth.use_join_token(&asked.join_token).map_err(|why| {
            warn!(%why, hostname = %asked.hostname, "join refused");
            Status::unauthenticated(format!(
                "{why}; ask an admin for one (`shoal join-token create`)"
            ))
        })?;
        let node = self
            .control
            .join_node(
                cluster.clone(),
                asked.hostname,
                asked.cores,
                asked.memory_bytes,
            )
            .await?;
        let credential = self.auth.node_credential(&node.id)?;
        Ok(Response::new(pb::JoinReply {
            node_id: node.id,
            cluster,
            credential,
        }))
    }

    async fn issue_token(
        &self,
        request: Request<pb::JobTokenRequest>,
    ) -> Result<Response<pb::JobToken>, Status> {
        let node = caller_node(&request)?;
        let asked = request.into_inner();
        let Some(signer) = &self.signer else {
            return Err(Status::failed_precondition(
                "this coordinator issues no identity tokens",
            ));
        };
        if asked.resource.trim().is_empty() {
            return Err(Status::invalid_argument(
                "give the resource the token is for: ?resource=https://...",
            ));
        }
        let attempt_id = asked.attempt_id.clone();
        let claim = claim(node, asked.attempt_id, asked.instance, asked.token);
        let granted = match self.control.authorize(claim, AgentCall::IssueToken).await {
            Err(crate::Error::PermissionDenied(why)) if why.ends_with("has ended") => {
                return Err(Status::unauthenticated(why));
            }
            other => other?,
        };
        let cluster = granted.cluster;
        let assigned = self.control.get_cluster(cluster.clone()).await?.identities;
        if assigned.is_empty() {
            return Err(Status::failed_precondition(format!(
                "cluster `{cluster}` has no managed identity; assign one with `shoal cluster identity assign --name {cluster} '[system]'`"
            )));
        }
        let chosen = if asked.client_id.is_empty() {
            assigned.first()
        } else {
            assigned.iter().find(|a| a.client_id == asked.client_id)
        };
        let Some(identity) = chosen else {
            return Err(Status::permission_denied(format!(
                "identity {} is not assigned to cluster `{cluster}`",
                asked.client_id
            )));
        };
        let now = crate::auth::now_ms() / 1000;
        let issued = signer.issue(
            &identity.client_id,
            identity.kind.as_str(),
            &asked.resource,
            &cluster,
            &granted.job_id,
            &attempt_id,
            now,
        )?;
        Ok(Response::new(pb::JobToken {
            access_token: issued.access_token,
            expires_on: issued.expires_on,
            resource: asked.resource,
            client_id: identity.client_id.clone(),
        }))
    }

    async fn upload_outputs(
        &self,
        request: Request<pb::OutputsUpload>,
    ) -> Result<Response<pb::UploadAck>, Status> {
        let node = caller_node(&request)?;
        let upload = request.into_inner();
        let attempt_id = upload.attempt_id.clone();
        let claim = claim(node, upload.attempt_id, upload.instance, upload.token);
        let granted = self
            .control
            .authorize(claim, AgentCall::UploadOutputs)
            .await?;
        if upload.output_name.is_empty() {
            self.artifacts
                .put_outputs(&attempt_id, upload.instance, upload.data)
                .await?;
        } else {
            self.keep_named(
                &granted.job_id,
                &attempt_id,
                upload.instance,
                &upload.output_name,
                upload.data,
            )
            .await?;
        }
        Ok(Response::new(pb::UploadAck {}))
    }
}

#[tonic::async_trait]
impl pb::quotas_server::Quotas for Api {
    async fn get(&self, _: Request<pb::QuotaRequest>) -> Result<Response<pb::QuotaReport>, Status> {
        let report = self.control.quotas().await?;
        Ok(Response::new(convert::quota_report(&report)))
    }

    async fn set(
        &self,
        request: Request<pb::QuotaUpdate>,
    ) -> Result<Response<pb::QuotaReport>, Status> {
        let update = request.into_inner();
        let family = match (update.family.trim(), update.family_cores) {
            ("", None) => None,
            (family, Some(cores)) if !family.is_empty() => Some((family.to_string(), cores)),
            _ => {
                return Err(crate::Error::invalid(
                    "family",
                    "a family quota needs both the family and its cores (--family NAME --cores N)",
                )
                .into());
            }
        };
        let change = crate::control::QuotaChange {
            family,
            low_priority_cores: update.low_priority_cores,
            total_cores: update.total_cores,
        };
        let report = self.control.set_quotas(change).await?;
        Ok(Response::new(convert::quota_report(&report)))
    }
}
