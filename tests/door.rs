//! The door: the managed service's job files, environments, data and `az ml`
//! command lines, end to end on real agents (processes and Docker containers),
//! through the CLI and the HTTP API alike.

mod support;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use support::{TestCluster, docker_ready};

const LIMIT: Duration = Duration::from_secs(60);
const CONFIG: &str = "job_stop_grace_seconds: 1\n";

fn write(path: &Path, text: &str) -> String {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).expect("dir");
    }
    std::fs::write(path, text).expect("write");
    path.to_str().expect("utf8").to_string()
}

/// Runs a CLI command that must succeed; its stdout and stderr.
fn ok(tc: &TestCluster, args: &[&str]) -> (String, String) {
    let output = tc.shoal(args);
    let stdout = String::from_utf8_lossy(&output.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(
        output.status.success(),
        "shoal {args:?} failed: {stderr}\n{stdout}\n{}",
        tc.coordinator_log()
    );
    (stdout, stderr)
}

/// Runs a CLI command that must fail; its error line.
fn refused(tc: &TestCluster, args: &[&str]) -> String {
    let output = tc.shoal(args);
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(!output.status.success(), "shoal {args:?} should fail");
    assert!(!stderr.contains("panicked"), "{stderr}");
    stderr
}

/// Submits a job file with `--wait` (and more args); the finished job, which
/// must have completed.
fn run_file(tc: &TestCluster, file: &str, more: &[&str]) -> serde_json::Value {
    let mut args = vec!["job", "submit", "-f", file, "--wait"];
    args.extend_from_slice(more);
    let job = tc.shoal_json(&args);
    assert_eq!(
        job["status"],
        "completed",
        "{job:#}\n{}",
        tc.coordinator_log()
    );
    job
}

fn logs(tc: &TestCluster, id: &str) -> String {
    ok(tc, &["job", "logs", id]).0
}

fn id(job: &serde_json::Value) -> String {
    job["id"].as_str().expect("job id").to_string()
}

async fn wait_done(tc: &TestCluster, id: &str) -> shoal_proto::v1::Job {
    tc.wait_job(id, "the job ends", LIMIT, |j| {
        matches!(j.status.as_str(), "completed" | "failed" | "canceled")
    })
    .await
}

#[tokio::test]
async fn literal_and_file_inputs_reach_the_command_and_named_outputs_come_back() {
    let tc = TestCluster::start_with_config(CONFIG).await;
    tc.create_cluster("cpu", &["--max-nodes", "1"]);
    let dir = tc.scratch("project");
    write(
        &dir.join("data/iris.csv"),
        "5.1,3.5,setosa\n7.0,3.2,versicolor\n",
    );
    write(&dir.join("data/more/extra.txt"), "in the folder\n");
    let file = write(
        &dir.join("jobs/job.yml"),
        "$schema: https://azuremlschemas.azureedge.net/latest/commandJob.schema.json\n\
         command: >-\n  \
           echo lr=${{inputs.lr}} epochs=${{inputs.epochs}} fast=${{inputs.fast}} [seed=${{inputs.seed}}] &&\n  \
           cat ${{inputs.iris}} && cat ${{inputs.folder}}/more/extra.txt &&\n  \
           echo weights > ${{outputs.model}}/weights.txt && echo run1 > ${{outputs.results}}/run.txt &&\n  \
           echo log > outputs/log.txt\n\
         inputs:\n  lr: 0.01\n  epochs: 2\n  fast: true\n  \
           iris: {type: uri_file, path: ../data/iris.csv, mode: download}\n  \
           folder: {type: uri_folder, path: ../data}\n\
         outputs:\n  model:\n  results:\n    type: uri_folder\n    path: azureml://datastores/workspaceblobstore/paths/runs/\n\
         compute: azureml:cpu\n\
         queue_settings: {job_tier: standard}\n",
    );
    let (stdout, stderr) = ok(
        &tc,
        &[
            "-o",
            "json",
            "job",
            "submit",
            "-f",
            &file,
            "--set",
            "inputs.epochs=3",
            "--wait",
        ],
    );
    assert!(
        stderr.contains("warning: queue_settings"),
        "the warning is printed: {stderr}"
    );
    let job: serde_json::Value = serde_json::from_str(&stdout).expect("json");
    assert_eq!(job["status"], "completed", "{job:#}");
    assert_eq!(job["warnings"].as_array().map(Vec::len), Some(1), "{job:#}");
    let job_id = id(&job);
    let log = logs(&tc, &job_id);
    assert!(
        log.contains("lr=0.01 epochs=3 fast=true \n")
            || log.contains("lr=0.01 epochs=3 fast=true\n"),
        "literals substituted, --set applied, the optional seed dropped: {log}"
    );
    assert!(log.contains("7.0,3.2,versicolor"), "the file input: {log}");
    assert!(log.contains("in the folder"), "the folder input: {log}");

    // `--output-name` downloads that output alone; `--all` everything.
    let into = tc.scratch("named");
    let into_text = into.to_str().expect("utf8");
    ok(
        &tc,
        &[
            "job",
            "download",
            &job_id,
            "--output-name",
            "model",
            "-p",
            into_text,
        ],
    );
    let weights = into.join(&job_id).join("named-outputs/model/weights.txt");
    assert_eq!(
        std::fs::read_to_string(&weights).expect("weights"),
        "weights\n"
    );
    assert!(
        !into.join(&job_id).join("instance-0").exists(),
        "only the named output"
    );
    let all = tc.scratch("all");
    ok(
        &tc,
        &[
            "ml",
            "job",
            "download",
            "-n",
            &job_id,
            "--all",
            "--download-path",
            all.to_str().expect("utf8"),
        ],
    );
    assert!(all.join(&job_id).join("instance-0/log.txt").exists());
    assert!(
        all.join(&job_id)
            .join("named-outputs/model/weights.txt")
            .exists()
    );
    let missing = refused(
        &tc,
        &[
            "job",
            "download",
            &job_id,
            "--output-name",
            "nope",
            "-p",
            into_text,
        ],
    );
    assert!(
        missing.contains("no output named `nope`") && missing.contains("model, results"),
        "{missing}"
    );
    // The output whose path names a datastore is written there too.
    let run = tc
        .data_dir()
        .join("datastores/workspaceblobstore/runs/run.txt");
    assert_eq!(
        std::fs::read_to_string(&run).expect("on the datastore"),
        "run1\n"
    );

    // Over HTTP: the same job file as JSON, the named output as tar.gz.
    let token = tc.admin_token();
    let body = serde_json::json!({
        "command": "echo http lr=${{inputs.lr}} && cat ${{inputs.rows}} && echo hi > ${{outputs.out}}/hi.txt",
        "inputs": {
            "lr": 0.5,
            "rows": {"type": "uri_file", "path": "azureml://datastores/workspaceblobstore/paths/runs/rows.txt"},
        },
        "outputs": {"out": null},
        "compute": "azureml:cpu",
    });
    std::fs::write(
        tc.data_dir()
            .join("datastores/workspaceblobstore/runs/rows.txt"),
        "row one\n",
    )
    .expect("rows");
    let (code, created) = tc
        .http("POST", "/api/v1/jobs", Some(&token), &body.to_string())
        .await;
    assert_eq!(code, 201, "{created}");
    let created: serde_json::Value = serde_json::from_str(&created).expect("json");
    let http_id = id(&created);
    let done = wait_done(&tc, &http_id).await;
    assert_eq!(done.status, "completed", "{done:#?}");
    let log = logs(&tc, &http_id);
    assert!(
        log.contains("http lr=0.5") && log.contains("row one"),
        "{log}"
    );
    let (code, archive) = tc
        .http(
            "GET",
            &format!("/api/v1/jobs/{http_id}/named-outputs/out"),
            Some(&token),
            "",
        )
        .await;
    assert_eq!(code, 200);
    assert!(!archive.is_empty());
    // A local path cannot come over HTTP: it says what to use instead.
    let local = serde_json::json!({
        "command": "cat ${{inputs.d}}",
        "inputs": {"d": {"type": "uri_file", "path": "./iris.csv"}},
        "compute": "cpu",
    });
    let (code, why) = tc
        .http("POST", "/api/v1/jobs", Some(&token), &local.to_string())
        .await;
    assert_eq!(code, 400, "{why}");
    assert!(why.contains("datastore") && why.contains("URL"), "{why}");
}

/// A one-route HTTPS server with a CA of its own; counts the requests.
async fn https_server(dir: &Path, body: &'static str) -> (u16, Arc<AtomicUsize>) {
    let files =
        shoal_coordinator::tls::self_signed(dir, &["127.0.0.1".to_string()]).expect("certificates");
    let hits = Arc::new(AtomicUsize::new(0));
    let counter = hits.clone();
    let app = axum::Router::new().route(
        "/datasets/iris.csv",
        axum::routing::get(move || {
            counter.fetch_add(1, Ordering::SeqCst);
            async move { body }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let port = listener.local_addr().expect("address").port();
    let tls = shoal_coordinator::tls::TlsListener::new(listener, &files).expect("tls");
    tokio::spawn(async move {
        let _ = axum::serve(tls, app).await;
    });
    (port, hits)
}

// The server runs on the test's runtime while the CLI blocks a thread.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_input_is_fetched_by_the_node_once() {
    let certs = tempfile::tempdir().expect("tempdir");
    let (port, hits) = https_server(certs.path(), "sepal,petal\n5.1,1.4\n").await;
    let ca = certs.path().join("ca.pem");
    // The nodes trust the server's CA as they would a site's: SSL_CERT_FILE.
    let tc =
        TestCluster::start_full(CONFIG, &[("SSL_CERT_FILE", ca.to_str().expect("utf8"))]).await;
    tc.create_cluster(
        "cpu",
        &["--max-nodes", "1", "--idle-seconds-before-scaledown", "60"],
    );
    let file = write(
        &tc.scratch("url.yml"),
        &format!(
            "command: wc -l < ${{{{inputs.iris}}}} && cat ${{{{inputs.iris}}}}\n\
             inputs:\n  iris:\n    type: uri_file\n    path: https://127.0.0.1:{port}/datasets/iris.csv\n\
             compute: cpu\n"
        ),
    );
    let first = run_file(&tc, &file, &[]);
    let second = run_file(&tc, &file, &[]);
    for job in [&first, &second] {
        let log = logs(&tc, &id(job));
        assert!(log.contains("5.1,1.4"), "{log}");
    }
    assert_eq!(
        first["instances"][0]["node"], second["instances"][0]["node"],
        "one node ran both"
    );
    assert_eq!(
        hits.load(Ordering::SeqCst),
        1,
        "the node's cache served the second job"
    );
}

#[tokio::test]
async fn datastore_and_data_asset_inputs_resolve_with_their_modes() {
    let tc = TestCluster::start_with_config(CONFIG).await;
    tc.create_cluster("cpu", &["--max-nodes", "1"]);
    let lake = tc.scratch("lake");
    write(&lake.join("cifar/labels.txt"), "cat\ndog\n");
    let (stdout, _) = ok(
        &tc,
        &[
            "datastore",
            "create",
            "--name",
            "lake",
            "--path",
            lake.to_str().expect("utf8"),
        ],
    );
    assert!(stdout.contains("lake"), "{stdout}");
    let listed = tc.shoal_json(&["datastore", "list"]);
    let names: Vec<&str> = listed
        .as_array()
        .expect("list")
        .iter()
        .filter_map(|d| d["name"].as_str())
        .collect();
    assert_eq!(
        names,
        vec!["lake", "workspaceartifactstore", "workspaceblobstore"]
    );

    let csv = write(&tc.scratch("local/iris.csv"), "iris from an asset\n");
    let made = tc.shoal_json(&[
        "data", "create", "--name", "iris", "--type", "uri_file", "--path", &csv,
    ]);
    assert_eq!(made[0]["version"], "1");
    let data_file = write(
        &tc.scratch("local/labels.yml"),
        "$schema: https://azuremlschemas.azureedge.net/latest/data.schema.json\n\
         name: labels\nversion: 7\ntype: uri_folder\npath: azureml://datastores/lake/paths/cifar\n",
    );
    let made = tc.shoal_json(&[
        "ml", "data", "create", "-f", &data_file, "-g", "rg", "-w", "ws",
    ]);
    assert_eq!(made[0]["version"], "7");

    let file = write(
        &tc.scratch("job.yml"),
        "command: cat ${{inputs.labels}}/labels.txt ${{inputs.iris}} && echo direct=${{inputs.uri}}\n\
         inputs:\n  \
           labels: {path: 'azureml:labels@latest', mode: ro_mount}\n  \
           iris: {type: uri_file, path: 'azureml:iris:1', mode: download}\n  \
           uri: {type: uri_folder, path: 'azureml://datastores/lake/paths/cifar', mode: direct}\n\
         compute: cpu\n",
    );
    let job = run_file(&tc, &file, &[]);
    let log = logs(&tc, &id(&job));
    assert!(
        log.contains("cat\ndog\n"),
        "the datastore folder through its asset: {log}"
    );
    assert!(
        log.contains("iris from an asset"),
        "the uploaded asset: {log}"
    );
    assert!(
        log.contains("direct=azureml://datastores/lake/paths/cifar"),
        "direct mode passes the URI: {log}"
    );
    assert_eq!(job["inputs"]["iris"]["uri"], "azureml:iris:1", "{job:#}");
    // A read-only input stays as it was on the datastore, whatever the job does.
    let scribble = write(
        &tc.scratch("scribble.yml"),
        "command: echo mine > ${{inputs.labels}}/labels.txt; cat ${{inputs.labels}}/labels.txt\n\
         inputs:\n  labels: {type: uri_folder, path: 'azureml://datastores/lake/paths/cifar', mode: rw_mount}\n\
         compute: cpu\n",
    );
    let (_, stderr) = ok(&tc, &["job", "submit", "-f", &scribble, "--wait"]);
    assert!(stderr.contains("rw_mount"), "{stderr}");
    assert_eq!(
        std::fs::read_to_string(lake.join("cifar/labels.txt")).expect("labels"),
        "cat\ndog\n"
    );

    // Over HTTP: a data asset from a datastore path, then a job reading it.
    let token = tc.admin_token();
    let (code, body) = tc
        .http("POST", "/api/v1/data", Some(&token), r#"{"name": "cifar", "type": "uri_folder", "path": "azureml://datastores/lake/paths/cifar"}"#)
        .await;
    assert_eq!(code, 201, "{body}");
    let job = serde_json::json!({
        "command": "cat ${{inputs.d}}/labels.txt",
        "inputs": {"d": {"path": "azureml:cifar@latest"}},
        "compute": "cpu",
    });
    let (code, body) = tc
        .http("POST", "/api/v1/jobs", Some(&token), &job.to_string())
        .await;
    assert_eq!(code, 201, "{body}");
    let http_id = id(&serde_json::from_str(&body).expect("json"));
    assert_eq!(wait_done(&tc, &http_id).await.status, "completed");
    assert!(logs(&tc, &http_id).contains("dog"));
}

#[tokio::test]
async fn built_registered_and_host_environments_run_the_job() {
    docker_ready();
    let tc = TestCluster::start_with_config(CONFIG).await;
    tc.create_cluster(
        "cpu",
        &["--max-nodes", "1", "--idle-seconds-before-scaledown", "60"],
    );
    // A build context FROM a local image, built now, its log streamed.
    let ctx = tc.scratch("ctx");
    write(
        &ctx.join("Dockerfile"),
        "FROM shoal/base\nCOPY greeting.txt /etc/greeting.txt\n",
    );
    let nonce = format!("built for {}\n", tc.port);
    write(&ctx.join("greeting.txt"), &nonce);
    let (stdout, stderr) = ok(
        &tc,
        &[
            "-o",
            "json",
            "environment",
            "create",
            "--name",
            "greeter",
            "--build-context",
            ctx.to_str().expect("utf8"),
        ],
    );
    assert!(
        stderr.contains("COPY greeting.txt"),
        "the build log streams: {stderr}"
    );
    let made: serde_json::Value = serde_json::from_str(&stdout).expect("json");
    assert_eq!(made[0]["version"], "1");
    let image = made[0]["image"].as_str().expect("image").to_string();
    assert!(image.starts_with("shoal-env:"), "{made:#}");

    let file = write(
        &tc.scratch("greet.yml"),
        "command: cat /etc/greeting.txt\nenvironment: azureml:greeter@latest\ncompute: cpu\n",
    );
    let job = run_file(&tc, &file, &[]);
    assert_eq!(
        logs(&tc, &id(&job)),
        nonce,
        "the job read the file the build added"
    );
    assert_eq!(job["environment"], "azureml:greeter:1", "{job:#}");

    // The service's curated names resolve through environments registered so.
    let curated = tc.shoal_json(&[
        "environment",
        "create",
        "--name",
        "AzureML-sklearn-1.5",
        "--image",
        "shoal/base",
    ]);
    assert_eq!(curated[0]["version"], "1");
    let file = write(
        &tc.scratch("curated.yml"),
        "command: test -f /.dockerenv && echo in a container\n\
         environment: azureml:AzureML-sklearn-1.5@latest\ncompute: cpu\n",
    );
    let job = run_file(&tc, &file, &[]);
    assert!(logs(&tc, &id(&job)).contains("in a container"));
    let unknown = write(
        &tc.scratch("unknown.yml"),
        "command: echo\nenvironment: azureml://registries/azureml/environments/tensorflow-2.16-cuda12/labels/latest\ncompute: cpu\n",
    );
    let e = refused(&tc, &["job", "submit", "-f", &unknown]);
    assert!(
        e.contains("shoal environment create --name tensorflow-2.16-cuda12"),
        "{e}"
    );

    // An inline build context in the job file (the same content: built once).
    let inline = write(
        &tc.scratch("inline.yml"),
        &format!(
            "command: cat /etc/greeting.txt\nenvironment:\n  build:\n    path: {}\ncompute: cpu\n",
            ctx.display()
        ),
    );
    let job = run_file(&tc, &inline, &[]);
    assert_eq!(logs(&tc, &id(&job)), nonce);

    // A conda file needs a package tool in the image: busybox has none.
    let conda = write(
        &tc.scratch("conda.yml"),
        "dependencies:\n  - python=3.11\n  - pip:\n    - numpy\n",
    );
    let e = refused(
        &tc,
        &[
            "environment",
            "create",
            "--name",
            "np",
            "--image",
            "shoal/base",
            "--conda-file",
            &conda,
        ],
    );
    assert!(e.contains("has no conda, mamba, micromamba or pip"), "{e}");

    // `host`: the node's own software, a prefix first on PATH.
    let prefix = tc.scratch("venv");
    write(
        &prefix.join("bin/site-tool"),
        "#!/bin/sh\necho site tool from $VIRTUAL_ENV\n",
    );
    std::fs::set_permissions(
        prefix.join("bin/site-tool"),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .expect("chmod");
    let made = tc.shoal_json(&[
        "environment",
        "create",
        "--name",
        "site",
        "--host",
        "--prefix",
        prefix.to_str().expect("utf8"),
    ]);
    assert_eq!(made[0]["host"], true);
    let file = write(
        &tc.scratch("host.yml"),
        "command: site-tool\nenvironment: azureml:site@latest\ncompute: cpu\n",
    );
    let job = run_file(&tc, &file, &[]);
    assert_eq!(
        logs(&tc, &id(&job)),
        format!("site tool from {}\n", prefix.display())
    );

    // Archived: `@latest` skips it; named by version it still runs.
    tc.shoal_json(&["environment", "create", "--name", "site", "--host"]);
    tc.shoal_json(&["environment", "archive", "site", "--version", "2"]);
    let shown = tc.shoal_json(&["environment", "show", "site"]);
    assert_eq!(shown[0]["version"], "1", "{shown:#}");

    // Over HTTP: an environment registered from its YAML, then used.
    let token = tc.admin_token();
    let (code, body) = tc
        .http(
            "POST",
            "/api/v1/environments",
            Some(&token),
            "name: http-env\nimage: shoal/base\n",
        )
        .await;
    assert_eq!(code, 201, "{body}");
    let job = serde_json::json!({"command": "test -f /.dockerenv && echo http container", "environment": "azureml:http-env@latest", "compute": "cpu"});
    let (code, body) = tc
        .http("POST", "/api/v1/jobs", Some(&token), &job.to_string())
        .await;
    assert_eq!(code, 201, "{body}");
    let http_id = id(&serde_json::from_str(&body).expect("json"));
    assert_eq!(wait_done(&tc, &http_id).await.status, "completed");
    assert!(logs(&tc, &http_id).contains("http container"));
}

#[tokio::test]
async fn a_job_with_no_compute_runs_on_the_default_one() {
    let tc = TestCluster::start_with_config(CONFIG).await;
    tc.create_cluster("cpu", &["--max-nodes", "1"]);
    let file = write(&tc.scratch("job.yml"), "command: echo on the default\n");
    let e = refused(&tc, &["job", "submit", "-f", &file]);
    assert!(e.contains("shoal configure --defaults compute=NAME"), "{e}");
    let e = refused(&tc, &["configure", "--defaults", "compute=nope"]);
    assert!(e.contains("nope"), "{e}");
    let (stdout, _) = ok(&tc, &["configure", "--defaults", "compute=cpu"]);
    assert_eq!(stdout, "compute=cpu\n");
    let job = run_file(&tc, &file, &[]);
    assert_eq!(job["cluster"], "cpu");
    // Over HTTP, the same default.
    let token = tc.admin_token();
    let (code, body) = tc.http("GET", "/api/v1/defaults", Some(&token), "").await;
    assert_eq!((code, body.as_str()), (200, r#"{"compute":"cpu"}"#));
    let (code, body) = tc
        .http(
            "POST",
            "/api/v1/jobs",
            Some(&token),
            r#"{"command": "echo http default"}"#,
        )
        .await;
    assert_eq!(code, 201, "{body}");
    let created: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(created["cluster"], "cpu");
    // The HTTP API and the CLI admit alike: a TensorFlow job with 2 workers and a
    // parameter server gets 3 instances, `instance_count: 0` is refused.
    tc.create_cluster("tf", &["--max-nodes", "3"]);
    let tf = r#"{"command": "echo $TF_CONFIG", "compute": "tf", "distribution": {"type": "tensorflow", "worker_count": 2, "parameter_server_count": 1}}"#;
    let (code, body) = tc.http("POST", "/api/v1/jobs", Some(&token), tf).await;
    assert_eq!(code, 201, "{body}");
    let created: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(created["instance_count"], 3, "{created:#}");
    let zero = r#"{"command": "echo", "compute": "cpu", "resources": {"instance_count": 0}}"#;
    let (code, body) = tc.http("POST", "/api/v1/jobs", Some(&token), zero).await;
    assert_eq!(code, 400);
    assert!(body.contains("instance_count"), "{body}");
    let tf_file = write(
        &tc.scratch("tf.yml"),
        "command: echo\ncompute: tf\ndistribution: {type: tensorflow, worker_count: 2, parameter_server_count: 1}\n",
    );
    let cli = tc.shoal_json(&["job", "submit", "-f", &tf_file]);
    assert_eq!(cli["instance_count"], 3);
    let zero_file = write(
        &tc.scratch("zero.yml"),
        "command: echo\ncompute: cpu\nresources: {instance_count: 0}\n",
    );
    assert!(refused(&tc, &["job", "submit", "-f", &zero_file]).contains("instance_count"));
}

#[tokio::test]
async fn the_seed_command_lines_work_after_shoal_ml() {
    let tc = TestCluster::start_with_config(CONFIG).await;
    let resource = "/subscriptions/0000-1111/resourcegroups/ml-rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/reader-bot";
    tc.shoal_json(&["identity", "create", "reader-bot"]);
    // The seed's lines, `az` replaced by `shoal` (placeholders filled in).
    let lines: Vec<Vec<&str>> = vec![
        vec![
            "ml",
            "computetarget",
            "create",
            "amlcompute",
            "-n",
            "cpu",
            "--min-nodes",
            "1",
            "--max-nodes",
            "1",
            "-s",
            "STANDARD_D3_V2",
        ],
        vec![
            "ml",
            "computetarget",
            "create",
            "amlcompute",
            "--name",
            "lowpriocluster",
            "--vm-size",
            "Standard_NC6",
            "--max-nodes",
            "5",
            "--vm-priority",
            "lowpriority",
        ],
        vec![
            "ml",
            "computetarget",
            "create",
            "amlcompute",
            "--name",
            "cpu-cluster",
            "--vm-size",
            "Standard_NC6",
            "--max-nodes",
            "5",
            "--assign-identity",
            resource,
        ],
        vec![
            "ml",
            "computetarget",
            "create",
            "amlcompute",
            "--name",
            "sys-cluster",
            "--vm-size",
            "Standard_NC6",
            "--max-nodes",
            "5",
            "--assign-identity",
            "[system]",
        ],
        vec![
            "ml",
            "computetarget",
            "amlcompute",
            "identity",
            "assign",
            "--name",
            "cpu-cluster",
            "[system]",
        ],
        vec![
            "ml",
            "computetarget",
            "amlcompute",
            "identity",
            "assign",
            "--name",
            "sys-cluster",
            resource,
        ],
    ];
    for line in &lines {
        ok(&tc, line);
    }
    let cpu = tc.shoal_json(&["ml", "computetarget", "show", "-n", "cpu"]);
    assert_eq!(
        (
            cpu["vm_size"].as_str(),
            cpu["min_nodes"].as_u64(),
            cpu["max_nodes"].as_u64()
        ),
        (Some("Standard_D3_v2"), Some(1), Some(1))
    );
    let low = tc.shoal_json(&["cluster", "show", "lowpriocluster"]);
    assert_eq!(low["vm_priority"], "lowpriority");
    for cluster in ["cpu-cluster", "sys-cluster"] {
        let shown = tc
            .shoal_json(&[
                "ml",
                "computetarget",
                "amlcompute",
                "identity",
                "show",
                "--name",
                cluster,
            ])
            .to_string();
        assert!(
            shown.contains("reader-bot") && shown.contains("SystemAssigned"),
            "{cluster}: {shown}"
        );
    }
    ok(
        &tc,
        &[
            "ml",
            "computetarget",
            "amlcompute",
            "identity",
            "remove",
            "--name",
            "cpu-cluster",
            "reader-bot",
        ],
    );
    let shown = tc
        .shoal_json(&[
            "ml",
            "computetarget",
            "amlcompute",
            "identity",
            "show",
            "--name",
            "cpu-cluster",
        ])
        .to_string();
    assert!(!shown.contains("reader-bot"), "{shown}");
    // A refused create creates nothing: an unknown identity leaves no cluster.
    let e = refused(
        &tc,
        &[
            "ml",
            "computetarget",
            "create",
            "amlcompute",
            "-n",
            "ghost",
            "-s",
            "Standard_D2_v2",
            "--assign-identity",
            "/subscriptions/0/resourcegroups/g/providers/Microsoft.ManagedIdentity/userAssignedIdentities/nobody",
        ],
    );
    assert!(e.contains("nobody"), "{e}");
    assert!(
        !tc.shoal(&["cluster", "show", "ghost"]).status.success(),
        "the refused create made a cluster"
    );
    let listed = tc.shoal_json(&["ml", "computetarget", "list"]);
    assert_eq!(listed.as_array().map(Vec::len), Some(4));

    // v2: compute, environment, data and job lines.
    let compute = write(
        &tc.scratch("compute.yml"),
        "$schema: https://azuremlschemas.azureedge.net/latest/amlCompute.schema.json\n\
         name: v2-cluster\ntype: amlcompute\nmin_instances: 0\nmax_instances: 2\nlocation: westeurope\n",
    );
    let (stdout, stderr) = ok(
        &tc,
        &[
            "-o", "json", "ml", "compute", "create", "-f", &compute, "-g", "rg", "-w", "ws",
        ],
    );
    assert!(stderr.contains("warning: location"), "{stderr}");
    let made: serde_json::Value = serde_json::from_str(&stdout).expect("json");
    assert_eq!(
        made["vm_size"], "Standard_DS3_v2",
        "the service's default size"
    );
    let updated = tc.shoal_json(&[
        "ml",
        "compute",
        "update",
        "-n",
        "v2-cluster",
        "--max-instances",
        "3",
    ]);
    assert_eq!(updated["max_nodes"], 3);
    let flags = tc.shoal_json(&[
        "ml",
        "compute",
        "create",
        "--name",
        "v2-flags",
        "--type",
        "amlcompute",
        "--max-instances",
        "1",
        "--tier",
        "low_priority",
        "--identity-type",
        "user_assigned",
        "--user-assigned-identities",
        resource,
    ]);
    assert_eq!(
        (flags["vm_size"].as_str(), flags["vm_priority"].as_str()),
        (Some("Standard_DS3_v2"), Some("lowpriority"))
    );
    let env_file = write(
        &tc.scratch("env.yml"),
        "name: AzureML-minimal\nversion: 1\nhost: true\n",
    );
    let env = tc.shoal_json(&["ml", "environment", "create", "-f", &env_file]);
    assert_eq!(env[0]["version"], "1");
    let shown = tc.shoal_json(&[
        "ml",
        "environment",
        "show",
        "-n",
        "AzureML-minimal",
        "-v",
        "1",
    ]);
    assert_eq!(shown[0]["host"], true);
    let job_file = write(
        &tc.scratch("job.yml"),
        "command: echo epochs=${{inputs.epochs}} > ${{outputs.out}}/epochs.txt && echo streamed\n\
         inputs: {epochs: 1}\noutputs: {out: }\nenvironment: azureml:AzureML-minimal@latest\ncompute: azureml:cpu\n",
    );
    let (stdout, _) = ok(
        &tc,
        &[
            "ml",
            "job",
            "create",
            "-f",
            &job_file,
            "--set",
            "inputs.epochs=3",
            "compute=v2-cluster",
            "--stream",
            "-g",
            "rg",
            "-w",
            "ws",
        ],
    );
    assert!(stdout.contains("streamed"), "the log streamed: {stdout}");
    let listed = tc.shoal_json(&["ml", "job", "list"]);
    let job_id = listed[0]["id"].as_str().expect("id").to_string();
    assert_eq!(listed[0]["cluster"], "v2-cluster", "--set compute=…");
    let shown = tc.shoal_json(&["ml", "job", "show", "-n", &job_id]);
    assert_eq!(shown["status"], "completed");
    let out = tc.scratch("out");
    ok(
        &tc,
        &[
            "ml",
            "job",
            "download",
            "-n",
            &job_id,
            "--output-name",
            "out",
            "--download-path",
            out.to_str().expect("utf8"),
        ],
    );
    assert_eq!(
        std::fs::read_to_string(out.join(&job_id).join("named-outputs/out/epochs.txt"))
            .expect("epochs"),
        "epochs=3\n"
    );
    let (stdout, _) = ok(&tc, &["ml", "job", "stream", "-n", &job_id]);
    assert!(stdout.contains("streamed"));
    // Cancel a job, queued or running.
    let slow = write(
        &tc.scratch("slow.yml"),
        "command: sleep 30\ncompute: v2-cluster\n",
    );
    let queued = tc.shoal_json(&["ml", "job", "create", "-f", &slow]);
    let canceled = tc.shoal_json(&[
        "ml",
        "job",
        "cancel",
        "-n",
        queued["id"].as_str().expect("id"),
    ]);
    assert!(
        matches!(canceled["status"].as_str(), Some("canceled" | "canceling")),
        "{canceled:#}"
    );
    ok(
        &tc,
        &["ml", "compute", "delete", "-n", "lowpriocluster", "--yes"],
    );
    ok(&tc, &["ml", "computetarget", "delete", "-n", "sys-cluster"]);
    assert!(
        !tc.shoal(&["cluster", "show", "lowpriocluster"])
            .status
            .success()
    );
}
