//! One job: fetch missing inputs, build while the log goes to disk and on
//! to the runner, keep the result, deliver it (the rest of the log, the
//! outputs, the report) to whichever runner holds the job then.
//!
//! Inputs and outputs are held as temporary roots on a daemon connection
//! kept open for the whole job, and finished outputs that no runner has
//! taken within a second also as indirect roots under `state_dir`, so no
//! garbage collection takes them before a runner has them. A job outlives
//! the connection that sent it: a call that fails because the runner went
//! away waits for the job to be adopted again ([`Tie::owner`]) and is made
//! again.

use std::sync::Arc;
use std::time::Duration;

use hydra_nix::daemon::{
    BuildMode, BuildStatus, ClientSettings, DaemonClient, DaemonError, LogLine, PathInfo, Spares,
    references_first,
};
use hydra_nix::{Derivation, StoreDir};
use hydra_proto::nar::{CHUNK, SendNarError};
use hydra_proto::v1::*;
use thiserror::Error;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

use crate::jobs::{Dropped, Jobs, Owner, Tie};
use crate::records::{self, JobRecord, StoredReport};
use crate::spool::Spool;

/// What every job shares.
pub struct JobContext {
    pub daemon_socket: std::path::PathBuf,
    /// Fresh connections to it, made ahead of the next job.
    pub daemon: Arc<hydra_nix::daemon::Spares>,
    /// Binary caches tried before the runner for missing inputs.
    pub substituters: Option<Arc<crate::substitute::Substituters>>,
    pub jobs: Arc<Jobs>,
    /// Whether the local daemon keeps its own copy of build logs.
    pub keep_build_logs: bool,
}

/// How long a failed call waits for the job to move to another
/// connection before it is made again on the same one.
const RETRY_PATIENCE: Duration = Duration::from_secs(5);
/// Failed calls on one connection before the job gives up on it.
const RETRIES_PER_CONNECTION: u32 = 3;

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
    #[error("the build log cannot be kept in the state directory: {0}")]
    Spool(std::io::Error),
    #[error(transparent)]
    Dropped(#[from] Dropped),
}

/// Whether a failed call may work on another try or another connection
/// (the runner went away, restarted, or failed over), rather than being
/// the runner's answer.
fn is_transport(s: &tonic::Status) -> bool {
    !matches!(
        s.code(),
        tonic::Code::FailedPrecondition
            | tonic::Code::InvalidArgument
            | tonic::Code::PermissionDenied
            | tonic::Code::Unauthenticated
            | tonic::Code::NotFound
            | tonic::Code::OutOfRange
    )
}

/// Runs a new job to its delivery (or until it is dropped).
pub async fn run(ctx: Arc<JobContext>, job: BuildJob, mut tie: Tie) {
    let id = job.attempt_id.clone();
    match work(&ctx, &job, &mut tie).await {
        Ok(()) => tracing::info!(attempt = %id, "job delivered"),
        Err(Dropped(why)) => tracing::warn!(attempt = %id, "job dropped: {why}"),
    }
    ctx.jobs.done(&id);
}

async fn work(ctx: &JobContext, job: &BuildJob, tie: &mut Tie) -> Result<(), Dropped> {
    let id = &job.attempt_id;
    let mut record = JobRecord {
        attempt_id: id.clone(),
        drv_path: job.drv_path.clone(),
        started_at: records::now(),
        report: None,
    };
    if let Err(e) = ctx.jobs.records.started(&record, &job.drv) {
        tracing::warn!(attempt = %id, "cannot keep the job's record ({e}): it will not survive a restart of this builder");
    }
    let mut roots = None;
    let (report, shipped) = match Spool::create(&ctx.jobs.records.log_path(id)) {
        Err(e) => (infrastructure(&JobError::Spool(e)), None),
        Ok(spool) => {
            let spool = Arc::new(spool);
            match execute(ctx, job, tie, &spool, &mut roots).await {
                Ok((report, shipped)) => (report, shipped),
                Err(JobError::Dropped(d)) => return Err(d),
                Err(e) => {
                    tracing::warn!(attempt = %id, "job failed on this machine: {e}");
                    spool.close();
                    // Its connection may have broken midway: it is not
                    // given back for the next job (there are no outputs
                    // to hold).
                    roots = None;
                    (infrastructure(&e), None)
                }
            }
        }
    };
    let stored = StoredReport::of(&report);
    record.report = Some(stored.clone());
    if let Err(e) = ctx.jobs.records.finished(&record) {
        tracing::warn!(attempt = %id, "cannot keep the job's report ({e}): it will not survive a restart of this builder");
    } else if tie.current().is_none() {
        tracing::info!(attempt = %id, "the job ended while no runner holds it: its report is kept for the runner that adopts it");
    }
    ctx.jobs.finished(id);
    let spool = Spool::finished(&ctx.jobs.records.log_path(id))
        .ok()
        .map(Arc::new);
    deliver(ctx, id, tie, spool.as_deref(), stored, shipped, roots).await
}

/// Delivers a job that this builder had finished before it restarted.
pub async fn resume(ctx: Arc<JobContext>, record: JobRecord, mut tie: Tie) {
    let id = record.attempt_id.clone();
    let Some(report) = record.report else {
        ctx.jobs.done(&id);
        return;
    };
    let spool = Spool::finished(&ctx.jobs.records.log_path(&id))
        .ok()
        .map(Arc::new);
    match deliver(&ctx, &id, &mut tie, spool.as_deref(), report, None, None).await {
        Ok(()) => tracing::info!(attempt = %id, "job kept across a restart delivered"),
        Err(Dropped(why)) => {
            tracing::warn!(attempt = %id, "job kept across a restart dropped: {why}")
        }
    }
    ctx.jobs.done(&id);
}

fn infrastructure(e: &JobError) -> CompletionReport {
    CompletionReport {
        outcome: Outcome::InfrastructureFailure as i32,
        error_msg: e.to_string(),
        ..Default::default()
    }
}

/// Prepares and builds; returns the report and, when the whole log reached
/// a runner during the build, which connection has it and how much.
async fn execute(
    ctx: &JobContext,
    job: &BuildJob,
    tie: &mut Tie,
    spool: &Arc<Spool>,
    roots_out: &mut Option<DaemonClient>,
) -> Result<(CompletionReport, Option<(u64, u64)>), JobError> {
    let dir = StoreDir::default();
    let drv = Derivation::parse(&dir, &job.drv).map_err(|e| JobError::BadJob(e.to_string()))?;
    let limits = job.limits.unwrap_or_default();
    progress(tie, Phase::Preparing);
    // One connection for the whole job: it roots the inputs, builds, roots
    // the outputs and then holds them through the delivery. A connection
    // is a fork of the daemon and an opening of its store: three a job
    // were most of the farm's own CPU per step.
    let daemon = roots_out.insert(ctx.daemon.take().await?);
    // Rooted and configured before waiting for the local jobs it follows
    // (a root may name a path not built yet): a chain's next build then
    // starts one round trip after its input's, not four.
    daemon.add_temp_roots(&job.input_paths).await?;
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
    // The runner keeps the log; a copy here is a file a build.
    settings
        .overrides
        .insert("keep-build-log".into(), ctx.keep_build_logs.to_string());
    daemon.set_options(&settings).await?;
    if !job.after_attempts.is_empty() {
        tracing::debug!(attempt = %job.attempt_id, after = ?job.after_attempts, "waiting for the local jobs that build its inputs");
        ctx.jobs.after(&job.after_attempts).await;
        tracing::debug!(attempt = %job.attempt_id, "the local jobs it follows have built");
    }
    let valid = daemon.query_valid_paths(&job.input_paths).await?;
    let missing: Vec<String> = job
        .input_paths
        .iter()
        .filter(|p| !valid.contains(*p))
        .cloned()
        .collect();
    if !missing.is_empty() {
        progress(tie, Phase::SendingInputs);
        let missing = match &ctx.substituters {
            Some(caches) => caches.substitute(&ctx.daemon_socket, missing).await,
            None => missing,
        };
        if !missing.is_empty() {
            fetch_inputs_across(tie, job, daemon, &ctx.daemon, missing).await?;
        }
    }
    progress(tie, Phase::Building);
    tracing::debug!(attempt = %job.attempt_id, "building");
    let shipper = tokio::spawn(ship_live(tie.clone(), spool.clone()));
    let log_to = spool.clone();
    let mut on_log = move |line: LogLine| {
        if let LogLine::Build(mut bytes) = line {
            bytes.push(b'\n');
            log_to.append(&bytes);
        }
    };
    let built = daemon
        .build_derivation(&job.drv_path, &drv, BuildMode::Normal, &mut on_log)
        .await;
    // Jobs sent to start after this one may start now.
    ctx.jobs.settled(&job.attempt_id);
    tracing::debug!(attempt = %job.attempt_id, "build ended");
    spool.close();
    if matches!(&built, Ok(r) if outcome_of(r.status) == Outcome::Succeeded) {
        // Said as soon as the build succeeded, before the log's rest is
        // sent and the outputs are rooted and measured: the runner may
        // start dependents on this machine from now on (it records them
        // only after these outputs are verified).
        progress(tie, Phase::ReceivingOutputs);
    }
    // The shipper ends once the whole log is with a runner, or when no
    // runner holds the job (delivery sends the rest then).
    let shipped = shipper.await.unwrap_or(None);
    let result = built?;
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
        let report = CompletionReport {
            outcome: outcome as i32,
            error_msg,
            ..base
        };
        return Ok((report, shipped));
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
        daemon.add_temp_root(&path).await?;
        let info = daemon.require_path_info(&path).await?;
        outputs.push((name.clone(), info));
    }
    let total: u64 = outputs.iter().map(|(_, i)| i.nar_size).sum();
    if limits.max_output_bytes > 0 && total > limits.max_output_bytes {
        let report = CompletionReport {
            outcome: Outcome::OutputLimitExceeded as i32,
            error_msg: format!(
                "outputs total {total} bytes, over the limit of {} bytes",
                limits.max_output_bytes
            ),
            ..base
        };
        return Ok((report, shipped));
    }
    let report = CompletionReport {
        outcome: Outcome::Succeeded as i32,
        outputs: built_outputs(&outputs),
        ..base
    };
    Ok((report, shipped))
}

/// The report's outputs: name, path, and the NAR's hash and size.
fn built_outputs(outputs: &[(String, hydra_nix::daemon::PathInfo)]) -> Vec<BuiltOutput> {
    outputs
        .iter()
        .map(|(name, i)| BuiltOutput {
            name: name.clone(),
            path: i.path.clone(),
            nar_hash: i.nar_hash.to_prefixed_base32(),
            nar_size: i.nar_size,
        })
        .collect()
}

/// How long a finished job's outputs are held by this process's
/// temporary roots alone. A delivery that takes longer (no runner holds
/// the job, a slow upload) makes them indirect roots, which outlive a
/// restart of this builder. Most deliveries end well before: the two links
/// a root costs were a sizeable part of a trivial job's CPU, and an output
/// lost to a garbage collection that falls between a crash within this
/// second and the restart costs a rebuild, not a wrong result (the
/// delivery fails and the runner retries the step).
const HOLD_AFTER: Duration = Duration::from_secs(1);

/// Makes finished outputs indirect roots (symlinks under
/// `state_dir/gcroots`), so they outlive this process until a runner has
/// them. Best effort: the temporary roots hold them while the process
/// lives.
async fn hold_outputs(ctx: &JobContext, id: &str, outputs: &[(String, String)]) {
    let mut roots = match ctx.daemon.take().await {
        Ok(c) => c,
        Err(e) => {
            tracing::warn!(attempt = %id, "cannot root the outputs ({e}): they are held only while this process lives");
            return;
        }
    };
    let mut all = true;
    for (name, path) in outputs {
        let link = ctx.jobs.records.root_link(id, name);
        let _ = std::fs::remove_file(&link);
        let made = match std::os::unix::fs::symlink(path, &link) {
            Ok(()) => roots
                .add_indirect_root(&link)
                .await
                .map_err(|e| e.to_string()),
            Err(e) => Err(e.to_string()),
        };
        if let Err(e) = made {
            all = false;
            tracing::warn!(attempt = %id, "cannot root {path} at {}: {e}", link.display());
        }
    }
    if all {
        tracing::info!(attempt = %id, "the outputs are held from garbage collection until a runner has them");
        ctx.daemon.release(roots);
    }
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

/// Tells the runner that holds the job what it is doing, if one does (it
/// is not worth waiting for).
fn progress(tie: &Tie, phase: Phase) {
    if let Some(owner) = tie.current() {
        let msg = BuilderMessage {
            msg: Some(builder_message::Msg::Progress(Progress {
                attempt_id: tie.attempt_id.clone(),
                phase: phase as i32,
            })),
        };
        let _ = owner.session.control.try_send(msg);
    }
}

/// Streams the log to whichever runner holds the job, as it grows, from
/// what that runner has; returns (connection, length) once the whole log
/// is with one, or None when the build ended with no runner holding it.
async fn ship_live(mut tie: Tie, spool: Arc<Spool>) -> Option<(u64, u64)> {
    loop {
        let owner = match tie.current() {
            Some(o) => o,
            None if spool.is_closed() => return None,
            None => {
                tokio::select! {
                    held = tie.owner() => { held.ok()?; }
                    _ = wait_closed(&spool) => {}
                }
                continue;
            }
        };
        let generation = owner.session.generation;
        // The call opens at the log's first byte past what the runner has:
        // a silent build's log (most steps of a large DAG) costs no call.
        spool.wait_beyond(owner.log_offset).await;
        if spool.len() <= owner.log_offset {
            return Some((generation, owner.log_offset)); // closed, nothing new
        }
        match stream_log(&owner, &tie.attempt_id, &spool, owner.log_offset, true).await {
            Ok(length) => return Some((generation, length)),
            Err(s) if !is_transport(&s) => {
                tracing::warn!(attempt = %tie.attempt_id, "the runner refused the log: {}", s.message());
                return None;
            }
            Err(_) if spool.is_closed() => return None,
            // Not past the build's end: a job whose runner went away
            // records its report at once and waits for a runner in its
            // delivery, not here.
            Err(_) => tokio::select! {
                moved = tie.moved_on(generation, RETRY_PATIENCE) => moved.ok()?,
                _ = wait_closed(&spool) => {}
            },
        }
    }
}

async fn wait_closed(spool: &Spool) {
    while !spool.is_closed() {
        spool.wait_beyond(spool.len()).await;
    }
}

/// One StreamLog call: the log from `from`, each chunk with its offset;
/// with `follow`, until the log is complete. Returns the runner's length.
async fn stream_log(
    owner: &Owner,
    attempt_id: &str,
    spool: &Spool,
    from: u64,
    follow: bool,
) -> Result<u64, tonic::Status> {
    let (tx, rx) = mpsc::channel::<LogChunk>(8);
    let mut client = owner.session.client.clone();
    let call = client.stream_log(ReceiverStream::new(rx));
    let feed = async move {
        let mut at = from;
        loop {
            let data = spool
                .read_at(at)
                .map_err(|e| tonic::Status::internal(format!("reading the log: {e}")))?;
            if data.is_empty() {
                if !follow || spool.is_closed() {
                    return Ok::<(), tonic::Status>(());
                }
                spool.wait_beyond(at).await;
                continue;
            }
            let chunk = LogChunk {
                machine_id: owner.session.machine_id.clone(),
                attempt_id: attempt_id.to_owned(),
                offset: Some(at),
                data,
            };
            at += chunk.data.len() as u64;
            if tx.send(chunk).await.is_err() {
                return Ok(()); // the call ended; its answer says why
            }
        }
    };
    // A call that ends first (the runner went away) stops the feed, which
    // may be waiting for a silent build's next line.
    tokio::pin!(call);
    tokio::select! {
        answered = &mut call => return Ok(answered?.into_inner().log_length),
        fed = feed => fed?,
    }
    Ok(call.await?.into_inner().log_length)
}

/// Fetches missing inputs from the runner that holds the job, again on
/// the next connection when the runner goes away meanwhile.
async fn fetch_inputs_across(
    tie: &mut Tie,
    job: &BuildJob,
    daemon: &mut DaemonClient,
    spares: &Arc<Spares>,
    missing: Vec<String>,
) -> Result<(), JobError> {
    let mut tries = 0;
    loop {
        let owner = tie.owner().await?;
        let still: Vec<String> = {
            let valid = daemon.query_valid_paths(&missing).await?;
            missing
                .iter()
                .filter(|p| !valid.contains(*p))
                .cloned()
                .collect()
        };
        if still.is_empty() {
            return Ok(());
        }
        match fetch_inputs(&owner, job, daemon, spares, still).await {
            Err(JobError::Transfer(s)) if is_transport(&s) && tries < RETRIES_PER_CONNECTION => {
                tries += 1;
                tracing::warn!(attempt = %job.attempt_id, "fetching inputs failed ({}); trying again", s.message());
                tie.moved_on(owner.session.generation, RETRY_PATIENCE)
                    .await?;
            }
            other => return other,
        }
    }
}

/// NARs up to this size are read whole off the stream and imported on a
/// daemon connection of their own, so the next one is read while one
/// imports ([`Import`]). A larger one streams into the job's connection.
const BUFFERED_NAR: u64 = 1 << 20;

/// Fetches `paths` from the runner and imports them, one after another in
/// the order the runner sends them: references first.
async fn fetch_inputs(
    owner: &Owner,
    job: &BuildJob,
    daemon: &mut DaemonClient,
    spares: &Arc<Spares>,
    paths: Vec<String>,
) -> Result<(), JobError> {
    let mut import = Import::new(spares.clone());
    let req = FetchInputsRequest {
        machine_id: owner.session.machine_id.clone(),
        attempt_id: job.attempt_id.clone(),
        paths,
    };
    let mut client = owner.session.client.clone();
    let mut stream = client.fetch_inputs(req).await?.into_inner();
    let mut next = stream.message().await?;
    while let Some(chunk) = next {
        let Some(nar_chunk::Part::Header(h)) = chunk.part else {
            return Err(JobError::BadHeader("data before a header".into()));
        };
        let info = h
            .path_info(&StoreDir::default())
            .map_err(|e| JobError::BadHeader(e.to_string()))?;
        if info.nar_size <= BUFFERED_NAR {
            let (nar, following) = read_whole_nar(&mut stream, &info).await?;
            next = following;
            import.start(info, nar).await?;
            continue;
        }
        import.finish().await?;
        let (w, mut r) = tokio::io::duplex(CHUNK);
        let feed = async {
            use tokio::io::AsyncWriteExt;
            // Owned here: its end, when the feed returns, is the NAR's end
            // for the import.
            let mut w = w;
            let mut left = info.nar_size;
            loop {
                match next_piece(&mut stream, &info, &mut left).await? {
                    Piece::Data(d) => {
                        if w.write_all(&d).await.is_err() {
                            // The import stopped; its error says why.
                            return Ok::<_, JobError>(None);
                        }
                    }
                    Piece::End(following) => return Ok(following),
                }
            }
        };
        let import = daemon.add_to_store_nar(&info, &mut r, false, true);
        let (fed, imported) = tokio::join!(feed, import);
        next = fed?;
        imported?;
    }
    import.finish().await
}

/// What comes next of the NAR whose header announced `info`.
enum Piece {
    Data(Vec<u8>),
    /// The NAR ended: the message after it, if any.
    End(Option<NarChunk>),
}

/// The next piece of the NAR announced by `info`; its data is counted
/// against `left`, and more than announced is an error.
async fn next_piece(
    stream: &mut tonic::Streaming<NarChunk>,
    info: &PathInfo,
    left: &mut u64,
) -> Result<Piece, JobError> {
    let Some(c) = stream.message().await? else {
        return Ok(Piece::End(None));
    };
    match c.part {
        Some(nar_chunk::Part::Data(d)) if d.len() as u64 <= *left => {
            *left -= d.len() as u64;
            Ok(Piece::Data(d))
        }
        Some(nar_chunk::Part::Data(_)) => Err(JobError::BadHeader(format!(
            "more data than the {} bytes announced for {}",
            info.nar_size, info.path
        ))),
        other => Ok(Piece::End(Some(NarChunk { part: other }))),
    }
}

/// Reads the NAR whose header announced `info` whole (at most
/// [`BUFFERED_NAR`] bytes); returns it and the message after it.
async fn read_whole_nar(
    stream: &mut tonic::Streaming<NarChunk>,
    info: &PathInfo,
) -> Result<(Vec<u8>, Option<NarChunk>), JobError> {
    let mut nar = Vec::with_capacity(info.nar_size as usize);
    let mut left = info.nar_size;
    loop {
        match next_piece(stream, info, &mut left).await? {
            Piece::Data(d) => nar.extend_from_slice(&d),
            Piece::End(following) => return Ok((nar, following)),
        }
    }
}

/// The import under way beside a fetch's stream, on a connection of its
/// own, while the next NAR is read. One at a time, each after the one
/// before: that keeps the runner's references-first order, and the
/// store's database takes one writer anyway. Measured on wide-200's `all`
/// (about 100 inputs fetched): a median of 79 ms one at a time, 109 with
/// two at once, 95-133 with four, 100-258 with eight. Dropped, it stops
/// the import under way.
struct Import {
    spares: Arc<Spares>,
    /// At most one task (a set, so that dropping it aborts the task).
    running: tokio::task::JoinSet<Result<DaemonClient, JobError>>,
    /// The connection of the import that ended last, for the next.
    idle: Option<DaemonClient>,
}

impl Import {
    fn new(spares: Arc<Spares>) -> Import {
        Import {
            spares,
            running: Default::default(),
            idle: None,
        }
    }

    /// Starts importing `nar` as `info` once the import before has ended.
    async fn start(&mut self, info: PathInfo, nar: Vec<u8>) -> Result<(), JobError> {
        self.wait().await?;
        let mut daemon = match self.idle.take() {
            Some(d) => d,
            None => self.spares.take().await?,
        };
        self.running.spawn(async move {
            daemon
                .add_to_store_nar(&info, &mut nar.as_slice(), false, true)
                .await?;
            Ok(daemon)
        });
        Ok(())
    }

    async fn wait(&mut self) -> Result<(), JobError> {
        if let Some(ended) = self.running.join_next().await {
            let daemon = ended.map_err(|e| {
                JobError::Daemon(DaemonError::Protocol(format!("an import task failed: {e}")))
            })??;
            self.idle = Some(daemon);
        }
        Ok(())
    }

    /// Waits for the import under way; gives its connection back.
    async fn finish(&mut self) -> Result<(), JobError> {
        self.wait().await?;
        if let Some(daemon) = self.idle.take() {
            self.spares.release(daemon);
        }
        Ok(())
    }
}

/// Why one delivery try did not end the job.
enum Undelivered {
    /// The runner went away, or the call failed: try again when the job is
    /// held again.
    Retry(String),
    /// The runner's answer: the job ends here.
    Refused(String),
    /// The outputs cannot be sent from this machine: report that instead.
    Local(String),
}

/// Delivers a finished job: the rest of its log, its outputs (for a
/// success) and its report, to whichever runner holds it, until one takes
/// the report or the job is dropped. The report is accepted once per
/// attempt; a runner that had it already says so. Outputs still
/// undelivered after [`HOLD_AFTER`] are made indirect roots meanwhile.
async fn deliver(
    ctx: &JobContext,
    id: &str,
    tie: &mut Tie,
    spool: Option<&Spool>,
    report: StoredReport,
    shipped: Option<(u64, u64)>,
    roots: Option<DaemonClient>,
) -> Result<(), Dropped> {
    let outputs: Vec<(String, String)> = if report.outcome == Outcome::Succeeded as i32 {
        report
            .outputs
            .iter()
            .map(|(name, path, _, _)| (name.clone(), path.clone()))
            .collect()
    } else {
        Vec::new()
    };
    let delivery = deliver_until_done(ctx, id, tie, spool, report, shipped, roots);
    tokio::pin!(delivery);
    if !outputs.is_empty() {
        tokio::select! {
            done = &mut delivery => return done,
            () = tokio::time::sleep(HOLD_AFTER) => hold_outputs(ctx, id, &outputs).await,
        }
    }
    delivery.await
}

/// The delivery's tries, each to the runner that holds the job then.
async fn deliver_until_done(
    ctx: &JobContext,
    id: &str,
    tie: &mut Tie,
    spool: Option<&Spool>,
    mut report: StoredReport,
    mut shipped: Option<(u64, u64)>,
    roots: Option<DaemonClient>,
) -> Result<(), Dropped> {
    // Held for the whole delivery: the outputs stay rooted on it, and it
    // reads them for the upload.
    let mut roots = match roots {
        Some(r) => Some(r),
        None => root_outputs(ctx, &report).await,
    };
    let mut tries = 0u32;
    loop {
        let owner = tie.owner().await?;
        let generation = owner.session.generation;
        let delivered = deliver_once(ctx, id, &owner, spool, &report, &mut shipped, &mut roots);
        match delivered.await {
            Ok(()) => {
                // The next job's connection: its roots (of this job's
                // inputs and outputs) last until it closes, a few jobs
                // later (`Spares::release`), and every job sets all the
                // settings it builds with.
                if let Some(c) = roots {
                    ctx.daemon.release(c);
                }
                return Ok(());
            }
            Err(Undelivered::Refused(why)) => {
                return Err(Dropped(format!("the runner refused the report: {why}")));
            }
            Err(Undelivered::Local(why)) => {
                tracing::warn!(attempt = %id, "cannot send the outputs: {why}");
                report = StoredReport::of(&CompletionReport {
                    outcome: Outcome::InfrastructureFailure as i32,
                    error_msg: format!("the builder cannot send the outputs: {why}"),
                    ..Default::default()
                });
            }
            Err(Undelivered::Retry(why)) => {
                tries += 1;
                tracing::warn!(attempt = %id, "delivery failed ({why}); trying again when a runner holds the job");
                if tries > RETRIES_PER_CONNECTION {
                    tries = 0;
                    tie.moved_on(generation, Duration::from_secs(3600)).await?;
                } else {
                    tie.moved_on(generation, RETRY_PATIENCE).await?;
                }
            }
        }
    }
}

async fn deliver_once(
    ctx: &JobContext,
    id: &str,
    owner: &Owner,
    spool: Option<&Spool>,
    report: &StoredReport,
    shipped: &mut Option<(u64, u64)>,
    roots: &mut Option<DaemonClient>,
) -> Result<(), Undelivered> {
    let status = |s: tonic::Status| {
        if is_transport(&s) {
            Undelivered::Retry(s.message().to_owned())
        } else {
            Undelivered::Refused(s.message().to_owned())
        }
    };
    let generation = owner.session.generation;
    if let Some(spool) = spool {
        let from = match *shipped {
            Some((g, length)) if g == generation => length,
            _ => owner.log_offset,
        };
        if from < spool.len() || shipped.is_none_or(|(g, _)| g != generation) {
            let length = stream_log(owner, id, spool, from, false)
                .await
                .map_err(status)?;
            *shipped = Some((generation, length));
        }
    }
    if report.outcome == Outcome::Succeeded as i32 {
        send_progress(owner, id, Phase::ReceivingOutputs);
        // The job's own connection, which holds the outputs; a new one
        // (rooting them again) when there is none.
        if roots.is_none() {
            *roots = Some(root_outputs(ctx, report).await.ok_or_else(|| {
                Undelivered::Local("the local nix-daemon cannot be reached".into())
            })?);
        }
        let daemon = roots.as_mut().expect("just made");
        let sent = send_outputs(owner, id, daemon, report).await;
        if sent.is_err() {
            // A transfer cut off midway leaves the connection inside a
            // NAR: the next try gets a new one, rooted before this one
            // (and its roots) goes.
            *roots = root_outputs(ctx, report).await;
        }
        sent?;
        send_progress(owner, id, Phase::PostProcessing);
    }
    let mut client = owner.session.client.clone();
    client
        .complete(report.to_report(&owner.session.machine_id, id))
        .await
        .map_err(status)?;
    Ok(())
}

/// Uploads a successful job's outputs, references first.
async fn send_outputs(
    owner: &Owner,
    id: &str,
    daemon: &mut DaemonClient,
    report: &StoredReport,
) -> Result<(), Undelivered> {
    let mut infos = Vec::new();
    for (_, path, _, _) in &report.outputs {
        infos.push(
            daemon
                .require_path_info(path)
                .await
                .map_err(|e| Undelivered::Local(e.to_string()))?,
        );
    }
    for info in references_first(infos) {
        upload(owner, id, daemon, &info).await?;
    }
    Ok(())
}

fn send_progress(owner: &Owner, id: &str, phase: Phase) {
    let msg = BuilderMessage {
        msg: Some(builder_message::Msg::Progress(Progress {
            attempt_id: id.to_owned(),
            phase: phase as i32,
        })),
    };
    let _ = owner.session.control.try_send(msg);
}

/// Temporary roots for the outputs of a job recovered from disk (its
/// indirect roots held them while no process did).
async fn root_outputs(ctx: &JobContext, report: &StoredReport) -> Option<DaemonClient> {
    let mut roots = ctx.daemon.take().await.ok()?;
    for (_, path, _, _) in &report.outputs {
        let _ = roots.add_temp_root(path).await;
    }
    Some(roots)
}

/// Uploads one output's NAR, announced with the hash and size the local
/// store recorded when it registered the output.
async fn upload(
    owner: &Owner,
    id: &str,
    daemon: &mut DaemonClient,
    info: &PathInfo,
) -> Result<(), Undelivered> {
    let (tx, rx) = mpsc::channel(16);
    let header = NarHeader {
        machine_id: owner.session.machine_id.clone(),
        attempt_id: id.to_owned(),
        ..NarHeader::describing(info)
    };
    let mut client = owner.session.client.clone();
    let call = client.upload_output(ReceiverStream::new(rx));
    let produce = async move {
        match hydra_proto::nar::send_nar(daemon, info, header, &tx, |c| c).await {
            // The runner ended the upload; its answer says why.
            Ok(()) | Err(SendNarError::ReceiverGone) => Ok(()),
            Err(e) => Err(e),
        }
    };
    let (produced, answered) = tokio::join!(produce, call);
    if let Err(s) = answered {
        return Err(if is_transport(&s) {
            Undelivered::Retry(s.message().to_owned())
        } else {
            Undelivered::Refused(s.message().to_owned())
        });
    }
    produced.map_err(|e| Undelivered::Local(e.to_string()))
}

/// A job recorded as running when this builder last stopped: built after
/// all if its outputs are valid in the store (Nix finished it before the
/// builder died), else lost (the runner retries it). Returns the record
/// with a report when there is something to deliver.
pub async fn recovered(ctx: &JobContext, mut record: JobRecord, drv: &[u8]) -> Option<JobRecord> {
    if record.report.is_some() {
        return Some(record);
    }
    let dir = StoreDir::default();
    let parsed = Derivation::parse(&dir, drv).ok()?;
    let mut daemon = ctx.daemon.take().await.ok()?;
    let mut outputs = Vec::new();
    for (name, out) in &parsed.outputs {
        // An output known only after the build cannot be found again.
        let path = dir.display(out.path()?);
        let info = daemon.query_path_info(&path).await.ok()??;
        outputs.push((name.clone(), info));
    }
    tracing::info!(attempt = %record.attempt_id, "a job that was running when this builder stopped had finished: its outputs are valid");
    let stopped = std::fs::metadata(ctx.jobs.records.log_path(&record.attempt_id))
        .and_then(|m| m.modified())
        .ok()
        .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
        .map_or_else(records::now, |d| d.as_secs());
    let report = CompletionReport {
        outcome: Outcome::Succeeded as i32,
        start_time: record.started_at,
        stop_time: stopped.max(record.started_at),
        times_built: 1,
        outputs: built_outputs(&outputs),
        ..Default::default()
    };
    record.report = Some(StoredReport::of(&report));
    ctx.jobs.records.finished(&record).ok()?;
    Some(record)
}
