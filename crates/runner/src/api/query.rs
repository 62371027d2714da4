//! Build status, per-step counters and listings.
//!
//! Counters combine three sources: what loading found already built
//! (`hqr_build_plans`: cached), the graph (queued and running steps the
//! build still needs) and the event log (steps that finished for it).

use std::collections::HashMap;

use hydra_proto::client::*;
use sqlx::PgPool;

use super::ApiError;
use super::priority::PriorityClass;
use crate::Shared;
use crate::graph::StepState;

#[derive(sqlx::FromRow)]
struct BuildRow {
    id: i32,
    project: String,
    jobset: String,
    job: String,
    drvpath: String,
    system: String,
    finished: i32,
    buildstatus: Option<i32>,
    timestamp: i32,
    starttime: Option<i32>,
    stoptime: Option<i32>,
    globalpriority: i32,
    priority: i32,
    priority_class: Option<String>,
    supersede_key: Option<String>,
    cancel_reason: Option<String>,
}

const SELECT: &str =
    "select b.id, j.project, j.name as jobset, b.job, b.drvPath, b.system, b.finished,
        b.buildStatus, b.timestamp, b.startTime, b.stopTime, b.globalPriority, b.priority,
        c.priority_class, c.supersede_key, x.reason as cancel_reason
   from Builds b join Jobsets j on j.id = b.jobset_id
   left join hqr_client_builds c on c.build = b.id
   left join hqr_cancellations x on x.build = b.id";

pub async fn get_build(shared: &Shared, id: i32) -> Result<BuildInfo, ApiError> {
    let row: Option<BuildRow> = sqlx::query_as(&format!("{SELECT} where b.id = $1"))
        .bind(id)
        .fetch_optional(&shared.api_pool)
        .await?;
    let row = row.ok_or_else(|| ApiError::NotFound(format!("there is no build {id}")))?;
    let steps = counters(shared, id).await?;
    let outputs: Vec<(String, Option<String>)> =
        sqlx::query_as("select name, path from BuildOutputs where build = $1 order by name")
            .bind(id)
            .fetch_all(&shared.api_pool)
            .await?;
    let mut info = to_info(row, Some(steps));
    info.outputs = outputs
        .into_iter()
        .map(|(name, path)| Output {
            name,
            path: path.unwrap_or_default(),
        })
        .collect();
    Ok(info)
}

pub async fn list_builds(
    shared: &Shared,
    req: ListBuildsRequest,
) -> Result<ListBuildsResponse, ApiError> {
    let limit = match req.limit {
        0 => 50,
        n => n.min(1000),
    } as i64;
    let status_filter = match req.status.as_str() {
        "" => "true",
        "queued" => "b.finished = 0",
        "finished" => "b.finished = 1",
        "succeeded" => "b.finished = 1 and b.buildStatus = 0",
        "failed" => "b.finished = 1 and b.buildStatus not in (0, 4)",
        "cancelled" => "b.finished = 1 and b.buildStatus = 4",
        other => {
            return Err(ApiError::Invalid(format!(
                "unknown status filter {other:?}: queued, finished, succeeded, failed or cancelled"
            )));
        }
    };
    let after = if req.after_id == 0 {
        i64::from(i32::MAX) + 1
    } else {
        req.after_id as i64
    };
    let sql = format!(
        "{SELECT} where b.id < $1 and ($2 = '' or j.project = $2) and ($3 = '' or j.name = $3)
            and ($4 = 0 or b.timestamp >= $4) and ($5 = 0 or b.timestamp < $5) and {status_filter}
          order by b.id desc limit $6"
    );
    let mut rows: Vec<BuildRow> = sqlx::query_as(&sql)
        .bind(after)
        .bind(&req.tenant)
        .bind(&req.queue)
        .bind(req.queued_after)
        .bind(req.queued_before)
        .bind(limit + 1)
        .fetch_all(&shared.api_pool)
        .await?;
    let more = rows.len() as i64 > limit;
    rows.truncate(limit as usize);
    let next_after_id = if more {
        rows.last().map_or(0, |r| r.id as u64)
    } else {
        0
    };
    Ok(ListBuildsResponse {
        builds: rows.into_iter().map(|r| to_info(r, None)).collect(),
        next_after_id,
    })
}

fn to_info(r: BuildRow, steps: Option<StepCounters>) -> BuildInfo {
    let running = steps.as_ref().is_some_and(|s| s.running > 0);
    let status = status_name(r.finished != 0, r.buildstatus, running);
    let class = r
        .priority_class
        .as_deref()
        .and_then(PriorityClass::parse)
        .unwrap_or(PriorityClass::Normal);
    BuildInfo {
        id: r.id as u64,
        tenant: r.project,
        queue: r.jobset,
        job: r.job,
        drv_path: r.drvpath,
        system: r.system,
        finished: r.finished != 0,
        build_status: (r.finished != 0).then_some(r.buildstatus.unwrap_or(3)),
        status: status.to_owned(),
        queued_at: r.timestamp as i64,
        start_time: r.starttime.unwrap_or(0) as i64,
        stop_time: r.stoptime.unwrap_or(0) as i64,
        global_priority: r.globalpriority,
        local_priority: r.priority,
        priority: class.to_wire() as i32,
        steps,
        outputs: Vec::new(),
        cancel_reason: r.cancel_reason.unwrap_or_default(),
        supersede_key: r.supersede_key.unwrap_or_default(),
    }
}

/// A build's status in a word, from Hydra's codes.
pub fn status_name(finished: bool, status: Option<i32>, running: bool) -> &'static str {
    if !finished {
        return if running { "running" } else { "queued" };
    }
    match status {
        Some(0) => "succeeded",
        Some(1) => "failed",
        Some(2) => "dependency-failed",
        Some(3) => "aborted",
        Some(4) => "cancelled",
        Some(6) => "failed-with-output",
        Some(7) => "timed-out",
        Some(9) => "unsupported",
        Some(10) => "log-limit-exceeded",
        Some(11) => "output-limit-exceeded",
        Some(12) => "not-deterministic",
        _ => "failed",
    }
}

/// The per-step counters of `build`.
pub async fn counters(shared: &Shared, build: i32) -> Result<StepCounters, ApiError> {
    let (queued, running, in_graph) = shared.state.read(|v| {
        let mut queued = 0;
        let mut running = 0;
        let mut paths = Vec::new();
        for id in v.graph.steps_of_build(build) {
            let step = v.graph.step(id).expect("a step of the build");
            match step.state {
                StepState::Running { .. } => running += 1,
                StepState::Finished => {}
                _ => queued += 1,
            }
            paths.push(shared.store.dir().display(&step.drv_path));
        }
        (queued, running, paths)
    });
    let (succeeded, failed) = finished_steps(&shared.api_pool, build, &in_graph).await?;
    let cached: Option<i32> =
        sqlx::query_scalar("select cached from hqr_build_plans where build = $1")
            .bind(build)
            .fetch_optional(&shared.api_pool)
            .await?;
    let cached = cached.unwrap_or(0).max(0) as u32;
    Ok(StepCounters {
        total: cached + queued + running + succeeded + failed,
        cached,
        queued,
        running,
        succeeded,
        failed,
    })
}

/// Steps that finished for `build` (by their last `step_finished` event),
/// leaving out those the graph still has (an aborted attempt is retried)
/// and cancelled ones.
async fn finished_steps(
    pool: &PgPool,
    build: i32,
    in_graph: &[String],
) -> Result<(u32, u32), ApiError> {
    let last: Vec<(String, Option<i32>)> = sqlx::query_as(
        "select distinct on (drv_path) drv_path, status from hqr_events
          where builds @> array[$1] and kind = 'step_finished' and drv_path is not null
          order by drv_path, id desc",
    )
    .bind(build)
    .fetch_all(pool)
    .await?;
    let last: HashMap<String, Option<i32>> = last.into_iter().collect();
    let mut succeeded = 0;
    let mut failed = 0;
    for (drv, status) in last {
        if in_graph.contains(&drv) {
            continue;
        }
        match status {
            Some(0) => succeeded += 1,
            Some(4) => {}
            _ => failed += 1,
        }
    }
    Ok((succeeded, failed))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_read_as_words() {
        assert_eq!(status_name(false, None, false), "queued");
        assert_eq!(status_name(false, None, true), "running");
        assert_eq!(status_name(true, Some(0), false), "succeeded");
        assert_eq!(status_name(true, Some(4), false), "cancelled");
        assert_eq!(status_name(true, Some(2), false), "dependency-failed");
    }
}
