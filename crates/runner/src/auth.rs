//! Builder authentication by bearer token (mutual TLS, the other way, is
//! the transport's: see [`crate::server`]).
//!
//! Tokens live in files on the runner, in `builder_tokens_dir`: a file
//! `<machine>.token` admits the builder of that name only, `shared.token`
//! any builder. Every call must carry `authorization: Bearer <token>` with a
//! known token; the control stream's join must also be by a machine the
//! token admits. Files are re-read on reload.

use std::path::{Path, PathBuf};

use sha2::{Digest, Sha256};
use thiserror::Error;
use tonic::Status;

#[derive(Debug, Error)]
pub enum TokenError {
    #[error("cannot read the tokens in {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("token file {0} is empty")]
    Empty(PathBuf),
    #[error("token file {path}: {reason}")]
    Format { path: PathBuf, reason: String },
}

/// Secrets and what each admits, looked up in constant time: the
/// presented secret's digest is compared with every entry's, each
/// comparison touching every byte, so how long a check takes says nothing
/// about how much of a guess was right.
#[derive(Debug, Clone)]
pub struct Secrets<T> {
    entries: Vec<([u8; 32], T)>,
}

impl<T> Default for Secrets<T> {
    fn default() -> Self {
        Secrets {
            entries: Vec::new(),
        }
    }
}

impl<T> Secrets<T> {
    pub fn insert(&mut self, secret: &str, admits: T) {
        self.entries.push((digest(secret), admits));
    }

    pub fn find(&self, presented: &str) -> Option<&T> {
        let wanted = digest(presented);
        let mut found = None;
        for (d, admits) in &self.entries {
            let diff = d.iter().zip(&wanted).fold(0u8, |acc, (a, b)| acc | (a ^ b));
            if diff == 0 && found.is_none() {
                found = Some(admits);
            }
        }
        found
    }
}

fn digest(secret: &str) -> [u8; 32] {
    Sha256::digest(secret.as_bytes()).into()
}

/// Reads every `*.token` file of `dir`: (file stem, path, text).
pub fn token_files(dir: &Path) -> Result<Vec<(String, PathBuf, String)>, TokenError> {
    let read_err = |source| TokenError::Read {
        path: dir.to_owned(),
        source,
    };
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(read_err)? {
        let path = entry.map_err(read_err)?.path();
        let Some(stem) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".token"))
        else {
            continue;
        };
        let text = std::fs::read_to_string(&path).map_err(|source| TokenError::Read {
            path: path.clone(),
            source,
        })?;
        if text.trim().is_empty() {
            return Err(TokenError::Empty(path));
        }
        files.push((stem.to_owned(), path, text));
    }
    Ok(files)
}

/// Who a token admits.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Admits {
    Machine(String),
    Any,
}

/// The tokens builders may present; `None` inside means none is asked.
#[derive(Debug, Clone, Default)]
pub struct Tokens {
    by_token: Option<Secrets<Admits>>,
}

impl Tokens {
    /// No authentication by token.
    pub fn none() -> Tokens {
        Tokens { by_token: None }
    }

    /// The tokens of `builder_tokens_dir`, or none asked without it.
    pub fn from_setting(dir: Option<&Path>) -> Result<Tokens, TokenError> {
        dir.map_or(Ok(Tokens::none()), Tokens::load)
    }

    /// Reads every `*.token` file of `dir`.
    pub fn load(dir: &Path) -> Result<Tokens, TokenError> {
        let mut by_token = Secrets::default();
        for (stem, _, text) in token_files(dir)? {
            let admits = match stem.as_str() {
                "shared" => Admits::Any,
                name => Admits::Machine(name.to_owned()),
            };
            by_token.insert(text.trim(), admits);
        }
        Ok(Tokens {
            by_token: Some(by_token),
        })
    }

    /// Checks the `authorization` header of a call: any known token.
    pub fn check(&self, header: Option<&str>) -> Result<(), Status> {
        self.admits(header).map(|_| ())
    }

    /// Checks that the call's token admits `machine` (at join).
    pub fn check_machine(&self, header: Option<&str>, machine: &str) -> Result<(), Status> {
        match self.admits(header)? {
            None | Some(Admits::Any) => Ok(()),
            Some(Admits::Machine(m)) if m == machine => Ok(()),
            Some(Admits::Machine(m)) => Err(Status::unauthenticated(format!(
                "this builder token is machine {m}'s, not {machine}'s"
            ))),
        }
    }

    fn admits(&self, header: Option<&str>) -> Result<Option<&Admits>, Status> {
        let Some(tokens) = &self.by_token else {
            return Ok(None);
        };
        let token = header
            .and_then(|h| h.strip_prefix("Bearer "))
            .ok_or_else(|| {
                Status::unauthenticated(
                    "this runner requires a builder token (authorization: Bearer <token>); set the builder's token_file",
                )
            })?;
        tokens
            .find(token.trim())
            .map(Some)
            .ok_or_else(|| Status::unauthenticated("unknown builder token"))
    }
}

/// The `authorization` header of a call, if any.
pub fn bearer<T>(request: &tonic::Request<T>) -> Option<&str> {
    request
        .metadata()
        .get("authorization")
        .and_then(|v| v.to_str().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir_with(files: &[(&str, &str)]) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        for (name, text) in files {
            std::fs::write(dir.path().join(name), text).unwrap();
        }
        dir
    }

    #[test]
    fn a_machine_token_admits_that_machine_and_a_shared_one_any() {
        let dir = dir_with(&[
            ("alpha.token", "secret-a\n"),
            ("shared.token", "secret-s"),
            ("README", "ignored"),
        ]);
        let t = Tokens::load(dir.path()).unwrap();
        assert!(t.check_machine(Some("Bearer secret-a"), "alpha").is_ok());
        let wrong = t
            .check_machine(Some("Bearer secret-a"), "beta")
            .unwrap_err();
        assert_eq!(wrong.code(), tonic::Code::Unauthenticated);
        assert!(t.check_machine(Some("Bearer secret-s"), "beta").is_ok());
        assert!(t.check(Some("Bearer nope")).is_err());
        let missing = t.check(None).unwrap_err();
        assert!(missing.message().contains("requires a builder token"));
    }

    #[test]
    fn without_a_directory_no_token_is_asked() {
        assert!(Tokens::none().check(None).is_ok());
        assert!(Tokens::from_setting(None).unwrap().check(None).is_ok());
    }

    #[test]
    fn an_empty_token_file_is_an_error() {
        let dir = dir_with(&[("alpha.token", "\n")]);
        assert!(matches!(
            Tokens::load(dir.path()),
            Err(TokenError::Empty(_))
        ));
    }
}
