//! MLflow tracking, end to end: jobs log with the real `mlflow` client (from PyPI)
//! through their node's agent to the coordinator; the values come back through
//! `shoal job metrics`, `job show`, the HTTP API, `job download` and MLflow's own
//! client; a job's token writes only its own job's runs; metrics outlive a SIGKILL.
//! The first two run on both stores: `tracking.db` in the data dir, and the
//! PostgreSQL database of `shoal up --store postgres://…`.

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use support::{TestCluster, test_python};

/// A job file running `script` (in a code folder named `train`) with the tests'
/// Python on the host; returns the file's path.
fn job_file(tc: &TestCluster, name: &str, script: &str, python: &Path) -> PathBuf {
    let dir = tc.scratch(name);
    std::fs::create_dir_all(dir.join("train")).expect("code folder");
    std::fs::write(dir.join("train/main.py"), script).expect("script");
    let file = dir.join("job.yml");
    std::fs::write(
        &file,
        format!(
            "command: {} main.py\ncode: ./train\nenvironment: host\ncompute: azureml:cpu\n",
            python.display()
        ),
    )
    .expect("job file");
    file
}

/// Submits and waits; panics with the job's log unless it completed.
fn run_job(tc: &TestCluster, file: &Path) -> String {
    let created = tc.shoal_json(&["job", "submit", "-f", &file.to_string_lossy(), "--wait"]);
    let id = created["id"].as_str().expect("job id").to_string();
    let logs = tc.shoal(&["job", "logs", &id]);
    let logs = String::from_utf8_lossy(&logs.stdout).into_owned();
    assert_eq!(
        created["status"],
        "completed",
        "{id} did not complete: {created:#}\nlog:\n{logs}\n{}",
        tc.coordinator_log()
    );
    id
}

/// A coordinator keeping its state in the embedded SQLite files, or in a fresh
/// PostgreSQL database.
async fn start(postgres: Option<&str>) -> TestCluster {
    match postgres {
        None => TestCluster::start().await,
        Some(name) => {
            let url = support::postgres_database(name);
            TestCluster::start_args(&["--store", &url]).await
        }
    }
}

const TRAIN: &str = r#"
import os, mlflow, mlflow.pyfunc
from mlflow.entities import Metric, Param, RunTag

class Doubler(mlflow.pyfunc.PythonModel):
    def predict(self, context, model_input):
        return [x * 2 for x in model_input]

assert os.environ["MLFLOW_RUN_ID"].startswith(os.environ["SHOAL_JOB_ID"] + "-"), os.environ["MLFLOW_RUN_ID"]
with mlflow.start_run() as run:
    mlflow.log_param("lr", 0.1)
    for step in range(5):
        mlflow.log_metric("loss", 1.0 / (step + 1), step=step)
    mlflow.set_tag("stage", "test")
    client = mlflow.MlflowClient()
    client.log_batch(run.info.run_id,
        metrics=[Metric("acc", 0.5 + step / 10, 1000 + step, step) for step in range(4)],
        params=[Param("epochs", "4")],
        tags=[RunTag("batch", "yes")])
    with open("note.txt", "w") as f:
        f.write("logged by the job")
    mlflow.log_artifact("note.txt", artifact_path="notes")
    model = mlflow.pyfunc.log_model(name="doubler", python_model=Doubler())
print("logged to", run.info.run_id)
print("MODEL " + model.model_id)
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_logs_with_the_real_mlflow_client_and_its_values_come_back_everywhere() {
    values_come_back_everywhere(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_job_logs_with_the_real_mlflow_client_and_its_values_come_back_everywhere_in_postgres() {
    values_come_back_everywhere(Some("shoal_tracking_values")).await;
}

async fn values_come_back_everywhere(postgres: Option<&str>) {
    let python = test_python();
    let tc = start(postgres).await;
    tc.create_cluster("cpu", &["--max-nodes", "1"]);
    let id = run_job(&tc, &job_file(&tc, "a", TRAIN, &python));
    let run_id = format!("{id}-1");
    assert_eq!(
        tc.data_dir().join("tracking.db").exists(),
        postgres.is_none(),
        "the runs are kept in the store's database"
    );

    // shoal job metrics -o json
    let logged = tc.shoal_json(&["job", "metrics", &id]);
    let run = &logged["runs"][0];
    assert_eq!(run["run_id"], run_id.as_str(), "{logged:#}");
    assert_eq!(run["attempt_id"], format!("{id}.1").as_str());
    assert_eq!(
        run["status"], "FINISHED",
        "mlflow ended its run: {logged:#}"
    );
    assert_eq!(run["params"]["lr"], "0.1");
    assert_eq!(run["params"]["epochs"], "4");
    assert_eq!(run["tags"]["stage"], "test");
    assert_eq!(run["tags"]["batch"], "yes");
    assert_eq!(run["tags"]["shoal.job_id"], id.as_str());
    assert_eq!(run["tags"]["shoal.instance.0.node"], "cpu-n1");
    let series = |name: &str| -> Vec<(i64, f64)> {
        run["metrics"]
            .as_array()
            .expect("metrics")
            .iter()
            .find(|m| m["name"] == name)
            .unwrap_or_else(|| panic!("no metric {name}: {logged:#}"))["points"]
            .as_array()
            .expect("points")
            .iter()
            .map(|p| {
                (
                    p["step"].as_i64().expect("step"),
                    p["value"].as_f64().expect("value"),
                )
            })
            .collect()
    };
    assert_eq!(
        series("loss"),
        vec![(0, 1.0), (1, 0.5), (2, 1.0 / 3.0), (3, 0.25), (4, 0.2)]
    );
    assert_eq!(series("acc"), vec![(0, 0.5), (1, 0.6), (2, 0.7), (3, 0.8)]);

    // The terminal: a sparkline per metric, the latest values in `job show`.
    let table = tc.shoal(&["job", "metrics", &id]);
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(
        table.contains("loss") && table.contains('█') && table.contains('▁'),
        "{table}"
    );
    let show = tc.shoal(&["job", "show", &id]);
    let show = String::from_utf8_lossy(&show.stdout);
    assert!(show.contains("loss=0.2 (step 4)"), "{show}");
    assert!(show.contains("lr=0.1"), "{show}");

    // The HTTP API.
    let token = tc.admin_token();
    let (code, body) = tc
        .http(
            "GET",
            &format!("/api/v1/jobs/{id}/metrics?name=loss"),
            Some(&token),
            "",
        )
        .await;
    assert_eq!(code, 200, "{body}");
    let http: serde_json::Value = serde_json::from_str(&body).expect("json");
    let names: Vec<_> = http["runs"][0]["metrics"]
        .as_array()
        .expect("metrics")
        .iter()
        .map(|m| m["name"].clone())
        .collect();
    assert_eq!(names, vec![serde_json::json!("loss")]);
    assert_eq!(
        http["runs"][0]["metrics"][0]["points"]
            .as_array()
            .map(Vec::len),
        Some(5)
    );

    // MLflow's own client, from this machine, with an API token.
    let job_log = String::from_utf8_lossy(&tc.shoal(&["job", "logs", &id]).stdout).into_owned();
    let model_id = job_log
        .lines()
        .find_map(|l| l.strip_prefix("MODEL "))
        .unwrap_or_else(|| panic!("the job logged no model: {job_log}"))
        .trim()
        .to_string();
    let check = format!(
        r#"
import json, mlflow
c = mlflow.MlflowClient()
exp = c.get_experiment_by_name("train")
runs = c.search_runs([exp.experiment_id], "metrics.loss < 0.5 and params.lr = '0.1'")
print(json.dumps({{
    "history": [[m.step, m.value] for m in c.get_metric_history("{run_id}", "loss")],
    "runs": [r.info.run_id for r in runs],
    "artifacts": [a.path for a in c.list_artifacts("{run_id}", "notes")],
    "note": open(c.download_artifacts("{run_id}", "notes/note.txt")).read(),
    "outputs": [o.model_id for o in c.get_run("{run_id}").outputs.model_outputs],
    "predicted": [float(v) for v in mlflow.pyfunc.load_model("models:/{model_id}").predict([1, 2])],
}}))
"#
    );
    let out = std::process::Command::new(&python)
        .args(["-c", &check])
        .env("MLFLOW_TRACKING_URI", format!("http://{}", tc.endpoint()))
        .env("MLFLOW_TRACKING_TOKEN", &token)
        .output()
        .expect("python");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let seen: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(
        seen["history"],
        serde_json::json!([[0, 1.0], [1, 0.5], [2, 1.0 / 3.0], [3, 0.25], [4, 0.2]])
    );
    assert_eq!(
        seen["runs"],
        serde_json::json!([run_id]),
        "the experiment is the code folder's name"
    );
    // (MLflow 3's client lists the run's logged models' files beside its own.)
    let listed = seen["artifacts"].as_array().expect("artifacts");
    assert!(
        listed.contains(&serde_json::json!("notes/note.txt")),
        "{seen}"
    );
    assert_eq!(seen["note"], "logged by the job");
    assert_eq!(seen["outputs"], serde_json::json!([model_id]));
    assert_eq!(
        seen["predicted"],
        serde_json::json!([2.0, 4.0]),
        "log_model, then load_model"
    );

    // shoal job download brings the logged artifact down.
    let into = tc.scratch("download");
    let out = tc.shoal(&["job", "download", &id, "-p", &into.to_string_lossy()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let note = into
        .join(&id)
        .join("artifacts")
        .join(&run_id)
        .join("notes/note.txt");
    assert_eq!(
        std::fs::read_to_string(&note).unwrap_or_else(|e| panic!("{}: {e}", note.display())),
        "logged by the job"
    );
    let model_file = into
        .join(&id)
        .join("artifacts")
        .join(&model_id)
        .join("MLmodel");
    assert!(
        model_file.exists(),
        "{} was not downloaded",
        model_file.display()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jobs_token_writes_only_its_own_jobs_runs_and_metrics_outlive_a_sigkill() {
    only_its_own_runs_and_metrics_outlive_a_sigkill(None).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_jobs_token_writes_only_its_own_jobs_runs_and_metrics_outlive_a_sigkill_in_postgres() {
    only_its_own_runs_and_metrics_outlive_a_sigkill(Some("shoal_tracking_sigkill")).await;
}

async fn only_its_own_runs_and_metrics_outlive_a_sigkill(postgres: Option<&str>) {
    let python = test_python();
    let mut tc = start(postgres).await;
    tc.create_cluster("cpu", &["--max-nodes", "1"]);
    let first = run_job(&tc, &job_file(&tc, "first", TRAIN, &python));
    let victim = format!("{first}-1");
    let intruder = format!(
        r#"
import os, json, urllib.request, mlflow
from mlflow.exceptions import MlflowException
c = mlflow.MlflowClient()
seen = {{"read": c.get_run("{victim}").data.params["lr"]}}
try:
    c.log_metric("{victim}", "sabotage", 1.0)
    seen["write"] = "accepted"
except MlflowException as e:
    seen["write"] = str(e)
try:
    c.set_terminated("{victim}", "FAILED")
    seen["end"] = "accepted"
except MlflowException as e:
    seen["end"] = str(e)
# The agent's endpoint answers only a job's own secret.
request = urllib.request.Request(
    os.environ["MLFLOW_TRACKING_URI"] + "/api/2.0/mlflow/runs/get?run_id={victim}",
    headers={{"Authorization": "Bearer forged"}})
try:
    urllib.request.urlopen(request)
    seen["forged"] = "accepted"
except urllib.error.HTTPError as e:
    seen["forged"] = e.code
mlflow.log_metric("mine", 2.0)
print("SEEN " + json.dumps(seen))
"#
    );
    let second = run_job(&tc, &job_file(&tc, "second", &intruder, &python));
    let logs = tc.shoal(&["job", "logs", &second]);
    let logs = String::from_utf8_lossy(&logs.stdout);
    let seen: serde_json::Value = logs
        .lines()
        .find_map(|l| l.strip_prefix("SEEN "))
        .map(|l| serde_json::from_str(l).expect("json"))
        .unwrap_or_else(|| panic!("the job printed nothing: {logs}"));
    assert_eq!(
        seen["read"], "0.1",
        "reading another job's run is fine: {seen}"
    );
    for what in ["write", "end"] {
        let said = seen[what].as_str().unwrap_or_default();
        assert!(
            said.contains("PERMISSION_DENIED") && said.contains("only its own"),
            "{what}: {seen}"
        );
    }
    assert_eq!(seen["forged"], 401, "{seen}");

    // A reader's token reads but does not write.
    let reader = tc.shoal(&["token", "create", "--role", "reader", "--name", "r"]);
    let reader = String::from_utf8_lossy(&reader.stdout)
        .split_whitespace()
        .find(|w| w.starts_with("shoal_"))
        .expect("a token")
        .to_string();
    let body = format!(r#"{{"run_id":"{victim}","key":"x","value":1,"timestamp":1,"step":0}}"#);
    let (code, said) = tc
        .http(
            "POST",
            "/api/2.0/mlflow/runs/log-metric",
            Some(&reader),
            &body,
        )
        .await;
    assert_eq!(code, 403, "{said}");
    let (code, said) = tc
        .http(
            "POST",
            "/api/2.0/mlflow/runs/search",
            Some(&reader),
            r#"{"experiment_ids":["1"]}"#,
        )
        .await;
    assert_eq!(code, 200, "{said}");

    // Nothing the intruder tried landed; its own metric did, in its own run.
    tc.kill9();
    tc.restart().await;
    let logged = tc.shoal_json(&["job", "metrics", &first]);
    let names: Vec<&str> = logged["runs"][0]["metrics"]
        .as_array()
        .expect("metrics")
        .iter()
        .filter_map(|m| m["name"].as_str())
        .collect();
    assert_eq!(names, vec!["acc", "loss"], "{logged:#}");
    assert_eq!(logged["runs"][0]["status"], "FINISHED");
    assert_eq!(
        logged["runs"][0]["metrics"][1]["points"]
            .as_array()
            .map(Vec::len),
        Some(5)
    );
    let own = tc.shoal_json(&["job", "metrics", &second]);
    assert_eq!(own["runs"][0]["metrics"][0]["name"], "mine", "{own:#}");
}

/// A job stopped while its run is open leaves no run `RUNNING` forever: the run
/// ends as its attempt did (canceled: KILLED), at the attempt's end; a run the
/// job ended itself keeps the status it set.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_run_of_a_canceled_job_ends_killed_and_a_finished_one_keeps_its_status() {
    let python = test_python();
    let tc = TestCluster::start().await;
    tc.create_cluster("cpu", &["--max-nodes", "1"]);
    let finished = run_job(&tc, &job_file(&tc, "finished", TRAIN, &python));

    let waits = "import mlflow, time\nmlflow.log_metric(\"started\", 1.0)\ntime.sleep(600)\n";
    let id = tc.submit_file(&job_file(&tc, "waits", waits, &python));
    support::eventually("the job logged", Duration::from_secs(120), || async {
        let logged = tc.shoal_json(&["job", "metrics", &id]);
        (logged["runs"][0]["metrics"][0]["name"] == "started").then_some(())
    })
    .await;
    let open = tc.shoal_json(&["job", "metrics", &id]);
    assert_eq!(open["runs"][0]["status"], "RUNNING", "{open:#}");
    tc.shoal(&["job", "cancel", &id]);
    let ended = tc.wait_ended(&id, Duration::from_secs(60)).await;
    assert_eq!(ended["status"], "canceled", "{ended:#}");
    let run = support::eventually("the run ended", Duration::from_secs(10), || async {
        let logged = tc.shoal_json(&["job", "metrics", &id]);
        (logged["runs"][0]["status"] != "RUNNING").then_some(logged)
    })
    .await;
    assert_eq!(run["runs"][0]["status"], "KILLED", "{run:#}");
    assert!(
        run["runs"][0]["end_ms"].as_i64().unwrap_or(0) > 0,
        "{run:#}"
    );

    let kept = tc.shoal_json(&["job", "metrics", &finished]);
    assert_eq!(kept["runs"][0]["status"], "FINISHED", "{kept:#}");
}
