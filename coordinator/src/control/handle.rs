//! `ControlHandle`: how API handlers and agent sessions reach the loop (cheap
//! to clone; each call is a `Command` with a reply).

use super::*;

/// Cheap to clone; every API handler holds one.
#[derive(Clone)]
pub struct ControlHandle {
    pub(super) tx: mpsc::Sender<Command>,
    pub(super) changes: broadcast::Sender<Change>,
    pub(super) logs: broadcast::Sender<Arc<StoredLog>>,
}

fn stopped() -> Error {
    Error::Internal("the coordinator is shutting down".into())
}

impl ControlHandle {
    async fn ask<T>(&self, make: impl FnOnce(Reply<T>) -> Command) -> Result<T> {
        let (reply, answer) = oneshot::channel();
        self.tx.send(make(reply)).await.map_err(|_| stopped())?;
        answer.await.map_err(|_| stopped())?
    }

    /// Fire-and-forget (agent events); false once the loop is gone.
    pub async fn send(&self, command: Command) -> bool {
        self.tx.send(command).await.is_ok()
    }

    pub fn subscribe_changes(&self) -> broadcast::Receiver<Change> {
        self.changes.subscribe()
    }

    pub fn subscribe_logs(&self) -> broadcast::Receiver<Arc<StoredLog>> {
        self.logs.subscribe()
    }

    pub async fn create_cluster(&self, request: ClusterRequest) -> Result<ClusterInfo> {
        self.ask(|r| Command::CreateCluster(request, r)).await
    }
    pub async fn update_cluster(&self, update: ClusterUpdate) -> Result<ClusterInfo> {
        self.ask(|r| Command::UpdateCluster(update, r)).await
    }
    pub async fn delete_cluster(&self, name: String) -> Result<ClusterInfo> {
        self.ask(|r| Command::DeleteCluster(name, r)).await
    }
    pub async fn get_cluster(&self, name: String) -> Result<ClusterInfo> {
        self.ask(|r| Command::GetCluster(name, r)).await
    }
    pub async fn list_clusters(&self) -> Result<Vec<ClusterInfo>> {
        self.ask(Command::ListClusters).await
    }
    pub async fn submit_job(&self, request: JobRequest) -> Result<Job> {
        self.ask(|r| Command::SubmitJob(Box::new(request), r)).await
    }
    pub async fn work(&self, request: WorkRequest) -> Result<WorkReply> {
        self.ask(|r| Command::Work(request, r)).await
    }

    pub async fn get_job(&self, id: String) -> Result<Job> {
        self.ask(|r| Command::GetJob(id, r)).await
    }
    pub async fn live_jobs(&self, ids: Vec<String>) -> Result<Vec<Job>> {
        self.ask(|r| Command::LiveJobs(ids, r)).await
    }
    pub async fn job_counts(&self) -> Result<BTreeMap<JobStatus, u64>> {
        self.ask(Command::JobCounts).await
    }
    pub async fn delete_job(&self, id: String) -> Result<()> {
        self.ask(|r| Command::DeleteJob(id, r)).await
    }
    pub async fn steps_to_cut(&self) -> Result<Vec<super::pipelines::CutOrder>> {
        self.ask(Command::StepsToCut).await
    }
    pub async fn step_cut(
        &self,
        id: String,
        index: u32,
        cuts: std::result::Result<Vec<crate::parallel::Cut>, String>,
    ) -> Result<()> {
        self.ask(|reply| Command::StepCut {
            id,
            index,
            cuts,
            reply,
        })
        .await
    }
    pub async fn running_sweeps(&self) -> Result<Vec<Job>> {
        self.ask(Command::RunningSweeps).await
    }
    pub async fn step_sweep(&self, id: String, plan: crate::sweep::Plan) -> Result<()> {
        self.ask(|reply| Command::StepSweep { id, plan, reply })
            .await
    }
    pub async fn cancel_job(&self, id: String) -> Result<Job> {
        self.ask(|r| Command::CancelJob(id, r)).await
    }
    /// `None` unlocks.
    pub async fn lock_cluster(&self, name: String, kind: Option<LockKind>) -> Result<ClusterInfo> {
        self.ask(|reply| Command::LockCluster {
            cluster: name,
            kind,
            reply,
        })
        .await
    }
    pub async fn join_node(
        &self,
        cluster: String,
        node_id: Option<String>,
        hostname: String,
        cores: u32,
        memory_bytes: u64,
    ) -> Result<Node> {
        self.ask(|reply| Command::JoinNode {
            cluster,
            node_id,
            hostname,
            cores,
            memory_bytes,
            reply,
        })
        .await
    }
    pub async fn revoke_node(&self, node_id: String) -> Result<Node> {
        self.ask(|r| Command::RevokeNode(node_id, r)).await
    }
    pub async fn preempt_node(&self, node_id: String, notice_seconds: Option<u64>) -> Result<Node> {
        self.ask(|reply| Command::PreemptNode {
            node_id,
            notice_seconds,
            reply,
        })
        .await
    }
    pub async fn create_identity(&self, name: String) -> Result<Identity> {
        self.ask(|reply| Command::CreateIdentity { name, reply })
            .await
    }
    pub async fn list_identities(&self) -> Result<Vec<Identity>> {
        self.ask(Command::ListIdentities).await
    }
    pub async fn assign_identity(&self, cluster: String, identity: String) -> Result<ClusterInfo> {
        self.ask(|reply| Command::AssignIdentity {
            cluster,
            identity,
            reply,
        })
        .await
    }
    pub async fn remove_identity(&self, cluster: String, identity: String) -> Result<ClusterInfo> {
        self.ask(|reply| Command::RemoveIdentity {
            cluster,
            identity,
            reply,
        })
        .await
    }
    pub async fn create_datastore(
        &self,
        datastore: crate::data::Datastore,
    ) -> Result<crate::data::Datastore> {
        self.ask(|r| Command::CreateDatastore(datastore, r)).await
    }
    pub async fn datastore(&self, name: String) -> Result<crate::data::Datastore> {
        self.ask(|r| Command::GetDatastore(name, r)).await
    }
    pub async fn datastores(&self) -> Result<Vec<crate::data::Datastore>> {
        self.ask(Command::ListDatastores).await
    }
    pub async fn create_data_asset(
        &self,
        asset: crate::data::DataAsset,
    ) -> Result<crate::data::DataAsset> {
        self.ask(|r| Command::CreateDataAsset(asset, r)).await
    }
    pub async fn data_asset(
        &self,
        name: String,
        version: Option<String>,
    ) -> Result<crate::data::DataAsset> {
        self.ask(|reply| Command::GetDataAsset {
            name,
            version,
            reply,
        })
        .await
    }
    pub async fn data_assets(&self) -> Result<Vec<crate::data::DataAsset>> {
        self.ask(Command::ListDataAssets).await
    }
    pub async fn create_environment(&self, environment: Environment) -> Result<Environment> {
        self.ask(|r| Command::CreateEnvironment(environment, r))
            .await
    }
    pub async fn environment(&self, name: String, version: Option<String>) -> Result<Environment> {
        self.ask(|reply| Command::GetEnvironment {
            name,
            version,
            reply,
        })
        .await
    }
    pub async fn environments(&self) -> Result<Vec<Environment>> {
        self.ask(Command::ListEnvironments).await
    }
    pub async fn create_component(
        &self,
        component: crate::model::Component,
    ) -> Result<crate::model::Component> {
        self.ask(|r| Command::CreateComponent(Box::new(component), r))
            .await
    }
    pub async fn component(
        &self,
        name: String,
        version: Option<String>,
    ) -> Result<crate::model::Component> {
        self.ask(|reply| Command::GetComponent {
            name,
            version,
            reply,
        })
        .await
    }
    pub async fn components(&self) -> Result<Vec<crate::model::Component>> {
        self.ask(Command::ListComponents).await
    }
    pub async fn archive_environment(
        &self,
        name: String,
        version: Option<String>,
    ) -> Result<Environment> {
        self.ask(|reply| Command::ArchiveEnvironment {
            name,
            version,
            reply,
        })
        .await
    }
    pub async fn set_defaults(
        &self,
        changes: BTreeMap<String, Option<String>>,
    ) -> Result<BTreeMap<String, String>> {
        self.ask(|r| Command::SetDefaults(changes, r)).await
    }
    pub async fn defaults(&self) -> Result<BTreeMap<String, String>> {
        self.ask(Command::GetDefaults).await
    }
    pub async fn quotas(&self) -> Result<QuotaReport> {
        self.ask(Command::GetQuotas).await
    }
    pub async fn set_quotas(&self, change: QuotaChange) -> Result<QuotaReport> {
        self.ask(|r| Command::SetQuotas(change, r)).await
    }
    /// Prometheus text of the whole deployment.
    pub async fn metrics(&self) -> Result<String> {
        self.ask(Command::Metrics).await
    }
    pub async fn explain(&self, job_id: String) -> Result<Vec<String>> {
        self.ask(|r| Command::Explain(job_id, r)).await
    }
    /// Whether an agent may make `call` about the instance it claims.
    pub async fn authorize(&self, claim: Claim, call: AgentCall) -> Result<Granted> {
        self.ask(|reply| Command::Authorize { claim, call, reply })
            .await
    }
    pub async fn list_nodes(&self, cluster: Option<String>) -> Result<Vec<Node>> {
        self.ask(|r| Command::ListNodes(cluster, r)).await
    }
    pub async fn register_agent(
        &self,
        registration: Registration,
        session: u64,
        link: mpsc::UnboundedSender<ToAgent>,
    ) -> Result<()> {
        self.ask(|reply| Command::AgentRegister {
            registration,
            session,
            link,
            reply,
        })
        .await
    }
}
