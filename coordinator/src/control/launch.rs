//! A placement becomes an attempt: each instance's launch order, with its
//! environment (ranks, hosts, distribution settings, identity) and token.

use super::*;

/// What a node needs to make a job's inputs.
fn launch_inputs(spec: &JobSpec) -> Vec<LaunchInput> {
    use crate::data::{DataSource, InputMode};
    spec.extras
        .inputs
        .iter()
        .map(|(name, input)| LaunchInput {
            name: name.clone(),
            folder: !input.kind.is_file(),
            file_name: input.file_name.clone(),
            source: match (&input.mode, &input.source) {
                (InputMode::Direct, _) => LaunchSource::Direct(input.uri.clone()),
                (_, DataSource::Url { url }) => LaunchSource::Url(url.clone()),
                _ => LaunchSource::Fetch,
            },
        })
        .collect()
}

/// Why an MPI job's workers are stopped once mpirun has finished.
pub const MPI_RELEASE: &str = "released: the MPI launcher finished";

/// PyTorch master port unless the job sets MASTER_PORT.
pub const PYTORCH_MASTER_PORT: u16 = 6105;

/// TensorFlow task i listens on this port plus i (distinct on a shared machine).
pub const TENSORFLOW_BASE_PORT: u16 = 2222;

/// The environment of each instance of a distributed job, instance by instance.
/// PyTorch's per-process RANK and LOCAL_RANK are the agent's to add.
pub fn distribution_env(spec: &JobSpec, hosts: &[String]) -> Vec<Vec<(String, String)>> {
    let Some(distribution) = &spec.distribution else {
        return Vec::new();
    };
    let pairs = |items: Vec<(&str, String)>| -> Vec<(String, String)> {
        items.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
    };
    match distribution {
        Distribution::Mpi {
            process_count_per_instance,
        } => {
            let common = pairs(vec![
                (
                    "SHOAL_MPI_PROCESSES_PER_NODE",
                    process_count_per_instance.to_string(),
                ),
                // Containers run as root; Open MPI refuses that unless told twice.
                ("OMPI_ALLOW_RUN_AS_ROOT", "1".into()),
                ("OMPI_ALLOW_RUN_AS_ROOT_CONFIRM", "1".into()),
                // Daemons are started one by one through the agents (no tree of
                // remote shells) and stay attached to their exec, so that they
                // end with it and their output is carried back.
                ("OMPI_MCA_plm_rsh_no_tree_spawn", "1".into()),
                ("OMPI_MCA_orte_leave_session_attached", "1".into()),
                // Each daemon keeps its own node's settings (temporary dirs).
                ("OMPI_MCA_plm_rsh_pass_environ_mca_params", "0".into()),
            ]);
            vec![common; hosts.len()]
        }
        Distribution::Pytorch {
            process_count_per_instance,
        } => {
            let per = *process_count_per_instance;
            let master_port = spec
                .environment_variables
                .get("MASTER_PORT")
                .cloned()
                .unwrap_or_else(|| PYTORCH_MASTER_PORT.to_string());
            (0..hosts.len())
                .map(|rank| {
                    pairs(vec![
                        ("MASTER_ADDR", hosts[0].clone()),
                        ("MASTER_PORT", master_port.clone()),
                        ("WORLD_SIZE", (hosts.len() as u32 * per).to_string()),
                        ("NODE_RANK", rank.to_string()),
                        ("LOCAL_WORLD_SIZE", per.to_string()),
                    ])
                })
                .collect()
        }
        Distribution::Tensorflow { worker_count, .. } => {
            let workers = *worker_count as usize;
            let address = |i: usize| format!("{}:{}", hosts[i], TENSORFLOW_BASE_PORT as usize + i);
            let cluster = serde_json::json!({
                "worker": (0..workers.min(hosts.len())).map(address).collect::<Vec<_>>(),
                "ps": (workers..hosts.len()).map(address).collect::<Vec<_>>(),
            });
            (0..hosts.len())
                .map(|i| {
                    let (kind, index) = if i < workers {
                        ("worker", i)
                    } else {
                        ("ps", i - workers)
                    };
                    let config = serde_json::json!({
                        "cluster": cluster,
                        "task": {"type": kind, "index": index},
                    });
                    pairs(vec![("TF_CONFIG", config.to_string())])
                })
                .collect()
        }
    }
}

/// What an instance's environment is written from: the job's own variables
/// and the facts of its placement. The control loop decides them; the
/// variables are written out by `into_vars`, at the edge (the node's session),
/// which keeps ~20 strings a launch out of the loop.
#[derive(Clone, Debug)]
pub struct LaunchEnv {
    /// The job's own variables; the placement's are written over them.
    pub own: BTreeMap<String, String>,
    pub attempt: u32,
    pub instance_count: u32,
    pub node_id: String,
    pub cluster: String,
    /// Each instance's host, the first the master's, and its node.
    pub hosts: Vec<String>,
    pub node_ids: Vec<String>,
    /// The notice a low-priority node's jobs get before preemption; none on a
    /// dedicated node (and the job's own `SHOAL_PREEMPTION_DEADLINE` is dropped).
    pub preemption_notice_seconds: Option<u64>,
    /// An array's task: its index and the array's sequence number.
    pub task: Option<(u32, u64)>,
    /// The secret the node's identity endpoint asks this instance for.
    pub identity_header: Option<String>,
    pub tracking: Option<TrackingEnv>,
    /// The cluster's default managed identity.
    pub default_identity: Option<String>,
    /// A distributed job's settings for this instance; the job's own win.
    pub distributed: Vec<(String, String)>,
}

/// An instance's MLflow settings: its secret and the run's experiment.
#[derive(Clone, Debug)]
pub struct TrackingEnv {
    pub token: String,
    pub experiment: String,
}

impl LaunchEnv {
    /// The instance's variables: the job's own, then `SHOAL_*` (an array task's
    /// Slurm names too), the identity and MLflow settings, and a distributed
    /// job's, which give way to the job's own.
    pub fn into_vars(self, job_id: &str, slot: &Slot) -> BTreeMap<String, String> {
        let mut env = self.own;
        let mut set = |key: &str, value: String| {
            env.insert(key.to_string(), value);
        };
        let index = slot.instance.to_string();
        set("SHOAL_JOB_ID", job_id.to_string());
        set("SHOAL_ATTEMPT", self.attempt.to_string());
        set("SHOAL_ATTEMPT_ID", slot.attempt_id.clone());
        set("SHOAL_INSTANCE", index.clone());
        set("SHOAL_NODE_RANK", index);
        set("SHOAL_NUM_NODES", self.instance_count.to_string());
        set("SHOAL_NODE_ID", self.node_id);
        set("SHOAL_CLUSTER", self.cluster);
        set(
            "SHOAL_MASTER_NODE",
            self.hosts.first().cloned().unwrap_or_default(),
        );
        if let Some((index, array_seq)) = self.task {
            // Slurm's names too, so ported scripts run as they are.
            set("SHOAL_ARRAY_INDEX", index.to_string());
            set("SHOAL_ARRAY_JOB_ID", job_table::job_id(array_seq));
            set("SLURM_ARRAY_TASK_ID", index.to_string());
            set("SLURM_ARRAY_JOB_ID", array_seq.to_string());
        }
        set("SHOAL_NODES", self.hosts.join(","));
        set("SHOAL_NODE_IDS", self.node_ids.join(","));
        if let Some(secret) = self.identity_header {
            set("IDENTITY_HEADER", secret);
        }
        if let Some(tracking) = self.tracking {
            set("MLFLOW_TRACKING_TOKEN", tracking.token);
            set(
                "MLFLOW_RUN_ID",
                crate::tracking::model::run_id_of_attempt(&slot.attempt_id),
            );
            let experiment = if tracking.experiment.is_empty() {
                "Default".to_string()
            } else {
                tracking.experiment
            };
            set("MLFLOW_EXPERIMENT_NAME", experiment);
        }
        if let Some(client_id) = self.default_identity {
            set("DEFAULT_IDENTITY_CLIENT_ID", client_id);
        }
        match self.preemption_notice_seconds {
            Some(seconds) => set("SHOAL_PREEMPTION_DEADLINE", seconds.to_string()),
            None => {
                env.remove("SHOAL_PREEMPTION_DEADLINE");
            }
        }
        for (key, value) in self.distributed {
            // The job's own settings win (MASTER_PORT, say).
            env.entry(key).or_insert(value);
        }
        env
    }
}

impl Control {
    /// Starts an attempt on the placement's nodes; a successor (`after`, one
    /// instance) is booked to follow that instance on its node.
    pub(super) fn start_attempt(
        &mut self,
        placement: &scheduler::Placement,
        after: Option<Slot>,
        now: Millis,
    ) {
        let Some(job) = self.jobs.get_mut(&placement.job_id) else {
            return;
        };
        let number = job.attempts.len() as u32 + 1;
        let attempt_id = job.next_attempt_id();
        let low_priority = self
            .clusters
            .get(job.spec.cluster.as_str())
            .is_some_and(|c| c.spec.vm_priority == Priority::LowPriority);
        let preemption_notice = self.config.preemption_notice.as_secs();
        // How instances reach each other: local nodes share this machine's loopback;
        // other nodes are reached by the name their agent registered.
        let hosts: Vec<String> = placement
            .nodes
            .iter()
            .map(|id| match self.nodes.get(id) {
                Some(n) if n.provider != ProviderKind::Local && !n.hostname.is_empty() => {
                    n.hostname.clone()
                }
                _ => "127.0.0.1".to_string(),
            })
            .collect();
        let distributed = distribution_env(&job.spec, &hosts);
        let processes = job
            .spec
            .distribution
            .as_ref()
            .map_or(1, Distribution::agent_processes);
        // Managed identity: the cluster's default identity, and a secret per
        // instance that the node's token endpoint asks for.
        let default_identity = self
            .clusters
            .get(job.spec.cluster.as_str())
            .and_then(|c| c.identities.first())
            .map(|a| a.client_id.clone());
        let mpi = matches!(job.spec.distribution, Some(Distribution::Mpi { .. }));
        let tracked = self.config.tracking.is_some()
            && !job
                .spec
                .environment_variables
                .contains_key("MLFLOW_TRACKING_URI");
        let mut instances = Vec::new();
        for (index, node_id) in placement.nodes.iter().enumerate() {
            let slot = Slot {
                attempt_id: attempt_id.clone(),
                instance: index as u32,
            };
            let token = random_hex(&mut self.rng, 16);
            // Every instance may ask; a cluster with no identity gets a clear 400.
            let identity_header = self
                .config
                .identity_tokens
                .then(|| random_hex(&mut self.rng, 24));
            // MLflow logs to the job's run; the agent serves the tracking URI and
            // knows this secret as the instance's.
            let tracking = tracked.then(|| TrackingEnv {
                token: random_hex(&mut self.rng, 24),
                experiment: job.spec.extras.experiment_name.clone(),
            });
            let env = Box::new(LaunchEnv {
                own: job.spec.environment_variables.clone(),
                attempt: number,
                instance_count: job.spec.instance_count,
                node_id: node_id.clone(),
                cluster: job.spec.cluster.to_string(),
                hosts: hosts.clone(),
                node_ids: placement.nodes.clone(),
                preemption_notice_seconds: low_priority.then_some(preemption_notice),
                task: job.task.as_ref().map(|t| (t.index, t.array_seq)),
                identity_header,
                tracking,
                default_identity: default_identity.clone(),
                distributed: distributed.get(index).cloned().unwrap_or_default(),
            });
            tell(
                &self.links,
                &mut self.outbox,
                node_id,
                ToAgent::Launch(LaunchOrder {
                    slot: slot.clone(),
                    job_id: job.id.to_string(),
                    argv: job.spec.argv.iter().map(ToString::to_string).collect(),
                    env,
                    timeout_seconds: job.spec.timeout_seconds.map(std::num::NonZeroU64::get),
                    has_code: job.spec.code_path.is_some(),
                    image: job.spec.image.clone(),
                    restore_outputs: number > 1,
                    gpus: job.spec.gpus_per_instance,
                    share: job.spec.resources,
                    processes,
                    mpi,
                    parallel_workers: job.spec.parallel.as_ref().map_or(0, |p| p.concurrency),
                    parallel_worker_mode: job.spec.parallel.as_ref().is_some_and(|p| p.worker_mode),
                    token: token.clone(),
                    inputs: launch_inputs(&job.spec),
                    outputs: job
                        .spec
                        .extras
                        .outputs
                        .iter()
                        .map(|(name, output)| (name.clone(), !output.kind.is_file()))
                        .collect(),
                    path_prefix: job.spec.extras.path_prefix.clone(),
                    shm_size_bytes: job.spec.extras.shm_size_bytes,
                    after: after.clone(),
                }),
            );
            if let Some(node) = self.nodes.get_mut(node_id) {
                node.book(
                    Booked {
                        slot,
                        share: job.spec.resources,
                        gpus: job.spec.gpus_per_instance,
                        after: after.clone(),
                    },
                    now,
                );
                self.dirty_nodes.insert(node_id.clone());
            }
            instances.push(InstanceRun {
                index: index as u32,
                node: node_id.clone(),
                status: InstanceStatus::Launching,
                exit_code: None,
                message: String::new(),
                gpus: Vec::new(),
                usage: None,
                token,
            });
        }
        debug!(job = %job.id, attempt = %attempt_id, nodes = ?placement.nodes, "placed");
        job.attempts.push(Attempt {
            id: attempt_id,
            number,
            instances,
            started_at: 0,
            ended_at: 0,
            reason: String::new(),
        });
        job.status = JobStatus::Preparing;
        job.reason = match (&after, placement.nodes.first()) {
            (Some(after), Some(node)) => JobReason::Next {
                node: node.clone(),
                after: after.job_id().to_string(),
            },
            _ => JobReason::Starting {
                nodes: placement.nodes.clone(),
            },
        };
        self.queue.remove(job);
        self.dirty_jobs.insert(placement.job_id.clone());
    }
}

#[cfg(test)]
mod distribution_tests {
    use super::*;
    use crate::testing::JobBuilder;

    #[test]
    fn pytorch_env_names_master_world_and_node_rank() {
        let mut job = JobBuilder::new("job-1").instances(2).build();
        job.spec.distribution = Some(Distribution::Pytorch {
            process_count_per_instance: 4,
        });
        job.spec
            .environment_variables
            .insert("MASTER_PORT".into(), "7000".into());
        let hosts = vec!["a".to_string(), "b".to_string()];
        let env = distribution_env(&job.spec, &hosts);
        let second: BTreeMap<_, _> = env[1].iter().cloned().collect();
        assert_eq!(second["MASTER_ADDR"], "a");
        assert_eq!(second["MASTER_PORT"], "7000", "the job's own port wins");
        assert_eq!(second["WORLD_SIZE"], "8");
        assert_eq!(second["NODE_RANK"], "1");
        assert_eq!(second["LOCAL_WORLD_SIZE"], "4");
    }

    fn env_of(own: &[(&str, &str)]) -> LaunchEnv {
        LaunchEnv {
            own: own
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            attempt: 2,
            instance_count: 2,
            node_id: "cl-n2".into(),
            cluster: "cl".into(),
            hosts: vec!["10.0.0.1".into(), "10.0.0.2".into()],
            node_ids: vec!["cl-n1".into(), "cl-n2".into()],
            preemption_notice_seconds: None,
            task: None,
            identity_header: None,
            tracking: None,
            default_identity: None,
            distributed: vec![("MASTER_PORT".into(), "6105".into())],
        }
    }

    #[test]
    fn placement_variables_are_written_over_the_jobs_own_and_distribution_gives_way() {
        let slot = Slot {
            attempt_id: "job-7.2".into(),
            instance: 1,
        };
        let own = [
            ("SHOAL_NODE_ID", "mine"),
            ("SHOAL_PREEMPTION_DEADLINE", "5"),
            ("MASTER_PORT", "7000"),
            ("EPOCHS", "3"),
        ];
        let vars = env_of(&own).into_vars("job-7", &slot);
        assert_eq!(vars["SHOAL_JOB_ID"], "job-7");
        assert_eq!(vars["SHOAL_ATTEMPT"], "2");
        assert_eq!(vars["SHOAL_ATTEMPT_ID"], "job-7.2");
        assert_eq!(vars["SHOAL_INSTANCE"], "1");
        assert_eq!(vars["SHOAL_NODE_RANK"], "1");
        assert_eq!(vars["SHOAL_NUM_NODES"], "2");
        assert_eq!(
            vars["SHOAL_NODE_ID"], "cl-n2",
            "the placement's own id wins"
        );
        assert_eq!(vars["SHOAL_MASTER_NODE"], "10.0.0.1");
        assert_eq!(vars["SHOAL_NODES"], "10.0.0.1,10.0.0.2");
        assert_eq!(vars["SHOAL_NODE_IDS"], "cl-n1,cl-n2");
        assert_eq!(vars["MASTER_PORT"], "7000", "the job's own port wins");
        assert_eq!(vars["EPOCHS"], "3");
        assert!(
            !vars.contains_key("SHOAL_PREEMPTION_DEADLINE"),
            "a dedicated node's jobs get no deadline, not even their own"
        );
        for absent in [
            "SHOAL_ARRAY_INDEX",
            "IDENTITY_HEADER",
            "MLFLOW_TRACKING_TOKEN",
            "DEFAULT_IDENTITY_CLIENT_ID",
        ] {
            assert!(!vars.contains_key(absent), "{absent}");
        }
    }

    #[test]
    fn a_tasks_identitys_and_trackings_variables() {
        let slot = Slot {
            attempt_id: "job-3.1".into(),
            instance: 0,
        };
        let env = LaunchEnv {
            preemption_notice_seconds: Some(30),
            task: Some((4, 3)),
            identity_header: Some("secret".into()),
            tracking: Some(TrackingEnv {
                token: "t".into(),
                experiment: String::new(),
            }),
            default_identity: Some("client".into()),
            ..env_of(&[])
        };
        let vars = env.into_vars("job-3.4", &slot);
        assert_eq!(vars["SHOAL_PREEMPTION_DEADLINE"], "30");
        assert_eq!(vars["SHOAL_ARRAY_INDEX"], "4");
        assert_eq!(vars["SLURM_ARRAY_TASK_ID"], "4");
        assert_eq!(vars["SHOAL_ARRAY_JOB_ID"], job_table::job_id(3));
        assert_eq!(vars["SLURM_ARRAY_JOB_ID"], "3");
        assert_eq!(vars["IDENTITY_HEADER"], "secret");
        assert_eq!(vars["MLFLOW_TRACKING_TOKEN"], "t");
        assert_eq!(
            vars["MLFLOW_RUN_ID"],
            crate::tracking::model::run_id_of_attempt("job-3.1")
        );
        assert_eq!(vars["MLFLOW_EXPERIMENT_NAME"], "Default");
        assert_eq!(vars["DEFAULT_IDENTITY_CLIENT_ID"], "client");
    }

    #[test]
    fn tensorflow_env_lists_workers_then_parameter_servers() {
        let mut job = JobBuilder::new("job-1").instances(3).build();
        job.spec.distribution = Some(Distribution::Tensorflow {
            worker_count: 2,
            parameter_server_count: 1,
        });
        let hosts = vec!["h".to_string(); 3];
        let env = distribution_env(&job.spec, &hosts);
        let config: serde_json::Value = serde_json::from_str(&env[2][0].1).expect("json");
        assert_eq!(
            config["task"],
            serde_json::json!({"type": "ps", "index": 0})
        );
        assert_eq!(
            config["cluster"]["worker"],
            serde_json::json!(["h:2222", "h:2223"])
        );
        assert_eq!(config["cluster"]["ps"], serde_json::json!(["h:2224"]));
    }
}
