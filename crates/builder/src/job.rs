//! One job: fetch missing inputs, build, stream the log, upload the
//! outputs, report. Inputs and outputs are held as temporary roots on a
//! daemon connection kept open for the whole job, so a garbage collection
//! cannot take them mid-build.

use std::path::PathBuf;

use hydra_nix::daemon::{
    BuildMode, BuildStatus, ClientSettings, DaemonClient, DaemonError, LogLine, PathInfo,
    references_first,
};
use hydra_nix::{Derivation, StoreDir};
use hydra_proto::nar::{CHUNK, SendNarError};
use hydra_proto::v1::*;
use thiserror::Error;
use tokio::sync::mpsc;
use tokio_stream::wrappers::{ReceiverStream, UnboundedReceiverStream};

use crate::connection::send;

#[derive(Clone)]
pub struct JobContext {
    pub client: crate::connection::Client,
    pub machine_id: String,
    pub daemon_socket: PathBuf,
    /// Fresh connections to it, made ahead of the next job.
    pub daemon: std::sync::Arc<hydra_nix::daemon::Spares>,
    pub control: mpsc::Sender<BuilderMessage>,
    /// Binary caches tried before the runner for missing inputs.
    pub substituters: Option<std::sync::Arc<crate::substitute::Substituters>>,
}

/// A fault of this machine or of the transfer, not of the build: the
/// runner retries the step, elsewhere if it can.
#[derive(Debug, Error)]
enum JobError {
    #[error("the job's derivation is malformed: {0}")]
    BadJob(String),
    #[error("local nix-daemon: {0}")]
    Daemon(#[from] DaemonError),
    #[error("transfer with the runner failed: {0}")]
    Transfer(#[from] tonic::Status),
    #[error("sending an output: {0}")]
    Upload(#[from] SendNarError),
    #[error("the runner sent a bad NAR header: {0}")]
    BadHeader(String),
}

/// Runs one job to its report; returns the attempt id.
pub async fn run(ctx: JobContext, job: BuildJob) -> String {
    let attempt = job.attempt_id.clone();
    let report = match execute(&ctx, &job).await {
        Ok(report) => report,
        Err(e) => {
            tracing::warn!(attempt = %attempt, "job failed on this machine: {e}");
            CompletionReport {
                outcome: Outcome::InfrastructureFailure as i32,
                error_msg: e.to_string(),
                ..Default::default()
            }
        }
    };
    let report = CompletionReport {
        machine_id: ctx.machine_id.clone(),
        attempt_id: attempt.clone(),
        ..report
    };
    if let Err(s) = ctx.client.clone().complete(report).await {
        tracing::warn!(attempt = %attempt, "the runner did not accept the report: {}", s.message());
    }
    attempt
}

async fn execute(ctx: &JobContext, job: &BuildJob) -> Result<CompletionReport, JobError> {
    let dir = StoreDir::default();
    let drv = Derivation::parse(&dir, &job.drv).map_err(|e| JobError::BadJob(e.to_string()))?;
    let limits = job.limits.unwrap_or_default();
    progress(ctx, job, Phase::Preparing).await;
    let mut roots = ctx.daemon.take().await?;
    for p in &job.input_paths {
        roots.add_temp_root(p).await?;
    }
    let mut daemon = ctx.daemon.take().await?;
    let valid = daemon.query_valid_paths(&job.input_paths).await?;
    let missing: Vec<String> = job
        .input_paths
        .iter()
        .filter(|p| !valid.contains(*p))
        .cloned()
        .collect();
    if !missing.is_empty() {
        progress(ctx, job, Phase::SendingInputs).await;
        let missing = match &ctx.substituters {
            Some(caches) => caches.substitute(&ctx.daemon_socket, missing).await,
            None => missing,
        };
        if !missing.is_empty() {
            fetch_inputs(ctx, job, &mut daemon, missing).await?;
        }
    }
    progress(ctx, job, Phase::Building).await;
    let mut settings = ClientSettings {
        max_silent_time: limits.max_silent_secs,
        ..ClientSettings::default()
    };
    settings
        .overrides
        .insert("timeout".into(), limits.timeout_secs.to_string());
    settings.overrides.insert(
        "max-build-log-size".into(),
        limits.max_log_bytes.to_string(),
    );
    daemon.set_options(&settings).await?;
    let result = build_with_log(ctx, job, &mut daemon, &drv).await?;
    let base = CompletionReport {
        start_time: result.start_time,
        stop_time: result.stop_time,
        times_built: result.times_built as u32,
        is_non_deterministic: result.is_non_deterministic,
        ..Default::default()
    };
    let outcome = outcome_of(result.status);
    if outcome != Outcome::Succeeded {
        let error_msg = match result.status {
            BuildStatus::CachedFailure => format!(
                "this machine's nix-daemon has the derivation as a cached failure: {}",
                result.error_msg
            ),
            _ => result.error_msg,
        };
        return Ok(CompletionReport {
            outcome: outcome as i32,
            error_msg,
            ..base
        });
    }
    let mut outputs = Vec::new();
    for (name, out) in &drv.outputs {
        let path = match out.path() {
            Some(p) => dir.display(p),
            None => match result.built_outputs.get(name) {
                Some(r) => format!("{}/{}", dir.as_str(), r.out_path),
                None => {
                    return Err(JobError::BadJob(format!(
                        "Nix reported no path for output '{name}'"
                    )));
                }
            },
        };
        roots.add_temp_root(&path).await?;
        let info = daemon.require_path_info(&path).await?;
        outputs.push((name.clone(), info));
    }
    let total: u64 = outputs.iter().map(|(_, i)| i.nar_size).sum();
    if limits.max_output_bytes > 0 && total > limits.max_output_bytes {
        return Ok(CompletionReport {
            outcome: Outcome::OutputLimitExceeded as i32,
            error_msg: format!(
                "outputs total {total} bytes, over the limit of {} bytes",
                limits.max_output_bytes
            ),
            ..base
        });
    }
    progress(ctx, job, Phase::ReceivingOutputs).await;
    for info in references_first(outputs.iter().map(|(_, i)| i.clone())) {
        upload(ctx, job, &mut daemon, &info).await?;
    }
    progress(ctx, job, Phase::PostProcessing).await;
    Ok(CompletionReport {
        outcome: Outcome::Succeeded as i32,
        outputs: outputs
            .iter()
            .map(|(name, i)| BuiltOutput {
                name: name.clone(),
                path: i.path.clone(),
                nar_hash: i.nar_hash.to_prefixed_base32(),
                nar_size: i.nar_size,
            })
            .collect(),
        ..base
    })
}

/// Nix's result, as Hydra's runner reads it: a permanent failure of the
/// build is the build's; a transient one (a failed fetch) is retried; a
/// miscellaneous failure, or a failure cached by this machine's own
/// daemon, is this machine's business, so the runner retries elsewhere.
fn outcome_of(status: BuildStatus) -> Outcome {
    match status {
        s if s.is_success() => Outcome::Succeeded,
        BuildStatus::PermanentFailure
        | BuildStatus::InputRejected
        | BuildStatus::OutputRejected => Outcome::Failed,
        BuildStatus::TransientFailure => Outcome::TransientFailure,
        BuildStatus::TimedOut => Outcome::TimedOut,
        BuildStatus::LogLimitExceeded => Outcome::LogLimitExceeded,
        BuildStatus::NotDeterministic => Outcome::NotDeterministic,
        BuildStatus::CachedFailure
        | BuildStatus::MiscFailure
        | BuildStatus::DependencyFailed
        | BuildStatus::NoSubstituters
        | BuildStatus::Unknown(_) => Outcome::InfrastructureFailure,
        _ => Outcome::InfrastructureFailure,
    }
}

async fn progress(ctx: &JobContext, job: &BuildJob, phase: Phase) {
    let msg = BuilderMessage {
        msg: Some(builder_message::Msg::Progress(Progress {
            attempt_id: job.attempt_id.clone(),
            phase: phase as i32,
        })),
    };
    send(&ctx.control, msg).await;
}

/// Builds while the log streams to the runner, line by line as Nix prints.
async fn build_with_log(
    ctx: &JobContext,
    job: &BuildJob,
    daemon: &mut DaemonClient,
    drv: &Derivation,
) -> Result<hydra_nix::daemon::BuildResult, JobError> {
    let (log_tx, log_rx) = mpsc::unbounded_channel();
    let mut client = ctx.client.clone();
    let log_upload = tokio::spawn(async move {
        client
            .stream_log(UnboundedReceiverStream::new(log_rx))
            .await
    });
    let (machine_id, attempt_id) = (ctx.machine_id.clone(), job.attempt_id.clone());
    let mut on_log = move |line: LogLine| {
        if let LogLine::Build(mut bytes) = line {
            bytes.push(b'\n');
            let _ = log_tx.send(LogChunk {
                machine_id: machine_id.clone(),
                attempt_id: attempt_id.clone(),
                data: bytes,
            });
        }
    };
    let result = daemon
        .build_derivation(&job.drv_path, drv, BuildMode::Normal, &mut on_log)
        .await;
    drop(on_log);
    // The log is best effort: a failed log upload does not fail the build.
    if let Ok(Err(s)) = log_upload.await {
        tracing::warn!(attempt = %job.attempt_id, "log upload failed: {}", s.message());
    }
    Ok(result?)
}

/// Fetches `paths` from the runner and imports them, references first (the
/// runner sends them in that order).
async fn fetch_inputs(
    ctx: &JobContext,
    job: &BuildJob,
    daemon: &mut DaemonClient,
    paths: Vec<String>,
) -> Result<(), JobError> {
    let req = FetchInputsRequest {
        machine_id: ctx.machine_id.clone(),
        attempt_id: job.attempt_id.clone(),
        paths,
    };
    let mut stream = ctx.client.clone().fetch_inputs(req).await?.into_inner();
    let mut next = stream.message().await?;
    while let Some(chunk) = next {
        let Some(nar_chunk::Part::Header(h)) = chunk.part else {
            return Err(JobError::BadHeader("data before a header".into()));
        };
        let info = h
            .path_info(&StoreDir::default())
            .map_err(|e| JobError::BadHeader(e.to_string()))?;
        let (mut w, mut r) = tokio::io::duplex(CHUNK);
        let feed = async {
            use tokio::io::AsyncWriteExt;
            let mut left = info.nar_size;
            let mut following = None;
            while let Some(c) = stream.message().await? {
                match c.part {
                    Some(nar_chunk::Part::Data(d)) if d.len() as u64 <= left => {
                        left -= d.len() as u64;
                        if w.write_all(&d).await.is_err() {
                            break; // the import stopped; its error says why
                        }
                    }
                    Some(nar_chunk::Part::Data(_)) => {
                        return Err(JobError::BadHeader(format!(
                            "more data than the {} bytes announced",
                            info.nar_size
                        )));
                    }
                    other => {
                        following = Some(NarChunk { part: other });
                        break;
                    }
                }
            }
            drop(w);
            Ok::<_, JobError>(following)
        };
        let import = daemon.add_to_store_nar(&info, &mut r, false, true);
        let (fed, imported) = tokio::join!(feed, import);
        next = fed?;
        imported?;
    }
    Ok(())
}

/// Uploads one output's NAR, announced with the hash and size the local
/// store recorded when it registered the output.
async fn upload(
    ctx: &JobContext,
    job: &BuildJob,
    daemon: &mut DaemonClient,
    info: &PathInfo,
) -> Result<(), JobError> {
    let (tx, rx) = mpsc::channel(16);
    let header = NarHeader {
        machine_id: ctx.machine_id.clone(),
        attempt_id: job.attempt_id.clone(),
        ..NarHeader::describing(info)
    };
    let mut client = ctx.client.clone();
    let call = client.upload_output(ReceiverStream::new(rx));
    let produce = async move {
        match hydra_proto::nar::send_nar(daemon, info, header, &tx, |c| c).await {
            // The runner ended the upload; its answer says why.
            Ok(()) | Err(SendNarError::ReceiverGone) => Ok(()),
            Err(e) => Err(e),
        }
    };
    let (produced, answered) = tokio::join!(produce, call);
    answered?;
    produced?;
    Ok(())
}
