//! The fault suite: partitions, crashes and hangs of real coordinators, agents and
//! engines, each bounded in time. What must hold: no job is lost, none runs twice
//! at once, every job ends exactly once, and the cluster comes back whole.
mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

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
}

impl Cut {
    fn new(tc: &TestCluster, cluster: &str, node: &str) -> Self {
        let owner = owner(tc);
        let cut = Cut {
            network: format!("shoal-{owner}-{cluster}"),
            container: format!("shoal-{owner}-node-{node}"),
        };
        docker(&["network", "disconnect", &cut.network, &cut.container]);
        cut
    }

    fn heal(self) {
        docker(&[
            "network",
            "connect",
            "--alias",
            "healed",
            &self.network,
            &self.container,
        ]);
    }
}

#[tokio::test]
async fn a_node_cut_off_stops_its_work_before_it_is_rerun_and_nothing_runs_twice() {
    if !docker_ready() {
        return;
    }
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

    // Shorter than the lease: the node is back before anything happens to it.
    let id = ticking_job(&tc, "fence", 8);
    let job = tc
        .wait_job(&id, "running", LIMIT, |j| j.status == "running")
        .await;
    let node = job.attempts[0].instances[0].node.clone();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let cut = Cut::new(&tc, "fence", &node);
    tokio::time::sleep(Duration::from_secs(2)).await;
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
    // Back on its network, the node rejoins and is idle again.
    support::eventually("the cut node is back, idle", LIMIT, || async {
        let nodes = tc.shoal_json(&["node", "list", "--cluster", "fence"]);
        let state = nodes
            .as_array()?
            .iter()
            .find(|n| n["id"] == cut_node.as_str())?["state"]
            .as_str()?
            .to_string();
        (state == "idle").then_some(())
    })
    .await;
}
