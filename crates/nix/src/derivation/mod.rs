//! Derivations as Nix 2.8 stores them in `.drv` files.
//!
//! - [`aterm`]: the ATerm text format, parsed and written byte for byte;
//! - [`hashing`]: `hashDerivationModulo`, output paths and `.drv` paths;
//! - [`resolve`]: turning a CA-dependent derivation into a resolved one.

pub mod aterm;
pub mod hashing;
pub mod resolve;

use std::collections::{BTreeMap, BTreeSet};

use thiserror::Error;

use crate::hash::{Hash, HashAlgo};
use crate::store_path::{ContentAddressMethod, StoreDir, StorePath};

pub use aterm::DrvParseError;
pub use hashing::{DrvHash, DrvHashKind, HashModuloError};
pub use resolve::{ResolveError, downstream_placeholder, hash_placeholder};

/// A derivation: what a `.drv` file holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Derivation {
    pub outputs: BTreeMap<String, DerivationOutput>,
    /// Input derivations and which of their outputs are used.
    pub input_drvs: BTreeMap<StorePath, BTreeSet<String>>,
    pub input_srcs: BTreeSet<StorePath>,
    pub platform: String,
    pub builder: String,
    pub args: Vec<String>,
    pub env: BTreeMap<String, String>,
}

/// One output of a derivation, by how its path is known.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DerivationOutput {
    /// The path is fixed by the derivation's inputs.
    InputAddressed(StorePath),
    /// A fixed-output derivation: the content hash is declared up front.
    Fixed {
        path: StorePath,
        method: ContentAddressMethod,
        hash: Hash,
    },
    /// A floating content-addressed output: the path is known after the build.
    Floating {
        method: ContentAddressMethod,
        algo: HashAlgo,
    },
    /// Input-addressed, but depending on floating CA outputs: the path is
    /// known once the derivation is resolved.
    Deferred,
    /// An impure derivation's output (never cached, always rebuilt).
    Impure {
        method: ContentAddressMethod,
        algo: HashAlgo,
    },
}

impl DerivationOutput {
    /// The path, when it is known without building.
    pub fn path(&self) -> Option<&StorePath> {
        match self {
            DerivationOutput::InputAddressed(p) | DerivationOutput::Fixed { path: p, .. } => {
                Some(p)
            }
            _ => None,
        }
    }
}

/// The kind of a derivation as a whole, from its outputs (Nix's `DerivationType`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DerivationKind {
    InputAddressed { deferred: bool },
    ContentAddressed { fixed: bool },
    Impure,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum DerivationError {
    #[error("derivation has no outputs")]
    NoOutputs,
    #[error("derivation mixes output kinds ({0})")]
    MixedOutputs(String),
    #[error("fixed-output derivation has {0} outputs; it may have only 'out'")]
    MultipleFixedOutputs(usize),
    #[error("derivation has no 'name' in its environment")]
    NoName,
}

impl Derivation {
    /// The `name` attribute, which names the `.drv` and the outputs.
    pub fn name(&self) -> Result<&str, DerivationError> {
        self.env
            .get("name")
            .map(String::as_str)
            .ok_or(DerivationError::NoName)
    }

    pub fn kind(&self) -> Result<DerivationKind, DerivationError> {
        let mut kinds = self.outputs.values().map(|o| match o {
            DerivationOutput::InputAddressed(_) => {
                DerivationKind::InputAddressed { deferred: false }
            }
            DerivationOutput::Deferred => DerivationKind::InputAddressed { deferred: true },
            DerivationOutput::Fixed { .. } => DerivationKind::ContentAddressed { fixed: true },
            DerivationOutput::Floating { .. } => DerivationKind::ContentAddressed { fixed: false },
            DerivationOutput::Impure { .. } => DerivationKind::Impure,
        });
        let first = kinds.next().ok_or(DerivationError::NoOutputs)?;
        // As in Nix 2.8, every output must be of the same kind.
        if let Some(other) = kinds.find(|k| *k != first) {
            return Err(DerivationError::MixedOutputs(format!(
                "{first:?} and {other:?}"
            )));
        }
        let kind = first;
        if kind == (DerivationKind::ContentAddressed { fixed: true }) && self.outputs.len() != 1 {
            return Err(DerivationError::MultipleFixedOutputs(self.outputs.len()));
        }
        Ok(kind)
    }

    /// Every store path this derivation refers to (its `.drv` file's references).
    pub fn references(&self) -> Vec<StorePath> {
        self.input_srcs
            .iter()
            .chain(self.input_drvs.keys())
            .cloned()
            .collect()
    }

    /// The path the `.drv` file of this derivation has in the store.
    pub fn drv_path(&self, store: &StoreDir) -> Result<StorePath, DerivationError> {
        let text = self.to_aterm(store);
        let name = format!("{}.drv", self.name()?);
        Ok(store.make_text_path(&name, &Hash::sha256(text.as_bytes()), &self.references()))
    }
}
