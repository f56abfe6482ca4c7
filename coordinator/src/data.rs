//! Data as jobs see it: datastores (folders the coordinator serves), data assets
//! (named, versioned pointers at data), and a job's data inputs and outputs once
//! admission has resolved where each one lives.

use serde::{Deserialize, Serialize};

use crate::model::Millis;
use crate::{Error, Result};

/// What a piece of data is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DataKind {
    UriFile,
    UriFolder,
    /// A folder with an `MLTable` file (read as a folder here).
    Mltable,
    /// An MLflow model folder.
    MlflowModel,
    /// A model folder or file of any kind.
    CustomModel,
}

impl DataKind {
    pub const NAMES: &str = "uri_file, uri_folder, mltable, mlflow_model, custom_model";

    pub fn parse(field: &str, text: &str) -> Result<Self> {
        Ok(match text {
            "uri_file" => DataKind::UriFile,
            "uri_folder" => DataKind::UriFolder,
            "mltable" => DataKind::Mltable,
            "mlflow_model" => DataKind::MlflowModel,
            "custom_model" => DataKind::CustomModel,
            other => {
                return Err(Error::invalid(
                    field,
                    format!(
                        "`{other}` is not a data type; the types are {}",
                        Self::NAMES
                    ),
                ));
            }
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            DataKind::UriFile => "uri_file",
            DataKind::UriFolder => "uri_folder",
            DataKind::Mltable => "mltable",
            DataKind::MlflowModel => "mlflow_model",
            DataKind::CustomModel => "custom_model",
        }
    }

    /// A single file (everything else is a folder).
    pub fn is_file(self) -> bool {
        self == DataKind::UriFile
    }
}

/// How an input reaches the job.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum InputMode {
    RoMount,
    RwMount,
    Download,
    /// The job gets the data's URI, not the data.
    Direct,
    EvalMount,
    EvalDownload,
}

impl InputMode {
    pub fn parse(field: &str, text: &str) -> Result<Self> {
        Ok(match text {
            "ro_mount" => InputMode::RoMount,
            "rw_mount" => InputMode::RwMount,
            "download" => InputMode::Download,
            "direct" => InputMode::Direct,
            "eval_mount" => InputMode::EvalMount,
            "eval_download" => InputMode::EvalDownload,
            other => {
                return Err(Error::invalid(
                    field,
                    format!(
                        "`{other}` is not an input mode; the modes are ro_mount, rw_mount, download, direct, eval_mount, eval_download"
                    ),
                ));
            }
        })
    }

    pub fn as_str(self) -> &'static str {
        match self {
            InputMode::RoMount => "ro_mount",
            InputMode::RwMount => "rw_mount",
            InputMode::Download => "download",
            InputMode::Direct => "direct",
            InputMode::EvalMount => "eval_mount",
            InputMode::EvalDownload => "eval_download",
        }
    }
}

/// How an output leaves the job.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutputMode {
    RwMount,
    Upload,
}

impl OutputMode {
    pub fn parse(field: &str, text: &str) -> Result<Self> {
        match text {
            "rw_mount" => Ok(OutputMode::RwMount),
            "upload" => Ok(OutputMode::Upload),
            other => Err(Error::invalid(
                field,
                format!("`{other}` is not an output mode; the modes are rw_mount and upload"),
            )),
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            OutputMode::RwMount => "rw_mount",
            OutputMode::Upload => "upload",
        }
    }
}

/// Where an input's data is, once resolved.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DataSource {
    /// Kept by the coordinator: a file, or a folder as tar.gz (uploaded with the job
    /// or with a data asset).
    Stored { path: String, folder: bool },
    /// A file or folder under a datastore's folder, on the coordinator's machine.
    Host { path: String },
    /// Fetched by the node (and cached there).
    Url { url: String },
    /// Another step's named output, in a pipeline's step not yet made.
    Step { step: String, output: String },
    /// A job's named output (a pipeline step's, read by a later step), as its
    /// last attempt wrote it.
    Output { job: String, output: String },
}

/// A job's data input, resolved.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataInput {
    pub kind: DataKind,
    pub mode: InputMode,
    pub source: DataSource,
    /// How the job file named it (`./iris.csv`, `azureml://datastores/…`), for
    /// people and for `direct` mode.
    pub uri: String,
    /// A file's name where it lands (`iris.csv`).
    pub file_name: String,
}

/// A job's named output.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataOutput {
    pub kind: DataKind,
    pub mode: OutputMode,
    /// A datastore folder (or file) it is also written to, on the coordinator's machine.
    #[serde(default)]
    pub destination: Option<String>,
    /// How the job file named the destination.
    #[serde(default)]
    pub uri: String,
}

/// A folder of the coordinator's machine that jobs read from and write to.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Datastore {
    pub name: String,
    /// An absolute folder on the coordinator's machine.
    pub path: String,
    #[serde(default)]
    pub description: String,
    pub created_at: Millis,
}

/// The datastores every coordinator has, in its data dir.
pub const BUILT_IN_DATASTORES: [&str; 2] = ["workspaceblobstore", "workspaceartifactstore"];

/// A named, versioned pointer at data.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct DataAsset {
    pub name: String,
    pub version: String,
    pub kind: DataKind,
    pub source: DataSource,
    /// How it was named at creation.
    pub uri: String,
    #[serde(default)]
    pub description: String,
    #[serde(default)]
    pub tags: std::collections::BTreeMap<String, String>,
    pub created_at: Millis,
}

/// 1 to 255 letters, digits, `-`, `_` and `.`, starting with a letter or digit.
pub fn validate_name(field: &str, name: &str) -> Result<()> {
    let fine = !name.is_empty()
        && name.len() <= 255
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if fine {
        Ok(())
    } else {
        Err(Error::invalid(
            field,
            format!(
                "`{name}`: 1 to 255 letters, digits, -, _ and ., starting with a letter or digit"
            ),
        ))
    }
}

/// A path under a datastore: relative, with no `..`, so it stays inside.
pub fn datastore_path(root: &str, path: &str) -> Result<String> {
    let relative = path.trim_matches('/');
    if relative.split('/').any(|part| part == "..") {
        return Err(Error::invalid(
            "path",
            format!("`{path}` leaves its datastore (`..`)"),
        ));
    }
    let root = root.trim_end_matches('/');
    Ok(if relative.is_empty() {
        root.to_string()
    } else {
        format!("{root}/{relative}")
    })
}

/// The next version of something versioned: one more than the highest number so far.
pub fn next_version<'a>(existing: impl Iterator<Item = &'a str>) -> String {
    let highest = existing
        .filter_map(|v| v.parse::<u64>().ok())
        .max()
        .unwrap_or(0);
    (highest + 1).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn datastore_paths_stay_inside_their_datastore() {
        assert_eq!(
            datastore_path("/data/ds", "/iris/iris.csv").expect("inside"),
            "/data/ds/iris/iris.csv"
        );
        assert_eq!(datastore_path("/data/ds/", "").expect("root"), "/data/ds");
        assert!(datastore_path("/data/ds", "a/../../etc").is_err());
    }

    #[test]
    fn versions_count_up_from_the_highest_number() {
        assert_eq!(next_version([].into_iter()), "1");
        assert_eq!(next_version(["1", "7", "beta"].into_iter()), "8");
    }
}
