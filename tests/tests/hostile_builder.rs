//! A hostile builder: a client speaking the real protocol to the real
//! runner sends random and oversized fields, NUL bytes, invalid UTF-8,
//! messages out of order, and reports for attempts it does not own.
//!
//! What must hold after every one of them: the runner is alive (every task
//! runs, it answers calls), and a call it refused applied nothing: no step
//! or build got a status from it (the only changes a refusal may cause are
//! the attempt it named being aborted, 3, or cancelled, 4, and new
//! attempts the dispatcher started meanwhile), and nothing went into
//! FailedPaths. When the hostile builder leaves, no row stays busy.
//!
//! 1,000 cases in the suite; the soak runs as many as `HQ_HOSTILE_CASES`
//! says (README: 100,000), seeded by `HQ_HOSTILE_SEED` (printed).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BufMut};
use hydra_proto::v1::runner_service_client::RunnerServiceClient;
use hydra_proto::v1::*;
use hydra_testkit::{Farm, JobOptions, eventually};
use parking_lot::Mutex;
use proptest::prelude::*;
use proptest::strategy::ValueTree;
use proptest::test_runner::{Config, RngAlgorithm, TestRng, TestRunner};
use prost::Message;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

const LIMIT: Duration = Duration::from_secs(60);

/// An id field: an attempt this builder was given, its own connection
/// id, someone else's, or garbage.
#[derive(Debug, Clone)]
enum Id {
    Owned,
    OwnConnection,
    Random,
    Text(String),
    Huge,
}

fn id() -> impl Strategy<Value = Id> {
    prop_oneof![
        4 => Just(Id::Owned),
        3 => Just(Id::OwnConnection),
        1 => Just(Id::Random),
        2 => text().prop_map(Id::Text),
        1 => Just(Id::Huge),
    ]
}

/// Text with NUL bytes, control characters and escape sequences in it.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        "[a-z0-9/._-]{0,40}",
        "[\\x00-\\x1f\\x7f]{1,8}",
        ".{0,60}",
        "\\x1b\\[[0-9;]{0,6}m[a-z]{0,10}\\x00",
    ]
}

fn store_path_like() -> impl Strategy<Value = String> {
    prop_oneof![
        "/nix/store/[0-9a-df-np-sv-z]{32}-[a-z]{1,8}",
        text(),
        Just("/etc/passwd".to_owned()),
    ]
}

#[derive(Debug, Clone)]
struct Report {
    machine: Id,
    attempt: Id,
    outcome: i32,
    error: String,
    outputs: Vec<(String, String)>,
    start: u64,
    stop: u64,
    times_built: u32,
}

#[derive(Debug, Clone)]
enum UploadPart {
    Header {
        path: String,
        size: u64,
        hash: String,
        refs: Vec<String>,
    },
    Data(Vec<u8>),
}

#[derive(Debug, Clone)]
enum Case {
    Report(Report),
    /// A report whose string fields carry invalid UTF-8, encoded by hand.
    NotUtf8 {
        attempt: Id,
        bytes: Vec<u8>,
    },
    /// Any bytes as a report.
    Garbage(Vec<u8>),
    Log {
        machine: Id,
        attempt: Id,
        chunks: Vec<Vec<u8>>,
    },
    Upload {
        machine: Id,
        attempt: Id,
        parts: Vec<UploadPart>,
    },
    Fetch {
        machine: Id,
        attempt: Id,
        paths: Vec<String>,
    },
    Progress {
        attempt: Id,
        phase: i32,
    },
    Ping {
        load: f32,
        disk: u64,
    },
    /// A second Join on the control stream (the runner drops the
    /// connection; the builder joins again).
    SecondJoin,
}

fn case() -> impl Strategy<Value = Case> {
    let report = (
        id(),
        id(),
        prop_oneof![0..10i32, any::<i32>()],
        text(),
        proptest::collection::vec((text(), store_path_like()), 0..3),
        prop_oneof![Just(0u64), 1_600_000_000..1_800_000_000u64, any::<u64>()],
        prop_oneof![Just(0u64), 1_600_000_000..1_800_000_000u64, any::<u64>()],
        any::<u32>(),
    )
        .prop_map(
            |(machine, attempt, outcome, error, outputs, start, stop, times_built)| {
                Case::Report(Report {
                    machine,
                    attempt,
                    outcome,
                    error,
                    outputs,
                    start,
                    stop,
                    times_built,
                })
            },
        );
    let part = prop_oneof![
        (
            store_path_like(),
            prop_oneof![0..1000u64, any::<u64>()],
            text(),
            proptest::collection::vec(store_path_like(), 0..3)
        )
            .prop_map(|(path, size, hash, refs)| UploadPart::Header {
                path,
                size,
                hash,
                refs
            }),
        proptest::collection::vec(any::<u8>(), 0..300).prop_map(UploadPart::Data),
    ];
    prop_oneof![
        6 => report,
        1 => (id(), proptest::collection::vec(any::<u8>(), 1..20))
            .prop_map(|(attempt, bytes)| Case::NotUtf8 { attempt, bytes }),
        1 => proptest::collection::vec(any::<u8>(), 0..200).prop_map(Case::Garbage),
        2 => (id(), id(), proptest::collection::vec(proptest::collection::vec(any::<u8>(), 0..200), 0..4))
            .prop_map(|(machine, attempt, chunks)| Case::Log { machine, attempt, chunks }),
        3 => (id(), id(), proptest::collection::vec(part, 0..4))
            .prop_map(|(machine, attempt, parts)| Case::Upload { machine, attempt, parts }),
        1 => (id(), id(), proptest::collection::vec(store_path_like(), 0..4))
            .prop_map(|(machine, attempt, paths)| Case::Fetch { machine, attempt, paths }),
        2 => (id(), any::<i32>()).prop_map(|(attempt, phase)| Case::Progress { attempt, phase }),
        1 => (any::<f32>(), any::<u64>()).prop_map(|(load, disk)| Case::Ping { load, disk }),
        1 => Just(Case::SecondJoin),
    ]
}

/// Sends bytes as they are (for messages no well-behaved encoder makes).
#[derive(Clone, Default)]
struct Raw;

struct RawEncoder;
struct RawDecoder;

impl tonic::codec::Codec for Raw {
    type Encode = Vec<u8>;
    type Decode = Vec<u8>;
    type Encoder = RawEncoder;
    type Decoder = RawDecoder;
    fn encoder(&mut self) -> RawEncoder {
        RawEncoder
    }
    fn decoder(&mut self) -> RawDecoder {
        RawDecoder
    }
}

impl tonic::codec::Encoder for RawEncoder {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn encode(
        &mut self,
        item: Vec<u8>,
        dst: &mut tonic::codec::EncodeBuf<'_>,
    ) -> Result<(), tonic::Status> {
        dst.put_slice(&item);
        Ok(())
    }
}

impl tonic::codec::Decoder for RawDecoder {
    type Item = Vec<u8>;
    type Error = tonic::Status;
    fn decode(
        &mut self,
        src: &mut tonic::codec::DecodeBuf<'_>,
    ) -> Result<Option<Vec<u8>>, tonic::Status> {
        let mut out = vec![0; src.remaining()];
        src.copy_to_slice(&mut out);
        Ok(Some(out))
    }
}

/// The hostile builder's connection and what it was given.
struct Hostile {
    channel: Channel,
    client: RunnerServiceClient<Channel>,
    control: mpsc::Sender<BuilderMessage>,
    connection: String,
    attempts: Arc<Mutex<BTreeSet<String>>>,
}

impl Hostile {
    async fn join(farm: &Farm) -> Hostile {
        let channel = Channel::from_shared(format!("http://{}", farm.runner().addr))
            .unwrap()
            .connect()
            .await
            .unwrap();
        let mut client =
            RunnerServiceClient::new(channel.clone()).max_decoding_message_size(64 << 20);
        let (control, rx) = mpsc::channel(64);
        control
            .send(BuilderMessage {
                msg: Some(builder_message::Msg::Join(Join {
                    protocol_version: hydra_proto::PROTOCOL_VERSION,
                    machine_name: "hostile".into(),
                    systems: vec![hydra_builder::config::current_system()],
                    max_jobs: 2,
                    speed_factor: 1.0,
                    store_dir: "/nix/store".into(),
                    instance_id: "hostile".into(),
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
        let welcome = inbound.message().await.unwrap().unwrap();
        let connection = match welcome.msg {
            Some(runner_message::Msg::Welcome(w)) => w.machine_id,
            other => panic!("not welcomed: {other:?}"),
        };
        let attempts: Arc<Mutex<BTreeSet<String>>> = Default::default();
        let seen = attempts.clone();
        tokio::spawn(async move {
            while let Ok(Some(msg)) = inbound.message().await {
                match msg.msg {
                    Some(runner_message::Msg::Build(job)) => {
                        seen.lock().insert(job.attempt_id);
                    }
                    Some(runner_message::Msg::Abort(a)) => {
                        seen.lock().remove(&a.attempt_id);
                    }
                    _ => {}
                }
            }
        });
        Hostile {
            channel,
            client,
            control,
            connection,
            attempts,
        }
    }

    fn id(&self, which: &Id) -> String {
        match which {
            Id::Owned => self
                .attempts
                .lock()
                .iter()
                .next()
                .cloned()
                .unwrap_or_else(|| uuid::Uuid::new_v4().to_string()),
            Id::OwnConnection => self.connection.clone(),
            Id::Random => uuid::Uuid::new_v4().to_string(),
            Id::Text(t) => t.clone(),
            Id::Huge => "x\0".repeat(50_000),
        }
    }

    /// The two ids of a call: the connection (the hostile builder's own
    /// where the case says `Owned`, which only means something for
    /// attempts) and the attempt.
    fn ids(&self, machine: &Id, attempt: &Id) -> (String, String) {
        let machine = match machine {
            Id::Owned => self.connection.clone(),
            other => self.id(other),
        };
        (machine, self.id(attempt))
    }

    /// Applies one case; whether the runner refused it (`Some(status)`).
    async fn apply(&mut self, case: &Case) -> Option<tonic::Status> {
        match case {
            Case::Report(r) => {
                let (machine_id, attempt_id) = self.ids(&r.machine, &r.attempt);
                let report = CompletionReport {
                    machine_id,
                    attempt_id,
                    outcome: r.outcome,
                    error_msg: r.error.clone(),
                    outputs: r
                        .outputs
                        .iter()
                        .map(|(name, path)| BuiltOutput {
                            name: name.clone(),
                            path: path.clone(),
                            ..Default::default()
                        })
                        .collect(),
                    start_time: r.start,
                    stop_time: r.stop,
                    times_built: r.times_built,
                    is_non_deterministic: false,
                };
                self.client.complete(report).await.err()
            }
            Case::NotUtf8 { attempt, bytes } => {
                let valid = CompletionReport {
                    machine_id: self.connection.clone(),
                    attempt_id: self.id(attempt),
                    outcome: Outcome::Failed as i32,
                    ..Default::default()
                };
                let mut encoded = valid.encode_to_vec();
                // Field 4 (error_msg), length-delimited, with bytes that
                // are not UTF-8 (0xff never is).
                let mut bad = vec![0xff];
                bad.extend_from_slice(bytes);
                encoded.push((4 << 3) | 2);
                prost::encoding::encode_varint(bad.len() as u64, &mut encoded);
                encoded.extend_from_slice(&bad);
                self.raw("Complete", encoded).await
            }
            Case::Garbage(bytes) => self.raw("Complete", bytes.clone()).await,
            Case::Log {
                machine,
                attempt,
                chunks,
            } => {
                let (machine_id, attempt_id) = self.ids(machine, attempt);
                let chunks: Vec<LogChunk> = chunks
                    .iter()
                    .enumerate()
                    .map(|(i, data)| LogChunk {
                        machine_id: machine_id.clone(),
                        attempt_id: attempt_id.clone(),
                        data: data.clone(),
                        // Offsets anywhere: behind, at and past the copy.
                        offset: (i % 3 != 0)
                            .then(|| (data.len() as u64).wrapping_mul(i as u64 * 7919)),
                    })
                    .collect();
                self.client
                    .stream_log(tokio_stream::iter(chunks))
                    .await
                    .err()
            }
            Case::Upload {
                machine,
                attempt,
                parts,
            } => {
                let (machine_id, attempt_id) = self.ids(machine, attempt);
                let chunks: Vec<NarChunk> = parts
                    .iter()
                    .map(|p| NarChunk {
                        part: Some(match p {
                            UploadPart::Header {
                                path,
                                size,
                                hash,
                                refs,
                            } => nar_chunk::Part::Header(NarHeader {
                                machine_id: machine_id.clone(),
                                attempt_id: attempt_id.clone(),
                                store_path: path.clone(),
                                nar_hash: hash.clone(),
                                nar_size: *size,
                                references: refs.clone(),
                                ..Default::default()
                            }),
                            UploadPart::Data(d) => nar_chunk::Part::Data(d.clone()),
                        }),
                    })
                    .collect();
                self.client
                    .upload_output(tokio_stream::iter(chunks))
                    .await
                    .err()
            }
            Case::Fetch {
                machine,
                attempt,
                paths,
            } => {
                let (machine_id, attempt_id) = self.ids(machine, attempt);
                let request = FetchInputsRequest {
                    machine_id,
                    attempt_id,
                    paths: paths.clone(),
                };
                match self.client.fetch_inputs(request).await {
                    Err(s) => Some(s),
                    Ok(stream) => {
                        let mut stream = stream.into_inner();
                        loop {
                            match stream.message().await {
                                Ok(Some(_)) => continue,
                                Ok(None) => return None,
                                Err(s) => return Some(s),
                            }
                        }
                    }
                }
            }
            Case::Progress { attempt, phase } => {
                let msg = BuilderMessage {
                    msg: Some(builder_message::Msg::Progress(Progress {
                        attempt_id: self.id(attempt),
                        phase: *phase,
                    })),
                };
                let _ = self.control.send(msg).await;
                None
            }
            Case::Ping { load, disk } => {
                let msg = BuilderMessage {
                    msg: Some(builder_message::Msg::Ping(Ping {
                        load1: *load,
                        free_disk_bytes: *disk,
                        running_jobs: 0,
                        substituter_timeouts: 0,
                    })),
                };
                let _ = self.control.send(msg).await;
                None
            }
            Case::SecondJoin => {
                let msg = BuilderMessage {
                    msg: Some(builder_message::Msg::Join(Join::default())),
                };
                let _ = self.control.send(msg).await;
                Some(tonic::Status::aborted("the runner drops the connection"))
            }
        }
    }

    async fn raw(&mut self, method: &str, bytes: Vec<u8>) -> Option<tonic::Status> {
        let mut grpc = tonic::client::Grpc::new(self.channel.clone());
        if let Err(e) = grpc.ready().await {
            return Some(tonic::Status::unavailable(e.to_string()));
        }
        let path = format!("/hydra.builder.v1.RunnerService/{method}")
            .parse()
            .unwrap();
        grpc.unary(tonic::Request::new(bytes), path, Raw)
            .await
            .err()
    }
}

/// What a refused call may not change: every step row and build with a
/// status other than aborted (3) or cancelled (4), and FailedPaths. (A
/// refusal may abort the attempt it names, and the dispatcher may start
/// others meanwhile; neither shows here.)
#[derive(Debug, Clone, PartialEq)]
struct Snapshot {
    steps: Vec<(i32, i32, i32)>,
    builds: Vec<(i32, i32)>,
    failed_paths: i64,
}

async fn snapshot(pool: &sqlx::PgPool) -> Snapshot {
    Snapshot {
        steps: sqlx::query_as(
            "select build, stepnr, status from BuildSteps where status not in (3, 4) order by 1, 2",
        )
        .fetch_all(pool)
        .await
        .unwrap(),
        builds: sqlx::query_as(
            "select id, buildStatus from Builds where finished = 1 and buildStatus != 3 order by 1",
        )
        .fetch_all(pool)
        .await
        .unwrap(),
        failed_paths: sqlx::query_scalar("select count(*) from FailedPaths")
            .fetch_one(pool)
            .await
            .unwrap(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hostile_builder_neither_kills_the_runner_nor_gets_a_refused_report_applied() {
    let cases: u32 = std::env::var("HQ_HOSTILE_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000);
    let seed: u64 = std::env::var("HQ_HOSTILE_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(rand::random);
    println!("hostile builder: {cases} cases, HQ_HOSTILE_SEED={seed}");
    let mut farm = Farm::start(|c| {
        // Keep giving the hostile builder attempts to lie about.
        c.max_tries = 1_000_000;
        c.retry_base_secs = 0.0;
        c.machine_rest_after_failures = 1_000_000;
        c.ping_timeout_secs = 600;
    })
    .await
    .unwrap();
    let mut queued = 0u32;
    let mut hostile = Hostile::join(&farm).await;
    let mut rng_seed = [0u8; 32];
    rng_seed[..8].copy_from_slice(&seed.to_le_bytes());
    let mut runner = TestRunner::new_with_rng(
        Config::default(),
        TestRng::from_seed(RngAlgorithm::ChaCha, &rng_seed),
    );
    let strategy = case();
    let mut refused = 0u32;
    for n in 0..cases {
        // Work to be dispatched to the hostile builder (a report it may
        // legitimately make, a plain failure, ends a build).
        let unfinished: i64 = sqlx::query_scalar("select count(*) from Builds where finished = 0")
            .fetch_one(&farm.db.pool)
            .await
            .unwrap();
        if unfinished < 3 {
            let expr = format!(
                "with prelude; {{ {} }}",
                (0..8)
                    .map(|i| format!(
                        "j{i} = mkDrv {{ name = \"h{queued}-{i}\"; script = \"echo > $out\"; }};"
                    ))
                    .collect::<String>()
            );
            let jobs: Vec<String> = (0..8).map(|i| format!("j{i}")).collect();
            let jobs: Vec<&str> = jobs.iter().map(String::as_str).collect();
            let drvs = farm.runner_store.instantiate(&expr, &jobs).await.unwrap();
            farm.queue(&drvs, |_| JobOptions::default()).await.unwrap();
            queued += 1;
        }
        let case = strategy.new_tree(&mut runner).unwrap().current();
        let before = snapshot(&farm.db.pool).await;
        let answer = hostile.apply(&case).await;
        if let Some(status) = &answer {
            refused += 1;
            // What a refusal changed is settled when the call returns.
            let after = snapshot(&farm.db.pool).await;
            assert_eq!(
                before,
                after,
                "case {n} ({case:?}) was refused ({}) but applied something",
                status.message()
            );
        }
        if let Some(runner) = farm.runner.as_mut()
            && let Err(e) = runner.check_alive()
        {
            panic!("case {n} ({case:?}) stopped the runner: {e}");
        }
        if matches!(case, Case::SecondJoin) {
            eventually(LIMIT, || async {
                let still = farm
                    .runner()
                    .shared
                    .state
                    .read(|v| v.machines.get("hostile").is_some());
                Ok((!still).then_some(()))
            })
            .await
            .unwrap();
            hostile = Hostile::join(&farm).await;
        }
    }
    println!("{cases} cases, {refused} refused, {queued} batches of builds queued");
    assert!(refused > cases / 4, "the cases mostly test refusals");
    // The runner still answers, and once the hostile builder leaves,
    // nothing is left busy.
    drop(hostile);
    let settled = eventually(LIMIT, || async {
        let busy: i64 = sqlx::query_scalar("select count(*) from BuildSteps where busy != 0")
            .fetch_one(&farm.db.pool)
            .await?;
        Ok((busy == 0).then_some(()))
    })
    .await;
    if let Err(e) = settled {
        let rows: Vec<(i32, i32, String, String, i32)> = sqlx::query_as(
            "select s.build, s.stepnr, s.drvPath, coalesce(a.id::text, ''), s.busy from BuildSteps s
               left join hqr_attempts a on a.build = s.build and a.stepnr = s.stepnr where s.busy != 0",
        )
        .fetch_all(&farm.db.pool)
        .await
        .unwrap();
        let running: Vec<String> = farm.runner().shared.state.read(|v| {
            v.attempts
                .iter()
                .map(|a| format!("{} {} {}", a.id, a.machine, a.connection))
                .collect()
        });
        panic!("{e}: busy rows {rows:?}; running attempts {running:?}");
    }
    let mut api = farm.api().await.unwrap();
    api.cluster_status(hydra_proto::client::ClusterStatusRequest {})
        .await
        .unwrap();
    farm.runner.as_mut().unwrap().check_alive().unwrap();
}
