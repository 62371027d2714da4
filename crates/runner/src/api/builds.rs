//! The client API's writes. Each is one transaction on Hydra's tables
//! plus Hydra's notification, so the queue monitor applies it as it
//! applies Hydra's own front end's: a cancel drops the build's interest in
//! its steps (steps another build needs keep running), a restart reloads
//! the build, a bump re-orders its steps.

use hydra_nix::StorePath;
use hydra_nix::daemon::DaemonClient;
use hydra_proto::client::*;
use sqlx::PgConnection;

use super::priority::PriorityClass;
use super::{ApiError, build_ids};
use crate::Shared;
use crate::events::{self, Kind, NewEvent};
use crate::record;
use crate::store::StoreError;

/// The user that owns projects the API creates.
const API_USER: &str = "hydra-queue-runner";

/// One derivation to queue, read from the runner's store.
struct Queued {
    drv: String,
    job: String,
    system: String,
    outputs: Vec<(String, Option<String>)>,
}

pub async fn submit(shared: &Shared, req: SubmitRequest) -> Result<SubmitResponse, ApiError> {
    check_name("tenant", &req.tenant)?;
    let queue = if req.queue.is_empty() {
        "default"
    } else {
        &req.queue
    };
    check_name("queue", queue)?;
    if req.drv_paths.is_empty() && req.drv_nars.is_empty() {
        return Err(ApiError::Invalid(
            "nothing to build: give drv_paths or drv_nars".into(),
        ));
    }
    let mut client = shared.store.client().await?;
    let mut paths = Vec::new();
    for nar in &req.drv_nars {
        paths.push(import_drv_nar(shared, &mut client, nar).await?);
    }
    for p in &req.drv_paths {
        paths.push(parse_drv_path(shared, p)?);
    }
    let mut queued = Vec::new();
    for path in &paths {
        queued.push(read_queued(shared, &mut client, path, &req.job).await?);
    }
    let class = PriorityClass::from_wire(req.priority());
    let soft = req.supersede_mode() == SupersedeMode::Soft;
    let key = Some(req.supersede_key.as_str()).filter(|k| !k.is_empty());

    let mut tx = shared.pool.begin().await?;
    let jobset = record::ensure_jobset(&mut tx, API_USER, &req.tenant, queue).await?;
    let older: Vec<i32> = match key {
        Some(k) => {
            sqlx::query_scalar(
                "select b.id from hqr_client_builds c join Builds b on b.id = c.build
              where c.tenant = $1 and c.supersede_key = $2 and b.finished = 0
              order by b.id for update of b",
            )
            .bind(&req.tenant)
            .bind(k)
            .fetch_all(&mut *tx)
            .await?
        }
        None => Vec::new(),
    };
    let mut ids = Vec::new();
    for q in &queued {
        let nonzero = |v: u32| (v > 0).then_some(v as i32);
        let id = record::insert_build(
            &mut tx,
            &record::NewBuild {
                jobset,
                job: &q.job,
                drv_path: &q.drv,
                system: &q.system,
                max_silent: nonzero(req.max_silent_secs),
                timeout: nonzero(req.timeout_secs),
                local_priority: class.local_priority(),
                global_priority: class.global_priority(),
                outputs: &q.outputs,
            },
        )
        .await?;
        sqlx::query(
            "insert into hqr_client_builds (build, tenant, priority_class, supersede_key)
             values ($1, $2, $3, $4)",
        )
        .bind(id)
        .bind(&req.tenant)
        .bind(class.as_str())
        .bind(key)
        .execute(&mut *tx)
        .await?;
        ids.push(id);
    }
    let superseded = if older.is_empty() {
        Vec::new()
    } else {
        let reason = format!("superseded by build {}", ids[0]);
        cancel_in(&mut tx, &older, &reason, soft).await?
    };
    let queued_events: Vec<NewEvent> = ids
        .iter()
        .map(|id| NewEvent::new(Kind::Queued, vec![*id]).detail(class.as_str()))
        .collect();
    events::emit(&mut tx, &queued_events).await?;
    sqlx::query("notify builds_added").execute(&mut *tx).await?;
    tx.commit().await?;
    tracing::info!(
        tenant = req.tenant,
        queue,
        "queued builds {ids:?} ({}){}",
        class.as_str(),
        if superseded.is_empty() {
            String::new()
        } else {
            format!(", superseding {superseded:?}")
        }
    );
    Ok(SubmitResponse {
        build_ids: ids.iter().map(|i| *i as u64).collect(),
        superseded: superseded.iter().map(|i| *i as u64).collect(),
    })
}

pub async fn cancel(shared: &Shared, req: CancelRequest) -> Result<CancelResponse, ApiError> {
    let ids = build_ids(&req.build_ids)?;
    let reason = if req.reason.trim().is_empty() {
        "cancelled through the API".to_owned()
    } else {
        crate::outside::display_text(req.reason.trim(), crate::outside::DISPLAY_MAX)
    };
    let mut tx = shared.pool.begin().await?;
    let cancelled = cancel_in(&mut tx, &ids, &reason, false).await?;
    tx.commit().await?;
    tracing::info!("cancelled builds {cancelled:?}: {reason}");
    Ok(CancelResponse {
        cancelled: cancelled.iter().map(|i| *i as u64).collect(),
    })
}

/// Finishes the unfinished builds among `ids` as cancelled (4) with
/// `reason`; returns them. `keep_running` lets their running steps finish.
async fn cancel_in(
    tx: &mut PgConnection,
    ids: &[i32],
    reason: &str,
    keep_running: bool,
) -> Result<Vec<i32>, sqlx::Error> {
    // One transaction: the queue monitor, woken by the trigger's change row
    // after the commit, finds the reason beside the cancelled build.
    let mut cancelled: Vec<i32> = sqlx::query_scalar(
        "update Builds set finished = 1, buildStatus = 4, isCachedBuild = 0,
                startTime = coalesce(nullif(startTime, 0), $2), stopTime = $2
          where id = any($1) and finished = 0
         returning id",
    )
    .bind(ids)
    .bind(crate::record::now())
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
    sqlx::query("notify builds_cancelled")
        .execute(&mut *tx)
        .await?;
    Ok(cancelled)
}

/// Hydra's restart: finished builds (by id, or every one of a jobset, or
/// only its failed ones) go back to the queue, and the failures cached for
/// their steps' outputs are forgotten so the steps are built again.
pub async fn restart(shared: &Shared, req: RestartRequest) -> Result<RestartResponse, ApiError> {
    let ids = build_ids(&req.build_ids)?;
    if ids.is_empty() && (req.tenant.is_empty() || req.queue.is_empty()) {
        return Err(ApiError::Invalid(
            "give build ids, or a tenant and a queue".into(),
        ));
    }
    let mut tx = shared.pool.begin().await?;
    let chosen: Vec<i32> = sqlx::query_scalar(
        "select b.id from Builds b join Jobsets j on j.id = b.jobset_id
          where b.finished = 1
            and (cardinality($1::integer[]) = 0 or b.id = any($1))
            and (cardinality($1::integer[]) > 0 or (j.project = $2 and j.name = $3))
            and (not $4 or b.buildStatus != 0)
          order by b.id for update of b",
    )
    .bind(&ids)
    .bind(&req.tenant)
    .bind(&req.queue)
    .bind(req.only_failed)
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
    sqlx::query("notify builds_restarted")
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    tracing::info!("restarted builds {chosen:?}");
    Ok(RestartResponse {
        restarted: chosen.iter().map(|i| *i as u64).collect(),
    })
}

pub async fn bump(shared: &Shared, req: BumpRequest) -> Result<BumpResponse, ApiError> {
    let ids = build_ids(&req.build_ids)?;
    let mut tx = shared.pool.begin().await?;
    let bumped: Vec<i32> = sqlx::query_scalar(
        "update Builds set globalPriority = $2 where id = any($1) and finished = 0 returning id",
    )
    .bind(&ids)
    .bind(req.global_priority)
    .fetch_all(&mut *tx)
    .await?;
    sqlx::query("notify builds_bumped")
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    Ok(BumpResponse {
        bumped: bumped.iter().map(|i| *i as u64).collect(),
    })
}

/// Hydra's project and jobset names.
fn check_name(what: &str, name: &str) -> Result<(), ApiError> {
    let mut chars = name.chars();
    let ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '.');
    if ok {
        Ok(())
    } else {
        Err(ApiError::Invalid(format!(
            "{what} {name:?} is not a valid name (a letter or _, then letters, digits, _, - or .)"
        )))
    }
}

fn parse_drv_path(shared: &Shared, p: &str) -> Result<StorePath, ApiError> {
    let path = shared
        .store
        .dir()
        .parse_path(p)
        .map_err(|e| ApiError::Invalid(format!("{p:?} is not a store path: {e}")))?;
    if !path.name().ends_with(".drv") {
        return Err(ApiError::Invalid(format!("{p} is not a derivation (.drv)")));
    }
    Ok(path)
}

/// Adds a `.drv` sent as a NAR to the runner's store, after checking that
/// it parses and that its contents give the path it claims.
async fn import_drv_nar(
    shared: &Shared,
    client: &mut DaemonClient,
    n: &DrvNar,
) -> Result<StorePath, ApiError> {
    let claimed = parse_drv_path(shared, &n.store_path)?;
    let text = hydra_nix::nar::single_file_contents(&n.nar).map_err(|e| {
        ApiError::Invalid(format!(
            "the NAR of {} is not a single regular file: {e}",
            n.store_path
        ))
    })?;
    let drv = hydra_nix::Derivation::parse(shared.store.dir(), &text)
        .map_err(|e| ApiError::Invalid(format!("{} is not a derivation: {e}", n.store_path)))?;
    let written = shared.store.write_derivation(client, &drv).await?;
    if written != claimed {
        return Err(ApiError::Invalid(format!(
            "the NAR sent as {} holds the derivation {}",
            n.store_path,
            shared.store.dir().display(&written)
        )));
    }
    Ok(written)
}

async fn read_queued(
    shared: &Shared,
    client: &mut DaemonClient,
    path: &StorePath,
    job: &str,
) -> Result<Queued, ApiError> {
    let full = shared.store.dir().display(path);
    let drv = match shared.store.read_derivation(client, path).await {
        Ok(d) => d,
        Err(StoreError::Missing { path }) => {
            return Err(ApiError::Invalid(format!(
                "{path} is not in the runner's store: copy it there first, or send it as a NAR"
            )));
        }
        Err(e) => return Err(e.into()),
    };
    let outputs = client
        .query_derivation_output_map(&full)
        .await
        .map_err(StoreError::from)?;
    let job = if job.is_empty() {
        path.name().trim_end_matches(".drv").to_owned()
    } else {
        job.to_owned()
    };
    Ok(Queued {
        drv: full,
        job,
        system: drv.platform.clone(),
        outputs: outputs.into_iter().collect(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tenant_and_queue_names_follow_hydra() {
        assert!(check_name("tenant", "nixpkgs").is_ok());
        assert!(check_name("tenant", "my_team-2.x").is_ok());
        for bad in ["", "1abc", "a b", "a/b", "ü"] {
            let e = check_name("tenant", bad).unwrap_err();
            assert!(e.to_string().contains("not a valid name"), "{bad}: {e}");
        }
    }
}
