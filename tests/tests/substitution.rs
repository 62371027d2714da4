//! Builders fetch inputs from binary caches before asking the runner, and
//! keep building when the caches are down or hang: a slow cache is demoted,
//! its timeouts show in the status, and the runner sends what no cache has.

use std::time::Duration;

use hydra_testkit::caches::{nix_key, uploads_done};
use hydra_testkit::process::{BuilderProcess, RunnerSetup, sample, scrape};
use hydra_testkit::{NixStore, TestDb, create_jobset, queue_builds, wait_finished};

const LIMIT: Duration = Duration::from_secs(90);

async fn build(db: &TestDb, store: &NixStore, expr: &str, job: &str) -> i32 {
    let jobset: i32 = match sqlx::query_scalar("select id from Jobsets")
        .fetch_optional(&db.pool)
        .await
        .unwrap()
    {
        Some(id) => id,
        None => create_jobset(&db.pool).await.unwrap(),
    };
    let drvs = store.instantiate(expr, &[job]).await.unwrap();
    let ids = queue_builds(&db.pool, store, jobset, &drvs, |_| Default::default())
        .await
        .unwrap();
    wait_finished(&db.pool, ids.values().copied(), LIMIT)
        .await
        .unwrap();
    let status: Option<i32> = sqlx::query_scalar("select buildStatus from Builds where id = $1")
        .bind(ids[job])
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(status, Some(0), "{job}");
    ids[job]
}

#[tokio::test]
async fn a_builder_takes_inputs_from_the_cache_instead_of_the_runner() {
    let db = TestDb::new().await;
    let store = NixStore::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (sk, public) = nix_key(&store, dir.path(), "farm-1").await.unwrap();
    let cache = format!("file://{}", dir.path().join("cache").display());
    let setup = RunnerSetup::new_with(
        dir.path(),
        &store,
        &db.url,
        &format!(
            "destinations = [\"{cache}\"]\nsigning_key_file = \"{}\"",
            sk.display()
        ),
    )
    .unwrap();
    let _runner = setup.start(&[]).await.unwrap();
    let expr = r#"with prelude; rec {
      lib = mkDrv { name = "lib"; script = "mkdir $out; echo library > $out/lib.txt"; };
      app = mkDrv { name = "app"; script = "cat ${lib}/lib.txt > $out"; };
    }"#;

    // One builder builds lib, which the runner publishes, and leaves.
    let mut first = BuilderProcess::start("first", &setup.address, dir.path()).unwrap();
    build(&db, &store, expr, "lib").await;
    uploads_done(&db.pool, LIMIT).await.unwrap();
    first.kill().await.unwrap();

    // Another, with the cache, builds app: lib comes from the cache.
    let mut second = BuilderProcess::start_with(
        "second",
        &setup.address,
        dir.path(),
        &format!("substituters = [\"{cache}\"]\ntrusted_public_keys = [\"{public}\"]"),
    )
    .unwrap();
    build(&db, &store, expr, "app").await;
    let said = second
        .wait_for_line("substituted 1 of 1 inputs", LIMIT)
        .await
        .unwrap();
    assert!(said.contains(&cache), "{said}");
}

#[tokio::test]
async fn caches_that_are_down_or_hang_never_stop_a_build() {
    let db = TestDb::new().await;
    let store = NixStore::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let http = hydra_testkit::process::free_address().unwrap();
    let setup = RunnerSetup::new_with(
        dir.path(),
        &store,
        &db.url,
        &format!(
            "status_interval_secs = 1\nping_interval_secs = 1\nping_timeout_secs = 5\nhttp_listen = \"{http}\""
        ),
    )
    .unwrap();
    let _runner = setup.start(&[]).await.unwrap();

    // A cache that is down (nothing listens) and one that hangs (accepts,
    // never answers).
    let down = hydra_testkit::process::free_address().unwrap();
    let hanging = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hanging_url = format!("http://{}", hanging.local_addr().unwrap());
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = hanging.accept().await {
            held.push(socket);
        }
    });
    let mut builder = BuilderProcess::start_with(
        "one",
        &setup.address,
        dir.path(),
        &format!(
            "substituters = [\"http://{down}\", \"{hanging_url}\"]\nsubstituter_timeout_secs = 1.0"
        ),
    )
    .unwrap();

    // Inputs the builder lacks: sources in the runner's store.
    let job = |n: u32| {
        format!(
            r#"with prelude; {{ job = mkDrv {{ name = "job{n}"; script = "cat ${{builtins.toFile "data{n}" "input {n}"}} > $out"; }}; }}"#
        )
    };
    build(&db, &store, &job(1), "job").await;
    builder.wait_for_line("demoted", LIMIT).await.unwrap();

    // The demoted cache is skipped next time; the runner sends the input.
    build(&db, &store, &job(2), "job").await;
    builder
        .wait_for_line("skipping demoted caches", LIMIT)
        .await
        .unwrap();

    // The timeouts show in the status document.
    hydra_testkit::status_document_until(&db.pool, LIMIT, |d| {
        let timeouts = d["machines"]["one"]["substituterTimeouts"].as_u64();
        timeouts.filter(|t| *t >= 1)
    })
    .await
    .expect("the status shows the timeout");
    // And in the Prometheus metrics.
    let scrape = scrape(&http).await.unwrap();
    let timeouts = sample(
        &scrape,
        "hqr_machine_substituter_timeouts_total",
        "machine",
        "one",
    );
    assert!(timeouts.is_some_and(|t| t >= 1.0), "{timeouts:?}");
}

#[tokio::test]
async fn a_cache_stopped_mid_run_leaves_the_inputs_to_the_runner() {
    let db = TestDb::new().await;
    let store = NixStore::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (sk, public) = nix_key(&store, dir.path(), "farm-1").await.unwrap();
    let cache_dir = dir.path().join("cache");
    let setup = RunnerSetup::new_with(
        dir.path(),
        &store,
        &db.url,
        &format!(
            "destinations = [\"file://{}\"]\nsigning_key_file = \"{}\"",
            cache_dir.display(),
            sk.display()
        ),
    )
    .unwrap();
    let _runner = setup.start(&[]).await.unwrap();
    let expr = r#"with prelude; rec {
      lib1 = mkDrv { name = "lib1"; script = "echo one > $out"; };
      lib2 = mkDrv { name = "lib2"; script = "echo two > $out"; };
      app1 = mkDrv { name = "app1"; script = "cat ${lib1} > $out"; };
      app2 = mkDrv { name = "app2"; script = "cat ${lib2} > $out"; };
    }"#;
    let mut first = BuilderProcess::start("first", &setup.address, dir.path()).unwrap();
    build(&db, &store, expr, "lib1").await;
    build(&db, &store, expr, "lib2").await;
    uploads_done(&db.pool, LIMIT).await.unwrap();
    first.kill().await.unwrap();

    // The cache, served over HTTP, works for the first job...
    let address = hydra_testkit::process::free_address().unwrap();
    let port = address.rsplit(':').next().unwrap().to_owned();
    let mut command = tokio::process::Command::new("python3");
    command
        .args([
            "-m",
            "http.server",
            &port,
            "--bind",
            "127.0.0.1",
            "--directory",
        ])
        .arg(&cache_dir);
    let mut server = hydra_testkit::process::start_server(command, "Serving HTTP", LIMIT)
        .await
        .unwrap();
    let cache = format!("http://{address}");
    let mut second = BuilderProcess::start_with(
        "second",
        &setup.address,
        dir.path(),
        &format!(
            "substituters = [\"{cache}\"]\ntrusted_public_keys = [\"{public}\"]\nsubstituter_timeout_secs = 5.0"
        ),
    )
    .unwrap();
    build(&db, &store, expr, "app1").await;
    second
        .wait_for_line("substituted 1 of 1 inputs", LIMIT)
        .await
        .unwrap();

    // ...and is stopped: the next job's input comes from the runner.
    server.kill().await.unwrap();
    build(&db, &store, expr, "app2").await;
}
