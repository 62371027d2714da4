//! An async client of the nix-daemon worker protocol (Nix 2.8 speaks 1.34).
//!
//! The client offers 1.34 and uses `min(1.34, daemon's)`, so a newer daemon
//! simply talks 1.34 to it. Daemons older than 1.32 (Nix 2.3 and before)
//! are refused: their errors, build results and realisations differ.
//!
//! - [`wire`]: the protocol's integers, strings and lists;
//! - [`client`]: the handshake and the operations;
//! - [`types`]: what the operations take and return;
//! - [`Spares`]: fresh connections made ahead of need.

mod client;
mod error;
mod spares;
mod types;
mod wire;

pub use client::{ClientSettings, DaemonClient, PIPELINED, PROTOCOL_VERSION};
pub use error::DaemonError;
pub use spares::{ROOTED_IDLE, Spares};
pub use types::{
    BuildMode, BuildResult, BuildStatus, LogLine, PathInfo, Realisation, references_first,
};
