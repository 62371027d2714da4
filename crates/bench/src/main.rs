//! `hydra-bench`: the benchmark harness (issue #8). Each scenario prints a
//! table with its baseline beside it (local Nix, a pipe) and writes JSON
//! under `bench-results/` (or `$HQ_BENCH_RESULTS`). Run it through
//! `scripts/bench.sh`, which builds in release mode and provides
//! PostgreSQL.

/// The runner's allocator (its `main.rs` says why): the runner measured
/// here runs in this process.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod cpu;
mod dag;
mod ingest;
mod latency;
mod makespan;
mod report;
mod scale;
mod transfer;

use std::time::Duration;

use anyhow::Result;
use clap::{Parser, Subcommand};
use dag::Dag;

#[derive(Parser)]
#[command(
    name = "hydra-bench",
    about = "Benchmarks of the queue runner against local Nix"
)]
struct Cli {
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand)]
enum Scenario {
    /// The same DAGs built by `nix-store --realise -j N` and by the farm.
    Makespan {
        /// wide, deep, layered, mixed (comma-separated); wide-N, deep-N
        /// for N steps.
        #[arg(long, default_value = "wide,deep,layered,mixed")]
        shapes: String,
        /// Scale of the shapes: 1.0 is the (1000 wide, 200 deep,
        /// 10 layers of 100).
        #[arg(long, default_value_t = 1.0)]
        size: f64,
        /// Job slots in all (local -j N; the builders' slots add up to it).
        #[arg(long, default_value_t = 4)]
        jobs: u32,
        #[arg(long, default_value_t = 2)]
        builders: u32,
        /// Pairs of runs (local Nix, then the farm) of each shape: the row
        /// is the pair of the median ratio, with the range beside it (the
        /// VM's speed drifts by tens of percent within minutes).
        #[arg(long, default_value_t = 1)]
        repeat: u32,
    },
    /// Queued builds (three derivations each) loaded into the graph, and
    /// again after a restart.
    Ingest {
        #[arg(long, default_value_t = 100_000)]
        builds: usize,
    },
    /// Submit-to-builder latency, alone and with a large queue. 1,000
    /// samples, so that a p99 is the 10th slowest and not one stall.
    Latency {
        #[arg(long, default_value_t = 1000)]
        samples: usize,
        #[arg(long, default_value_t = 10_000)]
        queued: usize,
    },
    /// NAR throughput for one large output and many small inputs.
    Transfer {
        #[arg(long, default_value_t = 1024)]
        big_mib: u64,
        #[arg(long, default_value_t = 10_000)]
        small: usize,
    },
    /// How long a nix-daemon connection and a query take here (a probe
    /// for reading the other figures).
    #[command(hide = true)]
    Probe,
    /// Many load builders and a large runnable queue.
    Scale {
        #[arg(long, default_value_t = 500)]
        builders: usize,
        #[arg(long, default_value_t = 100_000)]
        steps: usize,
        #[arg(long, default_value_t = 60)]
        seconds: u64,
    },
}

/// `wide`, `deep`, `layered`, `mixed` at the sizes times `size`;
/// `wide-N` and `deep-N` at N steps.
fn shapes(list: &str, size: f64) -> Result<Vec<Dag>> {
    let n = |base: f64| ((base * size).round() as usize).max(2);
    list.split(',')
        .map(|s| {
            let s = s.trim();
            let (name, count) = match s.split_once('-') {
                Some((name, count)) => {
                    let count: usize = count
                        .parse()
                        .map_err(|_| anyhow::anyhow!("{s:?}: the count after '-' is not a number"))?;
                    (name, Some(count.max(2)))
                }
                None => (s, None),
            };
            match name {
                "wide" => Ok(Dag::wide(count.unwrap_or_else(|| n(1000.0)))),
                "deep" => Ok(Dag::deep(count.unwrap_or_else(|| n(200.0)))),
                "layered" if count.is_none() => Ok(Dag::layered(10, n(100.0), 7)),
                "mixed" if count.is_none() => Ok(Dag::mixed(5, n(40.0), 11)),
                _ => anyhow::bail!(
                    "unknown shape {s:?}: wide, deep, layered or mixed (wide-N and deep-N for N steps)"
                ),
            }
        })
        .collect()
}

async fn probe() -> Result<serde_json::Value> {
    let store = hydra_testkit::NixStore::start()?;
    let mut connect = Vec::new();
    let mut query = Vec::new();
    for _ in 0..20 {
        let t = std::time::Instant::now();
        let mut c = hydra_nix::daemon::DaemonClient::connect(store.socket()).await?;
        connect.push(t.elapsed().as_secs_f64());
        let t = std::time::Instant::now();
        c.query_valid_paths(&["/nix/store/7rjj86a15146cq1d3qy068lml7n8ykzm-x".into()])
            .await?;
        query.push(t.elapsed().as_secs_f64());
    }
    let p = |v: &[f64]| report::ms(report::percentile(v, 50.0));
    report::table(
        "nix-daemon",
        &["connect p50 (ms)", "query p50 (ms)"],
        &[vec![p(&connect), p(&query)]],
    );
    Ok(serde_json::json!({"connect_ms_p50": report::percentile(&connect, 50.0) * 1e3}))
}

#[tokio::main]
async fn main() -> Result<()> {
    hydra_testkit::farm::init_tracing_quiet();
    let cli = Cli::parse();
    let steal_before = cpu::steal_ticks();
    let (name, mut value) = match cli.scenario {
        Scenario::Makespan {
            shapes: list,
            size,
            jobs,
            builders,
            repeat,
        } => {
            let dags = shapes(&list, size)?;
            let o = makespan::Options {
                jobs,
                builders,
                repeat: repeat.max(1),
            };
            ("makespan", makespan::run(&dags, &o).await?)
        }
        Scenario::Probe => ("probe", probe().await?),
        Scenario::Ingest { builds } => ("ingest", ingest::run(builds).await?),
        Scenario::Latency { samples, queued } => ("latency", latency::run(samples, queued).await?),
        Scenario::Transfer { big_mib, small } => ("transfer", transfer::run(big_mib, small).await?),
        Scenario::Scale {
            builders,
            steps,
            seconds,
        } => (
            "scale",
            scale::run(builders, steps, Duration::from_secs(seconds)).await?,
        ),
    };
    let stolen = cpu::stolen_percent(steal_before, cpu::steal_ticks());
    eprintln!(
        "[{name}] the hypervisor took {stolen:.1}% of the machine's CPU time meanwhile (steal)"
    );
    if let Some(fields) = value.as_object_mut() {
        fields.insert("steal_percent".into(), serde_json::json!(stolen));
    }
    report::save(name, &value)?;
    Ok(())
}
