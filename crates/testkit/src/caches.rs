//! Helpers for binary-cache tests: a signing key made by Nix itself, and
//! waiting for the runner's upload queue to drain, and a local S3 server.

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

/// Nix options that make `cache` the only substituter, trusting `public`
/// (signatures required).
pub fn from_cache<'a>(cache: &'a str, public: &'a str) -> Vec<&'a str> {
    vec![
        "--option",
        "substituters",
        cache,
        "--option",
        "trusted-public-keys",
        public,
        "--option",
        "require-sigs",
        "true",
    ]
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

/// A local S3-compatible server (moto, from PyPI: `pip install
/// 'moto[server]'`, which scripts/test.sh does) with a bucket `cache`;
/// the runner reaches it with the credentials `test` / `test`.
pub struct S3Server {
    child: tokio::process::Child,
    pub endpoint: String,
}

impl S3Server {
    pub async fn start() -> S3Server {
        let address = crate::process::free_address().unwrap();
        let port = address.rsplit(':').next().unwrap().to_owned();
        let mut command = tokio::process::Command::new("moto_server");
        command.args(["-H", "127.0.0.1", "-p", &port]);
        let child = crate::process::start_server(command, "Running on", Duration::from_secs(90))
            .await
            .unwrap();
        let endpoint = format!("http://{address}");
        let made = tokio::process::Command::new("curl")
            .args(["-sf", "-X", "PUT", &format!("{endpoint}/cache")])
            .status()
            .await
            .unwrap();
        assert!(made.success(), "creating the bucket");
        S3Server { child, endpoint }
    }

    /// The destination URL the runner is given.
    pub fn destination(&self) -> String {
        format!("s3://cache?endpoint={}&region=us-east-1", self.endpoint)
    }

    /// The environment the runner needs for it.
    pub fn credentials() -> [(&'static str, &'static str); 2] {
        [
            ("AWS_ACCESS_KEY_ID", "test"),
            ("AWS_SECRET_ACCESS_KEY", "test"),
        ]
    }

    fn client(&self) -> object_store::aws::AmazonS3 {
        object_store::aws::AmazonS3Builder::new()
            .with_bucket_name("cache")
            .with_endpoint(&self.endpoint)
            .with_allow_http(true)
            .with_region("us-east-1")
            .with_access_key_id("test")
            .with_secret_access_key("test")
            .build()
            .unwrap()
    }

    /// An object of the bucket, read with credentials (moto refuses
    /// anonymous reads of objects).
    pub async fn get(&self, key: &str) -> Option<Vec<u8>> {
        use object_store::ObjectStore;
        let found = self
            .client()
            .get(&object_store::path::Path::from(key))
            .await
            .ok()?;
        Some(found.bytes().await.unwrap().to_vec())
    }

    /// An object's size and ETag, without reading it (a multipart
    /// object's ETag ends in `-<number of parts>`).
    pub async fn head(&self, key: &str) -> Option<(u64, Option<String>)> {
        use object_store::ObjectStore;
        let meta = self
            .client()
            .head(&object_store::path::Path::from(key))
            .await
            .ok()?;
        Some((meta.size, meta.e_tag))
    }
}

impl Drop for S3Server {
    fn drop(&mut self) {
        let _ = self.child.start_kill();
    }
}
