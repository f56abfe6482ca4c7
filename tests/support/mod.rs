//! `TestCluster`: a real `shoal up` coordinator process on a loopback port with its
//! own data dir; its local provider starts real `shoal agent` processes. Every wait
//! is bounded. Dropping it stops the coordinator and anything it left behind.
#![allow(dead_code)]

use std::future::Future;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use shoal_proto::v1 as pb;
use shoal_proto::v1::{
    clusters_client::ClustersClient, jobs_client::JobsClient, nodes_client::NodesClient,
};
use shoal_proto::{AuthChannel, Bearer};
use tonic::transport::Channel;

pub const SHOAL: &str = env!("CARGO_BIN_EXE_shoal");

pub struct TestCluster {
    pub dir: tempfile::TempDir,
    pub port: u16,
    coordinator: Option<Child>,
    env: Vec<(String, String)>,
    /// Extra arguments of `shoal up` (`--tls`).
    up_args: Vec<String>,
}

/// What an HTTP request got back.
pub struct Response {
    pub code: u16,
    /// The status line and headers.
    pub head: String,
    pub body: String,
}

/// One HTTP/1.1 request to `endpoint` (`host:port`), with `headers`.
pub async fn request(
    endpoint: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &str,
) -> Response {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(endpoint)
        .await
        .expect("connect");
    let extra: String = headers
        .iter()
        .map(|(k, v)| format!("{k}: {v}\r\n"))
        .collect();
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: localhost\r\n{extra}Content-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).await.expect("request");
    let mut raw = Vec::new();
    stream.read_to_end(&mut raw).await.expect("response");
    let response = String::from_utf8_lossy(&raw).into_owned();
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    Response {
        code: head
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse().ok())
            .unwrap_or(0),
        head: head.to_string(),
        body: body.to_string(),
    }
}

/// A request with an optional bearer token: (status, body).
pub async fn http(
    endpoint: &str,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> (u16, String) {
    let bearer = token.map(|t| format!("Bearer {t}"));
    let headers: Vec<(&str, &str)> = bearer
        .iter()
        .map(|b| ("Authorization", b.as_str()))
        .collect();
    let got = request(endpoint, method, path, &headers, body).await;
    (got.code, got.body)
}

pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind an ephemeral port");
    listener.local_addr().expect("address").port()
}

impl TestCluster {
    pub async fn start() -> Self {
        Self::start_with_config("").await
    }

    /// With `config` as the coordinator's `shoal.yaml` (empty: none).
    pub async fn start_with_config(config: &str) -> Self {
        Self::start_full(config, &[]).await
    }

    /// With extra arguments of `shoal up`.
    pub async fn start_args(args: &[&str]) -> Self {
        Self::start_all("", &[], args).await
    }

    /// With a config and extra environment for the coordinator (and so its agents).
    pub async fn start_full(config: &str, env: &[(&str, &str)]) -> Self {
        Self::start_all(config, env, &[]).await
    }

    pub async fn start_all(config: &str, env: &[(&str, &str)], args: &[&str]) -> Self {
        let dir = tempfile::Builder::new()
            .prefix("shoal-test-")
            .tempdir()
            .expect("tempdir");
        let mut cluster = TestCluster {
            dir,
            port: free_port(),
            coordinator: None,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            up_args: args.iter().map(|a| a.to_string()).collect(),
        };
        if !config.is_empty() {
            std::fs::create_dir_all(cluster.data_dir()).expect("data dir");
            std::fs::write(cluster.data_dir().join("shoal.yaml"), config).expect("config");
        }
        cluster.start_coordinator().await;
        cluster
    }

    pub fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    pub fn endpoint(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    async fn start_coordinator(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("coordinator.log"))
            .expect("coordinator log");
        let child = Command::new(SHOAL)
            .args(["up", "--listen", &self.endpoint(), "--data-dir"])
            .arg(self.data_dir())
            .env("SHOAL_LOG", "info,shoal_coordinator=debug")
            .env("SHOAL_CONFIG_DIR", self.config_dir())
            .args(&self.up_args)
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("start shoal up");
        self.coordinator = Some(child);
        // The port opens once the coordinator is ready (its admin token saved).
        let endpoint = self.endpoint();
        eventually(
            "the coordinator accepts connections",
            Duration::from_secs(20),
            || {
                let endpoint = endpoint.clone();
                async move {
                    tokio::net::TcpStream::connect(endpoint)
                        .await
                        .ok()
                        .map(|_| ())
                }
            },
        )
        .await;
    }

    /// SIGKILL: no clean shutdown, agents keep running and will reconnect.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.coordinator.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub async fn restart(&mut self) {
        self.kill9();
        self.start_coordinator().await;
    }

    /// SIGKILL, then the same data served at `port` (as a standby, or the data
    /// moved to another machine, would).
    pub async fn move_to(&mut self, port: u16) {
        self.kill9();
        self.port = port;
        self.start_coordinator().await;
    }

    /// The coordinator's environment from its next (re)start on.
    pub fn set_env(&mut self, key: &str, value: &str) {
        self.env.retain(|(k, _)| k != key);
        self.env.push((key.to_string(), value.to_string()));
    }

    pub fn remove_env(&mut self, key: &str) {
        self.env.retain(|(k, _)| k != key);
    }

    /// The CLI's config dir of this test (its saved credentials).
    pub fn config_dir(&self) -> PathBuf {
        self.dir.path().join("config")
    }

    /// The admin token `shoal up` made for the local user.
    pub fn admin_token(&self) -> String {
        std::fs::read_to_string(self.data_dir().join("admin.token"))
            .expect("shoal up writes admin.token")
            .trim()
            .to_string()
    }

    /// A channel whose calls carry `token` (None: no token).
    pub async fn channel_as(&self, token: Option<&str>) -> AuthChannel {
        let channel = Channel::from_shared(format!("http://{}", self.endpoint()))
            .expect("endpoint")
            .connect()
            .await
            .expect("connect to the coordinator");
        tonic::service::interceptor::InterceptedService::new(
            channel,
            Bearer::new(token).expect("token"),
        )
    }

    /// A channel signed in as the admin.
    pub async fn channel(&self) -> AuthChannel {
        self.channel_as(Some(&self.admin_token())).await
    }

    pub async fn clusters(&self) -> ClustersClient<AuthChannel> {
        ClustersClient::new(self.channel().await)
    }

    pub async fn jobs(&self) -> JobsClient<AuthChannel> {
        JobsClient::new(self.channel().await)
    }

    pub async fn nodes(&self) -> NodesClient<AuthChannel> {
        NodesClient::new(self.channel().await)
    }

    /// Runs the CLI against this coordinator, signed in as `shoal up` left it.
    pub fn shoal(&self, args: &[&str]) -> Output {
        Command::new(SHOAL)
            .args(args)
            .env("SHOAL_ENDPOINT", self.endpoint())
            .env("SHOAL_CONFIG_DIR", self.config_dir())
            .env_remove("SHOAL_TOKEN")
            .stdin(Stdio::null())
            .output()
            .expect("run shoal")
    }

    /// An HTTP request to the coordinator (`Authorization: Bearer token`), with
    /// its status code and body.
    pub async fn http(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: &str,
    ) -> (u16, String) {
        http(&self.endpoint(), method, path, token, body).await
    }

    /// Runs the CLI and parses its `-o json` output; panics with stderr on failure.
    pub fn shoal_json(&self, args: &[&str]) -> serde_json::Value {
        // Global flags go first: anything after `--` belongs to the job.
        let mut all: Vec<&str> = vec!["-o", "json"];
        all.extend_from_slice(args);
        let output = self.shoal(&all);
        assert!(
            output.status.success(),
            "shoal {args:?} failed: {}\n{}",
            String::from_utf8_lossy(&output.stderr),
            self.coordinator_log()
        );
        serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
            panic!(
                "shoal {args:?} printed no JSON ({e}): {}",
                String::from_utf8_lossy(&output.stdout)
            )
        })
    }

    pub fn create_cluster(&self, name: &str, extra: &[&str]) {
        let mut args = vec![
            "cluster",
            "create",
            "--name",
            name,
            "--vm-size",
            "Standard_D2_v2",
        ];
        args.extend_from_slice(extra);
        self.shoal_json(&args);
    }

    pub async fn job(&self, id: &str) -> pb::Job {
        self.jobs()
            .await
            .get(pb::JobRef { id: id.to_string() })
            .await
            .expect("get job")
            .into_inner()
    }

    pub async fn wait_job(
        &self,
        id: &str,
        what: &str,
        limit: Duration,
        done: impl Fn(&pb::Job) -> bool,
    ) -> pb::Job {
        let deadline = Instant::now() + limit;
        loop {
            let job = self.job(id).await;
            if done(&job) {
                return job;
            }
            if Instant::now() > deadline {
                panic!(
                    "{id}: {what} did not happen in {limit:?}; last: {job:#?}\n{}",
                    self.coordinator_log()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// `shoal job submit -f FILE`: the new job's id.
    pub fn submit_file(&self, file: &Path) -> String {
        let created = self.shoal_json(&["job", "submit", "-f", &file.to_string_lossy()]);
        created["id"].as_str().expect("job id").to_string()
    }

    /// Until the job ends (completed, failed, canceled, timed out): `shoal job show -o json`.
    pub async fn wait_ended(&self, id: &str, limit: Duration) -> serde_json::Value {
        self.wait_job(id, "the job ended", limit, |j| {
            matches!(
                j.status.as_str(),
                "completed" | "failed" | "canceled" | "timed_out"
            )
        })
        .await;
        self.shoal_json(&["job", "show", id])
    }

    pub async fn wait_status(&self, id: &str, status: &str, limit: Duration) -> pb::Job {
        let what = format!("status {status}");
        self.wait_job(id, &what, limit, |j| {
            j.status == status && all_instances_ended(j)
        })
        .await
    }

    pub async fn cluster(&self, name: &str) -> pb::Cluster {
        self.clusters()
            .await
            .get(pb::ClusterRef {
                name: name.to_string(),
            })
            .await
            .expect("get cluster")
            .into_inner()
    }

    pub async fn wait_cluster(
        &self,
        name: &str,
        what: &str,
        limit: Duration,
        done: impl Fn(&pb::Cluster) -> bool,
    ) -> pb::Cluster {
        let deadline = Instant::now() + limit;
        loop {
            let cluster = self.cluster(name).await;
            if done(&cluster) {
                return cluster;
            }
            if Instant::now() > deadline {
                panic!(
                    "{name}: {what} did not happen in {limit:?}; last: {cluster:#?}\n{}",
                    self.coordinator_log()
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub fn coordinator_log(&self) -> String {
        let log =
            std::fs::read_to_string(self.dir.path().join("coordinator.log")).unwrap_or_default();
        let tail: Vec<&str> = log.lines().rev().take(60).collect();
        let tail: Vec<&str> = tail.into_iter().rev().collect();
        format!(
            "--- coordinator log (last 60 lines) ---\n{}",
            tail.join("\n")
        )
    }

    /// A path under the test's scratch dir (not the coordinator's data dir).
    pub fn scratch(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

pub fn all_instances_ended(job: &pb::Job) -> bool {
    job.attempts.iter().all(|a| {
        a.instances
            .iter()
            .all(|i| i.status != "running" && i.status != "launching")
    })
}

impl Drop for TestCluster {
    fn drop(&mut self) {
        if let Some(mut child) = self.coordinator.take() {
            // SIGTERM: a clean stop also stops the agents it started.
            let _ = Command::new("kill").arg(child.id().to_string()).status();
            let deadline = Instant::now() + Duration::from_secs(20);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = child.try_wait() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            let _ = child.kill();
            let _ = child.wait();
        }
        // Agents orphaned by a SIGKILL test: find them by their work dir.
        kill_matching(&self.data_dir());
    }
}

pub fn kill_matching(path: &Path) {
    let _ = Command::new("pkill")
        .args(["-KILL", "-f", &path.display().to_string()])
        .status();
}

/// Polls `probe` until it yields, or panics naming `what`.
pub async fn eventually<T, F, Fut>(what: &str, limit: Duration, probe: F) -> T
where
    F: Fn() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        if Instant::now() > deadline {
            panic!("{what}: not within {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Alive and not a zombie.
pub fn process_alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            let state = stat
                .rsplit_once(')')
                .and_then(|(_, rest)| rest.split_whitespace().next());
            !matches!(state, Some("Z") | Some("X"))
        }
        Err(_) => false,
    }
}

/// Docker tests need a Docker Engine: without one they fail, saying so (never
/// skip). Builds the example images when they are missing.
pub fn docker_ready() {
    let engine = Command::new("docker")
        .arg("info")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status();
    assert!(
        engine.is_ok_and(|s| s.success()),
        "this test needs a Docker Engine and none answers `docker info` (install docker.io, or run the suite through .ci/run)"
    );
    // Tests run side by side: one of them builds, the others wait for it.
    static BUILDING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one_builder = BUILDING.lock().unwrap_or_else(|p| p.into_inner());
    let images_present = Command::new("docker")
        .args([
            "image",
            "inspect",
            "shoal/base",
            "shoal/train",
            "shoal/node",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !images_present {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../images/build.sh");
        let built = Command::new("bash")
            .arg(script)
            .env("SHOAL_BIN", SHOAL)
            .status()
            .expect("run images/build.sh");
        assert!(built.success(), "images/build.sh failed");
    }
}

/// Container ids (running or not) of this test's coordinator carrying `label`
/// (tests run side by side on one engine: their attempt ids look alike).
pub fn containers_with(tc: &TestCluster, label: &str) -> Vec<String> {
    let owner = std::fs::read_to_string(tc.data_dir().join("owner-id")).expect("owner id");
    let output = Command::new("docker")
        .args(["ps", "-aq", "--filter", &format!("label={label}")])
        .args(["--filter", &format!("label=shoal.owner={}", owner.trim())])
        .output()
        .expect("docker ps");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .map(str::to_string)
        .collect()
}

/// The MPI example program (`images/mpi-train`), built on first use. MPI tests need
/// Open MPI: without it they fail, saying so (never skip).
pub fn mpi_train() -> PathBuf {
    let have = |tool: &str| {
        Command::new("sh")
            .args(["-c", &format!("command -v {tool}")])
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    assert!(
        have("mpirun") && have("mpicc"),
        "this test needs Open MPI (apt-get install openmpi-bin libopenmpi-dev libclang-dev, or run the suite through .ci/run)"
    );
    static BUILDING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one_builder = BUILDING.lock().unwrap_or_else(|p| p.into_inner());
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let binary = root.join("target/release/shoal-mpi-train");
    if !binary.exists() {
        let built = Command::new("cargo")
            .args(["build", "--release", "--locked", "--manifest-path"])
            .arg(root.join("images/mpi-train/Cargo.toml"))
            .arg("--target-dir")
            .arg(root.join("target"))
            .status()
            .expect("cargo build images/mpi-train");
        assert!(built.success(), "building images/mpi-train failed");
    }
    binary
}

/// The shoal/mpi-train image is there (built when missing).
pub fn mpi_image_ready() {
    image_ready("mpi-train");
}

/// `shoal/<name>` is there (built by images/build.sh when missing).
pub fn image_ready(name: &str) {
    static BUILDING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _one_builder = BUILDING.lock().unwrap_or_else(|p| p.into_inner());
    let present = Command::new("docker")
        .args(["image", "inspect", &format!("shoal/{name}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !present {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../images/build.sh");
        let built = Command::new("bash")
            .arg(script)
            .arg(name)
            .env("SHOAL_BIN", SHOAL)
            .status()
            .expect("run images/build.sh");
        assert!(built.success(), "images/build.sh {name} failed");
    }
}

/// A fresh database `name` of the tests' PostgreSQL (`scripts/pg-up.sh` starts
/// it): its URL. Without PostgreSQL the test fails, saying so (never skips).
pub fn postgres_database(name: &str) -> String {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/pg-up.sh");
    let name = format!("{name}_{}", std::process::id());
    shoal_coordinator::db::scratch_database(&script, &name)
        .unwrap_or_else(|e| panic!("this test needs PostgreSQL: {e}"))
}

/// The tests' Python, with the real `mlflow` client (`scripts/test-venv.sh`: made
/// from PyPI on first use). Without python3 the test fails, saying so (never skips).
pub fn test_python() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    std::fs::create_dir_all(root.join("target")).expect("target dir");
    // Test binaries run side by side: one makes the venv, the others wait.
    let lock = std::fs::File::create(root.join("target/test-venv.lock")).expect("lock file");
    lock.lock().expect("lock the test venv");
    let output = Command::new("bash")
        .arg(root.join("scripts/test-venv.sh"))
        .stderr(Stdio::inherit())
        .output()
        .expect("run scripts/test-venv.sh");
    assert!(
        output.status.success(),
        "scripts/test-venv.sh failed: the tracking tests need python3 with venv and PyPI (or run the suite through .ci/run)"
    );
    PathBuf::from(String::from_utf8_lossy(&output.stdout).trim())
}
