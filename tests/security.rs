//! Every endpoint but /healthz needs a token that allows it: API tokens with roles
//! for people and scripts, node credentials for agents; on gRPC and HTTP alike.

mod support;

use std::process::{Command, Stdio};
use std::time::Duration;

use shoal_proto::v1 as pb;
use support::{SHOAL, TestCluster};

fn token(tc: &TestCluster, role: &str) -> String {
    let created = tc.shoal_json(&["token", "create", "--role", role, "--name", "test"]);
    created["token"].as_str().expect("token").to_string()
}

/// The gRPC calls of the issue, as `token` (None: no token): submit, cancel,
/// cluster create, cluster delete; each call's status code.
async fn calls(tc: &TestCluster, token: Option<&str>) -> Vec<tonic::Code> {
    let channel = tc.channel_as(token).await;
    let mut jobs = pb::jobs_client::JobsClient::new(channel.clone());
    let mut clusters = pb::clusters_client::ClustersClient::new(channel);
    let code = |r: Result<(), tonic::Status>| r.err().map_or(tonic::Code::Ok, |s| s.code());
    vec![
        code(
            jobs.submit(pb::JobSpec {
                cluster: "sec".into(),
                command: "true".into(),
                ..Default::default()
            })
            .await
            .map(|_| ()),
        ),
        code(
            jobs.cancel(pb::JobRef { id: "job-1".into() })
                .await
                .map(|_| ()),
        ),
        code(
            clusters
                .create(pb::ClusterSpec {
                    name: "other".into(),
                    vm_size: "Standard_D2_v2".into(),
                    ..Default::default()
                })
                .await
                .map(|_| ()),
        ),
        code(
            clusters
                .delete(pb::ClusterRef {
                    name: "other".into(),
                })
                .await
                .map(|_| ()),
        ),
    ]
}

#[tokio::test]
async fn requests_without_the_right_token_are_refused_on_grpc_and_http() {
    use tonic::Code::{PermissionDenied, Unauthenticated};
    let tc = TestCluster::start().await;
    tc.create_cluster("sec", &["--max-nodes", "1"]);
    let reader = token(&tc, "reader");
    let user = token(&tc, "user");

    assert_eq!(calls(&tc, None).await, vec![Unauthenticated; 4]);
    assert_eq!(
        calls(&tc, Some("shoal_0000_0000")).await,
        vec![Unauthenticated; 4]
    );
    // The same id, another secret (the last digit changed).
    let last = if reader.ends_with('0') { '1' } else { '0' };
    let forged = format!("{}{last}", &reader[..reader.len() - 1]);
    assert_eq!(calls(&tc, Some(&forged)).await, vec![Unauthenticated; 4]);
    assert_eq!(calls(&tc, Some(&reader)).await, vec![PermissionDenied; 4]);
    // A user submits and cancels jobs, but manages no clusters.
    let as_user = calls(&tc, Some(&user)).await;
    assert_eq!(as_user[0], tonic::Code::Ok);
    assert_eq!(&as_user[2..], &[PermissionDenied, PermissionDenied]);
    // A reader reads.
    let mut jobs = pb::jobs_client::JobsClient::new(tc.channel_as(Some(&reader)).await);
    assert!(jobs.list(pb::ListJobsRequest::default()).await.is_ok());

    // HTTP: the same rules.
    let job = r#"{"compute": "sec", "command": "true"}"#;
    assert_eq!(tc.http("POST", "/api/v1/jobs", None, job).await.0, 401);
    assert_eq!(
        tc.http("POST", "/api/v1/jobs", Some("shoal_0_0"), job)
            .await
            .0,
        401
    );
    let (code, body) = tc.http("POST", "/api/v1/jobs", Some(&reader), job).await;
    assert_eq!(code, 403, "{body}");
    assert!(body.contains("needs user"), "{body}");
    assert_eq!(
        tc.http("POST", "/api/v1/jobs", Some(&user), job).await.0,
        201
    );
    assert_eq!(
        tc.http("POST", "/api/v1/jobs/job-1/cancel", None, "")
            .await
            .0,
        401
    );
    assert_eq!(
        tc.http("POST", "/api/v1/jobs/job-1/cancel", Some(&reader), "")
            .await
            .0,
        403
    );
    let cluster = r#"{"name": "other", "vm_size": "Standard_D2_v2"}"#;
    assert_eq!(
        tc.http("POST", "/api/v1/clusters", Some(&user), cluster)
            .await
            .0,
        403
    );
    assert_eq!(
        tc.http("DELETE", "/api/v1/clusters/sec", Some(&reader), "")
            .await
            .0,
        403
    );
    assert_eq!(
        tc.http("DELETE", "/api/v1/clusters/sec", None, "").await.0,
        401
    );
    assert_eq!(tc.http("GET", "/api/v1/jobs", None, "").await.0, 401);
    assert_eq!(
        tc.http("GET", "/api/v1/jobs", Some(&reader), "").await.0,
        200
    );
    assert_eq!(tc.http("GET", "/metrics", None, "").await.0, 401);
    assert_eq!(tc.http("GET", "/healthz", None, "").await.0, 200);

    // A revoked token is refused from then on.
    let id = reader.split('_').nth(1).expect("id");
    let out = tc.shoal(&["token", "revoke", id]);
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        tc.http("GET", "/api/v1/jobs", Some(&reader), "").await.0,
        401
    );
}

/// The environment variable `name` of a running process.
fn env_of(pid: i32, name: &str) -> Option<String> {
    let environ = std::fs::read(format!("/proc/{pid}/environ")).ok()?;
    String::from_utf8_lossy(&environ)
        .split('\0')
        .find_map(|kv| kv.strip_prefix(&format!("{name}=")).map(str::to_string))
}

/// The pid of the local agent of `node_id` (found by its work dir).
fn agent_pid(tc: &TestCluster, node_id: &str) -> Option<i32> {
    let work_dir = tc.data_dir().join("nodes").join(node_id);
    let needle = work_dir.to_string_lossy().into_owned();
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .find_map(|entry| {
            let pid: i32 = entry.file_name().to_string_lossy().parse().ok()?;
            let cmdline = std::fs::read(entry.path().join("cmdline")).ok()?;
            let cmdline = String::from_utf8_lossy(&cmdline);
            (cmdline.contains("\0agent\0") && cmdline.contains(&needle)).then_some(pid)
        })
}

/// Runs `shoal agent` against the coordinator with `token`; how it ended.
fn agent_with(tc: &TestCluster, node_id: &str, token: &str) -> (bool, String) {
    let work = tc.scratch(&format!("intruder-{node_id}"));
    let out = Command::new(SHOAL)
        .args(["agent", "--endpoint", &tc.endpoint(), "--node-id", node_id])
        .args([
            "--cluster",
            "sec",
            "--owner",
            "test",
            "--give-up-after-seconds",
            "5",
        ])
        .arg("--work-dir")
        .arg(&work)
        .env("SHOAL_NODE_TOKEN", token)
        .stdin(Stdio::null())
        .output()
        .expect("run an agent");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test]
async fn an_agent_registers_only_with_its_own_node_credential() {
    let tc = TestCluster::start().await;
    tc.create_cluster("sec", &["--min-nodes", "1", "--max-nodes", "1"]);
    let node = tc
        .wait_cluster("sec", "a node is up", Duration::from_secs(30), |c| {
            c.current_node_count == 1
        })
        .await;
    assert_eq!(node.current_node_count, 1);
    let nodes = tc.shoal_json(&["node", "list"]);
    let node_id = nodes[0]["id"].as_str().expect("node id").to_string();
    let credential = agent_pid(&tc, &node_id)
        .and_then(|pid| env_of(pid, "SHOAL_NODE_TOKEN"))
        .expect("the agent got a credential");

    // Another node's credential, a user's token, or a made-up one: refused.
    let (ok, stderr) = agent_with(&tc, "sec-n99", &credential);
    assert!(
        !ok && stderr.contains(&format!("belongs to node {node_id}")),
        "{stderr}"
    );
    let user = token(&tc, "admin");
    let (ok, stderr) = agent_with(&tc, "sec-n98", &user);
    assert!(!ok && stderr.contains("only a node's agent"), "{stderr}");
    let (ok, stderr) = agent_with(&tc, "sec-n97", "shoal_123_456");
    assert!(!ok && stderr.contains("unknown token"), "{stderr}");
    // The real node still works.
    let job = tc.shoal_json(&["job", "submit", "--cluster", "sec", "--wait", "--", "true"]);
    assert_eq!(job["status"], "completed", "{job:#}");
    // A node's credential is no reader: jobs' outputs are for people (an agent
    // restores its own instance's through Agent/RestoreOutputs, checked per instance).
    let mut as_node = pb::jobs_client::JobsClient::new(tc.channel_as(Some(&credential)).await);
    let own = pb::JobRef {
        id: job["id"].as_str().expect("id").to_string(),
    };
    let refused = as_node
        .download_outputs(own)
        .await
        .expect_err("a node credential");
    assert_eq!(refused.code(), tonic::Code::PermissionDenied, "{refused}");
    assert!(
        refused
            .message()
            .contains("node credential cannot call this"),
        "{refused}"
    );
}

#[tokio::test]
async fn the_cli_signs_in_with_the_saved_token_or_a_login() {
    let tc = TestCluster::start().await;
    // `shoal up` saved the admin token for its endpoint: the CLI just works.
    assert!(tc.shoal(&["cluster", "list"]).status.success());
    // Elsewhere (another config dir), it is not signed in, and says how to be.
    let elsewhere = tc.scratch("elsewhere");
    let run = |args: &[&str], token: Option<&str>| {
        let mut command = Command::new(SHOAL);
        command
            .args(args)
            .env("SHOAL_ENDPOINT", tc.endpoint())
            .env("SHOAL_CONFIG_DIR", &elsewhere)
            .env_remove("SHOAL_TOKEN")
            .stdin(Stdio::null());
        if let Some(token) = token {
            command.env("SHOAL_TOKEN", token);
        }
        command.output().expect("run shoal")
    };
    let out = run(&["cluster", "list"], None);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("not signed in") && stderr.contains("shoal login"),
        "{stderr}"
    );
    let out = run(&["login"], Some("shoal_1_2"));
    assert!(!out.status.success(), "a wrong token is not saved");
    let reader = token(&tc, "reader");
    let out = run(&["login"], Some(&reader));
    assert!(out.status.success(), "{out:?}");
    assert!(run(&["cluster", "list"], None).status.success());
    // The login also made the endpoint the default: no --endpoint, no SHOAL_ENDPOINT.
    let out = Command::new(SHOAL)
        .args(["cluster", "list"])
        .env("SHOAL_CONFIG_DIR", &elsewhere)
        .env_remove("SHOAL_ENDPOINT")
        .env_remove("SHOAL_TOKEN")
        .output()
        .expect("run shoal");
    assert!(out.status.success(), "{out:?}");
    let out = run(
        &[
            "cluster",
            "create",
            "--name",
            "nope",
            "--vm-size",
            "Standard_D2_v2",
        ],
        None,
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("not allowed"),
        "{stderr}"
    );
}

/// Jobs run unprivileged: process jobs as the configured user (with their outputs
/// still theirs to write), containers with no capabilities at all.
#[tokio::test]
async fn jobs_run_unprivileged() {
    let tc = TestCluster::start_with_config("process_jobs_user: nobody\n").await;
    tc.create_cluster("sec", &["--max-nodes", "1"]);
    let job = tc.shoal_json(&[
        "job",
        "submit",
        "--cluster",
        "sec",
        "--wait",
        "--",
        "sh",
        "-c",
        "id -u; id -un; echo mine > outputs/proof; touch /root/.shoal-escape 2>&1 || echo denied",
    ]);
    let id = job["id"].as_str().expect("id");
    assert_eq!(job["status"], "completed", "{job:#}");
    let logs = String::from_utf8_lossy(&tc.shoal(&["job", "logs", id]).stdout).into_owned();
    assert!(logs.contains("65534") && logs.contains("nobody"), "{logs}");
    assert!(logs.contains("denied"), "{logs}");
    let into = tc.scratch("out");
    assert!(
        tc.shoal(&["job", "download", id, "-p", into.to_str().expect("utf8")])
            .status
            .success()
    );
    let proof = std::fs::read_to_string(into.join(id).join("instance-0/proof")).expect("proof");
    assert_eq!(proof.trim(), "mine");

    support::docker_ready();
    let job = tc.shoal_json(&[
        "job",
        "submit",
        "--cluster",
        "sec",
        "--image",
        "shoal/base",
        "--wait",
        "--",
        "sh",
        "-c",
        "grep -E '^Cap(Eff|Prm):' /proc/self/status",
    ]);
    let id = job["id"].as_str().expect("id");
    assert_eq!(job["status"], "completed", "{job:#}");
    let logs = String::from_utf8_lossy(&tc.shoal(&["job", "logs", id]).stdout).into_owned();
    assert!(logs.contains("CapEff:\t0000000000000000"), "{logs}");
    assert!(logs.contains("CapPrm:\t0000000000000000"), "{logs}");
}

/// The CLI over TLS: it talks to a coordinator whose certificate its CA signed,
/// and refuses one signed by another CA (or by none it knows).
#[tokio::test]
async fn the_cli_checks_the_coordinators_certificate() {
    let tc = TestCluster::start_args(&["--tls"]).await;
    let other = TestCluster::start_args(&["--tls"]).await;
    let ca = tc.data_dir().join("tls/ca.pem");
    let wrong_ca = other.data_dir().join("tls/ca.pem");
    let https = format!("https://{}", tc.endpoint());
    let run = |args: &[&str]| {
        Command::new(SHOAL)
            .args(args)
            .env("SHOAL_ENDPOINT", &https)
            .env("SHOAL_CONFIG_DIR", tc.scratch("elsewhere"))
            .env("SHOAL_TOKEN", tc.admin_token())
            .env_remove("SHOAL_CA_FILE")
            .stdin(Stdio::null())
            .output()
            .expect("run shoal")
    };
    let ca_arg = ca.to_str().expect("utf8");
    let out = run(&[
        "--ca-file",
        ca_arg,
        "cluster",
        "create",
        "--name",
        "tls",
        "--vm-size",
        "Standard_D2_v2",
    ]);
    assert!(out.status.success(), "{out:?}");
    let out = run(&[
        "--ca-file",
        wrong_ca.to_str().expect("utf8"),
        "cluster",
        "list",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && stderr.contains("not signed by the CA"),
        "{stderr}"
    );
    let out = run(&["cluster", "list"]);
    assert!(!out.status.success(), "no CA given: refused");
    // Plain HTTP to a TLS port gets nowhere.
    let out = Command::new(SHOAL)
        .args(["cluster", "list", "--endpoint", &tc.endpoint()])
        .env("SHOAL_TOKEN", tc.admin_token())
        .output()
        .expect("run shoal");
    assert!(!out.status.success());
    // The saved CA (from `shoal up --tls`) makes the local CLI just work, and a
    // job runs end to end: the local agents come in through the Unix socket.
    let job = tc.shoal_json(&[
        "--endpoint",
        &https,
        "job",
        "submit",
        "--cluster",
        "tls",
        "--wait",
        "--",
        "echo",
        "over tls",
    ]);
    assert_eq!(job["status"], "completed", "{job:#}");
}

#[tokio::test]
async fn listening_beyond_loopback_needs_tls() {
    let port = std::net::TcpListener::bind("0.0.0.0:0")
        .expect("port")
        .local_addr()
        .expect("address")
        .port();
    let dir = tempfile::tempdir().expect("tempdir");
    let out = Command::new(SHOAL)
        .args(["up", "--listen", &format!("0.0.0.0:{port}"), "--data-dir"])
        .arg(dir.path())
        .env("SHOAL_CONFIG_DIR", dir.path().join("config"))
        .stdin(Stdio::null())
        .output()
        .expect("run shoal up");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("without TLS") && stderr.contains("--tls"),
        "{stderr}"
    );
    // With --tls it starts.
    let mut up = Command::new(SHOAL)
        .args([
            "up",
            "--tls",
            "--listen",
            &format!("0.0.0.0:{port}"),
            "--data-dir",
        ])
        .arg(dir.path())
        .env("SHOAL_CONFIG_DIR", dir.path().join("config"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start shoal up --tls");
    support::eventually("the TLS port opens", Duration::from_secs(20), || async {
        tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .ok()
            .map(|_| ())
    })
    .await;
    // ...and answers over TLS, with a token.
    let token = std::fs::read_to_string(dir.path().join("admin.token")).expect("admin token");
    let out = Command::new(SHOAL)
        .args([
            "cluster",
            "list",
            "--endpoint",
            &format!("https://127.0.0.1:{port}"),
        ])
        .arg("--ca-file")
        .arg(dir.path().join("tls/ca.pem"))
        .env("SHOAL_TOKEN", token.trim())
        .env("SHOAL_CONFIG_DIR", dir.path().join("elsewhere"))
        .output()
        .expect("run shoal");
    let result = out.status.success();
    let _ = up.kill();
    let _ = up.wait();
    assert!(result, "{out:?}");
}

/// A GET of an `http://host:port/path` URL with headers; (status, body).
async fn get(url: &str, headers: &[(&str, &str)]) -> (u16, String) {
    let rest = url.strip_prefix("http://").expect("http url");
    let (host, path) = rest.split_once('/').expect("path");
    let got = support::request(host, "GET", &format!("/{path}"), headers, "").await;
    (got.code, got.body)
}

/// The identity settings of the running job `id` (read from its process).
fn identity_env(id: &str) -> Option<(String, String, Option<String>)> {
    let attempt = format!("SHOAL_ATTEMPT_ID={id}.1");
    std::fs::read_dir("/proc")
        .ok()?
        .flatten()
        .find_map(|entry| {
            let environ = std::fs::read(entry.path().join("environ")).ok()?;
            let environ = String::from_utf8_lossy(&environ);
            let vars: Vec<&str> = environ.split('\0').collect();
            if !vars.contains(&attempt.as_str()) {
                return None;
            }
            let var = |name: &str| {
                vars.iter()
                    .find_map(|kv| kv.strip_prefix(&format!("{name}=")).map(str::to_string))
            };
            Some((
                var("IDENTITY_ENDPOINT")?,
                var("IDENTITY_HEADER")?,
                var("DEFAULT_IDENTITY_CLIENT_ID"),
            ))
        })
}

#[tokio::test]
async fn a_job_gets_a_token_for_its_clusters_identity_that_verifies_against_the_jwks() {
    let tc = TestCluster::start().await;
    tc.create_cluster(
        "mi",
        &["--max-nodes", "1", "--identity-type", "SystemAssigned"],
    );
    tc.create_cluster("plain", &["--max-nodes", "1"]);
    let shown = tc.shoal_json(&["cluster", "identity", "show", "--name", "mi"]);
    let system = shown[0]["client_id"]
        .as_str()
        .expect("system identity")
        .to_string();
    let bot = tc.shoal_json(&["identity", "create", "bot"]);
    let bot = bot[0]["client_id"].as_str().expect("bot").to_string();

    let job = tc.shoal_json(&["job", "submit", "--cluster", "mi", "--", "sleep", "60"]);
    let id = job["id"].as_str().expect("id").to_string();
    let (endpoint, header, default) =
        support::eventually("the job runs", Duration::from_secs(30), || {
            let id = id.clone();
            async move { identity_env(&id) }
        })
        .await;
    assert_eq!(default.as_deref(), Some(system.as_str()));
    let resource = "https://vault.example";
    let (code, body) = get(
        &format!("{endpoint}?resource={resource}"),
        &[("X-IDENTITY-HEADER", &header)],
    )
    .await;
    assert_eq!(code, 200, "{body}");
    let token: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(token["token_type"], "Bearer");
    assert_eq!(token["resource"], resource);
    // Verify it with the coordinator's published key (no token needed for the JWKS).
    let (code, jwks) = tc.http("GET", "/.well-known/jwks.json", None, "").await;
    assert_eq!(code, 200);
    let jwks: serde_json::Value = serde_json::from_str(&jwks).expect("jwks");
    let x = jwks["keys"][0]["x"].as_str().expect("x");
    let key = jsonwebtoken::DecodingKey::from_ed_components(x).expect("key");
    let mut validation = jsonwebtoken::Validation::new(jsonwebtoken::Algorithm::EdDSA);
    validation.set_audience(&[resource]);
    let claims = jsonwebtoken::decode::<serde_json::Value>(
        token["access_token"].as_str().expect("access token"),
        &key,
        &validation,
    )
    .expect("the signature, aud and exp check out")
    .claims;
    assert_eq!(claims["sub"], system.as_str());
    assert_eq!(claims["job"], id.as_str());
    assert!(claims["exp"].as_i64().expect("exp") > claims["iat"].as_i64().expect("iat"));
    validation.set_audience(&["https://elsewhere"]);
    assert!(
        jsonwebtoken::decode::<serde_json::Value>(
            token["access_token"].as_str().expect("t"),
            &key,
            &validation
        )
        .is_err()
    );

    // An identity the cluster was not given, no header, no resource: refused.
    let url = format!("{endpoint}?resource={resource}&client_id={bot}");
    assert_eq!(get(&url, &[("X-IDENTITY-HEADER", &header)]).await.0, 403);
    assert_eq!(
        get(&format!("{endpoint}?resource={resource}"), &[]).await.0,
        401
    );
    assert_eq!(
        get(&endpoint, &[("X-IDENTITY-HEADER", &header)]).await.0,
        400
    );
    // Once the attempt is over, its header is worth nothing.
    assert!(tc.shoal(&["job", "cancel", &id]).status.success());
    tc.wait_job(
        &id,
        "canceled",
        Duration::from_secs(30),
        support::all_instances_ended,
    )
    .await;
    let (code, body) = get(
        &format!("{endpoint}?resource={resource}"),
        &[("X-IDENTITY-HEADER", &header)],
    )
    .await;
    assert!(code == 401 || code == 0, "{code} {body}");

    // A cluster with no identity: a clear 400.
    let job = tc.shoal_json(&["job", "submit", "--cluster", "plain", "--", "sleep", "60"]);
    let id = job["id"].as_str().expect("id").to_string();
    let (endpoint, header, default) =
        support::eventually("the job runs", Duration::from_secs(30), || {
            let id = id.clone();
            async move { identity_env(&id) }
        })
        .await;
    assert_eq!(default, None);
    let (code, body) = get(
        &format!("{endpoint}?resource={resource}"),
        &[("X-IDENTITY-HEADER", &header)],
    )
    .await;
    assert_eq!(code, 400, "{body}");
    assert!(body.contains("no managed identity"), "{body}");
}

#[tokio::test]
async fn identities_are_made_with_the_cluster_and_deleted_with_it() {
    let tc = TestCluster::start().await;
    // A refused create creates nothing: not the cluster, not half its identities.
    let out = tc.shoal(&[
        "cluster",
        "create",
        "--name",
        "mi",
        "--vm-size",
        "Standard_D2_v2",
        "--assign-identity",
        "[system],nobody",
    ]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("no identity `nobody`"), "{err}");
    assert!(
        !tc.shoal(&["cluster", "show", "mi"]).status.success(),
        "no cluster was left behind"
    );
    // The seed's resource id names a user-assigned identity by its last segment.
    tc.shoal_json(&["identity", "create", "bot"]);
    let resource = "/subscriptions/s/resourcegroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/bot";
    tc.create_cluster(
        "mi",
        &[
            "--identity-type",
            "SystemAssigned,UserAssigned",
            "--identity-id",
            resource,
        ],
    );
    let shown = tc.shoal_json(&["cluster", "identity", "show", "--name", "mi"]);
    assert_eq!(shown.as_array().map(Vec::len), Some(2), "{shown:#}");
    assert_eq!(shown[0]["type"], "SystemAssigned");
    assert_eq!(shown[1]["name"], "bot");
    // Deleting the cluster takes its assignments: a new one of that name has none.
    assert!(tc.shoal(&["cluster", "delete", "mi"]).status.success());
    tc.create_cluster("mi", &[]);
    let shown = tc.shoal_json(&["cluster", "identity", "show", "--name", "mi"]);
    assert_eq!(shown, serde_json::json!([]), "nothing inherited");
    // Over HTTP too, in the one create.
    let (code, body) = tc
        .http(
            "POST",
            "/api/v1/clusters",
            Some(&tc.admin_token()),
            r#"{"name": "mi2", "vm_size": "Standard_D2_v2", "identities": ["[system]", "bot"]}"#,
        )
        .await;
    assert_eq!(code, 201, "{body}");
    let shown = tc.shoal_json(&["cluster", "identity", "show", "--name", "mi2"]);
    assert_eq!(shown.as_array().map(Vec::len), Some(2), "{shown:#}");
}

/// `shoal agent --join-token` from "another machine" (its own work dir).
fn joining_agent(tc: &TestCluster, name: &str, token: &str) -> std::process::Child {
    Command::new(SHOAL)
        .args([
            "agent",
            "--endpoint",
            &tc.endpoint(),
            "--owner",
            "joined",
            "--give-up-after-seconds",
            "5",
        ])
        .arg("--work-dir")
        .arg(tc.scratch(name))
        .env("SHOAL_JOIN_TOKEN", token)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start an agent")
}

fn join_token(tc: &TestCluster, extra: &[&str]) -> (String, String) {
    let mut args = vec!["join-token", "create", "--cluster", "jn"];
    args.extend_from_slice(extra);
    let created = tc.shoal_json(&args);
    (
        created["id"].as_str().expect("id").to_string(),
        created["token"].as_str().expect("token").to_string(),
    )
}

/// Waits for the agent to exit; its stderr.
fn refused(child: std::process::Child) -> String {
    let out = child.wait_with_output().expect("agent output");
    assert!(!out.status.success(), "the agent was let in");
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[tokio::test]
async fn agents_join_with_a_join_token_and_a_revoked_node_is_out() {
    let tc = TestCluster::start().await;
    tc.create_cluster("jn", &["--max-nodes", "1"]);
    let (_, good) = join_token(&tc, &["--uses", "1"]);
    let mut agent = joining_agent(&tc, "machine-1", &good);
    let _ = &mut agent;
    let node = support::eventually("the joined node is up", Duration::from_secs(30), || async {
        let nodes = tc.shoal_json(&["node", "list"]);
        nodes.as_array()?.iter().find_map(|n| {
            let id = n["id"].as_str()?;
            (id.starts_with("jn-j") && n["state"] == "idle").then(|| id.to_string())
        })
    })
    .await;
    // Work runs on it.
    let job = tc.shoal_json(&["job", "submit", "--cluster", "jn", "--wait", "--", "true"]);
    assert_eq!(job["status"], "completed", "{job:#}");
    assert_eq!(job["instances"][0]["node"], node.as_str());

    // Used up, made up, expired, revoked: refused, each with its reason.
    assert!(refused(joining_agent(&tc, "machine-2", &good)).contains("used up"));
    assert!(
        refused(joining_agent(&tc, "machine-3", "shoal_join_aaaa_bbbb"))
            .contains("unknown join token")
    );
    let (_, short) = join_token(&tc, &["--ttl", "1s"]);
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(refused(joining_agent(&tc, "machine-4", &short)).contains("expired"));
    let (id, revoked) = join_token(&tc, &[]);
    assert!(tc.shoal(&["join-token", "revoke", &id]).status.success());
    assert!(refused(joining_agent(&tc, "machine-5", &revoked)).contains("revoked join token"));

    // Revoking the node ends its agent's session, and it cannot come back.
    let out = tc.shoal(&["node", "revoke", &node]);
    assert!(out.status.success(), "{out:?}");
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while agent.try_wait().ok().flatten().is_none() {
        assert!(
            std::time::Instant::now() < deadline,
            "the revoked agent kept running"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let again = refused(joining_agent(&tc, "machine-1", &good));
    assert!(again.contains("revoked"), "{again}");
}
