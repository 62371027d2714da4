//! The commands that follow a build: watch, logs, explain.

use anyhow::{Result, bail};
use hydra_proto::client::*;
use serde_json::{Value, json};

use super::{Client, Output, table};
use std::io::Write;

use super::show::{build_json, counters_line, event_json, event_line};

pub(super) async fn watch(
    client: &mut Client,
    out: &Output,
    build: Option<u64>,
    after: u64,
    logs: bool,
) -> Result<()> {
    let mut stream = client
        .watch(WatchRequest {
            build_id: build.unwrap_or(0),
            after_seq: after,
            until_finished: build.is_some(),
            include_logs: logs,
        })
        .await?
        .into_inner();
    let bar = indicatif::ProgressBar::new(0);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} [{elapsed}] {bar:30} {pos}/{len} steps {msg}",
        )
        .expect("a valid template"),
    );
    if out.json || build.is_none() {
        bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
    }
    while let Some(event) = stream.message().await? {
        let kind = EventKind::try_from(event.kind).unwrap_or(EventKind::Unspecified);
        if out.json {
            out.print_json(&event_json(&event))?;
        } else if kind == EventKind::Log {
            let step = event.drv_path.rsplit('/').next().unwrap_or("");
            bar.println(format!("  {step}> {}", event.detail));
        } else {
            bar.println(event_line(&event));
        }
        // Only what moves the counters is worth asking the runner about.
        let moves = matches!(
            kind,
            EventKind::Queued
                | EventKind::StepStarted
                | EventKind::StepFinished
                | EventKind::Resolved
        );
        if let Some(id) = build.filter(|_| moves && !bar.is_hidden()) {
            let b = client
                .get_build(GetBuildRequest { build_id: id })
                .await?
                .into_inner();
            if let Some(s) = &b.steps {
                bar.set_length(s.total as u64);
                bar.set_position((s.cached + s.succeeded + s.failed) as u64);
                bar.set_message(format!("{} running", s.running));
            }
        }
    }
    bar.finish_and_clear();
    let Some(id) = build else { return Ok(()) };
    let b = client
        .get_build(GetBuildRequest { build_id: id })
        .await?
        .into_inner();
    if out.json {
        out.print_json(&json!({ "summary": build_json(&b) }))?;
    } else {
        let took = (b.stop_time - b.start_time).max(0);
        println!("build {id} {} after {took}s", b.status);
        if let Some(s) = &b.steps {
            println!("  steps: {}", counters_line(s));
        }
        for o in &b.outputs {
            println!("  {} -> {}", o.name, o.path);
        }
    }
    if b.build_status != Some(0) {
        bail!("build {id} {}", b.status);
    }
    Ok(())
}

/// Prints a log of any size as it streams (each message is at most 64 KiB
/// of it). Plain output without `--from-line` is the log's exact bytes;
/// `--json` and `--from-line` number lines.
pub(super) async fn logs(
    client: &mut Client,
    out: &Output,
    target: &str,
    follow: bool,
    from_line: u64,
    from_byte: Option<u64>,
) -> Result<()> {
    let (build_id, drv_path) = match target.parse::<u64>() {
        Ok(id) => (id, String::new()),
        Err(_) => (0, target.to_owned()),
    };
    if out.json && from_byte.is_some() {
        bail!("--from-byte prints bytes: leave out --json");
    }
    let raw = !out.json && from_line == 0;
    let mut stream = client
        .get_log(GetLogRequest {
            drv_path,
            build_id,
            from_line,
            follow,
            raw,
            from_byte: from_byte.unwrap_or(0),
        })
        .await?
        .into_inner();
    let stdout = std::io::stdout();
    while let Some(batch) = stream.message().await? {
        let mut lock = stdout.lock();
        if raw {
            lock.write_all(&batch.data)?;
        }
        for (i, line) in batch.lines.iter().enumerate() {
            if out.json {
                let n = batch.first_line + i as u64;
                writeln!(lock, "{}", json!({ "line": n, "text": line }))?;
            } else {
                writeln!(lock, "{line}")?;
            }
        }
        lock.flush()?;
    }
    Ok(())
}

pub(super) async fn explain(
    client: &mut Client,
    out: &Output,
    build: u64,
    drv: Option<String>,
) -> Result<()> {
    let r = client
        .explain(ExplainRequest {
            build_id: build,
            drv_path: drv.unwrap_or_default(),
        })
        .await?
        .into_inner();
    if out.json {
        let steps: Vec<Value> = r
            .steps
            .iter()
            .map(|s| {
                json!({"drv_path": s.drv_path, "system": s.system, "reason": s.reason,
                            "detail": s.detail, "waiting_for": s.waiting_for, "until": s.until})
            })
            .collect();
        return out.print_json(&json!({ "summary": r.summary, "steps": steps }));
    }
    println!("{}", r.summary);
    let rows = r
        .steps
        .iter()
        .map(|s| {
            vec![
                s.drv_path.rsplit('/').next().unwrap_or("").to_owned(),
                s.reason.clone(),
                s.detail.clone(),
            ]
        })
        .collect();
    print!("{}", table(&["STEP", "REASON", "DETAIL"], rows));
    Ok(())
}
