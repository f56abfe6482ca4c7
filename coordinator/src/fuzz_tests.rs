//! Malformed input thrown at the coordinator's edges: random protobuf bytes into
//! the wire conversions, random YAML into the job and compute file parsers, random
//! bodies into the HTTP API (in process, on a real control loop). Nothing may
//! panic, and every refusal is a clear client error, never a 500. Each suite runs
//! a few hundred cases in `cargo test`; `bench/fuzz.sh` runs 100,000 of each
//! (`SHOAL_FUZZ_CASES`) and measures the memory it takes.

use std::sync::Arc;

use axum::body::Body;
use axum::http::{Method, Request, StatusCode};
use proptest::prelude::*;
use prost::Message;
use shoal_proto::v1 as pb;
use tower::ServiceExt;

use crate::admission;
use crate::api::{Api, convert, http};
use crate::artifacts::Artifacts;
use crate::auth::Auth;
use crate::computefile::ComputeFile;
use crate::control::{ControlConfig, Driver};
use crate::store::SqlStore;
use crate::testing::FakeProvider;
use crate::vmsize::Catalog;

/// Cases per suite: `default` in `cargo test`, or `SHOAL_FUZZ_CASES`.
fn cases(default: u32) -> u32 {
    std::env::var("SHOAL_FUZZ_CASES")
        .ok()
        .and_then(|n| n.parse().ok())
        .unwrap_or(default)
}

/// Bytes that look like protobuf often enough to get past the first field.
fn wire_bytes() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        proptest::collection::vec(any::<u8>(), 0..256),
        // Valid messages with random fields, then flipped bytes.
        (
            any::<String>(),
            any::<String>(),
            any::<u32>(),
            proptest::collection::vec(any::<String>(), 0..4),
            any::<u64>(),
            any::<u8>()
        )
            .prop_map(|(name, command, instances, argv, size, flip)| {
                let spec = pb::JobSpec {
                    name,
                    cluster: "c".into(),
                    command,
                    argv,
                    instance_count: instances,
                    distribution: Some(pb::Distribution {
                        r#type: ["mpi", "pytorch", "tensorflow", "horovod"][(size % 4) as usize]
                            .into(),
                        process_count_per_instance: instances % 5,
                        worker_count: instances % 3,
                        parameter_server_count: instances % 2,
                    }),
                    parallel: (size % 3 == 0).then(|| pb::Parallel {
                        input_type: ["uri_file", "uri_folder", "x"][(size % 3) as usize].into(),
                        input: vec![flip; (size % 64) as usize],
                        mini_batch_size: size % 7,
                        mini_batch_bytes: size % 5,
                        max_concurrency_per_instance: instances % 100,
                        ..Default::default()
                    }),
                    ..Default::default()
                };
                let mut bytes = spec.encode_to_vec();
                if !bytes.is_empty() {
                    let at = (size as usize) % bytes.len();
                    bytes[at] ^= flip;
                }
                bytes
            }),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(400), .. ProptestConfig::default() })]

    #[test]
    fn random_protobuf_never_panics_the_wire_conversions(bytes in wire_bytes()) {
        if let Ok(spec) = pb::JobSpec::decode(bytes.as_slice()) {
            let _ = convert::job_request(spec, None);
        }
        if let Ok(spec) = pb::ClusterSpec::decode(bytes.as_slice()) {
            let request = convert::cluster_request(spec);
            let _ = crate::model::ClusterSpec::from_request(request, &Catalog::default());
        }
        if let Ok(message) = pb::AgentMessage::decode(bytes.as_slice()) {
            match message.msg {
                Some(pb::agent_message::Msg::Register(register)) => {
                    let _ = convert::registration(register);
                }
                Some(pb::agent_message::Msg::Heartbeat(heartbeat)) => {
                    let _ = convert::heartbeat(heartbeat);
                }
                Some(pb::agent_message::Msg::Event(event)) => {
                    if let Some(pb::attempt_event::Kind::Exited(exited)) = event.kind {
                        let _ = convert::exited(exited);
                    }
                }
                _ => {}
            }
        }
    }

    #[test]
    fn random_yaml_never_panics_the_compute_file_parser(text in "[a-z_:{}\\[\\], 0-9\n\"'-]{0,200}") {
        if let Ok(request) = ComputeFile::from_yaml(&text).and_then(ComputeFile::into_request) {
            let _ = crate::model::ClusterSpec::from_request(request, &Catalog::default());
        }
    }

    #[test]
    fn compute_files_with_random_values_are_parsed_or_refused(
        key in prop::sample::select(vec![
            "size", "min_instances", "max_instances", "tier", "idle_time_before_scale_down",
            "tags", "provider", "internode_communication", "type", "name", "identity",
            "location", "ssh_settings", "network_settings", "enable_node_public_ip",
        ]),
        value in "[a-zA-Z0-9_{}:, -]{0,30}",
    ) {
        let text = format!("name: fuzz\nsize: Standard_D2_v2\n{key}: {value}\n");
        if let Ok(request) = ComputeFile::from_yaml(&text).and_then(ComputeFile::into_request) {
            let _ = crate::model::ClusterSpec::from_request(request, &Catalog::default());
        }
    }

    #[test]
    fn random_yaml_never_panics_the_job_file_parser(text in "[a-z_:{}\\[\\], 0-9\n\"'-]{0,200}") {
        if let Ok(draft) = admission::jobfile::document(&text).and_then(|doc| admission::draft(doc, &[])) {
            let _ = admission::local_paths(&draft);
            let _ = draft.file.parallel_wire("uri_file", b"1\n2\n".to_vec(), "rows");
            let _ = draft.file.distribution_wire();
        }
    }

    #[test]
    fn job_files_with_random_values_are_parsed_or_refused(
        key in prop::sample::select(vec![
            "mini_batch_size", "max_concurrency_per_instance", "allowed_failed_percent",
            "mini_batch_error_threshold", "output", "distribution", "resources", "inputs",
        ]),
        value in "[a-z0-9{}:, -]{0,30}",
    ) {
        let text = format!("type: parallel\ncompute: c\ntask: {{command: x}}\ninputs: {{data: {{type: uri_file, path: a}}}}\n{key}: {value}\n");
        if let Ok(draft) = admission::jobfile::document(&text).and_then(|doc| admission::draft(doc, &[]))
            && let Ok(wire) = draft.file.parallel_wire("uri_file", b"1\n".to_vec(), "rows")
        {
            let spec = pb::JobSpec { cluster: "c".into(), command: "x".into(), parallel: Some(wire), ..Default::default() };
            let _ = convert::job_request(spec, None);
        }
    }
}

/// The HTTP API on a real control loop (in-memory store, fake provider).
fn app(runtime: &tokio::runtime::Runtime) -> axum::Router {
    runtime.block_on(async {
        let store = SqlStore::in_memory().expect("store");
        let reader = store.reader().expect("reader");
        let (control, handle, inbox) = Driver::new(
            ControlConfig::default(),
            Box::new(store),
            Arc::new(FakeProvider::default()),
        )
        .expect("control");
        tokio::spawn(control.run(inbox, std::future::pending()));
        let dir = std::env::temp_dir().join(format!("shoal-fuzz-{}", std::process::id()));
        let api = Api::new(
            handle,
            Catalog::default(),
            Artifacts::new(dir),
            1 << 20,
            Auth::in_memory().expect("auth"),
            reader,
        );
        http::router(api)
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: cases(300), .. ProptestConfig::default() })]

    #[test]
    fn random_http_bodies_get_a_client_error_not_a_crash(
        route in prop::sample::select(vec![
            (Method::POST, "/api/v1/jobs"),
            (Method::POST, "/api/v1/clusters"),
            (Method::PATCH, "/api/v1/clusters/fuzz"),
            (Method::POST, "/api/v1/jobs/job-1/cancel"),
            (Method::DELETE, "/api/v1/clusters/fuzz"),
            (Method::GET, "/api/v1/jobs/%00"),
        ]),
        body in prop_oneof![
            "[ -~]{0,120}",
            proptest::collection::vec(any::<u8>(), 0..120).prop_map(|b| String::from_utf8_lossy(&b).into_owned()),
            Just("{\"name\": \"fuzz\", \"vm_size\": \"Standard_D2_v2\", \"max_nodes\": 4294967295}".to_string()),
            Just("compute: fuzz\ncommand: true\nresources: {instance_count: 99999999999}".to_string()),
            Just("{\"compute\": 3, \"command\": [\"a\"]}".to_string()),
        ],
    ) {
        thread_local! {
            static RUNTIME: tokio::runtime::Runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            static APP: axum::Router = RUNTIME.with(app);
        }
        let (method, path) = route;
        let response = RUNTIME.with(|runtime| {
            APP.with(|router| {
                let request = Request::builder()
                    .method(method.clone())
                    .uri(path)
                    .header("content-type", "application/json")
                    .body(Body::from(body.clone()))
                    .expect("request");
                runtime.block_on(router.clone().oneshot(request)).expect("infallible")
            })
        });
        let status = response.status();
        prop_assert!(
            status != StatusCode::INTERNAL_SERVER_ERROR && (status.is_success() || status.is_client_error()),
            "{method} {path} {body:?} -> {status}"
        );
    }
}
