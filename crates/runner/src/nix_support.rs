//! What Hydra reads from a built output: `nix-support/hydra-build-products`,
//! `hydra-release-name`, `hydra-metrics` and `failed`.
//!
//! The runner learns it from the output's NAR while importing it (one pass,
//! no second read of the store): [`scan_nar`] records every regular file's
//! size and SHA-256 and keeps the small `nix-support` files.

use std::collections::BTreeMap;
use std::io::Read;

use sha2::{Digest, Sha256};

use crate::outside::{DISPLAY_MAX, display_bytes, display_text};

/// The `nix-support` files larger than this are not kept (Hydra's are tiny).
const MAX_SUPPORT_FILE: u64 = 1 << 20;

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EntryKind {
    Directory,
    Symlink,
    File { size: u64, sha256: String },
}

/// An output as seen in its NAR.
#[derive(Debug, Default, Clone)]
pub struct OutputScan {
    /// Entries by path inside the output ("" is the output itself).
    pub entries: BTreeMap<String, EntryKind>,
    /// Contents of `nix-support/*` files.
    pub support: BTreeMap<String, Vec<u8>>,
}

/// Reads a NAR to its end and records what Hydra needs from it. The NAR
/// is a builder's: it is read by the checked reader, which bounds every
/// length and streams file contents.
pub fn scan_nar(reader: impl Read) -> Result<OutputScan, hydra_nix::nar::NarError> {
    use hydra_nix::nar::Entry;
    let mut scan = OutputScan::default();
    hydra_nix::nar::walk(reader, |path, entry, data| {
        let kind = match entry {
            Entry::Directory => EntryKind::Directory,
            Entry::Symlink { .. } => EntryKind::Symlink,
            Entry::File { size, .. } => {
                let keep = path.starts_with("nix-support/")
                    && !path["nix-support/".len()..].contains('/')
                    && size <= MAX_SUPPORT_FILE;
                let mut hasher = Sha256::new();
                let mut kept = Vec::new();
                let mut buf = [0u8; 64 * 1024];
                loop {
                    let n = data.read(&mut buf)?;
                    if n == 0 {
                        break;
                    }
                    hasher.update(&buf[..n]);
                    if keep {
                        kept.extend_from_slice(&buf[..n]);
                    }
                }
                if keep {
                    scan.support
                        .insert(path["nix-support/".len()..].to_owned(), kept);
                }
                EntryKind::File {
                    size,
                    sha256: hex::encode(hasher.finalize()),
                }
            }
        };
        scan.entries.insert(path.to_owned(), kind);
        Ok(())
    })?;
    Ok(scan)
}

#[derive(Debug, Clone, PartialEq)]
pub struct Product {
    pub r#type: String,
    pub subtype: String,
    pub file_size: Option<i64>,
    pub sha256: Option<String>,
    pub path: String,
    pub name: String,
    pub default_path: Option<String>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Metric {
    pub name: String,
    pub unit: Option<String>,
    pub value: f64,
}

/// What Hydra records about a build from its outputs.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct BuildOutputInfo {
    pub failed: bool,
    pub release_name: Option<String>,
    pub products: Vec<Product>,
    pub metrics: Vec<Metric>,
}

impl BuildOutputInfo {
    /// `outputs`: (output name, full store path, scan), in output-name order.
    pub fn from_scans(outputs: &[(String, String, &OutputScan)]) -> BuildOutputInfo {
        let mut info = BuildOutputInfo::default();
        let mut explicit = false;
        for (_, path, scan) in outputs {
            info.failed |= scan.support.contains_key("failed");
            if let Some(name) = scan.support.get("hydra-release-name") {
                let name = display_bytes(name, DISPLAY_MAX).trim().to_owned();
                if !name.is_empty() {
                    info.release_name = Some(name);
                }
            }
            if let Some(text) = scan.support.get("hydra-build-products") {
                explicit = true;
                let text = String::from_utf8_lossy(text);
                info.products
                    .extend(text.lines().filter_map(|l| product(l, outputs)));
            }
            if let Some(text) = scan.support.get("hydra-metrics") {
                for m in String::from_utf8_lossy(text).lines().filter_map(metric) {
                    info.metrics.retain(|old| old.name != m.name);
                    info.metrics.push(m);
                }
            }
            let _ = path;
        }
        if !explicit {
            // As Hydra: without declared products, every output that is a
            // directory is a `nix-build` product.
            for (name, path, scan) in outputs {
                if scan.entries.get("") == Some(&EntryKind::Directory) {
                    info.products.push(Product {
                        r#type: "nix-build".into(),
                        subtype: if name == "out" {
                            String::new()
                        } else {
                            name.clone()
                        },
                        file_size: None,
                        sha256: None,
                        path: path.clone(),
                        name: path.rsplit('/').next().unwrap_or_default()[33..].to_owned(),
                        default_path: None,
                    });
                }
            }
        }
        info
    }
}

/// One line of `hydra-build-products`: `type subtype path [default-path]`,
/// the path optionally in double quotes. Lines that do not parse, or name
/// a path outside the outputs or missing, are skipped, as Hydra does.
fn product(line: &str, outputs: &[(String, String, &OutputScan)]) -> Option<Product> {
    let line = line.trim();
    let (ty, rest) = line.split_once(char::is_whitespace)?;
    let (subtype, rest) = rest.trim_start().split_once(char::is_whitespace)?;
    let rest = rest.trim_start();
    let (path, default_path) = if let Some(quoted) = rest.strip_prefix('"') {
        let (p, after) = quoted.split_once('"')?;
        (p.to_owned(), after.trim())
    } else {
        match rest.split_once(char::is_whitespace) {
            Some((p, after)) => (p.to_owned(), after.trim()),
            None => (rest.to_owned(), ""),
        }
    };
    let token = |s: &str| {
        !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    };
    if !token(ty) || !token(subtype) || !path.starts_with('/') {
        return None;
    }
    let path = canon(&path);
    let (out_path, scan) = outputs.iter().find_map(|(_, p, scan)| {
        (path == *p || path.starts_with(&format!("{p}/"))).then_some((p, scan))
    })?;
    let inner = path[out_path.len()..].trim_start_matches('/');
    let entry = scan.entries.get(inner)?;
    let (file_size, sha256) = match entry {
        EntryKind::File { size, sha256 } => (Some(*size as i64), Some(sha256.clone())),
        _ => (None, None),
    };
    Some(Product {
        r#type: ty.to_owned(),
        subtype: subtype.to_owned(),
        file_size,
        sha256,
        name: if inner.is_empty() {
            String::new()
        } else {
            inner.rsplit('/').next()?.to_owned()
        },
        path,
        default_path: (!default_path.is_empty()).then(|| {
            display_text(
                default_path.split_whitespace().next().unwrap_or(""),
                DISPLAY_MAX,
            )
        }),
    })
}

/// Removes `.`, `..` and repeated slashes, as Nix's `canonPath`.
fn canon(path: &str) -> String {
    let mut parts: Vec<&str> = Vec::new();
    for part in path.split('/') {
        match part {
            "" | "." => {}
            ".." => {
                parts.pop();
            }
            p => parts.push(p),
        }
    }
    format!("/{}", parts.join("/"))
}

/// One line of `hydra-metrics`: `name value [unit]`.
fn metric(line: &str) -> Option<Metric> {
    let fields: Vec<&str> = line.split_whitespace().collect();
    if fields.len() < 2 {
        return None;
    }
    let name = fields[0];
    if !name
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
    {
        return None;
    }
    let value: f64 = fields[1].parse().ok()?;
    Some(Metric {
        name: name.to_owned(),
        unit: fields.get(2).map(|u| display_text(u, DISPLAY_MAX)),
        value,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const OUT: &str = "/nix/store/7rjj86a15146cq1d3qy068lml7n8ykzm-report";

    fn scan_of(files: &[(&str, &str)]) -> OutputScan {
        let mut s = OutputScan::default();
        s.entries.insert(String::new(), EntryKind::Directory);
        for (p, content) in files {
            s.entries.insert(
                p.to_string(),
                EntryKind::File {
                    size: content.len() as u64,
                    sha256: hex::encode(Sha256::digest(content)),
                },
            );
            if let Some(name) = p.strip_prefix("nix-support/") {
                s.support.insert(name.into(), content.as_bytes().to_vec());
            }
        }
        s
    }

    #[test]
    fn products_metrics_and_release_name_are_read_as_hydra_does() {
        let products = format!(
            "file binary-dist {OUT}/report.txt\ndoc manual \"{OUT}/doc\" index.html\nfile x /etc/passwd\nfile y {OUT}/missing\nnot a valid line with \"\n"
        );
        let scan = scan_of(&[
            ("report.txt", "hello"),
            ("nix-support/hydra-build-products", &products),
            (
                "nix-support/hydra-metrics",
                "lines 42 count\nbad\ntime 1.5\nlines 43",
            ),
            ("nix-support/hydra-release-name", "report-1.0\n"),
        ]);
        let mut scan2 = scan.clone();
        scan2.entries.insert("doc".into(), EntryKind::Directory);
        let info = BuildOutputInfo::from_scans(&[("out".into(), OUT.into(), &scan2)]);
        assert!(!info.failed);
        assert_eq!(info.release_name.as_deref(), Some("report-1.0"));
        assert_eq!(info.products.len(), 2, "{:?}", info.products);
        let p = &info.products[0];
        assert_eq!(
            (p.r#type.as_str(), p.subtype.as_str(), p.name.as_str()),
            ("file", "binary-dist", "report.txt")
        );
        assert_eq!(p.file_size, Some(5));
        assert_eq!(
            p.sha256.as_deref(),
            Some("2cf24dba5fb0a30e26e83b2ac5b9e29e1b161e5c1fa7425e73043362938b9824")
        );
        let d = &info.products[1];
        assert_eq!(
            (d.path.as_str(), d.default_path.as_deref(), d.file_size),
            (format!("{OUT}/doc").as_str(), Some("index.html"), None)
        );
        let lines = info.metrics.iter().find(|m| m.name == "lines").unwrap();
        assert_eq!((lines.value, lines.unit.as_deref()), (43.0, None));
        assert_eq!(info.metrics.len(), 2);
    }

    /// A build's `nix-support` files are bytes it wrote: NUL, colour codes
    /// and invalid UTF-8 reach Hydra's columns cleaned, never as they are.
    #[test]
    fn hostile_nix_support_contents_are_cleaned() {
        let products = format!("doc manual {OUT}/doc index\0.html\n");
        let scan = scan_of(&[
            ("nix-support/hydra-release-name", "rel\0ease-\u{1b}[1m1.0\n"),
            ("nix-support/hydra-metrics", "size 3 by\0tes\n"),
            ("nix-support/hydra-build-products", &products),
        ]);
        let mut scan = scan;
        scan.entries.insert("doc".into(), EntryKind::Directory);
        scan.support
            .insert("hydra-release-name".into(), b"caf\xe9\0-1.0".to_vec());
        let info = BuildOutputInfo::from_scans(&[("out".into(), OUT.into(), &scan)]);
        assert_eq!(
            info.release_name.as_deref(),
            Some("caf\u{fffd}\u{fffd}-1.0")
        );
        assert_eq!(info.metrics[0].unit.as_deref(), Some("by\u{fffd}tes"));
        assert_eq!(
            info.products[0].default_path.as_deref(),
            Some("index\u{fffd}.html")
        );
    }

    #[test]
    fn without_declared_products_directory_outputs_are_nix_build_products() {
        let dir = scan_of(&[("bin/tool", "x")]);
        let mut file = OutputScan::default();
        file.entries.insert(
            String::new(),
            EntryKind::File {
                size: 1,
                sha256: String::new(),
            },
        );
        let dev = "/nix/store/7rjj86a15146cq1d3qy068lml7n8ykzm-tools-dev";
        let info = BuildOutputInfo::from_scans(&[
            ("dev".into(), dev.into(), &dir),
            ("out".into(), OUT.into(), &file),
        ]);
        assert_eq!(info.products.len(), 1);
        assert_eq!(info.products[0].subtype, "dev");
        assert_eq!(info.products[0].name, "tools-dev");
        assert_eq!(info.products[0].r#type, "nix-build");
    }

    #[test]
    fn the_failed_marker_and_a_real_nar_are_found() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("out");
        std::fs::create_dir_all(out.join("nix-support")).unwrap();
        std::fs::write(out.join("nix-support/failed"), "").unwrap();
        std::fs::write(out.join("data"), "abc").unwrap();
        let nar = hydra_nix::nar::nar_bytes(&out).unwrap();
        let scan = scan_nar(nar.as_slice()).unwrap();
        assert!(scan.support.contains_key("failed"));
        assert!(matches!(
            scan.entries["data"],
            EntryKind::File { size: 3, .. }
        ));
        let info = BuildOutputInfo::from_scans(&[("out".into(), OUT.into(), &scan)]);
        assert!(info.failed);
        assert!(scan_nar(&nar[..nar.len() / 2]).is_err());
    }
}
