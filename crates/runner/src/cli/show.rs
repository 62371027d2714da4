//! The commands that show and change what the runner has: status,
//! machines, submit, show, list.

use anyhow::Result;
use hydra_proto::client::*;
use serde_json::{Value, json};

use super::{Class, Client, ListArgs, Output, SubmitArgs, table};

pub(super) async fn status(client: &mut Client, out: &Output) -> Result<()> {
    let s = client
        .cluster_status(ClusterStatusRequest {})
        .await?
        .into_inner();
    if out.json {
        let systems: Vec<Value> = s
            .systems
            .iter()
            .map(|q| json!({"system": q.system, "runnable": q.runnable, "running": q.running, "waiting": q.waiting}))
            .collect();
        return out.print_json(&json!({
            "queued_builds": s.queued_builds, "steps": s.steps, "runnable": s.runnable,
            "running": s.running, "machines": s.machines, "systems": systems,
            "last_event_seq": s.last_event_seq,
        }));
    }
    println!(
        "{} queued builds, {} steps ({} runnable, {} running), {} machines",
        s.queued_builds, s.steps, s.runnable, s.running, s.machines
    );
    let rows = s
        .systems
        .iter()
        .map(|q| {
            vec![
                q.system.clone(),
                q.runnable.to_string(),
                q.running.to_string(),
                q.waiting.to_string(),
            ]
        })
        .collect();
    print!(
        "{}",
        table(&["SYSTEM", "RUNNABLE", "RUNNING", "WAITING"], rows)
    );
    Ok(())
}

pub(super) async fn machines(client: &mut Client, out: &Output) -> Result<()> {
    let ms = client
        .machines(MachinesRequest {})
        .await?
        .into_inner()
        .machines;
    if out.json {
        let list: Vec<Value> = ms.iter().map(machine_json).collect();
        return out.print_json(&Value::Array(list));
    }
    let rows = ms
        .iter()
        .map(|m| {
            let state = match (m.connected, m.drained, m.rested_for_secs) {
                (false, _, _) => "disconnected, drained".to_owned(),
                (true, true, _) => "drained".to_owned(),
                (true, false, 0) => "up".to_owned(),
                (true, false, s) => format!("resting {s}s"),
            };
            vec![
                m.name.clone(),
                m.systems.join(","),
                format!("{}/{}", m.running, m.max_jobs),
                format!("{:.2}", m.load1),
                state,
                m.current_steps
                    .iter()
                    .map(|s| s.rsplit('/').next().unwrap_or(s).to_owned())
                    .collect::<Vec<_>>()
                    .join(" "),
            ]
        })
        .collect();
    print!(
        "{}",
        table(
            &["MACHINE", "SYSTEMS", "SLOTS", "LOAD", "STATE", "STEPS"],
            rows
        )
    );
    Ok(())
}

pub(super) fn machine_json(m: &MachineInfo) -> Value {
    json!({
        "name": m.name, "systems": m.systems, "supported_features": m.supported_features,
        "mandatory_features": m.mandatory_features, "max_jobs": m.max_jobs, "running": m.running,
        "load1": m.load1, "speed_factor": m.speed_factor, "current_steps": m.current_steps,
        "drained": m.drained, "rested_for_secs": m.rested_for_secs,
        "consecutive_failures": m.consecutive_failures, "connected": m.connected,
    })
}

pub(super) async fn submit(client: &mut Client, out: &Output, a: SubmitArgs) -> Result<()> {
    let priority = match a.priority {
        Class::Interactive => PriorityClass::Interactive,
        Class::Normal => PriorityClass::Normal,
        Class::Background => PriorityClass::Background,
    };
    let mode = if a.soft {
        SupersedeMode::Soft
    } else {
        SupersedeMode::Hard
    };
    let r = client
        .submit(SubmitRequest {
            drv_paths: a.drvs,
            drv_nars: Vec::new(),
            tenant: a.tenant,
            queue: a.queue,
            priority: priority as i32,
            max_silent_secs: a.max_silent_secs.unwrap_or(0),
            timeout_secs: a.timeout_secs.unwrap_or(0),
            supersede_key: a.supersede_key.unwrap_or_default(),
            supersede_mode: mode as i32,
            job: a.job.unwrap_or_default(),
        })
        .await?
        .into_inner();
    if out.json {
        return out.print_json(&json!({ "builds": r.build_ids, "superseded": r.superseded }));
    }
    for id in &r.build_ids {
        println!("queued build {id}");
    }
    for id in &r.superseded {
        println!("superseded build {id}");
    }
    Ok(())
}

pub(super) fn build_json(b: &BuildInfo) -> Value {
    let steps = b.steps.as_ref().map(|s| {
        json!({"total": s.total, "cached": s.cached, "queued": s.queued, "running": s.running,
               "succeeded": s.succeeded, "failed": s.failed})
    });
    let outputs: serde_json::Map<String, Value> = b
        .outputs
        .iter()
        .map(|o| (o.name.clone(), json!(o.path)))
        .collect();
    json!({
        "id": b.id, "tenant": b.tenant, "queue": b.queue, "job": b.job, "drv_path": b.drv_path,
        "system": b.system, "finished": b.finished, "build_status": b.build_status,
        "status": b.status, "queued_at": b.queued_at, "start_time": b.start_time,
        "stop_time": b.stop_time, "global_priority": b.global_priority,
        "local_priority": b.local_priority, "steps": steps, "outputs": outputs,
        "cancel_reason": b.cancel_reason, "supersede_key": b.supersede_key,
    })
}

pub(super) async fn show(client: &mut Client, out: &Output, build: u64) -> Result<()> {
    let b = client
        .get_build(GetBuildRequest { build_id: build })
        .await?
        .into_inner();
    if out.json {
        return out.print_json(&build_json(&b));
    }
    println!(
        "build {} ({}/{}:{}): {}",
        b.id, b.tenant, b.queue, b.job, b.status
    );
    println!("  {}", b.drv_path);
    if let Some(s) = &b.steps {
        println!("  steps: {}", counters_line(s));
    }
    for o in &b.outputs {
        println!("  {} -> {}", o.name, o.path);
    }
    if !b.cancel_reason.is_empty() {
        println!("  cancelled: {}", b.cancel_reason);
    }
    Ok(())
}

pub(super) fn counters_line(s: &StepCounters) -> String {
    format!(
        "{} in all: {} cached, {} queued, {} running, {} succeeded, {} failed",
        s.total, s.cached, s.queued, s.running, s.succeeded, s.failed
    )
}

pub(super) async fn list(client: &mut Client, out: &Output, a: ListArgs) -> Result<()> {
    let r = client
        .list_builds(ListBuildsRequest {
            tenant: a.tenant,
            queue: a.queue,
            status: a.status,
            queued_after: 0,
            queued_before: 0,
            after_id: a.before,
            limit: a.limit,
        })
        .await?
        .into_inner();
    if out.json {
        let builds: Vec<Value> = r.builds.iter().map(build_json).collect();
        return out.print_json(&json!({ "builds": builds, "next_before": r.next_after_id }));
    }
    let rows = r
        .builds
        .iter()
        .map(|b| {
            vec![
                b.id.to_string(),
                format!("{}/{}", b.tenant, b.queue),
                b.job.clone(),
                b.status.clone(),
            ]
        })
        .collect();
    print!("{}", table(&["ID", "JOBSET", "JOB", "STATUS"], rows));
    if r.next_after_id != 0 {
        println!("more: --before {}", r.next_after_id);
    }
    Ok(())
}

pub(super) fn kind_name(k: i32) -> &'static str {
    match EventKind::try_from(k).unwrap_or(EventKind::Unspecified) {
        EventKind::Queued => "queued",
        EventKind::StepStarted => "step-started",
        EventKind::StepProgress => "step-progress",
        EventKind::StepFinished => "step-finished",
        EventKind::Resolved => "resolved",
        EventKind::Completed => "completed",
        EventKind::Failed => "failed",
        EventKind::Cancelled => "cancelled",
        EventKind::Log => "log",
        EventKind::Unspecified => "unknown",
    }
}

pub(super) fn event_json(e: &Event) -> Value {
    json!({
        "seq": e.seq, "kind": kind_name(e.kind), "builds": e.build_ids, "time_ms": e.time_ms,
        "drv_path": e.drv_path, "machine": e.machine, "status": e.status, "detail": e.detail,
    })
}

pub(super) fn event_line(e: &Event) -> String {
    let builds: Vec<String> = e.build_ids.iter().map(u64::to_string).collect();
    let drv = e.drv_path.rsplit('/').next().unwrap_or("");
    let mut line = format!("#{} {} [{}]", e.seq, kind_name(e.kind), builds.join(","));
    for part in [drv, e.machine.as_str(), e.detail.as_str()] {
        if !part.is_empty() {
            line.push(' ');
            line.push_str(part);
        }
    }
    if let Some(s) = e.status {
        line.push_str(&format!(" (status {s})"));
    }
    line
}
