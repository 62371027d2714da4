//! The farm as the dispatcher sees it: queues per system, machines, drain,
//! and why a build's steps are not running.

use std::collections::BTreeMap;
use std::time::Instant;

use hydra_proto::client::*;

use super::{ApiError, build_id};
use crate::Shared;
use crate::graph::{Step, StepState};
use crate::state::machines::Availability;

pub async fn status(shared: &Shared) -> Result<ClusterStatusResponse, ApiError> {
    let counts = shared.state.queue_counts();
    let systems = shared
        .state
        .steps_per_system()
        .into_iter()
        .map(|(system, s)| SystemQueue {
            system,
            runnable: s.runnable,
            running: s.running,
            waiting: s.waiting,
        })
        .collect();
    let last_event_seq = crate::events::last_seq(&shared.api_pool).await? as u64;
    Ok(ClusterStatusResponse {
        queued_builds: counts.builds as u32,
        steps: counts.steps as u32,
        runnable: counts.runnable as u32,
        running: counts.running as u32,
        systems,
        machines: counts.machines as u32,
        last_event_seq,
    })
}

pub fn machines(shared: &Shared) -> MachinesResponse {
    let dir = shared.store.dir();
    let machines = shared
        .state
        .machine_views(Instant::now())
        .into_iter()
        .filter(|m| m.connected || m.drained)
        .map(|m| MachineInfo {
            running: m.running,
            current_steps: m.current_steps.iter().map(|p| dir.display(p)).collect(),
            rested_for_secs: m.rested_for.map_or(0, |d| d.as_secs()),
            name: m.name,
            systems: m.systems,
            supported_features: m.supported_features,
            mandatory_features: m.mandatory_features,
            max_jobs: m.max_jobs,
            load1: m.load1,
            speed_factor: m.speed_factor,
            drained: m.drained,
            consecutive_failures: m.consecutive_failures,
            connected: m.connected,
        })
        .collect();
    MachinesResponse { machines }
}

/// Drains or undrains `name` (persisted, so a restart keeps it).
pub async fn set_drained(
    shared: &Shared,
    name: &str,
    drained: bool,
) -> Result<DrainResponse, ApiError> {
    if name.is_empty() {
        return Err(ApiError::Invalid("which machine?".into()));
    }
    let mut db = shared.api_pool.acquire().await?;
    crate::record::set_machine_drained(&mut db, name, drained).await?;
    shared.state.machine_drained(name, drained);
    tracing::info!(
        machine = name,
        "{}",
        if drained { "drained" } else { "undrained" }
    );
    Ok(DrainResponse { drained })
}

/// Reads the drained machines into the dispatcher's view (at start).
pub async fn load_drained(shared: &Shared) -> Result<(), sqlx::Error> {
    let mut db = shared.api_pool.acquire().await?;
    for n in crate::record::drained_machines(&mut db).await? {
        shared.state.machine_drained(&n, true);
    }
    Ok(())
}

pub async fn explain(shared: &Shared, req: ExplainRequest) -> Result<ExplainResponse, ApiError> {
    let id = build_id(req.build_id)?;
    let config = shared.config();
    let now = Instant::now();
    let steps = shared.state.read(|v| {
        v.graph.build(id)?;
        let explained: Vec<StepExplanation> = v
            .graph
            .steps_of_build(id)
            .into_iter()
            .filter_map(|id| v.graph.step(id).map(|s| (id, s)))
            .filter(|(_, s)| {
                req.drv_path.is_empty() || shared.store.dir().display(&s.drv_path) == req.drv_path
            })
            .map(|(id, s)| {
                let sent_ahead = v.graph.follows_unbuilt(id);
                let mut e = explain_step(s, sent_ahead, v.machines, config.min_free_disk, now);
                e.drv_path = shared.store.dir().display(&s.drv_path);
                e
            })
            .collect();
        Some(explained)
    });
    let Some(steps) = steps else {
        return explain_absent(shared, id).await;
    };
    if steps.is_empty() && !req.drv_path.is_empty() {
        return Err(ApiError::NotFound(format!(
            "build {id} does not need {} (or it is built already)",
            req.drv_path
        )));
    }
    Ok(ExplainResponse {
        summary: summarise(id, &steps),
        steps,
    })
}

/// A build the graph does not have: finished, or not read yet.
async fn explain_absent(shared: &Shared, id: i32) -> Result<ExplainResponse, ApiError> {
    let row: Option<(i32, Option<i32>)> =
        sqlx::query_as("select finished, buildStatus from Builds where id = $1")
            .bind(id)
            .fetch_optional(&shared.api_pool)
            .await?;
    let summary = match row {
        None => return Err(ApiError::NotFound(format!("there is no build {id}"))),
        Some((1, status)) => format!(
            "build {id} is finished ({})",
            super::query::status_name(true, status, false)
        ),
        Some(_) => {
            format!("build {id} is queued but not loaded yet: the queue monitor reads it next")
        }
    };
    Ok(ExplainResponse {
        summary,
        steps: Vec::new(),
    })
}

/// `sent_ahead`: the step goes (or went) to the machine building its
/// inputs, ahead of them; it waits for them there, whatever its state.
fn explain_step(
    step: &Step,
    sent_ahead: bool,
    machines: &crate::state::machines::Machines,
    min_free_disk: u64,
    now: Instant,
) -> StepExplanation {
    let mut e = StepExplanation {
        system: step.system.clone(),
        ..Default::default()
    };
    let (reason, detail): (&str, String) = match &step.state {
        _ if sent_ahead => {
            e.waiting_for = step.deps.len() as u32;
            let on = step.only_on().unwrap_or_default();
            let n = step.deps.len();
            let detail = match &step.state {
                StepState::Running { .. } => format!(
                    "sent to {on}, which builds its {n} dependencies and starts it once they are built"
                ),
                _ => format!(
                    "waiting for {n} dependencies building on {on}; it is sent there ahead of them when a slot is free"
                ),
            };
            ("waiting-for-dependencies", detail)
        }
        StepState::Running { machine, .. } => ("running", format!("running on {machine}")),
        StepState::Waiting => {
            e.waiting_for = step.deps.len() as u32;
            (
                "waiting-for-dependencies",
                format!("waiting for {} dependencies to be built", step.deps.len()),
            )
        }
        StepState::Resolving => (
            "resolving",
            "its inputs are built; the resolver is writing the resolved derivation".into(),
        ),
        StepState::Finished => ("finished", "finished".into()),
        StepState::Runnable {
            not_before: Some(t),
            ..
        } if *t > now => {
            e.until = crate::record::unix_seconds(*t, now);
            (
                "backoff",
                format!(
                    "backing off after {} aborted attempts, until {}s from now",
                    step.aborted_attempts,
                    t.duration_since(now).as_secs()
                ),
            )
        }
        StepState::Runnable { .. } => {
            let features = &step.required_features;
            match machines.availability(&step.system, features, min_free_disk, now) {
                Availability::Unsupported => (
                    "no-machine",
                    format!(
                        "no connected machine builds {}{}",
                        step.system,
                        if features.is_empty() {
                            String::new()
                        } else {
                            format!(" with features {}", features.join(", "))
                        }
                    ),
                ),
                Availability::Away { machines } => (
                    "machines-away",
                    format!(
                        "only machines that went away build it ({}); it waits for them",
                        machines.join(", ")
                    ),
                ),
                Availability::Drained => (
                    "machines-drained",
                    "every machine that could build it is drained".into(),
                ),
                Availability::Rested { until } => {
                    e.until = crate::record::unix_seconds(until, now);
                    (
                        "machines-rested",
                        format!(
                            "every machine that could build it is resting after repeated failures, for {}s more",
                            until.saturating_duration_since(now).as_secs()
                        ),
                    )
                }
                Availability::LowDisk => (
                    "low-disk",
                    "every machine that could build it is short of disk".into(),
                ),
                Availability::NoFreeSlot { machines, slots } => (
                    "no-free-slot",
                    format!(
                        "all {slots} slots of the {machines} machines that could build it are busy"
                    ),
                ),
                Availability::Free => (
                    "dispatching",
                    "a machine is free: the next dispatch round takes it".into(),
                ),
            }
        }
    };
    e.reason = reason.to_owned();
    e.detail = detail;
    e
}

fn summarise(id: i32, steps: &[StepExplanation]) -> String {
    let mut by_reason: BTreeMap<&str, usize> = BTreeMap::new();
    for s in steps {
        *by_reason.entry(s.reason.as_str()).or_default() += 1;
    }
    let parts: Vec<String> = by_reason.iter().map(|(r, n)| format!("{n} {r}")).collect();
    format!(
        "build {id}: {} steps to go ({})",
        steps.len(),
        parts.join(", ")
    )
}
