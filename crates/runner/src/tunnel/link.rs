//! The runner's end of one builder's control stream: what the rest of
//! the runner may tell a builder (a job, an abort, new settings), without
//! knowing the protocol. Only the tunnel makes protocol messages.
//!
//! Nothing here waits on the builder: the stream has a bounded buffer, and
//! a builder that lets it fill up has stopped reading. Such a builder is
//! disconnected (its attempts are aborted and retried elsewhere), so that
//! one stuck machine never holds up dispatch to the others.

use std::sync::Arc;

use hydra_proto::v1::{
    AbortJob, Adopted, BuildJob, Leaving, Limits, RunnerMessage, Settings, runner_message,
};
use thiserror::Error;
use tokio::sync::{Notify, mpsc};

/// Messages buffered for a builder before it counts as not reading.
pub const BUFFER: usize = 256;

pub(super) type ControlTx = mpsc::Sender<Result<RunnerMessage, tonic::Status>>;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum LinkError {
    #[error("the builder's connection is gone")]
    Closed,
    #[error(
        "the builder stopped reading its control stream ({BUFFER} messages waiting); it is disconnected"
    )]
    Stalled,
}

/// A job for a builder: one resolved derivation and what it needs.
#[derive(Debug, Clone)]
pub struct Job {
    pub attempt_id: String,
    pub drv_path: String,
    /// The derivation's ATerm text.
    pub drv: Vec<u8>,
    /// The input closure the build needs.
    pub input_paths: Vec<String>,
    pub max_silent_secs: u64,
    pub timeout_secs: u64,
    pub max_log_bytes: u64,
    pub max_output_bytes: u64,
    /// Jobs of the same builder that build inputs of this one: it starts
    /// once they have built.
    pub after_attempts: Vec<String>,
}

/// The runner's end of one builder's control stream.
#[derive(Debug, Clone)]
pub struct BuilderLink {
    tx: ControlTx,
    /// Ends the connection from the runner's side (see [`LinkError::Stalled`]).
    hang_up: Arc<Notify>,
}

impl BuilderLink {
    pub(super) fn new(tx: ControlTx) -> (BuilderLink, Arc<Notify>) {
        let hang_up = Arc::new(Notify::new());
        (
            BuilderLink {
                tx,
                hang_up: hang_up.clone(),
            },
            hang_up,
        )
    }

    /// A link whose stream nobody reads (for tests of what uses links).
    pub fn detached() -> BuilderLink {
        let (tx, _) = mpsc::channel(1);
        BuilderLink::new(tx).0
    }

    fn send(&self, msg: runner_message::Msg) -> Result<(), LinkError> {
        match self.tx.try_send(Ok(RunnerMessage { msg: Some(msg) })) {
            Ok(()) => Ok(()),
            Err(mpsc::error::TrySendError::Closed(_)) => Err(LinkError::Closed),
            Err(mpsc::error::TrySendError::Full(_)) => {
                self.hang_up.notify_one();
                Err(LinkError::Stalled)
            }
        }
    }

    /// Sends a job.
    pub fn send_job(&self, job: Job) -> Result<(), LinkError> {
        self.send(runner_message::Msg::Build(BuildJob {
            attempt_id: job.attempt_id,
            drv_path: job.drv_path,
            drv: job.drv,
            input_paths: job.input_paths,
            limits: Some(Limits {
                max_silent_secs: job.max_silent_secs,
                timeout_secs: job.timeout_secs,
                max_log_bytes: job.max_log_bytes,
                max_output_bytes: job.max_output_bytes,
            }),
            after_attempts: job.after_attempts,
        }))
    }

    /// Tells the builder to stop an attempt.
    pub fn abort(&self, attempt_id: &str, reason: &str) -> Result<(), LinkError> {
        self.send(runner_message::Msg::Abort(AbortJob {
            attempt_id: attempt_id.to_owned(),
            reason: reason.to_owned(),
        }))
    }

    /// Tells the builder to carry on with an attempt it declared.
    pub fn adopt(&self, attempt_id: &str, log_offset: u64) -> Result<(), LinkError> {
        self.send(runner_message::Msg::Adopted(Adopted {
            attempt_id: attempt_id.to_owned(),
            log_offset,
        }))
    }

    /// Tells the builder the runner stops on purpose and will be back.
    pub fn leaving(&self, reason: &str) -> Result<(), LinkError> {
        self.send(runner_message::Msg::Leaving(Leaving {
            reason: reason.to_owned(),
        }))
    }

    /// Whether every message sent has been taken by the stream.
    pub fn is_flushed(&self) -> bool {
        self.tx.capacity() == self.tx.max_capacity()
    }

    /// Settings a reload changed.
    pub fn push_settings(&self, ping_interval_secs: u32) -> Result<(), LinkError> {
        self.send(runner_message::Msg::Settings(Settings {
            ping_interval_secs,
        }))
    }
}
