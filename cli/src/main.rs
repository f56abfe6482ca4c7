//! `shoal`: self-hosted compute clusters for ML training and batch inference.
//! One binary: the coordinator (`up`), the node agent (`agent`), and the CLI.

mod alloc;
mod client;
mod commands;
mod deferred;
mod output;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

use commands::{agent, assets, cluster, job, ml, mpi, node, quickstart, serve, token};
use deferred::Deferred;
use output::Format;

/// mimalloc for the coordinator, glibc's malloc for the agent and the client
/// commands, chosen before `main` from the first argument (`alloc.rs`).
#[global_allocator]
static ALLOCATOR: alloc::ByRole = alloc::ByRole;

#[derive(Parser)]
#[command(
    name = "shoal",
    version,
    about = "Self-hosted compute clusters for ML training and batch inference",
    long_about = "Self-hosted compute clusters for ML training and batch inference.\n\n\
        Create a cluster, submit jobs to it, watch them run, and see it scale back \
        down when the work is done.\n\n\
        Try it:    shoal quickstart\n\
        Run it:    shoal up            (coordinator on 127.0.0.1:7070, in the foreground)\n\
        Use it:    shoal cluster create --name cpu-cluster --vm-size Standard_D2_v2 --max-nodes 2\n\
        \u{20}          shoal job submit --cluster cpu-cluster --instance-count 2 --wait -- echo hello\n\
        \u{20}          shoal job logs job-1"
)]
struct Cli {
    /// The coordinator to talk to (host:port, or https://host:port); several,
    /// comma-separated (a leader and its standby): the first that answers.
    #[arg(
        long,
        global = true,
        env = "SHOAL_ENDPOINT",
        default_value = "127.0.0.1:7070"
    )]
    endpoint: String,
    /// The API token to call the coordinator with (default: the one `shoal up` or
    /// `shoal login` saved for the endpoint).
    #[arg(long, global = true, env = "SHOAL_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// The CA that signed the coordinator's TLS certificate (https:// endpoints;
    /// default: the one `shoal up --tls` saved for the endpoint).
    #[arg(long, global = true, env = "SHOAL_CA_FILE")]
    ca_file: Option<std::path::PathBuf>,
    /// Output format: a table for people, JSON for scripts.
    #[arg(short = 'o', long, global = true, value_enum, default_value = "table")]
    output: Format,
    #[command(subcommand)]
    command: Command,
}

// Parsed once per process: the size of a variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Run a 2-node job end to end on an embedded coordinator, then scale to zero.
    Quickstart(Deferred<quickstart::Args>),
    /// Run the coordinator (and the nodes it starts) in the foreground.
    Up(Deferred<serve::Args>),
    /// Same as `up`: the coordinator, in the foreground.
    Coordinator(Deferred<serve::Args>),
    /// Run a node agent (the coordinator's `local` provider starts these for you).
    // Not deferred: its own --endpoint, --token and --ca-file stand in for the
    // global ones, which clap would otherwise add before them (`deferred.rs`).
    Agent(agent::Args),
    /// Create, inspect, update and delete clusters.
    #[command(subcommand)]
    Cluster(Deferred<cluster::Command>),
    /// Submit jobs, follow their logs, cancel them, download their outputs, delete them.
    #[command(subcommand)]
    Job(Deferred<job::Command>),
    /// Datastores: folders jobs read and write as azureml://datastores/NAME/paths/PATH.
    #[command(subcommand)]
    Datastore(Deferred<assets::DatastoreCommand>),
    /// Data assets: versioned data jobs name as azureml:NAME:VERSION.
    #[command(subcommand)]
    Data(Deferred<assets::DataCommand>),
    /// Environments: images, build contexts, conda files or the host's software,
    /// named by jobs as azureml:NAME@latest.
    #[command(subcommand)]
    Environment(Deferred<assets::EnvironmentCommand>),
    /// Command components: versioned steps pipelines name as azureml:NAME:VERSION.
    #[command(subcommand)]
    Component(Deferred<assets::ComponentCommand>),
    /// Defaults, as `az configure --defaults`: `--defaults compute=cpu-cluster`.
    Configure(Deferred<assets::ConfigureArgs>),
    /// The managed service's `az ml` command lines, `az` replaced by `shoal`.
    Ml(Deferred<ml::MlArgs>),
    /// See the nodes of your clusters.
    #[command(subcommand)]
    Node(Deferred<node::Command>),
    /// The VM sizes clusters can be made of.
    #[command(subcommand, name = "vm-size")]
    VmSize(Deferred<node::VmSizeCommand>),
    /// Core quotas per VM family, low-priority and total.
    #[command(subcommand)]
    Quota(Deferred<node::QuotaCommand>),
    /// API tokens with roles (admin only).
    #[command(subcommand)]
    Token(Deferred<token::Command>),
    /// Managed identities (user-assigned); assign them with `shoal cluster identity`.
    #[command(subcommand)]
    Identity(Deferred<token::IdentityCommand>),
    /// Join tokens: agents on other machines join a cluster with one.
    #[command(subcommand, name = "join-token")]
    JoinToken(Deferred<token::JoinTokenCommand>),
    /// Save a token for the endpoint, after checking it with the coordinator.
    Login(Deferred<token::LoginArgs>),
    /// Helpers MPI jobs run in their sandboxes (started by the agents, not by hand).
    #[command(subcommand)]
    Mpi(Deferred<mpi::Command>),
}

fn init_logging(default: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("SHOAL_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .try_init();
}

/// A closed stdout (`shoal job list | head`) ends the command quietly, as it does
/// any Unix tool, instead of a panic in `println!`.
fn die_quietly_on_closed_stdout() {
    use nix::sys::signal::{SigHandler, Signal, signal};
    // SAFETY: runs before the async runtime or any thread starts; SIG_DFL installs
    // no Rust handler, so nothing runs in signal context.
    #[allow(unsafe_code)]
    unsafe {
        let _ = signal(Signal::SIGPIPE, SigHandler::SigDfl);
    }
}

fn main() -> ExitCode {
    let matches = <Cli as clap::CommandFactory>::command().get_matches();
    let cli = match <Cli as clap::FromArgMatches>::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    // No --endpoint and no SHOAL_ENDPOINT: the one `shoal login` saved, if any.
    let endpoint_defaulted =
        matches.value_source("endpoint") == Some(clap::parser::ValueSource::DefaultValue);
    let is_server = matches!(
        cli.command,
        Command::Up(_) | Command::Coordinator(_) | Command::Agent(_)
    );
    init_logging(if is_server { "info" } else { "warn" });
    tracing::info!(
        allocator = alloc::chosen(),
        version = env!("CARGO_PKG_VERSION"),
        "shoal starting"
    );
    // Only short-lived client commands: servers and helpers must see EPIPE as an
    // error on the one connection, not die of it.
    if !is_server && !matches!(cli.command, Command::Quickstart(_) | Command::Mpi(_)) {
        die_quietly_on_closed_stdout();
    }
    // One thread drives a client command (one conversation with the coordinator,
    // with no worker threads to start and wake: issue 17's latency) and an agent
    // (it waits on processes and one session; its blocking work goes to the
    // blocking pool). An agent on worker threads spent a fifth of its CPU handing
    // each job's events from thread to thread: one thread ran 7% more short
    // tasks a second (median of 5 runs alternated with the build before;
    // bench/RESULTS.md, issue 17 part 7).
    let one_conversation =
        !is_server && !matches!(cli.command, Command::Quickstart(_) | Command::Mpi(_));
    let one_thread = one_conversation || matches!(cli.command, Command::Agent(_));
    let mut builder = if one_thread {
        tokio::runtime::Builder::new_current_thread()
    } else {
        tokio::runtime::Builder::new_multi_thread()
    };
    let runtime = match builder.enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async move {
        let _ = client::TOKEN.set(cli.token.clone());
        let _ = client::CA_FILE.set(cli.ca_file.clone());
        let format = cli.output;
        let endpoint = match client::saved_endpoint() {
            Some(saved) if endpoint_defaulted => saved,
            _ => cli.endpoint,
        };
        match cli.command {
            Command::Quickstart(Deferred(args)) => quickstart::run(args).await,
            Command::Up(Deferred(args)) | Command::Coordinator(Deferred(args)) => {
                serve::run(args).await
            }
            Command::Agent(args) => agent::run(args).await,
            Command::Cluster(Deferred(command)) => cluster::run(command, &endpoint, format).await,
            Command::Job(Deferred(command)) => job::run(command, &endpoint, format).await,
            Command::Node(Deferred(command)) => node::run(command, &endpoint, format).await,
            Command::Datastore(Deferred(command)) => {
                assets::run_datastore(command, &endpoint, format).await
            }
            Command::Data(Deferred(command)) => assets::run_data(command, &endpoint, format).await,
            Command::Environment(Deferred(command)) => {
                assets::run_environment(command, &endpoint, format).await
            }
            Command::Component(Deferred(command)) => {
                assets::run_component(command, &endpoint, format).await
            }
            Command::Configure(Deferred(args)) => {
                assets::run_configure(args, &endpoint, format).await
            }
            Command::Ml(Deferred(args)) => ml::run(args, &endpoint, format).await,
            Command::VmSize(Deferred(command)) => {
                node::run_vm_sizes(command, &endpoint, format).await
            }
            Command::Quota(Deferred(command)) => node::run_quota(command, &endpoint, format).await,
            Command::Mpi(Deferred(command)) => mpi::run(command).await,
            Command::Token(Deferred(command)) => token::run(command, &endpoint, format).await,
            Command::Login(Deferred(args)) => token::login(args, &endpoint).await,
            Command::JoinToken(Deferred(command)) => {
                token::run_join_token(command, &endpoint, format).await
            }
            Command::Identity(Deferred(command)) => {
                token::run_identity(command, &endpoint, format).await
            }
        }
    });
    match result {
        Ok(code) => code,
        Err(error) => {
            eprintln!("error: {error:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    /// Clap checks its definitions only when a command runs: check them all here.
    #[test]
    fn the_command_line_is_well_formed() {
        super::Cli::command().debug_assert();
    }
}
