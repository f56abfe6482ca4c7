//! MPI jobs on real Open MPI: mpirun on instance 0 starts its daemons on the other
//! nodes through the agents (no SSH), on local process nodes and on docker-provider
//! node containers; the training matches a single process; a killed rank fails the
//! whole job and leaves nothing behind. Needs Open MPI: without it the tests fail, saying so.

mod support;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use support::{TestCluster, eventually};

fn job_file(tc: &TestCluster, name: &str, yaml: &str) -> String {
    let path = tc.scratch(name);
    std::fs::write(&path, yaml).expect("job file");
    path.to_string_lossy().into_owned()
}

/// A 3-node, 2-ranks-per-node MPI job of `command` on cluster `compute`.
fn mpi_job(tc: &TestCluster, name: &str, compute: &str, command: &str, extra: &str) -> String {
    job_file(
        tc,
        name,
        &format!(
            "compute: {compute}\n\
             command: {command}\n\
             {extra}\n\
             resources: {{instance_count: 3}}\n\
             distribution: {{type: mpi, process_count_per_instance: 2}}\n"
        ),
    )
}

fn logs(tc: &TestCluster, id: &str) -> String {
    String::from_utf8_lossy(&tc.shoal(&["job", "logs", id]).stdout).into_owned()
}

/// Every rank of `world` reported the right allreduce; the nodes they ran on.
fn ranks_and_nodes(logs: &str, world: usize) -> BTreeSet<String> {
    let expected = world * (world + 1) / 2;
    let mut ranks = BTreeSet::new();
    let mut nodes = BTreeSet::new();
    for line in logs.lines().filter(|l| l.contains("allreduce sum=")) {
        // "[0] rank 3/6 on node mpi-n2: allreduce sum=21 expected=21"
        let rest = line.split("rank ").nth(1).expect("rank");
        let (rank, rest) = rest.split_once('/').expect("rank/size");
        let node = rest.split("on node ").nth(1).expect("node");
        let node = node.split(':').next().expect("node id");
        assert!(
            line.ends_with(&format!("sum={expected} expected={expected}")),
            "{line}"
        );
        ranks.insert(rank.parse::<usize>().expect("rank number"));
        nodes.insert(node.to_string());
    }
    assert_eq!(
        ranks,
        (0..world).collect(),
        "every rank reports once:\n{logs}"
    );
    nodes
}

fn model(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).expect("model.json")
}

/// The job's model (instance 0's outputs) equals a single-process run to 1e-6.
fn assert_matches_single_process(tc: &TestCluster, id: &str, train: &Path, args: &[&str]) {
    let into = tc.scratch("download");
    let out = tc.shoal(&["job", "download", id, "-p", into.to_str().expect("utf8")]);
    assert!(out.status.success(), "{out:?}");
    let distributed = model(&into.join(id).join("instance-0/model.json"));
    let serial_dir = tc.scratch("serial");
    let status = Command::new(train)
        .arg("--serial")
        .args(args)
        .env("SHOAL_OUTPUT_DIR", &serial_dir)
        .status()
        .expect("serial run");
    assert!(status.success());
    let serial = model(&serial_dir.join("model.json"));
    assert_eq!(distributed["ranks"], 6);
    let close = |a: &serde_json::Value, b: &serde_json::Value| {
        let (a, b) = (a.as_f64().expect("number"), b.as_f64().expect("number"));
        assert!((a - b).abs() < 1e-6, "{a} vs {b}");
    };
    close(&distributed["loss"], &serial["loss"]);
    close(&distributed["bias"], &serial["bias"]);
    let (dw, sw) = (
        distributed["weights"].as_array().expect("weights"),
        serial["weights"].as_array().expect("weights"),
    );
    assert_eq!(dw.len(), sw.len());
    for (a, b) in dw.iter().zip(sw) {
        close(a, b);
    }
}

#[tokio::test]
async fn mpi_training_on_three_local_nodes_matches_a_single_process() {
    let train = support::mpi_train();
    let tc = TestCluster::start().await;
    tc.create_cluster("mpi", &["--max-nodes", "3"]);
    let command = format!("{} --epochs 25", train.display());
    let file = mpi_job(&tc, "mpi.yaml", "mpi", &command, "");
    let job = tc.shoal_json(&["job", "submit", "-f", &file, "--wait"]);
    let id = job["id"].as_str().expect("id").to_string();
    let logs = logs(&tc, &id);
    assert_eq!(job["status"], "completed", "{job:#}\n{logs}");
    let nodes = ranks_and_nodes(&logs, 6);
    assert_eq!(nodes.len(), 3, "ranks on three nodes: {nodes:?}");
    assert!(logs.contains("node(s) ready"), "the barrier ran:\n{logs}");
    assert_matches_single_process(&tc, &id, &train, &["--epochs", "25"]);
}

#[tokio::test]
async fn mpi_training_on_three_docker_nodes_matches_a_single_process() {
    support::docker_ready();
    let train = support::mpi_train();
    support::mpi_image_ready();
    let tc = TestCluster::start().await;
    tc.create_cluster("dmpi", &["--max-nodes", "3", "--provider", "docker"]);
    let file = mpi_job(
        &tc,
        "dmpi.yaml",
        "dmpi",
        "shoal-mpi-train --epochs 25",
        "environment: {image: shoal/mpi-train}",
    );
    let job = tc.shoal_json(&["job", "submit", "-f", &file, "--wait"]);
    let id = job["id"].as_str().expect("id").to_string();
    let logs = logs(&tc, &id);
    assert_eq!(job["status"], "completed", "{job:#}\n{logs}");
    let nodes = ranks_and_nodes(&logs, 6);
    assert_eq!(nodes.len(), 3, "ranks on three nodes: {nodes:?}");
    // Three node containers, each with an address of its own.
    let containers = support::containers_with(&tc, "shoal.node-container");
    let mut addresses = BTreeSet::new();
    for container in &containers {
        let out = Command::new("docker")
            .args([
                "inspect",
                "-f",
                "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
                container,
            ])
            .output()
            .expect("docker inspect");
        addresses.insert(String::from_utf8_lossy(&out.stdout).trim().to_string());
    }
    assert!(
        addresses.len() >= 3,
        "distinct node addresses: {addresses:?}"
    );
    assert_matches_single_process(&tc, &id, &train, &["--epochs", "25"]);
    // The job's containers are gone once it is done.
    eventually(
        "job containers removed",
        Duration::from_secs(30),
        || async {
            support::containers_with(&tc, &format!("shoal.job={id}"))
                .is_empty()
                .then_some(())
        },
    )
    .await;

    // Refused at submit: an image with no mpirun, and an MPI job with no image on
    // docker nodes (whose node image has no Open MPI).
    for (extra, expected) in [
        ("environment: {image: shoal/base}", "no `mpirun`"),
        ("", "needs an image with Open MPI"),
    ] {
        let file = job_file(
            &tc,
            "bad.yaml",
            &format!(
                "compute: dmpi\ncommand: hostname\n{extra}\nresources: {{instance_count: 2}}\ndistribution: {{type: mpi}}\n"
            ),
        );
        let out = tc.shoal(&["job", "submit", "-f", &file]);
        assert!(!out.status.success(), "{extra:?} was accepted");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(expected), "{extra:?}: {stderr}");
    }
}

/// Pids of processes whose environment mentions `needle`.
fn processes_mentioning(needle: &str) -> Vec<i32> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("/proc").flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<i32>() else {
            continue;
        };
        let Ok(environ) = std::fs::read(entry.path().join("environ")) else {
            continue;
        };
        if String::from_utf8_lossy(&environ).contains(needle) && support::process_alive(pid) {
            found.push(pid);
        }
    }
    found
}

#[tokio::test]
async fn killing_one_rank_fails_the_job_and_leaves_nothing_behind() {
    let train = support::mpi_train();
    let tc = TestCluster::start().await;
    tc.create_cluster("mpi", &["--max-nodes", "3"]);
    let command = format!("{} --epochs 100000 --epoch-delay-ms 20", train.display());
    let file = mpi_job(&tc, "long.yaml", "mpi", &command, "");
    let job = tc.shoal_json(&["job", "submit", "-f", &file]);
    let id = job["id"].as_str().expect("id").to_string();
    eventually("all ranks running", Duration::from_secs(60), || async {
        (logs(&tc, &id).matches("allreduce sum=21").count() == 6).then_some(())
    })
    .await;
    // Everything of this job carries the test's data dir in its environment.
    let data_dir = tc.data_dir().display().to_string();
    let rank_3: Vec<i32> = processes_mentioning(&data_dir)
        .into_iter()
        .filter(|pid| {
            let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            // The program itself, not the `sh -c` around it.
            String::from_utf8_lossy(&cmdline).starts_with(&*train.to_string_lossy())
                && String::from_utf8_lossy(&environ)
                    .split('\0')
                    .any(|kv| kv == "OMPI_COMM_WORLD_RANK=3")
        })
        .collect();
    assert_eq!(rank_3.len(), 1, "one process is rank 3: {rank_3:?}");
    let _ = Command::new("kill")
        .args(["-KILL", &rank_3[0].to_string()])
        .status();
    let job = tc
        .wait_job(
            &id,
            "the job ends",
            Duration::from_secs(60),
            support::all_instances_ended,
        )
        .await;
    assert_eq!(job.status, "failed", "{job:#?}");
    assert!(
        job.reason.contains("rank 3"),
        "the reason names the rank: {}",
        job.reason
    );
    assert!(job.reason.contains("instance 0"), "{}", job.reason);
    eventually(
        "no rank, daemon or holder of the job left",
        Duration::from_secs(30),
        || async {
            let left: Vec<i32> = processes_mentioning(&data_dir)
                .into_iter()
                // The agents themselves run with the data dir in their environment.
                .filter(|pid| {
                    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                    !String::from_utf8_lossy(&cmdline).contains("\0agent\0")
                })
                .collect();
            if !left.is_empty() {
                for pid in &left {
                    let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                    eprintln!(
                        "left: {pid} {}",
                        String::from_utf8_lossy(&cmdline).replace('\0', " ")
                    );
                }
            }
            left.is_empty().then_some(())
        },
    )
    .await;
}
