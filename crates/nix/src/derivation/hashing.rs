//! `hashDerivationModulo` and the paths computed from it.
//!
//! Nix names an input-addressed output by a hash of its derivation in which
//! every input derivation is replaced by *that* input's hash modulo (so a
//! fixed-output input is identified by its content, not by how it is
//! fetched). Floating CA inputs make the hash *deferred*: the outputs'
//! paths are only known after resolution.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use thiserror::Error;

use super::{Derivation, DerivationError, DerivationKind, DerivationOutput};
use crate::hash::Hash;
use crate::store_path::{StoreDir, StorePath, output_path_name};

/// Nix's `DrvHash`: one hash per output, and whether it is final.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DrvHash {
    pub hashes: BTreeMap<String, Hash>,
    pub kind: DrvHashKind,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DrvHashKind {
    /// The hash determines the output paths.
    Regular,
    /// Depends on floating CA outputs: output paths wait for resolution.
    Deferred,
}

#[derive(Debug, Error)]
pub enum HashModuloError {
    #[error(transparent)]
    Derivation(#[from] DerivationError),
    #[error("the hash of input derivation {0} is not known")]
    MissingInput(StorePath),
    #[error("input derivation {input} has no output {output:?}")]
    MissingOutput { input: StorePath, output: String },
}

/// What [`DrvHashes::compute`] can fail with: loading a `.drv` or hashing it.
#[derive(Debug, Error)]
pub enum DrvGraphError<E: std::error::Error + 'static> {
    #[error("cannot load {path}: {source}")]
    Load { path: StorePath, source: E },
    #[error("cannot hash {path}: {source}")]
    Hash {
        path: StorePath,
        source: HashModuloError,
    },
}

/// The fixed `impureOutputHash` Nix 2.8 uses for impure derivations.
fn impure_output_hash() -> Hash {
    Hash::sha256(b"impure")
}

/// Nix's `hashDerivationModulo`. `input_hash` gives the (unmasked) hash of
/// each input derivation, as [`DrvHashes`] computes them.
pub fn hash_derivation_modulo<'a>(
    store: &StoreDir,
    drv: &Derivation,
    mask_outputs: bool,
    input_hash: impl Fn(&StorePath) -> Option<&'a DrvHash>,
) -> Result<DrvHash, HashModuloError> {
    let kind = drv.kind()?;
    if kind == (DerivationKind::ContentAddressed { fixed: true }) {
        let hashes = drv
            .outputs
            .iter()
            .filter_map(|(name, out)| match out {
                DerivationOutput::Fixed { path, method, hash } => {
                    let text = format!(
                        "fixed:out:{}{}:{}:{}",
                        method.prefix(),
                        hash.algo,
                        hash.to_base16(),
                        store.display(path)
                    );
                    Some((name.clone(), Hash::sha256(text)))
                }
                _ => None,
            })
            .collect();
        return Ok(DrvHash {
            hashes,
            kind: DrvHashKind::Regular,
        });
    }
    if kind == DerivationKind::Impure {
        let hashes = drv
            .outputs
            .keys()
            .map(|name| (name.clone(), impure_output_hash()))
            .collect();
        return Ok(DrvHash {
            hashes,
            kind: DrvHashKind::Deferred,
        });
    }
    let mut result_kind = match kind {
        DerivationKind::ContentAddressed { fixed: false } => DrvHashKind::Deferred,
        _ => DrvHashKind::Regular,
    };
    let mut inputs: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (path, outputs) in &drv.input_drvs {
        let res = input_hash(path).ok_or_else(|| HashModuloError::MissingInput(path.clone()))?;
        if res.kind == DrvHashKind::Deferred {
            result_kind = DrvHashKind::Deferred;
        }
        for output in outputs {
            let h = res
                .hashes
                .get(output)
                .ok_or_else(|| HashModuloError::MissingOutput {
                    input: path.clone(),
                    output: output.clone(),
                })?;
            inputs
                .entry(h.to_base16())
                .or_default()
                .insert(output.clone());
        }
    }
    let hash = Hash::sha256(drv.to_aterm_modulo(store, mask_outputs, &inputs));
    let hashes = drv
        .outputs
        .keys()
        .map(|name| (name.clone(), hash.clone()))
        .collect();
    Ok(DrvHash {
        hashes,
        kind: result_kind,
    })
}

/// Memoised hashes of `.drv` files, computed bottom-up over the input graph.
#[derive(Debug, Default)]
pub struct DrvHashes {
    cache: HashMap<StorePath, DrvHash>,
}

impl DrvHashes {
    pub fn get(&self, path: &StorePath) -> Option<&DrvHash> {
        self.cache.get(path)
    }

    pub fn len(&self) -> usize {
        self.cache.len()
    }

    pub fn is_empty(&self) -> bool {
        self.cache.is_empty()
    }

    pub fn clear(&mut self) {
        self.cache.clear();
    }

    /// Nix's `pathDerivationModulo`: the unmasked hash of the `.drv` at
    /// `path`, loading it and any input not yet hashed with `load`.
    pub fn compute<E: std::error::Error + 'static>(
        &mut self,
        store: &StoreDir,
        path: &StorePath,
        load: &mut impl FnMut(&StorePath) -> Result<Derivation, E>,
    ) -> Result<&DrvHash, DrvGraphError<E>> {
        // Explicit post-order walk: build graphs can be thousands deep.
        let mut stack: Vec<(StorePath, Option<Derivation>)> = vec![(path.clone(), None)];
        while let Some((p, drv)) = stack.pop() {
            if self.cache.contains_key(&p) {
                continue;
            }
            let drv = match drv {
                Some(d) => d,
                None => load(&p).map_err(|source| DrvGraphError::Load {
                    path: p.clone(),
                    source,
                })?,
            };
            let missing: Vec<StorePath> = drv
                .input_drvs
                .keys()
                .filter(|i| !self.cache.contains_key(*i))
                .cloned()
                .collect();
            if missing.is_empty() {
                let h = hash_derivation_modulo(store, &drv, false, |i| self.cache.get(i)).map_err(
                    |source| DrvGraphError::Hash {
                        path: p.clone(),
                        source,
                    },
                )?;
                self.cache.insert(p, h);
            } else {
                stack.push((p, Some(drv)));
                stack.extend(missing.into_iter().map(|m| (m, None)));
            }
        }
        Ok(&self.cache[path])
    }

    /// Nix's `staticOutputHashes`: the masked hashes that key a derivation's
    /// realisations (`sha256:<hex>!<output>`). Inputs must be hashed already.
    pub fn output_hashes(
        &self,
        store: &StoreDir,
        drv: &Derivation,
    ) -> Result<DrvHash, HashModuloError> {
        hash_derivation_modulo(store, drv, true, |i| self.cache.get(i))
    }

    /// The output paths Nix gives `drv` at instantiation, for every output
    /// whose path is known before building. Inputs must be hashed already.
    pub fn expected_output_paths(
        &self,
        store: &StoreDir,
        drv: &Derivation,
    ) -> Result<BTreeMap<String, StorePath>, HashModuloError> {
        let name = drv.name()?;
        let mut paths = BTreeMap::new();
        match drv.kind()? {
            DerivationKind::InputAddressed { deferred: false } => {
                let h = self.output_hashes(store, drv)?;
                if h.kind == DrvHashKind::Regular {
                    for (output, hash) in &h.hashes {
                        paths.insert(output.clone(), store.make_output_path(output, hash, name));
                    }
                }
            }
            DerivationKind::ContentAddressed { fixed: true } => {
                for (output, out) in &drv.outputs {
                    if let DerivationOutput::Fixed { method, hash, .. } = out {
                        let p = store.make_fixed_output_path(
                            *method,
                            hash,
                            &output_path_name(name, output),
                            &[],
                            false,
                        );
                        paths.insert(output.clone(), p);
                    }
                }
            }
            _ => {}
        }
        Ok(paths)
    }
}

/// The id of a realisation: `sha256:<hex>!<output>`.
pub fn drv_output_id(hash: &Hash, output: &str) -> String {
    format!("{}!{output}", hash.to_prefixed_base16())
}
