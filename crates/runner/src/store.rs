//! The runner's own Nix store, reached through its nix-daemon.

use std::path::PathBuf;

use hydra_nix::daemon::{DaemonClient, DaemonError, PathInfo};
use hydra_nix::{Derivation, Hash, StoreDir, StorePath};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum StoreError {
    /// The daemon cannot be reached: the store is broken, the runner stops.
    #[error("cannot reach the runner's nix-daemon at {socket}: {source}")]
    Unreachable {
        socket: PathBuf,
        source: DaemonError,
    },
    #[error("the runner's store: {0}")]
    Daemon(#[from] DaemonError),
    #[error("{path} is not in the runner's store")]
    Missing { path: String },
    #[error("{path} in the runner's store cannot be read as a NAR: {message}")]
    BadNar { path: String, message: String },
    #[error("{path} is not a valid derivation: {message}")]
    BadDerivation { path: String, message: String },
}

impl StoreError {
    /// True when the fault is the store's (the runner must stop), not one
    /// path's.
    pub fn is_infrastructure(&self) -> bool {
        match self {
            StoreError::Unreachable { .. } => true,
            StoreError::Daemon(e) => {
                !matches!(e, DaemonError::Nix { .. } | DaemonError::InvalidPath(_))
            }
            StoreError::Missing { .. }
            | StoreError::BadDerivation { .. }
            | StoreError::BadNar { .. } => false,
        }
    }
}

/// Whether a path read from the store is known to be valid.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Validity {
    /// The daemon said so.
    Valid,
    /// Read from a file: the daemon must still be asked.
    Unchecked,
}

#[derive(Clone)]
pub struct LocalStore {
    socket: PathBuf,
    dir: StoreDir,
    /// Where the store's files are on this machine.
    real_dir: PathBuf,
    /// Dispatch, uploads and completions each want a connection at once.
    spares: std::sync::Arc<hydra_nix::daemon::Spares>,
}

impl LocalStore {
    /// `real_dir`: where the store's files are here (default: the store
    /// directory itself).
    pub fn new(socket: PathBuf, real_dir: Option<PathBuf>) -> LocalStore {
        let dir = StoreDir::default();
        LocalStore {
            spares: hydra_nix::daemon::Spares::new(&socket, 16),
            socket,
            real_dir: real_dir.unwrap_or_else(|| PathBuf::from(dir.as_str())),
            dir,
        }
    }

    pub fn dir(&self) -> &StoreDir {
        &self.dir
    }

    /// A fresh daemon connection (the daemon serves each on its own),
    /// usually made ahead of time.
    pub async fn client(&self) -> Result<DaemonClient, StoreError> {
        self.spares
            .take()
            .await
            .map_err(|source| StoreError::Unreachable {
                socket: self.socket.clone(),
                source,
            })
    }

    /// Gives back a connection after operations that all succeeded and
    /// changed no settings (see [`hydra_nix::daemon::Spares::release`]).
    pub fn release(&self, client: DaemonClient) {
        self.spares.release(client);
    }

    /// Reads and parses the `.drv` at `path`.
    pub async fn read_derivation(
        &self,
        client: &mut DaemonClient,
        path: &StorePath,
    ) -> Result<Derivation, StoreError> {
        let full = self.dir.display(path);
        let Some(info) = client.query_path_info(&full).await? else {
            return Err(StoreError::Missing { path: full });
        };
        let mut nar = Vec::new();
        client.export_nar(&info, &mut nar).await?;
        let bytes =
            hydra_nix::nar::single_file_contents(&nar).map_err(|e| StoreError::BadDerivation {
                path: full.clone(),
                message: format!("not a regular file: {e}"),
            })?;
        Derivation::parse(&self.dir, &bytes).map_err(|e| StoreError::BadDerivation {
            path: full,
            message: e.to_string(),
        })
    }

    /// Reads a `.drv` from its file, as Hydra's queue runner does,
    /// without asking the daemon: `Unchecked` says the caller must
    /// still ask the daemon whether the path is valid (a file can be there
    /// half written, or left by a collection). When the file cannot be
    /// read here, through the daemon ([`LocalStore::read_derivation`]).
    pub async fn read_derivation_file(
        &self,
        client: &mut DaemonClient,
        path: &StorePath,
    ) -> Result<(Derivation, Validity), StoreError> {
        let mut read = self.read_derivations(client, vec![path.clone()]).await;
        read.pop().expect("one read per path")
    }

    /// [`LocalStore::read_derivation_file`] for many `.drv`s: the files in
    /// one blocking task ([`LocalStore::read_derivation_files`]), those that
    /// cannot be read here through the daemon. One result per path, in order.
    pub async fn read_derivations(
        &self,
        client: &mut DaemonClient,
        paths: Vec<StorePath>,
    ) -> Vec<Result<(Derivation, Validity), StoreError>> {
        let files = self.read_derivation_files(paths.clone()).await;
        let mut out = Vec::with_capacity(paths.len());
        for (path, file) in paths.iter().zip(files) {
            out.push(match file {
                Some(parsed) => parsed.map(|drv| (drv, Validity::Unchecked)),
                None => self
                    .read_derivation(client, path)
                    .await
                    .map(|drv| (drv, Validity::Valid)),
            });
        }
        out
    }

    /// The files of many `.drv`s at once, in one blocking task: loading reads hundreds of thousands, and a hop to
    /// the blocking pool for each cost more than the read itself. One entry
    /// per path, in order: `None` where the file could not be read (the
    /// caller asks the daemon), else the parsed derivation, still
    /// `Unchecked`.
    async fn read_derivation_files(
        &self,
        paths: Vec<StorePath>,
    ) -> Vec<Option<Result<Derivation, StoreError>>> {
        // No hop to the blocking pool for nothing (a step with no input
        // derivations asks so at every dispatch).
        if paths.is_empty() {
            return Vec::new();
        }
        let dir = self.dir.clone();
        let real = self.real_dir.clone();
        let n = paths.len();
        let read = move || {
            paths
                .iter()
                .map(|path| {
                    let bytes = std::fs::read(real.join(path.to_string())).ok()?;
                    Some(
                        Derivation::parse(&dir, &bytes).map_err(|e| StoreError::BadDerivation {
                            path: dir.display(path),
                            message: e.to_string(),
                        }),
                    )
                })
                .collect()
        };
        // The task did not finish (the runtime is shutting down, or a
        // parse panicked): every file through the daemon.
        tokio::task::spawn_blocking(read)
            .await
            .unwrap_or_else(|_| (0..n).map(|_| None).collect())
    }

    /// Writes `drv` (a resolved derivation) into the store as Nix would,
    /// a text path referring to its inputs; returns its path. Writing one
    /// that is there already changes nothing.
    pub async fn write_derivation(
        &self,
        client: &mut DaemonClient,
        drv: &Derivation,
    ) -> Result<StorePath, StoreError> {
        let path = drv
            .drv_path(&self.dir)
            .map_err(|e| StoreError::BadDerivation {
                path: drv.name().unwrap_or("?").to_owned(),
                message: e.to_string(),
            })?;
        let full = self.dir.display(&path);
        if client.is_valid_path(&full).await? {
            return Ok(path);
        }
        let text = drv.to_aterm(&self.dir);
        let nar = hydra_nix::nar::single_file_nar(text.as_bytes());
        let info = PathInfo {
            path: full,
            deriver: None,
            nar_hash: Hash::sha256(&nar),
            references: drv
                .references()
                .iter()
                .map(|r| self.dir.display(r))
                .collect(),
            registration_time: 0,
            nar_size: nar.len() as u64,
            ultimate: false,
            signatures: Vec::new(),
            ca: Some(format!(
                "text:{}",
                Hash::sha256(text.as_bytes()).to_prefixed_base32()
            )),
        };
        client
            .add_to_store_nar(&info, &mut nar.as_slice(), false, true)
            .await?;
        Ok(path)
    }
}

/// How many NAR bytes may be in flight between the daemon and the
/// blocking consumer of [`export_into`].
const EXPORT_PIPE: usize = 256 << 10;

/// Streams the NAR of `info` out of the runner's store into `consume`,
/// which reads it on a blocking thread (hashing, compressing, walking):
/// the NAR is never held whole, and the async threads never do that work.
/// The consumer should read to the end; if it stops early, the export
/// fails and `client` is left mid-NAR (do not reuse it).
pub async fn export_into<T, E>(
    client: &mut DaemonClient,
    info: &PathInfo,
    consume: impl FnOnce(&mut dyn std::io::Read) -> Result<T, E> + Send + 'static,
) -> Result<T, ExportError<E>>
where
    T: Send + 'static,
    E: Send + 'static,
{
    use tokio::io::AsyncWriteExt;
    let (mut into_pipe, out_of_pipe) = tokio::io::duplex(EXPORT_PIPE);
    let consumer = tokio::task::spawn_blocking(move || {
        let mut reader = tokio_util::io::SyncIoBridge::new(out_of_pipe);
        consume(&mut reader)
    });
    let exported = match client.export_nar(info, &mut into_pipe).await {
        Ok(()) => into_pipe.shutdown().await.map_err(DaemonError::from),
        Err(e) => Err(e),
    };
    drop(into_pipe);
    let consumed = consumer.await.expect("a NAR consumer does not panic");
    match (exported, consumed) {
        // The consumer's own failure explains a broken pipe best.
        (_, Err(e)) => Err(ExportError::Consumer(e)),
        (Err(e), Ok(_)) => Err(ExportError::Store(e)),
        (Ok(()), Ok(v)) => Ok(v),
    }
}

/// Why [`export_into`] failed.
#[derive(Debug, Error)]
pub enum ExportError<E> {
    #[error("the runner's store: {0}")]
    Store(#[from] DaemonError),
    #[error(transparent)]
    Consumer(E),
}

#[cfg(test)]
mod tests {
    use super::*;

    const DRV: &str = r#"Derive([("out","/nix/store/0g4kw7209n7k4kfk64by9qfsqg4l5yq0-x","","")],[],[],"x86_64-linux","/bin/sh",[],[("name","x"),("out","/nix/store/0g4kw7209n7k4kfk64by9qfsqg4l5yq0-x")])"#;

    fn path(hash_char: char, name: &str) -> StorePath {
        StorePath::from_base_name(&format!("{}-{name}", hash_char.to_string().repeat(32))).unwrap()
    }

    /// One entry per path, in order: parsed, refused as not a derivation,
    /// or `None` (to be read through the daemon) when there is no file.
    #[tokio::test]
    async fn derivation_files_are_read_in_order_and_missing_ones_left_to_the_daemon() {
        let dir = tempfile::tempdir().unwrap();
        let (good, bad, absent) = (
            path('a', "good.drv"),
            path('b', "bad.drv"),
            path('c', "absent.drv"),
        );
        std::fs::write(dir.path().join(good.to_string()), DRV).unwrap();
        std::fs::write(dir.path().join(bad.to_string()), b"Derive(\0\xff").unwrap();
        let store = LocalStore::new("/nonexistent".into(), Some(dir.path().to_owned()));

        let read = store
            .read_derivation_files(vec![absent.clone(), good.clone(), bad.clone()])
            .await;

        assert_eq!(read.len(), 3);
        assert!(read[0].is_none(), "no file: through the daemon");
        let drv = read[1].as_ref().unwrap().as_ref().unwrap();
        assert_eq!(drv.platform, "x86_64-linux");
        match read[2].as_ref().unwrap() {
            Err(StoreError::BadDerivation { path, .. }) => assert!(path.ends_with("-bad.drv")),
            other => panic!("garbage parsed: {other:?}"),
        }
    }
}
