//! Build logs, one per step, where Hydra keeps them:
//! `<hydra_data>/build-logs/<first two characters of the .drv base
//! name>/<the rest>`, which hydra-web reads (plain, `.bz2` or `.zst`).
//!
//! A running step's log is a plain file, appended as chunks arrive, so it
//! can be read while the build runs. When the step finishes, the
//! `step_finished` notification names the plain file, as Hydra's runner
//! does; with `log_compression = "zstd"` the runner has compressed it to
//! `.zst` by then (so hydra-notify's CompressLog finds nothing to do),
//! with `"none"` the plain file stays for CompressLog to compress (bzip2
//! by default). Either way every form is read back here.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use hydra_nix::StorePath;
use thiserror::Error;

use crate::config::LogCompression;

#[derive(Debug, Error)]
pub enum LogError {
    #[error("build log {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// A log being read from some byte on: a plain file (which may still grow
/// while its step runs; the open file keeps reading it even after it is
/// compressed away) or a decompressor.
pub struct LogReader {
    inner: Box<dyn Read + Send>,
    path: PathBuf,
}

impl LogReader {
    /// Fills as much of `buf` as the log has now; 0 at its (current) end.
    pub fn fill(&mut self, buf: &mut [u8]) -> Result<usize, LogError> {
        let mut filled = 0;
        while filled < buf.len() {
            match self.inner.read(&mut buf[filled..]) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(source) => {
                    return Err(LogError::Io {
                        path: self.path.clone(),
                        source,
                    });
                }
            }
        }
        Ok(filled)
    }

    /// Copies the rest into `sink`.
    pub fn copy_to(&mut self, sink: &mut impl Write) -> Result<u64, LogError> {
        std::io::copy(&mut self.inner, sink).map_err(|source| LogError::Io {
            path: self.path.clone(),
            source,
        })
    }
}

impl Read for LogReader {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.inner.read(buf)
    }
}

#[derive(Debug, Clone)]
pub struct LogStore {
    root: PathBuf,
    compression: LogCompression,
}

/// The forms a finished log may have, as hydra-web looks for them.
const COMPRESSED: [&str; 2] = [".zst", ".bz2"];

/// Runs blocking file work off the async threads.
async fn blocking<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> T {
    tokio::task::spawn_blocking(work)
        .await
        .expect("log file work does not panic")
}

impl LogStore {
    pub fn new(hydra_data: &Path, compression: LogCompression) -> LogStore {
        LogStore {
            root: hydra_data.join("build-logs"),
            compression,
        }
    }

    /// Where the plain log of `drv` lives (what `step_finished` names).
    pub fn path(&self, drv: &StorePath) -> PathBuf {
        let base = drv.to_string();
        self.root.join(&base[..2]).join(&base[2..])
    }

    fn with_suffix(&self, drv: &StorePath, suffix: &str) -> PathBuf {
        let mut p = self.path(drv).into_os_string();
        p.push(suffix);
        p.into()
    }

    /// Starts an empty log for a new attempt at `drv`.
    pub async fn start(&self, drv: &StorePath) -> Result<(), LogError> {
        let (this, drv) = (self.clone(), drv.clone());
        blocking(move || this.start_blocking(&drv)).await
    }

    fn start_blocking(&self, drv: &StorePath) -> Result<(), LogError> {
        let path = self.path(drv);
        let io = |source| LogError::Io {
            path: path.clone(),
            source,
        };
        std::fs::create_dir_all(path.parent().expect("log path has a parent")).map_err(io)?;
        std::fs::File::create(&path).map_err(io)?;
        for suffix in COMPRESSED {
            let _ = std::fs::remove_file(self.with_suffix(drv, suffix));
        }
        Ok(())
    }

    /// How long the running (plain) log of `drv` is: what a builder that
    /// re-adopts the attempt sends on from.
    pub fn length(&self, drv: &StorePath) -> u64 {
        std::fs::metadata(self.path(drv)).map_or(0, |m| m.len())
    }

    /// Appends a chunk to the running log of `drv`; returns its new size.
    pub async fn append(&self, drv: &StorePath, data: bytes::Bytes) -> Result<u64, LogError> {
        let (this, drv) = (self.clone(), drv.clone());
        blocking(move || this.append_blocking(&drv, &data)).await
    }

    fn append_blocking(&self, drv: &StorePath, data: &[u8]) -> Result<u64, LogError> {
        let path = self.path(drv);
        let io = |source| LogError::Io {
            path: path.clone(),
            source,
        };
        let open = || {
            std::fs::OpenOptions::new()
                .append(true)
                .create(true)
                .open(&path)
        };
        // A runner that re-adopts an attempt may have no log for it yet (a
        // standby keeps its logs elsewhere): it starts one.
        let mut f = match open() {
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                std::fs::create_dir_all(path.parent().expect("log path has a parent"))
                    .map_err(io)?;
                open()
            }
            other => other,
        }
        .map_err(io)?;
        f.write_all(data).map_err(io)?;
        Ok(f.metadata().map_err(io)?.len())
    }

    /// The step of `drv` finished: its log is compressed (with `zstd`) or
    /// left for hydra-notify (with `none`). Returns the plain file's path,
    /// which `step_finished` names as Hydra's runner does.
    pub async fn finish(&self, drv: &StorePath) -> Result<PathBuf, LogError> {
        let (this, drv) = (self.clone(), drv.clone());
        blocking(move || this.finish_blocking(&drv)).await
    }

    fn finish_blocking(&self, drv: &StorePath) -> Result<PathBuf, LogError> {
        let plain = self.path(drv);
        let io = |source| LogError::Io {
            path: plain.clone(),
            source,
        };
        if !plain.exists() && !COMPRESSED.iter().any(|s| self.with_suffix(drv, s).exists()) {
            // No attempt wrote a log (it never started): an empty one, so
            // that every finished step has one.
            self.start_blocking(drv)?;
        }
        if self.compression == LogCompression::Zstd {
            match std::fs::File::open(&plain) {
                // An empty log stays plain: nothing to compress, and a
                // compressed one would cost a second file, a sync and a
                // rename for every silent step.
                Ok(file) if file.metadata().map_err(io)?.len() == 0 => {}
                Ok(file) => {
                    // Streamed through a temporary file renamed into place:
                    // a log of any size costs a buffer, and a reader never
                    // sees half a `.zst`.
                    let packed = self.with_suffix(drv, ".zst");
                    let partial = self.with_suffix(drv, ".zst.partial");
                    let out = std::fs::File::create(&partial).map_err(io)?;
                    let mut writer = std::io::BufWriter::new(out);
                    zstd::stream::copy_encode(file, &mut writer, 3).map_err(io)?;
                    writer
                        .into_inner()
                        .map_err(|e| io(e.into_error()))?
                        .sync_all()
                        .map_err(io)?;
                    std::fs::rename(&partial, &packed).map_err(io)?;
                    std::fs::remove_file(&plain).map_err(io)?;
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io(e)),
            }
        }
        Ok(plain)
    }

    /// Whether `drv` has a log, running or finished.
    pub fn exists(&self, drv: &StorePath) -> bool {
        self.path(drv).exists() || COMPRESSED.iter().any(|s| self.with_suffix(drv, s).exists())
    }

    /// The log of `drv` from byte `offset` on, running (plain) or finished
    /// (plain, `.zst` or, compressed by hydra-notify, `.bz2`); None if there
    /// is none. Blocking: call it off the async threads.
    pub fn open_at(&self, drv: &StorePath, offset: u64) -> Result<Option<LogReader>, LogError> {
        use std::io::{Seek, SeekFrom};
        let plain = self.path(drv);
        match std::fs::File::open(&plain) {
            Ok(mut f) => {
                f.seek(SeekFrom::Start(offset))
                    .map_err(|source| LogError::Io {
                        path: plain.clone(),
                        source,
                    })?;
                return Ok(Some(LogReader {
                    inner: Box::new(f),
                    path: plain,
                }));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(source) => {
                return Err(LogError::Io {
                    path: plain,
                    source,
                });
            }
        }
        for suffix in COMPRESSED {
            let packed = self.with_suffix(drv, suffix);
            let io = |source| LogError::Io {
                path: packed.clone(),
                source,
            };
            let file = match std::fs::File::open(&packed) {
                Ok(f) => std::io::BufReader::new(f),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io(e)),
            };
            let mut inner: Box<dyn Read + Send> = match suffix {
                ".zst" => Box::new(zstd::stream::read::Decoder::with_buffer(file).map_err(io)?),
                _ => Box::new(bzip2::read::MultiBzDecoder::new(file)),
            };
            // A compressed log cannot seek: what comes before the offset is
            // decompressed and dropped.
            std::io::copy(&mut (&mut inner).take(offset), &mut std::io::sink()).map_err(io)?;
            return Ok(Some(LogReader {
                inner,
                path: packed,
            }));
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    impl LogStore {
        fn read(&self, drv: &StorePath) -> Option<Vec<u8>> {
            self.read_from(drv, 0)
        }

        fn read_from(&self, drv: &StorePath, offset: u64) -> Option<Vec<u8>> {
            let mut out = Vec::new();
            self.open_at(drv, offset)
                .unwrap()?
                .copy_to(&mut out)
                .unwrap();
            Some(out)
        }
    }

    /// A log store in a fresh directory, and the derivation the tests log.
    fn fixture(compression: LogCompression) -> (tempfile::TempDir, LogStore, StorePath) {
        let dir = tempfile::tempdir().unwrap();
        let logs = LogStore::new(dir.path(), compression);
        let drv = StorePath::from_base_name("7rjj86a15146cq1d3qy068lml7n8ykzm-hello.drv").unwrap();
        (dir, logs, drv)
    }

    #[tokio::test]
    async fn a_log_reads_the_same_while_running_and_after_compression() {
        let (_dir, logs, drv) = fixture(LogCompression::Zstd);
        assert_eq!(logs.read(&drv), None);
        logs.start(&drv).await.unwrap();
        logs.append(&drv, "line 1\n".into()).await.unwrap();
        assert_eq!(logs.append(&drv, "line 2\n".into()).await.unwrap(), 14);
        assert_eq!(logs.read(&drv).unwrap(), b"line 1\nline 2\n");
        assert_eq!(logs.read_from(&drv, 7).unwrap(), b"line 2\n");
        let named = logs.finish(&drv).await.unwrap();
        assert!(
            named
                .to_string_lossy()
                .ends_with("/build-logs/7r/jj86a15146cq1d3qy068lml7n8ykzm-hello.drv"),
            "step_finished names the plain file, as Hydra's runner does"
        );
        assert!(!named.exists());
        assert!(logs.path(&drv).with_extension("drv.zst").exists());
        assert_eq!(logs.read(&drv).unwrap(), b"line 1\nline 2\n");
        assert_eq!(logs.read_from(&drv, 7).unwrap(), b"line 2\n");
        assert_eq!(logs.read_from(&drv, 99).unwrap(), b"");
    }

    #[tokio::test]
    async fn an_empty_log_stays_plain_and_reads_empty() {
        let (_dir, logs, drv) = fixture(LogCompression::Zstd);
        logs.start(&drv).await.unwrap();
        let named = logs.finish(&drv).await.unwrap();
        assert_eq!(std::fs::read(&named).unwrap(), b"");
        assert!(!logs.path(&drv).with_extension("drv.zst").exists());
        assert!(logs.exists(&drv));
        assert_eq!(logs.read(&drv).unwrap(), b"");
    }

    #[tokio::test]
    async fn with_no_compression_the_plain_log_stays_and_a_bzip2_one_is_read() {
        let (_dir, logs, drv) = fixture(LogCompression::None);
        logs.start(&drv).await.unwrap();
        logs.append(&drv, bytes::Bytes::from_static(b"caf\xe9\n"))
            .await
            .unwrap();
        let named = logs.finish(&drv).await.unwrap();
        assert_eq!(std::fs::read(&named).unwrap(), b"caf\xe9\n");
        // hydra-notify's CompressLog: bzip2 --force <the named file>.
        let status = std::process::Command::new("bzip2")
            .arg("--force")
            .arg(&named)
            .status()
            .unwrap();
        assert!(status.success());
        assert!(!named.exists());
        assert_eq!(logs.read(&drv).unwrap(), b"caf\xe9\n");
        assert_eq!(logs.read_from(&drv, 3).unwrap(), b"\xe9\n");
    }
}
