//! The ATerm text of `.drv` files:
//! `Derive([outputs],[inputDrvs],[inputSrcs],"system","builder",[args],[env])`.
//!
//! Writing follows Nix's `Derivation::unparse` exactly, so that parsing and
//! writing a `.drv` gives back the same bytes and the same store path.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use thiserror::Error;

use super::{Derivation, DerivationOutput};
use crate::hash::{Hash, HashAlgo};
use crate::store_path::{ContentAddressMethod, StoreDir, StorePath};

/// A `.drv` that is not a well-formed derivation, with where it went wrong.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("{}byte {offset}: {message}", .file.as_ref().map(|f| format!("{f}: ")).unwrap_or_default())]
pub struct DrvParseError {
    /// The file, when known (set by [`Derivation::parse_file`]).
    pub file: Option<String>,
    pub offset: usize,
    pub message: String,
}

impl Derivation {
    /// Parses the text of a `.drv` file.
    pub fn parse(store: &StoreDir, bytes: &[u8]) -> Result<Derivation, DrvParseError> {
        let mut p = Parser {
            store,
            bytes,
            pos: 0,
        };
        let drv = p.derivation()?;
        if p.pos != bytes.len() {
            return Err(p.error("trailing bytes after the derivation"));
        }
        Ok(drv)
    }

    /// Parses a `.drv` file, naming the file in any error.
    pub fn parse_file(
        store: &StoreDir,
        path: &std::path::Path,
    ) -> Result<Derivation, DrvParseError> {
        let bytes = std::fs::read(path).map_err(|e| DrvParseError {
            file: Some(path.display().to_string()),
            offset: 0,
            message: format!("cannot read: {e}"),
        })?;
        Derivation::parse(store, &bytes).map_err(|e| DrvParseError {
            file: Some(path.display().to_string()),
            ..e
        })
    }

    /// The ATerm text of this derivation, as Nix writes it.
    pub fn to_aterm(&self, store: &StoreDir) -> String {
        let mut w = Writer {
            store,
            out: String::new(),
        };
        // Store paths order by base name, which is the order of full paths.
        let inputs = self.input_drvs.iter().map(|(p, o)| (store.display(p), o));
        w.derivation(self, false, inputs);
        w.out
    }

    /// The text Nix hashes in `hashDerivationModulo`: input derivations
    /// replaced by their hashes, output paths optionally masked.
    pub(crate) fn to_aterm_modulo(
        &self,
        store: &StoreDir,
        mask_outputs: bool,
        inputs: &BTreeMap<String, BTreeSet<String>>,
    ) -> String {
        let mut w = Writer {
            store,
            out: String::new(),
        };
        w.derivation(self, mask_outputs, inputs);
        w.out
    }
}

/// The `hashAlgo` field of an output: `r:sha256`, `text:sha256`, `sha256`.
pub(crate) fn method_algo(method: ContentAddressMethod, algo: HashAlgo) -> String {
    format!("{}{}", method.prefix(), algo)
}

fn parse_method_algo(s: &str) -> Option<(ContentAddressMethod, HashAlgo)> {
    let (method, algo) = if let Some(a) = s.strip_prefix("r:") {
        (ContentAddressMethod::Recursive, a)
    } else if let Some(a) = s.strip_prefix("text:") {
        (ContentAddressMethod::Text, a)
    } else {
        (ContentAddressMethod::Flat, s)
    };
    Some((method, HashAlgo::parse(algo).ok()?))
}

/// The four ATerm fields of an output after its name: path, hashAlgo, hash.
pub(crate) fn output_fields(store: &StoreDir, out: &DerivationOutput, mask: bool) -> [String; 3] {
    let path = |p: &StorePath| {
        if mask {
            String::new()
        } else {
            store.display(p)
        }
    };
    match out {
        DerivationOutput::InputAddressed(p) => [path(p), String::new(), String::new()],
        DerivationOutput::Fixed {
            path: p,
            method,
            hash,
        } => [path(p), method_algo(*method, hash.algo), hash.to_base16()],
        DerivationOutput::Floating { method, algo } => {
            [String::new(), method_algo(*method, *algo), String::new()]
        }
        DerivationOutput::Deferred => [String::new(), String::new(), String::new()],
        DerivationOutput::Impure { method, algo } => [
            String::new(),
            method_algo(*method, *algo),
            "impure".to_owned(),
        ],
    }
}

/// Reads the output fields back (the inverse of [`output_fields`]).
pub(crate) fn output_from_fields(
    store: &StoreDir,
    path: &str,
    hash_algo: &str,
    hash: &str,
) -> Result<DerivationOutput, String> {
    let store_path = || store.parse_path(path).map_err(|e| e.to_string());
    let method_algo = || {
        parse_method_algo(hash_algo).ok_or_else(|| format!("unknown hash algorithm {hash_algo:?}"))
    };
    Ok(match (path.is_empty(), hash_algo.is_empty(), hash) {
        (false, true, "") => DerivationOutput::InputAddressed(store_path()?),
        (true, true, "") => DerivationOutput::Deferred,
        (true, false, "") => {
            let (method, algo) = method_algo()?;
            DerivationOutput::Floating { method, algo }
        }
        (true, false, "impure") => {
            let (method, algo) = method_algo()?;
            DerivationOutput::Impure { method, algo }
        }
        (false, false, h) if !h.is_empty() => {
            let (method, algo) = method_algo()?;
            let hash = Hash::parse_digest(algo, h).map_err(|e| e.to_string())?;
            DerivationOutput::Fixed {
                path: store_path()?,
                method,
                hash,
            }
        }
        _ => {
            return Err(format!(
                "output fields ({path:?}, {hash_algo:?}, {hash:?}) fit no output kind"
            ));
        }
    })
}

struct Parser<'a> {
    store: &'a StoreDir,
    bytes: &'a [u8],
    pos: usize,
}

impl Parser<'_> {
    fn error(&self, message: impl fmt::Display) -> DrvParseError {
        DrvParseError {
            file: None,
            offset: self.pos,
            message: message.to_string(),
        }
    }

    fn expect(&mut self, token: &str) -> Result<(), DrvParseError> {
        if self.bytes[self.pos..].starts_with(token.as_bytes()) {
            self.pos += token.len();
            Ok(())
        } else {
            Err(self.error(format_args!("expected {token:?}")))
        }
    }

    fn peek_is(&self, c: u8) -> bool {
        self.bytes.get(self.pos) == Some(&c)
    }

    /// Parses `[item,item,...]`.
    fn list<T>(
        &mut self,
        mut item: impl FnMut(&mut Self) -> Result<T, DrvParseError>,
    ) -> Result<Vec<T>, DrvParseError> {
        self.expect("[")?;
        let mut items = Vec::new();
        if self.peek_is(b']') {
            self.pos += 1;
            return Ok(items);
        }
        loop {
            items.push(item(self)?);
            if self.peek_is(b',') {
                self.pos += 1;
            } else {
                self.expect("]")?;
                return Ok(items);
            }
        }
    }

    fn string(&mut self) -> Result<String, DrvParseError> {
        self.expect("\"")?;
        let start = self.pos;
        let mut out = Vec::new();
        loop {
            match self.bytes.get(self.pos) {
                None => {
                    self.pos = start;
                    return Err(self.error("unterminated string"));
                }
                Some(b'"') => break,
                Some(b'\\') => {
                    let c = *self
                        .bytes
                        .get(self.pos + 1)
                        .ok_or_else(|| self.error("unterminated escape"))?;
                    out.push(match c {
                        b'n' => b'\n',
                        b'r' => b'\r',
                        b't' => b'\t',
                        other => other,
                    });
                    self.pos += 2;
                }
                Some(&c) => {
                    out.push(c);
                    self.pos += 1;
                }
            }
        }
        self.pos += 1;
        String::from_utf8(out).map_err(|_| DrvParseError {
            file: None,
            offset: start,
            message: "string is not valid UTF-8".into(),
        })
    }

    fn store_path(&mut self) -> Result<StorePath, DrvParseError> {
        let at = self.pos;
        let s = self.string()?;
        self.store.parse_path(&s).map_err(|e| DrvParseError {
            file: None,
            offset: at,
            message: e.to_string(),
        })
    }

    fn tuple_end(&mut self) -> Result<(), DrvParseError> {
        self.expect(")")
    }

    fn derivation(&mut self) -> Result<Derivation, DrvParseError> {
        if self.bytes[self.pos..].starts_with(b"DrvWithVersion(") {
            // Nix (2.19 on) writes a derivation that depends on the output
            // of a derivation-producing derivation this way, under its
            // experimental dynamic-derivations feature.
            return Err(self.error(
                "a dynamic derivation (DrvWithVersion, Nix's experimental dynamic-derivations): \
                 not supported; only derivations in the classic Derive format are built",
            ));
        }
        self.expect("Derive(")?;
        let mut outputs = BTreeMap::new();
        for (name, out) in self.list(Self::output)? {
            outputs.insert(name, out);
        }
        self.expect(",")?;
        let mut input_drvs = BTreeMap::new();
        for (path, outs) in self.list(Self::input_drv)? {
            input_drvs.insert(path, outs);
        }
        self.expect(",")?;
        let input_srcs: BTreeSet<StorePath> = self.list(Self::store_path)?.into_iter().collect();
        self.expect(",")?;
        let platform = self.string()?;
        self.expect(",")?;
        let builder = self.string()?;
        self.expect(",")?;
        let args = self.list(Self::string)?;
        self.expect(",")?;
        let env = self.list(Self::env_pair)?.into_iter().collect();
        self.expect(")")?;
        Ok(Derivation {
            outputs,
            input_drvs,
            input_srcs,
            platform,
            builder,
            args,
            env,
        })
    }

    fn output(&mut self) -> Result<(String, DerivationOutput), DrvParseError> {
        self.expect("(")?;
        let at = self.pos;
        let name = self.string()?;
        self.expect(",")?;
        let path = self.string()?;
        self.expect(",")?;
        let algo = self.string()?;
        self.expect(",")?;
        let hash = self.string()?;
        self.tuple_end()?;
        let out =
            output_from_fields(self.store, &path, &algo, &hash).map_err(|m| DrvParseError {
                file: None,
                offset: at,
                message: format!("output {name:?}: {m}"),
            })?;
        Ok((name, out))
    }

    fn input_drv(&mut self) -> Result<(StorePath, BTreeSet<String>), DrvParseError> {
        self.expect("(")?;
        let path = self.store_path()?;
        self.expect(",")?;
        let outputs = self.list(Self::string)?.into_iter().collect();
        self.tuple_end()?;
        Ok((path, outputs))
    }

    fn env_pair(&mut self) -> Result<(String, String), DrvParseError> {
        self.expect("(")?;
        let key = self.string()?;
        self.expect(",")?;
        let value = self.string()?;
        self.tuple_end()?;
        Ok((key, value))
    }
}

struct Writer<'a> {
    store: &'a StoreDir,
    out: String,
}

impl Writer<'_> {
    fn string(&mut self, s: &str) {
        self.out.push('"');
        for c in s.chars() {
            match c {
                '"' => self.out.push_str("\\\""),
                '\\' => self.out.push_str("\\\\"),
                '\n' => self.out.push_str("\\n"),
                '\r' => self.out.push_str("\\r"),
                '\t' => self.out.push_str("\\t"),
                c => self.out.push(c),
            }
        }
        self.out.push('"');
    }

    fn list<T>(&mut self, items: impl IntoIterator<Item = T>, mut item: impl FnMut(&mut Self, T)) {
        self.out.push('[');
        for (i, x) in items.into_iter().enumerate() {
            if i > 0 {
                self.out.push(',');
            }
            item(self, x);
        }
        self.out.push(']');
    }

    /// Writes `drv` with `inputs` (sorted by path or hash) as its input derivations.
    fn derivation<'a, S: AsRef<str>>(
        &mut self,
        drv: &Derivation,
        mask: bool,
        inputs: impl IntoIterator<Item = (S, &'a BTreeSet<String>)>,
    ) {
        let store = self.store;
        self.out.push_str("Derive(");
        self.list(&drv.outputs, |w, (name, out)| {
            w.out.push('(');
            w.string(name);
            for field in output_fields(store, out, mask) {
                w.out.push(',');
                w.string(&field);
            }
            w.out.push(')');
        });
        self.out.push(',');
        self.list(inputs, |w, (path, outs)| {
            w.out.push('(');
            w.string(path.as_ref());
            w.out.push(',');
            w.list(outs.iter(), |w, o| w.string(o));
            w.out.push(')');
        });
        self.out.push(',');
        self.list(&drv.input_srcs, |w, p| w.string(&store.display(p)));
        self.out.push(',');
        self.string(&drv.platform);
        self.out.push(',');
        self.string(&drv.builder);
        self.out.push(',');
        self.list(&drv.args, |w, a| w.string(a));
        self.out.push(',');
        self.list(&drv.env, |w, (k, v)| {
            w.out.push('(');
            w.string(k);
            w.out.push(',');
            let masked = mask && drv.outputs.contains_key(k);
            w.string(if masked { "" } else { v });
            w.out.push(')');
        });
        self.out.push(')');
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DEP: &str = r#"Derive([("out","","","")],[("/nix/store/ni0hs03sfvslsghklccmb6dhsn8463fr-ca.drv",["out"])],[],"x86_64-linux","/bin/sh",["-c","cat /0g4kw7209n7k4kfk64by9qfsqg4l5yq0vfnnlxqd4y4pxyn6ajfw > $out"],[("builder","/bin/sh"),("name","dep"),("out",""),("system","x86_64-linux")])"#;

    #[test]
    fn round_trips_a_deferred_derivation_written_by_nix() {
        let store = StoreDir::default();
        let drv = Derivation::parse(&store, DEP.as_bytes()).unwrap();
        assert_eq!(drv.outputs["out"], DerivationOutput::Deferred);
        assert_eq!(drv.to_aterm(&store), DEP);
        assert_eq!(
            store.display(&drv.drv_path(&store).unwrap()),
            "/nix/store/sfj95mr0kj1rpb7rk8kbg4z1vwm13p2l-dep.drv"
        );
    }

    #[test]
    fn escapes_round_trip() {
        let store = StoreDir::default();
        let text = r#"Derive([("out","","r:sha256","")],[],[],"x","b",["a\"b\\c\nd\re\tf"],[("name","n")])"#;
        let drv = Derivation::parse(&store, text.as_bytes()).unwrap();
        assert_eq!(drv.args[0], "a\"b\\c\nd\re\tf");
        assert_eq!(drv.to_aterm(&store), text);
    }

    #[test]
    fn every_truncation_is_an_error_with_an_offset_never_a_panic() {
        let store = StoreDir::default();
        for cut in 0..DEP.len() {
            let err = Derivation::parse(&store, &DEP.as_bytes()[..cut]).unwrap_err();
            assert!(
                err.offset <= cut,
                "offset {} beyond input of {cut} bytes",
                err.offset
            );
        }
    }

    #[test]
    fn a_bad_output_names_the_output_and_offset() {
        let store = StoreDir::default();
        let text = r#"Derive([("out","","md6","")],[],[],"x","b",[],[])"#;
        let err = Derivation::parse(&store, text.as_bytes()).unwrap_err();
        assert!(err.message.contains("output \"out\""), "{err}");
        assert_eq!(err.offset, 9);
    }

    #[test]
    fn parse_file_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bad.drv");
        std::fs::write(&path, "Derive([(").unwrap();
        let err = Derivation::parse_file(&StoreDir::default(), &path).unwrap_err();
        assert!(err.to_string().contains("bad.drv: byte 9"), "{err}");
    }

    #[test]
    fn a_dynamic_derivation_is_refused_with_what_it_is() {
        let text = br#"DrvWithVersion("xp-dyn-drv",[("out","","r:sha256","")],[],[],"x86_64-linux","/bin/sh",[],[])"#;
        let err = Derivation::parse(&StoreDir::default(), text).unwrap_err();
        let message = err.to_string();
        assert!(message.contains("dynamic derivation"), "{message}");
        assert!(message.contains("not supported"), "{message}");
    }
}
