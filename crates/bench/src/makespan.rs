//! Makespan against the floor: the same DAG built by local Nix
//! (`nix-store --realise -j N` in a fresh store) and through PostgreSQL,
//! the runner and builders with separate stores and the same total slots,
//! in one run. Per-step overheads come from the event log's timestamps.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use hydra_testkit::{BuilderSpec, Farm, NixStore};
use serde_json::{Value, json};

use crate::cpu;
use crate::dag::Dag;
use crate::report::{ms, percentile, table};

pub struct Options {
    pub jobs: u32,
    pub builders: u32,
    /// Pairs of runs of each shape.
    pub repeat: u32,
}

/// One pair: local Nix, then the farm, on freshly salted derivations.
struct Pair {
    local: f64,
    local_cpu: cpu::Spent,
    farm: f64,
    over: Overheads,
    farm_cpu: cpu::Spent,
}

impl Pair {
    fn ratio(&self) -> f64 {
        self.farm / self.local
    }
}

async fn pair(dag: &Dag, o: &Options, n: u32) -> Result<Pair> {
    let salt = uuid_like();
    let of = if o.repeat > 1 {
        format!(" (pair {n} of {})", o.repeat)
    } else {
        String::new()
    };
    eprintln!(
        "[makespan] {}{of}: local nix-store --realise -j {}",
        dag.shape, o.jobs
    );
    let (local, local_cpu) = local_nix(dag, &salt, o.jobs).await?;
    eprintln!(
        "[makespan] {}{of}: the farm ({} builders, {} slots in all)",
        dag.shape, o.builders, o.jobs
    );
    let (farm, over, farm_cpu) = farm(dag, &salt, o).await?;
    Ok(Pair {
        local,
        local_cpu,
        farm,
        over,
        farm_cpu,
    })
}

pub async fn run(dags: &[Dag], o: &Options) -> Result<Value> {
    let mut results = Vec::new();
    let mut rows = Vec::new();
    let mut cpu_rows = Vec::new();
    let mut end_rows = Vec::new();
    for dag in dags {
        let mut pairs = Vec::new();
        for n in 1..=o.repeat {
            pairs.push(pair(dag, o, n).await?);
        }
        let ratios: Vec<f64> = pairs.iter().map(Pair::ratio).collect();
        pairs.sort_by(|a, b| a.ratio().total_cmp(&b.ratio()));
        let (lowest, highest) = (pairs[0].ratio(), pairs[pairs.len() - 1].ratio());
        let Pair {
            local,
            local_cpu,
            farm,
            over,
            farm_cpu,
        } = pairs.swap_remove(pairs.len() / 2);
        let ratio = farm / local;
        end_rows.push(vec![
            dag.shape.clone(),
            ms(over.phases.to_loaded),
            ms(over.phases.to_first_dispatch),
            ms(over.phases.last_built_to_top),
            ms(over.phases.top_inputs),
            ms(over.phases.top_fetch),
            ms(over.phases.top_build),
            ms(over.phases.top_outputs),
            ms(over.phases.top_done),
        ]);
        let steps = dag.nodes.len() as f64;
        let per_step = |s: f64| s * 1000.0 / steps;
        let own = per_step(farm_cpu.machine - local_cpu.machine);
        cpu_rows.push(
            [
                dag.shape.clone(),
                format!("{:.1}", per_step(local_cpu.machine)),
                format!("{:.1}", per_step(farm_cpu.machine)),
                format!("{own:.1}"),
            ]
            .into_iter()
            .chain(
                farm_cpu
                    .by_kind
                    .iter()
                    .map(|(_, secs)| format!("{:.1}", per_step(*secs))),
            )
            .collect(),
        );
        let kinds: serde_json::Map<String, Value> = farm_cpu
            .by_kind
            .iter()
            .map(|(k, secs)| ((*k).to_owned(), json!(per_step(*secs))))
            .collect();
        rows.push(vec![
            dag.shape.clone(),
            dag.nodes.len().to_string(),
            format!("{local:.2}"),
            format!("{farm:.2}"),
            format!("{ratio:.2}"),
            format!("{lowest:.2}-{highest:.2}"),
            ms(over.dispatch_to_start_p50),
            ms(over.input_transfer_p50),
            ms(over.completion_to_next_p50),
            ms(over.built_to_next_p50),
            ms(over.build_p50),
            ms(over.outputs_p50),
        ]);
        results.push(json!({
            "shape": dag.shape, "steps": dag.nodes.len() + 1, "jobs": o.jobs,
            "builders": o.builders, "local_seconds": local, "farm_seconds": farm,
            "ratio": ratio, "ratios_of_pairs": ratios, "overheads_ms": over.to_json(),
            "cpu_ms_per_step": {
                "local": per_step(local_cpu.machine), "farm": per_step(farm_cpu.machine),
                "farm_own": own, "farm_by_kind": kinds,
            },
        }));
    }
    table(
        "makespan: local Nix vs the farm (seconds; the pair of the median ratio, and the \
         range of all pairs; overheads are medians in ms)",
        &[
            "shape",
            "steps",
            "local",
            "farm",
            "farm/local",
            "range",
            "dispatch->start",
            "inputs",
            "done->next",
            "built->next",
            "build",
            "outputs+done",
        ],
        &rows,
    );
    table(
        "makespan: the farm's run's ends (ms, the median pair): queued -> loaded, -> first dispatch; \
         last node built -> `all` dispatched; `all`'s inputs (dispatch -> building, of which the fetch); `all`'s \
         build, outputs (-> step finished) and the build's completion",
        &[
            "shape",
            "loaded",
            "first dispatch",
            "last built->all",
            "all's inputs",
            "fetch",
            "all's build",
            "outputs",
            "completion",
        ],
        &end_rows,
    );
    let mut header = vec!["shape", "local", "farm", "farm's own"];
    header.extend(cpu::KINDS);
    table(
        "makespan: CPU per step (ms of all cores; farm's own = farm - local, the builds \
         excluded; by process: those alive for the whole run)",
        &header,
        &cpu_rows,
    );
    Ok(json!({ "scenario": "makespan", "results": results }))
}

fn uuid_like() -> String {
    format!("bench{:x}", rand::random::<u64>())
}

async fn local_nix(dag: &Dag, salt: &str, jobs: u32) -> Result<(f64, cpu::Spent)> {
    let store = NixStore::start()?;
    let drvs = store
        .instantiate_salted(&dag.expression(), &["all"], salt)
        .await?;
    let cpu_before = cpu::Sample::now();
    let began = Instant::now();
    store
        .run(
            "nix-store",
            &[
                "--realise",
                "--quiet",
                "-j",
                &jobs.to_string(),
                &drvs["all"],
            ],
        )
        .await?;
    let took = began.elapsed().as_secs_f64();
    Ok((took, cpu_before.until(&cpu::Sample::now())))
}

async fn farm(dag: &Dag, salt: &str, o: &Options) -> Result<(f64, Overheads, cpu::Spent)> {
    let mut farm = Farm::start(|_| {}).await?;
    let per = (o.jobs / o.builders).max(1);
    for b in 0..o.builders {
        farm.add_builder(BuilderSpec::new(&format!("bench-{b}")).max_jobs(per))
            .await?;
    }
    let attrs = dag.attrs();
    let attrs: Vec<&str> = attrs.iter().map(String::as_str).collect();
    let drvs = farm
        .runner_store
        .instantiate_salted(&dag.expression(), &attrs, salt)
        .await?;
    let top = [("all".to_owned(), drvs["all"].clone())].into();
    let cpu_before = cpu::Sample::now();
    let began = Instant::now();
    let began_ms = epoch_ms();
    let ids = farm.queue(&top, |_| Default::default()).await?;
    farm.wait_finished(ids.values().copied(), Duration::from_secs(3600))
        .await?;
    let makespan = began.elapsed().as_secs_f64();
    let spent = cpu_before.until(&cpu::Sample::now());
    let status: Option<i32> = sqlx::query_scalar("select buildStatus from Builds where id = $1")
        .bind(ids["all"])
        .fetch_one(&farm.db.pool)
        .await?;
    if status != Some(0) {
        bail!(
            "the farm's build of {} ended with status {status:?}",
            dag.shape
        );
    }
    let mut over = overheads(&farm, dag, &drvs).await?;
    over.phases = phases(&farm, dag, &drvs, began_ms).await?;
    Ok((makespan, over, spent))
}

#[derive(Debug, Default)]
struct Overheads {
    dispatch_to_start_p50: f64,
    dispatch_to_start_p90: f64,
    input_transfer_p50: f64,
    input_transfer_p90: f64,
    completion_to_next_p50: f64,
    completion_to_next_p90: f64,
    /// The last input built (its builder receiving outputs) to the step's
    /// dispatch: what a chain waits when dependents run ahead.
    built_to_next_p50: f64,
    /// The build itself (building -> receiving outputs).
    build_p50: f64,
    /// Output upload and the completion (receiving outputs -> finished).
    outputs_p50: f64,
    /// Dispatch to the builder's first progress message.
    job_sent_p50: f64,
    /// Where the run's fixed costs go, in ms (not per step).
    phases: Phases,
}

/// The run's ends: what it costs before the first step starts and after
/// the last of the DAG's own steps is built, when `all` (which needs every
/// node) fetches the inputs its builder lacks, builds and completes.
#[derive(Debug, Default)]
struct Phases {
    /// The build inserted -> the runner's first dispatch.
    to_first_dispatch: f64,
    /// The build inserted -> loaded (its `queued` event).
    to_loaded: f64,
    /// The last node built (its builder receiving outputs) -> `all` dispatched.
    last_built_to_top: f64,
    /// `all`: dispatch -> building (mostly its inputs' transfer).
    top_inputs: f64,
    /// `all`: the part of that from `sending-inputs` (the fetch itself).
    top_fetch: f64,
    /// `all`: building -> its builder receiving outputs.
    top_build: f64,
    /// `all`: receiving outputs -> its step finished.
    top_outputs: f64,
    /// `all`'s step finished -> the build completed.
    top_done: f64,
}

impl Overheads {
    fn to_json(&self) -> Value {
        let m = |s: f64| (s * 1000.0 * 10.0).round() / 10.0;
        json!({
            "dispatch_to_start_p50": m(self.dispatch_to_start_p50),
            "dispatch_to_start_p90": m(self.dispatch_to_start_p90),
            "input_transfer_p50": m(self.input_transfer_p50),
            "input_transfer_p90": m(self.input_transfer_p90),
            "completion_to_next_dispatch_p50": m(self.completion_to_next_p50),
            "completion_to_next_dispatch_p90": m(self.completion_to_next_p90),
            "built_to_next_dispatch_p50": m(self.built_to_next_p50),
            "build_p50": m(self.build_p50),
            "outputs_and_completion_p50": m(self.outputs_p50),
            "dispatch_to_builder_ack_p50": m(self.job_sent_p50),
            "phases": {
                "to_first_dispatch": m(self.phases.to_first_dispatch),
                "to_loaded": m(self.phases.to_loaded),
                "last_built_to_top_dispatch": m(self.phases.last_built_to_top),
                "top_inputs": m(self.phases.top_inputs),
                "top_fetch": m(self.phases.top_fetch),
                "top_build": m(self.phases.top_build),
                "top_outputs": m(self.phases.top_outputs),
                "top_done": m(self.phases.top_done),
            },
        })
    }
}

fn epoch_ms() -> i64 {
    let since = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    since.as_millis() as i64
}

/// The run's fixed costs from the event log (whose times are the
/// database's clock, on this machine the bench's too).
async fn phases(
    farm: &Farm,
    dag: &Dag,
    drvs: &std::collections::BTreeMap<String, String>,
    began_ms: i64,
) -> Result<Phases> {
    let rows: Vec<(String, Option<String>, Option<String>, i64)> =
        sqlx::query_as("select kind, drv_path, detail, at_ms from hqr_events order by id")
            .fetch_all(&farm.db.pool)
            .await?;
    let first = |kind: &str, drv: Option<&str>, detail: Option<&str>| {
        rows.iter()
            .filter(|(k, d, det, _)| {
                k == kind
                    && drv.is_none_or(|x| d.as_deref() == Some(x))
                    && detail.is_none_or(|x| det.as_deref() == Some(x))
            })
            .map(|r| r.3)
            .min()
    };
    let top = drvs["all"].as_str();
    let last_built = (0..dag.nodes.len())
        .filter_map(|i| {
            first(
                "step_progress",
                Some(&drvs[&format!("n{i}")]),
                Some("receiving-outputs"),
            )
        })
        .max();
    let secs = |a: Option<i64>, b: Option<i64>| match (a, b) {
        (Some(a), Some(b)) => (b - a) as f64 / 1000.0,
        _ => f64::NAN,
    };
    let top_started = first("step_started", Some(top), None);
    let top_building = first("step_progress", Some(top), Some("building"));
    let top_received = first("step_progress", Some(top), Some("receiving-outputs"));
    let top_finished = first("step_finished", Some(top), None);
    let done = first("completed", None, None);
    Ok(Phases {
        to_first_dispatch: secs(Some(began_ms), first("step_started", None, None)),
        to_loaded: secs(Some(began_ms), first("queued", None, None)),
        last_built_to_top: secs(last_built, top_started),
        top_inputs: secs(top_started, top_building),
        top_fetch: secs(
            first("step_progress", Some(top), Some("sending-inputs")),
            top_building,
        ),
        top_build: secs(top_building, top_received),
        top_outputs: secs(top_received, top_finished),
        top_done: secs(top_finished, done),
    })
}

/// Per step, from the event log: dispatch (`step_started`) to the builder
/// building (`building`), the input transfer (`sending-inputs` to
/// `building`), and the last input's completion to the step's dispatch.
async fn overheads(
    farm: &Farm,
    dag: &Dag,
    drvs: &std::collections::BTreeMap<String, String>,
) -> Result<Overheads> {
    let rows: Vec<(String, Option<String>, Option<String>, i64)> = sqlx::query_as(
        "select kind, drv_path, detail, at_ms from hqr_events
          where kind in ('step_started', 'step_progress', 'step_finished') order by id",
    )
    .fetch_all(&farm.db.pool)
    .await?;
    let mut at: HashMap<(String, &str), i64> = HashMap::new();
    for (kind, drv, detail, t) in &rows {
        let Some(drv) = drv else { continue };
        let what: &str = match (kind.as_str(), detail.as_deref()) {
            ("step_started", _) => "started",
            ("step_finished", _) => "finished",
            (_, Some("sending-inputs")) => "sending",
            (_, Some("building")) => "building",
            (_, Some("preparing")) => "preparing",
            (_, Some("receiving-outputs")) => "receiving",
            _ => continue,
        };
        at.entry((drv.clone(), what)).or_insert(*t);
    }
    let get = |drv: &str, what: &str| at.get(&(drv.to_owned(), what)).copied();
    let mut to_start = Vec::new();
    let mut inputs = Vec::new();
    let mut to_next = Vec::new();
    let mut built_to_next = Vec::new();
    let mut building = Vec::new();
    let mut outputs = Vec::new();
    let mut preparing = Vec::new();
    for (i, node) in dag.nodes.iter().enumerate() {
        let drv = &drvs[&format!("n{i}")];
        if let (Some(s), Some(b)) = (get(drv, "started"), get(drv, "building")) {
            to_start.push((b - s) as f64 / 1000.0);
            if let Some(send) = get(drv, "sending") {
                inputs.push((b - send) as f64 / 1000.0);
            }
        }
        let span = |a: &str, b: &str| match (get(drv, a), get(drv, b)) {
            (Some(x), Some(y)) => Some((y - x) as f64 / 1000.0),
            _ => None,
        };
        building.extend(span("building", "receiving"));
        outputs.extend(span("receiving", "finished"));
        preparing.extend(span("started", "preparing"));
        // From the last input reaching `what` to this step's dispatch.
        let after_inputs = |what: &str| {
            let last = node
                .deps
                .iter()
                .filter_map(|d| get(&drvs[&format!("n{d}")], what))
                .max()?;
            Some((get(drv, "started")? - last) as f64 / 1000.0)
        };
        to_next.extend(after_inputs("finished"));
        built_to_next.extend(after_inputs("receiving"));
    }
    Ok(Overheads {
        dispatch_to_start_p50: percentile(&to_start, 50.0),
        dispatch_to_start_p90: percentile(&to_start, 90.0),
        input_transfer_p50: percentile(&inputs, 50.0),
        input_transfer_p90: percentile(&inputs, 90.0),
        completion_to_next_p50: percentile(&to_next, 50.0),
        completion_to_next_p90: percentile(&to_next, 90.0),
        built_to_next_p50: percentile(&built_to_next, 50.0),
        build_p50: percentile(&building, 50.0),
        outputs_p50: percentile(&outputs, 50.0),
        job_sent_p50: percentile(&preparing, 50.0),
        phases: Phases::default(),
    })
}
