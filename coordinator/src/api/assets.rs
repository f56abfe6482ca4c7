//! Datastores, data assets, environments and defaults: one implementation each,
//! behind the gRPC services here and the HTTP routes in `http`.

use std::collections::BTreeMap;

use shoal_proto::v1 as pb;
use tokio_stream::StreamExt;
use tonic::{Request, Response, Status};

use super::admit::{Upload, Uploads};
use super::{Api, convert};
use crate::admission::{DataRef, EnvDecl, EnvFile};
use crate::data::{DataAsset, DataKind, DataSource, Datastore};
use crate::model::{Environment, EnvironmentKind};
use crate::{Error, Result};

impl Api {
    pub async fn create_datastore(
        &self,
        name: &str,
        path: &str,
        description: &str,
    ) -> Result<Datastore> {
        let meta = tokio::fs::metadata(path).await.map_err(|e| {
            Error::invalid(
                "path",
                format!("`{path}` on the coordinator's machine: {e}"),
            )
        })?;
        if !meta.is_dir() {
            return Err(Error::invalid("path", format!("`{path}` is not a folder")));
        }
        self.control
            .create_datastore(Datastore {
                name: name.to_string(),
                path: path.to_string(),
                description: description.to_string(),
                created_at: 0,
            })
            .await
    }

    /// A data asset pointing at `path` (local: `upload` is its content).
    pub async fn create_data_asset(&self, request: pb::DataAssetRequest) -> Result<DataAsset> {
        let kind = match request.r#type.as_str() {
            "" => DataKind::UriFolder,
            kind => DataKind::parse("type", kind)?,
        };
        crate::data::validate_name("name", &request.name)?;
        let source = match DataRef::parse("path", &request.path)? {
            DataRef::Local(path) => {
                let upload = request.upload.ok_or_else(|| {
                    Error::invalid(
                        "path",
                        format!("`{path}` is a local path: `shoal data create` uploads it; over HTTP give a datastore path or a URL"),
                    )
                })?;
                if upload.folder == kind.is_file() {
                    return Err(Error::invalid(
                        "type",
                        format!(
                            "`{path}` is a {}; give --type {}",
                            if upload.folder { "folder" } else { "file" },
                            if upload.folder {
                                "uri_folder"
                            } else {
                                "uri_file"
                            }
                        ),
                    ));
                }
                let folder = upload.folder;
                DataSource::Stored {
                    path: self.artifacts.put_data(upload.data).await?,
                    folder,
                }
            }
            DataRef::Url(url) => {
                if !kind.is_file() {
                    return Err(Error::invalid(
                        "type",
                        "a URL names one file: --type uri_file",
                    ));
                }
                DataSource::Url { url }
            }
            DataRef::Datastore { datastore, path } => {
                let store = self.control.datastore(datastore).await?;
                let at = crate::data::datastore_path(&store.path, &path)?;
                if tokio::fs::metadata(&at).await.is_err() {
                    return Err(Error::invalid(
                        "path",
                        format!("`{}` does not exist (no {at})", request.path),
                    ));
                }
                DataSource::Host { path: at }
            }
            DataRef::Step { .. } => {
                return Err(Error::invalid(
                    "path",
                    "a data asset's path is data, not a pipeline step's output",
                ));
            }
            DataRef::Asset { .. } => {
                return Err(Error::invalid(
                    "path",
                    "a data asset points at data (a path, a datastore, a URL), not at another asset",
                ));
            }
        };
        self.control
            .create_data_asset(DataAsset {
                name: request.name,
                version: request.version,
                kind,
                source,
                uri: request.path,
                description: request.description,
                tags: request.tags.into_iter().collect(),
                created_at: 0,
            })
            .await
    }

    /// An environment file (and its build context): built if it needs building,
    /// each build line to `log`, then registered.
    pub async fn create_environment(
        &self,
        text: &str,
        files: Uploads,
        log: super::admit::BuildLog<'_>,
    ) -> Result<(Environment, Vec<String>)> {
        let file = EnvFile::from_yaml(text)?;
        let name = file
            .name
            .clone()
            .ok_or_else(|| Error::invalid("name", "an environment to register needs a name"))?;
        crate::data::validate_name("name", &name)?;
        let mut warnings = Vec::new();
        let decl = file.decl("environment", &mut warnings)?;
        let resolved = self
            .resolve_environment(&decl, &files, &mut warnings, log)
            .await?;
        let kind = match (&decl, resolved.image) {
            (EnvDecl::Host { prefix }, _) => EnvironmentKind::Host {
                prefix: prefix.clone(),
            },
            (_, Some(image)) => EnvironmentKind::Image { image },
            (_, None) => {
                return Err(Error::invalid("environment", "it defines no image"));
            }
        };
        let environment = self
            .control
            .create_environment(Environment {
                name,
                version: file.version.map(|v| v.to_string()).unwrap_or_default(),
                description: file.description.unwrap_or_default(),
                tags: file
                    .tags
                    .iter()
                    .map(|(k, v)| (k.clone(), v.to_string()))
                    .collect(),
                kind,
                defined_by: resolved.defined_by,
                archived: false,
                created_at: 0,
            })
            .await?;
        Ok((environment, warnings))
    }

    /// Sets defaults (`compute=NAME`); an empty value clears one.
    pub async fn set_defaults(
        &self,
        set: BTreeMap<String, String>,
    ) -> Result<BTreeMap<String, String>> {
        let changes = set
            .into_iter()
            .map(|(k, v)| (k.trim().to_string(), Some(v).filter(|v| !v.is_empty())))
            .collect();
        self.control.set_defaults(changes).await
    }
}

fn uploads(files: std::collections::HashMap<String, pb::LocalFile>) -> Uploads {
    files
        .into_iter()
        .map(|(path, file)| {
            (
                path,
                Upload {
                    data: file.data,
                    folder: file.folder,
                },
            )
        })
        .collect()
}

fn version(v: &str) -> Option<String> {
    Some(v.to_string()).filter(|v| !v.is_empty() && v != "latest")
}

#[tonic::async_trait]
impl pb::datastores_server::Datastores for Api {
    async fn create(
        &self,
        request: Request<pb::Datastore>,
    ) -> Result<Response<pb::Datastore>, Status> {
        let asked = request.into_inner();
        let made = self
            .create_datastore(&asked.name, &asked.path, &asked.description)
            .await?;
        Ok(Response::new(convert::datastore(&made)))
    }

    async fn get(&self, request: Request<pb::NameRef>) -> Result<Response<pb::Datastore>, Status> {
        let found = self.control.datastore(request.into_inner().name).await?;
        Ok(Response::new(convert::datastore(&found)))
    }

    async fn list(
        &self,
        _: Request<pb::ListRequest>,
    ) -> Result<Response<pb::DatastoreList>, Status> {
        let all = self.control.datastores().await?;
        Ok(Response::new(pb::DatastoreList {
            datastores: all.iter().map(convert::datastore).collect(),
        }))
    }
}

#[tonic::async_trait]
impl pb::data_assets_server::DataAssets for Api {
    async fn create(
        &self,
        request: Request<pb::DataAssetRequest>,
    ) -> Result<Response<pb::DataAsset>, Status> {
        let made = self.create_data_asset(request.into_inner()).await?;
        Ok(Response::new(convert::data_asset(&made)))
    }

    async fn get(&self, request: Request<pb::NameRef>) -> Result<Response<pb::DataAsset>, Status> {
        let asked = request.into_inner();
        let found = self
            .control
            .data_asset(asked.name, version(&asked.version))
            .await?;
        Ok(Response::new(convert::data_asset(&found)))
    }

    async fn list(
        &self,
        _: Request<pb::ListRequest>,
    ) -> Result<Response<pb::DataAssetList>, Status> {
        let all = self.control.data_assets().await?;
        Ok(Response::new(pb::DataAssetList {
            assets: all.iter().map(convert::data_asset).collect(),
        }))
    }
}

type ProgressStream =
    std::pin::Pin<Box<dyn futures::Stream<Item = Result<pb::EnvironmentProgress, Status>> + Send>>;

#[tonic::async_trait]
impl pb::environments_server::Environments for Api {
    type CreateStream = ProgressStream;

    async fn create(
        &self,
        request: Request<pb::EnvironmentRequest>,
    ) -> Result<Response<Self::CreateStream>, Status> {
        use pb::environment_progress::Item;
        let asked = request.into_inner();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let api = self.clone();
        tokio::spawn(async move {
            let lines = tx.clone();
            let mut log = move |line: String| {
                let _ = lines.send(Ok(pb::EnvironmentProgress {
                    item: Some(Item::Log(line)),
                }));
            };
            let made = api
                .create_environment(&asked.text, uploads(asked.files), &mut log)
                .await;
            let last = match made {
                Ok((environment, warnings)) => {
                    for warning in warnings {
                        log(format!("warning: {warning}"));
                    }
                    Ok(pb::EnvironmentProgress {
                        item: Some(Item::Environment(convert::environment(&environment))),
                    })
                }
                Err(e) => Err(Status::from(e)),
            };
            let _ = tx.send(last);
        });
        let stream = tokio_stream::wrappers::UnboundedReceiverStream::new(rx).map(|item| item);
        Ok(Response::new(Box::pin(stream)))
    }

    async fn get(
        &self,
        request: Request<pb::NameRef>,
    ) -> Result<Response<pb::Environment>, Status> {
        let asked = request.into_inner();
        let found = self
            .control
            .environment(asked.name, version(&asked.version))
            .await?;
        Ok(Response::new(convert::environment(&found)))
    }

    async fn list(
        &self,
        _: Request<pb::ListRequest>,
    ) -> Result<Response<pb::EnvironmentList>, Status> {
        let all = self.control.environments().await?;
        Ok(Response::new(pb::EnvironmentList {
            environments: all.iter().map(convert::environment).collect(),
        }))
    }

    async fn archive(
        &self,
        request: Request<pb::NameRef>,
    ) -> Result<Response<pb::Environment>, Status> {
        let asked = request.into_inner();
        let archived = self
            .control
            .archive_environment(asked.name, version(&asked.version))
            .await?;
        Ok(Response::new(convert::environment(&archived)))
    }
}

#[tonic::async_trait]
impl pb::settings_server::Settings for Api {
    async fn set_defaults(
        &self,
        request: Request<pb::DefaultsUpdate>,
    ) -> Result<Response<pb::Defaults>, Status> {
        let set = request.into_inner().set.into_iter().collect();
        let values = Api::set_defaults(self, set).await?;
        Ok(Response::new(pb::Defaults {
            values: values.into_iter().collect(),
        }))
    }

    async fn get_defaults(
        &self,
        _: Request<pb::ListRequest>,
    ) -> Result<Response<pb::Defaults>, Status> {
        let values = self.control.defaults().await?;
        Ok(Response::new(pb::Defaults {
            values: values.into_iter().collect(),
        }))
    }
}

impl Api {
    /// A component file and its code folder: checked as a pipeline step would use
    /// it, its code kept apart from any job's, then registered.
    pub async fn create_component(
        &self,
        text: &str,
        files: Uploads,
        version: Option<String>,
    ) -> Result<crate::model::Component> {
        let doc = crate::admission::jobfile::document(text)?;
        let file = crate::admission::pipeline::check_component(doc)?;
        crate::data::validate_name("name", &file.name)?;
        let code_path = match &file.code {
            None => None,
            Some(path) => {
                let upload = files.get(path).ok_or_else(|| {
                    Error::invalid(
                        "code",
                        format!("`{path}` is a local folder, not uploaded with the file: `shoal component create -f` uploads it"),
                    )
                })?;
                if !upload.folder {
                    return Err(Error::invalid("code", format!("`{path}` is not a folder")));
                }
                Some(self.artifacts.put_data(upload.data.clone()).await?)
            }
        };
        let made = self
            .control
            .create_component(crate::model::Component {
                name: file.name,
                version: version.or(file.version).unwrap_or_default(),
                display_name: file.display_name,
                description: file.description,
                definition: serde_json::Value::Object(file.definition),
                code_path: code_path.clone(),
                created_at: 0,
            })
            .await;
        if made.is_err()
            && let Some(path) = code_path
        {
            crate::artifacts::Artifacts::discard(&path).await;
        }
        made
    }

    /// A job file's registered components (a step's `component:`, a sweep's
    /// `trial:`, as `azureml:NAME:VERSION`) put in, each one's code among the uploads
    /// under `azureml:NAME:VERSION` (the key its inlined code names, as the CLI
    /// inlines them too).
    pub async fn inline_components(
        &self,
        doc: &mut serde_json::Value,
        files: &mut Uploads,
    ) -> Result<()> {
        use serde_json::Value;
        for (field, slot) in crate::admission::pipeline::component_slots(doc) {
            if let Value::String(reference) = slot.clone()
                && reference.starts_with("azureml:")
            {
                let (component, version) = crate::admission::pipeline::component_reference(
                    &reference,
                )
                .ok_or_else(|| {
                    Error::invalid(
                        &field,
                        format!("`{reference}` is not azureml:NAME:VERSION or azureml:NAME@latest"),
                    )
                })?;
                let found = self.control.component(component, version).await?;
                *slot = component_definition(&found);
            }
            let code = slot
                .as_object_mut()
                .and_then(crate::admission::pipeline::component_code_slot)
                .and_then(|c| c.as_str())
                .map(str::to_string);
            if let Some(key) = code.filter(|c| c.starts_with("azureml:"))
                && !files.contains_key(&key)
            {
                let (component, version) = crate::admission::pipeline::component_reference(&key)
                    .ok_or_else(|| {
                        Error::invalid(
                            format!("{field}.code"),
                            format!("`{key}` names no component"),
                        )
                    })?;
                let found = self.control.component(component, version).await?;
                let Some(path) = &found.code_path else {
                    return Err(Error::invalid(
                        format!("{field}.code"),
                        format!("component `{}` has no code", found.name),
                    ));
                };
                let data = crate::artifacts::Artifacts::read(path).await?;
                files.insert(key, Upload { data, folder: true });
            }
        }
        Ok(())
    }
}

/// A registered component's definition as a step inlines it: its code named by
/// `azureml:NAME:VERSION` (the coordinator's copy).
pub fn component_definition(component: &crate::model::Component) -> serde_json::Value {
    let mut definition = component.definition.clone();
    if component.code_path.is_some()
        && let Some(map) = definition.as_object_mut()
    {
        let key =
            serde_json::Value::String(format!("azureml:{}:{}", component.name, component.version));
        if map.get("type").and_then(|t| t.as_str()) == Some("parallel") {
            if let Some(task) = map.get_mut("task").and_then(|t| t.as_object_mut()) {
                task.insert("code".into(), key);
            }
        } else {
            map.insert("code".into(), key);
        }
    }
    definition
}

pub fn component_wire(c: &crate::model::Component) -> pb::Component {
    pb::Component {
        name: c.name.clone(),
        version: c.version.clone(),
        display_name: c.display_name.clone(),
        description: c.description.clone(),
        definition: component_definition(c).to_string(),
        has_code: c.code_path.is_some(),
        created_at_ms: c.created_at,
    }
}

#[tonic::async_trait]
impl pb::components_server::Components for Api {
    async fn create(
        &self,
        request: Request<pb::ComponentRequest>,
    ) -> Result<Response<pb::Component>, Status> {
        let asked = request.into_inner();
        let version = Some(asked.version).filter(|v| !v.is_empty());
        let made = self
            .create_component(&asked.text, uploads(asked.files), version)
            .await?;
        Ok(Response::new(component_wire(&made)))
    }

    async fn get(&self, request: Request<pb::NameRef>) -> Result<Response<pb::Component>, Status> {
        let asked = request.into_inner();
        let found = self
            .control
            .component(asked.name, version(&asked.version))
            .await?;
        Ok(Response::new(component_wire(&found)))
    }

    async fn list(
        &self,
        _: Request<pb::ListRequest>,
    ) -> Result<Response<pb::ComponentList>, Status> {
        let all = self.control.components().await?;
        Ok(Response::new(pb::ComponentList {
            components: all.iter().map(component_wire).collect(),
        }))
    }
}
