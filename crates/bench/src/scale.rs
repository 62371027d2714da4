//! Scale: hundreds of connected load-generator builders (the real
//! protocol, every job failed at once, so that the runner's store takes no
//! writes and the figure is the runner's) and a large queue of runnable
//! steps.
//! For a fixed window: steps dispatched per second, the dispatcher's
//! round time, and CPU time. The builders run in this process too, so the
//! CPU figure is an upper bound for the runner.

use std::time::{Duration, Instant};

use anyhow::Result;
use hydra_testkit::Farm;
use hydra_testkit::load::{Completion, run_load_builder};
use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::report::table;

pub async fn run(builders: usize, steps: usize, window: Duration) -> Result<Value> {
    let farm = Farm::start(|_| {}).await?;
    eprintln!("[scale] instantiating {steps} one-step builds");
    let expr = format!(
        "with prelude; map (i: mkDrv {{ name = \"s${{toString i}}\"; script = \"true\"; }}) (builtins.genList (x: x) {steps})"
    );
    let drvs = farm.runner_store.instantiate_list(&expr).await?;
    let system = hydra_builder::config::current_system();
    crate::ingest::insert_builds(&farm.db.pool, farm.jobset_id, &drvs, &system).await?;
    crate::ingest::all_loaded(&farm, steps).await?;
    let shared = farm.runner().shared.clone();
    eprintln!("[scale] {steps} runnable steps; connecting {builders} builders");
    let (tx, mut seen) = mpsc::unbounded_channel();
    let url = format!("http://{}", farm.runner().addr);
    let rounds_before = shared.metrics.round_seconds.lock().count();
    let cpu_before = cpu_seconds();
    let began = Instant::now();
    for b in 0..builders {
        tokio::spawn(run_load_builder(
            url.clone(),
            format!("load-{b}"),
            system.clone(),
            1,
            Completion::Fail,
            tx.clone(),
        ));
    }
    let mut dispatched = 0usize;
    let deadline = tokio::time::Instant::now() + window;
    while let Ok(Some(_)) = tokio::time::timeout_at(deadline, seen.recv()).await {
        dispatched += 1;
    }
    let elapsed = began.elapsed().as_secs_f64();
    let cpu = cpu_seconds() - cpu_before;
    let (rounds, mean_round) = {
        let h = shared.metrics.round_seconds.lock();
        (h.count() - rounds_before, h.mean())
    };
    let connected = shared.state.queue_counts().machines;
    let rate = dispatched as f64 / elapsed;
    table(
        &format!(
            "scale: {builders} load builders, {steps} runnable steps, {:.0} s",
            elapsed
        ),
        &[
            "connected",
            "dispatched",
            "steps/s",
            "rounds",
            "mean round (ms)",
            "CPU (s)",
            "CPU %",
        ],
        &[vec![
            connected.to_string(),
            dispatched.to_string(),
            format!("{rate:.0}"),
            rounds.to_string(),
            format!("{:.2}", mean_round * 1e3),
            format!("{cpu:.1}"),
            format!("{:.0}", 100.0 * cpu / elapsed),
        ]],
    );
    Ok(json!({
        "scenario": "scale", "builders": builders, "connected": connected, "steps": steps,
        "seconds": elapsed, "dispatched": dispatched, "steps_per_second": rate,
        "rounds": rounds, "mean_round_ms": mean_round * 1e3,
        "cpu_seconds_upper_bound": cpu,
    }))
}

/// CPU time of this process (user + system), in seconds.
fn cpu_seconds() -> f64 {
    // SAFETY: getrusage writes into the struct we pass.
    let mut u: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut u) };
    let t = |v: libc::timeval| v.tv_sec as f64 + v.tv_usec as f64 / 1e6;
    t(u.ru_utime) + t(u.ru_stime)
}
