//! Deployment as an operator does it, with the shipped binaries as
//! processes: systemd's notify protocol, configuration checks and reloads,
//! builder authentication (tokens, mutual TLS with certificates made here),
//! and a hot standby taking over from a killed runner.

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::path::Path;
use std::time::Duration;

use hydra_testkit::process::{
    BuilderProcess, Gate, RunnerSetup, StartSignal, count_lines, run_binary,
};
use hydra_testkit::tls::TestCa;
use hydra_testkit::{NixStore, TestDb, create_jobset, queue_builds, wait_finished};
use tokio::net::UnixDatagram;

const LIMIT: Duration = Duration::from_secs(90);

/// Instantiates `expr`'s `jobs` and queues them; job -> build id.
async fn queue(db: &TestDb, store: &NixStore, expr: &str, jobs: &[&str]) -> BTreeMap<String, i32> {
    let jobset = create_jobset(&db.pool).await.unwrap();
    let drvs = store.instantiate(expr, jobs).await.unwrap();
    queue_builds(&db.pool, store, jobset, &drvs, |_| Default::default())
        .await
        .unwrap()
}

async fn status_of(db: &TestDb, build: i32) -> Option<i32> {
    sqlx::query_scalar("select buildStatus from Builds where id = $1")
        .bind(build)
        .fetch_one(&db.pool)
        .await
        .unwrap()
}

const HELLO: &str =
    r#"with prelude; { hello = mkDrv { name = "hello"; script = "echo hello > $out"; }; }"#;

#[tokio::test]
async fn the_runner_speaks_systemds_notify_protocol() {
    let db = TestDb::new().await;
    let store = NixStore::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let socket_path = dir.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    let setup = RunnerSetup::new(dir.path(), &store, &db.url).unwrap();
    let runner = setup
        .start(&[
            ("NOTIFY_SOCKET", socket_path.to_str().unwrap()),
            ("WATCHDOG_USEC", "1000000"),
        ])
        .await
        .unwrap();

    let mut seen: Vec<String> = Vec::new();
    let mut buf = vec![0u8; 4096];
    let wanted = ["READY=1", "STATUS=active", "WATCHDOG=1"];
    while !wanted
        .iter()
        .all(|w| seen.iter().any(|m| m.lines().any(|l| l.starts_with(w))))
    {
        let n = tokio::time::timeout(LIMIT, socket.recv(&mut buf))
            .await
            .expect("a notification")
            .unwrap();
        seen.push(String::from_utf8_lossy(&buf[..n]).into_owned());
    }
    // Watchdog pings keep coming (every half of WATCHDOG_USEC).
    let mut pings = 0;
    while pings < 2 {
        let n = tokio::time::timeout(LIMIT, socket.recv(&mut buf))
            .await
            .expect("more watchdog pings")
            .unwrap();
        if String::from_utf8_lossy(&buf[..n]).contains("WATCHDOG=1") {
            pings += 1;
        }
    }

    runner.terminate().unwrap();
    loop {
        let n = tokio::time::timeout(LIMIT, socket.recv(&mut buf))
            .await
            .expect("STOPPING=1 before the exit")
            .unwrap();
        if String::from_utf8_lossy(&buf[..n]).contains("STOPPING=1") {
            break;
        }
    }
    let exit = runner.exit(LIMIT).await.unwrap();
    assert!(exit.status.success(), "{}", exit.output);
}

/// Runs `name args... file`, which must fail naming `key` and the file.
async fn refuses_naming(name: &str, args: &[&str], file: &Path, key: &str) {
    let args = args.iter().map(OsStr::new).chain([file.as_os_str()]);
    let out = run_binary(name, args).await;
    assert!(!out.status.success(), "{name} accepted {}", file.display());
    let err = String::from_utf8_lossy(&out.stderr);
    let file_name = file.file_name().unwrap().to_string_lossy();
    assert!(err.contains(key) && err.contains(&*file_name), "{err}");
}

#[tokio::test]
async fn config_check_names_the_key_and_the_file_and_help_lists_every_key() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "max_tries = 3\npint_interval_secs = 4\n").unwrap();
    refuses_naming(
        "hydra-queue-runner",
        &["config", "check", "--config"],
        &bad,
        "pint_interval_secs",
    )
    .await;

    let good = dir.path().join("good.toml");
    std::fs::write(&good, "max_tries = 3\n").unwrap();
    let out = run_binary(
        "hydra-queue-runner",
        [
            OsStr::new("config"),
            OsStr::new("check"),
            OsStr::new("--config"),
            good.as_os_str(),
        ],
    )
    .await;
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with("ok\n") && text.contains("max_tries = 3"),
        "{text}"
    );

    let builder_bad = dir.path().join("builder.toml");
    std::fs::write(&builder_bad, "max_jobz = 2\n").unwrap();
    refuses_naming(
        "hydra-builder",
        &["--check-config", "--config"],
        &builder_bad,
        "max_jobz",
    )
    .await;

    let help = run_binary("hydra-queue-runner", ["serve", "--help"]).await;
    let help = String::from_utf8_lossy(&help.stdout);
    for key in [
        "ping_timeout_secs = 30",
        "max_tries = 5",
        "builder_tokens_dir = none",
    ] {
        assert!(help.contains(key), "{key} in serve --help");
    }
    let help = run_binary("hydra-builder", ["--help"]).await;
    assert!(String::from_utf8_lossy(&help.stdout).contains("max_jobs = 1"));
}

#[tokio::test]
async fn sighup_reloads_limits_and_pushes_the_ping_interval_to_builders() {
    let db = TestDb::new().await;
    let store = NixStore::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let setup = RunnerSetup::new(dir.path(), &store, &db.url).unwrap();
    let mut runner = setup.start(&[]).await.unwrap();
    let mut builder = BuilderProcess::start("one", &setup.address, dir.path()).unwrap();
    builder.wait_for_line("joined as one", LIMIT).await.unwrap();

    let mut text = std::fs::read_to_string(&setup.config).unwrap();
    text.push_str("max_log_size = 1000\nping_interval_secs = 7\ndatabase_connections = 3\n");
    std::fs::write(&setup.config, text).unwrap();
    runner.hangup().unwrap();
    let line = runner
        .wait_for_line("reloaded the configuration", LIMIT)
        .await
        .unwrap();
    assert!(
        line.contains("max_log_size") && line.contains("ping_interval_secs"),
        "{line}"
    );
    assert!(
        line.contains("need_restart") && line.contains("database_connections"),
        "{line}"
    );
    builder
        .wait_for_line("asks for a ping every 7s", LIMIT)
        .await
        .unwrap();

    // The new log limit applies to the next step: it fails with 10.
    let ids = queue(
        &db,
        &store,
        r#"with prelude; { chatty = mkDrv { name = "chatty"; script = "for i in $(seq 1 500); do echo line $i of a chatty build; done; touch $out"; }; }"#,
        &["chatty"],
    )
    .await;
    wait_finished(&db.pool, ids.values().copied(), LIMIT)
        .await
        .unwrap();
    assert_eq!(status_of(&db, ids["chatty"]).await, Some(10));

    // A file that does not parse is refused; the running settings stay.
    std::fs::write(&setup.config, "max_log_size = \"lots\"\n").unwrap();
    runner.hangup().unwrap();
    runner.wait_for_line("reload refused", LIMIT).await.unwrap();
}

#[tokio::test]
async fn builders_without_the_right_token_are_refused_and_the_right_one_builds() {
    let db = TestDb::new().await;
    let store = NixStore::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let tokens = dir.path().join("tokens");
    std::fs::create_dir(&tokens).unwrap();
    std::fs::write(tokens.join("alpha.token"), "alpha-secret\n").unwrap();
    let setup = RunnerSetup::new_with(
        dir.path(),
        &store,
        &db.url,
        &format!("builder_tokens_dir = \"{}\"", tokens.display()),
    )
    .unwrap();
    let mut runner = setup.start(&[]).await.unwrap();
    let url = vec![format!("http://{}", setup.address)];

    for (name, token, says) in [
        ("alpha", None, "requires a builder token"),
        ("alpha", Some("guess"), "unknown builder token"),
        ("beta", Some("alpha-secret"), "not beta's"),
    ] {
        let env: Vec<(&str, &str)> = token
            .map(|t| ("HYDRA_BUILDER_TOKEN", t))
            .into_iter()
            .collect();
        let mut b = BuilderProcess::start_urls(name, &url, dir.path(), "", &env).unwrap();
        b.wait_for_line(says, LIMIT).await.unwrap();
        let status = b.exit_status(LIMIT).await.unwrap();
        assert!(!status.success(), "{name} with {token:?} ends");
        runner.wait_for_line(says, LIMIT).await.unwrap();
    }
    let joined: i64 = sqlx::query_scalar("select count(*) from BuildSteps")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    assert_eq!(joined, 0);

    let token_file = dir.path().join("alpha-token");
    std::fs::write(&token_file, "alpha-secret").unwrap();
    let _alpha = BuilderProcess::start_urls(
        "alpha",
        &url,
        dir.path(),
        &format!("token_file = \"{}\"", token_file.display()),
        &[],
    )
    .unwrap();
    let ids = queue(&db, &store, HELLO, &["hello"]).await;
    wait_finished(&db.pool, ids.values().copied(), LIMIT)
        .await
        .unwrap();
    assert_eq!(status_of(&db, ids["hello"]).await, Some(0));

    // A reload that finds an unusable token file (empty) is refused: the
    // runner stays up with the tokens it has, and alpha still builds.
    std::fs::write(tokens.join("gamma.token"), "").unwrap();
    runner.hangup().unwrap();
    let line = runner.wait_for_line("reload refused", LIMIT).await.unwrap();
    assert!(line.contains("gamma.token"), "{line}");
    let jobset: i32 = sqlx::query_scalar("select id from Jobsets")
        .fetch_one(&db.pool)
        .await
        .unwrap();
    let drvs = store
        .instantiate(
            r#"with prelude; { after = mkDrv { name = "after-reload"; script = "echo after > $out"; }; }"#,
            &["after"],
        )
        .await
        .unwrap();
    let ids = queue_builds(&db.pool, &store, jobset, &drvs, |_| Default::default())
        .await
        .unwrap();
    wait_finished(&db.pool, ids.values().copied(), LIMIT)
        .await
        .unwrap();
    assert_eq!(status_of(&db, ids["after"]).await, Some(0));

    // Revoked: alpha's token file goes. The reload closes alpha's stream,
    // and its return with that token is refused.
    std::fs::remove_file(tokens.join("gamma.token")).unwrap();
    std::fs::remove_file(tokens.join("alpha.token")).unwrap();
    std::fs::write(tokens.join("beta.token"), "beta-secret").unwrap();
    runner.hangup().unwrap();
    runner
        .wait_for_line("its token was revoked by a reload", LIMIT)
        .await
        .unwrap();
    runner
        .wait_for_line("unknown builder token", LIMIT)
        .await
        .unwrap();
}

#[tokio::test]
async fn mutual_tls_admits_only_builders_with_a_certificate_of_its_ca() {
    let db = TestDb::new().await;
    let store = NixStore::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new(dir.path(), "farm").unwrap();
    let foreign = TestCa::new(dir.path(), "foreign").unwrap();
    let server = ca.server("runner").unwrap();
    let setup = RunnerSetup::new_with(
        dir.path(),
        &store,
        &db.url,
        &format!(
            "tls_cert = \"{}\"\ntls_key = \"{}\"\ntls_client_ca = \"{}\"",
            server.cert.display(),
            server.key.display(),
            ca.cert_file().unwrap().display()
        ),
    )
    .unwrap();
    let mut runner = setup.start(&[]).await.unwrap();
    let port = setup.address.rsplit(':').next().unwrap();
    let url = vec![format!("https://localhost:{port}")];
    let trust = format!("tls_ca = \"{}\"\n", ca.cert_file().unwrap().display());

    // No client certificate, then one of another CA: the handshake fails.
    let mut anonymous =
        BuilderProcess::start_urls("anonymous", &url, dir.path(), &trust, &[]).unwrap();
    let said = anonymous
        .wait_for_line("lost the runner", LIMIT)
        .await
        .unwrap();
    assert!(said.contains("certificate"), "{said}");
    runner
        .wait_for_line("TLS handshake failed: peer sent no certificates", LIMIT)
        .await
        .unwrap();
    drop(anonymous);
    let stranger_cert = foreign.client("stranger").unwrap();
    let mut stranger = BuilderProcess::start_urls(
        "stranger",
        &url,
        dir.path(),
        &format!(
            "{trust}tls_cert = \"{}\"\ntls_key = \"{}\"",
            stranger_cert.cert.display(),
            stranger_cert.key.display()
        ),
        &[],
    )
    .unwrap();
    let said = stranger
        .wait_for_line("lost the runner", LIMIT)
        .await
        .unwrap();
    assert!(said.contains("certificate"), "{said}");
    let refused = runner
        .wait_for_line("TLS handshake failed: invalid peer certificate", LIMIT)
        .await
        .unwrap();
    assert!(refused.contains("UnknownIssuer"), "{refused}");
    drop(stranger);

    // A certificate of the farm's CA joins and builds.
    let member_cert = ca.client("member").unwrap();
    let _member = BuilderProcess::start_urls(
        "member",
        &url,
        dir.path(),
        &format!(
            "{trust}tls_cert = \"{}\"\ntls_key = \"{}\"",
            member_cert.cert.display(),
            member_cert.key.display()
        ),
        &[],
    )
    .unwrap();
    let ids = queue(&db, &store, HELLO, &["hello"]).await;
    wait_finished(&db.pool, ids.values().copied(), LIMIT)
        .await
        .unwrap();
    let machines: Vec<String> = sqlx::query_scalar("select machine from BuildSteps")
        .fetch_all(&db.pool)
        .await
        .unwrap();
    assert_eq!(machines, ["member"]);
}

#[tokio::test]
async fn a_standby_takes_over_when_the_active_runner_dies() {
    let db = TestDb::new().await;
    let store = NixStore::start().unwrap();
    let dir = tempfile::tempdir().unwrap();
    let (dir_a, dir_b) = (dir.path().join("a"), dir.path().join("b"));
    std::fs::create_dir_all(&dir_a).unwrap();
    std::fs::create_dir_all(&dir_b).unwrap();
    let active = RunnerSetup::new(&dir_a, &store, &db.url).unwrap();
    let standby = RunnerSetup::new(&dir_b, &store, &db.url).unwrap();
    let first = active.start(&[]).await.unwrap();
    let mut second = standby.launch(&[]).unwrap();
    second.wait_for_line("standing by", LIMIT).await.unwrap();

    let urls = vec![
        format!("http://{}", active.address),
        format!("http://{}", standby.address),
    ];
    let _builders = [
        BuilderProcess::start_urls("one", &urls, dir.path(), "", &[]).unwrap(),
        BuilderProcess::start_urls("two", &urls, dir.path(), "", &[]).unwrap(),
    ];
    let counter = dir.path().join("built");
    let signal = StartSignal::new(dir.path(), "started").unwrap();
    let gate = Gate::new(dir.path(), "gate").unwrap();
    let expr = format!(
        r#"with prelude; rec {{
          base = mkDrv {{ name = "base"; script = "echo started > {s}; read x < {g}; echo base >> {c}; echo base > $out"; }};
          left = mkDrv {{ name = "left"; script = "echo left >> {c}; cat ${{base}} > $out"; }};
          right = mkCA {{ name = "right"; script = "echo right >> {c}; cat ${{base}} > $out; echo r >> $out"; }};
          top = mkDrv {{ name = "top"; script = "echo top >> {c}; cat ${{left}} ${{right}} > $out"; }};
        }}"#,
        c = counter.display(),
        g = gate.path().display(),
        s = signal.path().display()
    );
    let ids = queue(&db, &store, &expr, &["base", "left", "right", "top"]).await;
    signal.started(LIMIT).await.unwrap();
    first.kill().await.unwrap();
    second
        .wait_for_line("serving builders on", Duration::from_secs(30))
        .await
        .unwrap();
    // The builder kept building; the standby re-adopts the job before it
    // is let go on.
    second
        .wait_for_line("re-adopted attempt", LIMIT)
        .await
        .unwrap();
    gate.open(LIMIT).await.unwrap();

    wait_finished(&db.pool, ids.values().copied(), LIMIT)
        .await
        .unwrap();
    for (job, id) in &ids {
        assert_eq!(status_of(&db, *id).await, Some(0), "{job}");
    }
    let built = count_lines(&counter).unwrap();
    for job in ["base", "left", "right", "top"] {
        assert_eq!(built[job], 1, "{job} was built once");
    }
    let twice: i64 = sqlx::query_scalar(
        "select count(*) from (select 1 from BuildSteps where status = 0 group by drvPath having count(*) > 1) d",
    )
    .fetch_one(&db.pool)
    .await
    .unwrap();
    assert_eq!(twice, 0);
}
