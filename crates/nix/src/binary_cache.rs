//! Nix's binary-cache format: what a `file://` (or S3) cache holds, and
//! the ed25519 signatures Nix checks.
//!
//! - `nix-cache-info` at the top;
//! - `<hash>.narinfo` per store path: where its (compressed) NAR is, its
//!   hashes and references, and `Sig:` lines;
//! - `nar/<filehash>.nar.<ext>`;
//! - `<hash>.ls`: a JSON listing of the NAR's files;
//! - `realisations/<id>.doi`: what a CA derivation's output was built to.
//!
//! Keys are Nix's: `name:base64(64-byte ed25519 secret)` for the secret key
//! (`nix-store --generate-binary-cache-key`), `name:base64(32 bytes)` for
//! the public one; a signature is `name:base64(signature)` over the path's
//! fingerprint `1;<path>;<narHash>;<narSize>;<ref>,<ref>`.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use ed25519_dalek::{Signer, SigningKey};
use serde_json::{Map, Value, json};
use thiserror::Error;

use crate::hash::Hash;

#[derive(Debug, Error)]
pub enum KeyError {
    #[error("a Nix secret key is `name:base64`; this has no name")]
    NoName,
    #[error("the key is not valid base64: {0}")]
    Base64(#[from] base64::DecodeError),
    #[error("an ed25519 secret key has 64 bytes in Nix's format, this one {0}")]
    Length(usize),
    #[error("the secret and public halves of the key do not match")]
    Mismatch,
}

/// A secret key in Nix's format.
pub struct SecretKey {
    name: String,
    key: SigningKey,
}

impl SecretKey {
    pub fn parse(text: &str) -> Result<SecretKey, KeyError> {
        let (name, data) = text.trim().split_once(':').ok_or(KeyError::NoName)?;
        let bytes = STANDARD.decode(data)?;
        let pair: [u8; 64] = bytes
            .as_slice()
            .try_into()
            .map_err(|_| KeyError::Length(bytes.len()))?;
        let key = SigningKey::from_keypair_bytes(&pair).map_err(|_| KeyError::Mismatch)?;
        Ok(SecretKey {
            name: name.to_owned(),
            key,
        })
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// The public key in Nix's format (`trusted-public-keys`).
    pub fn public(&self) -> String {
        format!(
            "{}:{}",
            self.name,
            STANDARD.encode(self.key.verifying_key().to_bytes())
        )
    }

    /// `name:base64(signature)` over `text`.
    pub fn sign(&self, text: &str) -> String {
        let sig = self.key.sign(text.as_bytes());
        format!("{}:{}", self.name, STANDARD.encode(sig.to_bytes()))
    }
}

/// What Nix signs for a store path (`ValidPathInfo::fingerprint`).
pub fn fingerprint(path: &str, nar_hash: &Hash, nar_size: u64, references: &[String]) -> String {
    format!(
        "1;{path};{};{nar_size};{}",
        nar_hash.to_prefixed_base32(),
        references.join(",")
    )
}

/// One `.narinfo`.
#[derive(Debug, Clone)]
pub struct NarInfo {
    /// Full store path.
    pub path: String,
    /// Relative to the cache root, e.g. `nar/<hash>.nar.zst`.
    pub url: String,
    /// `zstd`, `xz`, `none`.
    pub compression: String,
    pub file_hash: Hash,
    pub file_size: u64,
    pub nar_hash: Hash,
    pub nar_size: u64,
    /// Full store paths.
    pub references: Vec<String>,
    pub deriver: Option<String>,
    pub ca: Option<String>,
    pub sigs: Vec<String>,
}

fn base_name(path: &str) -> &str {
    path.rsplit('/').next().unwrap_or(path)
}

/// A `.narinfo` that cannot be read, with the line where it went wrong.
#[derive(Debug, Clone, Error, PartialEq, Eq)]
#[error("narinfo line {line}: {message}")]
pub struct NarInfoError {
    /// 1-based; 0 when what is wrong is a missing field.
    pub line: usize,
    pub message: String,
}

impl NarInfo {
    /// Reads a `.narinfo` a cache served (outside bytes: anything may be
    /// in it). Store paths and references are checked against `store`;
    /// unknown fields are ignored, as Nix does.
    pub fn parse(text: &str, store: &crate::StoreDir) -> Result<NarInfo, NarInfoError> {
        let err = |line: usize, message: String| NarInfoError { line, message };
        let mut path = None;
        let mut url = None;
        let mut compression = None;
        let mut file_hash = None;
        let mut file_size = None;
        let mut nar_hash = None;
        let mut nar_size = None;
        let mut references = Vec::new();
        let mut deriver = None;
        let mut ca = None;
        let mut sigs = Vec::new();
        for (i, line) in text.lines().enumerate() {
            let n = i + 1;
            if line.is_empty() {
                continue;
            }
            let (key, value) = line
                .split_once(": ")
                .ok_or_else(|| err(n, format!("{line:?} is not 'Key: value'")))?;
            let in_store = |base: &str| {
                let full = format!("{}/{base}", store.as_str());
                store
                    .parse_path(&full)
                    .map(|_| full)
                    .map_err(|e| err(n, format!("{key}: {e}")))
            };
            let number = |v: &str| {
                v.parse::<u64>()
                    .map_err(|e| err(n, format!("{key}: {v:?} is not a size: {e}")))
            };
            let hash = |v: &str| Hash::parse_prefixed(v).map_err(|e| err(n, format!("{key}: {e}")));
            match key {
                "StorePath" => {
                    store
                        .parse_path(value)
                        .map_err(|e| err(n, format!("StorePath: {e}")))?;
                    path = Some(value.to_owned());
                }
                "URL" => url = Some(value.to_owned()),
                "Compression" => compression = Some(value.to_owned()),
                "FileHash" => file_hash = Some(hash(value)?),
                "FileSize" => file_size = Some(number(value)?),
                "NarHash" => nar_hash = Some(hash(value)?),
                "NarSize" => nar_size = Some(number(value)?),
                "References" => {
                    references = value
                        .split_whitespace()
                        .map(in_store)
                        .collect::<Result<_, _>>()?;
                }
                "Deriver" if value != "unknown-deriver" => deriver = Some(in_store(value)?),
                "CA" => ca = Some(value.to_owned()),
                "Sig" => sigs.push(value.to_owned()),
                _ => {}
            }
        }
        let missing = |what: &str| err(0, format!("no {what} field"));
        let nar_hash = nar_hash.ok_or_else(|| missing("NarHash"))?;
        Ok(NarInfo {
            path: path.ok_or_else(|| missing("StorePath"))?,
            url: url.ok_or_else(|| missing("URL"))?,
            compression: compression.unwrap_or_else(|| "bzip2".into()),
            file_hash: file_hash.unwrap_or_else(|| nar_hash.clone()),
            file_size: file_size.unwrap_or(0),
            nar_size: nar_size.ok_or_else(|| missing("NarSize"))?,
            nar_hash,
            references,
            deriver,
            ca,
            sigs,
        })
    }

    pub fn to_text(&self) -> String {
        let mut refs: Vec<&str> = self.references.iter().map(|r| base_name(r)).collect();
        refs.sort();
        let mut out = format!(
            "StorePath: {}\nURL: {}\nCompression: {}\nFileHash: {}\nFileSize: {}\nNarHash: {}\nNarSize: {}\nReferences: {}\n",
            self.path,
            self.url,
            self.compression,
            self.file_hash.to_prefixed_base32(),
            self.file_size,
            self.nar_hash.to_prefixed_base32(),
            self.nar_size,
            refs.join(" "),
        );
        if let Some(d) = &self.deriver {
            out.push_str(&format!("Deriver: {}\n", base_name(d)));
        }
        for sig in &self.sigs {
            out.push_str(&format!("Sig: {sig}\n"));
        }
        if let Some(ca) = &self.ca {
            out.push_str(&format!("CA: {ca}\n"));
        }
        out
    }

    /// Adds this key's signature of the path.
    pub fn sign(&mut self, key: &SecretKey) {
        let mut refs = self.references.clone();
        refs.sort();
        let fp = fingerprint(&self.path, &self.nar_hash, self.nar_size, &refs);
        self.sigs.push(key.sign(&fp));
    }
}

/// The `nix-cache-info` file of a cache of `store_dir`.
pub fn cache_info(store_dir: &str, priority: u32) -> String {
    format!("StoreDir: {store_dir}\nWantMassQuery: 1\nPriority: {priority}\n")
}

/// A realisation as a cache holds it (`realisations/<id>.doi`), signed:
/// Nix signs the JSON of id, outPath and dependentRealisations.
pub fn realisation_doi(id: &str, out_path_base: &str, key: Option<&SecretKey>) -> String {
    let unsigned = json!({
        "dependentRealisations": {},
        "id": id,
        "outPath": out_path_base,
    });
    let sigs: Vec<String> = key
        .map(|k| k.sign(&unsigned.to_string()))
        .into_iter()
        .collect();
    json!({
        "dependentRealisations": {},
        "id": id,
        "outPath": out_path_base,
        "signatures": sigs,
    })
    .to_string()
}

/// The `.ls` listing of a NAR: its files, with sizes and targets.
pub fn listing(nar: &[u8]) -> Result<String, crate::nar::NarError> {
    listing_of(nar)
}

/// [`listing`] of a NAR read from `nar` as it streams (it is read to its
/// end); what it holds is the listing, never the files' contents.
pub fn listing_of(nar: impl std::io::Read) -> Result<String, crate::nar::NarError> {
    use crate::nar::Entry;
    let mut root: Option<Value> = None;
    let mut dirs: Vec<(String, Map<String, Value>)> = Vec::new();
    crate::nar::walk(nar, |path, entry, _| {
        let node = match entry {
            Entry::Directory => json!({"type": "directory", "entries": {}}),
            Entry::Symlink { target } => json!({"type": "symlink", "target": target}),
            Entry::File { executable, size } => {
                let mut f = json!({"type": "regular", "size": size});
                if executable {
                    f["executable"] = json!(true);
                }
                f
            }
        };
        if path.is_empty() {
            root = Some(node);
        } else {
            dirs.push((
                path.to_owned(),
                node.as_object().cloned().unwrap_or_default(),
            ));
        }
        Ok(())
    })?;
    let mut root = root.ok_or_else(|| crate::nar::NarError::Corrupt("empty NAR".into()))?;
    for (path, node) in dirs {
        let mut at = &mut root;
        let parts: Vec<&str> = path.split('/').collect();
        for part in &parts[..parts.len() - 1] {
            at = &mut at["entries"][*part];
        }
        at["entries"][*parts.last().expect("a path has a part")] = Value::Object(node);
    }
    Ok(json!({"version": 1, "root": root}).to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_nix_secret_key_signs_and_names_its_public_half() {
        // A key of nix-store --generate-binary-cache-key's shape (64 bytes).
        let secret = SigningKey::from_bytes(&[7u8; 32]);
        let text = format!("cache-1:{}", STANDARD.encode(secret.to_keypair_bytes()));
        let key = SecretKey::parse(&text).unwrap();
        assert!(key.public().starts_with("cache-1:"));
        let sig = key.sign("1;/nix/store/x;sha256:y;1;");
        assert!(sig.starts_with("cache-1:"));
        assert!(SecretKey::parse("nocolon").is_err());
        assert!(matches!(
            SecretKey::parse("k:AAAA"),
            Err(KeyError::Length(3))
        ));
    }

    #[test]
    fn a_narinfo_reads_back_and_a_bad_line_is_named() {
        let store = crate::StoreDir::default();
        let info = NarInfo {
            path: "/nix/store/7rjj86a15146cq1d3qy068lml7n8ykzm-hello".into(),
            url: "nar/x.nar.zst".into(),
            compression: "zstd".into(),
            file_hash: Hash::sha256(b"f"),
            file_size: 3,
            nar_hash: Hash::sha256(b"n"),
            nar_size: 7,
            references: vec!["/nix/store/7rjj86a15146cq1d3qy068lml7n8ykzm-hello".into()],
            deriver: Some("/nix/store/7rjj86a15146cq1d3qy068lml7n8ykzm-hello.drv".into()),
            ca: None,
            sigs: vec!["k:sig".into()],
        };
        let back = NarInfo::parse(&info.to_text(), &store).unwrap();
        assert_eq!(back.to_text(), info.to_text());
        let bad = info.to_text().replace("NarSize: 7", "NarSize: seven");
        let err = NarInfo::parse(&bad, &store).unwrap_err();
        assert_eq!(err.line, 7, "{err}");
        assert!(
            err.to_string().starts_with("narinfo line 7: NarSize"),
            "{err}"
        );
        let outside = info
            .to_text()
            .replace("References: ", "References: ../etc ");
        assert!(NarInfo::parse(&outside, &store).is_err());
        let err = NarInfo::parse("URL: x\n", &store).unwrap_err();
        assert!(err.to_string().contains("no NarHash"), "{err}");
    }

    #[test]
    fn the_fingerprint_is_nixs() {
        let h = Hash::sha256(b"x");
        assert_eq!(
            fingerprint(
                "/nix/store/a-b",
                &h,
                5,
                &["/nix/store/c-d".into(), "/nix/store/e-f".into()]
            ),
            format!(
                "1;/nix/store/a-b;{};5;/nix/store/c-d,/nix/store/e-f",
                h.to_prefixed_base32()
            )
        );
    }
}
