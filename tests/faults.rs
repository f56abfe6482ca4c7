//! The fault suite: partitions, crashes and hangs of real coordinators, agents and
//! engines, each bounded in time. What must hold: no job is lost, none runs twice
//! at once, every job ends exactly once, and the cluster comes back whole.
mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use shoal_proto::v1 as pb;
use support::{TestCluster, docker_ready};

const LIMIT: Duration = Duration::from_secs(90);

/// A lease short enough for a test: agents stop their work 4 s after they last
/// heard from the coordinator (lease 6 s, less the 1 s grace and 1 s to spare).
const SHORT_LEASE: &str = "lease_seconds: 6\njob_stop_grace_seconds: 1\n";

fn docker(args: &[&str]) {
    let out = Command::new("docker").args(args).output().expect("docker");
    assert!(
        out.status.success(),
        "docker {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn owner(tc: &TestCluster) -> String {
    std::fs::read_to_string(tc.data_dir().join("owner-id"))
        .expect("owner id")
        .trim()
        .to_string()
}

/// Where a node's process jobs can leave a ledger that outlives their attempt:
/// the node's own work dir (each attempt works in `<it>/attempts/<attempt>-<i>`).
fn ledger(tc: &TestCluster, node: &str) -> PathBuf {
    tc.data_dir().join("nodes").join(node).join("ledger")
}

/// Ledger lines `attempt uptime-seconds`, by attempt: (first, last) tick.
fn ticks(path: &Path) -> BTreeMap<String, (f64, f64)> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut spans: BTreeMap<String, (f64, f64)> = BTreeMap::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        let (Some(attempt), Some(tick)) = (words.next(), words.next()) else {
            continue;
        };
        let Ok(tick) = tick.parse::<f64>() else {
            continue;
        };
        let span = spans.entry(attempt.to_string()).or_insert((tick, tick));
        span.0 = span.0.min(tick);
        span.1 = span.1.max(tick);
    }
    spans
}

/// A process job that writes a tick (its attempt, the machine's uptime) to its
/// node's ledger every 0.2 s, `seconds` long.
fn ticking_job(tc: &TestCluster, cluster: &str, seconds: u32) -> String {
    let script = format!(
        "i=0; while [ $i -lt {} ]; do echo \"$SHOAL_ATTEMPT_ID $(cut -d' ' -f1 /proc/uptime)\" >> ../../ledger; i=$((i+1)); sleep 0.2; done",
        seconds * 5
    );
    let job = tc.shoal_json(&[
        "job",
        "submit",
        "--cluster",
        cluster,
        "--",
        "sh",
        "-c",
        &script,
    ]);
    job["id"].as_str().expect("id").to_string()
}

/// Cuts a docker-provider node off its cluster's network, and joins it again.
struct Cut {
    network: String,
    container: String,
    node: String,
}

impl Cut {
    fn new(tc: &TestCluster, cluster: &str, node: &str) -> Self {
        let owner = owner(tc);
        let cut = Cut {
            network: format!("shoal-{owner}-{cluster}"),
            container: format!("shoal-{owner}-node-{node}"),
            node: node.to_string(),
        };
        docker(&["network", "disconnect", &cut.network, &cut.container]);
        cut
    }

    fn heal(self) {
        docker(&[
            "network",
            "connect",
            "--alias",
            &self.node,
            &self.network,
            &self.container,
        ]);
    }
}

#[tokio::test]
async fn a_node_cut_off_stops_its_work_before_it_is_rerun_and_nothing_runs_twice() {
    docker_ready();
    let tc = TestCluster::start_with_config(SHORT_LEASE).await;
    tc.create_cluster(
        "fence",
        &[
            "--provider",
            "docker",
            "--min-nodes",
            "2",
            "--max-nodes",
            "2",
        ],
    );
    tc.wait_cluster("fence", "two nodes up", LIMIT, |c| {
        c.node_state_counts.as_ref().is_some_and(|n| n.idle == 2)
    })
    .await;

    // Shorter than the lease: the node is back before anything happens to it (a
    // 1 s cut and its agent's reconnection, well inside the 4 s it waits before
    // it stops its work).
    let id = ticking_job(&tc, "fence", 8);
    let job = tc
        .wait_job(&id, "running", LIMIT, |j| j.status == "running")
        .await;
    let node = job.attempts[0].instances[0].node.clone();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let cut = Cut::new(&tc, "fence", &node);
    tokio::time::sleep(Duration::from_secs(1)).await;
    cut.heal();
    let job = tc.wait_status(&id, "completed", LIMIT).await;
    assert_eq!(
        job.attempts.len(),
        1,
        "a short cut reruns nothing: {job:#?}"
    );
    let spans = ticks(&ledger(&tc, &node));
    let (first, last) = spans[&job.attempts[0].id];
    assert!(last - first > 6.0, "it ran on through the cut: {spans:?}");

    // Longer than the lease: the node stops the work itself, the coordinator
    // reruns it on the other node, and the cut node comes back idle.
    let id = ticking_job(&tc, "fence", 12);
    let job = tc
        .wait_job(&id, "running", LIMIT, |j| j.status == "running")
        .await;
    let cut_node = job.attempts[0].instances[0].node.clone();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let cut_at = Instant::now();
    let cut = Cut::new(&tc, "fence", &cut_node);
    let job = tc
        .wait_job(&id, "rerun elsewhere", LIMIT, |j| {
            j.attempts.len() == 2 && j.attempts[1].status == "running"
        })
        .await;
    let rerun_after = cut_at.elapsed();
    let other = job.attempts[1].instances[0].node.clone();
    assert_ne!(other, cut_node);
    assert!(
        rerun_after >= Duration::from_secs(5),
        "rerun only once the lease is over: {rerun_after:?}"
    );
    tokio::time::sleep(Duration::from_secs(12).saturating_sub(cut_at.elapsed())).await;
    cut.heal();
    let job = tc.wait_status(&id, "completed", LIMIT).await;
    assert_eq!(job.attempts.len(), 2, "{job:#?}");
    assert_eq!(job.attempts[0].status, "lost", "{job:#?}");
    let before = ticks(&ledger(&tc, &cut_node));
    let after = ticks(&ledger(&tc, &other));
    let (_, fenced_last) = before[&job.attempts[0].id];
    let (rerun_first, _) = after[&job.attempts[1].id];
    assert!(
        fenced_last < rerun_first,
        "the cut node's copy stopped ({fenced_last}) before the rerun started ({rerun_first})"
    );
    // Back on its network, the node rejoins and is idle again, unless its
    // replacement (min_nodes 2) has filled the cluster to max_nodes 2 in the
    // meantime: then it is sent away. Either way the cluster ends with two idle
    // nodes and never holds three.
    support::eventually(
        "two idle nodes, the cut one back or gone",
        LIMIT,
        || async {
            let nodes = tc.shoal_json(&["node", "list", "--cluster", "fence"]);
            let nodes = nodes.as_array()?;
            let state = |n: &serde_json::Value| n["state"].as_str().unwrap_or("").to_string();
            let idle = nodes.iter().filter(|n| state(n) == "idle").count();
            let cut = nodes
                .iter()
                .find(|n| n["id"] == cut_node.as_str())
                .map(state);
            let settled = matches!(cut.as_deref(), None | Some("idle"));
            (idle == 2 && nodes.len() == 2 && settled).then_some(())
        },
    )
    .await;
}

/// The ledger a job appends its id to when it is done.
fn ledger_job(ledger: &Path, seconds: &str) -> pb::JobSpec {
    pb::JobSpec {
        cluster: "fault".into(),
        command: format!(
            "sleep {seconds}; echo $SHOAL_JOB_ID >> {}",
            ledger.display()
        ),
        ..Default::default()
    }
}

/// Submits `count` jobs over gRPC, 16 at a time; their ids.
async fn submit_many(
    tc: &TestCluster,
    count: usize,
    make: impl Fn() -> pb::JobSpec,
) -> Vec<String> {
    let mut ids = Vec::with_capacity(count);
    let mut pending = futures::stream::FuturesOrdered::new();
    for _ in 0..count {
        let mut jobs = tc.jobs().await;
        let spec = make();
        pending.push_back(async move { jobs.submit(spec).await });
        if pending.len() >= 16 {
            let job = futures::StreamExt::next(&mut pending)
                .await
                .expect("a submit");
            ids.push(job.expect("submitted").into_inner().id);
        }
    }
    while let Some(job) = futures::StreamExt::next(&mut pending).await {
        ids.push(job.expect("submitted").into_inner().id);
    }
    ids
}

/// How often each id appears in the ledger.
fn entries(ledger: &Path) -> BTreeMap<String, usize> {
    let mut seen = BTreeMap::new();
    for line in std::fs::read_to_string(ledger).unwrap_or_default().lines() {
        *seen.entry(line.trim().to_string()).or_insert(0) += 1;
    }
    seen
}

async fn statuses(tc: &TestCluster) -> BTreeMap<String, String> {
    let mut all = BTreeMap::new();
    let mut after = String::new();
    loop {
        let page = tc
            .jobs()
            .await
            .list(pb::ListJobsRequest {
                cluster: "fault".into(),
                limit: 10_000,
                after: after.clone(),
                array: String::new(),
            })
            .await
            .expect("list")
            .into_inner();
        for job in page.jobs {
            all.insert(job.id, job.status);
        }
        if page.next_after.is_empty() {
            return all;
        }
        after = page.next_after;
    }
}

#[tokio::test]
async fn a_coordinator_killed_with_a_thousand_jobs_ends_each_exactly_once() {
    let mut tc = TestCluster::start().await;
    tc.create_cluster("fault", &["--min-nodes", "2", "--max-nodes", "2"]);
    tc.wait_cluster("fault", "two nodes up", LIMIT, |c| {
        c.node_state_counts.as_ref().is_some_and(|n| n.idle == 2)
    })
    .await;
    let ledger = tc.scratch("ledger");
    let ids = submit_many(&tc, 1000, || ledger_job(&ledger, "0")).await;
    support::eventually("a few hundred are done", LIMIT, || async {
        (entries(&ledger).len() >= 200).then_some(())
    })
    .await;
    tc.restart().await; // SIGKILL, then start again on the same data
    support::eventually("every job is done", Duration::from_secs(180), || async {
        let done = statuses(&tc).await;
        (done.len() == 1000 && done.values().all(|s| s == "completed")).then_some(())
    })
    .await;
    let seen = entries(&ledger);
    let twice: Vec<_> = seen.iter().filter(|(_, n)| **n != 1).collect();
    assert!(twice.is_empty(), "ran more than once: {twice:?}");
    assert_eq!(seen.len(), 1000);
    assert!(ids.iter().all(|id| seen.contains_key(id)));
}

#[tokio::test]
async fn a_killed_agent_is_lost_within_the_lease_and_its_work_completes_elsewhere() {
    let tc = TestCluster::start_with_config("lease_seconds: 3\njob_stop_grace_seconds: 1\n").await;
    tc.create_cluster(
        "fault",
        &["--max-nodes", "2", "--idle-seconds-before-scaledown", "60"],
    );
    // A machine of its own joins; the job lands on it.
    let created = tc.shoal_json(&["join-token", "create", "--cluster", "fault"]);
    let token = created["token"].as_str().expect("token").to_string();
    let work = tc.scratch("joined");
    let mut agent = Command::new(support::SHOAL)
        .args([
            "agent",
            "--endpoint",
            &tc.endpoint(),
            "--join-token",
            &token,
        ])
        .args(["--lease-seconds", "3", "--stop-grace-seconds", "1"])
        .arg("--work-dir")
        .arg(&work)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("agent");
    tc.wait_cluster("fault", "the joined node is idle", LIMIT, |c| {
        c.node_state_counts.as_ref().is_some_and(|n| n.idle == 1)
    })
    .await;
    let ledger = tc.scratch("ledger");
    let mut jobs = tc.jobs().await;
    let id = jobs
        .submit(ledger_job(&ledger, "4"))
        .await
        .expect("submit")
        .into_inner()
        .id;
    let job = tc
        .wait_job(&id, "running", LIMIT, |j| j.status == "running")
        .await;
    let joined = job.attempts[0].instances[0].node.clone();
    assert!(joined.contains("-j"), "on the joined node: {joined}");
    agent.kill().expect("SIGKILL the agent");
    let killed = Instant::now();
    let job = tc
        .wait_job(&id, "requeued", LIMIT, |j| j.attempts[0].status == "lost")
        .await;
    let lost_after = killed.elapsed();
    assert!(
        lost_after < Duration::from_secs(3 + 2),
        "lost within the lease (3 s) and a housekeeping tick: {lost_after:?} {job:#?}"
    );
    let job = tc.wait_status(&id, "completed", LIMIT).await;
    assert_eq!(job.attempts.len(), 2, "{job:#?}");
    assert_ne!(
        job.attempts[1].instances[0].node, joined,
        "completed elsewhere"
    );
    assert_eq!(entries(&ledger).get(&id), Some(&1));
    let _ = agent.wait();
}

/// A Docker Engine that takes connections and never answers.
fn hanging_engine(path: &Path) -> std::thread::JoinHandle<()> {
    let listener = std::os::unix::net::UnixListener::bind(path).expect("bind");
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming().flatten() {
            held.push(stream); // read nothing, answer nothing
        }
    })
}

#[tokio::test]
async fn a_provider_that_hangs_makes_the_node_unusable_with_the_error_and_jobs_say_why() {
    docker_ready();
    let mut tc = TestCluster::start_with_config("node_start_timeout_seconds: 20\n").await;
    tc.create_cluster("fault", &["--provider", "docker", "--max-nodes", "1"]);
    // The engine the coordinator talks to hangs from now on.
    let socket = tc.scratch("hanging-docker.sock");
    let _engine = hanging_engine(&socket);
    tc.set_env("DOCKER_HOST", &format!("unix://{}", socket.display()));
    tc.restart().await;
    let mut jobs = tc.jobs().await;
    let id = jobs
        .submit(pb::JobSpec {
            cluster: "fault".into(),
            command: "true".into(),
            ..Default::default()
        })
        .await
        .expect("submit")
        .into_inner()
        .id;
    let job = tc
        .wait_job(&id, "the job says why it waits", LIMIT, |j| {
            j.reason.contains("failed to start")
        })
        .await;
    assert!(job.reason.contains("did not answer"), "{}", job.reason);
    assert_eq!(job.status, "queued");
    let nodes = tc.shoal_json(&["node", "list", "--cluster", "fault"]);
    let unusable = nodes
        .as_array()
        .expect("nodes")
        .iter()
        .find(|n| n["state"] == "unusable")
        .unwrap_or_else(|| panic!("an unusable node: {nodes:#}"));
    assert!(
        unusable["message"]
            .as_str()
            .unwrap_or("")
            .contains("did not answer"),
        "{unusable:#}"
    );
    let cluster = tc.cluster("fault").await;
    assert!(
        cluster.errors.iter().any(|e| e.contains("new nodes wait")),
        "backoff: {:?}",
        cluster.errors
    );
    // Backoff: the next node is tried later, and a second failure doubles the wait.
    tc.wait_cluster("fault", "a second failure", LIMIT, |c| {
        c.errors
            .iter()
            .filter(|e| e.contains("new nodes wait"))
            .count()
            >= 2
    })
    .await;
    let why = tc.shoal(&["job", "why", &id]);
    let why = String::from_utf8_lossy(&why.stdout);
    assert!(why.contains("failed to start in a row"), "{why}");
    // The engine is back: the job runs.
    tc.remove_env("DOCKER_HOST");
    tc.restart().await;
    tc.wait_status(&id, "completed", Duration::from_secs(120))
        .await;
}

#[tokio::test]
async fn a_minute_of_killed_agents_loses_no_job_and_the_cluster_comes_back_whole() {
    let tc = TestCluster::start().await;
    tc.create_cluster("fault", &["--min-nodes", "3", "--max-nodes", "3"]);
    tc.wait_cluster("fault", "three nodes up", LIMIT, |c| {
        c.node_state_counts.as_ref().is_some_and(|n| n.idle == 3)
    })
    .await;
    let ledger = tc.scratch("ledger");
    let ids = submit_many(&tc, 240, || ledger_job(&ledger, "0.6")).await;
    // For a minute, now and then, an agent is SIGKILLed (the local provider
    // restarts it, or after five crashes gives the node up for a new one).
    let started = Instant::now();
    let mut kills = 0;
    let mut pick: u64 = 0x9e37_79b9_7f4a_7c15;
    while started.elapsed() < Duration::from_secs(60) {
        pick ^= pick << 13;
        pick ^= pick >> 7;
        pick ^= pick << 17;
        tokio::time::sleep(Duration::from_millis(1000 + pick % 1500)).await;
        let nodes = tc.shoal_json(&["node", "list", "--cluster", "fault"]);
        let live: Vec<String> = nodes
            .as_array()
            .expect("nodes")
            .iter()
            .filter(|n| matches!(n["state"].as_str(), Some("idle" | "running")))
            .filter_map(|n| n["id"].as_str().map(str::to_string))
            .collect();
        if live.is_empty() {
            continue;
        }
        let victim = &live[(pick % live.len() as u64) as usize];
        support::kill_matching(&tc.data_dir().join("nodes").join(victim));
        kills += 1;
    }
    assert!(kills >= 20, "chaos happened: {kills} kills");
    // Every job is accounted for: it ended, and a completed one ran to its end.
    let done = support::eventually("every job ends", Duration::from_secs(180), || async {
        let all = statuses(&tc).await;
        (all.len() == ids.len()
            && all
                .values()
                .all(|s| s != "queued" && s != "running" && s != "preparing"))
        .then_some(all)
    })
    .await;
    let seen = entries(&ledger);
    for id in &ids {
        assert_eq!(done.get(id).map(String::as_str), Some("completed"), "{id}");
        assert!(
            seen.contains_key(id),
            "{id} completed without running to its end"
        );
    }
    // Capacity back to the cluster's total: three usable nodes, idle.
    tc.wait_cluster(
        "fault",
        "the cluster is whole again",
        Duration::from_secs(120),
        |c| c.node_state_counts.as_ref().is_some_and(|n| n.idle == 3),
    )
    .await;
}

/// A coordinator that comes back at another address (a standby's, or its data
/// on another machine): an agent and the CLI given both endpoints follow it,
/// and the work running across the move completes once, in its first attempt.
#[tokio::test]
async fn an_agent_and_the_cli_given_several_endpoints_follow_the_coordinator_to_another_address() {
    let mut tc =
        TestCluster::start_with_config("lease_seconds: 10\njob_stop_grace_seconds: 1\n").await;
    let first = tc.endpoint();
    let second_port = support::free_port();
    let second = format!("127.0.0.1:{second_port}");
    // The job lands on the joined machine, idle when it comes.
    tc.create_cluster("ha", &["--max-nodes", "1"]);
    let created = tc.shoal_json(&["join-token", "create", "--cluster", "ha"]);
    let token = created["token"].as_str().expect("token").to_string();
    let mut agent = Command::new(support::SHOAL)
        .args(["agent", "--endpoint", &format!("{first},{second}")])
        .args(["--join-token", &token])
        .args(["--lease-seconds", "10", "--stop-grace-seconds", "1"])
        .arg("--work-dir")
        .arg(tc.scratch("ha-node"))
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("agent");
    tc.wait_cluster("ha", "the joined node is idle", LIMIT, |c| {
        c.node_state_counts.as_ref().is_some_and(|n| n.idle == 1)
    })
    .await;
    let config_dir = tc.config_dir();
    let cli = |endpoints: &str, args: &[&str]| {
        let out = Command::new(support::SHOAL)
            .args(args)
            .env("SHOAL_ENDPOINT", endpoints)
            .env("SHOAL_CONFIG_DIR", &config_dir)
            .env_remove("SHOAL_TOKEN")
            .output()
            .expect("shoal");
        assert!(
            out.status.success(),
            "shoal {args:?} at {endpoints}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    // Nothing answers at the first endpoint given: the CLI goes on to the next.
    let submitted = cli(
        &format!("{second},{first}"),
        &[
            "job",
            "submit",
            "--cluster",
            "ha",
            "-o",
            "json",
            "--",
            "sleep",
            "4",
        ],
    );
    let submitted: serde_json::Value = serde_json::from_str(&submitted).expect("json");
    let id = submitted["id"].as_str().expect("id").to_string();
    tc.wait_job(&id, "running", LIMIT, |j| j.status == "running")
        .await;
    tc.move_to(second_port).await;
    // The agent's session is lost at the first endpoint; it registers at the
    // second with the attempt it still runs, within the lease.
    let job = tc.wait_status(&id, "completed", LIMIT).await;
    assert_eq!(job.attempts.len(), 1, "ran once, across the move: {job:#?}");
    let shown = cli(
        &format!("{first},{second}"),
        &["job", "show", &id, "-o", "json"],
    );
    assert!(shown.contains("\"completed\""), "{shown}");
    let _ = agent.kill();
    let _ = agent.wait();
}
