//! The sweep conductor: a task beside the control loop that keeps no state of
//! its own. Each pass it asks the core for the running sweeps (their records),
//! reads their unsettled trials' primary metric from tracking, asks `plan` what
//! to do, and hands each plan back to the core, which applies it in one commit.
//! Everything it decides from is durable (the records and trials in the store,
//! the metrics in `tracking.db`), so a coordinator killed mid-sweep resumes where
//! it stood: trials that ended are not rerun, and the next trial drawn is the
//! one that would have been (draws depend on the seed and the trial's index).

use std::time::Duration;

use tokio::sync::broadcast;
use tracing::{debug, warn};

use super::{TrialState, plan};
use crate::control::{Change, ControlHandle};
use crate::model::{Job, now_ms};
use crate::tracking::Tracking;

/// A pass at least this often, and at most once per `MIN_GAP` however busy.
const EVERY: Duration = Duration::from_secs(1);
const MIN_GAP: Duration = Duration::from_millis(200);

/// Runs until the control loop stops.
pub async fn run(control: ControlHandle, tracking: Tracking) {
    let mut changes = control.subscribe_changes();
    let mut sweeps: Vec<String> = Vec::new();
    loop {
        match pass(&control, &tracking).await {
            Ok(running) => sweeps = running,
            Err(crate::Error::Internal(why)) if why.contains("shutting down") => return,
            Err(e) => warn!(error = %e, "sweep pass"),
        }
        tokio::time::sleep(MIN_GAP).await;
        // Woken when a running sweep's record changes (a trial of it ended), or
        // by the clock (metrics come in without a change, and so do timeouts
        // and new sweeps); other jobs' changes do not wake it.
        let woken = async {
            loop {
                match changes.recv().await {
                    Ok(Change::Job(id)) if sweeps.contains(&id) => return,
                    Err(broadcast::error::RecvError::Closed) => return,
                    _ => {}
                }
            }
        };
        let _ = tokio::time::timeout(EVERY, woken).await;
    }
}

/// One pass over the running sweeps; their ids.
async fn pass(control: &ControlHandle, tracking: &Tracking) -> crate::Result<Vec<String>> {
    let running = control.running_sweeps().await?;
    for record in &running {
        if let Err(e) = step(control, tracking, record).await {
            // A plan from a view the core has moved past is refused; the next
            // pass plans again.
            debug!(sweep = %record.id, error = %e, "sweep step");
        }
    }
    Ok(running.into_iter().map(|r| r.id.to_string()).collect())
}

async fn step(control: &ControlHandle, tracking: &Tracking, record: &Job) -> crate::Result<()> {
    let Some(state) = record.sweep.as_deref() else {
        return Ok(());
    };
    let unsettled: Vec<String> = state
        .trials
        .iter()
        .filter(|t| !t.settled)
        .map(|t| crate::control::job_id(t.seq))
        .collect();
    let mut series = tracking
        .metric_values(unsettled, &state.spec.objective.primary_metric)
        .await?
        .into_iter();
    let trials: Vec<TrialState> = state
        .trials
        .iter()
        .enumerate()
        .map(|(index, entry)| TrialState {
            index: index as u32,
            params: entry.params.clone(),
            ended: entry.ended,
            settled: entry.settled,
            score: entry.score,
            series: if entry.settled {
                Vec::new()
            } else {
                series.next().unwrap_or_default()
            },
        })
        .collect();
    let plan = plan(
        &state.spec,
        record.seq,
        &trials,
        now_ms().saturating_sub(record.created_at),
    );
    if plan.is_empty() {
        return Ok(());
    }
    debug!(
        sweep = %record.id,
        start = plan.start.len(),
        stop = plan.stop.len(),
        results = plan.results.len(),
        end = plan.end.is_some(),
        "sweep step"
    );
    control.step_sweep(record.id.to_string(), plan).await
}
