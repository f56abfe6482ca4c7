//! Sweep jobs, end to end: the service's sweepJob file, trials that log with the
//! real `mlflow` client, the best trial named from what they logged, limits kept,
//! early termination stopping a trial that falls behind, a trial that never logs
//! its metric failing with the reason, and a coordinator SIGKILL mid-sweep.

mod support;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use support::{TestCluster, test_python};

/// A sweep file running `script` (in a code folder `train`) with the tests'
/// Python; `rest` is the sweep's own keys. Returns the file's path.
fn sweep_file(tc: &TestCluster, name: &str, script: &str, args: &str, rest: &str) -> PathBuf {
    let dir = tc.scratch(name);
    std::fs::create_dir_all(dir.join("train")).expect("code folder");
    std::fs::write(dir.join("train/main.py"), script).expect("script");
    let file = dir.join("sweep.yml");
    std::fs::write(
        &file,
        format!(
            "$schema: https://azuremlschemas.azureedge.net/latest/sweepJob.schema.json\n\
             type: sweep\n\
             trial:\n  command: {} main.py {args}\n  code: ./train\n  environment: host\n\
             compute: azureml:cpu\n{rest}",
            test_python().display()
        ),
    )
    .expect("sweep file");
    file
}

/// Until the sweep ends; when it did not complete, its trials' logs are printed.
async fn wait_ended(tc: &TestCluster, id: &str, limit: Duration) -> serde_json::Value {
    let shown = tc.wait_ended(id, limit).await;
    if shown["status"] != "completed" {
        // What the trials said, to see why.
        for trial in shown["sweep"]["trials"].as_array().into_iter().flatten() {
            let logs = tc.shoal(&["job", "logs", trial["id"].as_str().unwrap_or_default()]);
            eprintln!(
                "{trial}\n{}{}",
                String::from_utf8_lossy(&logs.stdout),
                String::from_utf8_lossy(&logs.stderr)
            );
        }
    }
    shown
}

/// The known function trials log: best at lr = 0.3 with opt b.
fn accuracy(lr: f64, opt: &str) -> f64 {
    1.0 - (lr - 0.3).powi(2) - if opt == "b" { 0.0 } else { 0.5 }
}

const KNOWN: &str = r#"
import os, sys, time, mlflow
lr, opt, trace = float(sys.argv[1]), sys.argv[2], sys.argv[3]
index = os.environ["SHOAL_JOB_ID"]
with open(trace, "a") as f:
    f.write(f"start {index} {time.time()}\n")
assert os.environ["AZUREML_SWEEP_opt"] == opt
mlflow.log_param("lr", lr)
time.sleep(0.5)
mlflow.log_metric("accuracy", 1.0 - (lr - 0.3) ** 2 - (0.0 if opt == "b" else 0.5))
os.makedirs("outputs", exist_ok=True)
with open("outputs/chosen.txt", "w") as f:
    f.write(f"{lr} {opt}")
with open(trace, "a") as f:
    f.write(f"end {index} {time.time()}\n")
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sweep_names_the_best_trial_of_a_known_function_within_its_limits() {
    let tc = TestCluster::start().await;
    tc.create_cluster("cpu", &["--max-nodes", "3"]);
    let trace = tc.scratch("trace").join("trace.txt");
    std::fs::create_dir_all(trace.parent().expect("a folder")).expect("trace folder");
    let file = sweep_file(
        &tc,
        "known",
        KNOWN,
        &format!(
            "${{{{search_space.lr}}}} ${{{{search_space.opt}}}} {}",
            trace.display()
        ),
        "search_space:\n  lr: {type: uniform, min_value: 0.0, max_value: 1.0}\n  opt: {type: choice, values: [a, b]}\n\
         sampling_algorithm: {type: random, seed: 11}\n\
         objective: {goal: maximize, primary_metric: accuracy}\n\
         limits: {max_total_trials: 8, max_concurrent_trials: 2}\n",
    );
    let id = tc.submit_file(&file);
    let shown = wait_ended(&tc, &id, Duration::from_secs(240)).await;
    assert_eq!(
        shown["status"],
        "completed",
        "{shown:#}\n{}",
        tc.coordinator_log()
    );
    let sweep = &shown["sweep"];
    let trials = sweep["trials"].as_array().expect("trials");
    assert_eq!(trials.len(), 8, "{shown:#}");

    // Each trial's score is the function of its parameters; the best is the argmax.
    let mut best = (String::new(), f64::MIN);
    for trial in trials {
        let lr: f64 = trial["params"]["lr"]
            .as_str()
            .expect("lr")
            .parse()
            .expect("a number");
        let opt = trial["params"]["opt"].as_str().expect("opt");
        let expected = accuracy(lr, opt);
        let score = trial["score"]
            .as_f64()
            .unwrap_or_else(|| panic!("no score: {trial:#}"));
        assert!(
            (score - expected).abs() < 1e-9,
            "{trial:#}: {score} vs {expected}"
        );
        assert_eq!(trial["status"], "completed", "{trial:#}");
        if expected > best.1 {
            best = (trial["id"].as_str().expect("id").to_string(), expected);
        }
    }
    assert_eq!(sweep["best_trial"], best.0.as_str(), "{shown:#}");
    assert!(
        shown["reason"]
            .as_str()
            .unwrap_or_default()
            .contains(&best.0),
        "{shown:#}"
    );

    // Never more than max_concurrent_trials at once, as the trials themselves saw it.
    let trace = std::fs::read_to_string(&trace).expect("trace");
    let mut events: Vec<(f64, i32)> = trace
        .lines()
        .map(|line| {
            let words: Vec<&str> = line.split_whitespace().collect();
            let at: f64 = words[2].parse().expect("a time");
            (at, if words[0] == "start" { 1 } else { -1 })
        })
        .collect();
    assert_eq!(events.len(), 16, "{trace}");
    events.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    let (mut running, mut most) = (0, 0);
    for (_, change) in events {
        running += change;
        most = most.max(running);
    }
    assert!(most <= 2, "{most} trials ran at once:\n{trace}");

    // The trials are its children; the list shows the sweep once.
    let children = tc.shoal_json(&["job", "list", "--parent", &id]);
    assert_eq!(children.as_array().map(Vec::len), Some(8), "{children:#}");
    assert!(
        children
            .as_array()
            .expect("list")
            .iter()
            .all(|t| t["trial"]["sweep_id"] == id.as_str())
    );
    let all = tc.shoal_json(&["job", "list"]);
    assert_eq!(all.as_array().map(Vec::len), Some(1), "{all:#}");
    let table = tc.shoal(&["job", "show", &id]);
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(
        table.contains("ACCURACY") && table.contains("best") && table.contains("opt=b"),
        "{table}"
    );

    // Its outputs are the best trial's.
    let out = tc.scratch("download");
    tc.shoal(&[
        "job",
        "download",
        &id,
        "--download-path",
        &out.to_string_lossy(),
    ]);
    let chosen = walk(&out)
        .into_iter()
        .find(|p| p.ends_with("chosen.txt"))
        .unwrap_or_else(|| panic!("no chosen.txt under {}", out.display()));
    let text = std::fs::read_to_string(chosen).expect("chosen");
    let best_trial = trials
        .iter()
        .find(|t| t["id"] == best.0.as_str())
        .expect("best");
    assert_eq!(
        text,
        format!(
            "{} {}",
            best_trial["params"]["lr"].as_str().expect("lr"),
            best_trial["params"]["opt"].as_str().expect("opt")
        )
    );
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            found.extend(walk(&path));
        } else {
            found.push(path);
        }
    }
    found
}

/// Trials of three qualities. The bad one starts logging only once the good one
/// has logged 5 points (a file they share says so), so the bandit always has the
/// good curve to compare with, however slowly a loaded machine starts them.
const CURVES: &str = r#"
import os, sys, time, mlflow
quality, shared = sys.argv[1], sys.argv[2]
if quality == "silent":
    print("this trial logs nothing")
    sys.exit(0)
progress = os.path.join(shared, "good-steps")
if quality == "bad":
    deadline = time.time() + 120
    while time.time() < deadline:
        if os.path.exists(progress) and int(open(progress).read() or 0) >= 5:
            break
        time.sleep(0.1)
level = {"good": 0.9, "bad": 0.2}[quality]
for step in range(30):
    mlflow.log_metric("accuracy", level + step * 0.001, step=step)
    if quality == "good":
        with open(progress + ".tmp", "w") as f:
            f.write(str(step + 1))
        os.replace(progress + ".tmp", progress)
    time.sleep(0.3)
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bandit_stops_a_trial_that_falls_behind_and_a_silent_trial_fails_saying_why() {
    let tc = TestCluster::start().await;
    tc.create_cluster("cpu", &["--max-nodes", "3"]);
    let shared = tc.scratch("curves-shared");
    std::fs::create_dir_all(&shared).expect("shared folder");
    let file = sweep_file(
        &tc,
        "curves",
        CURVES,
        &format!("${{{{search_space.quality}}}} {}", shared.display()),
        "search_space:\n  quality: {type: choice, values: [good, bad, silent]}\n\
         sampling_algorithm: grid\n\
         objective: {goal: maximize, primary_metric: accuracy}\n\
         limits: {max_concurrent_trials: 3}\n\
         early_termination: {type: bandit, slack_factor: 0.2, evaluation_interval: 1, delay_evaluation: 3}\n",
    );
    let id = tc.submit_file(&file);
    let shown = wait_ended(&tc, &id, Duration::from_secs(180)).await;
    assert_eq!(
        shown["status"],
        "completed",
        "{shown:#}\n{}",
        tc.coordinator_log()
    );
    let trials: BTreeMap<String, serde_json::Value> = shown["sweep"]["trials"]
        .as_array()
        .expect("trials")
        .iter()
        .map(|t| {
            (
                t["params"]["quality"]
                    .as_str()
                    .expect("quality")
                    .to_string(),
                t.clone(),
            )
        })
        .collect();
    assert_eq!(trials.len(), 3, "{shown:#}");
    assert_eq!(
        shown["sweep"]["best_trial"], trials["good"]["id"],
        "{shown:#}"
    );
    assert_eq!(trials["good"]["status"], "completed");

    let bad = tc.shoal_json(&["job", "show", trials["bad"]["id"].as_str().expect("id")]);
    assert_eq!(bad["status"], "canceled", "{bad:#}");
    assert!(
        bad["reason"]
            .as_str()
            .unwrap_or_default()
            .contains("bandit policy"),
        "{bad:#}"
    );
    let logged = tc.shoal_json(&["job", "metrics", bad["id"].as_str().expect("id")]);
    let points = logged["runs"][0]["metrics"][0]["points"]
        .as_array()
        .map(Vec::len)
        .unwrap_or(0);
    assert!(points < 30, "the laggard ran to the end ({points} points)");

    let silent = tc.shoal_json(&["job", "show", trials["silent"]["id"].as_str().expect("id")]);
    assert_eq!(silent["status"], "failed", "{silent:#}");
    assert!(
        silent["reason"]
            .as_str()
            .unwrap_or_default()
            .starts_with("primary metric `accuracy` was never logged"),
        "{silent:#}"
    );
}

const SLOW: &str = r#"
import os, sys, time, mlflow
with open(sys.argv[2], "a") as f:
    f.write(f"ran {os.environ['SHOAL_JOB_ID']} {sys.argv[1]}\n")
time.sleep(1.5)
mlflow.log_metric("loss", float(sys.argv[1]))
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sweep_resumes_after_a_coordinator_sigkill_without_rerunning_finished_trials() {
    let mut tc = TestCluster::start().await;
    tc.create_cluster("cpu", &["--max-nodes", "1"]);
    let marks = tc.scratch("marks").join("ran.txt");
    std::fs::create_dir_all(marks.parent().expect("a folder")).expect("marks folder");
    let file = sweep_file(
        &tc,
        "slow",
        SLOW,
        &format!("${{{{search_space.x}}}} {}", marks.display()),
        "search_space:\n  x: {type: quniform, min_value: 0, max_value: 100, q: 1}\n\
         sampling_algorithm: random\n\
         objective: {goal: minimize, primary_metric: loss}\n\
         limits: {max_total_trials: 6, max_concurrent_trials: 1}\n",
    );
    let id = tc.submit_file(&file);
    let before = tc
        .wait_job(&id, "two trials ended", Duration::from_secs(120), |j| {
            j.sweep
                .as_ref()
                .is_some_and(|s| s.trials.iter().filter(|t| t.status == "completed").count() >= 2)
        })
        .await;
    let finished: Vec<(String, String)> = before
        .sweep
        .as_ref()
        .expect("a sweep")
        .trials
        .iter()
        .filter(|t| t.status == "completed")
        .map(|t| (t.job_id.clone(), t.params["x"].clone()))
        .collect();
    tc.kill9();
    tc.restart().await;
    let shown = wait_ended(&tc, &id, Duration::from_secs(180)).await;
    assert_eq!(
        shown["status"],
        "completed",
        "{shown:#}\n{}",
        tc.coordinator_log()
    );
    let trials = shown["sweep"]["trials"].as_array().expect("trials");
    assert_eq!(trials.len(), 6, "{shown:#}");
    let ran = std::fs::read_to_string(&marks).expect("marks");
    for (job, x) in &finished {
        let times = ran
            .lines()
            .filter(|l| l.starts_with(&format!("ran {job} ")))
            .count();
        assert_eq!(times, 1, "{job} ran {times} times:\n{ran}");
        // Its record is as it was: the same values, not drawn again.
        let after = trials
            .iter()
            .find(|t| t["id"] == job.as_str())
            .expect("still there");
        assert_eq!(after["params"]["x"].as_str(), Some(x.as_str()));
    }
    // Every trial ran; the best is the lowest loss.
    let mut lowest = (String::new(), f64::MAX);
    for trial in trials {
        let job = trial["id"].as_str().expect("id");
        assert!(
            ran.contains(&format!("ran {job} ")),
            "{job} never ran:\n{ran}\n{trial:#}"
        );
        let score = trial["score"].as_f64().expect("score");
        if score < lowest.1 {
            lowest = (job.to_string(), score);
        }
    }
    assert_eq!(shown["sweep"]["best_trial"], lowest.0.as_str(), "{shown:#}");
}
