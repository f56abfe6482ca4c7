//! Nodes made elsewhere: the `slurm` provider against a real Slurm (munged,
//! slurmctld and slurmd on this machine, started by `scripts/slurm-up.sh`), and
//! the `command` provider with scripts that start agents as Docker containers.
//! Without Slurm or Docker these tests fail, saying so (never skip).
mod support;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use shoal_proto::v1 as pb;
use support::{SHOAL, TestCluster, docker_ready, eventually};

const LIMIT: Duration = Duration::from_secs(90);

/// The coordinator's and agents' lease: long, so that a node that ends is found
/// by its provider (squeue, the list script) and not by its silence.
const CONFIG: &str = "lease_seconds: 60\njob_stop_grace_seconds: 1\n";

/// A running one-machine Slurm: its `SLURM_CONF`.
fn slurm_up() -> String {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/slurm-up.sh");
    let out = Command::new("bash")
        .arg(script)
        .stdin(Stdio::null())
        .output()
        .expect("run scripts/slurm-up.sh");
    assert!(
        out.status.success(),
        "this test needs Slurm (apt-get install slurm-wlm munge, or run the suite through .ci/run); scripts/slurm-up.sh said: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .find_map(|l| l.strip_prefix("export SLURM_CONF="))
        .expect("slurm-up.sh prints SLURM_CONF")
        .to_string()
}

/// A Slurm command's output (it must succeed).
fn slurm(conf: &str, program: &str, args: &[&str]) -> String {
    let out = Command::new(program)
        .args(args)
        .env("SLURM_CONF", conf)
        .output()
        .unwrap_or_else(|e| panic!("run {program}: {e}"));
    assert!(
        out.status.success(),
        "{program} {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Slurm's state of one of its jobs (`squeue -t all`).
fn slurm_state(conf: &str, job_id: &str) -> String {
    slurm(
        conf,
        "squeue",
        &["-h", "-t", "all", "-j", job_id, "-o", "%T"],
    )
    .trim()
    .to_string()
}

/// Slurm jobs this coordinator made (named `shoal-NODE`, commented with its id)
/// that have not ended.
fn live_allocations(conf: &str, tc: &TestCluster) -> Vec<String> {
    let owner = std::fs::read_to_string(tc.data_dir().join("owner-id")).expect("owner id");
    let comment = format!("shoal:{}", owner.trim());
    slurm(conf, "squeue", &["-h", "-o", "%i|%j|%k|%T"])
        .lines()
        .filter(|l| l.split('|').nth(2) == Some(comment.as_str()))
        .map(str::to_string)
        .collect()
}

async fn node(tc: &TestCluster, id: &str) -> Option<pb::Node> {
    tc.nodes()
        .await
        .list(pb::ListNodesRequest {
            cluster: String::new(),
        })
        .await
        .expect("list nodes")
        .into_inner()
        .nodes
        .into_iter()
        .find(|n| n.id == id)
}

fn submit(tc: &TestCluster, cluster: &str, script: &str) -> String {
    let job = tc.shoal_json(&[
        "job",
        "submit",
        "--cluster",
        cluster,
        "--",
        "sh",
        "-c",
        script,
    ]);
    job["id"].as_str().expect("job id").to_string()
}

/// The node of a running job's first instance, once it runs.
async fn running_on(tc: &TestCluster, job: &str) -> pb::Node {
    let running = tc
        .wait_job(job, "running", LIMIT, |j| j.status == "running")
        .await;
    let id = running.attempts.last().expect("an attempt").instances[0]
        .node
        .clone();
    node(tc, &id).await.expect("its node is listed")
}

/// The slurm provider end to end: a job runs on an allocation; a second
/// allocation waits on Slurm's reason; an allocation canceled from outside, and
/// one Slurm preempts for a higher partition, and one whose agent dies after a
/// coordinator restart have their work rerun; idle allocations are given back
/// with scancel.
#[tokio::test]
async fn a_slurm_cluster_runs_work_on_allocations_and_gives_them_back() {
    let conf = slurm_up();
    let mut tc = TestCluster::start_full(CONFIG, &[("SLURM_CONF", &conf)]).await;
    // Agents work under the data dir: the test's clean-up finds them there.
    let work = tc.data_dir().join("slurm");
    std::fs::create_dir_all(&work).expect("work dir");
    let work_setting = format!("work_dir={}", work.display());
    // Standard_D2_v2: 2 cores, as many as CI's machine has, so one allocation
    // holds the whole Slurm node and a second one waits.
    tc.create_cluster(
        "hpc",
        &[
            "--max-nodes",
            "2",
            "--idle-seconds-before-scaledown",
            "3",
            "--provider",
            "slurm",
            "--provider-setting",
            "partition=debug",
            "--provider-setting",
            &work_setting,
        ],
    );
    let shown = tc.shoal_json(&["cluster", "show", "hpc"]);
    assert_eq!(shown["provider"], "slurm", "{shown:#}");
    assert_eq!(
        shown["provider_settings"]["partition"], "debug",
        "{shown:#}"
    );

    // 1. A job runs on an allocation: its node is a running Slurm job.
    let marker = tc.scratch("first-ran");
    let first = submit(
        &tc,
        "hpc",
        &format!("sleep 4; echo $SLURM_JOB_ID > {}", marker.display()),
    );
    let on = running_on(&tc, &first).await;
    let allocation = on.provider_id.clone();
    assert!(
        !allocation.is_empty() && allocation.chars().all(|c| c.is_ascii_digit()),
        "a slurm node's provider id is its Slurm job id: {on:#?}"
    );
    assert_eq!(slurm_state(&conf, &allocation), "RUNNING");
    let name = slurm(
        &conf,
        "squeue",
        &["-h", "-j", &allocation, "-o", "%j|%P|%C"],
    );
    assert_eq!(
        name.trim(),
        format!("shoal-{}|debug|2", on.id),
        "named for its node, in the partition asked for, with the size's cores"
    );

    // 2. A second job needs a second node: its allocation waits for the first
    // one's cores, and the node says why (Slurm's reason).
    let second = submit(&tc, "hpc", "true");
    let waiting = eventually(
        "a second node shows its allocation's pending reason",
        LIMIT,
        || async {
            let nodes = tc
                .nodes()
                .await
                .list(pb::ListNodesRequest {
                    cluster: "hpc".into(),
                })
                .await
                .ok()?
                .into_inner()
                .nodes;
            nodes
                .into_iter()
                .find(|n| n.state == "preparing" && n.message.contains("pending: Resources"))
        },
    )
    .await;
    assert_eq!(slurm_state(&conf, &waiting.provider_id), "PENDING");
    let job = tc.wait_status(&first, "completed", LIMIT).await;
    assert_eq!(job.attempts.len(), 1, "{job:#?}");
    let ran_in = std::fs::read_to_string(&marker).expect("the first job wrote its marker");
    assert_eq!(
        ran_in.trim(),
        allocation,
        "the job ran inside the allocation"
    );
    tc.wait_status(&second, "completed", LIMIT).await;

    // 3. An allocation canceled from outside Shoal (a time limit, an admin's
    // scancel): its node is unusable and its work runs again on a new one.
    let third = submit(&tc, "hpc", "sleep 3");
    let on = running_on(&tc, &third).await;
    let canceled_at = Instant::now();
    slurm(&conf, "scancel", &[&on.provider_id]);
    let job = tc
        .wait_job(
            &third,
            "the canceled allocation's attempt is lost",
            LIMIT,
            |j| j.attempts[0].status == "lost",
        )
        .await;
    assert!(
        canceled_at.elapsed() < Duration::from_secs(20),
        "found by squeue, not by the 60 s lease: {:?}",
        canceled_at.elapsed()
    );
    // Slurm's SIGTERM reaches the agent first: it says it is leaving and stops
    // its work (else squeue's CANCELLED ends the node).
    assert!(
        job.attempts[0].reason.contains("the agent is stopping")
            || job.attempts[0].reason.contains("CANCELLED"),
        "the reason says the node ended: {job:#?}"
    );
    let job = tc.wait_status(&third, "completed", LIMIT).await;
    assert_eq!(job.attempts.len(), 2, "{job:#?}");
    assert_ne!(job.attempts[1].instances[0].node, on.id, "on a new node");

    // 4. Slurm preempts the allocation for a job in a higher-tier partition:
    // the attempt is preempted (not failed) and the job completes afterwards.
    let fourth = submit(&tc, "hpc", "sleep 5");
    let on = running_on(&tc, &fourth).await;
    let urgent = slurm(
        &conf,
        "sbatch",
        &[
            "--parsable",
            "--partition=urgent",
            "--cpus-per-task=2",
            "--mem=100M",
            "--output=/dev/null",
            "--wrap",
            "sleep 60",
        ],
    );
    let urgent = urgent.trim().to_string();
    // The agent gets Slurm's SIGTERM and stops the work (lost); had it died
    // first, squeue's PREEMPTED would requeue it as preempted.
    let job = tc
        .wait_job(
            &fourth,
            "the attempt ends with its allocation",
            LIMIT,
            |j| matches!(j.attempts[0].status.as_str(), "lost" | "preempted"),
        )
        .await;
    assert_eq!(job.attempts[0].instances[0].node, on.id, "{job:#?}");
    eventually("Slurm says it preempted the allocation", LIMIT, || async {
        (slurm_state(&conf, &on.provider_id) == "PREEMPTED").then_some(())
    })
    .await;
    // The urgent work is done; Shoal's next allocation gets the machine back.
    slurm(&conf, "scancel", &[&urgent]);
    let job = tc.wait_status(&fourth, "completed", LIMIT).await;
    assert_eq!(job.attempts.len(), 2, "{job:#?}");

    // 5. A restarted coordinator watches its allocations again: an agent that
    // dies without a word (SIGKILL) ends its allocation, and squeue says so
    // long before the 60 s lease would.
    let fifth = submit(&tc, "hpc", "sleep 4");
    let on = running_on(&tc, &fifth).await;
    tc.restart().await;
    let agent = format!("{}/shoal-{} ", work.display(), on.id);
    let killed = Command::new("pkill")
        .args(["-KILL", "-f", &agent])
        .status()
        .expect("pkill");
    assert!(killed.success(), "the agent of {} runs", on.id);
    let killed_at = Instant::now();
    let job = tc
        .wait_job(&fifth, "the dead agent's attempt is lost", LIMIT, |j| {
            j.attempts[0].status == "lost"
        })
        .await;
    assert!(
        killed_at.elapsed() < Duration::from_secs(20),
        "found by squeue after the restart, not by the 60 s lease: {:?} {job:#?}",
        killed_at.elapsed()
    );
    assert!(
        job.attempts[0].reason.contains("Slurm allocation"),
        "{job:#?}"
    );
    let job = tc.wait_status(&fifth, "completed", LIMIT).await;
    assert_eq!(job.attempts.len(), 2, "{job:#?}");

    // 6. Idle, the cluster gives every allocation back.
    tc.wait_cluster("hpc", "no nodes left", LIMIT, |c| {
        c.node_state_counts
            .as_ref()
            .is_none_or(|n| n.idle + n.running + n.preparing + n.leaving + n.preempted == 0)
    })
    .await;
    eventually("no allocation of ours left in Slurm", LIMIT, || async {
        live_allocations(&conf, &tc).is_empty().then_some(())
    })
    .await;
}

/// Scripts of the command provider's test: nodes are containers of shoal/node
/// on the host network, running the binary under test, labeled with the test.
fn command_scripts(dir: &Path, label: &str) -> (PathBuf, PathBuf, PathBuf) {
    std::fs::create_dir_all(dir).expect("scripts dir");
    let create = format!(
        r#"#!/usr/bin/env python3
# Makes a node: a container running `shoal agent`; prints its name.
import json, subprocess, sys
node = json.load(sys.stdin)
name = "shoal-cmd-" + node["node_id"]
subprocess.run(
    ["docker", "run", "-d", "--name", name, "--label", "{label}",
     "--network", "host", "-v", "{shoal}:{shoal}:ro",
     "-e", "SHOAL_JOIN_TOKEN=" + node["join_token"],
     "shoal/node", "{shoal}", "agent", "--endpoint", node["endpoint"],
     "--work-dir", "/tmp/shoal-node"],
    check=True, stdout=subprocess.DEVNULL)
print(name)
"#,
        shoal = SHOAL,
    );
    let delete = r#"#!/usr/bin/env python3
import json, subprocess, sys
node = json.load(sys.stdin)
subprocess.run(["docker", "rm", "-f", node["address"]], check=True, stdout=subprocess.DEVNULL)
"#;
    let list =
        format!("#!/bin/sh\nexec docker ps --filter label={label} --format '{{{{.Names}}}}'\n");
    let write = |name: &str, text: &str| {
        let path = dir.join(name);
        std::fs::write(&path, text).expect("write script");
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        path
    };
    (
        write("create.py", &create),
        write("delete.py", delete),
        write("list.sh", &list),
    )
}

fn containers(label: &str) -> Vec<String> {
    let out = Command::new("docker")
        .args(["ps", "-a", "--filter", &format!("label={label}")])
        .args(["--format", "{{.Names}}"])
        .output()
        .expect("docker ps");
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

/// Removes the test's containers however it ends.
struct Containers(String);

impl Drop for Containers {
    fn drop(&mut self) {
        for name in containers(&self.0) {
            let _ = Command::new("docker").args(["rm", "-f", &name]).output();
        }
    }
}

/// The command provider end to end: the create script's containers join with
/// their one-use tokens and run the work; a node the list script stops listing
/// is lost and its work reruns on a new one; idle nodes are deleted.
#[tokio::test]
async fn a_command_cluster_makes_lists_and_deletes_nodes_with_the_users_scripts() {
    docker_ready();
    let tc = TestCluster::start_with_config(CONFIG).await;
    let label = format!(
        "shoal-test.command={}",
        tc.dir.path().file_name().unwrap().to_string_lossy()
    );
    let _clean_up = Containers(label.clone());
    let (create, delete, list) = command_scripts(&tc.scratch("scripts"), &label);
    let setting = |key: &str, path: &Path| format!("{key}={}", path.display());
    tc.create_cluster(
        "vms",
        &[
            "--max-nodes",
            "2",
            "--idle-seconds-before-scaledown",
            "3",
            "--provider",
            "command",
            "--provider-setting",
            &setting("create", &create),
            "--provider-setting",
            &setting("delete", &delete),
            "--provider-setting",
            &setting("list", &list),
        ],
    );

    // 1. The work runs in the container the create script made.
    let first = submit(&tc, "vms", "test -f /.dockerenv && sleep 2");
    let on = running_on(&tc, &first).await;
    assert_eq!(on.provider_id, format!("shoal-cmd-{}", on.id), "{on:#?}");
    assert!(containers(&label).contains(&on.provider_id));
    let job = tc.wait_status(&first, "completed", LIMIT).await;
    assert_eq!(job.attempts.len(), 1, "ran once, in a container: {job:#?}");

    // 2. A node that vanishes (its container removed behind Shoal's back) drops
    // out of the list: its work reruns on a new node.
    let second = submit(&tc, "vms", "sleep 3");
    let on = running_on(&tc, &second).await;
    let removed_at = Instant::now();
    let out = Command::new("docker")
        .args(["rm", "-f", &on.provider_id])
        .output()
        .expect("docker rm");
    assert!(out.status.success());
    let job = tc
        .wait_job(&second, "the vanished node's attempt is lost", LIMIT, |j| {
            j.attempts[0].status == "lost"
        })
        .await;
    assert!(
        removed_at.elapsed() < Duration::from_secs(30),
        "found by the list script, not the 60 s lease: {:?}",
        removed_at.elapsed()
    );
    assert!(
        job.attempts[0].reason.contains("no longer lists it"),
        "{job:#?}"
    );
    let job = tc.wait_status(&second, "completed", LIMIT).await;
    assert_eq!(job.attempts.len(), 2, "{job:#?}");

    // 3. Idle, its nodes are deleted by the delete script.
    tc.wait_cluster("vms", "no nodes left", LIMIT, |c| {
        c.node_state_counts
            .as_ref()
            .is_none_or(|n| n.idle + n.running + n.preparing + n.leaving + n.preempted == 0)
    })
    .await;
    eventually("every container deleted", LIMIT, || async {
        containers(&label).is_empty().then_some(())
    })
    .await;
}
