//! Applying the schema: sqlx's migrator (versioned, checksummed, under an
//! advisory lock) plus a check of Hydra's own `SchemaVersion`.

use sqlx::PgPool;
use sqlx::migrate::{MigrateError as SqlxMigrateError, Migrator};
use thiserror::Error;

/// The Hydra schema version whose tables this runner reads and writes.
pub const HYDRA_SCHEMA_VERSION: i32 = 87;

static MIGRATOR: Migrator = sqlx::migrate!("../../sql");

#[derive(Debug, Error)]
pub enum MigrateError {
    #[error(
        "the database has migration {0}, which this runner does not know: it was migrated by a \
         newer hydra-queue-runner; upgrade this one instead of running it on that database"
    )]
    NewerSchema(i64),
    #[error(
        "the database has Hydra schema version {found}, newer than the {HYDRA_SCHEMA_VERSION} this \
         runner knows; its tables may have changed in ways this runner cannot see"
    )]
    NewerHydraSchema { found: i32 },
    #[error("migration {0} was changed after it was applied to this database (checksum mismatch)")]
    Modified(i64),
    #[error("migration failed: {0}")]
    Failed(#[source] SqlxMigrateError),
    #[error("database error while checking the schema: {0}")]
    Database(#[from] sqlx::Error),
}

/// What [`migrate`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MigrationReport {
    /// Versions applied by this call (empty when the schema was current).
    pub applied: Vec<i64>,
    /// The newest version now applied.
    pub current: i64,
}

/// Brings the database's schema up to date. Idempotent; refuses a database
/// whose schema is newer than this runner's.
pub async fn migrate(pool: &PgPool) -> Result<MigrationReport, MigrateError> {
    check_hydra_schema(pool).await?;
    let before = applied_versions(pool).await?;
    MIGRATOR.run(pool).await.map_err(|e| match e {
        SqlxMigrateError::VersionMissing(v) => MigrateError::NewerSchema(v),
        SqlxMigrateError::VersionMismatch(v) => MigrateError::Modified(v),
        other => MigrateError::Failed(other),
    })?;
    let after = applied_versions(pool).await?;
    let applied = after
        .iter()
        .copied()
        .filter(|v| !before.contains(v))
        .collect();
    Ok(MigrationReport {
        applied,
        current: after.last().copied().unwrap_or(0),
    })
}

async fn applied_versions(pool: &PgPool) -> Result<Vec<i64>, sqlx::Error> {
    let exists: bool = sqlx::query_scalar("select to_regclass('_sqlx_migrations') is not null")
        .fetch_one(pool)
        .await?;
    if !exists {
        return Ok(Vec::new());
    }
    sqlx::query_scalar("select version from _sqlx_migrations where success order by version")
        .fetch_all(pool)
        .await
}

async fn check_hydra_schema(pool: &PgPool) -> Result<(), MigrateError> {
    let exists: bool = sqlx::query_scalar("select to_regclass('schemaversion') is not null")
        .fetch_one(pool)
        .await?;
    if !exists {
        return Ok(());
    }
    let found: Option<i32> = sqlx::query_scalar("select max(version) from SchemaVersion")
        .fetch_one(pool)
        .await?;
    match found {
        Some(found) if found > HYDRA_SCHEMA_VERSION => {
            Err(MigrateError::NewerHydraSchema { found })
        }
        _ => Ok(()),
    }
}
