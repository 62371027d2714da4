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

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

use crate::{QueueCounts, Shared};

/// The status document now.
pub fn snapshot(shared: &Shared, started: Instant) -> Value {
    let now = Instant::now();
    let epoch = crate::record::now();
    let at_epoch = |t: Instant| crate::record::unix_seconds(t, now);
    let QueueCounts {
        builds: queued,
        steps,
        runnable,
        running: active,
    } = shared.queue_counts();
    let machines = shared.machines.lock();
    let mut by_name: BTreeMap<String, Value> = BTreeMap::new();
    for m in machines.connected() {
        let health = machines.health(&m.name);
        by_name.insert(
            m.name.clone(),
            json!({
                "enabled": !machines.is_drained(&m.name),
                "connected": true,
                "systemTypes": m.systems,
                "supportedFeatures": m.supported_features,
                "mandatoryFeatures": m.mandatory_features,
                "maxJobs": m.max_jobs,
                "currentJobs": m.running.len(),
                "speedFactor": m.speed_factor,
                "load1": m.load1,
                "substituterTimeouts": m.substituter_timeouts,
                "consecutiveFailures": health.consecutive_failures,
                "disabledUntil": health.rested_until.filter(|t| *t > now).map_or(0, at_epoch),
                "nrStepsDone": machines.done(&m.name).steps,
                "avgStepTime": avg_secs(machines.done(&m.name)),
            }),
        );
    }
    for (name, health) in machines.all_health() {
        by_name.entry(name.clone()).or_insert_with(|| {
            json!({
                "enabled": true,
                "connected": false,
                "consecutiveFailures": health.consecutive_failures,
                "disabledUntil": health.rested_until.filter(|t| *t > now).map_or(0, at_epoch),
            })
        });
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
        "machines": by_name,
    })
}

fn avg_secs(done: crate::dispatch::machines::Done) -> f64 {
    if done.steps == 0 {
        0.0
    } else {
        done.total_millis as f64 / done.steps as f64 / 1000.0
    }
}

/// The machines as Hydra's web interface asks the queue runner for them
/// (`<queue_runner_endpoint>/status/machines`, its machine status page):
/// `{"machines": {<name>: {"systems", "maxJobs", "speedFactor",
/// "supportedFeatures", "mandatoryFeatures", "hasCapacity", "stats":
/// {"load1", "nrStepsDone", "avgStepBuildTimeMs", ...}}}}`.
pub fn machines_for_hydra_web(shared: &Shared) -> Value {
    let machines = shared.machines.lock();
    let mut by_name = serde_json::Map::new();
    for m in machines.connected() {
        let done = machines.done(&m.name);
        let has_capacity = m.free_slots() > 0 && !machines.is_drained(&m.name);
        by_name.insert(
            m.name.clone(),
            json!({
                "systems": m.systems,
                "maxJobs": m.max_jobs,
                "speedFactor": m.speed_factor,
                "supportedFeatures": m.supported_features,
                "mandatoryFeatures": m.mandatory_features,
                "hasCapacity": has_capacity,
                "hasStaticCapacity": has_capacity,
                "hasDynamicCapacity": has_capacity,
                "score": m.speed_factor,
                "totalMem": 0,
                "stats": {
                    "currentJobs": m.running.len(),
                    "load1": m.load1,
                    "nrStepsDone": done.steps,
                    "avgStepBuildTimeMs": avg_secs(done) * 1000.0,
                },
            }),
        );
    }
    json!({ "machines": by_name })
}

/// Writes the status every `status_interval_secs`, for as long as the
/// runner runs.
pub async fn run(shared: Arc<Shared>) {
    let started = Instant::now();
    let every = Duration::from_secs(shared.config().status_interval_secs.max(1).into());
    loop {
        let mut doc = snapshot(&shared, started);
        match upload_queue(&shared.pool).await {
            Ok(uploads) => doc["uploads"] = uploads,
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
    sqlx::query(
        "insert into SystemStatus (what, status) values ('queue-runner', $1)
         on conflict (what) do update set status = excluded.status",
    )
    .bind(doc)
    .execute(&mut *tx)
    .await?;
    sqlx::query("notify queue_runner_status")
        .execute(&mut *tx)
        .await?;
    tx.commit().await
}
