//! Fetching a job's missing inputs from binary caches before asking the
//! runner for them.
//!
//! Each configured cache is tried in turn through this machine's
//! nix-daemon (the connection's settings name the one cache and its keys),
//! within `substituter_timeout_secs`. A cache that is slow or times out is
//! demoted: skipped for a while, longer after each further failure. A miss
//! is only a miss: negative lookups are not cached (`narinfo-cache-negative-
//! ttl = 0`) and whatever no cache has comes from the runner, so a cache
//! that is down or empty never fails a build.

use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use hydra_nix::daemon::{BuildMode, ClientSettings, DaemonClient};
use parking_lot::Mutex;

use crate::config::BuilderConfig;

/// A cache and how it fared lately.
#[derive(Debug)]
struct Cache {
    url: String,
    failures: u32,
    demoted_until: Option<Instant>,
}

#[derive(Debug)]
pub struct Substituters {
    caches: Mutex<Vec<Cache>>,
    keys: String,
    timeout: Duration,
    /// Attempts that timed out (reported to the runner in pings).
    pub timeouts: AtomicU64,
}

/// Why one cache did not deliver.
enum Outcome {
    /// It answered: what it did not have, it did not have.
    Answered,
    /// Too slow, or it broke the connection: demote it.
    Failed(String),
}

impl Substituters {
    pub fn from_config(config: &BuilderConfig) -> Option<Substituters> {
        if config.substituters.is_empty() {
            return None;
        }
        Some(Substituters {
            caches: Mutex::new(
                config
                    .substituters
                    .iter()
                    .map(|url| Cache {
                        url: url.clone(),
                        failures: 0,
                        demoted_until: None,
                    })
                    .collect(),
            ),
            keys: config.trusted_public_keys.join(" "),
            timeout: Duration::from_secs_f64(config.substituter_timeout_secs.max(0.1)),
            timeouts: AtomicU64::new(0),
        })
    }

    /// The caches to try now, in order; demoted ones are left out.
    fn usable(&self, now: Instant) -> Vec<String> {
        let caches = self.caches.lock();
        caches
            .iter()
            .filter(|c| c.demoted_until.is_none_or(|t| t <= now))
            .map(|c| c.url.clone())
            .collect()
    }

    fn note(&self, url: &str, outcome: &Outcome) {
        let mut caches = self.caches.lock();
        let Some(cache) = caches.iter_mut().find(|c| c.url == url) else {
            return;
        };
        match outcome {
            Outcome::Answered => {
                cache.failures = 0;
                cache.demoted_until = None;
            }
            Outcome::Failed(why) => {
                cache.failures += 1;
                let pause = Duration::from_secs(30 * 2u64.pow(cache.failures.min(6) - 1));
                cache.demoted_until = Some(Instant::now() + pause);
                tracing::warn!(cache = url, "demoted for {pause:?}: {why}");
            }
        }
    }

    /// Substitutes what it can of `missing` (full store paths); returns
    /// what is still missing.
    pub async fn substitute(&self, socket: &Path, missing: Vec<String>) -> Vec<String> {
        let mut left = missing;
        let usable = self.usable(Instant::now());
        if usable.len() < self.caches.lock().len() {
            tracing::info!("skipping demoted caches");
        }
        for url in usable {
            if left.is_empty() {
                break;
            }
            let started = Instant::now();
            let tried =
                tokio::time::timeout(self.timeout, self.try_cache(socket, &url, &left)).await;
            let outcome = match tried {
                Err(_) => {
                    self.timeouts.fetch_add(1, Ordering::Relaxed);
                    Outcome::Failed(format!("no answer within {:?}", self.timeout))
                }
                Ok(Err(e)) if started.elapsed() >= self.timeout => Outcome::Failed(e),
                Ok(_) => Outcome::Answered,
            };
            self.note(&url, &outcome);
            let before = left.len();
            left = still_missing(socket, left).await;
            if before > left.len() {
                tracing::info!(cache = %url, "substituted {} of {before} inputs", before - left.len());
            }
        }
        left
    }

    /// One cache, through a daemon connection whose settings name it.
    async fn try_cache(&self, socket: &Path, url: &str, paths: &[String]) -> Result<(), String> {
        let mut daemon = DaemonClient::connect(socket)
            .await
            .map_err(|e| e.to_string())?;
        let secs = (self.timeout.as_secs() * 2).max(1).to_string();
        let mut settings = ClientSettings {
            use_substitutes: true,
            ..ClientSettings::default()
        };
        for (k, v) in [
            ("substituters", url.to_owned()),
            ("trusted-public-keys", self.keys.clone()),
            ("connect-timeout", secs.clone()),
            ("stalled-download-timeout", secs),
            ("narinfo-cache-negative-ttl", "0".to_owned()),
        ] {
            settings.overrides.insert(k.to_owned(), v);
        }
        daemon
            .set_options(&settings)
            .await
            .map_err(|e| e.to_string())?;
        daemon
            .build_paths(paths, BuildMode::Normal, &mut |_| {})
            .await
            .map_err(|e| e.to_string())
    }
}

/// The paths of `paths` not valid in the store (all of them when the
/// store cannot be asked: the runner will send them).
async fn still_missing(socket: &Path, paths: Vec<String>) -> Vec<String> {
    let Ok(mut daemon) = DaemonClient::connect(socket).await else {
        return paths;
    };
    match daemon.query_valid_paths(&paths).await {
        Ok(valid) => paths.into_iter().filter(|p| !valid.contains(p)).collect(),
        Err(_) => paths,
    }
}
