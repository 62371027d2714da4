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

/// A conflict PostgreSQL asks the client to retry: a serialization failure
/// (40001) or a deadlock (40P01). The transaction was rolled back; running
/// it again is safe. Anything else is a real fault.
pub fn is_transient(e: &sqlx::Error) -> bool {
    e.as_database_error()
        .and_then(|d| d.code())
        .is_some_and(|code| code == "40001" || code == "40P01")
}
