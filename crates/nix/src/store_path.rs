//! Store paths (`/nix/store/<hash>-<name>`) and the computations Nix uses
//! to name them.

use std::fmt;

use thiserror::Error;

use crate::base32;
use crate::hash::{Hash, HashAlgo};

/// Bytes in a store path's hash part (160 bits, 32 base32 letters).
pub const HASH_BYTES: usize = 20;
pub const HASH_CHARS: usize = 32;
const MAX_NAME_LEN: usize = 211;

#[derive(Debug, Error, PartialEq, Eq)]
pub enum StorePathError {
    #[error("path {path:?} is not in the Nix store {store_dir:?}")]
    NotInStore { path: String, store_dir: String },
    #[error("store path {0:?} has no valid hash part")]
    BadHash(String),
    #[error("store path {path:?} has an invalid name: {reason}")]
    BadName { path: String, reason: &'static str },
}

/// The store directory. Everything here assumes one store directory per
/// runner and per builder, and that they are equal (checked at join).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct StoreDir(String);

impl Default for StoreDir {
    fn default() -> Self {
        StoreDir("/nix/store".to_owned())
    }
}

impl StoreDir {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Parses a full path such as `/nix/store/<hash>-foo`.
    pub fn parse_path(&self, path: &str) -> Result<StorePath, StorePathError> {
        let base = path
            .strip_prefix(self.0.as_str())
            .and_then(|rest| rest.strip_prefix('/'))
            .filter(|base| !base.contains('/'))
            .ok_or_else(|| StorePathError::NotInStore {
                path: path.to_owned(),
                store_dir: self.0.clone(),
            })?;
        StorePath::from_base_name(base)
    }

    pub fn display(&self, path: &StorePath) -> String {
        format!("{}/{}", self.0, path)
    }

    /// Nix's `makeStorePath`: the path named by `type:sha256:<hex>:<dir>:<name>`.
    pub fn make_store_path(&self, kind: &str, hash: &Hash, name: &str) -> StorePath {
        let fingerprint = format!("{kind}:{}:{}:{name}", hash.to_prefixed_base16(), self.0);
        StorePath::from_parts(
            &Hash::sha256(fingerprint.as_bytes()).compress(HASH_BYTES),
            name,
        )
    }

    /// The path of output `output` of an input-addressed derivation whose
    /// `hashDerivationModulo` is `drv_hash`.
    pub fn make_output_path(&self, output: &str, drv_hash: &Hash, drv_name: &str) -> StorePath {
        self.make_store_path(
            &format!("output:{output}"),
            drv_hash,
            &output_path_name(drv_name, output),
        )
    }

    /// The path of a content-addressed store object (`makeFixedOutputPath`).
    pub fn make_fixed_output_path(
        &self,
        method: ContentAddressMethod,
        hash: &Hash,
        name: &str,
        references: &[StorePath],
        self_reference: bool,
    ) -> StorePath {
        match method {
            ContentAddressMethod::Text => self.make_text_path(name, hash, references),
            ContentAddressMethod::Recursive if hash.algo == HashAlgo::Sha256 => {
                let kind = self.make_type("source", references, self_reference);
                self.make_store_path(&kind, hash, name)
            }
            ContentAddressMethod::Recursive | ContentAddressMethod::Flat => {
                let prefix = if method == ContentAddressMethod::Recursive {
                    "r:"
                } else {
                    ""
                };
                let inner =
                    Hash::sha256(format!("fixed:out:{prefix}{}:", hash.to_prefixed_base16()));
                self.make_store_path("output:out", &inner, name)
            }
        }
    }

    /// The path of a text file added to the store (how `.drv` files are named).
    pub fn make_text_path(&self, name: &str, hash: &Hash, references: &[StorePath]) -> StorePath {
        let kind = self.make_type("text", references, false);
        self.make_store_path(&kind, hash, name)
    }

    fn make_type(&self, kind: &str, references: &[StorePath], self_reference: bool) -> String {
        let mut refs: Vec<String> = references.iter().map(|r| self.display(r)).collect();
        refs.sort();
        let mut s = kind.to_owned();
        for r in refs {
            s.push(':');
            s.push_str(&r);
        }
        if self_reference {
            s.push_str(":self");
        }
        s
    }
}

/// How a content-addressed object's bytes were hashed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum ContentAddressMethod {
    /// The flat file's bytes.
    Flat,
    /// The NAR serialisation (`r:` in a derivation's hash algo).
    Recursive,
    /// A text file with references (`text:`), as `.drv` files are.
    Text,
}

impl ContentAddressMethod {
    /// The prefix in a derivation output's `hashAlgo` field (`r:`, `text:` or none).
    pub fn prefix(self) -> &'static str {
        match self {
            ContentAddressMethod::Flat => "",
            ContentAddressMethod::Recursive => "r:",
            ContentAddressMethod::Text => "text:",
        }
    }
}

/// The name of the store path of output `output` of a derivation named `drv_name`.
pub fn output_path_name(drv_name: &str, output: &str) -> String {
    if output == "out" {
        drv_name.to_owned()
    } else {
        format!("{drv_name}-{output}")
    }
}

/// A store path without its store directory: `<hash>-<name>`.
///
/// Kept as the validated base name so that ordering is Nix's (by the
/// base-name string), which the `.drv` format's sorted lists depend on.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct StorePath {
    base: String,
}

impl StorePath {
    /// Parses `<hash>-<name>`, the base name of a store path.
    pub fn from_base_name(base: &str) -> Result<StorePath, StorePathError> {
        let bad_hash = || StorePathError::BadHash(base.to_owned());
        if base.len() < HASH_CHARS + 2 || base.as_bytes()[HASH_CHARS] != b'-' {
            return Err(bad_hash());
        }
        base32::decode(&base[..HASH_CHARS]).map_err(|_| bad_hash())?;
        let name = &base[HASH_CHARS + 1..];
        validate_name(name).map_err(|reason| StorePathError::BadName {
            path: base.to_owned(),
            reason,
        })?;
        Ok(StorePath {
            base: base.to_owned(),
        })
    }

    fn from_parts(hash: &[u8], name: &str) -> StorePath {
        StorePath {
            base: format!("{}-{name}", base32::encode(hash)),
        }
    }

    pub fn hash_part(&self) -> &str {
        &self.base[..HASH_CHARS]
    }

    pub fn name(&self) -> &str {
        &self.base[HASH_CHARS + 1..]
    }

    pub fn is_derivation(&self) -> bool {
        self.name().ends_with(".drv")
    }
}

fn validate_name(name: &str) -> Result<(), &'static str> {
    if name.is_empty() {
        return Err("empty name");
    }
    if name.len() > MAX_NAME_LEN {
        return Err("name longer than 211 characters");
    }
    if name.starts_with('.') {
        return Err("name starts with a dot");
    }
    if !name
        .bytes()
        .all(|c| c.is_ascii_alphanumeric() || b"+-._?=".contains(&c))
    {
        return Err("name contains a character outside [A-Za-z0-9+-._?=]");
    }
    Ok(())
}

impl fmt::Display for StorePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.base)
    }
}

impl fmt::Debug for StorePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "StorePath({self})")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_a_store_path() {
        let dir = StoreDir::default();
        let p = dir
            .parse_path("/nix/store/3pysdbjixd4amzidam0kp6vwzpqy58y3-a.drv")
            .unwrap();
        assert_eq!(p.name(), "a.drv");
        assert!(p.is_derivation());
        assert_eq!(
            dir.display(&p),
            "/nix/store/3pysdbjixd4amzidam0kp6vwzpqy58y3-a.drv"
        );
    }

    #[test]
    fn rejects_malformed_paths_with_a_reason() {
        let dir = StoreDir::default();
        assert!(matches!(
            dir.parse_path("/tmp/x"),
            Err(StorePathError::NotInStore { .. })
        ));
        assert!(matches!(
            dir.parse_path("/nix/store/3pysdbjixd4amzidam0kp6vwzpqy58y3-a/b"),
            Err(StorePathError::NotInStore { .. })
        ));
        assert!(matches!(
            dir.parse_path("/nix/store/short-a"),
            Err(StorePathError::BadHash(_))
        ));
        assert!(matches!(
            dir.parse_path("/nix/store/3pysdbjixd4amzidam0kp6vwzpqy58y3-a b"),
            Err(StorePathError::BadName { .. })
        ));
        assert!(matches!(
            dir.parse_path("/nix/store/3pysdbjixd4amzidam0kp6vwzpqy58ye-a"),
            Err(StorePathError::BadHash(_))
        ));
    }
}
