//! gRPC services. Handlers convert at the edge, ask the control loop, convert back.
//! One file per service (or family): `clusters`, `jobs`, `nodes` (with VmSizes and
//! Quotas), `identities` (with JoinTokens and Tokens), `agent`; here the shared
//! `Api` and its helpers.

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

mod agent;
mod clusters;
mod identities;
mod jobs;
mod nodes;

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
    /// MLflow tracking (None: not served, as in unit tests of the services).
    pub tracking: Option<crate::tracking::Tracking>,
    /// The tracking API's routes, which jobs' calls (`Agent.Track`) are answered by.
    pub tracking_routes: Option<axum::Router>,
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
            tracking: None,
            tracking_routes: None,
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
            .submit_with(spec, Default::default(), None, Vec::new())
            .await?;
        Ok(convert::job(&job))
    }

    /// Submits a job request with what admission resolved beside it (never from a
    /// bare request: `extras` can name files of this machine); `stored` are files
    /// kept for it already, discarded if it is refused.
    pub async fn submit_with(
        &self,
        spec: pb::JobSpec,
        extras: crate::model::JobExtras,
        sweep: Option<crate::sweep::SweepSpec>,
        stored: Vec<String>,
    ) -> Result<crate::model::Job, Status> {
        let mut stored = stored;
        let submitted = match self.request_of(spec, extras, &mut stored).await {
            Ok(mut request) => {
                request.sweep = sweep;
                self.control.submit_job(request).await.map_err(Status::from)
            }
            Err(e) => Err(e),
        };
        if submitted.is_err() {
            for path in stored {
                Artifacts::discard(&path).await;
            }
        }
        submitted
    }

    /// A wire spec checked and made a request: an MPI job's launcher looked
    /// for, its code kept (the path pushed to `stored`, for the caller to discard
    /// if the submission fails).
    pub async fn request_of(
        &self,
        mut spec: pb::JobSpec,
        extras: crate::model::JobExtras,
        stored: &mut Vec<String>,
    ) -> Result<crate::model::JobRequest, Status> {
        if spec
            .distribution
            .as_ref()
            .is_some_and(|d| d.r#type == "mpi")
        {
            self.check_mpirun(&spec).await?;
        }
        let code = std::mem::take(&mut spec.code);
        if code.len() > self.max_code_bytes {
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
        let mut request = convert::job_request(spec, code_path)?;
        request.extras = extras;
        Ok(request)
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
            return Err(refuse(format!(
                "an mpi job on a {}-provider cluster needs an image with Open MPI (environment.image, e.g. shoal/mpi-train)",
                cluster.cluster.spec.provider.as_str()
            )));
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
