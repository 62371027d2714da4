//! A `file://` binary cache: a directory in Nix's binary-cache layout.
//! Files are written under a temporary name and renamed, and the narinfo
//! last, so a reader never sees a narinfo whose NAR is not complete.

use std::path::{Path, PathBuf};

use hydra_nix::Hash;
use hydra_nix::binary_cache::{NarInfo, SecretKey, cache_info, listing, realisation_doi};
use hydra_nix::daemon::DaemonClient;
use thiserror::Error;

use crate::Shared;

#[derive(Debug, Error)]
pub enum UploadError {
    #[error("writing {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
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
}

pub struct FileCache {
    root: PathBuf,
}

impl FileCache {
    pub fn from_url(url: &str) -> Option<FileCache> {
        url.strip_prefix("file://")
            .map(|p| FileCache { root: p.into() })
    }

    /// The directories and `nix-cache-info` (before every upload: a cache
    /// that was not there may have come).
    pub fn init(&self) -> Result<(), UploadError> {
        for dir in [
            self.root.clone(),
            self.root.join("nar"),
            self.root.join("realisations"),
        ] {
            std::fs::create_dir_all(&dir)
                .map_err(|source| UploadError::Write { path: dir, source })?;
        }
        let info = self.root.join("nix-cache-info");
        if !info.exists() {
            write_atomic(&info, cache_info("/nix/store", 40).as_bytes())?;
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
        self.init()?;
        let hash_part = base_name(path)
            .split('-')
            .next()
            .unwrap_or_default()
            .to_owned();
        let narinfo_path = self.root.join(format!("{hash_part}.narinfo"));
        if narinfo_path.exists() {
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
        write_atomic(&self.root.join(&url), &compressed)?;
        write_atomic(&self.root.join(format!("{hash_part}.ls")), ls.as_bytes())?;
        let mut narinfo = NarInfo {
            path: info.path.clone(),
            url,
            compression: "zstd".into(),
            file_hash,
            file_size: compressed.len() as u64,
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
        write_atomic(&narinfo_path, narinfo.to_text().as_bytes())
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
        self.init()?;
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
        write_atomic(
            &self.root.join("realisations").join(format!("{id}.doi")),
            doi.as_bytes(),
        )
    }
}

impl FileCache {
    /// The NAR size and references the cache's narinfo gives for `path`,
    /// if the cache has it.
    pub fn read_narinfo(&self, path: &str) -> Option<super::presence::InCache> {
        let hash_part = base_name(path).split('-').next()?;
        let text = std::fs::read_to_string(self.root.join(format!("{hash_part}.narinfo"))).ok()?;
        let mut nar_size = None;
        let mut references = Vec::new();
        for line in text.lines() {
            if let Some(v) = line.strip_prefix("NarSize: ") {
                nar_size = v.trim().parse().ok();
            } else if let Some(v) = line.strip_prefix("References: ") {
                let dir = path.rsplit_once('/').map_or("", |(d, _)| d);
                references = v.split_whitespace().map(|r| format!("{dir}/{r}")).collect();
            }
        }
        Some(super::presence::InCache {
            nar_size: nar_size?,
            references,
        })
    }
}

fn base_name(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

fn write_atomic(path: &Path, bytes: &[u8]) -> Result<(), UploadError> {
    let err = |source| UploadError::Write {
        path: path.to_owned(),
        source,
    };
    let tmp = path.with_extension(format!("tmp-{}", std::process::id()));
    std::fs::write(&tmp, bytes).map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)
}
