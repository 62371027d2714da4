//! The resolver: steps whose derivations depend on floating
//! content-addressed outputs, once those are built -> resolved derivations
//! that the dispatcher sends like any other.
//!
//! For a step in `Resolving`, the input outputs come from the realisations
//! the runner recorded (never from the builder that happened to build
//! them); the derivation is rewritten as Nix's `tryResolve` does and
//! written into the runner's store; the step's BuildSteps row records
//! status 13 with `resolvedDrvPath`. Then either the resolved derivation's
//! outputs are known already (early cutoff: the step succeeds, nothing is
//! built), or the resolved derivation's step takes over the step's builds
//! and dependents. PostgreSQL is written before the graph changes: a
//! runner killed in between resolves again on start, to the same
//! derivation, and finds its row.

use std::sync::Arc;
use std::time::Instant;

use hydra_nix::daemon::DaemonClient;
use hydra_nix::{Derivation, StorePath};

use crate::events::{self, Kind, NewEvent};
use crate::graph::{NewStep, StepId};
use crate::realisations;
use crate::record;
use crate::state::Resolving;
use crate::{Fatal, Shared, failpoint, outcome};

pub async fn run(shared: Arc<Shared>) -> Result<(), Fatal> {
    loop {
        match shared.state.next_to_resolve() {
            Some((id, Some(pending))) => resolve_step(&shared, id, pending).await?,
            Some((_, None)) => {} // dropped meanwhile
            None => shared.state.resolver_woken().await,
        }
    }
}

async fn resolve_step(shared: &Shared, id: StepId, pending: Resolving) -> Result<(), Fatal> {
    let mut client = shared.store.client().await?;
    let (drv, resolved) = match resolve(shared, &mut client, &pending.drv_path).await? {
        Ok(pair) => pair,
        Err(reason) => {
            tracing::error!(drv = %pending.drv_path, "cannot resolve: {reason}");
            return outcome::fail_unresolvable(shared, id, &reason).await;
        }
    };
    let resolved_path = shared
        .store
        .write_derivation(&mut client, &resolved)
        .await?;
    record_resolution(shared, &pending, &drv, &resolved_path).await?;
    failpoint::stop_at("resolution-recorded", &pending.drv_path);
    // After the status-13 row is committed: a resolved step that succeeds
    // from here on sees the row (and gives this build its terminal row);
    // one that succeeded before has its outputs recorded (early cutoff).
    // Outputs valid but an attempt inherited for them: the runner before
    // this one imported them and died before recording the success; the
    // attempt's report is recorded instead of a cutoff (its row stays
    // busy otherwise).
    let known = if shared.state.has_inherited(&resolved_path) {
        None
    } else {
        realisations::known_valid(shared, &mut client, &resolved_path, &resolved).await?
    };
    tracing::info!(drv = %pending.drv_path, resolved = %resolved_path, early_cutoff = known.is_some(), "resolved");
    match known {
        Some(outputs) => {
            outcome::succeed_unbuilt(shared, id, &resolved_path, outputs, pending.owner.id).await
        }
        None => {
            let resolved = NewStep {
                drv_path: resolved_path,
                system: pending.system,
                required_features: pending.required_features,
                inputs: Vec::new(),
                needs_resolution: false,
            };
            if let Ok((_, Some(adoption))) =
                shared.state.step_resolved(id, resolved, Instant::now())
            {
                crate::tunnel::send_adoptions(&[adoption]);
            }
            Ok(())
        }
    }
}

/// Reads `drv_path` and resolves it: Ok((original, resolved)), or the
/// reason it cannot be resolved.
async fn resolve(
    shared: &Shared,
    client: &mut DaemonClient,
    drv_path: &StorePath,
) -> Result<Result<(Derivation, Derivation), String>, Fatal> {
    let drv = match shared.store.read_derivation(client, drv_path).await {
        Ok(d) => d,
        Err(e) if e.is_infrastructure() => return Err(e.into()),
        Err(e) => return Ok(Err(e.to_string())),
    };
    let inputs = match realisations::input_paths(shared, client, &drv).await {
        Ok(i) => i,
        Err(e) => return e.into_reason().map(Err),
    };
    Ok(match drv.resolve(shared.store.dir(), &inputs) {
        Ok(resolved) => Ok((drv, resolved)),
        Err(e) => Err(format!("cannot resolve {drv_path}: {e}")),
    })
}

/// The status-13 row of the step, in the owner build.
async fn record_resolution(
    shared: &Shared,
    pending: &Resolving,
    drv: &Derivation,
    resolved: &StorePath,
) -> Result<(), Fatal> {
    let outputs: Vec<(String, Option<String>)> =
        drv.outputs.keys().map(|n| (n.clone(), None)).collect();
    let drv_path = shared.store.dir().display(&pending.drv_path);
    let resolved_full = shared.store.dir().display(resolved);
    let resolved = resolved.to_string();
    in_transaction!(shared, |tx| {
        // None: the owner build was deleted meanwhile; the queue monitor
        // takes it out of the graph.
        record::record_resolution(
            &mut tx,
            pending.owner.id,
            &drv_path,
            &pending.system,
            &resolved,
            &outputs,
        )
        .await?;
        let event = NewEvent::new(Kind::Resolved, pending.builds.clone())
            .drv(drv_path.as_str())
            .detail(resolved_full.as_str());
        events::emit(&mut tx, &[event]).await?;
        Ok(())
    })
}
