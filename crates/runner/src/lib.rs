//! The queue runner. Data flows through the modules in this order:
//!
//! - [`queue_monitor`]: PostgreSQL -> the step graph (loads queued builds);
//! - [`graph`]: the DAG of builds and steps, with the step life cycle;
//! - [`resolver`]: steps that depend on floating CA outputs, once those
//!   are built -> resolved derivations (or done, by early cutoff);
//! - [`dispatch`]: runnable steps -> machines, in priority order;
//! - [`tunnel`]: the gRPC service builders connect to (jobs, logs, NARs, reports);
//! - [`completion`]: a builder's report -> PostgreSQL, then the graph;
//! - [`record`]: every write to Hydra's tables, with Hydra's rules;
//! - [`uploads`]: outputs published to destination stores, from a queue;
//! - [`realisations`]: CA outputs learnt from builds, in PostgreSQL and the store;
//! - [`status`]: the status document operators read (Hydra's `SystemStatus`).
//!
//! [`Runner::start`] runs them all; `hydra-queue-runner serve` wraps it.

/// Evaluates `$attempt` (a `Result<T, Fatal>`) again while it fails with
/// a serialization failure or deadlock, up to five times: PostgreSQL asks
/// for exactly that, and only then is a database error fatal.
macro_rules! retrying_transient {
    ($attempt:expr) => {{
        let mut tries = 0u32;
        loop {
            tries += 1;
            match $attempt {
                Err($crate::Fatal::Database(e)) if tries < 5 && hydra_db::is_transient(&e) => {
                    tracing::warn!("database conflict, running the statements again: {e}");
                }
                other => break other,
            }
        }
    }};
}

/// Runs `$body` in a transaction of `$shared.pool` bound to `$tx` (the body
/// evaluates to `Result<T, Fatal>`, `?` inside it leaves the body) and
/// commits; a transient failure runs it again (`retrying_transient!`). How
/// long `begin` waited for a connection goes to `/metrics`
/// (`hqr_db_pool_wait_seconds`).
macro_rules! in_transaction {
    ($shared:expr, |$tx:ident| $body:block) => {{
        retrying_transient!({
            let asked = std::time::Instant::now();
            let mut $tx = $shared.pool.begin().await?;
            $shared
                .metrics
                .pool_wait_seconds
                .lock()
                .observe(asked.elapsed());
            let result: Result<_, $crate::Fatal> = async { $body }.await;
            match result {
                Ok(v) => $tx.commit().await.map(|()| v).map_err($crate::Fatal::from),
                Err(e) => Err(e),
            }
        })
    }};
}

/// Runs `$body`, work of one statement that needs no transaction, on a
/// connection of `$shared.pool` bound to `$db` (`Shared::connection`); a
/// transient failure runs it again (`retrying_transient!`).
macro_rules! on_connection {
    ($shared:expr, |$db:ident| $body:block) => {{
        retrying_transient!({
            let mut $db = $shared.connection().await?;
            let result: Result<_, $crate::Fatal> = async { $body }.await;
            result
        })
    }};
}

pub mod api;
pub mod attempts;
pub mod auth;
pub mod config;
pub mod dispatch;
pub mod events;
pub mod failpoint;
pub mod graph;
pub mod http;
pub mod job_inputs;
pub mod logs;
pub mod metrics;
pub mod nix_support;
pub mod outcome;
pub mod outside;
pub mod queue_monitor;
pub mod realisations;
pub mod record;
pub mod resolver;
pub mod retention;
pub mod server;
pub mod state;
pub mod status_document;
pub mod store;
pub mod systemd;
pub mod tunnel;
pub mod uploads;

use std::net::SocketAddr;
use std::sync::Arc;

use futures::FutureExt;
use parking_lot::Mutex;
use sqlx::PgPool;
use thiserror::Error;
use tokio::sync::Notify;
use tokio::task::JoinSet;

pub use config::RunnerConfig;

use logs::LogStore;
use state::State;
use store::LocalStore;

/// What the runner's tasks share: the configuration, the connections to
/// PostgreSQL and the local store, the logs, and the in-memory state
/// behind its handle ([`state::State`], the only owner of the graph, the
/// machines and the attempts).
pub struct Shared {
    /// Swapped whole on SIGHUP: take it once per decision, via `config()`.
    config: parking_lot::RwLock<Arc<RunnerConfig>>,
    /// The connections of the runner's own loops (dispatch, completion,
    /// loading, the sequencer): nothing a client does waits here.
    pub pool: PgPool,
    /// The client API's and the HTTP endpoint's connections: however many
    /// watchers and scrapers come, they queue here (and give up after a
    /// few seconds with "unavailable"), never in `pool`.
    pub api_pool: PgPool,
    /// The LISTEN connections (queue monitor, sequencer), held for good,
    /// so they are not taken from `pool`.
    pub listen_pool: PgPool,
    /// Every event as the sequencer numbers it: what a caught-up watcher
    /// waits on (one that lags behind reads the database again).
    pub numbered: tokio::sync::broadcast::Sender<Arc<events::EventRow>>,
    /// Database aggregates for `/status` and `/metrics`, refreshed on the
    /// status timer, so a scrape costs no query.
    pub aggregates: parking_lot::RwLock<status_document::Aggregates>,
    pub store: LocalStore,
    pub logs: LogStore,
    pub state: State,
    /// Builders' progress reports, written in batches
    /// ([`tunnel::progress`]).
    pub progress: tunnel::progress::ProgressQueue,
    /// Wakes the uploader: outputs were queued for the destination stores.
    pub wake_uploads: Notify,
    /// `hashDerivationModulo` of input derivations, to name realisations
    /// (a cache of the `realisations` module's).
    pub drv_hashes: Mutex<hydra_nix::derivation::hashing::DrvHashes>,
    /// The builder tokens, re-read on reload.
    pub tokens: parking_lot::RwLock<auth::Tokens>,
    /// The client API tokens, re-read on reload.
    pub client_tokens: parking_lot::RwLock<api::access::ClientTokens>,
    /// Step durations and dispatch latency, for `/metrics`.
    pub metrics: metrics::Metrics,
    /// Ticks when the sequencer numbered events.
    pub event_tick: tokio::sync::watch::Sender<u64>,
    /// Bumped when a reload replaced the tokens: each builder connection
    /// checks its token again (a revoked one ends the connection).
    pub tokens_reloaded: tokio::sync::watch::Sender<u64>,
    /// Where request handlers report a fault that must stop the runner.
    fatal: tokio::sync::mpsc::UnboundedSender<Fatal>,
}

impl Shared {
    /// The configuration now (a reload may replace it between two calls).
    pub fn config(&self) -> Arc<RunnerConfig> {
        self.config.read().clone()
    }

    /// A connection of the pool, for work that is one statement and needs
    /// no transaction (`on_connection!`; the wait is measured as
    /// `in_transaction!`'s is).
    pub async fn connection(&self) -> Result<sqlx::pool::PoolConnection<sqlx::Postgres>, Fatal> {
        let asked = std::time::Instant::now();
        let db = self.pool.acquire().await?;
        self.metrics
            .pool_wait_seconds
            .lock()
            .observe(asked.elapsed());
        Ok(db)
    }

    /// Installs a reloaded configuration.
    pub fn set_config(&self, config: RunnerConfig) {
        *self.config.write() = Arc::new(config);
    }

    /// Stops the runner with `fault` (from a request handler, which cannot
    /// return it to `main` itself). A refusal of the data written (see
    /// [`Fatal::refused_data`]) ends the request only: a builder or client
    /// that sends what the database refuses would otherwise stop the
    /// runner again after every restart.
    pub fn die(&self, fault: Fatal) {
        if let Some(reason) = fault.refused_data() {
            tracing::error!("a request ended: {reason}");
            return;
        }
        tracing::error!("fatal: {fault}");
        let _ = self.fatal.send(fault);
    }
}

/// A fault that stops the runner: the database or the local store is
/// broken. Builders' faults never end up here.
#[derive(Debug, Error)]
pub enum Fatal {
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error(transparent)]
    Store(#[from] store::StoreError),
    #[error(transparent)]
    Logs(#[from] logs::LogError),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("the builder service stopped: {0}")]
    Serve(#[from] tonic::transport::Error),
    #[error("runner task panicked: {0}")]
    Panic(String),
    #[error(transparent)]
    Tokens(#[from] auth::TokenError),
    #[error("the HTTP status server stopped: {source}")]
    Http { source: std::io::Error },
    #[error("the signing key {path}: {message}")]
    SigningKey {
        path: std::path::PathBuf,
        message: String,
    },
    #[error("cannot read the TLS file {path}: {source}")]
    TlsFile {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
}

impl Fatal {
    /// When PostgreSQL refused the *data* written (a value from outside
    /// the runner, a row of a build deleted meanwhile; see
    /// [`hydra_db::Fault::Data`]) rather than failed: the reason, for the
    /// step or request that wrote it to end with. Such an error must never
    /// stop the runner: it would meet the same data after its restart.
    pub fn refused_data(&self) -> Option<String> {
        match self {
            Fatal::Database(e) if hydra_db::is_data_error(e) => Some(outside::display_text(
                &format!("the database refused the data: {e}"),
                outside::DISPLAY_MAX,
            )),
            _ => None,
        }
    }
}

/// Logs a critical task's failure when it happens (the supervisor may be
/// busy elsewhere) and passes it on.
async fn critical(
    name: &'static str,
    task: impl Future<Output = Result<(), Fatal>>,
) -> Result<(), Fatal> {
    let result = task.await;
    if let Err(e) = &result {
        tracing::error!("{name} failed: {e}");
    }
    result
}

/// A running queue runner: its critical tasks, joined by [`Runner::wait`].
pub struct Runner {
    pub shared: Arc<Shared>,
    pub addr: SocketAddr,
    /// Where the client API is served.
    pub client_addr: SocketAddr,
    /// Where `/status` and `/metrics` are served, if anywhere.
    pub http_addr: Option<SocketAddr>,
    tasks: JoinSet<Result<(), Fatal>>,
}

/// How long a client request waits for one of the API's connections
/// before it is answered "unavailable".
const API_ACQUIRE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);
/// The LISTEN connections: the queue monitor's and the sequencer's, and
/// one for a listener that reconnects while the old one closes.
const LISTENERS: u32 = 3;
/// Numbered events kept for watchers that fall behind the sequencer; one
/// that falls further reads the database from its cursor.
const EVENT_BACKLOG: usize = 4096;

impl Runner {
    /// Connects nothing itself: `pool` must reach a migrated database.
    /// Starts the builder service on `config.listen` (port 0 picks one),
    /// the queue monitor and the dispatcher.
    pub async fn start(config: RunnerConfig, pool: PgPool) -> Result<Runner, Fatal> {
        Self::start_with(config, pool, || {}).await
    }

    /// [`Runner::start`], first waiting as a hot standby while another
    /// runner holds the advisory lock (`on_standby` is called once when
    /// that is so). Nothing listens or dispatches before the lock is ours.
    pub async fn start_with(
        config: RunnerConfig,
        pool: PgPool,
        on_standby: impl FnOnce(),
    ) -> Result<Runner, Fatal> {
        let tokens = auth::Tokens::from_setting(config.builder_tokens_dir.as_deref())?;
        let client_tokens =
            api::access::ClientTokens::from_setting(config.client_tokens_dir.as_deref())?;
        let tls = server::TlsFiles::read(&config)?;
        let client_tls = server::TlsFiles::read_client(&config)?;
        let signing_key = uploads::load_key(&config)?;
        let lock = ActiveLock::acquire(&pool, config.advisory_lock_key, on_standby).await?;
        let listener = tokio::net::TcpListener::bind(config.listen)
            .await
            .map_err(|source| Fatal::Listen {
                addr: config.listen,
                source,
            })?;
        let addr = listener.local_addr().map_err(|source| Fatal::Listen {
            addr: config.listen,
            source,
        })?;
        let client_listener = tokio::net::TcpListener::bind(config.client_listen)
            .await
            .map_err(|source| Fatal::Listen {
                addr: config.client_listen,
                source,
            })?;
        let client_addr = client_listener
            .local_addr()
            .map_err(|source| Fatal::Listen {
                addr: config.client_listen,
                source,
            })?;
        let http = match config.http_listen {
            Some(addr) => Some(
                tokio::net::TcpListener::bind(addr)
                    .await
                    .map_err(|source| Fatal::Listen { addr, source })?,
            ),
            None => None,
        };
        let (fatal_tx, mut fatal_rx) = tokio::sync::mpsc::unbounded_channel();
        let options = (*pool.connect_options()).clone();
        let api_pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(config.api_database_connections)
            .acquire_timeout(API_ACQUIRE_TIMEOUT)
            .connect_lazy_with(options.clone());
        let listen_pool = sqlx::postgres::PgPoolOptions::new()
            .max_connections(LISTENERS)
            .connect_lazy_with(options);
        let (progress, progress_queue) = tunnel::progress::ProgressQueue::new();
        let shared = Arc::new(Shared {
            progress,
            store: LocalStore::new(config.store_socket.clone(), config.store_real_dir.clone()),
            logs: LogStore::new(&config.hydra_data, config.log_compression),
            config: parking_lot::RwLock::new(Arc::new(config)),
            pool,
            api_pool,
            listen_pool,
            numbered: tokio::sync::broadcast::Sender::new(EVENT_BACKLOG),
            aggregates: Default::default(),
            state: State::default(),
            wake_uploads: Notify::new(),
            drv_hashes: Mutex::new(Default::default()),
            tokens: parking_lot::RwLock::new(tokens),
            client_tokens: parking_lot::RwLock::new(client_tokens),
            event_tick: tokio::sync::watch::Sender::new(0),
            tokens_reloaded: tokio::sync::watch::Sender::new(0),
            metrics: Default::default(),
            fatal: fatal_tx,
        });
        // Check the store before anything depends on it.
        shared.store.client().await?;
        api::cluster::load_drained(&shared).await?;
        outcome::close_rows_without_attempt(
            &shared,
            "aborted: the queue runner stopped while the step ran",
        )
        .await?;
        inherit_open_attempts(&shared).await?;
        let mut tasks = JoinSet::new();
        let status_shared = shared.clone();
        tasks.spawn(critical(
            "builder service",
            server::serve(shared.clone(), listener, tls),
        ));
        tasks.spawn(critical(
            "client API",
            server::serve_clients(shared.clone(), client_listener, client_tls),
        ));
        tasks.spawn(critical(
            "queue monitor",
            queue_monitor::run(shared.clone()),
        ));
        tasks.spawn(critical("dispatcher", dispatch::run(shared.clone())));
        tasks.spawn(critical(
            "progress writer",
            tunnel::progress::write(shared.clone(), progress_queue),
        ));
        let mut http_addr = None;
        if let Some(listener) = http {
            http_addr = listener.local_addr().ok();
            tasks.spawn(critical(
                "HTTP status server",
                http::serve(shared.clone(), listener),
            ));
        }
        tasks.spawn(critical("resolver", resolver::run(shared.clone())));
        tasks.spawn(critical(
            "event sequencer",
            events::sequencer(shared.clone()),
        ));
        tasks.spawn(critical("database watchdog", database_watchdog(lock)));
        // Not critical: they log and retry; the uploader ends at once when
        // there is no destination.
        tasks.spawn(async {
            status_document::run(status_shared).await;
            Ok(())
        });
        tasks.spawn(retention::run(shared.clone()).map(Ok));
        let upload_shared = shared.clone();
        tasks.spawn(async move {
            uploads::run(upload_shared, signing_key).await;
            Ok(())
        });
        tasks.spawn(async move {
            match fatal_rx.recv().await {
                Some(fault) => Err(fault),
                None => Ok(()),
            }
        });
        Ok(Runner {
            shared,
            addr,
            client_addr,
            http_addr,
            tasks,
        })
    }

    /// Whether every task still runs: the error of one that ended (a
    /// critical task that failed, or panicked), without waiting.
    pub fn check_alive(&mut self) -> Result<(), Fatal> {
        while let Some(done) = self.tasks.try_join_next() {
            match done {
                Ok(Ok(())) => continue,
                Ok(Err(e)) => return Err(e),
                Err(e) => return Err(Fatal::Panic(e.to_string())),
            }
        }
        Ok(())
    }

    /// Runs until a critical task fails; returns its error.
    pub async fn wait(&mut self) -> Result<(), Fatal> {
        while let Some(done) = self.tasks.join_next().await {
            match done {
                Ok(Ok(())) => continue,
                Ok(Err(e)) => return Err(e),
                Err(e) => return Err(Fatal::Panic(e.to_string())),
            }
        }
        Ok(())
    }

    /// Applies a re-read configuration file: the keys that can change live
    /// do (connected builders get a new ping interval), the others are
    /// named as waiting for a restart; builder tokens are re-read.
    ///
    /// Token files that cannot be read refuse the whole reload: the running
    /// configuration and tokens stay (a typo in a token directory must not
    /// stop the runner, nor lock every builder out).
    pub async fn reload(&self, new: &RunnerConfig) -> Result<config::Reload, auth::TokenError> {
        let old = self.shared.config();
        let (merged, report) = old.reloaded(new);
        // Token files may have changed even where the setting did not.
        let tokens = auth::Tokens::from_setting(merged.builder_tokens_dir.as_deref())?;
        let client_tokens =
            api::access::ClientTokens::from_setting(merged.client_tokens_dir.as_deref())?;
        *self.shared.tokens.write() = tokens;
        *self.shared.client_tokens.write() = client_tokens;
        self.shared.tokens_reloaded.send_modify(|n| *n += 1);
        let ping_changed = merged.ping_interval_secs != old.ping_interval_secs;
        let ping = merged.ping_interval_secs;
        self.shared.set_config(merged);
        if ping_changed {
            tunnel::push_settings(&self.shared, ping);
        }
        self.shared.state.settings_changed();
        Ok(report)
    }

    /// Stops on purpose: builders are told the runner will be back (they
    /// keep building, and the next runner, or a standby, re-adopts their
    /// attempts), then every task stops. Nothing is written after: the busy
    /// rows stay for whoever is active next, and the advisory lock goes
    /// with the last task, so a standby that takes over finds its rows
    /// untouched.
    pub async fn shutdown(mut self) -> Result<(), Fatal> {
        let links = self.shared.state.links();
        for link in &links {
            let _ = link.leaving("the queue runner is stopping and will be back");
        }
        let flushed = async {
            while !links.iter().all(|l| l.is_flushed()) {
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
        };
        let _ = tokio::time::timeout(std::time::Duration::from_secs(1), flushed).await;
        self.tasks.shutdown().await;
        Ok(())
    }
}

/// Takes over the attempts the runner before this one left open: each
/// waits `reconnect_grace_secs` for its builder to come back and declare
/// it.
async fn inherit_open_attempts(shared: &Shared) -> Result<(), Fatal> {
    let grace = std::time::Duration::from_secs(shared.config().reconnect_grace_secs);
    let deadline = std::time::Instant::now() + grace;
    let mut db = shared.pool.acquire().await?;
    let attempt_grace = std::time::Duration::from_secs(shared.config().attempt_grace_secs);
    let open = attempts::load_open(
        &mut db,
        shared.store.dir(),
        deadline,
        attempt_grace,
        |drv| shared.logs.length(drv),
    )
    .await?;
    if !open.is_empty() {
        tracing::info!(
            "{} attempts from before this start wait up to {} s for their builders to re-adopt them",
            open.len(),
            grace.as_secs()
        );
    }
    shared.state.attempts_inherited(open);
    Ok(())
}

/// How often, and how patiently, the watchdog checks the database.
const DATABASE_CHECK: std::time::Duration = std::time::Duration::from_secs(1);
const DATABASE_PATIENCE: std::time::Duration = std::time::Duration::from_secs(5);
/// How often a standby tries the lock.
const STANDBY_POLL: std::time::Duration = std::time::Duration::from_millis(500);

/// The session-level advisory lock that makes this runner the active one,
/// held on a connection of its own for the life of the process. Two
/// runners never dispatch at once: PostgreSQL grants the lock to one
/// session, and frees it when that session's connection ends (the runner
/// died).
pub struct ActiveLock {
    conn: sqlx::PgConnection,
}

impl ActiveLock {
    /// Takes the lock, waiting (and telling systemd's watchdog all is well)
    /// while another runner has it.
    pub async fn acquire(
        pool: &PgPool,
        key: i64,
        on_standby: impl FnOnce(),
    ) -> Result<ActiveLock, Fatal> {
        let mut conn = pool.acquire().await?.detach();
        let mut on_standby = Some(on_standby);
        loop {
            let ours: bool = sqlx::query_scalar("select pg_try_advisory_lock($1)")
                .bind(key)
                .fetch_one(&mut conn)
                .await?;
            if ours {
                return Ok(ActiveLock { conn });
            }
            if let Some(tell) = on_standby.take() {
                tracing::info!("another runner is active: standing by until its lock is free");
                tell();
            }
            systemd::watchdog();
            tokio::time::sleep(STANDBY_POLL).await;
        }
    }
}

/// Checks PostgreSQL every second on the lock's connection: a database
/// that is gone stops the runner within seconds, instead of whenever the
/// next query happens to wait out the pool's acquire timeout; and a runner
/// whose lock session is gone (so a standby may be active now) stops.
async fn database_watchdog(lock: ActiveLock) -> Result<(), Fatal> {
    use sqlx::Connection;
    let mut conn = lock.conn;
    loop {
        tokio::time::sleep(DATABASE_CHECK).await;
        let check = tokio::time::timeout(DATABASE_PATIENCE, conn.ping()).await;
        match check {
            Ok(Ok(())) => {}
            Ok(Err(e)) => return Err(Fatal::Database(e)),
            Err(_) => {
                return Err(Fatal::Database(sqlx::Error::PoolTimedOut));
            }
        }
    }
}
