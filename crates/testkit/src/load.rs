//! A load-generator builder: it speaks the real protocol (join, pings,
//! output uploads, completion reports) but builds nothing. Each job
//! "succeeds" at once with a tiny NAR for every output. For benchmarks of
//! the runner's own costs (dispatch latency, scale); never proof that
//! building works.

use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use hydra_nix::{Derivation, Hash, StoreDir};
use hydra_proto::v1::runner_service_client::RunnerServiceClient;
use hydra_proto::v1::*;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;

/// What a load builder does with its jobs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Completion {
    /// Never reports: its slots stay taken (a machine holding its jobs).
    Hold,
    /// Uploads a tiny NAR per output and reports success (the runner's
    /// store registers every output).
    Succeed,
    /// Reports a build failure at once (the runner's store takes nothing).
    Fail,
    /// Never reads its control stream after the welcome (its jobs pile up
    /// in the connection's buffers), while its pings go on: a builder
    /// stuck in a way its connection does not show.
    StopReading,
}

/// When a load builder received a job.
#[derive(Debug, Clone)]
pub struct Received {
    pub machine: String,
    pub drv_path: String,
    pub at: Instant,
}

/// Joins `name` to the runner at `url` and serves jobs until the task is
/// dropped; every job received is sent to `seen`, then ends as `completion`
/// says.
pub async fn run_load_builder(
    url: String,
    name: String,
    system: String,
    max_jobs: u32,
    completion: Completion,
    seen: mpsc::UnboundedSender<Received>,
) -> Result<()> {
    let channel = tonic::transport::Endpoint::from_shared(url)?
        .connect()
        .await
        .context("connecting to the runner")?;
    let client = RunnerServiceClient::new(channel).max_decoding_message_size(64 << 20);
    let (control, rx) = mpsc::channel(64);
    control
        .send(BuilderMessage {
            msg: Some(builder_message::Msg::Join(Join {
                protocol_version: hydra_proto::PROTOCOL_VERSION,
                builder_version: "load-generator".into(),
                machine_name: name.clone(),
                systems: vec![system],
                max_jobs,
                speed_factor: 1.0,
                store_dir: "/nix/store".into(),
                ..Default::default()
            })),
        })
        .await?;
    let mut inbound = client
        .clone()
        .open(ReceiverStream::new(rx))
        .await?
        .into_inner();
    let first = inbound.message().await?.context("no welcome")?;
    let welcome = hydra_proto::check_welcome(first)?;
    let machine_id = Arc::new(welcome.machine_id);
    let ping_every = Duration::from_secs(welcome.ping_interval_secs.max(1) as u64);
    let pinger = control.clone();
    tokio::spawn(async move {
        loop {
            tokio::time::sleep(ping_every).await;
            let ping = BuilderMessage {
                msg: Some(builder_message::Msg::Ping(Ping::default())),
            };
            if pinger.send(ping).await.is_err() {
                return;
            }
        }
    });
    if completion == Completion::StopReading {
        // Holds the stream open and unread for as long as the task lives.
        let _unread = inbound;
        std::future::pending::<()>().await;
        unreachable!("pending never ends");
    }
    while let Some(msg) = inbound.message().await? {
        let Some(runner_message::Msg::Build(job)) = msg.msg else {
            continue;
        };
        let _ = seen.send(Received {
            machine: name.clone(),
            drv_path: job.drv_path.clone(),
            at: Instant::now(),
        });
        let client = client.clone();
        let machine_id = machine_id.clone();
        tokio::spawn(async move {
            let done = match completion {
                Completion::Hold | Completion::StopReading => return,
                Completion::Succeed => complete_at_once(client, &machine_id, job).await,
                Completion::Fail => fail_at_once(client, &machine_id, job).await,
            };
            if let Err(e) = done {
                tracing::warn!("load builder: {e:#}");
            }
        });
    }
    bail!("the runner closed {name}'s control stream")
}

/// Reports a build failure.
async fn fail_at_once(
    mut client: RunnerServiceClient<tonic::transport::Channel>,
    machine_id: &str,
    job: BuildJob,
) -> Result<()> {
    client
        .complete(CompletionReport {
            machine_id: machine_id.to_owned(),
            attempt_id: job.attempt_id,
            outcome: Outcome::Failed as i32,
            error_msg: "the load builder fails every job".into(),
            ..Default::default()
        })
        .await?;
    Ok(())
}

/// Uploads a one-file NAR for each output and reports success.
async fn complete_at_once(
    mut client: RunnerServiceClient<tonic::transport::Channel>,
    machine_id: &str,
    job: BuildJob,
) -> Result<()> {
    deliver_single_file(&mut client, machine_id, &job, b"load\n").await?;
    Ok(())
}

/// What a builder delivers for `job`, without building: a one-file NAR of
/// `contents` uploaded for each output, then a success report. The
/// runner's refusal of either call is returned as it came.
pub async fn deliver_single_file(
    client: &mut RunnerServiceClient<tonic::transport::Channel>,
    machine_id: &str,
    job: &BuildJob,
    contents: &[u8],
) -> Result<(), tonic::Status> {
    let dir = StoreDir::default();
    let drv = Derivation::parse(&dir, &job.drv)
        .map_err(|e| tonic::Status::invalid_argument(e.to_string()))?;
    let nar = hydra_nix::nar::single_file_nar(contents);
    let hash = Hash::sha256(&nar);
    let mut outputs = Vec::new();
    for (name, output) in &drv.outputs {
        let Some(path) = output.path() else {
            return Err(tonic::Status::unimplemented(
                "a builder that does not build cannot make floating CA outputs",
            ));
        };
        let path = dir.display(path);
        let header = NarChunk {
            part: Some(nar_chunk::Part::Header(NarHeader {
                machine_id: machine_id.to_owned(),
                attempt_id: job.attempt_id.clone(),
                store_path: path.clone(),
                nar_hash: hash.to_prefixed_base32(),
                nar_size: nar.len() as u64,
                ..Default::default()
            })),
        };
        let data = NarChunk {
            part: Some(nar_chunk::Part::Data(nar.clone())),
        };
        client
            .upload_output(tokio_stream::iter(vec![header, data]))
            .await?;
        outputs.push(BuiltOutput {
            name: name.clone(),
            path,
            nar_hash: hash.to_prefixed_base32(),
            nar_size: nar.len() as u64,
        });
    }
    client
        .complete(CompletionReport {
            machine_id: machine_id.to_owned(),
            attempt_id: job.attempt_id.clone(),
            outcome: Outcome::Succeeded as i32,
            outputs,
            ..Default::default()
        })
        .await?;
    Ok(())
}
