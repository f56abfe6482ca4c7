//! Pipeline jobs, end to end: the service's pipelineJob file with steps reading
//! each other's outputs on real nodes, the pipeline's output downloaded, a failing
//! step with and without `continue_on_step_failure`, cancel, and a coordinator
//! SIGKILL mid-pipeline that reruns no completed step.

mod support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use support::TestCluster;

/// Writes `text` as `pipeline.yml` in a scratch folder; its path.
fn pipeline_file(tc: &TestCluster, name: &str, text: &str) -> PathBuf {
    let dir = tc.scratch(name);
    std::fs::create_dir_all(&dir).expect("scratch");
    let file = dir.join("pipeline.yml");
    std::fs::write(&file, text).expect("pipeline file");
    file
}

fn step<'a>(shown: &'a serde_json::Value, name: &str) -> &'a serde_json::Value {
    shown["pipeline"]["steps"]
        .as_array()
        .and_then(|steps| steps.iter().find(|s| s["name"] == name))
        .unwrap_or_else(|| panic!("no step {name}: {shown:#}"))
}

fn logs_of(tc: &TestCluster, shown: &serde_json::Value) -> String {
    let mut all = String::new();
    for step in shown["pipeline"]["steps"].as_array().into_iter().flatten() {
        if let Some(id) = step["id"].as_str() {
            let out = tc.shoal(&["job", "logs", id]);
            all += &format!(
                "--- {} ({id})\n{}{}",
                step["name"],
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
    all
}

/// Downloads a job's outputs (`shoal job download`) and reads one file of one of
/// its named outputs.
fn downloaded(tc: &TestCluster, id: &str, output: &str, file: &str) -> String {
    let into = tc.scratch(&format!("download-{id}-{output}"));
    let out = tc.shoal(&["job", "download", id, "-p", into.to_str().expect("utf8")]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let path = into.join(id).join("named-outputs").join(output).join(file);
    std::fs::read_to_string(&path).unwrap_or_else(|e| {
        let listed = std::process::Command::new("find")
            .arg(&into)
            .output()
            .expect("find");
        panic!(
            "{}: {e}\n{}",
            path.display(),
            String::from_utf8_lossy(&listed.stdout)
        )
    })
}

const THREE_STEPS: &str = r#"$schema: https://azuremlschemas.azureedge.net/latest/pipelineJob.schema.json
type: pipeline
display_name: numbers
experiment_name: pipelines
compute: azureml:cpu
inputs:
  raw: {type: uri_folder, path: ./data}
  scale: 10
outputs:
  report:
jobs:
  summarize:
    command: >-
      wc -l < ${{inputs.scores}}/scores.txt > ${{outputs.report}}/count.txt &&
      cp ${{inputs.scores}}/scores.txt ${{outputs.report}}/ &&
      echo "summarize on $SHOAL_NODE_ID"
    environment: host
    inputs:
      scores: {type: uri_folder, path: '${{parent.jobs.score.outputs.scores}}'}
    outputs:
      report: ${{parent.outputs.report}}
  prep:
    command: >-
      for f in ${{inputs.raw}}/*; do sort -n "$f" > ${{outputs.clean}}/$(basename "$f"); done &&
      echo "prep on $SHOAL_NODE_ID"
    environment: host
    inputs:
      raw: ${{parent.inputs.raw}}
    outputs:
      clean:
  score:
    command: >-
      cd ${{inputs.clean}} && for f in *; do echo "$f $(awk -v k=${{inputs.k}} '{s+=$1} END {print s*k}' "$f")"; done
      > ${{outputs.scores}}/scores.txt && echo "score on $SHOAL_NODE_ID"
    environment: host
    inputs:
      clean: ${{parent.jobs.prep.outputs.clean}}
      k: ${{parent.inputs.scale}}
    outputs:
      scores:
"#;

#[tokio::test(flavor = "multi_thread")]
async fn a_three_step_pipeline_moves_data_from_step_to_step_and_downloads_its_output() {
    let tc = TestCluster::start().await;
    tc.create_cluster("cpu", &["--max-nodes", "3"]);
    let file = pipeline_file(&tc, "numbers", THREE_STEPS);
    let data = file.parent().expect("folder").join("data");
    std::fs::create_dir_all(&data).expect("data folder");
    std::fs::write(data.join("a.txt"), "3\n1\n2\n").expect("a");
    std::fs::write(data.join("b.txt"), "10\n20\n").expect("b");
    let id = tc.submit_file(&file);
    let shown = tc.wait_ended(&id, Duration::from_secs(120)).await;
    assert_eq!(
        shown["status"],
        "completed",
        "{shown:#}\n{}",
        logs_of(&tc, &shown)
    );
    assert_eq!(shown["name"], "numbers");
    assert_eq!(shown["experiment_name"], "pipelines");
    // Steps in the order they can run, each after those it reads.
    let names: Vec<&str> = shown["pipeline"]["steps"]
        .as_array()
        .expect("steps")
        .iter()
        .map(|s| s["name"].as_str().expect("name"))
        .collect();
    assert_eq!(names, ["prep", "score", "summarize"]);
    assert_eq!(step(&shown, "score")["after"], serde_json::json!(["prep"]));
    for name in names {
        let s = step(&shown, name);
        assert_eq!(s["status"], "completed", "{s}");
        let job = tc.shoal_json(&["job", "show", s["id"].as_str().expect("id")]);
        assert_eq!(job["step"]["pipeline_id"], id.as_str());
        assert_eq!(job["step"]["name"], name);
        assert_eq!(job["experiment_name"], "pipelines");
    }
    // The pipeline is listed once; its steps with --parent.
    let listed = tc.shoal_json(&["job", "list"]);
    assert_eq!(listed.as_array().map(Vec::len), Some(1), "{listed:#}");
    let children = tc.shoal_json(&["job", "list", "--parent", &id]);
    assert_eq!(children.as_array().map(Vec::len), Some(3), "{children:#}");
    // The table draws the steps.
    let table = tc.shoal(&["job", "show", &id, "-o", "table"]);
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(table.contains("steps:     3 of 3 completed"), "{table}");
    assert!(table.contains("← prep"), "{table}");

    // The pipeline's output is summarize's report: sorted, scored (× scale), counted.
    let into = tc.scratch("download");
    let out = tc.shoal(&["job", "download", &id, "-p", into.to_str().expect("utf8")]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report = into.join(&id).join("named-outputs/report");
    let scores = std::fs::read_to_string(report.join("scores.txt")).expect("scores");
    assert_eq!(scores, "a.txt 60\nb.txt 300\n");
    let count = std::fs::read_to_string(report.join("count.txt")).expect("count");
    assert_eq!(count.trim(), "2");

    // The same file again: every step is an identical earlier one, reused.
    let again = tc.submit_file(&file);
    let shown = tc.wait_ended(&again, Duration::from_secs(60)).await;
    assert_eq!(shown["status"], "completed", "{shown:#}");
    assert_eq!(shown["reason"], "3 of 3 step(s) reused");
    let first = tc.shoal_json(&["job", "show", &id]);
    for name in ["prep", "score", "summarize"] {
        let s = step(&shown, name);
        assert_eq!(s["reason"], "reused: an identical step completed before");
        assert_eq!(s["id"], step(&first, name)["id"], "the earlier step's job");
    }
    let scores = downloaded(&tc, &again, "report", "scores.txt");
    assert_eq!(scores, "a.txt 60\nb.txt 300\n");

    // A changed input reruns the steps that read it, and reuses prep.
    let scaled = tc.shoal_json(&[
        "job",
        "submit",
        "-f",
        &file.to_string_lossy(),
        "--set",
        "inputs.scale=2",
    ]);
    let scaled = scaled["id"].as_str().expect("id").to_string();
    let shown = tc.wait_ended(&scaled, Duration::from_secs(60)).await;
    assert_eq!(shown["status"], "completed", "{shown:#}");
    assert_eq!(shown["reason"], "1 of 3 step(s) reused");
    assert_eq!(step(&shown, "prep")["id"], step(&first, "prep")["id"]);
    assert_ne!(step(&shown, "score")["id"], step(&first, "score")["id"]);

    // force_rerun: every step runs again.
    let forced = tc.shoal_json(&[
        "job",
        "submit",
        "-f",
        &file.to_string_lossy(),
        "--set",
        "settings.force_rerun=true",
    ]);
    let forced = forced["id"].as_str().expect("id").to_string();
    let shown = tc.wait_ended(&forced, Duration::from_secs(60)).await;
    assert_eq!(shown["status"], "completed", "{shown:#}");
    assert!(
        shown["reason"].is_null() || shown["reason"] == "",
        "{shown:#}"
    );
    for name in ["prep", "score", "summarize"] {
        assert_ne!(
            step(&shown, name)["id"],
            step(&first, name)["id"],
            "{name} ran again"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_failed_step_fails_the_pipeline_and_continue_on_step_failure_lets_the_rest_finish() {
    let tc = TestCluster::start().await;
    tc.create_cluster("cpu", &["--max-nodes", "2"]);
    let text = |go_on: bool| {
        format!(
            "type: pipeline\ncompute: cpu\nsettings: {{continue_on_step_failure: {go_on}}}\njobs:\n\
             \x20 bad: {{command: 'echo broken >&2; exit 3', environment: host, outputs: {{out: }}}}\n\
             \x20 after_bad:\n\
             \x20   command: ls ${{{{inputs.x}}}}\n\
             \x20   environment: host\n\
             \x20   inputs: {{x: '${{{{parent.jobs.bad.outputs.out}}}}'}}\n\
             \x20 other: {{command: 'sleep 4; echo fine', environment: host}}\n"
        )
    };
    // Stopped: the running step is canceled, the one after `bad` never runs.
    let stop = tc.submit_file(&pipeline_file(&tc, "stop", &text(false)));
    let shown = tc.wait_ended(&stop, Duration::from_secs(90)).await;
    assert_eq!(shown["status"], "failed", "{shown:#}");
    assert_eq!(shown["reason"], "step `bad` failed; 1 step(s) not run");
    assert_eq!(step(&shown, "bad")["status"], "failed");
    assert_eq!(step(&shown, "after_bad")["status"], "not run");
    assert_eq!(
        step(&shown, "after_bad")["reason"],
        "not run: step `bad` did not complete"
    );
    assert!(step(&shown, "after_bad")["id"].is_null(), "never made");
    let other = tc.shoal_json(&[
        "job",
        "show",
        step(&shown, "other")["id"].as_str().expect("id"),
    ]);
    assert_eq!(other["status"], "canceled", "{other:#}");
    assert_eq!(other["reason"], "canceled: step `bad` failed");

    // Told to go on: `other` completes, the pipeline still fails for `bad`.
    let go_on = tc.submit_file(&pipeline_file(&tc, "go-on", &text(true)));
    let shown = tc.wait_ended(&go_on, Duration::from_secs(90)).await;
    assert_eq!(shown["status"], "failed", "{shown:#}");
    assert_eq!(step(&shown, "other")["status"], "completed", "{shown:#}");
    assert_eq!(step(&shown, "after_bad")["status"], "not run");
    let logs = tc.shoal(&[
        "job",
        "logs",
        step(&shown, "other")["id"].as_str().expect("id"),
    ]);
    assert!(String::from_utf8_lossy(&logs.stdout).contains("fine"));

    // A step's warnings from resolving its data reach the submitter, with its name.
    let dir = tc.scratch("warned");
    std::fs::create_dir_all(dir.join("data")).expect("data");
    std::fs::write(dir.join("data/x.txt"), "x").expect("x");
    std::fs::write(
        dir.join("p.yml"),
        "type: pipeline\ncompute: cpu\njobs:\n  a: {command: 'ls ${{inputs.d}}', environment: host, inputs: {d: {type: uri_folder, path: ./data, mode: rw_mount}}}\n",
    )
    .expect("pipeline");
    let out = tc.shoal(&[
        "job",
        "submit",
        "-f",
        dir.join("p.yml").to_str().expect("utf8"),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("warning: jobs.a.inputs.d.mode: rw_mount"),
        "{stderr}"
    );

    // Cancel cascades: the running step stops, then the pipeline is canceled.
    let long = tc.submit_file(&pipeline_file(
            &tc,
            "long",
            "type: pipeline\ncompute: cpu\njobs:\n  a: {command: sleep 60, environment: host, outputs: {o: }}\n  b: {command: 'ls ${{inputs.i}}', environment: host, inputs: {i: '${{parent.jobs.a.outputs.o}}'}}\n",
        ),
    );
    tc.wait_job(&long, "step a running", Duration::from_secs(60), |j| {
        j.pipeline
            .as_ref()
            .is_some_and(|p| p.steps.first().is_some_and(|s| s.status == "running"))
    })
    .await;
    let out = tc.shoal(&["job", "cancel", &long]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let shown = tc.wait_ended(&long, Duration::from_secs(60)).await;
    assert_eq!(shown["status"], "canceled", "{shown:#}");
    assert_eq!(step(&shown, "a")["status"], "canceled");
    assert_eq!(step(&shown, "b")["status"], "not run");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_pipeline_resumes_after_a_coordinator_sigkill_without_rerunning_completed_steps() {
    let mut tc = TestCluster::start().await;
    tc.create_cluster("cpu", &["--max-nodes", "1"]);
    let marks = tc.scratch("marks").join("ran.txt");
    std::fs::create_dir_all(marks.parent().expect("a folder")).expect("marks folder");
    let mark = |name: &str, rest: &str| format!("echo {name} >> {} && {rest}", marks.display());
    let text = format!(
        "type: pipeline\ncompute: cpu\njobs:\n\
         \x20 first: {{command: '{}', environment: host, outputs: {{o: }}}}\n\
         \x20 second: {{command: '{}', environment: host, inputs: {{i: '${{{{parent.jobs.first.outputs.o}}}}'}}, outputs: {{o: }}}}\n\
         \x20 third: {{command: '{}', environment: host, inputs: {{i: '${{{{parent.jobs.second.outputs.o}}}}'}}}}\n",
        mark("first", "echo 1 > ${{outputs.o}}/n"),
        mark(
            "second",
            "sleep 3 && cat ${{inputs.i}}/n > ${{outputs.o}}/n && echo 2 >> ${{outputs.o}}/n"
        ),
        mark("third", "cat ${{inputs.i}}/n"),
    );
    let id = tc.submit_file(&pipeline_file(&tc, "resume", &text));
    tc.wait_job(
        &id,
        "the second step running",
        Duration::from_secs(60),
        |j| {
            j.pipeline
                .as_ref()
                .is_some_and(|p| p.steps.get(1).is_some_and(|s| s.status == "running"))
        },
    )
    .await;
    tc.kill9();
    tc.restart().await;
    let shown = tc.wait_ended(&id, Duration::from_secs(120)).await;
    assert_eq!(
        shown["status"],
        "completed",
        "{shown:#}\n{}\n{}",
        logs_of(&tc, &shown),
        tc.coordinator_log()
    );
    let ran = std::fs::read_to_string(&marks).expect("marks");
    for name in ["first", "second", "third"] {
        let times = ran.lines().filter(|l| *l == name).count();
        assert_eq!(times, 1, "{name} ran {times} times:\n{ran}");
    }
    let third = step(&shown, "third")["id"]
        .as_str()
        .expect("id")
        .to_string();
    let logs = tc.shoal(&["job", "logs", &third]);
    assert_eq!(String::from_utf8_lossy(&logs.stdout).trim(), "1\n2");
}

/// The `add` component (a folder `components/` beside `dir`): `sh add.sh N OFFSET
/// [BEFORE] OUT [LABEL]` writes N + OFFSET (+ BEFORE's sum) to OUT/sum.txt.
fn write_add_component(dir: &Path, version: &str) -> PathBuf {
    let components = dir.join("components");
    std::fs::create_dir_all(components.join("src")).expect("component folders");
    // The component's code folder is beside its file, not the pipeline's.
    std::fs::write(
        components.join("src/add.sh"),
        "set -e\nprev=0\n[ -n \"$3\" ] && prev=$(cat \"$3\"/sum.txt)\necho $(( $1 + $2 + prev )) > \"$4\"/sum.txt\necho \"label=$5\"\n",
    )
    .expect("script");
    let file = components.join("add.yml");
    std::fs::write(
        &file,
        format!(
            "$schema: https://azuremlschemas.azureedge.net/latest/commandComponent.schema.json\n\
             type: command\nname: add\n{version}display_name: Add numbers\n\
             code: ./src\nenvironment: host\n\
             inputs:\n\
             \x20 n: {{type: integer, min: 0}}\n\
             \x20 offset: {{type: integer, default: 1}}\n\
             \x20 before: {{type: uri_folder, optional: true}}\n\
             \x20 label: {{type: string, optional: true}}\n\
             outputs:\n  sum: {{type: uri_folder}}\n\
             command: >-\n  sh add.sh ${{{{inputs.n}}}} ${{{{inputs.offset}}}} '[${{{{inputs.before}}}}]' ${{{{outputs.sum}}}} '[${{{{inputs.label}}}}]'\n"
        ),
    )
    .expect("component");
    file
}

#[tokio::test(flavor = "multi_thread")]
async fn steps_made_of_component_files_run_with_their_code_defaults_and_typed_inputs() {
    let tc = TestCluster::start().await;
    tc.create_cluster("cpu", &["--max-nodes", "2"]);
    let file = pipeline_file(
        &tc,
        "components",
        "type: pipeline\ncompute: cpu\n\
         inputs: {start: 5}\n\
         outputs: {total: }\n\
         jobs:\n\
         \x20 first:\n\
         \x20   component: ./components/add.yml\n\
         \x20   inputs: {n: '${{parent.inputs.start}}'}\n\
         \x20 second:\n\
         \x20   component: file:components/add.yml\n\
         \x20   inputs: {n: 100, before: '${{parent.jobs.first.outputs.sum}}', label: twice}\n\
         \x20   outputs: {sum: '${{parent.outputs.total}}'}\n",
    );
    write_add_component(file.parent().expect("folder"), "version: 1\n");
    let id = tc.submit_file(&file);
    let shown = tc.wait_ended(&id, Duration::from_secs(90)).await;
    assert_eq!(
        shown["status"],
        "completed",
        "{shown:#}\n{}",
        logs_of(&tc, &shown)
    );
    // first: 5 + 1; second: 100 + 1 + 6.
    let total = downloaded(&tc, &id, "total", "sum.txt");
    assert_eq!(total.trim(), "107");
    let second = step(&shown, "second")["id"]
        .as_str()
        .expect("id")
        .to_string();
    let logs = tc.shoal(&["job", "logs", &second]);
    assert!(String::from_utf8_lossy(&logs.stdout).contains("label=twice"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_registered_component_is_versioned_and_steps_name_it_from_the_cli_and_over_http() {
    let tc = TestCluster::start().await;
    tc.create_cluster("cpu", &["--max-nodes", "2"]);
    let dir = tc.scratch("registered");
    let component = write_add_component(&dir, "");
    let path = component.to_str().expect("utf8");
    // No version in the file: 1, then 2; `--version` names one.
    let first = tc.shoal_json(&["component", "create", "-f", path]);
    assert_eq!(first[0]["version"], "1", "{first:#}");
    assert_eq!(first[0]["has_code"], true);
    let second = tc.shoal_json(&["ml", "component", "create", "-f", path]);
    assert_eq!(second[0]["version"], "2");
    let named = tc.shoal_json(&["component", "create", "-f", path, "--version", "v9"]);
    assert_eq!(named[0]["version"], "v9");
    let again = tc.shoal(&["component", "create", "-f", path, "--version", "v9"]);
    assert!(!again.status.success());
    assert!(String::from_utf8_lossy(&again.stderr).contains("exists"));
    let listed = tc.shoal_json(&["component", "list"]);
    assert_eq!(listed.as_array().map(Vec::len), Some(3), "{listed:#}");
    let shown = tc.shoal(&["component", "show", "add", "--version", "1"]);
    let shown = String::from_utf8_lossy(&shown.stdout);
    assert!(shown.contains("\"code\": \"azureml:add:1\""), "{shown}");
    // A bad component is refused before anything is kept.
    std::fs::write(
        dir.join("bad.yml"),
        "type: command\nname: bad\ncommand: echo ${{inputs.missing}}\n",
    )
    .expect("bad");
    let bad = tc.shoal(&[
        "component",
        "create",
        "-f",
        dir.join("bad.yml").to_str().expect("utf8"),
    ]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("missing"));

    // Steps name it: its code is the coordinator's copy, not this folder's.
    std::fs::remove_dir_all(dir.join("components")).expect("gone from here");
    let pipeline = "type: pipeline\ncompute: cpu\noutputs: {total: }\njobs:\n\
         \x20 first: {component: 'azureml:add:1', inputs: {n: 2}}\n\
         \x20 second:\n\
         \x20   component: azureml:add@latest\n\
         \x20   inputs: {n: 10, before: '${{parent.jobs.first.outputs.sum}}'}\n\
         \x20   outputs: {sum: '${{parent.outputs.total}}'}\n";
    let file = pipeline_file(&tc, "uses-registered", pipeline);
    let id = tc.submit_file(&file);
    let shown = tc.wait_ended(&id, Duration::from_secs(90)).await;
    assert_eq!(
        shown["status"],
        "completed",
        "{shown:#}\n{}",
        logs_of(&tc, &shown)
    );
    let total = downloaded(&tc, &id, "total", "sum.txt");
    assert_eq!(total.trim(), "14", "2 + 1, then 10 + 1 + 3");

    // Over HTTP the coordinator puts the component in itself.
    let body = serde_json::json!({
        "type": "pipeline",
        "compute": "cpu",
        "settings": {"force_rerun": true},
        "jobs": {"only": {"component": "azureml:add:v9", "inputs": {"n": 40, "offset": 2}}},
    });
    let (code, answer) = tc
        .http(
            "POST",
            "/api/v1/jobs",
            Some(&tc.admin_token()),
            &body.to_string(),
        )
        .await;
    assert_eq!(code, 201, "{answer}");
    let made: serde_json::Value = serde_json::from_str(&answer).expect("json");
    let id = made["id"].as_str().expect("id").to_string();
    let shown = tc.wait_ended(&id, Duration::from_secs(60)).await;
    assert_eq!(
        shown["status"],
        "completed",
        "{shown:#}\n{}",
        logs_of(&tc, &shown)
    );
    // An unknown version is refused, naming it.
    let body = serde_json::json!({
        "type": "pipeline", "compute": "cpu",
        "jobs": {"only": {"component": "azureml:add:7", "inputs": {"n": 1}}},
    });
    let (code, answer) = tc
        .http(
            "POST",
            "/api/v1/jobs",
            Some(&tc.admin_token()),
            &body.to_string(),
        )
        .await;
    assert!(
        code >= 400 && answer.contains("component `add` (version 7)"),
        "{code} {answer}"
    );
}

const TUNE: &str = r#"
import argparse, os, mlflow
parser = argparse.ArgumentParser()
parser.add_argument("--x", type=float)
parser.add_argument("--data")
parser.add_argument("--out")
args = parser.parse_args()
target = float(open(os.path.join(args.data, "target")).read())
mlflow.log_metric("loss", abs(args.x - target))
with open(os.path.join(args.out, "x.txt"), "w") as f:
    f.write(f"{args.x:g}\n")
"#;

#[tokio::test(flavor = "multi_thread")]
async fn a_sweep_step_reads_an_earlier_step_and_hands_its_best_trials_output_on() {
    let tc = TestCluster::start().await;
    tc.create_cluster("cpu", &["--max-nodes", "3"]);
    let file = pipeline_file(
        &tc,
        "sweep-step",
        &format!(
            "type: pipeline\ncompute: cpu\njobs:\n\
             \x20 prep: {{command: 'echo 3 > ${{{{outputs.data}}}}/target', environment: host, outputs: {{data: }}}}\n\
             \x20 tune:\n\
             \x20   type: sweep\n\
             \x20   inputs: {{data: '${{{{parent.jobs.prep.outputs.data}}}}'}}\n\
             \x20   outputs: {{best: }}\n\
             \x20   trial:\n\
             \x20     command: {} main.py --x ${{{{search_space.x}}}} --data ${{{{inputs.data}}}} --out ${{{{outputs.best}}}}\n\
             \x20     code: ./train\n\
             \x20     environment: host\n\
             \x20   search_space: {{x: {{type: choice, values: [1, 3, 5]}}}}\n\
             \x20   sampling_algorithm: grid\n\
             \x20   objective: {{goal: minimize, primary_metric: loss}}\n\
             \x20   limits: {{max_total_trials: 3, max_concurrent_trials: 3}}\n\
             \x20 report:\n\
             \x20   command: cat ${{{{inputs.best}}}}/x.txt\n\
             \x20   environment: host\n\
             \x20   inputs: {{best: '${{{{parent.jobs.tune.outputs.best}}}}'}}\n",
            support::test_python().display()
        ),
    );
    let code = file.parent().expect("folder").join("train");
    std::fs::create_dir_all(&code).expect("code folder");
    std::fs::write(code.join("main.py"), TUNE).expect("script");
    let id = tc.submit_file(&file);
    let shown = tc.wait_ended(&id, Duration::from_secs(180)).await;
    assert_eq!(
        shown["status"],
        "completed",
        "{shown:#}\n{}\n{}",
        logs_of(&tc, &shown),
        tc.coordinator_log()
    );
    let tune = step(&shown, "tune")["id"].as_str().expect("id").to_string();
    let sweep = tc.shoal_json(&["job", "show", &tune]);
    assert_eq!(sweep["step"]["pipeline_id"], id.as_str());
    assert_eq!(sweep["sweep"]["trials"].as_array().map(Vec::len), Some(3));
    let best = sweep["sweep"]["best_trial"]
        .as_str()
        .expect("best")
        .to_string();
    let best_trial = sweep["sweep"]["trials"]
        .as_array()
        .and_then(|t| t.iter().find(|t| t["id"] == best.as_str()))
        .expect("the best trial");
    assert_eq!(best_trial["params"]["x"], "3", "{sweep:#}");
    let report = step(&shown, "report")["id"]
        .as_str()
        .expect("id")
        .to_string();
    let logs = tc.shoal(&["job", "logs", &report]);
    assert_eq!(String::from_utf8_lossy(&logs.stdout).trim(), "3");
    // Deleting the pipeline takes its steps and the sweep's trials with it.
    let out = tc.shoal(&["job", "delete", &id]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    for gone in [tune.as_str(), best.as_str(), report.as_str()] {
        let out = tc.shoal(&["job", "show", gone]);
        assert!(!out.status.success(), "{gone} is still there");
    }
}

const SCORE: &str = r#"
import argparse, os, sys

def init():
    global scale
    parser = argparse.ArgumentParser()
    parser.add_argument("--scale", type=int)
    args, _ = parser.parse_known_args()
    scale = args.scale
    print(f"init {os.getpid()}")

def run(mini_batch):
    rows = []
    for path in mini_batch:
        name = os.path.basename(path)
        if name == "bad.txt":
            raise ValueError("cannot score bad.txt")
        if name.startswith("skip"):
            continue  # no result for this item: a failed item
        rows.append(f"{name},{int(open(path).read()) * scale}")
    return rows

def shutdown():
    print("shutdown")
"#;

fn run_function_job(tc: &TestCluster, name: &str, files: &[(&str, &str)], rest: &str) -> PathBuf {
    let dir = tc.scratch(name);
    std::fs::create_dir_all(dir.join("src")).expect("code folder");
    std::fs::create_dir_all(dir.join("images")).expect("data folder");
    std::fs::write(dir.join("src/score.py"), SCORE).expect("entry script");
    for (file, text) in files {
        std::fs::write(dir.join("images").join(file), text).expect("item");
    }
    let file = dir.join("batch.yml");
    std::fs::write(
        &file,
        format!(
            "$schema: https://azuremlschemas.azureedge.net/latest/parallelJob.schema.json\n\
             type: parallel\ncompute: cpu\n\
             inputs: {{images: {{type: uri_folder, path: ./images}}, scale: 3}}\n\
             outputs: {{scores: {{type: uri_folder}}}}\n\
             input_data: ${{{{inputs.images}}}}\n\
             mini_batch_size: \"2\"\n\
             resources: {{instance_count: 2}}\n\
             max_concurrency_per_instance: 2\n\
             logging_level: INFO\n\
             task:\n\
             \x20 type: run_function\n\
             \x20 code: ./src\n\
             \x20 entry_script: score.py\n\
             \x20 environment: host\n\
             \x20 program_arguments: --scale ${{{{inputs.scale}}}}\n\
             \x20 append_row_to: ${{{{outputs.scores}}}}/results.csv\n{rest}"
        ),
    )
    .expect("job file");
    file
}

#[tokio::test(flavor = "multi_thread")]
async fn run_function_imports_the_entry_script_once_per_worker_and_appends_what_run_returns() {
    let tc = TestCluster::start().await;
    tc.create_cluster("cpu", &["--max-nodes", "2"]);
    let items: Vec<(String, String)> = (0..7)
        .map(|i| (format!("img{i}.txt"), format!("{}", i + 1)))
        .collect();
    let borrowed: Vec<(&str, &str)> = items
        .iter()
        .map(|(a, b)| (a.as_str(), b.as_str()))
        .collect();
    let file = run_function_job(&tc, "scoring", &borrowed, "error_threshold: -1\n");
    let out = tc.shoal(&["-o", "json", "job", "submit", "-f", &file.to_string_lossy()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !stderr.contains("warning: error_threshold"),
        "counted here: {stderr}"
    );
    assert!(stderr.contains("warning: logging_level"), "{stderr}");
    let job: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let id = job["id"].as_str().expect("id").to_string();
    let shown = tc.wait_ended(&id, Duration::from_secs(120)).await;
    let logs = tc.shoal(&["job", "logs", &id]);
    let logs = format!(
        "{}{}",
        String::from_utf8_lossy(&logs.stdout),
        String::from_utf8_lossy(&logs.stderr)
    );
    assert_eq!(shown["status"], "completed", "{shown:#}\n{logs}");
    // The rows: every item once, in input order, in the named output's file.
    let rows = downloaded(&tc, &id, "scores", "results.csv");
    let want: String = (0..7)
        .map(|i| format!("img{i}.txt,{}\n", (i + 1) * 3))
        .collect();
    assert_eq!(rows, want);
    // init once per worker (4 at most: 2 instances x 2), not per mini-batch (4 of them).
    let inits = logs.lines().filter(|l| l.contains("init ")).count();
    assert!((1..=4).contains(&inits), "{inits} inits:\n{logs}");
    let pids: std::collections::BTreeSet<&str> = logs
        .lines()
        .filter_map(|l| l.split("init ").nth(1))
        .collect();
    assert_eq!(pids.len(), inits, "each init in its own worker:\n{logs}");
    assert!(logs.contains("shutdown"), "{logs}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_run_that_raises_fails_its_mini_batch_and_the_threshold_decides_the_job() {
    let tc = TestCluster::start().await;
    tc.create_cluster("cpu", &["--max-nodes", "2"]);
    let items = [
        ("a.txt", "1"),
        ("bad.txt", "2"),
        ("c.txt", "3"),
        ("d.txt", "4"),
    ];
    // No failed mini-batch tolerated: the job fails, saying why.
    let strict = run_function_job(
        &tc,
        "strict",
        &items,
        "mini_batch_error_threshold: 0\nretry_settings: {max_retries: 1, timeout: 30}\n",
    );
    let id = tc.submit_file(&strict);
    let shown = tc.wait_ended(&id, Duration::from_secs(120)).await;
    assert_eq!(shown["status"], "failed", "{shown:#}");
    let logs = tc.shoal(&["job", "logs", &id]);
    let logs = String::from_utf8_lossy(&logs.stdout).into_owned();
    assert!(logs.contains("ValueError: cannot score bad.txt"), "{logs}");
    // Any number tolerated: the other mini-batch's rows are kept.
    let lenient = run_function_job(
        &tc,
        "lenient",
        &items,
        "mini_batch_error_threshold: -1\nretry_settings: {max_retries: 1, timeout: 30}\n",
    );
    let id = tc.submit_file(&lenient);
    let shown = tc.wait_ended(&id, Duration::from_secs(120)).await;
    assert_eq!(shown["status"], "completed", "{shown:#}");
    assert_eq!(shown["progress"]["failed"], 1, "{shown:#}");
    let rows = downloaded(&tc, &id, "scores", "results.csv");
    assert_eq!(rows, "c.txt,9\nd.txt,12\n");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_parallel_step_scores_what_the_step_before_wrote_and_the_next_step_reads_its_rows() {
    let tc = TestCluster::start().await;
    tc.create_cluster("cpu", &["--max-nodes", "3"]);
    let file = pipeline_file(
        &tc,
        "batch-pipeline",
        "$schema: https://azuremlschemas.azureedge.net/latest/pipelineJob.schema.json\n\
         type: pipeline\ncompute: cpu\n\
         inputs: {scale: 3}\n\
         outputs: {summary: }\n\
         jobs:\n\
         \x20 prep:\n\
         \x20   command: for i in 0 1 2 3 4 5 6; do echo $((i + 1)) > ${{outputs.images}}/img$i.txt; done\n\
         \x20   environment: host\n\
         \x20   outputs: {images: {type: uri_folder}}\n\
         \x20 score:\n\
         \x20   type: parallel\n\
         \x20   inputs:\n\
         \x20     images: {type: uri_folder, path: '${{parent.jobs.prep.outputs.images}}'}\n\
         \x20     scale: ${{parent.inputs.scale}}\n\
         \x20   outputs: {scores: {type: uri_folder}}\n\
         \x20   input_data: ${{inputs.images}}\n\
         \x20   mini_batch_size: \"2\"\n\
         \x20   resources: {instance_count: 2}\n\
         \x20   max_concurrency_per_instance: 2\n\
         \x20   task:\n\
         \x20     type: run_function\n\
         \x20     code: ./src\n\
         \x20     entry_script: score.py\n\
         \x20     environment: host\n\
         \x20     program_arguments: --scale ${{inputs.scale}}\n\
         \x20     append_row_to: ${{outputs.scores}}/results.csv\n\
         \x20 summarize:\n\
         \x20   command: wc -l < ${{inputs.scores}}/results.csv > ${{outputs.summary}}/count.txt && cp ${{inputs.scores}}/results.csv ${{outputs.summary}}/\n\
         \x20   environment: host\n\
         \x20   inputs: {scores: '${{parent.jobs.score.outputs.scores}}'}\n\
         \x20   outputs: {summary: '${{parent.outputs.summary}}'}\n",
    );
    let dir = file.parent().expect("folder");
    std::fs::create_dir_all(dir.join("src")).expect("code");
    std::fs::write(dir.join("src/score.py"), SCORE).expect("entry script");
    let id = tc.submit_file(&file);
    let shown = tc.wait_ended(&id, Duration::from_secs(120)).await;
    assert_eq!(
        shown["status"],
        "completed",
        "{shown:#}\n{}\n{}",
        logs_of(&tc, &shown),
        tc.coordinator_log()
    );
    let score = tc.shoal_json(&[
        "job",
        "show",
        step(&shown, "score")["id"].as_str().expect("id"),
    ]);
    assert_eq!(score["progress"]["done"], 4, "{score:#}");
    assert_eq!(score["progress"]["items_done"], 7, "{score:#}");
    let into = tc.scratch("batch-summary");
    let out = tc.shoal(&["job", "download", &id, "-p", into.to_str().expect("utf8")]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let summary = into.join(&id).join("named-outputs/summary");
    let rows = std::fs::read_to_string(summary.join("results.csv")).expect("rows");
    let want: String = (0..7)
        .map(|i| format!("img{i}.txt,{}\n", (i + 1) * 3))
        .collect();
    assert_eq!(rows, want);
    let count = std::fs::read_to_string(summary.join("count.txt")).expect("count");
    assert_eq!(count.trim(), "7");
    // The same pipeline again: every step reused, the parallel step without a cut.
    let again = tc.submit_file(&file);
    let shown = tc.wait_ended(&again, Duration::from_secs(60)).await;
    assert_eq!(shown["status"], "completed", "{shown:#}");
    assert_eq!(shown["reason"], "3 of 3 step(s) reused");
}

const TABLE_SCORE: &str = r#"
def init():
    pass

def run(mini_batch):
    # A DataFrame: one mini-batch per store (partition_keys), or rows as cut.
    if "store" in mini_batch.columns:
        totals = mini_batch.groupby("store", as_index=False, sort=False)["qty"].sum()
        totals["rows"] = len(mini_batch)
        return totals
    mini_batch["double"] = mini_batch["b"] * 2
    return mini_batch
"#;

#[tokio::test(flavor = "multi_thread")]
async fn run_function_gives_tables_as_dataframes_by_partition_keys_and_reads_mltable_folders() {
    let tc = TestCluster::start().await;
    tc.create_cluster("cpu", &["--max-nodes", "1"]);
    let python = support::test_python();
    let prefix = python
        .parent()
        .and_then(|bin| bin.parent())
        .expect("the venv")
        .display()
        .to_string();
    let dir = tc.scratch("tables");
    std::fs::create_dir_all(dir.join("src")).expect("code");
    std::fs::create_dir_all(dir.join("table/more")).expect("mltable folder");
    std::fs::write(dir.join("src/score.py"), TABLE_SCORE).expect("entry script");
    std::fs::write(
        dir.join("sales.csv"),
        "store,item,qty\nb,\"x, y\",1\na,z,2\nb,u,3\na,w,4\nc,v,5\n",
    )
    .expect("csv");
    std::fs::write(
        dir.join("table/MLTable"),
        "paths:\n  - file: ./part1.tsv\n  - folder: ./more\ntransformations:\n  - read_delimited:\n      delimiter: \"\\t\"\n      header: all_files_same_headers\n",
    )
    .expect("MLTable");
    std::fs::write(dir.join("table/part1.tsv"), "a\tb\n1\t2\n3\t4\n").expect("part1");
    std::fs::write(dir.join("table/more/part2.tsv"), "a\tb\n5\t6\n").expect("part2");
    let job = |name: &str, input: &str, rest: &str| {
        let file = dir.join(format!("{name}.yml"));
        std::fs::write(
            &file,
            format!(
                "type: parallel\ncompute: cpu\n\
                 inputs: {{data: {input}}}\n\
                 outputs: {{scores: {{type: uri_folder}}}}\n\
                 input_data: ${{{{inputs.data}}}}\n{rest}\
                 task:\n\
                 \x20 type: run_function\n\
                 \x20 code: ./src\n\
                 \x20 entry_script: score.py\n\
                 \x20 environment: {{host: {{prefix: {prefix}}}}}\n\
                 \x20 append_row_to: ${{{{outputs.scores}}}}/results.csv\n"
            ),
        )
        .expect("job file");
        file
    };
    let rows_of = |id: &str, _: &str| downloaded(&tc, id, "scores", "results.csv");
    let by_store = tc.submit_file(&job(
        "by-store",
        "{type: uri_file, path: ./sales.csv}",
        "partition_keys: [store]\nmini_batch_size: \"10\"\n",
    ));
    let shown = tc.wait_ended(&by_store, Duration::from_secs(120)).await;
    let logs = tc.shoal(&["job", "logs", &by_store]);
    assert_eq!(
        shown["status"],
        "completed",
        "{shown:#}\n{}",
        String::from_utf8_lossy(&logs.stdout)
    );
    assert_eq!(
        shown["progress"]["done"], 3,
        "one mini-batch per store: {shown:#}"
    );
    assert_eq!(rows_of(&by_store, "by-store-rows"), "b,4,2\na,6,2\nc,5,1\n");

    let mltable = tc.submit_file(&job(
        "mltable",
        "{type: mltable, path: ./table}",
        "mini_batch_size: \"2\"\n",
    ));
    let shown = tc.wait_ended(&mltable, Duration::from_secs(120)).await;
    assert_eq!(shown["status"], "completed", "{shown:#}");
    assert_eq!(shown["progress"]["done"], 2, "{shown:#}");
    assert_eq!(rows_of(&mltable, "mltable-rows"), "1,2,4\n3,4,8\n5,6,12\n");

    // Grouping needs a table: a folder input with partition_keys is refused.
    let refused = tc.shoal(&[
        "job",
        "submit",
        "-f",
        job(
            "bad",
            "{type: uri_folder, path: ./src}",
            "partition_keys: [store]\n",
        )
        .to_str()
        .expect("utf8"),
    ]);
    assert!(!refused.status.success());
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("partition_keys group a table's rows")
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn items_run_gives_no_result_for_count_against_error_threshold() {
    let tc = TestCluster::start().await;
    tc.create_cluster("cpu", &["--max-nodes", "2"]);
    let items = [
        ("a.txt", "1"),
        ("skip1.txt", "2"),
        ("c.txt", "3"),
        ("skip2.txt", "4"),
    ];
    // Two items without a result, one tolerated: the job fails, saying so.
    let strict = run_function_job(&tc, "items-strict", &items, "error_threshold: 1\n");
    let id = tc.submit_file(&strict);
    let shown = tc.wait_ended(&id, Duration::from_secs(120)).await;
    assert_eq!(shown["status"], "failed", "{shown:#}");
    assert!(
        shown["reason"]
            .as_str()
            .is_some_and(|r| r.starts_with("2 item(s) failed, above error_threshold 1")),
        "{shown:#}"
    );
    // -1: failed items are ignored; the rows of the others are kept.
    let lenient = run_function_job(&tc, "items-lenient", &items, "error_threshold: -1\n");
    let id = tc.submit_file(&lenient);
    let shown = tc.wait_ended(&id, Duration::from_secs(120)).await;
    assert_eq!(shown["status"], "completed", "{shown:#}");
    let rows = downloaded(&tc, &id, "scores", "results.csv");
    assert_eq!(rows, "a.txt,3\nc.txt,9\n");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_parallel_component_scores_a_steps_output_from_its_file_and_registered() {
    let tc = TestCluster::start().await;
    tc.create_cluster("cpu", &["--max-nodes", "2"]);
    let dir = tc.scratch("parallel-component");
    std::fs::create_dir_all(dir.join("components/src")).expect("component folders");
    std::fs::write(dir.join("components/src/score.py"), SCORE).expect("entry script");
    let component = dir.join("components/score.yml");
    std::fs::write(
        &component,
        "$schema: https://azuremlschemas.azureedge.net/latest/parallelComponent.schema.json\n\
         type: parallel\nname: score_images\nversion: 1\n\
         inputs:\n  images: {type: uri_folder}\n  scale: {type: integer, default: 1}\n\
         outputs:\n  scores: {type: uri_folder}\n\
         input_data: ${{inputs.images}}\n\
         mini_batch_size: \"1\"\n\
         resources: {instance_count: 2}\n\
         retry_settings: {max_retries: 1, timeout: 60}\n\
         task:\n\
         \x20 type: run_function\n\
         \x20 code: ./src\n\
         \x20 entry_script: score.py\n\
         \x20 environment: host\n\
         \x20 program_arguments: --scale ${{inputs.scale}}\n\
         \x20 append_row_to: ${{outputs.scores}}/results.csv\n",
    )
    .expect("component");
    let pipeline = |reference: &str| {
        format!(
            "type: pipeline\ncompute: cpu\nsettings: {{force_rerun: true}}\noutputs: {{scores: }}\njobs:\n\
             \x20 prep:\n\
             \x20   command: for i in 0 1 2; do echo $((i + 1)) > ${{{{outputs.images}}}}/img$i.txt; done\n\
             \x20   environment: host\n\
             \x20   outputs: {{images: {{type: uri_folder}}}}\n\
             \x20 score:\n\
             \x20   component: {reference}\n\
             \x20   mini_batch_size: \"2\"\n\
             \x20   inputs: {{images: '${{{{parent.jobs.prep.outputs.images}}}}', scale: 10}}\n\
             \x20   outputs: {{scores: '${{{{parent.outputs.scores}}}}'}}\n"
        )
    };
    let check = |id: &str, _: &str| {
        let rows = downloaded(&tc, id, "scores", "results.csv");
        assert_eq!(rows, "img0.txt,10\nimg1.txt,20\nimg2.txt,30\n");
    };
    // From its file (the step's mini_batch_size wins over the component's).
    let file = dir.join("from-file.yml");
    std::fs::write(&file, pipeline("./components/score.yml")).expect("pipeline");
    let id = tc.submit_file(&file);
    let shown = tc.wait_ended(&id, Duration::from_secs(120)).await;
    assert_eq!(
        shown["status"],
        "completed",
        "{shown:#}\n{}",
        logs_of(&tc, &shown)
    );
    let score = tc.shoal_json(&[
        "job",
        "show",
        step(&shown, "score")["id"].as_str().expect("id"),
    ]);
    assert_eq!(
        score["progress"]["done"], 2,
        "2 mini-batches of at most 2: {score:#}"
    );
    check(&id, "from-file-rows");
    // Registered: its task's code is the coordinator's copy.
    let made = tc.shoal_json(&[
        "component",
        "create",
        "-f",
        component.to_str().expect("utf8"),
    ]);
    assert_eq!(made[0]["name"], "score_images");
    assert_eq!(made[0]["has_code"], true);
    std::fs::remove_dir_all(dir.join("components")).expect("gone from here");
    let file = dir.join("registered.yml");
    std::fs::write(&file, pipeline("azureml:score_images:1")).expect("pipeline");
    let id = tc.submit_file(&file);
    let shown = tc.wait_ended(&id, Duration::from_secs(120)).await;
    assert_eq!(
        shown["status"],
        "completed",
        "{shown:#}\n{}",
        logs_of(&tc, &shown)
    );
    check(&id, "registered-rows");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_sweep_steps_trial_may_be_a_component_file_given_its_inputs_and_the_search_space() {
    let tc = TestCluster::start().await;
    tc.create_cluster("cpu", &["--max-nodes", "3"]);
    let file = pipeline_file(
        &tc,
        "sweep-component",
        "type: pipeline\ncompute: cpu\njobs:\n\
         \x20 prep: {command: 'echo 3 > ${{outputs.data}}/target', environment: host, outputs: {data: }}\n\
         \x20 tune:\n\
         \x20   type: sweep\n\
         \x20   trial: ./components/tune.yml\n\
         \x20   inputs: {data: '${{parent.jobs.prep.outputs.data}}', x: '${{search_space.x}}'}\n\
         \x20   search_space: {x: {type: choice, values: [1, 3, 5]}}\n\
         \x20   sampling_algorithm: grid\n\
         \x20   objective: {goal: minimize, primary_metric: loss}\n\
         \x20   limits: {max_total_trials: 3, max_concurrent_trials: 3}\n\
         \x20 report:\n\
         \x20   command: cat ${{inputs.best}}/x.txt\n\
         \x20   environment: host\n\
         \x20   inputs: {best: '${{parent.jobs.tune.outputs.best}}'}\n",
    );
    let components = file.parent().expect("folder").join("components");
    std::fs::create_dir_all(components.join("train")).expect("code folder");
    std::fs::write(components.join("train/main.py"), TUNE).expect("script");
    std::fs::write(
        components.join("tune.yml"),
        format!(
            "$schema: https://azuremlschemas.azureedge.net/latest/commandComponent.schema.json\n\
             type: command\nname: tune_x\n\
             inputs: {{x: {{type: number}}, data: {{type: uri_folder}}}}\n\
             outputs: {{best: {{type: uri_folder}}}}\n\
             code: ./train\nenvironment: host\n\
             command: {} main.py --x ${{{{inputs.x}}}} --data ${{{{inputs.data}}}} --out ${{{{outputs.best}}}}\n",
            support::test_python().display()
        ),
    )
    .expect("component");
    let id = tc.submit_file(&file);
    let shown = tc.wait_ended(&id, Duration::from_secs(180)).await;
    assert_eq!(
        shown["status"],
        "completed",
        "{shown:#}\n{}",
        logs_of(&tc, &shown)
    );
    let tune = step(&shown, "tune")["id"].as_str().expect("id").to_string();
    let sweep = tc.shoal_json(&["job", "show", &tune]);
    assert_eq!(sweep["sweep"]["trials"].as_array().map(Vec::len), Some(3));
    let report = step(&shown, "report")["id"]
        .as_str()
        .expect("id")
        .to_string();
    let logs = tc.shoal(&["job", "logs", &report]);
    assert_eq!(String::from_utf8_lossy(&logs.stdout).trim(), "3");
}
