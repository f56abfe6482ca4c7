//! The control loop through its driver (tokio, the real store, channel agents):
//! what needs the driver itself. Timings and state changes are tested on the
//! state machine by hand in `machine_tests`.
use super::*;
use crate::store::SqliteStore;
use crate::testing::{ClusterBuilder, FakeProvider};
use tokio::sync::mpsc::UnboundedReceiver;

/// The control loop on an in-memory store and a fake provider; agents are channels.
struct Harness {
    handle: ControlHandle,
    provider: FakeProvider,
    _stop: oneshot::Sender<()>,
}

async fn harness() -> Harness {
    harness_with(FakeProvider::default()).await
}

async fn harness_with(provider: FakeProvider) -> Harness {
    harness_full(provider, ControlConfig::default()).await
}

async fn harness_config(config: ControlConfig) -> Harness {
    harness_full(FakeProvider::default(), config).await
}

async fn harness_full(provider: FakeProvider, config: ControlConfig) -> Harness {
    let store = SqliteStore::in_memory().expect("store");
    let (control, handle, inbox) =
        Driver::new(config, Box::new(store), Arc::new(provider.clone())).expect("control");
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(control.run(inbox, async move {
        let _ = stopped.await;
    }));
    Harness {
        handle,
        provider,
        _stop: stop,
    }
}

async fn eventually<T>(what: &str, mut probe: impl FnMut() -> Option<T>) -> T {
    for _ in 0..400 {
        if let Some(value) = probe() {
            return value;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("{what} did not happen within 2 s");
}

impl Harness {
    async fn cluster(&self, max: u32, idle_seconds: u64) {
        self.handle
            .create_cluster(ClusterRequest {
                name: "cl".into(),
                vm_size: "Standard_D2_v2".into(),
                max_nodes: Some(max),
                idle_seconds_before_scaledown: Some(idle_seconds),
                ..Default::default()
            })
            .await
            .expect("cluster");
    }

    async fn submit(&self) -> String {
        let request = JobRequest {
            cluster: "cl".into(),
            command: "true".into(),
            ..Default::default()
        };
        self.handle.submit_job(request).await.expect("submit").id
    }

    async fn created_node(&self, index: usize) -> String {
        let created = self.provider.created.clone();
        eventually("node creation", || created.lock().ok()?.get(index).cloned()).await
    }

    async fn register(
        &self,
        node_id: &str,
        session: u64,
        attempts: Vec<AttemptReport>,
    ) -> UnboundedReceiver<ToAgent> {
        let (link, rx) = mpsc::unbounded_channel();
        let registration = Registration {
            node_id: node_id.into(),
            cluster: "cl".into(),
            cores: 2,
            memory_bytes: 1 << 30,
            hostname: "localhost".into(),
            pid: 1,
            runtimes: vec!["process".into()],
            attempts,
            gpus: Vec::new(),
            gpu_reason: String::new(),
        };
        self.handle
            .register_agent(registration, session, link)
            .await
            .expect("register");
        rx
    }

    async fn job_status(&self, id: &str, status: JobStatus) -> Job {
        self.job_until(id, |job| job.status == status).await
    }

    async fn job_until(&self, id: &str, done: impl Fn(&Job) -> bool) -> Job {
        for _ in 0..400 {
            let job = self.handle.get_job(id.to_string()).await.expect("job");
            if done(&job) {
                return job;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        panic!("{id} never got there");
    }
}

async fn next_launch(rx: &mut UnboundedReceiver<ToAgent>) -> LaunchOrder {
    loop {
        let message = tokio::time::timeout(Duration::from_secs(2), rx.recv())
            .await
            .expect("a message in time")
            .expect("link open");
        if let ToAgent::Launch(order) = message {
            return order;
        }
    }
}

fn exit(code: i32) -> ExitReport {
    ExitReport {
        exit_code: Some(code),
        outcome: if code == 0 { "completed" } else { "failed" }.into(),
        message: String::new(),
        usage: None,
    }
}

#[test]
fn attempt_ids_name_their_job() {
    assert_eq!(job_of_attempt("job-12.3"), Some("job-12"));
    assert_eq!(job_of_attempt("nonsense"), None);
}

#[test]
fn waiting_reasons_name_the_blocker() {
    let spec = ClusterBuilder::new("c").max(2).build();
    assert_eq!(
        waiting_reason(&spec, 0, 2, 0, 2),
        "waiting for nodes: scaling 0 → 2"
    );
    assert!(waiting_reason(&spec, 2, 2, 0, 1).starts_with("max_nodes 2 reached"));
    let wide = ClusterBuilder::new("c").max(4).build();
    assert_eq!(
        waiting_reason(&wide, 3, 3, 1, 3),
        "gang of 3 needs 3 nodes, 1 ready"
    );
}

async fn job_reason(h: &Harness, id: &str, contains: &str) -> String {
    for _ in 0..400 {
        let job = h.handle.get_job(id.to_string()).await.expect("job");
        if job.reason.contains(contains) {
            return job.reason;
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    panic!("{id}: no reason with `{contains}`");
}

#[tokio::test]
async fn a_read_only_lock_holds_scaling_and_says_so() {
    let h = harness().await;
    h.cluster(2, 60).await;
    h.handle
        .lock_cluster("cl".into(), Some(LockKind::ReadOnly))
        .await
        .expect("lock");
    let id = h.submit().await;
    let reason = job_reason(&h, &id, "locked").await;
    assert_eq!(
        reason,
        "cluster locked read-only; `shoal cluster unlock cl` lets it scale"
    );
    assert!(h.provider.created.lock().expect("created").is_empty());
    h.handle
        .lock_cluster("cl".into(), None)
        .await
        .expect("unlock");
    h.created_node(0).await;
}

#[tokio::test]
async fn a_quota_names_the_scope_and_the_numbers() {
    let h = harness_config(ControlConfig {
        quotas: crate::governance::Quotas {
            total_cores: 2,
            ..Default::default()
        },
        ..ControlConfig::default()
    })
    .await;
    h.cluster(4, 60).await;
    let request = JobRequest {
        cluster: "cl".into(),
        command: "true".into(),
        instance_count: 2,
        ..Default::default()
    };
    let id = h.handle.submit_job(request).await.expect("submit").id;
    let reason = job_reason(&h, &id, "quota").await;
    assert_eq!(reason, "quota: total 2/2 cores used; a node needs 2");
    assert_eq!(h.provider.created.lock().expect("created").len(), 1);
    let report = h.handle.quotas().await.expect("quotas");
    assert!(
        report.lines.contains(&("total".to_string(), 2, 2)),
        "{report:?}"
    );
}

#[tokio::test]
async fn an_mpi_job_completes_with_its_launcher_and_releases_the_holders() {
    let h = harness().await;
    h.cluster(2, 60).await;
    let request = JobRequest {
        cluster: "cl".into(),
        command: "train".into(),
        instance_count: 2,
        distribution: Some(crate::model::Distribution::Mpi {
            process_count_per_instance: 3,
        }),
        ..Default::default()
    };
    let id = h.handle.submit_job(request).await.expect("submit").id;
    let (a, b) = (h.created_node(0).await, h.created_node(1).await);
    let mut links = [
        h.register(&a, 1, vec![]).await,
        h.register(&b, 1, vec![]).await,
    ];
    let mut orders = Vec::new();
    for link in links.iter_mut() {
        orders.push(next_launch(link).await);
    }
    orders.sort_by_key(|o| o.slot.instance);
    for order in &orders {
        // mpirun starts the ranks: the agent starts one process per instance.
        assert!(order.mpi);
        assert_eq!(order.processes, 1);
        assert_eq!(order.env["SHOAL_MPI_PROCESSES_PER_NODE"], "3");
        assert_eq!(order.env["OMPI_MCA_plm_rsh_no_tree_spawn"], "1");
        assert_eq!(order.env["SHOAL_NODE_IDS"].split(',').count(), 2);
    }
    let node_of = |order: &LaunchOrder| order.env["SHOAL_NODE_ID"].clone();
    for order in &orders {
        h.handle
            .send(Command::InstanceStarted {
                node_id: node_of(order),
                slot: order.slot.clone(),
                gpus: Vec::new(),
            })
            .await;
    }
    h.job_status(&id, JobStatus::Running).await;
    // The launcher (instance 0) ends well: the job is done, the holder is released.
    h.handle
        .send(Command::InstanceExited {
            node_id: node_of(&orders[0]),
            slot: orders[0].slot.clone(),
            exit: exit(0),
        })
        .await;
    h.job_status(&id, JobStatus::Completed).await;
    let holder = node_of(&orders[1]);
    let link = if holder == a {
        &mut links[0]
    } else {
        &mut links[1]
    };
    let released = loop {
        let message = tokio::time::timeout(Duration::from_secs(2), link.recv())
            .await
            .expect("a cancel in time")
            .expect("link open");
        if let ToAgent::Cancel { slot, reason } = message {
            break (slot, reason);
        }
    };
    assert_eq!(released.0, orders[1].slot);
    assert_eq!(released.1, super::MPI_RELEASE);
    h.handle
        .send(Command::InstanceExited {
            node_id: holder,
            slot: orders[1].slot.clone(),
            exit: ExitReport {
                exit_code: Some(0),
                outcome: "canceled".into(),
                message: released.1,
                usage: None,
            },
        })
        .await;
    let job = h
        .job_until(&id, |job| {
            job.attempts[0].instances[1].status == crate::model::InstanceStatus::Completed
        })
        .await;
    assert_eq!(job.status, JobStatus::Completed);
}

#[tokio::test]
async fn identities_are_made_with_their_cluster_and_go_with_it() {
    let h = harness().await;
    let bot = h
        .handle
        .create_identity("reader-bot".into())
        .await
        .expect("identity");
    assert!(
        h.handle.create_identity("reader-bot".into()).await.is_err(),
        "names are unique"
    );
    let request = |identities: &[&str]| ClusterRequest {
        name: "cl".into(),
        vm_size: "Standard_D2_v2".into(),
        identities: identities.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    };
    // An unknown identity refuses the whole create: no cluster is left behind.
    let err = h
        .handle
        .create_cluster(request(&["[system]", "nobody"]))
        .await
        .expect_err("unknown identity");
    assert!(err.to_string().contains("no identity `nobody`"), "{err}");
    assert!(
        h.handle.get_cluster("cl".into()).await.is_err(),
        "nothing was created"
    );

    // By resource id, as the managed service's examples name them; system first.
    let resource = "/subscriptions/0000/resourceGroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/reader-bot";
    let info = h
        .handle
        .create_cluster(request(&[resource, "[system]"]))
        .await
        .expect("cluster");
    let kinds: Vec<_> = info
        .identities
        .iter()
        .map(|a| (a.kind, a.name.clone()))
        .collect();
    assert_eq!(
        kinds,
        vec![
            (crate::model::IdentityKind::SystemAssigned, "cl".to_string()),
            (
                crate::model::IdentityKind::UserAssigned,
                "reader-bot".to_string()
            ),
        ]
    );
    assert_eq!(info.identities[1].client_id, bot.client_id);
    let info = h
        .handle
        .remove_identity("cl".into(), "[system]".into())
        .await
        .expect("remove");
    assert_eq!(info.identities.len(), 1);

    // Deleted with the cluster: a new cluster of the same name inherits nothing.
    h.handle.delete_cluster("cl".into()).await.expect("delete");
    let info = h.handle.create_cluster(request(&[])).await.expect("again");
    assert!(info.identities.is_empty(), "{:?}", info.identities);
    let info = h
        .handle
        .assign_identity("cl".into(), bot.client_id.clone())
        .await
        .expect("by client id");
    assert_eq!(info.identities[0].name, "reader-bot");
}

#[tokio::test]
async fn identities_of_an_earlier_version_are_imported_once() {
    use crate::model::{ClusterIdentity, Identity, IdentityKind};
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("shoal.db");
    let provider = Arc::new(FakeProvider::default());
    {
        let store = SqliteStore::open(&path).expect("store");
        let (control, handle, inbox) =
            Driver::new(ControlConfig::default(), Box::new(store), provider.clone())
                .expect("control");
        let (stop, stopped) = oneshot::channel::<()>();
        let running = tokio::spawn(control.run(inbox, async move {
            let _ = stopped.await;
        }));
        handle
            .create_cluster(ClusterRequest {
                name: "cl".into(),
                vm_size: "Standard_D2_v2".into(),
                ..Default::default()
            })
            .await
            .expect("cluster");
        let _ = stop.send(());
        running.await.expect("loop");
    }
    let store = SqliteStore::open(&path).expect("store");
    let (mut control, handle, inbox) =
        Driver::new(ControlConfig::default(), Box::new(store), provider).expect("control");
    control
        .import_identities(
            vec![Identity {
                name: "bot".into(),
                client_id: "c-1".into(),
                created_at: 1,
            }],
            vec![
                (
                    "cl".into(),
                    ClusterIdentity {
                        kind: IdentityKind::UserAssigned,
                        client_id: "c-1".into(),
                    },
                ),
                (
                    "gone".into(),
                    ClusterIdentity {
                        kind: IdentityKind::SystemAssigned,
                        client_id: "c-2".into(),
                    },
                ),
            ],
        )
        .expect("import");
    let (_stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(control.run(inbox, async move {
        let _ = stopped.await;
    }));
    let info = handle.get_cluster("cl".into()).await.expect("cluster");
    assert_eq!(info.identities.len(), 1);
    assert_eq!(info.identities[0].name, "bot");
    let reopened = SqliteStore::open(&path)
        .expect("store")
        .load()
        .expect("load");
    assert_eq!(
        reopened.identities.len(),
        1,
        "committed, not only in memory"
    );
    assert_eq!(reopened.clusters[0].identities.len(), 1);
}

#[tokio::test]
async fn only_live_and_recent_jobs_stay_in_memory() {
    let h = harness_config(ControlConfig {
        recent_jobs: 2,
        ..ControlConfig::default()
    })
    .await;
    h.cluster(1, 60).await;
    let node = {
        let first = h.submit().await;
        let node = h.created_node(0).await;
        (first, node)
    };
    let (first, node) = node;
    let mut agent = h.register(&node, 1, vec![]).await;
    let mut ids = vec![first];
    for _ in 0..3 {
        ids.push(h.submit().await);
    }
    for id in &ids {
        let order = next_launch(&mut agent).await;
        h.handle
            .send(Command::InstanceExited {
                node_id: node.clone(),
                slot: order.slot,
                exit: exit(0),
            })
            .await;
        h.job_status(id, JobStatus::Completed).await;
    }
    // The two oldest are in the store only; every one is counted.
    for old in &ids[..2] {
        let err = h.handle.get_job(old.clone()).await.expect_err("evicted");
        assert!(matches!(err, Error::NotFound(_)), "{err}");
    }
    assert!(h.handle.get_job(ids[3].clone()).await.is_ok());
    let counts = h.handle.job_counts().await.expect("counts");
    assert_eq!(counts.get(&JobStatus::Completed), Some(&4));
    // Deleting a live job is refused; an ended one is forgotten at once.
    let live = h.submit().await;
    assert!(h.handle.delete_job(live).await.is_err());
    h.handle.delete_job(ids[3].clone()).await.expect("delete");
    assert!(h.handle.get_job(ids[3].clone()).await.is_err());
    let counts = h.handle.job_counts().await.expect("counts");
    assert_eq!(counts.get(&JobStatus::Completed), Some(&3));
}
