//! The cutter: a task beside the control loop, with no state of its own, that
//! cuts a pipeline's parallel step's input once the step it reads from has
//! completed. Each pass it asks the core which steps wait for it (`StepsToCut`,
//! derived from the pipelines' records, so a restarted coordinator asks again),
//! reads the producing step's output as the agents' inputs are read
//! (`Api::step_output`), cuts it with the parallel engine's `partition`, and hands
//! the mini-batches (or why there are none) back (`StepCut`): the core keeps them
//! under the step's job and makes the job in one commit.

use std::time::Duration;

use tokio::sync::broadcast;
use tracing::{debug, warn};

use super::Api;
use crate::control::{Change, CutOrder};

/// A pass at least this often, and at most once per `MIN_GAP` however busy.
const EVERY: Duration = Duration::from_secs(1);
const MIN_GAP: Duration = Duration::from_millis(20);

/// Runs until the control loop stops.
pub async fn run(api: Api) {
    let mut changes = api.control.subscribe_changes();
    loop {
        match api.control.steps_to_cut().await {
            Ok(orders) => {
                for order in orders {
                    cut(&api, order).await;
                }
            }
            Err(crate::Error::Internal(why)) if why.contains("shutting down") => return,
            Err(e) => warn!(error = %e, "cutter pass"),
        }
        tokio::time::sleep(MIN_GAP).await;
        // Woken by any job's change (a step that ends may make another ready),
        // or by the clock.
        let woken = async {
            loop {
                match changes.recv().await {
                    Ok(Change::Job(_)) => return,
                    Err(broadcast::error::RecvError::Closed) => return,
                    _ => {}
                }
            }
        };
        let _ = tokio::time::timeout(EVERY, woken).await;
    }
}

async fn cut(api: &Api, order: CutOrder) {
    let cuts = match api.step_output(&order.job, &order.output).await {
        Ok(data) => tokio::task::spawn_blocking(move || {
            let data = match order.spec.input_type {
                // A step's output is a folder: its MLTable, or its CSV files.
                crate::parallel::InputType::Tabular => {
                    crate::parallel::table_of_folder(&data).map(|(table, _)| table)
                }
                _ => Ok(data),
            };
            data.and_then(|data| crate::parallel::cut(&order.spec, &data))
                .map_err(|e| e.to_string())
        })
        .await
        .unwrap_or_else(|e| Err(format!("cutting: {e}"))),
        Err(e) => Err(e.to_string()),
    };
    if let Err(e) = api
        .control
        .step_cut(order.pipeline.clone(), order.index, cuts)
        .await
    {
        // Cut by an earlier pass already, or the pipeline moved on.
        debug!(pipeline = %order.pipeline, step = order.index, error = %e, "step cut");
    }
}
