//! Dispatch latency: with an idle (load-generator) builder, one build at a
//! time is submitted through the client API; the latency is from the
//! submit call to the builder receiving the job. Once alone, once while
//! thousands of steps for a system no machine has sit in the queue (the
//! dispatcher looks at them every round). The slowest samples are shown
//! by part, so that a p99 says where its time went.

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use hydra_queue_runner::api::priority::PriorityClass;
use hydra_testkit::Farm;
use hydra_testkit::load::{Completion, run_load_builder};
use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::report::{ms, percentile, table};

pub async fn run(samples: usize, queued: usize) -> Result<Value> {
    let farm = Farm::start(|c| c.max_unsupported_secs = 86_400).await?;
    let system = hydra_builder::config::current_system();
    let (tx, mut seen) = mpsc::unbounded_channel();
    let url = format!("http://{}", farm.runner().addr);
    tokio::spawn(run_load_builder(
        url,
        "idle".into(),
        system,
        4,
        Completion::Succeed,
        tx,
    ));
    let expr = format!(
        "with prelude; map (i: mkDrv {{ name = \"lat${{toString i}}\"; script = \"echo ${{toString i}} > $out\"; }}) (builtins.genList (x: x) {})",
        2 * samples + 2
    );
    let drvs = farm.runner_store.instantiate_list(&expr).await?;
    let mut api = farm.api().await?;
    // Warm up the connections once.
    measure(&farm, &mut api, &drvs[0], &mut seen).await?;
    let mut alone = Vec::new();
    for drv in &drvs[1..=samples] {
        alone.push(measure(&farm, &mut api, drv, &mut seen).await?);
    }
    let alone_parts = breakdown(&farm, &alone).await?;
    eprintln!("[latency] queueing {queued} steps no machine can build");
    queue_unbuildable(&farm, queued).await?;
    // Once more unmeasured: the steps are in the graph, but the load's
    // tail (its counters, the dispatcher's first look at them) still runs,
    // and the first submission waited 70 to 150 ms for it. That is the
    // cost of a load, not of a queue.
    measure(&farm, &mut api, &drvs[samples + 1], &mut seen).await?;
    let mut loaded = Vec::new();
    for drv in &drvs[samples + 2..=2 * samples + 1] {
        loaded.push(measure(&farm, &mut api, drv, &mut seen).await?);
    }
    let loaded_parts = breakdown(&farm, &loaded).await?;
    let (alone, loaded): (Vec<f64>, Vec<f64>) = (
        alone.iter().map(|s| s.latency).collect(),
        loaded.iter().map(|s| s.latency).collect(),
    );
    let rows = vec![
        row("idle queue", &alone),
        row(&format!("{queued} queued"), &loaded),
    ];
    table(
        "dispatch latency: submit -> builder receives the job (ms)",
        &["queue", "samples", "p50", "p99", "max"],
        &rows,
    );
    let worst: Vec<Vec<String>> = [("idle", &alone_parts), ("queued", &loaded_parts)]
        .into_iter()
        .flat_map(|(queue, parts)| parts.iter().take(WORST).map(move |p| p.row(queue)))
        .collect();
    table(
        "the slowest samples, by part (ms; parts from the event log, to the millisecond)",
        &[
            "queue",
            "at (s)",
            "total",
            "submit",
            "-> queued",
            "-> started",
            "-> received",
        ],
        &worst,
    );
    let stats = |v: &[f64]| {
        json!({"samples": v.len(), "p50_ms": percentile(v, 50.0) * 1e3,
               "p99_ms": percentile(v, 99.0) * 1e3, "max_ms": percentile(v, 100.0) * 1e3})
    };
    Ok(
        json!({"scenario": "latency", "idle": stats(&alone), "queued": queued,
              "with_queue": stats(&loaded)}),
    )
}

fn row(name: &str, v: &[f64]) -> Vec<String> {
    vec![
        name.to_owned(),
        v.len().to_string(),
        ms(percentile(v, 50.0)),
        ms(percentile(v, 99.0)),
        ms(percentile(v, 100.0)),
    ]
}

/// How many of the slowest samples of each queue are broken down.
const WORST: usize = 4;

/// One submission, timed.
struct Sample {
    latency: f64,
    /// The submit call alone.
    submit: f64,
    /// Unix milliseconds at the submit call.
    began_ms: i64,
    build: i32,
}

/// A sample's parts: the submit call; on to the `queued` event (written
/// by the submit's transaction, so a part of the call); on to
/// `step_started` (the queue monitor woken, the build loaded, the
/// dispatcher's round and its statement); on to the builder receiving the
/// job (the tunnel).
struct Parts {
    began_ms: i64,
    first_ms: i64,
    total: f64,
    submit: f64,
    queued: Option<i64>,
    started: Option<i64>,
}

impl Parts {
    fn row(&self, queue: &str) -> Vec<String> {
        let at = |x: Option<i64>| x.map_or("-".to_owned(), |v| v.to_string());
        let received = self.began_ms + (self.total * 1e3) as i64;
        vec![
            queue.to_owned(),
            format!("{:.1}", (self.began_ms - self.first_ms) as f64 / 1e3),
            ms(self.total),
            ms(self.submit),
            at(self.queued.map(|q| q - self.began_ms)),
            at(self.started.zip(self.queued).map(|(s, q)| s - q)),
            at(self.started.map(|s| received - s)),
        ]
    }
}

/// The slowest samples first, each with its parts read from the event log.
async fn breakdown(farm: &Farm, samples: &[Sample]) -> Result<Vec<Parts>> {
    let first_ms = samples.iter().map(|s| s.began_ms).min().unwrap_or(0);
    let mut order: Vec<&Sample> = samples.iter().collect();
    order.sort_by(|a, b| b.latency.total_cmp(&a.latency));
    let mut out = Vec::new();
    for s in order.into_iter().take(WORST) {
        let at = |kind: &'static str| {
            sqlx::query_scalar::<_, Option<i64>>(
                "select min(at_ms) from hqr_events where kind = $1 and $2 = any(builds)",
            )
            .bind(kind)
            .bind(s.build)
            .fetch_one(&farm.db.pool)
        };
        out.push(Parts {
            began_ms: s.began_ms,
            first_ms,
            total: s.latency,
            submit: s.submit,
            queued: at("queued").await?,
            started: at("step_started").await?,
        });
    }
    Ok(out)
}

/// Submits `drv`, waits for the builder to receive it and the build to end.
async fn measure(
    farm: &Farm,
    api: &mut hydra_testkit::ApiClient,
    drv: &str,
    seen: &mut mpsc::UnboundedReceiver<hydra_testkit::load::Received>,
) -> Result<Sample> {
    let began = Instant::now();
    let began_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_millis() as i64;
    let reply = api.submit(submit_request(drv)).await?.into_inner();
    let submit = began.elapsed().as_secs_f64();
    let got = loop {
        let r = tokio::time::timeout(Duration::from_secs(30), seen.recv())
            .await
            .context("no job within 30 s")?
            .context("the load builder stopped")?;
        if r.drv_path.ends_with(drv.rsplit('/').next().unwrap_or(drv)) {
            break r;
        }
    };
    let latency = got.at.duration_since(began).as_secs_f64();
    farm.wait_finished(
        reply.build_ids.iter().map(|i| *i as i32),
        Duration::from_secs(30),
    )
    .await?;
    Ok(Sample {
        latency,
        submit,
        began_ms,
        build: reply.build_ids.first().copied().unwrap_or_default() as i32,
    })
}

fn submit_request(drv: &str) -> hydra_proto::client::SubmitRequest {
    hydra_proto::client::SubmitRequest {
        drv_paths: vec![drv.to_owned()],
        tenant: "bench".into(),
        priority: PriorityClass::Interactive.to_wire() as i32,
        ..Default::default()
    }
}

/// Queues `n` one-step builds for a system no machine has.
async fn queue_unbuildable(farm: &Farm, n: usize) -> Result<()> {
    let expr = format!(
        "with prelude; map (i: mkDrv {{ name = \"none${{toString i}}\"; system = \"bench-none\"; script = \"true\"; }}) (builtins.genList (x: x) {n})"
    );
    let drvs = farm.runner_store.instantiate_list(&expr).await?;
    crate::ingest::insert_builds(&farm.db.pool, farm.jobset_id, &drvs, "bench-none").await?;
    crate::ingest::all_loaded(farm, n).await?;
    Ok(())
}
