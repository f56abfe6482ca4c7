//! The submitting machine's half of admission. A job or environment file names
//! local paths (the code, data inputs, a build context, a conda file, `file:` an
//! environment file); only this machine can read them, so they are read here and
//! sent with the file. Everything else — what the keys mean, what is refused —
//! is the coordinator's, through the one shared `admission` module.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, anyhow, bail};
use serde_json::Value;
use shoal_coordinator::admission;
use shoal_proto::v1 as pb;

/// Data folders and build contexts above this are refused here, before the upload.
const MAX_FOLDER_BYTES: u64 = 200 << 20;

/// A YAML file (`what`: "job file", "environment file", ...) as a document, and
/// the folder its relative paths start from.
pub fn read_document(path: &Path, what: &str) -> anyhow::Result<(Value, PathBuf)> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read {what} {}", path.display()))?;
    let doc =
        admission::jobfile::document(&text).map_err(|e| anyhow!("{e} (in {})", path.display()))?;
    let base = path.parent().map(Path::to_path_buf).unwrap_or_default();
    Ok((doc, base))
}

/// An absolute path for `path` written relative to `base`.
fn absolute(base: &Path, path: &str) -> anyhow::Result<String> {
    let full = base.join(path);
    let full = std::fs::canonicalize(&full)
        .with_context(|| format!("{} does not exist", full.display()))?;
    Ok(full.display().to_string())
}

/// An environment definition's local parts, in place: a `conda_file` path becomes
/// the file's content, a build context's path becomes absolute.
pub fn inline_definition(env: &mut Value, dir: &Path, field: &str) -> anyhow::Result<()> {
    let Value::Object(map) = env else {
        return Ok(());
    };
    if let Some(Value::String(path)) = map.get("conda_file").cloned() {
        let (conda, _) = read_document(&dir.join(&path), "conda file")
            .with_context(|| format!("{field}.conda_file `{path}`"))?;
        map.insert("conda_file".into(), conda);
    }
    if let Some(Value::Object(build)) = map.get_mut("build")
        && let Some(Value::String(path)) = build.get("path").cloned()
    {
        let full = absolute(dir, &path).with_context(|| format!("{field}.build.path"))?;
        build.insert("path".into(), Value::String(full));
    }
    Ok(())
}

/// A job file's environment (and a parallel job's `task.environment`): `file:`
/// references read, definitions inlined.
pub fn inline_environments(doc: &mut Value, base: &Path) -> anyhow::Result<()> {
    inline_one(doc.get_mut("environment"), base, "environment")?;
    let task = doc.get_mut("task").and_then(|t| t.get_mut("environment"));
    inline_one(task, base, "task.environment")?;
    // A pipeline's steps.
    if let Some(Value::Object(steps)) = doc.get_mut("jobs") {
        for (name, step) in steps.iter_mut() {
            inline_one(
                step.get_mut("environment"),
                base,
                &format!("jobs.{name}.environment"),
            )?;
        }
    }
    Ok(())
}

/// Component files (`component: ./train.yml`, `file:./train.yml`, a sweep's
/// `trial: ./train.yml`), read in place: the component's code folder made absolute
/// and its environment inlined, each relative to the component file's own folder.
pub fn inline_components(doc: &mut Value, base: &Path) -> anyhow::Result<()> {
    for (field, slot) in admission::pipeline::component_slots(doc) {
        let Value::String(reference) = slot.clone() else {
            continue;
        };
        if reference.starts_with("azureml:") {
            continue; // registered: `inline_registered_components`
        }
        let path = reference.trim().trim_start_matches("file:");
        let (mut component, dir) = read_document(&base.join(path), "component file")
            .with_context(|| format!("{field} `{reference}`"))?;
        if let Some(code) = component
            .as_object_mut()
            .and_then(admission::pipeline::component_code_slot)
        {
            let written = match &*code {
                Value::String(code) => Some(code.clone()),
                Value::Object(map) => map
                    .get("local_path")
                    .and_then(Value::as_str)
                    .map(str::to_string),
                _ => None,
            };
            if let Some(written) = written.filter(|c| !c.contains(':')) {
                let full = absolute(&dir, &written).with_context(|| format!("{field}: code"))?;
                *code = Value::String(full);
            }
        }
        inline_component_environment(&mut component, &dir)
            .with_context(|| format!("{field} `{reference}`"))?;
        *slot = component;
    }
    Ok(())
}

/// A component file's environment (`file:` reference, conda file), inlined.
pub fn inline_component_environment(doc: &mut Value, base: &Path) -> anyhow::Result<()> {
    inline_one(doc.get_mut("environment"), base, "environment")?;
    let task = doc.get_mut("task").and_then(|t| t.get_mut("environment"));
    inline_one(task, base, "task.environment")
}

/// A pipeline's registered components (`component: azureml:NAME:VERSION`) put in
/// from the coordinator, so the file is checked here whole; their code stays the
/// coordinator's (named `azureml:NAME:VERSION`, never read from this machine).
pub async fn inline_registered_components(
    doc: &mut Value,
    client: &crate::client::Client,
) -> anyhow::Result<()> {
    for (field, slot) in admission::pipeline::component_slots(doc) {
        let Value::String(reference) = slot.clone() else {
            continue;
        };
        if !reference.starts_with("azureml:") {
            continue;
        }
        let Some((component, version)) = admission::pipeline::component_reference(&reference)
        else {
            continue; // the coordinator names what is wrong with it
        };
        let found = client
            .components()
            .get(pb::NameRef {
                name: component,
                version: version.unwrap_or_default(),
            })
            .await
            .map_err(|e| anyhow!("{field} `{reference}`: {}", e.message()))?
            .into_inner();
        *slot = serde_json::from_str(&found.definition)?;
    }
    Ok(())
}

fn inline_one(slot: Option<&mut Value>, base: &Path, field: &str) -> anyhow::Result<()> {
    let Some(env) = slot else {
        return Ok(());
    };
    match env {
        Value::String(reference) if reference.trim().starts_with("file:") => {
            let path = reference.trim()["file:".len()..].to_string();
            let (mut definition, dir) = read_document(&base.join(&path), "environment file")
                .with_context(|| format!("{field}: `file:{path}`"))?;
            inline_definition(&mut definition, &dir, field)?;
            *env = definition;
        }
        Value::Object(_) => inline_definition(env, base, field)?,
        _ => {}
    }
    Ok(())
}

/// A folder as tar.gz, everything in it (data, build contexts).
fn pack_folder(dir: &Path) -> anyhow::Result<Vec<u8>> {
    let mut total = 0u64;
    for entry in ignore::WalkBuilder::new(dir)
        .standard_filters(false)
        .build()
    {
        let entry = entry.with_context(|| format!("cannot read {}", dir.display()))?;
        total += entry
            .metadata()
            .map(|m| if m.is_file() { m.len() } else { 0 })?;
        if total > MAX_FOLDER_BYTES {
            bail!(
                "{} holds over {} MiB: put it on a datastore (`shoal datastore create`) and name it as azureml://datastores/NAME/paths/PATH",
                dir.display(),
                MAX_FOLDER_BYTES >> 20
            );
        }
    }
    shoal_agent::archive::pack_path(dir).with_context(|| format!("cannot pack {}", dir.display()))
}

/// One local path's content: a file's bytes, or a folder packed (`code` honours
/// .gitignore/.amlignore/.shoalignore; data and build contexts go whole).
pub fn read_local(
    base: &Path,
    path: &str,
    folder: bool,
    is_code: bool,
) -> anyhow::Result<pb::LocalFile> {
    let full = base.join(path);
    if !full.exists() {
        bail!("`{path}` does not exist (no {})", full.display());
    }
    match (folder, full.is_dir()) {
        (true, true) if is_code => Ok(pb::LocalFile {
            data: super::job::snapshot(&full)?,
            folder: true,
        }),
        (true, true) => Ok(pb::LocalFile {
            data: pack_folder(&full)?,
            folder: true,
        }),
        (false, false) => Ok(pb::LocalFile {
            data: std::fs::read(&full)
                .with_context(|| format!("cannot read {}", full.display()))?,
            folder: false,
        }),
        (true, false) if is_code => bail!("`{path}` is a file, not a folder"),
        (true, false) => bail!("`{path}` is a file, not a folder: give `type: uri_file`"),
        (false, true) => bail!("`{path}` is a folder, not a file: give `type: uri_folder`"),
    }
}

/// Every local path a drafted job file names (`Drafted::local_paths`), read.
pub fn job_files(
    paths: &[admission::LocalPath],
    base: &Path,
) -> anyhow::Result<HashMap<String, pb::LocalFile>> {
    let mut files = HashMap::new();
    for local in paths.iter().cloned() {
        // A registered component's code is the coordinator's already.
        if files.contains_key(&local.path) || local.path.starts_with("azureml:") {
            continue;
        }
        // `code`, or a pipeline step's `jobs.NAME.code`.
        let is_code = local.field == "code" || local.field.ends_with(".code");
        let file = read_local(base, &local.path, local.folder, is_code)
            .map_err(|e| anyhow!("invalid {}: {e:#}", local.field))?;
        files.insert(local.path, file);
    }
    Ok(files)
}
