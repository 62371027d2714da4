//! A whole farm for integration tests and the demo: a database, the
//! runner's store, the runner (in this process, serving gRPC on loopback),
//! and builders, each with a store of its own.

use std::collections::BTreeMap;
use std::time::Duration;

use anyhow::{Context, Result, bail};
use hydra_builder::BuilderConfig;
use hydra_nix::daemon::DaemonClient;
use hydra_queue_runner::{Runner, RunnerConfig};
use sqlx::postgres::PgListener;
use tokio::task::JoinHandle;

use crate::{NixStore, TestDb};

/// The client API's generated client over a plain channel.
pub type ApiClient =
    hydra_proto::client::client_service_client::ClientServiceClient<tonic::transport::Channel>;

/// Waits for `check` to hold, looking every 50 ms, for conditions no
/// event announces (a build loaded into the graph, say); fails after
/// `limit` with what it last saw.
pub async fn eventually<T, F, Fut>(limit: Duration, mut check: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<Option<T>>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(v) = check().await? {
            return Ok(v);
        }
        if tokio::time::Instant::now() > deadline {
            bail!("condition not met within {limit:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A builder to start: its name, systems and features.
#[derive(Debug, Clone)]
pub struct BuilderSpec {
    pub name: String,
    pub systems: Vec<String>,
    pub features: Vec<String>,
    pub mandatory_features: Vec<String>,
    pub max_jobs: u32,
    pub speed_factor: f32,
    pub keep_build_logs: bool,
}

impl BuilderSpec {
    /// A builder for this machine's system, one job at a time.
    pub fn new(name: &str) -> BuilderSpec {
        BuilderSpec {
            name: name.to_owned(),
            systems: vec![hydra_builder::config::current_system()],
            features: Vec::new(),
            mandatory_features: Vec::new(),
            max_jobs: 1,
            speed_factor: 1.0,
            keep_build_logs: false,
        }
    }

    pub fn features(mut self, f: &[&str]) -> Self {
        self.features = f.iter().map(|s| s.to_string()).collect();
        self
    }

    pub fn max_jobs(mut self, n: u32) -> Self {
        self.max_jobs = n;
        self
    }

    pub fn speed(mut self, s: f32) -> Self {
        self.speed_factor = s;
        self
    }

    /// Its nix-daemon keeps build logs of its own too.
    pub fn keeping_build_logs(mut self) -> Self {
        self.keep_build_logs = true;
        self
    }
}

pub struct RunningBuilder {
    pub spec: BuilderSpec,
    pub store: NixStore,
    task: JoinHandle<()>,
    /// Its `state_dir`.
    _state: tempfile::TempDir,
}

impl RunningBuilder {
    /// Stops the builder (its connection drops, as when a machine dies).
    pub fn stop(&self) {
        self.task.abort();
    }
}

impl Drop for RunningBuilder {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Per-build settings of a submission, as an evaluator would write them.
#[derive(Debug, Clone, Default)]
pub struct JobOptions {
    pub max_silent: Option<i32>,
    pub timeout: Option<i32>,
    pub priority: i32,
}

pub struct Farm {
    pub db: TestDb,
    pub runner_store: NixStore,
    pub builders: Vec<RunningBuilder>,
    pub runner: Option<Runner>,
    /// Hydra's data directory of this farm (its build-logs).
    pub hydra_data: tempfile::TempDir,
    pub jobset_id: i32,
    /// What the runner was started with (a restart uses it again).
    pub config: RunnerConfig,
}

impl Farm {
    /// A database, the runner's store and a running runner (no builders yet).
    /// `tune` adjusts the runner's configuration.
    pub async fn start(tune: impl FnOnce(&mut RunnerConfig)) -> Result<Farm> {
        Self::start_on(NixStore::start()?, tune).await
    }

    /// [`Farm::start`] over a runner store made elsewhere (a benchmark's
    /// cached one).
    pub async fn start_on(
        runner_store: NixStore,
        tune: impl FnOnce(&mut RunnerConfig),
    ) -> Result<Farm> {
        init_tracing();
        // Hydra's own schema, with every constraint, under the project's
        // migrations: what the runner meets beside a real Hydra.
        let db = TestDb::hydra().await;
        let hydra_data = tempfile::tempdir()?;
        let mut config = RunnerConfig {
            listen: "127.0.0.1:0".parse()?,
            client_listen: "127.0.0.1:0".parse()?,
            store_socket: runner_store.socket().to_owned(),
            store_real_dir: Some(runner_store.real_store_dir()),
            hydra_data: hydra_data.path().to_owned(),
            retry_base_secs: 0.2,
            // A farm's builders do not come back unless a test brings them
            // back: their attempts are aborted soon after they leave (the
            // restart tests, with processes, keep the default).
            reconnect_grace_secs: 1,
            ..RunnerConfig::default()
        };
        tune(&mut config);
        let runner = Runner::start(config.clone(), db.pool.clone()).await?;
        let jobset_id = create_jobset(&db.pool).await?;
        Ok(Farm {
            db,
            runner_store,
            builders: Vec::new(),
            runner: Some(runner),
            hydra_data,
            jobset_id,
            config,
        })
    }

    /// Stops the runner cleanly and starts a new one on the same database
    /// and store (with `listen` on port 0, at a new address).
    pub async fn restart_runner(&mut self) -> Result<()> {
        if let Some(old) = self.runner.take() {
            old.shutdown().await?;
        }
        let config = self.config.clone();
        self.runner = Some(Runner::start(config, self.db.pool.clone()).await?);
        Ok(())
    }

    pub fn runner(&self) -> &Runner {
        self.runner.as_ref().expect("the runner is running")
    }

    /// Starts a builder with a store of its own.
    pub async fn add_builder(&mut self, spec: BuilderSpec) -> Result<()> {
        let store = NixStore::start()?;
        let state = tempfile::tempdir()?;
        let config = BuilderConfig {
            state_dir: state.path().to_owned(),
            runner_url: format!("http://{}", self.runner().addr),
            machine_name: spec.name.clone(),
            systems: spec.systems.clone(),
            supported_features: spec.features.clone(),
            mandatory_features: spec.mandatory_features.clone(),
            max_jobs: spec.max_jobs,
            speed_factor: spec.speed_factor,
            keep_build_logs: spec.keep_build_logs,
            nix_daemon_socket: store.socket().to_owned(),
            reconnect_min_secs: 0.1,
            reconnect_max_secs: 1.0,
            ..BuilderConfig::default()
        };
        let name = spec.name.clone();
        let task = tokio::spawn(async move {
            if let Err(e) = hydra_builder::run(config).await {
                tracing::error!("builder {name} stopped: {e}");
            }
        });
        self.builders.push(RunningBuilder {
            spec,
            store,
            task,
            _state: state,
        });
        Ok(())
    }

    /// Instantiates `jobs` of `expr` in the runner's store and queues them
    /// as builds, as Hydra's evaluator does; returns job -> build id.
    pub async fn submit(&self, expr: &str, jobs: &[&str]) -> Result<BTreeMap<String, i32>> {
        self.submit_with(expr, jobs, |_| JobOptions::default())
            .await
    }

    pub async fn submit_with(
        &self,
        expr: &str,
        jobs: &[&str],
        options: impl Fn(&str) -> JobOptions,
    ) -> Result<BTreeMap<String, i32>> {
        let drvs = self.runner_store.instantiate(expr, jobs).await?;
        self.queue(&drvs, options).await
    }

    /// Queues already instantiated derivations (job -> `.drv` path).
    pub async fn queue(
        &self,
        drvs: &BTreeMap<String, String>,
        options: impl Fn(&str) -> JobOptions,
    ) -> Result<BTreeMap<String, i32>> {
        queue_builds(
            &self.db.pool,
            &self.runner_store,
            self.jobset_id,
            drvs,
            options,
        )
        .await
    }

    /// Waits (on `build_finished` notifications, not by polling) until every
    /// build in `ids` is finished, or fails after `limit`.
    pub async fn wait_finished(
        &self,
        ids: impl IntoIterator<Item = i32>,
        limit: Duration,
    ) -> Result<()> {
        wait_finished(&self.db.pool, ids, limit).await
    }

    /// Status of each build: id -> (buildStatus, isCachedBuild).
    pub async fn statuses(
        &self,
        ids: &BTreeMap<String, i32>,
    ) -> Result<BTreeMap<String, (i32, i32)>> {
        let mut out = BTreeMap::new();
        for (job, id) in ids {
            let (status, cached): (Option<i32>, Option<i32>) =
                sqlx::query_as("select buildStatus, isCachedBuild from Builds where id = $1")
                    .bind(id)
                    .fetch_one(&self.db.pool)
                    .await?;
            out.insert(job.clone(), (status.unwrap_or(-1), cached.unwrap_or(0)));
        }
        Ok(out)
    }

    /// A client of the runner's client API.
    pub async fn api(&self) -> Result<ApiClient> {
        Ok(ApiClient::connect(format!("http://{}", self.runner().client_addr)).await?)
    }

    /// The operator CLI against this farm's runner
    /// (`hydra-queue-runner --url ... <args>`): whether it succeeded, and
    /// its standard output (its standard error is printed on failure).
    pub async fn cli(&self, args: &[&str]) -> (bool, String) {
        let url = format!("http://{}", self.runner().client_addr);
        let mut all = vec!["--url", url.as_str()];
        all.extend_from_slice(args);
        let out = crate::process::run_binary("hydra-queue-runner", &all).await;
        if !out.status.success() {
            println!("{}", String::from_utf8_lossy(&out.stderr));
        }
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    }

    /// Waits (on the sequencer's tick, not by polling) until every
    /// committed event has its number.
    pub async fn events_numbered(&self, limit: Duration) -> Result<()> {
        let mut tick = self.runner().shared.event_tick.subscribe();
        loop {
            let unnumbered: i64 =
                sqlx::query_scalar("select count(*) from hqr_events where seq is null")
                    .fetch_one(&self.db.pool)
                    .await?;
            if unnumbered == 0 {
                return Ok(());
            }
            tokio::time::timeout(limit, tick.changed())
                .await
                .map_err(|_| anyhow::anyhow!("{unnumbered} events unnumbered after {limit:?}"))??;
        }
    }

    /// The runner's log of a step's derivation.
    pub fn log_of(&self, drv: &str) -> Result<Option<String>> {
        Ok(self
            .log_bytes_of(drv)?
            .map(|b| String::from_utf8_lossy(&b).into_owned()))
    }

    /// The runner's log of a step's derivation, its bytes as they are.
    pub fn log_bytes_of(&self, drv: &str) -> Result<Option<Vec<u8>>> {
        let base = drv.rsplit('/').next().unwrap_or(drv);
        let path = hydra_nix::StorePath::from_base_name(base)?;
        let Some(mut log) = self.runner().shared.logs.open_at(&path, 0)? else {
            return Ok(None);
        };
        let mut bytes = Vec::new();
        log.copy_to(&mut bytes)?;
        Ok(Some(bytes))
    }
}

/// Inserts derivations of `store` (job -> `.drv` path) into the queue of
/// `jobset` as Hydra's evaluator does, and notifies `builds_added`;
/// returns job -> build id.
pub async fn queue_builds(
    pool: &sqlx::PgPool,
    store: &NixStore,
    jobset_id: i32,
    drvs: &BTreeMap<String, String>,
    options: impl Fn(&str) -> JobOptions,
) -> Result<BTreeMap<String, i32>> {
    let mut client = DaemonClient::connect(store.socket()).await?;
    let mut ids = BTreeMap::new();
    let mut tx = pool.begin().await?;
    for (job, drv) in drvs {
        let o = options(job);
        let id: i32 = sqlx::query_scalar(
            "insert into Builds (finished, timestamp, jobset_id, job, drvPath, system, maxsilent, timeout, priority)
             values (0, extract(epoch from now())::int, $1, $2, $3, $4, coalesce($5, 3600), coalesce($6, 36000), $7)
             returning id",
        )
        .bind(jobset_id)
        .bind(job)
        .bind(drv)
        .bind(hydra_builder::config::current_system())
        .bind(o.max_silent)
        .bind(o.timeout)
        .bind(o.priority)
        .fetch_one(&mut *tx)
        .await?;
        // A `.drv` that is missing or malformed gets no outputs (tests of
        // how the runner refuses such builds queue those on purpose).
        let outputs = match client.query_derivation_output_map(drv).await {
            Ok(map) => map,
            Err(_) => {
                client = DaemonClient::connect(store.socket()).await?;
                BTreeMap::new()
            }
        };
        for (name, path) in outputs {
            sqlx::query("insert into BuildOutputs (build, name, path) values ($1, $2, $3)")
                .bind(id)
                .bind(name)
                .bind(path)
                .execute(&mut *tx)
                .await?;
        }
        ids.insert(job.clone(), id);
    }
    sqlx::query("notify builds_added").execute(&mut *tx).await?;
    tx.commit().await?;
    Ok(ids)
}

/// Waits (on `build_finished` notifications, not by polling) until every
/// build in `ids` is finished, or fails after `limit`.
pub async fn wait_finished(
    pool: &sqlx::PgPool,
    ids: impl IntoIterator<Item = i32>,
    limit: Duration,
) -> Result<()> {
    let ids: Vec<i32> = ids.into_iter().collect();
    let mut listener = PgListener::connect_with(pool).await?;
    listener.listen("build_finished").await?;
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let open: Vec<i32> = sqlx::query_scalar(
            "select id from Builds where id = any($1) and finished = 0 order by id",
        )
        .bind(&ids)
        .fetch_all(pool)
        .await?;
        if open.is_empty() {
            return Ok(());
        }
        match tokio::time::timeout_at(deadline, listener.recv()).await {
            Ok(note) => {
                note.context("listening for build_finished")?;
            }
            Err(_) => bail!("builds {open:?} still unfinished after {limit:?}"),
        }
    }
}

/// Waits (on `queue_runner_status` notifications, not by polling) until
/// `pick` finds what it wants in the runner's status document
/// (`SystemStatus`); returns it, or fails after `limit`.
pub async fn status_document_until<T>(
    pool: &sqlx::PgPool,
    limit: Duration,
    mut pick: impl FnMut(&serde_json::Value) -> Option<T>,
) -> Result<T> {
    let mut listener = PgListener::connect_with(pool).await?;
    listener.listen("queue_runner_status").await?;
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let doc: Option<serde_json::Value> =
            sqlx::query_scalar("select status from SystemStatus where what = 'queue-runner'")
                .fetch_optional(pool)
                .await?;
        if let Some(found) = doc.as_ref().and_then(&mut pick) {
            return Ok(found);
        }
        match tokio::time::timeout_at(deadline, listener.recv()).await {
            Ok(note) => {
                note.context("listening for queue_runner_status")?;
            }
            Err(_) => bail!("the status document never showed it within {limit:?}: {doc:?}"),
        }
    }
}

/// A user, a project `tests` and its jobset `jobs`; returns the jobset id.
pub async fn create_jobset(pool: &sqlx::PgPool) -> Result<i32> {
    hydra_jobset(pool, "tests", "jobs").await
}

/// A user `tests`, the project `project` and its jobset `jobset`, made as
/// Hydra's web interface makes them (a legacy jobset with a Nix
/// expression, `emailOverride` set, as Hydra's schema requires); returns
/// the jobset id.
pub async fn hydra_jobset(pool: &sqlx::PgPool, project: &str, jobset: &str) -> Result<i32> {
    sqlx::query(
        "insert into Users (userName, emailAddress, password) values ('tests', 'tests@localhost', '')
         on conflict do nothing",
    )
    .execute(pool)
    .await?;
    sqlx::query(
        "insert into Projects (name, displayName, owner) values ($1, $1, 'tests') on conflict do nothing",
    )
    .bind(project)
    .execute(pool)
    .await?;
    Ok(sqlx::query_scalar(
        "insert into Jobsets (name, project, nixExprInput, nixExprPath, emailOverride, checkInterval)
         values ($1, $2, 'jobs', 'release.nix', '', 0) returning id",
    )
    .bind(jobset)
    .bind(project)
    .fetch_one(pool)
    .await?)
}

/// Warnings only, on stderr (benchmarks print their own progress; RUST_LOG
/// overrides the level).
pub fn init_tracing_quiet() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| "warn,sqlx=error,h2=warn,tower=warn".into());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .try_init();
}

/// Logs of the runner and builders, shown for failing tests (RUST_LOG
/// overrides the level).
pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| "info,sqlx=warn,h2=warn,tower=warn".into());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
}
