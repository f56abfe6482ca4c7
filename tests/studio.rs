//! The studio in a real browser: Debian's chromium, driven through chromedriver
//! (WebDriver, by fantoccini), against a real coordinator and real nodes.
//! Screenshots of each page go to target/studio-screenshots/.

mod support;

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use fantoccini::{Client, ClientBuilder, Locator};
use support::{TestCluster, eventually};

struct Driver {
    process: Child,
    port: u16,
}

impl Drop for Driver {
    fn drop(&mut self) {
        let _ = self.process.kill();
        let _ = self.process.wait();
    }
}

/// chromedriver and chromium from Debian's packages; missing, the test fails
/// naming them.
fn chromedriver() -> Driver {
    for program in ["chromedriver", "chromium"] {
        let found = Command::new("sh")
            .args(["-c", &format!("command -v {program}")])
            .output()
            .is_ok_and(|o| o.status.success());
        assert!(
            found,
            "the studio tests need `{program}`: apt-get install chromium chromium-driver"
        );
    }
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let process = Command::new("chromedriver")
        .arg(format!("--port={port}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("start chromedriver");
    Driver { process, port }
}

async fn browser(driver: &Driver) -> Client {
    // WebDriver is plain HTTP here, but the client's TLS stack wants a provider named.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let capabilities: serde_json::Map<String, serde_json::Value> =
        serde_json::from_value(serde_json::json!({
            "goog:chromeOptions": {
                "binary": "/usr/bin/chromium",
                "args": ["--headless=new", "--no-sandbox", "--disable-gpu",
                         "--disable-dev-shm-usage", "--window-size=1400,1000"]
            }
        }))
        .expect("capabilities");
    let url = format!("http://127.0.0.1:{}", driver.port);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match ClientBuilder::rustls()
            .expect("rustls")
            .capabilities(capabilities.clone())
            .connect(&url)
            .await
        {
            Ok(client) => return client,
            Err(e) if Instant::now() < deadline => {
                let _ = e;
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => panic!("cannot start chromium through chromedriver: {e}"),
        }
    }
}

fn shots() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/studio-screenshots");
    std::fs::create_dir_all(&dir).expect("screenshot dir");
    dir
}

async fn shot(client: &Client, name: &str) {
    let png = client.screenshot().await.expect("screenshot");
    std::fs::write(shots().join(format!("{name}.png")), png).expect("save screenshot");
}

async fn text(client: &Client, css: &str) -> String {
    match client.find(Locator::Css(css)).await {
        Ok(found) => found.text().await.expect("text"),
        Err(e) => {
            let source = client.source().await.unwrap_or_default();
            panic!(
                "no `{css}` on {:?}: {e}\n{source}",
                client.current_url().await
            )
        }
    }
}

async fn fill(client: &Client, id: &str, value: &str) {
    let field = client.find(Locator::Id(id)).await.expect("field");
    field.clear().await.expect("clear");
    field.send_keys(value).await.expect("type");
}

/// The job id `shoal job submit` printed.
fn job_id(stdout: &[u8]) -> String {
    String::from_utf8_lossy(stdout)
        .split_whitespace()
        .find(|w| w.starts_with("job-"))
        .expect("a job id")
        .trim_end_matches([',', '.', ':'])
        .to_string()
}

async fn path(client: &Client) -> String {
    client.current_url().await.expect("url").path().to_string()
}

/// Clicks `css` and waits for the page it leads to (a click does not wait for
/// the navigation it starts).
async fn click_to(client: &Client, css: &str, expected: &str) {
    let old = client
        .find(Locator::Css("body"))
        .await
        .expect("the page's body");
    client
        .find(Locator::Css(css))
        .await
        .unwrap_or_else(|e| panic!("no `{css}`: {e}"))
        .click()
        .await
        .expect("click");
    eventually(
        &format!("`{css}` leads to {expected}"),
        Duration::from_secs(20),
        || {
            let client = client.clone();
            let old = old.clone();
            async move {
                // The old page's body is stale once the new page is in.
                if old.text().await.is_ok() {
                    return None;
                }
                (path(&client).await == expected).then_some(())
            }
        },
    )
    .await;
}

#[tokio::test]
async fn the_studio_in_a_real_browser() {
    let tc = TestCluster::start().await;
    let driver = chromedriver();
    let client = browser(&driver).await;
    let base = format!("http://{}", tc.endpoint());

    // No session: the login page, and no data.
    client
        .goto(&format!("{base}/studio/clusters"))
        .await
        .expect("open");
    assert_eq!(path(&client).await, "/studio/login");
    shot(&client, "login").await;
    fill(&client, "token", "shoal_nope_nope").await;
    click_to(&client, "form button", "/studio/login").await;
    assert!(
        text(&client, "#login-error")
            .await
            .contains("unknown token")
    );

    // Signed in: no clusters yet, said plainly.
    fill(&client, "token", &tc.admin_token()).await;
    click_to(&client, "form button", "/studio/clusters").await;
    assert!(
        text(&client, "#no-clusters")
            .await
            .contains("No clusters yet")
    );
    shot(&client, "clusters-empty").await;

    // The create form checks as the CLI does.
    fill(&client, "name", "Bad Name!").await;
    click_to(&client, "form.grid button", "/studio/clusters").await;
    let error = text(&client, "#create-error").await;
    assert!(error.contains("name"), "{error}");
    fill(&client, "name", "web").await;
    fill(&client, "max_nodes", "1").await;
    fill(&client, "idle", "120").await;
    click_to(&client, "form.grid button", "/studio/clusters/web").await;
    shot(&client, "cluster").await;

    // A job from the CLI, watched on its page without reloading.
    let out = tc.shoal(&[
        "job",
        "submit",
        "--cluster",
        "web",
        "--",
        "sh",
        "-c",
        "echo first line; sleep 4; echo second line",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let id = job_id(&out.stdout);
    client
        .goto(&format!("{base}/studio/jobs/{id}"))
        .await
        .expect("job page");
    client
        .execute("window.__same_page = true; return true;", vec![])
        .await
        .expect("mark the page");
    let first_seen = eventually(
        "the first log line appears",
        Duration::from_secs(60),
        || {
            let client = client.clone();
            async move {
                let log = text(&client, "#log").await;
                log.contains("first line").then_some(())
            }
        },
    );
    first_seen.await;
    let status_then = text(&client, "#job-status").await;
    assert_ne!(status_then, "completed", "the log came before the end");
    shot(&client, "job-running").await;
    eventually(
        "the job page shows completed",
        Duration::from_secs(60),
        || {
            let client = client.clone();
            async move { (text(&client, "#job-status").await == "completed").then_some(()) }
        },
    )
    .await;
    assert!(text(&client, "#log").await.contains("second line"));
    // Why and the instances follow the job too.
    let instances = text(&client, "#instances tbody").await;
    assert!(
        instances.contains("completed") && instances.contains('0'),
        "{instances}"
    );
    assert!(
        text(&client, "#why").await.contains("completed"),
        "why is not current"
    );
    assert!(
        text(&client, "#job-facts")
            .await
            .contains("echo first line")
    );
    let same = client
        .execute("return window.__same_page === true;", vec![])
        .await
        .expect("ask the page");
    assert_eq!(same, serde_json::json!(true), "the page was reloaded");
    shot(&client, "job-completed").await;

    // The jobs list, filtered.
    client
        .goto(&format!("{base}/studio/jobs?state=completed"))
        .await
        .expect("jobs");
    assert!(text(&client, "#jobs").await.contains(&id));
    shot(&client, "jobs").await;

    // The node page draws its readings (sampled every 5 s).
    client
        .goto(&format!("{base}/studio/clusters/web"))
        .await
        .expect("cluster");
    let node = client
        .find(Locator::Css("#nodes a"))
        .await
        .expect("a node")
        .text()
        .await
        .expect("its id");
    eventually(
        "the node page has a chart with points",
        Duration::from_secs(30),
        || {
            let client = client.clone();
            let url = format!("{base}/studio/nodes/{node}");
            async move {
                client.goto(&url).await.ok()?;
                let lines = client
                    .find_all(Locator::Css(
                        "#node-charts svg.chart polyline, #node-charts svg.chart circle",
                    ))
                    .await
                    .ok()?;
                (!lines.is_empty()).then_some(())
            }
        },
    )
    .await;
    shot(&client, "node").await;

    // Signed out: the pages are gone again.
    client
        .goto(&format!("{base}/studio/clusters"))
        .await
        .expect("clusters");
    click_to(&client, "form.logout button", "/studio/login").await;
    client
        .goto(&format!("{base}/studio/jobs/{id}"))
        .await
        .expect("job page");
    assert_eq!(path(&client).await, "/studio/login");
    client.close().await.expect("close the browser");
}

/// A session as a browser would hold it: the cookie `shoal_studio=…` and the
/// page's CSRF token.
struct Session {
    http: reqwest::Client,
    base: String,
    cookie: String,
}

fn plain_client() -> reqwest::Client {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .danger_accept_invalid_certs(true)
        .build()
        .expect("http client")
}

/// The sign-in form's CSRF pair: its cookie, and the value its page holds.
async fn login_form(http: &reqwest::Client, base: &str) -> (String, String) {
    let page = http
        .get(format!("{base}/studio/login"))
        .send()
        .await
        .expect("login page");
    let cookie = page.headers()["set-cookie"]
        .to_str()
        .expect("ascii")
        .split(';')
        .next()
        .expect("name=value")
        .to_string();
    let text = page.text().await.expect("page");
    let at = text.find("name=\"csrf\" value=\"").expect("a csrf field") + 19;
    (cookie, text[at..at + 32].to_string())
}

async fn sign_in(base: &str, token: &str) -> (Session, String) {
    let http = plain_client();
    let (login_cookie, csrf) = login_form(&http, base).await;
    let answer = http
        .post(format!("{base}/studio/login"))
        .header("cookie", login_cookie)
        .form(&[("token", token), ("csrf", &csrf)])
        .send()
        .await
        .expect("login");
    assert_eq!(answer.status(), 303);
    let set = answer
        .headers()
        .get("set-cookie")
        .expect("a session cookie")
        .to_str()
        .expect("ascii")
        .to_string();
    let cookie = set.split(';').next().expect("name=value").to_string();
    (
        Session {
            http,
            base: base.to_string(),
            cookie,
        },
        set,
    )
}

impl Session {
    async fn get(&self, path: &str) -> reqwest::Response {
        self.http
            .get(format!("{}{path}", self.base))
            .header("cookie", &self.cookie)
            .send()
            .await
            .expect("get")
    }

    async fn post(&self, path: &str, form: &[(&str, &str)]) -> reqwest::Response {
        self.http
            .post(format!("{}{path}", self.base))
            .header("cookie", &self.cookie)
            .form(form)
            .send()
            .await
            .expect("post")
    }

    async fn csrf(&self) -> String {
        let page = self
            .get("/studio/clusters")
            .await
            .text()
            .await
            .expect("page");
        let at = page.find("name=\"csrf\" value=\"").expect("a csrf field") + 19;
        page[at..at + 32].to_string()
    }
}

#[tokio::test]
async fn studio_sessions_forms_and_rights() {
    let tc = TestCluster::start().await;
    let base = format!("http://{}", tc.endpoint());
    // A sign-in from another site (no sign-in cookie of this one) is refused.
    let http = plain_client();
    let (_, csrf) = login_form(&http, &base).await;
    let forged = http
        .post(format!("{base}/studio/login"))
        .form(&[
            ("token", tc.admin_token().as_str()),
            ("csrf", csrf.as_str()),
        ])
        .send()
        .await
        .expect("post");
    assert_eq!(forged.status(), 403);
    assert!(forged.headers().get("location").is_none());
    let (admin, set_cookie) = sign_in(&base, &tc.admin_token()).await;
    for part in ["HttpOnly", "SameSite=Strict", "Path=/studio"] {
        assert!(set_cookie.contains(part), "{set_cookie}");
    }
    assert!(!set_cookie.contains("Secure"), "no TLS here: {set_cookie}");
    // The cookie opens the studio, not the API.
    let api = admin.get("/api/v1/clusters").await;
    assert_eq!(api.status(), 401);

    // A form without this session's CSRF token does nothing.
    let csrf = admin.csrf().await;
    for token in ["", "0123456789abcdef0123456789abcdef"] {
        let forged = admin
            .post(
                "/studio/clusters",
                &[
                    ("csrf", token),
                    ("name", "forged"),
                    ("vm_size", "Standard_D2_v2"),
                    ("max_nodes", "1"),
                ],
            )
            .await;
        assert_eq!(forged.status(), 403);
    }
    let made = admin
        .post(
            "/studio/clusters",
            &[
                ("csrf", &csrf),
                ("name", "real"),
                ("vm_size", "Standard_D2_v2"),
                ("max_nodes", "1"),
            ],
        )
        .await;
    assert_eq!(made.status(), 303);
    let names: Vec<String> = tc
        .shoal_json(&["cluster", "list"])
        .as_array()
        .expect("clusters")
        .iter()
        .map(|c| c["name"].as_str().expect("name").to_string())
        .collect();
    assert_eq!(names, vec!["real".to_string()]);

    // Identities from the form: the cluster's own and a user-assigned one.
    assert!(
        tc.shoal(&["identity", "create", "reader-id"])
            .status
            .success()
    );
    let made = admin
        .post(
            "/studio/clusters",
            &[
                ("csrf", &csrf),
                ("name", "withid"),
                ("vm_size", "Standard_D2_v2"),
                ("max_nodes", "1"),
                ("identity", "[system]"),
                ("user_identities", " reader-id "),
            ],
        )
        .await;
    assert_eq!(made.status(), 303);
    let page = admin
        .get("/studio/clusters/withid")
        .await
        .text()
        .await
        .expect("page");
    assert!(
        page.contains("reader-id (UserAssigned)") && page.contains("SystemAssigned"),
        "{page}"
    );
    assert!(tc.shoal(&["cluster", "delete", "withid"]).status.success());

    // A job's MLflow metrics are drawn on its page.
    let python = support::test_python();
    let script = "import mlflow\nwith mlflow.start_run():\n    for s in range(5):\n        mlflow.log_metric('loss', 1 / (s + 1), step=s)\n";
    let out = tc.shoal(&[
        "job",
        "submit",
        "--cluster",
        "real",
        "--wait",
        "--",
        python.to_str().expect("utf-8 path"),
        "-c",
        script,
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tracked = job_id(&out.stdout);
    let page = admin
        .get(&format!("/studio/jobs/{tracked}"))
        .await
        .text()
        .await
        .expect("page");
    let charts = page
        .split("id=\"metrics\"")
        .nth(1)
        .expect("a metrics section");
    assert!(
        charts.contains("loss") && charts.contains("<polyline"),
        "{charts}"
    );

    // No broken links: every page reachable from the two lists answers.
    let out = tc.shoal(&[
        "job",
        "submit",
        "--cluster",
        "real",
        "--wait",
        "--",
        "echo",
        "linked",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut seen = std::collections::BTreeSet::new();
    let mut queue = vec!["/studio/clusters".to_string(), "/studio/jobs".to_string()];
    while let Some(path) = queue.pop() {
        if !seen.insert(path.clone()) || seen.len() > 60 {
            continue;
        }
        let answer = admin.get(&path).await;
        let status = answer.status().as_u16();
        assert!(matches!(status, 200 | 303), "{path} answered {status}");
        let is_html = answer
            .headers()
            .get("content-type")
            .is_some_and(|t| t.to_str().unwrap_or("").starts_with("text/html"));
        if !is_html {
            continue;
        }
        let page = answer.text().await.expect("page");
        for link in page.split("href=\"").skip(1) {
            let href = link.split('"').next().unwrap_or("").replace("&amp;", "&");
            if href.starts_with("/studio/") && !href.starts_with("/studio/static/") {
                queue.push(href);
            }
        }
    }
    assert!(
        seen.iter().any(|p| p.starts_with("/studio/jobs/job-")),
        "{seen:?}"
    );
    assert!(
        seen.iter().any(|p| p.starts_with("/studio/nodes/")),
        "{seen:?}"
    );

    // What is not there says so, escaped.
    let missing = admin.get("/studio/clusters/%3Cscript%3Ex").await;
    assert_eq!(missing.status(), 404);
    let page = missing.text().await.expect("page");
    assert!(
        page.contains("id=\"not-found\"") && page.contains("&#60;script&#62;x"),
        "{page}"
    );
    assert!(!page.contains("<script>x"), "{page}");
    assert_eq!(admin.get("/studio/jobs/job-999999").await.status(), 404);

    // A reader sees, and is told what it may not do.
    let out = tc.shoal(&[
        "-o", "json", "token", "create", "--role", "reader", "--name", "viewer",
    ]);
    assert!(out.status.success());
    let created: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let (reader, _) = sign_in(&base, created["token"].as_str().expect("token")).await;
    assert_eq!(reader.get("/studio/clusters/real").await.status(), 200);
    let csrf = reader.csrf().await;
    let refused = reader
        .post("/studio/clusters/real/delete", &[("csrf", &csrf)])
        .await;
    assert_eq!(refused.status(), 400);
    let page = refused.text().await.expect("page");
    assert!(
        page.contains("a reader token may not do this; it needs admin"),
        "{page}"
    );
    assert!(
        tc.shoal(&["cluster", "show", "real"]).status.success(),
        "the reader deleted it"
    );

    // A revoked token signs its sessions out.
    let id = created["id"].as_str().expect("id");
    assert!(tc.shoal(&["token", "revoke", id]).status.success());
    let after = reader.get("/studio/clusters").await;
    assert_eq!(after.status(), 303);
    assert_eq!(after.headers()["location"], "/studio/login");
    // And a stranger gets the login page, never data.
    let stranger = plain_client()
        .get(format!("{base}/studio/jobs"))
        .header("cookie", "shoal_studio=0000")
        .send()
        .await
        .expect("get");
    assert_eq!(stranger.status(), 303);
}

#[tokio::test]
async fn under_tls_the_session_cookie_is_secure() {
    let tc = TestCluster::start_args(&["--tls"]).await;
    let (_, set_cookie) = sign_in(&format!("https://{}", tc.endpoint()), &tc.admin_token()).await;
    assert!(set_cookie.contains("; Secure"), "{set_cookie}");
}
