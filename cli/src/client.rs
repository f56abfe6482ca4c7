//! Reaching the coordinator: one gRPC channel, errors a person can act on.

use std::time::Duration;

use anyhow::{Context, anyhow};
use shoal_proto::v1::{
    clusters_client::ClustersClient, jobs_client::JobsClient, nodes_client::NodesClient,
    quotas_client::QuotasClient, vm_sizes_client::VmSizesClient,
};
use tonic::transport::{Channel, Endpoint};

const MAX_MESSAGE_BYTES: usize = 256 << 20;

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
    channel: Channel,
}

impl Client {
    pub async fn connect(endpoint: &str) -> anyhow::Result<Self> {
        let url = normalize(endpoint);
        let channel = Endpoint::from_shared(url.clone())
            .with_context(|| format!("`{endpoint}` is not an endpoint (expected host:port)"))?
            .tcp_nodelay(true)
            .connect_timeout(Duration::from_secs(3))
            .connect()
            .await
            .map_err(|e| {
                anyhow!(
                    "cannot reach the coordinator at {url} ({}); start one with `shoal up`, or point --endpoint / SHOAL_ENDPOINT at it",
                    source_text(&e)
                )
            })?;
        Ok(Client { channel })
    }

    pub fn clusters(&self) -> ClustersClient<Channel> {
        ClustersClient::new(self.channel.clone())
    }

    pub fn jobs(&self) -> JobsClient<Channel> {
        JobsClient::new(self.channel.clone())
            .max_decoding_message_size(MAX_MESSAGE_BYTES)
            .max_encoding_message_size(MAX_MESSAGE_BYTES)
    }

    pub fn nodes(&self) -> NodesClient<Channel> {
        NodesClient::new(self.channel.clone())
    }

    pub fn quotas(&self) -> QuotasClient<Channel> {
        QuotasClient::new(self.channel.clone())
    }

    pub fn vm_sizes(&self) -> VmSizesClient<Channel> {
        VmSizesClient::new(self.channel.clone())
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
    anyhow!("{}", error.message())
}
