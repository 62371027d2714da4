//! A job's build log on the builder's disk, written as Nix prints it and
//! read from any offset: what reaches the runner is streamed from here, so
//! a runner that comes back (or a standby) gets the rest of the log from
//! where its own copy ends.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use parking_lot::Mutex;
use tokio::sync::Notify;

/// What one read hands out at most (one LogChunk).
pub const CHUNK: usize = 64 << 10;

pub struct Spool {
    path: PathBuf,
    /// Made at the first byte: a silent build makes no file (a file made
    /// costs more CPU than the rest of a trivial job's bookkeeping).
    file: Mutex<Option<std::fs::File>>,
    len: AtomicU64,
    closed: AtomicBool,
    grown: Notify,
}

impl Spool {
    /// A new, empty log (removing one left by an earlier run).
    pub fn create(path: &Path) -> std::io::Result<Spool> {
        match std::fs::remove_file(path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
            _ => {}
        }
        Ok(Self::with(path, None, 0, false))
    }

    /// The complete log of a job that finished before this process started
    /// (empty when there is none).
    pub fn finished(path: &Path) -> std::io::Result<Spool> {
        let file = match std::fs::OpenOptions::new().read(true).open(path) {
            Ok(f) => f,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Ok(Self::with(path, None, 0, true));
            }
            Err(e) => return Err(e),
        };
        let len = file.metadata()?.len();
        Ok(Self::with(path, Some(file), len, true))
    }

    fn with(path: &Path, file: Option<std::fs::File>, len: u64, closed: bool) -> Spool {
        Spool {
            path: path.to_owned(),
            file: Mutex::new(file),
            len: AtomicU64::new(len),
            closed: AtomicBool::new(closed),
            grown: Notify::new(),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends a piece of the log. A log that cannot be written is lost
    /// from here on (the build goes on; the runner keeps what it got).
    pub fn append(&self, bytes: &[u8]) {
        if bytes.is_empty() {
            return;
        }
        let mut f = self.file.lock();
        let at = self.len.load(Ordering::Acquire);
        let written = match &mut *f {
            Some(f) => f.seek(SeekFrom::Start(at)).and_then(|_| f.write_all(bytes)),
            None => std::fs::OpenOptions::new()
                .create(true)
                .truncate(true)
                .read(true)
                .write(true)
                .open(&self.path)
                .and_then(|new| f.insert(new).write_all(bytes)),
        };
        match written {
            Ok(()) => {
                self.len.fetch_add(bytes.len() as u64, Ordering::AcqRel);
                self.grown.notify_waiters();
            }
            Err(e) => {
                tracing::warn!(path = %self.path.display(), "cannot write the build log: {e}")
            }
        }
    }

    /// The log is complete.
    pub fn close(&self) {
        self.closed.store(true, Ordering::Release);
        self.grown.notify_waiters();
    }

    pub fn len(&self) -> u64 {
        self.len.load(Ordering::Acquire)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn is_closed(&self) -> bool {
        self.closed.load(Ordering::Acquire)
    }

    /// Up to [`CHUNK`] bytes from `offset` (empty at the end).
    pub fn read_at(&self, offset: u64) -> std::io::Result<Vec<u8>> {
        let len = self.len();
        if offset >= len {
            return Ok(Vec::new());
        }
        let want = ((len - offset) as usize).min(CHUNK);
        let mut buf = vec![0; want];
        let mut f = self.file.lock();
        let f = f.as_mut().expect("a log with bytes has its file");
        f.seek(SeekFrom::Start(offset))?;
        f.read_exact(&mut buf)?;
        Ok(buf)
    }

    /// Waits until there is more than `offset` bytes, or the log is
    /// complete.
    pub async fn wait_beyond(&self, offset: u64) {
        loop {
            let grown = self.grown.notified();
            if self.len() > offset || self.is_closed() {
                return;
            }
            grown.await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_log_is_read_back_from_any_offset_while_it_grows() {
        let dir = tempfile::tempdir().unwrap();
        let spool = std::sync::Arc::new(Spool::create(&dir.path().join("a.log")).unwrap());
        spool.append(b"first\n");
        assert_eq!(spool.read_at(0).unwrap(), b"first\n");
        assert_eq!(spool.read_at(3).unwrap(), b"st\n");
        assert!(spool.read_at(6).unwrap().is_empty());

        let waiting = {
            let spool = spool.clone();
            tokio::spawn(async move { spool.wait_beyond(6).await })
        };
        spool.append(b"second\n");
        waiting.await.unwrap();
        spool.close();
        spool.wait_beyond(100).await; // complete: returns at once
        let reopened = Spool::finished(spool.path()).unwrap();
        assert_eq!(reopened.len(), 13);
        assert!(reopened.is_closed());
        assert_eq!(reopened.read_at(6).unwrap(), b"second\n");
    }

    #[tokio::test]
    async fn a_silent_build_leaves_no_file_and_reads_back_empty() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.log");
        std::fs::write(&path, "left by an earlier run\n").unwrap();
        let spool = Spool::create(&path).unwrap();
        assert!(!path.exists(), "an earlier run's log is not this job's");
        spool.append(b"");
        spool.close();
        assert!(!path.exists(), "no byte, no file");
        let reopened = Spool::finished(&path).unwrap();
        assert!(reopened.is_empty() && reopened.is_closed());
        assert!(reopened.read_at(0).unwrap().is_empty());
        assert!(!path.exists(), "reading an empty log makes none");
    }
}
