//! Outputs that are only known after a build: those of floating
//! content-addressed derivations, and of derivations resolved because they
//! depend on such outputs.
//!
//! The runner records each as a realisation, keyed by derivation and output
//! name, in PostgreSQL (`hqr_realisations`): dependents resolve against
//! these (never against whichever builder built the input), and a
//! restarted runner reads them to know what is built. It also registers
//! them in its own store as Nix realisations, so that Nix on the runner
//! agrees. Outputs whose path the `.drv` fixes need no realisation.

use std::collections::{BTreeMap, HashMap};

use hydra_nix::daemon::{DaemonClient, Realisation};
use hydra_nix::derivation::hashing::{DrvHash, drv_output_id};
use hydra_nix::{Derivation, StoreDir, StorePath};
use sqlx::{PgConnection, PgPool};
use thiserror::Error;

use crate::store::StoreError;
use crate::{Fatal, Shared};

/// Output name -> path, None while a CA output is not built.
pub type OutputPaths = BTreeMap<String, Option<String>>;

/// The real path of each input output a derivation uses, keyed by (input
/// `.drv`, output name), as [`Derivation::resolve`] takes them.
pub type InputPaths = BTreeMap<(StorePath, String), StorePath>;

#[derive(Debug, Error)]
pub enum RealisationError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),
    #[error("output '{output}' of {drv} has no recorded path: it was never built here")]
    Unknown { drv: String, output: String },
    #[error("the realisation of {drv} holds a path that is not a store path: {path}")]
    BadPath { drv: String, path: String },
    #[error("cannot hash {0} to name its realisations")]
    Hash(String),
}

impl RealisationError {
    /// A fault of the database or the store stops the runner; anything
    /// else is a problem of the derivation at hand, described for its row.
    pub fn into_reason(self) -> Result<String, Fatal> {
        match self {
            RealisationError::Database(e) => Err(e.into()),
            RealisationError::Store(e) if e.is_infrastructure() => Err(e.into()),
            other => Ok(other.to_string()),
        }
    }
}

/// The outputs of `drv`: the path the `.drv` fixes, else the realisation
/// recorded for it, else None.
pub async fn output_paths(
    pool: &PgPool,
    dir: &StoreDir,
    drv_path: &StorePath,
    drv: &Derivation,
) -> Result<OutputPaths, sqlx::Error> {
    let mut paths: OutputPaths = drv
        .outputs
        .iter()
        .map(|(name, out)| (name.clone(), out.path().map(|p| dir.display(p))))
        .collect();
    if paths.values().all(Option::is_some) {
        return Ok(paths);
    }
    let recorded: Vec<(String, String)> =
        sqlx::query_as("select output, out_path from hqr_realisations where drv_path = $1")
            .bind(dir.display(drv_path))
            .fetch_all(pool)
            .await?;
    for (output, path) in recorded {
        if dir.parse_path(&path).is_err() {
            tracing::warn!(drv = %drv_path, output, "ignoring a recorded realisation that is not a store path: {path:?}");
            continue;
        }
        if let Some(slot @ None) = paths.get_mut(&output) {
            *slot = Some(path);
        }
    }
    Ok(paths)
}

/// Every output of `drv`, when each has a known path that is valid in the
/// runner's store; None when any is unknown or missing.
pub async fn known_valid(
    shared: &Shared,
    client: &mut DaemonClient,
    drv_path: &StorePath,
    drv: &Derivation,
) -> Result<Option<Vec<(String, String)>>, Fatal> {
    let paths = output_paths(&shared.pool, shared.store.dir(), drv_path, drv).await?;
    let Some(known) = paths
        .into_iter()
        .map(|(name, path)| path.map(|p| (name, p)))
        .collect::<Option<Vec<_>>>()
    else {
        return Ok(None);
    };
    let wanted: Vec<String> = known.iter().map(|(_, p)| p.clone()).collect();
    let valid = client
        .query_valid_paths(&wanted)
        .await
        .map_err(StoreError::from)?;
    Ok((valid.len() == wanted.len()).then_some(known))
}

/// The path of every input output `drv` uses: fixed by the input's `.drv`
/// or recorded as its realisation.
pub async fn input_paths(
    shared: &Shared,
    client: &mut DaemonClient,
    drv: &Derivation,
) -> Result<InputPaths, RealisationError> {
    let dir = shared.store.dir();
    let mut found = InputPaths::new();
    // A derivation's file is named by its contents: one read here is the
    // derivation the daemon would give (a half-written file does not
    // parse), and its validity matters only for building it. All in one
    // go: a step may have hundreds of inputs.
    let inputs: Vec<StorePath> = drv.input_drvs.keys().cloned().collect();
    let read = shared.store.read_derivations(client, inputs).await;
    for ((input, wanted), read) in drv.input_drvs.iter().zip(read) {
        let (input_drv, _) = read?;
        let paths = output_paths(&shared.pool, dir, input, &input_drv).await?;
        for output in wanted {
            let path =
                paths
                    .get(output)
                    .cloned()
                    .flatten()
                    .ok_or_else(|| RealisationError::Unknown {
                        drv: dir.display(input),
                        output: output.clone(),
                    })?;
            let path = dir
                .parse_path(&path)
                .map_err(|_| RealisationError::BadPath {
                    drv: dir.display(input),
                    path,
                })?;
            found.insert((input.clone(), output.clone()), path);
        }
    }
    Ok(found)
}

/// Records `outputs` (name, path) as the realisations of `drv` (a full
/// path). A derivation is only built again when its recorded outputs are
/// gone from the store (or the record is damaged), so the new paths
/// replace the old.
pub async fn record(
    tx: &mut PgConnection,
    drv: &str,
    outputs: &[(String, String)],
) -> Result<(), sqlx::Error> {
    for (output, path) in outputs {
        sqlx::query(
            "insert into hqr_realisations (drv_path, output, out_path) values ($1, $2, $3)
             on conflict (drv_path, output) do update set out_path = excluded.out_path, created_at = now()",
        )
        .bind(drv)
        .bind(output)
        .bind(path)
        .execute(&mut *tx)
        .await?;
    }
    Ok(())
}

/// Registers `outputs` of `drv_path` as Nix realisations in the runner's
/// store. PostgreSQL stays the reference: a store that refuses (one without
/// `ca-derivations`, or holding another realisation) is logged, not fatal.
pub async fn register_in_store(
    shared: &Shared,
    client: &mut DaemonClient,
    drv_path: &StorePath,
    outputs: &[(String, String)],
) -> Result<(), Fatal> {
    let hashes = match output_hashes(shared, client, drv_path).await {
        Ok(h) => h,
        Err(e) => {
            let reason = e.into_reason()?;
            tracing::warn!(drv = %drv_path, "realisations not registered in the store: {reason}");
            return Ok(());
        }
    };
    for (output, path) in outputs {
        let Some(hash) = hashes.hashes.get(output) else {
            continue;
        };
        let realisation = Realisation {
            id: drv_output_id(hash, output),
            out_path: path.rsplit('/').next().unwrap_or(path).to_owned(),
            signatures: Vec::new(),
            dependent_realisations: BTreeMap::new(),
        };
        if let Err(e) = client.register_drv_output(&realisation).await {
            let e = StoreError::from(e);
            if e.is_infrastructure() {
                return Err(e.into());
            }
            tracing::warn!(drv = %drv_path, output, "realisation not registered in the store: {e}");
        }
    }
    Ok(())
}

/// Nix's `staticOutputHashes` of `drv_path`, which key its realisations.
/// The hashes of input derivations are kept between calls, since the
/// dependents of one CA derivation share most of their inputs.
pub(crate) async fn output_hashes(
    shared: &Shared,
    client: &mut DaemonClient,
    drv_path: &StorePath,
) -> Result<DrvHash, RealisationError> {
    /// Beyond this many remembered hashes, start afresh (a bound, not a cache policy).
    const MAX_REMEMBERED: usize = 200_000;
    let dir = shared.store.dir();
    {
        let mut hashes = shared.drv_hashes.lock();
        if hashes.len() > MAX_REMEMBERED {
            hashes.clear();
        }
    }
    let drv = shared.store.read_derivation(client, drv_path).await?;
    let mut loaded: HashMap<StorePath, Derivation> = HashMap::new();
    let mut todo: Vec<StorePath> = drv.input_drvs.keys().cloned().collect();
    while let Some(path) = todo.pop() {
        if loaded.contains_key(&path) || shared.drv_hashes.lock().get(&path).is_some() {
            continue;
        }
        let input = shared.store.read_derivation(client, &path).await?;
        todo.extend(input.input_drvs.keys().cloned());
        loaded.insert(path, input);
    }
    let mut hashes = shared.drv_hashes.lock();
    for input in drv.input_drvs.keys() {
        hashes
            .compute(dir, input, &mut |p: &StorePath| {
                loaded
                    .get(p)
                    .cloned()
                    .ok_or_else(|| NotLoaded(p.to_string()))
            })
            .map_err(|e| RealisationError::Hash(format!("{drv_path}: {e}")))?;
    }
    hashes
        .output_hashes(dir, &drv)
        .map_err(|e| RealisationError::Hash(format!("{drv_path}: {e}")))
}

/// A derivation the hash walk needed but the prefetch did not load (the
/// remembered hashes were cleared in between).
#[derive(Debug, Error)]
#[error("{0} was not loaded")]
struct NotLoaded(String);
