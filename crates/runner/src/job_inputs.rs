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

/// The derivation at `drv_path`, as the builder gets it (its inputs'
/// outputs as plain sources), and the closure of those sources: what the
/// job needs, and all that `FetchInputs` serves for it.
pub async fn of(
    shared: &Shared,
    client: &mut DaemonClient,
    drv_path: &hydra_nix::StorePath,
) -> Result<(hydra_nix::Derivation, hydra_nix::Derivation, Vec<String>), PrepareError> {
    let store = &shared.store;
    let dir = store.dir();
    let (drv, validity) = store.read_derivation_file(client, drv_path).await?;
    let inputs = realisations::input_paths(shared, client, &drv).await?;
    let basic = drv.resolve(dir, &inputs)?;
    // The inputs' outputs, and the `.drv` when it was read from its file,
    // must be valid: one daemon call.
    let mut wanted: Vec<String> = inputs.values().map(|p| dir.display(p)).collect();
    if validity == Validity::Unchecked {
        wanted.push(dir.display(drv_path));
    }
    if !wanted.is_empty() {
        let valid = client
            .query_valid_paths(&wanted)
            .await
            .map_err(StoreError::from)?;
        if let Some(missing) = wanted.into_iter().find(|p| !valid.contains(p)) {
            return Err(StoreError::Missing { path: missing }.into());
        }
    }
    let srcs: Vec<String> = basic.input_srcs.iter().map(|p| dir.display(p)).collect();
    let closure = client
        .query_closure(&srcs)
        .await
        .map_err(StoreError::from)?;
    Ok((drv, basic, closure.into_keys().collect()))
}
