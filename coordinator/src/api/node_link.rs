//! Where docker-provider nodes reach the coordinator: the gateway address of their
//! cluster's network, over TLS (a CA of this coordinator's own, whose certificate
//! each node container gets), through the same router and the same tokens as the
//! main port. A node container talks to the coordinator over its network, as a
//! machine would: cut the network and the node is cut off (and fences itself).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, OnceLock};

use axum::Router;
use tracing::info;

use crate::tls::{TlsFiles, TlsListener};
use crate::{Error, Result};

/// The name node containers know the coordinator by (an extra host entry).
pub const COORDINATOR_HOST: &str = "shoal-coordinator";

pub struct NodeLink {
    tls: TlsFiles,
    /// The port every gateway is served on (kept in the data dir, so agents of
    /// an earlier run find it again).
    port_file: PathBuf,
    app: OnceLock<Router>,
    served: Mutex<HashMap<IpAddr, tokio::task::AbortHandle>>,
}

impl std::fmt::Debug for NodeLink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "NodeLink {{ port_file: {} }}", self.port_file.display())
    }
}

impl NodeLink {
    /// The CA and certificate in `<data_dir>/tls-nodes/` (made on first start).
    pub fn new(data_dir: &Path) -> Result<Self> {
        let tls =
            crate::tls::self_signed(&data_dir.join("tls-nodes"), &[COORDINATOR_HOST.to_string()])?;
        Ok(NodeLink {
            tls,
            port_file: data_dir.join("node-link.port"),
            app: OnceLock::new(),
            served: Mutex::default(),
        })
    }

    /// The router to serve (set once the API is built).
    pub fn set_app(&self, app: Router) {
        let _ = self.app.set(app);
    }

    /// The CA node containers check the coordinator with.
    pub fn ca_file(&self) -> &Path {
        self.tls.ca.as_deref().unwrap_or(&self.tls.cert)
    }

    fn port(&self) -> Option<u16> {
        std::fs::read_to_string(&self.port_file)
            .ok()?
            .trim()
            .parse()
            .ok()
    }

    /// Serves the API on `gateway` (once; again after a restart); the port.
    pub async fn serve_on(&self, gateway: IpAddr) -> std::result::Result<u16, String> {
        let known = self.port();
        if let Some(port) = known
            && self
                .served
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .contains_key(&gateway)
        {
            return Ok(port);
        }
        let Some(app) = self.app.get().cloned() else {
            return Err("the coordinator is still starting".into());
        };
        let address = SocketAddr::new(gateway, known.unwrap_or(0));
        let listener = tokio::net::TcpListener::bind(address)
            .await
            .map_err(|e| format!("cannot listen for docker nodes on {address}: {e}"))?;
        let port = listener
            .local_addr()
            .map_err(|e| format!("listener: {e}"))?
            .port();
        if known.is_none() {
            std::fs::write(&self.port_file, port.to_string())
                .map_err(|e| format!("{}: {e}", self.port_file.display()))?;
        }
        let listener = TlsListener::new(listener, &self.tls).map_err(|e| e.to_string())?;
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app.into_make_service()).await;
        });
        info!(%gateway, port, "serving docker nodes");
        let mut served = self.served.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(older) = served.insert(gateway, task.abort_handle()) {
            older.abort();
        }
        Ok(port)
    }

    /// The network is gone: nothing more to serve there.
    pub fn stop(&self, gateway: IpAddr) {
        if let Some(task) = self
            .served
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&gateway)
        {
            task.abort();
        }
    }

    pub fn stop_all(&self) {
        for (_, task) in self
            .served
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .drain()
        {
            task.abort();
        }
    }
}

/// A network's gateway address, from its IPAM settings.
pub fn gateway_of(network: &bollard::models::NetworkInspect) -> Result<IpAddr> {
    network
        .ipam
        .as_ref()
        .and_then(|ipam| ipam.config.as_ref())
        .into_iter()
        .flatten()
        .find_map(|c| c.gateway.as_ref()?.parse().ok())
        .ok_or_else(|| {
            Error::Internal(format!(
                "network {} has no gateway address",
                network.name.clone().unwrap_or_default()
            ))
        })
}
