//! The runner's status for operators, where Hydra keeps it: a JSON document
//! in `SystemStatus` (what = 'queue-runner'), which Hydra's web interface
//! shows at `/queue-runner-status`, with Hydra's field names where Hydra
//! has the field. It says which machines are connected, what they run, and
//! which are rested after repeated failures (`consecutiveFailures`,
//! `disabledUntil`).
//!
//! Written every `status_interval_secs` by a task that is not critical: a
//! failed write is logged and tried again next time. Each write is followed
//! by a `queue_runner_status` notification.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::Shared;
use crate::state::{MachineView, QueueCounts};

/// The status document now.
pub fn snapshot(shared: &Shared, started: Instant) -> Value {
    let now = Instant::now();
    let epoch = crate::record::now();
    let QueueCounts {
        builds: queued,
        steps,
        runnable,
        running: active,
        ..
    } = shared.state.queue_counts();
    let mut machines = serde_json::Map::new();
    for m in shared.state.machine_views(now) {
        let doc = if m.connected {
            json!({
                "enabled": !m.drained,
                "connected": true,
                "systemTypes": m.systems,
                "supportedFeatures": m.supported_features,
                "mandatoryFeatures": m.mandatory_features,
                "maxJobs": m.max_jobs,
                "currentJobs": m.running,
                "speedFactor": m.speed_factor,
                "load1": m.load1,
                "substituterTimeouts": m.substituter_timeouts,
                "consecutiveFailures": m.consecutive_failures,
                "disabledUntil": disabled_until(&m, epoch),
                "nrStepsDone": m.steps_done,
                "avgStepTime": m.avg_step.as_secs_f64(),
            })
        } else {
            json!({
                "enabled": !m.drained,
                "connected": false,
                "consecutiveFailures": m.consecutive_failures,
                "disabledUntil": disabled_until(&m, epoch),
            })
        };
        machines.insert(m.name, doc);
    }
    json!({
        "status": "up",
        "time": epoch,
        "uptime": now.duration_since(started).as_secs(),
        "pid": std::process::id(),
        "nrQueuedBuilds": queued,
        "nrUnfinishedSteps": steps,
        "nrRunnableSteps": runnable,
        "nrActiveSteps": active,
        "machines": machines,
    })
}

/// Unix seconds until which the machine rests; 0 when it does not.
fn disabled_until(m: &MachineView, epoch: i64) -> i64 {
    m.rested_for.map_or(0, |d| epoch + d.as_secs() as i64)
}

/// The machines as Hydra's web interface asks the queue runner for them
/// (`<queue_runner_endpoint>/status/machines`, its machine status page):
/// `{"machines": {<name>: {"systems", "maxJobs", "speedFactor",
/// "supportedFeatures", "mandatoryFeatures", "hasCapacity", "stats":
/// {"load1", "nrStepsDone", "avgStepBuildTimeMs", ...}}}}`.
pub fn machines_for_hydra_web(shared: &Shared) -> Value {
    let mut by_name = serde_json::Map::new();
    for m in shared.state.machine_views(Instant::now()) {
        if !m.connected {
            continue;
        }
        let capacity = m.has_capacity();
        by_name.insert(
            m.name.clone(),
            json!({
                "systems": m.systems,
                "maxJobs": m.max_jobs,
                "speedFactor": m.speed_factor,
                "supportedFeatures": m.supported_features,
                "mandatoryFeatures": m.mandatory_features,
                "hasCapacity": capacity,
                "hasStaticCapacity": capacity,
                "hasDynamicCapacity": capacity,
                "score": m.speed_factor,
                "totalMem": 0,
                "stats": {
                    "currentJobs": m.running,
                    "load1": m.load1,
                    "nrStepsDone": m.steps_done,
                    "avgStepBuildTimeMs": m.avg_step.as_millis() as u64,
                },
            }),
        );
    }
    json!({ "machines": by_name })
}

/// What `/status` and `/metrics` show of the database, as last read by
/// [`run`]: a scrape reads this, never the database, so scrapers cost the
/// database nothing however often they come.
#[derive(Debug, Default, Clone)]
pub struct Aggregates {
    /// [`upload_queue`]; None until it was first read.
    pub uploads: Option<Value>,
}

/// Writes the status every `status_interval_secs` (refreshing
/// [`Aggregates`] first), for as long as the runner runs.
pub async fn run(shared: Arc<Shared>) {
    let started = Instant::now();
    let every = Duration::from_secs(shared.config().status_interval_secs.max(1).into());
    loop {
        let mut doc = snapshot(&shared, started);
        match upload_queue(&shared.pool).await {
            Ok(uploads) => {
                doc["uploads"] = uploads.clone();
                shared.aggregates.write().uploads = Some(uploads);
            }
            Err(e) => tracing::warn!("cannot read the upload queue for the status: {e}"),
        }
        if let Err(e) = write(&shared.pool, &doc).await {
            tracing::warn!("cannot write the status to SystemStatus (will retry): {e}");
        }
        tokio::time::sleep(every).await;
    }
}

/// The upload queue per destination: pending, failing (pending with a
/// failed attempt) and done, with the last error.
pub async fn upload_queue(pool: &sqlx::PgPool) -> Result<Value, sqlx::Error> {
    let rows: Vec<(String, i64, i64, i64, Option<String>)> = sqlx::query_as(
        "select destination,
                count(*) filter (where done_at is null),
                count(*) filter (where done_at is null and last_error is not null),
                count(*) filter (where done_at is not null),
                (array_agg(last_error order by id desc) filter (where done_at is null and last_error is not null))[1]
           from hqr_uploads group by destination order by destination",
    )
    .fetch_all(pool)
    .await?;
    let mut out = serde_json::Map::new();
    for (dest, pending, failing, done, last_error) in rows {
        out.insert(
            dest,
            json!({"pending": pending, "failing": failing, "done": done, "lastError": last_error}),
        );
    }
    Ok(Value::Object(out))
}

async fn write(pool: &sqlx::PgPool, doc: &Value) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin().await?;
    crate::record::write_status(&mut tx, doc).await?;
    tx.commit().await
}
