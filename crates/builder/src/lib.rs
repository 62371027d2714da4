//! The builder agent. It keeps a control stream to the queue runner open
//! ([`connection`]), and runs each job it receives ([`job`]): fetch the
//! inputs its store lacks, build the derivation with its nix-daemon while
//! streaming the log, upload the outputs, report. Jobs outlive
//! connections ([`jobs`]): a runner that goes away and comes back (or a
//! standby that takes over) re-adopts them, and their records on disk
//! ([`records`]) let a restarted builder hand over what it had finished.

pub mod client;
pub mod config;
pub mod connection;
pub mod job;
pub mod jobs;
pub mod records;
pub mod spool;
pub mod substitute;

pub use config::BuilderConfig;
pub use connection::run;

use thiserror::Error;

/// Errors that end the builder: reconnecting would not help.
#[derive(Debug, Error)]
pub enum BuilderError {
    #[error("invalid runner URL '{url}': {source}")]
    BadUrl {
        url: String,
        source: tonic::transport::Error,
    },
    #[error(transparent)]
    Refused(#[from] hydra_proto::HandshakeError),
    #[error("cannot read {path}: {source}")]
    File {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("the builder token is not usable in a header: {0}")]
    BadToken(String),
    #[error("cannot use the state directory {path}: {source}")]
    State {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error("TLS settings for {url}: {source}")]
    Tls {
        url: String,
        source: tonic::transport::Error,
    },
}
