//! `shoal quickstart`: the whole product in one command, on an embedded coordinator.
//! A cluster scales 0 → 2, a 2-instance training job runs on it with live logs and
//! outputs, and the cluster scales back to 0.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use shoal_coordinator::server::{ConfigFile, CoordinatorConfig, serve};
use shoal_proto::v1 as pb;
use tokio_stream::StreamExt;

use super::job::{download, follow, snapshot, spinner};
use crate::client::{Client, status};
use crate::output::short_duration;

#[derive(clap::Args)]
pub struct Args {
    /// Keep the coordinator's data here (default: a temporary dir, removed at the end).
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Seconds the cluster's idle nodes wait before they are removed.
    #[arg(long, default_value_t = 3)]
    idle_seconds: u64,
}

const TRAIN_SH: &str = r#"#!/bin/sh
# A toy data-parallel training loop: each instance trains on its shard of the data
# and saves its model to ./outputs, which Shoal uploads when the instance ends.
echo "instance $SHOAL_NODE_RANK of $SHOAL_NUM_NODES on node $SHOAL_NODE_ID (attempt $SHOAL_ATTEMPT)"
loss=1000
for epoch in 1 2 3 4 5; do
  loss=$((loss * 6 / 10 + SHOAL_NODE_RANK))
  printf 'epoch %d/5 loss=0.%03d\n' "$epoch" "$loss"
  sleep 0.2
done
mkdir -p outputs
printf 'shard=%d final_loss=0.%03d\n' "$SHOAL_NODE_RANK" "$loss" > outputs/model.txt
echo "saved outputs/model.txt"
"#;

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    let started = Instant::now();
    let temp = tempfile::Builder::new()
        .prefix("shoal-quickstart-")
        .tempdir()?;
    let data_dir = args.data_dir.unwrap_or_else(|| temp.path().join("data"));
    let program =
        std::env::current_exe().context("cannot find the shoal binary to start agents with")?;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
    let endpoint = listener.local_addr()?.to_string();
    println!(
        "▸ embedded coordinator on {endpoint} (SQLite in {})",
        data_dir.display()
    );

    shoal_coordinator::auth::bootstrap(&data_dir)?;
    let token = std::fs::read_to_string(data_dir.join("admin.token"))
        .context("the embedded coordinator made no admin token")?;
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let config = CoordinatorConfig::new(data_dir.clone(), program, ConfigFile::default());
    let server = tokio::spawn(serve(listener, config, async move {
        let _ = stop_rx.await;
    }));
    let result = drive(&endpoint, &token, temp.path(), args.idle_seconds, started).await;
    let _ = stop_tx.send(());
    match tokio::time::timeout(Duration::from_secs(30), server).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => eprintln!("warning: the coordinator stopped with an error: {e}"),
        Ok(Err(e)) => eprintln!("warning: the coordinator task failed: {e}"),
        Err(_) => eprintln!("warning: the coordinator took over 30 s to stop"),
    }
    result
}

async fn drive(
    endpoint: &str,
    token: &str,
    scratch: &std::path::Path,
    idle_seconds: u64,
    started: Instant,
) -> anyhow::Result<ExitCode> {
    let client = Client::connect_with_token(endpoint, Some(token.trim().to_string())).await?;
    let cluster = client
        .clusters()
        .create(pb::ClusterSpec {
            name: "cpu-cluster".into(),
            vm_size: "Standard_D2_v2".into(),
            min_nodes: Some(0),
            max_nodes: Some(2),
            idle_seconds_before_scaledown: Some(idle_seconds),
            description: "quickstart: local nodes".into(),
            ..Default::default()
        })
        .await
        .map_err(status)?
        .into_inner();
    println!(
        "▸ cluster {} ({}, {} nodes now, min {}, max {}, idle timeout {} s)",
        cluster.name,
        cluster.vm_size,
        cluster.current_node_count,
        cluster.min_nodes,
        cluster.max_nodes,
        idle_seconds
    );

    let code = scratch.join("code");
    std::fs::create_dir_all(&code)?;
    std::fs::write(code.join("train.sh"), TRAIN_SH)?;
    let submitted_at = Instant::now();
    let job = client
        .jobs()
        .submit(pb::JobSpec {
            name: "quickstart-train".into(),
            cluster: cluster.name.clone(),
            command: "sh train.sh".into(),
            instance_count: 2,
            timeout_seconds: 120,
            code: snapshot(&code)?,
            ..Default::default()
        })
        .await
        .map_err(status)?
        .into_inner();
    println!(
        "▸ submitted {} (2 instances, `sh train.sh`); the cluster scales up for it\n",
        job.id
    );

    let bar = spinner();
    let job = follow(&client, &job.id, &bar, true).await?;
    bar.finish_and_clear();
    let ran_for = job.ended_at_ms - job.started_at_ms.max(job.created_at_ms);
    let waited = job.started_at_ms.max(job.created_at_ms) - job.created_at_ms;
    println!(
        "\n▸ {} {} in {} (waited {} for nodes)",
        job.id,
        job.status,
        short_duration(ran_for),
        short_duration(waited)
    );
    let outputs_dir = scratch.join("downloads");
    for dir in download(&client, &job.id, &outputs_dir, None).await? {
        let model = std::fs::read_to_string(dir.join("model.txt")).unwrap_or_default();
        println!(
            "  outputs of {}: model.txt = {}",
            dir.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default(),
            model.trim()
        );
    }

    // Watch the cluster go back to zero.
    let job_done = Instant::now();
    let bar = spinner();
    let mut watch = client
        .clusters()
        .watch(pb::ClusterRef {
            name: cluster.name.clone(),
        })
        .await
        .map_err(status)?
        .into_inner();
    let deadline = Duration::from_secs(idle_seconds + 60);
    let scaled_down = tokio::time::timeout(deadline, async {
        while let Some(update) = watch.next().await {
            let c = update.map_err(status)?;
            bar.set_message(format!(
                "{}: {} nodes ({} idle), target {} · idle nodes leave after {} s",
                c.name,
                c.current_node_count,
                c.node_state_counts.unwrap_or_default().idle,
                c.target_node_count,
                c.idle_seconds_before_scaledown
            ));
            if c.current_node_count == 0 && c.allocation_state == "steady" {
                return Ok::<bool, anyhow::Error>(true);
            }
        }
        Ok(false)
    })
    .await;
    bar.finish_and_clear();
    match scaled_down {
        Ok(Ok(true)) => println!(
            "▸ cluster {} scaled back to 0 nodes {} after the job ended",
            cluster.name,
            short_duration(job_done.elapsed().as_millis() as i64)
        ),
        Ok(Ok(false)) => bail!("the cluster watch ended before the cluster scaled down"),
        Ok(Err(e)) => return Err(e),
        Err(_) => bail!(
            "the cluster did not scale down within {} s",
            deadline.as_secs()
        ),
    }

    println!("\nsummary");
    println!("  job        {} · {}", job.id, job.status);
    if let Some(attempt) = job.attempts.last() {
        for i in &attempt.instances {
            println!(
                "  instance {} on {} · exit code {}",
                i.index,
                i.node,
                i.exit_code.map_or("-".into(), |c| c.to_string())
            );
        }
    }
    println!(
        "  submit → done {}",
        short_duration(
            submitted_at.elapsed().as_millis() as i64 - job_done.elapsed().as_millis() as i64
        )
    );
    println!(
        "  total {}",
        short_duration(started.elapsed().as_millis() as i64)
    );
    println!("\nnext: `shoal up` runs this coordinator for real; `shoal --help` shows the rest");
    Ok(if job.status == "completed" {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
