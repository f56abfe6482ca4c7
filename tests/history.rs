//! History stays bounded: ended jobs page from the store, `shoal job delete` and
//! `job_retention_days` delete them with their logs, rows and files.
mod support;

use std::time::Duration;

use support::TestCluster;

const LIMIT: Duration = Duration::from_secs(60);

fn submit_wait(tc: &TestCluster, args: &[&str]) -> String {
    let mut all = vec!["job", "submit", "--cluster", "hist", "--wait"];
    all.extend_from_slice(args);
    let job = tc.shoal_json(&all);
    assert_eq!(job["status"], "completed", "{job:#}");
    job["id"].as_str().expect("id").to_string()
}

/// The files of a job the coordinator keeps: its code snapshot and outputs.
fn files_of(tc: &TestCluster, attempt: &str) -> (usize, bool) {
    let code = std::fs::read_dir(tc.data_dir().join("artifacts").join("code"))
        .map(|d| d.count())
        .unwrap_or(0);
    let outputs = tc
        .data_dir()
        .join("artifacts")
        .join("outputs")
        .join(attempt)
        .exists();
    (code, outputs)
}

#[tokio::test]
async fn jobs_page_newest_first_and_are_deleted_with_their_logs_and_files() {
    let tc = TestCluster::start().await;
    tc.create_cluster("hist", &["--max-nodes", "1"]);
    let code = tc.scratch("code");
    std::fs::create_dir_all(&code).expect("code");
    std::fs::write(code.join("a.txt"), "a\n").expect("code");
    let code = code.to_string_lossy().into_owned();
    let first = submit_wait(
        &tc,
        &[
            "--code",
            &code,
            "--",
            "sh",
            "-c",
            "echo kept > outputs/o.txt; echo hello",
        ],
    );
    let ids: Vec<String> = (0..4).map(|_| submit_wait(&tc, &["--", "true"])).collect();

    // Newest first, a page at a time.
    let page = tc.shoal_json(&["job", "list", "--limit", "2"]);
    let got: Vec<&str> = page
        .as_array()
        .expect("page")
        .iter()
        .filter_map(|j| j["id"].as_str())
        .collect();
    assert_eq!(got, vec![ids[3].as_str(), ids[2].as_str()]);
    let next = tc.shoal_json(&["job", "list", "--limit", "3", "--after", &ids[2]]);
    let got: Vec<&str> = next
        .as_array()
        .expect("page")
        .iter()
        .filter_map(|j| j["id"].as_str())
        .collect();
    assert_eq!(got, vec![ids[1].as_str(), ids[0].as_str(), first.as_str()]);
    let (code, body) = tc
        .http(
            "GET",
            "/api/v1/jobs?limit=1&after=job-2",
            Some(&tc.admin_token()),
            "",
        )
        .await;
    assert_eq!(code, 200, "{body}");
    let over_http: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(over_http[0]["id"], "job-1");
    assert!(
        !tc.shoal(&["job", "list", "--after", "nonsense"])
            .status
            .success()
    );

    // A running job cannot be deleted; an ended one goes with everything it left.
    let running = tc.shoal_json(&["job", "submit", "--cluster", "hist", "--", "sleep", "30"]);
    let running = running["id"].as_str().expect("id").to_string();
    tc.wait_job(&running, "running", LIMIT, |j| j.status == "running")
        .await;
    let out = tc.shoal(&["job", "delete", &running]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("cancel it first"),
        "{out:?}"
    );
    let attempt = tc.job(&first).await.attempts[0].id.clone();
    assert_eq!(
        files_of(&tc, &attempt),
        (1, true),
        "its code and outputs are kept"
    );
    let out = tc.shoal(&["job", "delete", &first]);
    assert!(out.status.success(), "{out:?}");
    assert!(String::from_utf8_lossy(&out.stdout).contains(&format!("deleted {first}")));
    assert!(!tc.shoal(&["job", "show", &first]).status.success(), "gone");
    assert!(
        !tc.shoal(&["job", "logs", &first]).status.success(),
        "its log too"
    );
    support::eventually("its files are removed", LIMIT, || async {
        (files_of(&tc, &attempt) == (0, false)).then_some(())
    })
    .await;
    assert!(
        tc.shoal(&["job", "show", &ids[0]]).status.success(),
        "the others stay"
    );
    assert!(
        tc.shoal(&["job", "cancel", &running, "--wait"])
            .status
            .success()
    );
}

#[tokio::test]
async fn ended_jobs_are_deleted_after_the_retention() {
    // About 2.6 s.
    let tc = TestCluster::start_with_config("job_retention_days: 0.00003\n").await;
    tc.create_cluster("hist", &["--max-nodes", "1"]);
    let old = submit_wait(&tc, &["--", "sh", "-c", "echo old; echo x > outputs/x"]);
    let attempt = tc.job(&old).await.attempts[0].id.clone();
    assert!(files_of(&tc, &attempt).1);
    let live = tc.shoal_json(&["job", "submit", "--cluster", "hist", "--", "sleep", "20"]);
    let live = live["id"].as_str().expect("id").to_string();
    support::eventually("the ended job is deleted", LIMIT, || async {
        (!tc.shoal(&["job", "show", &old]).status.success()).then_some(())
    })
    .await;
    assert!(!files_of(&tc, &attempt).1, "with its outputs");
    let (code, _) = tc
        .http(
            "GET",
            &format!("/api/v1/jobs/{old}/logs"),
            Some(&tc.admin_token()),
            "",
        )
        .await;
    assert_eq!(code, 404, "and its log");
    let job = tc.job(&live).await;
    assert!(
        matches!(job.status.as_str(), "queued" | "preparing" | "running"),
        "live jobs stay: {job:#?}"
    );
    assert!(tc.shoal(&["job", "cancel", &live]).status.success());
}
