//! A destination binary cache in Nix's layout, over `object_store`:
//! `file:///dir` (a local directory; writes are atomic renames) or
//! `s3://bucket?endpoint=...&region=...` (S3 or an S3-compatible server;
//! credentials from `AWS_ACCESS_KEY_ID` / `AWS_SECRET_ACCESS_KEY` in the
//! environment). The NAR and its listing are written before the narinfo,
//! so a reader never sees a narinfo whose NAR is missing.
//!
//! Nothing is held whole: a NAR streams out of the runner's store through
//! zstd into an unnamed spool file (under `spool_dir`; its name, the
//! compressed file's hash, is known only at its end) while its listing is
//! read off the same stream, all on a blocking thread. Objects up to
//! [`PART`] go up in one PUT, larger ones in parts of [`PART`] or more
//! (S3 multipart; a file:// cache writes a staging file renamed at the
//! end), with at most [`PARTS_IN_FLIGHT`] parts in memory at once.

use std::io::{Read, Seek, Write};
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use hydra_nix::Hash;
use hydra_nix::binary_cache::{NarInfo, SecretKey, cache_info, realisation_doi};
use hydra_nix::daemon::DaemonClient;
use object_store::path::Path as Key;
use object_store::{ObjectStore, PutPayload, WriteMultipart};
use sha2::{Digest, Sha256};
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
    #[error("reading what is uploaded: {0}")]
    Read(std::io::Error),
    #[error("the spool file under {dir}: {source}")]
    Spool { dir: String, source: std::io::Error },
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

/// Objects up to this size go up in one PUT; larger ones in parts of this
/// size (S3's smallest part is 5 MiB) or more.
pub const PART: usize = 8 << 20;
/// Parts uploading at once: with the one being filled, what an upload
/// holds in memory is at most this plus one parts.
pub const PARTS_IN_FLIGHT: usize = 2;
/// S3 takes at most 10,000 parts; a larger object gets larger parts.
const MAX_PARTS: u64 = 9_000;

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

    /// Uploads what `reader` gives (read on blocking threads, a part at a
    /// time): one PUT when it is at most [`PART`], else in parts of
    /// `part` (at least [`PART`]). `size` (when known) sizes the parts.
    async fn put_streamed(
        &self,
        name: &str,
        reader: Box<dyn Read + Send>,
        size: Option<u64>,
    ) -> Result<(), UploadError> {
        let part = size.map_or(PART, |s| PART.max(s.div_ceil(MAX_PARTS) as usize));
        let (mut reader, first) = read_part(reader, part).await?;
        if first.len() < part {
            return self.put(name, first).await;
        }
        let upload = self.store.put_multipart(&self.key(name)).await?;
        let mut writer = WriteMultipart::new_with_chunk_size(upload, part);
        let mut chunk = first;
        let result = async {
            loop {
                writer.wait_for_capacity(PARTS_IN_FLIGHT).await?;
                writer.write(&chunk);
                if chunk.len() < part {
                    return Ok(());
                }
                let (r, next) = read_part(reader, part).await?;
                (reader, chunk) = (r, next);
                if chunk.is_empty() {
                    return Ok(());
                }
            }
        }
        .await;
        match result {
            Ok(()) => {
                writer.finish().await?;
                Ok(())
            }
            Err(e) => {
                let _ = writer.abort().await;
                Err(e)
            }
        }
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

    /// Whether the cache has `path` already (its narinfo, written last).
    pub async fn has_path(&self, path: &str) -> Result<bool, UploadError> {
        self.exists(&format!("{}.narinfo", hash_part(path))).await
    }

    /// The NAR (zstd), its `.ls` listing and the signed narinfo of a path
    /// [`pack_path`] made (one packing serves every destination).
    pub async fn upload_path(
        &self,
        packed: &PackedPath,
        key: Option<&SecretKey>,
    ) -> Result<(), UploadError> {
        self.init().await?;
        let started = std::time::Instant::now();
        let PackedPath {
            info,
            spool,
            listing,
            file_hash,
            file_size,
            packed_in,
        } = packed;
        let mut nar = spool.try_clone().map_err(UploadError::Read)?;
        nar.rewind().map_err(UploadError::Read)?;
        let url = format!("nar/{}.nar.zst", file_hash.to_base32());
        self.put_streamed(&url, Box::new(nar), Some(*file_size))
            .await?;
        if *file_size >= PART as u64 {
            // Large uploads take a while: say what they cost.
            tracing::info!(
                path = info.path,
                nar_size = info.nar_size,
                file_size,
                compressed_secs = packed_in.as_secs_f64(),
                uploaded_secs = started.elapsed().as_secs_f64(),
                "published a large NAR"
            );
        }
        let hash_part = hash_part(&info.path);
        self.put(&format!("{hash_part}.ls"), listing.clone())
            .await?;
        let mut narinfo = NarInfo {
            path: info.path.clone(),
            url,
            compression: "zstd".into(),
            file_hash: file_hash.clone(),
            file_size: *file_size,
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
        self.put(&format!("{hash_part}.narinfo"), narinfo.to_text())
            .await
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
    /// log replaces the earlier one); streamed, decompressed as it goes.
    pub async fn upload_log(&self, shared: &Shared, drv: &str) -> Result<(), UploadError> {
        let path = shared
            .store
            .dir()
            .parse_path(drv)
            .map_err(|e| UploadError::Log(e.to_string()))?;
        let logs = shared.logs.clone();
        let log = tokio::task::spawn_blocking(move || logs.open_at(&path, 0))
            .await
            .map_err(|e| UploadError::Log(e.to_string()))?
            .map_err(|e| UploadError::Log(e.to_string()))?
            .ok_or_else(|| UploadError::Log(format!("no log of {drv}")))?;
        self.put_streamed(&format!("log/{}", base_name(drv)), Box::new(log), None)
            .await
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

/// A store path ready to publish: its NAR compressed into a spool file,
/// its listing and hashes.
pub struct PackedPath {
    pub info: hydra_nix::daemon::PathInfo,
    spool: std::fs::File,
    listing: String,
    file_hash: Hash,
    file_size: u64,
    packed_in: std::time::Duration,
}

/// Streams `path` out of the runner's store through zstd into an unnamed
/// spool file under `spool_dir` (gone with its handle, even if the runner
/// dies), walking its listing on the way.
pub async fn pack_path(
    client: &mut DaemonClient,
    path: &str,
    spool_dir: &Path,
) -> Result<PackedPath, UploadError> {
    let info = client
        .query_path_info(path)
        .await?
        .ok_or_else(|| UploadError::Missing(path.to_owned()))?;
    let started = std::time::Instant::now();
    let spool = tempfile::tempfile_in(spool_dir).map_err(|source| UploadError::Spool {
        dir: spool_dir.display().to_string(),
        source,
    })?;
    let packed = crate::store::export_into(client, &info, move |nar| pack(nar, spool)).await;
    let Packed {
        spool,
        listing,
        file_hash,
        file_size,
    } = match packed {
        Ok(p) => p,
        Err(crate::store::ExportError::Store(e)) => return Err(e.into()),
        Err(crate::store::ExportError::Consumer(e)) => return Err(e),
    };
    Ok(PackedPath {
        info,
        spool,
        listing,
        file_hash,
        file_size,
        packed_in: started.elapsed(),
    })
}

/// What [`pack`] made of a NAR.
struct Packed {
    /// The compressed NAR.
    spool: std::fs::File,
    listing: String,
    file_hash: Hash,
    file_size: u64,
}

/// Compresses the NAR `nar` gives into `spool` while walking it for its
/// listing (blocking).
fn pack(nar: &mut dyn Read, spool: std::fs::File) -> Result<Packed, UploadError> {
    let counted = Counted {
        inner: std::io::BufWriter::with_capacity(1 << 20, spool),
        hash: Sha256::new(),
        size: 0,
    };
    let encoder = zstd::stream::write::Encoder::new(counted, 3).map_err(UploadError::Compress)?;
    let mut tee = Tee { nar, encoder };
    let listing = hydra_nix::binary_cache::listing_of(&mut tee)?;
    let counted = tee.encoder.finish().map_err(UploadError::Compress)?;
    let Counted { inner, hash, size } = counted;
    let spool = inner
        .into_inner()
        .map_err(|e| UploadError::Compress(e.into_error()))?;
    Ok(Packed {
        spool,
        listing,
        file_hash: Hash {
            algo: hydra_nix::HashAlgo::Sha256,
            bytes: hash.finalize().to_vec(),
        },
        file_size: size,
    })
}

/// A reader that copies what is read into an encoder.
struct Tee<'a, W: Write> {
    nar: &'a mut dyn Read,
    encoder: W,
}

impl<W: Write> Read for Tee<'_, W> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = self.nar.read(buf)?;
        self.encoder.write_all(&buf[..n])?;
        Ok(n)
    }
}

/// A writer that hashes and counts what passes.
struct Counted<W> {
    inner: W,
    hash: Sha256,
    size: u64,
}

impl<W: Write> Write for Counted<W> {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let n = self.inner.write(buf)?;
        self.hash.update(&buf[..n]);
        self.size += n as u64;
        Ok(n)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.inner.flush()
    }
}

/// Reads up to `part` bytes off the async threads; fewer only at the end.
async fn read_part(
    mut reader: Box<dyn Read + Send>,
    part: usize,
) -> Result<(Box<dyn Read + Send>, Vec<u8>), UploadError> {
    tokio::task::spawn_blocking(move || {
        let mut buf = Vec::with_capacity(part);
        (&mut reader)
            .take(part as u64)
            .read_to_end(&mut buf)
            .map_err(UploadError::Read)?;
        Ok((reader, buf))
    })
    .await
    .expect("reading does not panic")
}

fn base_name(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

fn hash_part(path: &str) -> &str {
    base_name(path).split('-').next().unwrap_or_default()
}
