//! The build pipeline end to end: PostgreSQL, the runner, builders with
//! stores of their own, real Nix. Each test is a specification of what
//! Hydra would record.

use std::collections::BTreeMap;
use std::time::Duration;

use hydra_testkit::{BuilderSpec, Farm};

/// type, subtype, fileSize, sha256hash, name
type ProductRow = (String, String, Option<i64>, Option<String>, String);

const LIMIT: Duration = Duration::from_secs(30);

/// Hydra's test jobsets in miniature.
const JOBSET: &str = r#"with prelude; rec {
  empty-dir = mkDrv { name = "empty-dir"; script = "mkdir $out"; };
  fails = mkDrv { name = "fails"; script = "echo going to fail; exit 1"; };
  depends-on-fail = mkDrv { name = "depends-on-fail"; script = "cat ${fails} > $out"; };
  succeed-with-failed = mkDrv { name = "succeed-with-failed"; script = "mkdir -p $out/nix-support; touch $out/nix-support/failed"; };
  chain-a = mkDrv { name = "chain-a"; script = "echo a > $out"; };
  chain-b = mkDrv { name = "chain-b"; script = "cat ${chain-a} > $out; echo b >> $out"; };
  chain-c = mkDrv { name = "chain-c"; script = "echo building chain-c; cat ${chain-b} > $out; echo c >> $out"; };
  multi = mkDrv { name = "multi"; outputs = [ "out" "dev" "doc" ]; script = "mkdir -p $out $dev $doc; echo lib > $out/lib; echo ${chain-a} > $dev/uses-a; echo doc > $doc/index"; };
  products = mkDrv {
    name = "products";
    script = ''
      mkdir -p $out/nix-support
      echo hello > $out/report.txt
      echo "file report $out/report.txt" > $out/nix-support/hydra-build-products
      echo "lines 3 count" > $out/nix-support/hydra-metrics
      echo "products-1.0" > $out/nix-support/hydra-release-name
    '';
  };
  kvm-job = mkDrv { name = "kvm-job"; requiredSystemFeatures = [ "kvm" ]; script = "echo kvm > $out"; };
}"#;

const JOBS: [&str; 8] = [
    "empty-dir",
    "fails",
    "depends-on-fail",
    "succeed-with-failed",
    "chain-c",
    "multi",
    "products",
    "kvm-job",
];

async fn farm_with_two_builders() -> Farm {
    let mut farm = Farm::start(|_| {}).await.expect("farm");
    farm.add_builder(BuilderSpec::new("plain").max_jobs(2))
        .await
        .unwrap();
    farm.add_builder(BuilderSpec::new("kvm-builder").features(&["kvm"]))
        .await
        .unwrap();
    farm
}

async fn rows<T: for<'r> sqlx::FromRow<'r, sqlx::postgres::PgRow> + Send + Unpin>(
    farm: &Farm,
    sql: &str,
    build: i32,
) -> Vec<T> {
    sqlx::query_as(sql)
        .bind(build)
        .fetch_all(&farm.db.pool)
        .await
        .unwrap()
}

/// Instantiates `jobs` of `expr` in the runner's store, queues one build
/// of each and waits until they have finished: their derivations and
/// build ids, by job.
async fn instantiate_and_build(
    farm: &Farm,
    expr: &str,
    jobs: &[&str],
) -> (BTreeMap<String, String>, BTreeMap<String, i32>) {
    let drvs = farm.runner_store.instantiate(expr, jobs).await.unwrap();
    let ids = farm.queue(&drvs, |_| Default::default()).await.unwrap();
    farm.wait_finished(ids.values().copied(), LIMIT)
        .await
        .unwrap();
    (drvs, ids)
}

/// The one number `sql` (with no parameters) answers.
async fn number(farm: &Farm, sql: &str) -> i64 {
    sqlx::query_scalar(sql)
        .fetch_one(&farm.db.pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn a_jobset_ends_with_the_statuses_outputs_and_steps_hydra_writes() {
    let farm = farm_with_two_builders().await;
    let ids = farm.submit(JOBSET, &JOBS).await.unwrap();
    farm.wait_finished(ids.values().copied(), LIMIT)
        .await
        .unwrap();

    let statuses = farm.statuses(&ids).await.unwrap();
    let expected: BTreeMap<String, (i32, i32)> = [
        ("empty-dir", 0),
        ("fails", 1),
        ("depends-on-fail", 2),
        ("succeed-with-failed", 6),
        ("chain-c", 0),
        ("multi", 0),
        ("products", 0),
        ("kvm-job", 0),
    ]
    .into_iter()
    .map(|(j, s)| (j.to_owned(), (s, 0)))
    .collect();
    assert_eq!(statuses, expected);

    // The chain's build records all three steps, each succeeded, busy 0.
    let chain: Vec<(i32, i32, i32, Option<i32>, String)> = rows(
        &farm,
        "select stepnr, type, busy, status, machine from BuildSteps where build = $1 order by stepnr",
        ids["chain-c"],
    )
    .await;
    assert_eq!(chain.len(), 3, "{chain:?}");
    assert!(chain.iter().all(|(_, ty, busy, status, m)| *ty == 0
        && *busy == 0
        && *status == Some(0)
        && !m.is_empty()));

    // The failure is recorded once with its log and propagated, with
    // propagatedFrom, to the other build that needed the step (which of
    // the two owns the real row depends on which was loaded first).
    let (fails, dependent) = (ids["fails"], ids["depends-on-fail"]);
    let mut failed_rows: Vec<(i32, Option<i32>, Option<i32>)> = sqlx::query_as(
        "select build, status, propagatedFrom from BuildSteps where drvPath like '%-fails.drv' order by build",
    )
    .fetch_all(&farm.db.pool)
    .await
    .unwrap();
    failed_rows.sort_by_key(|r| r.2.is_some());
    assert_eq!(failed_rows.len(), 2, "{failed_rows:?}");
    let (owner, other) = (failed_rows[0].0, failed_rows[1].0);
    assert_eq!(failed_rows[0].1, Some(1));
    assert_eq!(failed_rows[1], (other, Some(1), Some(owner)));
    assert_eq!(
        [owner.min(other), owner.max(other)],
        [fails.min(dependent), fails.max(dependent)]
    );

    // Every output path is what Nix itself computes for the derivation.
    let outputs: Vec<(String, Option<String>)> = rows(
        &farm,
        "select name, path from BuildOutputs where build = $1 order by name",
        ids["multi"],
    )
    .await;
    assert_eq!(outputs.len(), 3);
    for (name, path) in &outputs {
        let path = path.as_ref().expect("output path recorded");
        let valid = farm
            .runner_store
            .run("nix-store", &["--check-validity", path])
            .await;
        assert!(valid.is_ok(), "{name}: {path} is not in the runner's store");
    }
    let step_outputs: i64 = sqlx::query_scalar(
        "select count(*) from BuildStepOutputs where build = $1 and path is not null",
    )
    .bind(ids["multi"])
    .fetch_one(&farm.db.pool)
    .await
    .unwrap();
    assert_eq!(
        step_outputs, 3,
        "multi's own step; its input chain-a is recorded once, in the chain's build"
    );

    // Size, closure size, products, metrics and release name.
    let (size, closure, release): (Option<i64>, Option<i64>, Option<String>) =
        sqlx::query_as("select size, closureSize, releaseName from Builds where id = $1")
            .bind(ids["products"])
            .fetch_one(&farm.db.pool)
            .await
            .unwrap();
    assert!(size.unwrap() > 0 && closure.unwrap() >= size.unwrap());
    assert_eq!(release.as_deref(), Some("products-1.0"));
    let products: Vec<ProductRow> = rows(
        &farm,
        "select type, subtype, fileSize, sha256hash, name from BuildProducts where build = $1",
        ids["products"],
    )
    .await;
    assert_eq!(products.len(), 1);
    assert_eq!(
        products[0],
        (
            "file".into(),
            "report".into(),
            Some(6),
            Some("5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03".into()),
            "report.txt".into()
        )
    );
    let metrics: Vec<(String, Option<String>, f64, String)> = rows(
        &farm,
        "select name, unit, value, job from BuildMetrics where build = $1",
        ids["products"],
    )
    .await;
    assert_eq!(
        metrics,
        vec![("lines".into(), Some("count".into()), 3.0, "products".into())]
    );
    let empty_dir_products: Vec<(String, String)> = rows(
        &farm,
        "select type, name from BuildProducts where build = $1",
        ids["empty-dir"],
    )
    .await;
    assert_eq!(
        empty_dir_products,
        vec![("nix-build".into(), "empty-dir".into())]
    );

    // The feature-requiring step ran only where the feature is offered.
    let kvm: Vec<(String,)> = rows(
        &farm,
        "select machine from BuildSteps where build = $1",
        ids["kvm-job"],
    )
    .await;
    assert_eq!(kvm, vec![("kvm-builder".into(),)]);

    // Finished builds carry start/stop times and a pending notification.
    let unstamped: i64 = number(&farm, "select count(*) from Builds where startTime is null or stopTime is null or notificationPendingSince is null").await;
    assert_eq!(unstamped, 0);
    let busy: i64 = number(&farm, "select count(*) from BuildSteps where busy != 0").await;
    assert_eq!(busy, 0);
}

const SHARED: &str = r#"with prelude; rec {
  shared = mkDrv { name = "shared"; script = "echo building shared; echo shared > $out"; };
  left = mkDrv { name = "left"; script = "cat ${shared} > $out; echo left >> $out"; };
  right = mkDrv { name = "right"; script = "cat ${shared} > $out; echo right >> $out"; };
  fails = mkDrv { name = "fails"; script = "echo going to fail; exit 1"; };
}"#;

/// Submits `left` and `right` of [`SHARED`] and waits until both have
/// succeeded.
async fn build_left_and_right(farm: &Farm) {
    let ids = farm.submit(SHARED, &["left", "right"]).await.unwrap();
    farm.wait_finished(ids.values().copied(), LIMIT)
        .await
        .unwrap();
    assert_eq!(
        farm.statuses(&ids)
            .await
            .unwrap()
            .values()
            .collect::<Vec<_>>(),
        [&(0, 0), &(0, 0)]
    );
}

/// How many attempts the shared step of [`SHARED`] had.
async fn attempts_at_shared(farm: &Farm) -> i64 {
    number(
        farm,
        "select count(*) from hqr_attempts where drv_path like '%-shared.drv'",
    )
    .await
}

#[tokio::test]
async fn two_builds_sharing_a_dependency_build_it_once() {
    let farm = farm_with_two_builders().await;
    build_left_and_right(&farm).await;
    assert_eq!(attempts_at_shared(&farm).await, 1);
    let rows: i64 = number(
        &farm,
        "select count(*) from BuildSteps where drvPath like '%-shared.drv'",
    )
    .await;
    assert_eq!(rows, 1, "the shared step is recorded in one build");
}

/// A conflict PostgreSQL reports (serialization failure, deadlock) asks
/// for the statement again: every writer of build steps (dispatch, the
/// progress writer, the completion) runs it again, and the builds finish
/// as if nothing happened rather than the runner stopping.
#[tokio::test]
async fn conflicts_on_build_steps_are_retried_and_cost_no_build() {
    let farm = farm_with_two_builders().await;
    // The first row write of each kind to BuildSteps fails as a
    // serialization failure would: a dispatch's insert, a progress
    // report's update, a completion's close (a sequence per kind counts
    // the writes, and is not rolled back with them).
    for sql in [
        "create sequence hq_test_dispatch",
        "create sequence hq_test_progress",
        "create sequence hq_test_close",
        "create function hq_test_conflict() returns trigger language plpgsql as $$
         declare kind text := case when TG_OP = 'INSERT' then 'dispatch'
                                   when new.busy = 0 then 'close' else 'progress' end;
         begin
           if nextval(('hq_test_' || kind)::regclass) = 1 then
             raise exception 'injected conflict on a %', kind using errcode = '40001';
           end if;
           return new;
         end $$",
        "create trigger hq_test_conflict before insert or update on BuildSteps
         for each row execute function hq_test_conflict()",
    ] {
        sqlx::query(sql).execute(&farm.db.pool).await.unwrap();
    }
    build_left_and_right(&farm).await;
    for kind in ["dispatch", "progress", "close"] {
        let writes: i64 = sqlx::query_scalar(&format!("select last_value from hq_test_{kind}"))
            .fetch_one(&farm.db.pool)
            .await
            .unwrap();
        assert!(
            writes >= 2,
            "a {kind} met its conflict and was written after it ({writes} tries)"
        );
    }
    let unfinished: i64 = number(
        &farm,
        "select count(*) from BuildSteps where busy <> 0 or status is distinct from 0",
    )
    .await;
    assert_eq!(unfinished, 0, "every step closed as succeeded");
    assert_eq!(
        attempts_at_shared(&farm).await,
        1,
        "the shared step was built once: a retried write repeats no build"
    );
}

#[tokio::test]
async fn a_second_evaluation_finishes_as_cached_builds_without_building() {
    let farm = farm_with_two_builders().await;
    let (drvs, _) = instantiate_and_build(&farm, SHARED, &["left", "right", "fails"]).await;
    let attempts_before: i64 = number(&farm, "select count(*) from hqr_attempts").await;

    let second = farm.queue(&drvs, |_| Default::default()).await.unwrap();
    farm.wait_finished(second.values().copied(), LIMIT)
        .await
        .unwrap();
    let statuses = farm.statuses(&second).await.unwrap();
    assert_eq!(statuses["left"], (0, 1));
    assert_eq!(statuses["right"], (0, 1));
    assert_eq!(statuses["fails"], (1, 1), "a cached failure (FailedPaths)");
    let attempts_after: i64 = number(&farm, "select count(*) from hqr_attempts").await;
    assert_eq!(attempts_after, attempts_before, "nothing was built again");
    let steps: Vec<(i32, Option<i32>)> =
        sqlx::query_as("select build, status from BuildSteps where build = any($1) order by build")
            .bind(second.values().copied().collect::<Vec<_>>())
            .fetch_all(&farm.db.pool)
            .await
            .unwrap();
    assert_eq!(
        steps,
        vec![(second["fails"], Some(8))],
        "Hydra writes a step row only for the cached failure"
    );
    let (size, outputs): (Option<i64>, Option<String>) = sqlx::query_as(
        "select b.size, o.path from Builds b join BuildOutputs o on o.build = b.id where b.id = $1",
    )
    .bind(second["left"])
    .fetch_one(&farm.db.pool)
    .await
    .unwrap();
    assert!(size.unwrap() > 0);
    assert!(outputs.unwrap().ends_with("-left"));
}

#[tokio::test]
async fn logs_of_successful_and_failed_steps_are_kept() {
    let farm = farm_with_two_builders().await;
    let (drvs, _) = instantiate_and_build(&farm, SHARED, &["shared", "fails"]).await;
    let ok = farm
        .log_of(&drvs["shared"])
        .unwrap()
        .expect("a log for the successful step");
    assert!(ok.contains("building shared"), "{ok}");
    let failed = farm
        .log_of(&drvs["fails"])
        .unwrap()
        .expect("a log for the failed step");
    assert!(failed.contains("going to fail"), "{failed}");
    // Finished logs are compressed where hydra-web finds them.
    let compressed = farm.hydra_data.path().join("build-logs");
    let count = walk(&compressed)
        .into_iter()
        .filter(|p| p.extension().is_some_and(|e| e == "zst"))
        .count();
    assert_eq!(count, 2);
}

fn walk(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = entry.path();
        if p.is_dir() {
            out.extend(walk(&p));
        } else {
            out.push(p);
        }
    }
    out
}

#[tokio::test]
async fn a_restarted_build_is_loaded_alone_and_built_again() {
    let farm = farm_with_two_builders().await;
    // Fails until a marker file exists: the restart then succeeds.
    let marker = std::env::temp_dir().join(format!("restart-marker-{}", std::process::id()));
    let _ = std::fs::remove_file(&marker);
    let expr = format!(
        r#"with prelude; {{ flaky = mkDrv {{ name = "flaky"; __noChroot = true; script = "test -e {} && echo ok > $out"; }}; }}"#,
        marker.display()
    );
    let ids = farm.submit(&expr, &["flaky"]).await.unwrap();
    farm.wait_finished(ids.values().copied(), LIMIT)
        .await
        .unwrap();
    assert_eq!(farm.statuses(&ids).await.unwrap()["flaky"], (1, 0));

    std::fs::write(&marker, "").unwrap();
    // Restart as Hydra's web interface does: forget the failure, reopen.
    sqlx::raw_sql(&format!(
        "delete from FailedPaths where path in (select path from BuildOutputs where build = {id});
         update Builds set finished = 0, buildStatus = null where id = {id};
         notify builds_restarted;",
        id = ids["flaky"]
    ))
    .execute(&farm.db.pool)
    .await
    .unwrap();
    farm.wait_finished(ids.values().copied(), LIMIT)
        .await
        .unwrap();
    assert_eq!(farm.statuses(&ids).await.unwrap()["flaky"], (0, 0));
    let steps: Vec<(i32, Option<i32>)> =
        sqlx::query_as("select stepnr, status from BuildSteps where build = $1 order by stepnr")
            .bind(ids["flaky"])
            .fetch_all(&farm.db.pool)
            .await
            .unwrap();
    assert_eq!(steps, vec![(1, Some(1)), (2, Some(0))]);
    let _ = std::fs::remove_file(&marker);
}

#[tokio::test]
async fn a_running_step_shows_the_builders_progress_in_busy() {
    let farm = farm_with_two_builders().await;
    let marker = std::env::temp_dir().join(format!("busy-marker-{}", std::process::id()));
    let _ = std::fs::remove_file(&marker);
    let expr = format!(
        r#"with prelude; {{ waits = mkDrv {{ name = "waits"; __noChroot = true; script = "while [ ! -e {} ]; do sleep 0.05; done; echo ok > $out"; }}; }}"#,
        marker.display()
    );
    let ids = farm.submit(&expr, &["waits"]).await.unwrap();
    // No notification carries progress (Hydra has none): poll the row
    // until the builder says it is building, within a deadline.
    let deadline = tokio::time::Instant::now() + LIMIT;
    loop {
        let busy: Option<i32> = sqlx::query_scalar("select busy from BuildSteps where build = $1")
            .bind(ids["waits"])
            .fetch_optional(&farm.db.pool)
            .await
            .unwrap();
        if busy == Some(30) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "busy never reached 30 (building): {busy:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    std::fs::write(&marker, "").unwrap();
    farm.wait_finished(ids.values().copied(), LIMIT)
        .await
        .unwrap();
    let (busy, status): (i32, Option<i32>) =
        sqlx::query_as("select busy, status from BuildSteps where build = $1")
            .bind(ids["waits"])
            .fetch_one(&farm.db.pool)
            .await
            .unwrap();
    assert_eq!((busy, status), (0, Some(0)));
    let _ = std::fs::remove_file(&marker);
}

/// A dependent goes to the machine that built its input (it holds it, so
/// nothing is fetched), even when a faster machine is free; its
/// dependent in turn follows it there.
#[tokio::test]
async fn a_step_follows_its_input_to_the_machine_that_built_it() {
    const CHAIN: &str = r#"with prelude; rec {
      first = mkDrv { name = "first"; requiredSystemFeatures = [ "kvm" ]; script = "echo first > $out"; };
      second = mkDrv { name = "second"; script = "cat ${first} > $out; echo second >> $out"; };
      third = mkDrv { name = "third"; script = "cat ${second} > $out; echo third >> $out"; };
    }"#;
    let mut farm = Farm::start(|_| {}).await.expect("farm");
    farm.add_builder(BuilderSpec::new("near").features(&["kvm"]))
        .await
        .unwrap();
    farm.add_builder(BuilderSpec::new("fast").speed(4.0))
        .await
        .unwrap();
    let ids = farm.submit(CHAIN, &["third"]).await.unwrap();
    farm.wait_finished(ids.values().copied(), LIMIT)
        .await
        .unwrap();
    assert_eq!(farm.statuses(&ids).await.unwrap()["third"], (0, 0));
    let machines: Vec<(String, String)> = rows(
        &farm,
        "select substring(drvPath from '[^-]*$'), machine from BuildSteps
          where build = $1 order by stepnr",
        ids["third"],
    )
    .await;
    assert_eq!(
        machines,
        [
            ("first.drv".to_owned(), "near".to_owned()),
            ("second.drv".to_owned(), "near".to_owned()),
            ("third.drv".to_owned(), "near".to_owned()),
        ],
        "the chain stays where its inputs are, though 'fast' is faster and free"
    );
    let fetched: i64 = number(&farm, "select count(*) from hqr_events where kind = 'step_progress' and detail = 'sending-inputs'").await;
    assert_eq!(fetched, 0, "no step fetched an input from the runner");
}

/// A step whose inputs are all on another machine fetches them from the
/// runner, references first: small ones read whole while the one before
/// imports, a large one streamed between them. The builder's store then
/// holds every input with the runner's NAR hash and references.
#[tokio::test]
async fn a_step_fetches_many_inputs_that_refer_to_each_other_intact() {
    let mut expr = String::from(
        r#"with prelude; rec {
      a = mkDrv { name = "a"; requiredSystemFeatures = [ "kvm" ]; script = "echo a > $out"; };
      b = mkDrv { name = "b"; requiredSystemFeatures = [ "kvm" ]; script = "echo ${a} > $out"; };
      c = mkDrv { name = "c"; requiredSystemFeatures = [ "kvm" ]; script = "echo ${b} > $out"; };
      big = mkDrv { name = "big"; requiredSystemFeatures = [ "kvm" ]; script = "echo ${c} > $out; head -c 3000000 /dev/zero >> $out"; };
      after-big = mkDrv { name = "after-big"; requiredSystemFeatures = [ "kvm" ]; script = "echo ${big} > $out"; };
"#,
    );
    let leaves: Vec<String> = (0..24).map(|i| format!("leaf{i}")).collect();
    for (i, leaf) in leaves.iter().enumerate() {
        // Every third leaf refers to the chain's end: imported after it.
        let refers = if i % 3 == 0 { "${c} " } else { "" };
        expr.push_str(&format!(
            "      {leaf} = mkDrv {{ name = \"{leaf}\"; requiredSystemFeatures = [ \"kvm\" ]; script = \"echo {refers}{i} > $out\"; }};\n"
        ));
    }
    let every: Vec<String> = ["a", "b", "c", "big", "after-big"]
        .iter()
        .map(|s| s.to_string())
        .chain(leaves.iter().cloned())
        .collect();
    let uses: Vec<String> = every.iter().map(|n| format!("${{{n}}}")).collect();
    expr.push_str(&format!(
        "      top = mkDrv {{ name = \"top\"; requiredSystemFeatures = [ \"big-parallel\" ]; script = \"echo {} > $out\"; }};\n    }}",
        uses.join(" ")
    ));
    let mut farm = Farm::start(|_| {}).await.expect("farm");
    farm.add_builder(BuilderSpec::new("near").features(&["kvm"]))
        .await
        .unwrap();
    farm.add_builder(BuilderSpec::new("far").features(&["big-parallel"]))
        .await
        .unwrap();
    let (_, ids) = instantiate_and_build(&farm, &expr, &["top"]).await;
    assert_eq!(farm.statuses(&ids).await.unwrap()["top"], (0, 0));
    let top_machine: Vec<(String,)> = rows(
        &farm,
        "select machine from BuildSteps where build = $1 and drvPath like '%-top.drv'",
        ids["top"],
    )
    .await;
    assert_eq!(top_machine, [("far".to_owned(),)]);

    let mut runner = hydra_nix::daemon::DaemonClient::connect(farm.runner_store.socket())
        .await
        .unwrap();
    let out: String = sqlx::query_scalar("select path from BuildOutputs where build = $1")
        .bind(ids["top"])
        .fetch_one(&farm.db.pool)
        .await
        .unwrap();
    let closure = runner
        .query_closure(std::slice::from_ref(&out))
        .await
        .unwrap();
    assert_eq!(
        closure.len(),
        every.len() + 1,
        "top's output refers to every input"
    );
    let far = &farm.builders[1];
    assert_eq!(far.spec.name, "far");
    let mut there = hydra_nix::daemon::DaemonClient::connect(far.store.socket())
        .await
        .unwrap();
    for (path, info) in &closure {
        let copy = there
            .query_path_info(path)
            .await
            .unwrap()
            .unwrap_or_else(|| panic!("{path} is not on the builder that used it"));
        assert_eq!(
            (&copy.nar_hash, &copy.references, copy.nar_size),
            (&info.nar_hash, &info.references, info.nar_size),
            "{path}"
        );
    }
    let big = closure
        .values()
        .find(|i| {
            i.path
                .split_once('-')
                .is_some_and(|(_, name)| name == "big")
        })
        .unwrap();
    assert!(
        big.nar_size > 1 << 20,
        "the large input is streamed, not held whole"
    );
}

/// With `run_ahead`, a dependent may start on the builder before its
/// input's outputs reach the runner; a chain whose every output refers to
/// its input is still imported references first and built once a step:
/// no step row but the successful one, and the runner's store knows each
/// output's reference.
#[tokio::test]
async fn a_chain_that_runs_ahead_is_imported_references_first_and_built_once() {
    const CHAIN: &str = r#"with prelude; rec {
      one = mkDrv { name = "one"; script = "echo one > $out"; };
      two = mkDrv { name = "two"; script = "echo ${one} > $out"; };
      three = mkDrv { name = "three"; script = "echo ${two} > $out"; };
      four = mkDrv { name = "four"; script = "echo ${three} > $out"; };
    }"#;
    let mut farm = Farm::start(|c| assert!(c.run_ahead, "on by default"))
        .await
        .expect("farm");
    farm.add_builder(BuilderSpec::new("solo").max_jobs(2))
        .await
        .unwrap();
    let ids = farm.submit(CHAIN, &["four"]).await.unwrap();
    farm.wait_finished(ids.values().copied(), LIMIT)
        .await
        .unwrap();
    assert_eq!(farm.statuses(&ids).await.unwrap()["four"], (0, 0));
    let steps: Vec<(String, Option<i32>)> = rows(
        &farm,
        "select substring(drvPath from '[^-]*$'), status from BuildSteps
          where build = $1 order by stepnr",
        ids["four"],
    )
    .await;
    let mut names: Vec<&str> = steps.iter().map(|(n, _)| n.as_str()).collect();
    names.sort();
    assert_eq!(
        names,
        ["four.drv", "one.drv", "three.drv", "two.drv"],
        "{steps:?}"
    );
    assert!(steps.iter().all(|(_, s)| *s == Some(0)), "{steps:?}");
    let (top,): (String,) = sqlx::query_as("select path from BuildOutputs where build = $1")
        .bind(ids["four"])
        .fetch_one(&farm.db.pool)
        .await
        .unwrap();
    let mut path = top;
    for _ in 0..3 {
        let refs = farm
            .runner_store
            .run("nix-store", &["--query", "--references", &path])
            .await
            .unwrap();
        let input = String::from_utf8(farm.runner_store.read_store_file(&path).await.unwrap())
            .unwrap()
            .trim()
            .to_owned();
        assert_eq!(refs.trim(), input, "{path} refers to its input");
        path = input;
    }
}

/// A real builder is sent the dependent while its input still builds
/// there (it starts it once the input is built): the dependent's step row
/// appears while the input's is still busy, and both build once, right.
#[tokio::test]
async fn a_dependent_is_sent_while_its_input_builds_and_starts_after_it() {
    const SLOW_CHAIN: &str = r#"with prelude; rec {
      base = mkDrv { name = "base"; script = "sleep 2; echo base > $out"; };
      top = mkDrv { name = "top"; script = "cat ${base} > $out"; };
    }"#;
    let mut farm = Farm::start(|_| {}).await.expect("farm");
    farm.add_builder(BuilderSpec::new("solo").max_jobs(2))
        .await
        .unwrap();
    let ids = farm.submit(SLOW_CHAIN, &["top"]).await.unwrap();
    let base_busy_when_top_sent = hydra_testkit::eventually(LIMIT, || async {
        let rows: Vec<(String, i32)> = rows(
            &farm,
            "select substring(drvPath from '[^-]*$'), busy from BuildSteps where build = $1",
            ids["top"],
        )
        .await;
        let busy = |name: &str| rows.iter().find(|(n, _)| n == name).map(|(_, b)| *b != 0);
        Ok(busy("top.drv").map(|_| busy("base.drv")))
    })
    .await
    .unwrap();
    assert_eq!(
        base_busy_when_top_sent,
        Some(true),
        "the dependent was sent while its input was building"
    );
    farm.wait_finished(ids.values().copied(), LIMIT)
        .await
        .unwrap();
    assert_eq!(farm.statuses(&ids).await.unwrap()["top"], (0, 0));
    let steps: Vec<(String, Option<i32>)> = rows(
        &farm,
        "select substring(drvPath from '[^-]*$'), status from BuildSteps
          where build = $1 order by stepnr",
        ids["top"],
    )
    .await;
    assert_eq!(
        steps,
        [("base.drv".into(), Some(0)), ("top.drv".into(), Some(0))],
        "each built once"
    );
    let (out,): (String,) = sqlx::query_as("select path from BuildOutputs where build = $1")
        .bind(ids["top"])
        .fetch_one(&farm.db.pool)
        .await
        .unwrap();
    let contents = farm.runner_store.read_store_file(&out).await.unwrap();
    assert_eq!(contents, b"base\n", "built from its input's output");
}

/// Builders' progress goes to PostgreSQL in batches: within one, each
/// step ends with its last code, in order; a code a step has already, a
/// finished step and a step that is gone change nothing; only what
/// changed is an event; and an event is timed when its report came, not
/// when its batch was written.
#[tokio::test]
async fn progress_written_in_a_batch_changes_running_steps_only_and_in_order() {
    use hydra_queue_runner::events::{Kind, NewEvent};
    use hydra_queue_runner::record::{ProgressUpdate, set_steps_progress};
    let farm = Farm::start(|_| {}).await.expect("farm");
    let pool = &farm.db.pool;
    // A finished build, which the runner leaves alone, with three steps:
    // preparing, building, finished.
    let build: i32 = sqlx::query_scalar(
        "insert into Builds (finished, timestamp, jobset_id, job, drvPath, system, startTime, stopTime, buildStatus)
         values (1, 0, $1, 'progress', '/nix/store/x-progress.drv', 'x86_64-linux', 1, 1, 0) returning id",
    )
    .bind(farm.jobset_id)
    .fetch_one(pool)
    .await
    .unwrap();
    for (stepnr, busy) in [(1, 1), (2, 30), (3, 0)] {
        sqlx::query(
            "insert into BuildSteps (build, stepnr, type, drvPath, busy) values ($1, $2, 0, $3, $4)",
        )
        .bind(build)
        .bind(stepnr)
        .bind(format!("/nix/store/x-step{stepnr}.drv"))
        .bind(busy)
        .execute(pool)
        .await
        .unwrap();
    }
    let update = |stepnr: i32, busy: i32, phase: &str| ProgressUpdate {
        build,
        stepnr,
        busy,
        event: NewEvent::new(Kind::StepProgress, vec![build])
            .drv(format!("/nix/store/x-step{stepnr}.drv"))
            .detail(phase),
        received: std::time::Instant::now(),
    };
    let codes = || {
        rows::<(i32, i32)>(
            &farm,
            "select stepnr, busy from BuildSteps where build = $1 order by stepnr",
            build,
        )
    };
    // (derivation, phase) of every progress event of the build, in order.
    let events = || {
        rows::<(String, String)>(
            &farm,
            "select drv_path, detail from hqr_events where kind = 'step_progress' and $1 = any(builds) order by id",
            build,
        )
    };
    let step = |n: i32| format!("/nix/store/x-step{n}.drv");
    set_steps_progress(
        pool,
        &[
            update(1, 20, "sending-inputs"),
            update(2, 30, "building"),
            update(3, 40, "receiving-outputs"),
            update(1, 30, "building"),
            update(9, 30, "building"),
        ],
    )
    .await
    .unwrap();
    assert_eq!(codes().await, [(1, 30), (2, 30), (3, 0)]);
    assert_eq!(
        events().await,
        [
            (step(1), "sending-inputs".to_owned()),
            (step(1), "building".to_owned()),
        ]
    );

    // Within a batch, a code is compared with the step's code at that
    // point of the batch, not with the row's before it: back and forth is
    // two changes, a repeat none.
    set_steps_progress(
        pool,
        &[
            update(2, 30, "building"),
            update(2, 20, "sending-inputs"),
            update(2, 20, "sending-inputs"),
            update(2, 30, "building"),
        ],
    )
    .await
    .unwrap();
    assert_eq!(codes().await, [(1, 30), (2, 30), (3, 0)]);
    let of_step2: Vec<String> = events()
        .await
        .into_iter()
        .filter(|(drv, _)| *drv == step(2))
        .map(|(_, phase)| phase)
        .collect();
    assert_eq!(of_step2, ["sending-inputs", "building"]);

    // A report that waited 5 s for its batch is an event of 5 s ago.
    let waited = ProgressUpdate {
        received: std::time::Instant::now() - Duration::from_secs(5),
        ..update(1, 40, "receiving-outputs")
    };
    set_steps_progress(pool, &[waited]).await.unwrap();
    let age_ms: i64 = sqlx::query_scalar(
        "select (extract(epoch from clock_timestamp()) * 1000)::bigint - at_ms from hqr_events
          where kind = 'step_progress' and $1 = any(builds) and detail = 'receiving-outputs'",
    )
    .bind(build)
    .fetch_one(pool)
    .await
    .unwrap();
    assert!(
        (5_000..60_000).contains(&age_ms),
        "the event is timed at the report's receipt: {age_ms} ms ago"
    );
}

/// The runner keeps every log; a builder's nix-daemon keeps a copy of its
/// own only when the builder is told to (`keep_build_logs`).
#[tokio::test]
async fn a_builders_daemon_keeps_no_log_of_its_own_unless_asked() {
    const TWO: &str = r#"with prelude; {
      lean = mkDrv { name = "lean"; requiredSystemFeatures = [ "benchmark" ]; script = "echo in lean; echo lean > $out"; };
      kept = mkDrv { name = "kept"; requiredSystemFeatures = [ "big-parallel" ]; script = "echo in kept; echo kept > $out"; };
    }"#;
    let mut farm = Farm::start(|_| {}).await.expect("farm");
    farm.add_builder(BuilderSpec::new("lean").features(&["benchmark"]))
        .await
        .unwrap();
    farm.add_builder(
        BuilderSpec::new("keeper")
            .features(&["big-parallel"])
            .keeping_build_logs(),
    )
    .await
    .unwrap();
    let (drvs, ids) = instantiate_and_build(&farm, TWO, &["lean", "kept"]).await;
    assert_eq!(farm.statuses(&ids).await.unwrap()["lean"], (0, 0));
    assert_eq!(farm.statuses(&ids).await.unwrap()["kept"], (0, 0));
    // The names of the log files under a store's log directory.
    let logs_in = |store: &hydra_testkit::NixStore| -> Vec<String> {
        let Ok(dirs) = std::fs::read_dir(store.build_logs_dir()) else {
            return Vec::new();
        };
        dirs.flatten()
            .flat_map(|d| std::fs::read_dir(d.path()).into_iter().flatten().flatten())
            .map(|f| f.file_name().to_string_lossy().into_owned())
            .collect()
    };
    assert_eq!(logs_in(&farm.builders[0].store), Vec::<String>::new());
    let kept = logs_in(&farm.builders[1].store);
    assert!(
        kept.iter().any(|f| f.contains("-kept.drv")),
        "the keeper's daemon has its log: {kept:?}"
    );
    for name in ["lean", "kept"] {
        let log = farm.log_of(&drvs[name]).unwrap();
        assert!(
            log.is_some_and(|l| l.contains(&format!("in {name}"))),
            "the runner has the log of {name}"
        );
    }
}
