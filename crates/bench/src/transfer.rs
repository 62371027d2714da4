//! Transfer throughput between the runner and a real builder: one large
//! output (builder -> runner, then runner -> another builder as an input)
//! and many small inputs, each beside `cat` of the same bytes through a
//! pipe (the floor).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use hydra_testkit::{BuilderSpec, Farm};
use serde_json::{Value, json};

use crate::report::table;

pub async fn run(big_mib: u64, small: usize) -> Result<Value> {
    let mut farm = Farm::start(|c| c.max_output_size = (big_mib + 64) << 20).await?;
    let expr = format!(
        r#"with prelude; rec {{
  big = mkDrv {{ name = "big"; script = "head -c {big_mib}M /dev/zero > $out"; }};
  use-big = mkDrv {{ name = "use-big"; script = "wc -c < ${{big}} > $out"; }};
  srcs = map (i: builtins.toFile "small${{toString i}}" "small file ${{toString i}}\n") (builtins.genList (x: x) {small});
  use-small = mkDrv {{ name = "use-small"; paths = toString srcs; passAsFile = [ "paths" ]; script = "wc -w < $pathsPath > $out"; }};
}}"#
    );
    let drvs = farm
        .runner_store
        .instantiate(&expr, &["big", "use-big", "use-small"])
        .await?;
    farm.add_builder(BuilderSpec::new("maker")).await?;
    eprintln!("[transfer] building a {big_mib} MiB output");
    build(&farm, &drvs, "big").await?;
    // Another machine, which has none of it, builds the consumers.
    farm.builders[0].stop();
    farm.add_builder(BuilderSpec::new("consumer")).await?;
    build(&farm, &drvs, "use-big").await?;
    eprintln!("[transfer] {small} small inputs");
    build(&farm, &drvs, "use-small").await?;

    let big_bytes = (big_mib << 20) as f64;
    let upload = phase(&farm, &drvs["big"], "receiving-outputs", "finished").await?;
    let fetch_big = phase(&farm, &drvs["use-big"], "sending-inputs", "building").await?;
    let fetch_small = phase(&farm, &drvs["use-small"], "sending-inputs", "building").await?;
    let small_bytes = export_size(&farm, &drvs["use-small"]).await?;
    let pipe_big = pipe_seconds(big_bytes as u64)?;
    let pipe_small = pipe_seconds(small_bytes)?;
    let mib = |bytes: f64, s: f64| bytes / (1 << 20) as f64 / s;
    let rows = vec![
        vec![
            format!("{big_mib} MiB output, builder -> runner"),
            format!("{upload:.2}"),
            format!("{:.0}", mib(big_bytes, upload)),
            format!("{:.0}", mib(big_bytes, pipe_big)),
        ],
        vec![
            format!("{big_mib} MiB input, runner -> builder"),
            format!("{fetch_big:.2}"),
            format!("{:.0}", mib(big_bytes, fetch_big)),
            format!("{:.0}", mib(big_bytes, pipe_big)),
        ],
        vec![
            format!(
                "{small} small inputs ({:.1} MiB)",
                small_bytes as f64 / (1 << 20) as f64
            ),
            format!("{fetch_small:.2}"),
            format!("{:.1}", mib(small_bytes as f64, fetch_small)),
            format!("{:.0}", mib(small_bytes as f64, pipe_small)),
        ],
    ];
    table(
        "transfer (MiB/s; the floor is cat of the same bytes through a pipe)",
        &["what", "seconds", "MiB/s", "cat | cat MiB/s"],
        &rows,
    );
    Ok(json!({
        "scenario": "transfer",
        "big_mib": big_mib, "small_paths": small, "small_bytes": small_bytes,
        "upload_seconds": upload, "fetch_big_seconds": fetch_big, "fetch_small_seconds": fetch_small,
        "small_paths_per_second": small as f64 / fetch_small,
        "pipe_big_seconds": pipe_big, "pipe_small_seconds": pipe_small,
    }))
}

async fn build(farm: &Farm, drvs: &BTreeMap<String, String>, job: &str) -> Result<()> {
    let one = [(job.to_owned(), drvs[job].clone())].into();
    let ids = farm.queue(&one, |_| Default::default()).await?;
    farm.wait_finished(ids.values().copied(), Duration::from_secs(3600))
        .await?;
    let status: Option<i32> = sqlx::query_scalar("select buildStatus from Builds where id = $1")
        .bind(ids[job])
        .fetch_one(&farm.db.pool)
        .await?;
    if status != Some(0) {
        bail!("{job} ended with status {status:?}");
    }
    Ok(())
}

/// Seconds between two marks of `drv`'s step in the event log (`from`,
/// `to`: a progress phase, or "finished").
async fn phase(farm: &Farm, drv: &str, from: &str, to: &str) -> Result<f64> {
    let at = |mark: &str| {
        let (kind, detail) = match mark {
            "finished" => ("step_finished", None),
            phase => ("step_progress", Some(phase.to_owned())),
        };
        let pool = farm.db.pool.clone();
        let drv = drv.to_owned();
        async move {
            sqlx::query_scalar::<_, i64>(
                "select at_ms from hqr_events where kind = $1 and drv_path = $2
                   and ($3::text is null or detail = $3) order by id limit 1",
            )
            .bind(kind)
            .bind(drv)
            .bind(detail)
            .fetch_one(&pool)
            .await
        }
    };
    Ok((at(to).await? - at(from).await?) as f64 / 1000.0)
}

/// The bytes of the NARs of `drv`'s input sources (what is sent).
async fn export_size(farm: &Farm, drv: &str) -> Result<u64> {
    let out = farm
        .runner_store
        .command("sh")
        .args([
            "-c",
            &format!("nix-store --export $(nix-store --query --references {drv} | grep -v '\\.drv$') | wc -c"),
        ])
        .output()
        .await?;
    Ok(String::from_utf8_lossy(&out.stdout).trim().parse()?)
}

/// Seconds for `cat file | cat > /dev/null` over `bytes` bytes.
fn pipe_seconds(bytes: u64) -> Result<f64> {
    let dir = tempfile::tempdir()?;
    let file = dir.path().join("bytes");
    let f = std::fs::File::create(&file)?;
    f.set_len(bytes)?;
    // Read it once so the page cache holds it, as the store's file is.
    std::process::Command::new("cat")
        .arg(&file)
        .stdout(std::process::Stdio::null())
        .status()?;
    let began = Instant::now();
    let status = std::process::Command::new("sh")
        .args(["-c", "cat \"$0\" | cat > /dev/null"])
        .arg(&file)
        .status()?;
    if !status.success() {
        bail!("cat | cat failed");
    }
    Ok(began.elapsed().as_secs_f64())
}
