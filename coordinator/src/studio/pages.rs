//! The studio's pages: each gathers what it shows through the `Api` (as the
//! HTTP and gRPC calls do) and renders a template.

use std::collections::BTreeMap;
use std::convert::Infallible;

use askama::Template;
use axum::extract::{Path, Query, State};
use axum::http::{Method, StatusCode};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::{Extension, Form};
use futures::StreamExt;
use serde::Deserialize;
use shoal_proto::v1 as pb;

use super::charts::{self, Series};
use super::{Signed, Studio};
use crate::api::convert;
use crate::control::Change;
use crate::model::{ClusterRequest, ClusterUpdate};
use crate::view;

/// A page, or the error that kept it from rendering.
pub fn render<T: Template>(status: StatusCode, page: &T) -> Response {
    match page.render() {
        Ok(html) => (status, Html(html)).into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("cannot render the page: {e}"),
        )
            .into_response(),
    }
}

/// A refusal as a page says it: the coordinator's own sentence.
fn message(e: impl std::fmt::Display) -> String {
    e.to_string()
}

#[derive(Template)]
#[template(path = "studio/notfound.html")]
struct NotFoundPage {
    what: String,
}

fn not_found(what: String) -> Response {
    render(StatusCode::NOT_FOUND, &NotFoundPage { what })
}

fn stale(signed: &Signed, csrf: &str) -> Option<Response> {
    (!super::same_secret(csrf, &signed.csrf)).then(|| {
        (
            StatusCode::FORBIDDEN,
            "stale form (its CSRF token does not match this session): reload the page",
        )
            .into_response()
    })
}

#[derive(Template)]
#[template(path = "studio/login.html")]
pub struct LoginPage {
    pub error: Option<String>,
    pub csrf: String,
}

// ---------------------------------------------------------------- clusters

pub struct ClusterRow {
    cluster: view::Cluster,
    bar: String,
}

#[derive(Default, Deserialize)]
pub struct ClusterForm {
    #[serde(default)]
    csrf: String,
    #[serde(default)]
    name: String,
    #[serde(default)]
    vm_size: String,
    #[serde(default)]
    vm_priority: String,
    #[serde(default)]
    min_nodes: String,
    #[serde(default)]
    max_nodes: String,
    #[serde(default)]
    idle_seconds_before_scaledown: String,
    #[serde(default)]
    identity: String,
    #[serde(default)]
    user_identities: String,
}

/// Min nodes, max nodes and idle seconds, each None when left blank.
type Bounds = (Option<u32>, Option<u32>, Option<u64>);

impl ClusterForm {
    fn bounds(&self) -> Result<Bounds, String> {
        Ok((
            number("min nodes", &self.min_nodes)?,
            number("max nodes", &self.max_nodes)?,
            number("idle seconds", &self.idle_seconds_before_scaledown)?,
        ))
    }
}

#[derive(Template)]
#[template(path = "studio/clusters.html")]
pub struct ClustersPage {
    section: &'static str,
    csrf: String,
    role: &'static str,
    clusters: Vec<ClusterRow>,
    quotas: Vec<view::QuotaLine>,
    sizes: Vec<view::VmSize>,
    form: ClusterForm,
    error: Option<String>,
}

fn state_bar(c: &view::Cluster) -> String {
    let n = &c.node_state_counts;
    charts::state_bar(&[
        ("idle", n.idle, "#8fd19e"),
        ("running", n.running, "#1f6feb"),
        ("preparing", n.preparing, "#d4a72c"),
        ("leaving", n.leaving, "#8c959f"),
        ("preempted", n.preempted, "#cf222e"),
        ("unusable", n.unusable, "#6e2b2b"),
    ])
}

async fn clusters_page(
    studio: &Studio,
    signed: &Signed,
    form: ClusterForm,
    error: Option<String>,
) -> Response {
    let api = &studio.api;
    let clusters = match api.control.list_clusters().await {
        Ok(list) => list
            .iter()
            .map(|c| {
                let cluster = view::Cluster::from(&convert::cluster(c));
                ClusterRow {
                    bar: state_bar(&cluster),
                    cluster,
                }
            })
            .collect(),
        Err(e) => return (StatusCode::INTERNAL_SERVER_ERROR, message(e)).into_response(),
    };
    let quotas = api
        .control
        .quotas()
        .await
        .map(|r| {
            convert::quota_report(&r)
                .lines
                .iter()
                .map(view::QuotaLine::from)
                .collect()
        })
        .unwrap_or_default();
    let sizes = api
        .catalog
        .all()
        .iter()
        .map(|s| view::VmSize::from(&convert::vm_size(s)))
        .collect();
    let status = if error.is_some() {
        StatusCode::BAD_REQUEST
    } else {
        StatusCode::OK
    };
    render(
        status,
        &ClustersPage {
            section: "clusters",
            csrf: signed.csrf.clone(),
            role: signed.role.as_str(),
            clusters,
            quotas,
            sizes,
            form,
            error,
        },
    )
}

pub async fn clusters(
    State(studio): State<Studio>,
    Extension(signed): Extension<Signed>,
) -> Response {
    let form = ClusterForm {
        vm_size: "Standard_D2_v2".into(),
        min_nodes: "0".into(),
        max_nodes: "2".into(),
        idle_seconds_before_scaledown: "120".into(),
        ..Default::default()
    };
    clusters_page(&studio, &signed, form, None).await
}

fn number<T: std::str::FromStr>(field: &str, text: &str) -> Result<Option<T>, String> {
    let text = text.trim();
    if text.is_empty() {
        return Ok(None);
    }
    text.parse()
        .map(Some)
        .map_err(|_| format!("invalid {field}: `{text}` is not a whole number"))
}

/// The same request `POST /api/v1/clusters` makes, checked by the same code.
pub async fn create_cluster(
    State(studio): State<Studio>,
    Extension(signed): Extension<Signed>,
    Form(form): Form<ClusterForm>,
) -> Response {
    if let Some(refused) = stale(&signed, &form.csrf) {
        return refused;
    }
    if let Err(why) = signed.may(Method::POST, "/api/v1/clusters") {
        return clusters_page(&studio, &signed, form, Some(why)).await;
    }
    let numbers = form.bounds();
    let (min_nodes, max_nodes, idle) = match numbers {
        Ok(n) => n,
        Err(why) => return clusters_page(&studio, &signed, form, Some(why)).await,
    };
    let request = ClusterRequest {
        name: form.name.trim().to_string(),
        vm_size: form.vm_size.clone(),
        vm_priority: form.vm_priority.clone(),
        min_nodes,
        max_nodes,
        idle_seconds_before_scaledown: idle,
        description: String::new(),
        tags: BTreeMap::new(),
        provider: String::new(),
        provider_settings: Default::default(),
        internode_communication: None,
        cancel_idle_gpu_jobs: None,
        identities: std::iter::once(form.identity.as_str())
            .chain(form.user_identities.split(','))
            .map(str::trim)
            .filter(|i| !i.is_empty())
            .map(String::from)
            .collect(),
    };
    match studio.api.create_cluster(request).await {
        Ok(info) => {
            Redirect::to(&format!("/studio/clusters/{}", info.cluster.spec.name)).into_response()
        }
        Err(e) => clusters_page(&studio, &signed, form, Some(message(e))).await,
    }
}

pub struct NodeRow {
    node: view::Node,
    cpu: String,
    memory: String,
    gpu_spark: String,
}

pub struct EventRow {
    at: String,
    what: String,
}

#[derive(Template)]
#[template(path = "studio/cluster.html")]
pub struct ClusterPage {
    section: &'static str,
    csrf: String,
    role: &'static str,
    cluster: view::Cluster,
    identities: Vec<view::Identity>,
    nodes: Vec<NodeRow>,
    events: Vec<EventRow>,
    error: Option<String>,
}

fn gib(bytes: u64) -> String {
    format!("{:.1}", bytes as f64 / (1u64 << 30) as f64)
}

async fn cluster_page(
    studio: &Studio,
    signed: &Signed,
    name: String,
    error: Option<String>,
) -> Response {
    let api = &studio.api;
    let info = match api.control.get_cluster(name.clone()).await {
        Ok(info) => info,
        Err(crate::Error::NotFound(what)) => return not_found(what),
        Err(e) => return (StatusCode::INTERNAL_SERVER_ERROR, message(e)).into_response(),
    };
    let wire = convert::cluster(&info);
    let identities = info
        .identities
        .iter()
        .map(|a| view::Identity {
            name: a.name.clone(),
            client_id: a.client_id.clone(),
            kind: a.kind.as_str().to_string(),
        })
        .collect();
    let nodes = api
        .control
        .list_nodes(Some(name.clone()))
        .await
        .unwrap_or_default()
        .iter()
        .map(|n| {
            let node = view::Node::from(&convert::node(n));
            let samples = studio.history.node(&node.id);
            let gpu: Vec<f64> = samples
                .iter()
                .filter(|s| !s.gpus.is_empty())
                .map(|s| s.gpus.iter().map(|g| g.0).sum::<f64>() / s.gpus.len() as f64)
                .collect();
            NodeRow {
                cpu: format!("{:.0} %", node.cpu_percent),
                memory: format!(
                    "{} / {} GiB",
                    gib(node.memory_used_bytes),
                    gib(node.memory_bytes)
                ),
                gpu_spark: if node.gpus.is_empty() {
                    "no GPUs".into()
                } else {
                    charts::sparkline(&gpu, 100.0, "GPU use, the last hour")
                },
                node,
            }
        })
        .collect();
    let events = studio
        .history
        .events(&name)
        .into_iter()
        .map(|e| EventRow {
            at: view::time(e.at_ms).unwrap_or_default(),
            what: e.what,
        })
        .collect();
    render(
        if error.is_some() {
            StatusCode::BAD_REQUEST
        } else {
            StatusCode::OK
        },
        &ClusterPage {
            section: "clusters",
            csrf: signed.csrf.clone(),
            role: signed.role.as_str(),
            cluster: view::Cluster::from(&wire),
            identities,
            nodes,
            events,
            error,
        },
    )
}

pub async fn cluster(
    State(studio): State<Studio>,
    Extension(signed): Extension<Signed>,
    Path(name): Path<String>,
) -> Response {
    cluster_page(&studio, &signed, name, None).await
}

pub async fn update_cluster(
    State(studio): State<Studio>,
    Extension(signed): Extension<Signed>,
    Path(name): Path<String>,
    Form(form): Form<ClusterForm>,
) -> Response {
    if let Some(refused) = stale(&signed, &form.csrf) {
        return refused;
    }
    if let Err(why) = signed.may(Method::PATCH, &format!("/api/v1/clusters/{name}")) {
        return cluster_page(&studio, &signed, name, Some(why)).await;
    }
    let numbers = form.bounds();
    let (min_nodes, max_nodes, idle) = match numbers {
        Ok(n) => n,
        Err(why) => return cluster_page(&studio, &signed, name, Some(why)).await,
    };
    let update = ClusterUpdate {
        name: name.clone(),
        min_nodes,
        max_nodes,
        idle_seconds_before_scaledown: idle,
        ..Default::default()
    };
    match studio.api.control.update_cluster(update).await {
        Ok(_) => Redirect::to(&format!("/studio/clusters/{name}")).into_response(),
        Err(e) => cluster_page(&studio, &signed, name, Some(message(e))).await,
    }
}

#[derive(Deserialize)]
pub struct CsrfForm {
    csrf: String,
}

pub async fn delete_cluster(
    State(studio): State<Studio>,
    Extension(signed): Extension<Signed>,
    Path(name): Path<String>,
    Form(form): Form<CsrfForm>,
) -> Response {
    if let Some(refused) = stale(&signed, &form.csrf) {
        return refused;
    }
    if let Err(why) = signed.may(Method::DELETE, &format!("/api/v1/clusters/{name}")) {
        return cluster_page(&studio, &signed, name, Some(why)).await;
    }
    match studio.api.control.delete_cluster(name.clone()).await {
        Ok(_) => Redirect::to("/studio/clusters").into_response(),
        Err(e) => cluster_page(&studio, &signed, name, Some(message(e))).await,
    }
}

// -------------------------------------------------------------------- jobs

const STATES: [&str; 8] = [
    "queued",
    "preparing",
    "running",
    "canceling",
    "completed",
    "failed",
    "canceled",
    "timed_out",
];

#[derive(Default, Deserialize)]
pub struct JobFilter {
    #[serde(default)]
    state: String,
    #[serde(default)]
    cluster: String,
    #[serde(default)]
    experiment: String,
    #[serde(default)]
    after: String,
}

pub struct StateOption {
    name: &'static str,
    selected: bool,
}

pub struct JobRow {
    id: String,
    name: String,
    status: String,
    progress: String,
    cluster: String,
    experiment: String,
    duration: String,
    created: String,
}

#[derive(Template)]
#[template(path = "studio/jobs.html")]
pub struct JobsPage {
    section: &'static str,
    csrf: String,
    role: &'static str,
    states: Vec<StateOption>,
    filter: JobFilter,
    filtered: bool,
    jobs: Vec<JobRow>,
    next: Option<String>,
}

/// What a job is made of, done of all: mini-batches, trials, steps or tasks.
fn progress(job: &view::Job) -> String {
    let ended = |s: &str| {
        matches!(
            s,
            "completed" | "failed" | "canceled" | "timed_out" | "not run"
        )
    };
    if let Some(p) = &job.progress {
        return format!("{}/{} mini-batches", p.done + p.failed, p.mini_batches);
    }
    if let Some(s) = &job.sweep {
        let done = s.trials.iter().filter(|t| ended(&t.status)).count();
        return format!("{done}/{} trials", s.max_total_trials);
    }
    if let Some(p) = &job.pipeline {
        let done = p.steps.iter().filter(|s| ended(&s.status)).count();
        return format!("{done}/{} steps", p.steps.len());
    }
    if let Some(a) = &job.array {
        let done: u32 = a
            .counts
            .iter()
            .filter(|(s, _)| ended(s.as_str()))
            .map(|(_, n)| n)
            .sum();
        return format!("{done}/{} tasks", a.tasks);
    }
    String::new()
}

fn duration(wire: &pb::Job) -> String {
    let start = wire.started_at_ms;
    if start <= 0 {
        return "—".into();
    }
    let end = if wire.ended_at_ms > 0 {
        wire.ended_at_ms
    } else {
        crate::model::now_ms()
    };
    let seconds = (end - start).max(0) / 1000;
    match seconds {
        s if s < 60 => format!("{s} s"),
        s if s < 3600 => format!("{} min {} s", s / 60, s % 60),
        s => format!("{} h {} min", s / 3600, s % 3600 / 60),
    }
}

/// A page shows 50 jobs; a filter reads at most this many to fill one.
const PAGE: usize = 50;
const SCAN: usize = 2_000;

pub async fn jobs(
    State(studio): State<Studio>,
    Extension(signed): Extension<Signed>,
    Query(filter): Query<JobFilter>,
) -> Response {
    let cluster = Some(filter.cluster.trim().to_string()).filter(|c| !c.is_empty());
    let wanted = |job: &view::Job| {
        (filter.state.is_empty() || job.status == filter.state)
            && (filter.experiment.is_empty() || job.experiment_name == filter.experiment)
    };
    let mut jobs = Vec::new();
    let mut cursor = Some(filter.after.clone()).filter(|a| !a.is_empty());
    let mut scanned = 0;
    // Newest first, a store page at a time, until the page is full or SCAN jobs
    // were read; `next` is where the following page starts.
    let next = 'pages: loop {
        let (found, more) = match studio
            .api
            .list_jobs(cluster.clone(), None, 200, cursor.as_deref())
            .await
        {
            Ok(page) => page,
            Err(e) => return (StatusCode::BAD_REQUEST, message(e)).into_response(),
        };
        scanned += found.len();
        for job in &found {
            let wire = convert::job(job);
            let view = view::Job::from(&wire);
            if !wanted(&view) {
                continue;
            }
            let id = view.id.clone();
            jobs.push(JobRow {
                progress: progress(&view),
                duration: duration(&wire),
                created: view.created_at.clone().unwrap_or_default(),
                id: view.id,
                name: view.name,
                status: view.status,
                cluster: view.cluster,
                experiment: view.experiment_name,
            });
            if jobs.len() == PAGE {
                break 'pages Some(id);
            }
        }
        match more {
            Some(more) if scanned < SCAN => cursor = Some(more),
            other => break other,
        }
    };
    let filtered =
        !(filter.state.is_empty() && filter.cluster.is_empty() && filter.experiment.is_empty());
    render(
        StatusCode::OK,
        &JobsPage {
            section: "jobs",
            csrf: signed.csrf.clone(),
            role: signed.role.as_str(),
            states: STATES
                .iter()
                .map(|&name| StateOption {
                    name,
                    selected: name == filter.state,
                })
                .collect(),
            filter,
            filtered,
            jobs,
            next,
        },
    )
}

pub struct StepRow {
    name: String,
    id: Option<String>,
    status: String,
    after: Vec<String>,
}

pub struct TrialRow {
    id: String,
    params: String,
    status: String,
    score: String,
    best: bool,
}

pub struct Chart {
    name: String,
    latest: String,
    svg: String,
}

pub struct UsageRow {
    index: u32,
    cpu: String,
    gpu_avg: String,
    gpu_peak: String,
}

pub struct OutputLink {
    name: String,
    href: String,
}

#[derive(Template)]
#[template(path = "studio/job.html")]
pub struct JobPage {
    section: &'static str,
    csrf: String,
    role: &'static str,
    job: view::Job,
    spec: String,
    command: String,
    usage: Vec<UsageRow>,
    created: String,
    progress: String,
    final_state: bool,
    why: Vec<String>,
    steps: Vec<StepRow>,
    dag: String,
    trials: Vec<TrialRow>,
    primary_metric: String,
    charts: Vec<Chart>,
    outputs: Vec<OutputLink>,
    log: String,
}

fn is_final(status: &str) -> bool {
    matches!(status, "completed" | "failed" | "canceled" | "timed_out")
}

pub async fn job(
    State(studio): State<Studio>,
    Extension(signed): Extension<Signed>,
    Path(id): Path<String>,
) -> Response {
    let api = &studio.api;
    let found = match api.job(&id).await {
        Ok(job) => job,
        Err(crate::Error::NotFound(what)) => return not_found(what),
        Err(e) => return (StatusCode::BAD_REQUEST, message(e)).into_response(),
    };
    let wire = match api.job_wire(&found).await {
        Ok(wire) => wire,
        Err(e) => return (StatusCode::INTERNAL_SERVER_ERROR, message(e)).into_response(),
    };
    let job = view::Job::from(&wire);
    let why = api.explain(&id).await.unwrap_or_default();
    let (steps, dag) = match &job.pipeline {
        Some(p) => (
            p.steps
                .iter()
                .map(|s| StepRow {
                    name: s.name.clone(),
                    id: s.id.clone(),
                    status: s.status.clone(),
                    after: s.after.clone(),
                })
                .collect(),
            charts::dag(
                &p.steps
                    .iter()
                    .map(|s| (s.name.clone(), s.status.clone(), s.after.clone()))
                    .collect::<Vec<_>>(),
            ),
        ),
        None => (Vec::new(), String::new()),
    };
    let (trials, primary_metric) = match &job.sweep {
        Some(s) => (
            s.trials
                .iter()
                .map(|t| TrialRow {
                    id: t.id.clone(),
                    params: t
                        .params
                        .iter()
                        .map(|(k, v)| format!("{k}={v}"))
                        .collect::<Vec<_>>()
                        .join(", "),
                    status: t.status.clone(),
                    score: t.score.map(charts::short).unwrap_or_else(|| "—".into()),
                    best: s.best_trial.as_deref() == Some(t.id.as_str()),
                })
                .collect(),
            s.primary_metric.clone(),
        ),
        None => (Vec::new(), String::new()),
    };
    let mut charts_out = Vec::new();
    if let Ok(tracked) = api.job_metrics(&id, Vec::new(), false).await {
        let mut seen = std::collections::BTreeSet::new();
        for run in &tracked.runs {
            for series in &run.metrics {
                if charts_out.len() >= 12 || !seen.insert(series.name.clone()) {
                    continue;
                }
                let points: Vec<(f64, f64)> = series
                    .points
                    .iter()
                    .enumerate()
                    .map(|(i, m)| {
                        let x = if m.step != 0 { m.step as f64 } else { i as f64 };
                        (x, m.value)
                    })
                    .collect();
                charts_out.push(Chart {
                    name: series.name.clone(),
                    latest: charts::short(series.latest.value),
                    svg: charts::line(
                        &[Series {
                            label: series.name.clone(),
                            points,
                        }],
                        None,
                        &format!("{} by step", series.name),
                    ),
                });
            }
        }
    }
    // While it runs (and after, for the last hour): its nodes' CPU and GPU use
    // since it started, from the studio's samples.
    let since = wire.started_at_ms;
    let until = if wire.ended_at_ms > 0 {
        wire.ended_at_ms
    } else {
        i64::MAX
    };
    let nodes: std::collections::BTreeSet<&str> = job
        .instances
        .iter()
        .map(|i| i.node.as_str())
        .filter(|n| !n.is_empty())
        .collect();
    if since > 0 && !nodes.is_empty() {
        let during = |node: &str| -> Vec<super::history::Sample> {
            studio
                .history
                .node(node)
                .into_iter()
                .filter(|s| s.at_ms >= since && s.at_ms <= until)
                .collect()
        };
        let seconds = |at: i64| (at - since) as f64 / 1000.0;
        let cpu: Vec<Series> = nodes
            .iter()
            .map(|node| Series {
                label: (*node).to_string(),
                points: during(node)
                    .iter()
                    .map(|s| (seconds(s.at_ms), s.cpu_percent))
                    .collect(),
            })
            .collect();
        let gpu: Vec<Series> = nodes
            .iter()
            .map(|node| Series {
                label: (*node).to_string(),
                points: during(node)
                    .iter()
                    .filter(|s| !s.gpus.is_empty())
                    .map(|s| {
                        let mean = s.gpus.iter().map(|g| g.0).sum::<f64>() / s.gpus.len() as f64;
                        (seconds(s.at_ms), mean)
                    })
                    .collect(),
            })
            .filter(|s| !s.points.is_empty())
            .collect();
        charts_out.push(Chart {
            name: "CPU of its nodes".into(),
            latest: "% over seconds since it started".into(),
            svg: charts::line(&cpu, Some(100.0), "CPU use of its nodes, % over seconds"),
        });
        if !gpu.is_empty() {
            charts_out.push(Chart {
                name: "GPU of its nodes".into(),
                latest: "mean utilization %".into(),
                svg: charts::line(&gpu, Some(100.0), "GPU use of its nodes, % over seconds"),
            });
        }
    }
    let mut names: Vec<String> = job.outputs.clone();
    if let Some(p) = &job.pipeline {
        names.extend(p.outputs.keys().cloned());
    }
    let outputs = names
        .into_iter()
        .map(|name| OutputLink {
            href: format!("/studio/jobs/{id}/named-outputs/{name}"),
            name,
        })
        .collect();
    render(
        StatusCode::OK,
        &JobPage {
            section: "jobs",
            csrf: signed.csrf.clone(),
            role: signed.role.as_str(),
            spec: serde_json::to_string_pretty(&job).unwrap_or_default(),
            command: if job.command.is_empty() {
                job.argv.join(" ")
            } else {
                job.command.clone()
            },
            usage: job
                .instances
                .iter()
                .filter_map(|i| {
                    let u = i.usage.as_ref()?;
                    Some(UsageRow {
                        index: i.index,
                        cpu: format!("{:.1}", u.cpu_seconds),
                        gpu_avg: format!("{:.0} %", u.gpu_utilization_avg_percent),
                        gpu_peak: format!("{} %", u.gpu_utilization_peak_percent),
                    })
                })
                .collect(),
            created: job.created_at.clone().unwrap_or_default(),
            progress: progress(&job),
            final_state: is_final(&job.status),
            why,
            steps,
            dag,
            trials,
            primary_metric,
            charts: charts_out,
            outputs,
            log: String::new(),
            job,
        },
    )
}

pub async fn cancel_job(
    State(studio): State<Studio>,
    Extension(signed): Extension<Signed>,
    Path(id): Path<String>,
    Form(form): Form<CsrfForm>,
) -> Response {
    if let Some(refused) = stale(&signed, &form.csrf) {
        return refused;
    }
    if let Err(why) = signed.may(Method::POST, &format!("/api/v1/jobs/{id}/cancel")) {
        return (StatusCode::FORBIDDEN, why).into_response();
    }
    match studio.api.control.cancel_job(id.clone()).await {
        Ok(_) => Redirect::to(&format!("/studio/jobs/{id}")).into_response(),
        Err(e) => (StatusCode::CONFLICT, message(e)).into_response(),
    }
}

/// `status` events ({status, reason, progress, final}) as the job changes, and
/// `log` events (its log from the start, then as written), until it ends.
pub async fn job_events(State(studio): State<Studio>, Path(id): Path<String>) -> Response {
    let api = studio.api.clone();
    if let Err(e) = api.job(&id).await {
        return (StatusCode::NOT_FOUND, message(e)).into_response();
    }
    let (tx, rx) = tokio::sync::mpsc::channel::<Event>(256);
    tokio::spawn(async move {
        let status = |api: crate::api::Api, id: String| async move {
            let job = api.job(&id).await.ok()?;
            let wire = api.job_wire(&job).await.ok()?;
            let view = view::Job::from(&wire);
            let why = api.explain(&id).await.unwrap_or_default();
            let instances: Vec<serde_json::Value> = view
                .instances
                .iter()
                .map(|i| {
                    serde_json::json!({
                        "index": i.index, "node": i.node, "status": i.status,
                        "exit_code": i.exit_code, "message": i.message,
                    })
                })
                .collect();
            let payload = serde_json::json!({
                "status": view.status,
                "reason": view.reason,
                "progress": progress(&view),
                "final": is_final(&view.status),
                "why": why,
                "instances": instances,
            });
            Some((
                Event::default().event("status").data(payload.to_string()),
                is_final(&view.status),
            ))
        };
        let mut changes = api.control.subscribe_changes();
        let mut logs = api.log_stream(pb::LogsRequest {
            job_id: id.clone(),
            instance: None,
            follow: true,
        });
        let mut logs_open = true;
        if let Some((event, _)) = status(api.clone(), id.clone()).await
            && tx.send(event).await.is_err()
        {
            return;
        }
        loop {
            tokio::select! {
                chunk = logs.recv(), if logs_open => match chunk {
                    Some(Ok(chunk)) => {
                        let text = String::from_utf8_lossy(&chunk.data).into_owned();
                        let event = Event::default().event("log").data(serde_json::Value::String(text).to_string());
                        if tx.send(event).await.is_err() {
                            return;
                        }
                    }
                    _ => {
                        // The log ends when the job does: say how it ended.
                        logs_open = false;
                        if let Some((event, done)) = status(api.clone(), id.clone()).await {
                            let _ = tx.send(event).await;
                            if done {
                                return;
                            }
                        }
                    }
                },
                change = changes.recv() => {
                    let ours = match change {
                        Ok(Change::Job(changed)) => changed == id,
                        Ok(_) => false,
                        Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => true,
                        Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
                    };
                    if ours && let Some((event, done)) = status(api.clone(), id.clone()).await {
                        // The end is told once the log is all out (its stream ends
                        // when the job does): the page closes on it.
                        if done && logs_open {
                            continue;
                        }
                        if tx.send(event).await.is_err() || done {
                            return;
                        }
                    }
                }
            }
        }
    });
    Sse::new(tokio_stream::wrappers::ReceiverStream::new(rx).map(Ok::<_, Infallible>))
        .keep_alive(KeepAlive::default())
        .into_response()
}

// -------------------------------------------------------------------- nodes

#[derive(Template)]
#[template(path = "studio/node.html")]
pub struct NodePage {
    section: &'static str,
    csrf: String,
    role: &'static str,
    node: view::Node,
    charts: Vec<Chart>,
}

pub async fn node(
    State(studio): State<Studio>,
    Extension(signed): Extension<Signed>,
    Path(id): Path<String>,
) -> Response {
    let nodes = studio
        .api
        .control
        .list_nodes(None)
        .await
        .unwrap_or_default();
    let Some(found) = nodes.iter().find(|n| n.id == id) else {
        return not_found(format!(
            "no node `{id}` now (nodes that left are forgotten)"
        ));
    };
    let node = view::Node::from(&convert::node(found));
    let samples = studio.history.node(&id);
    let start = samples.first().map_or(0, |s| s.at_ms);
    let minutes = |at: i64| (at - start) as f64 / 60_000.0;
    let series = |label: &str, pick: &dyn Fn(&super::history::Sample) -> Option<f64>| Series {
        label: label.to_string(),
        points: samples
            .iter()
            .filter_map(|s| pick(s).map(|v| (minutes(s.at_ms), v)))
            .collect(),
    };
    let latest = |value: f64, unit: &str| format!("{} {unit}", charts::short(value));
    let mut out = vec![
        Chart {
            name: "CPU".into(),
            latest: latest(f64::from(node.cpu_percent), "%"),
            svg: charts::line(
                &[series("cpu %", &|s| Some(s.cpu_percent))],
                Some(100.0),
                "CPU use, % over minutes",
            ),
        },
        Chart {
            name: "Memory".into(),
            latest: format!(
                "{} / {} GiB",
                gib(node.memory_used_bytes),
                gib(node.memory_bytes)
            ),
            svg: charts::line(
                &[series("memory %", &|s| Some(s.memory_percent))],
                Some(100.0),
                "memory use, % over minutes",
            ),
        },
    ];
    let gpus = node.gpus.len();
    type Pick = fn(&(f64, f64, f64, f64)) -> f64;
    let per_gpu: [(&str, &str, Option<f64>, Pick); 4] = [
        ("GPU utilization", "%", Some(100.0), |g| g.0),
        ("GPU memory", "%", Some(100.0), |g| g.1),
        ("GPU power", "W", None, |g| g.2),
        ("GPU temperature", "°C", None, |g| g.3),
    ];
    for (name, unit, top, pick) in per_gpu {
        if gpus == 0 {
            break;
        }
        let lines: Vec<Series> = (0..gpus)
            .map(|i| {
                series(&format!("GPU {i}"), &|s: &super::history::Sample| {
                    s.gpus.get(i).map(pick)
                })
            })
            .collect();
        let now: Vec<f64> = samples
            .last()
            .map(|s| s.gpus.iter().map(pick).collect())
            .unwrap_or_default();
        out.push(Chart {
            name: name.into(),
            latest: now
                .iter()
                .map(|v| latest(*v, unit))
                .collect::<Vec<_>>()
                .join(", "),
            svg: charts::line(&lines, top, &format!("{name} over minutes")),
        });
    }
    render(
        StatusCode::OK,
        &NodePage {
            section: "clusters",
            csrf: signed.csrf.clone(),
            role: signed.role.as_str(),
            node,
            charts: out,
        },
    )
}
