//! The demo: a throwaway PostgreSQL, the queue runner with its own Nix
//! store, two builders with stores of their own, and a small real jobset
//! queued as Hydra's evaluator would queue it. Progress comes from the
//! runner's PostgreSQL notifications; the summary is read from the tables
//! Hydra's web interface reads.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use hydra_testkit::{BuilderSpec, Farm};
use sqlx::postgres::PgListener;

const JOBSET: &str = r#"with prelude; rec {
  hello = mkDrv { name = "hello"; script = "echo 'Hello, world' > $out"; };
  tools = mkDrv { name = "tools"; outputs = [ "out" "dev" ]; script = "mkdir -p $out/bin $dev; echo tool > $out/bin/tool; echo headers > $dev/h"; };
  docs = mkDrv { name = "docs"; requiredSystemFeatures = [ "big-parallel" ]; script = "mkdir -p $out; cat ${hello} > $out/index.txt"; };
  report = mkDrv {
    name = "report";
    script = ''
      mkdir -p $out/nix-support
      cat ${hello} ${tools}/bin/tool ${tools.dev}/h ${docs}/index.txt > $out/report.txt
      echo "file report $out/report.txt" > $out/nix-support/hydra-build-products
      echo "lines $(wc -l < $out/report.txt) lines" > $out/nix-support/hydra-metrics
      echo "report-1.0" > $out/nix-support/hydra-release-name
    '';
  };
  broken = mkDrv { name = "broken"; script = "echo 'this job fails on purpose'; exit 1"; };
  needs-broken = mkDrv { name = "needs-broken"; script = "cat ${broken} > $out"; };
  # Content-addressed: ca-app is resolved once ca-base is built.
  ca-base = mkCA { name = "ca-base"; script = "echo 'content-addressed' > $out"; };
  ca-app = mkCA { name = "ca-app"; script = "cat ${ca-base} ${hello} > $out"; };
}"#;
const JOBS: [&str; 8] = [
    "hello",
    "tools",
    "docs",
    "report",
    "broken",
    "needs-broken",
    "ca-base",
    "ca-app",
];

fn main() -> Result<()> {
    if std::env::var_os("RUST_LOG").is_none() {
        // SAFETY: no other thread exists yet.
        unsafe { std::env::set_var("RUST_LOG", "error") };
    }
    tokio::runtime::Runtime::new()?.block_on(demo())
}

async fn demo() -> Result<()> {
    let started = Instant::now();
    step("starting a throwaway PostgreSQL 15, the runner's Nix store and the queue runner");
    let mut farm = Farm::start(|_| {}).await.context("starting the runner")?;
    say(&format!(
        "runner serving builders on {}",
        farm.runner().addr
    ));

    step("starting two builders, each with a Nix store of its own (own mount namespace)");
    farm.add_builder(BuilderSpec::new("builder-a").max_jobs(2))
        .await?;
    farm.add_builder(BuilderSpec::new("builder-b").features(&["big-parallel"]))
        .await?;
    say("builder-a: 2 jobs; builder-b: 1 job, offers big-parallel");

    step("instantiating the jobset and queueing it as Hydra's evaluator does");
    let mut listener = PgListener::connect_with(&farm.db.pool).await?;
    listener
        .listen_all(["step_started", "step_finished", "build_finished"])
        .await?;
    let drvs = farm.runner_store.instantiate(JOBSET, &JOBS).await?;
    let ids = farm.queue(&drvs, |_| Default::default()).await?;
    for (job, id) in &ids {
        say(&format!("build {id:>2}  {job:<13} {}", drvs[job]));
    }

    step("building (progress from the runner's notifications)");
    follow(&farm, &mut listener, &ids).await?;

    step("summary, read from PostgreSQL");
    summary(&farm, &ids).await?;
    say(&format!("done in {:.1}s", started.elapsed().as_secs_f64()));
    Ok(())
}

/// Prints step and build events until every build is finished.
async fn follow(farm: &Farm, listener: &mut PgListener, ids: &BTreeMap<String, i32>) -> Result<()> {
    let total = ids.len();
    let job_of: BTreeMap<i32, &str> = ids.iter().map(|(j, i)| (*i, j.as_str())).collect();
    let mut done = 0;
    while done < total {
        let note = tokio::time::timeout(Duration::from_secs(300), listener.recv())
            .await
            .context("no progress for 5 minutes")??;
        let fields: Vec<&str> = note.payload().split('\t').collect();
        let build: i32 = fields[0].parse().unwrap_or(0);
        match note.channel() {
            "step_started" | "step_finished" => {
                let stepnr: i32 = fields.get(1).and_then(|s| s.parse().ok()).unwrap_or(0);
                let (drv, machine, status): (Option<String>, String, Option<i32>) = sqlx::query_as(
                    "select drvPath, machine, status from BuildSteps where build = $1 and stepnr = $2",
                )
                .bind(build)
                .bind(stepnr)
                .fetch_one(&farm.db.pool)
                .await?;
                let name = drv
                    .as_deref()
                    .and_then(|d| d.rsplit('/').next())
                    .map(|b| &b[33..])
                    .unwrap_or("?");
                match status {
                    None => say(&format!("  started   {name:<18} on {machine}")),
                    Some(s) => say(&format!(
                        "  finished  {name:<18} on {machine}: {}",
                        status_name(s)
                    )),
                }
            }
            _ => {
                for id in fields.iter().filter_map(|f| f.parse::<i32>().ok()) {
                    done += 1;
                    let job = job_of.get(&id).copied().unwrap_or("?");
                    say(&format!(
                        "[{done}/{total} builds] build {id} ({job}) finished"
                    ));
                }
            }
        }
    }
    Ok(())
}

/// id, job, buildStatus, releaseName, closureSize
type SummaryRow = (i32, String, Option<i32>, Option<String>, Option<i64>);

async fn summary(farm: &Farm, ids: &BTreeMap<String, i32>) -> Result<()> {
    let rows: Vec<SummaryRow> = sqlx::query_as(
        "select id, job, buildStatus, releaseName, closureSize from Builds where id = any($1) order by id",
    )
    .bind(ids.values().copied().collect::<Vec<_>>())
    .fetch_all(&farm.db.pool)
    .await?;
    say(&format!(
        "{:>5}  {:<13} {:<20} {:>12}  {}",
        "build", "job", "status", "closure", "release"
    ));
    for (id, job, status, release, closure) in rows {
        say(&format!(
            "{id:>5}  {job:<13} {:<20} {:>10} B  {}",
            status_name(status.unwrap_or(-1)),
            closure.unwrap_or(0),
            release.unwrap_or_default()
        ));
    }
    let steps: Vec<(String, i64)> =
        sqlx::query_as("select machine, count(*) from BuildSteps where status = 0 group by machine order by machine")
            .fetch_all(&farm.db.pool)
            .await?;
    for (machine, n) in steps {
        say(&format!("{machine} built {n} steps successfully"));
    }
    let products: Vec<(String, String, Option<i64>)> =
        sqlx::query_as("select type, path, fileSize from BuildProducts where build = $1")
            .bind(ids["report"])
            .fetch_all(&farm.db.pool)
            .await?;
    for (ty, path, size) in products {
        say(&format!(
            "report product: {ty} {path} ({} bytes)",
            size.unwrap_or(0)
        ));
    }
    let (out,): (String,) =
        sqlx::query_as("select path from BuildOutputs where build = $1 and name = 'out'")
            .bind(ids["report"])
            .fetch_one(&farm.db.pool)
            .await?;
    let text = farm
        .runner_store
        .read_store_file(&format!("{out}/report.txt"))
        .await?;
    say(&format!(
        "report.txt in the runner's store: {:?}",
        String::from_utf8_lossy(&text)
    ));
    Ok(())
}

fn status_name(code: i32) -> &'static str {
    match code {
        0 => "succeeded",
        1 => "failed",
        2 => "dependency failed",
        3 => "aborted",
        4 => "cancelled",
        6 => "failed with output",
        7 => "timed out",
        8 => "cached failure",
        9 => "unsupported",
        10 => "log limit exceeded",
        11 => "output limit exceeded",
        12 => "not deterministic",
        13 => "resolved",
        _ => "?",
    }
}

fn step(msg: &str) {
    println!("\n\x1b[1m==> {msg}\x1b[0m");
}

fn say(msg: &str) {
    println!("    {msg}");
}
