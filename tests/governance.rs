//! Low-priority nodes and preemption, quotas, locks and "why is my job not running?",
//! end to end on real agents.

mod support;

use std::time::{Duration, Instant};

use support::TestCluster;

const LIMIT: Duration = Duration::from_secs(60);

fn submit(tc: &TestCluster, args: &[&str]) -> String {
    let mut all = vec!["job", "submit"];
    all.extend_from_slice(args);
    tc.shoal_json(&all)["id"]
        .as_str()
        .expect("job id")
        .to_string()
}

/// A job that counts to 40 in steps of 0.1 s, checkpointing to its outputs, and
/// resumes from the checkpoint when one is there.
const CHECKPOINTING: &str = "trap 'echo got SIGTERM; exit 143' TERM; \
    n=$(cat outputs/ckpt 2>/dev/null || echo 0); echo attempt $SHOAL_ATTEMPT resumed from $n notice $SHOAL_PREEMPTION_DEADLINE; \
    while [ $n -lt 40 ]; do n=$((n+1)); echo $n > outputs/ckpt; sleep 0.1; done; echo finished at $n";

#[tokio::test]
async fn a_preempted_job_gets_sigterm_and_resumes_from_its_checkpoint_elsewhere() {
    let tc =
        TestCluster::start_with_config("preemption_notice_seconds: 5\njob_stop_grace_seconds: 1\n")
            .await;
    tc.create_cluster(
        "lp",
        &[
            "--tier",
            "lowpriority",
            "--max-nodes",
            "2",
            "--idle-seconds-before-scaledown",
            "60",
        ],
    );
    let id = submit(&tc, &["--cluster", "lp", "--", "sh", "-c", CHECKPOINTING]);
    let job = tc
        .wait_job(&id, "running", LIMIT, |j| j.status == "running")
        .await;
    let node = job.attempts[0].instances[0].node.clone();
    let ckpt = tc
        .data_dir()
        .join("nodes")
        .join(&node)
        .join("attempts")
        .join(format!("{}-0/outputs/ckpt", job.attempts[0].id));
    support::eventually("a few checkpoints", LIMIT, || async {
        let n: u32 = std::fs::read_to_string(&ckpt).ok()?.trim().parse().ok()?;
        (n >= 5).then_some(())
    })
    .await;

    let preempted = tc.shoal_json(&["node", "preempt", &node, "--notice", "2"]);
    assert_eq!(preempted["state"], "preempted", "{preempted:#}");
    let job = tc.wait_status(&id, "completed", LIMIT).await;
    assert_eq!(job.attempts.len(), 2, "{job:#?}");
    assert_eq!(job.attempts[0].status, "preempted");
    assert_eq!(job.attempts[0].instances[0].status, "preempted");
    assert_eq!(job.preemptions, 1);
    assert_ne!(
        job.attempts[1].instances[0].node, node,
        "the preempted node is gone"
    );
    let logs = String::from_utf8_lossy(&tc.shoal(&["job", "logs", &id]).stdout).into_owned();
    assert!(logs.contains("got SIGTERM"), "{logs}");
    assert!(logs.contains("attempt 1 resumed from 0 notice 5"), "{logs}");
    let resumed: u32 = logs
        .lines()
        .find_map(|l| l.strip_prefix("attempt 2 resumed from "))
        .and_then(|rest| rest.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("attempt 2 did not say where it resumed: {logs}"));
    assert!(resumed >= 5, "attempt 2 started over: {logs}");
    assert!(logs.contains("finished at 40"), "{logs}");
    let nodes = tc.shoal_json(&["node", "list"]);
    assert!(
        nodes
            .as_array()
            .expect("nodes")
            .iter()
            .all(|n| n["id"] != node.as_str()),
        "{nodes:#}"
    );

    let dedicated = tc.shoal(&[
        "cluster",
        "create",
        "--name",
        "ded",
        "--vm-size",
        "Standard_D2_v2",
        "--min-nodes",
        "1",
    ]);
    assert!(dedicated.status.success());
    let ded = tc
        .wait_cluster("ded", "a node", LIMIT, |c| {
            c.current_node_count == 1 && c.allocation_state == "steady"
        })
        .await;
    let ded_node = format!("{}-n", ded.name);
    let listed = tc.shoal_json(&["node", "list", "--cluster", "ded"]);
    let ded_id = listed[0]["id"].as_str().expect("id");
    assert!(ded_id.starts_with(&ded_node));
    let refused = tc.shoal(&["node", "preempt", ded_id]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("dedicated"));
}

#[tokio::test]
async fn chaos_on_a_low_priority_cluster_loses_no_job() {
    let config =
        "chaos_preempt_every_seconds: 1\npreemption_notice_seconds: 1\njob_stop_grace_seconds: 1\n";
    let tc = TestCluster::start_with_config(config).await;
    tc.create_cluster(
        "lp",
        &[
            "--tier",
            "lowpriority",
            "--max-nodes",
            "3",
            "--idle-seconds-before-scaledown",
            "60",
        ],
    );
    let ids: Vec<String> = (0..20)
        // The bound on preemptions has its own test: here no job may be lost to it.
        .map(|_| {
            submit(
                &tc,
                &[
                    "--cluster",
                    "lp",
                    "--max-preemptions",
                    "100",
                    "--",
                    "sleep",
                    "1.5",
                ],
            )
        })
        .collect();
    let mut preemptions = 0;
    for id in &ids {
        let job = tc
            .wait_job(id, "completed", Duration::from_secs(120), |j| {
                j.status == "completed" || j.status == "failed"
            })
            .await;
        assert_eq!(job.status, "completed", "{job:#?}");
        let lost = job.attempts.iter().filter(|a| a.status == "lost").count() as u32;
        assert_eq!(
            job.attempts.len() as u32,
            job.preemptions + lost + 1,
            "{job:#?}"
        );
        assert_eq!(
            job.attempts
                .iter()
                .filter(|a| a.status == "preempted")
                .count() as u32,
            job.preemptions
        );
        preemptions += job.preemptions;
    }
    assert!(
        preemptions > 0,
        "chaos preempted no running job in the whole run"
    );
}

#[tokio::test]
async fn a_quota_stops_the_third_node_until_it_is_raised() {
    let config = "quotas:\n  family_cores: {standardDv2Family: 8}\n";
    let tc = TestCluster::start_with_config(config).await;
    // Standard_D3_v2: 4 cores, family standardDv2Family.
    tc.shoal_json(&[
        "cluster",
        "create",
        "--name",
        "qt",
        "--vm-size",
        "Standard_D3_v2",
        "--max-nodes",
        "3",
    ]);
    let id = submit(
        &tc,
        &["--cluster", "qt", "--instance-count", "3", "--", "true"],
    );
    let job = tc
        .wait_job(&id, "a quota reason", LIMIT, |j| j.reason.contains("quota"))
        .await;
    assert_eq!(
        job.reason,
        "quota: family standardDv2Family 8/8 cores used; a node needs 4"
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    let cluster = tc.cluster("qt").await;
    assert_eq!(
        cluster.current_node_count, 2,
        "a third node was never created"
    );
    assert!(
        cluster.errors.iter().any(|e| e.contains("quota")),
        "{:?}",
        cluster.errors
    );
    let why = String::from_utf8_lossy(&tc.shoal(&["job", "why", &id]).stdout).into_owned();
    assert!(
        why.contains("quota family standardDv2Family: 8/8 cores used"),
        "{why}"
    );
    assert!(
        why.contains("needs 3 free node(s) at once (a gang of 3)"),
        "{why}"
    );
    let quotas = tc.shoal_json(&["quota", "show"]);
    let family = quotas
        .as_array()
        .expect("lines")
        .iter()
        .find(|l| l["scope"] == "family standardDv2Family")
        .expect("the family line")
        .clone();
    assert_eq!(
        (
            family["limit"].as_u64(),
            family["used"].as_u64(),
            family["available"].as_u64()
        ),
        (Some(8), Some(8), Some(0))
    );

    tc.shoal_json(&[
        "quota",
        "set",
        "--family",
        "standardDv2Family",
        "--cores",
        "12",
    ]);
    let job = tc.wait_status(&id, "completed", LIMIT).await;
    assert_eq!(job.attempts[0].instances.len(), 3);
    let refused = tc.shoal(&["quota", "set", "--cores", "3"]);
    assert!(!refused.status.success(), "--cores needs --family");
}

#[tokio::test]
async fn locks_block_scaling_updates_and_deletion_and_say_why() {
    let tc = TestCluster::start().await;
    tc.create_cluster("lk", &["--max-nodes", "2"]);
    tc.shoal_json(&["cluster", "lock", "lk", "--kind", "read-only"]);
    let id = submit(&tc, &["--cluster", "lk", "--", "true"]);
    let job = tc
        .wait_job(&id, "a lock reason", LIMIT, |j| j.reason.contains("locked"))
        .await;
    assert!(
        job.reason.starts_with("cluster locked read-only"),
        "{}",
        job.reason
    );
    let started = Instant::now();
    while started.elapsed() < Duration::from_millis(1500) {
        assert_eq!(
            tc.cluster("lk").await.current_node_count,
            0,
            "a read-only cluster scaled"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let cluster = tc.shoal_json(&["cluster", "show", "lk"]);
    assert_eq!(cluster["lock"], "read-only");
    assert!(
        cluster["errors"]
            .to_string()
            .contains("scale-up blocked: cluster locked read-only"),
        "{cluster:#}"
    );
    for args in [
        vec!["cluster", "update", "lk", "--max-nodes", "3"],
        vec!["cluster", "delete", "lk"],
    ] {
        let out = tc.shoal(&args);
        assert!(!out.status.success(), "{args:?} on a read-only cluster");
        assert!(
            String::from_utf8_lossy(&out.stderr).contains("locked read-only"),
            "{args:?}"
        );
    }
    let why = String::from_utf8_lossy(&tc.shoal(&["job", "why", &id]).stdout).into_owned();
    assert!(
        why.contains("lock: read-only") && why.contains("autoscaler: blocked"),
        "{why}"
    );

    tc.shoal_json(&["cluster", "unlock", "lk"]);
    tc.wait_status(&id, "completed", LIMIT).await;
    let cluster = tc.shoal_json(&["cluster", "show", "lk"]);
    assert!(
        !cluster["errors"].to_string().contains("locked"),
        "{cluster:#}"
    );

    tc.shoal_json(&["cluster", "lock", "lk", "--kind", "cannot-delete"]);
    tc.shoal_json(&["cluster", "update", "lk", "--max-nodes", "3"]);
    let out = tc.shoal(&["cluster", "delete", "lk"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("locked cannot-delete"));
    let bad = tc.shoal(&["cluster", "lock", "lk", "--kind", "forever"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("kind"));
}
