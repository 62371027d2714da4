//! The dispatcher: gives runnable steps to machines, in priority order.
//!
//! It sleeps until woken (a step became runnable, a slot came free, a
//! machine joined) or until the next deadline (a backoff ends, a step has
//! been unsupported for too long, an attempt runs past its deadline, an
//! away builder's grace ends). Pings do not wake it. What goes where is
//! decided by [`plan::plan`], a pure function; [`start::start_attempt`]
//! persists each attempt and sends its job.

pub mod order;
pub mod plan;
mod start;

use std::sync::Arc;
use std::time::Instant;

use crate::{Fatal, Shared};

pub use plan::{Assignment, Round};
pub use start::start_attempt;

/// Attempts started at once in a round.
const CONCURRENT_STARTS: usize = 16;

pub async fn run(shared: Arc<Shared>) -> Result<(), Fatal> {
    use futures::TryStreamExt;
    loop {
        let began = Instant::now();
        expire_adoptions(&shared, began).await?;
        let round = shared.state.plan_round(&shared.config(), began);
        shared.metrics.round_seconds.lock().observe(began.elapsed());
        crate::tunnel::send_adoptions(&round.adoptions);
        for step in round.unsupported {
            crate::outcome::fail_unsupported(&shared, step).await?;
        }
        // Each start reads the `.drv`, writes a transaction and sends the
        // job: mostly waiting, so many go at once.
        futures::stream::iter(round.assignments.into_iter().map(Ok))
            .try_for_each_concurrent(CONCURRENT_STARTS, |a| start_attempt(&shared, a))
            .await?;
        // The attempts just started have deadlines of their own.
        let next = [round.next_deadline, shared.state.next_attempt_deadline()]
            .into_iter()
            .flatten()
            .min();
        match next {
            Some(deadline) => {
                tokio::select! {
                    _ = shared.state.dispatcher_woken() => {}
                    _ = tokio::time::sleep_until(deadline.into()) => {}
                }
            }
            None => shared.state.dispatcher_woken().await,
        }
    }
}

/// Attempts whose builder did not come back within `reconnect_grace_secs`
/// are aborted and retried; so are attempts still running past their
/// deadline (their builder told to stop them); inherited ones whose step
/// never loaded are closed (and a builder that declared one is told to
/// drop it).
async fn expire_adoptions(shared: &Shared, now: Instant) -> Result<(), Fatal> {
    let expired = shared.state.adoption_expired(now);
    if expired.is_empty() {
        return Ok(());
    }
    let grace = shared.config().reconnect_grace_secs;
    for attempt in expired.attempts {
        let why = attempt.away.as_ref().map_or("", |w| w.why.as_str());
        let reason = format!(
            "the builder left ({why}) and did not come back within reconnect_grace_secs ({grace} s)"
        );
        crate::outcome::abort_attempt(shared, attempt, &reason).await?;
    }
    let run_grace = shared.config().attempt_grace_secs;
    for (attempt, link) in expired.overdue {
        let reason = format!(
            "it ran past its deadline (the step's timeout plus attempt_grace_secs, {run_grace} s) on {}",
            attempt.machine
        );
        tracing::warn!(attempt = %attempt.id, drv = %attempt.drv_path, "{reason}");
        if let Some(link) = link {
            let _ = link.abort(&attempt.id.to_string(), &reason);
        }
        crate::outcome::abort_attempt(shared, attempt, &reason).await?;
    }
    for (open, link) in expired.inherited {
        if let Some(link) = link {
            let _ = link.abort(&open.id.to_string(), "the runner no longer needs this step");
        }
        let why = "its builder did not come back in time, or its build left the queue";
        crate::outcome::abandon_inherited(shared, &open, why).await?;
    }
    Ok(())
}
