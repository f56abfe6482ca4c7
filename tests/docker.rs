//! The docker runtime on the real Docker Engine, with images built by images/build.sh.
//! Without an engine they fail, saying so; they never skip.

mod support;

use std::time::{Duration, Instant};

use shoal_proto::v1 as pb;
use support::{TestCluster, containers_with, docker_ready};
use tokio_stream::StreamExt;

const LIMIT: Duration = Duration::from_secs(60);
/// Jobs get 1 s between SIGTERM and SIGKILL here.
const CONFIG: &str = "job_stop_grace_seconds: 1\n";

fn submit(tc: &TestCluster, args: &[&str]) -> String {
    let mut all = vec!["job", "submit"];
    all.extend_from_slice(args);
    tc.shoal_json(&all)["id"]
        .as_str()
        .expect("job id")
        .to_string()
}

/// A coordinator with a cluster `box` of up to `max_nodes` local nodes (fails
/// where there is no Docker Engine).
async fn box_cluster(max_nodes: &str) -> TestCluster {
    docker_ready();
    let tc = TestCluster::start_with_config(CONFIG).await;
    tc.create_cluster(
        "box",
        &[
            "--max-nodes",
            max_nodes,
            "--idle-seconds-before-scaledown",
            "60",
        ],
    );
    tc
}

/// Where the agent of `node` keeps the working dir of an instance (mounted at /job).
fn job_dir(tc: &TestCluster, job: &pb::Job, instance: usize) -> std::path::PathBuf {
    let attempt = job.attempts.last().expect("an attempt");
    let node = &attempt.instances[instance].node;
    tc.data_dir()
        .join("nodes")
        .join(node)
        .join("attempts")
        .join(format!("{}-{instance}", attempt.id))
}

#[tokio::test]
async fn container_jobs_stream_logs_live_and_record_exit_codes() {
    let tc = box_cluster("2").await;
    let job = tc.shoal_json(&[
        "job",
        "submit",
        "--cluster",
        "box",
        "--image",
        "shoal/train",
        "--instance-count",
        "2",
        "--wait",
        "--",
        "sh",
        "/app/train.sh",
        "5",
    ]);
    assert_eq!(job["status"], "completed", "{job:#}");
    let id = job["id"].as_str().expect("id");
    let logs = String::from_utf8_lossy(&tc.shoal(&["job", "logs", id]).stdout).into_owned();
    assert!(
        logs.contains("[0] epoch 5/5") && logs.contains("[1] epoch 5/5"),
        "{logs}"
    );
    let into = tc.scratch("downloads");
    let out = tc.shoal(&["job", "download", id, "-p", into.to_str().expect("utf8")]);
    assert!(out.status.success());
    let model = std::fs::read_to_string(into.join(id).join("instance-1/model.txt"))
        .expect("model from the container");
    assert!(model.starts_with("w="), "{model}");

    let failing = tc.shoal(&[
        "-o",
        "json",
        "job",
        "submit",
        "--cluster",
        "box",
        "--image",
        "shoal/base",
        "--wait",
        "--",
        "sh",
        "-c",
        "exit 3",
    ]);
    assert!(!failing.status.success());
    let failed: serde_json::Value = serde_json::from_slice(&failing.stdout).expect("json");
    assert_eq!(failed["status"], "failed");
    assert_eq!(failed["instances"][0]["exit_code"], 3, "{failed:#}");

    // Live: the second line cannot exist before the test opens the gate.
    let id = submit(
        &tc,
        &[
            "--cluster",
            "box",
            "--image",
            "shoal/base",
            "--",
            "sh",
            "-c",
            "echo first; while [ ! -e /job/gate ]; do sleep 0.05; done; echo second",
        ],
    );
    let mut stream = tc
        .jobs()
        .await
        .logs(pb::LogsRequest {
            job_id: id.clone(),
            instance: None,
            follow: true,
        })
        .await
        .expect("logs")
        .into_inner();
    let first = tokio::time::timeout(LIMIT, stream.next())
        .await
        .expect("in time")
        .expect("open")
        .expect("chunk");
    assert_eq!(first.data, b"first\n");
    let job = tc.job(&id).await;
    assert_eq!(job.status, "running");
    std::fs::write(job_dir(&tc, &job, 0).join("gate"), "").expect("gate");
    let mut rest = Vec::new();
    while let Some(chunk) = tokio::time::timeout(LIMIT, stream.next())
        .await
        .expect("ends in time")
    {
        rest.extend(chunk.expect("chunk").data);
    }
    assert_eq!(String::from_utf8_lossy(&rest), "second\n");
    assert!(
        containers_with(&tc, &format!("shoal.job={id}")).is_empty(),
        "the container is removed"
    );
}

#[tokio::test]
async fn cancel_and_timeout_stop_the_container_within_the_grace_period() {
    let tc = box_cluster("1").await;
    // `sleep` as PID 1 ignores SIGTERM: only the SIGKILL after the grace stops it.
    let id = submit(
        &tc,
        &[
            "--cluster",
            "box",
            "--image",
            "shoal/base",
            "--",
            "sleep",
            "300",
        ],
    );
    let job = tc
        .wait_job(&id, "running", LIMIT, |j| j.status == "running")
        .await;
    let label = format!("shoal.attempt={}", job.attempts[0].id);
    let containers = containers_with(&tc, &label);
    assert_eq!(containers.len(), 1);

    // Limits of the node's VM size (Standard_D2_v2: 2 cores, 7 GiB) and the labels.
    let inspect = std::process::Command::new("docker")
        .args(["inspect", &containers[0]])
        .output()
        .expect("inspect");
    let inspect: serde_json::Value = serde_json::from_slice(&inspect.stdout).expect("inspect json");
    let container = &inspect[0];
    assert_eq!(container["HostConfig"]["NanoCpus"], 2_000_000_000i64);
    assert_eq!(container["HostConfig"]["Memory"], 7i64 << 30);
    let labels = &container["Config"]["Labels"];
    assert_eq!(labels["shoal.job"], id.as_str());
    assert_eq!(
        labels["shoal.node"],
        job.attempts[0].instances[0].node.as_str()
    );
    assert_eq!(labels["shoal.instance"], "0");

    let asked = Instant::now();
    let out = tc.shoal(&["job", "cancel", &id, "-o", "json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let answer: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(
        answer["status"], "canceling",
        "the container still runs its grace: not canceled yet ({answer:#})"
    );
    let job = tc
        .wait_job(&id, "canceled", LIMIT, |j| j.status == "canceled")
        .await;
    assert!(
        containers_with(&tc, &label).is_empty(),
        "canceled means stopped: the container is gone once the job says canceled"
    );
    assert!(
        asked.elapsed() < Duration::from_secs(8),
        "cancel took {:?}",
        asked.elapsed()
    );
    assert_eq!(
        job.attempts[0].instances[0].exit_code,
        Some(137),
        "SIGKILL after the grace"
    );
    assert!(
        containers_with(&tc, &label).is_empty(),
        "no container left after cancel"
    );

    let id = submit(
        &tc,
        &[
            "--cluster",
            "box",
            "--image",
            "shoal/base",
            "--timeout",
            "1",
            "--",
            "sleep",
            "300",
        ],
    );
    let job = tc.wait_status(&id, "timed_out", LIMIT).await;
    let label = format!("shoal.attempt={}", job.attempts[0].id);
    assert!(
        containers_with(&tc, &label).is_empty(),
        "no container left after timeout"
    );
}

#[tokio::test]
async fn a_missing_image_fails_the_job_and_the_node_stays_usable() {
    let tc = box_cluster("1").await;
    let out = tc.shoal(&[
        "-o",
        "json",
        "job",
        "submit",
        "--cluster",
        "box",
        "--image",
        "shoal/missing:2",
        "--wait",
        "--",
        "true",
    ]);
    assert!(!out.status.success());
    let job: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let reason = job["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("shoal/missing:2") && reason.contains("images/build.sh missing"),
        "{reason}"
    );
    let next = tc.shoal_json(&[
        "job",
        "submit",
        "--cluster",
        "box",
        "--image",
        "shoal/base",
        "--wait",
        "--",
        "true",
    ]);
    assert_eq!(next["status"], "completed");
    assert_eq!(
        next["instances"][0]["node"], job["instances"][0]["node"],
        "the same node ran the next job"
    );
}

#[tokio::test]
async fn a_restarted_agent_recovers_its_running_container() {
    let tc = box_cluster("1").await;
    let id = submit(
        &tc,
        &[
            "--cluster",
            "box",
            "--image",
            "shoal/base",
            "--",
            "sh",
            "-c",
            "while [ ! -e /job/gate ]; do sleep 0.05; done; echo finished",
        ],
    );
    let job = tc
        .wait_job(&id, "running", LIMIT, |j| j.status == "running")
        .await;
    let node = job.attempts[0].instances[0].node.clone();
    // SIGKILL the agent; the local provider restarts it, as systemd would.
    support::kill_matching(&tc.data_dir().join("nodes").join(&node));
    tokio::time::sleep(Duration::from_millis(500)).await;
    std::fs::write(job_dir(&tc, &job, 0).join("gate"), "").expect("gate");
    let job = tc.wait_status(&id, "completed", LIMIT).await;
    assert_eq!(job.attempts.len(), 1, "recovered, not rerun: {job:#?}");
    assert_eq!(job.attempts[0].instances[0].node, node);
    assert!(containers_with(&tc, &format!("shoal.job={id}")).is_empty());
}

#[tokio::test]
async fn the_docker_provider_scales_node_containers_up_and_back_to_zero() {
    docker_ready();
    let tc = TestCluster::start_with_config(CONFIG).await;
    tc.create_cluster(
        "dk",
        &[
            "--provider",
            "docker",
            "--max-nodes",
            "2",
            "--idle-seconds-before-scaledown",
            "2",
        ],
    );
    let owner = std::fs::read_to_string(tc.data_dir().join("owner-id")).expect("owner id");
    let node_containers = || containers_with(&tc, "shoal.node-container");
    assert!(node_containers().is_empty(), "0 nodes before any work");

    let gate = "while [ ! -e /job/gate ]; do sleep 0.05; done; echo ip=$(hostname -i)";
    let id = submit(
        &tc,
        &[
            "--cluster",
            "dk",
            "--image",
            "shoal/base",
            "--instance-count",
            "2",
            "--",
            "sh",
            "-c",
            gate,
        ],
    );
    let job = tc
        .wait_job(&id, "running", LIMIT, |j| j.status == "running")
        .await;
    // Two node containers, each with its own address on the cluster's network.
    let nodes = node_containers();
    assert_eq!(nodes.len(), 2, "{nodes:?}");
    let network = format!("shoal-{}-dk", owner.trim());
    let mut node_ips: Vec<String> = nodes
        .iter()
        .map(|id| {
            let format =
                format!("{{{{(index .NetworkSettings.Networks \"{network}\").IPAddress}}}}");
            let out = std::process::Command::new("docker")
                .args(["inspect", "-f", &format, id])
                .output()
                .expect("inspect");
            String::from_utf8_lossy(&out.stdout).trim().to_string()
        })
        .collect();
    node_ips.sort();
    node_ips.dedup();
    assert_eq!(node_ips.len(), 2, "distinct node IPs: {node_ips:?}");
    assert!(node_ips.iter().all(|ip| !ip.is_empty()));
    for instance in 0..2 {
        std::fs::write(job_dir(&tc, &job, instance).join("gate"), "").expect("gate");
    }
    let job = tc.wait_status(&id, "completed", LIMIT).await;
    let nodes_used: std::collections::BTreeSet<&str> = job.attempts[0]
        .instances
        .iter()
        .map(|i| i.node.as_str())
        .collect();
    assert_eq!(nodes_used.len(), 2);
    let logs = String::from_utf8_lossy(&tc.shoal(&["job", "logs", &id]).stdout).into_owned();
    let mut job_ips: Vec<&str> = logs.lines().filter_map(|l| l.split("ip=").nth(1)).collect();
    job_ips.sort();
    job_ips.dedup();
    assert_eq!(
        job_ips.len(),
        2,
        "the instances ran at two addresses: {logs}"
    );

    tc.wait_cluster("dk", "scale back to 0", LIMIT, |c| {
        c.current_node_count == 0 && c.allocation_state == "steady"
    })
    .await;
    support::eventually(
        "node containers removed",
        Duration::from_secs(20),
        || async { node_containers().is_empty().then_some(()) },
    )
    .await;
    let networks = std::process::Command::new("docker")
        .args([
            "network",
            "ls",
            "-q",
            "--filter",
            &format!("name={network}"),
        ])
        .output()
        .expect("docker network ls");
    assert!(
        networks.stdout.is_empty(),
        "the cluster's network goes with its last node"
    );
}

#[tokio::test]
async fn an_unreachable_docker_engine_fails_image_jobs_and_the_node_stays_usable() {
    // No engine is needed: this one points the node's agent at a socket that is not there.
    let tc = TestCluster::start_full(
        CONFIG,
        &[("DOCKER_HOST", "unix:///nonexistent/docker.sock")],
    )
    .await;
    tc.create_cluster(
        "nodock",
        &["--max-nodes", "1", "--idle-seconds-before-scaledown", "60"],
    );
    let out = tc.shoal(&[
        "-o",
        "json",
        "job",
        "submit",
        "--cluster",
        "nodock",
        "--image",
        "shoal/base",
        "--wait",
        "--",
        "true",
    ]);
    assert!(!out.status.success());
    let job: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let reason = job["reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("cannot run image `shoal/base`") && reason.contains("Docker Engine"),
        "{reason}"
    );
    let next = tc.shoal_json(&[
        "job",
        "submit",
        "--cluster",
        "nodock",
        "--wait",
        "--",
        "true",
    ]);
    assert_eq!(next["status"], "completed");
    assert_eq!(
        next["instances"][0]["node"], job["instances"][0]["node"],
        "the node stayed usable"
    );
}

#[tokio::test]
async fn a_containers_share_is_its_cpu_and_memory_limit_and_going_over_says_so() {
    let tc = box_cluster("1").await;
    // Half a core and 64 MiB: the engine enforces both.
    let id = submit(
        &tc,
        &[
            "--cluster",
            "box",
            "--image",
            "shoal/base",
            "--cpus",
            "0.5",
            "--memory",
            "64m",
            "--",
            "sleep",
            "30",
        ],
    );
    tc.wait_job(&id, "running", LIMIT, |j| j.status == "running")
        .await;
    let containers = containers_with(&tc, &format!("shoal.job={id}"));
    assert_eq!(containers.len(), 1, "{containers:?}");
    let limits = std::process::Command::new("docker")
        .args([
            "inspect",
            "-f",
            "{{.HostConfig.NanoCpus}} {{.HostConfig.Memory}}",
            &containers[0],
        ])
        .output()
        .expect("docker inspect");
    assert_eq!(
        String::from_utf8_lossy(&limits.stdout).trim(),
        format!("500000000 {}", 64u64 << 20)
    );
    tc.shoal_json(&["job", "cancel", &id, "--wait"]);
    // dd's 200 MiB buffer is more than 64 MiB: the engine kills it, and the job says why.
    let id = submit(
        &tc,
        &[
            "--cluster",
            "box",
            "--image",
            "shoal/base",
            "--memory",
            "64m",
            "--",
            "dd",
            "if=/dev/zero",
            "of=/dev/null",
            "bs=200M",
            "count=1",
        ],
    );
    let job = tc.wait_status(&id, "failed", LIMIT).await;
    assert!(
        job.reason.contains("over its memory limit of 64 MiB"),
        "{}",
        job.reason
    );
}

/// Container jobs reach their node's agent for tracking too: on a local node
/// through the default bridge's gateway, on a docker-provider node by the node's
/// name on its cluster's network. (busybox's wget speaks MLflow's REST here.)
#[tokio::test]
async fn container_jobs_log_metrics_to_their_run_on_local_and_docker_nodes() {
    let tc = box_cluster("1").await;
    tc.create_cluster(
        "dk",
        &[
            "--provider",
            "docker",
            "--max-nodes",
            "1",
            "--idle-seconds-before-scaledown",
            "2",
        ],
    );
    let log = r#"wget -q -O - --header "Authorization: Bearer $MLFLOW_TRACKING_TOKEN" --post-data "{\"run_id\":\"$MLFLOW_RUN_ID\",\"key\":\"seen\",\"value\":7,\"timestamp\":1,\"step\":3}" "$MLFLOW_TRACKING_URI/api/2.0/mlflow/runs/log-metric" && echo logged"#;
    for cluster in ["box", "dk"] {
        let job = tc.shoal_json(&[
            "job",
            "submit",
            "--cluster",
            cluster,
            "--image",
            "shoal/base",
            "--wait",
            "--",
            "sh",
            "-c",
            log,
        ]);
        let id = job["id"].as_str().expect("id");
        let logs = String::from_utf8_lossy(&tc.shoal(&["job", "logs", id]).stdout).into_owned();
        assert_eq!(
            job["status"],
            "completed",
            "{cluster}: {job:#}\n{logs}\n{}",
            tc.coordinator_log()
        );
        let logged = tc.shoal_json(&["job", "metrics", id]);
        let metric = &logged["runs"][0]["metrics"][0];
        assert_eq!(metric["name"], "seen", "{cluster}: {logged:#}");
        assert_eq!(metric["latest"]["value"], 7.0);
        assert_eq!(metric["latest"]["step"], 3);
    }
}
