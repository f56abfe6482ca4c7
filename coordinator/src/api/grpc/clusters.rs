//! The Clusters service.

use super::*;

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
