//! The demo: a throwaway PostgreSQL, a runner store and two builder stores,
//! and a small real jobset (plain, multi-output, CA, input-addressed on CA)
//! queued in the database and built across the builders.
//!
//! Until the queue runner exists (issue #3), the demo drives the foundation
//! crates directly: it walks the step graph in order, resolves CA steps,
//! sends each builder the inputs it lacks as NARs, builds the resolved
//! derivation there through the worker protocol, and brings the outputs
//! back, verified, into the runner's store.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use anyhow::{Context, Result, bail};
use hydra_nix::daemon::{BuildMode, DaemonClient, LogLine};
use hydra_nix::{Derivation, StoreDir, StorePath};
use hydra_testkit::{NixStore, PgCluster};

const JOBSET: &str = r#"with prelude; rec {
  hello = mkDrv { name = "hello"; script = "echo 'Hello, world' > $out"; };
  greeting = mkCA { name = "greeting"; script = "echo greeting from a CA derivation > $out"; };
  uses-greeting = mkDrv { name = "uses-greeting"; script = "cat ${greeting} > $out; echo and an input-addressed one >> $out"; };
  tools = mkDrv { name = "tools"; outputs = [ "out" "dev" ]; script = "mkdir -p $out/bin $dev; echo tool > $out/bin/tool; echo headers > $dev/h"; };
  report = mkCA { name = "report"; script = "cat ${hello} ${uses-greeting} ${tools}/bin/tool ${tools.dev}/h > $out"; };
}"#;
const JOBS: [&str; 5] = ["hello", "greeting", "uses-greeting", "tools", "report"];

type OutputMap = BTreeMap<(StorePath, String), StorePath>;

#[tokio::main]
async fn main() -> Result<()> {
    let started = Instant::now();
    let dir = StoreDir::default();
    step("starting a throwaway PostgreSQL 15 cluster");
    let pg = PgCluster::start().context("starting PostgreSQL")?;
    let pool = hydra_db::connect(&pg.url("postgres"), 4).await?;
    let report = hydra_db::migrate(&pool).await?;
    say(&format!("schema applied (migrations {:?})", report.applied));

    step(
        "starting three Nix stores: the runner's and two builders', each in its own mount namespace",
    );
    let runner = NixStore::start()?;
    let builders = [
        ("builder-a", NixStore::start()?),
        ("builder-b", NixStore::start()?),
    ];
    let mut rc = DaemonClient::connect(runner.socket()).await?;
    say(&format!(
        "nix-daemon {} speaks protocol 1.{}",
        rc.daemon_version().unwrap_or("?"),
        rc.protocol_minor()
    ));

    step("instantiating the jobset into the runner's store and queueing it in PostgreSQL");
    let drvs = runner.instantiate(JOBSET, &JOBS).await?;
    queue_builds(&pool, &drvs).await?;
    for (job, drv) in &drvs {
        say(&format!("queued {job:<14} {drv}"));
    }

    step("building the step graph in order across the builders");
    let order = topological_steps(&mut rc, &dir, drvs.values()).await?;
    let mut outputs = OutputMap::new();
    for (i, (path, drv)) in order.iter().enumerate() {
        let (name, store) = &builders[i % builders.len()];
        let t = Instant::now();
        let built = build_step(&dir, &mut rc, store, path, drv, &mut outputs).await?;
        say(&format!(
            "[{}/{}] {:<18} on {name} in {:>4} ms -> {}",
            i + 1,
            order.len(),
            drv.name()?,
            t.elapsed().as_millis(),
            built.join(", ")
        ));
    }

    step("summary");
    let queued: i64 = sqlx::query_scalar("select count(*) from Builds where finished = 0")
        .fetch_one(&pool)
        .await?;
    for (job, drv) in &drvs {
        let p = dir.parse_path(drv)?;
        let out = &outputs[&(p, "out".to_owned())];
        let text = runner
            .read_store_file(&dir.display(out))
            .await
            .unwrap_or_default();
        let first = String::from_utf8_lossy(&text)
            .lines()
            .next()
            .unwrap_or("(directory)")
            .to_owned();
        say(&format!("{job:<14} {}  {first}", dir.display(out)));
    }
    say(&format!(
        "{} steps built on 2 builders with separate stores in {:.1}s; {queued} builds wait in PostgreSQL for the \
         queue runner (issue #3), which will dispatch and record them",
        order.len(),
        started.elapsed().as_secs_f64()
    ));
    Ok(())
}

fn step(msg: &str) {
    println!("\n\x1b[1m==> {msg}\x1b[0m");
}

fn say(msg: &str) {
    println!("    {msg}");
}

async fn queue_builds(pool: &sqlx::PgPool, drvs: &BTreeMap<String, String>) -> Result<()> {
    sqlx::raw_sql(
        "insert into Users (userName, emailAddress, password) values ('demo', 'demo@localhost', '');
         insert into Projects (name, displayName, owner) values ('demo', 'Demo', 'demo');
         insert into Jobsets (name, project) values ('hello', 'demo');",
    )
    .execute(pool)
    .await?;
    for (job, drv) in drvs {
        sqlx::query(
            "insert into Builds (finished, timestamp, jobset_id, job, drvPath, system)
             values (0, extract(epoch from now())::int, (select id from Jobsets where name = 'hello'), $1, $2, 'x86_64-linux')",
        )
        .bind(job)
        .bind(drv)
        .execute(pool)
        .await?;
    }
    sqlx::query("notify builds_added").execute(pool).await?;
    Ok(())
}

/// Every derivation in the closure of `roots`, dependencies first.
async fn topological_steps<'a>(
    rc: &mut DaemonClient,
    dir: &StoreDir,
    roots: impl Iterator<Item = &'a String>,
) -> Result<Vec<(StorePath, Derivation)>> {
    let mut loaded: BTreeMap<StorePath, Derivation> = BTreeMap::new();
    let mut todo: Vec<StorePath> = roots.map(|r| dir.parse_path(r)).collect::<Result<_, _>>()?;
    while let Some(p) = todo.pop() {
        if loaded.contains_key(&p) {
            continue;
        }
        let drv = Derivation::parse(dir, &rc.read_store_file(&dir.display(&p)).await?)?;
        todo.extend(drv.input_drvs.keys().cloned());
        loaded.insert(p, drv);
    }
    let mut order = Vec::new();
    let mut done = BTreeSet::new();
    while order.len() < loaded.len() {
        for (p, drv) in &loaded {
            if !done.contains(p) && drv.input_drvs.keys().all(|i| done.contains(i)) {
                done.insert(p.clone());
                order.push((p.clone(), drv.clone()));
            }
        }
    }
    Ok(order)
}

/// Builds one step on a builder; returns its output paths.
async fn build_step(
    dir: &StoreDir,
    rc: &mut DaemonClient,
    builder: &NixStore,
    path: &StorePath,
    drv: &Derivation,
    outputs: &mut OutputMap,
) -> Result<Vec<String>> {
    // Resolve CA dependents against the outputs recorded so far; otherwise
    // hand the builder the inputs' outputs as plain sources.
    let (basic_path, basic) = if drv.needs_resolution()? {
        let resolved = drv.resolve(dir, outputs)?;
        (resolved.drv_path(dir)?, resolved)
    } else {
        let mut b = Derivation {
            input_drvs: BTreeMap::new(),
            ..drv.clone()
        };
        for (input, outs) in &drv.input_drvs {
            for o in outs {
                b.input_srcs
                    .insert(outputs[&(input.clone(), o.clone())].clone());
            }
        }
        (path.clone(), b)
    };
    let mut bc = DaemonClient::connect(builder.socket()).await?;
    let inputs: Vec<String> = basic.input_srcs.iter().map(|p| dir.display(p)).collect();
    copy_closure(rc, &mut bc, &inputs).await?;
    let mut log = Vec::new();
    let result = bc
        .build_derivation(
            &dir.display(&basic_path),
            &basic,
            BuildMode::Normal,
            &mut |l| {
                if let LogLine::Build(line) = l {
                    log.push(line)
                }
            },
        )
        .await?;
    if !result.status.is_success() {
        bail!(
            "{} failed on the builder: {}\n{}",
            path,
            result.error_msg,
            log.join("\n")
        );
    }
    let mut built = Vec::new();
    for (name, out) in &basic.outputs {
        let out_path = match out.path() {
            Some(p) => p.clone(),
            None => StorePath::from_base_name(&result.built_outputs[name].out_path)?,
        };
        copy_closure(&mut bc, rc, &[dir.display(&out_path)]).await?;
        outputs.insert((path.clone(), name.clone()), out_path.clone());
        built.push(format!("{name}={}", out_path.name()));
    }
    Ok(built)
}

/// Copies the closure of `paths` from one store to another, references
/// first, each NAR verified against its recorded hash before import.
async fn copy_closure(
    from: &mut DaemonClient,
    to: &mut DaemonClient,
    paths: &[String],
) -> Result<()> {
    let mut missing = from.query_closure(paths).await?;
    let all: Vec<String> = missing.keys().cloned().collect();
    for valid in to.query_valid_paths(&all).await? {
        missing.remove(&valid);
    }
    while !missing.is_empty() {
        // A path goes once every path it refers to is there.
        let ready: Vec<String> = missing
            .iter()
            .filter(|(p, info)| {
                info.references
                    .iter()
                    .all(|r| r == *p || !missing.contains_key(r))
            })
            .map(|(p, _)| p.clone())
            .collect();
        if ready.is_empty() {
            bail!("reference cycle among {:?}", missing.keys());
        }
        for p in ready {
            let info = missing.remove(&p).expect("ready paths are missing");
            let mut nar = Vec::new();
            from.export_nar(&info, &mut nar).await?;
            hydra_nix::nar::verify_nar(&nar, &info.nar_hash, info.nar_size)?;
            to.add_to_store_nar(&info, &mut nar.as_slice(), false, true)
                .await?;
        }
    }
    Ok(())
}
