//! The builder's configuration: one TOML file, flags override it.

use std::path::{Path, PathBuf};

use serde::Deserialize;
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

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BuilderConfig {
    /// The runner's builder service, e.g. `http://runner.example:7070`.
    pub runner_url: String,
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
}

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
        Ok(c)
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
}
