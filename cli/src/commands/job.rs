//! `shoal job ...`: submit (flags or the managed service's job YAML), follow, cancel,
//! download outputs.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{Context, anyhow, bail};
use flate2::Compression;
use flate2::write::GzEncoder;
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{Value, json};
use shoal_coordinator::admission;
use shoal_coordinator::view;
use shoal_proto::v1 as pb;
use tokio_stream::StreamExt;

use super::key_value;
use crate::client::{Client, status};
use crate::output::{self, Format};

/// The coordinator's default limit; it checks again.
const MAX_CODE_BYTES: u64 = 64 << 20;

#[derive(clap::Subcommand)]
pub enum Command {
    /// Submit a job: `-f job.yml` (the managed service's command-job file), or
    /// flags and the command after `--`.
    #[command(after_help = "Examples:\n  \
        shoal job submit --cluster cpu-cluster --instance-count 2 -- python3 train.py --epochs 3\n  \
        shoal job submit -f job.yml --set inputs.epochs=3 --set compute=gpu --wait\n  \
        shoal job submit --cluster cpu-cluster --cpus 0.5 --memory 1g -- python3 eval.py   # shares a node\n  \
        shoal job submit --cluster cpu-cluster --cpus 1 --array 0-999%50 -- sh -c 'python3 prep.py $SHOAL_ARRAY_INDEX'\n\n\
        job.yml (the managed service's commandJob schema):\n  \
        command: python train.py --data ${{inputs.iris}} --lr ${{inputs.lr}} --out ${{outputs.model}} [--seed ${{inputs.seed}}]\n  \
        code: ./src                    # snapshotted (honours .gitignore/.amlignore)\n  \
        environment: azureml:sklearn@latest   # or {image: shoal/train}, {build: {path: ./ctx}}, file:./env.yml, host\n  \
        compute: azureml:cpu-cluster   # left out: `shoal configure --defaults compute=NAME`\n  \
        inputs:\n    \
          lr: 0.01                     # a literal\n    \
          iris: {type: uri_file, path: ./iris.csv, mode: download}   # or https://, azureml://datastores/NAME/paths/P, azureml:NAME:VERSION\n  \
        outputs:\n    \
          model: {type: uri_folder}    # `shoal job download ID --output-name model`\n  \
        resources: {instance_count: 2}   # or a share of a node: {cpus: 0.5, memory: 1g, gpus: 1}\n  \
        limits: {timeout: 3600}        # seconds\n\n\
        A sweep (the sweepJob schema: `type: sweep`):\n  \
        trial: {command: python train.py --lr ${{search_space.lr}}, code: ./src, environment: host}\n  \
        search_space: {lr: {type: loguniform, min_value: -6, max_value: -1}, opt: {type: choice, values: [adam, sgd]}}\n  \
        sampling_algorithm: random     # {type: random, seed: 7}, grid, bayesian\n  \
        objective: {goal: maximize, primary_metric: accuracy}   # logged with mlflow.log_metric\n  \
        limits: {max_total_trials: 20, max_concurrent_trials: 4, timeout: 7200, trial_timeout: 600}\n  \
        early_termination: {type: bandit, slack_factor: 0.1, delay_evaluation: 3}\n\n\
        A pipeline (the pipelineJob schema: `type: pipeline`; steps are command jobs, sweeps or components):\n  \
        inputs: {raw: {type: uri_folder, path: ./data}}\n  \
        outputs: {report: }            # `shoal job download ID`: the step output bound to it\n  \
        settings: {default_compute: cpu, continue_on_step_failure: false}\n  \
        jobs:\n    \
          prep: {command: ..., inputs: {raw: ${{parent.inputs.raw}}}, outputs: {clean: }}\n    \
          train: {command: ..., inputs: {data: ${{parent.jobs.prep.outputs.clean}}}, outputs: {report: ${{parent.outputs.report}}}}\n  \
        A step starts once the steps it reads from have completed; `shoal job show ID` draws them.\n\n\
        Keys of the schema that mean nothing here are accepted with a warning; any other key is an error.")]
    Submit(Box<SubmitArgs>),
    /// Show a job: status, why it waits or how it ended, instances and attempts
    /// (an array: its tasks counted by status).
    Show {
        id: String,
        /// One task of an array, or trial of a sweep, by its index.
        #[arg(long)]
        task: Option<u32>,
    },
    /// List jobs, newest first, a page at a time.
    #[command(after_help = "Examples:\n  \
        shoal job list                          # the newest 100\n  \
        shoal job list --limit 20 --after job-480   # the 20 before job-480")]
    List {
        #[arg(long, visible_alias = "compute")]
        cluster: Option<String>,
        /// Jobs on the page (at most 10000).
        #[arg(long, default_value_t = 100)]
        limit: u32,
        /// Start after this job (the last one of the page before).
        #[arg(long)]
        after: Option<String>,
        /// The children of this job: a sweep's trials, an array's tasks (each
        /// is otherwise listed once, without its children).
        #[arg(long, visible_alias = "array")]
        parent: Option<String>,
    },
    /// Print a job's logs; `-f` follows them live until the job ends.
    Logs {
        id: String,
        #[arg(short, long)]
        follow: bool,
        /// Only this instance's log.
        #[arg(long)]
        instance: Option<u32>,
        /// One task of an array, or trial of a sweep, by its index.
        #[arg(long)]
        task: Option<u32>,
    },
    /// Why the job is where it is: what the scheduler and autoscaler see, what blocks.
    Why {
        id: String,
        /// One task of an array, or trial of a sweep, by its index.
        #[arg(long)]
        task: Option<u32>,
    },
    /// Cancel a queued or running job: its processes get SIGTERM, then SIGKILL after
    /// the stop grace; it shows `canceling` until every instance has stopped.
    Cancel {
        id: String,
        /// Return once every instance has stopped and the job is `canceled`.
        #[arg(long)]
        wait: bool,
        /// Only this task of an array, by its index (else the whole array).
        #[arg(long)]
        task: Option<u32>,
    },
    /// What a job logged with MLflow (`mlflow.log_metric`, `log_param`...): each
    /// run's params and a table of its metrics, drawn as sparklines.
    #[command(
        after_help = "Jobs log with the mlflow client as they do on the managed service:\n  \
        MLFLOW_TRACKING_URI, MLFLOW_TRACKING_TOKEN, MLFLOW_RUN_ID and MLFLOW_EXPERIMENT_NAME are set\n  \
        for every job, so `mlflow.start_run()` and `mlflow.autolog()` attach to the job's run.\n\n\
        Examples:\n  \
        shoal job metrics job-7                  # every metric, with its history drawn\n  \
        shoal job metrics job-7 --name loss      # one metric, every point listed\n  \
        shoal job metrics job-7 -o json          # the histories as JSON (as GET /api/v1/jobs/ID/metrics)"
    )]
    Metrics {
        id: String,
        /// Only this metric (repeat for several); its points are listed.
        #[arg(long)]
        name: Vec<String>,
        /// One task of an array, or trial of a sweep, by its index.
        #[arg(long)]
        task: Option<u32>,
    },
    /// Delete an ended job for good: its record, logs, result rows and outputs
    /// (ended jobs are deleted by themselves after `job_retention_days`, 30 by default).
    Delete { id: String },
    /// Download a job's outputs: what each instance wrote to ./outputs (into
    /// DIR/<job id>/instance-<k>), its named outputs (into
    /// DIR/<job id>/named-outputs/<name>), and what it logged with MLflow's
    /// `log_artifact` (into DIR/<job id>/artifacts/<run id>).
    Download(DownloadArgs),
}

#[derive(clap::Args, Default)]
pub struct DownloadArgs {
    #[arg(required_unless_present = "name")]
    pub id: Option<String>,
    /// The job (as `az ml job download -n`).
    #[arg(long, short = 'n', hide = true)]
    pub name: Option<String>,
    /// The folder DIR to download into.
    #[arg(long, short = 'p', default_value = ".")]
    pub download_path: PathBuf,
    /// Only this named output (`outputs:` of the job file).
    #[arg(long)]
    pub output_name: Option<String>,
    /// Everything: ./outputs of each instance and every named output (the default).
    #[arg(long, conflicts_with = "output_name")]
    pub all: bool,
}

#[derive(clap::Args, Default)]
pub struct SubmitArgs {
    /// A job file (YAML); flags given too override its values.
    #[arg(long, short = 'f')]
    pub file: Option<PathBuf>,
    /// Override a value of the job file, KEY=VALUE with a dotted key
    /// (`--set inputs.epochs=3 resources.instance_count=2 compute=gpu`).
    #[arg(long, num_args = 1..)]
    pub set: Vec<String>,
    /// The cluster to run on.
    #[arg(long, visible_alias = "compute")]
    pub cluster: Option<String>,
    /// Instances, each on its own node, started together.
    #[arg(long)]
    pub instance_count: Option<u32>,
    #[arg(long, visible_alias = "display-name")]
    pub name: Option<String>,
    /// An environment variable, KEY=VALUE; repeat for more.
    #[arg(long = "env", short = 'e', value_parser = key_value)]
    pub env: Vec<(String, String)>,
    /// A folder snapshotted now; each instance runs in its own copy of it.
    #[arg(long)]
    pub code: Option<PathBuf>,
    /// Run in a container of this image (built with `images/build.sh`), not as a process.
    #[arg(long, conflicts_with = "environment")]
    pub image: Option<String>,
    /// An environment: `azureml:NAME@latest`, `azureml:NAME:VERSION` (from
    /// `shoal environment create`), `file:./env.yml`, or `host`.
    #[arg(long)]
    pub environment: Option<String>,
    /// Seconds before the job is stopped and marked timed_out.
    #[arg(long)]
    pub timeout: Option<u64>,
    /// GPUs each instance gets, exclusively (CUDA_VISIBLE_DEVICES / Docker device request).
    #[arg(long, visible_alias = "gpus")]
    pub gpus_per_instance: Option<u32>,
    /// Cores each instance gets (`0.5`, `2`): instances then share nodes,
    /// packed by cores, memory and GPUs. Without --cpus or --memory, each
    /// instance has a whole node.
    #[arg(long)]
    pub cpus: Option<f64>,
    /// Memory each instance gets (`512m`, `4g`), enforced: an instance that
    /// goes over is killed and says so. Alone, it asks for one core too.
    #[arg(long)]
    pub memory: Option<String>,
    /// Preemptions the job is requeued after before it fails [default: 10].
    #[arg(long)]
    pub max_preemptions: Option<u32>,
    /// Many tasks in one submission, Slurm's way: `0-9999`, `1-100:2` (a
    /// step), `0-999%10` (at most 10 at once). Each task gets SHOAL_ARRAY_INDEX
    /// (and SLURM_ARRAY_TASK_ID); the array is listed as one job.
    #[arg(long)]
    pub array: Option<String>,
    /// Follow the job (progress and logs) until it ends; exit non-zero unless it completed.
    #[arg(long)]
    pub wait: bool,
    /// The command and its arguments, run as they are (no shell).
    #[arg(last = true)]
    pub argv: Vec<String>,
}

/// Packs a code folder, honouring .gitignore, .amlignore and .shoalignore.
pub fn snapshot(dir: &Path) -> anyhow::Result<Vec<u8>> {
    if !dir.is_dir() {
        bail!("invalid code: {} is not a folder", dir.display());
    }
    let mut builder = tar::Builder::new(GzEncoder::new(Vec::new(), Compression::fast()));
    builder.follow_symlinks(false);
    let walker = ignore::WalkBuilder::new(dir)
        .hidden(false)
        .git_ignore(true)
        .require_git(false)
        .add_custom_ignore_filename(".amlignore")
        .add_custom_ignore_filename(".shoalignore")
        .filter_entry(|e| e.file_name() != ".git")
        .build();
    let mut raw_bytes = 0u64;
    for entry in walker {
        let entry = entry.with_context(|| format!("cannot read {}", dir.display()))?;
        let path = entry.path();
        let Ok(relative) = path.strip_prefix(dir) else {
            continue;
        };
        if relative.as_os_str().is_empty() {
            continue;
        }
        let meta = entry
            .metadata()
            .with_context(|| format!("cannot read {}", path.display()))?;
        if meta.is_file() {
            raw_bytes += meta.len();
            if raw_bytes > MAX_CODE_BYTES * 4 {
                bail!(
                    "invalid code: {} holds over {} MiB; keep data out of the code folder (list it in .shoalignore or .gitignore)",
                    dir.display(),
                    (MAX_CODE_BYTES * 4) >> 20
                );
            }
        }
        builder
            .append_path_with_name(path, relative)
            .with_context(|| format!("cannot add {} to the snapshot", path.display()))?;
    }
    let data = builder.into_inner()?.finish()?;
    if data.len() as u64 > MAX_CODE_BYTES {
        bail!(
            "invalid code: the snapshot of {} is {} MiB compressed, above the {} MiB limit; list large files in .shoalignore or .gitignore",
            dir.display(),
            data.len() >> 20,
            MAX_CODE_BYTES >> 20
        );
    }
    Ok(data)
}

/// Sets `value` at `path` in a job document, making the objects on the way.
fn put(doc: &mut Value, path: &[&str], value: Value) {
    let mut at = doc;
    for key in &path[..path.len() - 1] {
        if !at.get(*key).is_some_and(Value::is_object) {
            at[*key] = json!({});
        }
        at = &mut at[*key];
    }
    at[path[path.len() - 1]] = value;
}

/// The job document: the job file (or nothing), the flags laid over it, then
/// `--set`; its environment files read in. Returns it with the folder its
/// relative paths start from.
fn job_document(args: &SubmitArgs) -> anyhow::Result<(Value, PathBuf)> {
    let (mut doc, base) = match &args.file {
        Some(path) => super::local::read_document(path, "job file")?,
        None => (json!({}), PathBuf::new()),
    };
    // A parallel job keeps its code and environment under `task`.
    let task: &[&str] = if doc.get("type").and_then(Value::as_str) == Some("parallel") {
        &["task"]
    } else {
        &[]
    };
    let under_task = |key: &'static str| [task, &[key]].concat();
    if let Some(cluster) = &args.cluster {
        put(&mut doc, &["compute"], json!(cluster));
    }
    if let Some(name) = &args.name {
        put(&mut doc, &["display_name"], json!(name));
    }
    for (key, value) in &args.env {
        put(&mut doc, &["environment_variables", key], json!(value));
    }
    if let Some(code) = &args.code {
        let full = std::fs::canonicalize(code)
            .with_context(|| format!("invalid code: {} is not a folder", code.display()))?;
        put(
            &mut doc,
            &under_task("code"),
            json!(full.display().to_string()),
        );
    }
    if let Some(image) = &args.image {
        put(
            &mut doc,
            &under_task("environment"),
            json!({ "image": image }),
        );
    }
    if let Some(environment) = &args.environment {
        let reference = match environment.strip_prefix("file:") {
            // Relative to where the command runs, like every other flag.
            Some(path) => format!("file:{}", std::path::absolute(path)?.display()),
            None => environment.clone(),
        };
        put(&mut doc, &under_task("environment"), json!(reference));
    }
    if let Some(n) = args.instance_count {
        put(&mut doc, &["resources", "instance_count"], json!(n));
    }
    if let Some(n) = args.gpus_per_instance {
        put(&mut doc, &["resources", "gpus_per_instance"], json!(n));
    }
    if let Some(cpus) = args.cpus {
        put(&mut doc, &["resources", "cpus"], json!(cpus));
    }
    if let Some(memory) = &args.memory {
        put(&mut doc, &["resources", "memory"], json!(memory));
    }
    if let Some(seconds) = args.timeout {
        put(&mut doc, &["limits", "timeout"], json!(seconds));
    }
    if let Some(n) = args.max_preemptions {
        put(&mut doc, &["max_preemptions"], json!(n));
    }
    if let Some(array) = &args.array {
        put(&mut doc, &["array"], json!(array));
    }
    // `--` words replace a job file's command line.
    if !args.argv.is_empty() {
        put(&mut doc, &["argv"], json!(args.argv));
        if let Some(map) = doc.as_object_mut() {
            map.remove("command");
        }
    }
    admission::set::apply(&mut doc, &args.set)?;
    super::local::inline_components(&mut doc, &base)?;
    super::local::inline_environments(&mut doc, &base)?;
    Ok((doc, base))
}

/// The request for `Jobs.Create`: the document, checked here first with the
/// coordinator's own admission (so a refusal costs no upload), and the local
/// files it names.
async fn job_request(args: &SubmitArgs, client: &Client) -> anyhow::Result<pb::JobFileRequest> {
    let (mut doc, base) = job_document(args)?;
    super::local::inline_registered_components(&mut doc, client).await?;
    let in_file = |e: shoal_coordinator::Error| match &args.file {
        Some(path) => anyhow!("{e} (in {})", path.display()),
        None => anyhow!("{e}"),
    };
    let drafted = admission::read(doc.clone(), &[]).map_err(in_file)?;
    let files = super::local::job_files(&drafted.local_paths(), &base)?;
    Ok(pb::JobFileRequest {
        text: serde_json::to_string(&doc)?,
        set: Vec::new(),
        files,
    })
}

/// Submits a job (`shoal job submit`, `shoal ml job create`): warnings to stderr,
/// then the job, or its run followed with `wait`.
pub async fn submit(args: SubmitArgs, endpoint: &str, format: Format) -> anyhow::Result<ExitCode> {
    let client = Client::connect(endpoint).await?;
    let request = job_request(&args, &client).await?;
    let created = client
        .jobs()
        .create(request)
        .await
        .map_err(status)?
        .into_inner();
    for warning in &created.warnings {
        eprintln!("warning: {warning}");
    }
    let job = created
        .job
        .ok_or_else(|| anyhow!("the coordinator answered without the job"))?;
    if !args.wait {
        if format == Format::Json {
            output::json(&view::Job::from(&job))?;
        } else {
            println!(
                "submitted {} to {}; follow it with `shoal job logs -f {}`",
                job.id, job.cluster, job.id
            );
        }
        return Ok(ExitCode::SUCCESS);
    }
    let bar = spinner();
    let job = follow(&client, &job.id, &bar, format == Format::Table).await?;
    bar.finish_and_clear();
    print_job(&job, format)?;
    Ok(if job.status == "completed" {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// A pipeline's steps, in the order they can run: each with its job, status and
/// the steps it reads from.
fn print_pipeline(pipeline: &pb::PipelineProgress) {
    let done = pipeline
        .steps
        .iter()
        .filter(|s| s.status == "completed")
        .count();
    println!("steps:     {done} of {} completed", pipeline.steps.len());
    let width = pipeline
        .steps
        .iter()
        .map(|s| s.name.len())
        .max()
        .unwrap_or(0);
    for step in &pipeline.steps {
        let job = if step.job_id.is_empty() {
            "-"
        } else {
            &step.job_id
        };
        let reads = if step.after.is_empty() {
            String::new()
        } else {
            format!("  ← {}", step.after.join(", "))
        };
        let why = if step.reason.is_empty() {
            String::new()
        } else {
            format!("  ({})", step.reason)
        };
        println!(
            "  {:<width$}  {:<10} {:<9}{reads}{why}",
            step.name, job, step.status
        );
    }
    for (name, from) in &pipeline.outputs {
        println!("output:    {name} = {from} (`shoal job download`)");
    }
}

pub fn print_job(job: &pb::Job, format: Format) -> anyhow::Result<()> {
    if format == Format::Json {
        return output::json(&view::Job::from(job));
    }
    println!("id:        {}", job.id);
    if job.name != job.id {
        println!("name:      {}", job.name);
    }
    println!("cluster:   {}", job.cluster);
    println!("status:    {}", job.status);
    if !job.reason.is_empty() {
        println!("reason:    {}", job.reason);
    }
    let command = if job.command.is_empty() {
        job.argv.join(" ")
    } else {
        job.command.clone()
    };
    println!("command:   {command}");
    println!("instances: {}", job.instance_count);
    if let Some(array) = &job.array {
        let spec = array.spec.unwrap_or_default();
        let limit = if spec.max_concurrent > 0 {
            format!(", at most {} at once", spec.max_concurrent)
        } else {
            String::new()
        };
        println!(
            "tasks:     {} ({}..={} step {}{limit}); `shoal job list --array {}`, `--task K` for one",
            array.total,
            spec.start,
            spec.end,
            spec.step.max(1),
            job.id
        );
        let counts: Vec<String> = array
            .counts
            .iter()
            .map(|(status, n)| format!("{n} {status}"))
            .collect();
        println!("progress:  {}", counts.join(", "));
    }
    if let Some(task) = &job.task {
        println!("task:      index {} of array {}", task.index, task.array_id);
    }
    if let Some(sweep) = &job.sweep {
        print_sweep(&job.id, sweep);
    }
    if let Some(trial) = &job.trial {
        println!("trial:     {} of sweep {}", trial.index, trial.sweep_id);
    }
    if let Some(pipeline) = &job.pipeline {
        print_pipeline(pipeline);
    }
    if let Some(step) = &job.step {
        println!("step:      {} of pipeline {}", step.name, step.pipeline_id);
    }
    if job.millicpus > 0 {
        let share = shoal_coordinator::model::Resources::from_wire(job.millicpus, job.memory_bytes);
        println!("resources: {share} each");
    }
    if let (Some(progress), Some(parallel)) = (&job.progress, &job.parallel) {
        println!(
            "input:     {} ({}, {} items)",
            parallel.input_name, parallel.input_type, progress.items_total
        );
        println!("progress:  {}", mini_batch_text(progress));
        println!(
            "runs:      {} mini-batch runs (retries included), {} items done",
            progress.executions, progress.items_done
        );
        if !parallel.append_row_to.is_empty() {
            println!(
                "output:    {} (`shoal job download {}`)",
                parallel.append_row_to, job.id
            );
        }
    }
    if job.preemptions > 0 {
        println!(
            "preempted: {} of at most {} times",
            job.preemptions, job.max_preemptions
        );
    }
    println!("created:   {}", output::ago(job.created_at_ms));
    if job.started_at_ms > 0 {
        let end = if job.ended_at_ms > 0 {
            job.ended_at_ms
        } else {
            now_ms()
        };
        println!(
            "ran:       {} (started {})",
            output::short_duration(end - job.started_at_ms),
            output::ago(job.started_at_ms)
        );
    }
    for flag in &job.flags {
        println!("flag:      {flag}");
    }
    if let Some(summary) = usage_summary(job) {
        println!("usage:     {summary}");
    }
    for attempt in &job.attempts {
        println!(
            "attempt {} ({}): {}{}",
            attempt.number,
            attempt.id,
            attempt.status,
            if attempt.reason.is_empty() {
                String::new()
            } else {
                format!(" - {}", attempt.reason)
            }
        );
        for i in &attempt.instances {
            let code = i.exit_code.map_or("-".to_string(), |c| c.to_string());
            let message = if i.message.is_empty() {
                String::new()
            } else {
                format!("  {}", i.message)
            };
            println!(
                "  instance {} on {}: {} (exit code {code}){message}",
                i.index, i.node, i.status
            );
        }
    }
    Ok(())
}

/// The job's use of its resources: live while it runs, the summary once it ended.
fn usage_summary(job: &pb::Job) -> Option<String> {
    let attempt = job.attempts.last()?;
    let usages: Vec<&pb::Usage> = attempt
        .instances
        .iter()
        .filter_map(|i| i.usage.as_ref())
        .collect();
    if usages.is_empty() {
        return None;
    }
    let cpu: f64 = usages.iter().map(|u| u.cpu_seconds).sum();
    let mut text = format!("{cpu:.1} CPU-seconds");
    if job.gpus_per_instance > 0 {
        let n = usages.len() as f64;
        let avg = usages
            .iter()
            .map(|u| u.gpu_utilization_avg_percent)
            .sum::<f64>()
            / n;
        let peak = usages
            .iter()
            .map(|u| u.gpu_utilization_peak_percent)
            .max()
            .unwrap_or(0);
        let memory = usages
            .iter()
            .map(|u| u.gpu_memory_peak_bytes)
            .max()
            .unwrap_or(0);
        let energy: f64 = usages.iter().map(|u| u.gpu_energy_joules).sum();
        text.push_str(&format!(
            ", GPU {avg:.0}% average / {peak}% peak, {} peak GPU memory, {energy:.0} J",
            output::bytes(memory)
        ));
        if job.ended_at_ms == 0 {
            let now: u32 = usages
                .iter()
                .map(|u| u.gpu_utilization_percent)
                .sum::<u32>()
                / usages.len() as u32;
            text.push_str(&format!(" (now {now}%)"));
        }
    }
    let end = if job.ended_at_ms > 0 {
        job.ended_at_ms
    } else {
        now_ms()
    };
    if attempt.started_at_ms > 0 {
        text.push_str(&format!(
            ", {}",
            output::short_duration(end - attempt.started_at_ms)
        ));
    }
    Some(text)
}

fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Splits log chunks into lines per instance and stream, so interleaved output of
/// several instances stays readable.
#[derive(Default)]
pub struct LogPrinter {
    partial: HashMap<(u32, String), Vec<u8>>,
    prefix: bool,
}

impl LogPrinter {
    pub fn new(prefix: bool) -> Self {
        LogPrinter {
            partial: HashMap::new(),
            prefix,
        }
    }

    fn line(&self, instance: u32, bytes: &[u8]) -> String {
        let text = String::from_utf8_lossy(bytes);
        if self.prefix {
            format!("[{instance}] {text}")
        } else {
            text.into_owned()
        }
    }

    pub fn push(&mut self, chunk: &pb::LogChunk, out: &mut dyn FnMut(String)) {
        let key = (chunk.instance, chunk.stream.clone());
        let buffer = self.partial.entry(key).or_default();
        buffer.extend_from_slice(&chunk.data);
        let mut lines = Vec::new();
        while let Some(end) = buffer.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buffer.drain(..=end).collect();
            lines.push(line[..line.len() - 1].to_vec());
        }
        for line in lines {
            out(self.line(chunk.instance, &line));
        }
    }

    pub fn finish(&mut self, out: &mut dyn FnMut(String)) {
        let rest: Vec<((u32, String), Vec<u8>)> = self.partial.drain().collect();
        for ((instance, _), bytes) in rest {
            if !bytes.is_empty() {
                out(self.line(instance, &bytes));
            }
        }
    }
}

pub fn spinner() -> ProgressBar {
    let bar = ProgressBar::new_spinner();
    bar.set_style(
        ProgressStyle::with_template("{spinner:.cyan} {elapsed:>4} {msg}")
            .unwrap_or_else(|_| ProgressStyle::default_spinner()),
    );
    // Drawn only on a terminal: elsewhere (scripts, pipes) no ticker thread is
    // started and joined for a bar no one sees (1-2 ms of CPU a command).
    if !bar.is_hidden() {
        bar.enable_steady_tick(Duration::from_millis(100));
    }
    bar
}

/// A parallel job's mini-batches in words (and a bar): "[#####·····] 50/100
/// mini-batches · 2 failed · 4 running · 812 items/s · ETA 3s".
pub fn mini_batch_text(progress: &pb::Progress) -> String {
    let width = 20usize;
    let settled = (progress.done + progress.failed) as usize;
    let filled = (settled * width)
        .checked_div(progress.total as usize)
        .unwrap_or(0)
        .min(width);
    let mut text = format!(
        "[{}{}] {}/{} mini-batches",
        "#".repeat(filled),
        "·".repeat(width - filled),
        progress.done,
        progress.total
    );
    if progress.failed > 0 {
        text.push_str(&format!(" · {} failed", progress.failed));
    }
    if progress.running > 0 {
        text.push_str(&format!(" · {} running", progress.running));
    }
    text.push_str(&format!(" · {:.0} items/s", progress.items_per_second));
    if let Some(eta) = progress
        .eta_seconds
        .filter(|_| settled < progress.total as usize)
    {
        text.push_str(&format!(
            " · ETA {}",
            output::short_duration(eta as i64 * 1000)
        ));
    }
    text
}

/// A sweep's search, then its trials: parameters, status and primary metric, the best marked.
fn print_sweep(id: &str, sweep: &pb::SweepProgress) {
    let policy = if sweep.early_termination.is_empty() {
        String::new()
    } else {
        format!("; early termination: {}", sweep.early_termination)
    };
    println!(
        "sweep:     {} sampling to {} {}; {} trials at most, {} at once{policy}",
        sweep.sampling,
        sweep.goal,
        sweep.primary_metric,
        sweep.max_total_trials,
        sweep.max_concurrent_trials
    );
    if let Some(best) = sweep.best.and_then(|b| sweep.trials.get(b as usize)) {
        let score = best.score.map(|s| s.to_string()).unwrap_or_default();
        println!(
            "best:      trial {} ({}): {} {score}",
            best.index, best.job_id, sweep.primary_metric
        );
    }
    println!(
        "trials:    {} made; `shoal job list --parent {id}`, `--task K` for one",
        sweep.trials.len()
    );
    if sweep.trials.is_empty() {
        return;
    }
    let metric = sweep.primary_metric.to_uppercase();
    let mut table = output::table(&["  TRIAL", "JOB", "STATUS", &metric, "PARAMS", ""]);
    let rows = sweep.trials.iter().map(|t| {
        let params: Vec<String> = t.params.iter().map(|(k, v)| format!("{k}={v}")).collect();
        vec![
            format!("  {}", t.index),
            t.job_id.clone(),
            t.status.clone(),
            t.score.map(|s| s.to_string()).unwrap_or_else(|| "-".into()),
            params.join(" "),
            if sweep.best == Some(t.index) {
                "best".into()
            } else {
                String::new()
            },
        ]
    });
    for row in rows {
        table.add_row(row);
    }
    println!("{table}");
}

fn progress_text(job: &pb::Job) -> String {
    if let Some(sweep) = &job.sweep {
        let ended = sweep
            .trials
            .iter()
            .filter(|t| t.status != "running")
            .count();
        let best = sweep
            .best
            .and_then(|b| sweep.trials.get(b as usize))
            .and_then(|t| {
                t.score
                    .map(|s| format!(", best {} {s} ({})", sweep.primary_metric, t.job_id))
            })
            .unwrap_or_default();
        return format!(
            "{} {} · {ended} of {} trials ended, {} running{best}",
            job.id,
            job.status,
            sweep.max_total_trials,
            sweep.trials.len() - ended
        );
    }
    if let Some(progress) = &job.progress {
        return format!("{} {} {}", job.id, job.status, mini_batch_text(progress));
    }
    if job.array.is_some() {
        return format!("{} {} · {}", job.id, job.status, job.reason);
    }
    let instances = job.attempts.last().map(|a| &a.instances[..]).unwrap_or(&[]);
    let running = instances.iter().filter(|i| i.status == "running").count();
    let detail = if job.reason.is_empty() {
        String::new()
    } else {
        format!(" · {}", job.reason)
    };
    format!(
        "{} {} · {running}/{} instances running{detail}",
        job.id, job.status, job.instance_count
    )
}

/// The id of task `index` of array `id` (tasks are the jobs after the array's
/// own, in index order); `id` itself when no task is asked for.
async fn task_id(client: &Client, id: String, index: Option<u32>) -> anyhow::Result<String> {
    let Some(index) = index else {
        return Ok(id);
    };
    let job = get_job(client, &id).await?;
    if let Some(sweep) = job.sweep {
        return match sweep.trials.get(index as usize) {
            Some(trial) => Ok(trial.job_id.clone()),
            None => bail!(
                "sweep {id} has no trial {index} yet ({} made so far)",
                sweep.trials.len()
            ),
        };
    }
    let Some(array) = job.array else {
        bail!("job {id} is neither an array nor a sweep: leave --task out");
    };
    let spec =
        shoal_coordinator::api::convert::array_spec_from_wire(&array.spec.unwrap_or_default());
    let Some(position) = spec.position(index) else {
        bail!("array {id} has no task {index} (its tasks: {spec})");
    };
    let first = shoal_coordinator::control::job_seq(&array.first_task_id)
        .context("the array's first task has no job id")?;
    Ok(shoal_coordinator::control::job_id(
        first + u64::from(position),
    ))
}

/// Follows a job until it is settled: progress on the spinner, logs printed above it.
pub async fn follow(
    client: &Client,
    job_id: &str,
    bar: &ProgressBar,
    show_logs: bool,
) -> anyhow::Result<pb::Job> {
    // The watch and the logs are asked for together (one round trip, not two),
    // and the logs only when they are shown.
    let (mut jobs, mut log_jobs) = (client.jobs(), client.jobs());
    let watch = jobs.watch(pb::JobRef {
        id: job_id.to_string(),
    });
    let logs = async {
        if !show_logs {
            return Ok(None);
        }
        let request = pb::LogsRequest {
            job_id: job_id.to_string(),
            instance: None,
            follow: true,
        };
        log_jobs.logs(request).await.map(Some)
    };
    let (watch, logs) = tokio::join!(watch, logs);
    let mut watch = watch.map_err(status)?.into_inner();
    let mut logs = logs.map_err(status)?.map(|r| r.into_inner());
    let mut printer: Option<LogPrinter> = None;
    let mut last: Option<pb::Job> = None;
    let mut logs_open = logs.is_some();
    let mut watch_open = true;
    // `suspend` prints even when the bar is hidden (no terminal).
    // A closed stdout (`| head`) ends the printing, not the program.
    let mut print = |line: String| {
        bar.suspend(|| {
            use std::io::Write;
            let _ = writeln!(std::io::stdout(), "{line}");
        })
    };
    while watch_open || logs_open {
        tokio::select! {
            update = watch.next(), if watch_open => match update {
                Some(Ok(job)) => {
                    bar.set_message(progress_text(&job));
                    if printer.is_none() {
                        printer = Some(LogPrinter::new(job.instance_count > 1));
                    }
                    last = Some(job);
                }
                Some(Err(e)) => return Err(status(e)),
                None => watch_open = false,
            },
            chunk = async { logs.as_mut()?.next().await }, if logs_open => match chunk {
                Some(Ok(chunk)) => {
                    printer.get_or_insert_with(|| LogPrinter::new(true)).push(&chunk, &mut print);
                }
                Some(Err(e)) => return Err(status(e)),
                None => logs_open = false,
            },
        }
    }
    if let Some(printer) = printer.as_mut() {
        printer.finish(&mut print);
    }
    last.ok_or_else(|| anyhow!("the coordinator ended the watch of {job_id} without a word"))
}

async fn get_job(client: &Client, id: &str) -> anyhow::Result<pb::Job> {
    Ok(client
        .jobs()
        .get(pb::JobRef { id: id.to_string() })
        .await
        .map_err(status)?
        .into_inner())
}

async fn is_parallel(client: &Client, id: &str) -> anyhow::Result<bool> {
    Ok(get_job(client, id).await?.parallel.is_some())
}

/// Downloads a job's outputs under `into/<job id>`: each instance's ./outputs in
/// `instance-<k>`, each named output in `named-outputs/<name>` (per instance in
/// `named-outputs/<name>/instance-<k>` when several wrote it); `only`: one named
/// output. Returns what was written.
pub async fn download(
    client: &Client,
    job_id: &str,
    into: &Path,
    only: Option<&str>,
) -> anyhow::Result<Vec<PathBuf>> {
    let list = client
        .jobs()
        .download_outputs(pb::JobRef {
            id: job_id.to_string(),
        })
        .await
        .map_err(status)?
        .into_inner();
    let root = into.join(job_id);
    let mut written = Vec::new();
    let unpack = |data: &[u8], dir: &Path, what: &str| -> anyhow::Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        shoal_agent::archive::unpack(data, dir)
            .with_context(|| format!("cannot unpack {what} into {}", dir.display()))
    };
    if only.is_none() {
        for file in &list.files {
            std::fs::create_dir_all(&root)
                .with_context(|| format!("cannot create {}", root.display()))?;
            // The name was checked at submit: a plain file name.
            let path = root.join(Path::new(&file.name).file_name().unwrap_or_default());
            std::fs::write(&path, &file.data)
                .with_context(|| format!("cannot write {}", path.display()))?;
            written.push(path);
        }
        for logged in &list.logged {
            // Only plain names below the run's folder: nothing climbs out.
            let parts: Vec<&str> = logged.path.split('/').collect();
            if parts
                .iter()
                .any(|p| p.is_empty() || *p == "." || *p == ".." || p.contains('\\'))
                || logged.run_id.contains('/')
            {
                bail!(
                    "the coordinator sent an artifact path `{}` that is not plain",
                    logged.path
                );
            }
            let mut path = root.join("artifacts").join(&logged.run_id);
            path.extend(&parts);
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir)
                    .with_context(|| format!("cannot create {}", dir.display()))?;
            }
            std::fs::write(&path, &logged.data)
                .with_context(|| format!("cannot write {}", path.display()))?;
            written.push(path);
        }
        for output in &list.outputs {
            let dir = root.join(format!("instance-{}", output.instance));
            unpack(
                &output.data,
                &dir,
                &format!("the outputs of instance {}", output.instance),
            )?;
            written.push(dir);
        }
    }
    let mut writers: HashMap<&str, usize> = HashMap::new();
    for named in &list.named {
        *writers.entry(named.name.as_str()).or_default() += 1;
    }
    for named in &list.named {
        if only.is_some_and(|n| n != named.name) {
            continue;
        }
        let mut dir = root.join("named-outputs").join(&named.name);
        if writers[named.name.as_str()] > 1 {
            dir = dir.join(format!("instance-{}", named.instance));
        }
        unpack(&named.data, &dir, &format!("output `{}`", named.name))?;
        written.push(dir);
    }
    Ok(written)
}

async fn download_command(client: &Client, args: DownloadArgs) -> anyhow::Result<()> {
    let id = args.id.or(args.name).unwrap_or_default();
    let only = args.output_name.as_deref();
    let written = download(client, &id, &args.download_path, only).await?;
    if written.is_empty() {
        match only {
            Some(name) => {
                let job = client
                    .jobs()
                    .get(pb::JobRef { id: id.clone() })
                    .await
                    .map_err(status)?
                    .into_inner();
                if job.outputs.iter().any(|o| o == name) {
                    bail!("{id} has not written its output `{name}` (yet)");
                }
                let names = if job.outputs.is_empty() {
                    "it has none".to_string()
                } else {
                    format!("it has {}", job.outputs.join(", "))
                };
                bail!("{id} has no output named `{name}` ({names})");
            }
            None => eprintln!("{id} has no outputs (nothing was written to ./outputs)"),
        }
    }
    for dir in written {
        println!("{}", dir.display());
    }
    Ok(())
}

pub async fn run(command: Command, endpoint: &str, format: Format) -> anyhow::Result<ExitCode> {
    if let Command::Submit(args) = command {
        return submit(*args, endpoint, format).await;
    }
    let client = Client::connect(endpoint).await?;
    let mut jobs = client.jobs();
    match command {
        Command::Submit(_) => unreachable!("handled above"),
        Command::Show { id, task } => {
            let id = task_id(&client, id, task).await?;
            let job = jobs
                .get(pb::JobRef { id })
                .await
                .map_err(status)?
                .into_inner();
            print_job(&job, format)?;
            if format != Format::Json {
                let logged = jobs
                    .metrics(pb::MetricsRequest {
                        job_id: job.id.clone(),
                        names: Vec::new(),
                        latest_only: true,
                    })
                    .await
                    .map_err(status)?
                    .into_inner();
                super::metrics::print_latest(&logged);
            }
        }
        Command::Metrics { id, name, task } => {
            let id = task_id(&client, id, task).await?;
            let listed = !name.is_empty();
            let logged = jobs
                .metrics(pb::MetricsRequest {
                    job_id: id,
                    names: name,
                    latest_only: false,
                })
                .await
                .map_err(status)?
                .into_inner();
            if format == Format::Json {
                output::json(&super::metrics::to_json(&logged))?;
            } else {
                super::metrics::print(&logged, listed);
            }
        }
        Command::List {
            cluster,
            limit,
            after,
            parent,
        } => {
            let page = jobs
                .list(pb::ListJobsRequest {
                    cluster: cluster.unwrap_or_default(),
                    limit,
                    after: after.clone().unwrap_or_default(),
                    array: parent.unwrap_or_default(),
                })
                .await
                .map_err(status)?
                .into_inner();
            let list = page.jobs;
            if format == Format::Json {
                let views: Vec<view::Job> = list.iter().map(view::Job::from).collect();
                output::json(&views)?;
                return Ok(ExitCode::SUCCESS);
            }
            if list.is_empty() {
                if after.is_some() {
                    eprintln!("no more jobs");
                } else {
                    eprintln!(
                        "no jobs yet; submit one with `shoal job submit --cluster NAME -- COMMAND`"
                    );
                }
                return Ok(ExitCode::SUCCESS);
            }
            let mut table = output::table(&[
                "ID",
                "NAME",
                "CLUSTER",
                "STATUS",
                "INSTANCES",
                "ATTEMPTS",
                "CREATED",
                "REASON",
            ]);
            for j in &list {
                table.add_row(vec![
                    j.id.clone(),
                    j.name.clone(),
                    j.cluster.clone(),
                    j.status.clone(),
                    j.instance_count.to_string(),
                    j.attempts.len().to_string(),
                    output::ago(j.created_at_ms),
                    if j.flags.is_empty() {
                        j.reason.clone()
                    } else {
                        format!("{} [{}]", j.reason, j.flags.join("; "))
                            .trim()
                            .to_string()
                    },
                ]);
            }
            println!("{table}");
            if !page.next_after.is_empty() {
                eprintln!(
                    "more: shoal job list --limit {limit} --after {}",
                    page.next_after
                );
            }
        }
        Command::Delete { id } => {
            let job = jobs
                .delete(pb::JobRef { id })
                .await
                .map_err(status)?
                .into_inner();
            if format == Format::Json {
                output::json(&view::Job::from(&job))?;
            } else {
                println!("deleted {} ({})", job.id, job.status);
            }
        }
        Command::Logs {
            id,
            follow: true,
            instance: None,
            task: None,
        } if is_parallel(&client, &id).await? => {
            // A parallel job: its log, with the mini-batch progress bar below it.
            let bar = spinner();
            follow(&client, &id, &bar, true).await?;
            bar.finish_and_clear();
        }
        Command::Logs {
            id,
            follow,
            instance,
            task,
        } => {
            let id = task_id(&client, id, task).await?;
            let mut stream = jobs
                .logs(pb::LogsRequest {
                    job_id: id.clone(),
                    instance,
                    follow,
                })
                .await
                .map_err(status)?
                .into_inner();
            let job = jobs
                .get(pb::JobRef { id })
                .await
                .map_err(status)?
                .into_inner();
            let mut printer = LogPrinter::new(instance.is_none() && job.instance_count > 1);
            let stdout = std::io::stdout();
            let mut print = |line: String| {
                let _ = writeln!(stdout.lock(), "{line}");
            };
            while let Some(chunk) = stream.next().await {
                let chunk = chunk.map_err(status)?;
                printer.push(&chunk, &mut print);
            }
            printer.finish(&mut print);
        }
        Command::Why { id, task } => {
            let id = task_id(&client, id, task).await?;
            let lines = jobs
                .why(pb::JobRef { id })
                .await
                .map_err(status)?
                .into_inner()
                .lines;
            if format == Format::Json {
                output::json(&lines)?;
            } else {
                for line in lines {
                    println!("{line}");
                }
            }
        }
        Command::Cancel { id, wait, task } => {
            let id = task_id(&client, id, task).await?;
            let mut job = jobs
                .cancel(pb::JobRef { id })
                .await
                .map_err(status)?
                .into_inner();
            if wait && job.status == "canceling" {
                let bar = spinner();
                job = follow(&client, &job.id, &bar, false).await?;
                bar.finish_and_clear();
            }
            if format == Format::Json {
                output::json(&view::Job::from(&job))?;
            } else if job.status == "canceling" {
                println!(
                    "canceling {}: its instances are stopping (`shoal job cancel --wait` waits for them)",
                    job.id
                );
            } else {
                println!("{} {}", job.status, job.id);
            }
        }
        Command::Download(args) => download_command(&client, args).await?,
    }
    Ok(ExitCode::SUCCESS)
}
