//! The builder agent. It keeps a control stream to the queue runner open
//! ([`connection`]), and runs each job it receives ([`job`]): fetch the
//! inputs its store lacks, build the derivation with its nix-daemon while
//! streaming the log, upload the outputs, report.

pub mod config;
pub mod connection;
pub mod job;
pub mod substitute;

pub use config::BuilderConfig;
pub use connection::{BuilderError, run};
