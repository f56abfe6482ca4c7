//! `shoal ml ...`: the managed service's `az ml` command lines with `az` replaced
//! by `shoal` — v1 (`computetarget`) and v2 (`compute`, `job`, `environment`,
//! `data`). Each is a spelling of an operation the rest of the CLI has; nothing
//! here does work of its own.

use std::path::PathBuf;
use std::process::ExitCode;

use super::assets::{self, ComponentCommand, DataCommand, EnvironmentCommand};
use super::cluster::{self, CreateArgs, IdentityCommand};
use super::job::{self, DownloadArgs, SubmitArgs};
use crate::client::Client;
use crate::output::Format;

#[derive(clap::Args)]
#[command(
    after_help = "Examples (the managed service's own lines, `az` replaced by `shoal`):\n  \
    shoal ml computetarget create amlcompute -n cpu --min-nodes 1 --max-nodes 1 -s STANDARD_D3_V2\n  \
    shoal ml computetarget amlcompute identity assign --name cpu-cluster '[system]'\n  \
    shoal ml compute create -f compute.yml\n  \
    shoal ml job create -f job.yml --set inputs.epochs=3 --stream\n  \
    shoal ml job download -n JOB --output-name model --download-path ./out\n\n\
    --resource-group/-g, --workspace-name/-w and --subscription are accepted and mean\n\
    nothing here: one coordinator is one workspace."
)]
pub struct MlArgs {
    #[command(subcommand)]
    pub command: MlCommand,
    /// Accepted for `az ml` lines; one coordinator is one workspace.
    #[arg(long, short = 'g', global = true, hide = true)]
    pub resource_group: Option<String>,
    #[arg(long, short = 'w', global = true, hide = true)]
    pub workspace_name: Option<String>,
    #[arg(long, global = true, hide = true)]
    pub subscription: Option<String>,
}

#[derive(clap::Subcommand)]
pub enum MlCommand {
    /// v1: `computetarget create amlcompute`, `computetarget amlcompute identity`,
    /// `computetarget list|show|delete`.
    #[command(subcommand)]
    Computetarget(ComputeTarget),
    /// v2: `compute create|list|show|update|delete`.
    #[command(subcommand)]
    Compute(Compute),
    /// v2: `job create|stream|show|list|cancel|download`.
    #[command(subcommand)]
    Job(Job),
    /// v2: `environment create|list|show|archive`.
    #[command(subcommand)]
    Environment(EnvironmentCommand),
    /// v2: `data create|list|show`.
    #[command(subcommand)]
    Data(DataCommand),
    /// v2: `component create|list|show`.
    #[command(subcommand)]
    Component(ComponentCommand),
}

// Parsed once per process: the size of a variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(clap::Subcommand)]
pub enum ComputeTarget {
    /// Create a compute target.
    #[command(subcommand)]
    Create(TargetKind),
    /// Commands of amlcompute targets (`identity assign|remove|show`).
    #[command(subcommand)]
    Amlcompute(Amlcompute),
    /// List compute targets.
    List,
    /// Show a compute target.
    Show(NameFlag),
    /// Delete a compute target.
    Delete(NameFlag),
}

#[derive(clap::Subcommand)]
pub enum TargetKind {
    /// An autoscaling cluster (`shoal cluster create`).
    Amlcompute(V1Create),
}

#[derive(clap::Args)]
pub struct V1Create {
    #[command(flatten)]
    pub args: CreateArgs,
    /// Accepted; nodes run where their agents run.
    #[arg(long)]
    pub location: Option<String>,
    /// Accepted; nodes are reached through their agents, not SSH.
    #[arg(long)]
    pub admin_username: Option<String>,
    #[arg(long, hide = true)]
    pub admin_user_password: Option<String>,
    #[arg(long, hide = true)]
    pub admin_user_ssh_key: Option<String>,
    #[arg(long, hide = true)]
    pub remote_login_port_public_access: Option<String>,
    /// Accepted; nodes use the network of the machine they run on.
    #[arg(long)]
    pub vnet_name: Option<String>,
    #[arg(long, hide = true)]
    pub subnet_name: Option<String>,
    #[arg(long, hide = true)]
    pub vnet_resourcegroup_name: Option<String>,
}

#[derive(clap::Subcommand)]
pub enum Amlcompute {
    /// A cluster's managed identities: assign, remove, show.
    #[command(subcommand)]
    Identity(IdentityCommand),
}

#[derive(clap::Args)]
pub struct NameFlag {
    #[arg(long, short = 'n')]
    pub name: String,
    /// Accepted (`az ml compute delete --yes`): deleting asks nothing here.
    #[arg(long, short = 'y', hide = true)]
    pub yes: bool,
}

#[derive(clap::Subcommand)]
pub enum Compute {
    /// Create a compute: `-f compute.yml`, or flags (size defaults to Standard_DS3_v2).
    Create(V2Create),
    /// List computes.
    List,
    /// Show a compute.
    Show(NameFlag),
    /// Change min/max instances, idle time, description or tags.
    Update(cluster::UpdateArgs),
    /// Delete a compute.
    Delete(NameFlag),
}

#[derive(clap::Args)]
pub struct V2Create {
    #[command(flatten)]
    pub args: CreateArgs,
    /// amlcompute (the only type here).
    #[arg(long = "type", short = 't')]
    pub kind: Option<String>,
}

#[derive(clap::Subcommand)]
pub enum Job {
    /// Submit a job file (`shoal job submit -f`).
    Create {
        #[arg(long, short = 'f')]
        file: PathBuf,
        /// Override values: `--set compute=gpu inputs.epochs=3 resources.instance_count=2`.
        #[arg(long, num_args = 1..)]
        set: Vec<String>,
        /// Follow the job's logs until it ends; exit non-zero unless it completed.
        #[arg(long, short = 's')]
        stream: bool,
        /// The job's name (its display name here; ids are given by the coordinator).
        #[arg(long, short = 'n')]
        name: Option<String>,
    },
    /// Follow a job's logs until it ends.
    Stream(NameFlag),
    /// Show a job.
    Show(NameFlag),
    /// List jobs, newest first.
    List {
        #[arg(long, short = 'r', default_value_t = 50)]
        max_results: u32,
    },
    /// Cancel a job.
    Cancel(NameFlag),
    /// Download a job's outputs (`--all`, or one `--output-name`).
    Download(DownloadArgs),
}

pub async fn run(args: MlArgs, endpoint: &str, format: Format) -> anyhow::Result<ExitCode> {
    match args.command {
        MlCommand::Computetarget(command) => match command {
            ComputeTarget::Create(TargetKind::Amlcompute(create)) => {
                let no_effect = [
                    (
                        create.location.is_some(),
                        "--location: nodes run where their agents run",
                    ),
                    (
                        create.admin_username.is_some()
                            || create.admin_user_password.is_some()
                            || create.admin_user_ssh_key.is_some()
                            || create.remote_login_port_public_access.is_some(),
                        "--admin-username, --admin-user-*, --remote-login-port-public-access: nodes are reached through their agents, not SSH",
                    ),
                    (
                        create.vnet_name.is_some()
                            || create.subnet_name.is_some()
                            || create.vnet_resourcegroup_name.is_some(),
                        "--vnet-name, --subnet-name, --vnet-resourcegroup-name: nodes use the network of the machine they run on",
                    ),
                ];
                for (given, warning) in no_effect {
                    if given {
                        eprintln!("warning: {warning}; it has no effect here");
                    }
                }
                let client = Client::connect(endpoint).await?;
                cluster::create(&client, create.args, format).await?;
                Ok(ExitCode::SUCCESS)
            }
            ComputeTarget::Amlcompute(Amlcompute::Identity(command)) => {
                cluster::run(cluster::Command::Identity(command), endpoint, format).await
            }
            ComputeTarget::List => cluster::run(cluster::Command::List, endpoint, format).await,
            ComputeTarget::Show(name) => {
                cluster::run(cluster::Command::Show(name.into()), endpoint, format).await
            }
            ComputeTarget::Delete(name) => {
                cluster::run(cluster::Command::Delete(name.into()), endpoint, format).await
            }
        },
        MlCommand::Compute(command) => match command {
            Compute::Create(create) => {
                if let Some(kind) = create.kind.as_deref()
                    && !kind.eq_ignore_ascii_case("amlcompute")
                {
                    anyhow::bail!("--type `{kind}` is not supported; computes here are amlcompute");
                }
                let mut args = create.args;
                if args.file.is_none() && args.vm_size.is_none() {
                    args.vm_size = Some(shoal_coordinator::computefile::DEFAULT_SIZE.to_string());
                }
                let client = Client::connect(endpoint).await?;
                cluster::create(&client, args, format).await?;
                Ok(ExitCode::SUCCESS)
            }
            Compute::List => cluster::run(cluster::Command::List, endpoint, format).await,
            Compute::Show(name) => {
                cluster::run(cluster::Command::Show(name.into()), endpoint, format).await
            }
            Compute::Update(update) => {
                cluster::run(cluster::Command::Update(update), endpoint, format).await
            }
            Compute::Delete(name) => {
                cluster::run(cluster::Command::Delete(name.into()), endpoint, format).await
            }
        },
        MlCommand::Job(command) => {
            let command = match command {
                Job::Create {
                    file,
                    set,
                    stream,
                    name,
                } => {
                    let submit = SubmitArgs {
                        file: Some(file),
                        set,
                        name,
                        wait: stream,
                        ..Default::default()
                    };
                    return job::submit(submit, endpoint, format).await;
                }
                Job::Stream(name) => job::Command::Logs {
                    id: name.name,
                    follow: true,
                    instance: None,
                    task: None,
                },
                Job::Show(name) => job::Command::Show {
                    id: name.name,
                    task: None,
                },
                Job::List { max_results } => job::Command::List {
                    cluster: None,
                    limit: max_results,
                    after: None,
                    parent: None,
                },
                Job::Cancel(name) => job::Command::Cancel {
                    id: name.name,
                    wait: false,
                    task: None,
                },
                Job::Download(args) => job::Command::Download(args),
            };
            job::run(command, endpoint, format).await
        }
        MlCommand::Environment(command) => assets::run_environment(command, endpoint, format).await,
        MlCommand::Data(command) => assets::run_data(command, endpoint, format).await,
        MlCommand::Component(command) => assets::run_component(command, endpoint, format).await,
    }
}

impl From<NameFlag> for cluster::NameArg {
    fn from(flag: NameFlag) -> Self {
        cluster::NameArg::named(flag.name)
    }
}
