//! Two coordinators on one PostgreSQL store (`shoal up --store postgres://…`):
//! one leads, the other stands by; SIGKILL the leader with 500 tasks in flight
//! and the standby takes over within 10 s, the agents (given both endpoints)
//! reconnect, and every task runs exactly once. PostgreSQL comes from
//! `scripts/pg-up.sh`; without it the test fails, saying so (never skips).
mod support;

use std::collections::BTreeMap;
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use support::{SHOAL, TestCluster};

const LIMIT: Duration = Duration::from_secs(180);

/// A fresh database of the tests' PostgreSQL: its URL.
fn fresh_database() -> String {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/pg-up.sh");
    let name = format!("shoal_failover_{}", std::process::id());
    shoal_coordinator::db::scratch_database(&script, &name)
        .unwrap_or_else(|e| panic!("this test needs PostgreSQL: {e}"))
}

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
    let url = fresh_database();
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
    for mut agent in agents {
        let _ = agent.kill();
        let _ = agent.wait();
    }
}
