//! The job file: the managed service's commandJob YAML (and its parallel job), read
//! key by key as the service's schema has them. Every key of the schema is
//! accepted; one that cannot mean anything here is named in a warning that says
//! why. A key outside the schema is an error that names it, so a typo never
//! passes as a default. The HTTP API takes the same shape as JSON.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::Value;

use crate::{Error, Result};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct JobFile {
    #[serde(rename = "$schema", default)]
    pub schema: Option<String>,
    #[serde(rename = "type", default)]
    pub kind: Option<String>,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub display_name: Option<String>,
    #[serde(default)]
    pub experiment_name: Option<String>,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub tags: BTreeMap<String, Scalar>,
    #[serde(default)]
    pub properties: BTreeMap<String, Scalar>,
    #[serde(default)]
    pub command: Option<String>,
    /// Exact argv, for the HTTP API and scripts (YAML users write `command`).
    #[serde(default)]
    pub argv: Vec<String>,
    /// `./src`, or `{local_path: ./src}` as older files write it.
    #[serde(default)]
    pub code: Option<Value>,
    /// A reference (`azureml:NAME@latest`, `azureml:NAME:VERSION`,
    /// `azureml://registries/…`, `file:./env.yml`, `host`) or an inline definition.
    #[serde(default)]
    pub environment: Option<Value>,
    #[serde(default)]
    pub environment_variables: BTreeMap<String, Scalar>,
    #[serde(default)]
    pub compute: Option<String>,
    #[serde(default)]
    pub resources: Option<Resources>,
    #[serde(default)]
    pub limits: Option<Limits>,
    /// Preemptions the job is requeued after before it fails (default 10).
    #[serde(default)]
    pub max_preemptions: Option<u32>,
    /// A job array: `{start: 0, end: 99, step: 1, max_concurrent: 10}`, or
    /// Slurm's `0-99%10`.
    #[serde(default)]
    pub array: Option<ArrayKey>,
    /// `{type: pytorch, process_count_per_instance: 2}`, `{type: tensorflow, worker_count: 2, parameter_server_count: 1}`, `{type: mpi, …}`.
    #[serde(default)]
    pub distribution: Option<crate::model::Distribution>,
    /// Literals, or `{type, path, mode}`.
    #[serde(default)]
    pub inputs: BTreeMap<String, Value>,
    /// `{type, mode, path}`, or nothing (a folder).
    #[serde(default)]
    pub outputs: BTreeMap<String, Option<Value>>,
    /// Accepted, with a warning: no meaning here.
    #[serde(default)]
    pub identity: Option<Value>,
    #[serde(default)]
    pub queue_settings: Option<Value>,
    #[serde(default)]
    pub services: Option<Value>,

    // type: parallel (the managed service's parallel job names)
    #[serde(default)]
    pub mini_batch_size: Option<Scalar>,
    #[serde(default)]
    pub max_concurrency_per_instance: Option<u32>,
    #[serde(default)]
    pub retry_settings: Option<RetrySettings>,
    #[serde(default)]
    pub mini_batch_error_threshold: Option<i64>,
    #[serde(default)]
    pub allowed_failed_percent: Option<u32>,
    #[serde(default)]
    pub task: Option<Task>,
    #[serde(default)]
    pub output: Option<Output>,
    /// The input cut into mini-batches: `${{inputs.NAME}}`.
    #[serde(default)]
    pub input_data: Option<String>,
    /// Failed items tolerated (-1: any): counted per mini-batch here.
    #[serde(default)]
    pub error_threshold: Option<i64>,
    #[serde(default)]
    pub logging_level: Option<String>,
    /// Tabular input grouped by columns: refused, not read here yet.
    #[serde(default)]
    pub partition_keys: Option<Value>,

    // type: sweep (the trial's keys are read as the job's own: `flatten_sweep`)
    #[serde(default)]
    pub search_space: Option<Value>,
    #[serde(default)]
    pub sampling_algorithm: Option<Value>,
    #[serde(default)]
    pub objective: Option<Value>,
    #[serde(default)]
    pub early_termination: Option<Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetrySettings {
    #[serde(default)]
    pub max_retries: Option<u32>,
    /// Seconds per mini-batch run.
    #[serde(default)]
    pub timeout: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Task {
    /// `run_function`, the one task type.
    #[serde(rename = "type", default)]
    pub kind: Option<String>,
    #[serde(default)]
    pub command: Option<String>,
    #[serde(default)]
    pub environment: Option<Value>,
    #[serde(default)]
    pub code: Option<Value>,
    /// `per_mini_batch` (default: the command runs once per mini-batch) or `worker`
    /// (one long-lived process per worker, fed mini-batches on stdin).
    #[serde(default)]
    pub mode: Option<String>,
    /// run_function: the script with `init()` and `run(mini_batch)`, in the code folder.
    #[serde(default)]
    pub entry_script: Option<String>,
    /// run_function: the entry script's arguments (`--model ${{inputs.model}}`).
    #[serde(default)]
    pub program_arguments: Option<String>,
    /// run_function: where the rows go, `${{outputs.NAME}}/FILE` or a file name.
    #[serde(default)]
    pub append_row_to: Option<String>,
}

/// `array:` as a mapping or as Slurm writes it.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum ArrayKey {
    Text(String),
    Spec(crate::model::ArraySpec),
}

impl ArrayKey {
    pub fn spec(&self) -> crate::Result<crate::model::ArraySpec> {
        let spec = match self {
            ArrayKey::Text(text) => crate::model::ArraySpec::parse(text)?,
            ArrayKey::Spec(spec) => *spec,
        };
        spec.check()?;
        Ok(spec)
    }
}

/// `output: summary_only`, or `output: {append_row_to: results.csv}`.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub enum Output {
    Action(String),
    Rows { append_row_to: String },
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Resources {
    #[serde(default)]
    pub instance_count: Option<u32>,
    /// GPUs each instance gets, exclusively.
    #[serde(default, alias = "gpu_count", alias = "gpus")]
    pub gpus_per_instance: Option<u32>,
    /// Cores each instance gets (`0.5`, `2`); with `memory`, instances share
    /// nodes. Neither: each instance has a node of its own.
    #[serde(default)]
    pub cpus: Option<f64>,
    /// Memory each instance gets, enforced (`4g`, `512m`, or bytes).
    #[serde(default)]
    pub memory: Option<Scalar>,
    /// Accepted with a warning: the cluster's VM size decides.
    #[serde(default)]
    pub instance_type: Option<String>,
    /// Shared memory of a container job (`2g`, `512m`).
    #[serde(default)]
    pub shm_size: Option<Scalar>,
    /// Accepted with a warning: not passed to the engine.
    #[serde(default)]
    pub docker_args: Option<String>,
    #[serde(default)]
    pub properties: Option<Value>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Limits {
    /// Seconds (a sweep's: the whole sweep).
    #[serde(default)]
    pub timeout: Option<u64>,
    /// A sweep's: seconds each trial may run.
    #[serde(default)]
    pub trial_timeout: Option<u64>,
    #[serde(default)]
    pub max_total_trials: Option<u32>,
    #[serde(default)]
    pub max_concurrent_trials: Option<u32>,
}

/// YAML values people write for env vars and tags: `1`, `true`, `"x"` all become text.
#[derive(Clone, Debug, Deserialize)]
#[serde(untagged)]
pub enum Scalar {
    Text(String),
    Int(i64),
    Float(f64),
    Bool(bool),
}

impl std::fmt::Display for Scalar {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Scalar::Text(s) => f.write_str(s),
            Scalar::Int(i) => write!(f, "{i}"),
            Scalar::Float(x) => write!(f, "{x}"),
            Scalar::Bool(b) => write!(f, "{b}"),
        }
    }
}

/// A job file (YAML, or JSON, which is YAML too) as a document, before `--set`.
pub fn document(text: &str) -> Result<Value> {
    let doc: Value =
        serde_saphyr::from_str(text).map_err(|e| Error::invalid("job file", e.to_string()))?;
    match doc {
        Value::Object(_) => Ok(doc),
        Value::Null => Ok(Value::Object(Default::default())),
        _ => Err(Error::invalid(
            "job file",
            "it must be a mapping of keys (command:, compute:, ...)",
        )),
    }
}

/// The variable a run_function job's driver source is given in.
pub const RUN_FUNCTION_VARIABLE: &str = "SHOAL_RUN_FUNCTION";

/// The run_function driver (Python, standard library), shipped with Shoal.
pub const RUN_FUNCTION_DRIVER: &str =
    include_str!("../../../sdk/python/shoal_driver/run_function.py");

/// `command`, `parallel` and `sweep` jobs run here (and `pipeline`, read apart:
/// `admission::read`); other types are refused by name before their keys are read.
pub fn check_type(kind: &str) -> Result<()> {
    match kind {
        "command" | "parallel" | "sweep" => Ok(()),
        "pipeline" => Err(Error::invalid(
            "type",
            "a pipeline is not a step or a trial: its jobs are",
        )),
        other => Err(Error::invalid(
            "type",
            format!(
                "`{other}` jobs are not supported; use `type: command`, `type: parallel`, `type: sweep` or `type: pipeline`"
            ),
        )),
    }
}

/// Keys a sweep's `trial` (a command job) may have.
const TRIAL_KEYS: &[&str] = &[
    "type",
    "command",
    "code",
    "environment",
    "environment_variables",
    "resources",
    "distribution",
    "argv",
];

/// A sweep's `trial` read into the job's own keys, so the trial is checked as
/// the command job it is (a key given both in `trial` and at the top is refused).
fn flatten_sweep(doc: &mut Value) -> Result<()> {
    let Value::Object(map) = doc else {
        return Ok(());
    };
    let trial = match map.remove("trial") {
        // A command component (its file inlined by the CLI, or registered): the
        // sweep's inputs (`${{search_space.X}}` among them) are its inputs' values.
        Some(Value::Object(trial))
            if trial.contains_key("inputs") || trial.contains_key("name") =>
        {
            let mut warnings = Vec::new();
            return super::pipeline::apply_component(map, trial, "sweep", &mut warnings).map_err(
                |e| match e {
                    Error::InvalidArgument { field, reason } => Error::InvalidArgument {
                        field: field.replacen("sweep.component", "trial", 1),
                        reason,
                    },
                    other => other,
                },
            );
        }
        Some(Value::Object(trial)) => trial,
        Some(Value::String(reference)) => {
            return Err(Error::invalid(
                "trial",
                format!(
                    "`{reference}`: a trial's component file is read by `shoal job submit -f` (the CLI puts it in); over HTTP write it inline: trial: {{command: ..., code: ..., environment: ...}}"
                ),
            ));
        }
        _ => {
            return Err(Error::invalid(
                "trial",
                "a sweep needs a trial, the command job each trial runs: trial: {command: python train.py --lr ${{search_space.lr}}, code: ./src}",
            ));
        }
    };
    for (key, value) in trial {
        if !TRIAL_KEYS.contains(&key.as_str()) {
            return Err(Error::invalid(
                format!("trial.{key}"),
                format!(
                    "a trial has {}; inputs, outputs, compute and limits are the sweep's own keys",
                    TRIAL_KEYS[1..].join(", ")
                ),
            ));
        }
        if key == "type" {
            if value.as_str() != Some("command") {
                return Err(Error::invalid("trial.type", "a trial is a command job"));
            }
            continue;
        }
        if map.contains_key(&key) {
            return Err(Error::invalid(
                format!("trial.{key}"),
                format!("`{key}` is given both in the trial and at the top of the sweep; keep one"),
            ));
        }
        map.insert(key, value);
    }
    Ok(())
}

impl JobFile {
    pub fn from_yaml(text: &str) -> Result<Self> {
        Self::from_document(document(text)?)
    }

    pub fn from_document(mut doc: Value) -> Result<Self> {
        if let Some(kind) = doc.get("type").and_then(Value::as_str) {
            check_type(kind)?;
            if kind == "sweep" {
                flatten_sweep(&mut doc)?;
            }
        }
        // A wrong value names its key (`resources.instance_count`), not only its type.
        serde_path_to_error::deserialize(doc).map_err(|e| {
            let path = e.path().to_string();
            let field = if path.is_empty() || path == "." {
                "job file".to_string()
            } else {
                path
            };
            Error::invalid(field, e.into_inner().to_string())
        })
    }

    /// Refuses what this build cannot run yet, rather than ignoring it.
    pub fn check_supported(&self) -> Result<()> {
        if let Some(kind) = self.kind.as_deref() {
            check_type(kind)?;
        }
        let parallel_only = self.mini_batch_size.is_some()
            || self.task.is_some()
            || self.output.is_some()
            || self.retry_settings.is_some()
            || self.input_data.is_some()
            || self.error_threshold.is_some()
            || self.partition_keys.is_some();
        if let Some(task) = &self.task {
            if task.entry_script.is_some() && task.command.is_some() {
                return Err(Error::invalid(
                    "task",
                    "give a run_function task an entry_script, or a command, not both",
                ));
            }
            if (task.program_arguments.is_some() || task.append_row_to.is_some())
                && task.entry_script.is_none()
            {
                return Err(Error::invalid(
                    "task.entry_script",
                    "program_arguments and append_row_to go with an entry_script (a script with init() and run(mini_batch))",
                ));
            }
            if task.entry_script.is_some() && self.output.is_some() && task.append_row_to.is_some()
            {
                return Err(Error::invalid(
                    "output",
                    "the rows go where task.append_row_to says; leave output out",
                ));
            }
        }

        if let Some(kind) = self.task.as_ref().and_then(|t| t.kind.as_deref())
            && kind != "run_function"
        {
            return Err(Error::invalid(
                "task.type",
                format!("`{kind}` is not a task type; the one type is run_function"),
            ));
        }
        if parallel_only && !self.is_parallel() {
            return Err(Error::invalid(
                "type",
                "mini_batch_size, task, output and retry_settings belong to `type: parallel` jobs",
            ));
        }
        let limits = self.limits.as_ref();
        let sweep_only = self.search_space.is_some()
            || self.sampling_algorithm.is_some()
            || self.objective.is_some()
            || self.early_termination.is_some()
            || limits.is_some_and(|l| {
                l.trial_timeout.is_some()
                    || l.max_total_trials.is_some()
                    || l.max_concurrent_trials.is_some()
            });
        if sweep_only && !self.is_sweep() {
            return Err(Error::invalid(
                "type",
                "search_space, sampling_algorithm, objective, early_termination and the trial limits belong to `type: sweep` jobs",
            ));
        }
        if self.is_sweep() && self.array.is_some() {
            return Err(Error::invalid(
                "array",
                "a sweep makes its own trials; it cannot be an array",
            ));
        }
        Ok(())
    }

    pub fn is_parallel(&self) -> bool {
        self.kind.as_deref() == Some("parallel")
    }

    pub fn is_sweep(&self) -> bool {
        self.kind.as_deref() == Some("sweep")
    }

    /// Seconds each instance may run: a sweep's `limits.trial_timeout`, else `limits.timeout`.
    pub fn instance_timeout(&self) -> Option<u64> {
        let limits = self.limits.as_ref()?;
        if self.is_sweep() {
            limits.trial_timeout
        } else {
            limits.timeout
        }
    }

    /// A sweep's keys, as written.
    pub fn sweep_keys(&self) -> crate::sweep::SweepKeys<'_> {
        let limits = self.limits.as_ref();
        crate::sweep::SweepKeys {
            search_space: self.search_space.as_ref(),
            sampling_algorithm: self.sampling_algorithm.as_ref(),
            objective: self.objective.as_ref(),
            early_termination: self.early_termination.as_ref(),
            max_total_trials: limits.and_then(|l| l.max_total_trials),
            max_concurrent_trials: limits.and_then(|l| l.max_concurrent_trials),
            timeout: limits.and_then(|l| l.timeout),
        }
    }

    /// `partition_keys`: column names (a list, or one name).
    pub fn partition_keys(&self) -> Result<Vec<String>> {
        match &self.partition_keys {
            None | Some(Value::Null) => Ok(Vec::new()),
            Some(Value::String(key)) => Ok(vec![key.clone()]),
            Some(Value::Array(keys)) => keys
                .iter()
                .map(|k| {
                    k.as_str().map(str::to_string).ok_or_else(|| {
                        Error::invalid("partition_keys", format!("`{k}` is not a column name"))
                    })
                })
                .collect(),
            Some(other) => Err(Error::invalid(
                "partition_keys",
                format!("`{other}` is not a list of column names"),
            )),
        }
    }

    /// A parallel job whose task is the service's run_function (an entry script).
    pub fn is_run_function(&self) -> bool {
        self.task.as_ref().is_some_and(|t| t.entry_script.is_some())
    }

    /// Where a run_function job's rows go: (the named output, the file), from
    /// `task.append_row_to: ${{outputs.NAME}}/FILE` (a bare FILE: no named output).
    pub fn rows_target(&self) -> Result<Option<(Option<String>, String)>> {
        let Some(target) = self.task.as_ref().and_then(|t| t.append_row_to.as_deref()) else {
            return Ok(None);
        };
        let target = target.trim();
        let Some(rest) = target.strip_prefix("${{") else {
            return Ok(Some((None, target.to_string())));
        };
        let bad = || {
            Error::invalid(
                "task.append_row_to",
                format!("`{target}` is ${{{{outputs.NAME}}}}/FILE (or a file name)"),
            )
        };
        let (expression, file) = rest.split_once("}}").ok_or_else(bad)?;
        let output = expression
            .trim()
            .strip_prefix("outputs.")
            .ok_or_else(bad)?
            .to_string();
        let file = file.trim_start_matches('/');
        let file = if file.is_empty() {
            "parallel_run_step.txt"
        } else {
            file
        };
        Ok(Some((Some(output), file.to_string())))
    }

    /// The input a parallel job cuts into mini-batches: `input_data`'s, the one
    /// named `data`, or the only one.
    pub fn parallel_input(&self) -> Result<(&str, &Value)> {
        if let Some(written) = &self.input_data {
            let name = written
                .trim()
                .strip_prefix("${{")
                .and_then(|r| r.strip_suffix("}}"))
                .and_then(|r| r.trim().strip_prefix("inputs."))
                .ok_or_else(|| {
                    Error::invalid(
                        "input_data",
                        format!("`{written}` is not ${{{{inputs.NAME}}}}"),
                    )
                })?;
            return self
                .inputs
                .get_key_value(name.trim())
                .map(|(name, value)| (name.as_str(), value))
                .ok_or_else(|| {
                    Error::invalid("input_data", format!("`{written}` names no input"))
                });
        }
        match self.inputs.len() {
            0 => Err(Error::invalid(
                "inputs",
                "a parallel job needs an input: inputs: {data: {type: uri_file, path: ./rows.csv}}",
            )),
            1 => self
                .inputs
                .iter()
                .next()
                .map(|(name, value)| (name.as_str(), value))
                .ok_or_else(|| Error::invalid("inputs", "empty")),
            _ => self
                .inputs
                .get_key_value("data")
                .map(|(name, value)| (name.as_str(), value))
                .ok_or_else(|| {
                    Error::invalid(
                        "inputs",
                        "with several inputs, the one named `data` is cut into mini-batches",
                    )
                }),
        }
    }

    /// A parallel job's settings, with its input (`input_type`: uri_file or
    /// uri_folder; `data`: the file's bytes, or a tar.gz of the folder; `name`: where
    /// it came from, for people).
    pub fn parallel_wire(
        &self,
        input_type: &str,
        data: Vec<u8>,
        name: &str,
    ) -> Result<shoal_proto::v1::Parallel> {
        crate::parallel::InputType::parse(input_type)?;
        let size = match &self.mini_batch_size {
            None => crate::parallel::BatchSize::Items(1),
            Some(Scalar::Int(n)) => crate::parallel::BatchSize::parse(&n.to_string())?,
            Some(Scalar::Text(text)) => crate::parallel::BatchSize::parse(text)?,
            Some(other) => crate::parallel::BatchSize::parse(&other.to_string())?,
        };
        let (mini_batch_size, mini_batch_bytes) = match size {
            crate::parallel::BatchSize::Items(n) => (n, 0),
            crate::parallel::BatchSize::Bytes(n) => (0, n),
        };
        let rows_target = self.rows_target()?;
        let append_row_to = match &self.output {
            None if rows_target.is_some() => rows_target
                .as_ref()
                .map(|(_, file)| file.clone())
                .unwrap_or_default(),
            None => String::new(),
            Some(Output::Action(action)) if action == "summary_only" => String::new(),
            Some(Output::Action(action)) => {
                return Err(Error::invalid(
                    "output",
                    format!(
                        "`{action}` is not an output action: use summary_only or {{append_row_to: FILE}}"
                    ),
                ));
            }
            Some(Output::Rows { append_row_to }) => append_row_to.clone(),
        };
        let worker_mode = match self.task.as_ref().and_then(|t| t.mode.as_deref()) {
            // run_function's driver is a worker: the entry script is imported once.
            None if self.is_run_function() => true,
            None | Some("per_mini_batch") => false,
            Some("worker") => true,
            Some(other) => {
                return Err(Error::invalid(
                    "task.mode",
                    format!("`{other}` is not per_mini_batch or worker"),
                ));
            }
        };
        let retry = self.retry_settings.as_ref();
        Ok(shoal_proto::v1::Parallel {
            input_type: input_type.to_string(),
            input: data,
            mini_batch_size,
            mini_batch_bytes,
            max_concurrency_per_instance: self.max_concurrency_per_instance.unwrap_or(1),
            max_retries: retry.and_then(|r| r.max_retries),
            mini_batch_timeout_seconds: retry.and_then(|r| r.timeout).unwrap_or(0),
            mini_batch_error_threshold: self.mini_batch_error_threshold,
            allowed_failed_percent: self.allowed_failed_percent,
            append_row_to,
            input_name: name.to_string(),
            worker_mode,
            rows_output: rows_target
                .and_then(|(output, _)| output)
                .unwrap_or_default(),
            deferred: false,
            delimiter: String::new(),
            partition_keys: self.partition_keys()?,
            error_threshold: self.error_threshold.filter(|_| self.is_run_function()),
        })
    }

    /// `azureml:cpu-cluster` and `cpu-cluster` both name the cluster `cpu-cluster`.
    pub fn cluster(&self) -> Option<String> {
        self.compute
            .as_deref()
            .map(|c| c.strip_prefix("azureml:").unwrap_or(c).to_string())
    }

    pub fn env(&self) -> BTreeMap<String, String> {
        self.environment_variables
            .iter()
            .map(|(k, v)| (k.clone(), v.to_string()))
            .collect()
    }

    /// The command line: a parallel job's `task.command` (run_function: the driver
    /// with the entry script and its arguments), else `command`.
    pub fn command_line(&self) -> Option<String> {
        if let Some(task) = &self.task
            && let Some(entry) = &task.entry_script
        {
            let arguments = task.program_arguments.as_deref().unwrap_or_default();
            return Some(
                format!("python3 -u -c \"${RUN_FUNCTION_VARIABLE}\" {entry} {arguments}")
                    .trim_end()
                    .to_string(),
            );
        }
        self.task
            .as_ref()
            .and_then(|t| t.command.clone())
            .or_else(|| self.command.clone())
    }

    /// The code folder: a parallel job's `task.code`, else `code` (a path, or
    /// `{local_path: PATH}`).
    pub fn code_dir(&self) -> Result<Option<String>> {
        let value = self
            .task
            .as_ref()
            .and_then(|t| t.code.clone())
            .or_else(|| self.code.clone());
        match value {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(path)) => Ok(Some(path)),
            Some(Value::Object(map)) => match map.get("local_path") {
                Some(Value::String(path)) if map.len() == 1 => Ok(Some(path.clone())),
                _ => Err(Error::invalid(
                    "code",
                    "give the code folder as a path (`code: ./src`) or `{local_path: ./src}`",
                )),
            },
            Some(other) => Err(Error::invalid(
                "code",
                format!("`{other}` is not a folder path"),
            )),
        }
    }

    /// The environment: a parallel job's `task.environment`, else `environment`.
    pub fn environment_value(&self) -> Option<&Value> {
        self.task
            .as_ref()
            .and_then(|t| t.environment.as_ref())
            .or(self.environment.as_ref())
            .filter(|v| !v.is_null())
    }

    pub fn distribution_wire(&self) -> Option<shoal_proto::v1::Distribution> {
        self.distribution
            .as_ref()
            .map(crate::api::convert::distribution_to_wire)
    }

    pub fn job_name(&self) -> String {
        self.display_name
            .clone()
            .or_else(|| self.name.clone())
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_managed_service_names() {
        let file = JobFile::from_yaml(
            "$schema: https://example/commandJob.schema.json\n\
             command: python3 train.py --epochs 3\n\
             code: ./src\n\
             environment_variables: {EPOCHS: 3, DEBUG: true}\n\
             compute: azureml:cpu-cluster\n\
             resources: {instance_count: 2}\n\
             limits: {timeout: 600}\n",
        )
        .expect("valid");
        assert_eq!(file.cluster().as_deref(), Some("cpu-cluster"));
        assert_eq!(file.env().get("EPOCHS").map(String::as_str), Some("3"));
        assert_eq!(file.resources.and_then(|r| r.instance_count), Some(2));
        assert_eq!(file.limits.and_then(|l| l.timeout), Some(600));
    }

    #[test]
    fn an_array_is_a_mapping_or_slurms_spelling() {
        let file = JobFile::from_yaml(
            "command: x\narray: {start: 1, end: 9, step: 2, max_concurrent: 3}\n",
        )
        .expect("valid");
        let spec = file.array.expect("an array").spec().expect("a spec");
        assert_eq!(
            (spec.count(), spec.index(4), spec.max_concurrent),
            (5, 9, 3)
        );
        let file = JobFile::from_yaml("command: x\narray: 0-999%10\n").expect("valid");
        let spec = file.array.expect("an array").spec().expect("a spec");
        assert_eq!(spec.to_string(), "0-999%10");
        assert_eq!(spec.position(7), Some(7));
        let file = JobFile::from_yaml("command: x\narray: {start: 5, end: 1}\n").expect("parsed");
        let err = file.array.expect("an array").spec().unwrap_err();
        assert!(
            err.to_string().contains("ends (1) before it starts (5)"),
            "{err}"
        );
        for bad in ["", "a-b", "1-", "0-9:0", "0-2000000", "0-4294967295"] {
            assert!(crate::model::ArraySpec::parse(bad).is_err(), "{bad}");
        }
        let stepped = crate::model::ArraySpec::parse("1-100:2").expect("stepped");
        assert_eq!(
            (stepped.count(), stepped.position(3), stepped.position(4)),
            (50, Some(1), None)
        );
    }

    #[test]
    fn unknown_keys_are_named() {
        let err = JobFile::from_yaml("command: x\ninstance_cout: 2\n").unwrap_err();
        assert!(err.to_string().contains("instance_cout"), "{err}");
        let err = JobFile::from_yaml("command: x\nresources: {cores: 1}\n").unwrap_err();
        assert!(err.to_string().contains("cores"), "{err}");
    }

    #[test]
    fn malformed_yaml_is_an_error_not_a_panic() {
        for text in ["command: [unclosed", ": :", "- a\n- b", "command: {a: 1}"] {
            assert!(JobFile::from_yaml(text).is_err(), "{text}");
        }
    }
}
