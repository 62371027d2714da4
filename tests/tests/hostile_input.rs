//! Input nobody on the project wrote: builds that print NUL bytes and
//! Latin-1, `nix-support` files with NUL in them, fetches that fail once,
//! evaluator transactions that commit out of id order, a builder that
//! reboots for longer than `max_unsupported_secs`, two builders with one
//! name, a jobset deleted while its steps run. Each ends as Hydra would
//! record it, and the runner stays up.

use std::time::Duration;

use hydra_proto::client::{ExplainRequest, StepExplanation};
use hydra_proto::v1::runner_service_client::RunnerServiceClient;
use hydra_proto::v1::*;
use hydra_testkit::process::{Gate, StartSignal};
use hydra_testkit::{BuilderSpec, Farm, JobOptions, eventually, hydra_jobset, queue_builds};
use tokio_stream::wrappers::ReceiverStream;

const LIMIT: Duration = Duration::from_secs(60);

async fn farm() -> Farm {
    let mut farm = Farm::start(|c| {
        c.retry_base_secs = 0.1;
        c.retry_factor = 1.5;
    })
    .await
    .unwrap();
    farm.add_builder(BuilderSpec::new("b1").max_jobs(2))
        .await
        .unwrap();
    farm
}

/// Rows of a build's steps: (status, errorMsg).
async fn step_rows(farm: &Farm, build: i32) -> Vec<(Option<i32>, Option<String>)> {
    sqlx::query_as("select status, errorMsg from BuildSteps where build = $1 order by stepnr")
        .bind(build)
        .fetch_all(&farm.db.pool)
        .await
        .unwrap()
}

async fn failed_paths(farm: &Farm) -> i64 {
    sqlx::query_scalar("select count(*) from FailedPaths")
        .fetch_one(&farm.db.pool)
        .await
        .unwrap()
}

#[tokio::test]
async fn nul_bytes_and_latin1_in_logs_and_nix_support_are_recorded_not_fatal() {
    let farm = farm().await;
    let ids = farm
        .submit(
            r#"with prelude; {
  nul-log = mkDrv { name = "nul-log"; script = "printf 'a\\000b\\n'; exit 1"; };
  nul-release = mkDrv { name = "nul-release"; script = "mkdir -p $out/nix-support; printf 'rel\\000ease-1\\n' > $out/nix-support/hydra-release-name; printf 'lines 1 co\\000unt\\n' > $out/nix-support/hydra-metrics"; };
  latin1 = mkDrv { name = "latin1"; script = "printf 'caf\\351 au lait\\n'; echo done > $out"; };
}"#,
            &["nul-log", "nul-release", "latin1"],
        )
        .await
        .unwrap();
    farm.wait_finished(ids.values().copied(), LIMIT)
        .await
        .unwrap();
    let statuses = farm.statuses(&ids).await.unwrap();
    assert_eq!(statuses["nul-log"].0, 1, "a failed build, recorded as such");
    assert_eq!(statuses["nul-release"].0, 0);
    assert_eq!(statuses["latin1"].0, 0);

    let rows = step_rows(&farm, ids["nul-log"]).await;
    assert_eq!(rows.len(), 1, "one attempt, not retried: {rows:?}");
    let msg = rows[0].1.clone().unwrap_or_default();
    assert!(
        msg.contains("a\u{fffd}b"),
        "the NUL is shown, not stored: {msg}"
    );

    let (release, unit): (Option<String>, Option<String>) = sqlx::query_as(
        "select b.releaseName, m.unit from Builds b join BuildMetrics m on m.build = b.id where b.id = $1",
    )
    .bind(ids["nul-release"])
    .fetch_one(&farm.db.pool)
    .await
    .unwrap();
    assert_eq!(release.as_deref(), Some("rel\u{fffd}ease-1"));
    assert_eq!(unit.as_deref(), Some("co\u{fffd}unt"));

    // The log keeps the bytes the build printed; `logs` shows them.
    let drv: String = sqlx::query_scalar("select drvPath from Builds where id = $1")
        .bind(ids["latin1"])
        .fetch_one(&farm.db.pool)
        .await
        .unwrap();
    let log = farm.log_bytes_of(&drv).unwrap().unwrap();
    assert!(
        log.windows(13).any(|w| w == b"caf\xe9 au lait\n"),
        "{log:?}"
    );
    let (ok, shown) = farm.cli(&["logs", &ids["latin1"].to_string()]).await;
    assert!(ok);
    assert!(shown.contains("caf\u{fffd} au lait"), "{shown}");
}

#[tokio::test]
async fn a_fixed_output_fetch_that_fails_is_retried_and_never_cached_as_failed() {
    let farm = farm().await;
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("fetched-once");
    let expr = format!(
        r#"with prelude; rec {{
  flaky-fetch = mkDrv {{
    name = "flaky-fetch";
    script = "if [ ! -e {m} ]; then touch {m}; echo connection reset; exit 1; fi; printf hello > $out";
    outputHashMode = "flat"; outputHashAlgo = "sha256";
    outputHash = builtins.hashString "sha256" "hello";
  }};
  dead-mirror = mkDrv {{
    name = "dead-mirror";
    script = "echo host unreachable; exit 1";
    outputHashMode = "flat"; outputHashAlgo = "sha256";
    outputHash = builtins.hashString "sha256" "never";
  }};
  uses-dead = mkDrv {{ name = "uses-dead"; script = "cat ${{dead-mirror}} > $out"; }};
}}"#,
        m = marker.display()
    );
    let ids = farm
        .submit(&expr, &["flaky-fetch", "dead-mirror", "uses-dead"])
        .await
        .unwrap();
    farm.wait_finished(ids.values().copied(), LIMIT)
        .await
        .unwrap();
    let statuses = farm.statuses(&ids).await.unwrap();
    assert_eq!(statuses["flaky-fetch"].0, 0, "the retry fetched it");
    let rows = step_rows(&farm, ids["flaky-fetch"]).await;
    assert_eq!(rows.len(), 2, "{rows:?}");
    assert_eq!(
        rows[0].0,
        Some(3),
        "the failed try is not a failure: {rows:?}"
    );
    assert!(
        rows[0]
            .1
            .as_deref()
            .unwrap_or("")
            .contains("transient failure")
    );
    assert_eq!(rows[1].0, Some(0));

    assert_eq!(statuses["dead-mirror"].0, 1, "fails after max_tries");
    assert_eq!(statuses["uses-dead"].0, 2);
    let rows = step_rows(&farm, ids["dead-mirror"]).await;
    let tries = farm.config.max_tries as usize;
    assert_eq!(rows.len(), tries + 1, "{rows:?}");
    assert!(rows[..tries].iter().all(|r| r.0 == Some(3)), "{rows:?}");
    assert_eq!(rows[tries].0, Some(1));
    assert!(
        rows[tries]
            .1
            .as_deref()
            .unwrap_or("")
            .contains("gave up after"),
        "{rows:?}"
    );
    assert_eq!(failed_paths(&farm).await, 0, "nothing transient is cached");
}

#[tokio::test]
async fn builds_and_cancels_committed_out_of_id_order_are_all_seen() {
    let farm = farm().await;
    let dir = tempfile::tempdir().unwrap();
    let signal = StartSignal::new(dir.path(), "started").unwrap();
    let expr = format!(
        r#"with prelude; {{
  early = mkDrv {{ name = "early"; script = "echo early > $out"; }};
  late = mkDrv {{ name = "late"; script = "echo late > $out"; }};
  held = mkDrv {{ name = "held"; script = "echo held > {s}; sleep 600; echo h > $out"; }};
}}"#,
        s = signal.path().display()
    );
    let drvs = farm
        .runner_store
        .instantiate(&expr, &["early", "late", "held"])
        .await
        .unwrap();
    let pool = &farm.db.pool;
    let insert = "insert into Builds (finished, timestamp, jobset_id, job, drvPath, system)
         values (0, 0, $1, $2, $3, $4) returning id";
    let system = hydra_builder::config::current_system();

    // A long evaluator transaction takes id n, a quick one n + 1 and
    // commits first.
    let mut slow = pool.begin().await.unwrap();
    let late_id: i32 = sqlx::query_scalar(insert)
        .bind(farm.jobset_id)
        .bind("late")
        .bind(&drvs["late"])
        .bind(&system)
        .fetch_one(&mut *slow)
        .await
        .unwrap();
    let mut quick = pool.begin().await.unwrap();
    let early_id: i32 = sqlx::query_scalar(insert)
        .bind(farm.jobset_id)
        .bind("early")
        .bind(&drvs["early"])
        .bind(&system)
        .fetch_one(&mut *quick)
        .await
        .unwrap();
    assert!(late_id < early_id);
    sqlx::query("notify builds_added")
        .execute(&mut *quick)
        .await
        .unwrap();
    quick.commit().await.unwrap();
    farm.wait_finished([early_id], LIMIT).await.unwrap();
    sqlx::query("notify builds_added")
        .execute(&mut *slow)
        .await
        .unwrap();
    slow.commit().await.unwrap();
    farm.wait_finished([late_id], LIMIT).await.unwrap();
    let s = farm
        .statuses(&[("late".into(), late_id), ("early".into(), early_id)].into())
        .await
        .unwrap();
    assert_eq!((s["late"].0, s["early"].0), (0, 0));

    // The same for the change log: a cancel numbered first, committed
    // last. (A transaction that finishes a build holds Hydra's NrBuilds
    // row until it commits, so nothing else may finish meanwhile.)
    let ids = farm
        .queue(&[("held".to_owned(), drvs["held"].clone())].into(), |_| {
            JobOptions::default()
        })
        .await
        .unwrap();
    signal.started(LIMIT).await.unwrap();
    let cancel = "update Builds set finished = 1, buildStatus = 4, startTime = 1, stopTime = 1 where id = $1";
    let mut slow = pool.begin().await.unwrap();
    sqlx::query(cancel)
        .bind(ids["held"])
        .execute(&mut *slow)
        .await
        .unwrap();
    sqlx::query("update Builds set globalPriority = 5 where id = $1")
        .bind(early_id)
        .execute(pool)
        .await
        .unwrap();
    let bumped: i64 = sqlx::query_scalar("select last_value from hqr_build_changes_seq_seq")
        .fetch_one(pool)
        .await
        .unwrap();
    assert_eq!(bumped, 2, "the cancel has number 1");
    // The runner applies the bump (and deletes its row) with the cancel's
    // number still missing.
    eventually(LIMIT, || async {
        let left: i64 =
            sqlx::query_scalar("select count(*) from hqr_build_changes where seq >= $1")
                .bind(bumped)
                .fetch_one(pool)
                .await?;
        Ok((left == 0).then_some(()))
    })
    .await
    .unwrap();
    slow.commit().await.unwrap();
    // The held step is cancelled on its machine once the late cancel is
    // seen: its row closes as cancelled (4).
    let status: i32 = eventually(LIMIT, || async {
        let row: Option<Option<i32>> =
            sqlx::query_scalar("select status from BuildSteps where build = $1 and busy = 0")
                .bind(ids["held"])
                .fetch_optional(pool)
                .await?;
        Ok(row.flatten())
    })
    .await
    .unwrap();
    assert_eq!(status, 4);
}

async fn explain(farm: &Farm, build: i32) -> Vec<StepExplanation> {
    let mut api = farm.api().await.unwrap();
    api.explain(ExplainRequest {
        build_id: build as u64,
        drv_path: String::new(),
    })
    .await
    .unwrap()
    .into_inner()
    .steps
}

#[tokio::test]
async fn a_step_whose_only_machine_is_away_waits_for_it_rather_than_failing() {
    let mut farm = Farm::start(|c| {
        c.max_unsupported_secs = 1;
        c.machine_memory_secs = 3600;
    })
    .await
    .unwrap();
    farm.add_builder(BuilderSpec::new("x86")).await.unwrap();
    let mut arm = BuilderSpec::new("arm");
    arm.systems = vec!["hydra-test-arch".into()];
    farm.add_builder(arm).await.unwrap();
    eventually(LIMIT, || async {
        let machines = farm.runner().shared.state.queue_counts().machines;
        Ok((machines == 2).then_some(()))
    })
    .await
    .unwrap();
    // The only machine for the system reboots.
    farm.builders[1].stop();
    eventually(LIMIT, || async {
        let machines = farm.runner().shared.state.queue_counts().machines;
        Ok((machines == 1).then_some(()))
    })
    .await
    .unwrap();
    let ids = farm
        .submit(
            r#"with prelude; { arm-job = mkDrv { name = "arm-job"; system = "hydra-test-arch"; script = "echo a > $out"; }; }"#,
            &["arm-job"],
        )
        .await
        .unwrap();
    let build = ids["arm-job"];
    let away = eventually(LIMIT, || async {
        Ok(explain(&farm, build)
            .await
            .into_iter()
            .find(|s| s.reason == "machines-away"))
    })
    .await
    .unwrap();
    assert!(away.detail.contains("arm"), "{}", away.detail);
    // Well past max_unsupported_secs, with another machine connected: the
    // step still waits (this is a wait for nothing to happen, so a sleep).
    tokio::time::sleep(Duration::from_secs(3)).await;
    let finished: i32 = sqlx::query_scalar("select finished from Builds where id = $1")
        .bind(build)
        .fetch_one(&farm.db.pool)
        .await
        .unwrap();
    assert_eq!(
        finished, 0,
        "not failed as unsupported while the machine is away"
    );

    // Once the machine is forgotten, the step is unsupported (9).
    let mut shorter = farm.config.clone();
    shorter.machine_memory_secs = 1;
    farm.runner().reload(&shorter).await.unwrap();
    farm.wait_finished([build], LIMIT).await.unwrap();
    let status: i32 = sqlx::query_scalar("select buildStatus from Builds where id = $1")
        .bind(build)
        .fetch_one(&farm.db.pool)
        .await
        .unwrap();
    assert_eq!(status, 9);
}

/// Joins as `name` over the real protocol; returns the runner's answer.
async fn join_as(farm: &Farm, name: &str, instance: &str) -> RunnerMessage {
    let mut client = RunnerServiceClient::connect(format!("http://{}", farm.runner().addr))
        .await
        .unwrap();
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(BuilderMessage {
        msg: Some(builder_message::Msg::Join(Join {
            protocol_version: hydra_proto::PROTOCOL_VERSION,
            machine_name: name.into(),
            systems: vec![hydra_builder::config::current_system()],
            max_jobs: 1,
            speed_factor: 1.0,
            store_dir: "/nix/store".into(),
            instance_id: instance.into(),
            ..Default::default()
        })),
    })
    .await
    .unwrap();
    let mut inbound = client
        .open(ReceiverStream::new(rx))
        .await
        .unwrap()
        .into_inner();
    let answer = inbound.message().await.unwrap().unwrap();
    drop(tx);
    answer
}

#[tokio::test]
async fn a_second_builder_with_a_taken_name_is_refused_and_the_first_keeps_its_work() {
    let mut farm = Farm::start(|_| {}).await.unwrap();
    farm.add_builder(BuilderSpec::new("twin")).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let signal = StartSignal::new(dir.path(), "started").unwrap();
    let gate = Gate::new(dir.path(), "gate").unwrap();
    let ids = farm
        .submit(
            &format!(
                r#"with prelude; {{ long = mkDrv {{ name = "long"; script = "echo go > {s}; read x < {g}; echo l > $out"; }}; }}"#,
                s = signal.path().display(),
                g = gate.path().display()
            ),
            &["long"],
        )
        .await
        .unwrap();
    signal.started(LIMIT).await.unwrap();

    let answer = join_as(&farm, "twin", "another process").await;
    let Some(runner_message::Msg::Refused(refused)) = answer.msg else {
        panic!("not refused: {answer:?}");
    };
    assert!(refused.retryable);
    assert!(
        refused.reason.contains("'twin' is in use"),
        "{}",
        refused.reason
    );
    // A second real builder of that name, too: it is refused and retries.
    farm.add_builder(BuilderSpec::new("twin")).await.unwrap();

    gate.open(LIMIT).await.unwrap();
    farm.wait_finished(ids.values().copied(), LIMIT)
        .await
        .unwrap();
    let rows: Vec<(Option<i32>, String)> =
        sqlx::query_as("select status, machine from BuildSteps where build = $1")
            .bind(ids["long"])
            .fetch_all(&farm.db.pool)
            .await
            .unwrap();
    assert_eq!(
        rows,
        vec![(Some(0), "twin".to_owned())],
        "one attempt, never aborted"
    );
    let connected = farm.runner().shared.state.queue_counts().machines;
    assert_eq!(connected, 1);
    // A name of one's own is welcome.
    let answer = join_as(&farm, "third", "yet another").await;
    assert!(
        matches!(answer.msg, Some(runner_message::Msg::Welcome(_))),
        "{answer:?}"
    );
}

#[tokio::test]
async fn a_jobset_deleted_while_its_steps_run_leaves_the_runner_up_and_nothing_busy() {
    let farm = farm().await;
    let dir = tempfile::tempdir().unwrap();
    let signal = StartSignal::new(dir.path(), "started").unwrap();
    let gate = Gate::new(dir.path(), "gate").unwrap();
    let expr = format!(
        r#"with prelude; rec {{
  first = mkDrv {{ name = "first"; script = "echo go > {s}; read x < {g}; echo 1 > $out"; }};
  second = mkDrv {{ name = "second"; script = "cat ${{first}} > $out"; }};
  survivor = mkDrv {{ name = "survivor"; script = "echo still here > $out"; }};
}}"#,
        s = signal.path().display(),
        g = gate.path().display()
    );
    let drvs = farm
        .runner_store
        .instantiate(&expr, &["second", "survivor"])
        .await
        .unwrap();
    let doomed = hydra_jobset(&farm.db.pool, "doomed", "doomed")
        .await
        .unwrap();
    let only = |job: &str| [(job.to_owned(), drvs[job].clone())].into();
    let ids = queue_builds(
        &farm.db.pool,
        &farm.runner_store,
        doomed,
        &only("second"),
        |_| JobOptions::default(),
    )
    .await
    .unwrap();
    signal.started(LIMIT).await.unwrap();
    // As Hydra's web interface deletes a jobset: its builds go with it.
    sqlx::query("delete from Jobsets where id = $1")
        .bind(doomed)
        .execute(&farm.db.pool)
        .await
        .unwrap();
    // The build's report races the deletion.
    gate.open(LIMIT).await.unwrap();
    assert!(ids.contains_key("second"));

    let survivor = farm
        .queue(&only("survivor"), |_| JobOptions::default())
        .await
        .unwrap();
    farm.wait_finished(survivor.values().copied(), LIMIT)
        .await
        .unwrap();
    assert_eq!(farm.statuses(&survivor).await.unwrap()["survivor"].0, 0);
    eventually(LIMIT, || async {
        let busy: i64 = sqlx::query_scalar("select count(*) from BuildSteps where busy != 0")
            .fetch_one(&farm.db.pool)
            .await?;
        let running = farm.runner().shared.state.queue_counts().running;
        Ok((busy == 0 && running == 0).then_some(()))
    })
    .await
    .unwrap();
}
