//! Many jobs per node: instances that ask for a share of a node (cores, memory)
//! are packed onto it, never over, and their limits are enforced; on a real
//! coordinator and real agent processes.

mod support;

use std::time::Duration;

use support::{TestCluster, eventually};

const LIMIT: Duration = Duration::from_secs(60);

fn submit(tc: &TestCluster, args: &[&str]) -> String {
    let mut all = vec!["job", "submit"];
    all.extend_from_slice(args);
    let job = tc.shoal_json(&all);
    job["id"].as_str().expect("job id").to_string()
}

/// A one-node cluster of 4-core, 14 GiB nodes.
fn four_core_cluster(tc: &TestCluster) {
    tc.shoal_json(&[
        "cluster",
        "create",
        "--name",
        "pack",
        "--vm-size",
        "Standard_D3_v2",
        "--max-nodes",
        "1",
        "--idle-seconds-before-scaledown",
        "60",
    ]);
}

#[tokio::test]
async fn a_four_core_node_runs_four_one_cpu_jobs_at_once_and_a_fifth_waits() {
    let tc = TestCluster::start().await;
    four_core_cluster(&tc);
    let gate = tc.scratch("gate");
    // Each job holds its cpu until the gate file exists.
    let script = format!("while [ ! -e {} ]; do sleep 0.05; done", gate.display());
    let ids: Vec<String> = (0..5)
        .map(|_| {
            submit(
                &tc,
                &[
                    "--cluster",
                    "pack",
                    "--cpus",
                    "1",
                    "--",
                    "sh",
                    "-c",
                    &script,
                ],
            )
        })
        .collect();
    // Four run at once on the one node...
    let running = eventually("four jobs running", LIMIT, || async {
        let mut running = Vec::new();
        for id in &ids {
            if tc.job(id).await.status == "running" {
                running.push(id.clone());
            }
        }
        (running.len() == 4).then_some(running)
    })
    .await;
    assert_eq!(running, ids[..4].to_vec(), "the oldest four run");
    let node = tc.shoal_json(&["node", "list", "--cluster", "pack"]);
    let node = &node[0];
    assert_eq!(node["cores"], 4);
    let allocations = node["allocations"].as_array().expect("allocations");
    assert_eq!(allocations.len(), 4, "{node}");
    assert!(allocations.iter().all(|a| a["cpus"] == 1.0), "{node}");
    // ...and the fifth waits, and says why in the scheduler's words.
    let fifth = tc.job(&ids[4]).await;
    assert_eq!(fifth.status, "queued");
    let why = tc.shoal(&["job", "why", &ids[4]]);
    let why = String::from_utf8_lossy(&why.stdout);
    let node_id = node["id"].as_str().expect("node id");
    assert!(
        why.contains(&format!("needs 1 cpu; {node_id} is full")),
        "{why}"
    );
    let shown = tc.shoal(&["node", "show", node_id]);
    let shown = String::from_utf8_lossy(&shown.stdout);
    assert_eq!(shown.matches("running:").count(), 4, "{shown}");
    assert!(shown.contains(": 1 cpu"), "{shown}");
    // The gate opens: the four end, the fifth runs and ends too.
    std::fs::write(&gate, "").expect("gate");
    for id in &ids {
        tc.wait_status(id, "completed", LIMIT).await;
    }
    let first_end = {
        let mut ends = Vec::new();
        for id in &ids[..4] {
            ends.push(tc.job(id).await.ended_at_ms);
        }
        ends.into_iter().min().expect("ends")
    };
    let fifth = tc.job(&ids[4]).await;
    assert!(
        fifth.started_at_ms >= first_end,
        "the fifth started at {} before a cpu was freed at {first_end}",
        fifth.started_at_ms
    );
}

#[tokio::test]
async fn a_job_over_its_memory_is_killed_and_says_so_and_shares_come_from_yaml() {
    let tc = TestCluster::start().await;
    four_core_cluster(&tc);
    // From a job file: half a core and 256 MiB each.
    let file = tc.scratch("job.yml");
    std::fs::write(
        &file,
        "command: python3 -c 'x = bytearray(300 << 20); import time; time.sleep(20)'\n\
         compute: pack\n\
         resources: {cpus: 0.5, memory: 256m}\n",
    )
    .expect("job file");
    let id = submit(&tc, &["-f", file.to_str().expect("path")]);
    let job = tc.wait_status(&id, "failed", LIMIT).await;
    assert_eq!(job.millicpus, 500);
    assert_eq!(job.memory_bytes, 256 << 20);
    assert!(
        job.reason.contains("over its memory limit of 256 MiB"),
        "{}",
        job.reason
    );
    let shown = tc.shoal_json(&["job", "show", &id]);
    assert_eq!(shown["cpus"], 0.5);
    assert_eq!(shown["memory_bytes"], 256 << 20);
    // Within its limit, the same program completes.
    let fine = submit(
        &tc,
        &[
            "--cluster",
            "pack",
            "--memory",
            "256m",
            "--",
            "python3",
            "-c",
            "x = bytearray(32 << 20)",
        ],
    );
    let job = tc.wait_status(&fine, "completed", LIMIT).await;
    assert_eq!(job.millicpus, 1000, "memory alone asks for one core");
    // More than a node has is refused at once, saying what the nodes have.
    let refused = tc.shoal(&[
        "job",
        "submit",
        "--cluster",
        "pack",
        "--cpus",
        "8",
        "--",
        "true",
    ]);
    assert!(!refused.status.success());
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(
        said.contains("8 cpus per instance") && said.contains("Standard_D3_v2 with 4"),
        "{said}"
    );
}

/// The indices a ledger file holds, one line each, sorted.
fn ledger(path: &std::path::Path) -> Vec<u32> {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut indices: Vec<u32> = text
        .lines()
        .map(|l| l.trim().parse().expect("an index"))
        .collect();
    indices.sort_unstable();
    indices
}

#[tokio::test]
async fn an_array_of_1000_tasks_runs_each_index_exactly_once_and_is_listed_once() {
    let tc = TestCluster::start().await;
    four_core_cluster(&tc);
    let path = tc.scratch("ledger");
    let script = format!(
        "echo $SLURM_ARRAY_TASK_ID >> {}; echo task $SHOAL_ARRAY_INDEX",
        path.display()
    );
    let array = submit(
        &tc,
        &[
            "--cluster",
            "pack",
            "--cpus",
            "0.5",
            "--array",
            "0-999",
            "--",
            "sh",
            "-c",
            &script,
        ],
    );
    let job = tc
        .wait_job(&array, "completed", Duration::from_secs(180), |j| {
            j.status == "completed"
        })
        .await;
    let counts = &job.array.as_ref().expect("an array").counts;
    assert_eq!(counts.get("completed"), Some(&1000), "{counts:?}");
    assert_eq!(job.reason, "1000 of 1000 tasks completed");
    assert_eq!(ledger(&path), (0..1000).collect::<Vec<u32>>());
    // Short tasks on a cluster at max_nodes: the node was told tasks ahead
    // (each started once the one before it ended), and still each ran once.
    let booked = successors_booked(&tc).await;
    assert!(booked > 100, "{booked} tasks booked ahead");
    // Listed once; its tasks on asking, each with its index.
    let listed = tc.shoal_json(&["job", "list"]);
    let listed = listed.as_array().expect("a list");
    assert_eq!(listed.len(), 1, "the array, not its tasks");
    let tasks = tc.shoal_json(&["job", "list", "--array", &array, "--limit", "10000"]);
    assert_eq!(tasks.as_array().expect("tasks").len(), 1000);
    let logs = tc.shoal(&["job", "logs", &array, "--task", "7"]);
    assert!(logs.status.success(), "{logs:?}");
    assert_eq!(String::from_utf8_lossy(&logs.stdout).trim(), "task 7");
    let task = tc.shoal_json(&["job", "show", &array, "--task", "7"]);
    assert_eq!(task["status"], "completed");
    assert_eq!(task["task"]["index"], 7);
    assert_eq!(task["task"]["array_id"], array.as_str());
    let shown = tc.shoal_json(&["job", "show", &array]);
    assert_eq!(shown["array"]["tasks"], 1000);
    assert_eq!(shown["array"]["counts"]["completed"], 1000);
    let missing = tc.shoal(&["job", "show", &array, "--task", "1000"]);
    assert!(
        String::from_utf8_lossy(&missing.stderr).contains("has no task 1000 (its tasks: 0-999)"),
        "{missing:?}"
    );
    // `--wait` follows an array to its end, and fails when a task failed.
    let waited = tc.shoal(&[
        "job",
        "submit",
        "--cluster",
        "pack",
        "--cpus",
        "1",
        "--array",
        "1-3",
        "--wait",
        "--",
        "sh",
        "-c",
        "exit $(( SHOAL_ARRAY_INDEX == 2 ))",
    ]);
    assert!(!waited.status.success(), "{waited:?}");
    let said = String::from_utf8_lossy(&waited.stdout);
    assert!(said.contains("2 of 3 tasks completed, 1 failed"), "{said}");
    // Deleted, it goes with its tasks.
    let task_id = task["id"].as_str().expect("task id").to_string();
    tc.shoal_json(&["job", "delete", &array]);
    let tasks = tc.shoal_json(&["job", "list", "--array", &array, "--limit", "10000"]);
    assert_eq!(tasks.as_array().expect("tasks").len(), 0);
    let gone = tc.shoal(&["job", "show", &task_id]);
    assert!(!gone.status.success(), "{gone:?}");
}

#[tokio::test]
async fn one_task_or_the_whole_array_is_canceled() {
    let tc = TestCluster::start().await;
    four_core_cluster(&tc);
    let array = submit(
        &tc,
        &[
            "--cluster",
            "pack",
            "--cpus",
            "1",
            "--array",
            "0-9%2",
            "--",
            "sleep",
            "30",
        ],
    );
    // Two run; task 5 is held: canceled alone, it ends at once.
    eventually("two tasks running", LIMIT, || async {
        let job = tc.job(&array).await;
        (job.array.as_ref()?.counts.get("running") == Some(&2)).then_some(())
    })
    .await;
    let one = tc.shoal_json(&["job", "cancel", &array, "--task", "5"]);
    assert_eq!(one["status"], "canceled");
    let job = tc.job(&array).await;
    assert_eq!(
        job.array.as_ref().expect("array").counts.get("canceled"),
        Some(&1)
    );
    assert_eq!(job.status, "running");
    // The whole array: running tasks stop, the rest end, and so does the array.
    tc.shoal_json(&["job", "cancel", &array, "--wait"]);
    let job = tc.wait_status(&array, "canceled", LIMIT).await;
    assert_eq!(
        job.array.as_ref().expect("array").counts.get("canceled"),
        Some(&10)
    );
}

#[tokio::test]
async fn a_task_canceled_while_it_waits_in_a_chain_leaves_the_tasks_behind_it_to_run() {
    let tc = TestCluster::start().await;
    four_core_cluster(&tc);
    // The first 40 are quick, so the node is told many tasks ahead; from the
    // 40th on each waits at the gate, so chains stand still behind them.
    let (array, path, gate) = gated_array(&tc, 40);
    // Once the quick ones have completed nothing moves: four run at the gate.
    // The first task waiting in a chain (told ahead, not started): others wait
    // behind it.
    let waiting = eventually("tasks waiting in chains", LIMIT, || async {
        let tasks = tc.shoal_json(&["job", "list", "--array", &array, "--limit", "10000"]);
        let tasks = tasks.as_array()?;
        let completed = tasks.iter().filter(|t| t["status"] == "completed").count();
        let mut waiting: Vec<u64> = tasks
            .iter()
            .filter(|t| {
                t["reason"]
                    .as_str()
                    .is_some_and(|r| r.starts_with("next on"))
            })
            .filter_map(|t| t["task"]["index"].as_u64())
            .collect();
        waiting.sort_unstable();
        (completed == 40 && waiting.len() >= 8).then(|| waiting[0])
    })
    .await;
    // Ended on the agent without starting, so at once: nothing runs ahead of it.
    let task = waiting.to_string();
    let one = tc.shoal_json(&["job", "cancel", &array, "--task", &task, "--wait"]);
    assert_eq!(one["status"], "canceled", "{one}");
    assert_eq!(one["started_at"], serde_json::Value::Null, "{one}");
    std::fs::write(&gate, "").expect("open the gate");
    let job = tc
        .wait_job(&array, "completed", Duration::from_secs(180), |j| {
            j.status != "running" && j.status != "queued" && j.status != "preparing"
        })
        .await;
    let counts = &job.array.as_ref().expect("array").counts;
    assert_eq!(counts.get("completed"), Some(&199), "{counts:?}");
    assert_eq!(counts.get("canceled"), Some(&1), "{counts:?}");
    let expected: Vec<u32> = (0..200).filter(|&i| u64::from(i) != waiting).collect();
    assert_eq!(ledger(&path), expected);
}

#[tokio::test]
async fn a_coordinator_killed_mid_array_loses_and_repeats_nothing() {
    let mut tc = TestCluster::start().await;
    four_core_cluster(&tc);
    let (array, path, gate) = gated_array(&tc, 0);
    eventually("four tasks running", LIMIT, || async {
        let job = tc.job(&array).await;
        (job.array.as_ref()?.counts.get("running") == Some(&4)).then_some(())
    })
    .await;
    tc.kill9();
    tc.restart().await;
    std::fs::write(&gate, "").expect("open the gate");
    each_ran_once(&tc, &array, &path, 200, Duration::from_secs(180)).await;
}

/// The array completes, each of its `count` tasks once: its counts say so, and
/// the ledger holds each index once.
async fn each_ran_once(
    tc: &TestCluster,
    array: &str,
    path: &std::path::Path,
    count: u32,
    limit: Duration,
) {
    let job = tc
        .wait_job(array, "completed", limit, |j| j.status == "completed")
        .await;
    assert_eq!(
        job.array.as_ref().expect("array").counts.get("completed"),
        Some(&count)
    );
    assert_eq!(ledger(path), (0..count).collect::<Vec<u32>>());
}

/// An array of 200 one-cpu tasks on the one-node cluster: each writes its index
/// to the ledger once it may finish, tasks from `quick` on only once the gate
/// (a file) is there. Nothing is written twice unless a task runs twice.
fn gated_array(tc: &TestCluster, quick: u32) -> (String, std::path::PathBuf, std::path::PathBuf) {
    let path = tc.scratch("ledger");
    let gate = tc.scratch("gate");
    let script = format!(
        "if [ $SHOAL_ARRAY_INDEX -ge {quick} ]; then while [ ! -e {g} ]; do sleep 0.05; done; fi; echo $SHOAL_ARRAY_INDEX >> {l}",
        g = gate.display(),
        l = path.display()
    );
    let array = submit(
        tc,
        &[
            "--cluster",
            "pack",
            "--cpus",
            "1",
            "--array",
            "0-199",
            "--",
            "sh",
            "-c",
            &script,
        ],
    );
    (array, path, gate)
}

/// `shoal_successors_booked_total` from /metrics.
async fn successors_booked(tc: &TestCluster) -> u64 {
    let (_, metrics) = tc
        .http("GET", "/metrics", Some(&tc.admin_token()), "")
        .await;
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("shoal_successors_booked_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no successors counter in {metrics}"))
}

/// An array of `count` short tasks (each appends its index to the ledger it
/// returns) on the one-node cluster, once some have completed and the next
/// tasks are booked ahead of the running ones.
async fn told_ahead(tc: &TestCluster, count: u32) -> (String, std::path::PathBuf) {
    let path = tc.scratch("ledger");
    let script = format!("echo $SHOAL_ARRAY_INDEX >> {}", path.display());
    let range = format!("0-{}", count - 1);
    let array = submit(
        tc,
        &[
            "--cluster",
            "pack",
            "--cpus",
            "1",
            "--array",
            &range,
            "--",
            "sh",
            "-c",
            &script,
        ],
    );
    eventually("tasks booked ahead", LIMIT, || async {
        let completed = tc
            .job(&array)
            .await
            .array?
            .counts
            .get("completed")
            .copied()?;
        (completed >= 100 && successors_booked(tc).await > 0).then_some(())
    })
    .await;
    (array, path)
}

#[tokio::test]
async fn a_coordinator_killed_while_tasks_are_told_ahead_loses_and_repeats_nothing() {
    let mut tc = TestCluster::start().await;
    four_core_cluster(&tc);
    let (array, path) = told_ahead(&tc, 3000).await;
    // Killed mid-run: agents report what they ran, run and hold when it is back.
    tc.kill9();
    tc.restart().await;
    each_ran_once(&tc, &array, &path, 3000, Duration::from_secs(240)).await;
}

#[tokio::test]
async fn an_array_told_ahead_is_canceled_whole_with_nothing_left_running_or_held() {
    let tc = TestCluster::start().await;
    four_core_cluster(&tc);
    let (array, path) = told_ahead(&tc, 20_000).await;
    tc.shoal_json(&["job", "cancel", &array, "--wait"]);
    let job = tc.wait_status(&array, "canceled", LIMIT).await;
    let counts = &job.array.as_ref().expect("array").counts;
    let (completed, canceled) = (counts["completed"], counts["canceled"]);
    assert_eq!(completed + canceled, 20_000, "{counts:?}");
    // Nothing ran twice, and what completed wrote its line; the node holds
    // nothing more (no held successor, no running task).
    let ran = ledger(&path);
    let mut unique = ran.clone();
    unique.dedup();
    assert_eq!(ran, unique, "a task ran twice");
    assert!(
        ran.len() as u32 >= completed,
        "{} lines, {completed} completed",
        ran.len()
    );
    eventually("the node empty", LIMIT, || async {
        let nodes = tc.shoal_json(&["node", "list"]);
        let node = nodes.as_array()?.first()?.clone();
        node["allocations"].as_array()?.is_empty().then_some(())
    })
    .await;
}

#[tokio::test]
async fn single_jobs_alike_are_told_ahead_and_each_runs_once() {
    let tc = TestCluster::start().await;
    four_core_cluster(&tc);
    let path = tc.scratch("ledger");
    // The same work each time (a whole node, one at a time): once one has
    // completed quickly, the next are booked behind the running one.
    // 0.25 s each, several times a debug CLI's submit: the queue builds up.
    let script = format!("echo $SHOAL_JOB_ID >> {}; sleep 0.25", path.display());
    let ids: Vec<String> = (0..30)
        .map(|_| submit(&tc, &["--cluster", "pack", "--", "sh", "-c", &script]))
        .collect();
    for id in &ids {
        tc.wait_status(id, "completed", LIMIT).await;
    }
    let booked = successors_booked(&tc).await;
    assert!(booked > 0, "no single job was booked ahead");
    let text = std::fs::read_to_string(&path).expect("the ledger");
    let mut ran: Vec<&str> = text.lines().collect();
    ran.sort_unstable();
    let mut want: Vec<&str> = ids.iter().map(String::as_str).collect();
    want.sort_unstable();
    assert_eq!(ran, want, "each job ran once");
}

/// A node holds a start, and the end of an array task whose successor starts at
/// once, a moment to send them with what follows (`link.rs`, `WAIT_AT_MOST`):
/// that moment is bounded even when nothing follows for long. The last task
/// here starts behind a quick one and then runs for minutes; its start, and the
/// end before it, must show long before the next heartbeat (every 5 s) would
/// carry them.
#[tokio::test]
async fn the_end_of_a_task_before_a_long_successor_is_reported_at_once() {
    let tc = TestCluster::start().await;
    four_core_cluster(&tc);
    let started = tc.scratch("last-started");
    let script = format!(
        "if [ $SHOAL_ARRAY_INDEX = 59 ]; then touch {}; exec sleep 300; fi",
        started.display()
    );
    // One task at a time on the node: each follows the one before it.
    let array = submit(
        &tc,
        &[
            "--cluster",
            "pack",
            "--cpus",
            "4",
            "--array",
            "0-59",
            "--",
            "sh",
            "-c",
            &script,
        ],
    );
    eventually("the last task started", LIMIT, || async {
        started.exists().then_some(())
    })
    .await;
    let since = std::time::Instant::now();
    eventually("59 tasks completed and the last running", LIMIT, || async {
        let counts = tc.job(&array).await.array?.counts;
        (counts.get("completed") == Some(&59) && counts.get("running") == Some(&1)).then_some(())
    })
    .await;
    let took = since.elapsed();
    assert!(
        took < Duration::from_millis(1500),
        "the end before the last task was reported {took:?} after the last started"
    );
    assert!(successors_booked(&tc).await > 0, "tasks were told ahead");
    tc.shoal_json(&["job", "cancel", &array]);
}
