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
use tonic::metadata::{Ascii, MetadataValue};
use tonic::service::interceptor::InterceptedService;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

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
    #[error("cannot read {path}: {source}")]
    File {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("the builder token is not usable in a header: {0}")]
    BadToken(String),
    #[error("TLS settings for {url}: {source}")]
    Tls {
        url: String,
        source: tonic::transport::Error,
    },
}

/// The client of the runner's service, every call carrying the token.
pub type Client = RunnerServiceClient<InterceptedService<Channel, Auth>>;

/// Adds `authorization: Bearer <token>` to every call, when there is a token.
#[derive(Clone)]
pub struct Auth(Option<MetadataValue<Ascii>>);

impl tonic::service::Interceptor for Auth {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(v) = &self.0 {
            req.metadata_mut().insert("authorization", v.clone());
        }
        Ok(req)
    }
}

impl Auth {
    /// The token from `HYDRA_BUILDER_TOKEN`, else from `token_file`.
    fn from_config(config: &BuilderConfig) -> Result<Auth, BuilderError> {
        let token = match std::env::var("HYDRA_BUILDER_TOKEN") {
            Ok(t) => Some(t),
            Err(_) => match &config.token_file {
                Some(path) => Some(read(path).map(|b| String::from_utf8_lossy(&b).into_owned())?),
                None => None,
            },
        };
        let value = token
            .map(|t| {
                format!("Bearer {}", t.trim())
                    .parse()
                    .map_err(|_| BuilderError::BadToken("not ASCII".into()))
            })
            .transpose()?;
        Ok(Auth(value))
    }
}

fn read(path: &std::path::Path) -> Result<Vec<u8>, BuilderError> {
    std::fs::read(path).map_err(|source| BuilderError::File {
        path: path.to_owned(),
        source,
    })
}

/// One endpoint per runner URL, with TLS when the URL is https. Bad URLs
/// and unreadable TLS files end the builder at once.
fn endpoints(config: &BuilderConfig) -> Result<Vec<Endpoint>, BuilderError> {
    let mut tls = ClientTlsConfig::new();
    if let Some(ca) = &config.tls_ca {
        tls = tls.ca_certificate(Certificate::from_pem(read(ca)?));
    }
    if let (Some(cert), Some(key)) = (&config.tls_cert, &config.tls_key) {
        tls = tls.identity(Identity::from_pem(read(cert)?, read(key)?));
    }
    config
        .urls()
        .into_iter()
        .map(|url| {
            let mut endpoint = Endpoint::from_shared(url.clone())
                .map_err(|source| BuilderError::BadUrl {
                    url: url.clone(),
                    source,
                })?
                .connect_timeout(Duration::from_secs(10))
                .http2_keep_alive_interval(Duration::from_secs(10))
                .keep_alive_timeout(Duration::from_secs(20));
            if url.starts_with("https://") {
                endpoint = endpoint
                    .tls_config(tls.clone())
                    .map_err(|source| BuilderError::Tls { url, source })?;
            }
            Ok(endpoint)
        })
        .collect()
}

/// An error with its causes, for a log line that says what went wrong
/// (a TLS handshake failure sits several sources deep).
fn chain(e: &dyn std::error::Error) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// Why one session with the runner ended.
#[derive(Debug, Error)]
enum SessionEnd {
    #[error(transparent)]
    Fatal(#[from] BuilderError),
    #[error("{0}")]
    Lost(String),
}

/// Runs the builder until a fatal error. With several runner URLs, a lost
/// or refused connection moves on to the next (a standby that became
/// active).
pub async fn run(config: BuilderConfig) -> Result<(), BuilderError> {
    let endpoints = endpoints(&config)?;
    let auth = Auth::from_config(&config)?;
    let substituters =
        crate::substitute::Substituters::from_config(&config).map(std::sync::Arc::new);
    let urls = config.urls();
    // One per process: a reconnect of this builder is told from another
    // builder that uses the same machine name.
    let instance_id = uuid::Uuid::new_v4().to_string();
    let mut failures = 0u32;
    let mut next = 0usize;
    loop {
        let i = next % endpoints.len();
        let target = Target {
            url: &urls[i],
            endpoint: &endpoints[i],
            auth: &auth,
            substituters: substituters.clone(),
        };
        match session(&config, &instance_id, target, &mut failures).await {
            Err(SessionEnd::Fatal(e)) => return Err(e),
            Err(SessionEnd::Lost(why)) | Ok(why) => {
                failures += 1;
                next += 1;
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
/// Where one session goes, and what it takes along.
struct Target<'a> {
    url: &'a str,
    endpoint: &'a Endpoint,
    auth: &'a Auth,
    substituters: Option<std::sync::Arc<crate::substitute::Substituters>>,
}

async fn session(
    config: &BuilderConfig,
    instance_id: &str,
    target: Target<'_>,
    failures: &mut u32,
) -> Result<String, SessionEnd> {
    let Target {
        url,
        endpoint,
        auth,
        substituters,
    } = target;
    let channel = endpoint
        .connect()
        .await
        .map_err(|e| SessionEnd::Lost(format!("cannot connect to {url}: {}", chain(&e))))?;
    let mut client = RunnerServiceClient::with_interceptor(channel.clone(), auth.clone())
        .max_decoding_message_size(64 << 20);
    let (tx, rx) = mpsc::channel(256);
    tx.send(join_message(config, instance_id))
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
    tracing::info!(runner = %url, "joined as {} ({})", config.machine_name, welcome.machine_id);
    let ctx = JobContext {
        client: RunnerServiceClient::with_interceptor(channel, auth.clone())
            .max_decoding_message_size(64 << 20),
        machine_id: welcome.machine_id.clone(),
        daemon_socket: config.nix_daemon_socket.clone(),
        daemon: hydra_nix::daemon::Spares::new(&config.nix_daemon_socket, 2),
        control: tx.clone(),
        substituters: substituters.clone(),
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
                    Some(runner_message::Msg::Settings(settings)) => {
                        let every = Duration::from_secs(settings.ping_interval_secs.max(1).into());
                        tracing::info!("the runner asks for a ping every {every:?}");
                        pings = tokio::time::interval(every);
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
                let timeouts = substituters
                    .as_ref()
                    .map_or(0, |s| s.timeouts.load(std::sync::atomic::Ordering::Relaxed));
                let _ = tx.send(ping(config, running.len(), timeouts)).await;
            }
        }
    }
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

fn join_message(config: &BuilderConfig, instance_id: &str) -> BuilderMessage {
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

/// Sends a control message, ignoring a stream that already ended.
pub(crate) async fn send(control: &ControlTx, msg: BuilderMessage) {
    let _ = control.send(msg).await;
}
