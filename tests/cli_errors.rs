//! Bad input, through the CLI: each exits non-zero, names the field and the
//! reason, and changes nothing.

mod support;

use support::TestCluster;

/// Runs a CLI command that must fail; returns its stderr.
fn refused(tc: &TestCluster, args: &[&str]) -> String {
    let output = tc.shoal(args);
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    assert!(
        !output.status.success(),
        "shoal {args:?} should fail; printed {}",
        String::from_utf8_lossy(&output.stdout)
    );
    assert!(stderr.starts_with("error: "), "shoal {args:?}: {stderr}");
    assert!(!stderr.contains("panicked"), "shoal {args:?}: {stderr}");
    stderr
}

fn assert_mentions(stderr: &str, words: &[&str]) {
    for word in words {
        assert!(stderr.contains(word), "expected `{word}` in: {stderr}");
    }
}

#[tokio::test]
async fn bad_input_is_refused_with_a_reason_and_stores_nothing() {
    let tc = TestCluster::start().await;
    tc.create_cluster("cpu", &["--max-nodes", "2"]);
    let create = |extra: &[&str]| {
        let mut args = vec!["cluster", "create"];
        args.extend_from_slice(extra);
        refused(&tc, &args)
    };

    let e = create(&["--name", "c2", "--vm-size", "Standard_D3_v9"]);
    assert_mentions(
        &e,
        &[
            "vm_size",
            "Standard_D3_v9",
            "did you mean",
            "Standard_D3_v2",
        ],
    );
    let e = create(&[
        "--name",
        "c2",
        "--vm-size",
        "Standard_D2_v2",
        "--min-nodes",
        "3",
        "--max-nodes",
        "2",
    ]);
    assert_mentions(&e, &["min_nodes", "max_nodes"]);
    let e = create(&[
        "--name",
        "c2",
        "--vm-size",
        "Standard_D2_v2",
        "--max-nodes",
        "101",
    ]);
    assert_mentions(&e, &["max_nodes", "100"]);
    let e = create(&["--name", "9lives", "--vm-size", "Standard_D2_v2"]);
    assert_mentions(&e, &["name", "start with a letter"]);
    let e = create(&["--name", "has_underscore", "--vm-size", "Standard_D2_v2"]);
    assert_mentions(&e, &["name", "letters, digits and hyphens"]);
    let e = create(&["--name", "cpu", "--vm-size", "Standard_D2_v2"]);
    assert_mentions(&e, &["cpu", "already exists"]);
    let e = create(&[
        "--name",
        "c2",
        "--vm-size",
        "Standard_D2_v2",
        "--vm-priority",
        "spot",
    ]);
    assert_mentions(&e, &["vm_priority", "spot"]);
    let e = create(&["--name", "c2"]);
    assert_mentions(&e, &["vm_size", "required"]);

    let e = refused(
        &tc,
        &["cluster", "update", "cpu", "--vm-size", "Standard_D3_v2"],
    );
    assert_mentions(&e, &["vm_size", "fixed when the cluster is created"]);
    let e = refused(&tc, &["cluster", "update", "cpu", "--tier", "lowpriority"]);
    assert_mentions(&e, &["vm_priority"]);
    let e = refused(&tc, &["cluster", "update", "cpu", "--min-nodes", "5"]);
    assert_mentions(&e, &["min_nodes"]);
    let e = refused(&tc, &["cluster", "delete", "nope"]);
    assert_mentions(&e, &["nope", "not found"]);
    let e = refused(&tc, &["cluster", "show", "nope"]);
    assert_mentions(&e, &["nope", "not found"]);

    let submit = |extra: &[&str]| {
        let mut args = vec!["job", "submit"];
        args.extend_from_slice(extra);
        refused(&tc, &args)
    };
    let e = submit(&["--cluster", "cpu"]);
    assert_mentions(&e, &["command"]);
    let e = submit(&["--cluster", "cpu", "--instance-count", "0", "--", "true"]);
    assert_mentions(&e, &["instance_count"]);
    let e = submit(&["--cluster", "cpu", "--instance-count", "3", "--", "true"]);
    assert_mentions(&e, &["instance_count", "max_nodes 2"]);
    let e = submit(&["--cluster", "nope", "--", "true"]);
    assert_mentions(&e, &["compute", "nope"]);
    let e = submit(&["--", "true"]);
    assert_mentions(&e, &["compute"]);

    let yaml = |name: &str, text: &str| {
        let path = tc.scratch(name);
        std::fs::write(&path, text).expect("write yaml");
        path.to_string_lossy().into_owned()
    };
    let unknown = yaml(
        "unknown.yaml",
        "command: echo hi\ncompute: cpu\nresources: {instance_cout: 2}\n",
    );
    let e = submit(&["-f", &unknown]);
    assert_mentions(&e, &["instance_cout"]);
    let top = yaml("top.yaml", "command: echo hi\ncompute: cpu\nretries: 3\n");
    let e = submit(&["-f", &top]);
    assert_mentions(&e, &["retries"]);
    let malformed = yaml("malformed.yaml", "command: [echo\ncompute: cpu\n");
    let e = submit(&["-f", &malformed]);
    assert_mentions(&e, &["job file"]);
    let e = submit(&["-f", &tc.scratch("absent.yaml").to_string_lossy()]);
    assert_mentions(&e, &["cannot read job file"]);
    let e = submit(&[
        "--cluster",
        "cpu",
        "--code",
        &tc.scratch("no-such-dir").to_string_lossy(),
        "--",
        "true",
    ]);
    assert_mentions(&e, &["code", "not a folder"]);

    for verb in ["show", "cancel", "logs"] {
        let e = refused(&tc, &["job", verb, "job-999"]);
        assert_mentions(&e, &["job-999", "not found"]);
    }

    // Nothing of the above was stored.
    let clusters = tc.shoal_json(&["cluster", "list"]);
    let names: Vec<&str> = clusters
        .as_array()
        .expect("list")
        .iter()
        .map(|c| c["name"].as_str().expect("name"))
        .collect();
    assert_eq!(names, vec!["cpu"]);
    assert_eq!(
        clusters[0]["min_nodes"], 0,
        "the refused update changed nothing"
    );
    assert_eq!(clusters[0]["vm_size"], "Standard_D2_v2");
    let jobs = tc.shoal_json(&["job", "list"]);
    assert_eq!(jobs.as_array().map(Vec::len), Some(0), "{jobs:#}");

    // The coordinator is still there and well.
    let sizes = tc.shoal_json(&["vm-size", "list"]);
    assert!(
        sizes
            .as_array()
            .expect("sizes")
            .iter()
            .any(|s| s["name"] == "Standard_NC6")
    );
}

#[tokio::test]
async fn an_unreachable_coordinator_is_named_with_what_to_do() {
    let output = std::process::Command::new(support::SHOAL)
        .args(["cluster", "list", "--endpoint", "127.0.0.1:1"])
        .output()
        .expect("run shoal");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("cannot reach the coordinator") && stderr.contains("shoal up"),
        "{stderr}"
    );
}

#[tokio::test]
async fn a_public_listen_address_is_refused_without_tls() {
    let output = std::process::Command::new(support::SHOAL)
        .args(["up", "--listen", "0.0.0.0:7999", "--data-dir"])
        .arg(std::env::temp_dir().join("shoal-never-used"))
        .output()
        .expect("run shoal");
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("TLS") && stderr.contains("127.0.0.1"),
        "{stderr}"
    );
}

#[tokio::test]
async fn a_compute_file_makes_a_cluster_flags_win_and_typos_are_refused() {
    let tc = TestCluster::start().await;
    let file = tc.scratch("compute.yml");
    std::fs::write(
        &file,
        "$schema: https://azuremlschemas.azureedge.net/latest/amlCompute.schema.json\n\
         type: amlcompute\nname: fromfile\nsize: STANDARD_D3_V2\n\
         min_instances: 0\nmax_instances: 3\nidle_time_before_scale_down: 30\n\
         tier: low_priority\ntags: {team: ml}\n",
    )
    .expect("file");
    let path = file.to_str().expect("utf8");
    let made = tc.shoal_json(&["cluster", "create", "-f", path, "--max-nodes", "2"]);
    assert_eq!(made["name"], "fromfile");
    assert_eq!(made["vm_size"], "Standard_D3_v2");
    assert_eq!(
        made["max_nodes"], 2,
        "the flag wins over the file: {made:#}"
    );
    assert_eq!(made["idle_seconds_before_scaledown"], 30);
    assert_eq!(made["vm_priority"], "lowpriority");
    assert_eq!(made["tags"]["team"], "ml");
    std::fs::write(&file, "name: typo\nsize: Standard_D2_v2\nmax_instance: 3\n").expect("file");
    let e = refused(&tc, &["cluster", "create", "-f", path]);
    assert_mentions(&e, &["max_instance"]);
    assert!(!tc.shoal(&["cluster", "show", "typo"]).status.success());
}
