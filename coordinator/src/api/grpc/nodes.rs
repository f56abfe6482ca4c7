//! The Nodes, VmSizes and Quotas services.

use super::*;

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
