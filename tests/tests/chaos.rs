//! The farm hurt at random points while it builds a DAG with shared
//! dependencies (input-addressed and content-addressed): the runner
//! SIGKILLed and restarted again and again, one builder SIGKILLed and
//! restarted once, PostgreSQL stopped once (the runner dies, as the brief
//! says, and is restarted), then the run is left to finish. Every build
//! ends right, nothing is left busy, no attempt has two step rows, and a
//! counter outside the store (each derivation's builder appends its name
//! at the *end* of its build) shows that nothing was built twice: builders
//! keep building across runner restarts and the next runner re-adopts
//! their jobs, so only the builder's own kill may cut a finished build off
//! (it died before Nix registered the output), and only once per attempt
//! it lost.
//!
//! This is the short variant that runs in the suite. The soak runs more
//! builds and kills: `HQ_CHAOS_BUILDS=300 HQ_CHAOS_KILLS=50` (see the
//! README); `HQ_CHAOS_SEED` replays a run.

use std::collections::BTreeMap;
use std::time::Duration;

use hydra_testkit::process::{BuilderProcess, RunnerSetup, count_lines};
use hydra_testkit::{NixStore, PgCluster, create_jobset, queue_builds, wait_finished};
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
            "  n{i} = {make} {{ name = \"n{i}\"; script = \"{cat}echo {i} >> $out; echo n{i} >> {counter}\"; }};\n"
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

    // A cluster of the test's own: the test stops it.
    let cluster = PgCluster::start().unwrap();
    let url = cluster.url("postgres");
    let pool = hydra_db::connect(&url, 4).await.unwrap();
    hydra_db::migrate(&pool).await.unwrap();
    let store = NixStore::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let counter = dir.path().join("built");
    let setup = RunnerSetup::new(dir.path(), &store, &url).unwrap();
    let mut builders = [
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
    let jobset = create_jobset(&pool).await.unwrap();
    let ids = queue_builds(&pool, &store, jobset, &drvs, |_| Default::default())
        .await
        .unwrap();

    let builder_kill_at = rng.random_range(0..kills.max(1));
    let outage_at = rng.random_range(0..kills.max(1));
    let mut adopted = Vec::new();
    for k in 0..kills {
        let runner = setup.start(&[]).await.unwrap();
        // The kill lands wherever the runner happens to be: loading,
        // resolving, dispatching, receiving outputs, recording.
        let after = Duration::from_millis(rng.random_range(100..900));
        tokio::time::sleep(after).await;
        if k == builder_kill_at {
            let victim = rng.random_range(0..builders.len());
            println!(
                "chaos: builder {} killed and restarted",
                builders[victim].name
            );
            builders[victim].restart().await.unwrap();
        }
        if k == outage_at {
            println!("chaos: PostgreSQL stopped under the runner");
            cluster.stop().unwrap();
            let exit = runner.exit(Duration::from_secs(60)).await.unwrap();
            assert!(!exit.status.success(), "the runner dies with its database");
            cluster.start_again().unwrap();
            adopted.push(exit.output.matches("re-adopted attempt").count());
            continue;
        }
        let printed = runner.kill_and_collect().await.unwrap();
        adopted.push(
            printed
                .iter()
                .filter(|l| l.contains("re-adopted attempt"))
                .count(),
        );
    }
    let mut runner = setup.start(&[]).await.unwrap();
    let pool = hydra_db::connect(&url, 4).await.unwrap();
    wait_finished(&pool, ids.values().copied(), Duration::from_secs(600))
        .await
        .unwrap();
    adopted.push(
        runner
            .printed()
            .iter()
            .filter(|l| l.contains("re-adopted attempt"))
            .count(),
    );
    println!(
        "chaos: attempts re-adopted after each restart: {adopted:?} ({} in all)",
        adopted.iter().sum::<usize>()
    );
    let wrong: Vec<(String, Option<i32>)> =
        sqlx::query_as("select job, buildStatus from Builds where buildStatus is distinct from 0")
            .fetch_all(&pool)
            .await
            .unwrap();
    if !wrong.is_empty() {
        let why: Vec<(String, Option<i32>, Option<String>)> = sqlx::query_as(
            "select drvPath, status, errorMsg from BuildSteps where status not in (0, 3, 13) and propagatedFrom is null",
        )
        .fetch_all(&pool)
        .await
        .unwrap();
        panic!("seed {seed}: {wrong:?}; failed steps: {why:#?}");
    }
    let busy: Vec<(i32, i32, String, String, Option<uuid::Uuid>)> = sqlx::query_as(
        "select s.build, s.stepnr, s.drvPath, s.machine, a.id from BuildSteps s
           left join hqr_attempts a on a.build = s.build and a.stepnr = s.stepnr
          where s.busy != 0",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert!(busy.is_empty(), "seed {seed}: left busy: {busy:#?}");
    let shared_rows: i64 = sqlx::query_scalar(
        "select count(*) from (select 1 from hqr_attempts group by build, stepnr having count(*) > 1) d",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(shared_rows, 0, "seed {seed}: an attempt per step row");
    let twice: Vec<(String, i64)> = sqlx::query_as(
        "select drvPath, count(*) from BuildSteps where status = 0 and type = 0 group by drvPath having count(*) > 1",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    assert!(twice.is_empty(), "seed {seed}: succeeded twice: {twice:?}");

    // Attempts a builder lost by being killed may have built their
    // derivation to the end (the counter written, the output never
    // registered); nothing else may build anything twice.
    let lost: BTreeMap<String, i64> = sqlx::query_as::<_, (String, i64)>(
        "select substring(drvPath from '-(n[0-9]+)\\.drv$'), count(*) from BuildSteps
          where status = 3 and errorMsg like '%the builder restarted%' group by 1",
    )
    .fetch_all(&pool)
    .await
    .unwrap()
    .into_iter()
    .collect();
    let built = count_lines(&counter).unwrap();
    for job in &jobs {
        let times = built.get(*job).copied().unwrap_or(0) as i64;
        let cut_off = lost.get(*job).copied().unwrap_or(0);
        assert!(
            times >= 1 && times <= 1 + cut_off,
            "seed {seed}: {job} built {times} times, {cut_off} attempts lost with a builder"
        );
    }
    let twice = built.values().filter(|n| **n > 1).count();
    println!(
        "chaos: {} derivations built, {twice} twice (each after its builder was killed)",
        built.len()
    );
}
