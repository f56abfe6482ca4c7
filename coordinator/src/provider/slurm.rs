//! The `slurm` provider: each node is a Slurm allocation (one node, the VM
//! size's cores and memory) whose batch script runs `shoal agent` with a one-use
//! join token, as HyperQueue's automatic allocation does. Scale-down is
//! `scancel`; an allocation that ends by itself (time limit, failure, Slurm
//! preemption) ends the node, and its work is requeued; a pending one shows
//! Slurm's reason as the preparing node's message. The coordinator's machine
//! needs `sbatch`, `squeue` and `scancel` (a login node).

use std::time::Duration;

use futures::FutureExt;
use futures::future::BoxFuture;
use tracing::{info, warn};

use super::remote::{RemoteAgents, run_program};
use super::{NodeExit, NodeLaunch, NodeProvider, NodeRemoval, Notes, StartedNode};

/// How long one `sbatch`, `squeue` or `scancel` may take.
const CALL_LIMIT: Duration = Duration::from_secs(30);

#[derive(Clone, Debug)]
pub struct SlurmProvider {
    pub remote: RemoteAgents,
    /// How often an allocation's state is asked for.
    pub poll: Duration,
}

/// What one allocation is, by `squeue -t all -o '%T|%r'`.
#[derive(Clone, Debug, PartialEq, Eq)]
enum Allocation {
    Pending(String),
    Running,
    Ended { state: String, reason: String },
    Unknown,
}

fn parse_state(line: &str) -> Allocation {
    let (state, reason) = line.trim().split_once('|').unwrap_or((line.trim(), ""));
    let reason = if reason == "None" { "" } else { reason };
    match state {
        "" => Allocation::Unknown,
        "PENDING" | "CONFIGURING" | "REQUEUED" | "REQUEUE_HOLD" | "REQUEUE_FED"
        | "RESV_DEL_HOLD" | "SUSPENDED" => Allocation::Pending(if reason.is_empty() {
            state.to_ascii_lowercase()
        } else {
            reason.to_string()
        }),
        "RUNNING" | "COMPLETING" | "RESIZING" | "SIGNALING" | "STAGE_OUT" => Allocation::Running,
        other => Allocation::Ended {
            state: other.to_string(),
            reason: reason.to_string(),
        },
    }
}

impl SlurmProvider {
    /// The batch script: the join token in the environment, then the agent.
    fn script(&self, launch: &NodeLaunch, token: &str) -> Result<String, String> {
        let program = launch
            .settings
            .get("agent_program")
            .cloned()
            .unwrap_or_else(|| self.remote.program.display().to_string());
        let root = work_root(launch);
        let work_dir = format!("{root}/shoal-{}", launch.node_id);
        let args = self.remote.agent_args(&program, launch, &work_dir);
        let quoted = shlex::try_join(args.iter().map(String::as_str))
            .map_err(|e| format!("cannot write the batch script: {e}"))?;
        let token = shlex::try_quote(token).map_err(|e| format!("bad join token: {e}"))?;
        Ok(format!(
            "#!/bin/sh\n# A Shoal node: node {node} of cluster {cluster}.\nexport SHOAL_JOIN_TOKEN={token}\nexec {quoted}\n",
            node = launch.node_id,
            cluster = launch.cluster,
        ))
    }

    /// `sbatch`'s arguments for one node.
    fn sbatch_args(&self, launch: &NodeLaunch) -> Result<Vec<String>, String> {
        let root = work_root(launch);
        let memory_mib = (launch.memory_bytes >> 20).max(1);
        let mut args = vec![
            "--parsable".to_string(),
            format!("--job-name=shoal-{}", launch.node_id),
            format!("--comment=shoal:{}", self.remote.owner),
            "--nodes=1".into(),
            "--ntasks=1".into(),
            format!("--cpus-per-task={}", launch.cores.max(1)),
            format!("--mem={memory_mib}M"),
            format!("--output={root}/shoal-{}.out", launch.node_id),
            // Shoal requeues the work; a requeued allocation would come back as a
            // node that no longer exists.
            "--no-requeue".into(),
        ];
        for (key, flag) in [
            ("partition", "--partition"),
            ("account", "--account"),
            ("qos", "--qos"),
            ("time_limit", "--time"),
        ] {
            if let Some(value) = launch.settings.get(key).filter(|v| !v.is_empty()) {
                args.push(format!("{flag}={value}"));
            }
        }
        if launch.gpus > 0 {
            args.push(format!("--gres=gpu:{}", launch.gpus));
        }
        if let Some(extra) = launch.settings.get("sbatch_args") {
            args.extend(shlex::split(extra).ok_or("sbatch_args is not a shell word list")?);
        }
        Ok(args)
    }

    async fn state(job_id: &str) -> Result<Allocation, String> {
        let args = ["-h", "-t", "all", "-j", job_id, "-o", "%T|%r"].map(String::from);
        match run_program("squeue", &args, None, CALL_LIMIT).await {
            Ok(out) => Ok(parse_state(out.lines().next().unwrap_or(""))),
            // Slurm forgets an ended job after MinJobAge.
            Err(why) if why.contains("Invalid job id") => Ok(Allocation::Unknown),
            Err(why) => Err(why),
        }
    }

    /// Until the allocation ends: its pending reason goes to the node's message.
    async fn watch(self, job_id: String, node_id: String, notes: Notes) -> NodeExit {
        let mut said = String::new();
        let mut unanswered = 0u32;
        loop {
            tokio::time::sleep(self.poll).await;
            let note = match Self::state(&job_id).await {
                Err(why) => {
                    unanswered += 1;
                    if unanswered == 3 {
                        warn!(node = %node_id, job_id, %why, "squeue does not answer");
                    }
                    continue;
                }
                Ok(Allocation::Pending(reason)) => {
                    format!("Slurm allocation {job_id} is pending: {reason}")
                }
                Ok(Allocation::Running) => {
                    format!("Slurm allocation {job_id} is running; its agent is starting")
                }
                Ok(Allocation::Ended { state, reason }) => {
                    let why = if reason.is_empty() {
                        format!("Slurm allocation {job_id} ended: {state}")
                    } else {
                        format!("Slurm allocation {job_id} ended: {state} ({reason})")
                    };
                    return NodeExit {
                        why,
                        preempted: state == "PREEMPTED",
                    };
                }
                Ok(Allocation::Unknown) => {
                    return NodeExit::gone(format!(
                        "Slurm allocation {job_id} is no longer known to Slurm"
                    ));
                }
            };
            unanswered = 0;
            if note != said {
                notes.say(note.clone());
                said = note;
            }
        }
    }
}

/// Where the agents work (and their allocations' output goes) on the machines.
fn work_root(launch: &NodeLaunch) -> String {
    launch
        .settings
        .get("work_dir")
        .map(|d| d.trim_end_matches('/').to_string())
        .filter(|d| !d.is_empty())
        .unwrap_or_else(|| "/tmp".into())
}

impl NodeProvider for SlurmProvider {
    fn create(&self, launch: NodeLaunch) -> BoxFuture<'static, Result<StartedNode, String>> {
        let this = self.clone();
        async move {
            let token = this.remote.join_token(&launch)?;
            let script = this.script(&launch, &token)?;
            let args = this.sbatch_args(&launch)?;
            let out = run_program("sbatch", &args, Some(script), CALL_LIMIT).await?;
            let job_id = out
                .lines()
                .next()
                .and_then(|l| l.split(';').next())
                .map(str::trim)
                .filter(|id| !id.is_empty() && id.chars().all(|c| c.is_ascii_digit()))
                .ok_or_else(|| format!("sbatch printed no job id: {}", out.trim()))?
                .to_string();
            info!(node = %launch.node_id, job_id, "slurm allocation asked for");
            launch
                .notes
                .say(format!("Slurm allocation {job_id} submitted"));
            let exited = this
                .watch(job_id.clone(), launch.node_id, launch.notes)
                .boxed();
            Ok(StartedNode {
                pid: None,
                handle: job_id,
                exited,
            })
        }
        .boxed()
    }

    fn remove(&self, node: NodeRemoval) -> BoxFuture<'static, ()> {
        let poll = self.poll;
        let grace = self.remote.job_stop_grace + Duration::from_secs(30);
        async move {
            let job_id = node.handle;
            if job_id.is_empty() {
                return;
            }
            // SIGTERM to the agent (it stops its work), SIGKILL after KillWait.
            if let Err(why) =
                run_program("scancel", std::slice::from_ref(&job_id), None, CALL_LIMIT).await
            {
                warn!(node = %node.node_id, job_id, %why, "scancel failed");
                return;
            }
            let deadline = tokio::time::Instant::now() + grace;
            while tokio::time::Instant::now() < deadline {
                match Self::state(&job_id).await {
                    Ok(Allocation::Ended { .. } | Allocation::Unknown) => {
                        info!(node = %node.node_id, job_id, "slurm allocation ended");
                        return;
                    }
                    _ => tokio::time::sleep(poll).await,
                }
            }
            warn!(node = %node.node_id, job_id, "slurm allocation still there after scancel");
        }
        .boxed()
    }

    fn adopt(&self, node: NodeRemoval, notes: Notes) -> Option<BoxFuture<'static, NodeExit>> {
        (!node.handle.is_empty())
            .then(|| self.clone().watch(node.handle, node.node_id, notes).boxed())
    }

    /// Allocations of this coordinator that no node it keeps stands for are
    /// canceled (a coordinator killed mid-scale-up leaves them behind).
    fn cleanup(&self, keep: Vec<String>) -> BoxFuture<'static, ()> {
        let owner = format!("shoal:{}", self.remote.owner);
        async move {
            let args = ["-h", "-o", "%i|%j|%k"].map(String::from);
            // No Slurm here: nothing of ours in it either.
            let Ok(listed) = run_program("squeue", &args, None, CALL_LIMIT).await else {
                return;
            };
            for line in listed.lines() {
                let mut fields = line.trim().splitn(3, '|');
                let (Some(id), Some(name), Some(comment)) =
                    (fields.next(), fields.next(), fields.next())
                else {
                    continue;
                };
                let Some(node) = name.strip_prefix("shoal-") else {
                    continue;
                };
                if comment.trim() == owner && !keep.iter().any(|k| k == node) {
                    info!(
                        node,
                        job_id = id,
                        "canceling a slurm allocation left behind"
                    );
                    let _ = run_program("scancel", &[id.to_string()], None, CALL_LIMIT).await;
                }
            }
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn squeue_states_read_as_pending_running_or_ended() {
        assert_eq!(
            parse_state("PENDING|Resources"),
            Allocation::Pending("Resources".into())
        );
        assert_eq!(
            parse_state("PENDING|None"),
            Allocation::Pending("pending".into())
        );
        assert_eq!(parse_state("RUNNING|None"), Allocation::Running);
        assert_eq!(parse_state("COMPLETING|None"), Allocation::Running);
        assert_eq!(
            parse_state("TIMEOUT|None"),
            Allocation::Ended {
                state: "TIMEOUT".into(),
                reason: String::new()
            }
        );
        assert_eq!(
            parse_state("PREEMPTED|None"),
            Allocation::Ended {
                state: "PREEMPTED".into(),
                reason: String::new()
            }
        );
        assert_eq!(parse_state(""), Allocation::Unknown);
    }
}
