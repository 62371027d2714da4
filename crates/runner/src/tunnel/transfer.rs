//! NAR transfer with builders: the inputs a builder lacks go out of the
//! runner's store; outputs come in, are checked against the hash and size
//! the builder announced (while they stream, not by reading them again)
//! and imported into the runner's store.

use std::io::Read;
use std::sync::Arc;

use hydra_nix::daemon::{DaemonClient, PathInfo, references_first};
use hydra_nix::{Hash, HashAlgo};
use hydra_proto::nar::{CHUNK, SendNarError};
use hydra_proto::v1::{NarChunk, NarHeader, nar_chunk};
use sha2::{Digest, Sha256};
use tokio::io::AsyncWriteExt;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Status, Streaming};

use super::BoxStream;
use crate::attempts::Upload;
use crate::nix_support::{OutputScan, scan_nar};
use crate::{Fatal, Shared};

/// The closure of `paths` in the runner's store.
async fn closure_of(
    shared: &Shared,
    paths: &[String],
) -> Result<std::collections::HashSet<String>, Status> {
    let mut client = store_client(shared).await?;
    let closure = client
        .query_closure(paths)
        .await
        .map_err(|e| unprepared(shared, crate::store::StoreError::from(e).into()))?;
    shared.store.release(client);
    Ok(closure.into_keys().collect())
}

/// The input closure of the job at `drv_path`, computed again (for an
/// attempt inherited from the runner before, whose job this runner did not
/// send).
pub async fn job_closure(
    shared: &Shared,
    drv_path: &hydra_nix::StorePath,
) -> Result<std::collections::HashSet<String>, Status> {
    let mut client = store_client(shared).await?;
    let inputs = crate::job_inputs::of(shared, &mut client, drv_path, false)
        .await
        .map_err(|e| unprepared(shared, e))?;
    shared.store.release(client);
    Ok(inputs.closure.into_iter().collect())
}

/// A job's inputs could not be read: the step's problem is the call's
/// failed precondition; a fault of the runner's store stops the runner.
fn unprepared(shared: &Shared, e: crate::job_inputs::PrepareError) -> Status {
    match e.into_reason() {
        Ok(reason) => Status::failed_precondition(reason),
        Err(fatal) => {
            shared.die(fatal);
            Status::unavailable("the runner is stopping")
        }
    }
}

/// Streams the NARs of `paths` (references first), each as a header and
/// its data.
pub async fn serve_inputs(
    shared: Arc<Shared>,
    paths: Vec<String>,
) -> Result<BoxStream<NarChunk>, Status> {
    let dir = shared.store.dir().clone();
    for p in &paths {
        dir.parse_path(p)
            .map_err(|e| Status::invalid_argument(format!("{p}: {e}")))?;
    }
    let mut client = store_client(&shared).await?;
    let answers = client
        .query_path_infos(&paths)
        .await
        .map_err(|e| Status::internal(format!("querying the inputs' path infos: {e}")))?;
    let mut infos = Vec::with_capacity(paths.len());
    for (p, info) in paths.iter().zip(answers) {
        infos.push(
            info.ok_or_else(|| Status::not_found(format!("{p} is not in the runner's store")))?,
        );
    }
    let ordered = references_first(infos);
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(async move {
        for info in ordered {
            if let Err(status) = send_nar(&mut client, &info, &tx).await {
                let _ = tx.send(Err(status)).await;
                return;
            }
        }
        // Every NAR was read whole: the connection is clean.
        shared.store.release(client);
    });
    Ok(Box::pin(ReceiverStream::new(rx)))
}

async fn send_nar(
    client: &mut DaemonClient,
    info: &PathInfo,
    tx: &mpsc::Sender<Result<NarChunk, Status>>,
) -> Result<(), Status> {
    hydra_proto::nar::send_nar(client, info, NarHeader::describing(info), tx, Ok)
        .await
        .map_err(|e| match e {
            SendNarError::ReceiverGone => Status::cancelled("builder left"),
            e => Status::internal(format!("{}: {e}", info.path)),
        })
}

/// Receives one output NAR and imports it. A NAR that does not match its
/// header, or that the store refuses, aborts the attempt: nothing of it is
/// recorded, and the step is retried.
pub async fn receive_output(
    shared: &Shared,
    mut stream: Streaming<NarChunk>,
) -> Result<String, Status> {
    let header = match stream.message().await? {
        Some(NarChunk {
            part: Some(nar_chunk::Part::Header(h)),
        }) => h,
        _ => {
            return Err(Status::invalid_argument(
                "an upload must start with a NarHeader",
            ));
        }
    };
    // Outputs may refer to inputs the build ran ahead of: they are imported
    // once those are (the store takes no path before its references).
    super::held_for_inputs(shared, &header.attempt_id, &header.machine_id).await?;
    let dir = shared.store.dir();
    let asked = shared
        .state
        .with_attempt(&header.attempt_id, &header.machine_id, |a| {
            let asked = a.may_output(dir, &header.store_path);
            let floating = asked && !a.is_fixed_output(&header.store_path);
            // References may be the job's inputs, the output itself, or
            // another output of the step; nothing else.
            let outside: Vec<String> = header
                .references
                .iter()
                .filter(|r| **r != header.store_path && !a.may_output(dir, r))
                .cloned()
                .collect();
            let ahead_of = a.ran_ahead_of.clone();
            (
                asked,
                floating,
                outside,
                a.inputs.clone(),
                ahead_of,
                a.drv_path.clone(),
            )
        });
    let (asked, floating, outside, inputs, ahead_of, drv_path) = match asked {
        Ok(asked) => asked,
        Err(e) => {
            let (conn, id) = (&header.machine_id, &header.attempt_id);
            return Err(super::refused(shared, conn, id, "upload", e.into()).await);
        }
    };
    if !asked {
        let reason = "it is not an output of the step".to_owned();
        return Err(reject(shared, &header, reason).await);
    }
    let info = match path_info(shared, &header) {
        Ok(info) => info,
        Err(reason) => return Err(reject(shared, &header, reason).await),
    };
    if floating && info.ca.is_none() {
        let reason = "a content-addressed output must carry its content address (ca), which the runner's store checks against the path and the NAR".to_owned();
        return Err(reject(shared, &header, reason).await);
    }
    if !outside.is_empty() {
        let inputs = match inputs {
            Some(i) if ahead_of.is_empty() || outside.iter().all(|r| i.contains(r)) => i,
            // A job sent ahead: the inputs it ran ahead of are in the
            // runner's store now (`held_for_inputs`), and their closure
            // joins the job's.
            Some(i) => {
                let mut all = closure_of(shared, &ahead_of).await?;
                all.extend(i.iter().cloned());
                let all = Arc::new(all);
                let _ = shared
                    .state
                    .with_attempt(&header.attempt_id, &header.machine_id, |a| {
                        a.inputs = Some(all.clone());
                        a.ran_ahead_of.clear();
                    });
                all
            }
            None => {
                let closure = Arc::new(job_closure(shared, &drv_path).await?);
                let _ = shared
                    .state
                    .with_attempt(&header.attempt_id, &header.machine_id, |a| {
                        a.inputs.get_or_insert_with(|| closure.clone());
                    });
                closure
            }
        };
        if let Some(stray) = outside.iter().find(|r| !inputs.contains(*r)) {
            let reason = format!(
                "it refers to {}, which is neither an input of the job nor one of its outputs",
                crate::outside::display_text(stray, crate::outside::DISPLAY_MAX)
            );
            return Err(reject(shared, &header, reason).await);
        }
    }
    match import(shared, &info, &mut stream).await {
        Ok(scan) => {
            let upload = Upload {
                nar_size: info.nar_size,
                scan,
            };
            shared
                .state
                .with_attempt(&header.attempt_id, &header.machine_id, |attempt| {
                    attempt.uploads.insert(info.path.clone(), upload)
                })?;
            Ok(info.path)
        }
        Err(ImportError::Fatal(e)) => {
            shared.die(e);
            Err(Status::unavailable("the runner is stopping"))
        }
        Err(ImportError::Rejected(reason)) => Err(reject(shared, &header, reason).await),
    }
}

/// Aborts the attempt of a rejected upload; returns the status to answer.
async fn reject(shared: &Shared, header: &NarHeader, reason: String) -> Status {
    let msg = format!("output {} rejected: {reason}", header.store_path);
    let taken = shared
        .state
        .take_attempt(&header.attempt_id, &header.machine_id);
    if let Ok(attempt) = taken
        && let Err(e) = crate::outcome::abort_attempt(shared, attempt, &msg).await
    {
        shared.die(e);
    }
    let (conn, id) = (&header.machine_id, &header.attempt_id);
    super::refused(shared, conn, id, "upload", Status::data_loss(msg)).await
}

/// The header's path info, checked, and within the output size limit.
fn path_info(shared: &Shared, h: &NarHeader) -> Result<PathInfo, String> {
    let info = h.path_info(shared.store.dir()).map_err(|e| e.to_string())?;
    if info.nar_size > shared.config().max_output_size {
        return Err(format!(
            "NAR of {} bytes exceeds the output size limit of {} bytes",
            info.nar_size,
            shared.config().max_output_size
        ));
    }
    Ok(info)
}

enum ImportError {
    Rejected(String),
    Fatal(Fatal),
}

/// Streams the NAR into the runner's daemon while hashing it and scanning
/// it for `nix-support`.
async fn import(
    shared: &Shared,
    info: &PathInfo,
    stream: &mut Streaming<NarChunk>,
) -> Result<OutputScan, ImportError> {
    let mut client = shared
        .store
        .client()
        .await
        .map_err(|e| ImportError::Fatal(e.into()))?;
    let (scan_tx, scan_rx) = std::sync::mpsc::channel::<Vec<u8>>();
    let scanner = tokio::task::spawn_blocking(move || {
        scan_nar(ChannelReader {
            rx: scan_rx,
            buf: Vec::new(),
            pos: 0,
        })
    });
    let (mut w, mut r) = tokio::io::duplex(CHUNK);
    let expected_size = info.nar_size;
    let feed = async move {
        let mut hasher = Sha256::new();
        let mut size = 0u64;
        let result = async {
            while let Some(chunk) = stream
                .message()
                .await
                .map_err(|s| format!("upload failed: {}", s.message()))?
            {
                let Some(nar_chunk::Part::Data(data)) = chunk.part else {
                    return Err("a second header inside one upload".to_owned());
                };
                size += data.len() as u64;
                if size > expected_size {
                    return Err(format!("more than the announced {expected_size} bytes"));
                }
                hasher.update(&data);
                let _ = scan_tx.send(data.clone());
                w.write_all(&data)
                    .await
                    .map_err(|e| format!("import stopped: {e}"))?;
            }
            Ok(())
        }
        .await;
        drop(w);
        drop(scan_tx);
        result?;
        if size != expected_size {
            return Err(format!(
                "{size} bytes arrived, {expected_size} were announced"
            ));
        }
        Ok(hasher.finalize().to_vec())
    };
    let import = client.add_to_store_nar(info, &mut r, false, true);
    let (fed, imported) = tokio::join!(feed, import);
    let digest = fed.map_err(ImportError::Rejected)?;
    let actual = Hash {
        algo: HashAlgo::Sha256,
        bytes: digest,
    };
    if actual != info.nar_hash {
        return Err(ImportError::Rejected(format!(
            "NAR hash mismatch: announced {}, received {}",
            info.nar_hash.to_prefixed_base32(),
            actual.to_prefixed_base32()
        )));
    }
    if let Err(e) = imported {
        return Err(match e.nix_message() {
            Some(m) => ImportError::Rejected(format!("the runner's store refused it: {m}")),
            None => ImportError::Fatal(crate::store::StoreError::from(e).into()),
        });
    }
    // Clean (its import rooted the path, which the runner keeps anyway):
    // the next import need not wait for a new daemon process.
    shared.store.release(client);
    let scan = scanner
        .await
        .expect("scanning does not panic")
        .map_err(|e| ImportError::Rejected(format!("not a valid NAR: {e}")))?;
    Ok(scan)
}

/// Bytes from a channel, as a blocking reader (for the NAR scanner).
struct ChannelReader {
    rx: std::sync::mpsc::Receiver<Vec<u8>>,
    buf: Vec<u8>,
    pos: usize,
}

impl Read for ChannelReader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.pos == self.buf.len() {
            match self.rx.recv() {
                Ok(data) => {
                    self.buf = data;
                    self.pos = 0;
                }
                Err(_) => return Ok(0),
            }
        }
        let n = out.len().min(self.buf.len() - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

async fn store_client(shared: &Shared) -> Result<DaemonClient, Status> {
    match shared.store.client().await {
        Ok(c) => Ok(c),
        Err(e) => {
            shared.die(e.into());
            Err(Status::unavailable("the runner's store is unreachable"))
        }
    }
}
