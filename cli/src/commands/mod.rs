pub mod agent;
pub mod assets;
pub mod cluster;
pub mod job;
pub mod local;
pub mod metrics;
pub mod ml;
pub mod mpi;
pub mod node;
pub mod quickstart;
pub mod serve;
pub mod token;

/// SIGINT or SIGTERM, whichever comes first.
pub async fn stop_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(term) => term,
        Err(_) => {
            let _ = tokio::signal::ctrl_c().await;
            return;
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}

/// `k=v` for --tag and --env.
pub fn key_value(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_string(), value.to_string())),
        _ => Err(format!("`{text}` is not KEY=VALUE")),
    }
}
