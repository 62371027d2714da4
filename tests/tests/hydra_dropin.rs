//! The runner in place of Hydra's, on a database made by Hydra's own
//! schema (every farm's is: `TestDb::hydra`), with builds recorded as
//! Hydra's evaluator records them: Hydra's own test jobsets (basic, build
//! products, logging, a fixed-output derivation evaluated twice, the
//! RunCommand metrics job, an aggregate) end with the statuses, rows and
//! notifications Hydra's tests expect, logs are where hydra-web and
//! hydra-notify look for them, and they are published as `log/<drv>`.

use std::collections::BTreeMap;
use std::time::Duration;

use hydra_testkit::evaluator::{Evaluation, record_evaluation};
use hydra_testkit::{BuilderSpec, Farm};
use sqlx::postgres::PgListener;

const LIMIT: Duration = Duration::from_secs(60);

async fn farm(tune: impl FnOnce(&mut hydra_queue_runner::RunnerConfig)) -> Farm {
    let mut farm = Farm::start(tune).await.unwrap();
    farm.add_builder(BuilderSpec::new("b1").max_jobs(2))
        .await
        .unwrap();
    farm
}

/// Instantiates `jobs` of `expr` and records them as one evaluation.
async fn evaluate(
    farm: &Farm,
    expr: &str,
    jobs: &[&str],
    aggregates: &[(&str, &[&str])],
) -> BTreeMap<String, i32> {
    let drvs = farm.runner_store.instantiate(expr, jobs).await.unwrap();
    let eval = Evaluation {
        jobs: drvs,
        aggregates: aggregates
            .iter()
            .map(|(a, cs)| (a.to_string(), cs.iter().map(|c| c.to_string()).collect()))
            .collect(),
    };
    record_evaluation(&farm.db.pool, &farm.runner_store, farm.jobset_id, &eval)
        .await
        .unwrap()
}

/// Hydra's notifications, in the order they came, until every build in
/// `ids` sent `build_finished`.
async fn notifications_until_finished(
    listener: &mut PgListener,
    ids: &BTreeMap<String, i32>,
) -> Vec<(String, String)> {
    let mut seen = Vec::new();
    let mut open: Vec<i32> = ids.values().copied().collect();
    let deadline = tokio::time::Instant::now() + LIMIT;
    while !open.is_empty() {
        let note = tokio::time::timeout_at(deadline, listener.recv())
            .await
            .expect("notifications within the limit")
            .unwrap();
        if note.channel() == "build_finished" {
            for id in note.payload().split('\t') {
                open.retain(|b| b.to_string() != id);
            }
        }
        seen.push((note.channel().to_owned(), note.payload().to_owned()));
    }
    seen
}

async fn listen(farm: &Farm) -> PgListener {
    let mut l = PgListener::connect_with(&farm.db.pool).await.unwrap();
    l.listen_all(["build_started", "step_finished", "build_finished"])
        .await
        .unwrap();
    l
}

async fn status(farm: &Farm, id: i32) -> (i32, i32) {
    let (s, c): (Option<i32>, Option<i32>) =
        sqlx::query_as("select buildStatus, isCachedBuild from Builds where id = $1")
            .bind(id)
            .fetch_one(&farm.db.pool)
            .await
            .unwrap();
    (s.unwrap_or(-1), c.unwrap_or(-1))
}

const BASIC: &str = r#"with prelude; {
  empty_dir = mkDrv { name = "empty-dir"; script = "mkdir $out"; };
  fails = mkDrv { name = "fails"; script = "echo going to fail; exit 1"; };
  succeed_with_failed = mkDrv { name = "succeed-with-failed"; script = "mkdir -p $out/nix-support; touch $out/nix-support/failed"; };
}"#;

#[tokio::test]
async fn hydras_basic_jobset_with_its_notifications_in_hydras_order() {
    let farm = farm(|_| {}).await;
    let mut listener = listen(&farm).await;
    let ids = evaluate(
        &farm,
        BASIC,
        &["empty_dir", "fails", "succeed_with_failed"],
        &[],
    )
    .await;
    let notes = notifications_until_finished(&mut listener, &ids).await;
    assert_eq!(status(&farm, ids["empty_dir"]).await, (0, 0));
    assert_eq!(status(&farm, ids["fails"]).await, (1, 0));
    assert_eq!(status(&farm, ids["succeed_with_failed"]).await, (6, 0));

    let logs = farm.hydra_data.path().join("build-logs");
    for (job, id) in &ids {
        let at = |channel: &str, prefix: &str| {
            notes
                .iter()
                .position(|(c, p)| {
                    c == channel && (p == prefix || p.starts_with(&format!("{prefix}\t")))
                })
                .unwrap_or_else(|| panic!("no {channel} for {job} in {notes:?}"))
        };
        let id = id.to_string();
        let (started, step, finished) = (
            at("build_started", &id),
            at("step_finished", &id),
            at("build_finished", &id),
        );
        assert!(started < step && step < finished, "{job}: {notes:?}");
        // step_finished: build, step number, and the log's plain path
        // where hydra-web looks (`<HYDRA_DATA>/build-logs/xx/...`).
        let fields: Vec<&str> = notes[step].1.split('\t').collect();
        assert_eq!(fields.len(), 3, "{:?}", notes[step]);
        assert_eq!(fields[1], "1");
        let log = std::path::Path::new(fields[2]);
        assert!(log.starts_with(&logs), "{log:?}");
        let drv: String = sqlx::query_scalar("select drvPath from Builds where id = $1")
            .bind(ids[job])
            .fetch_one(&farm.db.pool)
            .await
            .unwrap();
        let base = drv.rsplit('/').next().unwrap();
        assert_eq!(log, logs.join(&base[..2]).join(&base[2..]));
    }
}

type Product = (String, String, String, Option<String>, Option<i64>);

async fn products(farm: &Farm, id: i32) -> Vec<Product> {
    sqlx::query_as(
        "select name, type, subtype, defaultPath, fileSize from BuildProducts where build = $1 order by productnr",
    )
    .bind(id)
    .fetch_all(&farm.db.pool)
    .await
    .unwrap()
}

#[tokio::test]
async fn build_products_are_recorded_as_hydra_reads_them() {
    let farm = farm(|_| {}).await;
    let ids = evaluate(
        &farm,
        r#"with prelude; {
  simple = mkDrv { name = "build-product-simple"; script = "mkdir -p $out/nix-support; echo Hello > $out/text.txt; echo \"doc none $out/text.txt\" > $out/nix-support/hydra-build-products"; };
  with_spaces = mkDrv { name = "build-product-with-spaces"; script = "mkdir -p $out/nix-support; echo Hello > \"$out/some text.txt\"; echo \"doc none \\\"$out/some text.txt\\\"\" > $out/nix-support/hydra-build-products"; };
  metrics = mkDrv { name = "my-build-product"; outputs = [ "out" "bin" ]; script = "mkdir $bin; echo foo > $bin/bar; mkdir -p $out/nix-support; echo 'lineCoverage 18 %' >> $out/nix-support/hydra-metrics; echo 'maxResident 27 KiB' >> $out/nix-support/hydra-metrics"; };
}"#,
        &["simple", "with_spaces", "metrics"],
        &[],
    )
    .await;
    farm.wait_finished(ids.values().copied(), LIMIT)
        .await
        .unwrap();
    for id in ids.values() {
        assert_eq!(status(&farm, *id).await, (0, 0));
    }
    let simple = products(&farm, ids["simple"]).await;
    assert_eq!(
        simple,
        [(
            "text.txt".into(),
            "doc".into(),
            "none".into(),
            Some(String::new()),
            Some(6)
        )]
    );
    let spaces = products(&farm, ids["with_spaces"]).await;
    assert_eq!(spaces[0].0, "some text.txt");
    // RunCommand's json.t: the nix-build products of a two-output build,
    // with '' as their default path, and the metrics with their units.
    let metrics = products(&farm, ids["metrics"]).await;
    let names: Vec<(&str, &str, &str, Option<&str>)> = metrics
        .iter()
        .map(|p| (p.0.as_str(), p.1.as_str(), p.2.as_str(), p.3.as_deref()))
        .collect();
    assert_eq!(
        names,
        [
            ("my-build-product-bin", "nix-build", "bin", Some("")),
            ("my-build-product", "nix-build", "", Some("")),
        ]
    );
    let values: Vec<(String, f64, Option<String>)> =
        sqlx::query_as("select name, value, unit from BuildMetrics where build = $1 order by name")
            .bind(ids["metrics"])
            .fetch_all(&farm.db.pool)
            .await
            .unwrap();
    assert_eq!(
        values,
        [
            ("lineCoverage".into(), 18.0, Some("%".into())),
            ("maxResident".into(), 27.0, Some("KiB".into())),
        ]
    );
}

#[tokio::test]
async fn a_fixed_output_derivation_evaluated_twice_is_cached_the_second_time() {
    let farm = farm(|_| {}).await;
    let expr = r#"with prelude; { fod = mkFixed { name = "test-fod"; text = "hello"; }; }"#;
    let first = evaluate(&farm, expr, &["fod"], &[]).await;
    farm.wait_finished(first.values().copied(), LIMIT)
        .await
        .unwrap();
    assert_eq!(status(&farm, first["fod"]).await, (0, 0));
    let second = evaluate(&farm, expr, &["fod"], &[]).await;
    farm.wait_finished(second.values().copied(), LIMIT)
        .await
        .unwrap();
    assert_eq!(status(&farm, second["fod"]).await, (0, 1), "a cached build");
    let steps: i64 = sqlx::query_scalar("select count(*) from BuildSteps where build = $1")
        .bind(second["fod"])
        .fetch_one(&farm.db.pool)
        .await
        .unwrap();
    assert_eq!(steps, 0, "as Hydra: a cached build has no step");
}

#[tokio::test]
async fn an_aggregate_builds_after_its_constituents() {
    let farm = farm(|_| {}).await;
    let ids = evaluate(
        &farm,
        r#"with prelude; rec {
  a = mkDrv { name = "empty-dir-a"; script = "mkdir $out"; };
  b = mkDrv { name = "empty-dir-b"; script = "mkdir $out"; };
  aggregate = mkDrv { name = "aggregate"; _hydraAggregate = true; constituents = [ a b ]; script = "mkdir $out"; };
}"#,
        &["a", "b", "aggregate"],
        &[("aggregate", &["a", "b"])],
    )
    .await;
    farm.wait_finished(ids.values().copied(), LIMIT)
        .await
        .unwrap();
    for id in ids.values() {
        assert_eq!(status(&farm, *id).await, (0, 0));
    }
    let (agg_stop, last_constituent): (i32, i32) = sqlx::query_as(
        "select b.stopTime, (select max(c.stopTime) from Builds c join AggregateConstituents ac on ac.constituent = c.id where ac.aggregate = b.id)
           from Builds b where b.id = $1",
    )
    .bind(ids["aggregate"])
    .fetch_one(&farm.db.pool)
    .await
    .unwrap();
    assert!(agg_stop >= last_constituent);
    let product: (String, Option<String>) =
        sqlx::query_as("select type, defaultPath from BuildProducts where build = $1")
            .bind(ids["aggregate"])
            .fetch_one(&farm.db.pool)
            .await
            .unwrap();
    assert_eq!(product, ("nix-build".into(), Some(String::new())));
}

#[tokio::test]
async fn a_cached_failure_is_recorded_as_hydras_runner_records_it() {
    let farm = farm(|_| {}).await;
    let expr = r#"with prelude; rec {
  broken = mkDrv { name = "broken"; script = "exit 1"; };
  above = mkDrv { name = "above"; script = "cat ${broken} > $out"; };
}"#;
    let first = evaluate(&farm, expr, &["broken"], &[]).await;
    farm.wait_finished(first.values().copied(), LIMIT)
        .await
        .unwrap();
    let second = evaluate(&farm, expr, &["broken", "above"], &[]).await;
    farm.wait_finished(second.values().copied(), LIMIT)
        .await
        .unwrap();
    assert_eq!(status(&farm, second["broken"]).await, (1, 1));
    assert_eq!(
        status(&farm, second["above"]).await,
        (2, 1),
        "a dependency's cached failure is a cached build too"
    );
    type Row = (i32, Option<i32>, Option<String>, Option<i32>, Option<i32>);
    for job in ["broken", "above"] {
        let rows: Vec<Row> = sqlx::query_as(
            "select type, status, system, propagatedFrom, startTime from BuildSteps where build = $1",
        )
        .bind(second[job])
        .fetch_all(&farm.db.pool)
        .await
        .unwrap();
        assert_eq!(
            rows,
            [(
                0,
                Some(8),
                Some(hydra_builder::config::current_system()),
                Some(first["broken"]),
                None
            )],
            "{job}"
        );
        let outputs: i64 =
            sqlx::query_scalar("select count(*) from BuildStepOutputs where build = $1")
                .bind(second[job])
                .fetch_one(&farm.db.pool)
                .await
                .unwrap();
        assert_eq!(
            outputs, 1,
            "{job}: the failed step's output, as Hydra writes it"
        );
    }
}

/// Where hydra-web's getDrvLogPath finds the log of `drv`: the plain
/// file, or with `.bz2` or `.zst`.
fn hydra_web_log(hydra_data: &std::path::Path, drv: &str) -> Option<Vec<u8>> {
    let base = drv.rsplit('/').next().unwrap();
    let plain = hydra_data
        .join("build-logs")
        .join(&base[..2])
        .join(&base[2..]);
    for suffix in ["", ".bz2", ".zst"] {
        let mut p = plain.clone().into_os_string();
        p.push(suffix);
        let Ok(bytes) = std::fs::read(&p) else {
            continue;
        };
        return Some(match suffix {
            "" => bytes,
            ".bz2" => {
                let out = std::process::Command::new("bzip2")
                    .args(["-dc"])
                    .arg(&p)
                    .output()
                    .unwrap();
                out.stdout
            }
            _ => zstd::decode_all(bytes.as_slice()).unwrap(),
        });
    }
    None
}

#[tokio::test]
async fn logs_are_where_hydra_web_reads_them_after_compresslog_and_in_the_cache() {
    let cache = tempfile::tempdir().unwrap();
    let dest = format!("file://{}", cache.path().display());
    let farm = farm(|c| {
        // Leave compressing to hydra-notify's CompressLog.
        c.log_compression = hydra_queue_runner::config::LogCompression::None;
        c.destinations = vec![dest.clone()];
    })
    .await;
    let mut listener = PgListener::connect_with(&farm.db.pool).await.unwrap();
    listener.listen("step_finished").await.unwrap();
    let expr = r#"with prelude; {
  success = mkDrv { name = "logging-success"; script = "echo 'should appear in success'; mkdir $out; echo is output > $out/file"; };
  failure = mkDrv { name = "logging-failure"; script = "echo 'should appear in failure'; exit 1"; };
}"#;
    let drvs = farm
        .runner_store
        .instantiate(expr, &["success", "failure"])
        .await
        .unwrap();
    let ids = farm.queue(&drvs, |_| Default::default()).await.unwrap();
    // hydra-notify's CompressLog: on step_finished, bzip2 the named file.
    for _ in 0..2 {
        let note = tokio::time::timeout(LIMIT, listener.recv())
            .await
            .unwrap()
            .unwrap();
        let path = note.payload().split('\t').nth(2).unwrap().to_owned();
        let status = std::process::Command::new("bzip2")
            .arg("--force")
            .arg(&path)
            .status()
            .unwrap();
        assert!(
            status.success(),
            "the plain log is there to compress: {path}"
        );
    }
    farm.wait_finished(ids.values().copied(), LIMIT)
        .await
        .unwrap();
    assert_eq!(status(&farm, ids["success"]).await.0, 0);
    assert_eq!(status(&farm, ids["failure"]).await.0, 1);
    for (job, text) in [
        ("success", "should appear in success"),
        ("failure", "should appear in failure"),
    ] {
        let log = hydra_web_log(farm.hydra_data.path(), &drvs[job])
            .unwrap_or_else(|| panic!("no log of {job} where hydra-web looks"));
        assert!(String::from_utf8_lossy(&log).contains(text));
        // The runner reads it back after CompressLog too.
        let (ok, shown) = farm.cli(&["logs", &ids[job].to_string()]).await;
        assert!(ok && shown.contains(text), "{shown}");
    }
    // Published as log/<drv base name>, where `nix log --store` finds it.
    hydra_testkit::caches::uploads_done(&farm.db.pool, LIMIT)
        .await
        .unwrap();
    for (job, text) in [
        ("success", "should appear in success"),
        ("failure", "should appear in failure"),
    ] {
        let base = drvs[job].rsplit('/').next().unwrap();
        let published = std::fs::read_to_string(cache.path().join("log").join(base)).unwrap();
        assert!(published.contains(text), "{published}");
    }
    // `nix log` of the output: the cache's narinfo names its deriver.
    let out: String =
        sqlx::query_scalar("select path from BuildOutputs where build = $1 and name = 'out'")
            .bind(ids["success"])
            .fetch_one(&farm.db.pool)
            .await
            .unwrap();
    let shown = farm
        .runner_store
        .run(
            "nix",
            &[
                "log",
                "--store",
                &format!("file://{}", cache.path().display()),
                &out,
            ],
        )
        .await
        .unwrap();
    assert!(shown.contains("should appear in success"), "{shown}");
}

/// hydra-web asks the queue runner at `queue_runner_endpoint` for
/// `/status` and `/status/machines` (its machine page); the status
/// document in SystemStatus keeps Hydra's field names too.
#[tokio::test]
async fn hydra_web_reads_the_status_and_the_machines_it_expects() {
    let mut farm = Farm::start(|c| {
        c.http_listen = Some("127.0.0.1:0".parse().unwrap());
        c.status_interval_secs = 1;
    })
    .await
    .unwrap();
    farm.add_builder(BuilderSpec::new("web-seen").max_jobs(3))
        .await
        .unwrap();
    let ids = evaluate(&farm, BASIC, &["empty_dir"], &[]).await;
    farm.wait_finished(ids.values().copied(), LIMIT)
        .await
        .unwrap();
    let http = farm.runner().http_addr.unwrap().to_string();
    let machines = hydra_testkit::process::get_json(&http, "/status/machines")
        .await
        .unwrap();
    let m = &machines["machines"]["web-seen"];
    assert_eq!(m["systems"][0], hydra_builder::config::current_system());
    assert_eq!(m["maxJobs"], 3);
    assert_eq!(m["speedFactor"], 1.0);
    assert!(m["supportedFeatures"].is_array() && m["mandatoryFeatures"].is_array());
    assert_eq!(m["hasCapacity"], true);
    assert_eq!(m["stats"]["nrStepsDone"], 1);
    assert!(m["stats"]["avgStepBuildTimeMs"].as_f64().unwrap() > 0.0);
    let status = hydra_testkit::process::get_json(&http, "/status")
        .await
        .unwrap();
    assert_eq!(status["status"], "up");
    let doc = hydra_testkit::status_document_until(&farm.db.pool, LIMIT, |doc| {
        (doc["machines"]["web-seen"]["nrStepsDone"] == 1).then(|| doc.clone())
    })
    .await
    .unwrap();
    for field in ["nrQueuedBuilds", "nrActiveSteps", "uptime", "time", "pid"] {
        assert!(doc.get(field).is_some(), "{field} in {doc}");
    }
    let seen = &doc["machines"]["web-seen"];
    for field in [
        "systemTypes",
        "maxJobs",
        "currentJobs",
        "speedFactor",
        "consecutiveFailures",
        "disabledUntil",
        "avgStepTime",
    ] {
        assert!(seen.get(field).is_some(), "{field} in {seen}");
    }
}
