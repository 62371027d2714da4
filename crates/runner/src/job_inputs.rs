//! What a job needs from the runner's store: its derivation as the builder
//! gets it (input derivations' outputs as plain sources) and the closure
//! of those sources. Dispatch sends it with the job; the tunnel's
//! `FetchInputs` serves nothing outside it.

use hydra_nix::daemon::DaemonClient;

use crate::realisations::{self, RealisationError};
use crate::store::StoreError;
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
    let drv = store.read_derivation(client, drv_path).await?;
    let inputs = realisations::input_paths(shared, client, &drv).await?;
    let basic = drv.resolve(dir, &inputs)?;
    for path in inputs.values() {
        let full = dir.display(path);
        if !client
            .is_valid_path(&full)
            .await
            .map_err(StoreError::from)?
        {
            return Err(StoreError::Missing { path: full }.into());
        }
    }
    let srcs: Vec<String> = basic.input_srcs.iter().map(|p| dir.display(p)).collect();
    let closure = client
        .query_closure(&srcs)
        .await
        .map_err(StoreError::from)?;
    Ok((drv, basic, closure.into_keys().collect()))
}
