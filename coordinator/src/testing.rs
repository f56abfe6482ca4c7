//! Builders for the decision-core tests: a scenario in a few lines.

use std::collections::BTreeMap;

use crate::model::{
    ClusterSpec, Job, JobSpec, JobStatus, Millis, Node, NodeState, Priority, ProviderKind,
};

pub struct ClusterBuilder(ClusterSpec);

impl ClusterBuilder {
    pub fn new(name: &str) -> Self {
        ClusterBuilder(ClusterSpec {
            name: name.into(),
            vm_size: "Standard_D2_v2".into(),
            vm_priority: Priority::Dedicated,
            min_nodes: 0,
            max_nodes: 4,
            idle_seconds_before_scaledown: 120,
            description: String::new(),
            tags: BTreeMap::new(),
            provider: ProviderKind::Local,
            provider_settings: Default::default(),
            internode_communication: true,
            cancel_idle_gpu_jobs: false,
        })
    }
    pub fn min(mut self, n: u32) -> Self {
        self.0.min_nodes = n;
        self
    }
    pub fn max(mut self, n: u32) -> Self {
        self.0.max_nodes = n;
        self
    }
    pub fn idle_seconds(mut self, s: u64) -> Self {
        self.0.idle_seconds_before_scaledown = s;
        self
    }
    pub fn build(self) -> ClusterSpec {
        self.0
    }
}

pub struct NodeBuilder(Node);

impl NodeBuilder {
    /// An idle, connected node of cluster `c`.
    pub fn new(id: &str) -> Self {
        NodeBuilder(Node {
            id: id.into(),
            cluster: "c".into(),
            state: NodeState::Idle,
            cores: 2,
            memory_bytes: 1 << 30,
            created_at: 0,
            state_since: 0,
            running: Vec::new(),
            hostname: String::new(),
            pid: None,
            message: String::new(),
            runtimes: vec!["process".into()],
            connected: true,
            cpu_percent: 0.0,
            memory_used_bytes: 0,
            last_heartbeat: 0,
            provider: ProviderKind::Local,
            handle: String::new(),
            settings: Default::default(),
            gpus: Vec::new(),
            gpu_reason: String::new(),
            lost_contact: false,
            stats: Default::default(),
        })
    }
    pub fn cluster(mut self, name: &str) -> Self {
        self.0.cluster = name.into();
        self
    }
    /// A running node runs something: a whole-node instance of `job-0.1`.
    pub fn state(mut self, state: NodeState) -> Self {
        self.0.state = state;
        if state == NodeState::Running {
            self.0.running = vec![crate::model::Booked {
                slot: crate::model::Slot {
                    attempt_id: "job-0.1".into(),
                    instance: 0,
                },
                share: crate::model::Resources::WHOLE,
                gpus: 0,
                after: None,
            }];
        }
        self
    }
    pub fn idle_since(mut self, at: Millis) -> Self {
        self.0.state_since = at;
        self
    }
    pub fn disconnected(mut self) -> Self {
        self.0.connected = false;
        self
    }
    pub fn build(self) -> Node {
        self.0
    }
}

pub struct JobBuilder(Job);

impl JobBuilder {
    /// A queued one-instance job on cluster `c`.
    pub fn new(id: &str) -> Self {
        JobBuilder(Job {
            id: id.into(),
            // A job's id names its sequence number (`job-<seq>`).
            seq: crate::control::job_seq(id).unwrap_or(0),
            spec: JobSpec {
                name: id.into(),
                cluster: "c".into(),
                argv: vec!["true".into()],
                command: String::new(),
                environment_variables: BTreeMap::new(),
                instance_count: 1,
                timeout_seconds: None,
                code_path: None,
                image: None,
                max_preemptions: 10,
                gpus_per_instance: 0,
                resources: Default::default(),
                distribution: None,
                parallel: None,
                extras: Default::default(),
            },
            status: JobStatus::Queued,
            attempts: Default::default(),
            created_at: 0,
            started_at: 0,
            ended_at: 0,
            reason: crate::model::JobReason::None,
            preemptions: 0,
            flags: Default::default(),
            array: None,
            task: None,
            sweep: None,
            trial: None,
            pipeline: None,
            step: None,
            progress: None,
        })
    }
    pub fn instances(mut self, n: u32) -> Self {
        self.0.spec.instance_count = n;
        self
    }
    pub fn cluster(mut self, name: &str) -> Self {
        self.0.spec.cluster = name.into();
        self
    }
    pub fn build(self) -> Job {
        self.0
    }
}

/// A provider that creates nothing: it records what it was asked, and its nodes
/// "run" until the test registers a fake agent for them.
#[derive(Clone, Default)]
pub struct FakeProvider {
    /// When set, every node fails to start.
    pub fail: bool,
    pub created: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
    pub removed: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl crate::provider::NodeProvider for FakeProvider {
    fn create(
        &self,
        launch: crate::provider::NodeLaunch,
    ) -> futures::future::BoxFuture<'static, Result<crate::provider::StartedNode, String>> {
        use futures::FutureExt;
        self.created
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(launch.node_id);
        let fail = self.fail;
        async move {
            if fail {
                return Err("cannot start the agent: no such file".to_string());
            }
            Ok(crate::provider::StartedNode {
                pid: None,
                handle: String::new(),
                exited: std::future::pending().boxed(),
            })
        }
        .boxed()
    }

    fn remove(
        &self,
        node: crate::provider::NodeRemoval,
    ) -> futures::future::BoxFuture<'static, ()> {
        let node_id = node.node_id;
        use futures::FutureExt;
        self.removed
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(node_id);
        async {}.boxed()
    }
}
