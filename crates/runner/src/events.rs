//! The durable event log that clients watch (`hqr_events`).
//!
//! Events are written in the same transaction as the change they describe,
//! so an event exists exactly when its change committed. Writers do not
//! number them: transactions commit in any order, and numbering at insert
//! would let a watcher see number 10 before 9 commits (or make every
//! writer wait for the one before it to commit). The [`sequencer`], a
//! single task of the active runner woken by `hqr_events_written` on
//! commit, numbers the committed rows it finds, after every number it gave
//! before, in one statement. A number therefore never appears below one a
//! watcher has seen, and a watcher that resumes after the last `seq` it saw
//! misses nothing and sees nothing twice. `hqr_events`, notified by the
//! sequencer, wakes the watchers.

use std::sync::{Arc, LazyLock};
use std::time::Duration;

use sqlx::PgConnection;
use sqlx::PgPool;
use sqlx::postgres::PgListener;

use crate::graph::BuildId;
use crate::{Fatal, Shared};

/// How often the sequencer looks without a notification (a safety net).
const SEQUENCER_POLL: Duration = Duration::from_secs(1);
/// Rows numbered per statement.
const SEQUENCER_BATCH: i64 = 10_000;
/// How long the sequencer lets events gather after a notification: a
/// busy farm writes several events a step, each notifying, and numbering
/// them a transaction each was a third of PostgreSQL's work on a chain.
/// Watchers see an event this much later at most (plus a numbering pass);
/// an event's time (`at_ms`) is its write's, not its numbering's. 20 ms
/// rather than 5 took wide-200's ratio to local Nix from about 1.35x to
/// 1.28x in an A/B run (README), for a delay no watcher of build steps
/// notices.
const SEQUENCER_GATHER: Duration = Duration::from_millis(20);

/// What happened; the `kind` column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Queued,
    StepStarted,
    StepProgress,
    StepFinished,
    Resolved,
    Completed,
    Failed,
    Cancelled,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Queued => "queued",
            Kind::StepStarted => "step_started",
            Kind::StepProgress => "step_progress",
            Kind::StepFinished => "step_finished",
            Kind::Resolved => "resolved",
            Kind::Completed => "completed",
            Kind::Failed => "failed",
            Kind::Cancelled => "cancelled",
        }
    }

    pub fn parse(s: &str) -> Option<Kind> {
        [
            Kind::Queued,
            Kind::StepStarted,
            Kind::StepProgress,
            Kind::StepFinished,
            Kind::Resolved,
            Kind::Completed,
            Kind::Failed,
            Kind::Cancelled,
        ]
        .into_iter()
        .find(|k| k.as_str() == s)
    }

    /// The event that ends a build finished with Hydra status `status`.
    pub fn of_build_status(status: i32) -> Kind {
        match status {
            0 => Kind::Completed,
            4 => Kind::Cancelled,
            _ => Kind::Failed,
        }
    }
}

/// An event to write.
#[derive(Debug, Clone)]
pub struct NewEvent {
    pub kind: Kind,
    pub builds: Vec<BuildId>,
    pub drv_path: Option<String>,
    pub machine: Option<String>,
    pub status: Option<i32>,
    pub detail: Option<String>,
}

impl NewEvent {
    pub fn new(kind: Kind, builds: Vec<BuildId>) -> NewEvent {
        NewEvent {
            kind,
            builds,
            drv_path: None,
            machine: None,
            status: None,
            detail: None,
        }
    }

    pub fn drv(mut self, drv: impl Into<String>) -> Self {
        self.drv_path = Some(drv.into());
        self
    }

    pub fn machine(mut self, m: impl Into<String>) -> Self {
        self.machine = Some(m.into());
        self
    }

    pub fn status(mut self, s: i32) -> Self {
        self.status = Some(s);
        self
    }

    pub fn detail(mut self, d: impl Into<String>) -> Self {
        self.detail = Some(d.into());
        self
    }
}

/// `step_finished` for an attempt that ended with `status`, for the
/// builds that needed it at dispatch and `also` (those that need it now:
/// a build may have come to need it while it ran).
pub fn step_finished(
    drv: &str,
    attempt: &crate::attempts::Attempt,
    also: &[BuildId],
    status: hydra_db::status::BuildStatus,
    reason: Option<&str>,
) -> NewEvent {
    let mut builds = attempt.builds.clone();
    builds.extend_from_slice(also);
    builds.sort_unstable();
    builds.dedup();
    let mut e = NewEvent::new(Kind::StepFinished, builds)
        .drv(drv)
        .machine(attempt.machine.as_str())
        .status(status.code());
    e.detail = reason.map(str::to_owned);
    e
}

/// A stored event.
#[derive(Debug, Clone, sqlx::FromRow)]
pub struct EventRow {
    pub seq: i64,
    pub kind: String,
    pub builds: Vec<i32>,
    /// Unix milliseconds.
    pub at_ms: i64,
    pub drv_path: Option<String>,
    pub machine: Option<String>,
    pub status: Option<i32>,
    pub detail: Option<String>,
}

/// Events as the columns of `hqr_events`, one array each, for a statement
/// that inserts them with `unnest` (in the order given).
pub struct EventColumns<'a> {
    pub kinds: Vec<&'a str>,
    /// Each as an integer array's text (`{1,2}`): arrays of arrays cannot
    /// be bound.
    pub builds: Vec<String>,
    pub drvs: Vec<Option<&'a str>>,
    pub machines: Vec<Option<&'a str>>,
    pub statuses: Vec<Option<i32>>,
    pub details: Vec<Option<String>>,
}

impl<'a> EventColumns<'a> {
    pub fn new(events: impl IntoIterator<Item = &'a NewEvent>) -> EventColumns<'a> {
        let mut c = EventColumns {
            kinds: Vec::new(),
            builds: Vec::new(),
            drvs: Vec::new(),
            machines: Vec::new(),
            statuses: Vec::new(),
            details: Vec::new(),
        };
        for e in events {
            c.kinds.push(e.kind.as_str());
            c.builds.push(int_array(&e.builds));
            c.drvs.push(e.drv_path.as_deref());
            c.machines.push(e.machine.as_deref());
            c.statuses.push(e.status);
            // Details are often a builder's or Nix's text: cleaned at the
            // boundary (crate::outside), as every text that reaches a
            // column is.
            c.details.push(
                e.detail
                    .as_deref()
                    .map(|d| crate::outside::display_text(d, crate::outside::ERROR_MSG_MAX)),
            );
        }
        c
    }

    /// Binds the six arrays, in the order of the columns above.
    pub fn bind<'q>(
        &'q self,
        q: sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments>,
    ) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
        q.bind(&self.kinds)
            .bind(&self.builds)
            .bind(&self.drvs)
            .bind(&self.machines)
            .bind(&self.statuses)
            .bind(&self.details)
    }
}

/// Writes `events` in `tx`; the sequencer numbers them once it commits.
pub async fn emit(tx: &mut PgConnection, events: &[NewEvent]) -> Result<(), sqlx::Error> {
    if events.is_empty() {
        return Ok(());
    }
    let columns = EventColumns::new(events);
    // The sequencer's wake-up rides on the insert: one statement, not two,
    // of the several each step's transactions make.
    static SQL: LazyLock<String> =
        LazyLock::new(|| format!("with {} select {TELL_SEQUENCER}", written_cte(1, None)));
    columns.bind(sqlx::query(&SQL)).execute(&mut *tx).await?;
    Ok(())
}

/// The `written` CTE of a statement that inserts the events bound as
/// [`EventColumns`] at parameters `$first` to `$first + 5`, in their
/// order; with `gate`, only if the CTE named so has a row.
pub fn written_cte(first: usize, gate: Option<&str>) -> String {
    let [kind, builds, drv, machine, status, detail] = std::array::from_fn(|i| first + i);
    let gate = gate.map(|g| format!("{g}, ")).unwrap_or_default();
    format!(
        "written as (
           insert into hqr_events (kind, builds, drv_path, machine, status, detail)
           select e.kind, e.builds::integer[], e.drv, e.machine, e.status, e.detail
             from {gate}unnest(${kind}::text[], ${builds}::text[], ${drv}::text[], ${machine}::text[],
                               ${status}::integer[], ${detail}::text[])
                    with ordinality as e(kind, builds, drv, machine, status, detail, ord)
            order by e.ord
           returning 1)"
    )
}

/// A select-list item that wakes the sequencer, once, when `written`
/// wrote a row.
pub const TELL_SEQUENCER: &str =
    "(select count(pg_notify('hqr_events_written', '')) from (select 1 from written limit 1) w)";

/// Numbers committed events as they come, for as long as the runner runs
/// (the active runner only: one sequencer per database), and hands every
/// numbered row to the watchers of this runner (`shared.numbered`), so a
/// watcher that is caught up waits on the sequencer, not on the database.
pub async fn sequencer(shared: Arc<Shared>) -> Result<(), Fatal> {
    let mut listener = PgListener::connect_with(&shared.listen_pool).await?;
    listener.listen("hqr_events_written").await?;
    loop {
        loop {
            let rows = number_committed(&shared.pool).await?;
            let full = rows.len() as i64 == SEQUENCER_BATCH;
            if !rows.is_empty() {
                for row in rows {
                    // No receiver is no error: nobody watches.
                    let _ = shared.numbered.send(Arc::new(row));
                }
                shared.event_tick.send_modify(|t| *t += 1);
            }
            if !full {
                break;
            }
        }
        // A notification that came while numbering is in the buffer: the
        // next pass serves it (and any number of them) at once.
        if let Ok(Ok(_)) = tokio::time::timeout(SEQUENCER_POLL, listener.recv()).await {
            tokio::time::sleep(SEQUENCER_GATHER).await;
        }
        while listener.next_buffered().is_some() {}
    }
}

/// Numbers the committed events that have no number yet, in id order,
/// after the highest number given; returns them, in order, once committed.
pub async fn number_committed(pool: &PgPool) -> Result<Vec<EventRow>, sqlx::Error> {
    // One statement, its own transaction: done once its answer is read
    // (the rows come before the commit's acknowledgement, which ends the
    // answer). The notification, for watchers of other processes (this
    // runner's hear from the sequencer directly), is an init plan, run
    // only when there is a row to answer with.
    let mut rows: Vec<EventRow> = sqlx::query_as(
        "with todo as (select id from hqr_events where seq is null order by id limit $1),
              top as (select coalesce(max(seq), 0) as top from hqr_events),
              numbered as (
                update hqr_events e set seq = top.top + n.rn
                  from (select id, row_number() over (order by id) as rn from todo) n, top
                 where e.id = n.id
                returning e.seq, e.kind, e.builds, e.at_ms, e.drv_path, e.machine, e.status, e.detail)
         select numbered.*, (select count(pg_notify('hqr_events', ''))) as told from numbered",
    )
    .bind(SEQUENCER_BATCH)
    .fetch_all(pool)
    .await?;
    rows.sort_by_key(|r| r.seq);
    Ok(rows)
}

/// Writes `events` in a transaction of their own.
pub async fn emit_now(pool: &PgPool, events: &[NewEvent]) -> Result<(), sqlx::Error> {
    let mut tx = pool.begin().await?;
    emit(&mut tx, events).await?;
    tx.commit().await
}

/// `queued` events for the builds among `ids` that have none yet (the
/// loader's builds; a restart writes its own).
pub async fn emit_queued_once(pool: &PgPool, ids: &[BuildId]) -> Result<(), sqlx::Error> {
    if ids.is_empty() {
        return Ok(());
    }
    // Written so that the second half is an index scan of
    // `hqr_events_queued` for these ids: as `not exists` per id, the
    // planner read every `queued` event, a cost that grew with the queue.
    let mut fresh: Vec<i32> = sqlx::query_scalar(
        "select b from unnest($1::integer[]) b
         except
         select e.builds[1] from hqr_events e where e.kind = 'queued' and e.builds[1] = any($1)",
    )
    .bind(ids)
    .fetch_all(pool)
    .await?;
    fresh.sort_unstable();
    let events: Vec<NewEvent> = fresh
        .into_iter()
        .map(|b| NewEvent::new(Kind::Queued, vec![b]))
        .collect();
    emit_now(pool, &events).await
}

/// Up to `limit` events after `after`, of `build` or of all.
pub async fn read_after(
    pool: &PgPool,
    build: Option<BuildId>,
    after: i64,
    limit: i64,
) -> Result<Vec<EventRow>, sqlx::Error> {
    sqlx::query_as(
        "select seq, kind, builds, at_ms, drv_path, machine, status, detail from hqr_events
          where seq > $1 and ($2::integer is null or builds @> array[$2::integer])
          order by seq limit $3",
    )
    .bind(after)
    .bind(build)
    .bind(limit)
    .fetch_all(pool)
    .await
}

/// The newest event's number (0 when there is none).
/// Numbered events older than `days` days go, but for the newest: the
/// sequencer numbers on from it, so no number is ever given twice.
pub async fn prune(pool: &PgPool, days: u32) -> Result<u64, sqlx::Error> {
    sqlx::query(
        "delete from hqr_events
          where seq is not null
            and seq < (select max(seq) from hqr_events)
            and at_ms < (extract(epoch from now() - make_interval(days => $1)) * 1000)::bigint",
    )
    .bind(days as i32)
    .execute(pool)
    .await
    .map(|r| r.rows_affected())
}

pub async fn last_seq(pool: &PgPool) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar("select coalesce(max(seq), 0) from hqr_events")
        .fetch_one(pool)
        .await
}

fn int_array(ids: &[BuildId]) -> String {
    let parts: Vec<String> = ids.iter().map(|i| i.to_string()).collect();
    format!("{{{}}}", parts.join(","))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kinds_round_trip_through_their_column_names() {
        for k in [Kind::Queued, Kind::StepProgress, Kind::Cancelled] {
            assert_eq!(Kind::parse(k.as_str()), Some(k));
        }
        assert_eq!(Kind::parse("exploded"), None);
    }

    #[test]
    fn a_finished_build_maps_to_its_ending_event() {
        assert_eq!(Kind::of_build_status(0), Kind::Completed);
        assert_eq!(Kind::of_build_status(4), Kind::Cancelled);
        assert_eq!(Kind::of_build_status(2), Kind::Failed);
    }

    #[test]
    fn build_lists_are_postgres_array_literals() {
        assert_eq!(int_array(&[]), "{}");
        assert_eq!(int_array(&[3, 17]), "{3,17}");
    }
}
