//! Client tokens carry a role and a tenant, and the runner (a real
//! process, over real gRPC) holds every call to them: a tenant's
//! submitter touches its own builds only, a reader changes nothing, only
//! an operator restarts, bumps and drains, and a token file added later is
//! taken up by a reload. The client API has a port of its own; health is
//! open there, reflection needs a token, and a runner that would serve
//! builders or clients beyond loopback without authentication does not
//! start.

use std::time::Duration;

use hydra_proto::client::*;
use hydra_testkit::process::{BuilderProcess, RunnerSetup};
use hydra_testkit::{ApiClient, NixStore, TestDb, wait_finished};
use tonic::Code;

const LIMIT: Duration = Duration::from_secs(90);

const TOKENS: [(&str, &str); 4] = [
    ("ops.token", "op-secret\n"),
    (
        "web.token",
        "secret = \"web-secret\"\nrole = \"submitter\"\ntenant = \"web\"\n",
    ),
    (
        "mobile.token",
        "secret = \"mobile-secret\"\nrole = \"submitter\"\ntenant = \"mobile\"\n",
    ),
    (
        "audit.token",
        "secret = \"audit-secret\"\nrole = \"reader\"\n",
    ),
];

/// `message` sent with `secret` as its bearer token.
fn as_<T>(secret: &str, message: T) -> tonic::Request<T> {
    let mut r = tonic::Request::new(message);
    r.metadata_mut()
        .insert("authorization", format!("Bearer {secret}").parse().unwrap());
    r
}

/// The status of a call that must be refused.
fn refused<T: std::fmt::Debug>(result: Result<tonic::Response<T>, tonic::Status>) -> tonic::Status {
    match result {
        Ok(r) => panic!("not refused: {:?}", r.into_inner()),
        Err(s) => s,
    }
}

fn denied(status: tonic::Status, says: &str) {
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert!(status.message().contains(says), "{}", status.message());
}

/// A database, the runner's store and a runner setup whose
/// `client_tokens_dir` holds `files` (name, text).
struct Site {
    db: TestDb,
    store: NixStore,
    dir: tempfile::TempDir,
    tokens: std::path::PathBuf,
    setup: RunnerSetup,
}

impl Site {
    async fn with_tokens(files: &[(&str, &str)]) -> Site {
        let db = TestDb::new().await;
        let store = NixStore::start().unwrap();
        let dir = tempfile::tempdir().unwrap();
        let tokens = dir.path().join("client-tokens");
        std::fs::create_dir(&tokens).unwrap();
        for (name, text) in files {
            std::fs::write(tokens.join(name), text).unwrap();
        }
        let setup = RunnerSetup::new_with(
            dir.path(),
            &store,
            &db.url,
            &format!("client_tokens_dir = \"{}\"", tokens.display()),
        )
        .unwrap();
        Site {
            db,
            store,
            dir,
            tokens,
            setup,
        }
    }
}

#[tokio::test]
async fn each_token_does_what_its_role_and_tenant_allow_and_nothing_else() {
    let Site {
        db,
        store,
        dir,
        tokens,
        setup,
    } = Site::with_tokens(&TOKENS).await;
    let mut runner = setup.start(&[]).await.unwrap();
    let _builder = BuilderProcess::start("one", &setup.address, dir.path()).unwrap();
    let mut api = ApiClient::connect(format!("http://{}", setup.client_address))
        .await
        .unwrap();
    let drvs = store
        .instantiate(
            r#"with prelude; {
              site = mkDrv { name = "site"; script = "echo site > $out"; };
              app = mkDrv { name = "app"; script = "echo app > $out"; };
            }"#,
            &["site", "app"],
        )
        .await
        .unwrap();
    let submit = |tenant: &str, drv: &str| SubmitRequest {
        drv_paths: vec![drv.to_owned()],
        tenant: tenant.into(),
        ..Default::default()
    };

    // No token, or a wrong one: not even who is asking is known.
    let none = refused(api.cluster_status(ClusterStatusRequest {}).await);
    assert_eq!(none.code(), Code::Unauthenticated);
    let wrong = refused(
        api.cluster_status(as_("op-secreT", ClusterStatusRequest {}))
            .await,
    );
    assert_eq!(wrong.code(), Code::Unauthenticated);

    // Each submitter submits for its own tenant only; a reader not at all.
    let site = api
        .submit(as_("web-secret", submit("web", &drvs["site"])))
        .await
        .unwrap()
        .into_inner()
        .build_ids[0];
    denied(
        refused(
            api.submit(as_("web-secret", submit("mobile", &drvs["app"])))
                .await,
        ),
        "not mobile",
    );
    denied(
        refused(
            api.submit(as_("audit-secret", submit("web", &drvs["app"])))
                .await,
        ),
        "reader",
    );
    let app = api
        .submit(as_("mobile-secret", submit("mobile", &drvs["app"])))
        .await
        .unwrap()
        .into_inner()
        .build_ids[0];

    // Another tenant's build is out of reach: show, cancel, watch, logs.
    let show = GetBuildRequest { build_id: site };
    denied(
        refused(api.get_build(as_("mobile-secret", show)).await),
        "not tenant mobile's",
    );
    let cancel = CancelRequest {
        build_ids: vec![site],
        reason: "not yours".into(),
    };
    denied(
        refused(api.cancel(as_("mobile-secret", cancel.clone())).await),
        "not tenant mobile's",
    );
    denied(
        refused(api.cancel(as_("audit-secret", cancel)).await),
        "reader",
    );
    let watch_all = WatchRequest::default();
    denied(
        refused(api.watch(as_("mobile-secret", watch_all)).await),
        "tenant mobile's builds only",
    );
    let list = ListBuildsRequest {
        tenant: "web".into(),
        ..Default::default()
    };
    denied(
        refused(api.list_builds(as_("mobile-secret", list)).await),
        "lists tenant mobile's builds only",
    );
    // A scoped list shows its own builds, whatever it asks.
    let own = api
        .list_builds(as_("mobile-secret", ListBuildsRequest::default()))
        .await
        .unwrap()
        .into_inner();
    let ids: Vec<u64> = own.builds.iter().map(|b| b.id).collect();
    assert_eq!(ids, [app]);

    // Only an operator restarts, bumps and drains.
    let restart = RestartRequest {
        build_ids: vec![site],
        ..Default::default()
    };
    denied(
        refused(api.restart(as_("web-secret", restart.clone())).await),
        "needs an operator's token",
    );
    let bump = BumpRequest {
        build_ids: vec![site],
        global_priority: 5,
    };
    denied(
        refused(api.bump(as_("web-secret", bump.clone())).await),
        "needs an operator's token",
    );
    let drain = DrainRequest {
        machine: "one".into(),
    };
    denied(
        refused(api.drain(as_("audit-secret", drain)).await),
        "needs an operator's token",
    );
    api.bump(as_("op-secret", bump)).await.unwrap();

    // What each may do, it does: both builds finish, a reader sees them.
    wait_finished(&db.pool, [site as i32, app as i32], LIMIT)
        .await
        .unwrap();
    let seen = api
        .get_build(as_("audit-secret", GetBuildRequest { build_id: site }))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(seen.id, site);
    api.watch(as_("audit-secret", watch_all)).await.unwrap();
    api.restart(as_("op-secret", restart)).await.unwrap();

    // A token added later is taken up by a reload.
    std::fs::write(
        tokens.join("late.token"),
        "secret = \"late-secret\"\nrole = \"reader\"\ntenant = \"web\"\n",
    )
    .unwrap();
    runner.hangup().unwrap();
    runner
        .wait_for_line("reloaded the configuration", LIMIT)
        .await
        .unwrap();
    api.get_build(as_("late-secret", GetBuildRequest { build_id: site }))
        .await
        .unwrap();
    denied(
        refused(
            api.get_build(as_("late-secret", GetBuildRequest { build_id: app }))
                .await,
        ),
        "not tenant web's",
    );
}

#[tokio::test]
async fn health_is_open_reflection_needs_a_token_and_builders_port_has_no_client_api() {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;

    let Site {
        db: _db,
        store: _store,
        dir: _dir,
        tokens: _tokens,
        setup,
    } = Site::with_tokens(&[("ops.token", "op-secret")]).await;
    let _runner = setup.start(&[]).await.unwrap();
    let channel =
        tonic::transport::Channel::from_shared(format!("http://{}", setup.client_address))
            .unwrap()
            .connect()
            .await
            .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "hydra.client.v1.ClientService".into(),
        })
        .await
        .expect("health answers without a token");
    let list = || ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut reflection = ServerReflectionClient::new(channel);
    let anonymous = reflection
        .server_reflection_info(tokio_stream::once(list()))
        .await;
    let status = match anonymous {
        Ok(_) => panic!("reflection answered without a token"),
        Err(s) => s,
    };
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    reflection
        .server_reflection_info(as_("op-secret", tokio_stream::once(list())))
        .await
        .expect("reflection with a token");

    // The builders' port serves the builder protocol, not the client API.
    let mut on_builders = ApiClient::connect(format!("http://{}", setup.address))
        .await
        .unwrap();
    let status = refused(
        on_builders
            .cluster_status(as_("op-secret", ClusterStatusRequest {}))
            .await,
    );
    assert_eq!(status.code(), Code::Unimplemented, "{status:?}");
}

#[tokio::test]
async fn a_runner_open_beyond_loopback_without_authentication_does_not_start() {
    let dir = tempfile::tempdir().unwrap();
    for (config, says) in [
        ("listen = \"0.0.0.0:0\"\n", "set builder_tokens_dir"),
        ("client_listen = \"0.0.0.0:0\"\n", "set client_tokens_dir"),
    ] {
        let file = dir.path().join("open.toml");
        std::fs::write(&file, config).unwrap();
        let path = file.display().to_string();
        let out = hydra_testkit::process::run_binary(
            "hydra-queue-runner",
            [
                "serve",
                "--config",
                path.as_str(),
                "--database-url",
                "postgres:///unused",
            ],
        )
        .await;
        assert!(!out.status.success());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("reaches beyond this machine") && err.contains(says),
            "{err}"
        );
        let check = hydra_testkit::process::run_binary(
            "hydra-queue-runner",
            ["config", "check", "--config", path.as_str()],
        )
        .await;
        assert!(!check.status.success(), "config check refuses it too");
        // Said on purpose, it starts (as far as the configuration goes).
        std::fs::write(&file, format!("{config}allow_unauthenticated = true\n")).unwrap();
        let check = hydra_testkit::process::run_binary(
            "hydra-queue-runner",
            ["config", "check", "--config", path.as_str()],
        )
        .await;
        assert!(
            check.status.success(),
            "{}",
            String::from_utf8_lossy(&check.stderr)
        );
    }
}
