//! Parallel (batch inference) jobs end to end on real agents: every input line's
//! result exactly once, retries and thresholds, timeouts, and resume after the
//! coordinator or an agent is killed.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use support::{TestCluster, eventually};

/// `lines` input rows `i,<i>` and a job file around `command`.
fn job(
    tc: &TestCluster,
    lines: u32,
    batch: u32,
    instances: u32,
    extra: &str,
    command: &str,
) -> String {
    let rows: String = (0..lines).map(|i| format!("{i},{}\n", i * 2)).collect();
    std::fs::write(tc.scratch("rows.csv"), rows).expect("input");
    let yaml = format!(
        "type: parallel\n\
         compute: batch\n\
         inputs:\n  data: {{type: uri_file, path: ./rows.csv}}\n\
         mini_batch_size: {batch}\n\
         resources: {{instance_count: {instances}}}\n\
         max_concurrency_per_instance: 2\n\
         {extra}\n\
         task:\n  command: {command}\n\
         output: {{append_row_to: results.csv}}\n"
    );
    let path = tc.scratch("job.yaml");
    std::fs::write(&path, yaml).expect("job file");
    path.to_string_lossy().into_owned()
}

/// The downloaded output rows, by input id (counting repeats).
fn results(tc: &TestCluster, id: &str) -> BTreeMap<u32, u32> {
    let into = tc.scratch(&format!("download-{}", rand_suffix()));
    let out = tc.shoal(&["job", "download", id, "-p", into.to_str().expect("utf8")]);
    assert!(out.status.success(), "{out:?}");
    let text = std::fs::read_to_string(into.join(id).join("results.csv")).unwrap_or_default();
    let mut seen = BTreeMap::new();
    for line in text.lines() {
        let id: u32 = line
            .split(',')
            .next()
            .expect("id")
            .parse()
            .expect("numeric id");
        *seen.entry(id).or_insert(0) += 1;
    }
    seen
}

fn rand_suffix() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

/// Mini-batch id -> how many times the scorer ran it (it appends to `log`).
fn executions(log: &Path) -> BTreeMap<u32, u32> {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let mut runs = BTreeMap::new();
    for id in text.split_whitespace() {
        *runs.entry(id.parse().expect("id")).or_insert(0) += 1;
    }
    runs
}

fn show(tc: &TestCluster, id: &str) -> serde_json::Value {
    tc.shoal_json(&["job", "show", id])
}

#[tokio::test]
async fn ten_thousand_lines_on_three_nodes_give_each_result_exactly_once() {
    let tc = TestCluster::start().await;
    tc.create_cluster("batch", &["--max-nodes", "3"]);
    let file = job(
        &tc,
        10_000,
        100,
        3,
        "",
        r#"awk -F, '{print $1","$2+1}' "$SHOAL_MINI_BATCH""#,
    );
    let job = tc.shoal_json(&["job", "submit", "-f", &file, "--wait"]);
    let id = job["id"].as_str().expect("id").to_string();
    assert_eq!(job["status"], "completed", "{job:#}");
    let progress = &job["progress"];
    assert_eq!(progress["mini_batches"], 100, "{job:#}");
    assert_eq!(progress["done"], 100);
    assert_eq!(progress["failed"], 0);
    assert_eq!(progress["items_done"], 10_000);
    let seen = results(&tc, &id);
    assert_eq!(seen.len(), 10_000, "every line has a result");
    assert!(seen.values().all(|n| *n == 1), "no line twice");
    assert_eq!(
        seen.keys().copied().collect::<BTreeSet<u32>>(),
        (0..10_000).collect()
    );
    // Work was spread: every node's instance ended completed.
    let instances = job["instances"].as_array().expect("instances");
    assert_eq!(instances.len(), 3);
    // The HTTP API shows the same progress.
    let (_, body) = tc
        .http(
            "GET",
            &format!("/api/v1/jobs/{id}"),
            Some(&tc.admin_token()),
            "",
        )
        .await;
    assert!(body.contains("\"mini_batches\":100"), "{body}");
}

#[tokio::test]
async fn failing_mini_batches_are_retried_and_past_the_threshold_the_job_fails() {
    let tc = TestCluster::start().await;
    tc.create_cluster("batch", &["--max-nodes", "2"]);
    // Mini-batches 3 and 7 always fail; 5 fails on its first run only.
    let scorer = r#"sh -c 'case $SHOAL_MINI_BATCH_ID in 3|7) echo bad batch >&2; exit 4;; 5) [ $SHOAL_MINI_BATCH_RUN -gt 1 ] || exit 9;; esac; cat $SHOAL_MINI_BATCH'"#;
    let file = job(
        &tc,
        100,
        10,
        2,
        "retry_settings: {max_retries: 2}\nmini_batch_error_threshold: 1",
        scorer,
    );
    // A failed job: `submit --wait` exits non-zero, and prints the job.
    let out = tc.shoal(&["job", "submit", "-f", &file, "--wait", "-o", "json"]);
    assert!(!out.status.success());
    let failed: serde_json::Value = serde_json::from_slice(&out.stdout).expect("job json");
    assert_eq!(failed["status"], "failed", "{failed:#}");
    let reason = failed["reason"].as_str().expect("reason");
    assert!(reason.contains("mini_batch_error_threshold 1"), "{reason}");
    assert!(reason.contains("3 (3 runs: exit code 4)"), "{reason}");
    assert!(reason.contains("7 (3 runs: exit code 4)"), "{reason}");
    let logs = String::from_utf8_lossy(
        &tc.shoal(&["job", "logs", failed["id"].as_str().expect("id")])
            .stdout,
    )
    .into_owned();
    assert!(
        logs.contains("bad batch"),
        "the scorer's stderr is in the log:\n{logs}"
    );
    assert!(
        logs.contains("mini-batch 5 run 1"),
        "the retry is in the log:\n{logs}"
    );

    // Tolerated: the job completes and lists its failures; 5 succeeded on retry.
    let file = job(
        &tc,
        100,
        10,
        2,
        "retry_settings: {max_retries: 2}\nmini_batch_error_threshold: 5",
        scorer,
    );
    let done = tc.shoal_json(&["job", "submit", "-f", &file, "--wait"]);
    assert_eq!(done["status"], "completed", "{done:#}");
    let reason = done["reason"].as_str().expect("reason");
    assert!(
        reason.contains("8 of 10 mini-batches done; 2 failed"),
        "{reason}"
    );
    let progress = &done["progress"];
    assert_eq!(
        (progress["done"].as_u64(), progress["failed"].as_u64()),
        (Some(8), Some(2))
    );
    // 8 ok + 1 retry of 5 + 3 runs each of 3 and 7.
    assert_eq!(progress["executions"], 15, "{progress}");
    let seen = results(&tc, done["id"].as_str().expect("id"));
    assert_eq!(seen.len(), 80, "rows of the 8 done mini-batches");
    assert!(
        seen.keys()
            .all(|id| !(30..40).contains(id) && !(70..80).contains(id))
    );
}

#[tokio::test]
async fn a_hanging_mini_batch_is_timed_out_and_retried() {
    let tc = TestCluster::start().await;
    tc.create_cluster("batch", &["--max-nodes", "1"]);
    let scorer = r#"sh -c 'if [ $SHOAL_MINI_BATCH_ID = 2 ] && [ $SHOAL_MINI_BATCH_RUN = 1 ]; then sleep 60; fi; cat $SHOAL_MINI_BATCH'"#;
    let file = job(
        &tc,
        40,
        10,
        1,
        "retry_settings: {max_retries: 1, timeout: 2}",
        scorer,
    );
    let started = std::time::Instant::now();
    let job = tc.shoal_json(&["job", "submit", "-f", &file, "--wait"]);
    assert_eq!(job["status"], "completed", "{job:#}");
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "the hang was cut short"
    );
    assert_eq!(job["progress"]["executions"], 5, "{job:#}");
    let logs = String::from_utf8_lossy(
        &tc.shoal(&["job", "logs", job["id"].as_str().expect("id")])
            .stdout,
    )
    .into_owned();
    assert!(
        logs.contains("mini-batch 2 run 1") && logs.contains("timed out"),
        "{logs}"
    );
    assert_eq!(results(&tc, job["id"].as_str().expect("id")).len(), 40);
}

#[tokio::test]
async fn a_coordinator_killed_halfway_resumes_without_rerunning_or_duplicating() {
    let mut tc = TestCluster::start().await;
    tc.create_cluster("batch", &["--max-nodes", "2"]);
    let log = tc.scratch("executions.log");
    let scorer = format!(
        r#"sh -c 'echo $SHOAL_MINI_BATCH_ID >> {}; sleep 0.2; cat $SHOAL_MINI_BATCH'"#,
        log.display()
    );
    let file = job(&tc, 600, 10, 2, "", &scorer);
    let submitted = tc.shoal_json(&["job", "submit", "-f", &file]);
    let id = submitted["id"].as_str().expect("id").to_string();
    eventually(
        "a third of the mini-batches done",
        Duration::from_secs(60),
        || async {
            let job = show(&tc, &id);
            (job["progress"]["done"].as_u64().unwrap_or(0) >= 20).then_some(())
        },
    )
    .await;
    let done_before: BTreeSet<u32> = results(&tc, &id).keys().map(|row| row / 10).collect();
    tc.kill9();
    tc.restart().await;
    let job = tc
        .wait_job(
            &id,
            "the job ends after the restart",
            Duration::from_secs(120),
            |j| j.status == "completed" || j.status == "failed",
        )
        .await;
    assert_eq!(job.status, "completed", "{job:#?}");
    let seen = results(&tc, &id);
    assert_eq!(seen.len(), 600);
    assert!(seen.values().all(|n| *n == 1), "no duplicate rows");
    let runs = executions(&log);
    assert!(!done_before.is_empty());
    for batch in &done_before {
        assert_eq!(
            runs.get(batch),
            Some(&1),
            "mini-batch {batch} was done before the kill: run once"
        );
    }
    assert_eq!(runs.len(), 60, "every mini-batch ran");
}

#[tokio::test]
async fn an_agent_killed_mid_mini_batch_has_its_work_retried_without_duplicates() {
    let tc = TestCluster::start().await;
    tc.create_cluster("batch", &["--max-nodes", "2"]);
    let log = tc.scratch("executions.log");
    let scorer = format!(
        r#"sh -c 'echo $SHOAL_MINI_BATCH_ID >> {}; sleep 0.5; cat $SHOAL_MINI_BATCH'"#,
        log.display()
    );
    let file = job(&tc, 200, 10, 2, "", &scorer);
    let submitted = tc.shoal_json(&["job", "submit", "-f", &file]);
    let id = submitted["id"].as_str().expect("id").to_string();
    let victim = eventually(
        "mini-batches running on a node",
        Duration::from_secs(60),
        || async {
            let job = show(&tc, &id);
            let running = job["progress"]["running"].as_u64().unwrap_or(0);
            let node = job["instances"][1]["node"].as_str().map(str::to_string);
            (running >= 2).then_some(node).flatten()
        },
    )
    .await;
    // SIGKILL that node's agent (its mini-batches die with it), found by its work
    // dir: other tests' coordinators have nodes of the same names.
    support::kill_matching(&tc.data_dir().join("nodes").join(&victim));
    let job = tc
        .wait_job(&id, "the job ends", Duration::from_secs(120), |j| {
            j.status == "completed" || j.status == "failed"
        })
        .await;
    assert_eq!(job.status, "completed", "{job:#?}");
    let seen = results(&tc, &id);
    assert_eq!(seen.len(), 200);
    assert!(seen.values().all(|n| *n == 1), "no duplicate rows");
    let runs = executions(&log);
    assert_eq!(runs.len(), 20);
    assert!(
        runs.values().any(|n| *n > 1),
        "the killed node's mini-batches ran again: {runs:?}"
    );
}

#[tokio::test]
async fn bad_parallel_job_files_are_refused_with_the_reason() {
    let tc = TestCluster::start().await;
    tc.create_cluster("batch", &["--max-nodes", "1"]);
    std::fs::write(tc.scratch("empty.csv"), "").expect("empty");
    std::fs::write(tc.scratch("rows.csv"), "1\n2\n").expect("rows");
    let base = "type: parallel\ncompute: batch\ntask: {command: cat $SHOAL_MINI_BATCH}\n";
    let cases = [
        (
            "inputs: {data: {type: uri_file, path: ./missing.csv}}",
            "does not exist",
        ),
        (
            "inputs: {data: {type: uri_file, path: ./empty.csv}}",
            "no items",
        ),
        (
            "inputs: {data: {type: uri_file, path: ./rows.csv}}\nmini_batch_size: 0",
            "mini_batch_size",
        ),
        (
            "inputs: {data: {type: uri_file, path: ./rows.csv}}\nmini_batch_size: 12xb",
            "12xb",
        ),
        (
            "inputs: {data: {type: uri_file, path: ./rows.csv}}\noutput: append_everything",
            "append_everything",
        ),
        (
            "inputs: {data: {type: uri_table, path: ./rows.csv}}",
            "uri_table",
        ),
        ("", "needs an input"),
    ];
    for (index, (extra, expected)) in cases.iter().enumerate() {
        let path = tc.scratch(&format!("bad{index}.yaml"));
        std::fs::write(&path, format!("{base}{extra}\n")).expect("job file");
        let out = tc.shoal(&["job", "submit", "-f", path.to_str().expect("utf8")]);
        assert!(!out.status.success(), "{extra} was accepted");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(expected), "{extra}: {stderr}");
    }
}

/// A folder of CSV files scored by images/batch-score, once as a plain process and
/// once in the shoal/batch-score container: the same rows, each once.
#[tokio::test]
async fn the_example_scorer_runs_over_a_folder_as_a_process_and_in_a_container() {
    support::docker_ready();
    support::image_ready("batch-score");
    let tc = TestCluster::start().await;
    tc.create_cluster("batch", &["--max-nodes", "2"]);
    let folder = tc.scratch("to-score");
    std::fs::create_dir_all(&folder).expect("folder");
    for file in 0..3 {
        let rows: String = (0..5)
            .map(|r| {
                let id = file * 5 + r;
                format!("{id},0.{id},1.{r},-0.{file}\n")
            })
            .collect();
        std::fs::write(
            folder.join(format!("part-{file}.csv")),
            format!("id,x1,x2,x3\n{rows}"),
        )
        .expect("csv");
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../images/batch-score/score.sh");
    let mut outputs = Vec::new();
    for (name, task) in [
        ("process", format!("{{command: sh {}}}", script.display())),
        (
            "container",
            "{command: sh /app/score.sh, environment: {image: shoal/batch-score}}".to_string(),
        ),
    ] {
        let path = tc.scratch(&format!("{name}.yaml"));
        std::fs::write(
            &path,
            format!(
                "type: parallel\ncompute: batch\n\
                 inputs: {{data: {{type: uri_folder, path: ./to-score}}}}\n\
                 mini_batch_size: 2\nresources: {{instance_count: 2}}\n\
                 task: {task}\noutput: {{append_row_to: scores.csv}}\n"
            ),
        )
        .expect("job file");
        let job = tc.shoal_json(&[
            "job",
            "submit",
            "-f",
            path.to_str().expect("utf8"),
            "--wait",
        ]);
        let id = job["id"].as_str().expect("id").to_string();
        assert_eq!(job["status"], "completed", "{name}: {job:#}");
        assert_eq!(job["progress"]["mini_batches"], 2, "3 files by 2: {job:#}");
        let into = tc.scratch(&format!("out-{name}"));
        let out = tc.shoal(&["job", "download", &id, "-p", into.to_str().expect("utf8")]);
        assert!(out.status.success());
        let text = std::fs::read_to_string(into.join(&id).join("scores.csv")).expect("scores");
        let mut lines: Vec<String> = text.lines().map(str::to_string).collect();
        lines.sort();
        assert_eq!(lines.len(), 15, "{name}: {text}");
        assert!(
            lines.iter().all(|l| l
                .split(',')
                .nth(1)
                .is_some_and(|s| s.parse::<f64>().is_ok())),
            "{text}"
        );
        outputs.push(lines);
    }
    assert_eq!(
        outputs[0], outputs[1],
        "the process and the container score alike"
    );
}

/// Task mode `worker`: one long-lived process per worker slot is fed mini-batches on
/// its stdin; a worker that dies is replaced and its mini-batch retried.
#[tokio::test]
async fn worker_mode_feeds_long_lived_processes_and_replaces_a_dead_one() {
    let tc = TestCluster::start().await;
    tc.create_cluster("batch", &["--max-nodes", "2"]);
    let starts = tc.scratch("starts.log");
    let crashed = tc.scratch("crashed");
    let worker = format!(
        r#"sh -c 'echo $$ >> {starts}; while read b; do if grep -q "^500," $b && [ ! -e {crashed} ]; then touch {crashed}; exit 3; fi; cat $b; echo SHOAL_MINI_BATCH_DONE; done'"#,
        starts = starts.display(),
        crashed = crashed.display(),
    );
    let file = job(&tc, 1000, 10, 2, "", &worker);
    let yaml = std::fs::read_to_string(&file).expect("job file");
    std::fs::write(&file, yaml.replace("task:\n", "task:\n  mode: worker\n")).expect("job file");
    let job = tc.shoal_json(&["job", "submit", "-f", &file, "--wait"]);
    let id = job["id"].as_str().expect("id").to_string();
    assert_eq!(job["status"], "completed", "{job:#}");
    assert_eq!(job["progress"]["done"], 100);
    assert_eq!(job["progress"]["executions"], 101, "one retry: {job:#}");
    let seen = results(&tc, &id);
    assert_eq!(seen.len(), 1000);
    assert!(seen.values().all(|n| *n == 1), "no duplicate rows");
    let processes = std::fs::read_to_string(&starts)
        .expect("starts")
        .lines()
        .count();
    assert!(
        (4..=5).contains(&processes),
        "2 nodes x 2 workers, plus one replacement: {processes} processes for 101 runs"
    );
}
