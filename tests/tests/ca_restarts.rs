//! A runner killed (SIGKILL) in the middle of content-addressed
//! resolution rebuilds its state from PostgreSQL and its store, and ends
//! where an uninterrupted run would: every build right, no duplicate step
//! rows, and nothing built twice (a counter outside the store, which each
//! derivation's builder appends to, says how often each was built).

use std::collections::BTreeMap;
use std::time::Duration;

use hydra_testkit::process::{BuilderProcess, RunnerSetup, count_lines};
use hydra_testkit::{NixStore, TestDb, create_jobset, queue_builds, wait_finished};

const STOP_AT: &str = "HYDRA_QUEUE_RUNNER_STOP_AT";
const LIMIT: Duration = Duration::from_secs(90);

/// A CA chain a <- b <- c and an input-addressed d on top; every builder
/// records itself in `counter`. A chain, so that nothing else runs when
/// the runner is killed: a step cut off mid-build may rightly be built
/// again, and the counter would not say which.
fn jobset(counter: &str) -> String {
    format!(
        r#"with prelude; rec {{
          chain-a = mkCA {{ name = "chain-a"; script = "echo chain-a >> {counter}; echo a > $out"; }};
          chain-b = mkCA {{ name = "chain-b"; script = "echo chain-b >> {counter}; cat ${{chain-a}} > $out; echo b >> $out"; }};
          chain-c = mkCA {{ name = "chain-c"; script = "echo chain-c >> {counter}; cat ${{chain-b}} > $out; echo c >> $out"; }};
          chain-d = mkDrv {{ name = "chain-d"; script = "echo chain-d >> {counter}; cat ${{chain-c}} > $out"; }};
        }}"#
    )
}

const JOBS: [&str; 3] = ["chain-b", "chain-c", "chain-d"];

#[tokio::test]
async fn a_runner_killed_during_resolution_and_dispatch_ends_the_same() {
    let db = TestDb::new().await;
    let runner_store = NixStore::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let counter = dir.path().join("built");
    let setup = RunnerSetup::new(dir.path(), &runner_store, &db.url).unwrap();
    let _builders = [
        BuilderProcess::start("one", &setup.address, dir.path()).unwrap(),
        BuilderProcess::start("two", &setup.address, dir.path()).unwrap(),
    ];

    // First run: stops right after the first resolution is committed.
    let mut runner = setup
        .start(&[(STOP_AT, "resolution-recorded")])
        .await
        .unwrap();
    let jobset_id = create_jobset(&db.pool).await.unwrap();
    let drvs = runner_store
        .instantiate(&jobset(&counter.display().to_string()), &JOBS)
        .await
        .unwrap();
    let ids = queue_builds(&db.pool, &runner_store, jobset_id, &drvs, |_| {
        Default::default()
    })
    .await
    .unwrap();
    runner
        .wait_for_line("stopped at resolution-recorded", LIMIT)
        .await
        .unwrap();
    runner.kill().await.unwrap();
    let resolved_rows = resolutions(&db).await;
    assert!(!resolved_rows.is_empty(), "a resolution was recorded");

    // Second run: stops right after a resolved step's attempt is recorded,
    // before the job reaches a builder.
    let mut runner = setup
        .start(&[(STOP_AT, "dispatch-recorded:chain-c")])
        .await
        .unwrap();
    runner
        .wait_for_line("stopped at dispatch-recorded", LIMIT)
        .await
        .unwrap();
    runner.kill().await.unwrap();

    // Third run: to the end.
    let _runner = setup.start(&[]).await.unwrap();
    wait_finished(&db.pool, ids.values().copied(), LIMIT)
        .await
        .unwrap();

    let statuses: Vec<(String, Option<i32>)> =
        sqlx::query_as("select job, buildStatus from Builds order by job")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert!(statuses.iter().all(|(_, s)| *s == Some(0)), "{statuses:?}");
    // Every derivation was built exactly once, across three runners.
    let built = count_lines(&counter).unwrap();
    let once: BTreeMap<String, usize> = ["chain-a", "chain-b", "chain-c", "chain-d"]
        .into_iter()
        .map(|n| (n.to_owned(), 1))
        .collect();
    assert_eq!(built, once);
    // One status-13 row per build and derivation, however often resolved.
    let duplicates: Vec<(i32, String, i64)> = sqlx::query_as(
        "select build, drvPath, count(*) from BuildSteps where status = 13
          group by build, drvPath having count(*) > 1",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert!(duplicates.is_empty(), "{duplicates:?}");
    // The first resolution's row is the one the end state has.
    let after = resolutions(&db).await;
    assert!(resolved_rows.iter().all(|r| after.contains(r)), "{after:?}");
    // One success row per built derivation; the attempt cut off by the
    // second kill is closed as aborted, and nothing is left busy.
    let successes: Vec<(String, i64)> = sqlx::query_as(
        "select drvPath, count(*) from BuildSteps where status = 0 group by drvPath having count(*) > 1",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert!(successes.is_empty(), "{successes:?}");
    let busy: i64 = sqlx::query_scalar("select count(*) from BuildSteps where busy != 0")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(busy, 0);
    let aborted: Vec<String> =
        sqlx::query_scalar("select drvPath from BuildSteps where status = 3")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert_eq!(aborted.len(), 1, "{aborted:?}");
    assert!(aborted[0].ends_with("-chain-c.drv"));
    let attempts: i64 = sqlx::query_scalar(
        "select count(*) from (select build, stepnr from hqr_attempts group by build, stepnr having count(*) > 1) d",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(attempts, 0, "one step row per attempt");
}

/// (build, drvPath, resolvedDrvPath) of every status-13 row.
async fn resolutions(db: &TestDb) -> Vec<(i32, String, String)> {
    sqlx::query_as(
        "select build, drvPath, resolvedDrvPath from BuildSteps where status = 13 order by build, stepnr",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap()
}
