//! BuildSteps and BuildStepOutputs: a step's row from creation (busy) to
//! its result, resolutions (status 13) and their terminals, and the
//! runner's record of refused reports.

use hydra_db::status::BuildStatus;
use sqlx::{PgConnection, Row};

use super::{error_text, now};
use crate::events::{TELL_SEQUENCER, written_cte};
use crate::graph::BuildId;
use std::sync::LazyLock;

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
    /// The dispatch that makes a busy row, written by the same statement.
    pub dispatch: Option<Dispatch<'a>>,
}

/// What a dispatch writes with its busy row: a dispatch is then one
/// statement, where it was four and a transaction.
pub struct Dispatch<'a> {
    /// The attempt (`hqr_attempts`, on the row's machine); it takes the
    /// step number the row gets.
    pub attempt: &'a uuid::Uuid,
    /// The derivation's base name (as the runner's tables keep it).
    pub drv_base_name: &'a str,
    /// The step's `step_started` event.
    pub event: &'a crate::events::NewEvent,
    /// The build's first step: Hydra's `build_started` is notified.
    pub first_of_build: bool,
}

/// Creates a BuildSteps row with the next free step number of its build
/// and its BuildStepOutputs (and what its dispatch writes, if any);
/// notifies `step_started` for a busy row.
/// Returns None when the build is gone (deleted, with its jobset or
/// project, while its steps ran, as Hydra's web interface can): the row
/// is not written. The build's row is locked against deletion until the
/// transaction ends, so the insert cannot break its foreign key.
pub async fn create_build_step(
    tx: &mut PgConnection,
    row: &NewStepRow<'_>,
) -> Result<Option<i32>, sqlx::Error> {
    let busy = row.status.is_none();
    let (names, paths): (Vec<&str>, Vec<Option<&str>>) = row
        .outputs
        .iter()
        .map(|(name, path)| (name.as_str(), path.as_deref()))
        .unzip();
    let dispatch = row.dispatch.as_ref();
    let events = crate::events::EventColumns::new(dispatch.map(|d| d.event));
    loop {
        // One statement (the lock, the number, both rows, the dispatch's
        // attempt and event, the notifications).
        static SQL: LazyLock<String> = LazyLock::new(|| {
            format!(
                "with build as (select id from Builds where id = $1 for key share),
                      next as (select coalesce(max(stepnr), 0) + 1 as stepnr from BuildSteps where build = $1),
                      step as (
                        insert into BuildSteps (build, stepnr, type, drvPath, busy, startTime, system, status, propagatedFrom, errorMsg, stopTime, machine, resolvedDrvPath)
                        select build.id, next.stepnr, 0, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11 from build, next
                        on conflict do nothing
                        returning stepnr),
                      outputs as (
                        insert into BuildStepOutputs (build, stepnr, name, path)
                        select $1, step.stepnr, o.name, o.path
                          from step, unnest($12::text[], $13::text[]) as o(name, path)),
                      attempt as (
                        insert into hqr_attempts (id, build, stepnr, drv_path, machine)
                        select $14, $1, step.stepnr, $15, $10 from step where $14 is not null),
                      {}
                 select exists (select 1 from build),
                        (select stepnr from step),
                        (select count(pg_notify('step_started', $1::text || chr(9) || stepnr::text))
                           from step where $3 = 1),
                        {TELL_SEQUENCER},
                        (select count(pg_notify('build_started', $1::text)) from step where $22)",
                written_cte(16, Some("step"))
            )
        });
        let q = sqlx::query(&SQL)
            .bind(row.build)
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
            .bind(&names)
            .bind(&paths)
            .bind(dispatch.map(|d| d.attempt))
            .bind(dispatch.map(|d| d.drv_base_name));
        let r = events
            .bind(q)
            .bind(dispatch.is_some_and(|d| d.first_of_build))
            .fetch_one(&mut *tx)
            .await?;
        let (present, stepnr): (bool, Option<i32>) = (r.try_get(0)?, r.try_get(1)?);
        match (present, stepnr) {
            (false, _) => return Ok(None),
            (true, Some(n)) => return Ok(Some(n)),
            (true, None) => continue, // another writer took this number
        }
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
            dispatch: None,
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
                dispatch: None,
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
/// How much of a refusal's reason is kept: enough to say why, not the
/// 64 MiB a builder can send.
pub const REJECTION_MAX: usize = 4 << 10;

/// Rejections older than `days` days go.
pub async fn prune_rejections(pool: &sqlx::PgPool, days: u32) -> Result<u64, sqlx::Error> {
    sqlx::query("delete from hqr_rejections where at < now() - make_interval(days => $1)")
        .bind(days as i32)
        .execute(pool)
        .await
        .map(|r| r.rows_affected())
}

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
    .bind(crate::outside::display_text(reason, REJECTION_MAX))
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
    /// The step's `step_finished` event, written by the same statement.
    pub event: Option<&'a crate::events::NewEvent>,
}

/// Closes a busy step row and the attempt that ran it (`hqr_attempts`,
/// with the row's status as its outcome); notifies `step_finished`.
pub async fn finish_build_step(
    tx: &mut PgConnection,
    attempt: &uuid::Uuid,
    build: BuildId,
    stepnr: i32,
    r: &StepResult<'_>,
) -> Result<(), sqlx::Error> {
    let (names, paths): (Vec<&str>, Vec<&str>) = r
        .outputs
        .iter()
        .map(|(name, path)| (name.as_str(), path.as_str()))
        .unzip();
    let events = crate::events::EventColumns::new(r.event);
    // One statement: the row, its outputs' paths, the attempt, the event
    // and the notifications.
    static SQL: LazyLock<String> = LazyLock::new(|| {
        format!(
            "with step as (
           update BuildSteps set busy = 0, status = $1, errorMsg = $4, startTime = $5, stopTime = $6, machine = $7,
                  timesBuilt = $8, isNonDeterministic = $9
            where build = $2 and stepnr = $3),
              outputs as (
           update BuildStepOutputs o set path = v.path
             from unnest($10::text[], $11::text[]) as v(name, path)
            where o.build = $2 and o.stepnr = $3 and o.name = v.name),
              attempt as (
           update hqr_attempts set finished_at = now(), outcome = $1
            where id = $13 and finished_at is null),
              {}
         select pg_notify('step_finished', $12), {TELL_SEQUENCER}",
            written_cte(14, None)
        )
    });
    let q = sqlx::query(&SQL)
        .bind(r.status.code())
        .bind(build)
        .bind(stepnr)
        .bind(r.error_msg.filter(|m| !m.is_empty()).map(error_text))
        .bind(r.start_time)
        .bind(r.stop_time)
        .bind(r.machine)
        .bind(r.times_built)
        .bind(r.is_non_deterministic)
        .bind(&names)
        .bind(&paths)
        .bind(format!("{build}\t{stepnr}\t{}", r.log_file))
        .bind(attempt);
    events.bind(q).execute(&mut *tx).await.map(|_| ())
}

/// A running step's new progress (`busy`) code, with its event.
#[derive(Debug, Clone)]
pub struct ProgressUpdate {
    pub build: BuildId,
    pub stepnr: i32,
    pub busy: i32,
    pub event: crate::events::NewEvent,
    /// When the runner received the report: the event's time is the
    /// database's clock at the write less the report's age. Reports wait
    /// up to the writer's gather window for their batch, and the write's
    /// time alone would blur the phases of a short step into one instant;
    /// an age keeps every event's time on the one clock, the database's.
    pub received: std::time::Instant,
}

/// Sets the progress codes of running steps, in the order given, in one
/// statement (it locks the rows in key order, so two writers never wait
/// on each other in a cycle): a code a step has already, and any code of
/// a step that is finished (`busy` 0) or gone, changes nothing and has no
/// event.
pub async fn set_steps_progress(
    pool: &sqlx::PgPool,
    updates: &[ProgressUpdate],
) -> Result<(), sqlx::Error> {
    use std::collections::HashMap;
    // In order, an update that repeats the step's previous one in the
    // batch changes nothing; of the rest, only each step's first can equal
    // the row's code (each later one differs from the one before it), so
    // the statement needs the row's code only for the first.
    let mut last: HashMap<(BuildId, i32), i32> = HashMap::new();
    let mut kept: Vec<(&ProgressUpdate, bool)> = Vec::new();
    for u in updates {
        match last.insert((u.build, u.stepnr), u.busy) {
            Some(prev) if prev == u.busy => {}
            prev => kept.push((u, prev.is_none())),
        }
    }
    if kept.is_empty() {
        return Ok(());
    }
    let builds: Vec<BuildId> = kept.iter().map(|(u, _)| u.build).collect();
    let stepnrs: Vec<i32> = kept.iter().map(|(u, _)| u.stepnr).collect();
    let codes: Vec<i32> = kept.iter().map(|(u, _)| u.busy).collect();
    let firsts: Vec<bool> = kept.iter().map(|(_, first)| *first).collect();
    let ages_ms: Vec<i64> = kept
        .iter()
        .map(|(u, _)| u.received.elapsed().as_millis() as i64)
        .collect();
    let events = crate::events::EventColumns::new(kept.iter().map(|(u, _)| &u.event));
    static SQL: LazyLock<String> = LazyLock::new(|| {
        format!(
            "with v as (
               select * from unnest($7::integer[], $8::integer[], $9::integer[], $10::boolean[], $11::bigint[],
                                    $1::text[], $2::text[], $3::text[], $4::text[], $5::integer[], $6::text[])
                        with ordinality as v(build, stepnr, busy, first, age_ms, kind, builds, drv, machine, status, detail, ord)),
                  locked as (
               select s.build, s.stepnr, s.busy from BuildSteps s
                where (s.build, s.stepnr) in (select build, stepnr from v)
                order by s.build, s.stepnr
                  for update of s),
                  changed as (
               select v.* from v join locked l on l.build = v.build and l.stepnr = v.stepnr
                where l.busy <> 0 and (not v.first or v.busy <> l.busy)),
                  set_busy as (
               update BuildSteps s set busy = c.busy
                 from (select distinct on (build, stepnr) build, stepnr, busy from changed
                        order by build, stepnr, ord desc) c
                where s.build = c.build and s.stepnr = c.stepnr),
                  written as (
               insert into hqr_events (kind, builds, at_ms, drv_path, machine, status, detail)
               select c.kind, c.builds::integer[],
                      (extract(epoch from clock_timestamp()) * 1000)::bigint - c.age_ms,
                      c.drv, c.machine, c.status, c.detail
                 from changed c order by c.ord
               returning 1)
             select {TELL_SEQUENCER}"
        )
    });
    events
        .bind(sqlx::query(&SQL))
        .bind(&builds)
        .bind(&stepnrs)
        .bind(&codes)
        .bind(&firsts)
        .bind(&ages_ms)
        .execute(pool)
        .await?;
    Ok(())
}
