//! Admission: a job file (the managed service's YAML, or the same shape as JSON)
//! becomes a draft: every key read, every reference parsed (compute, environment,
//! data), `--set` applied, expressions checked, and a warning for each key that
//! cannot mean anything here. One function for every door (`shoal job submit`,
//! `shoal ml job create`, `POST /api/v1/jobs`): the API layer then resolves the
//! draft's references against what the coordinator holds (`api::admit`).

pub mod datafile;
pub mod environment;
pub mod expressions;
pub mod jobfile;
pub mod pipeline;
pub mod set;

use std::collections::{BTreeMap, BTreeSet};

use serde_json::Value;

use crate::data::{DataKind, InputMode, OutputMode};
use crate::{Error, Result};
pub use datafile::DataFile;
pub use environment::{EnvDecl, EnvFile};
pub use jobfile::JobFile;

/// Where a piece of data is, as a job file names it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DataRef {
    /// A path on the submitter's machine, uploaded with the job.
    Local(String),
    /// `http(s)://`: fetched by the node.
    Url(String),
    /// `azureml://datastores/NAME/paths/P`.
    Datastore { datastore: String, path: String },
    /// `azureml:NAME:VERSION`, `azureml:NAME@latest` (None: the latest).
    Asset {
        name: String,
        version: Option<String>,
    },
    /// `${{parent.jobs.STEP.outputs.NAME}}`: a pipeline step's output.
    Step { step: String, output: String },
}

impl DataRef {
    pub fn parse(field: &str, text: &str) -> Result<Self> {
        let text = text.trim();
        if text.is_empty() {
            return Err(Error::invalid(field, "the path is empty"));
        }
        if let Some((step, output)) = pipeline::step_binding(text) {
            return Ok(DataRef::Step { step, output });
        }
        if text.starts_with("http://") || text.starts_with("https://") {
            return Ok(DataRef::Url(text.to_string()));
        }
        if let Some(rest) = text.strip_prefix("azureml://") {
            // azureml://datastores/NAME/paths/P, or the long form with
            // subscriptions/…/workspaces/…/ before `datastores/`.
            let Some(at) = rest.find("datastores/") else {
                return Err(Error::invalid(
                    field,
                    format!(
                        "`{text}`: an azureml:// path names a datastore: azureml://datastores/NAME/paths/PATH"
                    ),
                ));
            };
            let rest = &rest[at + "datastores/".len()..];
            let (datastore, path) = match rest.split_once("/paths/") {
                Some((datastore, path)) => (datastore, path),
                None => (rest.trim_end_matches('/'), ""),
            };
            if datastore.is_empty() || datastore.contains('/') {
                return Err(Error::invalid(
                    field,
                    format!("`{text}` is not azureml://datastores/NAME/paths/PATH"),
                ));
            }
            return Ok(DataRef::Datastore {
                datastore: datastore.to_string(),
                path: path.to_string(),
            });
        }
        if let Some(asset) = text.strip_prefix("azureml:") {
            let (name, version) = match (asset.split_once('@'), asset.split_once(':')) {
                (Some((name, "latest")), _) => (name, None),
                (Some((_, label)), _) => {
                    return Err(Error::invalid(
                        field,
                        format!(
                            "`{text}`: `@{label}`: the only label is @latest (or give :VERSION)"
                        ),
                    ));
                }
                (None, Some((name, version))) => (name, Some(version.to_string())),
                (None, None) => (asset, None),
            };
            crate::data::validate_name(field, name)?;
            return Ok(DataRef::Asset {
                name: name.to_string(),
                version,
            });
        }
        if let Some((scheme, _)) = text.split_once("://") {
            return Err(Error::invalid(
                field,
                format!(
                    "`{scheme}://` paths cannot be read here; use a local path, http(s)://, azureml://datastores/NAME/paths/PATH or azureml:NAME:VERSION"
                ),
            ));
        }
        Ok(DataRef::Local(text.to_string()))
    }
}

/// A data input, as declared.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct InputDecl {
    pub kind: DataKind,
    /// `type` was written (a data asset's own type applies otherwise).
    pub kind_given: bool,
    pub mode: InputMode,
    pub path: DataRef,
}

/// A named output, as declared.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutputDecl {
    pub kind: DataKind,
    pub mode: OutputMode,
    /// A datastore it is also written to.
    pub path: Option<DataRef>,
}

/// A job file read and checked, its references not yet resolved.
#[derive(Debug)]
pub struct Draft {
    pub file: JobFile,
    /// Keys accepted that have no effect here, each with why.
    pub warnings: Vec<String>,
    pub literals: BTreeMap<String, String>,
    pub inputs: BTreeMap<String, InputDecl>,
    pub outputs: BTreeMap<String, OutputDecl>,
    pub environment: EnvDecl,
    /// The code folder, a local path.
    pub code: Option<String>,
    /// `compute`, without `azureml:`; None: the default compute.
    pub compute: Option<String>,
    /// The command with literals put in and optional parts settled; None for an
    /// argv job.
    pub command: Option<String>,
    /// A sweep: its search space, sampling, objective, limits and policy.
    pub sweep: Option<crate::sweep::SweepSpec>,
}

/// Names of inputs and outputs: letters, digits and `_`, starting with a letter or `_`.
fn check_io_name(field: &str, name: &str) -> Result<()> {
    let fine = name.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
        && name.len() <= 255;
    if fine {
        Ok(())
    } else {
        Err(Error::invalid(
            field,
            format!("`{name}` is not a name: letters, digits and _, starting with a letter"),
        ))
    }
}

fn literal(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Bool(b) => Some(b.to_string()),
        Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

fn text_field<'a>(
    map: &'a serde_json::Map<String, Value>,
    key: &str,
    field: &str,
) -> Result<Option<&'a str>> {
    match map.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.as_str())),
        Some(other) => Err(Error::invalid(field, format!("`{other}` is not text"))),
    }
}

fn parse_input(name: &str, value: &Value) -> Result<Option<InputDecl>> {
    let field = format!("inputs.{name}");
    let Value::Object(map) = value else {
        return Ok(None); // a literal
    };
    for key in map.keys() {
        if !matches!(
            key.as_str(),
            "type" | "path" | "mode" | "description" | "optional"
        ) {
            return Err(Error::invalid(
                &field,
                format!("unknown key `{key}`; an input has type, path, mode (and description)"),
            ));
        }
    }
    let written = text_field(map, "type", &format!("{field}.type"))?;
    let kind = match written {
        None => DataKind::UriFolder,
        Some(kind) => DataKind::parse(&format!("{field}.type"), kind)?,
    };
    let mode = match text_field(map, "mode", &format!("{field}.mode"))? {
        None => InputMode::RoMount,
        Some(mode) => InputMode::parse(&format!("{field}.mode"), mode)?,
    };
    let Some(path) = text_field(map, "path", &format!("{field}.path"))? else {
        return Err(Error::invalid(
            format!("{field}.path"),
            "a data input needs a path (a local path, http(s)://, azureml://datastores/… or azureml:NAME:VERSION)",
        ));
    };
    let path = DataRef::parse(&format!("{field}.path"), path)?;
    Ok(Some(InputDecl {
        kind,
        kind_given: written.is_some(),
        mode,
        path,
    }))
}

fn parse_output(
    name: &str,
    value: Option<&Value>,
    warnings: &mut Vec<String>,
) -> Result<OutputDecl> {
    let field = format!("outputs.{name}");
    let mut decl = OutputDecl {
        kind: DataKind::UriFolder,
        mode: OutputMode::RwMount,
        path: None,
    };
    let map = match value {
        None | Some(Value::Null) => return Ok(decl),
        Some(Value::Object(map)) => map,
        Some(other) => {
            return Err(Error::invalid(
                &field,
                format!("`{other}`: an output is `{{type, mode, path}}`, or nothing"),
            ));
        }
    };
    for key in map.keys() {
        match key.as_str() {
            "type" | "mode" | "path" | "description" => {}
            "name" | "version" => warnings.push(format!(
                "{field}.{key}: outputs are not registered as data assets here; register one with `shoal data create` from the downloaded output"
            )),
            other => {
                return Err(Error::invalid(
                    &field,
                    format!("unknown key `{other}`; an output has type, mode and path"),
                ));
            }
        }
    }
    if let Some(kind) = text_field(map, "type", &format!("{field}.type"))? {
        decl.kind = DataKind::parse(&format!("{field}.type"), kind)?;
        if decl.kind == DataKind::Mltable {
            return Err(Error::invalid(
                format!("{field}.type"),
                "an output is uri_folder, uri_file, mlflow_model or custom_model",
            ));
        }
    }
    if let Some(mode) = text_field(map, "mode", &format!("{field}.mode"))? {
        decl.mode = OutputMode::parse(&format!("{field}.mode"), mode)?;
    }
    if let Some(path) = text_field(map, "path", &format!("{field}.path"))? {
        let path = DataRef::parse(&format!("{field}.path"), path)?;
        if !matches!(path, DataRef::Datastore { .. }) {
            return Err(Error::invalid(
                format!("{field}.path"),
                "an output's path names a datastore: azureml://datastores/NAME/paths/PATH",
            ));
        }
        decl.path = Some(path);
    }
    Ok(decl)
}

/// Keys that have no effect here, each with why.
fn warnings_of(file: &JobFile) -> Vec<String> {
    let mut warnings = Vec::new();
    if file.identity.is_some() {
        warnings.push(
            "identity: jobs get tokens for their cluster's managed identity (IDENTITY_ENDPOINT); a job-level identity has no effect here".into(),
        );
    }
    if file.queue_settings.is_some() {
        warnings.push(
            "queue_settings: there are no job tiers here; jobs queue in order on their cluster"
                .into(),
        );
    }
    if file.error_threshold.is_some() && !file.is_run_function() {
        warnings.push(
            "error_threshold: counts the items run() gives no result for, so it applies to run_function tasks; a command task's failures are counted per mini-batch (mini_batch_error_threshold)".into(),
        );
    }
    if file.logging_level.is_some() {
        warnings.push(
            "logging_level: the entry script's output goes to the job's log as it is (`shoal job logs`)".into(),
        );
    }
    if file.services.is_some() {
        warnings.push(
            "services: interactive services (ssh, jupyter, tensorboard) are not offered; follow the job with `shoal job logs -f`".into(),
        );
    }
    if let Some(resources) = &file.resources {
        if resources.instance_type.is_some() {
            warnings.push(
                "resources.instance_type: the cluster's VM size decides; instance types are for Kubernetes computes".into(),
            );
        }
        if resources.docker_args.is_some() {
            warnings.push(
                "resources.docker_args: not passed to the engine (containers run unprivileged, with the node's limits)".into(),
            );
        }
        if resources.properties.is_some() {
            warnings.push("resources.properties: no compute properties apply here".into());
        }
    }
    warnings
}

/// A job file read: one job, or a pipeline of them (made once per submission,
/// so its size does not matter).
#[derive(Debug)]
#[allow(clippy::large_enum_variant)]
pub enum Drafted {
    Job(Draft),
    Pipeline(pipeline::PipelineDraft),
}

impl Drafted {
    /// The local paths it names, each to be uploaded with it.
    pub fn local_paths(&self) -> Vec<LocalPath> {
        match self {
            Drafted::Job(draft) => local_paths(draft),
            Drafted::Pipeline(p) => pipeline::local_paths(p),
        }
    }
}

/// Reads any job file (`type: pipeline` too), with `sets` applied first.
pub fn read(mut doc: Value, sets: &[String]) -> Result<Drafted> {
    set::apply(&mut doc, sets)?;
    if doc.get("type").and_then(Value::as_str) == Some("pipeline") {
        return pipeline::draft_pipeline(doc).map(Drafted::Pipeline);
    }
    draft_in(doc, false).map(Drafted::Job)
}

/// Reads a job file's document, with `sets` (`--set KEY=VALUE`) applied first.
pub fn draft(mut doc: Value, sets: &[String]) -> Result<Draft> {
    set::apply(&mut doc, sets)?;
    draft_in(doc, false)
}

/// A pipeline step's document, its bindings settled (it may read other steps).
fn draft_step(doc: Value) -> Result<Draft> {
    draft_in(doc, true)
}

fn draft_in(doc: Value, in_pipeline: bool) -> Result<Draft> {
    let file = JobFile::from_document(doc)?;
    file.check_supported()?;
    let mut warnings = warnings_of(&file);
    let mut literals = BTreeMap::new();
    let mut inputs = BTreeMap::new();
    for (name, value) in &file.inputs {
        check_io_name("inputs", name)?;
        match parse_input(name, value)? {
            Some(decl) => {
                if !in_pipeline && matches!(decl.path, DataRef::Step { .. }) {
                    return Err(Error::invalid(
                        format!("inputs.{name}.path"),
                        "${{parent.jobs.STEP.outputs.NAME}} reads a step's output: it is written only inside a pipeline's jobs",
                    ));
                }
                inputs.insert(name.clone(), decl);
            }
            None => {
                let text = literal(value).ok_or_else(|| {
                    Error::invalid(
                        format!("inputs.{name}"),
                        "an input is a literal (text, number, true/false) or {type, path, mode}",
                    )
                })?;
                literals.insert(name.clone(), text);
            }
        }
    }
    let mut outputs = BTreeMap::new();
    for (name, value) in &file.outputs {
        check_io_name("outputs", name)?;
        outputs.insert(
            name.clone(),
            parse_output(name, value.as_ref(), &mut warnings)?,
        );
    }
    if let Some(both) = inputs.keys().find(|n| outputs.contains_key(*n)) {
        return Err(Error::invalid(
            "outputs",
            format!("`{both}` is both an input and an output"),
        ));
    }
    let environment = match file.environment_value() {
        None => EnvDecl::None,
        Some(value) => EnvDecl::parse("environment", value, &mut warnings)?,
    };
    let code = file.code_dir()?;
    let sweep = if file.is_sweep() {
        Some(crate::sweep::SweepSpec::parse(
            &file.sweep_keys(),
            &mut warnings,
        )?)
    } else {
        None
    };
    let hyperparameters: BTreeSet<String> = sweep
        .iter()
        .flat_map(|s| s.search_space.keys().cloned())
        .collect();
    let compute = match file.compute.as_deref().map(str::trim) {
        None | Some("") => None,
        Some("local") => {
            return Err(Error::invalid(
                "compute",
                "`local` (the submitting machine) is not a compute here; name a cluster (`shoal cluster list`), or leave compute out for the default (`shoal configure --defaults compute=NAME`)",
            ));
        }
        Some(name) => Some(name.strip_prefix("azureml:").unwrap_or(name).to_string()),
    };
    let command = match file.command_line() {
        None => None,
        Some(line) => {
            let data: BTreeSet<String> = inputs.keys().cloned().collect();
            let names: BTreeSet<String> = outputs.keys().cloned().collect();
            let known = expressions::Known {
                literals: &literals,
                data: &data,
                outputs: &names,
                search_space: &hyperparameters,
            };
            Some(expressions::resolve(&line, &known)?)
        }
    };
    if sweep.is_some() && command.is_none() && file.argv.is_empty() {
        return Err(Error::invalid(
            "trial.command",
            "a sweep's trial needs a command: trial: {command: python train.py --lr ${{search_space.lr}}}",
        ));
    }
    if file.is_parallel() && !file.is_run_function() && !outputs.is_empty() {
        return Err(Error::invalid(
            "outputs",
            "a parallel job writes its rows with `output: {append_row_to: FILE}`",
        ));
    }
    if let Some((Some(output), _)) = file.rows_target()?
        && !outputs.contains_key(&output)
    {
        return Err(Error::invalid(
            "task.append_row_to",
            format!(
                "`${{{{outputs.{output}}}}}` names no output; declare it: outputs: {{{output}: {{type: uri_folder}}}}"
            ),
        ));
    }
    Ok(Draft {
        file,
        warnings,
        literals,
        inputs,
        outputs,
        environment,
        code,
        compute,
        command,
        sweep,
    })
}

/// A local path a job file names, to be uploaded with it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LocalPath {
    /// Where the file names it (`code`, `inputs.NAME.path`, `environment.build.path`).
    pub field: String,
    /// As written.
    pub path: String,
    pub folder: bool,
}

/// The local paths a job file names, each to be uploaded with it: the code, local
/// data inputs, an environment's build context.
pub fn local_paths(draft: &Draft) -> Vec<LocalPath> {
    let mut paths = Vec::new();
    if let Some(code) = &draft.code {
        paths.push(LocalPath {
            field: "code".into(),
            path: code.clone(),
            folder: true,
        });
    }
    for (name, decl) in &draft.inputs {
        if let DataRef::Local(path) = &decl.path {
            paths.push(LocalPath {
                field: format!("inputs.{name}.path"),
                path: path.clone(),
                folder: !decl.kind.is_file(),
            });
        }
    }
    if let EnvDecl::Build { context, .. } = &draft.environment {
        paths.push(LocalPath {
            field: "environment.build.path".into(),
            path: context.clone(),
            folder: true,
        });
    }
    paths
}

#[cfg(test)]
mod tests {
    use super::*;

    fn doc(text: &str) -> Value {
        jobfile::document(text).expect("yaml")
    }

    #[test]
    fn data_paths_are_read_as_the_service_writes_them() {
        let parse = |t: &str| DataRef::parse("inputs.x.path", t);
        assert_eq!(
            parse("./iris.csv").expect("local"),
            DataRef::Local("./iris.csv".into())
        );
        assert_eq!(
            parse("azureml://datastores/workspaceblobstore/paths/example-data/").expect("ds"),
            DataRef::Datastore {
                datastore: "workspaceblobstore".into(),
                path: "example-data/".into()
            }
        );
        assert_eq!(
            parse(
                "azureml://subscriptions/s/resourcegroups/g/workspaces/w/datastores/d/paths/a.csv"
            )
            .expect("long form"),
            DataRef::Datastore {
                datastore: "d".into(),
                path: "a.csv".into()
            }
        );
        assert_eq!(
            parse("azureml:cifar10:2").expect("asset"),
            DataRef::Asset {
                name: "cifar10".into(),
                version: Some("2".into())
            }
        );
        assert_eq!(
            parse("azureml:cifar10@latest").expect("latest"),
            DataRef::Asset {
                name: "cifar10".into(),
                version: None
            }
        );
        let err = parse("wasbs://data@acct.blob.core.windows.net/x").unwrap_err();
        assert!(
            err.to_string()
                .contains("`wasbs://` paths cannot be read here"),
            "{err}"
        );
        assert!(parse("azureml:x@stable").is_err());
    }

    #[test]
    fn a_draft_reads_literals_data_outputs_and_warns_about_what_means_nothing() {
        let draft = draft(
            doc("command: python train.py --lr ${{inputs.lr}} --data ${{inputs.iris}} --out ${{outputs.model}} [--seed ${{inputs.seed}}]\n\
                 inputs:\n  lr: 0.01\n  iris: {type: uri_file, path: ./iris.csv, mode: download}\n\
                 outputs:\n  model:\n\
                 compute: azureml:cpu\n\
                 resources: {instance_count: 1, instance_type: big}\n\
                 queue_settings: {job_tier: spot}\n\
                 services: {ssh: {type: ssh}}\n"),
            &["inputs.lr=0.1".into()],
        )
        .expect("accepted");
        assert_eq!(draft.literals["lr"], "0.1");
        assert_eq!(
            draft.command.as_deref(),
            Some("python train.py --lr 0.1 --data ${{inputs.iris}} --out ${{outputs.model}} ")
        );
        assert_eq!(draft.compute.as_deref(), Some("cpu"));
        assert_eq!(draft.inputs["iris"].mode, InputMode::Download);
        assert_eq!(draft.outputs["model"].kind, DataKind::UriFolder);
        assert_eq!(draft.warnings.len(), 3, "{:?}", draft.warnings);
        assert!(
            draft
                .warnings
                .iter()
                .any(|w| w.starts_with("resources.instance_type"))
        );
        assert_eq!(
            local_paths(&draft),
            vec![LocalPath {
                field: "inputs.iris.path".into(),
                path: "./iris.csv".into(),
                folder: false
            }]
        );
    }

    #[test]
    fn bad_job_files_are_refused_naming_the_key() {
        let refused = |text: &str| draft(doc(text), &[]).unwrap_err().to_string();
        assert!(refused("command: x\ninstance_cout: 2\n").contains("instance_cout"));
        assert!(
            refused("command: x\ninputs: {d: {type: table, path: a}}\n")
                .contains("not a data type")
        );
        assert!(
            refused("command: x\ninputs: {d: {path: a, mode: mount}}\n")
                .contains("not an input mode")
        );
        assert!(refused("command: x\ninputs: {d: {type: uri_file}}\n").contains("needs a path"));
        assert!(
            refused("command: x\ninputs: {d: {path: a, pth: b}}\n").contains("unknown key `pth`")
        );
        assert!(
            refused("command: x\noutputs: {o: {path: ./here}}\n").contains("names a datastore")
        );
        assert!(refused("command: echo ${{inputs.nope}}\n").contains("names no input"));
        assert!(refused("command: x\ncompute: local\n").contains("`local`"));
        assert!(refused("command: x\ninputs: {d: [1, 2]}\n").contains("literal"));
    }
}
