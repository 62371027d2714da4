//! Attempts that end without a result of the build: a builder fault
//! (aborted, 3, retried with backoff, the machine charged), Nix's transient
//! failure (retried, the machine not charged), and steps no build needs any
//! more (cancelled on their machines, 4).

use hydra_db::status::BuildStatus;

use super::failure::{Failure, fail_step};
use super::{close_attempt, close_dropped};
use crate::attempts::Attempt;
use crate::graph::Dropped;
use crate::state::{AttemptEnd, Requeued};
use crate::{Fatal, Shared};
use uuid::Uuid;

/// A builder fault ended `attempt`: record it as aborted (3) and requeue
/// the step with backoff, or fail it as aborted after `max_tries`.
pub async fn abort_attempt(shared: &Shared, attempt: Attempt, reason: &str) -> Result<(), Fatal> {
    tracing::warn!(drv = %attempt.drv_path, machine = %attempt.machine, attempt = %attempt.id, "attempt aborted: {reason}");
    requeue(
        shared,
        attempt,
        reason,
        AttemptEnd::Aborted,
        BuildStatus::Aborted,
    )
    .await
}

/// Nix's transient failure (a fixed-output derivation whose fetch failed,
/// say): retried with backoff like a builder fault, but the machine is
/// not charged; the attempt's row says aborted (3), never failed, so that
/// nothing retryable is ever recorded as a failure; after `max_tries` the
/// step fails (1) without a FailedPaths entry, as Hydra's runner does.
pub(super) async fn retry_transient(
    shared: &Shared,
    attempt: Attempt,
    message: &str,
) -> Result<(), Fatal> {
    tracing::warn!(drv = %attempt.drv_path, machine = %attempt.machine, "transient failure, retrying: {message}");
    let reason = format!("transient failure (retried): {message}");
    requeue(
        shared,
        attempt,
        &reason,
        AttemptEnd::Neutral,
        BuildStatus::Failed,
    )
    .await
}

/// Closes `attempt` as aborted (counted against its machine as `how`
/// says) and puts its step back in the queue with backoff; after
/// `max_tries` the step fails with `give_up_as`.
async fn requeue(
    shared: &Shared,
    attempt: Attempt,
    reason: &str,
    how: AttemptEnd,
    give_up_as: BuildStatus,
) -> Result<(), Fatal> {
    close_attempt(shared, &attempt, BuildStatus::Aborted, reason, how).await?;
    let config = shared.config();
    let tries = shared.state.read(|v| {
        v.graph
            .step_id(&attempt.drv_path)
            .and_then(|id| v.graph.step(id))
            .map_or(0, |s| s.aborted_attempts)
    }) + 1;
    let wait = config.retry_delay(tries);
    let requeue = shared
        .state
        .attempt_requeued(&attempt, wait, config.max_tries);
    let why = format!(
        "withdrawn, to build again: it ran ahead of {}, whose attempt was aborted ({reason})",
        attempt.drv_path
    );
    withdraw(shared, requeue.withdraw, &why).await?;
    match requeue.then {
        Requeued::Queued | Requeued::Gone => Ok(()),
        Requeued::GiveUp { step, tries } => {
            let msg = format!("gave up after {tries} attempts; the last: {reason}");
            fail_step(shared, step, None, &Failure::unbuilt(give_up_as, &msg)).await
        }
    }
}

/// Attempts that ran ahead of an input that was requeued: stopped on their
/// machines, their rows closed as aborted (3) with `reason`, and their
/// steps back to waiting for their inputs, with nothing counted against
/// step or machine (nothing of theirs failed). One that has not started
/// yet is withdrawn when its builder reports ([`withdraw_reported`]).
pub async fn withdraw(shared: &Shared, attempts: Vec<Uuid>, reason: &str) -> Result<(), Fatal> {
    let mut todo = attempts;
    while let Some(id) = todo.pop() {
        let Some(attempt) = shared.state.take_attempt_by_id(&id) else {
            continue;
        };
        todo.extend(withdraw_taken(shared, attempt, reason).await?);
    }
    Ok(())
}

/// A builder reported on (or uploaded for) an attempt that is to be
/// withdrawn: it is, if `connection` still owns it.
pub async fn withdraw_reported(shared: &Shared, id: &str, connection: &str) -> Result<(), Fatal> {
    let Ok(attempt) = shared.state.take_attempt(id, connection) else {
        return Ok(());
    };
    let reason = "withdrawn, to build again: an input it ran ahead of was aborted";
    let above = withdraw_taken(shared, attempt, reason).await?;
    withdraw(shared, above, reason).await
}

/// Withdraws a taken attempt; returns attempts that ran ahead of it, if
/// any were left to withdraw.
async fn withdraw_taken(
    shared: &Shared,
    attempt: Attempt,
    reason: &str,
) -> Result<Vec<Uuid>, Fatal> {
    tracing::info!(drv = %attempt.drv_path, machine = %attempt.machine, attempt = %attempt.id, "{reason}");
    if let Some(link) = shared.state.link_of(&attempt.machine) {
        let _ = link.abort(&attempt.id.to_string(), reason);
    }
    close_attempt(
        shared,
        &attempt,
        BuildStatus::Aborted,
        reason,
        AttemptEnd::Neutral,
    )
    .await?;
    Ok(shared.state.attempt_withdrawn(&attempt))
}

/// Steps no live build needs any more: running ones are aborted on their
/// machines and their rows closed as cancelled (4).
pub async fn drop_steps(shared: &Shared, dropped: Dropped) -> Result<(), Fatal> {
    for (attempt_id, machine) in dropped.running {
        let attempt = shared.state.take_attempt_by_id(&attempt_id);
        if let Some(link) = shared.state.link_of(&machine) {
            let _ = link.abort(&attempt_id.to_string(), "no build needs this step any more");
        }
        let Some(attempt) = attempt else { continue };
        tracing::info!(drv = %attempt.drv_path, machine = %attempt.machine, "aborting a step no build needs");
        close_dropped(shared, &attempt).await?;
    }
    Ok(())
}
