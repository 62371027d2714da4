//! Whether paths are in a destination cache, remembered in PostgreSQL
//! (`hqr_cache_presence`): a path found stays found, a path missing is
//! asked again after `RECHECK`. The queue monitor uses it to finish a build
//! whose outputs are only in the cache as cached.

use std::collections::{HashSet, VecDeque};

use sqlx::PgPool;

use super::cache::Cache;
use crate::Fatal;

/// How long "not in the cache" is believed.
const RECHECK_SECS: f64 = 600.0;

/// What a cache says about a path.
#[derive(Debug, Clone)]
pub struct InCache {
    pub nar_size: u64,
    /// Full store paths.
    pub references: Vec<String>,
}

/// `path` in the cache at `destination`, if it is there.
pub async fn lookup(
    pool: &PgPool,
    destination: &str,
    cache: &Cache,
    path: &str,
) -> Result<Option<InCache>, Fatal> {
    let known: Option<(bool, Option<i64>, Vec<String>, f64)> = sqlx::query_as(
        "select present, nar_size, refs, extract(epoch from now() - checked_at)::float8
           from hqr_cache_presence where destination = $1 and path = $2",
    )
    .bind(destination)
    .bind(path)
    .fetch_optional(pool)
    .await?;
    match known {
        Some((true, size, refs, _)) => {
            return Ok(Some(InCache {
                nar_size: size.unwrap_or(0) as u64,
                references: refs,
            }));
        }
        Some((false, _, _, age)) if age < RECHECK_SECS => return Ok(None),
        _ => {}
    }
    let found = match cache.read_narinfo(path).await {
        Ok(found) => found,
        Err(e) => {
            // A cache that cannot be asked has nothing, this time.
            tracing::warn!(destination, "cannot look {path} up: {e}");
            return Ok(None);
        }
    };
    remember(pool, destination, path, found.as_ref()).await?;
    Ok(found)
}

/// Records what the cache at `destination` holds of `path` (after a lookup,
/// or after this runner uploaded it).
pub async fn remember(
    pool: &PgPool,
    destination: &str,
    path: &str,
    found: Option<&InCache>,
) -> Result<(), sqlx::Error> {
    sqlx::query(
        "insert into hqr_cache_presence (destination, path, present, nar_size, refs)
         values ($1, $2, $3, $4, $5)
         on conflict (destination, path) do update
            set present = excluded.present, nar_size = excluded.nar_size,
                refs = excluded.refs, checked_at = now()",
    )
    .bind(destination)
    .bind(path)
    .bind(found.is_some())
    .bind(found.map(|f| f.nar_size as i64))
    .bind(found.map(|f| f.references.clone()).unwrap_or_default())
    .execute(pool)
    .await
    .map(|_| ())
}

/// When every path of `outputs` is in one destination cache: the sum of
/// their NAR sizes and of their closure's there.
pub async fn outputs_in_a_cache(
    pool: &PgPool,
    destinations: &[String],
    outputs: &[String],
) -> Result<Option<(u64, u64)>, Fatal> {
    'caches: for dest in destinations {
        let Ok(cache) = Cache::from_url(dest) else {
            continue;
        };
        let mut size = 0;
        let mut closure_size = 0;
        let mut seen: HashSet<String> = HashSet::new();
        let mut todo: VecDeque<String> = outputs.iter().cloned().collect();
        while let Some(p) = todo.pop_front() {
            if !seen.insert(p.clone()) {
                continue;
            }
            // A closure the cache lacks a part of is not usable from it.
            let Some(found) = lookup(pool, dest, &cache, &p).await? else {
                continue 'caches;
            };
            closure_size += found.nar_size;
            if outputs.contains(&p) {
                size += found.nar_size;
            }
            todo.extend(found.references);
        }
        return Ok(Some((size, closure_size)));
    }
    Ok(None)
}
