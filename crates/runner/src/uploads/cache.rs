//! A destination binary cache in Nix's layout, over `object_store`:
//! `file:///dir` (a local directory; writes are atomic renames) or
//! `s3://bucket?endpoint=...&region=...` (S3 or an S3-compatible server;
//! credentials from `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` in the
//! environment). The NAR and its listing are written before the narinfo,
//! so a reader never sees a narinfo whose NAR is missing.

use std::sync::Arc;

use bytes::Bytes;
use hydra_nix::Hash;
use hydra_nix::binary_cache::{NarInfo, SecretKey, cache_info, listing, realisation_doi};
use hydra_nix::daemon::DaemonClient;
use object_store::path::Path as Key;
use object_store::{ObjectStore, PutPayload};
use thiserror::Error;

use super::presence::InCache;
use crate::Shared;

#[derive(Debug, Error)]
pub enum UploadError {
    #[error("the cache: {0}")]
    Cache(#[from] object_store::Error),
    #[error("{0} is not in the runner's store")]
    Missing(String),
    #[error("the runner's store: {0}")]
    Store(#[from] hydra_nix::daemon::DaemonError),
    #[error("compressing: {0}")]
    Compress(std::io::Error),
    #[error(transparent)]
    Nar(#[from] hydra_nix::nar::NarError),
    #[error("naming the realisation: {0}")]
    Realisation(String),
    #[error("the build log: {0}")]
    Log(String),
}

/// Why a destination URL cannot be used.
#[derive(Debug, Error)]
#[error("destination {url}: {reason}")]
pub struct BadDestination {
    pub url: String,
    pub reason: String,
}

pub struct Cache {
    store: Arc<dyn ObjectStore>,
    /// Key prefix: the directory of a file:// cache, empty for S3.
    root: String,
}

impl Cache {
    pub fn from_url(url: &str) -> Result<Cache, BadDestination> {
        let bad = |reason: String| BadDestination {
            url: url.to_owned(),
            reason,
        };
        if let Some(dir) = url.strip_prefix("file://") {
            if !dir.starts_with('/') {
                return Err(bad("a file:// cache needs an absolute path".into()));
            }
            let store = object_store::local::LocalFileSystem::new().with_automatic_cleanup(true);
            return Ok(Cache {
                store: Arc::new(store),
                root: dir.trim_end_matches('/').trim_start_matches('/').to_owned(),
            });
        }
        if let Some(rest) = url.strip_prefix("s3://") {
            let (bucket, query) = rest.split_once('?').unwrap_or((rest, ""));
            let mut builder =
                object_store::aws::AmazonS3Builder::from_env().with_bucket_name(bucket);
            for pair in query.split('&').filter(|p| !p.is_empty()) {
                let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                builder = match k {
                    "endpoint" => builder
                        .with_endpoint(v)
                        .with_allow_http(v.starts_with("http://")),
                    "region" => builder.with_region(v),
                    other => return Err(bad(format!("unknown parameter {other:?}"))),
                };
            }
            let store = builder.build().map_err(|e| bad(e.to_string()))?;
            return Ok(Cache {
                store: Arc::new(store),
                root: String::new(),
            });
        }
        Err(bad("only file:// and s3:// caches are supported".into()))
    }

    fn key(&self, name: &str) -> Key {
        if self.root.is_empty() {
            Key::from(name)
        } else {
            Key::from(format!("{}/{name}", self.root))
        }
    }

    async fn put(&self, name: &str, bytes: impl Into<Bytes>) -> Result<(), UploadError> {
        let payload = PutPayload::from_bytes(bytes.into());
        self.store.put(&self.key(name), payload).await?;
        Ok(())
    }

    async fn get(&self, name: &str) -> Result<Option<Bytes>, UploadError> {
        match self.store.get(&self.key(name)).await {
            Ok(found) => Ok(Some(found.bytes().await?)),
            Err(object_store::Error::NotFound { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    async fn exists(&self, name: &str) -> Result<bool, UploadError> {
        match self.store.head(&self.key(name)).await {
            Ok(_) => Ok(true),
            Err(object_store::Error::NotFound { .. }) => Ok(false),
            Err(e) => Err(e.into()),
        }
    }

    /// `nix-cache-info`, once.
    async fn init(&self) -> Result<(), UploadError> {
        if !self.exists("nix-cache-info").await? {
            self.put("nix-cache-info", cache_info("/nix/store", 40))
                .await?;
        }
        Ok(())
    }

    /// The NAR (zstd), its `.ls` listing and the signed narinfo of `path`.
    pub async fn upload_path(
        &self,
        client: &mut DaemonClient,
        path: &str,
        key: Option<&SecretKey>,
    ) -> Result<(), UploadError> {
        self.init().await?;
        let hash_part = hash_part(path);
        let narinfo_name = format!("{hash_part}.narinfo");
        if self.exists(&narinfo_name).await? {
            return Ok(()); // published by an earlier claim that died late
        }
        let info = client
            .query_path_info(path)
            .await?
            .ok_or_else(|| UploadError::Missing(path.to_owned()))?;
        let mut nar = Vec::new();
        client.export_nar(&info, &mut nar).await?;
        let (compressed, ls) = tokio::task::spawn_blocking(move || {
            let compressed = zstd::encode_all(nar.as_slice(), 3).map_err(UploadError::Compress)?;
            let ls = listing(&nar)?;
            Ok::<_, UploadError>((compressed, ls))
        })
        .await
        .expect("compression does not panic")?;
        let file_hash = Hash::sha256(&compressed);
        let url = format!("nar/{}.nar.zst", file_hash.to_base32());
        let file_size = compressed.len() as u64;
        self.put(&url, compressed).await?;
        self.put(&format!("{hash_part}.ls"), ls).await?;
        let mut narinfo = NarInfo {
            path: info.path.clone(),
            url,
            compression: "zstd".into(),
            file_hash,
            file_size,
            nar_hash: info.nar_hash.clone(),
            nar_size: info.nar_size,
            references: info.references.clone(),
            deriver: info.deriver.clone(),
            ca: info.ca.clone(),
            sigs: info.signatures.clone(),
        };
        if let Some(key) = key {
            narinfo.sign(key);
        }
        self.put(&narinfo_name, narinfo.to_text()).await
    }

    /// `realisations/<id>.doi` for output `item` (`<drv>!<output>`).
    pub async fn upload_realisation(
        &self,
        shared: &Shared,
        client: &mut DaemonClient,
        item: &str,
        out_path: &str,
        key: Option<&SecretKey>,
    ) -> Result<(), UploadError> {
        self.init().await?;
        let (drv, output) = item
            .rsplit_once('!')
            .ok_or_else(|| UploadError::Realisation(format!("bad item {item}")))?;
        let drv_path = shared
            .store
            .dir()
            .parse_path(drv)
            .map_err(|e| UploadError::Realisation(e.to_string()))?;
        let hashes = crate::realisations::output_hashes(shared, client, &drv_path)
            .await
            .map_err(|e| UploadError::Realisation(e.to_string()))?;
        let hash = hashes
            .hashes
            .get(output)
            .ok_or_else(|| UploadError::Realisation(format!("{drv} has no output {output}")))?;
        let id = hydra_nix::derivation::hashing::drv_output_id(hash, output);
        let doi = realisation_doi(&id, base_name(out_path), key);
        self.put(&format!("realisations/{id}.doi"), doi).await
    }

    /// The build log of `drv` (a full `.drv` path) as `log/<base name>`,
    /// plain, where `nix log --store <cache>` reads it (a rebuilt step's
    /// log replaces the earlier one).
    pub async fn upload_log(&self, shared: &Shared, drv: &str) -> Result<(), UploadError> {
        let path = shared
            .store
            .dir()
            .parse_path(drv)
            .map_err(|e| UploadError::Log(e.to_string()))?;
        let logs = shared.logs.clone();
        let bytes = tokio::task::spawn_blocking(move || logs.read(&path))
            .await
            .map_err(|e| UploadError::Log(e.to_string()))?
            .map_err(|e| UploadError::Log(e.to_string()))?
            .ok_or_else(|| UploadError::Log(format!("no log of {drv}")))?;
        self.put(&format!("log/{}", base_name(drv)), bytes).await
    }

    /// The NAR size and references the cache's narinfo gives for `path`,
    /// if the cache has it.
    pub async fn read_narinfo(&self, path: &str) -> Result<Option<InCache>, UploadError> {
        let Some(bytes) = self.get(&format!("{}.narinfo", hash_part(path))).await? else {
            return Ok(None);
        };
        // What a cache serves is outside bytes: read with the checked
        // parser; a narinfo that does not parse counts as missing.
        let text = String::from_utf8_lossy(&bytes);
        match hydra_nix::binary_cache::NarInfo::parse(&text, &hydra_nix::StoreDir::default()) {
            Ok(info) if info.path == path => Ok(Some(InCache {
                nar_size: info.nar_size,
                references: info.references,
            })),
            Ok(info) => {
                tracing::warn!("the narinfo for {path} describes {}: ignored", info.path);
                Ok(None)
            }
            Err(e) => {
                tracing::warn!("the cache's narinfo for {path} is unreadable: {e}");
                Ok(None)
            }
        }
    }
}

fn base_name(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

fn hash_part(path: &str) -> &str {
    base_name(path).split('-').next().unwrap_or_default()
}
