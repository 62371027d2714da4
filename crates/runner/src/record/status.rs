//! The runner's status for Hydra's web interface (SystemStatus) and the
//! sweep of busy rows that no attempt stands behind.

use sqlx::PgConnection;

use super::notify;
use crate::graph::BuildId;

/// Writes the status document as `SystemStatus` row `queue-runner` (where
/// Hydra's web interface reads it); notifies `queue_runner_status`.
pub async fn write_status(
    tx: &mut PgConnection,
    doc: &serde_json::Value,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "insert into SystemStatus (what, status) values ('queue-runner', $1)
         on conflict (what) do update set status = excluded.status",
    )
    .bind(doc)
    .execute(&mut *tx)
    .await?;
    notify(tx, "queue_runner_status", "").await
}

/// Closes one busy step row as aborted (3), keeping an earlier message.
pub async fn abort_step_row(
    tx: &mut PgConnection,
    build: BuildId,
    stepnr: i32,
    reason: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "update BuildSteps set busy = 0, status = 3, stopTime = $3,
                errorMsg = coalesce(errorMsg, $4)
          where build = $1 and stepnr = $2 and busy != 0",
    )
    .bind(build)
    .bind(stepnr)
    .bind(super::now())
    .bind(reason)
    .execute(&mut *tx)
    .await
    .map(|_| ())
}

/// Closes, as aborted (3) with `reason`, the busy BuildSteps rows that no
/// open attempt stands behind (rows a runner of another make left, say),
/// and the open attempts whose row is no longer busy. The rows of open
/// attempts stay busy: their builders may still hold them. Returns how
/// many step rows were closed.
pub async fn close_rows_without_attempt(
    tx: &mut PgConnection,
    reason: &str,
) -> Result<u64, sqlx::Error> {
    let closed = sqlx::query(
        "update BuildSteps s set busy = 0, status = 3, stopTime = $1,
                errorMsg = coalesce(errorMsg, $2)
          where s.busy != 0 and not exists (
                select 1 from hqr_attempts a
                 where a.build = s.build and a.stepnr = s.stepnr and a.finished_at is null)",
    )
    .bind(super::now())
    .bind(reason)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "update hqr_attempts a set finished_at = now(), outcome = 3
          where a.finished_at is null and not exists (
                select 1 from BuildSteps s
                 where s.build = a.build and s.stepnr = a.stepnr and s.busy != 0)",
    )
    .execute(&mut *tx)
    .await?;
    Ok(closed.rows_affected())
}
