//! What the providers that start agents on other machines (slurm, command) share:
//! where those agents reach the coordinator, a one-use join token per node (the
//! agent joins as that node and gets its own credential), and running the
//! programs that make and remove nodes.

use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use tokio::io::AsyncWriteExt;

use super::NodeLaunch;

#[derive(Clone, Debug)]
pub struct RemoteAgents {
    /// Where agents on other machines reach this coordinator (`advertise_endpoint`).
    pub endpoint: String,
    /// The CA of the coordinator's certificate, for https endpoints.
    pub ca_file: Option<PathBuf>,
    pub auth: crate::auth::Auth,
    /// How long a node's join token is good for: as long as the node has to register.
    pub token_ttl: Duration,
    /// The `shoal` binary (the slurm provider's default for its machines).
    pub program: PathBuf,
    /// This coordinator's id: labels what its providers made.
    pub owner: String,
    pub lease: Duration,
    pub job_stop_grace: Duration,
}

impl RemoteAgents {
    /// A join token good once, for this node only.
    pub fn join_token(&self, launch: &NodeLaunch) -> Result<String, String> {
        let ttl = i64::try_from(self.token_ttl.as_millis()).unwrap_or(i64::MAX);
        self.auth
            .create_node_join_token(&launch.cluster, &launch.node_id, ttl)
            .map_err(|e| format!("cannot make the node's join token: {e}"))
    }

    /// `shoal agent` for a node, with everything but the join token (which goes
    /// in `SHOAL_JOIN_TOKEN`, out of the process list).
    pub fn agent_args(&self, program: &str, launch: &NodeLaunch, work_dir: &str) -> Vec<String> {
        let mut args = vec![
            program.to_string(),
            "agent".into(),
            "--endpoint".into(),
            self.endpoint.clone(),
        ];
        args.extend(super::agent_flags(
            &self.owner,
            work_dir,
            launch,
            self.job_stop_grace,
            self.lease,
        ));
        if let Some(ca) = &self.ca_file {
            args.extend(["--ca-file".into(), ca.display().to_string()]);
        }
        args
    }
}

/// Runs a program to its end within `limit`, `input` on its stdin: its stdout,
/// or why not (its exit status and the end of its stderr).
pub async fn run_program(
    program: &str,
    args: &[String],
    input: Option<String>,
    limit: Duration,
) -> Result<String, String> {
    let mut command = tokio::process::Command::new(program);
    command
        .args(args)
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let mut child = command
        .spawn()
        .map_err(|e| format!("cannot run {program}: {e}"))?;
    if let (Some(text), Some(mut stdin)) = (input, child.stdin.take()) {
        // A program that does not read its input is its own business.
        let _ = stdin.write_all(text.as_bytes()).await;
        drop(stdin);
    }
    let output = tokio::time::timeout(limit, child.wait_with_output())
        .await
        .map_err(|_| format!("{program} did not finish within {} s", limit.as_secs()))?
        .map_err(|e| format!("cannot run {program}: {e}"))?;
    if output.status.success() {
        return Ok(String::from_utf8_lossy(&output.stdout).into_owned());
    }
    let stderr = String::from_utf8_lossy(&output.stderr);
    let tail: Vec<&str> = stderr.trim_end().lines().rev().take(3).collect();
    let tail: Vec<&str> = tail.into_iter().rev().collect();
    Err(format!(
        "{program} failed ({}): {}",
        output.status,
        if tail.is_empty() {
            "no error output".to_string()
        } else {
            tail.join(" / ")
        }
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_program_gets_its_input_and_a_failure_says_why() {
        let echoed = run_program(
            "sh",
            &["-c".into(), "cat; echo done".into()],
            Some("{\"node_id\":\"n1\"}\n".into()),
            Duration::from_secs(10),
        )
        .await
        .expect("ran");
        assert_eq!(echoed, "{\"node_id\":\"n1\"}\ndone\n");
        let failed = run_program(
            "sh",
            &["-c".into(), "echo no quota >&2; exit 3".into()],
            None,
            Duration::from_secs(10),
        )
        .await
        .unwrap_err();
        assert!(
            failed.contains("exit status: 3") && failed.contains("no quota"),
            "{failed}"
        );
        let slow = run_program("sleep", &["5".into()], None, Duration::from_millis(200))
            .await
            .unwrap_err();
        assert!(slow.contains("did not finish within"), "{slow}");
    }
}
