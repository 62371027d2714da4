//! Dispatch latency: with an idle (load-generator) builder, one build at a
//! time is submitted through the client API; the latency is from the
//! submit call to the builder receiving the job. Once alone, once while
//! thousands of steps for a system no machine has sit in the queue (the
//! dispatcher looks at them every round).

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
    eprintln!("[latency] queueing {queued} steps no machine can build");
    queue_unbuildable(&farm, queued).await?;
    let mut loaded = Vec::new();
    for drv in &drvs[samples + 1..=2 * samples] {
        loaded.push(measure(&farm, &mut api, drv, &mut seen).await?);
    }
    let rows = vec![
        row("idle queue", &alone),
        row(&format!("{queued} queued"), &loaded),
    ];
    table(
        "dispatch latency: submit -> builder receives the job (ms)",
        &["queue", "samples", "p50", "p99", "max"],
        &rows,
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

/// Submits `drv`, waits for the builder to receive it and the build to end.
async fn measure(
    farm: &Farm,
    api: &mut hydra_testkit::ApiClient,
    drv: &str,
    seen: &mut mpsc::UnboundedReceiver<hydra_testkit::load::Received>,
) -> Result<f64> {
    let began = Instant::now();
    let reply = api.submit(submit_request(drv)).await?.into_inner();
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
    Ok(latency)
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
