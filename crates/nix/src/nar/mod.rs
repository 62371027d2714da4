//! NAR serialisation and hashing, on top of the `nix-nar` crate.
//!
//! The hash and size of a path's NAR identify its contents in Nix
//! (`narHash`, `narSize`). [`HashingReader`] lets a producer hash the bytes
//! while it streams them, so nobody reads a large output twice.

use std::io::{self, Read};
use std::path::Path;

use sha2::{Digest, Sha256};
use thiserror::Error;

mod walk;

pub use walk::{Entry, walk};

use crate::hash::{Hash, HashAlgo};

#[derive(Debug, Error)]
pub enum NarError {
    #[error("cannot serialise {path} as a NAR: {source}")]
    Encode {
        path: String,
        source: nix_nar::NarError,
    },
    #[error("I/O error while reading the NAR of {path}: {source}")]
    Io { path: String, source: io::Error },
    #[error("corrupt NAR: {0}")]
    Corrupt(String),
    #[error("NAR hash mismatch: expected {expected}, got {actual}")]
    HashMismatch { expected: String, actual: String },
    #[error("NAR size mismatch: expected {expected} bytes, got {actual}")]
    SizeMismatch { expected: u64, actual: u64 },
}

/// A reader of the NAR serialisation of `path` (file, directory or symlink).
pub fn nar_reader(path: &Path) -> Result<impl Read, NarError> {
    nix_nar::Encoder::new(path).map_err(|source| NarError::Encode {
        path: path.display().to_string(),
        source,
    })
}

/// The NAR of `path` in memory (for small paths and tests).
pub fn nar_bytes(path: &Path) -> Result<Vec<u8>, NarError> {
    let mut out = Vec::new();
    nar_reader(path)?
        .read_to_end(&mut out)
        .map_err(|source| NarError::Io {
            path: path.display().to_string(),
            source,
        })?;
    Ok(out)
}

/// The `narHash` and `narSize` of `path`, as `nix-store -q --hash/--size` print.
pub fn hash_path(path: &Path) -> Result<(Hash, u64), NarError> {
    let mut reader = HashingReader::new(nar_reader(path)?);
    io::copy(&mut reader, &mut io::sink()).map_err(|source| NarError::Io {
        path: path.display().to_string(),
        source,
    })?;
    Ok(reader.finish())
}

/// Checks that `nar` is a well-formed NAR with the expected hash and size,
/// before anything imports it.
pub fn verify_nar(nar: &[u8], expected_hash: &Hash, expected_size: u64) -> Result<(), NarError> {
    if nar.len() as u64 != expected_size {
        return Err(NarError::SizeMismatch {
            expected: expected_size,
            actual: nar.len() as u64,
        });
    }
    let actual = HashAlgo::Sha256.digest(nar);
    if &actual != expected_hash {
        return Err(NarError::HashMismatch {
            expected: expected_hash.to_prefixed_base32(),
            actual: actual.to_prefixed_base32(),
        });
    }
    check_structure(nar)
}

/// Walks every entry of `nar`, so a truncated or garbled archive is an error.
pub fn check_structure(nar: &[u8]) -> Result<(), NarError> {
    walk(nar, |_, _, _| Ok(())).map(|_| ())
}

/// The contents of a NAR that holds one regular file (a `.drv`, a log).
pub fn single_file_contents(nar: &[u8]) -> Result<Vec<u8>, NarError> {
    let mut contents = None;
    walk(nar, |path, entry, data| {
        if let (true, Entry::File { .. }) = (path.is_empty(), &entry) {
            let mut out = Vec::new();
            data.read_to_end(&mut out)?;
            contents = Some(out);
        }
        Ok(())
    })?;
    contents.ok_or_else(|| NarError::Corrupt("the NAR is not a single regular file".into()))
}

/// A corrupt NAR, with how far the decoder had read when it failed.
pub fn corrupt_at(read: u64, e: &dyn std::fmt::Display) -> NarError {
    NarError::Corrupt(format!("after byte {read}: {e}"))
}

/// The NAR of one regular, non-executable file holding `contents` (how a
/// `.drv` the runner writes goes into the store). Written by hand: the
/// format of a single file is five strings, and `nix-nar` only encodes
/// files that exist on disk.
pub fn single_file_nar(contents: &[u8]) -> Vec<u8> {
    fn string(out: &mut Vec<u8>, s: &[u8]) {
        out.extend_from_slice(&(s.len() as u64).to_le_bytes());
        out.extend_from_slice(s);
        out.resize(out.len() + (8 - s.len() % 8) % 8, 0);
    }
    let mut out = Vec::with_capacity(contents.len() + 128);
    for s in [
        &b"nix-archive-1"[..],
        b"(",
        b"type",
        b"regular",
        b"contents",
        contents,
        b")",
    ] {
        string(&mut out, s);
    }
    out
}

/// Unpacks `nar` at `dest` (which must not exist).
pub fn unpack(nar: &[u8], dest: &Path) -> Result<(), NarError> {
    use std::os::unix::fs::PermissionsExt;
    walk(nar, |path, entry, data| {
        let at = if path.is_empty() {
            dest.to_owned()
        } else {
            dest.join(path)
        };
        match entry {
            Entry::Directory => std::fs::create_dir(&at),
            Entry::Symlink { target } => std::os::unix::fs::symlink(target, &at),
            Entry::File { executable, .. } => {
                let mut f = std::fs::File::create(&at)?;
                io::copy(data, &mut f)?;
                let mode = if executable { 0o755 } else { 0o644 };
                f.set_permissions(std::fs::Permissions::from_mode(mode))
            }
        }
    })
    .map(|_| ())
}

/// A reader that SHA-256-hashes and counts what passes through it.
pub struct HashingReader<R> {
    inner: R,
    hasher: Sha256,
    size: u64,
}

impl<R: Read> HashingReader<R> {
    pub fn new(inner: R) -> Self {
        HashingReader {
            inner,
            hasher: Sha256::new(),
            size: 0,
        }
    }

    /// The hash and size of everything read so far.
    pub fn finish(self) -> (Hash, u64) {
        (
            Hash {
                algo: HashAlgo::Sha256,
                bytes: self.hasher.finalize().to_vec(),
            },
            self.size,
        )
    }
}

impl<R: Read> Read for HashingReader<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(&buf[..n]);
        self.size += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_truncated_nar_is_corrupt() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, b"hello world").unwrap();
        let nar = nar_bytes(&file).unwrap();
        assert!(check_structure(&nar).is_ok());
        for cut in [8, 40, nar.len() - 8] {
            assert!(
                matches!(check_structure(&nar[..cut]), Err(NarError::Corrupt(_))),
                "cut at {cut}"
            );
        }
    }

    #[test]
    fn a_single_file_nar_is_what_the_encoder_writes() {
        let dir = tempfile::tempdir().unwrap();
        for contents in [&b""[..], b"Derive(...)", b"exactly8", b"nine char"] {
            let file = dir.path().join("f");
            std::fs::write(&file, contents).unwrap();
            assert_eq!(single_file_nar(contents), nar_bytes(&file).unwrap());
        }
    }

    #[test]
    fn reads_back_a_single_file_and_refuses_a_directory() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, b"Derive(...)").unwrap();
        assert_eq!(
            single_file_contents(&nar_bytes(&file).unwrap()).unwrap(),
            b"Derive(...)"
        );
        assert!(single_file_contents(&nar_bytes(dir.path()).unwrap()).is_err());
    }

    #[test]
    fn verify_rejects_wrong_hash_and_size() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("f");
        std::fs::write(&file, b"x").unwrap();
        let nar = nar_bytes(&file).unwrap();
        let (hash, size) = hash_path(&file).unwrap();
        assert!(verify_nar(&nar, &hash, size).is_ok());
        assert!(matches!(
            verify_nar(&nar, &hash, size + 1),
            Err(NarError::SizeMismatch { .. })
        ));
        let other = Hash::sha256(b"other");
        assert!(matches!(
            verify_nar(&nar, &other, size),
            Err(NarError::HashMismatch { .. })
        ));
    }
}
