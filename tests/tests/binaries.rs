//! The shipped binaries, as an operator runs them: `hydra-queue-runner
//! serve` with a TOML file, and `hydra-builder` with flags, as separate
//! processes, build a queued job.

use std::process::Stdio;
use std::time::Duration;

use hydra_testkit::process::binary;
use hydra_testkit::{NixStore, TestDb};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;

#[tokio::test]
async fn the_runner_and_builder_binaries_build_a_queued_job() {
    let db = TestDb::new().await;
    let runner_store = NixStore::start().unwrap();
    let builder_store = NixStore::start().unwrap();
    let data = tempfile::tempdir().unwrap();
    let config = data.path().join("runner.toml");
    std::fs::write(
        &config,
        format!(
            "listen = \"127.0.0.1:0\"\nstore_socket = \"{}\"\nhydra_data = \"{}\"\n",
            runner_store.socket().display(),
            data.path().display()
        ),
    )
    .unwrap();
    let mut runner = Command::new(binary("hydra-queue-runner"))
        .args(["serve", "--config"])
        .arg(&config)
        .env("HYDRA_DATABASE_URL", &db.url)
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    // The runner logs where it listens; read it from its output.
    let mut lines = BufReader::new(runner.stderr.take().unwrap()).lines();
    let addr = loop {
        let line = tokio::time::timeout(Duration::from_secs(30), lines.next_line())
            .await
            .expect("the runner did not start")
            .unwrap()
            .expect("the runner exited");
        if let Some(rest) = line.split("serving builders on ").nth(1) {
            break rest.trim().to_owned();
        }
    };
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    let _builder = Command::new(binary("hydra-builder"))
        .args([
            "--runner-url",
            &format!("http://{addr}"),
            "--machine-name",
            "separate-process",
        ])
        .arg("--nix-daemon-socket")
        .arg(builder_store.socket())
        .env("RUST_LOG", "warn")
        .kill_on_drop(true)
        .spawn()
        .unwrap();

    let drvs = runner_store
        .instantiate(r#"with prelude; { job = mkDrv { name = "job"; script = "echo from a process > $out"; }; }"#, &["job"])
        .await
        .unwrap();
    hydra_testkit::hydra_jobset(&db.pool, "p", "j")
        .await
        .unwrap();
    let mut listener = sqlx::postgres::PgListener::connect_with(&db.pool)
        .await
        .unwrap();
    listener.listen("build_finished").await.unwrap();
    let id: i32 = sqlx::query_scalar(
        "insert into Builds (finished, timestamp, jobset_id, job, drvPath, system)
         values (0, 0, (select id from Jobsets), 'job', $1, 'x86_64-linux') returning id",
    )
    .bind(&drvs["job"])
    .fetch_one(&db.pool)
    .await
    .unwrap();
    sqlx::query("notify builds_added")
        .execute(&db.pool)
        .await
        .unwrap();
    let note = tokio::time::timeout(Duration::from_secs(120), listener.recv())
        .await
        .expect("the build did not finish")
        .unwrap();
    assert_eq!(note.payload(), id.to_string());
    let (status, machine): (Option<i32>, String) = sqlx::query_as(
        "select b.buildStatus, s.machine from Builds b join BuildSteps s on s.build = b.id where b.id = $1",
    )
    .bind(id)
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!((status, machine.as_str()), (Some(0), "separate-process"));
}

#[tokio::test]
async fn a_config_file_with_an_unknown_key_is_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("runner.toml");
    std::fs::write(&config, "max_log_sise = 1\n").unwrap();
    let out = hydra_testkit::process::run_binary(
        "hydra-queue-runner",
        [
            std::ffi::OsStr::new("serve"),
            "--database-url".as_ref(),
            "postgres://nobody@127.0.0.1:1/none".as_ref(),
            "--config".as_ref(),
            config.as_os_str(),
        ],
    )
    .await;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("max_log_sise") && err.contains("runner.toml"),
        "{err}"
    );
}
