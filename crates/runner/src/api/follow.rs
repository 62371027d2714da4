//! The client API's streams: events (from the durable log) and step logs
//! (from the log files, live while the step runs).
//!
//! A watcher subscribes to the sequencer's numbered events
//! (`Shared::numbered`), then reads the event log from its cursor in
//! pages; once it has read everything, it takes what the sequencer numbers
//! next from its subscription, so a caught-up watcher costs the database
//! nothing. One that falls further behind than the subscription keeps
//! reads the database again from its cursor. Nothing is kept in memory for
//! a watcher but its cursor and its subscription, so a slow client costs
//! nothing but its own stream, and a reconnecting one resumes exactly.
//!
//! Logs stream in chunks of at most [`CHUNK`] bytes read off the async
//! threads, so a log of any size costs a buffer.

use std::sync::Arc;
use std::time::Duration;

use hydra_nix::StorePath;
use hydra_proto::client::*;
use tokio::sync::{broadcast, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

use super::{ApiError, build_id};
use crate::Shared;
use crate::events::{self, EventRow, Kind};
use crate::graph::StepState;
use crate::logs::{LogReader, LogStore};

/// Events read per query.
const PAGE: i64 = 500;
/// How often a followed log is looked at while its step runs.
const LOG_POLL: Duration = Duration::from_millis(200);
/// The most log bytes one message carries.
pub const CHUNK: usize = 64 << 10;
/// The longest line a message carries; a longer one is cut into lines of
/// this length.
pub const MAX_LINE: usize = 1 << 20;

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
    // Subscribed before the first read: what is numbered after it arrives
    // here, what was numbered before it the read finds (both: skipped by
    // its number).
    let mut numbered = shared.numbered.subscribe();
    let mut logs = build.filter(|_| req.include_logs).map(LiveLogs::new);
    loop {
        // Catch up from the database.
        loop {
            let rows = events::read_after(&shared.api_pool, build, cursor, PAGE)
                .await
                .map_err(ApiError::from)?;
            let full_page = rows.len() as i64 == PAGE;
            for row in rows {
                cursor = row.seq;
                if send_event(build, req, row, tx).await? == Next::Stop {
                    return Ok(());
                }
            }
            if !full_page {
                break;
            }
        }
        if req.until_finished && build_ended(shared, build, cursor).await? {
            // Its ending event came before this stream's cursor.
            return Ok(());
        }
        // Caught up: follow the sequencer. Live logs are read on their own
        // timer (a busy event stream must neither starve them nor make them
        // read once per event), and once more before a step's or the
        // build's end is sent, so its last lines come first.
        let mut log_tick = tokio::time::interval(LOG_POLL);
        log_tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let row = tokio::select! {
                r = numbered.recv() => r,
                _ = log_tick.tick(), if logs.is_some() => {
                    if send_live(shared, &mut logs, tx).await? == Next::Stop {
                        return Ok(());
                    }
                    continue;
                }
                _ = tx.closed() => return Ok(()),
            };
            match row {
                Ok(row) => {
                    let ours = build.is_none_or(|b| row.builds.contains(&b));
                    if row.seq <= cursor || !ours {
                        continue;
                    }
                    cursor = row.seq;
                    let ends_a_step = matches!(Kind::parse(&row.kind), Some(Kind::StepFinished))
                        || ends_build(&row);
                    if ends_a_step && send_live(shared, &mut logs, tx).await? == Next::Stop {
                        return Ok(());
                    }
                    if send_event(build, req, (*row).clone(), tx).await? == Next::Stop {
                        return Ok(());
                    }
                }
                // Fell behind the subscription: read the database again.
                Err(broadcast::error::RecvError::Lagged(missed)) => {
                    tracing::info!(
                        missed,
                        cursor,
                        "a watcher fell behind the sequencer; it reads the event table again"
                    );
                    break;
                }
                Err(broadcast::error::RecvError::Closed) => {
                    return Err(Status::unavailable("the runner is stopping"));
                }
            }
        }
    }
}

/// Sends the live log lines of the build's running steps, if asked for.
async fn send_live(
    shared: &Shared,
    logs: &mut Option<LiveLogs>,
    tx: &mpsc::Sender<Result<Event, Status>>,
) -> Result<Next, Status> {
    let Some(live) = logs else {
        return Ok(Next::Go);
    };
    for line in live.poll(shared).await? {
        if tx.send(Ok(line)).await.is_err() {
            return Ok(Next::Stop);
        }
    }
    Ok(Next::Go)
}

#[derive(PartialEq, Eq)]
enum Next {
    Go,
    Stop,
}

/// Sends one event; Stop when the client left or the stream is done.
async fn send_event(
    build: Option<i32>,
    req: &WatchRequest,
    row: EventRow,
    tx: &mpsc::Sender<Result<Event, Status>>,
) -> Result<Next, Status> {
    let ends = build.is_some() && ends_build(&row);
    if tx.send(Ok(to_wire(row))).await.is_err() {
        return Ok(Next::Stop); // the client left
    }
    Ok(if ends && req.until_finished {
        Next::Stop
    } else {
        Next::Go
    })
}

/// The logs of a build's running steps, read as they grow, for a watcher
/// that asked for them. A step that stops running is read to its end once
/// more, then forgotten.
struct LiveLogs {
    build: i32,
    following: std::collections::HashMap<StorePath, (Tail, LineCursor)>,
}

impl LiveLogs {
    fn new(build: i32) -> LiveLogs {
        LiveLogs {
            build,
            following: Default::default(),
        }
    }

    async fn poll(&mut self, shared: &Shared) -> Result<Vec<Event>, ApiError> {
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
                .or_insert_with(|| (Tail::new(drv.clone(), 0), LineCursor::new(0)));
        }
        let mut out = Vec::new();
        let mut done = Vec::new();
        for (drv, (tail, cursor)) in &mut self.following {
            let ended = !running.contains(drv);
            let full = shared.store.dir().display(drv);
            // One chunk per poll and step: a step that writes faster than
            // this watcher reads is followed at the watcher's pace.
            let bytes = tail.next(&shared.logs).await?;
            let at_end = bytes.len() < CHUNK;
            for line in cursor.push(&bytes, ended && at_end).lines {
                out.push(Event {
                    seq: 0,
                    kind: EventKind::Log as i32,
                    build_ids: vec![self.build as u64],
                    drv_path: full.clone(),
                    detail: line,
                    ..Default::default()
                });
            }
            if ended && at_end {
                done.push(drv.clone());
            }
        }
        for d in done {
            self.following.remove(&d);
        }
        Ok(out)
    }
}

/// A log read on from where the reader is, chunk by chunk, off the async
/// threads; opened when it first exists.
struct Tail {
    drv: StorePath,
    reader: Option<LogReader>,
    offset: u64,
}

impl Tail {
    fn new(drv: StorePath, offset: u64) -> Tail {
        Tail {
            drv,
            reader: None,
            offset,
        }
    }

    /// The next bytes of the log, at most [`CHUNK`]; fewer at its current
    /// end, none when there is no log yet.
    async fn next(&mut self, logs: &LogStore) -> Result<Vec<u8>, crate::logs::LogError> {
        let (logs, drv, offset, reader) = (
            logs.clone(),
            self.drv.clone(),
            self.offset,
            self.reader.take(),
        );
        let (reader, bytes) = tokio::task::spawn_blocking(move || {
            let mut reader = match reader {
                Some(r) => Some(r),
                None => logs.open_at(&drv, offset)?,
            };
            let mut buf = vec![0u8; CHUNK];
            let n = match &mut reader {
                Some(r) => r.fill(&mut buf)?,
                None => 0,
            };
            buf.truncate(n);
            Ok::<_, crate::logs::LogError>((reader, buf))
        })
        .await
        .expect("reading a log does not panic")?;
        self.reader = reader;
        self.offset += bytes.len() as u64;
        Ok(bytes)
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
    .fetch_optional(&shared.api_pool)
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
    if !req.follow && !shared.logs.exists(&drv) {
        return Err(ApiError::NotFound(format!(
            "there is no log of {}",
            shared.store.dir().display(&drv)
        )));
    }
    let (tx, rx) = mpsc::channel(4);
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
            .fetch_optional(&shared.api_pool)
            .await?
            .ok_or_else(|| ApiError::NotFound(format!("there is no build {id}")))?
    };
    shared
        .store
        .dir()
        .parse_path(&full)
        .map_err(|e| ApiError::Invalid(format!("{full:?} is not a store path: {e}")))
}

/// Sends the log from `req.from_line` (or, `raw`, from `req.from_byte`)
/// in chunks; with `follow`, keeps reading while the step is queued or
/// running, then sends the rest. A chunk is sent before the next is read:
/// a client that reads slowly holds the reading back, not memory.
async fn pump_log(
    shared: &Shared,
    drv: &StorePath,
    req: &GetLogRequest,
    tx: &mpsc::Sender<Result<LogLines, Status>>,
) -> Result<(), ApiError> {
    let mut lines = LineCursor::new(req.from_line);
    let mut tail = Tail::new(drv.clone(), if req.raw { req.from_byte } else { 0 });
    loop {
        let live = req.follow && step_pending(shared, drv);
        let offset = tail.offset;
        let bytes = tail.next(&shared.logs).await?;
        let at_end = bytes.len() < CHUNK;
        let message = if req.raw {
            (!bytes.is_empty()).then(|| LogLines {
                data: bytes,
                offset,
                ..Default::default()
            })
        } else {
            let batch = lines.push(&bytes, at_end && !live);
            (!batch.lines.is_empty()).then_some(batch)
        };
        if let Some(m) = message
            && tx.send(Ok(m)).await.is_err()
        {
            return Ok(());
        }
        if !at_end {
            continue;
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
            let mut line = &self.partial[start..start + nl];
            while line.len() >= MAX_LINE {
                emit(&line[..MAX_LINE], &mut self.next_line);
                line = &line[MAX_LINE..];
            }
            emit(line, &mut self.next_line);
            start += nl + 1;
        }
        // An unterminated line longer than the longest one sent is sent
        // in pieces as it grows, so the cursor holds at most one of them.
        while self.partial.len() - start >= MAX_LINE {
            emit(&self.partial[start..start + MAX_LINE], &mut self.next_line);
            start += MAX_LINE;
        }
        self.partial.drain(..start);
        if eof && !self.partial.is_empty() {
            let rest = std::mem::take(&mut self.partial);
            emit(&rest, &mut self.next_line);
        }
        LogLines {
            first_line: first.unwrap_or(self.next_line),
            lines: out,
            ..Default::default()
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

    #[test]
    fn a_long_line_is_cut_the_same_whether_read_at_once_or_as_it_grows() {
        let long = vec![b'x'; MAX_LINE * 2 + 5];
        let mut log = long.clone();
        log.extend_from_slice(b"\nnext\n");
        let mut whole = LineCursor::new(0);
        let at_once = whole.push(&log, true).lines;
        let mut growing = LineCursor::new(0);
        let mut pieces = Vec::new();
        for chunk in log.chunks(CHUNK) {
            let batch = growing.push(chunk, false);
            assert!(
                growing.partial.len() < MAX_LINE,
                "the cursor holds less than a line"
            );
            pieces.extend(batch.lines);
        }
        pieces.extend(growing.push(b"", true).lines);
        assert_eq!(at_once, pieces);
        let lengths: Vec<usize> = at_once.iter().map(|l| l.len()).collect();
        assert_eq!(lengths, vec![MAX_LINE, MAX_LINE, 5, 4]);
    }
}
