//! Environments as job files and environment files name them: a reference
//! (`azureml:NAME@latest`, `azureml:NAME:VERSION`,
//! `azureml://registries/REG/environments/NAME/labels/latest` or `/versions/V`),
//! `host` (the node's own software), or a definition (`image`, a Docker `build`
//! context, a `conda_file` on an image), inline or in an environment file.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::Value;

use super::jobfile::Scalar;
use crate::{Error, Result};

/// An environment, as declared.
#[derive(Clone, Debug, PartialEq)]
pub enum EnvDecl {
    /// None given: a process on the node.
    None,
    /// The node's own software, with a venv or conda prefix first on PATH.
    Host { prefix: Option<String> },
    Image {
        image: String,
        /// A conda environment (the file's content) applied on top at build time.
        conda: Option<Value>,
    },
    /// A Docker build context (a local folder, uploaded) and its Dockerfile.
    Build {
        context: String,
        dockerfile: String,
        conda: Option<Value>,
    },
    /// Registered here (`shoal environment create`); None: the latest version.
    Registered {
        name: String,
        version: Option<String>,
    },
}

#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Build {
    pub path: String,
    #[serde(default)]
    pub dockerfile_path: Option<String>,
}

/// The environment YAML schema (`shoal environment create -f`, and inline ones).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EnvFile {
    #[serde(rename = "$schema", default)]
    pub schema: Option<String>,
    #[serde(default)]
    pub name: Option<String>,
    #[serde(default)]
    pub version: Option<Scalar>,
    #[serde(default)]
    pub description: Option<String>,
    #[serde(default)]
    pub tags: BTreeMap<String, Scalar>,
    #[serde(default)]
    pub image: Option<String>,
    /// The conda file: its content (an object), or (in a file the CLI reads) a path.
    #[serde(default)]
    pub conda_file: Option<Value>,
    #[serde(default)]
    pub build: Option<Build>,
    #[serde(default)]
    pub os_type: Option<String>,
    #[serde(default)]
    pub inference_config: Option<Value>,
    /// Shoal's own: `host: true`, or `host: {prefix: /opt/venv}`.
    #[serde(default)]
    pub host: Option<Value>,
}

impl EnvFile {
    pub fn from_yaml(text: &str) -> Result<Self> {
        serde_saphyr::from_str(text).map_err(|e| Error::invalid("environment file", e.to_string()))
    }

    /// What it defines; `field` names it in errors.
    pub fn decl(&self, field: &str, warnings: &mut Vec<String>) -> Result<EnvDecl> {
        match self.os_type.as_deref() {
            None | Some("linux") | Some("Linux") => {}
            Some(other) => {
                return Err(Error::invalid(
                    format!("{field}.os_type"),
                    format!("`{other}`: environments here are Linux"),
                ));
            }
        }
        if self.inference_config.is_some() {
            warnings.push(format!(
                "{field}.inference_config: there are no online deployments here; it has no effect"
            ));
        }
        let conda = match &self.conda_file {
            None | Some(Value::Null) => None,
            Some(Value::Object(map)) => Some(Value::Object(map.clone())),
            Some(Value::String(path)) => {
                return Err(Error::invalid(
                    format!("{field}.conda_file"),
                    format!(
                        "`{path}` is a file on the submitting machine: `shoal` reads it (shoal job submit -f, shoal environment create -f); over HTTP give its content"
                    ),
                ));
            }
            Some(other) => {
                return Err(Error::invalid(
                    format!("{field}.conda_file"),
                    format!("`{other}` is not a conda file"),
                ));
            }
        };
        let host = match &self.host {
            None | Some(Value::Null) | Some(Value::Bool(false)) => None,
            Some(Value::Bool(true)) => Some(None),
            Some(Value::Object(map)) => {
                let prefix = match map.get("prefix") {
                    None | Some(Value::Null) => None,
                    Some(Value::String(p)) if p.starts_with('/') => Some(p.clone()),
                    Some(other) => {
                        return Err(Error::invalid(
                            format!("{field}.host.prefix"),
                            format!("`{other}` is not an absolute folder (a venv or conda prefix)"),
                        ));
                    }
                };
                if let Some(key) = map.keys().find(|k| *k != "prefix") {
                    return Err(Error::invalid(
                        format!("{field}.host"),
                        format!("unknown key `{key}`; host takes a prefix"),
                    ));
                }
                Some(prefix)
            }
            Some(other) => {
                return Err(Error::invalid(
                    format!("{field}.host"),
                    format!("`{other}`: write `host: true` or `host: {{prefix: /opt/venv}}`"),
                ));
            }
        };
        match (&self.image, &self.build, host) {
            (Some(image), None, None) => {
                let image = image.trim();
                if image.is_empty() || image.chars().any(char::is_whitespace) {
                    return Err(Error::invalid(
                        format!("{field}.image"),
                        format!("`{image}` is not an image name"),
                    ));
                }
                Ok(EnvDecl::Image {
                    image: image.to_string(),
                    conda,
                })
            }
            (None, Some(build), None) => Ok(EnvDecl::Build {
                context: build.path.clone(),
                dockerfile: build
                    .dockerfile_path
                    .clone()
                    .unwrap_or_else(|| "Dockerfile".into()),
                conda,
            }),
            (None, None, Some(prefix)) => {
                if conda.is_some() {
                    return Err(Error::invalid(
                        format!("{field}.conda_file"),
                        "a host environment uses the node's own software; build an image for a conda file",
                    ));
                }
                Ok(EnvDecl::Host { prefix })
            }
            (None, None, None) => Err(Error::invalid(
                field,
                "give one of image, build (a Docker build context) or host",
            )),
            _ => Err(Error::invalid(
                field,
                "give only one of image, build and host",
            )),
        }
    }
}

impl EnvDecl {
    /// A job file's `environment` (a reference, or an inline definition).
    pub fn parse(field: &str, value: &Value, warnings: &mut Vec<String>) -> Result<Self> {
        match value {
            Value::String(text) => Self::reference(field, text),
            Value::Object(_) => {
                let file: EnvFile = serde_json::from_value(value.clone())
                    .map_err(|e| Error::invalid(field, e.to_string()))?;
                if file.name.is_some() || file.version.is_some() {
                    warnings.push(format!(
                        "{field}.name, {field}.version: an inline environment is not registered; `shoal environment create -f` registers one"
                    ));
                }
                file.decl(field, warnings)
            }
            other => Err(Error::invalid(
                field,
                format!("`{other}` is neither a reference nor a definition"),
            )),
        }
    }

    fn reference(field: &str, text: &str) -> Result<Self> {
        let text = text.trim();
        if text == "host" {
            return Ok(EnvDecl::Host { prefix: None });
        }
        if let Some(rest) = text.strip_prefix("azureml://registries/") {
            // REG/environments/NAME/labels/latest, or REG/environments/NAME/versions/V
            let parts: Vec<&str> = rest.split('/').collect();
            return match parts.as_slice() {
                [_, "environments", name, "labels", "latest"] => Ok(EnvDecl::Registered {
                    name: name.to_string(),
                    version: None,
                }),
                [_, "environments", name, "versions", version] => Ok(EnvDecl::Registered {
                    name: name.to_string(),
                    version: Some(version.to_string()),
                }),
                _ => Err(Error::invalid(
                    field,
                    format!(
                        "`{text}` is not azureml://registries/REG/environments/NAME/labels/latest (or /versions/V)"
                    ),
                )),
            };
        }
        if let Some(rest) = text.strip_prefix("azureml:") {
            let (name, version) = match (rest.split_once('@'), rest.split_once(':')) {
                (Some((name, "latest")), _) => (name, None),
                (Some((_, label)), _) => {
                    return Err(Error::invalid(
                        field,
                        format!("`@{label}`: the only label is @latest (or give :VERSION)"),
                    ));
                }
                (None, Some((name, version))) => (name, Some(version.to_string())),
                (None, None) => (rest, None),
            };
            crate::data::validate_name(field, name)?;
            return Ok(EnvDecl::Registered {
                name: name.to_string(),
                version,
            });
        }
        if text.starts_with("file:") {
            return Err(Error::invalid(
                field,
                format!(
                    "`{text}` is a file on the submitting machine: `shoal job submit -f` reads it; over HTTP give the environment inline"
                ),
            ));
        }
        Err(Error::invalid(
            field,
            format!(
                "`{text}` is not an environment reference; write `azureml:NAME@latest`, `azureml:NAME:VERSION`, `host`, or `{{image: {text}}}` for an image"
            ),
        ))
    }
}

/// The pip packages of a conda file (its `pip:` section), and whether it names
/// conda packages beside pip itself and python.
pub fn pip_section(conda: &Value) -> (Vec<String>, Vec<String>) {
    let mut pip = Vec::new();
    let mut conda_only = Vec::new();
    let deps = conda
        .get("dependencies")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default();
    for dep in deps {
        match dep {
            Value::String(name) => {
                let base = name.split(['=', '<', '>', ' ']).next().unwrap_or("");
                if base != "pip" && base != "python" {
                    conda_only.push(name);
                }
            }
            Value::Object(map) => {
                if let Some(Value::Array(list)) = map.get("pip") {
                    pip.extend(list.iter().filter_map(|v| v.as_str().map(str::to_string)));
                }
            }
            _ => {}
        }
    }
    (pip, conda_only)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(value: Value) -> Result<EnvDecl> {
        EnvDecl::parse("environment", &value, &mut Vec::new())
    }

    #[test]
    fn every_reference_form_is_read() {
        assert_eq!(
            parse(json!("azureml:AzureML-sklearn-1.5@latest")).expect("latest"),
            EnvDecl::Registered {
                name: "AzureML-sklearn-1.5".into(),
                version: None
            }
        );
        assert_eq!(
            parse(json!("azureml:my-env:3")).expect("version"),
            EnvDecl::Registered {
                name: "my-env".into(),
                version: Some("3".into())
            }
        );
        assert_eq!(
            parse(json!(
                "azureml://registries/azureml/environments/sklearn-1.5/labels/latest"
            ))
            .expect("registry"),
            EnvDecl::Registered {
                name: "sklearn-1.5".into(),
                version: None
            }
        );
        assert_eq!(
            parse(json!(
                "azureml://registries/azureml/environments/sklearn-1.5/versions/7"
            ))
            .expect("registry version"),
            EnvDecl::Registered {
                name: "sklearn-1.5".into(),
                version: Some("7".into())
            }
        );
        assert_eq!(
            parse(json!("host")).expect("host"),
            EnvDecl::Host { prefix: None }
        );
        assert!(
            parse(json!("python:3.10"))
                .unwrap_err()
                .to_string()
                .contains("{image: python:3.10}")
        );
        assert!(
            parse(json!("file:./env.yml")).is_err(),
            "files are the CLI's to read"
        );
    }

    #[test]
    fn definitions_are_one_of_image_build_or_host() {
        assert_eq!(
            parse(json!({"image": "shoal/base"})).expect("image"),
            EnvDecl::Image {
                image: "shoal/base".into(),
                conda: None
            }
        );
        assert_eq!(
            parse(json!({"build": {"path": "./ctx"}})).expect("build"),
            EnvDecl::Build {
                context: "./ctx".into(),
                dockerfile: "Dockerfile".into(),
                conda: None
            }
        );
        assert_eq!(
            parse(json!({"host": {"prefix": "/opt/venv"}})).expect("host"),
            EnvDecl::Host {
                prefix: Some("/opt/venv".into())
            }
        );
        assert!(parse(json!({"image": "a", "build": {"path": "."}})).is_err());
        assert!(parse(json!({"os_type": "windows", "image": "a"})).is_err());
        assert!(
            parse(json!({"imag": "a"}))
                .unwrap_err()
                .to_string()
                .contains("imag")
        );
    }

    #[test]
    fn the_pip_section_of_a_conda_file() {
        let conda = json!({"dependencies": ["python=3.10", "pip", "numpy=1.26", {"pip": ["scikit-learn==1.5", "mlflow"]}]});
        let (pip, conda_only) = pip_section(&conda);
        assert_eq!(pip, vec!["scikit-learn==1.5", "mlflow"]);
        assert_eq!(conda_only, vec!["numpy=1.26"]);
    }
}
