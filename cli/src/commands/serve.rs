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
    /// Address for gRPC and HTTP (one port). Anything beyond loopback needs TLS.
    #[arg(long, default_value = "127.0.0.1:7070")]
    pub listen: SocketAddr,
    /// Serve TLS with a CA and a certificate made in <data-dir>/tls on first start
    /// (clients check it with `--ca-file <data-dir>/tls/ca.pem`).
    #[arg(long, conflicts_with = "tls_cert")]
    pub tls: bool,
    /// Serve TLS with this certificate (PEM, chain first) instead.
    #[arg(long, requires = "tls_key")]
    pub tls_cert: Option<PathBuf>,
    /// The private key (PEM) of --tls-cert.
    #[arg(long, requires = "tls_cert")]
    pub tls_key: Option<PathBuf>,
    /// The CA that signed --tls-cert, saved for the local CLI.
    #[arg(long, requires = "tls_cert")]
    pub tls_ca: Option<PathBuf>,
    /// A YAML config (extra `vm_sizes`, `agent_grace_seconds`, `max_code_mib`)
    /// [default: <data-dir>/shoal.yaml if it exists].
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// Keep jobs, clusters, nodes, tokens and MLflow runs in this PostgreSQL
    /// database (postgres://user[:password]@host[:port]/db) instead of SQLite in
    /// the data dir (files stay there). Several coordinators may share one: one
    /// leads, the others stand by (without listening) and take over within
    /// `leader_lease_seconds` (default 6) of the leader's end. TLS as libpq's
    /// `?sslmode=verify-full&sslrootcert=ca.pem` (without sslrootcert, the
    /// server's certificate is checked against the Mozilla roots; sslmode=disable
    /// for none).
    #[arg(long, env = "SHOAL_STORE", value_name = "URL")]
    pub store: Option<String>,
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
    let tls_on = args.tls || args.tls_cert.is_some();
    if !args.listen.ip().is_loopback() && !tls_on {
        bail!(
            "refusing to listen on {} without TLS: tokens would cross the network in the clear. Add --tls (a CA and certificate are made in the data dir) or --tls-cert/--tls-key; or use --listen 127.0.0.1:PORT",
            args.listen
        );
    }
    let data_dir = args.data_dir.clone().unwrap_or_else(default_data_dir);
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(shoal_coordinator::tls::TlsFiles {
            cert: cert.clone(),
            key: key.clone(),
            ca: args.tls_ca.clone(),
        }),
        _ if args.tls => Some(shoal_coordinator::tls::self_signed(
            &data_dir.join("tls"),
            &shoal_coordinator::tls::names_for(args.listen),
        )?),
        _ => None,
    };
    // How the local CLI reaches this coordinator.
    let client_endpoint = {
        let host = if args.listen.ip().is_unspecified() {
            std::net::SocketAddr::new([127, 0, 0, 1].into(), args.listen.port())
        } else {
            args.listen
        };
        match &tls {
            Some(_) => format!("https://{host}"),
            None => host.to_string(),
        }
    };
    let file = load_config(&data_dir, args.config.as_ref())?;
    let program =
        std::env::current_exe().context("cannot find the shoal binary to start agents with")?;
    std::fs::create_dir_all(&data_dir)
        .with_context(|| format!("cannot create data dir {}", data_dir.display()))?;
    let mut config = CoordinatorConfig::new(data_dir.clone(), program, file);
    if let Some(url) = &args.store {
        if !(url.starts_with("postgres://") || url.starts_with("postgresql://")) {
            bail!("--store takes a PostgreSQL URL (postgres://user@host:port/db), not `{url}`");
        }
        let lease = config.lease()?;
        // A standby waits here, not listening: clients given several endpoints
        // go on to the leader.
        let (waiting_url, waiting_lease) = (url.clone(), lease.clone());
        tokio::task::spawn_blocking(move || {
            shoal_coordinator::leader::wait_for_lead(&waiting_url, &waiting_lease, |holder| {
                eprintln!(
                    "standing by: coordinator {holder} leads {}; taking over when its lease lapses",
                    shoal_coordinator::db::redact(&waiting_url)
                )
            })
        })
        .await
        .context("waiting for the lead")??;
        eprintln!(
            "leading {} as {}",
            shoal_coordinator::db::redact(url),
            lease.holder
        );
        config.postgres = Some((url.clone(), lease));
    }
    // The local user's admin token: made on first start, saved for the CLI before
    // the port opens (whoever connects first finds it).
    match &config.postgres {
        None => shoal_coordinator::auth::bootstrap(&data_dir)?,
        Some((url, _)) => shoal_coordinator::auth::bootstrap_with(
            &shoal_coordinator::auth::Auth::postgres(url)?,
            &data_dir,
        )?,
    };
    let token_file = data_dir.join("admin.token");
    match std::fs::read_to_string(&token_file) {
        Ok(token) => match crate::client::save_credentials(&client_endpoint, &token) {
            Ok(saved) => eprintln!(
                "the CLI signs in with the admin token in {} (saved for {} in {})",
                token_file.display(),
                client_endpoint,
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
    if let Some(files) = &tls {
        match &files.ca {
            Some(ca) => {
                if let Err(e) = crate::client::save_ca_file(&client_endpoint, ca) {
                    eprintln!("warning: {e:#}");
                }
                eprintln!(
                    "TLS on; clients check it with --ca-file {} (saved for {client_endpoint})",
                    ca.display()
                );
            }
            None => eprintln!("TLS on, with {}", files.cert.display()),
        }
    }
    config.tls = tls;
    serve(listener, config, super::stop_signal()).await?;
    Ok(ExitCode::SUCCESS)
}
