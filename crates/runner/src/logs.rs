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

use std::io::Write;
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

#[derive(Debug, Clone)]
pub struct LogStore {
    root: PathBuf,
    compression: LogCompression,
}

/// The forms a finished log may have, as hydra-web looks for them.
const COMPRESSED: [&str; 2] = [".zst", ".bz2"];

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
    pub fn start(&self, drv: &StorePath) -> Result<(), LogError> {
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
    pub fn append(&self, drv: &StorePath, data: &[u8]) -> Result<u64, LogError> {
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
    pub fn finish(&self, drv: &StorePath) -> Result<PathBuf, LogError> {
        let plain = self.path(drv);
        let io = |source| LogError::Io {
            path: plain.clone(),
            source,
        };
        if !plain.exists() && !COMPRESSED.iter().any(|s| self.with_suffix(drv, s).exists()) {
            // No attempt wrote a log (it never started): an empty one, so
            // that every finished step has one.
            self.start(drv)?;
        }
        if self.compression == LogCompression::Zstd {
            match std::fs::read(&plain) {
                Ok(bytes) => {
                    let data = zstd::encode_all(bytes.as_slice(), 3).map_err(io)?;
                    std::fs::write(self.with_suffix(drv, ".zst"), data).map_err(io)?;
                    std::fs::remove_file(&plain).map_err(io)?;
                }
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                Err(e) => return Err(io(e)),
            }
        }
        Ok(plain)
    }

    /// The log of `drv` from byte `offset` on, running or finished; None if
    /// there is none. A reader that follows a running log calls it again
    /// with the bytes it has read so far.
    pub fn read_from(&self, drv: &StorePath, offset: u64) -> Result<Option<Vec<u8>>, LogError> {
        use std::io::{Read, Seek, SeekFrom};
        let plain = self.path(drv);
        let io = |source| LogError::Io {
            path: plain.clone(),
            source,
        };
        match std::fs::File::open(&plain) {
            Ok(mut f) => {
                f.seek(SeekFrom::Start(offset)).map_err(io)?;
                let mut rest = Vec::new();
                f.read_to_end(&mut rest).map_err(io)?;
                return Ok(Some(rest));
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(e)),
        }
        Ok(self.read(drv)?.map(|all| {
            let start = (offset as usize).min(all.len());
            all[start..].to_vec()
        }))
    }

    /// The log of `drv`, running or finished (plain, `.zst` or, compressed
    /// by hydra-notify, `.bz2`); None if there is none.
    pub fn read(&self, drv: &StorePath) -> Result<Option<Vec<u8>>, LogError> {
        use std::io::Read;
        let plain = self.path(drv);
        match std::fs::read(&plain) {
            Ok(bytes) => return Ok(Some(bytes)),
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
                Ok(f) => f,
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                Err(e) => return Err(io(e)),
            };
            let mut out = Vec::new();
            match suffix {
                ".zst" => {
                    zstd::stream::read::Decoder::new(file)
                        .and_then(|mut d| d.read_to_end(&mut out))
                        .map_err(io)?;
                }
                _ => {
                    bzip2::read::MultiBzDecoder::new(file)
                        .read_to_end(&mut out)
                        .map_err(io)?;
                }
            }
            return Ok(Some(out));
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_log_reads_the_same_while_running_and_after_compression() {
        let dir = tempfile::tempdir().unwrap();
        let logs = LogStore::new(dir.path(), LogCompression::Zstd);
        let drv = StorePath::from_base_name("7rjj86a15146cq1d3qy068lml7n8ykzm-hello.drv").unwrap();
        assert_eq!(logs.read(&drv).unwrap(), None);
        logs.start(&drv).unwrap();
        logs.append(&drv, b"line 1\n").unwrap();
        assert_eq!(logs.append(&drv, b"line 2\n").unwrap(), 14);
        assert_eq!(logs.read(&drv).unwrap().unwrap(), b"line 1\nline 2\n");
        assert_eq!(logs.read_from(&drv, 7).unwrap().unwrap(), b"line 2\n");
        let named = logs.finish(&drv).unwrap();
        assert!(
            named
                .to_string_lossy()
                .ends_with("/build-logs/7r/jj86a15146cq1d3qy068lml7n8ykzm-hello.drv"),
            "step_finished names the plain file, as Hydra's runner does"
        );
        assert!(!named.exists());
        assert!(logs.path(&drv).with_extension("drv.zst").exists());
        assert_eq!(logs.read(&drv).unwrap().unwrap(), b"line 1\nline 2\n");
        assert_eq!(logs.read_from(&drv, 7).unwrap().unwrap(), b"line 2\n");
        assert_eq!(logs.read_from(&drv, 99).unwrap().unwrap(), b"");
    }

    #[test]
    fn with_no_compression_the_plain_log_stays_and_a_bzip2_one_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let logs = LogStore::new(dir.path(), LogCompression::None);
        let drv = StorePath::from_base_name("7rjj86a15146cq1d3qy068lml7n8ykzm-hello.drv").unwrap();
        logs.start(&drv).unwrap();
        logs.append(&drv, b"caf\xe9\n").unwrap();
        let named = logs.finish(&drv).unwrap();
        assert_eq!(std::fs::read(&named).unwrap(), b"caf\xe9\n");
        // hydra-notify's CompressLog: bzip2 --force <the named file>.
        let status = std::process::Command::new("bzip2")
            .arg("--force")
            .arg(&named)
            .status()
            .unwrap();
        assert!(status.success());
        assert!(!named.exists());
        assert_eq!(logs.read(&drv).unwrap().unwrap(), b"caf\xe9\n");
        assert_eq!(logs.read_from(&drv, 3).unwrap().unwrap(), b"\xe9\n");
    }
}
