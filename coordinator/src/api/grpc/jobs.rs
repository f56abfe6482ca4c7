//! The Jobs service.

use super::*;

#[tonic::async_trait]
impl pb::jobs_server::Jobs for Api {
    async fn submit(&self, request: Request<pb::JobSpec>) -> Result<Response<pb::Job>, Status> {
        Ok(Response::new(
            Api::submit(self, request.into_inner()).await?,
        ))
    }

    async fn get(&self, request: Request<pb::JobRef>) -> Result<Response<pb::Job>, Status> {
        let job = self.job(&request.into_inner().id).await?;
        Ok(Response::new(self.job_wire(&job).await?))
    }

    async fn list(
        &self,
        request: Request<pb::ListJobsRequest>,
    ) -> Result<Response<pb::JobList>, Status> {
        let asked = request.into_inner();
        let cluster = Some(asked.cluster).filter(|c| !c.is_empty());
        let array = Some(asked.array).filter(|a| !a.is_empty());
        let (jobs, next) = self
            .list_jobs(
                cluster,
                array.as_deref(),
                asked.limit as usize,
                Some(&asked.after),
            )
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
                    crate::api::admit::Upload {
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

    async fn metrics(
        &self,
        request: Request<pb::MetricsRequest>,
    ) -> Result<Response<pb::JobMetrics>, Status> {
        let asked = request.into_inner();
        let metrics = self
            .job_metrics(&asked.job_id, asked.names, asked.latest_only)
            .await?;
        Ok(Response::new(convert::job_metrics(metrics)))
    }

    async fn download_outputs(
        &self,
        request: Request<pb::JobRef>,
    ) -> Result<Response<pb::OutputsList>, Status> {
        let id = request.into_inner().id;
        Ok(Response::new(self.outputs(id).await?))
    }
}
