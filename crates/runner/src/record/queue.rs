//! The queue's changes that come through the client API: builds that
//! enter it (with the project and jobset they belong to, as Hydra's
//! evaluator writes them), cancels, restarts and bumps. Each ends with
//! Hydra's notification, so the queue monitor applies it as it applies
//! Hydra's own front end's: a cancel drops the build's interest in its
//! steps (steps another build needs keep running), a restart reloads the
//! build, a bump re-orders its steps.

use sqlx::PgConnection;

use super::notify;
use crate::events::{self, Kind, NewEvent};
use crate::graph::BuildId;

/// The user that owns the projects the client API creates.
const API_USER: &str = "hydra-queue-runner";

/// Builds to queue in one jobset, sharing their limits and priorities.
pub struct Submission<'a> {
    pub tenant: &'a str,
    pub queue: &'a str,
    /// The `priority_class` column (interactive, normal, background).
    pub class: &'a str,
    pub local_priority: i32,
    pub global_priority: i32,
    /// None: Hydra's defaults (3600 s silent, 36000 s in all).
    pub max_silent: Option<i32>,
    pub timeout: Option<i32>,
    /// Unfinished builds of the tenant with this key are superseded.
    pub supersede_key: Option<&'a str>,
    /// A soft supersede lets the superseded builds' running steps finish.
    pub soft: bool,
    pub builds: Vec<QueuedDrv<'a>>,
}

/// One derivation of a submission.
pub struct QueuedDrv<'a> {
    pub job: &'a str,
    pub drv_path: &'a str,
    pub system: &'a str,
    /// Output name -> path (None for a CA output).
    pub outputs: &'a [(String, Option<String>)],
}

/// What a submission did.
pub struct Submitted {
    pub ids: Vec<BuildId>,
    pub superseded: Vec<BuildId>,
}

/// Queues a submission's builds (Builds, BuildOutputs, the runner's
/// `hqr_client_builds`), cancels those it supersedes, and notifies
/// `builds_added`.
pub async fn submit_builds(
    tx: &mut PgConnection,
    s: &Submission<'_>,
) -> Result<Submitted, sqlx::Error> {
    let jobset = ensure_jobset(tx, API_USER, s.tenant, s.queue).await?;
    let older: Vec<BuildId> = match s.supersede_key {
        Some(k) => {
            sqlx::query_scalar(
                "select b.id from hqr_client_builds c join Builds b on b.id = c.build
                  where c.tenant = $1 and c.supersede_key = $2 and b.finished = 0
                  order by b.id for update of b",
            )
            .bind(s.tenant)
            .bind(k)
            .fetch_all(&mut *tx)
            .await?
        }
        None => Vec::new(),
    };
    let mut ids = Vec::new();
    for q in &s.builds {
        let id = insert_build(
            tx,
            &NewBuild {
                jobset,
                job: q.job,
                drv_path: q.drv_path,
                system: q.system,
                max_silent: s.max_silent,
                timeout: s.timeout,
                local_priority: s.local_priority,
                global_priority: s.global_priority,
                outputs: q.outputs,
            },
        )
        .await?;
        sqlx::query(
            "insert into hqr_client_builds (build, tenant, priority_class, supersede_key)
             values ($1, $2, $3, $4)",
        )
        .bind(id)
        .bind(s.tenant)
        .bind(s.class)
        .bind(s.supersede_key)
        .execute(&mut *tx)
        .await?;
        ids.push(id);
    }
    let superseded = match ids.first() {
        Some(first) if !older.is_empty() => {
            let reason = format!("superseded by build {first}");
            cancel_builds(tx, &older, &reason, s.soft).await?
        }
        _ => Vec::new(),
    };
    let queued: Vec<NewEvent> = ids
        .iter()
        .map(|id| NewEvent::new(Kind::Queued, vec![*id]).detail(s.class))
        .collect();
    events::emit(tx, &queued).await?;
    notify(tx, "builds_added", "").await?;
    Ok(Submitted { ids, superseded })
}

/// Finishes the unfinished builds among `ids` as cancelled (4) with
/// `reason`, and notifies `builds_cancelled`; returns them, in id order.
/// `keep_running` lets their running steps finish.
pub async fn cancel_builds(
    tx: &mut PgConnection,
    ids: &[BuildId],
    reason: &str,
    keep_running: bool,
) -> Result<Vec<BuildId>, sqlx::Error> {
    // One transaction: the queue monitor, woken by the trigger's change row
    // after the commit, finds the reason beside the cancelled build.
    let mut cancelled: Vec<BuildId> = sqlx::query_scalar(
        "update Builds set finished = 1, buildStatus = 4, isCachedBuild = 0,
                startTime = coalesce(nullif(startTime, 0), $2), stopTime = $2
          where id = any($1) and finished = 0
         returning id",
    )
    .bind(ids)
    .bind(super::now())
    .fetch_all(&mut *tx)
    .await?;
    cancelled.sort_unstable();
    sqlx::query(
        "insert into hqr_cancellations (build, reason, keep_running)
         select b, $2, $3 from unnest($1::integer[]) b
         on conflict (build) do update set reason = excluded.reason,
             keep_running = excluded.keep_running, at = now()",
    )
    .bind(&cancelled)
    .bind(reason)
    .bind(keep_running)
    .execute(&mut *tx)
    .await?;
    notify(tx, "builds_cancelled", "").await?;
    Ok(cancelled)
}

/// Which finished builds a restart takes back to the queue.
pub enum RestartChoice<'a> {
    Builds(&'a [BuildId]),
    /// Every finished build of a jobset, or only its failed ones.
    Jobset {
        tenant: &'a str,
        queue: &'a str,
        only_failed: bool,
    },
}

/// Hydra's restart: the chosen finished builds go back to the queue, and
/// the failures cached for their steps' outputs are forgotten so the
/// steps are built again; notifies `builds_restarted`. Returns the builds.
pub async fn restart_builds(
    tx: &mut PgConnection,
    choice: RestartChoice<'_>,
) -> Result<Vec<BuildId>, sqlx::Error> {
    let (ids, tenant, queue, only_failed): (&[BuildId], &str, &str, bool) = match choice {
        RestartChoice::Builds(ids) => (ids, "", "", false),
        RestartChoice::Jobset {
            tenant,
            queue,
            only_failed,
        } => (&[], tenant, queue, only_failed),
    };
    let chosen: Vec<BuildId> = sqlx::query_scalar(
        "select b.id from Builds b join Jobsets j on j.id = b.jobset_id
          where b.finished = 1
            and (cardinality($1::integer[]) = 0 or b.id = any($1))
            and (cardinality($1::integer[]) > 0 or (j.project = $2 and j.name = $3))
            and (not $4 or b.buildStatus != 0)
          order by b.id for update of b",
    )
    .bind(ids)
    .bind(tenant)
    .bind(queue)
    .bind(only_failed)
    .fetch_all(&mut *tx)
    .await?;
    sqlx::query(
        "delete from FailedPaths where path in (
            select path from BuildStepOutputs where build = any($1) and path is not null
            union select path from BuildOutputs where build = any($1) and path is not null)",
    )
    .bind(&chosen)
    .execute(&mut *tx)
    .await?;
    sqlx::query("delete from hqr_cancellations where build = any($1)")
        .bind(&chosen)
        .execute(&mut *tx)
        .await?;
    sqlx::query(
        "update Builds set finished = 0, buildStatus = null, startTime = null, stopTime = null,
                isCachedBuild = 0, size = null, closureSize = null
          where id = any($1)",
    )
    .bind(&chosen)
    .execute(&mut *tx)
    .await?;
    notify(tx, "builds_restarted", "").await?;
    Ok(chosen)
}

/// Sets the global priority of the unfinished builds among `ids` (Hydra's
/// bump); notifies `builds_bumped`. Returns them.
pub async fn bump_builds(
    tx: &mut PgConnection,
    ids: &[BuildId],
    global_priority: i32,
) -> Result<Vec<BuildId>, sqlx::Error> {
    let bumped: Vec<BuildId> = sqlx::query_scalar(
        "update Builds set globalPriority = $2 where id = any($1) and finished = 0 returning id",
    )
    .bind(ids)
    .bind(global_priority)
    .fetch_all(&mut *tx)
    .await?;
    notify(tx, "builds_bumped", "").await?;
    Ok(bumped)
}

/// The jobset `queue` of project `tenant` (the client API's), created
/// with both when missing. Created as Hydra's schema requires of a jobset
/// with no Nix expression: type 0 with empty expression fields and no
/// flake, `emailOverride` set, and disabled, so Hydra's evaluator never
/// tries to evaluate it.
async fn ensure_jobset(
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
struct NewBuild<'a> {
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

/// Queues a build with its BuildOutputs; returns its id.
async fn insert_build(tx: &mut PgConnection, b: &NewBuild<'_>) -> Result<BuildId, sqlx::Error> {
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
