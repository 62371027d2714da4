//! The queue monitor: PostgreSQL's queue of builds -> the step graph.
//!
//! It loads unfinished builds on start, then incrementally: new builds are
//! those with an id above the last one seen; restarts, cancels, deletes and
//! bumps come from `hqr_build_changes` (filled by a trigger), so a
//! notification never makes it re-read the whole queue.

mod loader;

use std::sync::Arc;
use std::time::Instant;

use hydra_db::status::BuildStatus;
use hydra_nix::StorePath;
use hydra_nix::daemon::DaemonClient;
use sqlx::postgres::PgListener;

use crate::completion;
use crate::events::{Kind, NewEvent};
use crate::graph::{Build, BuildId, InsertError};
use crate::record::{self, NewStepRow};
use crate::{Fatal, Shared};
use loader::Planned;

const CHANNELS: [&str; 6] = [
    "builds_added",
    "builds_restarted",
    "builds_cancelled",
    "builds_deleted",
    "builds_bumped",
    "jobset_shares_changed",
];

pub async fn run(shared: Arc<Shared>) -> Result<(), Fatal> {
    let mut listener = PgListener::connect_with(&shared.pool).await?;
    listener.listen_all(CHANNELS).await?;
    // Changes before this point are covered by the full load below.
    let mut cursor: i64 = sqlx::query_scalar("select coalesce(max(seq), 0) from hqr_build_changes")
        .fetch_one(&shared.pool)
        .await?;
    sqlx::query("delete from hqr_build_changes where seq <= $1")
        .bind(cursor)
        .execute(&shared.pool)
        .await?;
    load_shares(&shared).await?;
    let mut last_id: BuildId = 0;
    loop {
        last_id = load_new_builds(&shared, last_id).await?;
        cursor = apply_changes(&shared, cursor).await?;
        tracing::debug!("queue monitor waiting for notifications");
        let note = listener.recv().await?;
        tracing::debug!(channel = note.channel(), "queue monitor woken");
        if note.channel() == "jobset_shares_changed" {
            load_shares(&shared).await?;
        }
        // Several notifications may be pending: one pass serves them all.
        while let Some(note) = listener.next_buffered() {
            if note.channel() == "jobset_shares_changed" {
                load_shares(&shared).await?;
            }
        }
    }
}

#[derive(sqlx::FromRow)]
struct QueuedBuild {
    id: i32,
    drvpath: String,
    jobset_id: i32,
    project: String,
    jobset: String,
    job: String,
    timestamp: i32,
    priority: i32,
    globalpriority: i32,
    maxsilent: Option<i32>,
    timeout: Option<i32>,
}

const QUEUED: &str =
    "select b.id, b.drvPath, b.jobset_id, j.project, j.name as jobset, b.job, b.timestamp,
        b.priority, b.globalPriority, b.maxsilent, b.timeout
   from Builds b join Jobsets j on j.id = b.jobset_id
  where b.finished = 0";

/// Builds read at once, each by its own daemon connection: most of a
/// load is waiting for the daemon and PostgreSQL, which work in parallel.
const LOADERS: usize = 4;
/// Progress is logged, and the dispatcher woken, every this many builds.
const PROGRESS_EVERY: usize = 1000;

/// Loads builds with an id above `last_id`; returns the highest id seen.
async fn load_new_builds(shared: &Shared, last_id: BuildId) -> Result<BuildId, Fatal> {
    let rows: Vec<QueuedBuild> = sqlx::query_as(&format!("{QUEUED} and b.id > $1 order by b.id"))
        .bind(last_id)
        .fetch_all(&shared.pool)
        .await?;
    let Some(max) = rows.last().map(|r| r.id) else {
        return Ok(last_id);
    };
    // Before loading: a cached build finishes during its load, and its
    // `completed` must come after its `queued`.
    let ids: Vec<BuildId> = rows.iter().map(|r| r.id).collect();
    crate::events::emit_queued_once(&shared.pool, &ids).await?;
    let started = Instant::now();
    let total = rows.len();
    let queue = parking_lot::Mutex::new(rows.into_iter());
    let done = std::sync::atomic::AtomicUsize::new(0);
    let loader = || async {
        let mut client = shared.store.client().await?;
        let mut plans = Vec::new();
        loop {
            let Some(row) = queue.lock().next() else {
                return Ok::<_, Fatal>(plans);
            };
            let id = row.id;
            if let Some(cached) = load_build(shared, &mut client, row).await? {
                plans.push((id, cached));
            }
            let n = done.fetch_add(1, std::sync::atomic::Ordering::Relaxed) + 1;
            if n.is_multiple_of(PROGRESS_EVERY) {
                tracing::info!("loaded {n} of {total} queued builds");
                // What is loaded can start while the rest loads.
                shared.wake();
            }
        }
    };
    let loaders = LOADERS.min(total);
    let loaded = futures::future::try_join_all((0..loaders).map(|_| loader())).await?;
    let plans: Vec<(BuildId, u32)> = loaded.into_iter().flatten().collect();
    // Dispatch first: the counters can wait a moment.
    shared.wake();
    record_plans(shared, &plans).await?;
    let steps = shared.graph.lock().step_count();
    tracing::info!(
        "loaded {total} builds in {:.1?}; {steps} steps in the graph",
        started.elapsed()
    );
    Ok(max)
}

/// How many derivations of each build's closure loading found built
/// already (the client API's "cached" counter), in one statement.
async fn record_plans(shared: &Shared, plans: &[(BuildId, u32)]) -> Result<(), Fatal> {
    if plans.is_empty() {
        return Ok(());
    }
    let ids: Vec<i32> = plans.iter().map(|p| p.0).collect();
    let cached: Vec<i32> = plans.iter().map(|p| p.1 as i32).collect();
    sqlx::query(
        "insert into hqr_build_plans (build, cached) select * from unnest($1::integer[], $2::integer[])
         on conflict (build) do update set cached = excluded.cached",
    )
    .bind(&ids)
    .bind(&cached)
    .execute(&shared.pool)
    .await?;
    Ok(())
}

/// Loads one queued build: finishes it at once when it is cached, failed
/// before, or unloadable; otherwise adds it and its steps to the graph.
/// Returns how many derivations of its closure were built already, when
/// it was read.
async fn load_build(
    shared: &Shared,
    client: &mut DaemonClient,
    row: QueuedBuild,
) -> Result<Option<u32>, Fatal> {
    if shared.graph.lock().build(row.id).is_some() {
        return Ok(None);
    }
    let drv_path = match shared.store.dir().parse_path(&row.drvpath) {
        Ok(p) => p,
        Err(e) => {
            let reason = format!("Builds.drvPath '{}' is not a store path: {e}", row.drvpath);
            return abort_build(shared, row.id, &row.drvpath, &reason)
                .await
                .map(|()| Some(0));
        }
    };
    let build = Build {
        id: row.id,
        drv_path: drv_path.clone(),
        jobset_id: row.jobset_id,
        project: row.project,
        jobset: row.jobset,
        job: row.job,
        timestamp: row.timestamp as i64,
        local_priority: row.priority,
        global_priority: row.globalpriority,
        max_silent_secs: row.maxsilent.unwrap_or(3600).max(0) as u32,
        timeout_secs: row.timeout.unwrap_or(36000).max(0) as u32,
    };
    // A step the plan relied on may finish while the plan is read: then
    // read again (it is valid now, or failed).
    for _ in 0..5 {
        match loader::plan(shared, client, &drv_path).await? {
            Planned::Cached => {
                return finish_cached(shared, client, &build)
                    .await
                    .map(|()| Some(1));
            }
            Planned::InDestination {
                outputs,
                size,
                closure_size,
            } => {
                return finish_cached_in_destination(shared, &build, &outputs, size, closure_size)
                    .await
                    .map(|()| Some(1));
            }
            Planned::CachedFailure { drv } => {
                return fail_cached(shared, &build, &drv).await.map(|()| Some(0));
            }
            Planned::Unloadable { reason } => {
                return abort_build(shared, build.id, &row.drvpath, &reason)
                    .await
                    .map(|()| Some(0));
            }
            Planned::Steps(plan) => {
                let cached = plan.cached;
                let inserted =
                    shared
                        .graph
                        .lock()
                        .insert_build(build.clone(), plan, Instant::now());
                match inserted {
                    // The dispatcher is woken once the whole batch is in.
                    Ok(_runnable) => return Ok(Some(cached)),
                    Err(InsertError::Vanished(step)) => {
                        tracing::debug!(
                            build = build.id,
                            "step {step} finished during loading; reloading"
                        );
                    }
                    Err(InsertError::Duplicate(_)) => return Ok(None),
                }
            }
        }
    }
    tracing::warn!(
        build = build.id,
        "the build's steps kept changing while it loaded; will retry on the next pass"
    );
    Ok(None)
}

/// Every output of the build is valid already: a cached build (Hydra
/// writes no step row for it).
async fn finish_cached(
    shared: &Shared,
    client: &mut DaemonClient,
    build: &Build,
) -> Result<(), Fatal> {
    let drv = shared
        .store
        .read_derivation(client, &build.drv_path)
        .await?;
    let outputs: Vec<(String, String)> =
        crate::realisations::output_paths(&shared.pool, shared.store.dir(), &build.drv_path, &drv)
            .await?
            .into_iter()
            .filter_map(|(n, p)| p.map(|p| (n, p)))
            .collect();
    let measured = completion::measure_valid(client, outputs).await?;
    let now = record::now();
    let paths = measured.paths();
    let success = measured.success(&paths, now, now);
    in_transaction!(shared.pool, |tx| {
        record::mark_succeeded_build(&mut tx, build, &success, true).await?;
        record::notify_build_finished(&mut tx, build.id, &[]).await?;
        Ok(())
    })?;
    tracing::info!(build = build.id, "cached build: every output is valid");
    Ok(())
}

/// Every output is in a destination cache (not in the runner's store): a
/// cached build, measured from the cache's narinfos (nothing of
/// `nix-support` can be read without the NARs).
async fn finish_cached_in_destination(
    shared: &Shared,
    build: &Build,
    outputs: &[(String, String)],
    size: u64,
    closure_size: u64,
) -> Result<(), Fatal> {
    let now = record::now();
    let info = completion::nix_support::BuildOutputInfo::default();
    let success = record::Success {
        info: &info,
        outputs,
        size: size as i64,
        closure_size: closure_size as i64,
        start_time: now,
        stop_time: now,
    };
    in_transaction!(shared.pool, |tx| {
        record::mark_succeeded_build(&mut tx, build, &success, true).await?;
        record::notify_build_finished(&mut tx, build.id, &[]).await?;
        Ok(())
    })?;
    tracing::info!(
        build = build.id,
        "cached build: every output is in a destination cache"
    );
    Ok(())
}

/// A step's outputs are in FailedPaths: the build fails at once (Hydra's
/// cached failure: 1 for the top level, 2 for a dependency; step status 8).
async fn fail_cached(shared: &Shared, build: &Build, drv: &StorePath) -> Result<(), Fatal> {
    let now = record::now();
    let dir = shared.store.dir();
    let top = *drv == build.drv_path;
    let status = if top {
        BuildStatus::Failed
    } else {
        BuildStatus::DepFailed
    };
    in_transaction!(shared.pool, |tx| {
        record::create_build_step(
            &mut tx,
            &NewStepRow {
                build: build.id,
                drv_path: &dir.display(drv),
                system: "",
                status: Some(BuildStatus::CachedFailure),
                machine: "",
                start_time: None,
                error_msg: None,
                propagated_from: None,
                outputs: &[],
            },
        )
        .await?;
        record::mark_failed_build(&mut tx, build.id, status, now, now, top).await?;
        record::notify_build_finished(&mut tx, build.id, &[]).await?;
        Ok(())
    })?;
    tracing::info!(build = build.id, "cached failure of {drv}");
    Ok(())
}

/// The build cannot be loaded (its `.drv` is gone or malformed): it is
/// aborted (3), with the reason in a step row so users can read it.
async fn abort_build(
    shared: &Shared,
    build: BuildId,
    drv: &str,
    reason: &str,
) -> Result<(), Fatal> {
    tracing::error!(build, "aborting build: {reason}");
    let now = record::now();
    in_transaction!(shared.pool, |tx| {
        record::create_build_step(
            &mut tx,
            &NewStepRow {
                build,
                drv_path: drv,
                system: "",
                status: Some(BuildStatus::Aborted),
                machine: "",
                start_time: Some(now),
                error_msg: Some(reason),
                propagated_from: None,
                outputs: &[],
            },
        )
        .await?;
        record::mark_failed_build(&mut tx, build, BuildStatus::Aborted, now, now, false).await?;
        record::notify_build_finished(&mut tx, build, &[]).await?;
        Ok(())
    })?;
    Ok(())
}

/// Applies rows of `hqr_build_changes` after `cursor`; returns the new cursor.
async fn apply_changes(shared: &Shared, cursor: i64) -> Result<i64, Fatal> {
    let changes: Vec<(i64, i32, String)> = sqlx::query_as(
        "select seq, build, kind from hqr_build_changes where seq > $1 order by seq",
    )
    .bind(cursor)
    .fetch_all(&shared.pool)
    .await?;
    let Some(last) = changes.last().map(|c| c.0) else {
        return Ok(cursor);
    };
    let mut gone = Vec::new();
    let mut gone_soft = Vec::new();
    for (_, build, kind) in &changes {
        match kind.as_str() {
            "cancelled" => {
                if emit_cancelled(shared, *build).await? {
                    gone_soft.push(*build);
                } else {
                    gone.push(*build);
                }
            }
            "deleted" => gone.push(*build),
            "restarted" => {
                let queued = NewEvent::new(Kind::Queued, vec![*build]).detail("restarted");
                crate::events::emit_now(&shared.pool, &[queued]).await?;
                let row: Option<QueuedBuild> = sqlx::query_as(&format!("{QUEUED} and b.id = $1"))
                    .bind(build)
                    .fetch_optional(&shared.pool)
                    .await?;
                if let Some(row) = row {
                    let mut client = shared.store.client().await?;
                    if let Some(cached) = load_build(shared, &mut client, row).await? {
                        record_plans(shared, &[(*build, cached)]).await?;
                    }
                    shared.wake();
                }
            }
            "bumped" => {
                let prio: Option<i32> =
                    sqlx::query_scalar("select globalPriority from Builds where id = $1")
                        .bind(build)
                        .fetch_optional(&shared.pool)
                        .await?;
                if let Some(p) = prio {
                    shared.graph.lock().bump_build(*build, p);
                    shared.wake();
                }
            }
            _ => {}
        }
    }
    if !gone_soft.is_empty() {
        let dropped = shared
            .graph
            .lock()
            .remove_builds_keeping_running(&gone_soft);
        tracing::info!(
            "{} builds were superseded, their running steps may finish; {} steps dropped",
            gone_soft.len(),
            dropped.steps.len()
        );
        completion::drop_steps(shared, dropped).await?;
    }
    if !gone.is_empty() {
        let dropped = shared.graph.lock().remove_builds(&gone);
        tracing::info!(
            "{} builds left the queue; {} steps dropped",
            gone.len(),
            dropped.steps.len()
        );
        completion::drop_steps(shared, dropped).await?;
    }
    sqlx::query("delete from hqr_build_changes where seq <= $1")
        .bind(last)
        .execute(&shared.pool)
        .await?;
    Ok(last)
}

/// The `cancelled` event of a build, with the reason the API recorded (a
/// cancel from Hydra's web interface has none). Returns whether its
/// running steps may finish (a soft supersede).
async fn emit_cancelled(shared: &Shared, build: BuildId) -> Result<bool, Fatal> {
    let row: Option<(String, bool)> =
        sqlx::query_as("select reason, keep_running from hqr_cancellations where build = $1")
            .bind(build)
            .fetch_optional(&shared.pool)
            .await?;
    let mut event =
        NewEvent::new(Kind::Cancelled, vec![build]).status(BuildStatus::Cancelled.code());
    event.detail = row.as_ref().map(|r| r.0.clone());
    crate::events::emit_now(&shared.pool, &[event]).await?;
    Ok(row.is_some_and(|r| r.1))
}

/// Jobsets' scheduling shares, and their build time in the last 24 hours.
async fn load_shares(shared: &Shared) -> Result<(), Fatal> {
    let rows: Vec<(i32, i32, Option<i64>)> = sqlx::query_as(
        "select j.id, j.schedulingShares,
                (select sum(s.stopTime - s.startTime)::bigint from Builds b join BuildSteps s on s.build = b.id
                  where b.jobset_id = j.id and s.stopTime > extract(epoch from now())::int - 86400)
           from Jobsets j",
    )
    .fetch_all(&shared.pool)
    .await?;
    let mut shares = shared.shares.lock();
    for (id, n, used) in rows {
        shares.set_shares(id, n.max(1) as u32);
        shares.set_used(id, used.unwrap_or(0) as f64);
    }
    Ok(())
}
