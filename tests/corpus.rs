//! The corpus (`tests/corpus/`): compute, data, environment and job files written
//! as users of the managed service write them, run through the real CLI against
//! a real coordinator (and a real Docker Engine, which builds the environments).
//! Each file says what it expects in its first line:
//!
//!   # accepted; warns: KEY; set: K=V K=V; cluster: NAME; instances: N; size: S; identity: ID; version: V
//!   # refused: WORDS THE ERROR CONTAINS
//!
//! Accepted files must print every warning named (and no other), refused ones
//! must fail with the words given and leave nothing behind.

mod support;

use std::path::{Path, PathBuf};

use support::TestCluster;

#[derive(Debug, Default)]
struct Expect {
    refused_with: Option<String>,
    warns: Vec<String>,
    set: Vec<String>,
    cluster: Option<String>,
    instances: Option<u64>,
    size: Option<String>,
    identity: Option<String>,
    version: Option<String>,
}

fn expectation(path: &Path) -> Expect {
    let text = std::fs::read_to_string(path).expect("corpus file");
    let first = text.lines().next().unwrap_or_default();
    let line = first.strip_prefix("# ").unwrap_or_else(|| {
        panic!(
            "{} starts with no `# accepted` / `# refused:` line",
            path.display()
        )
    });
    let mut expect = Expect::default();
    if let Some(words) = line.strip_prefix("refused: ") {
        // `refused: WORDS; set: ...`
        let mut parts = words.split("; ");
        expect.refused_with = parts.next().map(str::to_string);
        for part in parts {
            if let Some(set) = part.strip_prefix("set: ") {
                expect.set = set.split(' ').map(str::to_string).collect();
            }
        }
        return expect;
    }
    let mut parts = line.split("; ");
    assert_eq!(parts.next(), Some("accepted"), "{}: {line}", path.display());
    for part in parts {
        let (key, value) = part
            .split_once(": ")
            .unwrap_or_else(|| panic!("{}: `{part}`", path.display()));
        match key {
            "warns" => expect.warns.push(value.to_string()),
            "set" => expect.set = value.split(' ').map(str::to_string).collect(),
            "cluster" => expect.cluster = Some(value.to_string()),
            "instances" => expect.instances = Some(value.parse().expect("instances")),
            "size" => expect.size = Some(value.to_string()),
            "identity" => expect.identity = Some(value.to_string()),
            "version" => expect.version = Some(value.to_string()),
            other => panic!("{}: unknown expectation `{other}`", path.display()),
        }
    }
    expect
}

fn corpus(kind: &str, verdict: &str) -> Vec<PathBuf> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/corpus")
        .join(kind)
        .join(verdict);
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "yml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no corpus files in {}", dir.display());
    files
}

/// The `warning: ` lines of a command's stderr.
fn warnings(stderr: &str) -> Vec<String> {
    stderr
        .lines()
        .filter_map(|l| l.strip_prefix("warning: "))
        .map(str::to_string)
        .collect()
}

/// The `name:` of a corpus file (what a refused create must not have made).
fn name_in(path: &Path) -> Option<String> {
    std::fs::read_to_string(path)
        .ok()?
        .lines()
        .find_map(|l| l.strip_prefix("name: ").map(|n| n.trim().to_string()))
}

struct Tally {
    accepted: usize,
    refused: Vec<(String, String)>,
}

/// Runs `args` + the file; checks the verdict and the warnings; returns stdout.
fn check(
    tc: &TestCluster,
    args: &[&str],
    path: &Path,
    tally: &mut Tally,
) -> Option<serde_json::Value> {
    let expect = expectation(path);
    let file = path.to_str().expect("utf8 path");
    let mut all: Vec<&str> = vec!["-o", "json"];
    all.extend_from_slice(args);
    all.extend_from_slice(&["-f", file]);
    if !expect.set.is_empty() {
        all.push("--set");
        all.extend(expect.set.iter().map(String::as_str));
    }
    let output = tc.shoal(&all);
    let stderr = String::from_utf8_lossy(&output.stderr).into_owned();
    let short = path
        .strip_prefix(Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/corpus"))
        .unwrap_or(path)
        .display()
        .to_string();
    match &expect.refused_with {
        Some(words) => {
            assert!(
                !output.status.success(),
                "{short} was accepted; it should be refused with `{words}`"
            );
            let error = stderr
                .lines()
                .find(|l| l.starts_with("error: "))
                .unwrap_or_else(|| panic!("{short}: no error line in {stderr}"));
            assert!(
                error.contains(words.as_str()),
                "{short}: expected `{words}` in: {error}"
            );
            assert!(!stderr.contains("panicked"), "{short}: {stderr}");
            tally
                .refused
                .push((short, error.trim_start_matches("error: ").to_string()));
            None
        }
        None => {
            assert!(
                output.status.success(),
                "{short} was refused: {stderr}\n{}",
                tc.coordinator_log()
            );
            let printed = warnings(&stderr);
            for warning in &expect.warns {
                assert!(
                    printed.iter().any(|w| w.contains(warning.as_str())),
                    "{short}: no warning about `{warning}` in {printed:?}"
                );
            }
            assert_eq!(
                printed.len(),
                expect.warns.len(),
                "{short}: warnings {printed:?}, expected {:?}",
                expect.warns
            );
            tally.accepted += 1;
            // Environment creation streams its build log to stderr; JSON is the last line(s).
            Some(serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
                panic!(
                    "{short}: no JSON ({e}): {}",
                    String::from_utf8_lossy(&output.stdout)
                )
            }))
        }
    }
}

#[tokio::test]
async fn the_corpus_is_accepted_or_refused_as_each_file_says() {
    support::docker_ready();
    let tc = TestCluster::start().await;
    let mut tally = Tally {
        accepted: 0,
        refused: Vec::new(),
    };
    let mut counts = Vec::new();

    // Compute files: clusters (and their identities), or nothing at all.
    tc.shoal_json(&["identity", "create", "reader-bot"]);
    let before = tally.accepted;
    for path in corpus("compute", "accepted") {
        let expect = expectation(&path);
        let cluster = check(&tc, &["cluster", "create"], &path, &mut tally).expect("a cluster");
        if let Some(size) = expect.size {
            assert_eq!(cluster["vm_size"], size.as_str(), "{}", path.display());
        }
        if let Some(identity) = expect.identity {
            let name = cluster["name"].as_str().expect("name");
            let shown = tc.shoal_json(&["cluster", "identity", "show", "--name", name]);
            let names: Vec<&str> = shown
                .as_array()
                .expect("list")
                .iter()
                .map(|i| i["name"].as_str().unwrap_or_default())
                .collect();
            let want = if identity == "[system]" {
                "system"
            } else {
                identity.as_str()
            };
            let text = shown.to_string().to_lowercase();
            assert!(
                names.iter().any(|n| n.contains(want)) || text.contains(&want.to_lowercase()),
                "{}: {shown}",
                path.display()
            );
        }
    }
    let refused_before = tally.refused.len();
    for path in corpus("compute", "refused") {
        check(&tc, &["cluster", "create"], &path, &mut tally);
        if let Some(name) = name_in(&path) {
            assert!(
                !tc.shoal(&["cluster", "show", &name]).status.success(),
                "refused {} left cluster {name} behind",
                path.display()
            );
        }
    }
    counts.push((
        "compute",
        tally.accepted - before,
        tally.refused.len() - refused_before,
    ));
    // The corpus submits jobs without running them.
    for cluster in ["cpu-cluster", "gpu-cluster"] {
        tc.shoal_json(&["cluster", "lock", cluster, "--kind", "read-only"]);
    }

    // What the job files read: a datastore's files, data assets, environments.
    let examples = tc
        .data_dir()
        .join("datastores/workspaceblobstore/example-data");
    std::fs::create_dir_all(&examples).expect("datastore folder");
    std::fs::copy(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/corpus/jobs/data/iris.csv"),
        examples.join("iris.csv"),
    )
    .expect("copy");
    for (kind, args) in [
        ("data", &["data", "create"][..]),
        ("environments", &["environment", "create"][..]),
    ] {
        let (before, refused_before) = (tally.accepted, tally.refused.len());
        for path in corpus(kind, "accepted") {
            let expect = expectation(&path);
            let made = check(&tc, args, &path, &mut tally).expect("made");
            if let Some(version) = expect.version {
                assert_eq!(made[0]["version"], version.as_str(), "{}", path.display());
            }
        }
        for path in corpus(kind, "refused") {
            check(&tc, args, &path, &mut tally);
            if let Some(name) = name_in(&path) {
                let noun = args[0];
                assert!(
                    !tc.shoal(&[noun, "show", &name]).status.success(),
                    "refused {} left {name} behind",
                    path.display()
                );
            }
        }
        counts.push((
            kind,
            tally.accepted - before,
            tally.refused.len() - refused_before,
        ));
    }
    tc.shoal(&["configure", "--defaults", "compute=cpu-cluster"]);

    // Job files.
    let (before, refused_before) = (tally.accepted, tally.refused.len());
    for path in corpus("jobs", "accepted") {
        let expect = expectation(&path);
        let job = check(&tc, &["job", "submit"], &path, &mut tally).expect("a job");
        let want = expect.cluster.as_deref().unwrap_or("cpu-cluster");
        assert_eq!(job["cluster"], want, "{}: {job:#}", path.display());
        if let Some(n) = expect.instances {
            assert_eq!(job["instance_count"], n, "{}: {job:#}", path.display());
        }
        assert_eq!(
            job["warnings"].as_array().map(Vec::len),
            Some(expect.warns.len()),
            "{}: the job keeps its warnings: {job:#}",
            path.display()
        );
    }
    let submitted = tc.shoal_json(&["job", "list"]).as_array().map(Vec::len);
    for path in corpus("jobs", "refused") {
        check(&tc, &["job", "submit"], &path, &mut tally);
    }
    assert_eq!(
        tc.shoal_json(&["job", "list"]).as_array().map(Vec::len),
        submitted,
        "a refused job file made a job"
    );
    counts.push((
        "jobs",
        tally.accepted - before,
        tally.refused.len() - refused_before,
    ));

    eprintln!(
        "corpus: {} accepted, {} refused",
        tally.accepted,
        tally.refused.len()
    );
    for (kind, accepted, refused) in counts {
        eprintln!("  {kind}: {accepted} accepted, {refused} refused");
    }
    for (file, error) in &tally.refused {
        eprintln!("  refused {file}: {error}");
    }
}
