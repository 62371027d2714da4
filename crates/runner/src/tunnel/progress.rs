//! Builders' progress reports (`BuildSteps.busy` and a `step_progress`
//! event each), written by one task in batches: under load, a transaction
//! per report was most of the runner's transactions (four a step), and a
//! builder's control stream waited on each. A batch is what piled up
//! while the one before was written, and what came within [`GATHER`] of
//! its first report, in order.

use std::sync::Arc;

use tokio::sync::mpsc;

use crate::record::ProgressUpdate;
use crate::{Fatal, Shared};

/// Reports queued before a control stream waits for the writer.
const CAPACITY: usize = 4096;
/// At most this many reports a transaction.
const MAX_BATCH: usize = 512;
/// How long reports gather after the first of a batch: on a busy farm the
/// reports of several steps come within milliseconds of each other (one
/// step built, the next building, the one after that preparing), and one
/// transaction serves them all, every change still an event. Kept short
/// so that a report is written long before its step's completion (an
/// upload and import), which would make it moot.
const GATHER: std::time::Duration = std::time::Duration::from_millis(3);

/// Where control streams queue progress reports.
#[derive(Clone)]
pub struct ProgressQueue(mpsc::Sender<ProgressUpdate>);

impl ProgressQueue {
    pub fn new() -> (ProgressQueue, mpsc::Receiver<ProgressUpdate>) {
        let (tx, rx) = mpsc::channel(CAPACITY);
        (ProgressQueue(tx), rx)
    }

    /// Queues a report; waits while the writer is [`CAPACITY`] behind, so
    /// a builder that reports faster than the database writes is slowed
    /// rather than buffered without bound.
    pub async fn report(&self, update: ProgressUpdate) {
        // The writer only stops with the runner.
        let _ = self.0.send(update).await;
    }
}

/// The writer: a critical task (a database fault stops the runner, as
/// it would have stopped the control stream's write before).
pub async fn write(
    shared: Arc<Shared>,
    mut queue: mpsc::Receiver<ProgressUpdate>,
) -> Result<(), Fatal> {
    let mut batch = Vec::with_capacity(MAX_BATCH);
    while queue.recv_many(&mut batch, MAX_BATCH).await > 0 {
        tokio::time::sleep(GATHER).await;
        while batch.len() < MAX_BATCH
            && let Ok(more) = queue.try_recv()
        {
            batch.push(more);
        }
        // A conflict (serialization failure, deadlock) is PostgreSQL asking
        // for the statement again, as for every writer of the runner.
        let written = retrying_transient!(
            crate::record::set_steps_progress(&shared.pool, &batch)
                .await
                .map_err(Fatal::from)
        );
        match written {
            Ok(()) => {}
            Err(e) if e.refused_data().is_some() => {
                // One report the database refuses must not cost the others
                // theirs: write them one at a time.
                tracing::warn!("progress not recorded in a batch ({e}); one at a time");
                for u in &batch {
                    let one = retrying_transient!(
                        crate::record::set_steps_progress(&shared.pool, std::slice::from_ref(u))
                            .await
                            .map_err(Fatal::from)
                    );
                    match one {
                        Ok(()) => {}
                        Err(e) if e.refused_data().is_some() => {
                            tracing::warn!("progress not recorded: {e}");
                        }
                        Err(e) => return Err(e),
                    }
                }
            }
            Err(e) => return Err(e),
        }
        batch.clear();
    }
    Ok(())
}
