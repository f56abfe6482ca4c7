//! Wires the coordinator together: store, provider, control loop, and the gRPC and
//! HTTP APIs on one listener. Takes an already-bound listener and a shutdown future.

use std::future::IntoFuture;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::serve::ListenerExt;
use serde::Deserialize;
use shoal_proto::v1 as pb;
use tokio::net::TcpListener;
use tracing::info;

use crate::api::{Api, http};
use crate::artifacts::Artifacts;
use crate::control::{ControlConfig, Driver};
use crate::provider::{DockerProvider, LocalProvider, Providers};
use crate::store::SqlStore;
use crate::vmsize::{Catalog, VmSize};
use crate::{Error, Result};

/// Largest gRPC message (a code snapshot or outputs upload travels as one).
pub const MAX_MESSAGE_BYTES: usize = 256 << 20;

/// The optional `shoal.yaml` in the data dir (or `--config`). Unknown keys are errors.
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigFile {
    /// Sizes added to (or replacing) the built-in catalog.
    #[serde(default)]
    pub vm_sizes: Vec<VmSize>,
    /// Seconds without a word from a node's agent after which its work is rerun
    /// elsewhere (default 30); the agent stops that work itself by then.
    #[serde(default, alias = "agent_grace_seconds")]
    pub lease_seconds: Option<u64>,
    /// Largest code snapshot accepted at submit, in MiB.
    #[serde(default)]
    pub max_code_mib: Option<usize>,
    /// Seconds a stopped job gets between SIGTERM and SIGKILL (default 10).
    #[serde(default)]
    pub job_stop_grace_seconds: Option<u64>,
    /// Core quotas (until `shoal quota set` stores others).
    #[serde(default)]
    pub quotas: Option<crate::governance::Quotas>,
    /// Seconds of notice a preempted node's jobs get (default 30).
    #[serde(default)]
    pub preemption_notice_seconds: Option<u64>,
    /// Chaos testing: preempt a random low-priority node every this many seconds.
    #[serde(default)]
    pub chaos_preempt_every_seconds: Option<u64>,
    /// A job whose GPUs stay below this utilization (default 5) ...
    #[serde(default)]
    pub idle_gpu_threshold_percent: Option<f64>,
    /// ... for this many minutes (default 10) is flagged (and canceled where the
    /// cluster's `cancel_idle_gpu_jobs` policy says so).
    #[serde(default)]
    pub idle_gpu_minutes: Option<u64>,
    /// Local nodes run process jobs as this unprivileged user (the coordinator
    /// must run as root for it); containers are unprivileged already.
    #[serde(default)]
    pub process_jobs_user: Option<String>,
    /// Seconds a new node has to start and register before it is given up
    /// (default 60).
    #[serde(default)]
    pub node_start_timeout_seconds: Option<u64>,
    /// Where agents on other machines (the slurm and command providers' nodes)
    /// reach this coordinator, e.g. `http://head-node:7070` (default: the address
    /// it listens on).
    #[serde(default)]
    pub advertise_endpoint: Option<String>,
    /// With a PostgreSQL store shared by several coordinators: how long the
    /// leader's lease holds without renewal (default 6); a standby takes over
    /// within about this long after the leader is gone.
    #[serde(default)]
    pub leader_lease_seconds: Option<u64>,
    /// Ended jobs are deleted, with their logs, rows and outputs, this many days
    /// after they ended (default 30; 0 keeps them for good; fractions allowed).
    #[serde(default)]
    pub job_retention_days: Option<f64>,
}

impl ConfigFile {
    pub fn from_yaml(text: &str) -> Result<Self> {
        serde_saphyr::from_str(text).map_err(|e| Error::invalid("config", e.to_string()))
    }
}

#[derive(Clone, Debug)]
pub struct CoordinatorConfig {
    pub data_dir: PathBuf,
    /// The `shoal` binary local nodes run as `shoal agent`.
    pub agent_program: PathBuf,
    pub file: ConfigFile,
    pub control: ControlConfig,
    /// TLS on the TCP port (None: plain, loopback only).
    pub tls: Option<crate::tls::TlsFiles>,
    /// Keep the state in this PostgreSQL database (`postgres://…`), leading it
    /// with `lease` (None: SQLite in the data dir).
    pub postgres: Option<(String, crate::leader::Lease)>,
}

impl CoordinatorConfig {
    pub fn new(data_dir: PathBuf, agent_program: PathBuf, file: ConfigFile) -> Self {
        let mut control = ControlConfig {
            catalog: Catalog::with_extra(&file.vm_sizes),
            ..ControlConfig::default()
        };
        if let Some(lease) = file.lease_seconds {
            control.lease = Duration::from_secs(lease.max(1));
        }
        // Heartbeats (and their answers) come often enough for the agent to tell
        // a silent coordinator from a quiet one well inside the lease.
        control.heartbeat_interval = control
            .heartbeat_interval
            .min(control.lease / 6)
            .max(Duration::from_millis(200));
        if let Some(quotas) = &file.quotas {
            control.quotas = quotas.clone();
        }
        if let Some(notice) = file.preemption_notice_seconds {
            control.preemption_notice = Duration::from_secs(notice);
        }
        if let Some(threshold) = file.idle_gpu_threshold_percent {
            control.idle_gpu_threshold_percent = threshold;
        }
        if let Some(minutes) = file.idle_gpu_minutes {
            control.idle_gpu_after = Duration::from_secs(minutes.saturating_mul(60));
        }
        if let Some(seconds) = file.node_start_timeout_seconds {
            control.register_timeout = Duration::from_secs(seconds.max(1));
        }
        if let Some(days) = file.job_retention_days {
            control.job_retention = (days > 0.0 && days.is_finite())
                .then(|| Duration::from_secs_f64((days * 86_400.0).min(1e12)));
        }
        control.chaos_preempt_every = file
            .chaos_preempt_every_seconds
            .filter(|s| *s > 0)
            .map(Duration::from_secs);
        CoordinatorConfig {
            data_dir,
            agent_program,
            file,
            control,
            tls: None,
            postgres: None,
        }
    }

    /// This coordinator's lease on a shared PostgreSQL store: held by this
    /// process (the data dir's owner id and the pid), `leader_lease_seconds` long.
    pub fn lease(&self) -> Result<crate::leader::Lease> {
        let owner = owner_id(&self.data_dir)?;
        Ok(crate::leader::Lease {
            holder: format!("{owner}-{}", std::process::id()),
            length: Duration::from_secs(self.file.leader_lease_seconds.unwrap_or(6).max(2)),
        })
    }
}

/// This coordinator's id: made once, kept in the data dir. It tells apart the
/// containers of coordinators that share a Docker Engine.
pub fn owner_id(data_dir: &std::path::Path) -> Result<String> {
    let path = data_dir.join("owner-id");
    if let Ok(id) = std::fs::read_to_string(&path) {
        let id = id.trim();
        if !id.is_empty() && id.chars().all(|c| c.is_ascii_alphanumeric()) {
            return Ok(id.to_string());
        }
    }
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
        ^ (u128::from(std::process::id()) << 64);
    let id = format!("{:08x}", (seed ^ (seed >> 32) ^ (seed >> 64)) as u32);
    let tmp = data_dir.join("owner-id.tmp");
    std::fs::write(&tmp, &id)
        .and_then(|()| std::fs::rename(&tmp, &path))
        .map_err(|e| Error::Internal(format!("cannot write {}: {e}", path.display())))?;
    Ok(id)
}

/// The Unix socket `<dir>/shoal.sock`, for this machine's node containers only
/// (the folder is 0700: only this user and the containers it mounts it into).
fn bind_unix(dir: &std::path::Path) -> Result<tokio::net::UnixListener> {
    use std::os::unix::fs::PermissionsExt;
    let io = |e: std::io::Error| Error::Internal(format!("unix socket in {}: {e}", dir.display()));
    std::fs::create_dir_all(dir).map_err(io)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700)).map_err(io)?;
    let path = dir.join("shoal.sock");
    // A socket left by a coordinator that was killed.
    let _ = std::fs::remove_file(&path);
    tokio::net::UnixListener::bind(&path).map_err(io)
}

/// Serves until `shutdown` resolves; then stops every node it started and returns.
pub async fn serve(
    listener: TcpListener,
    config: CoordinatorConfig,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<()> {
    std::fs::create_dir_all(&config.data_dir).map_err(|e| {
        Error::Internal(format!(
            "cannot create data dir {}: {e}",
            config.data_dir.display()
        ))
    })?;
    let address = listener
        .local_addr()
        .map_err(|e| Error::Internal(format!("listener has no address: {e}")))?;
    let (store, auth) = match &config.postgres {
        None => (
            SqlStore::open(&config.data_dir.join("shoal.db"))?,
            crate::auth::Auth::open(&config.data_dir.join("auth.db"))?,
        ),
        Some((url, lease)) => {
            let mut store = SqlStore::connect_postgres(url)?;
            store.lead(lease.clone());
            // A leader that cannot renew stops at once: a standby is taking over.
            crate::leader::keep_lead(url, lease.clone(), |why| {
                tracing::error!(%why, "stopping: this coordinator no longer leads");
                std::process::exit(3);
            })?;
            (store, crate::auth::Auth::postgres(url)?)
        }
    };
    crate::auth::bootstrap_with(&auth, &config.data_dir)?;
    let reader = store.reader()?;
    let job_stop_grace = Duration::from_secs(config.file.job_stop_grace_seconds.unwrap_or(10));
    let owner = owner_id(&config.data_dir)?;
    let (owner, signer) = match &config.postgres {
        None => {
            let signer = crate::identity::Signer::load_or_create(&config.data_dir, &owner)?;
            (owner, signer)
        }
        Some((url, _)) => crate::identity::Signer::shared(url, &owner, &config.data_dir)?,
    };
    // Local agents reach the coordinator through this socket when the port is TLS.
    let socket_dir = config.data_dir.join("run");
    let unix_listener = bind_unix(&socket_dir)?;
    // With TLS on the port, local agents come in through the Unix socket instead.
    let local_endpoint = if config.tls.is_some() {
        format!("unix://{}", socket_dir.join("shoal.sock").display())
    } else {
        format!("http://{address}")
    };
    let mut local = LocalProvider::new(
        owner.clone(),
        config.agent_program.clone(),
        local_endpoint,
        config.data_dir.join("nodes"),
        job_stop_grace,
    );
    local.auth = Some(auth.clone());
    local.run_as = config.file.process_jobs_user.clone();
    let lease = config.control.lease;
    local.lease = lease;
    if lease < job_stop_grace + Duration::from_secs(2) {
        tracing::warn!(
            lease_s = lease.as_secs(),
            stop_grace_s = job_stop_grace.as_secs(),
            "lease_seconds is shorter than job_stop_grace_seconds + 2: work an agent stops when cut off may still be stopping when it is rerun elsewhere"
        );
    }
    let node_link = Arc::new(crate::api::node_link::NodeLink::new(&config.data_dir)?);
    let remote = crate::provider::RemoteAgents {
        endpoint: config.file.advertise_endpoint.clone().unwrap_or_else(|| {
            format!(
                "{}://{address}",
                if config.tls.is_some() {
                    "https"
                } else {
                    "http"
                }
            )
        }),
        ca_file: config.tls.as_ref().and_then(|t| t.ca.clone()),
        auth: auth.clone(),
        token_ttl: config.control.register_timeout,
        program: config.agent_program.clone(),
        owner: owner.clone(),
        lease,
        job_stop_grace,
    };
    let provider = Providers {
        local,
        slurm: crate::provider::SlurmProvider {
            remote: remote.clone(),
            poll: Duration::from_secs(2),
        },
        command: crate::provider::CommandProvider {
            remote,
            poll: Duration::from_secs(5),
            create_limit: config.control.register_timeout,
        },
        docker: DockerProvider {
            owner,
            program: config.agent_program.clone(),
            work_root: config.data_dir.join("nodes"),
            job_stop_grace,
            network_lock: Arc::default(),
            auth: Some(auth.clone()),
            link: node_link.clone(),
            lease,
        },
    };
    let catalog = config.control.catalog.clone();
    let artifacts = Artifacts::new(config.data_dir.join("artifacts"));
    let datastores = config.data_dir.join("datastores");
    for name in crate::data::BUILT_IN_DATASTORES {
        std::fs::create_dir_all(datastores.join(name)).map_err(|e| {
            Error::Internal(format!(
                "cannot create datastore {}: {e}",
                datastores.join(name).display()
            ))
        })?;
    }
    let tracking = crate::tracking::Tracking::open(
        &config.data_dir,
        config
            .postgres
            .as_ref()
            .map(|(url, lease)| (url.as_str(), lease)),
    )?;
    let mut control_config = config.control.clone();
    control_config.tracking = Some(tracking.clone());
    control_config.identity_tokens = true;
    control_config.artifacts = Some(artifacts.clone());
    control_config.datastores_root = Some(datastores);
    let (mut control, handle, inbox) =
        Driver::new(control_config, Box::new(store), Arc::new(provider))?;
    // Identities kept in auth.db by an earlier version move under the loop.
    let (users, assigned) = auth.legacy_identities()?;
    if !users.is_empty() || !assigned.is_empty() {
        control.import_identities(users, assigned)?;
        auth.clear_legacy_identities()?;
    }
    tokio::spawn(crate::sweep::conductor::run(
        handle.clone(),
        tracking.clone(),
    ));
    let max_code = config.file.max_code_mib.unwrap_or(64) << 20;
    let mut api = Api::new(handle, catalog, artifacts, max_code, auth.clone(), reader);
    api.signer = Some(signer);
    let tracking_routes = crate::tracking::rest::router(tracking.clone());
    api.tracking = Some(tracking);
    api.tracking_routes = Some(tracking_routes.clone());
    tokio::spawn(crate::api::cutter::run(api.clone()));

    let grpc = tonic::service::Routes::new(
        pb::clusters_server::ClustersServer::new(api.clone())
            .max_decoding_message_size(MAX_MESSAGE_BYTES),
    )
    .add_service(
        pb::jobs_server::JobsServer::new(api.clone())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES),
    )
    .add_service(pb::nodes_server::NodesServer::new(api.clone()))
    .add_service(pb::vm_sizes_server::VmSizesServer::new(api.clone()))
    .add_service(pb::quotas_server::QuotasServer::new(api.clone()))
    .add_service(pb::tokens_server::TokensServer::new(api.clone()))
    .add_service(pb::identities_server::IdentitiesServer::new(api.clone()))
    .add_service(pb::join_tokens_server::JoinTokensServer::new(api.clone()))
    .add_service(pb::datastores_server::DatastoresServer::new(api.clone()))
    .add_service(
        pb::data_assets_server::DataAssetsServer::new(api.clone())
            .max_decoding_message_size(MAX_MESSAGE_BYTES),
    )
    .add_service(
        pb::environments_server::EnvironmentsServer::new(api.clone())
            .max_decoding_message_size(MAX_MESSAGE_BYTES),
    )
    .add_service(
        pb::components_server::ComponentsServer::new(api.clone())
            .max_decoding_message_size(MAX_MESSAGE_BYTES),
    )
    .add_service(pb::settings_server::SettingsServer::new(api.clone()))
    .add_service(
        pb::agent_server::AgentServer::new(api.clone())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES),
    );
    let auth_for_retention = auth.clone();
    let app = grpc
        .into_axum_router()
        .merge(crate::studio::router(api.clone(), config.tls.is_some()))
        .merge(http::router(api))
        .merge(tracking_routes)
        .layer(axum::middleware::from_fn_with_state(
            auth,
            crate::api::guard::guard,
        ))
        // Every route made a service once, here. Served as it is, a router
        // does it again for each connection, cloning its whole table: 0.17 ms
        // of each CLI command's first call (issue 17). Served through
        // `into_make_service`, a connection clones a pointer.
        .with_state::<()>(());
    node_link.set_app(app.clone());
    // Revoked tokens (node credentials of nodes long gone, mostly) go with the
    // history they belonged to.
    if let Some(keep) = config.control.job_retention {
        let auth = auth_for_retention;
        tokio::spawn(async move {
            let mut hourly = tokio::time::interval(Duration::from_secs(3600));
            loop {
                hourly.tick().await;
                let cutoff = crate::model::now_ms()
                    .saturating_sub(i64::try_from(keep.as_millis()).unwrap_or(i64::MAX));
                let auth = auth.clone();
                match tokio::task::spawn_blocking(move || auth.purge_revoked(cutoff)).await {
                    Ok(Ok(0)) => {}
                    Ok(Ok(n)) => info!(tokens = n, "revoked tokens forgotten"),
                    Ok(Err(e)) => tracing::warn!(error = %e, "cannot purge revoked tokens"),
                    Err(_) => {}
                }
            }
        });
    }

    // The control loop commits to SQLite: it gets a thread of its own so those
    // writes never block the async workers.
    let (stopped_tx, stopped_rx) = tokio::sync::watch::channel(false);
    let runtime = tokio::runtime::Handle::current();
    let control_thread = tokio::task::spawn_blocking(move || {
        runtime.block_on(control.run(inbox, shutdown));
        let _ = stopped_tx.send(true);
    });
    info!(%address, data_dir = %config.data_dir.display(), "coordinator listening");

    let mut graceful = stopped_rx.clone();
    let unix_app = app.clone();
    let graceful = async move {
        let _ = graceful.wait_for(|stopped| *stopped).await;
    };
    let server: std::pin::Pin<Box<dyn std::future::Future<Output = std::io::Result<()>> + Send>> =
        match &config.tls {
            Some(files) => {
                let listener = crate::tls::TlsListener::new(listener, files)?;
                Box::pin(
                    axum::serve(listener, app.into_make_service())
                        .with_graceful_shutdown(graceful)
                        .into_future(),
                )
            }
            None => {
                let listener = listener.tap_io(|tcp| {
                    let _ = tcp.set_nodelay(true);
                });
                Box::pin(
                    axum::serve(listener, app.into_make_service())
                        .with_graceful_shutdown(graceful)
                        .into_future(),
                )
            }
        };
    let mut unix_graceful = stopped_rx.clone();
    let unix_server = tokio::spawn(async move {
        let served = axum::serve(unix_listener, unix_app.into_make_service())
            .with_graceful_shutdown(async move {
                let _ = unix_graceful.wait_for(|stopped| *stopped).await;
            });
        let _ = served.await;
    });
    // The listener is polled on a worker, not on the thread that called `serve`
    // (the process's main thread): a connection's task then starts on the worker
    // that accepted it, with no second thread to wake (issue 17).
    let server = tokio::spawn(server);
    let stop_serving = server.abort_handle();
    // Followers of logs and watches may hold connections open: after the control
    // loop is done they get a moment to finish, then the server stops anyway.
    let mut hard_stop = stopped_rx;
    tokio::select! {
        served = server => served
            .map_err(|e| Error::Internal(format!("server: {e}")))?
            .map_err(|e| Error::Internal(format!("server: {e}")))?,
        _ = async move {
            let _ = hard_stop.wait_for(|stopped| *stopped).await;
            tokio::time::sleep(Duration::from_secs(2)).await;
        } => {}
    }
    stop_serving.abort();
    let _ = control_thread.await;
    unix_server.abort();
    node_link.stop_all();
    info!("coordinator stopped");
    Ok(())
}
