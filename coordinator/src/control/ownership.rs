//! The one check of everything an agent asks about an instance: its session's
//! events and logs, its code, its outputs (kept and restored), its mini-batches,
//! its identity tokens and its remote execs. The instance must be placed on the
//! caller's node; calls outside the session also show the instance's token (an
//! unguessable secret its Launch carried); and calls that start or feed work need
//! the instance, and its job, still alive. Pure: the control loop looks the job up.

use subtle::ConstantTimeEq;

use crate::Error;
use crate::model::{Distribution, InstanceStatus, Job, Slot};

/// What the agent asks to do with the instance.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum AgentCall {
    /// An event, a log chunk or usage on the node's own session.
    Report,
    FetchCode,
    /// One of the job's data inputs.
    FetchInput,
    UploadOutputs,
    RestoreOutputs,
    /// A parallel job's worker: its last result, and maybe its next mini-batch.
    Work,
    IssueToken,
    /// The job's MLflow calls (tracking), through its node's agent. Not only while
    /// it runs: a run may be ended by a job that is stopping.
    Track,
    /// The MPI launcher runs a command in the sandbox of the same attempt on this node.
    Exec {
        target_node: String,
    },
}

impl AgentCall {
    /// Calls outside the session show the instance's token.
    fn needs_token(&self) -> bool {
        *self != AgentCall::Report
    }

    /// Calls that start or feed work need it still running.
    fn needs_live(&self) -> bool {
        matches!(
            self,
            AgentCall::FetchCode
                | AgentCall::FetchInput
                | AgentCall::RestoreOutputs
                | AgentCall::IssueToken
                | AgentCall::Exec { .. }
        )
    }
}

/// Who asks, about which instance.
#[derive(Clone, Debug)]
pub struct Claim {
    pub node_id: String,
    pub slot: Slot,
    /// The instance's token; None on the session (which is the node's own).
    pub token: Option<String>,
}

/// Why a call is refused (rendered to text at the edge).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Refusal {
    NoSuchInstance(Slot),
    NotYours { node: String, owner: String },
    WrongToken(Slot),
    Ended(Slot),
    NotMpi(String),
    NoTarget { node: String, attempt: String },
}

impl std::fmt::Display for Refusal {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Refusal::NoSuchInstance(slot) => write!(
                f,
                "there is no instance {} of attempt {}",
                slot.instance, slot.attempt_id
            ),
            Refusal::NotYours { node, owner } => {
                write!(
                    f,
                    "node {node} does not run this instance (node {owner} does)"
                )
            }
            Refusal::WrongToken(slot) => write!(
                f,
                "wrong token for instance {} of attempt {}",
                slot.instance, slot.attempt_id
            ),
            Refusal::Ended(slot) => write!(
                f,
                "instance {} of attempt {} has ended",
                slot.instance, slot.attempt_id
            ),
            Refusal::NotMpi(job) => write!(f, "job {job} is not an MPI job"),
            Refusal::NoTarget { node, attempt } => {
                write!(f, "node {node} runs no live instance of attempt {attempt}")
            }
        }
    }
}

impl From<Refusal> for Error {
    fn from(refusal: Refusal) -> Self {
        Error::PermissionDenied(refusal.to_string())
    }
}

/// What a granted call may use.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Granted {
    pub job_id: String,
    pub cluster: String,
    pub code_path: Option<String>,
    /// Earlier attempts of the job, newest first (where a rerun restores from).
    pub earlier_attempts: Vec<String>,
    /// Exec: the instance that runs on the target node.
    pub target_instance: Option<u32>,
    /// The job's experiment (tracking) and name.
    pub experiment: String,
    pub job_name: String,
}

fn same_secret(given: &str, expected: &str) -> bool {
    !expected.is_empty() && bool::from(given.as_bytes().ct_eq(expected.as_bytes()))
}

/// Whether `claim` may make `call`, given the job its slot names (None: no such job).
pub fn check(job: Option<&Job>, claim: &Claim, call: &AgentCall) -> Result<Granted, Refusal> {
    let slot = &claim.slot;
    let missing = || Refusal::NoSuchInstance(slot.clone());
    let job = job.ok_or_else(missing)?;
    let position = job
        .attempts
        .iter()
        .position(|a| a.id == slot.attempt_id)
        .ok_or_else(missing)?;
    let attempt = &job.attempts[position];
    let instance = attempt
        .instances
        .get(slot.instance as usize)
        .ok_or_else(missing)?;
    if instance.node != claim.node_id {
        return Err(Refusal::NotYours {
            node: claim.node_id.clone(),
            owner: instance.node.clone(),
        });
    }
    if call.needs_token() {
        let given = claim.token.as_deref().unwrap_or_default();
        if !same_secret(given, &instance.token) {
            return Err(Refusal::WrongToken(slot.clone()));
        }
    }
    let current = position + 1 == job.attempts.len();
    let live = current && !instance.status.is_final() && !job.status.is_ending();
    if call.needs_live() && !live {
        return Err(Refusal::Ended(slot.clone()));
    }
    let mut granted = Granted {
        job_id: job.id.to_string(),
        cluster: job.spec.cluster.to_string(),
        code_path: job.spec.code_path.clone(),
        earlier_attempts: job.attempts[..position]
            .iter()
            .rev()
            .map(|a| a.id.clone())
            .collect(),
        target_instance: None,
        experiment: job.spec.extras.experiment_name.clone(),
        job_name: job.name().to_string(),
    };
    if let AgentCall::Exec { target_node } = call {
        if !matches!(job.spec.distribution, Some(Distribution::Mpi { .. })) {
            return Err(Refusal::NotMpi(job.id.to_string()));
        }
        let target = attempt
            .instances
            .iter()
            .find(|i| &i.node == target_node && i.status == InstanceStatus::Running)
            .ok_or_else(|| Refusal::NoTarget {
                node: target_node.clone(),
                attempt: attempt.id.clone(),
            })?;
        granted.target_instance = Some(target.index);
    }
    Ok(granted)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{Attempt, InstanceRun, JobStatus};
    use crate::testing::JobBuilder;

    fn running_job() -> Job {
        let mut job = JobBuilder::new("job-1").instances(2).build();
        job.status = JobStatus::Running;
        job.spec.distribution = Some(Distribution::Mpi {
            process_count_per_instance: 1,
        });
        let instance = |index: u32, node: &str| InstanceRun {
            index,
            node: node.into(),
            status: InstanceStatus::Running,
            exit_code: None,
            message: String::new(),
            gpus: vec![],
            usage: None,
            token: format!("secret-{index}"),
        };
        job.attempts.push(Attempt {
            id: "job-1.1".into(),
            number: 1,
            instances: vec![instance(0, "n1"), instance(1, "n2")],
            started_at: 1,
            ended_at: 0,
            reason: String::new(),
        });
        job
    }

    fn claim(node: &str, instance: u32, token: Option<&str>) -> Claim {
        Claim {
            node_id: node.into(),
            slot: Slot {
                attempt_id: "job-1.1".into(),
                instance,
            },
            token: token.map(str::to_string),
        }
    }

    #[test]
    fn only_the_instances_node_with_its_token_is_let_in() {
        let job = running_job();
        let own = claim("n1", 0, Some("secret-0"));
        for call in [
            AgentCall::FetchCode,
            AgentCall::UploadOutputs,
            AgentCall::RestoreOutputs,
            AgentCall::Work,
            AgentCall::IssueToken,
        ] {
            assert!(check(Some(&job), &own, &call).is_ok(), "{call:?}");
            // Another node, even one holding the right token, is refused.
            let other = claim("n2", 0, Some("secret-0"));
            assert_eq!(
                check(Some(&job), &other, &call),
                Err(Refusal::NotYours {
                    node: "n2".into(),
                    owner: "n1".into()
                })
            );
            // The right node with a guessed or missing token too.
            for token in [Some("secret-1"), Some(""), None] {
                let guessed = claim("n1", 0, token);
                assert_eq!(
                    check(Some(&job), &guessed, &call),
                    Err(Refusal::WrongToken(own.slot.clone())),
                    "{call:?} {token:?}"
                );
            }
        }
        // Session reports: the node is enough (the session is its own).
        assert!(check(Some(&job), &claim("n1", 0, None), &AgentCall::Report).is_ok());
        assert!(check(Some(&job), &claim("n2", 0, None), &AgentCall::Report).is_err());
        assert!(check(None, &own, &AgentCall::Report).is_err());
        assert!(check(Some(&job), &claim("n1", 7, None), &AgentCall::Report).is_err());
    }

    #[test]
    fn ended_work_may_still_report_and_upload_but_not_start_anything() {
        let mut job = running_job();
        job.status = JobStatus::Canceling;
        job.attempts[0].instances[0].status = InstanceStatus::Canceled;
        let own = claim("n1", 0, Some("secret-0"));
        assert!(check(Some(&job), &own, &AgentCall::Report).is_ok());
        assert!(check(Some(&job), &own, &AgentCall::UploadOutputs).is_ok());
        for call in [
            AgentCall::FetchCode,
            AgentCall::RestoreOutputs,
            AgentCall::IssueToken,
        ] {
            assert_eq!(
                check(Some(&job), &own, &call),
                Err(Refusal::Ended(own.slot.clone())),
                "{call:?}"
            );
        }
    }

    #[test]
    fn an_exec_runs_only_between_live_instances_of_one_mpi_attempt() {
        let mut job = running_job();
        let own = claim("n1", 0, Some("secret-0"));
        let to = |node: &str| AgentCall::Exec {
            target_node: node.into(),
        };
        assert_eq!(
            check(Some(&job), &own, &to("n2")).map(|g| g.target_instance),
            Ok(Some(1))
        );
        assert!(matches!(
            check(Some(&job), &own, &to("n3")),
            Err(Refusal::NoTarget { .. })
        ));
        let intruder = claim("n3", 0, Some("secret-0"));
        assert!(check(Some(&job), &intruder, &to("n2")).is_err());
        job.spec.distribution = None;
        assert_eq!(
            check(Some(&job), &own, &to("n2")),
            Err(Refusal::NotMpi("job-1".into()))
        );
    }
}
