//! The client API's requests that change the queue: checked here, then
//! written as one transaction each by [`crate::record`].

use hydra_nix::StorePath;
use hydra_nix::daemon::DaemonClient;
use hydra_proto::client::*;

use super::priority::PriorityClass;
use super::{ApiError, build_ids};
use crate::Shared;
use crate::record;
use crate::store::StoreError;

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
    // Every read succeeded (a refused request drops its connection).
    shared.store.release(client);
    let class = PriorityClass::from_wire(req.priority());
    let nonzero = |v: u32| (v > 0).then_some(v as i32);

    let submission = record::Submission {
        tenant: &req.tenant,
        queue,
        class: class.as_str(),
        local_priority: class.local_priority(),
        global_priority: class.global_priority(),
        max_silent: nonzero(req.max_silent_secs),
        timeout: nonzero(req.timeout_secs),
        supersede_key: Some(req.supersede_key.as_str()).filter(|k| !k.is_empty()),
        soft: req.supersede_mode() == SupersedeMode::Soft,
        builds: queued
            .iter()
            .map(|q| record::QueuedDrv {
                job: &q.job,
                drv_path: &q.drv,
                system: &q.system,
                outputs: &q.outputs,
            })
            .collect(),
    };
    let mut tx = shared.api_pool.begin().await?;
    let record::Submitted { ids, superseded } = record::submit_builds(&mut tx, &submission).await?;
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
    let mut tx = shared.api_pool.begin().await?;
    let cancelled = record::cancel_builds(&mut tx, &ids, &reason, false).await?;
    tx.commit().await?;
    tracing::info!("cancelled builds {cancelled:?}: {reason}");
    Ok(CancelResponse {
        cancelled: cancelled.iter().map(|i| *i as u64).collect(),
    })
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
    let choice = if ids.is_empty() {
        record::RestartChoice::Jobset {
            tenant: &req.tenant,
            queue: &req.queue,
            only_failed: req.only_failed,
        }
    } else {
        record::RestartChoice::Builds(&ids)
    };
    let mut tx = shared.api_pool.begin().await?;
    let chosen = record::restart_builds(&mut tx, choice).await?;
    tx.commit().await?;
    tracing::info!("restarted builds {chosen:?}");
    Ok(RestartResponse {
        restarted: chosen.iter().map(|i| *i as u64).collect(),
    })
}

pub async fn bump(shared: &Shared, req: BumpRequest) -> Result<BumpResponse, ApiError> {
    let ids = build_ids(&req.build_ids)?;
    let mut tx = shared.api_pool.begin().await?;
    let bumped = record::bump_builds(&mut tx, &ids, req.global_priority).await?;
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
