//! Reading one build's derivation closure from the runner's store into a
//! [`LoadPlan`]: the steps it needs that the graph does not have yet.

use std::collections::{HashMap, HashSet};

use hydra_nix::StorePath;
use hydra_nix::daemon::DaemonClient;

use crate::graph::{LoadPlan, NewStep};
use crate::realisations;
use crate::store::{StoreError, Validity};
use crate::{Fatal, Shared};

/// What loading found for a build.
#[derive(Debug)]
pub enum Planned {
    /// Every output of the top-level derivation is valid: a cached build.
    Cached,
    /// Every output of the top-level derivation is in a destination cache,
    /// though not in the runner's store: a cached build too.
    InDestination {
        outputs: Vec<(String, String)>,
        size: u64,
        closure_size: u64,
    },
    /// A step's outputs failed before (`FailedPaths`).
    CachedFailure {
        drv: StorePath,
        /// Its platform and outputs, for the cached-failure step row.
        system: String,
        outputs: Vec<(String, Option<String>)>,
    },
    /// The build's `.drv` (or one it needs) is not in the store, or unreadable.
    Unloadable {
        reason: String,
    },
    Steps(LoadPlan),
}

/// A new step's platform and outputs (name -> path, if known).
type StepRow = (String, Vec<(String, Option<String>)>);

/// [`plan_all`] for one build.
pub async fn plan(
    shared: &Shared,
    client: &mut DaemonClient,
    top: &StorePath,
) -> Result<Planned, Fatal> {
    let mut all = plan_all(shared, client, std::slice::from_ref(top)).await?;
    Ok(all.pop().expect("one plan per build"))
}

/// One build's walk of its closure.
struct Walk<'a> {
    top: &'a StorePath,
    plan: LoadPlan,
    seen: HashSet<StorePath>,
    /// Derivations to read at the next level.
    todo: Vec<StorePath>,
    inputs_of: HashMap<StorePath, Vec<StorePath>>,
    /// Output path -> its new step, checked against FailedPaths at the end.
    outputs_of: HashMap<String, StorePath>,
    /// Platform and outputs of each new step, should one be a cached failure.
    rows_of: HashMap<StorePath, StepRow>,
    /// Decided before the walk ended (cached, unloadable).
    decided: Option<Planned>,
}

/// A derivation read at one level, shared by the walks that reach it.
struct Read {
    drv: Result<hydra_nix::Derivation, String>,
    /// Output name -> path where known.
    paths: realisations::OutputPaths,
    /// The `.drv` was read from its file and must be found valid.
    unchecked: bool,
}

/// Walks the closures of `tops` downwards, one level of all of them at a
/// time, so that the daemon is asked once a level (the outputs' validity
/// and the `.drv` files' own, for every derivation of the level) and
/// FailedPaths once for all. A walk stops at derivations whose outputs are
/// valid (unless an inherited attempt runs them) and at steps already in
/// the graph. A CA output counts as built when the runner recorded its
/// realisation and the path is valid. One plan per top, in order.
pub async fn plan_all(
    shared: &Shared,
    client: &mut DaemonClient,
    tops: &[StorePath],
) -> Result<Vec<Planned>, Fatal> {
    let mut walks: Vec<Walk<'_>> = tops
        .iter()
        .map(|top| Walk {
            top,
            plan: LoadPlan {
                planned_at: Some(std::time::Instant::now()),
                ..LoadPlan::default()
            },
            seen: HashSet::new(),
            todo: vec![top.clone()],
            inputs_of: HashMap::new(),
            outputs_of: HashMap::new(),
            rows_of: HashMap::new(),
            decided: None,
        })
        .collect();
    loop {
        // This level of every walk: what it has not seen, and is not a
        // step of the graph already.
        let mut level: Vec<Vec<StorePath>> = Vec::with_capacity(walks.len());
        for w in &mut walks {
            let mut mine = Vec::new();
            for path in std::mem::take(&mut w.todo) {
                if w.decided.is_some() || !w.seen.insert(path.clone()) {
                    continue;
                }
                if shared.state.has_step(&path) {
                    w.plan.existing.insert(path);
                } else {
                    mine.push(path);
                }
            }
            level.push(mine);
        }
        if level.iter().all(Vec::is_empty) {
            break;
        }
        let reads = read_level(shared, client, level.iter().flatten()).await?;
        for (w, mine) in walks.iter_mut().zip(level) {
            for path in mine {
                if w.decided.is_none() {
                    visit(shared, w, path, &reads).await?;
                }
            }
        }
    }
    let undecided: Vec<&str> = walks
        .iter()
        .filter(|w| w.decided.is_none())
        .flat_map(|w| w.outputs_of.keys().map(String::as_str))
        .collect();
    let failed = failed_paths(shared, &undecided).await?;
    Ok(walks.into_iter().map(|w| finish(w, &failed)).collect())
}

/// Reads the level's derivations (each once), their outputs' paths, and
/// asks the daemon in one call which of those outputs, and of the `.drv`
/// files read from disk, are valid.
async fn read_level(
    shared: &Shared,
    client: &mut DaemonClient,
    paths: impl Iterator<Item = &StorePath>,
) -> Result<(HashMap<StorePath, Read>, HashSet<String>), Fatal> {
    let dir = shared.store.dir();
    let mut distinct = HashSet::new();
    let paths: Vec<StorePath> = paths.filter(|p| distinct.insert(*p)).cloned().collect();
    let read = shared.store.read_derivations(client, paths.clone()).await;
    let mut reads = HashMap::with_capacity(paths.len());
    let mut ask = Vec::new();
    for (path, read) in paths.into_iter().zip(read) {
        let read = match read {
            Ok((drv, validity)) => {
                let paths = realisations::output_paths(&shared.pool, dir, &path, &drv).await?;
                let unchecked = validity == Validity::Unchecked;
                if unchecked {
                    ask.push(dir.display(&path));
                }
                if paths.values().all(Option::is_some) {
                    ask.extend(paths.values().flatten().cloned());
                }
                Read {
                    drv: Ok(drv),
                    paths,
                    unchecked,
                }
            }
            Err(e) if !e.is_infrastructure() => Read {
                drv: Err(e.to_string()),
                paths: Default::default(),
                unchecked: false,
            },
            Err(e) => return Err(e.into()),
        };
        reads.insert(path, read);
    }
    let valid = if ask.is_empty() {
        Default::default()
    } else {
        client
            .query_valid_paths(&ask)
            .await
            .map_err(StoreError::from)?
    };
    Ok((reads, valid.into_iter().collect()))
}

/// One derivation of a walk, read at this level.
async fn visit(
    shared: &Shared,
    w: &mut Walk<'_>,
    path: StorePath,
    (reads, valid): &(HashMap<StorePath, Read>, HashSet<String>),
) -> Result<(), Fatal> {
    let dir = shared.store.dir();
    let read = &reads[&path];
    let full = dir.display(&path);
    let drv = match &read.drv {
        Ok(_) if read.unchecked && !valid.contains(&full) => {
            let missing = StoreError::Missing { path: full.clone() };
            w.decided = Some(Planned::Unloadable {
                reason: format!("cannot load {full}: {missing}"),
            });
            return Ok(());
        }
        Ok(d) => d,
        Err(e) => {
            w.decided = Some(Planned::Unloadable {
                reason: format!("cannot load {full}: {e}"),
            });
            return Ok(());
        }
    };
    let paths = &read.paths;
    let named: Vec<(String, String)> = paths
        .iter()
        .filter_map(|(n, p)| p.clone().map(|p| (n.clone(), p)))
        .collect();
    let known: Vec<String> = paths.values().flatten().cloned().collect();
    let all_known = known.len() == drv.outputs.len();
    let is_valid = all_known && known.iter().all(|k| valid.contains(k));
    let is_top = path == *w.top;
    if is_valid && !shared.state.has_inherited(&path) {
        if is_top {
            w.decided = Some(Planned::Cached);
        } else {
            w.plan.cached += 1;
        }
        return Ok(());
    }
    if is_top && all_known && !is_valid {
        let destinations = &shared.config().destinations;
        let found =
            crate::uploads::presence::outputs_in_a_cache(&shared.pool, destinations, &known)
                .await?;
        if let Some((size, closure_size)) = found {
            w.decided = Some(Planned::InDestination {
                outputs: named,
                size,
                closure_size,
            });
            return Ok(());
        }
    }
    let needs_resolution = match drv.needs_resolution() {
        Ok(n) => n,
        Err(e) => {
            w.decided = Some(Planned::Unloadable {
                reason: format!("cannot load {full}: {e}"),
            });
            return Ok(());
        }
    };
    w.outputs_of
        .extend(known.into_iter().map(|o| (o, path.clone())));
    w.rows_of.insert(
        path.clone(),
        (drv.platform.clone(), paths.clone().into_iter().collect()),
    );
    let required_features = drv
        .env
        .get("requiredSystemFeatures")
        .map(|f| f.split_whitespace().map(str::to_owned).collect())
        .unwrap_or_default();
    w.inputs_of
        .insert(path.clone(), drv.input_drvs.keys().cloned().collect());
    w.todo.extend(drv.input_drvs.keys().cloned());
    w.plan.new_steps.push(NewStep {
        drv_path: path,
        system: drv.platform.clone(),
        required_features,
        inputs: Vec::new(),
        needs_resolution,
    });
    Ok(())
}

/// A walk's plan, once FailedPaths (`failed`) is known: a cached failure
/// when one of its new steps' outputs failed before (the top level's if it
/// is among them), else its steps with their inputs.
fn finish(mut w: Walk<'_>, failed: &HashSet<String>) -> Planned {
    if let Some(decided) = w.decided {
        return decided;
    }
    let mut hit = w
        .outputs_of
        .iter()
        .filter(|(o, _)| failed.contains(*o))
        .map(|(_, d)| d);
    let failed_step = match hit.clone().find(|d| *d == w.top) {
        Some(d) => Some(d.clone()),
        None => hit.next().cloned(),
    };
    if let Some(drv) = failed_step {
        let (system, outputs) = w.rows_of.remove(&drv).unwrap_or_default();
        return Planned::CachedFailure {
            drv,
            system,
            outputs,
        };
    }
    let mut plan = w.plan;
    let needed: HashSet<&StorePath> = plan
        .new_steps
        .iter()
        .map(|s| &s.drv_path)
        .chain(plan.existing.iter())
        .collect();
    let wanted: Vec<Vec<StorePath>> = plan
        .new_steps
        .iter()
        .map(|s| {
            w.inputs_of[&s.drv_path]
                .iter()
                .filter(|i| needed.contains(i))
                .cloned()
                .collect()
        })
        .collect();
    for (step, inputs) in plan.new_steps.iter_mut().zip(wanted) {
        step.inputs = inputs;
    }
    Planned::Steps(plan)
}

/// Which of `outputs` failed before (`FailedPaths`), in one query.
async fn failed_paths(shared: &Shared, outputs: &[&str]) -> Result<HashSet<String>, Fatal> {
    if outputs.is_empty() {
        return Ok(HashSet::new());
    }
    let failed: Vec<String> =
        sqlx::query_scalar("select path from FailedPaths where path = any($1)")
            .bind(outputs)
            .fetch_all(&shared.pool)
            .await?;
    Ok(failed.into_iter().collect())
}
