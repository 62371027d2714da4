//! PostgreSQL for the queue runner: connecting, and the schema.
//!
//! The schema is Hydra's (version 87) for every table Hydra has, plus the
//! runner's own `hqr_` tables. Migrations live in `sql/` at the top of the
//! repository and are applied by [`migrate`] (`hydra-queue-runner migrate`).

mod migrate;
pub mod status;

pub use migrate::{HYDRA_SCHEMA_VERSION, MigrateError, MigrationReport, migrate};

use sqlx::Connection;
use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum ConnectError {
    #[error("invalid database URL: {0}")]
    BadUrl(#[source] sqlx::Error),
    #[error("cannot connect to the database: {0}")]
    Connect(#[source] sqlx::Error),
}

/// A connection pool to the database at `url` (a `postgres://` URL).
///
/// One direct connection is made first: an unreachable server is reported
/// at once, not after the pool's acquire timeout of retries.
pub async fn connect(url: &str, max_connections: u32) -> Result<PgPool, ConnectError> {
    let options: PgConnectOptions = url.parse().map_err(ConnectError::BadUrl)?;
    PgConnection::connect_with(&options)
        .await
        .map_err(ConnectError::Connect)?
        .close()
        .await
        .ok();
    PgPoolOptions::new()
        .max_connections(max_connections)
        .connect_with(options)
        .await
        .map_err(ConnectError::Connect)
}

/// What a database error means for the runner.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// A conflict PostgreSQL asks the client to retry: a serialization
    /// failure (40001) or a deadlock (40P01). The transaction was rolled
    /// back; running it again is safe.
    Transient,
    /// The server refused the data of this statement: a data exception
    /// (class 22: a NUL byte, a number out of range, a value too long) or
    /// an integrity violation (class 23: a row referring to a build that
    /// was deleted meanwhile, a check constraint). Caused by what was
    /// written, not by the database: it ends the step or the request that
    /// wrote it, never the runner (or one bad value would crash-loop it).
    Data,
    /// Anything else: the connection, the pool, the server, the schema.
    /// The runner stops; systemd restarts it.
    Fatal,
}

/// Classifies `e` by its SQLSTATE (see [`Fault`]).
pub fn classify(e: &sqlx::Error) -> Fault {
    let Some(code) = e.as_database_error().and_then(|d| d.code()) else {
        return Fault::Fatal;
    };
    match code.as_ref() {
        "40001" | "40P01" => Fault::Transient,
        c if c.starts_with("22") || c.starts_with("23") => Fault::Data,
        _ => Fault::Fatal,
    }
}

/// A conflict PostgreSQL asks the client to retry (see [`Fault::Transient`]).
pub fn is_transient(e: &sqlx::Error) -> bool {
    classify(e) == Fault::Transient
}

/// A refusal of the data written (see [`Fault::Data`]).
pub fn is_data_error(e: &sqlx::Error) -> bool {
    classify(e) == Fault::Data
}
