//! The parts of Nix that the queue runner and the builders need, written
//! against Nix 2.8's own formats:
//!
//! - [`store_path`] and [`hash`]: store paths, Nix's base32, and the path
//!   computations (`makeStorePath`, output paths, fixed-output paths);
//! - [`derivation`]: the `.drv` ATerm format, `hashDerivationModulo`, output
//!   paths, and the resolution of content-addressed derivations;
//! - [`nar`]: serialising a path to a NAR and hashing it;
//! - [`daemon`]: an async client of the nix-daemon worker protocol.
//!
//! No crate on crates.io covers these for Nix 2.8 (see docs/architecture.md),
//! so they are hand-written and every routine is tested against real Nix.

pub mod base32;
pub mod binary_cache;
pub mod daemon;
pub mod derivation;
pub mod hash;
pub mod nar;
pub mod store_path;

pub use derivation::{Derivation, DerivationOutput};
pub use hash::{Hash, HashAlgo};
pub use store_path::{StoreDir, StorePath};
