//! Connections made ahead of need. A nix-daemon forks and opens its store
//! for every connection (a few milliseconds), which showed on the critical
//! path of every step; so the next connection is made while the current
//! one is in use. A connection is handed out again only when the code that
//! used it gives it back ([`Spares::release`]) after its operations
//! succeeded and without leaving state on it (temporary roots, settings);
//! one that failed midway, or that holds roots, is dropped instead.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use super::{DaemonClient, DaemonError};

pub struct Spares {
    socket: PathBuf,
    ready: Mutex<Vec<DaemonClient>>,
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

impl Spares {
    /// Keeps up to `keep` fresh connections to the daemon at `socket`
    /// (made once the first is taken).
    pub fn new(socket: &Path, keep: usize) -> Arc<Spares> {
        Arc::new(Spares {
            socket: socket.to_owned(),
            ready: Mutex::new(Vec::new()),
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

    /// Gives back a connection whose operations all succeeded and that
    /// holds no temporary roots or settings, for the next caller.
    pub fn release(&self, client: DaemonClient) {
        let mut ready = self.ready.lock().expect("spares lock");
        if ready.len() < self.keep {
            ready.push(client);
        }
    }

    fn refill(self: &Arc<Self>) {
        if self.keep == 0 || self.filling.swap(true, Ordering::AcqRel) {
            return;
        }
        let me = self.clone();
        tokio::spawn(async move {
            while me.ready.lock().expect("spares lock").len() < me.keep {
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
