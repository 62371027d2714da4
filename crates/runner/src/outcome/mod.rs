//! How a step ends: a builder's completion report, an aborted attempt, or
//! a failure the runner decides (no machine supports the step, it cannot
//! be resolved or prepared). Each is recorded in PostgreSQL first, in one
//! transaction, and then applied to the graph.
//!
//! - success: the step row, the builds it was the top level of (with
//!   outputs, products, metrics), and its dependents become runnable;
//! - permanent failure: the step row, every build that needed the step
//!   (its own build with the status, the builds above with "dependency
//!   failed" and `propagatedFrom`), and the steps only they needed leave;
//! - abort (a builder fault): the attempt is recorded as 3 and the step
//!   goes back to its queue after a backoff; it never fails a build until
//!   `max_tries` attempts have been aborted.

mod abort;
mod failure;
mod outputs;

pub use abort::{abort_attempt, drop_steps, withdraw_reported};
pub use failure::{fail_unpreparable, fail_unresolvable, fail_unsupported};

use std::time::Instant;

use hydra_db::status::BuildStatus;
use hydra_proto::v1::{CompletionReport, Outcome};
use thiserror::Error;

use crate::attempts::{Attempt, OwnershipError};
use crate::events;
use crate::graph::Build;
use crate::outside::{self, OutsideError};
use crate::record::{self, StepResult, Success};
use crate::state::AttemptEnd;
use crate::{Fatal, Shared};

/// Why a report was not applied.
#[derive(Debug, Error)]
pub enum ReportError {
    #[error(transparent)]
    Ownership(#[from] OwnershipError),
    /// A field of the report is unusable: the attempt was aborted as a
    /// builder fault (retried, elsewhere if possible; the machine charged).
    #[error("malformed report: {0}")]
    Malformed(#[from] OutsideError),
    #[error(transparent)]
    Fatal(#[from] Fatal),
}

/// A builder's completion report with every field checked at the
/// boundary ([`crate::outside`]): text cleaned, numbers in range.
#[derive(Debug)]
pub struct CheckedReport {
    pub outcome: Outcome,
    pub error_msg: String,
    pub start_time: Option<i32>,
    pub stop_time: Option<i32>,
    pub times_built: Option<i32>,
    pub is_non_deterministic: bool,
    /// Output name -> path, as the builder reported them (checked against
    /// the derivation later).
    pub outputs: Vec<(String, String)>,
}

impl CheckedReport {
    pub fn check(r: CompletionReport) -> Result<CheckedReport, OutsideError> {
        let outputs = r
            .outputs
            .into_iter()
            .map(|o| {
                outside::name(&o.name, "output name")?;
                outside::name(&o.path, "output path")?;
                Ok((o.name, o.path))
            })
            .collect::<Result<_, OutsideError>>()?;
        Ok(CheckedReport {
            outcome: Outcome::try_from(r.outcome).unwrap_or(Outcome::Unspecified),
            error_msg: outside::display_text(&r.error_msg, outside::ERROR_MSG_MAX),
            start_time: outside::unix_time(r.start_time, "start time")?,
            stop_time: outside::unix_time(r.stop_time, "stop time")?,
            times_built: match r.times_built {
                0 => None,
                n => Some(outside::small(n.into(), "times built")?),
            },
            is_non_deterministic: r.is_non_deterministic,
            outputs,
        })
    }
}

/// On start: busy rows no open attempt stands behind are closed as
/// aborted (the steps are recomputed from the queue and dispatched again);
/// the rows of open attempts stay busy for their builders to re-adopt.
pub async fn close_rows_without_attempt(shared: &Shared, reason: &str) -> Result<(), Fatal> {
    let mut tx = shared.pool.begin().await?;
    let closed = record::close_rows_without_attempt(&mut tx, reason).await?;
    tx.commit().await?;
    if closed > 0 {
        tracing::info!("closed {closed} busy step rows as aborted ({reason})");
    }
    Ok(())
}

/// An attempt inherited from a runner before this one that no builder
/// took up in time (or whose builder came back without it), and whose
/// step was never loaded (its build finished or left the queue, or it is
/// still loading): its rows are closed as aborted (3). A step loaded later
/// is dispatched afresh.
pub async fn abandon_inherited(
    shared: &Shared,
    open: &crate::attempts::OpenAttempt,
    reason: &str,
) -> Result<(), Fatal> {
    tracing::warn!(drv = %open.drv_path, machine = %open.machine, attempt = %open.id, "attempt from before the restart abandoned: {reason}");
    let log_file = shared.logs.finish(&open.drv_path).await?;
    let result = StepResult {
        status: BuildStatus::Aborted,
        error_msg: Some(reason),
        start_time: open.start_time,
        stop_time: record::now(),
        machine: &open.machine,
        times_built: None,
        is_non_deterministic: None,
        log_file: &log_file.display().to_string(),
        outputs: &[],
        event: None,
    };
    in_transaction!(shared, |tx| {
        record::finish_build_step(&mut tx, &open.id, open.build, open.stepnr, &result).await?;
        Ok(())
    })?;
    Ok(())
}

/// Applies a builder's completion report for an attempt that `connection` owns.
pub async fn on_report(
    shared: &Shared,
    connection: &str,
    report: CompletionReport,
) -> Result<(), ReportError> {
    let attempt = shared.state.take_attempt(&report.attempt_id, connection)?;
    let report = match CheckedReport::check(report) {
        Ok(r) => r,
        Err(e) => {
            let reason = format!("the builder sent a malformed report: {e}");
            abort_attempt(shared, attempt, &reason).await?;
            return Err(ReportError::Malformed(e));
        }
    };
    let status = match report.outcome {
        Outcome::Succeeded => {
            return outputs::succeed(shared, attempt, &report)
                .await
                .map_err(ReportError::from);
        }
        Outcome::InfrastructureFailure | Outcome::Unspecified => {
            let reason = format!("the builder could not build the step: {}", report.error_msg);
            abort_attempt(shared, attempt, &reason).await?;
            return Ok(());
        }
        Outcome::TransientFailure => {
            abort::retry_transient(shared, attempt, &report.error_msg).await?;
            return Ok(());
        }
        Outcome::Failed => BuildStatus::Failed,
        Outcome::TimedOut => BuildStatus::TimedOut,
        Outcome::LogLimitExceeded => BuildStatus::LogLimitExceeded,
        Outcome::OutputLimitExceeded => BuildStatus::NarSizeLimitExceeded,
        Outcome::NotDeterministic => BuildStatus::NotDeterministic,
    };
    let step = shared.state.step_of_attempt(&attempt.drv_path, &attempt.id);
    let Some(step) = step else {
        return close_dropped(shared, &attempt)
            .await
            .map_err(ReportError::from);
    };
    let log_file = shared
        .logs
        .finish(&attempt.drv_path)
        .await
        .map_err(Fatal::from)?;
    tracing::info!(drv = %attempt.drv_path, machine = %attempt.machine, "step failed ({status:?}): {}", report.error_msg);
    let failure = failure::Failure {
        status,
        error_msg: &report.error_msg,
        start_time: report.start_time.map_or(attempt.start_time, i64::from),
        stop_time: report.stop_time.map_or_else(record::now, i64::from),
        machine: &attempt.machine,
        times_built: report.times_built,
        is_non_deterministic: report.is_non_deterministic.then_some(true),
        cache: matches!(status, BuildStatus::Failed | BuildStatus::NotDeterministic),
    };
    let written = failure::fail_step(
        shared,
        step,
        Some((&attempt, &log_file.display().to_string())),
        &failure,
    )
    .await;
    if let Err(e) = &written
        && let Some(reason) = e.refused_data()
    {
        abort_attempt(shared, attempt, &reason).await?;
        return Ok(());
    }
    written?;
    ended(shared, &attempt, AttemptEnd::Completed);
    Ok(())
}

/// Ends an attempt whose step left the graph (no build needs it): cancelled (4).
/// Whoever took the attempt out of the running set closes it, so a report
/// racing a cancel still leaves no busy row behind.
pub(super) async fn close_dropped(shared: &Shared, attempt: &Attempt) -> Result<(), Fatal> {
    let msg = "cancelled: no build needs this step any more";
    close_attempt(
        shared,
        attempt,
        BuildStatus::Cancelled,
        msg,
        AttemptEnd::Neutral,
    )
    .await
}

/// Ends an attempt that built nothing (aborted, cancelled): its log is
/// closed, its step row and attempt get `status` and `reason`, its slot is
/// freed and its machine's record counts it as `how`. The graph is the
/// caller's business.
pub(super) async fn close_attempt(
    shared: &Shared,
    attempt: &Attempt,
    status: BuildStatus,
    reason: &str,
    how: AttemptEnd,
) -> Result<(), Fatal> {
    let log_file = shared.logs.finish(&attempt.drv_path).await?;
    let drv = shared.store.dir().display(&attempt.drv_path);
    let finished = events::step_finished(&drv, attempt, &[], status, Some(reason));
    let result = StepResult {
        status,
        error_msg: Some(reason),
        start_time: attempt.start_time,
        stop_time: record::now(),
        machine: &attempt.machine,
        times_built: None,
        is_non_deterministic: None,
        log_file: &log_file.display().to_string(),
        outputs: &[],
        event: Some(&finished),
    };
    in_transaction!(shared, |tx| {
        record::finish_build_step(&mut tx, &attempt.id, attempt.build, attempt.stepnr, &result)
            .await?;
        Ok(())
    })?;
    ended(shared, attempt, how);
    Ok(())
}

/// An attempt that was taken out of the running set ended: its slot is
/// free, its machine's record counts it, its duration is measured.
pub(super) fn ended(shared: &Shared, attempt: &Attempt, how: AttemptEnd) {
    shared
        .metrics
        .step_seconds
        .lock()
        .observe(attempt.dispatched_at.elapsed());
    let rest = shared
        .state
        .attempt_ended(attempt, how, &shared.config(), Instant::now());
    if let Some(pause) = rest {
        tracing::warn!(machine = %attempt.machine, "machine rested for {pause:.0?} after repeated aborted attempts");
    }
}

/// Records the success of `step` for the builds in `direct`.
pub(super) async fn write_success(
    tx: &mut sqlx::PgConnection,
    direct: &[Build],
    owner: i32,
    s: &Success<'_>,
) -> Result<(), sqlx::Error> {
    for b in direct {
        record::mark_succeeded_build(tx, b, s, b.id != owner).await?;
        record::notify_build_finished(tx, b.id, &[]).await?;
    }
    Ok(())
}

pub use outputs::{Measured, succeed_unbuilt};

/// Measures outputs that are valid in the runner's store (a cached build).
pub async fn measure_valid(
    client: &mut hydra_nix::daemon::DaemonClient,
    outputs: Vec<(String, String)>,
) -> Result<Measured, Fatal> {
    outputs::measure(client, outputs, |_| None)
        .await
        .map_err(Fatal::from)
}
