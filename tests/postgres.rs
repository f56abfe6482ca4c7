//! Two coordinators on one PostgreSQL store (`shoal up --store postgres://…`):
//! one leads, the other stands by; SIGKILL the leader with 500 tasks in flight
//! and the standby takes over within 10 s, the agents (given both endpoints)
//! reconnect, and every task runs exactly once; a job logging to MLflow through
//! the takeover keeps every point, once. PostgreSQL comes from
//! `scripts/pg-up.sh`; without it the test fails, saying so (never skips).
mod support;

use std::collections::BTreeMap;
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::{SHOAL, TestCluster};

const LIMIT: Duration = Duration::from_secs(180);

fn accepts(endpoint: &str) -> bool {
    TcpStream::connect(endpoint).is_ok()
}

/// Task index → how many times it ran.
fn ran(ledger: &Path) -> BTreeMap<u32, u32> {
    let mut counts = BTreeMap::new();
    for line in std::fs::read_to_string(ledger).unwrap_or_default().lines() {
        if let Ok(index) = line.trim().parse::<u32>() {
            *counts.entry(index).or_insert(0) += 1;
        }
    }
    counts
}

struct Standby(Child);

impl Drop for Standby {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn a_standby_takes_over_a_killed_leader_and_every_task_runs_once() {
    let url = support::postgres_database("shoal_failover");
    let config = "leader_lease_seconds: 4\nlease_seconds: 30\njob_stop_grace_seconds: 1\n";
    let mut leader = TestCluster::start_all(config, &[], &["--store", &url]).await;
    let first = leader.endpoint();
    // The standby: its own data dir, the same database; it does not listen
    // until it leads.
    let standby_dir = tempfile::tempdir().expect("tempdir");
    std::fs::write(standby_dir.path().join("shoal.yaml"), config).expect("config");
    let second_port = support::free_port();
    let second = format!("127.0.0.1:{second_port}");
    let standby_log = standby_dir.path().join("coordinator.log");
    let _standby = Standby(
        Command::new(SHOAL)
            .args(["up", "--listen", &second, "--store", &url, "--data-dir"])
            .arg(standby_dir.path())
            .env("SHOAL_CONFIG_DIR", standby_dir.path().join("config"))
            .stdin(Stdio::null())
            .stdout(std::fs::File::create(&standby_log).expect("log"))
            .stderr(std::fs::File::create(standby_dir.path().join("err.log")).expect("log"))
            .spawn()
            .expect("start the standby"),
    );
    let token = leader.admin_token();
    let both = format!("{first},{second}");
    let cli = |args: &[&str]| {
        let out = Command::new(SHOAL)
            .args(["-o", "json"])
            .args(args)
            .env("SHOAL_ENDPOINT", &both)
            .env("SHOAL_TOKEN", &token)
            .output()
            .expect("shoal");
        assert!(
            out.status.success(),
            "shoal {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<serde_json::Value>(&out.stdout).expect("json")
    };
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert!(
        !accepts(&second),
        "the standby does not listen while it stands by"
    );

    // Two machines of their own join, given both endpoints.
    cli(&[
        "cluster",
        "create",
        "--name",
        "ha",
        "--vm-size",
        "Standard_D2_v2",
        "--max-nodes",
        "2",
    ]);
    let join = cli(&["join-token", "create", "--cluster", "ha", "--uses", "2"]);
    let join = join["token"].as_str().expect("token").to_string();
    let mut agents = Vec::new();
    for n in 0..2 {
        agents.push(
            Command::new(SHOAL)
                .args(["agent", "--endpoint", &both, "--join-token", &join])
                .args(["--lease-seconds", "30", "--stop-grace-seconds", "1"])
                .arg("--work-dir")
                .arg(leader.scratch(&format!("machine-{n}")))
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("agent"),
        );
    }
    leader
        .wait_cluster("ha", "both machines idle", LIMIT, |c| {
            c.node_state_counts.as_ref().is_some_and(|n| n.idle == 2)
        })
        .await;

    // A job logs a point every 0.2 s with the real MLflow client, through its
    // agent, before and after the takeover.
    let logs = r#"
import mlflow, time
mlflow.log_param("lr", "0.1")
for step in range(40):
    mlflow.log_metric("loss", 1.0 / (step + 1), step=step)
    time.sleep(0.2)
"#;
    let python = support::test_python();
    let tracked = cli(&[
        "job",
        "submit",
        "--cluster",
        "ha",
        "--cpus",
        "0.5",
        "--",
        &python.to_string_lossy(),
        "-c",
        logs,
    ]);
    let tracked = tracked["id"].as_str().expect("id").to_string();
    let points = |metrics: &serde_json::Value| -> Vec<i64> {
        metrics["runs"][0]["metrics"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|m| m["name"] == "loss")
            .flat_map(|m| m["points"].as_array().cloned().unwrap_or_default())
            .map(|p| p["step"].as_i64().unwrap_or(-1))
            .collect()
    };
    support::eventually("the job logs", LIMIT, || async {
        (points(&cli(&["job", "metrics", &tracked])).len() >= 3).then_some(())
    })
    .await;

    // 500 tasks, 8 at a time on the two machines; the leader dies mid-way.
    let ledger = leader.scratch("ledger");
    let script = format!("sleep 0.3; echo $SHOAL_ARRAY_INDEX >> {}", ledger.display());
    let array = cli(&[
        "job",
        "submit",
        "--cluster",
        "ha",
        "--cpus",
        "0.5",
        "--array",
        "0-499",
        "--",
        "sh",
        "-c",
        &script,
    ]);
    let array = array["id"].as_str().expect("id").to_string();
    support::eventually("some tasks done", LIMIT, || async {
        (ran(&ledger).len() >= 40).then_some(())
    })
    .await;
    let logged_before = points(&cli(&["job", "metrics", &tracked])).len();
    let (_, leaders_keys) = support::http(&first, "GET", "/.well-known/jwks.json", None, "").await;
    leader.kill9();
    let killed = Instant::now();
    support::eventually("the standby listens", Duration::from_secs(30), || async {
        accepts(&second).then_some(())
    })
    .await;
    let takeover = killed.elapsed();
    assert!(
        takeover < Duration::from_secs(10),
        "took over in {takeover:?}: {}",
        std::fs::read_to_string(&standby_log).unwrap_or_default()
    );
    eprintln!("takeover: {takeover:?} after the leader's SIGKILL");
    // Identity tokens the leader signed verify against the standby's keys.
    let (_, standbys_keys) =
        support::http(&second, "GET", "/.well-known/jwks.json", None, "").await;
    assert!(leaders_keys.contains("Ed25519"), "{leaders_keys}");
    assert_eq!(standbys_keys, leaders_keys, "one signing key");

    // Everything completes at the standby, each task exactly once.
    let deadline = Instant::now() + LIMIT;
    loop {
        let job = cli(&["job", "show", &array]);
        if job["status"] == "completed" {
            assert_eq!(job["array"]["counts"]["completed"], 500, "{job:#}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the array did not complete: {job:#}\n{}",
            std::fs::read_to_string(&standby_log).unwrap_or_default()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let counts = ran(&ledger);
    assert_eq!(counts.len(), 500, "every task ran");
    let twice: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
    assert!(twice.is_empty(), "tasks that ran twice: {twice:?}");

    // The logging job ran through in its first attempt; its run, kept in the
    // database, has every point once, in order.
    let deadline = Instant::now() + LIMIT;
    let job = loop {
        let job = cli(&["job", "show", &tracked]);
        let status = job["status"].as_str().unwrap_or_default();
        if ["completed", "failed", "canceled", "timed_out"].contains(&status) {
            break job;
        }
        assert!(
            Instant::now() < deadline,
            "the logging job did not end: {job:#}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    assert_eq!(job["status"], "completed", "{job:#}");
    assert!(
        logged_before < 40,
        "the job logged all its points before the takeover"
    );
    eprintln!("the job had logged {logged_before} of 40 points at the leader's SIGKILL");
    let metrics = cli(&["job", "metrics", &tracked]);
    assert_eq!(
        points(&metrics),
        (0..40).collect::<Vec<i64>>(),
        "{metrics:#}"
    );
    assert_eq!(metrics["runs"][0]["params"]["lr"], "0.1", "{metrics:#}");
    assert_eq!(
        metrics["runs"].as_array().map(Vec::len),
        Some(1),
        "{metrics:#}"
    );
    for mut agent in agents {
        let _ = agent.kill();
        let _ = agent.wait();
    }
}
