//! `shoal up` / `shoal coordinator`: the coordinator in the foreground.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use shoal_coordinator::server::{ConfigFile, CoordinatorConfig, serve};

#[derive(clap::Args)]
pub struct Args {
    /// Where the database, code snapshots, outputs and node work dirs live
    /// [default: $XDG_DATA_HOME/shoal, else ~/.local/share/shoal].
    #[arg(long, env = "SHOAL_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Address for gRPC and HTTP (one port). Loopback only until TLS and auth exist.
    #[arg(long, default_value = "127.0.0.1:7070")]
    pub listen: SocketAddr,
    /// A YAML config (extra `vm_sizes`, `agent_grace_seconds`, `max_code_mib`)
    /// [default: <data-dir>/shoal.yaml if it exists].
    #[arg(long)]
    pub config: Option<PathBuf>,
}

pub fn default_data_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("XDG_DATA_HOME").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir).join("shoal");
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    home.join(".local/share/shoal")
}

pub fn load_config(
    data_dir: &std::path::Path,
    explicit: Option<&PathBuf>,
) -> anyhow::Result<ConfigFile> {
    let path = match explicit {
        Some(path) => path.clone(),
        None => {
            let default = data_dir.join("shoal.yaml");
            if !default.exists() {
                return Ok(ConfigFile::default());
            }
            default
        }
    };
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("cannot read config {}", path.display()))?;
    ConfigFile::from_yaml(&text).with_context(|| format!("in {}", path.display()))
}

pub async fn run(args: Args) -> anyhow::Result<ExitCode> {
    if !args.listen.ip().is_loopback() {
        bail!(
            "refusing to listen on {}: anything beyond loopback needs TLS and authentication, which this build does not have yet; use --listen 127.0.0.1:PORT",
            args.listen
        );
    }
    let data_dir = args.data_dir.clone().unwrap_or_else(default_data_dir);
    let file = load_config(&data_dir, args.config.as_ref())?;
    let program =
        std::env::current_exe().context("cannot find the shoal binary to start agents with")?;
    // The local user's admin token: made on first start, saved for the CLI before
    // the port opens (whoever connects first finds it).
    shoal_coordinator::auth::bootstrap(&data_dir)?;
    let token_file = data_dir.join("admin.token");
    match std::fs::read_to_string(&token_file) {
        Ok(token) => match crate::client::save_credentials(&args.listen.to_string(), &token) {
            Ok(saved) => eprintln!(
                "the CLI signs in with the admin token in {} (saved for {} in {})",
                token_file.display(),
                args.listen,
                saved.display()
            ),
            Err(e) => eprintln!(
                "warning: {e:#}; sign in with `shoal login --token $(cat {})`",
                token_file.display()
            ),
        },
        Err(_) => eprintln!(
            "no {}: sign in with a token from `shoal token create` (`shoal login`)",
            token_file.display()
        ),
    }
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .with_context(|| {
            format!(
                "cannot listen on {} (is another coordinator running?)",
                args.listen
            )
        })?;
    eprintln!(
        "shoal coordinator on {} (data in {}); Ctrl-C stops it and its nodes",
        args.listen,
        data_dir.display()
    );
    let config = CoordinatorConfig::new(data_dir, program, file);
    serve(listener, config, super::stop_signal()).await?;
    Ok(ExitCode::SUCCESS)
}
