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

/// Walks the closure of `top` downwards, stopping at derivations whose
/// outputs are valid (unless an inherited attempt runs them) and at steps
/// already in the graph. A CA output counts
/// as built when the runner recorded its realisation and the path is valid.
pub async fn plan(
    shared: &Shared,
    client: &mut DaemonClient,
    top: &StorePath,
) -> Result<Planned, Fatal> {
    let mut plan = LoadPlan {
        planned_at: Some(std::time::Instant::now()),
        ..LoadPlan::default()
    };
    let mut seen = HashSet::new();
    let mut inputs_of: HashMap<StorePath, Vec<StorePath>> = HashMap::new();
    // Output path -> its new step, checked against FailedPaths at the end
    // in one query.
    let mut outputs_of: HashMap<String, StorePath> = HashMap::new();
    // Platform and outputs of each new step, should one be a cached failure.
    let mut rows_of: HashMap<StorePath, StepRow> = HashMap::new();
    let mut todo = vec![top.clone()];
    while let Some(path) = todo.pop() {
        if !seen.insert(path.clone()) {
            continue;
        }
        if shared.state.has_step(&path) {
            plan.existing.insert(path);
            continue;
        }
        let (drv, validity) = match shared.store.read_derivation_file(client, &path).await {
            Ok(d) => d,
            Err(e) if !e.is_infrastructure() => {
                return Ok(Planned::Unloadable {
                    reason: format!("cannot load {}: {e}", shared.store.dir().display(&path)),
                });
            }
            Err(e) => return Err(e.into()),
        };
        let paths =
            realisations::output_paths(&shared.pool, shared.store.dir(), &path, &drv).await?;
        let named: Vec<(String, String)> = paths
            .iter()
            .filter_map(|(n, p)| p.clone().map(|p| (n.clone(), p)))
            .collect();
        let known: Vec<String> = paths.values().flatten().cloned().collect();
        let all_known = known.len() == drv.outputs.len();
        // One daemon call for the outputs and, when it was read from its
        // file, the `.drv` itself.
        let full = shared.store.dir().display(&path);
        let mut ask = if all_known { known.clone() } else { Vec::new() };
        if validity == Validity::Unchecked {
            ask.push(full.clone());
        }
        let found = if ask.is_empty() {
            Default::default()
        } else {
            client
                .query_valid_paths(&ask)
                .await
                .map_err(StoreError::from)?
        };
        if validity == Validity::Unchecked && !found.contains(&full) {
            let missing = StoreError::Missing { path: full.clone() };
            return Ok(Planned::Unloadable {
                reason: format!("cannot load {full}: {missing}"),
            });
        }
        let valid = all_known && known.iter().all(|k| found.contains(k));
        if valid && !shared.state.has_inherited(&path) {
            if path == *top {
                return Ok(Planned::Cached);
            }
            plan.cached += 1;
            continue;
        }
        if path == *top && all_known && !valid {
            let destinations = &shared.config().destinations;
            let found =
                crate::uploads::presence::outputs_in_a_cache(&shared.pool, destinations, &known)
                    .await?;
            if let Some((size, closure_size)) = found {
                return Ok(Planned::InDestination {
                    outputs: named,
                    size,
                    closure_size,
                });
            }
        }
        let needs_resolution = match drv.needs_resolution() {
            Ok(n) => n,
            Err(e) => {
                return Ok(Planned::Unloadable {
                    reason: format!("cannot load {}: {e}", shared.store.dir().display(&path)),
                });
            }
        };
        outputs_of.extend(known.into_iter().map(|o| (o, path.clone())));
        rows_of.insert(
            path.clone(),
            (drv.platform.clone(), paths.into_iter().collect()),
        );
        let required_features = drv
            .env
            .get("requiredSystemFeatures")
            .map(|f| f.split_whitespace().map(str::to_owned).collect())
            .unwrap_or_default();
        inputs_of.insert(path.clone(), drv.input_drvs.keys().cloned().collect());
        todo.extend(drv.input_drvs.keys().cloned());
        plan.new_steps.push(NewStep {
            drv_path: path,
            system: drv.platform.clone(),
            required_features,
            inputs: Vec::new(),
            needs_resolution,
        });
    }
    if let Some(drv) = failed_before(shared, &outputs_of, top).await? {
        let (system, outputs) = rows_of.remove(&drv).unwrap_or_default();
        return Ok(Planned::CachedFailure {
            drv,
            system,
            outputs,
        });
    }
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
            inputs_of[&s.drv_path]
                .iter()
                .filter(|i| needed.contains(i))
                .cloned()
                .collect()
        })
        .collect();
    for (step, inputs) in plan.new_steps.iter_mut().zip(wanted) {
        step.inputs = inputs;
    }
    Ok(Planned::Steps(plan))
}

/// A step (of `outputs_of`: output path -> step) whose output failed
/// before, if any; the top-level one if it is among them.
async fn failed_before(
    shared: &Shared,
    outputs_of: &HashMap<String, StorePath>,
    top: &StorePath,
) -> Result<Option<StorePath>, Fatal> {
    if outputs_of.is_empty() {
        return Ok(None);
    }
    let outputs: Vec<&str> = outputs_of.keys().map(String::as_str).collect();
    let failed: Vec<String> =
        sqlx::query_scalar("select path from FailedPaths where path = any($1)")
            .bind(&outputs)
            .fetch_all(&shared.pool)
            .await?;
    let mut steps = failed.iter().map(|p| &outputs_of[p]);
    Ok(match steps.clone().find(|d| *d == top) {
        Some(d) => Some(d.clone()),
        None => steps.next().cloned(),
    })
}
