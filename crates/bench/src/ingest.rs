//! Ingestion at nixpkgs scale: many queued builds over three times as many
//! distinct derivations (generated and instantiated once, cached outside
//! the repository), loaded into the graph; then the same after a restart.
//! A load builder that holds its one job shows the first dispatch.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use hydra_queue_runner::Runner;
use hydra_testkit::load::{Completion, Received, run_load_builder};
use hydra_testkit::{Farm, NixStore};
use serde_json::{Value, json};
use tokio::sync::mpsc;

use crate::report::table;

/// Derivations per build (a chain: a <- b <- c).
const CHAIN: usize = 3;

pub async fn run(builds: usize) -> Result<Value> {
    let (store, tops) = cached_dataset(builds).await?;
    let steps = builds * CHAIN;
    let mut farm = Farm::start_on(store, |c| c.max_unsupported_secs = 86_400).await?;
    let (tx, mut seen) = mpsc::unbounded_channel();
    holder(&farm, tx.clone());

    let rss_before = rss_bytes();
    eprintln!("[ingest] queueing {builds} builds ({steps} steps)");
    insert_builds(
        &farm.db.pool,
        farm.jobset_id,
        &tops,
        &hydra_builder::config::current_system(),
    )
    .await?;
    let queued = Instant::now();
    let loaded = all_loaded(&farm, steps).await?;
    let first = first_job(&mut seen, queued).await?;
    let rss_after = rss_bytes();
    let per_step = (rss_after.saturating_sub(rss_before)) as f64 / steps as f64;

    eprintln!("[ingest] restarting the runner with the full queue");
    let old = farm.runner.take().context("a runner")?;
    old.shutdown().await?;
    let restarted = Instant::now();
    farm.runner = Some(Runner::start(farm.config.clone(), farm.db.pool.clone()).await?);
    let (tx2, mut seen2) = mpsc::unbounded_channel();
    holder(&farm, tx2);
    let first_after = first_job(&mut seen2, restarted).await?;
    all_loaded(&farm, steps).await?;
    let reloaded = restarted.elapsed().as_secs_f64();

    let rate = steps as f64 / loaded;
    let rate_after = steps as f64 / reloaded;
    table(
        "ingestion",
        &[
            "",
            "steps",
            "seconds",
            "steps/s",
            "first dispatch (s)",
            "RSS/step (B)",
        ],
        &[
            vec![
                "queued".into(),
                steps.to_string(),
                format!("{loaded:.2}"),
                format!("{rate:.0}"),
                format!("{first:.2}"),
                format!("{per_step:.0}"),
            ],
            vec![
                "after restart".into(),
                steps.to_string(),
                format!("{reloaded:.2}"),
                format!("{rate_after:.0}"),
                format!("{first_after:.2}"),
                "-".into(),
            ],
        ],
    );
    Ok(json!({
        "scenario": "ingest", "builds": builds, "steps": steps,
        "load_seconds": loaded, "steps_per_second": rate, "first_dispatch_seconds": first,
        "rss_bytes_per_step": per_step,
        "restart": {"load_seconds": reloaded, "steps_per_second": rate_after,
                    "first_dispatch_seconds": first_after},
    }))
}

/// A load builder with one slot that never finishes its job.
fn holder(farm: &Farm, tx: mpsc::UnboundedSender<Received>) {
    let url = format!("http://{}", farm.runner().addr);
    let system = hydra_builder::config::current_system();
    tokio::spawn(run_load_builder(
        url,
        "holder".into(),
        system,
        1,
        Completion::Hold,
        tx,
    ));
}

/// Seconds until the graph holds `steps` steps (the one the holder runs
/// counts too).
pub async fn all_loaded(farm: &Farm, steps: usize) -> Result<f64> {
    let since = Instant::now();
    let shared = farm.runner().shared.clone();
    hydra_testkit::eventually(Duration::from_secs(3600), || {
        let shared = shared.clone();
        async move { Ok((shared.state.queue_counts().steps >= steps).then_some(())) }
    })
    .await?;
    Ok(since.elapsed().as_secs_f64())
}

async fn first_job(seen: &mut mpsc::UnboundedReceiver<Received>, since: Instant) -> Result<f64> {
    let r = tokio::time::timeout(Duration::from_secs(3600), seen.recv())
        .await
        .context("no dispatch")?
        .context("the load builder stopped")?;
    Ok(r.at.saturating_duration_since(since).as_secs_f64())
}

/// The instantiated dataset for `builds`, from the cache when it is there.
async fn cached_dataset(builds: usize) -> Result<(NixStore, Vec<String>)> {
    let root = cache_dir().join(format!("ingest-{builds}"));
    let store = NixStore::open(&root, &format!("ingest{builds}"))?;
    let list = root.join("tops.txt");
    if let Ok(text) = std::fs::read_to_string(&list) {
        let tops: Vec<String> = text.lines().map(str::to_owned).collect();
        if tops.len() == builds {
            eprintln!("[ingest] using the dataset cached in {}", root.display());
            let began = Instant::now();
            let files = tokio::task::spawn_blocking(move || read_into_page_cache(&root)).await??;
            eprintln!(
                "[ingest] read its {files} files into the page cache ({:.1?})",
                began.elapsed()
            );
            return Ok((store, tops));
        }
    }
    eprintln!(
        "[ingest] instantiating {builds} builds of {CHAIN} derivations into {} (once; cached)",
        root.display()
    );
    let began = Instant::now();
    let mut tops = Vec::with_capacity(builds);
    let chunk = 10_000;
    for start in (0..builds).step_by(chunk) {
        let n = chunk.min(builds - start);
        let expr = format!(
            "with prelude; map (i: let a = mkDrv {{ name = \"a${{toString i}}\"; script = \"echo ${{toString i}} > $out\"; }};
                 b = mkDrv {{ name = \"b${{toString i}}\"; script = \"cat ${{a}} > $out\"; }};
             in mkDrv {{ name = \"c${{toString i}}\"; script = \"cat ${{b}} > $out\"; }})
             (builtins.genList (x: x + {start}) {n})"
        );
        tops.extend(store.instantiate_list(&expr).await?);
        eprintln!(
            "[ingest]   {} of {builds} ({:.0?})",
            tops.len(),
            began.elapsed()
        );
    }
    std::fs::write(&list, tops.join("\n"))?;
    Ok((store, tops))
}

/// Reads the store's database and every file of its store once. The
/// runner loads builds an evaluator has just written, whose `.drv` files
/// are in the page cache; a dataset made before may not be (this VM's
/// kernel pages out what was not touched for about a minute: a DAMON
/// `pageout` scheme, `kdamond`), and a cold one measured 8,683 steps/s
/// where the same one warm measured 22,897: the disk's speed, not the
/// runner's.
fn read_into_page_cache(root: &std::path::Path) -> Result<usize> {
    let mut files = 0;
    let db = root.join("nix/var/nix/db/db.sqlite");
    std::io::copy(&mut std::fs::File::open(&db)?, &mut std::io::sink())?;
    for entry in std::fs::read_dir(root.join("nix/store"))? {
        let path = entry?.path();
        if path.is_file() {
            std::io::copy(&mut std::fs::File::open(&path)?, &mut std::io::sink())?;
            files += 1;
        }
    }
    Ok(files)
}

/// `$HQ_BENCH_CACHE`, else `/var/tmp/hydra-bench-cache`.
pub fn cache_dir() -> PathBuf {
    std::env::var_os("HQ_BENCH_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/tmp/hydra-bench-cache"))
}

/// Inserts one build per `.drv` as an evaluator would (in bulk) and
/// notifies `builds_added` once.
pub async fn insert_builds(
    pool: &sqlx::PgPool,
    jobset: i32,
    drvs: &[String],
    system: &str,
) -> Result<()> {
    let mut tx = pool.begin().await?;
    for chunk in drvs.chunks(20_000) {
        sqlx::query(
            "insert into Builds (finished, timestamp, jobset_id, job, drvPath, system, maxsilent, timeout, priority)
             select 0, extract(epoch from now())::int, $1, 'job' || t.n, t.d, $3, 3600, 36000, 100
               from unnest($2::text[]) with ordinality as t(d, n)",
        )
        .bind(jobset)
        .bind(chunk)
        .bind(system)
        .execute(&mut *tx)
        .await?;
    }
    sqlx::query("notify builds_added").execute(&mut *tx).await?;
    tx.commit().await?;
    Ok(())
}

/// This process's resident memory.
pub fn rss_bytes() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}
