//! What the runner refuses: output NARs that do not match what the builder
//! announced, reports for attempts a machine does not own. And what it
//! stops: a running step that no build needs any more.

use std::time::Duration;

use hydra_nix::{Derivation, Hash, StoreDir};
use hydra_proto::v1::runner_service_client::RunnerServiceClient;
use hydra_proto::v1::*;
use hydra_testkit::{BuilderSpec, Farm};
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

const LIMIT: Duration = Duration::from_secs(120);

/// A builder that speaks the protocol but lies about its outputs.
struct Liar {
    client: RunnerServiceClient<tonic::transport::Channel>,
    control: mpsc::Sender<BuilderMessage>,
    inbound: tonic::Streaming<RunnerMessage>,
    machine_id: String,
}

impl Liar {
    async fn join(farm: &Farm) -> Liar {
        Self::join_as(farm, "liar").await
    }

    async fn join_as(farm: &Farm, name: &str) -> Liar {
        Self::join_declaring(farm, name, 1).await
    }

    /// Joins as `name`, declaring `max_jobs` slots.
    async fn join_declaring(farm: &Farm, name: &str, max_jobs: u32) -> Liar {
        Self::join_with(farm, name, max_jobs, false).await
    }

    /// Joins as `name` with `max_jobs` slots; `follows`: it says it starts a
    /// job after the local jobs the job names (`follows_local_jobs`).
    async fn join_with(farm: &Farm, name: &str, max_jobs: u32, follows: bool) -> Liar {
        let url = format!("http://{}", farm.runner().addr);
        let mut client = RunnerServiceClient::connect(url).await.unwrap();
        let (control, rx) = mpsc::channel(16);
        control
            .send(BuilderMessage {
                msg: Some(builder_message::Msg::Join(Join {
                    protocol_version: hydra_proto::PROTOCOL_VERSION,
                    machine_name: name.into(),
                    systems: vec![hydra_builder_system()],
                    max_jobs,
                    speed_factor: 100.0,
                    store_dir: "/nix/store".into(),
                    follows_local_jobs: follows,
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
        let welcome =
            hydra_proto::check_welcome(inbound.message().await.unwrap().unwrap()).unwrap();
        Liar {
            client,
            control,
            inbound,
            machine_id: welcome.machine_id,
        }
    }

    async fn next_job(&mut self) -> BuildJob {
        loop {
            let msg = self.inbound.message().await.unwrap().expect("a job");
            if let Some(runner_message::Msg::Build(job)) = msg.msg {
                return job;
            }
        }
    }

    /// Uploads `nar` for the job's output, announcing `announced` as its hash.
    async fn upload(&mut self, job: &BuildJob, nar: Vec<u8>, announced: &Hash) -> tonic::Status {
        let drv = Derivation::parse(&StoreDir::default(), &job.drv).unwrap();
        let out = StoreDir::default().display(drv.outputs["out"].path().unwrap());
        let header = NarChunk {
            part: Some(nar_chunk::Part::Header(NarHeader {
                machine_id: self.machine_id.clone(),
                attempt_id: job.attempt_id.clone(),
                store_path: out,
                nar_hash: announced.to_prefixed_base32(),
                nar_size: nar.len() as u64,
                ..Default::default()
            })),
        };
        let data = NarChunk {
            part: Some(nar_chunk::Part::Data(nar)),
        };
        let stream = tokio_stream::iter(vec![header, data]);
        self.client
            .upload_output(stream)
            .await
            .expect_err("the runner must refuse this upload")
    }

    async fn report_success(&mut self, job: &BuildJob) -> Result<(), tonic::Status> {
        self.report_outputs(job, Vec::new()).await
    }

    /// Reports success with `outputs` (name, path) as built.
    async fn report_outputs(
        &mut self,
        job: &BuildJob,
        outputs: Vec<(&str, &str)>,
    ) -> Result<(), tonic::Status> {
        let report = CompletionReport {
            machine_id: self.machine_id.clone(),
            attempt_id: job.attempt_id.clone(),
            outcome: Outcome::Succeeded as i32,
            outputs: outputs
                .into_iter()
                .map(|(name, path)| BuiltOutput {
                    name: name.into(),
                    path: path.into(),
                    ..Default::default()
                })
                .collect(),
            ..Default::default()
        };
        self.client.complete(report).await.map(|_| ())
    }

    /// Uploads `nar` as `path` for the job, with a matching hash.
    async fn upload_as(&mut self, job: &BuildJob, path: &str, nar: Vec<u8>) -> tonic::Status {
        self.upload_ca(job, path, nar, Vec::new(), "").await
    }
}

impl Liar {
    /// Closes its control stream: the machine is gone.
    fn leave(self) {
        drop(self.control);
        drop(self.inbound);
    }
}

/// An honest builder joins and the builds finish.
async fn honest_builder_finishes(farm: &mut Farm, ids: &std::collections::BTreeMap<String, i32>) {
    farm.add_builder(BuilderSpec::new("honest")).await.unwrap();
    farm.wait_finished(ids.values().copied(), LIMIT)
        .await
        .unwrap();
}

/// (machine, status, errorMsg) of a build's steps, in order.
async fn steps(farm: &Farm, build: i32) -> Vec<(String, Option<i32>, Option<String>)> {
    sqlx::query_as(
        "select machine, status, errorMsg from BuildSteps where build = $1 order by stepnr",
    )
    .bind(build)
    .fetch_all(&farm.db.pool)
    .await
    .unwrap()
}

/// (what, machine, attempt_id, reason) of everything refused so far.
async fn rejections(farm: &Farm) -> Vec<(String, Option<String>, String, String)> {
    sqlx::query_as("select what, machine, attempt_id, reason from hqr_rejections order by id")
        .fetch_all(&farm.db.pool)
        .await
        .unwrap()
}

const HI: &str = r#"with prelude; { hi = mkDrv { name = "hi"; script = "echo hi > $out"; }; }"#;

fn hydra_builder_system() -> String {
    format!("{}-{}", std::env::consts::ARCH, std::env::consts::OS)
}

fn nar_of(contents: &str) -> Vec<u8> {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("f");
    std::fs::write(&file, contents).unwrap();
    hydra_nix::nar::nar_bytes(&file).unwrap()
}

#[tokio::test]
async fn a_corrupt_or_mismatched_output_is_rejected_and_the_step_retried() {
    let mut farm = Farm::start(|_| {}).await.unwrap();
    let mut liar = Liar::join(&farm).await;
    let ids = farm
        .submit(
            r#"with prelude; { hi = mkDrv { name = "hi"; script = "echo hi > $out"; }; }"#,
            &["hi"],
        )
        .await
        .unwrap();

    // First attempt: a NAR whose bytes do not match the announced hash.
    let job = liar.next_job().await;
    let real = nar_of("hi\n");
    let status = liar
        .upload(&job, nar_of("tampered\n"), &Hash::sha256(&real))
        .await;
    assert_eq!(status.code(), tonic::Code::DataLoss, "{status:?}");
    assert!(
        status.message().contains("mismatch") || status.message().contains("refused"),
        "{}",
        status.message()
    );
    let late = liar
        .report_success(&job)
        .await
        .expect_err("the attempt is over");
    assert_eq!(late.code(), tonic::Code::FailedPrecondition);

    // Second attempt: garbage whose hash matches, which is no NAR at all.
    let job2 = liar.next_job().await;
    assert_ne!(job2.attempt_id, job.attempt_id);
    let garbage = b"this is not a NAR".to_vec();
    let status = liar
        .upload(&job2, garbage.clone(), &Hash::sha256(&garbage))
        .await;
    assert_eq!(status.code(), tonic::Code::DataLoss, "{status:?}");

    // The liar leaves; an honest builder builds the step.
    liar.leave();
    honest_builder_finishes(&mut farm, &ids).await;
    assert_eq!(farm.statuses(&ids).await.unwrap()["hi"], (0, 0));
    let rows: Vec<(String, Option<i32>, Option<String>)> = sqlx::query_as(
        "select machine, status, errorMsg from BuildSteps where build = $1 order by stepnr",
    )
    .bind(ids["hi"])
    .fetch_all(&farm.db.pool)
    .await
    .unwrap();
    assert_eq!(rows.len(), 3, "{rows:?}");
    assert_eq!((rows[0].0.as_str(), rows[0].1), ("liar", Some(3)));
    assert!(rows[0].2.as_deref().unwrap().contains("rejected"));
    assert_eq!((rows[1].0.as_str(), rows[1].1), ("liar", Some(3)));
    assert_eq!((rows[2].0.as_str(), rows[2].1), ("honest", Some(0)));
    let (path,): (String,) = sqlx::query_as("select path from BuildOutputs where build = $1")
        .bind(ids["hi"])
        .fetch_one(&farm.db.pool)
        .await
        .unwrap();
    let contents = farm.runner_store.read_store_file(&path).await.unwrap();
    assert_eq!(contents, b"hi\n", "the honest output, not the tampered one");
}

#[tokio::test]
async fn a_report_for_a_step_another_machine_runs_is_refused_recorded_and_not_applied() {
    let mut farm = Farm::start(|_| {}).await.unwrap();
    let mut owner = Liar::join_as(&farm, "owner").await;
    let ids = farm.submit(HI, &["hi"]).await.unwrap();
    let job = owner.next_job().await;
    let mut intruder = Liar::join_as(&farm, "intruder").await;

    let refused = intruder
        .report_success(&job)
        .await
        .expect_err("not the intruder's step");
    assert_eq!(refused.code(), tonic::Code::FailedPrecondition);
    assert!(
        refused.message().contains("another connection"),
        "{refused:?}"
    );
    let rows = steps(&farm, ids["hi"]).await;
    assert_eq!(rows.len(), 1);
    assert_eq!(
        (rows[0].0.as_str(), rows[0].1),
        ("owner", None),
        "still running"
    );
    let recorded = rejections(&farm).await;
    assert_eq!(recorded.len(), 1, "{recorded:?}");
    assert_eq!(recorded[0].0, "report");
    assert_eq!(recorded[0].1.as_deref(), Some("intruder"));
    assert_eq!(recorded[0].2, job.attempt_id);

    // The owner leaves; an honest builder builds the step.
    owner.leave();
    intruder.leave();
    honest_builder_finishes(&mut farm, &ids).await;
    let rows = steps(&farm, ids["hi"]).await;
    let shape: Vec<(&str, Option<i32>)> = rows.iter().map(|r| (r.0.as_str(), r.1)).collect();
    assert_eq!(shape, [("owner", Some(3)), ("honest", Some(0))]);
}

#[tokio::test]
async fn outputs_the_step_does_not_have_are_refused_and_the_step_retried() {
    let mut farm = Farm::start(|_| {}).await.unwrap();
    let mut liar = Liar::join(&farm).await;
    let ids = farm.submit(HI, &["hi"]).await.unwrap();

    // An upload of a path that is not an output of the step.
    let job = liar.next_job().await;
    let foreign = "/nix/store/00000000000000000000000000000000-bash";
    let status = liar.upload_as(&job, foreign, nar_of("#!/bin/evil\n")).await;
    assert_eq!(status.code(), tonic::Code::DataLoss, "{status:?}");
    assert!(status.message().contains("not an output"), "{status:?}");
    let valid = farm
        .runner_store
        .run("nix-store", &["--check-validity", foreign])
        .await;
    assert!(valid.is_err(), "the foreign path never entered the store");

    // A report of an output the derivation does not have.
    let job2 = liar.next_job().await;
    liar.report_outputs(
        &job2,
        vec![(
            "bogus",
            "/nix/store/11111111111111111111111111111111-hi-bogus",
        )],
    )
    .await
    .unwrap();

    liar.leave();
    honest_builder_finishes(&mut farm, &ids).await;
    let rows = steps(&farm, ids["hi"]).await;
    assert_eq!(rows.len(), 3, "{rows:?}");
    assert_eq!(rows[0].1, Some(3));
    assert!(rows[0].2.as_deref().unwrap().contains("not an output"));
    assert_eq!(rows[1].1, Some(3));
    assert!(
        rows[1].2.as_deref().unwrap().contains("does not have"),
        "{rows:?}"
    );
    assert_eq!((rows[2].0.as_str(), rows[2].1), ("honest", Some(0)));
    let recorded = rejections(&farm).await;
    assert!(
        recorded
            .iter()
            .any(|r| r.0 == "upload" && r.3.contains("not an output")),
        "{recorded:?}"
    );
}

#[tokio::test]
async fn a_silent_builder_is_dropped_after_the_ping_timeout_and_its_late_report_refused() {
    let mut farm = Farm::start(|c| {
        c.ping_interval_secs = 1;
        c.ping_timeout_secs = 2;
    })
    .await
    .unwrap();
    // The liar never pings: to the runner it is a machine gone silent.
    let mut liar = Liar::join(&farm).await;
    let mut listener = sqlx::postgres::PgListener::connect_with(&farm.db.pool)
        .await
        .unwrap();
    listener.listen("step_finished").await.unwrap();
    let ids = farm.submit(HI, &["hi"]).await.unwrap();
    let job = liar.next_job().await;
    let given = std::time::Instant::now();
    tokio::time::timeout(LIMIT, listener.recv())
        .await
        .expect("the silent machine's attempt was not aborted")
        .unwrap();
    assert!(
        given.elapsed() >= Duration::from_secs(1),
        "{:?}",
        given.elapsed()
    );
    let rows = steps(&farm, ids["hi"]).await;
    assert_eq!(rows[0].1, Some(3));
    assert!(
        rows[0].2.as_deref().unwrap().contains("no ping for 2 s"),
        "{rows:?}"
    );

    let late = liar.report_success(&job).await.expect_err("too late");
    assert_eq!(late.code(), tonic::Code::FailedPrecondition);
    let recorded = rejections(&farm).await;
    assert_eq!(recorded.len(), 1, "{recorded:?}");
    assert_eq!(
        (recorded[0].0.as_str(), recorded[0].2.as_str()),
        ("report", job.attempt_id.as_str())
    );
    assert_eq!(
        steps(&farm, ids["hi"]).await,
        rows,
        "the late report changed nothing"
    );

    honest_builder_finishes(&mut farm, &ids).await;
    assert_eq!(farm.statuses(&ids).await.unwrap()["hi"], (0, 0));
}

#[tokio::test]
async fn a_machine_that_keeps_failing_is_rested_and_shows_so_in_the_status() {
    let mut farm = Farm::start(|c| {
        c.machine_rest_after_failures = 2;
        c.machine_rest_base_secs = 600.0;
        c.status_interval_secs = 1;
    })
    .await
    .unwrap();
    let mut liar = Liar::join(&farm).await;
    let ids = farm.submit(HI, &["hi"]).await.unwrap();
    for _ in 0..2 {
        let job = liar.next_job().await;
        let garbage = b"not a NAR".to_vec();
        let status = liar
            .upload(&job, garbage.clone(), &Hash::sha256(&garbage))
            .await;
        assert_eq!(status.code(), tonic::Code::DataLoss);
    }

    // The status document (Hydra's SystemStatus) shows the rest.
    let liar_status = hydra_testkit::status_document_until(&farm.db.pool, LIMIT, |d| {
        let e = &d["machines"]["liar"];
        (e["disabledUntil"].as_u64().unwrap_or(0) > 0).then(|| e.clone())
    })
    .await
    .expect("the status shows the machine rested");
    assert_eq!(liar_status["consecutiveFailures"], 2, "{liar_status}");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let until = liar_status["disabledUntil"].as_u64().unwrap();
    assert!(until > now + 500 && until <= now + 601, "{liar_status}");

    // Rested, it gets nothing; an honest builder takes the step.
    honest_builder_finishes(&mut farm, &ids).await;
    let rows = steps(&farm, ids["hi"]).await;
    let shape: Vec<(&str, Option<i32>)> = rows.iter().map(|r| (r.0.as_str(), r.1)).collect();
    assert_eq!(
        shape,
        [("liar", Some(3)), ("liar", Some(3)), ("honest", Some(0))]
    );
}

#[tokio::test]
async fn cancelling_the_only_build_aborts_its_running_step() {
    let mut farm = Farm::start(|_| {}).await.unwrap();
    farm.add_builder(BuilderSpec::new("b")).await.unwrap();
    let ids = farm
        .submit(
            r#"with prelude; { slow = mkDrv { name = "slow"; script = "echo started; sleep 600; touch $out"; }; }"#,
            &["slow"],
        )
        .await
        .unwrap();
    let build = ids["slow"];
    // Wait until the step runs (its row goes to building, busy = 30).
    let mut listener = sqlx::postgres::PgListener::connect_with(&farm.db.pool)
        .await
        .unwrap();
    listener.listen("step_started").await.unwrap();
    let running: i64 =
        sqlx::query_scalar("select count(*) from BuildSteps where build = $1 and busy != 0")
            .bind(build)
            .fetch_one(&farm.db.pool)
            .await
            .unwrap();
    if running == 0 {
        tokio::time::timeout(LIMIT, listener.recv())
            .await
            .unwrap()
            .unwrap();
    }
    // Cancel as Hydra's web interface does.
    sqlx::query("update Builds set finished = 1, buildStatus = 4, startTime = 1, stopTime = 1 where id = $1")
        .bind(build)
        .execute(&farm.db.pool)
        .await
        .unwrap();
    sqlx::query("notify builds_cancelled")
        .execute(&farm.db.pool)
        .await
        .unwrap();
    listener.listen("step_finished").await.unwrap();
    let deadline = tokio::time::Instant::now() + LIMIT;
    loop {
        let open: i64 =
            sqlx::query_scalar("select count(*) from BuildSteps where build = $1 and busy != 0")
                .bind(build)
                .fetch_one(&farm.db.pool)
                .await
                .unwrap();
        if open == 0 {
            break;
        }
        tokio::time::timeout_at(deadline, listener.recv())
            .await
            .expect("the step was not aborted")
            .unwrap();
    }
    let (status, msg): (Option<i32>, Option<String>) =
        sqlx::query_as("select status, errorMsg from BuildSteps where build = $1")
            .bind(build)
            .fetch_one(&farm.db.pool)
            .await
            .unwrap();
    assert_eq!(status, Some(4));
    assert!(msg.unwrap().contains("no build needs"));
    // The builder is free again: a new build is built at once.
    let next = farm
        .submit(
            r#"with prelude; { quick = mkDrv { name = "quick"; script = "echo quick > $out"; }; }"#,
            &["quick"],
        )
        .await
        .unwrap();
    farm.wait_finished(next.values().copied(), LIMIT)
        .await
        .unwrap();
    assert_eq!(farm.statuses(&next).await.unwrap()["quick"], (0, 0));
}

/// Loaded in one chunk beside a build that is fine: a `.drv` that is gone,
/// one that is no store path, and one whose file is in the store's
/// directory but which the store does not hold (a file is read from disk
/// only with the daemon's word that it is valid) are aborted with the
/// reason, and the good build is built.
#[tokio::test]
async fn a_build_whose_drv_is_gone_or_malformed_is_aborted_with_the_reason() {
    let mut farm = Farm::start(|_| {}).await.unwrap();
    farm.add_builder(BuilderSpec::new("b1")).await.unwrap();
    let good = farm
        .runner_store
        .instantiate(
            r#"with prelude; { good = mkDrv { name = "good"; script = "echo good > $out"; }; }"#,
            &["good"],
        )
        .await
        .unwrap();
    // The good derivation's text under a name the store never registered.
    let text = std::fs::read(
        farm.runner_store
            .real_store_dir()
            .join(good["good"].trim_start_matches("/nix/store/")),
    )
    .unwrap();
    let stray = "7rjj86a15146cq1d3qy068lml7n8ykzm-stray.drv";
    std::fs::write(farm.runner_store.real_store_dir().join(stray), text).unwrap();
    let gone = "/nix/store/7rjj86a15146cq1d3qy068lml7n8ykzm-collected.drv".to_owned();
    let drvs = [
        ("gone".to_owned(), gone),
        ("garbage".to_owned(), "not-a-store-path".to_owned()),
        ("stray".to_owned(), format!("/nix/store/{stray}")),
        ("good".to_owned(), good["good"].clone()),
    ]
    .into_iter()
    .collect();
    let ids = farm.queue(&drvs, |_| Default::default()).await.unwrap();
    farm.wait_finished(ids.values().copied(), LIMIT)
        .await
        .unwrap();
    for (job, needle) in [
        ("gone", "is not in the runner's store"),
        ("garbage", "is not a store path"),
        ("stray", "is not in the runner's store"),
    ] {
        let (status, msg): (Option<i32>, Option<String>) = sqlx::query_as(
            "select b.buildStatus, s.errorMsg from Builds b join BuildSteps s on s.build = b.id where b.id = $1",
        )
        .bind(ids[job])
        .fetch_one(&farm.db.pool)
        .await
        .unwrap();
        assert_eq!(status, Some(3), "{job}");
        let msg = msg.unwrap();
        assert!(msg.contains(needle), "{job}: {msg}");
    }
    assert_eq!(farm.statuses(&ids).await.unwrap()["good"], (0, 0));
}

/// Instantiates `expr`'s `job` and `decoy` and queues `job` alone: the
/// build, both `.drv` paths, and the decoy's input named `*-{input}` (in
/// the runner's store, but no input of the job).
async fn queue_beside_a_decoy(
    farm: &Farm,
    expr: &str,
    input: &str,
) -> (i32, std::collections::BTreeMap<String, String>, String) {
    let drvs = farm
        .runner_store
        .instantiate(expr, &["job", "decoy"])
        .await
        .unwrap();
    let decoy_input = farm
        .runner_store
        .run("nix-store", &["-q", "--references", &drvs["decoy"]])
        .await
        .unwrap()
        .lines()
        .find(|l| l.ends_with(&format!("-{input}")))
        .unwrap()
        .to_owned();
    let only_job = [("job".to_owned(), drvs["job"].clone())]
        .into_iter()
        .collect();
    let build = farm.queue(&only_job, |_| Default::default()).await.unwrap()["job"];
    (build, drvs, decoy_input)
}

#[tokio::test]
async fn fetch_inputs_serves_the_jobs_input_closure_and_nothing_else() {
    let farm = Farm::start(|_| {}).await.unwrap();
    // `secret` is in the runner's store (instantiated beside the job) but
    // no input of it; `input` is.
    let (_, _, secret) = queue_beside_a_decoy(
        &farm,
        r#"with prelude; {
          job = mkDrv { name = "job"; script = "cat ${builtins.toFile "input" "in"} > $out"; };
          decoy = mkDrv { name = "decoy"; script = "cat ${builtins.toFile "secret" "s"} > $out"; };
        }"#,
        "secret",
    )
    .await;

    // A builder of our own, over the real protocol, takes the job.
    let mut reader = Liar::join_as(&farm, "reader").await;
    let job = reader.next_job().await;
    let input = job
        .input_paths
        .iter()
        .find(|p| p.ends_with("-input"))
        .expect("the job's input is in its closure")
        .clone();
    let machine_id = reader.machine_id.clone();
    let fetch = |paths: Vec<String>| FetchInputsRequest {
        machine_id: machine_id.clone(),
        attempt_id: job.attempt_id.clone(),
        paths,
    };

    let mut served = reader
        .client
        .fetch_inputs(fetch(vec![input.clone()]))
        .await
        .unwrap()
        .into_inner();
    let mut chunks = 0;
    while served.message().await.unwrap().is_some() {
        chunks += 1;
    }
    assert!(chunks >= 2, "a header and the data of {input}");

    let refused = match reader
        .client
        .fetch_inputs(fetch(vec![input, secret.clone()]))
        .await
    {
        Ok(_) => panic!("a path outside the job was served"),
        Err(status) => status,
    };
    assert_eq!(refused.code(), tonic::Code::PermissionDenied);
    assert!(
        refused.message().contains("not in the input closure")
            && refused.message().contains(&secret),
        "{}",
        refused.message()
    );
    let recorded: i64 = sqlx::query_scalar("select count(*) from hqr_rejections")
        .fetch_one(&farm.db.pool)
        .await
        .unwrap();
    assert_eq!(recorded, 1, "the refusal is recorded");
    reader.leave();
}

impl Liar {
    /// Uploads `nar` as `path` for the job with `references` and content
    /// address `ca` ("" for none), its hash and size right.
    async fn upload_ca(
        &mut self,
        job: &BuildJob,
        path: &str,
        nar: Vec<u8>,
        references: Vec<String>,
        ca: &str,
    ) -> tonic::Status {
        let header = NarChunk {
            part: Some(nar_chunk::Part::Header(NarHeader {
                machine_id: self.machine_id.clone(),
                attempt_id: job.attempt_id.clone(),
                store_path: path.into(),
                nar_hash: Hash::sha256(&nar).to_prefixed_base32(),
                nar_size: nar.len() as u64,
                references,
                ca: ca.into(),
                ..Default::default()
            })),
        };
        let data = NarChunk {
            part: Some(nar_chunk::Part::Data(nar)),
        };
        self.client
            .upload_output(tokio_stream::iter(vec![header, data]))
            .await
            .expect_err("the runner must refuse this upload")
    }
}

/// The path Nix gives a recursive sha256 CA output named `name`.
fn ca_path(nar: &[u8], name: &str, references: &[String]) -> String {
    let dir = StoreDir::default();
    let refs: Vec<hydra_nix::StorePath> = references
        .iter()
        .map(|r| dir.parse_path(r).unwrap())
        .collect();
    let path = dir.make_fixed_output_path(
        hydra_nix::store_path::ContentAddressMethod::Recursive,
        &Hash::sha256(nar),
        name,
        &refs,
        false,
    );
    dir.display(&path)
}

#[tokio::test]
async fn a_builder_lying_about_a_content_addressed_output_is_refused_and_the_step_built_elsewhere()
{
    let mut farm = Farm::start(|c| c.machine_rest_after_failures = 10)
        .await
        .unwrap();
    // `decoy` is never queued: its `.drv` and its text input `ca-out` are
    // in the runner's store, and no input of the CA job.
    let (build, drvs, text_path) = queue_beside_a_decoy(
        &farm,
        r#"with prelude; {
          job = mkCA { name = "ca-out"; script = "echo real > $out"; };
          decoy = mkDrv { name = "decoy"; script = "cat ${builtins.toFile "ca-out" "x"} > $out"; };
        }"#,
        "ca-out",
    )
    .await;
    let mut liar = Liar::join(&farm).await;

    // A path that is the content address of other bytes than those sent.
    let job = liar.next_job().await;
    let lie = nar_of("lie");
    let claimed = ca_path(&nar_of("other"), "ca-out", &[]);
    let ca = format!("fixed:r:{}", Hash::sha256(&lie).to_prefixed_base32());
    let status = liar
        .upload_ca(&job, &claimed, lie.clone(), vec![], &ca)
        .await;
    assert_eq!(status.code(), tonic::Code::DataLoss, "{status:?}");
    assert!(
        status.message().contains("content-addressed"),
        "{}",
        status.message()
    );

    // The same without a content address at all.
    let job = liar.next_job().await;
    let own = ca_path(&lie, "ca-out", &[]);
    let status = liar.upload_ca(&job, &own, lie.clone(), vec![], "").await;
    assert!(
        status.message().contains("must carry its content address"),
        "{}",
        status.message()
    );

    // A reference outside the job's closure.
    let job = liar.next_job().await;
    let refs = vec![drvs["decoy"].clone()];
    let with_ref = ca_path(&lie, "ca-out", &refs);
    let ca = format!("fixed:r:{}", Hash::sha256(&lie).to_prefixed_base32());
    let status = liar.upload_ca(&job, &with_ref, lie, refs, &ca).await;
    assert!(
        status
            .message()
            .contains("neither an input of the job nor one of its outputs"),
        "{}",
        status.message()
    );

    // A path already in the runner's store that it did not build.
    let job = liar.next_job().await;
    liar.report_outputs(&job, vec![("out", text_path.as_str())])
        .await
        .unwrap();
    let job_rows = steps(&farm, build).await;
    assert!(
        job_rows
            .last()
            .unwrap()
            .2
            .as_deref()
            .unwrap_or("")
            .contains("not content-addressed as the output is"),
        "{job_rows:?}"
    );

    liar.leave();
    honest_builder_finishes(
        &mut farm,
        &[("job".to_owned(), build)].into_iter().collect(),
    )
    .await;
    let rows = steps(&farm, build).await;
    let shape: Vec<(&str, Option<i32>)> = rows.iter().map(|r| (r.0.as_str(), r.1)).collect();
    assert_eq!(
        shape,
        [
            ("liar", Some(3)),
            ("liar", Some(3)),
            ("liar", Some(3)),
            ("liar", Some(3)),
            ("honest", Some(0))
        ]
    );
    let out: String = sqlx::query_scalar("select path from BuildOutputs where build = $1")
        .bind(build)
        .fetch_one(&farm.db.pool)
        .await
        .unwrap();
    for lie in [&claimed, &own, &with_ref, &text_path] {
        assert_ne!(&out, lie);
    }
    let refused = rejections(&farm).await;
    assert_eq!(
        refused.len(),
        3,
        "each refused upload recorded: {refused:?}"
    );
}

#[tokio::test]
async fn a_job_that_hangs_past_its_deadline_is_stopped_and_built_elsewhere() {
    let mut farm = Farm::start(|c| c.attempt_grace_secs = 1).await.unwrap();
    let ids = farm
        .submit_with(HI, &["hi"], |_| hydra_testkit::JobOptions {
            timeout: Some(1),
            ..Default::default()
        })
        .await
        .unwrap();
    // The liar takes the job, keeps pinging (its stream stays open) and
    // never reports: only the deadline frees the step.
    let mut liar = Liar::join(&farm).await;
    let job = liar.next_job().await;
    let abort = loop {
        let msg = tokio::time::timeout(LIMIT, liar.inbound.message())
            .await
            .expect("the runner gives up on the job")
            .unwrap()
            .expect("the stream stays open");
        if let Some(runner_message::Msg::Abort(a)) = msg.msg {
            break a;
        }
    };
    assert_eq!(abort.attempt_id, job.attempt_id);
    assert!(
        abort.reason.contains("past its deadline"),
        "{}",
        abort.reason
    );
    liar.leave();
    honest_builder_finishes(&mut farm, &ids).await;
    let rows = steps(&farm, ids["hi"]).await;
    assert_eq!((rows[0].0.as_str(), rows[0].1), ("liar", Some(3)));
    assert!(
        rows[0].2.as_deref().unwrap().contains("past its deadline"),
        "{rows:?}"
    );
    assert_eq!((rows[1].0.as_str(), rows[1].1), ("honest", Some(0)));
}

#[tokio::test]
async fn a_machine_gets_no_more_jobs_than_the_runner_allows() {
    let farm = Farm::start(|c| c.max_jobs_per_machine = 4).await.unwrap();
    let _greedy = Liar::join_declaring(&farm, "greedy", 1_000_000).await;
    let views = farm
        .runner()
        .shared
        .state
        .machine_views(std::time::Instant::now());
    let seen = views.iter().find(|m| m.name == "greedy").unwrap();
    assert_eq!(seen.max_jobs, 4);
}

/// A dynamic derivation (Nix 2.26 writes one, as `DrvWithVersion`, for a
/// derivation that depends on the output of a derivation-producing one) is
/// refused with what it is: the build is aborted with the reason, and the
/// runner goes on. Nix 2.8 cannot write one: there, nothing to test.
#[tokio::test]
async fn a_dynamic_derivation_is_aborted_with_a_clear_reason() {
    let farm = Farm::start(|_| {}).await.unwrap();
    if farm.runner_store.version() != hydra_testkit::current_nix::NixVersion::Current {
        return;
    }
    let expr = r#"with prelude; let
        producer = mkDrv {
          name = "inner.drv"; script = "echo nothing > $out";
          __contentAddressed = true; outputHashMode = "text"; outputHashAlgo = "sha256";
        };
      in { consumer = mkDrv {
        name = "consumer"; script = "cat ${builtins.outputOf producer.outPath "out"} > $out";
      }; }"#;
    let ids = farm.submit(expr, &["consumer"]).await.unwrap();
    farm.wait_finished(ids.values().copied(), LIMIT)
        .await
        .unwrap();
    let (status, msg): (Option<i32>, Option<String>) = sqlx::query_as(
        "select b.buildStatus, s.errorMsg from Builds b join BuildSteps s on s.build = b.id where b.id = $1",
    )
    .bind(ids["consumer"])
    .fetch_one(&farm.db.pool)
    .await
    .unwrap();
    assert_eq!(status, Some(3));
    let msg = msg.unwrap();
    assert!(
        msg.contains("dynamic derivation") && msg.contains("not supported"),
        "{msg}"
    );
    // The runner is up: an ordinary build still builds.
    let mut farm = farm;
    farm.add_builder(BuilderSpec::new("b")).await.unwrap();
    let ids = farm.submit(HI, &["hi"]).await.unwrap();
    farm.wait_finished(ids.values().copied(), LIMIT)
        .await
        .unwrap();
    assert_eq!(farm.statuses(&ids).await.unwrap()["hi"], (0, 0));
}

// Dependents that run ahead of their inputs' verification.

/// `top` needs `base`, both trivial; queued as two builds.
const CHAIN: &str = r#"with prelude; rec {
  base = mkDrv { name = "base"; script = "echo base > $out"; };
  top = mkDrv { name = "top"; script = "cat ${base} > $out"; };
}"#;

impl Liar {
    /// Says the job built its step and its outputs are on their way (as a
    /// builder does before it uploads them).
    async fn built(&self, job: &BuildJob) {
        let progress = Progress {
            attempt_id: job.attempt_id.clone(),
            phase: Phase::ReceivingOutputs as i32,
        };
        self.control
            .send(BuilderMessage {
                msg: Some(builder_message::Msg::Progress(progress)),
            })
            .await
            .unwrap();
    }

    /// Waits for the runner to tell it to drop `attempt`.
    async fn aborted(&mut self, attempt: &str) -> AbortJob {
        loop {
            let msg = self.inbound.message().await.unwrap().expect("an abort");
            if let Some(runner_message::Msg::Abort(a)) = msg.msg
                && a.attempt_id == attempt
            {
                return a;
            }
        }
    }

    /// Uploads `contents` as the job's `out` and reports success, on a
    /// client of its own (the runner may hold either call).
    fn deliver(
        &self,
        job: &BuildJob,
        contents: &str,
    ) -> tokio::task::JoinHandle<Result<(), tonic::Status>> {
        let mut client = self.client.clone();
        let machine_id = self.machine_id.clone();
        let job = job.clone();
        let contents = contents.to_owned();
        tokio::spawn(async move {
            hydra_testkit::load::deliver_single_file(
                &mut client,
                &machine_id,
                &job,
                contents.as_bytes(),
            )
            .await
        })
    }
}

/// `CHAIN` queued on a farm whose one builder (2 slots) follows local
/// jobs: the base's job comes, then, with no word that the base is built,
/// the top's, naming the base's job as the one it starts after.
async fn chain_sent_ahead() -> (
    Farm,
    Liar,
    std::collections::BTreeMap<String, i32>,
    BuildJob,
    BuildJob,
) {
    let farm = Farm::start(|_| {}).await.unwrap();
    let mut liar = Liar::join_with(&farm, "liar", 2, true).await;
    let ids = farm.submit(CHAIN, &["base", "top"]).await.unwrap();
    let base = liar.next_job().await;
    assert!(base.drv_path.ends_with("-base.drv"), "{}", base.drv_path);
    assert!(base.after_attempts.is_empty());
    let top = liar.next_job().await;
    assert!(top.drv_path.ends_with("-top.drv"), "{}", top.drv_path);
    assert_eq!(
        top.after_attempts,
        std::slice::from_ref(&base.attempt_id),
        "it starts after the base's job"
    );
    (farm, liar, ids, base, top)
}

/// The input is delivered: the dependent's held delivery then goes
/// through, and both builds succeed.
async fn both_succeed_once_the_input_is_delivered(
    farm: &Farm,
    liar: &Liar,
    base: &BuildJob,
    top_delivery: tokio::task::JoinHandle<Result<(), tonic::Status>>,
    ids: &std::collections::BTreeMap<String, i32>,
) {
    liar.deliver(base, "base\n").await.unwrap().unwrap();
    top_delivery
        .await
        .unwrap()
        .expect("delivered once the input is verified");
    farm.wait_finished(ids.values().copied(), LIMIT)
        .await
        .unwrap();
    let statuses = farm.statuses(ids).await.unwrap();
    assert_eq!((statuses["base"], statuses["top"]), ((0, 0), (0, 0)));
}

/// The path of a job's `out`.
fn out_of(job: &BuildJob) -> String {
    let drv = Derivation::parse(&StoreDir::default(), &job.drv).unwrap();
    StoreDir::default().display(drv.outputs["out"].path().unwrap())
}

/// How long a held call is watched for not returning. Without the hold it
/// returns in milliseconds.
const HELD: Duration = Duration::from_secs(3);

/// A dependent is sent to the machine that built its input as soon as that
/// machine says it is built, before the input's outputs reach the runner;
/// but the dependent's outputs and report are held until the input's are
/// in the runner's store and recorded: no build succeeds before then.
#[tokio::test]
async fn a_dependent_runs_ahead_of_its_input_but_succeeds_only_after_it() {
    let farm = Farm::start(|_| {}).await.unwrap();
    let mut liar = Liar::join_declaring(&farm, "liar", 2).await;
    let ids = farm.submit(CHAIN, &["base", "top"]).await.unwrap();
    let base = liar.next_job().await;
    assert!(base.drv_path.ends_with("-base.drv"), "{}", base.drv_path);
    liar.built(&base).await;
    let top = liar.next_job().await;
    assert!(top.drv_path.ends_with("-top.drv"), "{}", top.drv_path);
    let base_out = out_of(&base);
    assert!(
        top.input_paths.contains(&base_out),
        "the job names the input its machine holds: {:?}",
        top.input_paths
    );
    assert!(
        farm.runner_store.read_store_file(&base_out).await.is_err(),
        "the runner does not have the input yet"
    );

    let mut top_delivery = liar.deliver(&top, "base\n");
    assert!(
        tokio::time::timeout(HELD, &mut top_delivery).await.is_err(),
        "the dependent's delivery is held while its input is unverified"
    );
    let finished: i64 = sqlx::query_scalar("select count(*) from Builds where finished = 1")
        .fetch_one(&farm.db.pool)
        .await
        .unwrap();
    assert_eq!(finished, 0, "no build has succeeded");

    both_succeed_once_the_input_is_delivered(&farm, &liar, &base, top_delivery, &ids).await;
    let (base_stop, top_stop): (i32, i32) = sqlx::query_as(
        "select (select stopTime from Builds where id = $1), (select stopTime from Builds where id = $2)",
    )
    .bind(ids["base"])
    .bind(ids["top"])
    .fetch_one(&farm.db.pool)
    .await
    .unwrap();
    assert!(top_stop >= base_stop);
    for out in [base_out, out_of(&top)] {
        let contents = farm.runner_store.read_store_file(&out).await.unwrap();
        assert_eq!(contents, b"base\n", "{out} is in the runner's store");
    }
}

/// To a builder that starts a job after the local jobs it names, the
/// dependent is sent while its input still builds there, naming that
/// input's job; its result is held until the input's outputs are in the
/// runner's store and recorded, as for a dependent sent once its input
/// built.
#[tokio::test]
async fn a_dependent_is_sent_ahead_of_an_input_still_building_to_a_builder_that_follows_it() {
    let (farm, liar, ids, base, top) = chain_sent_ahead().await;
    assert!(top.input_paths.contains(&out_of(&base)));

    let mut top_delivery = liar.deliver(&top, "base\n");
    assert!(
        tokio::time::timeout(HELD, &mut top_delivery).await.is_err(),
        "the dependent's delivery is held while its input is unverified"
    );
    liar.built(&base).await;
    both_succeed_once_the_input_is_delivered(&farm, &liar, &base, top_delivery, &ids).await;
}

/// The input a dependent was sent ahead of fails to build: the dependent's
/// job is stopped, its build fails as a dependency failure (Hydra's 2), and
/// no step row of it claims success or counts as its own failure.
#[tokio::test]
async fn a_dependent_sent_ahead_of_an_input_that_fails_is_stopped_and_fails_as_a_dependent() {
    let (farm, mut liar, ids, base, top) = chain_sent_ahead().await;
    let report = CompletionReport {
        machine_id: liar.machine_id.clone(),
        attempt_id: base.attempt_id.clone(),
        outcome: Outcome::Failed as i32,
        error_msg: "builder for base failed with exit code 1".into(),
        ..Default::default()
    };
    liar.client.complete(report).await.unwrap();
    let abort = liar.aborted(&top.attempt_id).await;
    assert!(!abort.reason.is_empty());
    farm.wait_finished(ids.values().copied(), LIMIT)
        .await
        .unwrap();
    let statuses = farm.statuses(&ids).await.unwrap();
    assert_eq!(statuses["base"].0, 1, "the base failed: {statuses:?}");
    assert_eq!(
        statuses["top"].0, 2,
        "the top failed as a dependent: {statuses:?}"
    );
    let top_rows: Vec<(Option<i32>,)> = sqlx::query_as(
        "select status from BuildSteps where drvPath like '%-top.drv' order by build, stepnr",
    )
    .fetch_all(&farm.db.pool)
    .await
    .unwrap();
    assert!(!top_rows.is_empty(), "the dependent's attempt was recorded");
    assert!(
        top_rows
            .iter()
            .all(|(s,)| !matches!(s, Some(0) | Some(1) | None)),
        "the dependent's rows neither succeed, fail as its own, nor stay busy: {top_rows:?}"
    );
    // Its delivery, should it come now, changes nothing.
    let late = liar.deliver(&top, "base\n").await.unwrap();
    assert!(late.is_err(), "{late:?}");
}

/// The input's upload turns out corrupt after the dependent started ahead
/// of it: the input's attempt is aborted (a builder fault), the dependent's
/// is withdrawn (its machine told to drop it, its row aborted), and both
/// builds are built afterwards: neither fails.
#[tokio::test]
async fn a_corrupt_input_found_after_its_dependent_started_fails_neither_build() {
    let mut farm = Farm::start(|c| c.machine_rest_after_failures = 10)
        .await
        .unwrap();
    let mut liar = Liar::join_declaring(&farm, "liar", 2).await;
    let ids = farm.submit(CHAIN, &["base", "top"]).await.unwrap();
    let base = liar.next_job().await;
    liar.built(&base).await;
    let top = liar.next_job().await;
    assert!(top.drv_path.ends_with("-top.drv"), "{}", top.drv_path);
    let top_delivery = liar.deliver(&top, "base\n");

    let status = liar
        .upload(&base, nar_of("tampered\n"), &Hash::sha256(nar_of("base\n")))
        .await;
    assert_eq!(status.code(), tonic::Code::DataLoss, "{status:?}");
    // Refused, as withdrawn or (when the withdrawal came first) as an
    // attempt that no longer runs; the abort says why.
    let held = top_delivery
        .await
        .unwrap()
        .expect_err("the dependent is withdrawn");
    assert_eq!(held.code(), tonic::Code::FailedPrecondition, "{held:?}");
    let abort = liar.aborted(&top.attempt_id).await;
    assert!(abort.reason.contains("withdrawn"), "{}", abort.reason);

    liar.leave();
    honest_builder_finishes(&mut farm, &ids).await;
    let statuses = farm.statuses(&ids).await.unwrap();
    assert_eq!((statuses["base"], statuses["top"]), ((0, 0), (0, 0)));
    let top_rows = steps(&farm, ids["top"]).await;
    let liar_rows: Vec<_> = top_rows.iter().filter(|r| r.0 == "liar").collect();
    assert!(
        liar_rows
            .iter()
            .any(|r| r.1 == Some(3) && r.2.as_deref().is_some_and(|m| m.contains("withdrawn"))),
        "{top_rows:?}"
    );
    assert!(
        top_rows.iter().all(|r| matches!(r.1, Some(0) | Some(3))),
        "nothing failed: {top_rows:?}"
    );
    let built = farm
        .runner_store
        .read_store_file(&out_of(&top))
        .await
        .unwrap();
    assert_eq!(built, b"base\n", "the honest output");
}
