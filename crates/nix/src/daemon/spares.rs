//! Connections made ahead of need. A nix-daemon forks and opens its store
//! for every connection (a few milliseconds), which showed on the critical
//! path of every step; so the next connection is made while the current
//! one is in use. A connection is handed out again only when the code that
//! used it gives it back ([`Spares::release`]) after its operations
//! succeeded, with no settings the next user would not set again; one
//! that failed midway is dropped instead.
//! A connection that holds temporary roots may be given back: they last
//! until it closes, which is at most [`MAX_TEMP_ROOTS`] roots later on a
//! busy machine, or [`ROOTED_IDLE`] after it was given back on a quiet
//! one, so what a job or an import rooted is collectable again soon after.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::{DaemonClient, DaemonError};

/// A connection given back holding more temporary roots is closed.
pub const MAX_TEMP_ROOTS: u32 = 256;

/// A connection given back holding temporary roots is closed once it has
/// been unused this long: otherwise an idle runner or builder would keep
/// what it last imported or built from a garbage collection for as long
/// as it runs.
pub const ROOTED_IDLE: Duration = Duration::from_secs(2);

pub struct Spares {
    socket: PathBuf,
    ready: Mutex<Ready>,
    filling: AtomicBool,
    keep: usize,
    /// Set once a connection completed its handshake. Until then
    /// connections are made one at a time and no spares are made: on a
    /// fresh store with `ca-derivations`, Nix 2.8's first connections
    /// migrate its schema, and several at once can deadlock ("waiting for
    /// exclusive access to the Nix store for ca drvs").
    warmed: AtomicBool,
    first: tokio::sync::Mutex<()>,
}

/// The connections at hand, the last given back on top.
#[derive(Default)]
struct Ready {
    spares: Vec<Spare>,
    /// A task closes the rooted ones that sat unused for [`ROOTED_IDLE`].
    sweeping: bool,
}

struct Spare {
    client: DaemonClient,
    since: Instant,
}

impl Ready {
    fn pop(&mut self) -> Option<DaemonClient> {
        self.spares.pop().map(|s| s.client)
    }

    fn len(&self) -> usize {
        self.spares.len()
    }

    fn push(&mut self, client: DaemonClient) {
        self.spares.push(Spare {
            client,
            since: Instant::now(),
        });
    }

    fn any_rooted(&self) -> bool {
        self.spares.iter().any(|s| s.client.temp_roots() > 0)
    }
}

impl Spares {
    /// Keeps up to `keep` connections to the daemon at `socket`, a
    /// quarter of them made ahead (once the first is taken), the rest
    /// given back.
    pub fn new(socket: &Path, keep: usize) -> Arc<Spares> {
        Arc::new(Spares {
            socket: socket.to_owned(),
            ready: Mutex::new(Ready::default()),
            filling: AtomicBool::new(false),
            keep,
            warmed: AtomicBool::new(false),
            first: tokio::sync::Mutex::new(()),
        })
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// A fresh connection: a spare if there is one, else a new one; then
    /// the spares are made up again in the background.
    pub async fn take(self: &Arc<Self>) -> Result<DaemonClient, DaemonError> {
        if !self.warmed.load(Ordering::Acquire) {
            let _one_at_a_time = self.first.lock().await;
            if !self.warmed.load(Ordering::Acquire) {
                let client = DaemonClient::connect(&self.socket).await?;
                self.warmed.store(true, Ordering::Release);
                self.refill();
                return Ok(client);
            }
        }
        let spare = self.ready.lock().expect("spares lock").pop();
        self.refill();
        match spare {
            Some(c) => Ok(c),
            None => DaemonClient::connect(&self.socket).await,
        }
    }

    /// Gives back a connection whose operations all succeeded, for the
    /// next caller: its settings must be the defaults, or ones every
    /// caller that depends on settings sets again (a builder's jobs set all
    /// they build with). One holding more than [`MAX_TEMP_ROOTS`]
    /// temporary roots is closed instead.
    pub fn release(self: &Arc<Self>, client: DaemonClient) {
        if client.temp_roots() > MAX_TEMP_ROOTS {
            return;
        }
        let rooted = client.temp_roots() > 0;
        let mut ready = self.ready.lock().expect("spares lock");
        if ready.len() >= self.keep {
            return;
        }
        ready.push(client);
        if rooted && !ready.sweeping {
            let Ok(runtime) = tokio::runtime::Handle::try_current() else {
                return;
            };
            ready.sweeping = true;
            runtime.spawn(self.clone().sweep());
        }
    }

    /// Closes the connections holding temporary roots that were not taken
    /// again within [`ROOTED_IDLE`]; ends when none is left.
    async fn sweep(self: Arc<Self>) {
        loop {
            tokio::time::sleep(ROOTED_IDLE).await;
            let mut ready = self.ready.lock().expect("spares lock");
            ready
                .spares
                .retain(|s| s.client.temp_roots() == 0 || s.since.elapsed() < ROOTED_IDLE);
            if !ready.any_rooted() {
                ready.sweeping = false;
                return;
            }
        }
    }

    /// How many spares are made ahead: fewer than are kept, so that
    /// connections given back fill the rest (making up to `keep` at every
    /// take would fork a daemon process per take, given back or not).
    fn made_ahead(&self) -> usize {
        self.keep.div_ceil(4)
    }

    fn refill(self: &Arc<Self>) {
        if self.ready.lock().expect("spares lock").len() >= self.made_ahead()
            || self.filling.swap(true, Ordering::AcqRel)
        {
            return;
        }
        let me = self.clone();
        tokio::spawn(async move {
            while me.ready.lock().expect("spares lock").len() < me.made_ahead() {
                // A failure shows to the next caller, who connects itself.
                let Ok(c) = DaemonClient::connect(&me.socket).await else {
                    break;
                };
                me.ready.lock().expect("spares lock").push(c);
            }
            me.filling.store(false, Ordering::Release);
        });
    }
}
