//! The control stream: join, ping, receive jobs and aborts; reconnect with
//! jittered backoff when the runner goes away (running builds are aborted
//! then: the runner has requeued them).

use std::collections::HashMap;
use std::time::Duration;

use hydra_proto::v1::runner_service_client::RunnerServiceClient;
use hydra_proto::v1::*;
use rand::Rng;
use thiserror::Error;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Endpoint;

use crate::config::BuilderConfig;
use crate::job::{self, JobContext};

/// Errors that end the builder: reconnecting would not help.
#[derive(Debug, Error)]
pub enum BuilderError {
    #[error("invalid runner URL '{url}': {source}")]
    BadUrl {
        url: String,
        source: tonic::transport::Error,
    },
    #[error(transparent)]
    Refused(#[from] hydra_proto::HandshakeError),
}

/// Why one session with the runner ended.
#[derive(Debug, Error)]
enum SessionEnd {
    #[error(transparent)]
    Fatal(#[from] BuilderError),
    #[error("{0}")]
    Lost(String),
}

/// Runs the builder until a fatal error.
pub async fn run(config: BuilderConfig) -> Result<(), BuilderError> {
    let endpoint = Endpoint::from_shared(config.runner_url.clone())
        .map_err(|source| BuilderError::BadUrl {
            url: config.runner_url.clone(),
            source,
        })?
        .connect_timeout(Duration::from_secs(10))
        .http2_keep_alive_interval(Duration::from_secs(10))
        .keep_alive_timeout(Duration::from_secs(20));
    let mut failures = 0u32;
    loop {
        match session(&config, &endpoint, &mut failures).await {
            Err(SessionEnd::Fatal(e)) => return Err(e),
            Err(SessionEnd::Lost(why)) | Ok(why) => {
                failures += 1;
                let wait = backoff(&config, failures);
                tracing::warn!("lost the runner ({why}); reconnecting in {wait:.1?}");
                tokio::time::sleep(wait).await;
            }
        }
    }
}

fn backoff(config: &BuilderConfig, failures: u32) -> Duration {
    let max = config.reconnect_max_secs.max(config.reconnect_min_secs);
    let base = (config.reconnect_min_secs * 2f64.powi(failures.min(16) as i32 - 1)).min(max);
    Duration::from_secs_f64(rand::rng().random_range(base / 2.0..=base.max(0.001)))
}

type ControlTx = mpsc::Sender<BuilderMessage>;

/// One connection: join, then serve jobs until the stream ends.
async fn session(
    config: &BuilderConfig,
    endpoint: &Endpoint,
    failures: &mut u32,
) -> Result<String, SessionEnd> {
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| SessionEnd::Lost(format!("cannot connect to {}: {e}", config.runner_url)))?;
    let mut client = RunnerServiceClient::new(channel.clone()).max_decoding_message_size(64 << 20);
    let (tx, rx) = mpsc::channel(256);
    tx.send(join_message(config)).await.expect("fresh channel");
    let mut inbound = client
        .open(ReceiverStream::new(rx))
        .await
        .map_err(|s| lost_or_refused(&s))?
        .into_inner();
    let first = inbound
        .message()
        .await
        .map_err(|s| lost_or_refused(&s))?
        .ok_or_else(|| SessionEnd::Lost("the runner closed the stream before welcoming".into()))?;
    let welcome = hydra_proto::check_welcome(first).map_err(BuilderError::from)?;
    *failures = 0;
    tracing::info!(runner = %config.runner_url, "joined as {} ({})", config.machine_name, welcome.machine_id);
    let ctx = JobContext {
        client: RunnerServiceClient::new(channel).max_decoding_message_size(64 << 20),
        machine_id: welcome.machine_id.clone(),
        daemon_socket: config.nix_daemon_socket.clone(),
        control: tx.clone(),
    };
    let ping_every = Duration::from_secs(welcome.ping_interval_secs.max(1) as u64);
    let mut pings = tokio::time::interval(ping_every);
    let mut jobs: JoinSet<String> = JoinSet::new();
    let mut running: HashMap<String, tokio::task::AbortHandle> = HashMap::new();
    loop {
        tokio::select! {
            msg = inbound.message() => {
                let msg = match msg {
                    Ok(Some(m)) => m,
                    Ok(None) => return Ok("the runner closed the control stream".into()),
                    Err(s) => return Ok(format!("control stream failed: {}", s.message())),
                };
                match msg.msg {
                    Some(runner_message::Msg::Build(job)) => {
                        let id = job.attempt_id.clone();
                        tracing::info!(attempt = %id, drv = %job.drv_path, "job received");
                        let handle = jobs.spawn(job::run(ctx.clone(), job));
                        running.insert(id, handle);
                    }
                    Some(runner_message::Msg::Abort(a)) => {
                        if let Some(h) = running.remove(&a.attempt_id) {
                            tracing::info!(attempt = %a.attempt_id, "aborting: {}", a.reason);
                            h.abort();
                        }
                    }
                    _ => tracing::warn!("unexpected message on the control stream"),
                }
            }
            Some(done) = jobs.join_next() => {
                if let Ok(id) = done {
                    running.remove(&id);
                }
            }
            _ = pings.tick() => {
                let _ = tx.send(ping(config, running.len())).await;
            }
        }
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
        _ => SessionEnd::Lost(format!("{}: {}", s.code(), s.message())),
    }
}

fn join_message(config: &BuilderConfig) -> BuilderMessage {
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
        })),
    }
}

fn ping(config: &BuilderConfig, running: usize) -> BuilderMessage {
    let load1 = std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|l| l.parse().ok()))
        .unwrap_or(0.0);
    BuilderMessage {
        msg: Some(builder_message::Msg::Ping(Ping {
            load1,
            free_disk_bytes: free_disk(&config.disk_path),
            running_jobs: running as u32,
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

/// Sends a control message, ignoring a stream that already ended.
pub(crate) async fn send(control: &ControlTx, msg: BuilderMessage) {
    let _ = control.send(msg).await;
}
