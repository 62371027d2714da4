//! What a job needs from the runner's store: its derivation as the builder
//! gets it (input derivations' outputs as plain sources) and the closure
//! of those sources. Dispatch sends it with the job; the tunnel's
//! `FetchInputs` serves nothing outside it.

use hydra_nix::daemon::DaemonClient;

use crate::realisations::{self, RealisationError};
use crate::store::{StoreError, Validity};
use crate::{Fatal, Shared};

/// Why a step cannot be prepared for a builder.
#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Inputs(#[from] RealisationError),
    #[error("{0}")]
    Resolve(#[from] hydra_nix::derivation::ResolveError),
}

impl PrepareError {
    /// Err for a fault of the runner's store or database; Ok(reason) for a
    /// problem of this step.
    pub fn into_reason(self) -> Result<String, Fatal> {
        match self {
            PrepareError::Store(e) if e.is_infrastructure() => Err(e.into()),
            PrepareError::Inputs(e) => e.into_reason(),
            other => Ok(other.to_string()),
        }
    }
}

/// What a job needs.
pub struct JobInputs {
    /// The derivation as it is in the runner's store.
    pub drv: hydra_nix::Derivation,
    /// As the builder gets it: input derivations' outputs as plain sources.
    pub basic: hydra_nix::Derivation,
    /// The closure of those sources in the runner's store: all that
    /// `FetchInputs` serves for the job.
    pub closure: Vec<String>,
    /// Inputs' outputs the runner's store does not hold yet, for a job that
    /// runs ahead of them on the machine that built them (which has them
    /// and their closure).
    pub on_builder: Vec<String>,
}

/// The derivation at `drv_path`, as the builder gets it (its inputs'
/// outputs as plain sources), and the closure of those sources: what the
/// job needs, and all that `FetchInputs` serves for it. With `ahead`,
/// inputs' outputs missing from the runner's store are taken to be on the
/// builder (the graph sent the job to the machine that built them).
pub async fn of(
    shared: &Shared,
    client: &mut DaemonClient,
    drv_path: &hydra_nix::StorePath,
    ahead: bool,
) -> Result<JobInputs, PrepareError> {
    let store = &shared.store;
    let dir = store.dir();
    let (drv, validity) = store.read_derivation_file(client, drv_path).await?;
    let inputs = realisations::input_paths(shared, client, &drv).await?;
    let basic = drv.resolve(dir, &inputs)?;
    // The inputs' outputs, and the `.drv` when it was read from its file,
    // must be valid: one daemon call.
    let outputs: Vec<String> = inputs.values().map(|p| dir.display(p)).collect();
    let mut wanted = outputs.clone();
    if validity == Validity::Unchecked {
        wanted.push(dir.display(drv_path));
    }
    let mut on_builder = Vec::new();
    if !wanted.is_empty() {
        let valid = client
            .query_valid_paths(&wanted)
            .await
            .map_err(StoreError::from)?;
        for missing in wanted.into_iter().filter(|p| !valid.contains(p)) {
            if ahead && outputs.contains(&missing) {
                on_builder.push(missing);
            } else {
                return Err(StoreError::Missing { path: missing }.into());
            }
        }
    }
    let srcs: Vec<String> = basic
        .input_srcs
        .iter()
        .map(|p| dir.display(p))
        .filter(|p| !on_builder.contains(p))
        .collect();
    let closure = client
        .query_closure(&srcs)
        .await
        .map_err(StoreError::from)?;
    Ok(JobInputs {
        drv,
        basic,
        closure: closure.into_keys().collect(),
        on_builder,
    })
}
