//! Hydra's bookkeeping: every write to Hydra's tables (BuildSteps,
//! BuildStepOutputs, Builds, BuildOutputs, BuildProducts, BuildMetrics,
//! FailedPaths) and the notifications Hydra's other parts listen to, with
//! Hydra's own rules. Callers pass a transaction; one completion is one
//! transaction.

use hydra_db::status::BuildStatus;
use sqlx::PgConnection;

use crate::completion::nix_support::BuildOutputInfo;
use crate::graph::{Build, BuildId};

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

/// A BuildSteps row to create.
pub struct NewStepRow<'a> {
    pub build: BuildId,
    pub drv_path: &'a str,
    pub system: &'a str,
    /// None: busy (running). Some: finished with this status.
    pub status: Option<BuildStatus>,
    pub machine: &'a str,
    pub start_time: Option<i64>,
    pub error_msg: Option<&'a str>,
    pub propagated_from: Option<BuildId>,
    /// Output name -> path (None while a CA output is unknown).
    pub outputs: &'a [(String, Option<String>)],
}

/// Creates a BuildSteps row with the next free step number of its build
/// and its BuildStepOutputs; notifies `step_started` for a busy row.
pub async fn create_build_step(
    tx: &mut PgConnection,
    row: &NewStepRow<'_>,
) -> Result<i32, sqlx::Error> {
    loop {
        let stepnr: i32 = sqlx::query_scalar(
            "select coalesce(max(stepnr), 0) + 1 from BuildSteps where build = $1",
        )
        .bind(row.build)
        .fetch_one(&mut *tx)
        .await?;
        let busy = row.status.is_none();
        let inserted = sqlx::query(
            "insert into BuildSteps (build, stepnr, type, drvPath, busy, startTime, system, status, propagatedFrom, errorMsg, stopTime, machine)
             values ($1, $2, 0, $3, $4, $5, $6, $7, $8, $9, $10, $11) on conflict do nothing",
        )
        .bind(row.build)
        .bind(stepnr)
        .bind(row.drv_path)
        .bind(if busy { 1 } else { 0 })
        .bind(row.start_time)
        .bind(row.system)
        .bind(row.status.map(|s| s.code()))
        .bind(row.propagated_from)
        .bind(row.error_msg)
        .bind(if busy { None } else { row.start_time })
        .bind(row.machine)
        .execute(&mut *tx)
        .await?;
        if inserted.rows_affected() == 0 {
            continue; // another writer took this number
        }
        for (name, path) in row.outputs {
            sqlx::query(
                "insert into BuildStepOutputs (build, stepnr, name, path) values ($1, $2, $3, $4)",
            )
            .bind(row.build)
            .bind(stepnr)
            .bind(name)
            .bind(path)
            .execute(&mut *tx)
            .await?;
        }
        if busy {
            notify(tx, "step_started", &format!("{}\t{stepnr}", row.build)).await?;
        }
        return Ok(stepnr);
    }
}

/// Hydra's row for a resolved CA step: status 13, with the resolved
/// `.drv`'s base name in `resolvedDrvPath`. Written once per build and
/// derivation: a runner that resolves again after a restart reuses it.
pub async fn record_resolution(
    tx: &mut PgConnection,
    build: BuildId,
    drv_path: &str,
    system: &str,
    resolved_base_name: &str,
    outputs: &[(String, Option<String>)],
) -> Result<i32, sqlx::Error> {
    let existing: Option<i32> = sqlx::query_scalar(
        "select stepnr from BuildSteps where build = $1 and drvPath = $2 and status = $3",
    )
    .bind(build)
    .bind(drv_path)
    .bind(BuildStatus::Resolved.code())
    .fetch_optional(&mut *tx)
    .await?;
    if let Some(stepnr) = existing {
        return Ok(stepnr);
    }
    let stepnr = create_build_step(
        tx,
        &NewStepRow {
            build,
            drv_path,
            system,
            status: Some(BuildStatus::Resolved),
            machine: "",
            start_time: Some(now()),
            error_msg: None,
            propagated_from: None,
            outputs,
        },
    )
    .await?;
    sqlx::query("update BuildSteps set resolvedDrvPath = $3 where build = $1 and stepnr = $2")
        .bind(build)
        .bind(stepnr)
        .bind(resolved_base_name)
        .execute(&mut *tx)
        .await?;
    Ok(stepnr)
}

/// Something a builder sent that was refused (`hqr_rejections`).
pub async fn rejection(
    pool: &sqlx::PgPool,
    connection: &str,
    machine: Option<&str>,
    attempt_id: &str,
    what: &str,
    reason: &str,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "insert into hqr_rejections (connection, machine, attempt_id, what, reason) values ($1, $2, $3, $4, $5)",
    )
    .bind(connection)
    .bind(machine)
    .bind(attempt_id)
    .bind(what)
    .bind(reason)
    .execute(pool)
    .await
    .map(|_| ())
}

/// The result of a finished step, for its BuildSteps row.
pub struct StepResult<'a> {
    pub status: BuildStatus,
    pub error_msg: Option<&'a str>,
    pub start_time: i64,
    pub stop_time: i64,
    pub machine: &'a str,
    pub times_built: Option<i32>,
    pub is_non_deterministic: Option<bool>,
    pub log_file: &'a str,
    /// Known output paths (CA outputs learnt from the build).
    pub outputs: &'a [(String, String)],
}

/// Closes a busy step row; notifies `step_finished`.
pub async fn finish_build_step(
    tx: &mut PgConnection,
    build: BuildId,
    stepnr: i32,
    r: &StepResult<'_>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "update BuildSteps set busy = 0, status = $1, errorMsg = $4, startTime = $5, stopTime = $6, machine = $7,
                timesBuilt = $8, isNonDeterministic = $9
         where build = $2 and stepnr = $3",
    )
    .bind(r.status.code())
    .bind(build)
    .bind(stepnr)
    .bind(r.error_msg.filter(|m| !m.is_empty()))
    .bind(r.start_time)
    .bind(r.stop_time)
    .bind(r.machine)
    .bind(r.times_built)
    .bind(r.is_non_deterministic)
    .execute(&mut *tx)
    .await?;
    for (name, path) in r.outputs {
        sqlx::query(
            "update BuildStepOutputs set path = $4 where build = $1 and stepnr = $2 and name = $3",
        )
        .bind(build)
        .bind(stepnr)
        .bind(name)
        .bind(path)
        .execute(&mut *tx)
        .await?;
    }
    notify(
        tx,
        "step_finished",
        &format!("{build}\t{stepnr}\t{}", r.log_file),
    )
    .await
}

/// Sets the progress (`busy`) code of a running step, with its event.
pub async fn set_step_progress(
    pool: &sqlx::PgPool,
    build: BuildId,
    stepnr: i32,
    busy: i32,
    event: crate::events::NewEvent,
) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin().await?;
    let changed =
        sqlx::query("update BuildSteps set busy = $3 where build = $1 and stepnr = $2 and busy != 0 and busy != $3")
            .bind(build)
            .bind(stepnr)
            .bind(busy)
            .execute(&mut *tx)
            .await?;
    if changed.rows_affected() > 0 {
        crate::events::emit(&mut tx, &[event]).await?;
    }
    tx.commit().await
}

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
        .bind(p.default_path.as_deref())
        .execute(&mut *tx)
        .await?;
    }
    sqlx::query("delete from BuildMetrics where build = $1")
        .bind(build.id)
        .execute(&mut *tx)
        .await?;
    for m in &s.info.metrics {
        sqlx::query(
            "insert into BuildMetrics (build, name, unit, value, project, jobset, job, timestamp)
             values ($1, $2, $3, $4, $5, $6, $7, $8)",
        )
        .bind(build.id)
        .bind(&m.name)
        .bind(m.unit.as_deref())
        .bind(m.value)
        .bind(&build.project)
        .bind(&build.jobset)
        .bind(&build.job)
        .bind(build.timestamp as i32)
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

/// Remembers failed outputs so they are not built again (Hydra's cached failures).
pub async fn insert_failed_paths(
    tx: &mut PgConnection,
    paths: &[String],
) -> Result<(), sqlx::Error> {
    for p in paths {
        sqlx::query("insert into FailedPaths (path) values ($1) on conflict do nothing")
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

pub async fn notify_build_started(
    tx: &mut PgConnection,
    build: BuildId,
) -> Result<(), sqlx::Error> {
    notify(tx, "build_started", &build.to_string()).await
}

async fn notify(tx: &mut PgConnection, channel: &str, payload: &str) -> Result<(), sqlx::Error> {
    sqlx::query("select pg_notify($1, $2)")
        .bind(channel)
        .bind(payload)
        .execute(&mut *tx)
        .await
        .map(|_| ())
}
