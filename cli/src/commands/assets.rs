//! `shoal datastore`, `shoal data`, `shoal environment`, `shoal configure`: what
//! job files name (`azureml://datastores/…`, `azureml:NAME:VERSION`,
//! `environment: azureml:NAME@latest`, no `compute:`), registered here.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, anyhow};
use serde_json::{Value, json};
use shoal_coordinator::admission::{DataFile, DataRef, EnvFile};
use shoal_coordinator::data::DataKind;
use shoal_proto::v1 as pb;
use tokio_stream::StreamExt;

use super::{key_value, local};
use crate::client::{Client, status};
use crate::output::{self, Format};

#[derive(clap::Subcommand)]
pub enum DatastoreCommand {
    /// Register a folder of the coordinator's machine as a datastore; jobs name
    /// what is in it as azureml://datastores/NAME/paths/PATH.
    #[command(after_help = "Examples:\n  \
        shoal datastore create --name shared --path /srv/datasets\n  \
        # a job input: {type: uri_folder, path: azureml://datastores/shared/paths/cifar10}\n\n\
        workspaceblobstore and workspaceartifactstore exist from the start, in the data dir.")]
    Create {
        #[arg(long, short = 'n')]
        name: String,
        /// A folder on the coordinator's machine (nodes read it there).
        #[arg(long, short = 'p')]
        path: String,
        #[arg(long)]
        description: Option<String>,
    },
    /// List datastores.
    List,
    /// Show one datastore.
    Show(Named),
}

#[derive(clap::Args, Clone)]
pub struct Named {
    #[arg(required_unless_present = "name_flag")]
    pub name: Option<String>,
    #[arg(long = "name", short = 'n', hide = true)]
    pub name_flag: Option<String>,
    /// A version [default: the latest].
    #[arg(long, short = 'v')]
    pub version: Option<String>,
}

impl Named {
    fn name_ref(self) -> pb::NameRef {
        pb::NameRef {
            name: self.name.or(self.name_flag).unwrap_or_default(),
            version: self.version.unwrap_or_default(),
        }
    }
}

#[derive(clap::Subcommand)]
pub enum DataCommand {
    /// Register a data asset: a local file or folder (uploaded now), a datastore
    /// path, or a URL. Jobs name it as azureml:NAME:VERSION or azureml:NAME@latest.
    #[command(after_help = "Examples:\n  \
        shoal data create --name iris --type uri_file --path ./iris.csv\n  \
        shoal data create --name cifar10 --version 2 --path azureml://datastores/shared/paths/cifar10\n  \
        shoal data create -f data.yml        # $schema, name, version, type, path, description, tags")]
    Create(DataCreateArgs),
    /// List data assets, every version.
    List,
    /// Show a data asset (the latest version unless --version).
    Show(Named),
}

#[derive(clap::Args, Default)]
pub struct DataCreateArgs {
    /// A data file (the managed service's data YAML); flags override it.
    #[arg(long, short = 'f')]
    pub file: Option<PathBuf>,
    #[arg(long, short = 'n')]
    pub name: Option<String>,
    /// [default: one more than the highest]
    #[arg(long, short = 'v')]
    pub version: Option<String>,
    /// uri_file, uri_folder, mltable, mlflow_model, custom_model [default: uri_folder].
    #[arg(long, short = 't', value_name = "TYPE")]
    pub r#type: Option<String>,
    /// A local path, azureml://datastores/NAME/paths/PATH, or http(s)://.
    #[arg(long, short = 'p')]
    pub path: Option<String>,
    #[arg(long)]
    pub description: Option<String>,
}

#[derive(clap::Subcommand)]
pub enum ComponentCommand {
    /// Register a command component (the commandComponent schema): its code folder
    /// is uploaded now; pipeline steps name it as azureml:NAME:VERSION or
    /// azureml:NAME@latest.
    #[command(after_help = "Examples:\n  \
        shoal component create -f train.yml                # version: the file's, else the next\n  \
        shoal component create -f train.yml --version 2\n  \
        shoal component show train_model                   # the latest; --version V for one\n\n\
        In a pipeline:\n  \
        jobs:\n    \
          train:\n      \
            component: azureml:train_model@latest\n      \
            inputs: {data: ${{parent.jobs.prep.outputs.clean}}, epochs: 20}")]
    Create(ComponentCreateArgs),
    /// List components, every version.
    List,
    /// Show a component (the latest version unless --version): its definition.
    Show(Named),
}

#[derive(clap::Args)]
pub struct ComponentCreateArgs {
    /// A component file (the managed service's commandComponent YAML).
    #[arg(long, short = 'f')]
    pub file: PathBuf,
    /// [default: the file's `version`, else one more than the highest]
    #[arg(long, short = 'v')]
    pub version: Option<String>,
}

#[derive(clap::Subcommand)]
pub enum EnvironmentCommand {
    /// Register an environment: an image, a Docker build context (built now on the
    /// nodes' engine, its log streamed here), a conda file on an image, or the
    /// node's own software (`--host`).
    #[command(after_help = "Examples:\n  \
        shoal environment create --name AzureML-sklearn-1.5 --image shoal/train\n  \
        shoal environment create --name mine --build-context ./ctx      # FROM a local image\n  \
        shoal environment create --name sk --conda-file conda.yml --image shoal/train\n  \
        shoal environment create --name site --host --prefix /opt/venv\n  \
        shoal environment create -f env.yml\n\n\
        Jobs name it as azureml:NAME@latest, azureml:NAME:VERSION or\n\
        azureml://registries/azureml/environments/NAME/labels/latest.")]
    Create(EnvCreateArgs),
    /// List environments (archived ones included, marked).
    List,
    /// Show an environment (the latest version unless --version).
    Show(Named),
    /// Archive an environment: `@latest` skips it; named by version it still runs.
    Archive(Named),
}

#[derive(clap::Args, Default)]
pub struct EnvCreateArgs {
    /// An environment file (the managed service's environment YAML).
    #[arg(long, short = 'f')]
    pub file: Option<PathBuf>,
    #[arg(long, short = 'n')]
    pub name: Option<String>,
    /// [default: one more than the highest]
    #[arg(long, short = 'v')]
    pub version: Option<String>,
    /// An image on the nodes' engine.
    #[arg(long, short = 'i')]
    pub image: Option<String>,
    /// A Docker build context folder; its Dockerfile's FROM is a local image.
    #[arg(long, short = 'b')]
    pub build_context: Option<PathBuf>,
    /// The Dockerfile, relative to the build context [default: Dockerfile].
    #[arg(long, short = 'd', requires = "build_context")]
    pub dockerfile_path: Option<String>,
    /// A conda file applied on --image (with its conda, mamba, micromamba or pip).
    #[arg(long, short = 'c', requires = "image")]
    pub conda_file: Option<PathBuf>,
    /// The node's own software, as a process.
    #[arg(long, conflicts_with_all = ["image", "build_context"])]
    pub host: bool,
    /// With --host: a venv or conda prefix put first on PATH.
    #[arg(long, requires = "host")]
    pub prefix: Option<String>,
    #[arg(long)]
    pub description: Option<String>,
}

#[derive(clap::Args)]
pub struct ConfigureArgs {
    /// A default, KEY=VALUE (`compute=cpu-cluster`: what job files with no
    /// `compute:` run on); an empty value clears it.
    #[arg(long, short = 'd', num_args = 1.., value_parser = key_value)]
    pub defaults: Vec<(String, String)>,
    /// Print the defaults.
    #[arg(long, short = 'l')]
    pub list_defaults: bool,
}

fn print_datastores(list: &[pb::Datastore], format: Format) -> anyhow::Result<()> {
    if format == Format::Json {
        let rows: Vec<Value> = list
            .iter()
            .map(|d| json!({"name": d.name, "path": d.path, "description": d.description}))
            .collect();
        return output::json(&rows);
    }
    let mut table = output::table(&["NAME", "PATH", "DESCRIPTION"]);
    for d in list {
        table.add_row(vec![d.name.clone(), d.path.clone(), d.description.clone()]);
    }
    println!("{table}");
    Ok(())
}

fn print_assets(list: &[pb::DataAsset], format: Format) -> anyhow::Result<()> {
    if format == Format::Json {
        let rows: Vec<Value> = list
            .iter()
            .map(|a| {
                json!({"name": a.name, "version": a.version, "type": a.r#type, "path": a.path,
                       "description": a.description, "tags": a.tags})
            })
            .collect();
        return output::json(&rows);
    }
    let mut table = output::table(&["NAME", "VERSION", "TYPE", "PATH", "CREATED"]);
    for a in list {
        table.add_row(vec![
            a.name.clone(),
            a.version.clone(),
            a.r#type.clone(),
            a.path.clone(),
            output::ago(a.created_at_ms),
        ]);
    }
    println!("{table}");
    Ok(())
}

fn what_it_runs(e: &pb::Environment) -> String {
    match (e.host, e.prefix.is_empty()) {
        (true, true) => "host".to_string(),
        (true, false) => format!("host ({})", e.prefix),
        (false, _) => e.image.clone(),
    }
}

fn print_environments(list: &[pb::Environment], format: Format) -> anyhow::Result<()> {
    if format == Format::Json {
        let rows: Vec<Value> = list
            .iter()
            .map(|e| {
                json!({"name": e.name, "version": e.version, "image": e.image, "host": e.host,
                       "prefix": e.prefix, "defined_by": e.defined_by, "archived": e.archived,
                       "description": e.description, "tags": e.tags})
            })
            .collect();
        return output::json(&rows);
    }
    let mut table = output::table(&["NAME", "VERSION", "RUNS", "DEFINED BY", "CREATED"]);
    for e in list {
        let version = if e.archived {
            format!("{} (archived)", e.version)
        } else {
            e.version.clone()
        };
        table.add_row(vec![
            e.name.clone(),
            version,
            what_it_runs(e),
            e.defined_by.clone(),
            output::ago(e.created_at_ms),
        ]);
    }
    println!("{table}");
    Ok(())
}

pub async fn run_datastore(
    command: DatastoreCommand,
    endpoint: &str,
    format: Format,
) -> anyhow::Result<ExitCode> {
    let client = Client::connect(endpoint).await?;
    let mut datastores = client.datastores();
    let list = match command {
        DatastoreCommand::Create {
            name,
            path,
            description,
        } => {
            // The coordinator's machine reads it: an absolute path there.
            let path = if path.starts_with('/') {
                path
            } else {
                std::path::absolute(&path)?.display().to_string()
            };
            let made = datastores
                .create(pb::Datastore {
                    name,
                    path,
                    description: description.unwrap_or_default(),
                    created_at_ms: 0,
                })
                .await
                .map_err(status)?;
            vec![made.into_inner()]
        }
        DatastoreCommand::List => {
            datastores
                .list(pb::ListRequest {})
                .await
                .map_err(status)?
                .into_inner()
                .datastores
        }
        DatastoreCommand::Show(named) => {
            vec![
                datastores
                    .get(named.name_ref())
                    .await
                    .map_err(status)?
                    .into_inner(),
            ]
        }
    };
    print_datastores(&list, format)?;
    Ok(ExitCode::SUCCESS)
}

/// The data asset request: the data file (or nothing), the flags over it, the
/// local path's content read.
fn data_request(args: DataCreateArgs) -> anyhow::Result<pb::DataAssetRequest> {
    let (mut file, base) = match &args.file {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("cannot read {}", path.display()))?;
            let file =
                DataFile::from_yaml(&text).map_err(|e| anyhow!("{e} (in {})", path.display()))?;
            (file, path.parent().map(PathBuf::from).unwrap_or_default())
        }
        None => (
            DataFile {
                schema: None,
                name: String::new(),
                version: None,
                kind: None,
                path: String::new(),
                description: None,
                tags: Default::default(),
            },
            PathBuf::new(),
        ),
    };
    if let Some(name) = args.name {
        file.name = name;
    }
    if let Some(version) = args.version {
        file.version = Some(shoal_coordinator::admission::jobfile::Scalar::Text(version));
    }
    if let Some(kind) = args.r#type {
        file.kind = Some(kind);
    }
    if let Some(path) = args.path {
        file.path = path;
    }
    if let Some(description) = args.description {
        file.description = Some(description);
    }
    if file.name.is_empty() || file.path.is_empty() {
        anyhow::bail!("give --name and --path (or -f data.yml with name: and path:)");
    }
    let upload = match DataRef::parse("path", &file.path)? {
        DataRef::Local(path) => {
            let kind = match file.kind.as_deref() {
                None => DataKind::UriFolder,
                Some(kind) => DataKind::parse("type", kind)?,
            };
            Some(local::read_local(&base, &path, !kind.is_file(), false)?)
        }
        _ => None,
    };
    Ok(file.into_request(upload))
}

pub async fn run_data(
    command: DataCommand,
    endpoint: &str,
    format: Format,
) -> anyhow::Result<ExitCode> {
    // Read the local data before bothering the coordinator.
    let (request, command) = match command {
        DataCommand::Create(args) => (Some(data_request(args)?), None),
        other => (None, Some(other)),
    };
    let client = Client::connect(endpoint).await?;
    let mut assets = client.data_assets();
    let list = match (request, command) {
        (Some(request), _) => vec![assets.create(request).await.map_err(status)?.into_inner()],
        (None, Some(DataCommand::Show(named))) => vec![
            assets
                .get(named.name_ref())
                .await
                .map_err(status)?
                .into_inner(),
        ],
        _ => {
            assets
                .list(pb::ListRequest {})
                .await
                .map_err(status)?
                .into_inner()
                .assets
        }
    };
    print_assets(&list, format)?;
    Ok(ExitCode::SUCCESS)
}

/// The environment request: the environment file (or one made of the flags), the
/// flags over it, its conda file read in and its build context packed.
fn environment_request(args: EnvCreateArgs) -> anyhow::Result<pb::EnvironmentRequest> {
    let file_path = args.file.clone();
    let (mut doc, base) = match &args.file {
        Some(path) => local::read_document(path, "environment file")?,
        None => (json!({}), PathBuf::new()),
    };
    let mut put = |key: &str, value: Value| {
        if let Value::Object(map) = &mut doc {
            map.insert(key.to_string(), value);
        }
    };
    if let Some(name) = args.name {
        put("name", json!(name));
    }
    if let Some(version) = args.version {
        put("version", json!(version));
    }
    if let Some(description) = args.description {
        put("description", json!(description));
    }
    if let Some(image) = args.image {
        put("image", json!(image));
    }
    if let Some(conda) = args.conda_file {
        put(
            "conda_file",
            json!(std::path::absolute(conda)?.display().to_string()),
        );
    }
    if let Some(context) = args.build_context {
        let mut build = json!({ "path": std::path::absolute(context)?.display().to_string() });
        if let Some(dockerfile) = args.dockerfile_path {
            build["dockerfile_path"] = json!(dockerfile);
        }
        put("build", build);
    }
    if args.host {
        put(
            "host",
            match args.prefix {
                Some(prefix) => json!({ "prefix": prefix }),
                None => json!(true),
            },
        );
    }
    local::inline_definition(&mut doc, &base, "environment")?;
    // Checked here too, so a refusal names the file and costs no upload.
    let in_file = |e: String| match &file_path {
        Some(path) => anyhow!("{e} (in {})", path.display()),
        None => anyhow!("{e}"),
    };
    let checked: EnvFile = serde_json::from_value(doc.clone())
        .map_err(|e| in_file(format!("invalid environment file: {e}")))?;
    checked
        .decl("environment", &mut Vec::new())
        .map_err(|e| in_file(e.to_string()))?;
    let mut files = std::collections::HashMap::new();
    if let Some(context) = doc
        .get("build")
        .and_then(|b| b.get("path"))
        .and_then(Value::as_str)
    {
        files.insert(
            context.to_string(),
            local::read_local(&base, context, true, false)?,
        );
    }
    Ok(pb::EnvironmentRequest {
        text: serde_json::to_string(&doc)?,
        files,
    })
}

/// Creates an environment, the build's log streamed to stderr; returns it.
pub async fn create_environment(
    client: &Client,
    args: EnvCreateArgs,
) -> anyhow::Result<pb::Environment> {
    let request = environment_request(args)?;
    let mut stream = client
        .environments()
        .create(request)
        .await
        .map_err(status)?
        .into_inner();
    while let Some(item) = stream.next().await {
        match item.map_err(status)?.item {
            Some(pb::environment_progress::Item::Log(line)) => eprintln!("{line}"),
            Some(pb::environment_progress::Item::Environment(made)) => return Ok(made),
            None => {}
        }
    }
    Err(anyhow!("the coordinator ended the build without a word"))
}

pub async fn run_environment(
    command: EnvironmentCommand,
    endpoint: &str,
    format: Format,
) -> anyhow::Result<ExitCode> {
    let client = Client::connect(endpoint).await?;
    let mut environments = client.environments();
    let list = match command {
        EnvironmentCommand::Create(args) => vec![create_environment(&client, args).await?],
        EnvironmentCommand::List => {
            environments
                .list(pb::ListRequest {})
                .await
                .map_err(status)?
                .into_inner()
                .environments
        }
        EnvironmentCommand::Show(named) => vec![
            environments
                .get(named.name_ref())
                .await
                .map_err(status)?
                .into_inner(),
        ],
        EnvironmentCommand::Archive(named) => vec![
            environments
                .archive(named.name_ref())
                .await
                .map_err(status)?
                .into_inner(),
        ],
    };
    print_environments(&list, format)?;
    Ok(ExitCode::SUCCESS)
}

/// A component file read and checked here (so a refusal costs no upload), with
/// its code folder packed; its environment's `file:` reference inlined.
fn component_request(args: ComponentCreateArgs) -> anyhow::Result<pb::ComponentRequest> {
    let (mut doc, base) = local::read_document(&args.file, "component file")?;
    local::inline_component_environment(&mut doc, &base)?;
    let in_file = |e: shoal_coordinator::Error| anyhow!("{e} (in {})", args.file.display());
    let checked =
        shoal_coordinator::admission::pipeline::check_component(doc.clone()).map_err(in_file)?;
    let mut files = std::collections::HashMap::new();
    if let Some(code) = &checked.code {
        files.insert(code.clone(), local::read_local(&base, code, true, true)?);
    }
    Ok(pb::ComponentRequest {
        text: serde_json::to_string(&doc)?,
        files,
        version: args.version.unwrap_or_default(),
    })
}

pub async fn run_component(
    command: ComponentCommand,
    endpoint: &str,
    format: Format,
) -> anyhow::Result<ExitCode> {
    let client = Client::connect(endpoint).await?;
    let mut components = client.components();
    let list = match command {
        ComponentCommand::Create(args) => vec![
            components
                .create(component_request(args)?)
                .await
                .map_err(status)?
                .into_inner(),
        ],
        ComponentCommand::List => {
            components
                .list(pb::ListRequest {})
                .await
                .map_err(status)?
                .into_inner()
                .components
        }
        ComponentCommand::Show(named) => {
            let found = components
                .get(named.name_ref())
                .await
                .map_err(status)?
                .into_inner();
            if format != Format::Json {
                let definition: Value = serde_json::from_str(&found.definition)?;
                println!("name:        {}", found.name);
                println!("version:     {}", found.version);
                if !found.display_name.is_empty() {
                    println!("display:     {}", found.display_name);
                }
                if !found.description.is_empty() {
                    println!("description: {}", found.description);
                }
                println!("created:     {}", output::ago(found.created_at_ms));
                println!("{}", serde_json::to_string_pretty(&definition)?);
                return Ok(ExitCode::SUCCESS);
            }
            vec![found]
        }
    };
    if format == Format::Json {
        let rows: Vec<Value> = list
            .iter()
            .map(|c| {
                json!({"name": c.name, "version": c.version, "display_name": c.display_name,
                       "description": c.description, "has_code": c.has_code,
                       "definition": serde_json::from_str::<Value>(&c.definition).unwrap_or_default()})
            })
            .collect();
        output::json(&rows)?;
    } else {
        let mut table = output::table(&["NAME", "VERSION", "DISPLAY NAME", "CODE", "CREATED"]);
        for c in &list {
            table.add_row(vec![
                c.name.clone(),
                c.version.clone(),
                c.display_name.clone(),
                if c.has_code { "yes" } else { "-" }.to_string(),
                output::ago(c.created_at_ms),
            ]);
        }
        println!("{table}");
    }
    Ok(ExitCode::SUCCESS)
}

pub async fn run_configure(
    args: ConfigureArgs,
    endpoint: &str,
    format: Format,
) -> anyhow::Result<ExitCode> {
    if args.defaults.is_empty() && !args.list_defaults {
        anyhow::bail!(
            "give --defaults KEY=VALUE (e.g. --defaults compute=cpu-cluster) or --list-defaults"
        );
    }
    let client = Client::connect(endpoint).await?;
    let mut settings = client.settings();
    let values = if args.defaults.is_empty() {
        settings.get_defaults(pb::ListRequest {}).await
    } else {
        settings
            .set_defaults(pb::DefaultsUpdate {
                set: args.defaults.into_iter().collect(),
            })
            .await
    }
    .map_err(status)?
    .into_inner()
    .values;
    let sorted: std::collections::BTreeMap<_, _> = values.into_iter().collect();
    if format == Format::Json {
        return output::json(&sorted).map(|_| ExitCode::SUCCESS);
    }
    if sorted.is_empty() {
        println!("no defaults");
    }
    for (key, value) in sorted {
        println!("{key}={value}");
    }
    Ok(ExitCode::SUCCESS)
}
