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
