//! Permanent failures: a step that failed on a builder (its exit code, a
//! timeout, a limit), or one the runner gives up on (no machine supports
//! it, it cannot be resolved or prepared, too many aborted attempts). The
//! step's rows and every build that needed it are written in one
//! transaction, then they leave the graph.

use hydra_db::status::BuildStatus;

use crate::attempts::Attempt;
use crate::events::{self, Kind, NewEvent};
use crate::graph::{Build, StepId};
use crate::record::{self, NewStepRow, StepResult};
use crate::state::Failing;
use crate::{Fatal, Shared};

/// How a step failed, for its rows.
pub(super) struct Failure<'a> {
    pub(super) status: BuildStatus,
    pub(super) error_msg: &'a str,
    pub(super) start_time: i64,
    pub(super) stop_time: i64,
    pub(super) machine: &'a str,
    pub(super) times_built: Option<i32>,
    pub(super) is_non_deterministic: Option<bool>,
    /// Whether the outputs go to FailedPaths (a permanent failure of the
    /// build itself, not a transient one that gave up).
    pub(super) cache: bool,
}

impl<'a> Failure<'a> {
    /// A failure decided by the runner, with no attempt (and no machine).
    pub(super) fn unbuilt(status: BuildStatus, error_msg: &'a str) -> Failure<'a> {
        let now = record::now();
        Failure {
            status,
            error_msg,
            start_time: now,
            stop_time: now,
            machine: "",
            times_built: None,
            is_non_deterministic: None,
            cache: false,
        }
    }
}

/// Builds in `after` that were not in the `before` snapshot: they attached
/// to a step while its outcome was being written.
pub(super) fn late_builds(after: Vec<Build>, before: &[Build]) -> Vec<Build> {
    after
        .into_iter()
        .filter(|b| !before.iter().any(|o| o.id == b.id))
        .collect()
}

/// No connected machine supported the step for `max_unsupported_secs`.
pub async fn fail_unsupported(shared: &Shared, step: StepId) -> Result<(), Fatal> {
    let Some((system, features)) = shared.state.step_kind(step) else {
        return Ok(());
    };
    let features = features.join(", ");
    let msg = format!(
        "unsupported system type or feature: no connected machine builds '{system}'{} (waited {} s)",
        if features.is_empty() {
            String::new()
        } else {
            format!(" with features {features}")
        },
        shared.config().max_unsupported_secs
    );
    fail_step(
        shared,
        step,
        None,
        &Failure::unbuilt(BuildStatus::Unsupported, &msg),
    )
    .await
}

/// A step that cannot be resolved (an input output has no recorded path,
/// its `.drv` is unreadable): it fails (1), and the builds above it with
/// "dependency failed".
pub async fn fail_unresolvable(shared: &Shared, step: StepId, reason: &str) -> Result<(), Fatal> {
    let msg = format!("cannot resolve the content-addressed derivation: {reason}");
    fail_step(
        shared,
        step,
        None,
        &Failure::unbuilt(BuildStatus::Failed, &msg),
    )
    .await
}

/// The step could not even be prepared (its `.drv` or inputs are gone from
/// the runner's store): it fails as aborted, with the reason. The caller
/// has taken the unstarted attempt back from the state.
pub async fn fail_unpreparable(shared: &Shared, step: StepId, reason: &str) -> Result<(), Fatal> {
    let msg = format!("cannot build: {reason}");
    fail_step(
        shared,
        step,
        None,
        &Failure::unbuilt(BuildStatus::Aborted, &msg),
    )
    .await
}

/// Records a permanent failure of `step` for every build that needs it,
/// then removes them (and what only they needed) from the graph.
pub(super) async fn fail_step(
    shared: &Shared,
    step: StepId,
    attempt: Option<(&Attempt, &str)>,
    failure: &Failure<'_>,
) -> Result<(), Fatal> {
    let Some(failed) = shared.state.failing(step) else {
        return Ok(());
    };
    let builds = failed.builds.clone();
    let known = if failure.cache {
        known_outputs(shared, &failed.drv).await?
    } else {
        Vec::new()
    };
    let owner = in_transaction!(shared, |tx| {
        let owner =
            write_failure(&mut tx, shared, &failed, attempt, &builds, None, failure).await?;
        record::insert_failed_paths(&mut tx, &known).await?;
        Ok(owner)
    })?;
    let Ok(removed) = shared.state.step_failed(step, attempt.map(|(a, _)| &a.id)) else {
        return Ok(());
    };
    // Builds that attached to the step while the transaction ran.
    let late = late_builds(removed.builds, &builds);
    if !late.is_empty() {
        in_transaction!(shared, |tx| {
            write_failure(&mut tx, shared, &failed, None, &late, owner, failure).await?;
            Ok(())
        })?;
    }
    super::abort::drop_steps(shared, removed.dropped).await
}

/// The rows of a failure: the owner's step row (closed, or created when
/// there was no attempt), a propagated row for every other build, and the
/// builds themselves. Returns the owner build.
async fn write_failure(
    tx: &mut sqlx::PgConnection,
    shared: &Shared,
    step: &Failing,
    attempt: Option<(&Attempt, &str)>,
    builds: &[Build],
    owner: Option<i32>,
    f: &Failure<'_>,
) -> Result<Option<i32>, Fatal> {
    let drv_full = shared.store.dir().display(&step.drv);
    let system = step.system.as_str();
    let owner = match (attempt, owner) {
        (Some((a, log_file)), _) => {
            record::finish_build_step(
                tx,
                &a.id,
                a.build,
                a.stepnr,
                &StepResult {
                    status: f.status,
                    error_msg: Some(f.error_msg),
                    start_time: f.start_time,
                    stop_time: f.stop_time,
                    machine: f.machine,
                    times_built: f.times_built,
                    is_non_deterministic: f.is_non_deterministic,
                    log_file,
                    outputs: &[],
                    event: None,
                },
            )
            .await?;
            crate::uploads::enqueue_log(tx, &shared.config().destinations, &drv_full).await?;
            Some(a.build)
        }
        (None, Some(o)) => Some(o),
        (None, None) => builds.first().map(|b| b.id),
    };
    for b in builds {
        let has_row = attempt.is_some() && Some(b.id) == owner;
        if !has_row {
            let propagated_from = owner.filter(|o| *o != b.id);
            // A build gone meanwhile (deleted) gets no row.
            record::create_build_step(
                tx,
                &NewStepRow {
                    build: b.id,
                    drv_path: &drv_full,
                    system,
                    status: Some(f.status),
                    machine: f.machine,
                    // As Hydra: a propagated row has no times of its own.
                    start_time: propagated_from.is_none().then_some(f.start_time),
                    error_msg: Some(f.error_msg),
                    propagated_from,
                    outputs: &[],
                    resolved_drv_path: None,
                    dispatch: None,
                },
            )
            .await?;
        }
        let status = if !step.is_top_level_of(b) && f.status == BuildStatus::Failed {
            BuildStatus::DepFailed
        } else {
            f.status
        };
        record::mark_failed_build(tx, b.id, status, f.start_time, f.stop_time, false).await?;
    }
    let mut concerned: Vec<i32> = builds.iter().map(|b| b.id).collect();
    if let Some((a, _)) = attempt {
        concerned.extend_from_slice(&a.builds);
        concerned.sort_unstable();
        concerned.dedup();
    }
    let mut finished = NewEvent::new(Kind::StepFinished, concerned)
        .drv(drv_full.as_str())
        .status(f.status.code())
        .detail(f.error_msg);
    if !f.machine.is_empty() {
        finished = finished.machine(f.machine);
    }
    events::emit(tx, &[finished]).await?;
    if let Some(o) = owner {
        let others: Vec<i32> = builds.iter().map(|b| b.id).filter(|b| *b != o).collect();
        record::notify_build_finished(tx, o, &others).await?;
    }
    Ok(owner)
}

/// The output paths of `drv` that are known without building.
async fn known_outputs(shared: &Shared, drv: &hydra_nix::StorePath) -> Result<Vec<String>, Fatal> {
    let mut client = shared.store.client().await?;
    let map = client
        .query_derivation_output_map(&shared.store.dir().display(drv))
        .await
        .map_err(crate::store::StoreError::from)?;
    shared.store.release(client);
    Ok(map.into_values().flatten().collect())
}
