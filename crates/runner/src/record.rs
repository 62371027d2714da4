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

/// An error message as BuildSteps.errorMsg keeps it: many carry a
/// builder's or Nix's text (a path from an upload header, the log's last
/// lines), so every one is cleaned at the boundary, whoever made it.
fn error_text(msg: &str) -> String {
    crate::outside::display_text(msg, crate::outside::ERROR_MSG_MAX)
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
    /// The resolved derivation's base name, for a status-13 row: Hydra's
    /// check `(status = 13) = (resolvedDrvPath is not null)` holds for
    /// every row, so both are written by the one insert.
    pub resolved_drv_path: Option<&'a str>,
}

/// Creates a BuildSteps row with the next free step number of its build
/// and its BuildStepOutputs; notifies `step_started` for a busy row.
/// Returns None when the build is gone (deleted, with its jobset or
/// project, while its steps ran, as Hydra's web interface can): the row
/// is not written. The build's row is locked against deletion until the
/// transaction ends, so the insert cannot break its foreign key.
pub async fn create_build_step(
    tx: &mut PgConnection,
    row: &NewStepRow<'_>,
) -> Result<Option<i32>, sqlx::Error> {
    let exists: Option<i32> =
        sqlx::query_scalar("select id from Builds where id = $1 for key share")
            .bind(row.build)
            .fetch_optional(&mut *tx)
            .await?;
    if exists.is_none() {
        return Ok(None);
    }
    loop {
        let stepnr: i32 = sqlx::query_scalar(
            "select coalesce(max(stepnr), 0) + 1 from BuildSteps where build = $1",
        )
        .bind(row.build)
        .fetch_one(&mut *tx)
        .await?;
        let busy = row.status.is_none();
        let inserted = sqlx::query(
            "insert into BuildSteps (build, stepnr, type, drvPath, busy, startTime, system, status, propagatedFrom, errorMsg, stopTime, machine, resolvedDrvPath)
             values ($1, $2, 0, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12) on conflict do nothing",
        )
        .bind(row.build)
        .bind(stepnr)
        .bind(row.drv_path)
        .bind(if busy { 1 } else { 0 })
        .bind(row.start_time)
        .bind(row.system)
        .bind(row.status.map(|s| s.code()))
        .bind(row.propagated_from)
        .bind(row.error_msg.filter(|m| !m.is_empty()).map(error_text))
        .bind(if busy { None } else { row.start_time })
        .bind(row.machine)
        .bind(row.resolved_drv_path)
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
        return Ok(Some(stepnr));
    }
}

/// Hydra's row for a resolved CA step: status 13, with the resolved
/// `.drv`'s base name in `resolvedDrvPath`. Written once per build and
/// derivation: a runner that resolves again after a restart reuses it.
/// None when the build is gone.
pub async fn record_resolution(
    tx: &mut PgConnection,
    build: BuildId,
    drv_path: &str,
    system: &str,
    resolved_base_name: &str,
    outputs: &[(String, Option<String>)],
) -> Result<Option<i32>, sqlx::Error> {
    let existing: Option<i32> = sqlx::query_scalar(
        "select stepnr from BuildSteps where build = $1 and drvPath = $2 and status = $3",
    )
    .bind(build)
    .bind(drv_path)
    .bind(BuildStatus::Resolved.code())
    .fetch_optional(&mut *tx)
    .await?;
    if let Some(stepnr) = existing {
        return Ok(Some(stepnr));
    }
    let now = now();
    create_build_step(
        tx,
        &NewStepRow {
            build,
            drv_path,
            system,
            status: Some(BuildStatus::Resolved),
            machine: "",
            start_time: Some(now),
            error_msg: None,
            propagated_from: None,
            outputs,
            resolved_drv_path: Some(resolved_base_name),
        },
    )
    .await
}

/// How the terminal of a resolution came to be, for its copies.
pub struct Terminal<'a> {
    /// The resolved derivation (full path) and its base name.
    pub drv_path: &'a str,
    pub base_name: &'a str,
    pub system: &'a str,
    /// Where it was built ('' for an early cutoff).
    pub machine: &'a str,
    pub start_time: i64,
    pub stop_time: i64,
    pub outputs: &'a [(String, String)],
    /// The build whose own row records the attempt.
    pub except: Option<BuildId>,
}

/// Hydra's web interface follows a resolved step (status 13) to the step
/// of its resolved derivation *within the same build*. Every build that
/// holds a status-13 row resolved to `t` and has no successful row of its
/// own for it gets one, of type 1 (for that build the outputs were there
/// already: built by another build's attempt, or an early cutoff), so
/// that a derivation is recorded as built (type 0) once. Returns those
/// builds.
pub async fn record_resolved_terminal(
    tx: &mut PgConnection,
    t: &Terminal<'_>,
) -> Result<Vec<BuildId>, sqlx::Error> {
    let builds: Vec<BuildId> = sqlx::query_scalar(
        "select distinct s.build from BuildSteps s
          where s.status = 13 and s.resolvedDrvPath = $1 and s.build is distinct from $3
            and not exists (select 1 from BuildSteps t
                             where t.build = s.build and t.drvPath = $2 and t.status = 0)
          order by 1",
    )
    .bind(t.base_name)
    .bind(t.drv_path)
    .bind(t.except)
    .fetch_all(&mut *tx)
    .await?;
    let outputs: Vec<(String, Option<String>)> = t
        .outputs
        .iter()
        .map(|(n, p)| (n.clone(), Some(p.clone())))
        .collect();
    for build in &builds {
        let Some(stepnr) = create_build_step(
            tx,
            &NewStepRow {
                build: *build,
                drv_path: t.drv_path,
                system: t.system,
                status: Some(BuildStatus::Success),
                machine: t.machine,
                start_time: Some(t.start_time),
                error_msg: None,
                propagated_from: None,
                outputs: &outputs,
                resolved_drv_path: None,
            },
        )
        .await?
        else {
            continue;
        };
        sqlx::query(
            "update BuildSteps set type = 1, stopTime = $3 where build = $1 and stepnr = $2",
        )
        .bind(build)
        .bind(stepnr)
        .bind(t.stop_time)
        .execute(&mut *tx)
        .await?;
    }
    Ok(builds)
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
    .bind(r.error_msg.filter(|m| !m.is_empty()).map(error_text))
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

/// The jobset `queue` of project `tenant` (the client API's), created
/// with both when missing. Created as Hydra's schema requires of a jobset
/// with no Nix expression: type 0 with empty expression fields and no
/// flake, `emailOverride` set, and disabled, so Hydra's evaluator never
/// tries to evaluate it.
pub async fn ensure_jobset(
    tx: &mut PgConnection,
    owner: &str,
    tenant: &str,
    queue: &str,
) -> Result<i32, sqlx::Error> {
    sqlx::query(
        "insert into Users (userName, emailAddress, password) values ($1, '', '!')
         on conflict do nothing",
    )
    .bind(owner)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "insert into Projects (name, displayName, owner) values ($1, $1, $2) on conflict do nothing",
    )
    .bind(tenant)
    .bind(owner)
    .execute(&mut *tx)
    .await?;
    sqlx::query(
        "insert into Jobsets (name, project, description, type, nixExprInput, nixExprPath, flake,
                              enabled, checkInterval, emailOverride)
         values ($1, $2, 'builds submitted through the queue runner''s client API', 0, '', '', null,
                 0, 0, '')
         on conflict do nothing",
    )
    .bind(queue)
    .bind(tenant)
    .execute(&mut *tx)
    .await?;
    sqlx::query_scalar("select id from Jobsets where project = $1 and name = $2")
        .bind(tenant)
        .bind(queue)
        .fetch_one(&mut *tx)
        .await
}

/// A build to queue, as an evaluator would write it.
pub struct NewBuild<'a> {
    pub jobset: i32,
    pub job: &'a str,
    pub drv_path: &'a str,
    pub system: &'a str,
    /// None: Hydra's defaults (3600 s silent, 36000 s in all).
    pub max_silent: Option<i32>,
    pub timeout: Option<i32>,
    pub local_priority: i32,
    pub global_priority: i32,
    /// Output name -> path (None for a CA output).
    pub outputs: &'a [(String, Option<String>)],
}

/// Queues a build with its BuildOutputs; returns its id. The caller
/// notifies `builds_added` when its transaction has them all.
pub async fn insert_build(tx: &mut PgConnection, b: &NewBuild<'_>) -> Result<BuildId, sqlx::Error> {
    let id: BuildId = sqlx::query_scalar(
        "insert into Builds (finished, timestamp, jobset_id, job, drvPath, system, maxsilent, timeout,
                             priority, globalPriority)
         values (0, extract(epoch from now())::int, $1, $2, $3, $4, coalesce($5, 3600),
                 coalesce($6, 36000), $7, $8)
         returning id",
    )
    .bind(b.jobset)
    .bind(b.job)
    .bind(b.drv_path)
    .bind(b.system)
    .bind(b.max_silent)
    .bind(b.timeout)
    .bind(b.local_priority)
    .bind(b.global_priority)
    .fetch_one(&mut *tx)
    .await?;
    for (name, path) in b.outputs {
        sqlx::query("insert into BuildOutputs (build, name, path) values ($1, $2, $3)")
            .bind(id)
            .bind(name)
            .bind(path)
            .execute(&mut *tx)
            .await?;
    }
    Ok(id)
}
