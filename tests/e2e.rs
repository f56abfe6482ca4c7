//! End to end: a real coordinator process, real agent processes, real jobs.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use shoal_proto::v1 as pb;
use support::{TestCluster, process_alive};
use tokio_stream::StreamExt;

const LIMIT: Duration = Duration::from_secs(60);

fn submit(cluster: &TestCluster, args: &[&str]) -> String {
    let mut all = vec!["job", "submit"];
    all.extend_from_slice(args);
    let job = cluster.shoal_json(&all);
    job["id"].as_str().expect("job id").to_string()
}

#[tokio::test]
async fn two_instance_job_runs_on_two_nodes_and_keeps_outputs() {
    let tc = TestCluster::start().await;
    tc.create_cluster(
        "cpu",
        &["--max-nodes", "2", "--idle-seconds-before-scaledown", "60"],
    );
    let code = tc.scratch("code");
    std::fs::create_dir_all(&code).expect("code dir");
    std::fs::write(code.join("train.sh"), "echo rank $SHOAL_NODE_RANK of $SHOAL_NUM_NODES; echo \"w=$SHOAL_NODE_RANK\" > outputs/model.txt\n")
        .expect("write code");
    let job = tc.shoal_json(&[
        "job",
        "submit",
        "--cluster",
        "cpu",
        "--instance-count",
        "2",
        "--wait",
        "--code",
        code.to_str().expect("utf8"),
        "--",
        "sh",
        "train.sh",
    ]);
    assert_eq!(job["status"], "completed", "{job:#}");
    let instances = job["instances"].as_array().expect("instances");
    assert_eq!(instances.len(), 2);
    let nodes: BTreeSet<&str> = instances
        .iter()
        .map(|i| i["node"].as_str().expect("node"))
        .collect();
    assert_eq!(nodes.len(), 2, "instances share a node: {job:#}");
    for instance in instances {
        assert_eq!(instance["exit_code"], 0);
    }
    for field in ["created_at", "started_at", "ended_at"] {
        assert!(job[field].is_string(), "{field} missing: {job:#}");
    }
    let id = job["id"].as_str().expect("id");

    let logs = tc.shoal(&["job", "logs", id]);
    let text = String::from_utf8_lossy(&logs.stdout);
    assert!(
        text.contains("[0] rank 0 of 2") && text.contains("[1] rank 1 of 2"),
        "{text}"
    );

    let into = tc.scratch("downloads");
    let out = tc.shoal(&[
        "job",
        "download",
        id,
        "--download-path",
        into.to_str().expect("utf8"),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for rank in 0..2 {
        let model =
            std::fs::read_to_string(into.join(id).join(format!("instance-{rank}/model.txt")))
                .expect("model");
        assert_eq!(model.trim(), format!("w={rank}"));
    }

    let (status, _) = http(&tc, "GET", &format!("/api/v1/jobs/{id}/outputs/1"), "").await;
    assert_eq!(status, 200, "outputs over HTTP");
    let (status, body) = http(&tc, "GET", &format!("/api/v1/jobs/{id}/outputs/7"), "").await;
    assert_eq!(status, 404, "{body}");
    let http = http_get(&tc, &format!("/api/v1/jobs/{id}")).await;
    let over_http: serde_json::Value = serde_json::from_str(&http).expect("json over http");
    assert_eq!(over_http["status"], "completed");
    assert_eq!(over_http["instances"].as_array().map(Vec::len), Some(2));
}

/// `--wait` prints what the job writes as it runs, then the job; with `-o json`
/// only the job (the follow asks for the logs only when it shows them).
#[tokio::test]
async fn submit_wait_prints_the_jobs_output_and_json_stays_clean() {
    let tc = TestCluster::start().await;
    tc.create_cluster("cpu", &["--max-nodes", "1"]);
    let run = ["job", "submit", "--cluster", "cpu", "--wait"];
    let job = [
        "--",
        "sh",
        "-c",
        "echo hello from the job; echo to stderr >&2",
    ];
    let table = tc.shoal(&[&run[..], &job[..]].concat());
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(table.status.success(), "{text}");
    assert!(text.contains("hello from the job"), "{text}");
    assert!(text.contains("to stderr"), "{text}");
    assert!(text.contains("completed"), "{text}");

    let json = tc.shoal(&[&run[..], &["-o", "json"], &job[..]].concat());
    assert!(json.status.success());
    let job: serde_json::Value = serde_json::from_slice(&json.stdout)
        .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&json.stdout)));
    assert_eq!(job["status"], "completed", "{job:#}");
}

/// The coordinator allocates through mimalloc, an agent and the client commands
/// through glibc's malloc, chosen per process from its first argument
/// (`cli/src/alloc.rs`); each process logs its choice as it starts.
#[tokio::test]
async fn the_coordinator_allocates_through_mimalloc_an_agent_and_a_client_through_glibc() {
    let tc = TestCluster::start().await;
    tc.create_cluster("cpu", &["--max-nodes", "1"]);
    let run = tc.shoal(&["job", "submit", "--cluster", "cpu", "--wait", "--", "true"]);
    assert!(run.status.success(), "{}", tc.coordinator_log());
    let coordinator =
        std::fs::read_to_string(tc.dir.path().join("coordinator.log")).expect("coordinator log");
    assert!(
        coordinator.contains(r#"allocator="mimalloc""#),
        "{coordinator}"
    );
    let nodes = tc.data_dir().join("nodes");
    let agents: Vec<String> = std::fs::read_dir(&nodes)
        .expect("nodes dir")
        .filter_map(|node| std::fs::read_to_string(node.ok()?.path().join("agent.log")).ok())
        .collect();
    assert_eq!(agents.len(), 1, "one node's agent log under {nodes:?}");
    assert!(agents[0].contains(r#"allocator="system""#), "{}", agents[0]);

    let client = std::process::Command::new(support::SHOAL)
        .args(["cluster", "list"])
        .env("SHOAL_LOG", "info")
        .env("SHOAL_ENDPOINT", tc.endpoint())
        .env("SHOAL_CONFIG_DIR", tc.config_dir())
        .output()
        .expect("run shoal");
    let said = String::from_utf8_lossy(&client.stderr);
    assert!(said.contains(r#"allocator="system""#), "{said}");
}

#[tokio::test]
async fn failing_instance_fails_the_job_with_its_exit_code() {
    let tc = TestCluster::start().await;
    tc.create_cluster("cpu", &["--max-nodes", "2"]);
    let out = tc.shoal(&[
        "job",
        "submit",
        "--cluster",
        "cpu",
        "--instance-count",
        "2",
        "--wait",
        "-o",
        "json",
        "--",
        "sh",
        "-c",
        "if [ $SHOAL_NODE_RANK = 1 ]; then exit 7; fi; sleep 30",
    ]);
    assert!(!out.status.success(), "a failed job must exit non-zero");
    let job: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(job["status"], "failed", "{job:#}");
    assert!(
        job["reason"].as_str().unwrap_or("").contains("exit code 7"),
        "{job:#}"
    );
    let statuses: BTreeMap<u64, &str> = job["instances"]
        .as_array()
        .expect("instances")
        .iter()
        .map(|i| {
            (
                i["index"].as_u64().expect("index"),
                i["status"].as_str().expect("status"),
            )
        })
        .collect();
    assert_eq!(statuses.get(&1), Some(&"failed"));
    assert_eq!(
        statuses.get(&0),
        Some(&"canceled"),
        "the other instance is stopped: {job:#}"
    );
}

#[tokio::test]
async fn cancel_kills_the_whole_process_tree() {
    let tc = TestCluster::start().await;
    tc.create_cluster("cpu", &["--max-nodes", "1"]);
    let pids = tc.scratch("pids");
    let script = format!(
        "sleep 300 & echo $! > {p}.child; echo $$ > {p}.shell; wait",
        p = pids.display()
    );
    let id = submit(&tc, &["--cluster", "cpu", "--", "sh", "-c", &script]);
    let read_pid = |suffix: &str| -> Option<i32> {
        std::fs::read_to_string(format!("{}.{suffix}", pids.display()))
            .ok()?
            .trim()
            .parse()
            .ok()
    };
    let (shell, child) = support::eventually("the job writes its pids", LIMIT, || async {
        Some((read_pid("shell")?, read_pid("child")?))
    })
    .await;
    assert!(process_alive(shell) && process_alive(child));

    let out = tc.shoal(&["job", "cancel", &id, "--wait"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        format!("canceled {id}")
    );
    assert!(
        !process_alive(shell),
        "`cancel --wait` returns once the job's leader is gone"
    );
    let job = tc.wait_status(&id, "canceled", LIMIT).await;
    assert_eq!(job.attempts[0].instances[0].status, "canceled");
    support::eventually(
        "the job's processes are gone",
        Duration::from_secs(10),
        || async { (!process_alive(shell) && !process_alive(child)).then_some(()) },
    )
    .await;
    let again = tc.shoal(&["job", "cancel", &id]);
    assert!(!again.status.success(), "canceling an ended job is refused");
}

#[tokio::test]
async fn timeout_marks_the_job_timed_out() {
    let tc = TestCluster::start().await;
    tc.create_cluster("cpu", &["--max-nodes", "1"]);
    let started = Instant::now();
    let id = submit(
        &tc,
        &["--cluster", "cpu", "--timeout", "1", "--", "sleep", "60"],
    );
    let job = tc.wait_status(&id, "timed_out", LIMIT).await;
    assert!(
        started.elapsed() < Duration::from_secs(40),
        "took {:?}",
        started.elapsed()
    );
    assert!(job.reason.contains("timed out"), "{job:#?}");
    assert_eq!(job.attempts[0].instances[0].status, "timed_out");
}

#[tokio::test]
async fn logs_follow_live_while_the_job_runs() {
    let tc = TestCluster::start().await;
    tc.create_cluster("cpu", &["--max-nodes", "1"]);
    let gate = tc.scratch("gate");
    let script = format!(
        "echo first; while [ ! -e {} ]; do sleep 0.05; done; echo second",
        gate.display()
    );
    let id = submit(&tc, &["--cluster", "cpu", "--", "sh", "-c", &script]);
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
        .expect("a first chunk in time");
    let first = first.expect("stream open").expect("chunk");
    assert_eq!(first.data, b"first\n");
    // The job cannot end before the gate exists: the line arrived live.
    assert_eq!(tc.job(&id).await.status, "running");
    std::fs::write(&gate, "").expect("open the gate");
    let mut rest = Vec::new();
    while let Some(chunk) = tokio::time::timeout(LIMIT, stream.next())
        .await
        .expect("stream ends in time")
    {
        rest.extend(chunk.expect("chunk").data);
    }
    assert_eq!(String::from_utf8_lossy(&rest), "second\n");
    assert_eq!(tc.job(&id).await.status, "completed");
}

#[tokio::test]
async fn sigkill_mid_queue_loses_nothing_and_runs_nothing_twice() {
    let mut tc = TestCluster::start().await;
    tc.create_cluster(
        "cpu",
        &["--max-nodes", "1", "--idle-seconds-before-scaledown", "60"],
    );
    let ledger = tc.scratch("ledger");
    let gate = tc.scratch("gate");
    let script = format!(
        "echo $SHOAL_JOB_ID >> {l}; while [ ! -e {g} ]; do sleep 0.05; done",
        l = ledger.display(),
        g = gate.display()
    );
    let ids: Vec<String> = (0..3)
        .map(|_| submit(&tc, &["--cluster", "cpu", "--", "sh", "-c", &script]))
        .collect();
    tc.wait_job(&ids[0], "running", LIMIT, |j| j.status == "running")
        .await;
    assert_eq!(tc.job(&ids[1]).await.status, "queued");

    tc.kill9();
    // The agent keeps running its job while the coordinator is down.
    tc.restart().await;
    for id in &ids[1..] {
        assert_eq!(
            tc.job(id).await.status,
            "queued",
            "queued jobs survive the crash"
        );
    }
    std::fs::write(&gate, "").expect("open the gate");
    for id in &ids {
        let job = tc.wait_status(id, "completed", LIMIT).await;
        assert_eq!(
            job.attempts.len(),
            1,
            "{id} ran {} times",
            job.attempts.len()
        );
    }
    let ledger = std::fs::read_to_string(&ledger).expect("ledger");
    let runs: Vec<&str> = ledger.lines().collect();
    let distinct: BTreeSet<&str> = runs.iter().copied().collect();
    assert_eq!(runs.len(), 3, "each job runs exactly once: {runs:?}");
    assert_eq!(distinct.len(), 3, "{runs:?}");
}

#[tokio::test]
async fn cluster_scales_to_demand_then_back_to_min_nodes() {
    let tc = TestCluster::start().await;
    tc.create_cluster(
        "cpu",
        &[
            "--min-nodes",
            "1",
            "--max-nodes",
            "3",
            "--idle-seconds-before-scaledown",
            "2",
        ],
    );
    tc.wait_cluster("cpu", "min_nodes kept", LIMIT, |c| {
        c.current_node_count == 1 && c.node_state_counts.as_ref().is_some_and(|n| n.idle == 1)
    })
    .await;
    let job = tc.shoal_json(&[
        "job",
        "submit",
        "--cluster",
        "cpu",
        "--instance-count",
        "3",
        "--wait",
        "--",
        "true",
    ]);
    assert_eq!(job["status"], "completed");
    let ended = Instant::now();
    let cluster = tc
        .wait_cluster("cpu", "scale down to min_nodes", LIMIT, |c| {
            c.current_node_count == 1 && c.allocation_state == "steady"
        })
        .await;
    assert!(
        ended.elapsed() >= Duration::from_millis(1500),
        "removed before the idle timeout: {:?}",
        ended.elapsed()
    );
    assert_eq!(cluster.target_node_count, 1);
    // And it stays there: min_nodes are never removed.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(tc.cluster("cpu").await.current_node_count, 1);
}

#[tokio::test]
async fn killed_agent_requeues_its_process_attempt() {
    let tc = TestCluster::start().await;
    tc.create_cluster(
        "cpu",
        &["--max-nodes", "2", "--idle-seconds-before-scaledown", "60"],
    );
    let (id, node, marker) = job_whose_first_attempt_hangs(&tc, "cpu").await;
    let orphan: i32 = support::eventually("attempt 1 writes its pid", LIMIT, || async {
        std::fs::read_to_string(format!("{}.pid", marker.display()))
            .ok()?
            .trim()
            .parse()
            .ok()
    })
    .await;
    // SIGKILL the node's agent (found by its work dir), as the OOM killer would.
    support::kill_matching(&tc.data_dir().join("nodes").join(&node));
    let job = tc.wait_status(&id, "completed", LIMIT).await;
    assert_eq!(job.attempts.len(), 2, "{job:#?}");
    assert_eq!(job.attempts[0].status, "lost");
    let runs = std::fs::read_to_string(&marker).expect("marker");
    assert_eq!(runs.lines().collect::<Vec<_>>(), vec!["1", "2"]);
    assert!(!process_alive(orphan), "attempt 1 outlived its agent");
}

#[tokio::test]
async fn restart_requeues_work_of_a_node_that_never_comes_back() {
    // A short grace, and a VM size of our own from the config file.
    let config = "agent_grace_seconds: 2\nvm_sizes:\n  - {name: Local_Tiny, cores: 1, memory_gib: 0.5, family: local}\n";
    let mut tc = TestCluster::start_with_config(config).await;
    let cluster = tc.shoal_json(&[
        "cluster",
        "create",
        "--name",
        "tiny",
        "--vm-size",
        "local_tiny",
        "--max-nodes",
        "1",
    ]);
    assert_eq!(cluster["vm_size"], "Local_Tiny");
    let (id, node, marker) = job_whose_first_attempt_hangs(&tc, "tiny").await;

    // The coordinator and the node die together; only the coordinator comes back.
    tc.kill9();
    support::kill_matching(&tc.data_dir().join("nodes").join(&node));
    tc.restart().await;
    let job = tc.wait_status(&id, "completed", LIMIT).await;
    assert_eq!(job.attempts.len(), 2, "{job:#?}");
    assert_eq!(job.attempts[0].status, "lost");
    assert_ne!(
        job.attempts[1].instances[0].node, node,
        "a new node ran attempt 2"
    );
    let runs = std::fs::read_to_string(&marker).expect("marker");
    assert_eq!(runs.lines().collect::<Vec<_>>(), vec!["1", "2"]);
}

#[tokio::test]
async fn the_http_api_does_what_grpc_does() {
    let tc = TestCluster::start().await;
    let (status, body) = http(
        &tc,
        "POST",
        "/api/v1/clusters",
        r#"{"name": "web", "vm_size": "Standard_D2_v2", "max_nodes": 1}"#,
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let (status, body) = http(
        &tc,
        "POST",
        "/api/v1/clusters",
        r#"{"name": "web2", "vm_size": "Standard_D2_v2", "max_nodes": 1, "min_nodes": 5}"#,
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("min_nodes"), "{body}");
    let (status, body) = http(
        &tc,
        "POST",
        "/api/v1/clusters",
        r#"{"name": "web3", "vm_sise": "x"}"#,
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("vm_sise"), "{body}");
    let (status, body) = http(
        &tc,
        "PATCH",
        "/api/v1/clusters/web",
        r#"{"vm_size": "Standard_D3_v2"}"#,
    )
    .await;
    assert_eq!(status, 400, "{body}");

    let (status, body) = http(
        &tc,
        "POST",
        "/api/v1/jobs",
        r#"{"command": "sleep 300", "compute": "web"}"#,
    )
    .await;
    assert_eq!(status, 201, "{body}");
    let job: serde_json::Value = serde_json::from_str(&body).expect("job json");
    let id = job["id"].as_str().expect("id").to_string();
    tc.wait_job(&id, "running", LIMIT, |j| j.status == "running")
        .await;
    let (status, body) = http(&tc, "POST", &format!("/api/v1/jobs/{id}/cancel"), "").await;
    assert_eq!(status, 200, "{body}");
    tc.wait_status(&id, "canceled", LIMIT).await;
    let (status, _) = http(&tc, "GET", "/api/v1/jobs/job-404", "").await;
    assert_eq!(status, 404);
    let (status, body) = http(&tc, "GET", "/api/v1/clusters/web", "").await;
    assert_eq!(status, 200);
    let cluster: serde_json::Value = serde_json::from_str(&body).expect("cluster json");
    assert_eq!(cluster["max_nodes"], 1);
}

/// A job whose attempt 1 hangs (its pid in `<marker>.pid`) and whose later attempts
/// finish at once; each attempt appends its number to `marker`. Returns the job id,
/// the node of attempt 1, once it runs, and the marker.
async fn job_whose_first_attempt_hangs(
    tc: &TestCluster,
    cluster: &str,
) -> (String, String, std::path::PathBuf) {
    let marker = tc.scratch("attempts");
    let script = format!(
        "echo $SHOAL_ATTEMPT >> {m}; if [ $SHOAL_ATTEMPT = 1 ]; then echo $$ > {m}.pid; exec sleep 300; fi",
        m = marker.display()
    );
    let id = submit(tc, &["--cluster", cluster, "--", "sh", "-c", &script]);
    let job = tc
        .wait_job(&id, "running", LIMIT, |j| j.status == "running")
        .await;
    let node = job.attempts[0].instances[0].node.clone();
    (id, node, marker)
}

/// A plain HTTP/1.1 request on the coordinator's port (the JSON API shares it with
/// gRPC), as the admin.
async fn http(tc: &TestCluster, method: &str, path: &str, body: &str) -> (u16, String) {
    tc.http(method, path, Some(&tc.admin_token()), body).await
}

async fn http_get(tc: &TestCluster, path: &str) -> String {
    let (status, body) = http(tc, "GET", path, "").await;
    assert_eq!(status, 200, "{body}");
    body
}

/// The README's first command: a 2-node job end to end on an embedded
/// coordinator, its outputs downloaded, the cluster back at 0 nodes.
#[tokio::test]
async fn quickstart_runs_the_main_job_end_to_end() {
    let dir = tempfile::tempdir().expect("tempdir");
    let output = tokio::task::spawn_blocking({
        let dir = dir.path().to_path_buf();
        move || {
            std::process::Command::new(support::SHOAL)
                .arg("quickstart")
                .current_dir(&dir)
                .env("SHOAL_CONFIG_DIR", dir.join("config"))
                .env_remove("SHOAL_ENDPOINT")
                .output()
                .expect("run shoal quickstart")
        }
    })
    .await
    .expect("quickstart");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("job-1 · completed"), "{stdout}");
    assert!(stdout.contains("scaled back to 0 nodes"), "{stdout}");
    for instance in ["instance-0", "instance-1"] {
        assert!(
            stdout.contains(&format!("outputs of {instance}: model.txt = shard=")),
            "{stdout}"
        );
    }
}
