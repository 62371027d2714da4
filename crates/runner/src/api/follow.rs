//! The client API's streams: events (from the durable log) and step logs
//! (from the log files, live while the step runs).
//!
//! A watcher reads the event log from its cursor in pages; when it has
//! read everything, it waits for `hqr_events` notifications (see
//! [`listen`]), with a slow poll as a safety net. Nothing is kept in
//! memory for a watcher but its cursor, so a slow client costs nothing
//! but its own stream, and a reconnecting one resumes exactly.

use std::sync::Arc;
use std::time::Duration;

use hydra_nix::StorePath;
use hydra_proto::client::*;
use sqlx::postgres::PgListener;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

use super::{ApiError, build_id};
use crate::Shared;
use crate::events::{self, EventRow, Kind};
use crate::graph::StepState;

/// Events read per query.
const PAGE: i64 = 500;
/// How long a watcher waits for a notification before it looks anyway.
const SAFETY_POLL: Duration = Duration::from_secs(2);
/// How often a followed log is looked at while its step runs.
const LOG_POLL: Duration = Duration::from_millis(200);

/// Turns `hqr_events` notifications into ticks of `shared.event_tick`, for
/// as long as the runner runs; reconnects when the listener fails (the
/// watchers' safety poll covers the gap).
pub async fn listen(shared: Arc<Shared>) {
    loop {
        let result = async {
            let mut listener = PgListener::connect_with(&shared.pool).await?;
            listener.listen("hqr_events").await?;
            loop {
                listener.recv().await?;
                shared.event_tick.send_modify(|t| *t += 1);
            }
            #[allow(unreachable_code)]
            Ok::<(), sqlx::Error>(())
        }
        .await;
        if let Err(e) = result {
            tracing::warn!("event listener: {e}; listening again in a second");
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

pub fn events(
    shared: Arc<Shared>,
    req: WatchRequest,
) -> Result<ReceiverStream<Result<Event, Status>>, ApiError> {
    let build = match req.build_id {
        0 => None,
        id => Some(build_id(id)?),
    };
    if (req.until_finished || req.include_logs) && build.is_none() {
        return Err(ApiError::Invalid(
            "until_finished and include_logs need a build id".into(),
        ));
    }
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        if let Err(status) = pump_events(&shared, build, &req, &tx).await {
            let _ = tx.send(Err(status)).await;
        }
    });
    Ok(ReceiverStream::new(rx))
}

/// Sends events after `req.after_seq` until the client leaves (or the
/// build ends, with `until_finished`), with the live log lines of the
/// build's running steps between them when asked.
async fn pump_events(
    shared: &Shared,
    build: Option<i32>,
    req: &WatchRequest,
    tx: &mpsc::Sender<Result<Event, Status>>,
) -> Result<(), Status> {
    let mut cursor = i64::try_from(req.after_seq)
        .map_err(|_| Status::invalid_argument("after_seq is out of range"))?;
    let mut tick = shared.event_tick.subscribe();
    let mut logs = build.filter(|_| req.include_logs).map(LiveLogs::new);
    loop {
        tick.mark_unchanged();
        if let Some(live) = &mut logs {
            for line in live.poll(shared)? {
                if tx.send(Ok(line)).await.is_err() {
                    return Ok(());
                }
            }
        }
        let rows = events::read_after(&shared.pool, build, cursor, PAGE)
            .await
            .map_err(ApiError::from)?;
        let full_page = rows.len() as i64 == PAGE;
        for row in rows {
            cursor = row.seq;
            let ends = build.is_some() && ends_build(&row);
            if tx.send(Ok(to_wire(row))).await.is_err() {
                return Ok(()); // the client left
            }
            if ends && req.until_finished {
                return Ok(());
            }
        }
        if full_page {
            continue;
        }
        if req.until_finished && build_ended(shared, build, cursor).await? {
            // Its ending event came before this stream's cursor.
            return Ok(());
        }
        let wait = if logs.is_some() {
            LOG_POLL
        } else {
            SAFETY_POLL
        };
        tokio::select! {
            _ = tick.changed() => {}
            _ = tokio::time::sleep(wait) => {}
            _ = tx.closed() => return Ok(()),
        }
    }
}

/// The logs of a build's running steps, read as they grow, for a watcher
/// that asked for them. A step that stops running is read to its end once
/// more, then forgotten.
struct LiveLogs {
    build: i32,
    following: std::collections::HashMap<StorePath, (u64, LineCursor)>,
}

impl LiveLogs {
    fn new(build: i32) -> LiveLogs {
        LiveLogs {
            build,
            following: Default::default(),
        }
    }

    fn poll(&mut self, shared: &Shared) -> Result<Vec<Event>, ApiError> {
        let running: Vec<StorePath> = shared.state.read(|v| {
            v.graph
                .steps_of_build(self.build)
                .into_iter()
                .filter_map(|id| v.graph.step(id))
                .filter(|s| matches!(s.state, StepState::Running { .. }))
                .map(|s| s.drv_path.clone())
                .collect()
        });
        for drv in &running {
            self.following
                .entry(drv.clone())
                .or_insert_with(|| (0, LineCursor::new(0)));
        }
        let mut out = Vec::new();
        let mut done = Vec::new();
        for (drv, (offset, cursor)) in &mut self.following {
            let ended = !running.contains(drv);
            if let Some(bytes) = shared.logs.read_from(drv, *offset)? {
                *offset += bytes.len() as u64;
                let full = shared.store.dir().display(drv);
                for line in cursor.push(&bytes, ended).lines {
                    out.push(Event {
                        seq: 0,
                        kind: EventKind::Log as i32,
                        build_ids: vec![self.build as u64],
                        drv_path: full.clone(),
                        detail: line,
                        ..Default::default()
                    });
                }
            }
            if ended {
                done.push(drv.clone());
            }
        }
        for d in done {
            self.following.remove(&d);
        }
        Ok(out)
    }
}

fn ends_build(row: &EventRow) -> bool {
    matches!(
        Kind::parse(&row.kind),
        Some(Kind::Completed | Kind::Failed | Kind::Cancelled)
    )
}

/// Whether `build` is finished and its last event, already sent (at or
/// before `cursor`), says so. A cancel finishes the row at once and its
/// event follows when the queue monitor applies it; an event committed
/// after this stream's last read is not sent yet. A build without events
/// (finished before they existed) has ended too.
async fn build_ended(shared: &Shared, build: Option<i32>, cursor: i64) -> Result<bool, Status> {
    let Some(id) = build else { return Ok(false) };
    let row: Option<(i32, Option<i64>, Option<String>)> = sqlx::query_as(
        "select b.finished, e.seq, e.kind from Builds b
           left join lateral (select seq, kind from hqr_events
                               where builds @> array[b.id] and seq is not null
                               order by seq desc limit 1) e on true
          where b.id = $1",
    )
    .bind(id)
    .fetch_optional(&shared.pool)
    .await
    .map_err(ApiError::from)?;
    match row {
        None => Err(Status::not_found(format!("there is no build {id}"))),
        Some((finished, seq, kind)) => {
            let ending = |k: &str| {
                matches!(
                    Kind::parse(k),
                    Some(Kind::Completed | Kind::Failed | Kind::Cancelled)
                )
            };
            Ok(finished != 0
                && match (seq, kind) {
                    (Some(seq), Some(k)) => seq <= cursor && ending(&k),
                    _ => true,
                })
        }
    }
}

pub fn to_wire(row: EventRow) -> Event {
    let kind = match Kind::parse(&row.kind) {
        Some(Kind::Queued) => EventKind::Queued,
        Some(Kind::StepStarted) => EventKind::StepStarted,
        Some(Kind::StepProgress) => EventKind::StepProgress,
        Some(Kind::StepFinished) => EventKind::StepFinished,
        Some(Kind::Resolved) => EventKind::Resolved,
        Some(Kind::Completed) => EventKind::Completed,
        Some(Kind::Failed) => EventKind::Failed,
        Some(Kind::Cancelled) => EventKind::Cancelled,
        None => EventKind::Unspecified,
    };
    Event {
        seq: row.seq as u64,
        kind: kind as i32,
        build_ids: row.builds.iter().map(|b| *b as u64).collect(),
        time_ms: row.at_ms,
        drv_path: row.drv_path.unwrap_or_default(),
        machine: row.machine.unwrap_or_default(),
        status: row.status,
        detail: row.detail.unwrap_or_default(),
    }
}

pub async fn log(
    shared: Arc<Shared>,
    req: GetLogRequest,
) -> Result<ReceiverStream<Result<LogLines, Status>>, ApiError> {
    let drv = log_target(&shared, &req).await?;
    if !req.follow && shared.logs.read_from(&drv, 0)?.is_none() {
        return Err(ApiError::NotFound(format!(
            "there is no log of {}",
            shared.store.dir().display(&drv)
        )));
    }
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(async move {
        if let Err(e) = pump_log(&shared, &drv, &req, &tx).await {
            let _ = tx.send(Err(e.into())).await;
        }
    });
    Ok(ReceiverStream::new(rx))
}

/// The derivation whose log is asked for: the one named, or the build's.
async fn log_target(shared: &Shared, req: &GetLogRequest) -> Result<StorePath, ApiError> {
    let full = if !req.drv_path.is_empty() {
        req.drv_path.clone()
    } else {
        let id = build_id(req.build_id)?;
        sqlx::query_scalar::<_, String>("select drvPath from Builds where id = $1")
            .bind(id)
            .fetch_optional(&shared.pool)
            .await?
            .ok_or_else(|| ApiError::NotFound(format!("there is no build {id}")))?
    };
    shared
        .store
        .dir()
        .parse_path(&full)
        .map_err(|e| ApiError::Invalid(format!("{full:?} is not a store path: {e}")))
}

/// Sends whole lines from `req.from_line`; with `follow`, keeps reading
/// while the step is queued or running, then sends the rest.
async fn pump_log(
    shared: &Shared,
    drv: &StorePath,
    req: &GetLogRequest,
    tx: &mpsc::Sender<Result<LogLines, Status>>,
) -> Result<(), ApiError> {
    let mut lines = LineCursor::new(req.from_line);
    let mut offset = 0u64;
    loop {
        let live = req.follow && step_pending(shared, drv);
        if let Some(bytes) = shared.logs.read_from(drv, offset)? {
            offset += bytes.len() as u64;
            let batch = lines.push(&bytes, !live);
            if !batch.lines.is_empty() && tx.send(Ok(batch)).await.is_err() {
                return Ok(());
            }
        }
        if !live {
            return Ok(());
        }
        tokio::select! {
            _ = tokio::time::sleep(LOG_POLL) => {}
            _ = tx.closed() => return Ok(()),
        }
    }
}

/// Whether the step of `drv` is still to finish (so its log may grow).
fn step_pending(shared: &Shared, drv: &StorePath) -> bool {
    shared.state.read(|v| {
        v.graph
            .step_id(drv)
            .and_then(|id| v.graph.step(id))
            .is_some_and(|s| s.state != StepState::Finished)
    })
}

/// Splits a growing log into numbered lines, skipping those before the
/// first asked for.
struct LineCursor {
    next_line: u64,
    skip_until: u64,
    partial: Vec<u8>,
}

impl LineCursor {
    fn new(from_line: u64) -> LineCursor {
        LineCursor {
            next_line: 0,
            skip_until: from_line,
            partial: Vec::new(),
        }
    }

    /// The complete lines `bytes` ends (and, at `eof`, the unterminated
    /// last one).
    fn push(&mut self, bytes: &[u8], eof: bool) -> LogLines {
        self.partial.extend_from_slice(bytes);
        let mut out = Vec::new();
        let mut first = None;
        let mut start = 0;
        let mut emit = |line: &[u8], next_line: &mut u64| {
            if *next_line >= self.skip_until {
                first.get_or_insert(*next_line);
                out.push(String::from_utf8_lossy(line).into_owned());
            }
            *next_line += 1;
        };
        while let Some(nl) = self.partial[start..].iter().position(|b| *b == b'\n') {
            emit(&self.partial[start..start + nl], &mut self.next_line);
            start += nl + 1;
        }
        self.partial.drain(..start);
        if eof && !self.partial.is_empty() {
            let rest = std::mem::take(&mut self.partial);
            emit(&rest, &mut self.next_line);
        }
        LogLines {
            first_line: first.unwrap_or(self.next_line),
            lines: out,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_numbered_across_chunks_and_skipped_before_the_offset() {
        let mut c = LineCursor::new(1);
        let a = c.push(b"zero\non", false);
        assert_eq!(a.first_line, 1);
        assert!(a.lines.is_empty(), "line 0 is skipped, line 1 incomplete");
        let b = c.push(b"e\ntwo\nthr", false);
        assert_eq!(
            (b.first_line, b.lines),
            (1, vec!["one".into(), "two".into()])
        );
        let end = c.push(b"ee", true);
        assert_eq!((end.first_line, end.lines), (3, vec!["three".into()]));
    }
}
