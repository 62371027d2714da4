//! Builds outlive their runner: a runner killed, stopped on purpose or
//! replaced by its hot standby leaves the builders building, and the next
//! runner re-adopts what they hold. Each build is held mid-way by a gate
//! the test opens only after the new runner re-adopted it, so "it was not
//! built twice" is a fact the test checks (a counter outside the store,
//! appended to at the *end* of the build), not a race it hopes to win.

use std::path::Path;
use std::time::Duration;

use hydra_nix::StorePath;
use hydra_queue_runner::config::LogCompression;
use hydra_queue_runner::logs::LogStore;
use hydra_testkit::process::{
    BuilderProcess, Gate, RunnerProcess, RunnerSetup, StartSignal, count_lines,
};
use hydra_testkit::{NixStore, TestDb, create_jobset, queue_builds, wait_finished};
use sqlx::postgres::PgListener;

const LIMIT: Duration = Duration::from_secs(90);

/// A derivation that prints ticks 1 to 5, says it started, waits for the
/// gate, prints ticks 6 to 10 and only then counts itself as built.
fn gated_job(signal: &StartSignal, gate: &Gate, counter: &Path) -> String {
    format!(
        r#"with prelude; {{
          long = mkDrv {{
            name = "long";
            script = "for i in 1 2 3 4 5; do echo tick $i; done; echo started > {signal}; read x < {gate}; for i in 6 7 8 9 10; do echo tick $i; done; echo long >> {counter}; echo done > $out";
          }};
        }}"#,
        signal = signal.path().display(),
        gate = gate.path().display(),
        counter = counter.display(),
    )
}

/// The database, the runner's store and the gated build, queued and
/// started on builder `one`.
struct Site {
    db: TestDb,
    _store: NixStore,
    dir: tempfile::TempDir,
    setup: RunnerSetup,
    runner: Option<RunnerProcess>,
    /// A second runner's setup (its own address and `hydra_data`, the same
    /// database and store), which the builder knows as its second runner.
    standby: Option<(RunnerSetup, tempfile::TempDir)>,
    builder: BuilderProcess,
    gate: Gate,
    build: i32,
    drv: String,
}

impl Site {
    /// With `extra_config` for the runner, and a standby's setup when
    /// `with_standby`.
    async fn start(extra_config: &str, with_standby: bool) -> Site {
        let db = TestDb::new().await;
        let store = NixStore::start().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let setup = RunnerSetup::new_with(dir.path(), &store, &db.url, extra_config).unwrap();
        let runner = setup.start(&[]).await.unwrap();
        let mut urls = vec![format!("http://{}", setup.address)];
        let standby = with_standby.then(|| {
            let standby_dir = tempfile::tempdir().unwrap();
            let s =
                RunnerSetup::new_with(standby_dir.path(), &store, &db.url, extra_config).unwrap();
            urls.push(format!("http://{}", s.address));
            (s, standby_dir)
        });
        let builder = BuilderProcess::start_urls("one", &urls, dir.path(), "", &[]).unwrap();
        let signal = StartSignal::new(dir.path(), "started").unwrap();
        let gate = Gate::new(dir.path(), "gate").unwrap();
        let counter = dir.path().join("built");
        let jobset = create_jobset(&db.pool).await.unwrap();
        let drvs = store
            .instantiate(&gated_job(&signal, &gate, &counter), &["long"])
            .await
            .unwrap();
        let ids = queue_builds(&db.pool, &store, jobset, &drvs, |_| Default::default())
            .await
            .unwrap();
        signal.started(LIMIT).await.unwrap();
        Site {
            db,
            _store: store,
            dir,
            setup,
            runner: Some(runner),
            standby,
            builder,
            gate,
            build: ids["long"],
            drv: drvs["long"].clone(),
        }
    }

    fn runner(&mut self) -> &mut RunnerProcess {
        self.runner.as_mut().expect("a runner")
    }

    /// (status, busy) of every step row of the build, in order.
    async fn step_rows(&self) -> Vec<(Option<i32>, i32)> {
        sqlx::query_as("select status, busy from BuildSteps where build = $1 order by stepnr")
            .bind(self.build)
            .fetch_all(&self.db.pool)
            .await
            .unwrap()
    }

    /// Waits until no step row of the build is busy.
    async fn no_step_busy(&self) {
        let mut listener = PgListener::connect_with(&self.db.pool).await.unwrap();
        listener.listen("step_finished").await.unwrap();
        let deadline = tokio::time::Instant::now() + LIMIT;
        while self.step_rows().await.iter().any(|(_, busy)| *busy != 0) {
            tokio::time::timeout_at(deadline, listener.recv())
                .await
                .expect("the step was not closed")
                .unwrap();
        }
    }

    /// Lets the build finish, waits for it to be recorded, and checks what
    /// every survived restart must leave: the build succeeded, one step
    /// row, built once, and the runner's log (kept under `hydra_data`)
    /// holds every tick once, in order.
    async fn finishes_as_if_nothing_happened(&self, hydra_data: &Path) {
        self.gate.open(LIMIT).await.unwrap();
        wait_finished(&self.db.pool, [self.build], LIMIT)
            .await
            .unwrap();
        let status: Option<i32> =
            sqlx::query_scalar("select buildStatus from Builds where id = $1")
                .bind(self.build)
                .fetch_one(&self.db.pool)
                .await
                .unwrap();
        assert_eq!(status, Some(0));
        assert_eq!(self.step_rows().await, [(Some(0), 0)], "one step row");
        let built = count_lines(&self.dir.path().join("built")).unwrap();
        assert_eq!(built.get("long"), Some(&1), "built once: {built:?}");
        let log = self.log(hydra_data);
        let ticks: Vec<&str> = log.lines().filter(|l| l.starts_with("tick ")).collect();
        let expected: Vec<String> = (1..=10).map(|i| format!("tick {i}")).collect();
        assert_eq!(ticks, expected, "the log whole and in order: {log:?}");
    }

    fn log(&self, hydra_data: &Path) -> String {
        let base = self.drv.rsplit('/').next().unwrap();
        let path = StorePath::from_base_name(base).unwrap();
        let logs = LogStore::new(hydra_data, LogCompression::default());
        let mut bytes = Vec::new();
        logs.open_at(&path, 0)
            .unwrap()
            .expect("the step has a log")
            .copy_to(&mut bytes)
            .unwrap();
        String::from_utf8_lossy(&bytes).into_owned()
    }
}

#[tokio::test]
async fn a_build_runs_on_while_its_runner_is_killed_and_restarted() {
    let mut site = Site::start("", false).await;
    site.runner.take().unwrap().kill().await.unwrap();
    site.builder
        .wait_for_line("lost the runner", LIMIT)
        .await
        .unwrap();
    let rows = site.step_rows().await;
    assert!(
        matches!(rows[..], [(None, busy)] if busy != 0),
        "the row stays busy: {rows:?}"
    );

    let mut runner = site.setup.launch(&[]).unwrap();
    runner
        .wait_for_line("1 attempts from before this start wait", LIMIT)
        .await
        .unwrap();
    runner
        .wait_for_line("re-adopted attempt", LIMIT)
        .await
        .unwrap();
    site.builder
        .wait_for_line("the runner re-adopted the job", LIMIT)
        .await
        .unwrap();
    site.finishes_as_if_nothing_happened(site.dir.path()).await;
}

#[tokio::test]
async fn a_runner_stopped_on_purpose_tells_builders_to_keep_building() {
    let mut site = Site::start("", false).await;
    let runner = site.runner.take().unwrap();
    runner.terminate().unwrap();
    let exit = runner.exit(LIMIT).await.unwrap();
    assert!(exit.status.success(), "{}", exit.output);
    site.builder
        .wait_for_line("the runner is stopping", LIMIT)
        .await
        .unwrap();
    let rows = site.step_rows().await;
    assert!(
        matches!(rows[..], [(None, busy)] if busy != 0),
        "a stop closes nothing: the row stays busy for the next runner: {rows:?}"
    );

    let mut runner = site.setup.start(&[]).await.unwrap();
    runner
        .wait_for_line("re-adopted attempt", LIMIT)
        .await
        .unwrap();
    site.finishes_as_if_nothing_happened(site.dir.path()).await;
}

#[tokio::test]
async fn builders_follow_a_hot_standby_and_it_re_adopts_their_builds() {
    let mut site = Site::start("", true).await;
    let (standby, standby_dir) = site.standby.take().unwrap();
    let mut second = standby.launch(&[]).unwrap();
    second
        .wait_for_line("standing by until its lock is free", LIMIT)
        .await
        .unwrap();

    site.runner.take().unwrap().kill().await.unwrap();
    second
        .wait_for_line("serving builders on", LIMIT)
        .await
        .unwrap();
    second
        .wait_for_line("re-adopted attempt", LIMIT)
        .await
        .unwrap();
    // The standby keeps its logs elsewhere: its copy started empty, and
    // the builder sent it the whole log again from its own disk.
    site.finishes_as_if_nothing_happened(standby_dir.path())
        .await;
}

#[tokio::test]
async fn a_build_cancelled_while_its_builder_was_away_is_dropped_when_it_returns() {
    let mut site = Site::start(
        "ping_interval_secs = 1\nping_timeout_secs = 3\nreconnect_grace_secs = 600",
        false,
    )
    .await;
    site.builder.freeze().unwrap();
    site.runner()
        .wait_for_line("builder left: no ping for 3 s", LIMIT)
        .await
        .unwrap();
    // Cancelled as Hydra's web interface does, while the builder is away.
    sqlx::query(
        "update Builds set finished = 1, buildStatus = 4, startTime = 1, stopTime = 1 where id = $1",
    )
    .bind(site.build)
    .execute(&site.db.pool)
    .await
    .unwrap();
    sqlx::query("notify builds_cancelled")
        .execute(&site.db.pool)
        .await
        .unwrap();
    site.no_step_busy().await;

    site.builder.thaw().unwrap();
    site.runner()
        .wait_for_line("declaring 1 held attempts: 0 re-adopted, 1 to drop", LIMIT)
        .await
        .unwrap();
    site.builder
        .wait_for_line("dropping the job", LIMIT)
        .await
        .unwrap();
    let rows = site.step_rows().await;
    assert_eq!(rows.len(), 1, "{rows:?}");
    assert_eq!(rows[0].0, Some(4), "closed as cancelled: {rows:?}");
    assert!(
        !site.dir.path().join("built").exists(),
        "the dropped build never finished"
    );
}

/// A runner killed while an output is uploading: the builder's next try
/// (to the restarted runner) reads the output again on a new daemon
/// connection, its old one being left inside the cut-off NAR, and the
/// build succeeds once, with its output whole in the runner's store.
#[tokio::test]
async fn an_upload_cut_off_by_a_killed_runner_is_sent_again_whole() {
    let db = TestDb::new().await;
    let store = NixStore::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let setup = RunnerSetup::new(dir.path(), &store, &db.url).unwrap();
    let runner = setup.start(&[]).await.unwrap();
    let mut builder = BuilderProcess::start("one", &setup.address.to_string(), dir.path()).unwrap();
    let jobset = create_jobset(&db.pool).await.unwrap();
    // 256 MiB: its import into the runner's store takes long enough for
    // the kill to land inside it.
    let drvs = store
        .instantiate(
            r#"with prelude; { big = mkDrv { name = "big"; script = "head -c 268435456 /dev/zero > $out"; }; }"#,
            &["big"],
        )
        .await
        .unwrap();
    let mut events = PgListener::connect_with(&db.pool).await.unwrap();
    events.listen("hqr_events_written").await.unwrap();
    let ids = queue_builds(&db.pool, &store, jobset, &drvs, |_| Default::default())
        .await
        .unwrap();
    let deadline = tokio::time::Instant::now() + LIMIT;
    loop {
        let uploading: bool = sqlx::query_scalar(
            "select exists (select 1 from hqr_events where kind = 'step_progress' and detail = 'receiving-outputs')",
        )
        .fetch_one(&db.pool)
        .await
        .unwrap();
        if uploading {
            break;
        }
        tokio::time::timeout_at(deadline, events.recv())
            .await
            .expect("the upload never began")
            .unwrap();
    }
    runner.kill().await.unwrap();
    builder
        .wait_for_line("delivery failed", LIMIT)
        .await
        .unwrap();
    let _runner = setup.start(&[]).await.unwrap();
    wait_finished(&db.pool, [ids["big"]], LIMIT).await.unwrap();
    let status: Option<i32> = sqlx::query_scalar("select buildStatus from Builds where id = $1")
        .bind(ids["big"])
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(status, Some(0));
    let out: String = sqlx::query_scalar("select path from BuildOutputs where build = $1")
        .bind(ids["big"])
        .fetch_one(&db.pool)
        .await
        .unwrap();
    let valid = store
        .run("nix-store", &["--verify-path", &out])
        .await
        .is_ok();
    assert!(valid, "the output in the runner's store is whole");
    let attempts: i64 = sqlx::query_scalar("select count(*) from hqr_attempts")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(
        attempts, 1,
        "built once: the job was re-adopted, not run again"
    );
}
