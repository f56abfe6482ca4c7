//! Distributed jobs: gangs whose instances learn each other (PyTorch and TensorFlow
//! wiring), rank failure semantics, and what is refused at submit.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use support::TestCluster;

fn job_file(tc: &TestCluster, name: &str, yaml: &str) -> String {
    let path = tc.scratch(name);
    std::fs::write(&path, yaml).expect("job file");
    path.to_string_lossy().into_owned()
}

fn env_lines(tc: &TestCluster, id: &str) -> Vec<BTreeMap<String, String>> {
    let logs = String::from_utf8_lossy(&tc.shoal(&["job", "logs", id]).stdout).into_owned();
    logs.lines()
        .filter_map(|line| line.split_once("env ").map(|(_, rest)| rest))
        .map(|rest| {
            rest.split_whitespace()
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        })
        .collect()
}

#[tokio::test]
async fn pytorch_ranks_learn_master_world_size_and_their_ranks() {
    let tc = TestCluster::start().await;
    tc.create_cluster("pt", &["--max-nodes", "2"]);
    let file = job_file(
        &tc,
        "pt.yaml",
        "compute: pt\n\
        command: echo env RANK=$RANK LOCAL_RANK=$LOCAL_RANK NODE_RANK=$NODE_RANK WORLD_SIZE=$WORLD_SIZE LOCAL_WORLD_SIZE=$LOCAL_WORLD_SIZE MASTER_ADDR=$MASTER_ADDR MASTER_PORT=$MASTER_PORT\n\
        resources: {instance_count: 2}\n\
        distribution: {type: pytorch, process_count_per_instance: 2}\n",
    );
    let job = tc.shoal_json(&["job", "submit", "-f", &file, "--wait"]);
    assert_eq!(job["status"], "completed", "{job:#}");
    let envs = env_lines(&tc, job["id"].as_str().expect("id"));
    assert_eq!(envs.len(), 4, "{envs:?}");
    let ranks: BTreeSet<u32> = envs
        .iter()
        .map(|e| e["RANK"].parse().expect("rank"))
        .collect();
    assert_eq!(ranks, BTreeSet::from([0, 1, 2, 3]));
    for env in &envs {
        assert_eq!(env["WORLD_SIZE"], "4");
        assert_eq!(env["LOCAL_WORLD_SIZE"], "2");
        assert_eq!(env["MASTER_PORT"], "6105");
        assert_eq!(env["MASTER_ADDR"], envs[0]["MASTER_ADDR"]);
        let node: u32 = env["NODE_RANK"].parse().expect("node rank");
        let local: u32 = env["LOCAL_RANK"].parse().expect("local rank");
        assert_eq!(env["RANK"], (node * 2 + local).to_string(), "{env:?}");
    }
}

#[tokio::test]
async fn tensorflow_tasks_get_a_tf_config_each() {
    let tc = TestCluster::start().await;
    tc.create_cluster("tf", &["--max-nodes", "3"]);
    let file = job_file(
        &tc,
        "tf.yaml",
        "compute: tf\n\
        command: 'echo \"TF $TF_CONFIG\"'\n\
        distribution: {type: tensorflow, worker_count: 2, parameter_server_count: 1}\n",
    );
    let job = tc.shoal_json(&["job", "submit", "-f", &file, "--wait"]);
    assert_eq!(job["status"], "completed", "{job:#}");
    assert_eq!(job["instance_count"], 3, "one instance per task");
    let logs = String::from_utf8_lossy(
        &tc.shoal(&["job", "logs", job["id"].as_str().expect("id")])
            .stdout,
    )
    .into_owned();
    let configs: Vec<serde_json::Value> = logs
        .lines()
        .filter_map(|l| {
            l.split_once("TF ")
                .map(|(_, json)| serde_json::from_str(json).expect("TF_CONFIG is JSON"))
        })
        .collect();
    assert_eq!(configs.len(), 3, "{logs}");
    let tasks: BTreeSet<(String, u64)> = configs
        .iter()
        .map(|c| {
            (
                c["task"]["type"].as_str().expect("type").to_string(),
                c["task"]["index"].as_u64().expect("index"),
            )
        })
        .collect();
    assert_eq!(
        tasks,
        BTreeSet::from([("ps".into(), 0), ("worker".into(), 0), ("worker".into(), 1)])
    );
    for config in &configs {
        assert_eq!(
            config["cluster"], configs[0]["cluster"],
            "every task sees the same cluster"
        );
        assert_eq!(
            config["cluster"]["worker"].as_array().map(Vec::len),
            Some(2)
        );
        assert_eq!(config["cluster"]["ps"].as_array().map(Vec::len), Some(1));
    }
    let addresses: BTreeSet<String> = ["worker", "ps"]
        .iter()
        .flat_map(|k| {
            configs[0]["cluster"][k]
                .as_array()
                .expect("list")
                .iter()
                .map(|a| a.to_string())
        })
        .collect();
    assert_eq!(addresses.len(), 3, "three distinct task addresses");
}

#[tokio::test]
async fn a_failing_rank_stops_its_siblings_and_is_named() {
    let tc = TestCluster::start_with_config("job_stop_grace_seconds: 1\n").await;
    tc.create_cluster("pt", &["--max-nodes", "1"]);
    let file = job_file(
        &tc,
        "fail.yaml",
        "compute: pt\n\
        command: 'if [ $LOCAL_RANK = 1 ]; then sleep 0.3; exit 3; fi; exec sleep 60'\n\
        distribution: {type: pytorch, process_count_per_instance: 2}\n",
    );
    let started = Instant::now();
    let out = tc.shoal(&["-o", "json", "job", "submit", "-f", &file, "--wait"]);
    assert!(!out.status.success());
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "the sleeping rank was not stopped"
    );
    let job: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(job["status"], "failed");
    let reason = job["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("rank 1 (local rank 1)") && reason.contains("exit code 3"),
        "{reason}"
    );
}

#[tokio::test]
async fn distributed_jobs_that_cannot_work_are_refused_at_submit() {
    let tc = TestCluster::start().await;
    tc.create_cluster(
        "solo",
        &["--max-nodes", "200", "--internode-communication", "false"],
    );
    tc.create_cluster("pt", &["--max-nodes", "2"]);
    let cases = [
        (
            "solo",
            "distribution: {type: pytorch, process_count_per_instance: 2}",
            "internode_communication off",
        ),
        (
            "pt",
            "distribution: {type: pytorch, process_count_per_instance: 0}",
            "process_count_per_instance",
        ),
        (
            "pt",
            "resources: {instance_count: 2}\ndistribution: {type: tensorflow, worker_count: 2, parameter_server_count: 1}",
            "instance_count",
        ),
        (
            "pt",
            "distribution: {type: mpi, process_count_per_instance: 0}",
            "process_count_per_instance",
        ),
        ("pt", "distribution: {type: horovod}", "horovod"),
        (
            "pt",
            "distribution: {type: pytorch, processes: 2}",
            "processes",
        ),
    ];
    for (index, (cluster, extra, expected)) in cases.iter().enumerate() {
        let file = job_file(
            &tc,
            &format!("bad{index}.yaml"),
            &format!("compute: {cluster}\ncommand: 'true'\n{extra}\n"),
        );
        let out = tc.shoal(&["job", "submit", "-f", &file]);
        assert!(!out.status.success(), "{extra} was accepted");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(expected), "{extra}: {stderr}");
    }
    let jobs = tc.shoal_json(&["job", "list"]);
    assert_eq!(jobs.as_array().map(Vec::len), Some(0));
}
