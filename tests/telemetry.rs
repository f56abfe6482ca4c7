//! Telemetry end to end: no NVIDIA driver here, so nodes report 0 GPUs with the
//! reason and GPU jobs wait (or are refused); /metrics parses as Prometheus text.

mod support;

use std::time::Duration;

use support::TestCluster;

const LIMIT: Duration = Duration::from_secs(60);

#[tokio::test]
async fn without_a_driver_nodes_report_no_gpus_and_gpu_jobs_wait_or_are_refused() {
    let tc = TestCluster::start().await;
    tc.create_cluster("cpu", &["--min-nodes", "1", "--max-nodes", "1"]);
    tc.shoal_json(&[
        "cluster",
        "create",
        "--name",
        "gpu",
        "--vm-size",
        "Standard_NC6",
        "--max-nodes",
        "1",
    ]);

    // A CPU size has no GPUs: refused at submit, with the numbers.
    let out = tc.shoal(&[
        "job",
        "submit",
        "--cluster",
        "cpu",
        "--gpus-per-instance",
        "1",
        "--",
        "true",
    ]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("gpus_per_instance") && stderr.contains("Standard_D2_v2 with 0"),
        "{stderr}"
    );

    // A GPU size on a machine whose agent finds none: the job waits and says why.
    let id = tc.shoal_json(&[
        "job",
        "submit",
        "--cluster",
        "gpu",
        "--gpus-per-instance",
        "1",
        "--",
        "true",
    ])["id"]
        .as_str()
        .expect("id")
        .to_string();
    let job = tc
        .wait_job(&id, "the no-GPU reason", LIMIT, |j| {
            j.reason.starts_with("no node in cluster gpu has GPUs")
        })
        .await;
    assert!(
        job.reason.contains("NVML"),
        "the agent's own reason is named: {}",
        job.reason
    );
    assert_eq!(job.status, "queued");

    let nodes = tc.shoal_json(&["node", "list", "--cluster", "gpu"]);
    let node = &nodes[0];
    assert_eq!(node["gpus"].as_array().map(Vec::len), Some(0));
    assert!(
        node["gpu_reason"]
            .as_str()
            .is_some_and(|r| r.contains("NVML")),
        "{node:#}"
    );

    // CPU jobs run and keep a usage summary; nodes report their telemetry.
    let done = tc.shoal_json(&["job", "submit", "--cluster", "cpu", "--wait", "--", "true"]);
    assert_eq!(done["status"], "completed");
    assert!(done["instances"][0]["usage"].is_object(), "{done:#}");
    let cpu_node = tc
        .wait_job(
            done["id"].as_str().expect("id"),
            "settled",
            LIMIT,
            support::all_instances_ended,
        )
        .await
        .attempts[0]
        .instances[0]
        .node
        .clone();
    let shown =
        String::from_utf8_lossy(&tc.shoal(&["node", "show", &cpu_node]).stdout).into_owned();
    assert!(
        shown.contains("per core") && shown.contains("disk:") && shown.contains("gpus:      0"),
        "{shown}"
    );
}

#[tokio::test]
async fn metrics_parse_and_carry_node_and_job_states() {
    let tc = TestCluster::start().await;
    tc.create_cluster("m1", &["--min-nodes", "1", "--max-nodes", "2"]);
    tc.wait_cluster("m1", "a node up", LIMIT, |c| {
        c.current_node_count == 1 && c.allocation_state == "steady"
    })
    .await;
    let done = tc.shoal_json(&["job", "submit", "--cluster", "m1", "--wait", "--", "true"]);
    assert_eq!(done["status"], "completed");

    let body = http_get(&tc, "/metrics", OPENMETRICS).await;
    let lines = body.lines().map(|l| Ok(l.to_string()));
    let scrape = prometheus_parse::Scrape::parse(lines).expect("Prometheus text");
    let value = |name: &str, labels: &[(&str, &str)]| -> Option<f64> {
        scrape
            .samples
            .iter()
            .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .map(|s| match s.value {
                prometheus_parse::Value::Gauge(v)
                | prometheus_parse::Value::Counter(v)
                | prometheus_parse::Value::Untyped(v) => v,
                _ => f64::NAN,
            })
    };
    assert_eq!(
        value("shoal_nodes", &[("cluster", "m1"), ("state", "idle")]),
        Some(1.0),
        "{body}"
    );
    for state in ["running", "preparing", "leaving", "preempted", "unusable"] {
        assert!(
            value("shoal_nodes", &[("cluster", "m1"), ("state", state)]).is_some(),
            "{state}: {body}"
        );
    }
    assert_eq!(value("shoal_jobs", &[("state", "completed")]), Some(1.0));
    assert_eq!(value("shoal_jobs", &[("state", "queued")]), Some(0.0));
    assert_eq!(
        value("shoal_quota_used_cores", &[("scope", "total")]),
        Some(2.0)
    );
    assert!(
        value("shoal_control_batches_total", &[]).is_some_and(|v| v > 0.0),
        "{body}"
    );
    assert!(value("shoal_node_memory_bytes", &[("cluster", "m1")]).is_some_and(|v| v > 0.0));

    // The classic text format (no Accept header): what promtool lints, with the
    // series in the same order scrape after scrape.
    let text = http_get(&tc, "/metrics", None).await;
    promtool_accepts(&text);
    let series = |text: &str| -> Vec<String> {
        text.lines()
            .filter(|l| !l.starts_with('#'))
            .filter_map(|l| l.rsplit_once(' ').map(|(series, _)| series.to_string()))
            .collect()
    };
    let again = http_get(&tc, "/metrics", None).await;
    assert_eq!(series(&text), series(&again), "stable order");

    // The commit histogram counts commits, not passes: an idle loop still runs a
    // pass every half second (housekeeping), and those write nothing.
    let counts = |text: &str| -> (f64, f64) {
        let read = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().parse::<f64>().ok())
                .unwrap_or_else(|| panic!("no {name} in {text}"))
        };
        (
            read("shoal_control_batches_total "),
            read("shoal_store_commit_seconds_count "),
        )
    };
    let (passes, commits) = counts(&again);
    tokio::time::sleep(Duration::from_millis(1_600)).await;
    let (passes_later, commits_later) = counts(&http_get(&tc, "/metrics", None).await);
    assert!(commits > 0.0, "{again}");
    assert!(
        passes_later - passes >= 2.0,
        "passes {passes} then {passes_later}"
    );
    assert!(
        commits_later - commits < passes_later - passes,
        "an idle loop's passes counted as commits: {commits} then {commits_later}, passes {passes} then {passes_later}"
    );
}

const OPENMETRICS: Option<&str> = Some("application/openmetrics-text; version=1.0.0");

/// `promtool check metrics` (Debian's `prometheus`) finds nothing to say; without
/// promtool the test fails, saying so.
fn promtool_accepts(text: &str) {
    use std::io::Write;
    let spawned = std::process::Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn();
    let mut child = match spawned {
        Ok(child) => child,
        Err(e) => panic!(
            "this test needs promtool and it cannot run: {e} (apt-get install prometheus, or run the suite through .ci/run)"
        ),
    };
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(text.as_bytes())
        .expect("write");
    let out = child.wait_with_output().expect("promtool");
    assert!(
        out.status.success(),
        "promtool check metrics: {}{}\n{text}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

async fn http_get(tc: &TestCluster, path: &str, accept: Option<&str>) -> String {
    let bearer = format!("Bearer {}", tc.admin_token());
    let mut headers = vec![("Authorization", bearer.as_str())];
    headers.extend(accept.map(|a| ("Accept", a)));
    let got = support::request(&tc.endpoint(), "GET", path, &headers, "").await;
    assert_eq!(got.code, 200, "{}", got.head);
    let expected = match accept {
        Some(_) => "content-type: application/openmetrics-text",
        None => "content-type: text/plain; version=0.0.4",
    };
    assert!(
        got.head.to_ascii_lowercase().contains(expected),
        "{}",
        got.head
    );
    got.body
}
