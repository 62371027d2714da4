//! The queue monitor: PostgreSQL's queue of builds -> the step graph.
//!
//! It loads unfinished builds on start, then incrementally: new builds are
//! those with an id above the last one seen, plus ids it skipped because
//! their transaction had not committed yet (ids are handed out at insert,
//! not at commit: see [`cursor`]); restarts, cancels, deletes and bumps
//! come from `hqr_build_changes` (filled by a trigger), read the same way,
//! so a notification never makes it re-read the whole queue. A lost LISTEN
//! connection, which loses the notifications sent meanwhile, is followed
//! by a pass, and a pass also runs every [`SAFETY_PASS`] regardless.

mod cursor;
mod loader;

use std::sync::Arc;
use std::time::{Duration, Instant};

use hydra_db::status::BuildStatus;
use hydra_nix::StorePath;
use hydra_nix::daemon::DaemonClient;
use sqlx::postgres::PgListener;

use crate::events::{Kind, NewEvent};
use crate::graph::{Build, BuildId, InsertError};
use crate::outcome;
use crate::record::{self, NewStepRow};
use crate::{Fatal, Shared};
use cursor::SeqCursor;
use loader::Planned;

const CHANNELS: [&str; 6] = [
    "builds_added",
    "builds_restarted",
    "builds_cancelled",
    "builds_deleted",
    "builds_bumped",
    "jobset_shares_changed",
];

/// A pass runs this often even without notifications: the safety net for
/// a notification lost some way we did not foresee. It costs two index
/// lookups when nothing changed.
const SAFETY_PASS: Duration = Duration::from_secs(30);

/// Where the monitor is in the two tables it follows.
struct Cursors {
    builds: SeqCursor,
    changes: SeqCursor,
}

pub async fn run(shared: Arc<Shared>) -> Result<(), Fatal> {
    let mut listener = PgListener::connect_with(&shared.listen_pool).await?;
    listener.listen_all(CHANNELS).await?;
    // Changes committed before this point are covered by the full load
    // below; ones that commit later, though numbered lower, are in the
    // gap the cursor starts with.
    let changes_high: i64 =
        sqlx::query_scalar("select coalesce(max(seq), 0) from hqr_build_changes")
            .fetch_one(&shared.pool)
            .await?;
    sqlx::query("delete from hqr_build_changes where seq <= $1")
        .bind(changes_high)
        .execute(&shared.pool)
        .await?;
    load_shares(&shared).await?;
    let now = Instant::now();
    let mut cursors = Cursors {
        builds: SeqCursor::new(0),
        changes: SeqCursor::new(0),
    };
    cursors.changes.saw(&[changes_high], now);
    loop {
        pass(&shared, &mut cursors).await?;
        let next_check = [
            cursors.builds.next_check(Instant::now()),
            cursors.changes.next_check(Instant::now()),
        ]
        .into_iter()
        .flatten()
        .min()
        .unwrap_or_else(|| Instant::now() + SAFETY_PASS)
        .min(Instant::now() + SAFETY_PASS);
        tracing::debug!("queue monitor waiting for notifications");
        let note = tokio::select! {
            note = listener.try_recv() => note?,
            _ = tokio::time::sleep_until(next_check.into()) => continue,
        };
        let Some(note) = note else {
            // The LISTEN connection was lost (and is made again on the next
            // call): what was notified meanwhile is found by the pass.
            tracing::warn!(
                "the queue monitor's LISTEN connection was lost; looking for what it missed"
            );
            continue;
        };
        tracing::debug!(channel = note.channel(), "queue monitor woken");
        let mut shares_changed = note.channel() == "jobset_shares_changed";
        // Several notifications may be pending: one pass serves them all.
        while let Some(note) = listener.next_buffered() {
            shares_changed |= note.channel() == "jobset_shares_changed";
        }
        if shares_changed {
            load_shares(&shared).await?;
        }
    }
}

/// One look at both tables: new builds, builds whose ids were skipped,
/// new changes. Gaps are given up once no transaction that could fill
/// them is left (see [`cursor`]).
async fn pass(shared: &Shared, cursors: &mut Cursors) -> Result<(), Fatal> {
    let (xmin, xmax): (String, String) = sqlx::query_as(
        "select pg_snapshot_xmin(s)::text, pg_snapshot_xmax(s)::text from pg_current_snapshot() s",
    )
    .fetch_one(&shared.pool)
    .await?;
    let snapshot_at = Instant::now();
    let (xmin, xmax) = (
        xmin.parse::<u64>().unwrap_or(0),
        xmax.parse::<u64>().unwrap_or(u64::MAX),
    );
    load_new_builds(shared, &mut cursors.builds).await?;
    apply_changes(shared, &mut cursors.changes).await?;
    for (what, c) in [
        ("build ids", &mut cursors.builds),
        ("change numbers", &mut cursors.changes),
    ] {
        c.set_horizons(snapshot_at, xmax);
        let given_up = c.settle(xmin);
        if given_up > 0 {
            tracing::debug!("{given_up} skipped {what} never committed (rolled back or deleted)");
        }
    }
    Ok(())
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
/// Builds a loader reads together: their closures are walked a level of
/// all at a time, so the daemon is asked once a level and FailedPaths once
/// a chunk, not once a derivation and once a build.
const CHUNK: usize = 32;
/// Progress is logged, and the dispatcher woken, every this many builds.
const PROGRESS_EVERY: usize = 1000;

/// Loads the unfinished builds above the cursor and in its gaps (those
/// already in the graph are skipped by their id first, so a large gap
/// costs an index scan of ids, not a read of the queue).
async fn load_new_builds(shared: &Shared, cursor: &mut SeqCursor) -> Result<(), Fatal> {
    let mut rows: Vec<QueuedBuild> =
        sqlx::query_as(&format!("{QUEUED} and b.id > $1 order by b.id"))
            .bind(cursor.high() as i32)
            .fetch_all(&shared.pool)
            .await?;
    let mut late = Vec::new();
    for gap in cursor.gaps() {
        let ids: Vec<i32> = sqlx::query_scalar(
            "select id from Builds where finished = 0 and id between $1 and $2 order by id",
        )
        .bind(gap.lo as i32)
        .bind(gap.hi.min(i32::MAX as i64) as i32)
        .fetch_all(&shared.pool)
        .await?;
        late.extend(ids.into_iter().filter(|id| !shared.state.has_build(*id)));
    }
    if !late.is_empty() {
        tracing::info!(
            "{} builds committed after builds with higher ids; loading them",
            late.len()
        );
        let late_rows: Vec<QueuedBuild> =
            sqlx::query_as(&format!("{QUEUED} and b.id = any($1) order by b.id"))
                .bind(&late)
                .fetch_all(&shared.pool)
                .await?;
        rows.extend(late_rows);
    }
    let seen: Vec<i64> = rows
        .iter()
        .map(|r| r.id as i64)
        .chain(late.iter().map(|id| *id as i64))
        .collect();
    cursor.saw(&seen, Instant::now());
    if rows.is_empty() {
        return Ok(());
    }
    load_builds(shared, rows).await
}

/// Loads `rows` into the graph (or finishes them at once).
async fn load_builds(shared: &Shared, rows: Vec<QueuedBuild>) -> Result<(), Fatal> {
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
            let chunk: Vec<QueuedBuild> = queue.lock().by_ref().take(CHUNK).collect();
            if chunk.is_empty() {
                // Its reads all succeeded: the next pass need not fork a
                // daemon process for its own.
                shared.store.release(client);
                return Ok::<_, Fatal>(plans);
            }
            let n = chunk.len();
            load_chunk(shared, &mut client, chunk, &mut plans).await?;
            let before = done.fetch_add(n, std::sync::atomic::Ordering::Relaxed);
            if (before + n) / PROGRESS_EVERY > before / PROGRESS_EVERY {
                tracing::info!("loaded {} of {total} queued builds", before + n);
                // What is loaded can start while the rest loads.
                shared.state.batch_loaded();
            }
        }
    };
    let loaders = LOADERS.min(total);
    let loaded = futures::future::try_join_all((0..loaders).map(|_| loader())).await?;
    let plans: Vec<(BuildId, u32)> = loaded.into_iter().flatten().collect();
    // Dispatch first: the counters can wait a moment.
    shared.state.batch_loaded();
    record_plans(shared, &plans).await?;
    let steps = shared.state.queue_counts().steps;
    tracing::info!(
        "loaded {total} builds in {:.1?}; {steps} steps in the graph",
        started.elapsed()
    );
    Ok(())
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

/// Loads a chunk of queued builds (see [`CHUNK`]); pushes, for each that
/// was read, how many derivations of its closure were built already.
async fn load_chunk(
    shared: &Shared,
    client: &mut DaemonClient,
    rows: Vec<QueuedBuild>,
    plans: &mut Vec<(BuildId, u32)>,
) -> Result<(), Fatal> {
    let mut builds = Vec::with_capacity(rows.len());
    for row in rows {
        let id = row.id;
        let drv = row.drvpath.clone();
        match to_build(shared, row).await {
            Ok(Row::New(build)) => builds.push((build, drv)),
            Ok(Row::Ended) => plans.push((id, 0)),
            Ok(Row::Loaded) => {}
            Err(e) => refused_or_fatal(shared, id, &drv, e).await?,
        }
    }
    let tops: Vec<StorePath> = builds.iter().map(|(b, _)| b.drv_path.clone()).collect();
    let planned = match loader::plan_all(shared, client, &tops).await {
        Ok(p) => p,
        // A value of one build's the database refused: each on its own,
        // so that the others load.
        Err(e) if e.refused_data().is_some() => {
            for (build, drv) in builds {
                let id = build.id;
                match load_build(shared, client, build, &drv).await {
                    Ok(Some(cached)) => plans.push((id, cached)),
                    Ok(None) => {}
                    Err(e) => refused_or_fatal(shared, id, &drv, e).await?,
                }
            }
            return Ok(());
        }
        Err(e) => return Err(e),
    };
    for ((build, drv), planned) in builds.into_iter().zip(planned) {
        let id = build.id;
        let applied = match apply_plan(shared, client, &build, &drv, planned).await {
            Ok(Applied::Done(cached)) => Ok(cached),
            // A step the plan relied on finished meanwhile: read it again.
            Ok(Applied::Again) => load_build(shared, client, build, &drv).await,
            Err(e) => Err(e),
        };
        match applied {
            Ok(Some(cached)) => plans.push((id, cached)),
            Ok(None) => {}
            Err(e) => refused_or_fatal(shared, id, &drv, e).await?,
        }
    }
    Ok(())
}

/// What the build's outputs hold (a cached build's `nix-support`) was
/// refused: the build ends, the runner goes on. Any other fault is fatal.
async fn refused_or_fatal(shared: &Shared, id: BuildId, drv: &str, e: Fatal) -> Result<(), Fatal> {
    match e.refused_data() {
        Some(reason) => refuse_build(shared, id, drv, &reason).await,
        None => Err(e),
    }
}

/// What a queued row is to loading.
enum Row {
    /// In the graph already.
    Loaded,
    /// Ended at once: its `.drv` path is not a store path (aborted).
    Ended,
    New(Build),
}

/// A queued row as the graph's build, unless it is loaded already or ends
/// at once.
async fn to_build(shared: &Shared, row: QueuedBuild) -> Result<Row, Fatal> {
    if shared.state.has_build(row.id) {
        return Ok(Row::Loaded);
    }
    let drv_path = match shared.store.dir().parse_path(&row.drvpath) {
        Ok(p) => p,
        Err(e) => {
            let reason = format!("Builds.drvPath '{}' is not a store path: {e}", row.drvpath);
            abort_build(shared, row.id, &row.drvpath, &reason).await?;
            return Ok(Row::Ended);
        }
    };
    Ok(Row::New(Build {
        id: row.id,
        drv_path,
        jobset_id: row.jobset_id,
        project: row.project,
        jobset: row.jobset,
        job: row.job,
        timestamp: row.timestamp as i64,
        local_priority: row.priority,
        global_priority: row.globalpriority,
        max_silent_secs: row.maxsilent.unwrap_or(3600).max(0) as u32,
        timeout_secs: row.timeout.unwrap_or(36000).max(0) as u32,
    }))
}

/// Loads one build on its own, reading it again while steps its plan
/// relied on finish meanwhile. Returns how many derivations of its closure
/// were built already, when it was read.
async fn load_build(
    shared: &Shared,
    client: &mut DaemonClient,
    build: Build,
    drvpath: &str,
) -> Result<Option<u32>, Fatal> {
    for _ in 0..5 {
        let planned = loader::plan(shared, client, &build.drv_path).await?;
        if let Applied::Done(cached) = apply_plan(shared, client, &build, drvpath, planned).await? {
            return Ok(cached);
        }
    }
    tracing::warn!(
        build = build.id,
        "the build's steps kept changing while it loaded; will retry on the next pass"
    );
    Ok(None)
}

/// What became of a build's plan.
enum Applied {
    /// Finished at once, or in the graph (with how many derivations of its
    /// closure were built already; None when it was loaded already).
    Done(Option<u32>),
    /// A step the plan relied on finished while it was read.
    Again,
}

/// Finishes the build at once when it is cached, failed before, or
/// unloadable; otherwise adds it and its steps to the graph.
async fn apply_plan(
    shared: &Shared,
    client: &mut DaemonClient,
    build: &Build,
    drvpath: &str,
    planned: Planned,
) -> Result<Applied, Fatal> {
    match planned {
        Planned::Cached => finish_cached(shared, client, build)
            .await
            .map(|()| Applied::Done(Some(1))),
        Planned::InDestination {
            outputs,
            size,
            closure_size,
        } => finish_cached_in_destination(shared, build, &outputs, size, closure_size)
            .await
            .map(|()| Applied::Done(Some(1))),
        Planned::CachedFailure {
            drv,
            system,
            outputs,
        } => {
            let step = CachedStep {
                drv: &drv,
                system: &system,
                outputs: &outputs,
            };
            fail_cached(shared, build, step)
                .await
                .map(|()| Applied::Done(Some(0)))
        }
        Planned::Unloadable { reason } => abort_build(shared, build.id, drvpath, &reason)
            .await
            .map(|()| Applied::Done(Some(0))),
        Planned::Steps(plan) => {
            let cached = plan.cached;
            let inserted = shared
                .state
                .build_loaded(build.clone(), plan, Instant::now());
            match inserted {
                // The dispatcher is woken once the whole batch is in.
                Ok(adoptions) => {
                    crate::tunnel::send_adoptions(&adoptions);
                    Ok(Applied::Done(Some(cached)))
                }
                Err(InsertError::Vanished(step)) => {
                    tracing::debug!(
                        build = build.id,
                        "step {step} finished during loading; reloading"
                    );
                    Ok(Applied::Again)
                }
                Err(InsertError::Duplicate(_)) => Ok(Applied::Done(None)),
            }
        }
    }
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
    let measured = outcome::measure_valid(client, outputs).await?;
    let now = record::now();
    let paths = measured.paths();
    let success = measured.success(&paths, now, now);
    in_transaction!(shared, |tx| {
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
    let info = crate::nix_support::BuildOutputInfo::default();
    let success = record::Success {
        info: &info,
        outputs,
        size: size as i64,
        closure_size: closure_size as i64,
        start_time: now,
        stop_time: now,
    };
    in_transaction!(shared, |tx| {
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

/// The step of a build whose outputs failed before.
struct CachedStep<'a> {
    drv: &'a StorePath,
    system: &'a str,
    outputs: &'a [(String, Option<String>)],
}

/// A step's outputs are in FailedPaths: the build fails at once, as
/// Hydra's runner records it: a cached-failure step row (8, with the
/// step's platform and outputs, propagated from the build whose step
/// failed before when one can be found), then the build (1 for its own
/// top level, 2 for a dependency), a cached build either way.
async fn fail_cached(shared: &Shared, build: &Build, step: CachedStep<'_>) -> Result<(), Fatal> {
    let now = record::now();
    let dir = shared.store.dir();
    let drv = dir.display(step.drv);
    let top = *step.drv == build.drv_path;
    let status = if top {
        BuildStatus::Failed
    } else {
        BuildStatus::DepFailed
    };
    in_transaction!(shared, |tx| {
        let propagated_from = record::earlier_failure(&mut tx, &drv, step.outputs).await?;
        record::create_build_step(
            &mut tx,
            &NewStepRow {
                build: build.id,
                drv_path: &drv,
                system: step.system,
                status: Some(BuildStatus::CachedFailure),
                machine: "",
                start_time: None,
                error_msg: None,
                propagated_from,
                outputs: step.outputs,
                resolved_drv_path: None,
                dispatch: None,
            },
        )
        .await?;
        record::mark_failed_build(&mut tx, build.id, status, now, now, true).await?;
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
    in_transaction!(shared, |tx| {
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
                resolved_drv_path: None,
                dispatch: None,
            },
        )
        .await?;
        record::mark_failed_build(&mut tx, build, BuildStatus::Aborted, now, now, false).await?;
        record::notify_build_finished(&mut tx, build, &[]).await?;
        Ok(())
    })?;
    Ok(())
}

/// A build whose loading the database refused: aborted with the reason,
/// or, should even that be refused, left for the next start.
async fn refuse_build(shared: &Shared, id: BuildId, drv: &str, reason: &str) -> Result<(), Fatal> {
    match abort_build(shared, id, drv, reason).await {
        Err(e) if e.refused_data().is_some() => {
            tracing::error!(build = id, "cannot record that the build was refused: {e}");
            Ok(())
        }
        other => other,
    }
}

/// Applies the rows of `hqr_build_changes` above the cursor and in its
/// gaps, in order, then deletes them.
async fn apply_changes(shared: &Shared, cursor: &mut SeqCursor) -> Result<(), Fatal> {
    let mut changes: Vec<(i64, i32, String)> = sqlx::query_as(
        "select seq, build, kind from hqr_build_changes where seq > $1 order by seq",
    )
    .bind(cursor.high())
    .fetch_all(&shared.pool)
    .await?;
    for gap in cursor.gaps() {
        let late: Vec<(i64, i32, String)> = sqlx::query_as(
            "select seq, build, kind from hqr_build_changes where seq between $1 and $2 order by seq",
        )
        .bind(gap.lo)
        .bind(gap.hi)
        .fetch_all(&shared.pool)
        .await?;
        changes.extend(late);
    }
    if changes.is_empty() {
        return Ok(());
    }
    changes.sort_by_key(|c| c.0);
    let seqs: Vec<i64> = changes.iter().map(|c| c.0).collect();
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
                    let mut plans = Vec::new();
                    load_chunk(shared, &mut client, vec![row], &mut plans).await?;
                    shared.store.release(client);
                    record_plans(shared, &plans).await?;
                    shared.state.batch_loaded();
                }
            }
            "bumped" => {
                let prio: Option<i32> =
                    sqlx::query_scalar("select globalPriority from Builds where id = $1")
                        .bind(build)
                        .fetch_optional(&shared.pool)
                        .await?;
                if let Some(p) = prio {
                    shared.state.build_bumped(*build, p);
                }
            }
            _ => {}
        }
    }
    if !gone_soft.is_empty() {
        let dropped = shared.state.builds_removed(&gone_soft, true);
        tracing::info!(
            "{} builds were superseded, their running steps may finish; {} steps dropped",
            gone_soft.len(),
            dropped.steps.len()
        );
        outcome::drop_steps(shared, dropped).await?;
    }
    if !gone.is_empty() {
        let dropped = shared.state.builds_removed(&gone, false);
        tracing::info!(
            "{} builds left the queue; {} steps dropped",
            gone.len(),
            dropped.steps.len()
        );
        outcome::drop_steps(shared, dropped).await?;
    }
    sqlx::query("delete from hqr_build_changes where seq = any($1)")
        .bind(&seqs)
        .execute(&shared.pool)
        .await?;
    cursor.saw(&seqs, Instant::now());
    Ok(())
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
    shared.state.shares_loaded(
        rows.into_iter()
            .map(|(id, n, used)| (id, n.max(1) as u32, used.unwrap_or(0) as f64)),
    );
    Ok(())
}
