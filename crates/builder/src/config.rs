//! The builder's configuration: one TOML file, flags override it.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use thiserror::Error;

#[derive(Debug, Error)]
pub enum ConfigError {
    #[error("cannot read the configuration file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid configuration in {path}: {message}")]
    Invalid { path: PathBuf, message: String },
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct BuilderConfig {
    /// The runner's builder service, e.g. `http://runner.example:7070`.
    pub runner_url: String,
    /// Several runners (an active one and hot standbys): tried in turn
    /// until one accepts. Overrides `runner_url` when not empty.
    pub runner_urls: Vec<String>,
    /// This machine's name in BuildSteps.machine; defaults to the host name.
    pub machine_name: String,
    /// Nix systems this machine builds for.
    pub systems: Vec<String>,
    /// Features this machine offers (`kvm`, `big-parallel`, ...).
    pub supported_features: Vec<String>,
    /// Features a step must require to run here.
    pub mandatory_features: Vec<String>,
    /// Builds at once.
    pub max_jobs: u32,
    /// Relative speed; the runner prefers faster machines.
    pub speed_factor: f32,
    /// The nix-daemon this builder builds with.
    pub nix_daemon_socket: PathBuf,
    /// That daemon's store directory; it must be the runner's (paths are
    /// not rewritten), and the runner refuses a builder whose is not.
    pub store_dir: String,
    /// Where free disk space is measured for the runner.
    pub disk_path: PathBuf,
    /// Reconnect backoff bounds, in seconds (with jitter).
    pub reconnect_min_secs: f64,
    pub reconnect_max_secs: f64,
    /// A file holding this builder's bearer token for the runner;
    /// `HYDRA_BUILDER_TOKEN` in the environment takes precedence.
    pub token_file: Option<PathBuf>,
    /// CA certificate (PEM) the runner's TLS certificate must be signed by
    /// (for `https://` runner URLs).
    pub tls_ca: Option<PathBuf>,
    /// This builder's client certificate and key (PEM), for a runner that
    /// asks for mutual TLS.
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// Binary caches to fetch missing inputs from before asking the runner.
    pub substituters: Vec<String>,
    /// Keys (`name:base64`) their signatures must verify with.
    pub trusted_public_keys: Vec<String>,
    /// How long one cache may take; a slower one is demoted for a while.
    pub substituter_timeout_secs: f64,
    /// Where jobs are kept across connections and restarts: their records,
    /// logs and GC roots of finished outputs.
    pub state_dir: PathBuf,
    /// How long a job no runner holds (the runner went away) keeps
    /// running, or keeps its result, before it is dropped.
    pub orphan_grace_secs: u64,
    /// Whether this machine's nix-daemon also keeps each build's log (in
    /// its log directory). The runner keeps every log it is sent, so off
    /// by default: a kept log is a file and a compression stream a build.
    pub keep_build_logs: bool,
}

/// Every key with what it means; defaults come from
/// [`BuilderConfig::default`]. `--help` and docs/configuration.md are made
/// from this (a test keeps them in step).
pub const KEYS: &[(&str, &str)] = &[
    (
        "runner_url",
        "the runner's builder service (http:// or https://)",
    ),
    (
        "runner_urls",
        "several runners (active and standbys), tried in turn; overrides runner_url",
    ),
    (
        "machine_name",
        "name in BuildSteps.machine (default: the host name)",
    ),
    ("systems", "systems built here (default: this machine's)"),
    (
        "supported_features",
        "features offered (kvm, big-parallel, ...)",
    ),
    (
        "mandatory_features",
        "features a step must require to run here",
    ),
    ("max_jobs", "builds at once"),
    (
        "speed_factor",
        "relative speed; the runner prefers faster machines",
    ),
    ("nix_daemon_socket", "the nix-daemon to build with"),
    (
        "store_dir",
        "that daemon's store directory; must be the runner's",
    ),
    ("disk_path", "where free disk is measured for the runner"),
    (
        "reconnect_min_secs",
        "reconnect backoff, first wait (jittered)",
    ),
    ("reconnect_max_secs", "reconnect backoff, longest wait"),
    (
        "token_file",
        "file with this builder's bearer token (HYDRA_BUILDER_TOKEN overrides)",
    ),
    ("tls_ca", "CA the runner's certificate must be signed by"),
    ("tls_cert", "client certificate for mutual TLS (PEM)"),
    ("tls_key", "its private key (PEM)"),
    (
        "substituters",
        "binary caches tried for missing inputs before the runner (in order)",
    ),
    (
        "trusted_public_keys",
        "keys their signatures must verify with",
    ),
    (
        "substituter_timeout_secs",
        "how long one cache may take before it is demoted for a while",
    ),
    (
        "state_dir",
        "where jobs are kept across connections and restarts (records, logs, GC roots)",
    ),
    (
        "orphan_grace_secs",
        "how long a job keeps running, or keeps its result, with no runner",
    ),
    (
        "keep_build_logs",
        "whether the local nix-daemon also keeps each build's log (the runner keeps them all)",
    ),
];

impl Default for BuilderConfig {
    fn default() -> Self {
        BuilderConfig {
            runner_url: "http://127.0.0.1:7070".into(),
            machine_name: hostname(),
            systems: vec![current_system()],
            supported_features: Vec::new(),
            mandatory_features: Vec::new(),
            max_jobs: 1,
            speed_factor: 1.0,
            nix_daemon_socket: "/nix/var/nix/daemon-socket/socket".into(),
            store_dir: "/nix/store".into(),
            disk_path: "/nix/store".into(),
            reconnect_min_secs: 1.0,
            reconnect_max_secs: 60.0,
            token_file: None,
            tls_ca: None,
            tls_cert: None,
            tls_key: None,
            runner_urls: Vec::new(),
            substituters: Vec::new(),
            trusted_public_keys: Vec::new(),
            substituter_timeout_secs: 10.0,
            state_dir: "/var/lib/hydra-builder".into(),
            orphan_grace_secs: 600,
            keep_build_logs: false,
        }
    }
}

impl BuilderConfig {
    pub fn load(path: &Path) -> Result<BuilderConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text).map_err(|message| ConfigError::Invalid {
            path: path.to_owned(),
            message,
        })
    }

    pub fn parse(text: &str) -> Result<BuilderConfig, String> {
        let c: BuilderConfig = toml::from_str(text).map_err(|e| e.to_string())?;
        if c.max_jobs == 0 {
            return Err("max_jobs must be at least 1".into());
        }
        if c.systems.is_empty() {
            return Err("systems must name at least one system".into());
        }
        if c.tls_cert.is_some() != c.tls_key.is_some() {
            return Err("tls_cert and tls_key go together".into());
        }
        Ok(c)
    }

    /// The runners to try, in order.
    pub fn urls(&self) -> Vec<String> {
        if self.runner_urls.is_empty() {
            vec![self.runner_url.clone()]
        } else {
            self.runner_urls.clone()
        }
    }

    /// Every key with its default and meaning, for `--help`.
    pub fn describe() -> String {
        let defaults = toml::Table::try_from(BuilderConfig::default()).expect("serialises");
        let mut out = String::from("Configuration keys (TOML, --config), with their defaults:\n");
        for (key, meaning) in KEYS {
            let default = defaults
                .get(*key)
                .map_or("none".to_owned(), |v| v.to_string());
            out.push_str(&format!("  {key} = {default}\n      {meaning}\n"));
        }
        out
    }
}

/// Nix's name for the system this binary runs on.
pub fn current_system() -> String {
    format!("{}-{}", std::env::consts::ARCH, std::env::consts::OS)
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "builder".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_and_unknown_keys() {
        let c = BuilderConfig::parse("max_jobs = 4\nsystems = [\"x86_64-linux\", \"i686-linux\"]")
            .unwrap();
        assert_eq!(c.max_jobs, 4);
        assert_eq!(c.systems.len(), 2);
        let err = BuilderConfig::parse("max_job = 4").unwrap_err();
        assert!(err.contains("max_job"), "{err}");
        assert!(BuilderConfig::parse("max_jobs = 0").is_err());
    }

    #[test]
    fn every_field_is_a_documented_key() {
        let all = BuilderConfig {
            token_file: Some("t".into()),
            tls_ca: Some("ca".into()),
            tls_cert: Some("c".into()),
            tls_key: Some("k".into()),
            ..BuilderConfig::default()
        };
        let fields: Vec<String> = toml::Table::try_from(all)
            .unwrap()
            .keys()
            .cloned()
            .collect();
        let mut keys: Vec<String> = KEYS.iter().map(|k| k.0.to_owned()).collect();
        keys.sort();
        assert_eq!(fields, keys, "KEYS and BuilderConfig differ");
        let docs = include_str!("../../../docs/configuration.md");
        for key in keys {
            assert!(
                docs.contains(&format!("`{key}`")),
                "{key} is not in docs/configuration.md"
            );
            assert!(BuilderConfig::describe().contains(&format!("  {key} = ")));
        }
    }
}
