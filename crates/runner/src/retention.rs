//! Keeps the runner's own tables bounded: an hour apart (and at start),
//! each owner prunes what is older than its `*_retention_days` setting.
//! Not critical: a failure is logged and tried again next time.

use std::sync::Arc;
use std::time::Duration;

use crate::Shared;

const EVERY: Duration = Duration::from_secs(3600);

/// Rows removed by one pass, per table.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Pruned {
    pub events: u64,
    pub attempts: u64,
    pub rejections: u64,
    pub uploads: u64,
}

pub async fn run(shared: Arc<Shared>) {
    loop {
        match prune_once(&shared).await {
            Ok(p) if p != Pruned::default() => tracing::info!(
                events = p.events,
                attempts = p.attempts,
                rejections = p.rejections,
                uploads = p.uploads,
                "pruned the runner's tables"
            ),
            Ok(_) => {}
            Err(e) => {
                tracing::warn!("pruning the runner's tables failed (tried again in an hour): {e}")
            }
        }
        tokio::time::sleep(EVERY).await;
    }
}

/// One pass over every table whose retention is set (0 keeps for ever).
pub async fn prune_once(shared: &Shared) -> Result<Pruned, sqlx::Error> {
    let c = shared.config();
    let pool = &shared.pool;
    let mut pruned = Pruned::default();
    if c.events_retention_days > 0 {
        pruned.events = crate::events::prune(pool, c.events_retention_days).await?;
    }
    if c.attempts_retention_days > 0 {
        pruned.attempts = crate::attempts::prune_finished(pool, c.attempts_retention_days).await?;
    }
    if c.rejections_retention_days > 0 {
        pruned.rejections =
            crate::record::prune_rejections(pool, c.rejections_retention_days).await?;
    }
    if c.uploads_retention_days > 0 {
        pruned.uploads = crate::uploads::prune_done(pool, c.uploads_retention_days).await?;
    }
    Ok(pruned)
}
