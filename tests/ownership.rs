//! A node acts only on its own work: with a second node's credential (one a join
//! token gave a machine outside the cluster), every agent call about another
//! node's instance is refused, and nothing of that instance changes.
mod support;

use std::time::Duration;

use shoal_proto::PROTOCOL_VERSION;
use shoal_proto::v1 as pb;
use support::TestCluster;
use tokio_stream::StreamExt;

const LIMIT: Duration = Duration::from_secs(60);

fn refused<T: std::fmt::Debug>(what: &str, result: Result<T, tonic::Status>) -> String {
    let status = result.expect_err(what);
    assert_eq!(
        status.code(),
        tonic::Code::PermissionDenied,
        "{what}: {status}"
    );
    status.message().to_string()
}

/// The lease of the mini-batch that runs now, read from the coordinator's store.
fn running_lease(tc: &TestCluster, job_id: &str) -> Option<(u32, String)> {
    let db = rusqlite::Connection::open_with_flags(
        tc.data_dir().join("shoal.db"),
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY,
    )
    .ok()?;
    db.query_row(
        "SELECT idx, lease FROM mini_batches WHERE job_id = ?1 AND status = 'running'",
        [job_id],
        |r| Ok((r.get(0)?, r.get(1)?)),
    )
    .ok()
}

fn outputs_archive(name: &str, text: &str) -> Vec<u8> {
    let mut builder = tar::Builder::new(flate2::write::GzEncoder::new(
        Vec::new(),
        flate2::Compression::fast(),
    ));
    let mut header = tar::Header::new_gnu();
    header.set_size(text.len() as u64);
    header.set_mode(0o644);
    header.set_cksum();
    builder
        .append_data(&mut header, name, text.as_bytes())
        .expect("tar");
    builder.into_inner().expect("tar").finish().expect("gzip")
}

#[tokio::test]
async fn a_node_acts_only_on_its_own_work() {
    let tc = TestCluster::start().await;
    tc.create_cluster("own", &["--max-nodes", "2"]);
    // The victims: a command job with code, and a parallel job whose first
    // mini-batch stays leased for a while.
    let code = tc.scratch("code");
    std::fs::create_dir_all(&code).expect("code dir");
    std::fs::write(code.join("secret.txt"), "the victim's code\n").expect("code");
    let code_arg = code.to_string_lossy().into_owned();
    let victim = tc.shoal_json(&[
        "job",
        "submit",
        "--cluster",
        "own",
        "--code",
        &code_arg,
        "--",
        "sleep",
        "60",
    ]);
    let victim = victim["id"].as_str().expect("id").to_string();
    std::fs::write(tc.scratch("rows.txt"), "a\nb\n").expect("rows");
    let yaml = tc.scratch("batch.yaml");
    std::fs::write(
        &yaml,
        "type: parallel\ncompute: own\n\
         inputs: {data: {type: uri_file, path: ./rows.txt}}\n\
         mini_batch_size: 1\n\
         task: {command: sleep 8; cat $SHOAL_MINI_BATCH}\n\
         output: {append_row_to: results.csv}\n",
    )
    .expect("job file");
    let batch = tc.shoal_json(&["job", "submit", "-f", yaml.to_str().expect("utf8")]);
    let batch = batch["id"].as_str().expect("id").to_string();
    let job = tc
        .wait_job(&victim, "running", LIMIT, |j| j.status == "running")
        .await;
    let attempt = job.attempts[0].id.clone();
    let owner = job.attempts[0].instances[0].node.clone();
    let (index, lease) = support::eventually("a mini-batch is leased", LIMIT, || async {
        running_lease(&tc, &batch)
    })
    .await;
    let batch_job = tc.job(&batch).await;
    let batch_attempt = batch_job.attempts[0].id.clone();

    // The intruder: a machine outside the cluster, let in by a join token.
    let created = tc.shoal_json(&["join-token", "create", "--cluster", "own"]);
    let join_token = created["token"].as_str().expect("token").to_string();
    let mut open = pb::agent_client::AgentClient::new(tc.channel_as(None).await);
    let joined = open
        .join(pb::JoinRequest {
            join_token,
            hostname: "intruder".into(),
            cores: 1,
            memory_bytes: 1 << 30,
        })
        .await
        .expect("join")
        .into_inner();
    let mut agent =
        pb::agent_client::AgentClient::new(tc.channel_as(Some(&joined.credential)).await);
    let guess = "00000000000000000000000000000000".to_string();
    let theirs = |instance: u32| pb::AttemptRef {
        attempt_id: attempt.clone(),
        instance,
        token: guess.clone(),
    };

    let why = refused("fetch code", agent.fetch_code(theirs(0)).await);
    assert!(why.contains(&format!("node {owner} does")), "{why}");
    refused("restore outputs", agent.restore_outputs(theirs(0)).await);
    refused(
        "fetch an input",
        agent
            .fetch_input(pb::InputRef {
                instance: Some(theirs(0)),
                name: "data".into(),
            })
            .await,
    );
    refused(
        "upload outputs",
        agent
            .upload_outputs(pb::OutputsUpload {
                attempt_id: attempt.clone(),
                instance: 0,
                data: outputs_archive("planted.txt", "not theirs\n"),
                token: guess.clone(),
                output_name: String::new(),
            })
            .await,
    );
    refused(
        "issue a token",
        agent
            .issue_token(pb::JobTokenRequest {
                attempt_id: attempt.clone(),
                instance: 0,
                resource: "https://vault.example".into(),
                client_id: String::new(),
                token: guess.clone(),
            })
            .await,
    );
    // The real lease in hand, reported as itself or as the lease's own node.
    let stolen = |node_id: &str| pb::WorkRequest {
        node_id: node_id.to_string(),
        attempt_id: batch_attempt.clone(),
        instance: 0,
        report: Some(pb::MiniBatchReport {
            lease: lease.clone(),
            ok: true,
            rows: b"stolen\n".to_vec(),
            message: String::new(),
            failed_items: 0,
        }),
        want_next: true,
        token: guess.clone(),
    };
    refused("report a lease", agent.work(stolen(&joined.node_id)).await);
    let why = refused(
        "speak for the lease's node",
        agent
            .work(stolen(&batch_job.attempts[0].instances[0].node))
            .await,
    );
    assert!(why.contains("belongs to node"), "{why}");
    // A node's credential reads no job: outputs are for people.
    let mut jobs = pb::jobs_client::JobsClient::new(tc.channel_as(Some(&joined.credential)).await);
    refused(
        "download outputs",
        jobs.download_outputs(pb::JobRef { id: victim.clone() })
            .await,
    );

    // On its own session: another's log, a false exit, and an exec into the
    // victim's sandbox.
    let (tx, rx) = tokio::sync::mpsc::channel(16);
    let send = |msg: pb::agent_message::Msg| pb::AgentMessage { msg: Some(msg) };
    tx.send(send(pb::agent_message::Msg::Register(pb::Register {
        protocol_version: PROTOCOL_VERSION,
        node_id: joined.node_id.clone(),
        cluster: "own".into(),
        cores: 1,
        memory_bytes: 1 << 30,
        hostname: "intruder".into(),
        ..Default::default()
    })))
    .await
    .expect("send");
    let mut inbound = agent
        .session(tokio_stream::wrappers::ReceiverStream::new(rx))
        .await
        .expect("its own session is fine")
        .into_inner();
    for message in [
        pb::agent_message::Msg::Log(pb::LogUp {
            attempt_id: attempt.clone(),
            instance: 0,
            stream: "stdout".into(),
            data: b"INJECTED\n".to_vec(),
        }),
        pb::agent_message::Msg::Event(pb::AttemptEvent {
            attempt_id: attempt.clone(),
            instance: 0,
            kind: Some(pb::attempt_event::Kind::Exited(pb::Exited {
                exit_code: Some(0),
                outcome: "completed".into(),
                message: String::new(),
                usage: None,
            })),
        }),
        pb::agent_message::Msg::Exec(pb::ExecFrame {
            exec_id: "x1".into(),
            kind: Some(pb::exec_frame::Kind::Open(pb::ExecOpen {
                job_id: victim.clone(),
                attempt_id: attempt.clone(),
                target_node: owner.clone(),
                target_instance: 0,
                command: "touch /tmp/pwned".into(),
                source_instance: 0,
                token: guess.clone(),
            })),
        }),
    ] {
        tx.send(send(message)).await.expect("send");
    }
    let refusal = tokio::time::timeout(LIMIT, async {
        while let Some(Ok(message)) = inbound.next().await {
            if let Some(pb::coordinator_message::Msg::Exec(frame)) = message.msg
                && let Some(pb::exec_frame::Kind::Exit(exit)) = frame.kind
            {
                return exit;
            }
        }
        panic!("the session ended without an answer to the exec");
    })
    .await
    .expect("the exec is answered");
    assert_eq!(refusal.exit_code, None);
    assert!(
        refusal.message.contains("does not run this instance"),
        "{refusal:?}"
    );
    drop(tx);

    // Nothing changed: the victim runs on, with its own log only; the lease is
    // still in force and its rows come from the worker it was handed to.
    let job = tc.job(&victim).await;
    assert_eq!(job.status, "running", "{job:#?}");
    assert_eq!(job.attempts.len(), 1);
    assert_eq!(job.attempts[0].instances[0].status, "running");
    assert_eq!(job.attempts[0].instances[0].node, owner);
    let (code, log) = tc
        .http(
            "GET",
            &format!("/api/v1/jobs/{victim}/logs"),
            Some(&tc.admin_token()),
            "",
        )
        .await;
    assert_eq!(code, 200);
    assert!(!log.contains("INJECTED"), "{log}");
    assert_eq!(running_lease(&tc, &batch), Some((index, lease)));
    let done = tc
        .wait_job(&batch, "completed", LIMIT, |j| j.status == "completed")
        .await;
    assert!(
        done.reason.is_empty() || !done.reason.contains("failed"),
        "{done:#?}"
    );
    let into = tc.scratch("download");
    let out = tc.shoal(&[
        "job",
        "download",
        &batch,
        "-p",
        into.to_str().expect("utf8"),
    ]);
    assert!(out.status.success(), "{out:?}");
    let rows = std::fs::read_to_string(into.join(&batch).join("results.csv")).expect("rows");
    assert_eq!(rows, "a\nb\n", "the real worker's rows, once each");
    assert!(
        tc.shoal(&["job", "cancel", &victim, "--wait"])
            .status
            .success()
    );
    let out = tc.shoal(&[
        "job",
        "download",
        &victim,
        "-p",
        into.to_str().expect("utf8"),
    ]);
    assert!(out.status.success(), "{out:?}");
    assert!(
        !into
            .join(&victim)
            .join("instance-0")
            .join("planted.txt")
            .exists(),
        "no outputs were planted"
    );
}
