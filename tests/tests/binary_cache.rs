//! Outputs published to a `file://` binary cache, signed with a Nix key:
//! a fresh store substitutes them with real Nix, verifying the signatures,
//! CA outputs through their realisations; and a runner restarted with
//! uploads pending finishes them, each once.

use std::path::Path;
use std::time::Duration;

use hydra_nix::daemon::ROOTED_IDLE;
use hydra_testkit::caches::{S3Server, from_cache};
use hydra_testkit::process::{BuilderProcess, RunnerSetup};
use hydra_testkit::{BuilderSpec, Farm, NixStore, create_jobset, queue_builds, wait_finished};
use sqlx::PgPool;

const LIMIT: Duration = Duration::from_secs(90);

const JOBSET: &str = r#"with prelude; rec {
  lib = mkDrv { name = "lib"; script = "mkdir -p $out/lib; echo library > $out/lib/lib.txt; ln -s lib.txt $out/lib/link"; };
  app = mkDrv { name = "app"; script = "mkdir $out; echo ${lib} > $out/uses-lib"; };
  ca-base = mkCA { name = "ca-base"; script = "echo base > $out"; };
  ca-app = mkCA { name = "ca-app"; script = "cat ${ca-base} > $out; echo app >> $out"; };
}"#;

async fn nix_key(store: &NixStore, dir: &Path) -> (std::path::PathBuf, String) {
    hydra_testkit::caches::nix_key(store, dir, "test-cache-1")
        .await
        .unwrap()
}

async fn uploads_done(pool: &PgPool) {
    hydra_testkit::caches::uploads_done(pool, LIMIT)
        .await
        .unwrap();
}

#[tokio::test]
async fn a_fresh_store_substitutes_every_output_from_the_signed_cache() {
    let dir = tempfile::tempdir().unwrap();
    let cache_dir = dir.path().join("cache");
    let keygen = NixStore::start().unwrap();
    let (secret, public) = nix_key(&keygen, dir.path()).await;
    let cache = format!("file://{}", cache_dir.display());
    let cache_url = cache.clone();
    let mut farm = Farm::start(move |c| {
        c.destinations = vec![cache_url];
        c.signing_key_file = Some(secret);
    })
    .await
    .unwrap();
    farm.add_builder(BuilderSpec::new("b")).await.unwrap();
    let jobs = ["lib", "app", "ca-base", "ca-app"];
    let ids = farm.submit(JOBSET, &jobs).await.unwrap();
    farm.wait_finished(ids.values().copied(), LIMIT)
        .await
        .unwrap();
    uploads_done(&farm.db.pool).await;
    assert!(cache_dir.join("nix-cache-info").exists());

    // Input-addressed outputs, with their references, by store path.
    let (app,): (String,) =
        sqlx::query_as("select path from BuildOutputs where build = $1 and name = 'out'")
            .bind(ids["app"])
            .fetch_one(&farm.db.pool)
            .await
            .unwrap();
    let fresh = NixStore::start().unwrap();
    let mut args = vec!["--realise", app.as_str()];
    args.extend(from_cache(&cache, &public));
    fresh.run("nix-store", &args).await.unwrap();
    let uses = fresh
        .read_store_file(&format!("{app}/uses-lib"))
        .await
        .unwrap();
    let lib = String::from_utf8(uses).unwrap();
    let text = fresh
        .read_store_file(&format!("{}/lib/lib.txt", lib.trim()))
        .await
        .unwrap();
    assert_eq!(text, b"library\n", "the reference came along");

    // Another key does not verify: Nix refuses to substitute.
    let stranger = NixStore::start().unwrap();
    let (_, other_public) = nix_key(&stranger, &dir.path().join("..")).await;
    let mut args = vec!["--realise", app.as_str()];
    args.extend(from_cache(&cache, &other_public));
    assert!(
        stranger.run("nix-store", &args).await.is_err(),
        "unsigned for this key: not substituted"
    );

    // CA outputs through their realisations: the same derivations in a
    // fresh store are realised without building anything.
    let ca_store = NixStore::start().unwrap();
    let drvs = ca_store
        .instantiate_salted(JOBSET, &["ca-app"], farm.runner_store.salt())
        .await
        .unwrap();
    let mut args = vec!["--realise", drvs["ca-app"].as_str(), "--max-jobs", "0"];
    args.extend(from_cache(&cache, &public));
    let out = ca_store.run("nix-store", &args).await.unwrap();
    let (ours,): (String,) =
        sqlx::query_as("select path from BuildOutputs where build = $1 and name = 'out'")
            .bind(ids["ca-app"])
            .fetch_one(&farm.db.pool)
            .await
            .unwrap();
    assert_eq!(out.trim(), ours);
}

#[tokio::test]
async fn a_runner_restarted_with_uploads_pending_finishes_them_each_once() {
    let db = hydra_testkit::TestDb::new().await;
    let store = NixStore::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (secret, _) = nix_key(&store, dir.path()).await;
    let http = hydra_testkit::process::free_address().unwrap();
    // The cache cannot be written at first: its directory is a file.
    let cache_dir = dir.path().join("cache");
    std::fs::write(&cache_dir, "in the way").unwrap();
    let setup = RunnerSetup::new_with(
        dir.path(),
        &store,
        &db.url,
        &format!(
            "destinations = [\"file://{}\"]\nsigning_key_file = \"{}\"\nstatus_interval_secs = 1\nhttp_listen = \"{http}\"",
            cache_dir.display(),
            secret.display()
        ),
    )
    .unwrap();
    let mut runner = setup.start(&[]).await.unwrap();
    let _builder = BuilderProcess::start("one", &setup.address, dir.path()).unwrap();
    let jobset = create_jobset(&db.pool).await.unwrap();
    let drvs = store.instantiate(JOBSET, &["app"]).await.unwrap();
    let ids = queue_builds(&db.pool, &store, jobset, &drvs, |_| Default::default())
        .await
        .unwrap();
    wait_finished(&db.pool, ids.values().copied(), LIMIT)
        .await
        .unwrap();
    let status: Option<i32> = sqlx::query_scalar("select buildStatus from Builds")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(status, Some(0), "a cache that is down fails no build");
    runner.wait_for_line("upload failed", LIMIT).await.unwrap();
    // The status document shows the failing uploads.
    let dest = format!("file://{}", cache_dir.display());
    let error = hydra_testkit::status_document_until(&db.pool, LIMIT, |d| {
        let upload = &d["uploads"][&dest];
        (upload["failing"].as_i64().unwrap_or(0) > 0).then(|| upload["lastError"].to_string())
    })
    .await
    .expect("the status shows the failing uploads");
    assert!(error.contains("cache"), "{error}");
    let metrics = hydra_testkit::process::scrape(&http).await.unwrap();
    let failing =
        hydra_testkit::process::sample(&metrics, "hqr_uploads_failing", "destination", &dest);
    assert!(
        failing.is_some_and(|f| f >= 1.0),
        "failing uploads in /metrics: {failing:?}"
    );
    runner.kill().await.unwrap();
    let pending: i64 = sqlx::query_scalar("select count(*) from hqr_uploads where done_at is null")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert!(pending >= 2, "app and lib wait: {pending}");

    std::fs::remove_file(&cache_dir).unwrap();
    let _runner = setup.start(&[]).await.unwrap();
    uploads_done(&db.pool).await;
    let rows: Vec<(String, i64)> =
        sqlx::query_as("select item, count(*) from hqr_uploads group by item having count(*) > 1")
            .fetch_all(&db.pool)
            .await
            .unwrap();
    assert!(rows.is_empty(), "one row per item: {rows:?}");
    let narinfos = std::fs::read_dir(&cache_dir)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .path()
                .extension()
                .is_some_and(|x| x == "narinfo")
        })
        .count() as i64;
    let paths: i64 = sqlx::query_scalar("select count(*) from hqr_uploads where kind = 'path'")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(narinfos, paths, "a narinfo per queued path");
}

#[tokio::test]
async fn a_build_whose_outputs_are_only_in_the_cache_is_a_cached_build() {
    let dir = tempfile::tempdir().unwrap();
    let cache = format!("file://{}", dir.path().join("cache").display());
    let cache_url = cache.clone();
    let mut farm = Farm::start(move |c| c.destinations = vec![cache_url])
        .await
        .unwrap();
    farm.add_builder(BuilderSpec::new("b")).await.unwrap();
    let drvs = farm
        .runner_store
        .instantiate(JOBSET, &["lib"])
        .await
        .unwrap();
    let first = farm.queue(&drvs, |_| Default::default()).await.unwrap();
    farm.wait_finished(first.values().copied(), LIMIT)
        .await
        .unwrap();
    uploads_done(&farm.db.pool).await;
    let (out,): (String,) = sqlx::query_as("select path from BuildOutputs where build = $1")
        .bind(first["lib"])
        .fetch_one(&farm.db.pool)
        .await
        .unwrap();
    // The runner's store loses the output; the cache still has it. The
    // connection that imported it roots it until it has sat unused for
    // ROOTED_IDLE: then it is collectable, however idle the runner is.
    let deadline = std::time::Instant::now() + ROOTED_IDLE * 5;
    loop {
        match farm
            .runner_store
            .run("nix-store", &["--delete", &out])
            .await
        {
            Ok(_) => break,
            Err(e) if std::time::Instant::now() < deadline => {
                assert!(e.to_string().contains("still alive"), "{e}");
                tokio::time::sleep(ROOTED_IDLE / 4).await;
            }
            Err(e) => panic!("the runner keeps the output alive: {e}"),
        }
    }

    let again = farm.queue(&drvs, |_| Default::default()).await.unwrap();
    farm.wait_finished(again.values().copied(), LIMIT)
        .await
        .unwrap();
    assert_eq!(
        farm.statuses(&again).await.unwrap()["lib"],
        (0, 1),
        "cached"
    );
    let steps: i64 = sqlx::query_scalar("select count(*) from BuildSteps where build = $1")
        .bind(again["lib"])
        .fetch_one(&farm.db.pool)
        .await
        .unwrap();
    assert_eq!(steps, 0, "nothing was built");
    let (size, closure): (Option<i64>, Option<i64>) =
        sqlx::query_as("select size, closureSize from Builds where id = $1")
            .bind(again["lib"])
            .fetch_one(&farm.db.pool)
            .await
            .unwrap();
    assert!(size.unwrap() > 0 && closure.unwrap() >= size.unwrap());
    let remembered: i64 =
        sqlx::query_scalar("select count(*) from hqr_cache_presence where path = $1 and present")
            .bind(&out)
            .fetch_one(&farm.db.pool)
            .await
            .unwrap();
    assert_eq!(remembered, 1, "the lookup is remembered for the next start");
}

#[tokio::test]
async fn outputs_are_published_to_an_s3_destination() {
    let s3 = S3Server::start().await;
    let db = hydra_testkit::TestDb::new().await;
    let store = NixStore::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (secret, public) = nix_key(&store, dir.path()).await;
    let setup = RunnerSetup::new_with(
        dir.path(),
        &store,
        &db.url,
        &format!(
            "destinations = [\"s3://cache?endpoint={}&region=us-east-1\"]\nsigning_key_file = \"{}\"",
            s3.endpoint,
            secret.display()
        ),
    )
    .unwrap();
    let _runner = setup
        .start(&[
            ("AWS_ACCESS_KEY_ID", "test"),
            ("AWS_SECRET_ACCESS_KEY", "test"),
        ])
        .await
        .unwrap();
    let _builder = BuilderProcess::start("one", &setup.address, dir.path()).unwrap();
    let jobset = create_jobset(&db.pool).await.unwrap();
    let drvs = store.instantiate(JOBSET, &["app"]).await.unwrap();
    let ids = queue_builds(&db.pool, &store, jobset, &drvs, |_| Default::default())
        .await
        .unwrap();
    wait_finished(&db.pool, ids.values().copied(), LIMIT)
        .await
        .unwrap();
    uploads_done(&db.pool).await;

    let (app,): (String,) = sqlx::query_as("select path from BuildOutputs where name = 'out'")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    let hash_part = app.rsplit('/').next().unwrap().split('-').next().unwrap();
    let narinfo =
        String::from_utf8(s3.get(&format!("{hash_part}.narinfo")).await.unwrap()).unwrap();
    assert!(narinfo.contains(&format!("StorePath: {app}")), "{narinfo}");
    assert!(
        narinfo.contains(&format!("Sig: {}:", public.split(':').next().unwrap())),
        "{narinfo}"
    );
    // The NAR it names is there, and is the path's NAR.
    let url = narinfo
        .lines()
        .find_map(|l| l.strip_prefix("URL: "))
        .unwrap();
    let compressed = s3.get(url).await.expect("the NAR is in the bucket");
    let nar = zstd::decode_all(compressed.as_slice()).unwrap();
    let nar_hash = narinfo
        .lines()
        .find_map(|l| l.strip_prefix("NarHash: "))
        .unwrap();
    assert_eq!(hydra_nix::Hash::sha256(&nar).to_prefixed_base32(), nar_hash);
    assert!(s3.get("nix-cache-info").await.is_some());
}
