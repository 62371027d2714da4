//! The runner SIGKILLed at random points while it builds a DAG with shared
//! dependencies (input-addressed and content-addressed), restarted each
//! time, then left to finish: every build ends right, nothing is left busy,
//! no attempt has two step rows, and a counter outside the store (each
//! derivation's builder appends its name) shows that nothing whose success
//! was recorded is built again: a derivation is built at most once more
//! than it has aborted attempts (an attempt cut off by a kill may have
//! built it, and its outputs never reached the runner).
//!
//! This is the short variant that runs in the suite. The soak runs more
//! builds and kills: `HQ_CHAOS_BUILDS=400 HQ_CHAOS_KILLS=40` (see the
//! README); `HQ_CHAOS_SEED` replays a run.

use std::collections::BTreeMap;
use std::time::Duration;

use hydra_testkit::process::{BuilderProcess, RunnerSetup, count_lines};
use hydra_testkit::{NixStore, TestDb, create_jobset, queue_builds, wait_finished};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

fn setting(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// `n` derivations; each depends on up to three earlier ones, so early
/// ones are shared widely. Every fifth is content-addressed.
fn dag(n: usize, counter: &str, rng: &mut StdRng) -> String {
    let mut expr = String::from("with prelude; rec {\n");
    for i in 0..n {
        let deps: Vec<usize> = if i == 0 {
            Vec::new()
        } else {
            let k = rng.random_range(0..=3.min(i));
            (0..k).map(|_| rng.random_range(0..i)).collect()
        };
        let inputs: String = deps.iter().map(|d| format!(" ${{n{d}}}")).collect();
        let make = if i % 5 == 4 { "mkCA" } else { "mkDrv" };
        let cat = if deps.is_empty() {
            String::new()
        } else {
            format!("cat{inputs} > $out; ")
        };
        expr.push_str(&format!(
            "  n{i} = {make} {{ name = \"n{i}\"; script = \"echo n{i} >> {counter}; {cat}echo {i} >> $out\"; }};\n"
        ));
    }
    expr.push('}');
    expr
}

#[tokio::test]
async fn a_runner_killed_at_random_points_finishes_a_dag_right() {
    let builds = setting("HQ_CHAOS_BUILDS", 120) as usize;
    let kills = setting("HQ_CHAOS_KILLS", 8);
    let seed = setting("HQ_CHAOS_SEED", rand::random::<u32>() as u64);
    println!("chaos: {builds} builds, {kills} kills, HQ_CHAOS_SEED={seed}");
    let mut rng = StdRng::seed_from_u64(seed);

    let db = TestDb::new().await;
    let store = NixStore::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let counter = dir.path().join("built");
    let setup = RunnerSetup::new(dir.path(), &store, &db.url).unwrap();
    let _builders = [
        BuilderProcess::start("one", &setup.address, dir.path()).unwrap(),
        BuilderProcess::start("two", &setup.address, dir.path()).unwrap(),
    ];
    let jobs: Vec<String> = (0..builds).map(|i| format!("n{i}")).collect();
    let jobs: Vec<&str> = jobs.iter().map(String::as_str).collect();
    let drvs = store
        .instantiate(
            &dag(builds, &counter.display().to_string(), &mut rng),
            &jobs,
        )
        .await
        .unwrap();
    let jobset = create_jobset(&db.pool).await.unwrap();
    let ids = queue_builds(&db.pool, &store, jobset, &drvs, |_| Default::default())
        .await
        .unwrap();

    for _ in 0..kills {
        let runner = setup.start(&[]).await.unwrap();
        // The kill lands wherever the runner happens to be: loading,
        // resolving, dispatching, receiving outputs, recording.
        let after = Duration::from_millis(rng.random_range(100..900));
        tokio::time::sleep(after).await;
        runner.kill().await.unwrap();
    }
    let _runner = setup.start(&[]).await.unwrap();
    wait_finished(&db.pool, ids.values().copied(), Duration::from_secs(600))
        .await
        .unwrap();

    let wrong: Vec<(String, Option<i32>)> =
        sqlx::query_as("select job, buildStatus from Builds where buildStatus is distinct from 0")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    if !wrong.is_empty() {
        let why: Vec<(String, Option<i32>, Option<String>)> = sqlx::query_as(
            "select drvPath, status, errorMsg from BuildSteps where status not in (0, 3, 13) and propagatedFrom is null",
        )
        .fetch_all(&db.pool)
        .await
        .unwrap();
        panic!("seed {seed}: {wrong:?}; failed steps: {why:#?}");
    }
    let busy: i64 = sqlx::query_scalar("select count(*) from BuildSteps where busy != 0")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(busy, 0, "seed {seed}");
    let shared_rows: i64 = sqlx::query_scalar(
        "select count(*) from (select 1 from hqr_attempts group by build, stepnr having count(*) > 1) d",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(shared_rows, 0, "seed {seed}: an attempt per step row");
    let twice: Vec<(String, i64)> = sqlx::query_as(
        "select drvPath, count(*) from BuildSteps where status = 0 and type = 0 group by drvPath having count(*) > 1",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap();
    assert!(twice.is_empty(), "seed {seed}: succeeded twice: {twice:?}");

    let aborted: BTreeMap<String, i64> = sqlx::query_as::<_, (String, i64)>(
        "select substring(drvPath from '-(n[0-9]+)\\.drv$'), count(*) from BuildSteps
          where status = 3 group by 1",
    )
    .fetch_all(&db.pool)
    .await
    .unwrap()
    .into_iter()
    .collect();
    let built = count_lines(&counter).unwrap();
    for job in &jobs {
        let times = built.get(*job).copied().unwrap_or(0) as i64;
        let cut_off = aborted.get(*job).copied().unwrap_or(0);
        assert!(
            times >= 1 && times <= 1 + cut_off,
            "seed {seed}: {job} built {times} times with {cut_off} aborted attempts"
        );
    }
}
