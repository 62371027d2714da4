//! The jobs this builder holds, across connections to runners.
//!
//! A job belongs to the connection that sent it, or that adopted it
//! later; when that connection ends, the job is *orphaned*: it keeps
//! building (or keeps its result) for `orphan_grace_secs`, waiting for a
//! runner to adopt it again. Each job's task holds a [`Tie`], through which
//! it learns who it reports to now; the connection loop changes that with
//! [`Jobs::adopted`], [`Jobs::session_ended`] and [`Jobs::abort`].

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hydra_proto::v1::{BuilderMessage, HeldAttempt};
use parking_lot::Mutex;
use tokio::sync::{mpsc, watch};

use crate::client::Client;
use crate::records::Records;

/// One connection to a runner.
pub struct Session {
    /// Counts connections of this process: a job compares it to tell a
    /// new connection from the one a failed call was made on.
    pub generation: u64,
    pub client: Client,
    /// The connection's id (Welcome.machine_id); calls carry it.
    pub machine_id: String,
    pub control: mpsc::Sender<BuilderMessage>,
}

/// Who a job reports to: a connection, and how much of the log that
/// runner has already.
#[derive(Clone)]
pub struct Owner {
    pub session: Arc<Session>,
    pub log_offset: u64,
}

#[derive(Clone)]
enum Holder {
    Owned(Owner),
    Orphaned {
        since: Instant,
    },
    /// The runner said to drop it, or nobody took it in time.
    Dropped(String),
}

/// Why a job stops without reporting.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct Dropped(pub String);

struct Entry {
    drv_path: String,
    finished: bool,
    holder: watch::Sender<Holder>,
    /// True once its build ended (built or not): jobs sent to start after
    /// it wait for this ([`Jobs::after`]).
    settled: watch::Sender<bool>,
    task: Option<tokio::task::AbortHandle>,
}

/// The registry of held jobs.
pub struct Jobs {
    entries: Mutex<HashMap<String, Entry>>,
    orphan_grace: Duration,
    pub records: Records,
}

/// A job task's view of who holds it.
#[derive(Clone)]
pub struct Tie {
    pub attempt_id: String,
    holder: watch::Receiver<Holder>,
    orphan_grace: Duration,
}

impl Jobs {
    pub fn new(records: Records, orphan_grace: Duration) -> Jobs {
        Jobs {
            entries: Mutex::new(HashMap::new()),
            orphan_grace,
            records,
        }
    }

    /// What to declare when joining a runner.
    pub fn declared(&self) -> Vec<HeldAttempt> {
        let mut held: Vec<HeldAttempt> = self
            .entries
            .lock()
            .iter()
            .map(|(id, e)| HeldAttempt {
                attempt_id: id.clone(),
                drv_path: e.drv_path.clone(),
                finished: e.finished,
            })
            .collect();
        held.sort_by(|a, b| a.attempt_id.cmp(&b.attempt_id));
        held
    }

    /// How many jobs are held (running or waiting to report).
    pub fn len(&self) -> usize {
        self.entries.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Whether attempt `id` is held.
    pub fn holds(&self, id: &str) -> bool {
        self.entries.lock().contains_key(id)
    }

    /// Registers a job held by `owner` (a new one), or orphaned (one
    /// recovered from disk at start), and starts its task with its tie.
    /// A second job under a held id is refused (the runner never sends
    /// one; a confused one is not obeyed).
    pub fn start<F>(
        &self,
        id: &str,
        drv_path: &str,
        finished: bool,
        owner: Option<Owner>,
        task: impl FnOnce(Tie) -> F,
    ) -> bool
    where
        F: std::future::Future<Output = ()> + Send + 'static,
    {
        let mut entries = self.entries.lock();
        if entries.contains_key(id) {
            return false;
        }
        let holder = match owner {
            Some(o) => Holder::Owned(o),
            None => Holder::Orphaned {
                since: Instant::now(),
            },
        };
        let (tx, rx) = watch::channel(holder);
        let tie = Tie {
            attempt_id: id.to_owned(),
            holder: rx,
            orphan_grace: self.orphan_grace,
        };
        let handle = tokio::spawn(task(tie));
        entries.insert(
            id.to_owned(),
            Entry {
                drv_path: drv_path.to_owned(),
                finished,
                holder: tx,
                settled: watch::channel(finished).0,
                task: Some(handle.abort_handle()),
            },
        );
        true
    }

    /// A runner took over attempt `id` (declared at join). False when it
    /// is not held (any more).
    pub fn adopted(&self, id: &str, owner: Owner) -> bool {
        match self.entries.lock().get(id) {
            Some(e) => {
                e.holder.send_replace(Holder::Owned(owner));
                true
            }
            None => false,
        }
    }

    /// The job was built: it has a report to deliver.
    pub fn finished(&self, id: &str) {
        if let Some(e) = self.entries.lock().get_mut(id) {
            e.finished = true;
            e.settled.send_replace(true);
        }
    }

    /// The job's build ended, built or not: its outputs, if any, are in
    /// this machine's store, and jobs sent to start after it may start.
    pub fn settled(&self, id: &str) {
        if let Some(e) = self.entries.lock().get(id) {
            e.settled.send_replace(true);
        }
    }

    /// Waits until each of the jobs `ids` has settled (built or not), been
    /// dropped, or was never held: a job the runner sent ahead of local
    /// jobs that build its inputs starts then. Should one of them have
    /// failed, the job finds the input missing and says so; the runner,
    /// which holds its result until its inputs succeed, never records it.
    pub async fn after(&self, ids: &[String]) {
        let waits: Vec<watch::Receiver<bool>> = {
            let entries = self.entries.lock();
            ids.iter()
                .filter_map(|id| entries.get(id).map(|e| e.settled.subscribe()))
                .collect()
        };
        for mut settled in waits {
            // An error: the job's entry is gone (dropped, or delivered).
            let _ = settled.wait_for(|s| *s).await;
        }
    }

    /// The connection `generation` ended: its jobs are orphans from now.
    pub fn session_ended(&self, generation: u64) {
        let now = Instant::now();
        for e in self.entries.lock().values() {
            let ours = matches!(&*e.holder.borrow(),
                Holder::Owned(o) if o.session.generation == generation);
            if ours {
                e.holder.send_replace(Holder::Orphaned { since: now });
            }
        }
    }

    /// The runner says to drop attempt `id`: its build is stopped (its
    /// daemon connections close, so the nix-daemon kills it) and what is
    /// kept of it is removed. False when it is not held.
    pub fn abort(&self, id: &str, reason: &str) -> bool {
        let Some(mut e) = self.entries.lock().remove(id) else {
            return false;
        };
        e.holder.send_replace(Holder::Dropped(reason.to_owned()));
        if let Some(task) = e.task.take() {
            task.abort();
        }
        self.records.forget(id);
        true
    }

    /// The job's task ended (delivered, or dropped): it is no longer held.
    pub fn done(&self, id: &str) {
        self.entries.lock().remove(id);
        self.records.forget(id);
    }
}

impl Tie {
    /// The connection to report to, waiting while the job is an orphan;
    /// an error once it was dropped or `orphan_grace_secs` passed with no
    /// runner taking it.
    pub async fn owner(&mut self) -> Result<Owner, Dropped> {
        loop {
            let now = self.holder.borrow_and_update().clone();
            match now {
                Holder::Owned(o) => return Ok(o),
                Holder::Dropped(why) => return Err(Dropped(why)),
                Holder::Orphaned { since } => {
                    let deadline = since + self.orphan_grace;
                    let wait = tokio::time::timeout_at(deadline.into(), self.holder.changed());
                    match wait.await {
                        Ok(Ok(())) => continue,
                        Ok(Err(_)) => return Err(Dropped("the builder is stopping".into())),
                        Err(_) => {
                            return Err(Dropped(format!(
                                "no runner took it within orphan_grace_secs ({} s)",
                                self.orphan_grace.as_secs()
                            )));
                        }
                    }
                }
            }
        }
    }

    /// The current connection, if one holds the job now (for messages that
    /// are not worth waiting for, like progress).
    pub fn current(&self) -> Option<Owner> {
        match &*self.holder.borrow() {
            Holder::Owned(o) => Some(o.clone()),
            _ => None,
        }
    }

    /// Waits until the job is held by a connection other than
    /// `generation` (after a call on it failed), or `patience` passed (the
    /// failure was the call's own; try the same connection again).
    pub async fn moved_on(&mut self, generation: u64, patience: Duration) -> Result<(), Dropped> {
        let until = Instant::now() + patience;
        loop {
            match self.current() {
                Some(o) if o.session.generation != generation => return Ok(()),
                Some(_) if Instant::now() >= until => return Ok(()),
                None => {
                    // An orphan: wait for whoever adopts it (or the grace).
                    self.owner().await?;
                    return Ok(());
                }
                Some(_) => {}
            }
            let _ = tokio::time::timeout_at(until.into(), self.holder.changed()).await;
            if let Holder::Dropped(why) = &*self.holder.borrow() {
                return Err(Dropped(why.clone()));
            }
        }
    }
}
