//! The builder tunnel: the gRPC service builders connect to.
//!
//! A builder keeps one control stream open (`Open`): it joins, pings and
//! reports progress; the runner sends jobs and aborts down it. When the
//! stream ends, the machine is gone and its attempts are aborted (and
//! retried elsewhere). Logs, NARs and reports have their own calls, and
//! each is checked against the attempt's owner before anything is used.

mod link;
pub mod progress;
mod transfer;

pub use link::{BuilderLink, Job, LinkError};

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use hydra_db::status::StepProgress;
use hydra_proto::v1::runner_service_server::RunnerService;
use hydra_proto::v1::*;
use tokio::sync::mpsc;
use tokio_stream::Stream;
use tokio_stream::wrappers::ReceiverStream;
use tonic::{Request, Response, Status, Streaming};

use crate::attempts::OwnershipError;
use crate::auth::bearer;
use crate::events::{Kind, NewEvent};
use crate::outcome::{self, ReportError};
use crate::state::Verification;
use crate::state::machines::Machine;
use crate::{Fatal, Shared};

/// What of a log chunk extends the runner's copy (`have` bytes): how many
/// of its bytes to skip (the builder sent them before a reconnect) and the
/// copy's length after it. A chunk without an offset is appended whole; one
/// past the end (which a builder should not send) is appended as if it
/// followed on.
fn log_extension(have: u64, offset: Option<u64>, len: usize) -> (usize, u64) {
    match offset {
        None => (0, have + len as u64),
        Some(at) if at >= have => (0, have + len as u64),
        Some(at) => {
            let skip = ((have - at) as usize).min(len);
            (skip, have + (len - skip) as u64)
        }
    }
}

/// Tells every connected builder the settings a reload changed.
pub fn push_settings(shared: &Shared, ping_interval_secs: u32) {
    for link in shared.state.links() {
        let _ = link.push_settings(ping_interval_secs);
    }
}

/// Held attempts a join may declare.
const MAX_HELD: usize = 4096;

/// The builder service ([`RunnerService`]), served by [`crate::server`].
pub struct BuilderTunnel {
    shared: Arc<Shared>,
}

impl BuilderTunnel {
    pub fn new(shared: Arc<Shared>) -> BuilderTunnel {
        BuilderTunnel { shared }
    }
}

type BoxStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send>>;

#[tonic::async_trait]
impl RunnerService for BuilderTunnel {
    type OpenStream = BoxStream<RunnerMessage>;
    type FetchInputsStream = BoxStream<NarChunk>;

    async fn open(
        &self,
        request: Request<Streaming<BuilderMessage>>,
    ) -> Result<Response<Self::OpenStream>, Status> {
        let token = bearer(&request).map(str::to_owned);
        let mut inbound = request.into_inner();
        let join = match hydra_proto::accept_join(&mut inbound).await {
            Ok(join) => join,
            Err(status) => {
                tracing::warn!("refused a builder: {}", status.message());
                return Err(status);
            }
        };
        let admitted = self
            .shared
            .tokens
            .read()
            .check_machine(token.as_deref(), &join.machine_name);
        if let Err(status) = admitted {
            tracing::warn!(machine = %join.machine_name, "refused a builder: {}", status.message());
            return Err(status);
        }
        let (tx, rx) = mpsc::channel(link::BUFFER);
        if let Err(reason) = self.check_join(&join) {
            let name = crate::outside::display_text(&join.machine_name, crate::outside::NAME_MAX);
            tracing::warn!(machine = %name, "refused a builder: {reason}");
            return Ok(refusal(tx, rx, reason, false).await);
        }
        let connection = uuid::Uuid::new_v4().to_string();
        let welcome = RunnerMessage {
            msg: Some(runner_message::Msg::Welcome(Welcome {
                protocol_version: hydra_proto::PROTOCOL_VERSION,
                machine_id: connection.clone(),
                ping_interval_secs: self.shared.config().ping_interval_secs,
            })),
        };
        let (link, hang_up) = BuilderLink::new(tx.clone());
        let own_link = link.clone();
        let machine = Machine {
            name: join.machine_name.clone(),
            connection: connection.clone(),
            instance_id: join.instance_id.clone(),
            systems: join.systems.clone(),
            supported_features: join.supported_features.clone(),
            mandatory_features: join.mandatory_features.clone(),
            max_jobs: self.max_jobs(&join),
            speed_factor: if join.speed_factor > 0.0 {
                join.speed_factor
            } else {
                1.0
            },
            running: Default::default(),
            uploading: Default::default(),
            load1: 0.0,
            free_disk: None,
            substituter_timeouts: 0,
            link,
            follows_local_jobs: join.follows_local_jobs,
        };
        // The welcome is queued before any job can be (the channel is
        // fresh, so this cannot fail).
        let held: Vec<String> = join.held.iter().map(|h| h.attempt_id.clone()).collect();
        let joined = self
            .shared
            .state
            .machine_joined(machine, &held, || drop(tx.try_send(Ok(welcome))));
        let joined = match joined {
            Ok(joined) => joined,
            Err(taken) => {
                tracing::warn!(machine = %taken.0, "refused a builder: {taken}");
                return Ok(refusal(tx, rx, taken.to_string(), true).await);
            }
        };
        tracing::info!(
            machine = %join.machine_name, systems = ?join.systems, max_jobs = join.max_jobs,
            "builder joined, declaring {} held attempts: {} re-adopted, {} to drop, {} lost",
            held.len(), joined.adopted.len(), joined.unknown.len(),
            joined.lost.len() + joined.lost_inherited.len()
        );
        send_adoptions(&joined.adopted);
        for id in &joined.unknown {
            let _ = own_link.abort(
                id,
                "the runner holds no such attempt: it finished, or was aborted or cancelled while the builder was away",
            );
        }
        let shared = self.shared.clone();
        tokio::spawn(async move {
            let reason = format!(
                "machine {} came back without the attempt (the builder restarted)",
                join.machine_name
            );
            for attempt in joined.lost {
                if let Err(e) = outcome::abort_attempt(&shared, attempt, &reason).await {
                    shared.die(e);
                    return;
                }
            }
            for open in &joined.lost_inherited {
                if let Err(e) = outcome::abandon_inherited(&shared, open, &reason).await {
                    shared.die(e);
                    return;
                }
            }
            let end = tokio::select! {
                end = control_loop(&shared, &join.machine_name, &connection, &mut inbound) => end,
                _ = hang_up.notified() => "the builder stopped reading its control stream".to_owned(),
                end = token_revoked(&shared, token.as_deref(), &join.machine_name) => end,
            };
            machine_gone(&shared, &join.machine_name, &connection, &end).await;
        });
        Ok(Response::new(Box::pin(ReceiverStream::new(rx))))
    }

    async fn stream_log(
        &self,
        request: Request<Streaming<LogChunk>>,
    ) -> Result<Response<LogAck>, Status> {
        let mut chunks = request.into_inner();
        let mut received = 0u64;
        let mut length = 0u64;
        while let Some(chunk) = chunks.message().await? {
            let limit = self.shared.config().max_log_size.saturating_mul(2);
            let owned =
                self.shared
                    .state
                    .with_attempt(&chunk.attempt_id, &chunk.machine_id, |attempt| {
                        let (skip, end) =
                            log_extension(attempt.log_bytes, chunk.offset, chunk.data.len());
                        // The builder enforces the log limit; this only
                        // bounds the damage of one that does not.
                        if end > limit || skip == chunk.data.len() {
                            return (None, attempt.log_bytes);
                        }
                        attempt.log_bytes = end;
                        (Some((attempt.drv_path.clone(), skip)), end)
                    });
            let (drv, skip) = match owned {
                Ok((Some(write), end)) => {
                    length = end;
                    write
                }
                Ok((None, end)) => {
                    length = end;
                    continue;
                }
                Err(e) => {
                    let (conn, id) = (&chunk.machine_id, &chunk.attempt_id);
                    return Err(refused(&self.shared, conn, id, "log", e.into()).await);
                }
            };
            received += (chunk.data.len() - skip) as u64;
            let mut data = chunk.data;
            data.drain(..skip);
            if let Err(e) = self.shared.logs.append(&drv, data.into()).await {
                self.shared.die(e.into());
                return Err(Status::unavailable("the runner cannot write logs"));
            }
        }
        Ok(Response::new(LogAck {
            bytes_received: received,
            log_length: length,
        }))
    }

    async fn fetch_inputs(
        &self,
        request: Request<FetchInputsRequest>,
    ) -> Result<Response<Self::FetchInputsStream>, Status> {
        let req = request.into_inner();
        let (conn, id) = (&req.machine_id, &req.attempt_id);
        let owned = self
            .shared
            .state
            .with_attempt(id, conn, |a| (a.inputs.clone(), a.drv_path.clone()));
        let (inputs, drv_path) = match owned {
            Ok(o) => o,
            Err(e) => return Err(refused(&self.shared, conn, id, "inputs", e.into()).await),
        };
        let inputs = match inputs {
            Some(i) => i,
            None => std::sync::Arc::new(transfer::job_closure(&self.shared, &drv_path).await?),
        };
        if let Some(outside) = req.paths.iter().find(|p| !inputs.contains(*p)) {
            let status = Status::permission_denied(format!(
                "{} is not in the input closure of this job",
                crate::outside::display_text(outside, crate::outside::DISPLAY_MAX)
            ));
            return Err(refused(&self.shared, conn, id, "inputs", status).await);
        }
        let stream = transfer::serve_inputs(self.shared.clone(), req.paths).await?;
        Ok(Response::new(stream))
    }

    async fn upload_output(
        &self,
        request: Request<Streaming<NarChunk>>,
    ) -> Result<Response<UploadReceipt>, Status> {
        let path = transfer::receive_output(&self.shared, request.into_inner()).await?;
        Ok(Response::new(UploadReceipt { store_path: path }))
    }

    async fn complete(
        &self,
        request: Request<CompletionReport>,
    ) -> Result<Response<CompletionAck>, Status> {
        let report = request.into_inner();
        let connection = report.machine_id.clone();
        let attempt_id = report.attempt_id.clone();
        // A result, success or failure, is recorded only after the inputs
        // its build ran ahead of are.
        held_for_inputs(&self.shared, &attempt_id, &connection).await?;
        match outcome::on_report(&self.shared, &connection, report).await {
            Ok(()) => Ok(Response::new(CompletionAck {})),
            Err(ReportError::Ownership(OwnershipError::Unknown(id)))
                if self.already_recorded(&id).await =>
            {
                tracing::info!(attempt = %id, "a report sent again for an attempt recorded already: acknowledged");
                Ok(Response::new(CompletionAck {}))
            }
            Err(ReportError::Ownership(e)) => {
                Err(refused(&self.shared, &connection, &attempt_id, "report", e.into()).await)
            }
            Err(ReportError::Malformed(e)) => {
                let status = Status::invalid_argument(format!(
                    "malformed report, the attempt was aborted: {e}"
                ));
                Err(refused(&self.shared, &connection, &attempt_id, "report", status).await)
            }
            Err(ReportError::Fatal(e)) => {
                self.shared.die(e);
                Err(Status::unavailable("the runner is stopping"))
            }
        }
    }
}

impl BuilderTunnel {
    /// Whether attempt `id` ended with a report recorded (not aborted or
    /// cancelled by the runner): a builder that did not hear the answer to
    /// its report sends it again, and is told it arrived. A database error
    /// counts as no (the report is refused; the builder tries again).
    async fn already_recorded(&self, id: &uuid::Uuid) -> bool {
        let aborted = hydra_db::status::BuildStatus::Aborted.code();
        let cancelled = hydra_db::status::BuildStatus::Cancelled.code();
        matches!(
            crate::attempts::recorded_outcome(&self.shared.pool, id).await,
            Ok(Some(outcome)) if outcome != aborted && outcome != cancelled
        )
    }

    /// A join's fields, checked at the boundary: they become machine
    /// names in BuildSteps and keys the dispatcher matches on.
    /// The jobs the machine is given: what it declares, at least one and at
    /// most `max_jobs_per_machine`.
    fn max_jobs(&self, join: &Join) -> u32 {
        let limit = self.shared.config().max_jobs_per_machine.max(1);
        if join.max_jobs > limit {
            tracing::warn!(
                machine = %join.machine_name,
                "the builder declares max_jobs = {}; it is given at most max_jobs_per_machine = {limit}",
                join.max_jobs
            );
        }
        join.max_jobs.clamp(1, limit)
    }

    fn check_join(&self, join: &Join) -> Result<(), String> {
        let ours = self.shared.store.dir().as_str();
        if join.store_dir != ours {
            return Err(format!(
                "store directory mismatch: the builder's store is {}, the runner's is {ours}; paths are not rewritten",
                crate::outside::display_text(&join.store_dir, crate::outside::NAME_MAX)
            ));
        }
        let checked = || -> Result<(), crate::outside::OutsideError> {
            crate::outside::name(&join.machine_name, "the machine name")?;
            crate::outside::names(&join.systems, "a system")?;
            crate::outside::names(&join.supported_features, "a supported feature")?;
            crate::outside::names(&join.mandatory_features, "a mandatory feature")?;
            Ok(())
        };
        checked().map_err(|e| e.to_string())?;
        if join.systems.is_empty() {
            return Err("the builder offers no systems".into());
        }
        if join.held.len() > MAX_HELD {
            return Err(format!(
                "the builder declares {} held attempts, more than the {MAX_HELD} any builder may hold",
                join.held.len()
            ));
        }
        if let Some(bad) = join
            .held
            .iter()
            .find(|h| uuid::Uuid::parse_str(&h.attempt_id).is_err())
        {
            return Err(format!(
                "a held attempt's id {:?} is not an attempt id",
                crate::outside::display_text(&bad.attempt_id, crate::outside::NAME_MAX)
            ));
        }
        if !join.speed_factor.is_finite() || join.speed_factor < 0.0 {
            return Err(format!(
                "the speed factor {} is not a positive number",
                join.speed_factor
            ));
        }
        Ok(())
    }
}

/// Reads pings and progress until the stream ends, or until the builder
/// is silent for `ping_timeout_secs` (a stopped or cut-off machine whose
/// TCP connection stays open); returns why it ended.
/// Ends when a reload leaves `token` no longer admitting `machine` (its
/// file was removed or changed): the connection is closed, and the builder
/// is refused when it comes back with it.
async fn token_revoked(shared: &Shared, token: Option<&str>, machine: &str) -> String {
    let mut reloaded = shared.tokens_reloaded.subscribe();
    loop {
        if reloaded.changed().await.is_err() {
            return std::future::pending().await;
        }
        if let Err(status) = shared.tokens.read().check_machine(token, machine) {
            return format!("its token was revoked by a reload ({})", status.message());
        }
    }
}

async fn control_loop(
    shared: &Shared,
    name: &str,
    connection: &str,
    inbound: &mut Streaming<BuilderMessage>,
) -> String {
    let silence = Duration::from_secs(shared.config().ping_timeout_secs.into());
    loop {
        let msg = match tokio::time::timeout(silence, inbound.message()).await {
            Err(_) => return format!("no ping for {} s", silence.as_secs()),
            Ok(Ok(Some(m))) => m,
            Ok(Ok(None)) => return "the builder closed its control stream".into(),
            Ok(Err(status)) => {
                return format!("the control stream failed: {}", status.message());
            }
        };
        match msg.msg {
            Some(builder_message::Msg::Ping(p)) => {
                // A free disk of 0 means the builder could not tell.
                let disk = (p.free_disk_bytes > 0).then_some(p.free_disk_bytes);
                shared
                    .state
                    .machine_pinged(name, p.load1, disk, p.substituter_timeouts);
            }
            Some(builder_message::Msg::Progress(p)) => {
                if p.phase() == Phase::ReceivingOutputs && shared.config().run_ahead {
                    // Built, outputs on their way: dependents may start
                    // on this machine, which has them.
                    shared.state.attempt_built(&p.attempt_id, connection);
                }
                let row = shared
                    .state
                    .with_attempt(&p.attempt_id, connection, |a| {
                        if !a.progressed(busy_code(p.phase())) {
                            return None;
                        }
                        let event = NewEvent::new(Kind::StepProgress, a.builds.clone())
                            .drv(shared.store.dir().display(&a.drv_path))
                            .machine(a.machine.as_str())
                            .detail(phase_name(p.phase()));
                        Some((a.build, a.stepnr, event))
                    })
                    .ok()
                    .flatten();
                if let Some((build, stepnr, event)) = row {
                    let update = crate::record::ProgressUpdate {
                        build,
                        stepnr,
                        busy: busy_code(p.phase()),
                        event,
                        received: std::time::Instant::now(),
                    };
                    shared.progress.report(update).await;
                }
            }
            Some(builder_message::Msg::Join(_)) | None => {
                return "the builder sent a second Join or an empty message".into();
            }
        }
    }
}

/// Waits until the inputs attempt `id` ran ahead of are verified; refuses
/// (and withdraws the attempt) when one of them was aborted instead.
pub(crate) async fn held_for_inputs(
    shared: &Shared,
    id: &str,
    connection: &str,
) -> Result<(), Status> {
    match shared.state.inputs_verified(id, connection).await {
        Verification::Verified | Verification::NotRunning => Ok(()),
        Verification::Withdrawn => {
            if let Err(fatal) = outcome::withdraw_reported(shared, id, connection).await {
                shared.die(fatal);
                return Err(Status::unavailable("the runner is stopping"));
            }
            Err(Status::failed_precondition(
                "withdrawn: an input this build ran ahead of was aborted; the step is built again",
            ))
        }
    }
}

/// Answers a join with a refusal and ends the stream.
async fn refusal(
    tx: mpsc::Sender<Result<RunnerMessage, Status>>,
    rx: mpsc::Receiver<Result<RunnerMessage, Status>>,
    reason: String,
    retryable: bool,
) -> Response<BoxStream<RunnerMessage>> {
    let refused = RunnerMessage {
        msg: Some(runner_message::Msg::Refused(Refused { reason, retryable })),
    };
    let _ = tx.send(Ok(refused)).await;
    drop(tx);
    Response::new(Box::pin(ReceiverStream::new(rx)))
}

/// The phase as events name it.
fn phase_name(phase: Phase) -> &'static str {
    match phase {
        Phase::Unspecified | Phase::Preparing => "preparing",
        Phase::SendingInputs => "sending-inputs",
        Phase::Building => "building",
        Phase::WaitingForLocalSlot => "waiting-for-local-slot",
        Phase::ReceivingOutputs => "receiving-outputs",
        Phase::PostProcessing => "post-processing",
    }
}

fn busy_code(phase: Phase) -> i32 {
    match phase {
        Phase::Unspecified | Phase::Preparing => StepProgress::Preparing,
        Phase::SendingInputs => StepProgress::SendingInputs,
        Phase::Building => StepProgress::Building,
        Phase::WaitingForLocalSlot => StepProgress::WaitingForLocalSlot,
        Phase::ReceivingOutputs => StepProgress::ReceivingOutputs,
        Phase::PostProcessing => StepProgress::PostProcessing,
    }
    .code()
}

/// Records something refused from a builder (`hqr_rejections`, and the
/// log), and gives back the status to answer it with. Nothing of it was
/// applied.
pub(crate) async fn refused(
    shared: &Shared,
    connection: &str,
    attempt_id: &str,
    what: &str,
    status: Status,
) -> Status {
    use crate::outside::{NAME_MAX, display_text};
    let machine = shared.state.machine_of_connection(connection);
    // Every field here is the builder's (an attempt id may be anything).
    let connection = display_text(connection, NAME_MAX);
    let attempt_id = display_text(attempt_id, NAME_MAX);
    let reason = display_text(status.message(), crate::outside::DISPLAY_MAX * 4);
    tracing::warn!(
        connection,
        machine,
        attempt = attempt_id,
        "refused a {what}: {reason}",
    );
    let recorded = crate::record::rejection(
        &shared.pool,
        &connection,
        machine.as_deref(),
        &attempt_id,
        what,
        &reason,
    )
    .await
    .map_err(Fatal::from);
    match recorded {
        Ok(()) => {}
        Err(e) if e.refused_data().is_some() => {
            tracing::warn!("the refusal could not be recorded: {e}");
        }
        Err(e) => {
            shared.die(e);
            return Status::unavailable("the runner is stopping");
        }
    }
    status
}

/// A machine's connection ended: its attempts wait `reconnect_grace_secs`
/// for it to come back (the dispatcher aborts them after).
async fn machine_gone(shared: &Shared, name: &str, connection: &str, why: &str) {
    let grace = Duration::from_secs(shared.config().reconnect_grace_secs);
    tracing::warn!(
        machine = name,
        "builder left: {why}; its attempts wait {} s for it to come back",
        grace.as_secs()
    );
    shared
        .state
        .machine_left(name, connection, why, std::time::Instant::now(), grace);
}

/// Tells builders to carry on with attempts re-adopted.
pub fn send_adoptions(adoptions: &[crate::state::Adoption]) {
    for a in adoptions {
        tracing::info!(attempt = %a.attempt, "re-adopted attempt (the runner has {} bytes of its log)", a.log_offset);
        let _ = a.link.adopt(&a.attempt.to_string(), a.log_offset);
    }
}
