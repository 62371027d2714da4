//! The runner's status for Hydra's web interface (SystemStatus) and the
//! sweep of busy rows that no running step stands behind.

use sqlx::PgConnection;

use super::notify;

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

/// Closes every busy BuildSteps row as aborted (3) with `reason` (unless
/// it holds an error already), and every open `hqr_attempts` row with it;
/// returns how many step rows were closed.
pub async fn close_busy_steps(tx: &mut PgConnection, reason: &str) -> Result<u64, sqlx::Error> {
    let closed = sqlx::query(
        "update BuildSteps set busy = 0, status = 3, stopTime = $1, errorMsg = coalesce(errorMsg, $2)
         where busy != 0",
    )
    .bind(super::now())
    .bind(reason)
    .execute(&mut *tx)
    .await?;
    crate::attempts::close_all_open(tx).await?;
    Ok(closed.rows_affected())
}
