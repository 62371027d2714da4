//! Publishing outputs to destination stores (binary caches): after
//! completion, best effort.
//!
//! The success transaction of a step queues its outputs' closure (and the
//! realisations of CA outputs) in `hqr_uploads`, one row per destination and
//! item, so a runner that dies forgets nothing and nothing is uploaded
//! twice. This task claims rows (`FOR UPDATE SKIP LOCKED`), uploads them
//! from the runner's store, and retries failures with backoff. It is not
//! critical: a cache that is down delays publication, never a build.

pub mod cache;
pub mod presence;

use std::sync::Arc;
use std::time::Duration;

use hydra_nix::binary_cache::SecretKey;
use sqlx::PgConnection;

use crate::{Fatal, Shared};
use cache::Cache;

/// How many rows one claim takes.
const BATCH: i64 = 16;
/// How long a claim holds rows (a worker that died lets them go).
const CLAIM_SECS: i64 = 600;

/// Queues `paths` (full store paths, references first) for every destination.
pub async fn enqueue_paths(
    tx: &mut PgConnection,
    destinations: &[String],
    paths: &[String],
) -> Result<(), sqlx::Error> {
    // Path by path (every destination of one, then the next): a path's
    // rows come together, so the uploader packs its NAR once for all.
    for path in paths {
        for dest in destinations {
            sqlx::query(
                "insert into hqr_uploads (destination, kind, item) values ($1, 'path', $2)
                 on conflict do nothing",
            )
            .bind(dest)
            .bind(path)
            .execute(&mut *tx)
            .await?;
        }
    }
    Ok(())
}

/// Queues the realisations of `drv`'s `outputs` (name, path).
pub async fn enqueue_realisations(
    tx: &mut PgConnection,
    destinations: &[String],
    drv: &str,
    outputs: &[(String, String)],
) -> Result<(), sqlx::Error> {
    for dest in destinations {
        for (name, path) in outputs {
            sqlx::query(
                "insert into hqr_uploads (destination, kind, item, out_path)
                 values ($1, 'realisation', $2, $3) on conflict do nothing",
            )
            .bind(dest)
            .bind(format!("{drv}!{name}"))
            .bind(path)
            .execute(&mut *tx)
            .await?;
        }
    }
    Ok(())
}

/// Queues the build log of `drv` (a full `.drv` path) for every
/// destination, as `log/<drv base name>`.
pub async fn enqueue_log(
    tx: &mut PgConnection,
    destinations: &[String],
    drv: &str,
) -> Result<(), sqlx::Error> {
    for dest in destinations {
        sqlx::query(
            "insert into hqr_uploads (destination, kind, item) values ($1, 'log', $2)
             on conflict (destination, kind, item) do update set done_at = null, attempts = 0,
                 next_try = now(), last_error = null",
        )
        .bind(dest)
        .bind(drv)
        .execute(&mut *tx)
        .await?;
    }
    Ok(())
}

/// Reads the signing key (at start: a bad key stops the runner at once).
pub fn load_key(shared_config: &crate::RunnerConfig) -> Result<Option<Arc<SecretKey>>, Fatal> {
    let Some(path) = &shared_config.signing_key_file else {
        return Ok(None);
    };
    let bad = |message: String| Fatal::SigningKey {
        path: path.clone(),
        message,
    };
    let text = std::fs::read_to_string(path).map_err(|e| bad(e.to_string()))?;
    let key = SecretKey::parse(&text).map_err(|e| bad(e.to_string()))?;
    Ok(Some(Arc::new(key)))
}

/// Uploads queued items until the runner stops.
pub async fn run(shared: Arc<Shared>, key: Option<Arc<SecretKey>>) {
    let caches: Vec<(String, Cache)> = shared
        .config()
        .destinations
        .iter()
        .filter_map(|d| match Cache::from_url(d) {
            Ok(c) => Some((d.clone(), c)),
            Err(e) => {
                tracing::error!("{e}");
                None
            }
        })
        .collect();
    if caches.is_empty() {
        return;
    }
    // Claims of a runner that died are void: this runner holds the lock
    // that makes it the only one working the queue. Each waits its backoff
    // before it is tried again, as a failure does: an upload that took the
    // runner down with it (killed for its memory, say) must not be the
    // first thing every restart does.
    let released = sqlx::query(
        "update hqr_uploads set claimed_until = null,
                last_error = coalesce(last_error, 'the runner stopped during this upload'),
                next_try = now() + make_interval(secs => least(300, power(2, attempts)))
          where done_at is null and claimed_until is not null",
    )
    .execute(&shared.pool)
    .await;
    if let Err(e) = released {
        tracing::warn!("cannot release earlier upload claims (they expire by themselves): {e}");
    }
    loop {
        match work_once(&shared, &caches, key.as_deref()).await {
            Ok(0) => {
                tokio::select! {
                    _ = shared.wake_uploads.notified() => {}
                    _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                }
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!("the upload queue (will retry): {e}");
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        }
    }
}

type Claimed = (i64, String, String, String, Option<String>);

/// Claims a batch and uploads it; returns how many rows it handled.
async fn work_once(
    shared: &Shared,
    caches: &[(String, Cache)],
    key: Option<&SecretKey>,
) -> Result<usize, Fatal> {
    let rows: Vec<Claimed> = sqlx::query_as(
        "update hqr_uploads set claimed_until = now() + make_interval(secs => $1), attempts = attempts + 1
          where id in (select id from hqr_uploads
                        where done_at is null and next_try <= now()
                          and (claimed_until is null or claimed_until < now())
                        order by id limit $2 for update skip locked)
         returning id, destination, kind, item, out_path",
    )
    .bind(CLAIM_SECS as f64)
    .bind(BATCH)
    .fetch_all(&shared.pool)
    .await?;
    let mut rows = rows;
    if rows.is_empty() {
        return Ok(0);
    }
    rows.sort_by_key(|r| r.0);
    let mut client = shared.store.client().await?;
    // The last path packed, for the next destination that wants it.
    let mut packed: Option<cache::PackedPath> = None;
    for (id, dest, kind, item, out_path) in &rows {
        let Some((_, cache)) = caches.iter().find(|(url, _)| url == dest) else {
            continue; // a destination no longer configured waits for it
        };
        let result = match kind.as_str() {
            "path" => {
                async {
                    if cache.has_path(item).await? {
                        return Ok(()); // published by an earlier claim that died late
                    }
                    if packed.as_ref().is_none_or(|p| &p.info.path != item) {
                        packed = None; // its spool file goes before the next is made
                        let spool_dir = shared.config().spool_dir.clone();
                        packed = Some(cache::pack_path(&mut client, item, &spool_dir).await?);
                    }
                    let p = packed.as_ref().expect("packed just above");
                    cache.upload_path(p, key).await
                }
                .await
            }
            "log" => cache.upload_log(shared, item).await,
            _ => {
                let out = out_path.as_deref().unwrap_or_default();
                cache
                    .upload_realisation(shared, &mut client, item, out, key)
                    .await
            }
        };
        match result {
            Ok(()) => {
                if kind == "path" {
                    // A "not there" remembered before the upload is stale now.
                    if let Ok(found) = cache.read_narinfo(item).await {
                        presence::remember(&shared.pool, dest, item, found.as_ref()).await?;
                    }
                }
                sqlx::query(
                    "update hqr_uploads set done_at = now(), last_error = null where id = $1",
                )
                .bind(id)
                .execute(&shared.pool)
                .await?;
                sqlx::query("select pg_notify('hqr_upload_done', $1)")
                    .bind(id.to_string())
                    .execute(&shared.pool)
                    .await?;
            }
            Err(e) => {
                tracing::warn!(destination = %dest, item, "upload failed (will retry): {e}");
                sqlx::query(
                    "update hqr_uploads set claimed_until = null, last_error = $2,
                            next_try = now() + make_interval(secs => least(300, power(2, attempts)))
                      where id = $1",
                )
                .bind(id)
                .bind(e.to_string())
                .execute(&shared.pool)
                .await?;
                // A broken client connection is not reused.
                client = shared.store.client().await?;
            }
        }
    }
    Ok(rows.len())
}

/// Finished uploads older than `days` days go (pending and failing ones
/// stay: they are the queue).
pub async fn prune_done(pool: &sqlx::PgPool, days: u32) -> Result<u64, sqlx::Error> {
    sqlx::query("delete from hqr_uploads where done_at < now() - make_interval(days => $1)")
        .bind(days as i32)
        .execute(pool)
        .await
        .map(|r| r.rows_affected())
}
