//! Admission's second half: a draft's references resolved against what this
//! coordinator holds — the compute (or the default one), the environment
//! (registered, built here from a context or a conda file, or the host's), data
//! (uploaded with the job, on a datastore, a registered asset, or a URL), and
//! where named outputs go — then submitted. `shoal job submit -f`, `shoal ml job
//! create` and `POST /api/v1/jobs` all come through `Api::create_job`.

use std::collections::BTreeMap;

use serde_json::Value;
use shoal_proto::v1 as pb;
use tracing::info;

use super::Api;
use crate::admission::{self, DataRef, Draft, EnvDecl, InputDecl};
use crate::data::{DataInput, DataKind, DataOutput, DataSource, InputMode};
use crate::model::{EnvironmentKind, Job, JobExtras};
use crate::{Error, Result};

/// A local path's content, uploaded with the job file that names it.
#[derive(Clone, Debug)]
pub struct Upload {
    pub data: Vec<u8>,
    pub folder: bool,
}

pub type Uploads = BTreeMap<String, Upload>;

/// An environment, resolved to what a node runs.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ResolvedEnv {
    pub image: Option<String>,
    pub path_prefix: Option<String>,
    /// How it was named (a registered one), for people.
    pub named: String,
    /// How it was defined, for people.
    pub defined_by: String,
}

/// A build's log lines go here (the CLI's stream, or nowhere).
pub type BuildLog<'a> = &'a mut (dyn FnMut(String) + Send);

fn uploaded<'a>(files: &'a Uploads, field: &str, path: &str) -> Result<&'a Upload> {
    files.get(path).ok_or_else(|| {
        Error::invalid(
            field,
            format!(
                "`{path}` is a local path, not uploaded with the job file: `shoal job submit -f` and the Python SDK upload it; over HTTP send it as a multipart part (`POST /api/v1/local-paths` lists what to send), or name a datastore (azureml://datastores/...), a data asset (azureml:NAME:VERSION) or a URL"
            ),
        )
    })
}

/// The last part of a path or URL: where a file input lands.
fn file_name_of(path: &str) -> String {
    let path = path.split(['?', '#']).next().unwrap_or(path);
    path.trim_end_matches('/')
        .rsplit('/')
        .next()
        .filter(|n| !n.is_empty() && *n != "." && *n != "..")
        .unwrap_or("data")
        .to_string()
}

fn sha256_hex(parts: &[&[u8]]) -> String {
    use sha2::{Digest, Sha256};
    let mut hasher = Sha256::new();
    for part in parts {
        hasher.update((part.len() as u64).to_le_bytes());
        hasher.update(part);
    }
    hex::encode(hasher.finalize())
}

/// What makes a pipeline step's run the same as another's, so that a completed
/// one may stand for it: what it runs (command, variables, environment, shares,
/// the code by content) and what it reads (uploaded data by content, other data by
/// where it is, another step's output by that step's own fingerprint), and what it
/// writes. The compute is left out: the same work gives the same outputs anywhere.
fn fingerprint(
    spec: &pb::JobSpec,
    extras: &JobExtras,
    sweep: Option<&crate::sweep::SweepSpec>,
    cut_from: Option<String>,
    files: &Uploads,
    steps: &BTreeMap<&str, &str>,
) -> String {
    let inputs: BTreeMap<&String, Value> = extras
        .inputs
        .iter()
        .map(|(name, input)| {
            let content = match &input.source {
                DataSource::Stored { .. } => files
                    .get(&input.uri)
                    .map(|u| sha256_hex(&[&u.data]))
                    .unwrap_or_default(),
                DataSource::Step { step, output } => {
                    format!(
                        "{}.{output}",
                        steps.get(step.as_str()).copied().unwrap_or_default()
                    )
                }
                _ => String::new(),
            };
            let described = serde_json::json!({
                "kind": input.kind.as_str(),
                "mode": format!("{:?}", input.mode),
                "uri": input.uri,
                "content": content,
            });
            (name, described)
        })
        .collect();
    let variables: BTreeMap<&String, &String> = spec.environment_variables.iter().collect();
    let described = serde_json::json!({
        "argv": spec.argv,
        "command": spec.command,
        "variables": variables,
        "instances": spec.instance_count,
        "timeout": spec.timeout_seconds,
        "code": sha256_hex(&[&spec.code]),
        "image": spec.image,
        "gpus": spec.gpus_per_instance,
        "distribution": format!("{:?}", spec.distribution),
        "cpus": spec.cpus,
        "memory": spec.memory_bytes,
        "inputs": inputs,
        "outputs": extras.outputs,
        "path_prefix": extras.path_prefix,
        "shm": extras.shm_size_bytes,
        "sweep": sweep.map(|s| format!("{s:?}")),
        "parallel": spec.parallel.as_ref().map(|p| {
            let settings = pb::Parallel {
                input: Vec::new(),
                ..p.clone()
            };
            format!("{settings:?} {}", sha256_hex(&[&p.input]))
        }),
        "cut_from": cut_from,
    });
    sha256_hex(&[described.to_string().as_bytes()])
}

/// Files as a folder's tar.gz: a build context of one Dockerfile (and files
/// beside it), or a parallel job's rows as its named output.
pub(super) fn context_of(files: &[(&str, &[u8])]) -> Result<Vec<u8>> {
    let bad = |e: std::io::Error| Error::Internal(format!("build context: {e}"));
    let mut builder = tar::Builder::new(flate2::write::GzEncoder::new(
        Vec::new(),
        flate2::Compression::fast(),
    ));
    for (name, data) in files {
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        builder.append_data(&mut header, name, *data).map_err(bad)?;
    }
    builder.into_inner().map_err(bad)?.finish().map_err(bad)
}

/// The Dockerfile that applies a conda file on `base`, with the tool `base` has.
pub fn conda_dockerfile(base: &str, tool: &str) -> String {
    let (copy, install) = match tool {
        "micromamba" | "mamba" | "conda" => (
            "COPY conda.yml /tmp/shoal-conda.yml",
            if tool == "micromamba" {
                "micromamba install -y -n base -f /tmp/shoal-conda.yml && micromamba clean -a -y"
                    .to_string()
            } else {
                format!("{tool} env update -n base -f /tmp/shoal-conda.yml && {tool} clean -a -y")
            },
        ),
        // pip or pip3: the conda file's pip section.
        pip => (
            "COPY requirements.txt /tmp/shoal-requirements.txt",
            format!("{pip} install --no-cache-dir -r /tmp/shoal-requirements.txt"),
        ),
    };
    format!("FROM {base}\n{copy}\nRUN {install}\n")
}

impl Api {
    /// A job file and the local files it names: drafted, resolved, submitted; the
    /// job and its warnings. A pipeline's steps are each resolved as a job would be.
    pub async fn create_job(
        &self,
        text: &str,
        sets: &[String],
        files: Uploads,
    ) -> std::result::Result<(Job, Vec<String>), tonic::Status> {
        let mut doc = admission::jobfile::document(text)?;
        let mut files = files;
        self.inline_components(&mut doc, &mut files).await?;
        let mut stored = Vec::new();
        let created = match admission::read(doc, sets)? {
            admission::Drafted::Job(mut draft) => {
                match self.resolve_job(&mut draft, &files, &mut stored).await {
                    Ok((spec, extras)) => {
                        let warnings = extras.warnings.clone();
                        // submit_with discards what it was given if refused.
                        let stored = std::mem::take(&mut stored);
                        self.submit_with(spec, extras, draft.sweep.clone(), stored)
                            .await
                            .map(|job| (job, warnings))
                    }
                    Err(e) => Err(e),
                }
            }
            admission::Drafted::Pipeline(pipeline) => {
                self.submit_pipeline(pipeline, &files, &mut stored).await
            }
        };
        match created {
            Ok((job, warnings)) => {
                info!(job = %job.id, warnings = warnings.len(), "job file admitted");
                Ok((job, warnings))
            }
            Err(e) => {
                for path in stored {
                    crate::artifacts::Artifacts::discard(&path).await;
                }
                Err(e)
            }
        }
    }

    /// A pipeline's steps resolved and kept (files in `stored`), and the pipeline
    /// submitted: steps run under the pipeline's experiment.
    async fn submit_pipeline(
        &self,
        pipeline: admission::pipeline::PipelineDraft,
        files: &Uploads,
        stored: &mut Vec<String>,
    ) -> std::result::Result<(Job, Vec<String>), tonic::Status> {
        let mut warnings = pipeline.warnings.clone();
        let mut steps: Vec<crate::model::StepRequest> = Vec::with_capacity(pipeline.steps.len());
        let mut experiment = pipeline.experiment_name.clone().unwrap_or_default();
        for step in pipeline.steps {
            let mut draft = step.draft;
            let in_step = |e: tonic::Status| {
                tonic::Status::new(e.code(), format!("step `{}`: {}", step.name, e.message()))
            };
            let (spec, mut extras) = self
                .resolve_job(&mut draft, files, stored)
                .await
                .map_err(in_step)?;
            if experiment.is_empty() {
                experiment = extras.experiment_name.clone();
            }
            // What resolving added (an environment's, a data mode's) is said with
            // the step's name, beside what drafting said (the same words once).
            warnings.extend(
                extras
                    .warnings
                    .drain(..)
                    .map(|w| format!("jobs.{}.{w}", step.name)),
            );
            // A parallel step that cuts another step's output.
            let cut_from = match draft.file.is_parallel() {
                true => {
                    let (name, _) = draft.file.parallel_input().map_err(tonic::Status::from)?;
                    match draft.inputs.get(name).map(|d| &d.path) {
                        Some(DataRef::Step { step, output }) => Some(crate::model::StepOutput {
                            step: step.clone(),
                            output: output.clone(),
                        }),
                        _ => None,
                    }
                }
                false => None,
            };
            let fingerprint = if step.deterministic {
                let read: BTreeMap<&str, &str> = steps
                    .iter()
                    .map(|s| (s.name.as_str(), s.fingerprint.as_str()))
                    .collect();
                let cut = cut_from.as_ref().map(|c| {
                    format!(
                        "{}.{}",
                        read.get(c.step.as_str()).copied().unwrap_or_default(),
                        c.output
                    )
                });
                fingerprint(&spec, &extras, draft.sweep.as_ref(), cut, files, &read)
            } else {
                String::new()
            };
            let mut request = self
                .request_of(spec, extras, stored)
                .await
                .map_err(in_step)?;
            request.sweep = draft.sweep.clone();
            steps.push(crate::model::StepRequest {
                name: step.name,
                request,
                after: step.after,
                fingerprint,
                cut_from,
            });
        }
        if experiment.is_empty() {
            experiment = "pipeline".into();
        }
        for step in &mut steps {
            step.request.extras.experiment_name = experiment.clone();
        }
        let cluster = match pipeline.compute.clone() {
            Some(name) => name,
            None => steps
                .first()
                .map(|s| s.request.cluster.clone())
                .unwrap_or_default(),
        };
        warnings.sort();
        warnings.dedup();
        let record = crate::model::JobRequest {
            name: pipeline.display_name.clone().unwrap_or_default(),
            cluster,
            extras: JobExtras {
                warnings: warnings.clone(),
                experiment_name: experiment,
                description: pipeline.description.clone().unwrap_or_default(),
                tags: pipeline.tags.clone(),
                properties: pipeline.properties.clone(),
                ..Default::default()
            },
            pipeline: Some(crate::model::PipelineRequest {
                steps,
                continue_on_step_failure: pipeline.continue_on_step_failure,
                force_rerun: pipeline.force_rerun,
                outputs: pipeline.outputs.clone(),
            }),
            ..Default::default()
        };
        let job = self.control.submit_job(record).await?;
        Ok((job, warnings))
    }

    /// One job's draft resolved: its environment (built here if it must be), its
    /// compute (or the default), code, data and outputs; files kept for it are
    /// pushed to `stored`.
    async fn resolve_job(
        &self,
        draft: &mut Draft,
        files: &Uploads,
        stored: &mut Vec<String>,
    ) -> std::result::Result<(pb::JobSpec, JobExtras), tonic::Status> {
        let mut log = |line: String| tracing::debug!(%line, "environment build");
        let env = self
            .resolve_environment(&draft.environment, files, &mut draft.warnings, &mut log)
            .await?;
        let cluster = match draft.compute.clone() {
            Some(name) => name,
            None => self.control.defaults().await?.remove("compute").ok_or_else(|| {
                Error::invalid(
                    "compute",
                    "the job names no compute and there is no default; add `compute: NAME`, or set one with `shoal configure --defaults compute=NAME`",
                )
            })?,
        };
        let code = match &draft.code {
            None => Vec::new(),
            Some(path) => {
                let upload = uploaded(files, "code", path)?;
                if !upload.folder {
                    return Err(Error::invalid("code", format!("`{path}` is not a folder")).into());
                }
                upload.data.clone()
            }
        };
        let (inputs, outputs, parallel) = self.resolve_io(draft, files, stored).await?;
        let file = &draft.file;
        let shm_size_bytes = match file.resources.as_ref().and_then(|r| r.shm_size.as_ref()) {
            None => None,
            Some(size) => {
                if env.image.is_none() {
                    draft.warnings.push(
                        "resources.shm_size: applies to container jobs; this one runs as a process"
                            .into(),
                    );
                }
                Some(shm_size(&size.to_string())?)
            }
        };
        let instance_count = match file.resources.as_ref().and_then(|r| r.instance_count) {
            Some(0) => {
                return Err(
                    Error::invalid("resources.instance_count", "must be at least 1").into(),
                );
            }
            Some(n) => n,
            None => 0,
        };
        let text_map = |m: &BTreeMap<String, admission::jobfile::Scalar>| {
            m.iter().map(|(k, v)| (k.clone(), v.to_string())).collect()
        };
        let spec = pb::JobSpec {
            name: file.job_name(),
            cluster,
            argv: file.argv.clone(),
            command: draft.command.clone().unwrap_or_default(),
            environment_variables: {
                let mut variables = file.env();
                if file.is_run_function() {
                    variables.insert(
                        admission::jobfile::RUN_FUNCTION_VARIABLE.into(),
                        admission::jobfile::RUN_FUNCTION_DRIVER.into(),
                    );
                    // A table's mini-batches reach run() as DataFrames.
                    if let Some(p) = parallel.as_ref().filter(|p| p.input_type == "tabular") {
                        variables.insert("SHOAL_RUN_FUNCTION_INPUT".into(), "tabular".into());
                        variables
                            .insert("SHOAL_RUN_FUNCTION_DELIMITER".into(), p.delimiter.clone());
                    }
                }
                variables.into_iter().collect()
            },
            instance_count,
            timeout_seconds: file.instance_timeout().unwrap_or(0),
            code,
            image: env.image.clone().unwrap_or_default(),
            max_preemptions: file.max_preemptions,
            gpus_per_instance: file
                .resources
                .as_ref()
                .and_then(|r| r.gpus_per_instance)
                .unwrap_or(0),
            distribution: file.distribution_wire(),
            parallel,
            array: file
                .array
                .as_ref()
                .map(|a| a.spec().map(|s| crate::api::convert::array_spec(&s)))
                .transpose()?,
            cpus: file.resources.as_ref().and_then(|r| r.cpus).unwrap_or(0.0),
            memory_bytes: match file.resources.as_ref().and_then(|r| r.memory.as_ref()) {
                None => 0,
                Some(size) => memory_size(&size.to_string())?,
            },
        };
        let extras = JobExtras {
            inputs,
            outputs,
            warnings: draft.warnings.clone(),
            experiment_name: file
                .experiment_name
                .clone()
                .filter(|e| !e.trim().is_empty())
                .or_else(|| file.code_dir().ok().flatten().and_then(|c| folder_name(&c)))
                .unwrap_or_default(),
            description: file.description.clone().unwrap_or_default(),
            tags: text_map(&file.tags),
            properties: text_map(&file.properties),
            environment: env.named.clone(),
            path_prefix: env.path_prefix.clone(),
            shm_size_bytes,
        };
        Ok((spec, extras))
    }

    /// Data inputs and named outputs resolved (uploaded ones kept, their paths in
    /// `stored`); a parallel job's input read and cut.
    #[allow(clippy::type_complexity)]
    async fn resolve_io(
        &self,
        draft: &mut Draft,
        files: &Uploads,
        stored: &mut Vec<String>,
    ) -> Result<(
        BTreeMap<String, DataInput>,
        BTreeMap<String, DataOutput>,
        Option<pb::Parallel>,
    )> {
        let mut parallel = None;
        let mut cut_input = None;
        if draft.file.is_parallel() {
            let (name, _) = draft.file.parallel_input()?;
            let name = name.to_string();
            let decl = draft.inputs.get(&name).cloned().ok_or_else(|| {
                Error::invalid(
                    format!("inputs.{name}"),
                    "a parallel job's input is data: {type: uri_file|uri_folder, path}",
                )
            })?;
            let input = self
                .resolve_input(&name, &decl, files, &mut draft.warnings, None)
                .await?;
            // run_function reads an MLTable, or a CSV file, as a table (DataFrames).
            let csv_delimiter = match input.uri.rsplit('.').next() {
                Some("csv") => Some(b','),
                Some("tsv") => Some(b'\t'),
                _ => None,
            };
            let (kind, delimiter) = match (input.kind, draft.file.is_run_function()) {
                (DataKind::Mltable, _) => ("tabular", None),
                (DataKind::UriFile, true) if csv_delimiter.is_some() => ("tabular", csv_delimiter),
                (DataKind::UriFile, _) => ("uri_file", None),
                _ => ("uri_folder", None),
            };
            let field = format!("inputs.{name}");
            let data = match &decl.path {
                // Uploaded with the job: cut as it came, not kept apart.
                DataRef::Local(path) => uploaded(files, &field, path)?.data.clone(),
                // A pipeline step's output: cut once the step has completed.
                DataRef::Step { .. } => Vec::new(),
                _ => self.read_whole(&field, &input).await?,
            };
            let deferred = matches!(decl.path, DataRef::Step { .. });
            let (data, delimiter) = match (kind, deferred, delimiter) {
                ("tabular", false, None) => {
                    let (table, delimiter) = tokio::task::spawn_blocking(move || {
                        crate::parallel::table_of_folder(&data)
                    })
                    .await
                    .map_err(|e| Error::Internal(format!("reading {field}: {e}")))??;
                    (table, delimiter)
                }
                (_, _, delimiter) => (data, delimiter.unwrap_or(b',')),
            };
            if kind != "tabular" && !draft.file.partition_keys()?.is_empty() {
                return Err(Error::invalid(
                    "partition_keys",
                    "partition_keys group a table's rows: the input is an mltable (or, for run_function, a .csv file)",
                ));
            }
            let mut wire = draft.file.parallel_wire(kind, data, &input.uri)?;
            wire.deferred = deferred;
            wire.delimiter = (delimiter as char).to_string();
            parallel = Some(wire);
            cut_input = Some(name);
        }
        let mut inputs = BTreeMap::new();
        let decls: Vec<(String, InputDecl)> = draft
            .inputs
            .iter()
            .filter(|(n, _)| Some(*n) != cut_input.as_ref())
            .map(|(n, d)| (n.clone(), d.clone()))
            .collect();
        for (name, decl) in decls {
            let input = self
                .resolve_input(&name, &decl, files, &mut draft.warnings, Some(stored))
                .await?;
            inputs.insert(name, input);
        }
        let mut outputs = BTreeMap::new();
        for (name, decl) in &draft.outputs {
            let (destination, uri) = match &decl.path {
                Some(DataRef::Datastore { datastore, path }) => {
                    let store = self.control.datastore(datastore.clone()).await?;
                    let at = crate::data::datastore_path(&store.path, path)?;
                    (
                        Some(at),
                        format!("azureml://datastores/{datastore}/paths/{path}"),
                    )
                }
                _ => (None, String::new()),
            };
            outputs.insert(
                name.clone(),
                DataOutput {
                    kind: decl.kind,
                    mode: decl.mode,
                    destination,
                    uri,
                },
            );
        }
        Ok((inputs, outputs, parallel))
    }

    /// Where one data input is: uploaded ones are kept now (their paths pushed to
    /// `stored`, when given).
    async fn resolve_input(
        &self,
        name: &str,
        decl: &InputDecl,
        files: &Uploads,
        warnings: &mut Vec<String>,
        stored: Option<&mut Vec<String>>,
    ) -> Result<DataInput> {
        let field = format!("inputs.{name}.path");
        let mut kind = decl.kind;
        let (source, uri) = match &decl.path {
            DataRef::Local(path) => {
                if decl.mode == InputMode::Direct {
                    return Err(Error::invalid(
                        &field,
                        "direct mode passes the data's URI; a local path has none (upload it: leave mode out)",
                    ));
                }
                let upload = uploaded(files, &field, path)?;
                if upload.folder == kind.is_file() {
                    return Err(Error::invalid(
                        &field,
                        if upload.folder {
                            format!("`{path}` is a folder; give `type: uri_folder`")
                        } else {
                            format!("`{path}` is a file; give `type: uri_file`")
                        },
                    ));
                }
                let kept = match stored {
                    Some(stored) => {
                        let kept = self.artifacts.put_input(upload.data.clone()).await?;
                        stored.push(kept.clone());
                        kept
                    }
                    // Read once, at admission (a parallel job's input): not kept.
                    None => String::new(),
                };
                let source = DataSource::Stored {
                    path: kept,
                    folder: upload.folder,
                };
                (source, path.clone())
            }
            DataRef::Url(url) => {
                if !kind.is_file() && decl.mode != InputMode::Direct {
                    return Err(Error::invalid(
                        &field,
                        format!(
                            "`{url}`: a folder cannot be listed over http(s); give `type: uri_file` for one file, or `mode: direct` to pass the URL"
                        ),
                    ));
                }
                (DataSource::Url { url: url.clone() }, url.clone())
            }
            DataRef::Datastore { datastore, path } => {
                let store = self.control.datastore(datastore.clone()).await?;
                let at = crate::data::datastore_path(&store.path, path)?;
                let uri = format!("azureml://datastores/{datastore}/paths/{path}");
                self.check_host_path(&field, &at, kind, &uri).await?;
                (DataSource::Host { path: at }, uri)
            }
            DataRef::Step { step, output } => {
                if decl.mode == InputMode::Direct {
                    return Err(Error::invalid(
                        &field,
                        "direct mode passes the data's URI; a step's output has none (leave mode out)",
                    ));
                }
                if kind.is_file() {
                    return Err(Error::invalid(
                        format!("inputs.{name}.type"),
                        "a step's output is read as a folder: give `type: uri_folder` (or leave type out)",
                    ));
                }
                (
                    DataSource::Step {
                        step: step.clone(),
                        output: output.clone(),
                    },
                    format!("${{{{parent.jobs.{step}.outputs.{output}}}}}"),
                )
            }
            DataRef::Asset {
                name: asset,
                version,
            } => {
                let found = self
                    .control
                    .data_asset(asset.clone(), version.clone())
                    .await?;
                if decl.kind_given && decl.kind.is_file() != found.kind.is_file() {
                    return Err(Error::invalid(
                        format!("inputs.{name}.type"),
                        format!(
                            "{} is data asset `{}:{}`'s type {}",
                            decl.kind.as_str(),
                            found.name,
                            found.version,
                            found.kind.as_str()
                        ),
                    ));
                }
                kind = if decl.kind_given {
                    decl.kind
                } else {
                    found.kind
                };
                if let DataSource::Host { path } = &found.source {
                    self.check_host_path(&field, path, kind, &found.uri).await?;
                }
                (
                    found.source.clone(),
                    format!("azureml:{}:{}", found.name, found.version),
                )
            }
        };
        if decl.mode == InputMode::RwMount {
            warnings.push(format!(
                "inputs.{name}.mode: rw_mount gives the job its own copy; what it writes there is not kept (write to an output)"
            ));
        }
        let file_name = match &source {
            DataSource::Url { url } => file_name_of(url),
            DataSource::Host { path } => file_name_of(path),
            DataSource::Stored { .. } => file_name_of(&uri),
            DataSource::Step { output, .. } | DataSource::Output { output, .. } => output.clone(),
        };
        Ok(DataInput {
            kind,
            mode: decl.mode,
            source,
            uri,
            file_name,
        })
    }

    /// A datastore path must be there, a file or a folder as its type says.
    async fn check_host_path(
        &self,
        field: &str,
        path: &str,
        kind: DataKind,
        uri: &str,
    ) -> Result<()> {
        let meta = tokio::fs::metadata(path)
            .await
            .map_err(|_| Error::invalid(field, format!("`{uri}` does not exist (no {path})")))?;
        if kind.is_file() && !meta.is_file() {
            return Err(Error::invalid(
                field,
                format!("`{uri}` is a folder; give `type: uri_folder`"),
            ));
        }
        if !kind.is_file() && !meta.is_dir() {
            return Err(Error::invalid(
                field,
                format!("`{uri}` is a file; give `type: uri_file`"),
            ));
        }
        Ok(())
    }

    /// A whole input, as bytes (a file's, or a folder's tar.gz): what the node
    /// fetches, and what a parallel job cuts.
    pub async fn read_whole(&self, field: &str, input: &DataInput) -> Result<Vec<u8>> {
        match &input.source {
            DataSource::Stored { path, .. } if path.is_empty() => {
                Err(Error::Internal(format!("{field}: nothing kept")))
            }
            DataSource::Stored { path, .. } => crate::artifacts::Artifacts::read(path).await,
            DataSource::Host { path } => {
                let path = std::path::PathBuf::from(path);
                tokio::task::spawn_blocking(move || crate::artifacts::pack_path(&path))
                    .await
                    .map_err(|e| Error::Internal(format!("reading {field}: {e}")))?
            }
            DataSource::Output { job, output } => self.step_output(job, output).await,
            DataSource::Step { step, .. } => Err(Error::Internal(format!(
                "{field}: step `{step}` has not been made a job yet"
            ))),
            DataSource::Url { url } => Err(Error::invalid(
                field,
                format!(
                    "`{url}` is fetched by the node; a parallel job's input is uploaded, on a datastore or a data asset"
                ),
            )),
        }
    }

    /// What a job wrote to a named output, as a folder's tar.gz: its last attempt
    /// that wrote it (several instances' folders laid one over the other, in order).
    pub(super) async fn step_output(&self, job: &str, output: &str) -> Result<Vec<u8>> {
        let mut producer = self.job(job).await?;
        // A sweep's outputs are its best trial's.
        if let Some(best) = producer
            .sweep
            .as_deref()
            .and_then(|s| s.best.and_then(|b| s.trials.get(b as usize)))
        {
            producer = self.job(&crate::control::job_id(best.seq)).await?;
        }
        if let Some((name, archive)) = self.rows_output(&producer).await?
            && name == output
        {
            return Ok(archive);
        }
        for attempt in producer.attempts.iter().rev() {
            let mut found = self
                .artifacts
                .named(&attempt.id, attempt.instances.len() as u32, output)
                .await?;
            match found.len() {
                0 => continue,
                1 => return Ok(found.remove(0).1),
                _ => {
                    return tokio::task::spawn_blocking(move || {
                        let dir = tempfile::tempdir()
                            .map_err(|e| Error::Internal(format!("a folder to merge in: {e}")))?;
                        for (_, data) in &found {
                            crate::artifacts::unpack_into(data, dir.path())?;
                        }
                        crate::artifacts::pack_path(dir.path())
                    })
                    .await
                    .map_err(|e| Error::Internal(format!("merging outputs: {e}")))?;
                }
            }
        }
        Err(Error::FailedPrecondition(format!(
            "{job} wrote nothing to its output `{output}`"
        )))
    }

    /// A parallel job's rows as the named output they are in (run_function's
    /// `append_row_to: ${{outputs.NAME}}/FILE`): that output, a folder of the one file.
    pub(super) async fn rows_output(&self, job: &Job) -> Result<Option<(String, Vec<u8>)>> {
        let Some(parallel) = job.spec.parallel.as_deref() else {
            return Ok(None);
        };
        let (Some(output), Some(file)) = (&parallel.rows_output, &parallel.append_row_to) else {
            return Ok(None);
        };
        let rows = self.reader.rows(&job.id).await?;
        let archive = context_of(&[(file.as_str(), rows.as_slice())])?;
        Ok(Some((output.clone(), archive)))
    }

    /// What an environment declaration runs as: builds (a context, or a conda
    /// file on an image) happen here, on this machine's engine, cached by content.
    pub async fn resolve_environment(
        &self,
        decl: &EnvDecl,
        files: &Uploads,
        warnings: &mut Vec<String>,
        log: BuildLog<'_>,
    ) -> Result<ResolvedEnv> {
        match decl {
            EnvDecl::None => Ok(ResolvedEnv::default()),
            EnvDecl::Host { prefix } => Ok(ResolvedEnv {
                path_prefix: prefix.clone(),
                defined_by: match prefix {
                    Some(p) => format!("host (prefix {p})"),
                    None => "host".into(),
                },
                ..Default::default()
            }),
            EnvDecl::Image { image, conda: None } => Ok(ResolvedEnv {
                image: Some(image.clone()),
                defined_by: format!("image {image}"),
                ..Default::default()
            }),
            EnvDecl::Image {
                image,
                conda: Some(conda),
            } => {
                let tag = self.build_conda(image, conda, warnings, log).await?;
                Ok(ResolvedEnv {
                    image: Some(tag),
                    defined_by: format!("conda file on image {image}"),
                    ..Default::default()
                })
            }
            EnvDecl::Build {
                context,
                dockerfile,
                conda,
            } => {
                if conda.is_some() {
                    return Err(Error::invalid(
                        "environment.conda_file",
                        "a conda file goes with `image`; put its steps in the build context's Dockerfile",
                    ));
                }
                let upload = uploaded(files, "environment.build.path", context)?;
                if !upload.folder {
                    return Err(Error::invalid(
                        "environment.build.path",
                        format!("`{context}` is not a folder"),
                    ));
                }
                let hash = sha256_hex(&[&upload.data, dockerfile.as_bytes()]);
                let tag = format!("shoal-env:{}", &hash[..16]);
                self.build_once(upload.data.clone(), dockerfile, &tag, log)
                    .await?;
                Ok(ResolvedEnv {
                    image: Some(tag),
                    defined_by: format!("build context {context}"),
                    ..Default::default()
                })
            }
            EnvDecl::Registered { name, version } => {
                let found = self
                    .control
                    .environment(name.clone(), version.clone())
                    .await?;
                let named = format!("azureml:{}:{}", found.name, found.version);
                Ok(match found.kind {
                    EnvironmentKind::Image { image } => ResolvedEnv {
                        image: Some(image),
                        named,
                        defined_by: found.defined_by,
                        path_prefix: None,
                    },
                    EnvironmentKind::Host { prefix } => ResolvedEnv {
                        image: None,
                        named,
                        defined_by: found.defined_by,
                        path_prefix: prefix,
                    },
                })
            }
        }
    }

    async fn build_once(
        &self,
        context: Vec<u8>,
        dockerfile: &str,
        tag: &str,
        log: BuildLog<'_>,
    ) -> Result<()> {
        let exists = crate::provider::docker::image_exists(tag)
            .await
            .map_err(|why| Error::invalid("environment", format!("cannot build here: {why}")))?;
        if exists {
            log(format!("{tag} is built already"));
            return Ok(());
        }
        crate::provider::docker::build_image(context, dockerfile, tag, log)
            .await
            .map_err(|why| Error::invalid("environment.build", why))
    }

    /// `image` with a conda file applied, by conda, mamba or micromamba, or (its
    /// pip section) by pip; refused when the image has none of them.
    async fn build_conda(
        &self,
        image: &str,
        conda: &Value,
        warnings: &mut Vec<String>,
        log: BuildLog<'_>,
    ) -> Result<String> {
        let mut tool = None;
        for candidate in ["micromamba", "mamba", "conda", "pip", "pip3"] {
            match crate::provider::docker::image_lacks(image, candidate).await {
                Ok(None) => {
                    tool = Some(candidate);
                    break;
                }
                Ok(Some(_)) => {}
                Err(why) => {
                    return Err(Error::invalid(
                        "environment.conda_file",
                        format!("cannot look inside `{image}`: {why}"),
                    ));
                }
            }
        }
        let Some(tool) = tool else {
            return Err(Error::invalid(
                "environment.conda_file",
                format!(
                    "image `{image}` has no conda, mamba, micromamba or pip, so a conda file cannot be applied to it; start from an image with one (or drop conda_file)"
                ),
            ));
        };
        let conda_yaml =
            serde_json::to_string_pretty(conda).map_err(|e| Error::Internal(e.to_string()))?;
        let (pip, conda_only) = admission::environment::pip_section(conda);
        let requirements = pip.join("\n") + "\n";
        if tool.starts_with("pip") && !conda_only.is_empty() {
            warnings.push(format!(
                "environment.conda_file: image `{image}` has pip but no conda: its pip section is installed, not its conda packages ({})",
                conda_only.join(", ")
            ));
        }
        let dockerfile = conda_dockerfile(image, tool);
        let context = context_of(&[
            ("Dockerfile", dockerfile.as_bytes()),
            ("conda.yml", conda_yaml.as_bytes()),
            ("requirements.txt", requirements.as_bytes()),
        ])?;
        let hash = sha256_hex(&[
            image.as_bytes(),
            dockerfile.as_bytes(),
            conda_yaml.as_bytes(),
        ]);
        let tag = format!("shoal-env:{}", &hash[..16]);
        self.build_once(context, "Dockerfile", &tag, log).await?;
        Ok(tag)
    }
}

/// `resources.shm_size`: `2g`, `512m`, `64k` or a number of bytes.
pub fn shm_size(text: &str) -> Result<u64> {
    size("resources.shm_size", text)
}

/// `resources.memory`: `4g`, `512m` or a number of bytes.
pub fn memory_size(text: &str) -> Result<u64> {
    size("resources.memory", text)
}

/// `2g`, `512m`, `64k` or a number of bytes, for the key `field`.
fn size(field: &str, text: &str) -> Result<u64> {
    let lower = text.trim().to_ascii_lowercase();
    let split = lower
        .find(|c: char| c.is_ascii_alphabetic())
        .unwrap_or(lower.len());
    let (number, unit) = lower.split_at(split);
    let scale: u64 = match unit.trim_end_matches('b') {
        "" => 1,
        "k" => 1 << 10,
        "m" => 1 << 20,
        "g" => 1 << 30,
        _ => {
            return Err(Error::invalid(
                field,
                format!("`{text}` is not a size like 2g or 512m"),
            ));
        }
    };
    let value: u64 = number
        .trim()
        .parse()
        .map_err(|_| Error::invalid(field, format!("`{text}` is not a size like 2g or 512m")))?;
    value
        .checked_mul(scale)
        .filter(|b| *b > 0)
        .ok_or_else(|| Error::invalid(field, format!("`{text}` is out of range")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_file_names() {
        assert_eq!(shm_size("2g").expect("2g"), 2 << 30);
        assert_eq!(shm_size("512MB").expect("512m"), 512 << 20);
        assert!(shm_size("lots").is_err());
        assert_eq!(
            file_name_of("https://x.org/datasets/iris.csv?sv=1"),
            "iris.csv"
        );
        assert_eq!(file_name_of("./data/"), "data");
        assert_eq!(file_name_of("/"), "data");
    }

    #[test]
    fn a_conda_file_is_applied_with_the_tool_the_image_has() {
        let pip = conda_dockerfile("python:3.11", "pip");
        assert!(pip.starts_with("FROM python:3.11\n"));
        assert!(pip.contains("pip install --no-cache-dir -r /tmp/shoal-requirements.txt"));
        let conda = conda_dockerfile("mambaorg/micromamba", "micromamba");
        assert!(conda.contains("micromamba install -y -n base -f /tmp/shoal-conda.yml"));
        assert!(conda_dockerfile("x", "pip3").contains("RUN pip3 install"));
        assert!(conda_dockerfile("x", "conda").contains("RUN conda env update -n base"));
    }
}

/// A code folder's own name (the default experiment, as the service has it):
/// `./src/train/` is `train`; `.`, `..` and references have none here.
fn folder_name(code: &str) -> Option<String> {
    if code.contains(':') {
        return None;
    }
    let name = code.trim_end_matches('/').rsplit('/').next()?;
    (!name.is_empty() && name != "." && name != "..").then(|| name.to_string())
}

#[cfg(test)]
mod experiment_tests {
    #[test]
    fn the_default_experiment_is_the_code_folders_name() {
        assert_eq!(super::folder_name("./src/train/").as_deref(), Some("train"));
        assert_eq!(super::folder_name("src").as_deref(), Some("src"));
        assert_eq!(super::folder_name("."), None);
        assert_eq!(super::folder_name("azureml:code:1"), None);
    }
}
