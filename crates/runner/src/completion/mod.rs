//! Completion: a finished attempt (or a step that cannot run) recorded in
//! PostgreSQL first, in one transaction, and then applied to the graph.
//!
//! - success: the step row, the builds it was the top level of (with
//!   outputs, products, metrics), and its dependents become runnable;
//! - permanent failure: the step row, every build that needed the step
//!   (its own build with the status, the builds above with "dependency
//!   failed" and `propagatedFrom`), and the steps only they needed leave;
//! - abort (a builder fault): the attempt is recorded as 3 and the step
//!   goes back to its queue after a backoff; it never fails a build until
//!   `max_tries` attempts have been aborted.

pub mod nix_support;
mod outputs;

use std::time::Instant;

use hydra_db::status::BuildStatus;
use hydra_proto::v1::{CompletionReport, Outcome};
use thiserror::Error;

use crate::attempts::{self, Attempt, OwnershipError};
use crate::dispatch::Assignment;
use crate::events::{self, Kind, NewEvent};
use crate::graph::{Build, Dropped, StepId};
use crate::outside::{self, OutsideError};
use crate::record::{self, NewStepRow, StepResult, Success};
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

/// How a step failed, for its rows.
struct Failure<'a> {
    status: BuildStatus,
    error_msg: &'a str,
    start_time: i64,
    stop_time: i64,
    machine: &'a str,
    times_built: Option<i32>,
    is_non_deterministic: Option<bool>,
    /// Whether the outputs go to FailedPaths (a permanent failure of the
    /// build itself, not a transient one that gave up).
    cache: bool,
}

impl<'a> Failure<'a> {
    /// A failure decided by the runner, with no attempt (and no machine).
    fn unbuilt(status: BuildStatus, error_msg: &'a str) -> Failure<'a> {
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
fn late_builds(after: Vec<Build>, before: &[Build]) -> Vec<Build> {
    after
        .into_iter()
        .filter(|b| !before.iter().any(|o| o.id == b.id))
        .collect()
}

/// On start and on a clean stop: busy rows are closed as aborted, so that
/// nothing looks running that is not (on start, the steps are recomputed
/// from the queue and dispatched again).
pub async fn close_open_attempts(shared: &Shared, reason: &str) -> Result<(), Fatal> {
    let now = record::now();
    let mut tx = shared.pool.begin().await?;
    let closed = sqlx::query(
        "update BuildSteps set busy = 0, status = 3, stopTime = $1, errorMsg = coalesce(errorMsg, $2)
         where busy != 0",
    )
    .bind(now)
    .bind(reason)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "update hqr_attempts set finished_at = now(), outcome = 3 where finished_at is null",
    )
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    if closed.rows_affected() > 0 {
        tracing::info!(
            "closed {} busy step rows as aborted ({reason})",
            closed.rows_affected()
        );
    }
    Ok(())
}

/// Applies a builder's completion report for an attempt that `connection` owns.
pub async fn on_report(
    shared: &Shared,
    connection: &str,
    report: CompletionReport,
) -> Result<(), ReportError> {
    let attempt = shared
        .attempts
        .lock()
        .take_owned(&report.attempt_id, connection)?;
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
            retry_transient(shared, attempt, &report.error_msg).await?;
            return Ok(());
        }
        Outcome::Failed => BuildStatus::Failed,
        Outcome::TimedOut => BuildStatus::TimedOut,
        Outcome::LogLimitExceeded => BuildStatus::LogLimitExceeded,
        Outcome::OutputLimitExceeded => BuildStatus::NarSizeLimitExceeded,
        Outcome::NotDeterministic => BuildStatus::NotDeterministic,
    };
    let step = shared
        .graph
        .lock()
        .step_of_attempt(&attempt.drv_path, &attempt.id);
    let Some(step) = step else {
        return close_dropped(shared, &attempt)
            .await
            .map_err(ReportError::from);
    };
    let log_file = shared.logs.finish(&attempt.drv_path).map_err(Fatal::from)?;
    tracing::info!(drv = %attempt.drv_path, machine = %attempt.machine, "step failed ({status:?}): {}", report.error_msg);
    let failure = Failure {
        status,
        error_msg: &report.error_msg,
        start_time: report.start_time.map_or(attempt.start_time, i64::from),
        stop_time: report.stop_time.map_or_else(record::now, i64::from),
        machine: &attempt.machine,
        times_built: report.times_built,
        is_non_deterministic: report.is_non_deterministic.then_some(true),
        cache: matches!(status, BuildStatus::Failed | BuildStatus::NotDeterministic),
    };
    let written = fail_step(
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
    shared.machines.lock().record_success(&attempt.machine);
    release(shared, &attempt);
    Ok(())
}

/// A builder fault ended `attempt`: record it as aborted (3) and requeue
/// the step with backoff, or fail it as aborted after `max_tries`.
pub async fn abort_attempt(shared: &Shared, attempt: Attempt, reason: &str) -> Result<(), Fatal> {
    tracing::warn!(drv = %attempt.drv_path, machine = %attempt.machine, attempt = %attempt.id, "attempt aborted: {reason}");
    let rest = shared
        .machines
        .lock()
        .record_failure(&attempt.machine, Instant::now(), |n| {
            shared.config().machine_rest(n)
        });
    if let Some(pause) = rest {
        tracing::warn!(machine = %attempt.machine, "machine rested for {pause:.0?} after repeated aborted attempts");
    }
    requeue(shared, attempt, reason, BuildStatus::Aborted).await
}

/// Nix's transient failure (a fixed-output derivation whose fetch failed,
/// say): retried with backoff like a builder fault, but the machine is
/// not charged; the attempt's row says aborted (3), never failed, so that
/// nothing retryable is ever recorded as a failure; after `max_tries` the
/// step fails (1) without a FailedPaths entry, as Hydra's runner does.
async fn retry_transient(shared: &Shared, attempt: Attempt, message: &str) -> Result<(), Fatal> {
    tracing::warn!(drv = %attempt.drv_path, machine = %attempt.machine, "transient failure, retrying: {message}");
    let reason = format!("transient failure (retried): {message}");
    requeue(shared, attempt, &reason, BuildStatus::Failed).await
}

/// Closes `attempt` as aborted and puts its step back in the queue with
/// backoff; after `max_tries` the step fails with `give_up_as`.
async fn requeue(
    shared: &Shared,
    attempt: Attempt,
    reason: &str,
    give_up_as: BuildStatus,
) -> Result<(), Fatal> {
    close_attempt(shared, &attempt, BuildStatus::Aborted, reason).await?;
    let give_up = {
        let mut graph = shared.graph.lock();
        let Some(id) = graph.step_id(&attempt.drv_path) else {
            return Ok(());
        };
        let tries = graph.step(id).map_or(0, |s| s.aborted_attempts) + 1;
        let wait = shared.config().retry_delay(tries);
        let now = Instant::now();
        if graph
            .requeue(&attempt.drv_path, &attempt.id, now, Some(now + wait))
            .is_err()
        {
            return Ok(()); // not this attempt's step any more
        }
        if graph.drop_if_unneeded(id) {
            return Ok(()); // kept running for a superseded build only
        }
        (tries >= shared.config().max_tries).then_some((id, tries))
    };
    if let Some((id, tries)) = give_up {
        let msg = format!("gave up after {tries} attempts; the last: {reason}");
        fail_step(shared, id, None, &Failure::unbuilt(give_up_as, &msg)).await?;
    }
    shared.wake();
    Ok(())
}

/// No connected machine supported the step for `max_unsupported_secs`.
pub async fn fail_unsupported(shared: &Shared, step: StepId) -> Result<(), Fatal> {
    let (system, features) = {
        let graph = shared.graph.lock();
        let Some(s) = graph.step(step) else {
            return Ok(());
        };
        (s.system.clone(), s.required_features.join(", "))
    };
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
    .await?;
    shared.wake();
    Ok(())
}

/// The step could not even be prepared (its `.drv` or inputs are gone from
/// the runner's store): it fails as aborted, with the reason.
pub async fn fail_before_start(shared: &Shared, a: &Assignment, reason: &str) -> Result<(), Fatal> {
    shared.machines.lock().release(&a.machine, &a.attempt);
    {
        let mut graph = shared.graph.lock();
        if graph
            .requeue(&a.drv_path, &a.attempt, Instant::now(), None)
            .is_err()
        {
            return Ok(());
        }
    }
    let msg = format!("cannot build: {reason}");
    fail_step(
        shared,
        a.step,
        None,
        &Failure::unbuilt(BuildStatus::Aborted, &msg),
    )
    .await?;
    shared.wake();
    Ok(())
}

/// An assignment whose attempt was never recorded (its owner build was
/// deleted meanwhile): the slot is freed and the step planned again after
/// `pause`, with nothing counted against step or machine.
pub fn not_started(shared: &Shared, a: &Assignment, pause: std::time::Duration) {
    shared.machines.lock().release(&a.machine, &a.attempt);
    let now = Instant::now();
    let _ = shared
        .graph
        .lock()
        .unstart(&a.drv_path, &a.attempt, now, Some(now + pause));
    shared.wake();
}

/// Records a permanent failure of `step` for every build that needs it,
/// then removes them (and what only they needed) from the graph.
async fn fail_step(
    shared: &Shared,
    step: StepId,
    attempt: Option<(&Attempt, &str)>,
    failure: &Failure<'_>,
) -> Result<(), Fatal> {
    let (failed, builds) = {
        let graph = shared.graph.lock();
        let Some(s) = graph.step(step) else {
            return Ok(());
        };
        let failed = FailedStep {
            drv: s.drv_path.clone(),
            system: s.system.clone(),
            resolved_from: s.resolved_from.clone(),
        };
        (failed, graph.dependent_builds(step))
    };
    let known = if failure.cache {
        known_outputs(shared, &failed.drv).await?
    } else {
        Vec::new()
    };
    let owner = in_transaction!(shared.pool, |tx| {
        let owner =
            write_failure(&mut tx, shared, &failed, attempt, &builds, None, failure).await?;
        record::insert_failed_paths(&mut tx, &known).await?;
        Ok(owner)
    })?;
    let removed = {
        let mut graph = shared.graph.lock();
        graph.step_failed(step, attempt.map(|(a, _)| &a.id)).ok()
    };
    let Some(removed) = removed else {
        return Ok(());
    };
    forget_started(shared, &removed.builds);
    // Builds that attached to the step while the transaction ran.
    let late = late_builds(removed.builds, &builds);
    if !late.is_empty() {
        in_transaction!(shared.pool, |tx| {
            write_failure(&mut tx, shared, &failed, None, &late, owner, failure).await?;
            Ok(())
        })?;
    }
    drop_steps(shared, removed.dropped).await
}

/// The step that failed, as the graph had it.
struct FailedStep {
    drv: hydra_nix::StorePath,
    system: String,
    /// Derivations resolved to it: a build of one of them failed itself,
    /// it is not a dependency failure.
    resolved_from: Vec<hydra_nix::StorePath>,
}

impl FailedStep {
    fn is_top_level_of(&self, build: &Build) -> bool {
        build.drv_path == self.drv || self.resolved_from.contains(&build.drv_path)
    }
}

/// The rows of a failure: the owner's step row (closed, or created when
/// there was no attempt), a propagated row for every other build, and the
/// builds themselves. Returns the owner build.
async fn write_failure(
    tx: &mut sqlx::PgConnection,
    shared: &Shared,
    step: &FailedStep,
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
                },
            )
            .await?;
            attempts::close(tx, &a.id, f.status.code()).await?;
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

/// Steps no live build needs any more: running ones are aborted on their
/// machines and their rows closed as cancelled (4).
pub async fn drop_steps(shared: &Shared, dropped: Dropped) -> Result<(), Fatal> {
    for (attempt_id, machine) in dropped.running {
        let attempt = shared.attempts.lock().take(&attempt_id);
        let tx = shared.machines.lock().get(&machine).map(|m| m.tx.clone());
        if let Some(tx) = tx {
            let abort = hydra_proto::v1::RunnerMessage {
                msg: Some(hydra_proto::v1::runner_message::Msg::Abort(
                    hydra_proto::v1::AbortJob {
                        attempt_id: attempt_id.to_string(),
                        reason: "no build needs this step any more".into(),
                    },
                )),
            };
            let _ = tx.send(Ok(abort)).await;
        }
        let Some(attempt) = attempt else { continue };
        tracing::info!(drv = %attempt.drv_path, machine = %attempt.machine, "aborting a step no build needs");
        close_dropped(shared, &attempt).await?;
    }
    shared.wake();
    Ok(())
}

/// Builds that left the graph may be restarted later: they will get a
/// `build_started` again then.
pub(crate) fn forget_started(shared: &Shared, builds: &[Build]) {
    let mut started = shared.started_builds.lock();
    for b in builds {
        started.remove(&b.id);
    }
}

/// Ends an attempt whose step left the graph (no build needs it): cancelled (4).
/// Whoever took the attempt out of the running set closes it, so a report
/// racing a cancel still leaves no busy row behind.
async fn close_dropped(shared: &Shared, attempt: &Attempt) -> Result<(), Fatal> {
    let msg = "cancelled: no build needs this step any more";
    close_attempt(shared, attempt, BuildStatus::Cancelled, msg).await
}

/// Ends an attempt that built nothing (aborted, cancelled): its log is
/// closed, its step row and attempt get `status` and `reason`, its slot is
/// freed. The graph is the caller's business.
async fn close_attempt(
    shared: &Shared,
    attempt: &Attempt,
    status: BuildStatus,
    reason: &str,
) -> Result<(), Fatal> {
    let log_file = shared.logs.finish(&attempt.drv_path)?;
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
    };
    in_transaction!(shared.pool, |tx| {
        record::finish_build_step(&mut tx, attempt.build, attempt.stepnr, &result).await?;
        attempts::close(&mut tx, &attempt.id, status.code()).await?;
        let drv = shared.store.dir().display(&attempt.drv_path);
        let finished = events::step_finished(&drv, attempt, &[], status, Some(reason));
        events::emit(&mut tx, &[finished]).await?;
        Ok(())
    })?;
    release(shared, attempt);
    Ok(())
}

/// Frees the machine slot an attempt held and wakes the dispatcher.
fn release(shared: &Shared, attempt: &Attempt) {
    shared
        .metrics
        .step_seconds
        .lock()
        .observe(attempt.dispatched_at.elapsed());
    let mut machines = shared.machines.lock();
    machines.release(&attempt.machine, &attempt.id);
    machines.count_done(&attempt.machine, attempt.dispatched_at.elapsed());
    drop(machines);
    shared.wake();
}

/// Records the success of `step` for the builds in `direct`.
async fn write_success(
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
