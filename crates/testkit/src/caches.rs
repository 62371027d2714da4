//! Helpers for binary-cache tests: a signing key made by Nix itself, and
//! waiting for the runner's upload queue to drain.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Result, bail};
use sqlx::PgPool;
use sqlx::postgres::PgListener;

use crate::NixStore;

/// A key pair from `nix-store --generate-binary-cache-key` (run in
/// `store`'s namespace): the secret key file, and the public key text.
pub async fn nix_key(store: &NixStore, dir: &Path, name: &str) -> Result<(PathBuf, String)> {
    let (sk, pk) = (
        dir.join(format!("{name}.sk")),
        dir.join(format!("{name}.pk")),
    );
    let path = |p: &Path| p.to_str().expect("UTF-8 temp path").to_owned();
    store
        .run(
            "nix-store",
            &["--generate-binary-cache-key", name, &path(&sk), &path(&pk)],
        )
        .await?;
    let public = std::fs::read_to_string(&pk)?.trim().to_owned();
    Ok((sk, public))
}

/// Waits (on `hqr_upload_done`, not by polling) until no upload is pending.
pub async fn uploads_done(pool: &PgPool, limit: Duration) -> Result<()> {
    let mut listener = PgListener::connect_with(pool).await?;
    listener.listen("hqr_upload_done").await?;
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let pending: i64 =
            sqlx::query_scalar("select count(*) from hqr_uploads where done_at is null")
                .fetch_one(pool)
                .await?;
        if pending == 0 {
            return Ok(());
        }
        match tokio::time::timeout_at(deadline, listener.recv()).await {
            Ok(note) => {
                note?;
            }
            Err(_) => bail!("{pending} uploads still pending after {limit:?}"),
        }
    }
}
