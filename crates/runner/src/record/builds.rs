//! Builds that finish: Hydra's `markSucceededBuild` with outputs,
//! products and metrics, failures, cached failures (FailedPaths), and the
//! `build_started` / `build_finished` notifications.

use hydra_db::status::BuildStatus;
use sqlx::PgConnection;

use super::notify;
use crate::graph::{Build, BuildId};
use crate::nix_support::BuildOutputInfo;

/// What a succeeded build records.
pub struct Success<'a> {
    pub info: &'a BuildOutputInfo,
    pub outputs: &'a [(String, String)],
    pub size: i64,
    pub closure_size: i64,
    pub start_time: i64,
    pub stop_time: i64,
}

/// Hydra's `markSucceededBuild`: finishes `build` as succeeded (or 6 with
/// `nix-support/failed`), with its outputs, products and metrics.
pub async fn mark_succeeded_build(
    tx: &mut PgConnection,
    build: &Build,
    s: &Success<'_>,
    is_cached: bool,
) -> Result<(), sqlx::Error> {
    let status = if s.info.failed {
        BuildStatus::FailedWithOutput
    } else {
        BuildStatus::Success
    };
    let updated = sqlx::query(
        "update Builds set finished = 1, buildStatus = $2, startTime = $3, stopTime = $4, size = $5, closureSize = $6,
                releaseName = $7, isCachedBuild = $8, notificationPendingSince = $4
         where id = $1 and finished = 0",
    )
    .bind(build.id)
    .bind(status.code())
    .bind(s.start_time)
    .bind(s.stop_time)
    .bind(s.size)
    .bind(s.closure_size)
    .bind(s.info.release_name.as_deref())
    .bind(is_cached as i32)
    .execute(&mut *tx)
    .await?;
    if updated.rows_affected() == 0 {
        return Ok(()); // finished meanwhile (cancelled, say): leave it alone
    }
    for (name, path) in s.outputs {
        sqlx::query("update BuildOutputs set path = $3 where build = $1 and name = $2")
            .bind(build.id)
            .bind(name)
            .bind(path)
            .execute(&mut *tx)
            .await?;
    }
    sqlx::query("delete from BuildProducts where build = $1")
        .bind(build.id)
        .execute(&mut *tx)
        .await?;
    for (nr, p) in s.info.products.iter().enumerate() {
        sqlx::query(
            "insert into BuildProducts (build, productnr, type, subtype, fileSize, sha256hash, path, name, defaultPath)
             values ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
        )
        .bind(build.id)
        .bind(nr as i32 + 1)
        .bind(&p.r#type)
        .bind(&p.subtype)
        .bind(p.file_size)
        .bind(p.sha256.as_deref())
        .bind(&p.path)
        .bind(&p.name)
        .bind(p.default_path.as_deref().unwrap_or(""))
        .execute(&mut *tx)
        .await?;
    }
    sqlx::query("delete from BuildMetrics where build = $1")
        .bind(build.id)
        .execute(&mut *tx)
        .await?;
    // The project and jobset names as they are now (a rename cascades to
    // Jobsets but not to the runner's memory), for BuildMetrics' keys.
    for m in &s.info.metrics {
        sqlx::query(
            "insert into BuildMetrics (build, name, unit, value, project, jobset, job, timestamp)
             select b.id, $2, $3, $4, j.project, j.name, b.job, b.timestamp
               from Builds b join Jobsets j on j.id = b.jobset_id where b.id = $1",
        )
        .bind(build.id)
        .bind(&m.name)
        .bind(m.unit.as_deref())
        .bind(m.value)
        .execute(&mut *tx)
        .await?;
    }
    Ok(())
}

/// Finishes a build as failed with `status` (unless it finished already).
pub async fn mark_failed_build(
    tx: &mut PgConnection,
    build: BuildId,
    status: BuildStatus,
    start_time: i64,
    stop_time: i64,
    is_cached: bool,
) -> Result<bool, sqlx::Error> {
    let r = sqlx::query(
        "update Builds set finished = 1, buildStatus = $2, startTime = $3, stopTime = $4, isCachedBuild = $5,
                notificationPendingSince = $4
         where id = $1 and finished = 0",
    )
    .bind(build)
    .bind(status.code())
    .bind(start_time)
    .bind(stop_time)
    .bind(is_cached as i32)
    .execute(&mut *tx)
    .await?;
    Ok(r.rows_affected() > 0)
}

/// The last build whose step for `drv` (or for one of its outputs)
/// failed (1), for a cached failure's `propagatedFrom`, as Hydra finds it.
pub async fn earlier_failure(
    tx: &mut PgConnection,
    drv: &str,
    outputs: &[(String, Option<String>)],
) -> Result<Option<BuildId>, sqlx::Error> {
    let by_drv: Option<BuildId> = sqlx::query_scalar(
        "select max(build) from BuildSteps where drvPath = $1 and startTime != 0 and stopTime != 0 and status = 1",
    )
    .bind(drv)
    .fetch_one(&mut *tx)
    .await?;
    if by_drv.is_some() {
        return Ok(by_drv);
    }
    for (name, path) in outputs {
        let found: Option<BuildId> = match path {
            Some(path) => sqlx::query_scalar(
                "select max(s.build) from BuildSteps s join BuildStepOutputs o on s.build = o.build and s.stepnr = o.stepnr
                  where s.startTime != 0 and s.stopTime != 0 and s.status = 1 and o.path = $1",
            )
            .bind(path),
            None => sqlx::query_scalar(
                "select max(s.build) from BuildSteps s join BuildStepOutputs o on s.build = o.build and s.stepnr = o.stepnr
                  where s.startTime != 0 and s.stopTime != 0 and s.status = 1 and s.drvPath = $1 and o.name = $2",
            )
            .bind(drv)
            .bind(name),
        }
        .fetch_one(&mut *tx)
        .await?;
        if found.is_some() {
            return Ok(found);
        }
    }
    Ok(None)
}

/// Remembers failed outputs so they are not built again (Hydra's cached failures).
pub async fn insert_failed_paths(
    tx: &mut PgConnection,
    paths: &[String],
) -> Result<(), sqlx::Error> {
    // Hydra's FailedPaths has an insert rule (IdempotentInsert), with which
    // PostgreSQL refuses `on conflict`; this form works with and without it.
    for p in paths {
        sqlx::query(
            "insert into FailedPaths (path) select $1 where not exists (select 1 from FailedPaths where path = $1)",
        )
        .bind(p)
            .execute(&mut *tx)
            .await?;
    }
    Ok(())
}

/// `build_finished` with `build` and its dependents, split so that each
/// payload stays under PostgreSQL's 8,000-byte limit.
pub async fn notify_build_finished(
    tx: &mut PgConnection,
    build: BuildId,
    dependents: &[BuildId],
) -> Result<(), sqlx::Error> {
    let mut ids = vec![build];
    ids.extend_from_slice(dependents);
    let statuses: Vec<(i32, Option<i32>)> =
        sqlx::query_as("select id, buildStatus from Builds where id = any($1) order by id")
            .bind(&ids)
            .fetch_all(&mut *tx)
            .await?;
    let ended: Vec<crate::events::NewEvent> = statuses
        .into_iter()
        .map(|(id, status)| {
            let status = status.unwrap_or(3);
            crate::events::NewEvent::new(crate::events::Kind::of_build_status(status), vec![id])
                .status(status)
        })
        .collect();
    crate::events::emit(tx, &ended).await?;
    let mut payload = build.to_string();
    for d in dependents {
        let part = format!("\t{d}");
        if payload.len() + part.len() > 7900 {
            notify(tx, "build_finished", &payload).await?;
            payload = build.to_string();
        }
        payload.push_str(&part);
    }
    notify(tx, "build_finished", &payload).await
}
