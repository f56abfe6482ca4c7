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
        let preemption_notice = self.config.preemption_notice.as_secs().to_string();
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
        let master = hosts.first().cloned().unwrap_or_default();
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
        let mut instances = Vec::new();
        for (index, node_id) in placement.nodes.iter().enumerate() {
            let slot = Slot {
                attempt_id: attempt_id.clone(),
                instance: index as u32,
            };
            let token = random_hex(&mut self.rng, 16);
            let mut env = job.spec.environment_variables.clone();
            for (key, value) in [
                ("SHOAL_JOB_ID", job.id.to_string()),
                ("SHOAL_ATTEMPT", number.to_string()),
                ("SHOAL_ATTEMPT_ID", attempt_id.clone()),
                ("SHOAL_INSTANCE", index.to_string()),
                ("SHOAL_NODE_RANK", index.to_string()),
                ("SHOAL_NUM_NODES", job.spec.instance_count.to_string()),
                ("SHOAL_NODE_ID", node_id.clone()),
                ("SHOAL_CLUSTER", job.spec.cluster.to_string()),
                ("SHOAL_MASTER_NODE", master.clone()),
                ("SHOAL_PREEMPTION_DEADLINE", preemption_notice.clone()),
            ] {
                env.insert(key.to_string(), value);
            }
            if !low_priority {
                env.remove("SHOAL_PREEMPTION_DEADLINE");
            }
            if let Some(task) = job.task {
                // Slurm's names too, so ported scripts run as they are.
                let array_id = job_table::job_id(task.array_seq);
                for (key, value) in [
                    ("SHOAL_ARRAY_INDEX", task.index.to_string()),
                    ("SHOAL_ARRAY_JOB_ID", array_id.clone()),
                    ("SLURM_ARRAY_TASK_ID", task.index.to_string()),
                    ("SLURM_ARRAY_JOB_ID", task.array_seq.to_string()),
                ] {
                    env.insert(key.to_string(), value);
                }
            }
            env.insert("SHOAL_NODES".into(), hosts.join(","));
            env.insert("SHOAL_NODE_IDS".into(), placement.nodes.join(","));
            if self.config.identity_tokens {
                // Every instance may ask; a cluster with no identity gets a clear 400.
                env.insert("IDENTITY_HEADER".into(), random_hex(&mut self.rng, 24));
            }
            if self.config.tracking.is_some()
                && !job
                    .spec
                    .environment_variables
                    .contains_key("MLFLOW_TRACKING_URI")
            {
                // MLflow logs to the job's run; the agent serves the tracking URI
                // and knows this secret as the instance's.
                env.insert(
                    "MLFLOW_TRACKING_TOKEN".into(),
                    random_hex(&mut self.rng, 24),
                );
                env.insert(
                    "MLFLOW_RUN_ID".into(),
                    crate::tracking::model::run_id_of_attempt(&attempt_id),
                );
                let experiment = &job.spec.extras.experiment_name;
                env.insert(
                    "MLFLOW_EXPERIMENT_NAME".into(),
                    if experiment.is_empty() {
                        "Default"
                    } else {
                        experiment
                    }
                    .to_string(),
                );
            }
            if let Some(client_id) = &default_identity {
                env.insert("DEFAULT_IDENTITY_CLIENT_ID".into(), client_id.clone());
            }
            if let Some(per_instance) = distributed.get(index) {
                for (key, value) in per_instance {
                    // The job's own settings win (MASTER_PORT, say).
                    env.entry(key.clone()).or_insert_with(|| value.clone());
                }
            }
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
