//! The control stream: join (declaring the jobs held), ping, receive
//! jobs, adoptions and aborts; reconnect with jittered backoff when the
//! runner goes away. Jobs keep running meanwhile ([`crate::jobs`]).

use std::sync::Arc;
use std::time::Duration;

use hydra_proto::v1::runner_service_client::RunnerServiceClient;
use hydra_proto::v1::*;
use rand::Rng;
use thiserror::Error;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Endpoint;

use crate::BuilderError;
use crate::client::{self, Auth, chain};
use crate::config::BuilderConfig;
use crate::job::{self, JobContext};
use crate::jobs::{Jobs, Owner, Session};
use crate::records::{self, Records};

/// Why one session with the runner ended.
#[derive(Debug, Error)]
enum SessionEnd {
    #[error(transparent)]
    Fatal(#[from] BuilderError),
    #[error("{0}")]
    Lost(String),
    /// The runner said it is stopping on purpose (and will be back).
    #[error("{0}")]
    Leaving(String),
}

/// Runs the builder until a fatal error. With several runner URLs, a lost
/// or refused connection moves on to the next (a standby that became
/// active). Jobs outlive connections ([`Jobs`]): kept ones from an earlier
/// process are picked up first.
pub async fn run(config: BuilderConfig) -> Result<(), BuilderError> {
    let endpoints = client::endpoints(&config)?;
    let auth = Auth::from_config(&config)?;
    let substituters = crate::substitute::Substituters::from_config(&config).map(Arc::new);
    let records = Records::open(&config.state_dir)?;
    let jobs = Arc::new(Jobs::new(
        records,
        Duration::from_secs(config.orphan_grace_secs),
    ));
    let ctx = Arc::new(JobContext {
        daemon_socket: config.nix_daemon_socket.clone(),
        // A job holds one connection from start to delivery, then gives it
        // back for the next.
        daemon: hydra_nix::daemon::Spares::new(
            &config.nix_daemon_socket,
            (config.max_jobs as usize + 1).max(2),
        ),
        substituters,
        jobs,
        keep_build_logs: config.keep_build_logs,
    });
    recover(&ctx).await;
    let urls = config.urls();
    // One per process: a reconnect of this builder is told from another
    // builder that uses the same machine name.
    let instance_id = uuid::Uuid::new_v4().to_string();
    let mut failures = 0u32;
    let mut next = 0usize;
    let mut generation = 0u64;
    loop {
        let i = next % endpoints.len();
        let target = Target {
            url: &urls[i],
            endpoint: &endpoints[i],
            auth: &auth,
        };
        generation += 1;
        let ended = session(
            &config,
            &instance_id,
            target,
            &mut failures,
            &ctx,
            generation,
        )
        .await;
        ctx.jobs.session_ended(generation);
        let held = ctx.jobs.len();
        match ended {
            Err(SessionEnd::Fatal(e)) => return Err(e),
            Err(SessionEnd::Lost(why)) | Ok(why) => {
                failures += 1;
                next += 1;
                let wait = backoff(&config, failures);
                tracing::warn!(
                    "lost the runner ({why}); reconnecting in {wait:.1?}, holding {held} jobs"
                );
                tokio::time::sleep(wait).await;
            }
            Err(SessionEnd::Leaving(why)) => {
                // Back soon, or a standby takes over: no backoff to build up.
                failures = 0;
                next += 1;
                let wait = backoff(&config, 1);
                tracing::info!(
                    "the runner is stopping ({why}); holding {held} jobs, reconnecting in {wait:.1?}"
                );
                tokio::time::sleep(wait).await;
            }
        }
    }
}

/// Jobs kept on disk by an earlier process of this builder: finished ones
/// (and running ones whose outputs Nix finished) are delivered to the
/// next runner that adopts them; the others were lost with the process.
async fn recover(ctx: &Arc<JobContext>) {
    for (record, drv) in ctx.jobs.records.all() {
        let id = record.attempt_id.clone();
        match job::recovered(ctx, record, &drv).await {
            Some(kept) => {
                tracing::info!(attempt = %id, drv = %kept.drv_path, "holding a finished job from before this builder restarted");
                let (c, drv_path) = (ctx.clone(), kept.drv_path.clone());
                ctx.jobs.start(&id, &drv_path, true, None, move |tie| {
                    job::resume(c, kept, tie)
                });
            }
            None => {
                tracing::info!(attempt = %id, "a job was running when this builder stopped and did not finish: dropped (the runner retries it)");
                ctx.jobs.records.forget(&id);
            }
        }
    }
}

fn backoff(config: &BuilderConfig, failures: u32) -> Duration {
    let max = config.reconnect_max_secs.max(config.reconnect_min_secs);
    let base = (config.reconnect_min_secs * 2f64.powi(failures.min(16) as i32 - 1)).min(max);
    Duration::from_secs_f64(rand::rng().random_range(base / 2.0..=base.max(0.001)))
}

/// Where one session goes.
struct Target<'a> {
    url: &'a str,
    endpoint: &'a Endpoint,
    auth: &'a Auth,
}

/// One connection: join (declaring the jobs held), then serve jobs until
/// the stream ends.
async fn session(
    config: &BuilderConfig,
    instance_id: &str,
    target: Target<'_>,
    failures: &mut u32,
    ctx: &Arc<JobContext>,
    generation: u64,
) -> Result<String, SessionEnd> {
    let Target {
        url,
        endpoint,
        auth,
    } = target;
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| SessionEnd::Lost(format!("cannot connect to {url}: {}", chain(&e))))?;
    let mut client = RunnerServiceClient::with_interceptor(channel.clone(), auth.clone())
        .max_decoding_message_size(64 << 20);
    let (tx, rx) = mpsc::channel(256);
    let held = ctx.jobs.declared();
    let declared = held.len();
    tx.send(join_message(config, instance_id, held))
        .await
        .expect("fresh channel");
    let mut inbound = client
        .open(ReceiverStream::new(rx))
        .await
        .map_err(|s| before_welcome(url, &s))?
        .into_inner();
    let first = inbound
        .message()
        .await
        .map_err(|s| before_welcome(url, &s))?
        .ok_or_else(|| SessionEnd::Lost("the runner closed the stream before welcoming".into()))?;
    let welcome = match hydra_proto::check_welcome(first) {
        Ok(w) => w,
        Err(hydra_proto::HandshakeError::RefusedForNow(why)) => {
            tracing::error!(runner = %url, "refused for now: {why}");
            return Err(SessionEnd::Lost(format!("refused for now: {why}")));
        }
        Err(e) => return Err(BuilderError::from(e).into()),
    };
    *failures = 0;
    tracing::info!(runner = %url, "joined as {} ({}), declaring {declared} held jobs", config.machine_name, welcome.machine_id);
    let session = Arc::new(Session {
        generation,
        client: RunnerServiceClient::with_interceptor(channel, auth.clone())
            .max_decoding_message_size(64 << 20),
        machine_id: welcome.machine_id.clone(),
        control: tx.clone(),
    });
    let ping_every = Duration::from_secs(welcome.ping_interval_secs.max(1) as u64);
    let mut pings = tokio::time::interval(ping_every);
    loop {
        tokio::select! {
            msg = inbound.message() => {
                let msg = match msg {
                    Ok(Some(m)) => m,
                    Ok(None) => return Ok("the runner closed the control stream".into()),
                    Err(s) => return Ok(format!("control stream failed: {}", s.message())),
                };
                match msg.msg {
                    Some(runner_message::Msg::Build(job)) => received(ctx, &session, job),
                    Some(runner_message::Msg::Adopted(a)) => adopted(ctx, &session, a),
                    Some(runner_message::Msg::Abort(a)) => {
                        if ctx.jobs.abort(&a.attempt_id, &a.reason) {
                            tracing::info!(attempt = %a.attempt_id, "dropping the job: {}", a.reason);
                        }
                    }
                    Some(runner_message::Msg::Leaving(l)) => {
                        return Err(SessionEnd::Leaving(l.reason));
                    }
                    Some(runner_message::Msg::Settings(settings)) => {
                        let every = Duration::from_secs(settings.ping_interval_secs.max(1).into());
                        tracing::info!("the runner asks for a ping every {every:?}");
                        pings = tokio::time::interval(every);
                    }
                    _ => tracing::warn!("unexpected message on the control stream"),
                }
            }
            _ = pings.tick() => {
                let timeouts = ctx.substituters
                    .as_ref()
                    .map_or(0, |s| s.timeouts.load(std::sync::atomic::Ordering::Relaxed));
                let _ = tx.send(ping(config, ctx.jobs.len(), timeouts)).await;
            }
        }
    }
}

/// A new job from the runner: it runs, held by this connection.
fn received(ctx: &Arc<JobContext>, session: &Arc<Session>, job: BuildJob) {
    let id = job.attempt_id.clone();
    if !records::usable_id(&id) {
        tracing::warn!("a job with the attempt id {id:?}, which is not a UUID: ignored");
        return;
    }
    tracing::info!(attempt = %id, drv = %job.drv_path, "job received");
    let owner = Owner {
        session: session.clone(),
        log_offset: 0,
    };
    let (c, drv_path) = (ctx.clone(), job.drv_path.clone());
    if !ctx
        .jobs
        .start(&id, &drv_path, false, Some(owner), move |tie| {
            job::run(c, job, tie)
        })
    {
        tracing::warn!(attempt = %id, "a second job under an attempt id already held: ignored");
    }
}

/// The runner takes over a job this builder declared. One it does not
/// hold (any more) is reported as lost, so the runner retries it now.
fn adopted(ctx: &Arc<JobContext>, session: &Arc<Session>, a: Adopted) {
    let owner = Owner {
        session: session.clone(),
        log_offset: a.log_offset,
    };
    if ctx.jobs.adopted(&a.attempt_id, owner) {
        tracing::info!(attempt = %a.attempt_id, "the runner re-adopted the job (it has {} bytes of its log)", a.log_offset);
        return;
    }
    tracing::warn!(attempt = %a.attempt_id, "the runner re-adopted a job this builder does not hold: reporting it lost");
    let report = CompletionReport {
        machine_id: session.machine_id.clone(),
        attempt_id: a.attempt_id,
        outcome: Outcome::InfrastructureFailure as i32,
        error_msg: "the builder no longer holds this job (it was lost in a restart or dropped)"
            .into(),
        ..Default::default()
    };
    let mut client = session.client.clone();
    tokio::spawn(async move {
        let _ = client.complete(report).await;
    });
}

/// A failure before the runner welcomed us. Over TLS, a runner that
/// refuses our certificate closes the connection after the handshake,
/// which reaches us only as a broken call: say what it may be.
fn before_welcome(url: &str, s: &tonic::Status) -> SessionEnd {
    match lost_or_refused(s) {
        SessionEnd::Lost(why) if url.starts_with("https://") => SessionEnd::Lost(format!(
            "{why} (over TLS: if this persists, the runner may be refusing this builder's certificate; check tls_cert, tls_key and tls_ca)"
        )),
        other => other,
    }
}

fn lost_or_refused(s: &tonic::Status) -> SessionEnd {
    match s.code() {
        tonic::Code::FailedPrecondition
        | tonic::Code::InvalidArgument
        | tonic::Code::PermissionDenied
        | tonic::Code::Unauthenticated => SessionEnd::Fatal(BuilderError::Refused(
            hydra_proto::HandshakeError::Refused(s.message().to_owned()),
        )),
        _ => SessionEnd::Lost(format!("{}: {}", s.code(), chain(s))),
    }
}

fn join_message(
    config: &BuilderConfig,
    instance_id: &str,
    held: Vec<HeldAttempt>,
) -> BuilderMessage {
    BuilderMessage {
        msg: Some(builder_message::Msg::Join(Join {
            protocol_version: hydra_proto::PROTOCOL_VERSION,
            builder_version: env!("CARGO_PKG_VERSION").into(),
            machine_name: config.machine_name.clone(),
            systems: config.systems.clone(),
            supported_features: config.supported_features.clone(),
            mandatory_features: config.mandatory_features.clone(),
            max_jobs: config.max_jobs,
            speed_factor: config.speed_factor,
            store_dir: config.store_dir.clone(),
            instance_id: instance_id.to_owned(),
            held,
            follows_local_jobs: true,
        })),
    }
}

fn ping(config: &BuilderConfig, running: usize, substituter_timeouts: u64) -> BuilderMessage {
    let load1 = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|l| l.parse().ok()))
        .unwrap_or(0.0);
    BuilderMessage {
        msg: Some(builder_message::Msg::Ping(Ping {
            load1,
            free_disk_bytes: free_disk(&config.disk_path),
            running_jobs: running as u32,
            substituter_timeouts,
        })),
    }
}

/// Free bytes on the file system of `path`; 0 when unknown.
fn free_disk(path: &std::path::Path) -> u64 {
    use std::os::unix::ffi::OsStrExt;
    let Ok(c) = std::ffi::CString::new(path.as_os_str().as_bytes()) else {
        return 0;
    };
    // SAFETY: statvfs writes into the zeroed struct we pass.
    unsafe {
        let mut st: libc::statvfs = std::mem::zeroed();
        if libc::statvfs(c.as_ptr(), &mut st) != 0 {
            return 0;
        }
        st.f_bavail as u64 * st.f_frsize as u64
    }
}
