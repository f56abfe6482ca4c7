//! Reaching the coordinator: one gRPC channel, errors a person can act on.

use std::time::Duration;

use anyhow::{Context, anyhow};
use shoal_proto::v1::{
    clusters_client::ClustersClient, data_assets_client::DataAssetsClient,
    datastores_client::DatastoresClient, environments_client::EnvironmentsClient,
    identities_client::IdentitiesClient, jobs_client::JobsClient, nodes_client::NodesClient,
    quotas_client::QuotasClient, settings_client::SettingsClient, tokens_client::TokensClient,
    vm_sizes_client::VmSizesClient,
};
use shoal_proto::{AuthChannel, Bearer};
use tonic::transport::Endpoint;

/// The token given with --token / SHOAL_TOKEN, set once by `main`.
pub static TOKEN: std::sync::OnceLock<Option<String>> = std::sync::OnceLock::new();
/// The CA file given with --ca-file / SHOAL_CA_FILE, set once by `main`.
pub static CA_FILE: std::sync::OnceLock<Option<std::path::PathBuf>> = std::sync::OnceLock::new();

fn ca_files_path() -> Option<std::path::PathBuf> {
    config_dir().map(|dir| dir.join("ca-files.json"))
}

/// Remembers the CA that checks `endpoint`'s certificate.
pub fn save_ca_file(endpoint: &str, ca: &std::path::Path) -> anyhow::Result<()> {
    let path =
        ca_files_path().ok_or_else(|| anyhow!("no config dir: set SHOAL_CONFIG_DIR or HOME"))?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let mut all: std::collections::BTreeMap<String, String> = std::fs::read_to_string(&path)
        .ok()
        .and_then(|t| serde_json::from_str(&t).ok())
        .unwrap_or_default();
    let ca = std::fs::canonicalize(ca).unwrap_or_else(|_| ca.to_path_buf());
    all.insert(normalize(endpoint), ca.display().to_string());
    std::fs::write(&path, serde_json::to_string_pretty(&all)?)
        .with_context(|| format!("cannot write {}", path.display()))
}

/// The CA for `endpoint`: --ca-file / SHOAL_CA_FILE, else the one saved for it.
fn ca_file_for(endpoint: &str) -> Option<std::path::PathBuf> {
    CA_FILE.get().cloned().flatten().or_else(|| {
        let text = std::fs::read_to_string(ca_files_path()?).ok()?;
        let all: std::collections::BTreeMap<String, String> = serde_json::from_str(&text).ok()?;
        all.get(&normalize(endpoint)).map(std::path::PathBuf::from)
    })
}

/// Where the CLI keeps its credentials: $SHOAL_CONFIG_DIR, else
/// $XDG_CONFIG_HOME/shoal, else ~/.config/shoal.
pub fn config_dir() -> Option<std::path::PathBuf> {
    if let Some(dir) = std::env::var_os("SHOAL_CONFIG_DIR") {
        return Some(dir.into());
    }
    if let Some(dir) = std::env::var_os("XDG_CONFIG_HOME") {
        return Some(std::path::PathBuf::from(dir).join("shoal"));
    }
    std::env::var_os("HOME").map(|home| std::path::PathBuf::from(home).join(".config/shoal"))
}

/// The endpoint `shoal login` saved as the default.
pub fn saved_endpoint() -> Option<String> {
    let text = std::fs::read_to_string(config_dir()?.join("config.json")).ok()?;
    let value: serde_json::Value = serde_json::from_str(&text).ok()?;
    value["endpoint"].as_str().map(str::to_string)
}

/// Makes `endpoint` the CLI's default.
pub fn save_endpoint(endpoint: &str) -> anyhow::Result<()> {
    let dir = config_dir().ok_or_else(|| anyhow!("no config dir: set SHOAL_CONFIG_DIR or HOME"))?;
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let path = dir.join("config.json");
    std::fs::write(
        &path,
        serde_json::json!({ "endpoint": endpoint }).to_string(),
    )
    .with_context(|| format!("cannot write {}", path.display()))
}

fn credentials_path() -> Option<std::path::PathBuf> {
    config_dir().map(|dir| dir.join("credentials.json"))
}

fn credentials() -> std::collections::BTreeMap<String, String> {
    credentials_path()
        .and_then(|path| std::fs::read_to_string(path).ok())
        .and_then(|text| serde_json::from_str(&text).ok())
        .unwrap_or_default()
}

/// Remembers `token` for `endpoint` (the file is readable by its owner only).
pub fn save_credentials(endpoint: &str, token: &str) -> anyhow::Result<std::path::PathBuf> {
    let path =
        credentials_path().ok_or_else(|| anyhow!("no config dir: set SHOAL_CONFIG_DIR or HOME"))?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    }
    let mut all = credentials();
    all.insert(normalize(endpoint), token.trim().to_string());
    let text = serde_json::to_string_pretty(&all)?;
    shoal_coordinator::auth::write_secret(&path, &text)
        .map_err(|e| anyhow!("cannot save credentials: {e}"))?;
    Ok(path)
}

/// The token for `endpoint`: --token / SHOAL_TOKEN, else the one saved for it.
pub fn token_for(endpoint: &str) -> Option<String> {
    TOKEN
        .get()
        .cloned()
        .flatten()
        .or_else(|| credentials().get(&normalize(endpoint)).cloned())
}

const MAX_MESSAGE_BYTES: usize = 256 << 20;

/// Each of a comma-separated list of endpoints, normalized.
pub fn normalize_all(list: &str) -> String {
    shoal_agent::coordinators::endpoints(list)
        .into_iter()
        .map(normalize)
        .collect::<Vec<_>>()
        .join(",")
}

/// `127.0.0.1:7070` and `http://127.0.0.1:7070` both work.
pub fn normalize(endpoint: &str) -> String {
    if endpoint.contains("://") {
        endpoint.to_string()
    } else {
        format!("http://{endpoint}")
    }
}

#[derive(Clone)]
pub struct Client {
    channel: AuthChannel,
}

impl Client {
    /// `endpoint` may list several, comma-separated (a leader and its
    /// standby): the first that answers is used.
    pub async fn connect(endpoint: &str) -> anyhow::Result<Self> {
        let all = shoal_agent::coordinators::endpoints(endpoint);
        if all.len() <= 1 {
            return Self::connect_with_token(endpoint, token_for(endpoint)).await;
        }
        let mut failures = Vec::new();
        for one in all {
            let token = token_for(endpoint).or_else(|| token_for(one));
            match Self::connect_with_token(one, token).await {
                Ok(client) => return Ok(client),
                Err(e) => failures.push(e.to_string()),
            }
        }
        Err(anyhow!(
            "none of the coordinator's endpoints answers: {}",
            failures.join("; ")
        ))
    }

    pub async fn connect_with_token(endpoint: &str, token: Option<String>) -> anyhow::Result<Self> {
        let url = normalize(endpoint);
        let mut builder = Endpoint::from_shared(url.clone())
            .with_context(|| format!("`{endpoint}` is not an endpoint (expected host:port)"))?
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_secs(3));
        if url.starts_with("https://") {
            let mut tls = tonic::transport::ClientTlsConfig::new();
            if let Some(ca) = ca_file_for(endpoint) {
                let pem = std::fs::read(&ca)
                    .with_context(|| format!("cannot read the CA file {}", ca.display()))?;
                tls = tls.ca_certificate(tonic::transport::Certificate::from_pem(pem));
            }
            builder = builder.tls_config(tls).context("cannot set up TLS")?;
        }
        let channel = builder.connect().await.map_err(|e| {
            let why = source_text(&e);
            if why.contains("certificate") || why.contains("UnknownIssuer") {
                anyhow!(
                    "refusing the coordinator at {url}: its certificate is not signed by the CA given (--ca-file / SHOAL_CA_FILE, or the one `shoal up --tls` saved): {why}"
                )
            } else {
                anyhow!(
                    "cannot reach the coordinator at {url} ({why}); start one with `shoal up`, or point --endpoint / SHOAL_ENDPOINT at it"
                )
            }
        })?;
        let bearer = Bearer::new(token.as_deref()).map_err(|e| anyhow!(e))?;
        Ok(Client {
            channel: tonic::service::interceptor::InterceptedService::new(channel, bearer),
        })
    }

    pub fn clusters(&self) -> ClustersClient<AuthChannel> {
        ClustersClient::new(self.channel.clone())
    }

    pub fn jobs(&self) -> JobsClient<AuthChannel> {
        JobsClient::new(self.channel.clone())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }

    pub fn nodes(&self) -> NodesClient<AuthChannel> {
        NodesClient::new(self.channel.clone())
    }

    pub fn quotas(&self) -> QuotasClient<AuthChannel> {
        QuotasClient::new(self.channel.clone())
    }

    pub fn join_tokens(
        &self,
    ) -> shoal_proto::v1::join_tokens_client::JoinTokensClient<AuthChannel> {
        shoal_proto::v1::join_tokens_client::JoinTokensClient::new(self.channel.clone())
    }

    pub fn identities(&self) -> IdentitiesClient<AuthChannel> {
        IdentitiesClient::new(self.channel.clone())
    }

    pub fn tokens(&self) -> TokensClient<AuthChannel> {
        TokensClient::new(self.channel.clone())
    }

    pub fn vm_sizes(&self) -> VmSizesClient<AuthChannel> {
        VmSizesClient::new(self.channel.clone())
    }

    pub fn datastores(&self) -> DatastoresClient<AuthChannel> {
        DatastoresClient::new(self.channel.clone())
    }

    pub fn data_assets(&self) -> DataAssetsClient<AuthChannel> {
        DataAssetsClient::new(self.channel.clone())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }

    pub fn environments(&self) -> EnvironmentsClient<AuthChannel> {
        EnvironmentsClient::new(self.channel.clone())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }

    pub fn components(&self) -> shoal_proto::v1::components_client::ComponentsClient<AuthChannel> {
        shoal_proto::v1::components_client::ComponentsClient::new(self.channel.clone())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }

    pub fn settings(&self) -> SettingsClient<AuthChannel> {
        SettingsClient::new(self.channel.clone())
    }
}

/// The innermost cause: "Connection refused (os error 111)" rather than "transport error".
fn source_text(error: &(dyn std::error::Error + 'static)) -> String {
    let mut current = error;
    while let Some(next) = current.source() {
        current = next;
    }
    current.to_string()
}

/// A failed call, as the coordinator worded it.
pub fn status(error: tonic::Status) -> anyhow::Error {
    if error.code() == tonic::Code::Unavailable {
        return anyhow!("the coordinator is unavailable: {}", error.message());
    }
    if error.code() == tonic::Code::Unauthenticated {
        return anyhow!("not signed in: {}", error.message());
    }
    if error.code() == tonic::Code::PermissionDenied {
        return anyhow!("not allowed: {}", error.message());
    }
    anyhow!("{}", error.message())
}
