//! What operators use: `explain` with each reason a step waits for, the
//! CLI (restart after a fix), drain, `/metrics`, the status page in a real
//! headless Chromium, and gRPC health and reflection.

use std::path::Path;
use std::time::Duration;

use hydra_proto::client::*;
use hydra_testkit::process::{Gate, StartSignal, run_binary, scrape};
use hydra_testkit::{ApiClient, BuilderSpec, Farm, eventually};

const LIMIT: Duration = Duration::from_secs(60);

fn submit_request(drv: &str) -> SubmitRequest {
    SubmitRequest {
        drv_paths: vec![drv.to_owned()],
        tenant: "ops".into(),
        ..Default::default()
    }
}

async fn submit(api: &mut ApiClient, drv: &str) -> u64 {
    api.submit(submit_request(drv))
        .await
        .unwrap()
        .into_inner()
        .build_ids[0]
}

/// The reason Explain gives for the step of `build` named `name`.
async fn reason(api: &mut ApiClient, build: u64, name: &str) -> Option<StepExplanation> {
    let r = api
        .explain(ExplainRequest {
            build_id: build,
            drv_path: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    r.steps
        .into_iter()
        .find(|s| s.drv_path.ends_with(&format!("-{name}.drv")))
}

/// Waits until Explain gives `want` for the step (a build is loaded, a
/// machine joins or leaves: nothing a client can await).
async fn reason_becomes(api: &ApiClient, build: u64, name: &str, want: &str) -> StepExplanation {
    let found = eventually(LIMIT, || {
        let mut api = api.clone();
        async move {
            let r = reason(&mut api, build, name).await;
            Ok(r.filter(|s| s.reason == want))
        }
    })
    .await;
    match found {
        Ok(s) => s,
        Err(_) => {
            let mut api = api.clone();
            panic!(
                "step {name} of build {build}: want {want}, have {:?}",
                reason(&mut api, build, name).await
            )
        }
    }
}

fn jobs(signal: &Path, gate: &Path) -> String {
    format!(
        r#"with prelude; rec {{
  held = mkDrv {{ name = "held"; script = "echo started > {signal}; read x < {gate}; echo h > $out"; }};
  after = mkDrv {{ name = "after"; script = "cat ${{held}} > $out"; }};
  other = mkDrv {{ name = "other"; script = "echo o > $out"; }};
  gpu = mkDrv {{ name = "gpu"; requiredSystemFeatures = [ "gpu" ]; script = "echo g > $out"; }};
}}"#,
        signal = signal.display(),
        gate = gate.display()
    )
}

#[tokio::test]
async fn explain_names_dependencies_missing_machines_slots_drain_and_backoff() {
    // Aborted attempts back off for minutes here.
    let mut farm = Farm::start(|c| c.retry_base_secs = 600.0).await.unwrap();
    farm.add_builder(BuilderSpec::new("e1")).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let signal = StartSignal::new(dir.path(), "started").unwrap();
    let gate = Gate::new(dir.path(), "gate").unwrap();
    let drvs = farm
        .runner_store
        .instantiate(
            &jobs(signal.path(), gate.path()),
            &["after", "other", "gpu"],
        )
        .await
        .unwrap();
    let mut api = farm.api().await.unwrap();
    let x = submit(&mut api, &drvs["after"]).await;
    signal.started(LIMIT).await.unwrap();
    let y = submit(&mut api, &drvs["other"]).await;
    let z = submit(&mut api, &drvs["gpu"]).await;

    let waiting = reason_becomes(&api, x, "after", "waiting-for-dependencies").await;
    assert_eq!(waiting.waiting_for, 1);
    reason_becomes(&api, x, "held", "running").await;
    let busy = reason_becomes(&api, y, "other", "no-free-slot").await;
    assert!(busy.detail.contains("1 slots"), "{}", busy.detail);
    let missing = reason_becomes(&api, z, "gpu", "no-machine").await;
    assert!(
        missing.detail.contains("features gpu"),
        "{}",
        missing.detail
    );

    api.drain(DrainRequest {
        machine: "e1".into(),
    })
    .await
    .unwrap();
    reason_becomes(&api, y, "other", "machines-drained").await;
    let listed = api.machines(MachinesRequest {}).await.unwrap().into_inner();
    assert!(listed.machines[0].drained);
    assert_eq!(
        listed.machines[0].running, 1,
        "a drained machine keeps its step"
    );
    api.undrain(DrainRequest {
        machine: "e1".into(),
    })
    .await
    .unwrap();
    reason_becomes(&api, y, "other", "no-free-slot").await;

    // The machine dies mid-build: the step backs off.
    farm.builders[0].stop();
    let backoff = reason_becomes(&api, x, "held", "backoff").await;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    assert!(
        backoff.until > now + 60,
        "backs off for minutes: {backoff:?}"
    );
    let summary = api
        .explain(ExplainRequest {
            build_id: x,
            drv_path: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .summary;
    assert!(summary.contains("2 steps to go"), "{summary}");
}

#[tokio::test]
async fn explain_says_when_every_able_machine_is_resting() {
    let mut farm = Farm::start(|c| {
        c.retry_base_secs = 0.01;
        c.machine_rest_after_failures = 1;
        c.machine_rest_base_secs = 600.0;
    })
    .await
    .unwrap();
    farm.add_builder(BuilderSpec::new("r1")).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let signal = StartSignal::new(dir.path(), "started").unwrap();
    let gate = Gate::new(dir.path(), "gate").unwrap();
    let drvs = farm
        .runner_store
        .instantiate(&jobs(signal.path(), gate.path()), &["after"])
        .await
        .unwrap();
    let mut api = farm.api().await.unwrap();
    let x = submit(&mut api, &drvs["after"]).await;
    signal.started(LIMIT).await.unwrap();
    farm.builders[0].stop();
    // The same machine comes back, but rests after its failure.
    farm.add_builder(BuilderSpec::new("r1")).await.unwrap();
    let rested = reason_becomes(&api, x, "held", "machines-rested").await;
    assert!(rested.detail.contains("resting"), "{}", rested.detail);
}

/// The CLI against a runner: `hydra-queue-runner --url ... <command>`.
async fn cli(farm: &Farm, args: &[&str]) -> (bool, String) {
    farm.cli(args).await
}

fn json(text: &str) -> serde_json::Value {
    let last = text.lines().last().unwrap_or_default();
    serde_json::from_str(last).unwrap_or_else(|e| panic!("{e}: {text}"))
}

#[tokio::test]
async fn the_cli_restarts_a_failed_build_and_it_succeeds_once_the_cause_is_fixed() {
    let mut farm = Farm::start(|_| {}).await.unwrap();
    farm.add_builder(BuilderSpec::new("cli-builder"))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let marker = dir.path().join("fixed");
    let expr = format!(
        r#"with prelude; {{
  flaky = mkDrv {{ name = "flaky"; script = "test -e {m} || {{ echo missing {m}; exit 1; }}; echo fixed; echo ok > $out"; }};
}}"#,
        m = marker.display()
    );
    let drvs = farm
        .runner_store
        .instantiate(&expr, &["flaky"])
        .await
        .unwrap();

    let (ok, out) = cli(
        &farm,
        &[
            "--json",
            "submit",
            "--tenant",
            "ops",
            "--priority",
            "interactive",
            &drvs["flaky"],
        ],
    )
    .await;
    assert!(ok);
    let id = json(&out)["builds"][0].as_u64().unwrap();
    let id_arg = id.to_string();
    let (ok, out) = cli(&farm, &["--json", "watch", &id_arg]).await;
    assert!(!ok, "watch fails when the build fails");
    assert_eq!(json(&out)["summary"]["status"], "failed");
    let (_, log) = cli(&farm, &["logs", &id_arg]).await;
    assert!(log.contains("missing"), "{log}");

    std::fs::write(&marker, "").unwrap();
    let (_, status) = cli(&farm, &["--json", "status"]).await;
    let seen = json(&status)["last_event_seq"]
        .as_u64()
        .unwrap()
        .to_string();
    let (ok, out) = cli(&farm, &["--json", "restart", &id_arg]).await;
    assert!(ok);
    assert_eq!(json(&out)["restarted"][0].as_u64(), Some(id));
    let (ok, out) = cli(&farm, &["--json", "watch", &id_arg, "--after", &seen]).await;
    assert!(ok, "{out}");
    let summary = &json(&out)["summary"];
    assert_eq!(summary["status"], "succeeded");
    assert!(
        summary["outputs"]["out"]
            .as_str()
            .unwrap()
            .ends_with("-flaky")
    );
    let (_, log) = cli(&farm, &["logs", &id_arg]).await;
    assert!(log.contains("fixed"), "{log}");

    // Tables by default, JSON on request, for the other commands.
    let (ok, table) = cli(&farm, &["machines"]).await;
    assert!(
        ok && table.starts_with("MACHINE") && table.contains("cli-builder"),
        "{table}"
    );
    let (_, machines) = cli(&farm, &["--json", "machines"]).await;
    assert_eq!(json(&machines)[0]["name"], "cli-builder");
    let (ok, listed) = cli(&farm, &["--json", "list", "--tenant", "ops"]).await;
    assert!(ok);
    assert_eq!(json(&listed)["builds"][0]["id"].as_u64(), Some(id));
    let (ok, _) = cli(&farm, &["bump", &id_arg, "--priority", "50"]).await;
    assert!(ok, "bumping a finished build is a no-op, not an error");
    let (ok, _) = cli(&farm, &["show", "99999"]).await;
    assert!(!ok, "an unknown build is an error");
}

#[tokio::test]
async fn completions_and_a_man_page_come_from_the_command_line_definition() {
    let out = run_binary("hydra-queue-runner", ["completions", "bash"]).await;
    let script = String::from_utf8(out.stdout).unwrap();
    assert!(script.contains("hydra-queue-runner") && script.contains("explain"));
    let out = run_binary("hydra-queue-runner", ["man"]).await;
    let page = String::from_utf8(out.stdout).unwrap();
    assert!(page.starts_with(".ie") && page.contains(".TH hydra-queue-runner"));
}

#[tokio::test]
async fn metrics_parse_and_the_status_page_shows_a_machine_in_headless_chromium() {
    let mut farm = Farm::start(|c| c.http_listen = Some("127.0.0.1:0".parse().unwrap()))
        .await
        .unwrap();
    farm.add_builder(BuilderSpec::new("page-builder"))
        .await
        .unwrap();
    let drvs = farm
        .runner_store
        .instantiate(
            r#"with prelude; { one = mkDrv { name = "one"; script = "echo 1 > $out"; }; }"#,
            &["one"],
        )
        .await
        .unwrap();
    let mut api = farm.api().await.unwrap();
    let id = submit(&mut api, &drvs["one"]).await;
    farm.wait_finished([id as i32], LIMIT).await.unwrap();
    let http = farm.runner().http_addr.unwrap().to_string();

    let metrics = scrape(&http).await.unwrap();
    let value = |name: &str| {
        metrics
            .samples
            .iter()
            .find(|s| s.metric == name)
            .map(|s| match s.value {
                prometheus_parse::Value::Histogram(ref h) => {
                    h.iter().map(|b| b.count).fold(0.0, f64::max)
                }
                prometheus_parse::Value::Gauge(v) | prometheus_parse::Value::Counter(v) => v,
                _ => -1.0,
            })
    };
    assert_eq!(value("hqr_step_duration_seconds"), Some(1.0));
    assert_eq!(value("hqr_dispatch_latency_seconds"), Some(1.0));
    assert!(value("hqr_db_pool_connections").unwrap() >= 1.0);
    assert_eq!(value("hqr_queued_builds"), Some(0.0));
    assert!(
        metrics
            .samples
            .iter()
            .any(|s| s.metric == "hqr_machine_slots")
    );

    let profile = tempfile::tempdir().unwrap();
    let out = tokio::process::Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            &format!("--user-data-dir={}", profile.path().display()),
            "--dump-dom",
            &format!("http://{http}/"),
        ])
        .output()
        .await
        .expect("chromium is installed (scripts/test.sh installs it)");
    let dom = String::from_utf8_lossy(&out.stdout);
    assert!(
        dom.contains("<td class=\"machine\">page-builder</td>"),
        "the page lists the connected machine: {dom}"
    );
    assert!(dom.contains("id=\"queues\""), "{dom}");
}

#[tokio::test]
async fn grpc_health_and_reflection_answer_for_the_client_service() {
    let farm = Farm::start(|_| {}).await.unwrap();
    let channel =
        tonic::transport::Channel::from_shared(format!("http://{}", farm.runner().client_addr))
            .unwrap()
            .connect()
            .await
            .unwrap();
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel.clone());
    let status = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: "hydra.client.v1.ClientService".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .status;
    assert_eq!(
        status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );

    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
    let mut reflection = ServerReflectionClient::new(channel);
    let request = tonic_reflection::pb::v1::ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = reflection
        .server_reflection_info(tokio_stream::once(request))
        .await
        .unwrap()
        .into_inner();
    let response = responses.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("not a service list: {response:?}");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(
        names.contains(&"hydra.client.v1.ClientService".to_owned()),
        "{names:?}"
    );
    assert!(
        names.contains(&"hydra.builder.v1.RunnerService".to_owned()),
        "{names:?}"
    );
}

#[tokio::test]
async fn a_runner_with_client_tokens_refuses_calls_without_one() {
    let tokens = tempfile::tempdir().unwrap();
    std::fs::write(tokens.path().join("deployer.token"), "s3cret\n").unwrap();
    let dir = tokens.path().to_owned();
    let farm = Farm::start(move |c| c.client_tokens_dir = Some(dir))
        .await
        .unwrap();
    let mut api = farm.api().await.unwrap();
    let e = api
        .cluster_status(ClusterStatusRequest {})
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::Unauthenticated);
    assert!(e.message().contains("requires a token"), "{}", e.message());
    let mut request = tonic::Request::new(ClusterStatusRequest {});
    request
        .metadata_mut()
        .insert("authorization", "Bearer s3cret".parse().unwrap());
    api.cluster_status(request).await.unwrap();
}
