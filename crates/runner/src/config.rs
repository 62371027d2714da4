//! The runner's configuration: one TOML file, every key optional with a
//! Hydra-like default, unknown keys rejected with their name.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

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

/// Settings of `hydra-queue-runner serve`. The defaults suit a coordinator
/// with a local nix-daemon; tests shorten the timers.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RunnerConfig {
    /// PostgreSQL URL; `--database-url` / `HYDRA_DATABASE_URL` take precedence.
    pub database_url: Option<String>,
    /// Maximum connections to PostgreSQL of the runner's own loops.
    pub database_connections: u32,
    /// Connections of the client API and the HTTP endpoint, apart from
    /// the runner's: watchers and scrapers wait for these, never for
    /// those of dispatch and completion.
    pub api_database_connections: u32,
    /// Where builders connect (gRPC).
    pub listen: SocketAddr,
    /// Where the client API (gRPC) listens: apart from the builders', so
    /// that what reaches builders does not reach the API.
    pub client_listen: SocketAddr,
    /// TLS of the client API (certificate and key, PEM).
    pub client_tls_cert: Option<PathBuf>,
    pub client_tls_key: Option<PathBuf>,
    /// Lets the runner listen beyond loopback without authentication (the
    /// demo's and some tests' setting; never a farm's).
    pub allow_unauthenticated: bool,
    /// Where `/status` and `/metrics` are served over HTTP; off without it.
    pub http_listen: Option<SocketAddr>,
    /// Hydra's data directory (`HYDRA_DATA`): build logs go to
    /// `<hydra_data>/build-logs/..`, where Hydra's web interface reads
    /// them. (`data_dir`, this key's earlier name, is still accepted.)
    #[serde(alias = "data_dir")]
    pub hydra_data: PathBuf,
    /// What the runner does with a finished step's log: `zstd` compresses
    /// it to `<log>.zst` (which hydra-web reads), `none` leaves the plain
    /// file for hydra-notify's CompressLog to compress.
    pub log_compression: LogCompression,
    /// The runner's own nix-daemon: inputs are served from it and outputs
    /// imported into it.
    pub store_socket: PathBuf,
    /// Where the files of the runner's store are on this machine (the
    /// store directory itself unless the store is mounted elsewhere):
    /// `.drv` files are read there, as Hydra's queue runner reads them,
    /// and from the daemon when they cannot be.
    pub store_real_dir: Option<PathBuf>,
    /// Largest total NAR size of a step's outputs (status 11 beyond).
    pub max_output_size: u64,
    /// Largest build log of a step (status 10 beyond).
    pub max_log_size: u64,
    /// How long a runnable step may find no connected machine that supports
    /// its system and features, while some machine is connected, before it
    /// fails as unsupported (status 9).
    pub max_unsupported_secs: u64,
    /// How long a machine that went away still counts as supporting its
    /// systems and features for `max_unsupported_secs`: its steps wait for
    /// it (a reboot, a network cut) instead of failing as unsupported.
    pub machine_memory_secs: u64,
    /// How often builders ping (also the HTTP/2 keepalive interval).
    pub ping_interval_secs: u32,
    /// A builder silent this long (no ping, no progress) is gone, even
    /// when its TCP connection stays open.
    pub ping_timeout_secs: u32,
    /// How long the attempts of a builder that went away wait for it to
    /// come back and re-adopt them (and, on start, how long the attempts a
    /// stopped or crashed runner left wait for their builders) before they
    /// are aborted and retried. A bit more than the builders' longest
    /// reconnect backoff.
    pub reconnect_grace_secs: u64,
    /// An attempt still running this long after the step's timeout is
    /// aborted and retried (a job that hangs while its builder pings on).
    pub attempt_grace_secs: u64,
    /// The most jobs the runner gives one machine, whatever it declares.
    pub max_jobs_per_machine: u32,
    /// Days the runner's own tables keep rows (0: for ever): events for
    /// client watchers, finished attempts, refused builder messages, and
    /// finished uploads.
    pub events_retention_days: u32,
    pub attempts_retention_days: u32,
    pub rejections_retention_days: u32,
    pub uploads_retention_days: u32,
    /// Aborted attempts (infrastructure faults) before a step fails as aborted.
    pub max_tries: u32,
    /// Backoff before retrying an aborted step: base * factor^(tries-1),
    /// of which a random half to all is waited (jitter).
    pub retry_base_secs: f64,
    pub retry_factor: f64,
    /// A machine whose attempts abort this many times in a row is rested:
    /// it gets no steps for machine_rest_base_secs, doubled with each
    /// further failure, at most machine_rest_max_secs.
    pub machine_rest_after_failures: u32,
    pub machine_rest_base_secs: f64,
    pub machine_rest_max_secs: f64,
    /// A machine reporting less free disk than this gets no new steps.
    pub min_free_disk: u64,
    /// How often the status document in SystemStatus is rewritten.
    pub status_interval_secs: u32,
    /// Destination stores (binary caches) the outputs are published to,
    /// best effort: `file:///var/cache/hydra`.
    pub destinations: Vec<String>,
    /// Nix secret key (`name:base64`) that signs what is published.
    pub signing_key_file: Option<PathBuf>,
    /// Where NARs are compressed before they are published (spool files
    /// are unnamed: they vanish with the runner).
    pub spool_dir: PathBuf,
    /// TLS for the builder service: the runner's certificate and key (PEM).
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    /// With it, builders must present a client certificate signed by this
    /// CA (mutual TLS).
    pub tls_client_ca: Option<PathBuf>,
    /// Builder bearer tokens: `<machine>.token` files admit that machine,
    /// `shared.token` any machine. Without it, no token is asked.
    pub builder_tokens_dir: Option<PathBuf>,
    /// Client API bearer tokens: every `*.token` file admits a client.
    /// Without it, the client API asks for none (and `client_listen` must
    /// be loopback unless `allow_unauthenticated`).
    pub client_tokens_dir: Option<PathBuf>,
    /// A runnable step gains one global priority point per this many
    /// seconds it waits (at most 20), so background work is never starved
    /// for ever; 0 turns aging off.
    pub priority_aging_secs: u64,
    /// A dependent may start on the machine that built its inputs as soon
    /// as it says they are built, before their outputs reach the runner
    /// (its result is still recorded only after theirs).
    pub run_ahead: bool,
    /// The PostgreSQL advisory lock that makes one runner active and any
    /// other a standby. Runners of one database must agree on it.
    pub advisory_lock_key: i64,
}

/// How a finished step's log is kept (see `log_compression`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LogCompression {
    #[default]
    Zstd,
    None,
}

/// Every key, with what it means and whether SIGHUP reloads it. The
/// defaults come from [`RunnerConfig::default`]; `serve --help` and
/// docs/configuration.md are made from this (a test keeps them in step).
pub const KEYS: &[(&str, &str, bool)] = &[
    (
        "database_url",
        "PostgreSQL URL; --database-url and HYDRA_DATABASE_URL take precedence (keep secrets out of the file)",
        false,
    ),
    (
        "database_connections",
        "PostgreSQL pool of the runner's own loops (dispatch, completion, loading)",
        false,
    ),
    (
        "api_database_connections",
        "PostgreSQL pool of the client API and the HTTP endpoint, apart from the runner's own",
        false,
    ),
    (
        "listen",
        "address builders connect to (gRPC); port 0 picks one",
        false,
    ),
    (
        "client_listen",
        "address of the client API (gRPC: submit, cancel, status; health, reflection); loopback by default",
        false,
    ),
    (
        "client_tls_cert",
        "TLS certificate (PEM) of the client API",
        false,
    ),
    ("client_tls_key", "its private key (PEM)", false),
    (
        "allow_unauthenticated",
        "serve builders or clients beyond loopback without tokens or mutual TLS (refused otherwise)",
        false,
    ),
    (
        "http_listen",
        "address of the HTTP /status and /metrics (Prometheus) endpoint; none: off",
        false,
    ),
    (
        "hydra_data",
        "Hydra's data directory (HYDRA_DATA): build logs under <hydra_data>/build-logs, where hydra-web reads them",
        false,
    ),
    (
        "log_compression",
        "\"zstd\": compress a finished step's log to .zst; \"none\": leave the plain file (for hydra-notify's CompressLog)",
        false,
    ),
    ("store_socket", "the runner's own nix-daemon", false),
    (
        "store_real_dir",
        "where the runner's store's files are on this machine, for reading .drv files without the daemon; default: the store directory",
        false,
    ),
    (
        "max_output_size",
        "largest total NAR size of a step's outputs (status 11 beyond)",
        true,
    ),
    (
        "max_log_size",
        "largest build log of a step (status 10 beyond)",
        true,
    ),
    (
        "max_unsupported_secs",
        "how long a runnable step may find no connected machine for it, while some is connected, before failing with 9",
        true,
    ),
    (
        "machine_memory_secs",
        "how long a machine that went away still counts as supporting its systems and features (its steps wait rather than fail with 9)",
        true,
    ),
    (
        "ping_interval_secs",
        "how often builders ping; also the HTTP/2 keepalive interval (pushed to builders on reload)",
        true,
    ),
    (
        "ping_timeout_secs",
        "a builder silent this long is gone, even with its TCP connection open",
        true,
    ),
    (
        "reconnect_grace_secs",
        "how long attempts wait for their builder to come back (after it left, or after a runner restart) before they are retried",
        true,
    ),
    (
        "attempt_grace_secs",
        "an attempt running this long past its step's timeout is aborted and retried",
        true,
    ),
    (
        "max_jobs_per_machine",
        "the most jobs one machine is given, whatever its max_jobs says",
        true,
    ),
    (
        "events_retention_days",
        "days hqr_events keeps the events client watchers resume from; 0: for ever",
        true,
    ),
    (
        "attempts_retention_days",
        "days hqr_attempts keeps finished attempts; 0: for ever",
        true,
    ),
    (
        "rejections_retention_days",
        "days hqr_rejections keeps refused builder messages; 0: for ever",
        true,
    ),
    (
        "uploads_retention_days",
        "days hqr_uploads keeps finished uploads; 0: for ever",
        true,
    ),
    (
        "max_tries",
        "aborted attempts before a step fails as aborted (3)",
        true,
    ),
    (
        "retry_base_secs",
        "backoff before retrying an aborted step: a random half to all of base * factor^(tries-1)",
        true,
    ),
    ("retry_factor", "see retry_base_secs", true),
    (
        "machine_rest_after_failures",
        "aborted attempts in a row after which a machine rests",
        true,
    ),
    (
        "machine_rest_base_secs",
        "first rest, doubled with each further failure",
        true,
    ),
    ("machine_rest_max_secs", "longest rest", true),
    (
        "min_free_disk",
        "a machine reporting less free disk gets no new steps",
        true,
    ),
    (
        "status_interval_secs",
        "how often the status document (SystemStatus) is rewritten",
        true,
    ),
    (
        "destinations",
        "binary caches the outputs are published to (file:// URLs), from a persistent queue",
        false,
    ),
    (
        "signing_key_file",
        "Nix secret key (name:base64) that signs the published narinfos and realisations",
        false,
    ),
    (
        "spool_dir",
        "where NARs are compressed before they are published (room for the largest compressed output); $TMPDIR, else /var/tmp",
        true,
    ),
    (
        "tls_cert",
        "TLS certificate of the builder service (PEM)",
        false,
    ),
    ("tls_key", "its private key (PEM)", false),
    (
        "tls_client_ca",
        "CA that builders' client certificates must be signed by (mutual TLS)",
        false,
    ),
    (
        "builder_tokens_dir",
        "directory of builder tokens: <machine>.token admits that machine, shared.token any; re-read on reload",
        true,
    ),
    (
        "client_tokens_dir",
        "directory of client API tokens, <name>.token each: a bare secret (an operator) or TOML with secret, role (operator, submitter, reader) and tenant; re-read on reload",
        true,
    ),
    (
        "priority_aging_secs",
        "a runnable step gains a global priority point per this many seconds waited (at most 20); 0 turns aging off",
        true,
    ),
    (
        "run_ahead",
        "a dependent starts on the machine that built its inputs before their outputs reach the runner (its result recorded only after theirs)",
        true,
    ),
    (
        "advisory_lock_key",
        "PostgreSQL advisory lock that makes one runner active, the others standbys",
        false,
    ),
];

/// What a reload changed, and what it could not.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Reload {
    pub changed: Vec<&'static str>,
    /// Keys whose new value waits for a restart.
    pub need_restart: Vec<&'static str>,
}

impl Default for RunnerConfig {
    fn default() -> Self {
        RunnerConfig {
            database_url: None,
            database_connections: 16,
            api_database_connections: 4,
            listen: "127.0.0.1:7070".parse().expect("literal address"),
            client_listen: "127.0.0.1:7072".parse().expect("literal address"),
            client_tls_cert: None,
            client_tls_key: None,
            allow_unauthenticated: false,
            http_listen: None,
            hydra_data: std::env::var_os("HYDRA_DATA")
                .map(PathBuf::from)
                .unwrap_or_else(|| "/var/lib/hydra".into()),
            log_compression: LogCompression::Zstd,
            store_socket: "/nix/var/nix/daemon-socket/socket".into(),
            store_real_dir: None,
            max_output_size: 2 << 30,
            max_log_size: 64 << 20,
            max_unsupported_secs: 300,
            machine_memory_secs: 86400,
            ping_interval_secs: 10,
            ping_timeout_secs: 30,
            reconnect_grace_secs: 90,
            attempt_grace_secs: 600,
            max_jobs_per_machine: 256,
            events_retention_days: 30,
            attempts_retention_days: 90,
            rejections_retention_days: 30,
            uploads_retention_days: 7,
            max_tries: 5,
            retry_base_secs: 10.0,
            retry_factor: 3.0,
            machine_rest_after_failures: 3,
            machine_rest_base_secs: 60.0,
            machine_rest_max_secs: 3600.0,
            min_free_disk: 1 << 30,
            status_interval_secs: 5,
            destinations: Vec::new(),
            signing_key_file: None,
            spool_dir: std::env::var_os("TMPDIR")
                .map(PathBuf::from)
                .unwrap_or_else(|| "/var/tmp".into()),
            tls_cert: None,
            tls_key: None,
            tls_client_ca: None,
            builder_tokens_dir: None,
            client_tokens_dir: None,
            priority_aging_secs: 60,
            run_ahead: true,
            advisory_lock_key: 0x4859_4452_4151_5252,
        }
    }
}

impl RunnerConfig {
    /// Reads `path`; a missing key takes its default.
    pub fn load(path: &Path) -> Result<RunnerConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(&text).map_err(|message| ConfigError::Invalid {
            path: path.to_owned(),
            message,
        })
    }

    pub fn parse(text: &str) -> Result<RunnerConfig, String> {
        let config: RunnerConfig = toml::from_str(text).map_err(|e| e.to_string())?;
        config.check()?;
        Ok(config)
    }

    /// The settings that must hold together (and what to add when not).
    pub fn check(&self) -> Result<(), String> {
        if self.database_connections == 0 || self.api_database_connections == 0 {
            return Err(
                "database_connections and api_database_connections must be at least 1".into(),
            );
        }
        if self.max_tries == 0 {
            return Err("max_tries must be at least 1".into());
        }
        if self.retry_factor < 1.0 || self.retry_base_secs < 0.0 {
            return Err("retry_base_secs must be >= 0 and retry_factor >= 1".into());
        }
        if self.ping_interval_secs == 0 || self.ping_timeout_secs <= self.ping_interval_secs {
            return Err(
                "ping_interval_secs must be >= 1 and ping_timeout_secs larger than it".into(),
            );
        }
        for d in &self.destinations {
            crate::uploads::cache::Cache::from_url(d).map_err(|e| e.to_string())?;
        }
        if self.tls_cert.is_some() != self.tls_key.is_some() {
            return Err("tls_cert and tls_key go together".into());
        }
        if self.tls_client_ca.is_some() && self.tls_cert.is_none() {
            return Err("tls_client_ca needs tls_cert and tls_key (mutual TLS is TLS)".into());
        }
        if self.client_tls_cert.is_some() != self.client_tls_key.is_some() {
            return Err("client_tls_cert and client_tls_key go together".into());
        }
        if !self.allow_unauthenticated {
            let builders_authenticated =
                self.builder_tokens_dir.is_some() || self.tls_client_ca.is_some();
            if !self.listen.ip().is_loopback() && !builders_authenticated {
                return Err(format!(
                    "listen = {} reaches beyond this machine, but builders are not authenticated: \
                     set builder_tokens_dir (or tls_cert, tls_key and tls_client_ca for mutual TLS), \
                     or allow_unauthenticated = true",
                    self.listen
                ));
            }
            if !self.client_listen.ip().is_loopback() && self.client_tokens_dir.is_none() {
                return Err(format!(
                    "client_listen = {} reaches beyond this machine, but clients are not \
                     authenticated: set client_tokens_dir, or allow_unauthenticated = true",
                    self.client_listen
                ));
            }
        }
        if self.machine_rest_after_failures == 0
            || self.machine_rest_base_secs < 0.0
            || self.machine_rest_max_secs < self.machine_rest_base_secs
        {
            return Err("machine_rest_after_failures must be >= 1, and 0 <= machine_rest_base_secs <= machine_rest_max_secs".into());
        }
        Ok(())
    }

    /// `self` with the reloadable keys of `new`; the others keep their
    /// value until a restart.
    pub fn reloaded(&self, new: &RunnerConfig) -> (RunnerConfig, Reload) {
        let old_table = self.table();
        let new_table = new.table();
        let mut merged = old_table.clone();
        let mut report = Reload::default();
        for (key, _, reloadable) in KEYS {
            let (a, b) = (old_table.get(*key), new_table.get(*key));
            if a == b {
                continue;
            }
            if *reloadable {
                match b {
                    Some(v) => merged.insert(key.to_string(), v.clone()),
                    None => merged.remove(*key),
                };
                report.changed.push(key);
            } else {
                report.need_restart.push(key);
            }
        }
        let config = merged
            .try_into()
            .expect("a table made of two valid configurations is valid");
        (config, report)
    }

    fn table(&self) -> toml::Table {
        toml::Table::try_from(self).expect("the configuration serialises")
    }

    /// Every key with its default and meaning, for `--help`.
    pub fn describe() -> String {
        let defaults = RunnerConfig::default().table();
        let mut out = String::from("Configuration keys (TOML, --config), with their defaults:\n");
        for (key, meaning, reloadable) in KEYS {
            let default = defaults
                .get(*key)
                .map_or("none".to_owned(), |v| v.to_string());
            let reload = if *reloadable { " [SIGHUP reloads]" } else { "" };
            out.push_str(&format!("  {key} = {default}\n      {meaning}{reload}\n"));
        }
        out
    }

    /// How long a machine rests after `failures` aborted attempts in a
    /// row; None while it has not failed often enough.
    pub fn machine_rest(&self, failures: u32) -> Option<Duration> {
        let beyond = failures.checked_sub(self.machine_rest_after_failures)?;
        let secs = self.machine_rest_base_secs * 2f64.powi(beyond.min(30) as i32);
        Some(Duration::from_secs_f64(
            secs.min(self.machine_rest_max_secs),
        ))
    }

    /// The wait before attempt `tries + 1`, after `tries` aborted attempts.
    /// Jittered, so that steps aborted together (a machine died) do not
    /// come back together.
    pub fn retry_delay(&self, tries: u32) -> Duration {
        let exp = self
            .retry_factor
            .powi(tries.saturating_sub(1).min(60) as i32);
        let full = (self.retry_base_secs * exp).min(24.0 * 3600.0);
        Duration::from_secs_f64(full * rand::random_range(0.5..=1.0))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_empty_file_gives_the_defaults() {
        let c = RunnerConfig::parse("").unwrap();
        assert_eq!(c.max_log_size, 64 << 20);
        assert_eq!(c.listen.port(), 7070);
    }

    #[test]
    fn an_unknown_key_is_named() {
        let err = RunnerConfig::parse("max_log_sise = 3").unwrap_err();
        assert!(err.contains("max_log_sise"), "{err}");
    }

    #[test]
    fn retries_back_off_exponentially_with_jitter() {
        let c = RunnerConfig::parse("retry_base_secs = 2.0\nretry_factor = 3.0").unwrap();
        for _ in 0..100 {
            let first = c.retry_delay(1);
            assert!(first >= Duration::from_secs(1) && first <= Duration::from_secs(2));
            let third = c.retry_delay(3);
            assert!(third >= Duration::from_secs(9) && third <= Duration::from_secs(18));
        }
        let spread: std::collections::HashSet<Duration> =
            (0..20).map(|_| c.retry_delay(1)).collect();
        assert!(spread.len() > 1, "jittered");
    }

    #[test]
    fn a_machine_rests_after_repeated_failures_for_longer_each_time() {
        let c = RunnerConfig::parse(
            "machine_rest_after_failures = 3\nmachine_rest_base_secs = 10.0\nmachine_rest_max_secs = 35.0",
        )
        .unwrap();
        assert_eq!(c.machine_rest(2), None);
        assert_eq!(c.machine_rest(3), Some(Duration::from_secs(10)));
        assert_eq!(c.machine_rest(4), Some(Duration::from_secs(20)));
        assert_eq!(c.machine_rest(5), Some(Duration::from_secs(35)), "capped");
    }

    #[test]
    fn a_ping_timeout_not_above_the_interval_is_refused() {
        let err =
            RunnerConfig::parse("ping_interval_secs = 10\nping_timeout_secs = 10").unwrap_err();
        assert!(err.contains("ping_timeout_secs"), "{err}");
    }

    #[test]
    fn every_field_is_a_documented_key() {
        let all = RunnerConfig {
            database_url: Some("postgres:///x".into()),
            tls_cert: Some("c".into()),
            tls_key: Some("k".into()),
            tls_client_ca: Some("ca".into()),
            http_listen: Some("127.0.0.1:1".parse().unwrap()),
            builder_tokens_dir: Some("t".into()),
            client_tokens_dir: Some("c".into()),
            client_tls_cert: Some("cc".into()),
            client_tls_key: Some("ck".into()),
            signing_key_file: Some("k".into()),
            store_real_dir: Some("s".into()),
            ..RunnerConfig::default()
        };
        let fields: Vec<String> = all.table().keys().cloned().collect();
        let keys: Vec<String> = KEYS.iter().map(|k| k.0.to_owned()).collect();
        let mut sorted = keys.clone();
        sorted.sort();
        assert_eq!(fields, sorted, "KEYS and RunnerConfig differ");
        let docs = include_str!("../../../docs/configuration.md");
        for key in keys {
            assert!(
                docs.contains(&format!("`{key}`")),
                "{key} is not in docs/configuration.md"
            );
            assert!(RunnerConfig::describe().contains(&format!("  {key} = ")));
        }
    }

    #[test]
    fn a_reload_takes_live_keys_and_names_those_that_need_a_restart() {
        let old = RunnerConfig::parse("max_log_size = 100\nlisten = \"127.0.0.1:1\"").unwrap();
        let new = RunnerConfig::parse("max_log_size = 50\nlisten = \"127.0.0.1:2\"\nmax_tries = 9")
            .unwrap();
        let (merged, report) = old.reloaded(&new);
        assert_eq!(merged.max_log_size, 50);
        assert_eq!(merged.max_tries, 9);
        assert_eq!(
            merged.listen.port(),
            1,
            "the listener stays until a restart"
        );
        assert_eq!(report.changed, ["max_log_size", "max_tries"]);
        assert_eq!(report.need_restart, ["listen"]);
    }
}
