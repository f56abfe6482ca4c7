//! The control loop through its driver (tokio, the real store): what needs the
//! driver itself. Timings and state changes are tested on the state machine by
//! hand in `machine_tests`.
use super::*;
use crate::store::SqlStore;
use crate::testing::{ClusterBuilder, FakeProvider};

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

#[tokio::test]
async fn identities_of_an_earlier_version_are_imported_once() {
    use crate::model::{ClusterIdentity, Identity, IdentityKind};
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("shoal.db");
    let provider = Arc::new(FakeProvider::default());
    {
        let store = SqlStore::open(&path).expect("store");
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
    let store = SqlStore::open(&path).expect("store");
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
    let reopened = SqlStore::open(&path).expect("store").load().expect("load");
    assert_eq!(
        reopened.identities.len(),
        1,
        "committed, not only in memory"
    );
    assert_eq!(reopened.clusters[0].identities.len(), 1);
}
