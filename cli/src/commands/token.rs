//! `shoal token` (API tokens, admin only) and `shoal login`.

use std::process::ExitCode;

use anyhow::Context;
use clap::{Args, Subcommand};
use comfy_table::Table;
use shoal_proto::v1 as pb;

use crate::client::{Client, save_credentials, status};
use crate::output::{self, Format};

#[derive(Subcommand)]
pub enum Command {
    /// Make an API token (printed once; only its hash is kept).
    ///
    /// Roles: reader (see everything), user (also submit and cancel jobs),
    /// admin (everything: clusters, quotas, tokens). Use it as
    /// `Authorization: Bearer TOKEN` over HTTP (Prometheus: a reader token), or
    /// `shoal login --token TOKEN` for the CLI.
    Create {
        #[arg(long, default_value = "user", value_parser = ["reader", "user", "admin"])]
        role: String,
        /// What the token is for (shown by `token list`).
        #[arg(long, default_value = "")]
        name: String,
    },
    /// The API tokens (never their secrets).
    List,
    /// Revoke a token: calls with it are refused from now on.
    Revoke { id: String },
}

/// The token comes from --token / SHOAL_TOKEN, or else from a line on stdin
/// (`shoal login < token-file`), so that it stays out of `ps`.
#[derive(Args)]
pub struct LoginArgs {}

pub async fn run(command: Command, endpoint: &str, format: Format) -> anyhow::Result<ExitCode> {
    let client = Client::connect(endpoint).await?;
    let mut tokens = client.tokens();
    match command {
        Command::Create { role, name } => {
            let created = tokens
                .create(pb::TokenRequest { role, name })
                .await
                .map_err(status)?
                .into_inner();
            if format == Format::Json {
                output::json(&serde_json::json!({
                    "id": created.info.as_ref().map(|i| i.id.clone()),
                    "role": created.info.as_ref().map(|i| i.role.clone()),
                    "token": created.token,
                }))?;
            } else {
                println!("{}", created.token);
                eprintln!("(shown once: keep it; `shoal token revoke ID` ends it)");
            }
        }
        Command::List => {
            let list = tokens
                .list(pb::ListTokensRequest {})
                .await
                .map_err(status)?
                .into_inner()
                .tokens;
            if format == Format::Json {
                let rows: Vec<shoal_coordinator::view::Token> = list
                    .iter()
                    .map(shoal_coordinator::view::Token::from)
                    .collect();
                output::json(&rows)?;
            } else {
                let mut table = Table::new();
                table.load_preset(comfy_table::presets::NOTHING);
                table.set_header(["ID", "ROLE", "NAME", "CREATED", "REVOKED"]);
                for t in list {
                    table.add_row([
                        t.id,
                        t.role,
                        t.name,
                        output::ago(t.created_at_ms),
                        if t.revoked {
                            "yes".into()
                        } else {
                            String::new()
                        },
                    ]);
                }
                println!("{table}");
            }
        }
        Command::Revoke { id } => {
            let revoked = tokens
                .revoke(pb::TokenRef { id })
                .await
                .map_err(status)?
                .into_inner();
            println!("revoked {} ({})", revoked.id, revoked.role);
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Checks the token against the coordinator, then saves it for the endpoint.
pub async fn login(_: LoginArgs, endpoint: &str) -> anyhow::Result<ExitCode> {
    let token = match crate::client::TOKEN.get().cloned().flatten() {
        Some(token) => token,
        None => {
            let mut line = String::new();
            std::io::stdin()
                .read_line(&mut line)
                .context("cannot read the token from stdin")?;
            line.trim().to_string()
        }
    };
    if token.is_empty() {
        anyhow::bail!("no token: give --token, SHOAL_TOKEN, or a line on stdin");
    }
    let client = Client::connect_with_token(endpoint, Some(token.clone())).await?;
    client
        .vm_sizes()
        .list(pb::ListVmSizesRequest {})
        .await
        .map_err(status)
        .context("the coordinator did not accept the token")?;
    let saved = save_credentials(endpoint, &token)?;
    crate::client::save_endpoint(endpoint)?;
    println!(
        "signed in to {endpoint} (now the default endpoint); the token is saved in {}",
        saved.display()
    );
    Ok(ExitCode::SUCCESS)
}

#[derive(Subcommand)]
pub enum IdentityCommand {
    /// Make a user-assigned identity (prints its client id).
    Create { name: String },
    /// The user-assigned identities.
    List,
}

pub async fn run_identity(
    command: IdentityCommand,
    endpoint: &str,
    format: Format,
) -> anyhow::Result<ExitCode> {
    let client = Client::connect(endpoint).await?;
    let mut identities = client.identities();
    let list = match command {
        IdentityCommand::Create { name } => vec![
            identities
                .create(pb::IdentityRequest { name })
                .await
                .map_err(status)?
                .into_inner(),
        ],
        IdentityCommand::List => {
            identities
                .list(pb::ListIdentitiesRequest {})
                .await
                .map_err(status)?
                .into_inner()
                .identities
        }
    };
    super::cluster::print_identities(&list, format)?;
    Ok(ExitCode::SUCCESS)
}

#[derive(Subcommand)]
pub enum JoinTokenCommand {
    /// Make a join token: `shoal agent --join-token TOKEN --endpoint URL --work-dir DIR`
    /// on another machine then joins the cluster (printed once).
    Create {
        #[arg(long, visible_alias = "compute")]
        cluster: String,
        /// How long it can be used: 30m, 24h, 7d.
        #[arg(long, default_value = "24h", value_parser = humantime::parse_duration)]
        ttl: std::time::Duration,
        /// How many agents may join with it.
        #[arg(long, default_value_t = 1)]
        uses: u32,
    },
    /// The join tokens (never their secrets).
    List,
    /// Revoke a join token: no more agents join with it.
    Revoke { id: String },
}

pub async fn run_join_token(
    command: JoinTokenCommand,
    endpoint: &str,
    format: Format,
) -> anyhow::Result<ExitCode> {
    let client = Client::connect(endpoint).await?;
    let mut tokens = client.join_tokens();
    match command {
        JoinTokenCommand::Create { cluster, ttl, uses } => {
            let created = tokens
                .create(pb::JoinTokenRequest {
                    cluster,
                    ttl_seconds: ttl.as_secs().max(1),
                    uses,
                })
                .await
                .map_err(status)?
                .into_inner();
            if format == Format::Json {
                output::json(&serde_json::json!({
                    "id": created.info.as_ref().map(|i| i.id.clone()),
                    "token": created.token,
                }))?;
            } else {
                println!("{}", created.token);
            }
        }
        JoinTokenCommand::List => {
            let list = tokens
                .list(pb::ListJoinTokensRequest {})
                .await
                .map_err(status)?
                .into_inner()
                .tokens;
            for t in list {
                println!(
                    "{}  {}  uses left {}  expires {}{}",
                    t.id,
                    t.cluster,
                    t.uses_left,
                    output::ago(t.expires_at_ms),
                    if t.revoked { "  revoked" } else { "" }
                );
            }
        }
        JoinTokenCommand::Revoke { id } => {
            let t = tokens
                .revoke(pb::TokenRef { id })
                .await
                .map_err(status)?
                .into_inner();
            println!("revoked join token {} of {}", t.id, t.cluster);
        }
    }
    Ok(ExitCode::SUCCESS)
}
