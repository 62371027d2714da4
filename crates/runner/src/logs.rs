//! Build logs, one per step, under `<data_dir>/build-logs` in Hydra's layout
//! (`<first two characters of the .drv base name>/<the rest>`).
//!
//! A running step's log is a plain file, appended as chunks arrive, so it
//! can be read while the build runs; when the step finishes it is
//! compressed with zstd (`.zst`) and the plain file removed.

use std::io::Write;
use std::path::{Path, PathBuf};

use hydra_nix::StorePath;
use thiserror::Error;

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
}

impl LogStore {
    pub fn new(data_dir: &Path) -> LogStore {
        LogStore {
            root: data_dir.join("build-logs"),
        }
    }

    /// Where the plain log of `drv` lives while its step runs.
    pub fn path(&self, drv: &StorePath) -> PathBuf {
        let base = drv.to_string();
        self.root.join(&base[..2]).join(&base[2..])
    }

    fn compressed(&self, drv: &StorePath) -> PathBuf {
        let mut p = self.path(drv).into_os_string();
        p.push(".zst");
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
        let _ = std::fs::remove_file(self.compressed(drv));
        Ok(())
    }

    /// Appends a chunk to the running log of `drv`; returns its new size.
    pub fn append(&self, drv: &StorePath, data: &[u8]) -> Result<u64, LogError> {
        let path = self.path(drv);
        let io = |source| LogError::Io {
            path: path.clone(),
            source,
        };
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(&path)
            .map_err(io)?;
        f.write_all(data).map_err(io)?;
        Ok(f.metadata().map_err(io)?.len())
    }

    /// Compresses the finished log of `drv`; returns the file that holds it.
    pub fn finish(&self, drv: &StorePath) -> Result<PathBuf, LogError> {
        let plain = self.path(drv);
        let packed = self.compressed(drv);
        let io = |source| LogError::Io {
            path: plain.clone(),
            source,
        };
        match std::fs::read(&plain) {
            Ok(bytes) => {
                let data = zstd::encode_all(bytes.as_slice(), 3).map_err(io)?;
                std::fs::write(&packed, data).map_err(io)?;
                std::fs::remove_file(&plain).map_err(io)?;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                if !packed.exists() {
                    self.start(drv)?;
                    return self.finish(drv);
                }
            }
            Err(e) => return Err(io(e)),
        }
        Ok(packed)
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

    /// The log of `drv`, running or finished; None if there is none.
    pub fn read(&self, drv: &StorePath) -> Result<Option<Vec<u8>>, LogError> {
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
        let packed = self.compressed(drv);
        match std::fs::read(&packed) {
            Ok(bytes) => zstd::decode_all(bytes.as_slice())
                .map(Some)
                .map_err(|source| LogError::Io {
                    path: packed,
                    source,
                }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
            Err(source) => Err(LogError::Io {
                path: packed,
                source,
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_log_reads_the_same_while_running_and_after_compression() {
        let dir = tempfile::tempdir().unwrap();
        let logs = LogStore::new(dir.path());
        let drv = StorePath::from_base_name("7rjj86a15146cq1d3qy068lml7n8ykzm-hello.drv").unwrap();
        assert_eq!(logs.read(&drv).unwrap(), None);
        logs.start(&drv).unwrap();
        logs.append(&drv, b"line 1\n").unwrap();
        assert_eq!(logs.append(&drv, b"line 2\n").unwrap(), 14);
        assert_eq!(logs.read(&drv).unwrap().unwrap(), b"line 1\nline 2\n");
        assert_eq!(logs.read_from(&drv, 7).unwrap().unwrap(), b"line 2\n");
        let packed = logs.finish(&drv).unwrap();
        assert!(
            packed
                .to_string_lossy()
                .ends_with("/7r/jj86a15146cq1d3qy068lml7n8ykzm-hello.drv.zst")
        );
        assert!(!logs.path(&drv).exists());
        assert_eq!(logs.read(&drv).unwrap().unwrap(), b"line 1\nline 2\n");
        assert_eq!(logs.read_from(&drv, 7).unwrap().unwrap(), b"line 2\n");
        assert_eq!(logs.read_from(&drv, 99).unwrap().unwrap(), b"");
    }
}
