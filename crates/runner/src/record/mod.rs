//! Hydra's bookkeeping: every write to Hydra's tables (Users, Projects,
//! Jobsets, Builds, BuildOutputs, BuildSteps, BuildStepOutputs,
//! BuildProducts, BuildMetrics, FailedPaths, SystemStatus) and every
//! notification Hydra's other parts listen to, with Hydra's own rules.
//! Callers pass a transaction; one completion is one transaction.
//!
//! One file per subject: [`steps`] (BuildSteps), [`builds`] (finished
//! Builds, FailedPaths), [`queue`] (the client API's submits, cancels,
//! restarts and bumps), [`status`] (SystemStatus, the start-up sweep),
//! [`drains`] (drained machines). The runner's other tables (`hqr_*`)
//! have one owner module each, listed in docs/architecture.md.

mod builds;
mod drains;
mod queue;
mod status;
mod steps;

pub use builds::*;
pub use drains::*;
pub use queue::*;
pub use status::*;
pub use steps::*;

use sqlx::PgConnection;

/// Seconds since the epoch, as Hydra stores times.
pub fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// A future monotonic instant `t` (a rest's end, a backoff's end) in
/// seconds since the epoch, `now` being the monotonic clock's present.
pub fn unix_seconds(t: std::time::Instant, now: std::time::Instant) -> i64 {
    self::now() + t.saturating_duration_since(now).as_secs() as i64
}

/// An error message as BuildSteps.errorMsg keeps it: many carry a
/// builder's or Nix's text (a path from an upload header, the log's last
/// lines), so every one is cleaned at the boundary, whoever made it.
fn error_text(msg: &str) -> String {
    crate::outside::display_text(msg, crate::outside::ERROR_MSG_MAX)
}

async fn notify(tx: &mut PgConnection, channel: &str, payload: &str) -> Result<(), sqlx::Error> {
    sqlx::query("select pg_notify($1, $2)")
        .bind(channel)
        .bind(payload)
        .execute(&mut *tx)
        .await
        .map(|_| ())
}
