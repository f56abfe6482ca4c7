//! `shoal cluster ...`: flags spelled as the managed service's CLIs spell them.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use shoal_coordinator::computefile::ComputeFile;
use shoal_coordinator::view;
use shoal_proto::v1 as pb;

use super::key_value;
use crate::client::{Client, status};
use crate::output::{self, Format};

const PROVIDERS_HELP: &str = "\
Providers:
  local    each node is a `shoal agent` process on this machine (the default)
  docker   each node is a container of the shoal/node image
  slurm    each node is a Slurm allocation: `sbatch` runs `shoal agent` with a
           one-use join token; scale-down is `scancel`; a pending allocation
           shows Slurm's reason. Settings (all optional): partition, account,
           qos, time_limit (sbatch --time), sbatch_args (more sbatch flags, as a
           shell would split them), agent_program (the shoal binary on the
           allocated machines; default: this one's path), work_dir (a node
           works in WORK_DIR/shoal-NODE there, its allocation's output goes to
           WORK_DIR/shoal-NODE.out; default /tmp). The coordinator's machine
           needs sbatch, squeue and scancel.
  command  each node is made and removed by your scripts (any cloud CLI, IPMI):
           create (required) gets the node as JSON on stdin -- node_id, cluster,
           join_token, endpoint, ca_file, cores, memory_bytes, gpus, vm_size --
           starts `shoal agent --endpoint ENDPOINT --join-token TOKEN --work-dir
           DIR` there, and prints the node's address; delete (required) gets
           node_id, cluster and address; list (optional) prints the addresses of
           the nodes that exist, one per line: a node it stops listing is lost
           and its work is rerun. Scripts are absolute paths.

Agents on other machines reach the coordinator at `advertise_endpoint` in
shoal.yaml (default: its own listen address).

Examples:
  shoal cluster create --name hpc --vm-size Standard_D4s_v3 --max-nodes 8 \\
    --provider slurm --provider-setting partition=gpu --provider-setting time_limit=4:00:00
  shoal cluster create --name vms --vm-size Standard_D4s_v3 --provider command \\
    --provider-setting create=/opt/nodes/create.sh --provider-setting delete=/opt/nodes/delete.sh";

#[derive(clap::Subcommand)]
pub enum Command {
    /// Create a cluster (nodes come and go with the work: min 0, max 4 by default).
    #[command(after_long_help = PROVIDERS_HELP)]
    Create(CreateArgs),
    /// Show one cluster: its settings, node counts, allocation state and errors.
    Show(NameArg),
    /// List clusters.
    List,
    /// Change min/max nodes, idle timeout, description or tags.
    Update(UpdateArgs),
    /// Delete a cluster and remove its nodes (it must have no queued or running jobs).
    Delete(NameArg),
    /// Lock a cluster: read-only (no scaling, updates or deletion) or cannot-delete.
    Lock {
        name: String,
        #[arg(long)]
        kind: String,
    },
    /// Remove a cluster's lock.
    Unlock { name: String },
    /// The managed identities a cluster's jobs may get tokens for.
    #[command(subcommand)]
    Identity(IdentityCommand),
}

#[derive(clap::Subcommand)]
pub enum IdentityCommand {
    /// Give the cluster identities: `[system]` (its own) and/or user-assigned ones
    /// (names or client ids from `shoal identity list`).
    Assign {
        #[arg(long, short = 'n')]
        name: String,
        #[arg(required = true)]
        identities: Vec<String>,
    },
    /// Take identities away from the cluster.
    Remove {
        #[arg(long, short = 'n')]
        name: String,
        #[arg(required = true)]
        identities: Vec<String>,
    },
    /// The cluster's identities.
    Show {
        #[arg(long, short = 'n')]
        name: String,
    },
}

#[derive(clap::Args)]
pub struct NameArg {
    /// The cluster's name.
    #[arg(required_unless_present = "name_flag")]
    name: Option<String>,
    #[arg(long = "name", short = 'n', hide = true)]
    name_flag: Option<String>,
}

impl NameArg {
    pub fn named(name: String) -> Self {
        NameArg {
            name: Some(name),
            name_flag: None,
        }
    }

    fn get(self) -> String {
        self.name.or(self.name_flag).unwrap_or_default()
    }
}

#[derive(clap::Args, Default)]
pub struct CreateArgs {
    /// 2-16 letters, digits and hyphens, starting with a letter.
    #[arg(long, short = 'n')]
    pub name: Option<String>,
    /// A VM size from `shoal vm-size list` (case-insensitive).
    #[arg(long, short = 's', visible_alias = "size")]
    pub vm_size: Option<String>,
    /// Nodes kept even when idle [default: 0].
    #[arg(long, visible_alias = "min-instances")]
    pub min_nodes: Option<u32>,
    /// Nodes at most [default: 4; at most 100 with inter-node communication].
    #[arg(long, visible_alias = "max-instances")]
    pub max_nodes: Option<u32>,
    /// dedicated or lowpriority [default: dedicated].
    #[arg(long, visible_alias = "tier")]
    pub vm_priority: Option<String>,
    /// Seconds a node stays idle before it is removed [default: 120].
    #[arg(long, visible_alias = "idle-time-before-scale-down")]
    pub idle_seconds_before_scaledown: Option<u64>,
    #[arg(long)]
    pub description: Option<String>,
    /// A tag, KEY=VALUE; repeat for more.
    #[arg(long = "tag", value_parser = key_value)]
    pub tags: Vec<(String, String)>,
    /// What creates the nodes: local, docker, slurm or command [default: local].
    #[arg(long)]
    pub provider: Option<String>,
    /// A provider setting, KEY=VALUE; repeat for more (see below).
    #[arg(long = "provider-setting", value_parser = key_value)]
    pub provider_settings: Vec<(String, String)>,
    /// true: MPI works, at most 100 nodes; false: up to 4000 nodes, no distributed jobs.
    #[arg(long)]
    pub internode_communication: Option<bool>,
    /// Policy: cancel jobs whose GPUs stay idle (see `idle_gpu_*` in shoal.yaml).
    #[arg(long)]
    pub cancel_idle_gpu_jobs: Option<bool>,
    /// Show progress until the cluster is steady (its min_nodes up).
    #[arg(long)]
    pub wait: bool,
    /// The cluster's managed identity: SystemAssigned, UserAssigned, or both
    /// (SystemAssigned,UserAssigned).
    #[arg(long)]
    pub identity_type: Option<String>,
    /// User-assigned identities: names, client ids (`shoal identity list`) or
    /// resource ids (…/userAssignedIdentities/NAME).
    #[arg(long, num_args = 1.., visible_alias = "user-assigned-identities")]
    pub identity_id: Vec<String>,
    /// Identities to assign, comma-separated: `[system]` and/or user-assigned ones.
    #[arg(long)]
    pub assign_identity: Option<String>,
    /// A compute file, the managed service's amlCompute YAML (`name`, `size`
    /// [default: Standard_DS3_v2], `min_instances`, `max_instances`, `tier`,
    /// `idle_time_before_scale_down`, `identity`, ...); flags override it.
    #[arg(long, short = 'f')]
    pub file: Option<PathBuf>,
}

#[derive(clap::Args)]
pub struct UpdateArgs {
    #[arg(required_unless_present = "name_flag")]
    name: Option<String>,
    #[arg(long = "name", short = 'n', hide = true)]
    name_flag: Option<String>,
    #[arg(long, visible_alias = "min-instances")]
    min_nodes: Option<u32>,
    #[arg(long, visible_alias = "max-instances")]
    max_nodes: Option<u32>,
    #[arg(long, visible_alias = "idle-time-before-scale-down")]
    idle_seconds_before_scaledown: Option<u64>,
    #[arg(long)]
    description: Option<String>,
    /// Add or change a tag, KEY=VALUE.
    #[arg(long = "tag", value_parser = key_value)]
    tags: Vec<(String, String)>,
    /// Fixed at creation: refused with a reason.
    #[arg(long, short = 's', visible_alias = "size")]
    vm_size: Option<String>,
    /// Fixed at creation: refused with a reason.
    #[arg(long, visible_alias = "tier")]
    vm_priority: Option<String>,
    /// Policy: cancel jobs whose GPUs stay idle.
    #[arg(long)]
    cancel_idle_gpu_jobs: Option<bool>,
    /// Show progress until the cluster is steady again.
    #[arg(long)]
    wait: bool,
}

/// A compute file's cluster request; its warnings go to stderr.
fn read_cluster_file(path: &PathBuf) -> anyhow::Result<shoal_coordinator::model::ClusterRequest> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?;
    let invalid = |e: shoal_coordinator::Error| anyhow::anyhow!("{e} (in {})", path.display());
    let file = ComputeFile::from_yaml(&text).map_err(invalid)?;
    for warning in file.warnings() {
        eprintln!("warning: {warning}");
    }
    file.into_request().map_err(invalid)
}

/// Creates a cluster (`shoal cluster create`, `shoal ml compute create`, `shoal ml
/// computetarget create amlcompute`): the compute file's values, the flags laid
/// over them, identities included, in one step — a refused create creates nothing.
pub async fn create(client: &Client, args: CreateArgs, format: Format) -> anyhow::Result<()> {
    let base = match &args.file {
        Some(path) => read_cluster_file(path)?,
        None => Default::default(),
    };
    let mut tags: HashMap<String, String> = base.tags.into_iter().collect();
    tags.extend(args.tags);
    let or = |flag: Option<String>, file: String| flag.unwrap_or(file);
    let mut identities = base.identities;
    identities.extend(identities_to_assign(
        args.identity_type.as_deref(),
        &args.identity_id,
        args.assign_identity.as_deref(),
    )?);
    let spec = pb::ClusterSpec {
        name: or(args.name, base.name),
        vm_size: or(args.vm_size, base.vm_size),
        vm_priority: or(args.vm_priority, base.vm_priority),
        min_nodes: args.min_nodes.or(base.min_nodes),
        max_nodes: args.max_nodes.or(base.max_nodes),
        idle_seconds_before_scaledown: args
            .idle_seconds_before_scaledown
            .or(base.idle_seconds_before_scaledown),
        description: or(args.description, base.description),
        tags,
        provider: or(args.provider, base.provider),
        provider_settings: base
            .provider_settings
            .into_iter()
            .chain(args.provider_settings)
            .collect(),
        internode_communication: args
            .internode_communication
            .or(base.internode_communication),
        cancel_idle_gpu_jobs: args.cancel_idle_gpu_jobs,
        identities,
    };
    let cluster = client
        .clusters()
        .create(spec)
        .await
        .map_err(status)?
        .into_inner();
    let cluster = if args.wait {
        wait_steady(client, cluster).await?
    } else {
        cluster
    };
    print_cluster(&cluster, format)
}

pub fn print_cluster(cluster: &pb::Cluster, format: Format) -> anyhow::Result<()> {
    if format == Format::Json {
        return output::json(&view::Cluster::from(cluster));
    }
    let counts = cluster.node_state_counts.unwrap_or_default();
    println!("name:                          {}", cluster.name);
    println!("vm_size:                       {}", cluster.vm_size);
    println!("vm_priority:                   {}", cluster.vm_priority);
    println!("provider:                      {}", cluster.provider);
    let settings: std::collections::BTreeMap<_, _> = cluster.provider_settings.iter().collect();
    for (key, value) in settings {
        println!("  {:<28} {value}", format!("{key}:"));
    }
    println!(
        "min_nodes / max_nodes:         {} / {}",
        cluster.min_nodes, cluster.max_nodes
    );
    println!(
        "idle_seconds_before_scaledown: {}",
        cluster.idle_seconds_before_scaledown
    );
    println!(
        "internode_communication:       {}",
        cluster.internode_communication
    );
    if !cluster.lock.is_empty() {
        println!("lock:                          {}", cluster.lock);
    }
    println!(
        "allocation_state:              {} ({} → {} nodes)",
        cluster.allocation_state, cluster.current_node_count, cluster.target_node_count
    );
    println!(
        "nodes:                         idle {}, running {}, preparing {}, leaving {}, preempted {}, unusable {}",
        counts.idle,
        counts.running,
        counts.preparing,
        counts.leaving,
        counts.preempted,
        counts.unusable
    );
    if !cluster.description.is_empty() {
        println!("description:                   {}", cluster.description);
    }
    if !cluster.tags.is_empty() {
        let tags: BTreeMap<_, _> = cluster.tags.iter().collect();
        let text: Vec<String> = tags.iter().map(|(k, v)| format!("{k}={v}")).collect();
        println!("tags:                          {}", text.join(", "));
    }
    for error in &cluster.errors {
        println!("error:                         {error}");
    }
    Ok(())
}

/// Follows a cluster until it is steady, with a progress line.
async fn wait_steady(client: &Client, cluster: pb::Cluster) -> anyhow::Result<pb::Cluster> {
    use tokio_stream::StreamExt;
    let bar = super::job::spinner();
    let mut watch = client
        .clusters()
        .watch(pb::ClusterRef {
            name: cluster.name.clone(),
        })
        .await
        .map_err(status)?
        .into_inner();
    let mut last = cluster;
    while let Some(update) = watch.next().await {
        last = update.map_err(status)?;
        let counts = last.node_state_counts.unwrap_or_default();
        bar.set_message(format!(
            "{}: {} → {} nodes (preparing {}, idle {}, running {}, leaving {})",
            last.name,
            last.current_node_count,
            last.target_node_count,
            counts.preparing,
            counts.idle,
            counts.running,
            counts.leaving
        ));
        if last.allocation_state == "steady" && last.current_node_count >= last.min_nodes {
            break;
        }
    }
    bar.finish_and_clear();
    Ok(last)
}

pub async fn run(command: Command, endpoint: &str, format: Format) -> anyhow::Result<ExitCode> {
    let client = Client::connect(endpoint).await?;
    let mut clusters = client.clusters();
    match command {
        Command::Create(args) => create(&client, args, format).await?,
        Command::Identity(command) => {
            let mut identities = client.identities();
            let (name, ids, assign) = match command {
                IdentityCommand::Assign {
                    name,
                    identities: ids,
                } => (name, ids, true),
                IdentityCommand::Remove {
                    name,
                    identities: ids,
                } => (name, ids, false),
                IdentityCommand::Show { name } => (name, Vec::new(), false),
            };
            for identity in ids {
                let change = pb::ClusterIdentity {
                    cluster: name.clone(),
                    identity,
                };
                if assign {
                    identities.assign(change).await.map_err(status)?;
                } else {
                    identities.remove(change).await.map_err(status)?;
                }
            }
            // What the cluster has now.
            let list = identities
                .get(pb::ClusterRef { name })
                .await
                .map_err(status)?
                .into_inner();
            print_identities(&list.identities, format)?;
        }
        Command::Show(name) => {
            let cluster = clusters
                .get(pb::ClusterRef { name: name.get() })
                .await
                .map_err(status)?
                .into_inner();
            print_cluster(&cluster, format)?;
        }
        Command::List => {
            let list = clusters
                .list(pb::ListClustersRequest {})
                .await
                .map_err(status)?
                .into_inner();
            if format == Format::Json {
                let views: Vec<view::Cluster> =
                    list.clusters.iter().map(view::Cluster::from).collect();
                return output::json(&views).map(|_| ExitCode::SUCCESS);
            }
            let mut table = output::table(&[
                "NAME", "VM SIZE", "PRIORITY", "NODES", "MIN", "MAX", "STATE", "IDLE", "RUNNING",
            ]);
            for c in &list.clusters {
                let counts = c.node_state_counts.unwrap_or_default();
                table.add_row(vec![
                    c.name.clone(),
                    c.vm_size.clone(),
                    c.vm_priority.clone(),
                    format!("{} → {}", c.current_node_count, c.target_node_count),
                    c.min_nodes.to_string(),
                    c.max_nodes.to_string(),
                    c.allocation_state.clone(),
                    counts.idle.to_string(),
                    counts.running.to_string(),
                ]);
            }
            if list.clusters.is_empty() {
                eprintln!(
                    "no clusters yet; create one with `shoal cluster create --name cpu-cluster --vm-size Standard_D2_v2`"
                );
            } else {
                println!("{table}");
            }
        }
        Command::Update(args) => {
            let update = pb::ClusterUpdate {
                name: args.name.or(args.name_flag).unwrap_or_default(),
                min_nodes: args.min_nodes,
                max_nodes: args.max_nodes,
                idle_seconds_before_scaledown: args.idle_seconds_before_scaledown,
                description: args.description,
                set_tags: args.tags.into_iter().collect(),
                vm_size: args.vm_size,
                vm_priority: args.vm_priority,
                provider: None,
                internode_communication: None,
                cancel_idle_gpu_jobs: args.cancel_idle_gpu_jobs,
            };
            let cluster = clusters.update(update).await.map_err(status)?.into_inner();
            let cluster = if args.wait {
                wait_steady(&client, cluster).await?
            } else {
                cluster
            };
            print_cluster(&cluster, format)?;
        }
        Command::Lock { name, kind } => {
            let cluster = clusters
                .lock(pb::ClusterLock { name, kind })
                .await
                .map_err(status)?
                .into_inner();
            print_cluster(&cluster, format)?;
        }
        Command::Unlock { name } => {
            let cluster = clusters
                .unlock(pb::ClusterRef { name })
                .await
                .map_err(status)?
                .into_inner();
            print_cluster(&cluster, format)?;
        }
        Command::Delete(name) => {
            let cluster = clusters
                .delete(pb::ClusterRef { name: name.get() })
                .await
                .map_err(status)?
                .into_inner();
            if format == Format::Json {
                output::json(&view::Cluster::from(&cluster))?;
            } else {
                println!(
                    "deleted cluster {} (its {} node(s) are being removed)",
                    cluster.name, cluster.current_node_count
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// The identities `cluster create` assigns: --identity-type and --identity-id as
/// the managed service's CLIs have them (`SystemAssigned,UserAssigned` or
/// `system_assigned,user_assigned`; ids repeated or comma-separated), and
/// --assign-identity. Ids alone are user-assigned ones.
fn identities_to_assign(
    kind: Option<&str>,
    ids: &[String],
    assign: Option<&str>,
) -> anyhow::Result<Vec<String>> {
    use shoal_coordinator::computefile::{IdentitySection, UserAssigned};
    let split = |text: &str| -> Vec<String> {
        text.split(',')
            .map(|s| s.trim().to_string())
            .filter(|s| !s.is_empty())
            .collect()
    };
    let ids: Vec<String> = ids.iter().flat_map(|i| split(i)).collect();
    let mut wanted = match kind {
        None => ids,
        Some(kind) => IdentitySection {
            kind: kind.to_string(),
            user_assigned_identities: ids.into_iter().map(UserAssigned::Named).collect(),
        }
        .assigned()
        .map_err(|e| anyhow::anyhow!("--identity-type / --identity-id: {e}"))?,
    };
    if let Some(assign) = assign {
        wanted.extend(split(assign));
    }
    Ok(wanted)
}

pub fn print_identities(list: &[pb::IdentityInfo], format: Format) -> anyhow::Result<()> {
    if format == Format::Json {
        let rows: Vec<shoal_coordinator::view::Identity> = list
            .iter()
            .map(shoal_coordinator::view::Identity::from)
            .collect();
        return crate::output::json(&rows);
    }
    if list.is_empty() {
        println!("no identities");
    }
    for i in list {
        println!("{}  {}  {}", i.r#type, i.client_id, i.name);
    }
    Ok(())
}
