//! Faults injected into real processes: the runner and builders are the
//! shipped binaries, PostgreSQL a cluster of the test's own where the test
//! stops it, every builder a store of its own. Who dies and who retries is
//! as the brief says: builder faults only requeue (the attempt shows as 3,
//! once the builder stayed away past `reconnect_grace_secs`);
//! the runner dies on a database fault and finishes the run after a restart.

use std::time::{Duration, Instant};

use hydra_testkit::process::{BuilderProcess, Gate, RunnerProcess, RunnerSetup, StartSignal};
use hydra_testkit::{NixStore, PgCluster, TestDb, create_jobset, queue_builds, wait_finished};
use sqlx::PgPool;

const LIMIT: Duration = Duration::from_secs(90);

/// A derivation whose first build announces itself on `signal` and then
/// runs `hold` (waits for a gate, so the test can hurt whoever runs it and
/// say when it ends); a retry is instant.
fn held_job(dir: &std::path::Path, signal: &StartSignal, hold: &str) -> String {
    let marker = dir.join("first-attempt");
    format!(
        r#"with prelude; {{
          slow = mkDrv {{
            name = "slow";
            script = "if [ ! -e {marker} ]; then touch {marker}; echo started > {signal}; {hold}; fi; echo done > $out";
          }};
        }}"#,
        marker = marker.display(),
        signal = signal.path().display()
    )
}

/// (machine, status, errorMsg) of a build's steps, in order.
async fn steps(pool: &PgPool, build: i32) -> Vec<(String, Option<i32>, Option<String>)> {
    sqlx::query_as(
        "select machine, status, errorMsg from BuildSteps where build = $1 order by stepnr",
    )
    .bind(build)
    .fetch_all(pool)
    .await
    .unwrap()
}

/// The machine the (only) busy step runs on.
async fn busy_machine(pool: &PgPool) -> String {
    sqlx::query_scalar("select machine from BuildSteps where busy != 0")
        .fetch_one(pool)
        .await
        .unwrap()
}

async fn migrated_db(url: &str) -> PgPool {
    let pool = hydra_db::connect(url, 4).await.unwrap();
    hydra_db::migrate(&pool).await.unwrap();
    pool
}

/// A database, the runner's store, a runner process (with
/// `extra_config`), `builders` builders, and the slow job queued and
/// started: the test hurts someone while it runs.
struct SlowJobSite {
    db: TestDb,
    _store: NixStore,
    _dir: tempfile::TempDir,
    setup: RunnerSetup,
    runner: RunnerProcess,
    builders: Vec<BuilderProcess>,
    /// Holds the first build until opened.
    gate: Gate,
    build: i32,
}

impl SlowJobSite {
    async fn start(extra_config: &str, builders: &[&str]) -> SlowJobSite {
        let db = TestDb::new().await;
        let store = NixStore::start().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let setup = RunnerSetup::new_with(dir.path(), &store, &db.url, extra_config).unwrap();
        let runner = setup.start(&[]).await.unwrap();
        let builders = builders
            .iter()
            .map(|name| BuilderProcess::start(name, &setup.address, dir.path()).unwrap())
            .collect();
        let signal = StartSignal::new(dir.path(), "started").unwrap();
        let gate = Gate::new(dir.path(), "gate").unwrap();
        let hold = format!("read x < {}", gate.path().display());
        let jobset = create_jobset(&db.pool).await.unwrap();
        let drvs = store
            .instantiate(&held_job(dir.path(), &signal, &hold), &["slow"])
            .await
            .unwrap();
        let ids = queue_builds(&db.pool, &store, jobset, &drvs, |_| Default::default())
            .await
            .unwrap();
        signal.started(LIMIT).await.unwrap();
        SlowJobSite {
            db,
            _store: store,
            _dir: dir,
            setup,
            runner,
            builders,
            gate,
            build: ids["slow"],
        }
    }

    /// The builder running the slow job.
    async fn running_it(&mut self) -> &mut BuilderProcess {
        let name = busy_machine(&self.db.pool).await;
        self.builders.iter_mut().find(|b| b.name == name).unwrap()
    }

    async fn finished(&self) -> Vec<(String, Option<i32>, Option<String>)> {
        wait_finished(&self.db.pool, [self.build], LIMIT)
            .await
            .unwrap();
        steps(&self.db.pool, self.build).await
    }
}

#[tokio::test]
async fn a_builder_killed_mid_build_has_its_step_retried_on_the_other() {
    let mut site = SlowJobSite::start("reconnect_grace_secs = 1", &["one", "two"]).await;
    let victim = site.running_it().await;
    let name = victim.name.clone();
    victim.kill().await.unwrap();

    let rows = site.finished().await;
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert_eq!((rows[0].0.as_str(), rows[0].1), (name.as_str(), Some(3)));
    assert!(
        rows[0]
            .2
            .as_deref()
            .unwrap_or("")
            .contains("did not come back"),
        "{rows:?}"
    );
    assert_ne!(rows[1].0, name, "retried on the other machine");
    assert_eq!(rows[1].1, Some(0));
}

/// What the builder's job journal is for: a job it finished while no
/// runner held it outlives a restart of the builder's process, and the
/// next runner records it as built there, once (a lost record would make
/// the attempt lost and the step retried: two rows).
#[tokio::test]
async fn a_job_finished_while_no_runner_held_it_outlives_a_restart_of_its_builder_and_a_gc() {
    let SlowJobSite {
        db,
        setup,
        runner,
        mut builders,
        gate,
        build,
        _store,
        _dir,
    } = SlowJobSite::start("", &["one"]).await;
    runner.kill().await.unwrap();
    gate.open(LIMIT).await.unwrap();
    let builder = &mut builders[0];
    builder
        .wait_for_line("its report is kept for the runner that adopts it", LIMIT)
        .await
        .unwrap();
    builder
        .wait_for_line(
            "the outputs are held from garbage collection until a runner has them",
            LIMIT,
        )
        .await
        .unwrap();

    // A garbage collection while the builder is down leaves the output
    // that no runner has yet: the job is delivered, not built again.
    builder.kill().await.unwrap();
    builder.store.run("nix-store", &["--gc"]).await.unwrap();
    builder.start_again().unwrap();
    builder
        .wait_for_line(
            "holding a finished job from before this builder restarted",
            LIMIT,
        )
        .await
        .unwrap();
    let _runner = setup.start(&[]).await.unwrap();

    wait_finished(&db.pool, [build], LIMIT).await.unwrap();
    let rows = steps(&db.pool, build).await;
    assert_eq!(rows.len(), 1, "delivered, not retried: {rows:?}");
    assert_eq!(
        (rows[0].0.as_str(), rows[0].1),
        ("one", Some(0)),
        "{rows:?}"
    );
    let status: Option<i32> = sqlx::query_scalar("select buildStatus from Builds where id = $1")
        .bind(build)
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(status, Some(0));
}

#[tokio::test]
async fn a_frozen_builder_is_found_silent_and_its_step_retried_elsewhere() {
    let mut site = SlowJobSite::start(
        "ping_interval_secs = 1\nping_timeout_secs = 3\nreconnect_grace_secs = 1",
        &["one", "two"],
    )
    .await;
    let frozen = site.running_it().await;
    let victim = frozen.name.clone();
    // Frozen, its TCP connection stays open: only its silence gives it away.
    frozen.freeze().unwrap();
    let frozen_at = Instant::now();
    site.runner
        .wait_for_line("builder left: no ping for 3 s", LIMIT)
        .await
        .unwrap();
    let noticed = frozen_at.elapsed();
    let rows = site.finished().await;
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert_eq!((rows[0].0.as_str(), rows[0].1), (victim.as_str(), Some(3)));
    assert!(
        rows[0].2.as_deref().unwrap().contains("no ping"),
        "{rows:?}"
    );
    assert_eq!(rows[1].1, Some(0));
    assert_ne!(rows[1].0, victim);
    assert!(
        noticed >= Duration::from_secs(2),
        "the runner waited for the ping timeout ({noticed:?})"
    );

    // Its build goes on in its nix-daemon meanwhile and ends. Thawed, the
    // builder joins anew declaring the finished job; the grace is over, so
    // the runner tells it to drop the job and its late report is refused.
    site.gate.open(LIMIT).await.unwrap();
    let frozen = site.builders.iter_mut().find(|b| b.name == victim).unwrap();
    frozen.thaw().unwrap();
    site.runner
        .wait_for_line(&format!("1 to drop, 0 lost machine={victim}"), LIMIT)
        .await
        .unwrap();
    frozen
        .wait_for_line("dropping the job", LIMIT)
        .await
        .unwrap();
    let after = steps(&site.db.pool, site.build).await;
    assert_eq!(after, rows, "nothing the thawed builder sent was applied");
}

#[tokio::test]
async fn losing_postgres_stops_the_runner_and_a_restart_finishes_the_run() {
    let cluster = PgCluster::start().unwrap();
    let url = cluster.url("postgres");
    let pool = migrated_db(&url).await;
    let store = NixStore::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let setup = RunnerSetup::new(dir.path(), &store, &url).unwrap();
    let runner = setup.start(&[]).await.unwrap();
    let _builders = [
        BuilderProcess::start("one", &setup.address, dir.path()).unwrap(),
        BuilderProcess::start("two", &setup.address, dir.path()).unwrap(),
    ];
    let signal = StartSignal::new(dir.path(), "started").unwrap();
    // Held until the second runner runs: the builder keeps the job across
    // the outage, and the second runner re-adopts it.
    let gate = Gate::new(dir.path(), "gate").unwrap();
    let jobset = create_jobset(&pool).await.unwrap();
    let expr = format!(
        "let slow = ({}).slow; in with prelude; {{ inherit slow; {} }}",
        held_job(dir.path(), &signal, &format!("read x < {}", gate.path().display())),
        (0..6)
            .map(|i| format!(
                r#"quick{i} = mkDrv {{ name = "quick{i}"; script = "cat ${{slow}} > $out; echo {i} >> $out"; }};"#
            ))
            .collect::<String>()
    );
    let jobs: Vec<String> = std::iter::once("slow".to_owned())
        .chain((0..6).map(|i| format!("quick{i}")))
        .collect();
    let jobs: Vec<&str> = jobs.iter().map(String::as_str).collect();
    let drvs = store.instantiate(&expr, &jobs).await.unwrap();
    let ids = queue_builds(&pool, &store, jobset, &drvs, |_| Default::default())
        .await
        .unwrap();
    signal.started(LIMIT).await.unwrap();
    pool.close().await;

    cluster.stop().unwrap();
    let stopped = Instant::now();
    let exit = runner.exit(Duration::from_secs(30)).await.unwrap();
    assert!(!exit.status.success(), "{}", exit.output);
    assert!(
        exit.output.contains("database"),
        "the runner names the database: {}",
        exit.output
    );
    let took = stopped.elapsed();

    cluster.start_again().unwrap();
    let pool = hydra_db::connect(&url, 4).await.unwrap();
    let mut runner = setup.start(&[]).await.unwrap();
    runner
        .wait_for_line("re-adopted attempt", LIMIT)
        .await
        .unwrap();
    gate.open(LIMIT).await.unwrap();
    wait_finished(&pool, ids.values().copied(), LIMIT)
        .await
        .unwrap();
    let statuses: Vec<Option<i32>> = sqlx::query_scalar("select buildStatus from Builds")
        .fetch_all(&pool)
        .await
        .unwrap();
    assert_eq!(statuses, vec![Some(0); 7]);
    let busy: i64 = sqlx::query_scalar("select count(*) from BuildSteps where busy != 0")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(busy, 0);
    let slow_rows = steps(&pool, ids["slow"]).await;
    assert_eq!(slow_rows.len(), 1, "re-adopted, not retried: {slow_rows:?}");
    assert!(
        took < Duration::from_secs(20),
        "the runner stopped {took:?} after the database"
    );
}

#[tokio::test]
async fn a_builder_with_another_store_dir_is_refused_on_both_sides() {
    let db = TestDb::new().await;
    let store = NixStore::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let setup = RunnerSetup::new(dir.path(), &store, &db.url).unwrap();
    let mut runner = setup.start(&[]).await.unwrap();
    let mut builder = BuilderProcess::start_with(
        "elsewhere",
        &setup.address,
        dir.path(),
        "store_dir = \"/gnu/store\"",
    )
    .unwrap();
    let said = builder
        .wait_for_line("store directory mismatch", LIMIT)
        .await
        .unwrap();
    assert!(said.contains("/gnu/store"), "{said}");
    let status = builder.exit_status(LIMIT).await.unwrap();
    assert!(!status.success(), "bad configuration ends the builder");
    let logged = runner
        .wait_for_line("refused a builder", LIMIT)
        .await
        .unwrap();
    assert!(logged.contains("store directory mismatch"), "{logged}");
}

#[tokio::test]
async fn a_builder_of_another_protocol_version_is_refused_on_both_sides() {
    use hydra_proto::v1::runner_service_client::RunnerServiceClient;
    use hydra_proto::v1::*;
    let db = TestDb::new().await;
    let store = NixStore::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let setup = RunnerSetup::new(dir.path(), &store, &db.url).unwrap();
    let mut runner = setup.start(&[]).await.unwrap();
    let mut client = RunnerServiceClient::connect(format!("http://{}", setup.address))
        .await
        .unwrap();
    let join = BuilderMessage {
        msg: Some(builder_message::Msg::Join(Join {
            protocol_version: hydra_proto::PROTOCOL_VERSION + 1,
            machine_name: "future".into(),
            systems: vec!["x86_64-linux".into()],
            max_jobs: 1,
            store_dir: "/nix/store".into(),
            ..Default::default()
        })),
    };
    let refused = client
        .open(tokio_stream::iter([join]))
        .await
        .expect_err("refused");
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    assert!(refused.message().contains("protocol"), "{refused:?}");
    let logged = runner
        .wait_for_line("refused a builder", LIMIT)
        .await
        .unwrap();
    assert!(logged.contains("protocol"), "{logged}");
}
