//! The shipped binaries as separate processes, for tests that kill them:
//! a runner started from a TOML file on a fixed address (so a restarted
//! runner is where builders reconnect), and builders pointed at it.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use anyhow::{Context, Result, anyhow, bail};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

use crate::NixStore;

/// A binary of this workspace, built next to the test executables.
pub fn binary(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("test executable path");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target directory");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} is not built (cargo build --workspace)",
        path.display()
    );
    path
}

/// A loopback address nobody listens on now (the runner binds it; a
/// restarted runner binds it again).
pub fn free_address() -> Result<String> {
    let socket = std::net::TcpListener::bind("127.0.0.1:0")?;
    Ok(socket.local_addr()?.to_string())
}

/// Where a runner process listens, and what it keeps.
pub struct RunnerSetup {
    pub config: PathBuf,
    pub address: String,
    pub database_url: String,
}

impl RunnerSetup {
    /// Writes a runner configuration for `store` under `dir`, listening
    /// on a fixed free address.
    pub fn new(dir: &Path, store: &NixStore, database_url: &str) -> Result<RunnerSetup> {
        let address = free_address()?;
        let config = dir.join("runner.toml");
        std::fs::write(
            &config,
            format!(
                "listen = \"{address}\"\nstore_socket = \"{}\"\ndata_dir = \"{}\"\nretry_base_secs = 0.2\n",
                store.socket().display(),
                dir.display()
            ),
        )?;
        Ok(RunnerSetup {
            config,
            address,
            database_url: database_url.to_owned(),
        })
    }

    /// Starts `hydra-queue-runner serve`; `env` is added to its environment.
    pub async fn start(&self, env: &[(&str, &str)]) -> Result<RunnerProcess> {
        let mut child = Command::new(binary("hydra-queue-runner"))
            .args(["serve", "--config"])
            .arg(&self.config)
            .env("HYDRA_DATABASE_URL", &self.database_url)
            .env("RUST_LOG", "info,sqlx=warn,h2=warn,tower=warn")
            .envs(env.iter().copied())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("starting hydra-queue-runner")?;
        let mut process = RunnerProcess {
            lines: forward_lines(&mut child, "runner"),
            child,
        };
        process
            .wait_for_line("serving builders on", Duration::from_secs(30))
            .await?;
        Ok(process)
    }
}

/// A running `hydra-queue-runner serve`.
pub struct RunnerProcess {
    child: Child,
    lines: mpsc::UnboundedReceiver<String>,
}

impl RunnerProcess {
    /// Waits until the runner prints a line containing `needle`.
    pub async fn wait_for_line(&mut self, needle: &str, limit: Duration) -> Result<String> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            match tokio::time::timeout_at(deadline, self.lines.recv()).await {
                Ok(Some(line)) if line.contains(needle) => return Ok(line),
                Ok(Some(_)) => continue,
                Ok(None) => bail!("the runner exited before printing {needle:?}"),
                Err(_) => bail!("the runner did not print {needle:?} within {limit:?}"),
            }
        }
    }

    /// SIGKILL, as a crash or the OOM killer would; waits until it is gone.
    pub async fn kill(mut self) -> Result<()> {
        self.child.kill().await?;
        Ok(())
    }
}

/// A running `hydra-builder` over a store of its own.
pub struct BuilderProcess {
    pub store: NixStore,
    _child: Child,
}

impl BuilderProcess {
    /// Starts a builder named `name` that connects to `address`, and
    /// reconnects quickly when the runner goes away.
    pub fn start(name: &str, address: &str, dir: &Path) -> Result<BuilderProcess> {
        let store = NixStore::start()?;
        let config = dir.join(format!("{name}.toml"));
        std::fs::write(
            &config,
            "reconnect_min_secs = 0.1\nreconnect_max_secs = 0.5\nmax_jobs = 2\n",
        )?;
        let mut child = Command::new(binary("hydra-builder"))
            .arg("--config")
            .arg(&config)
            .args(["--runner-url", &format!("http://{address}")])
            .args(["--machine-name", name])
            .arg("--nix-daemon-socket")
            .arg(store.socket())
            .env("RUST_LOG", "info,h2=warn,tower=warn")
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("starting hydra-builder")?;
        let mut lines = forward_lines(&mut child, name);
        tokio::spawn(async move { while lines.recv().await.is_some() {} });
        Ok(BuilderProcess {
            store,
            _child: child,
        })
    }
}

/// Copies a child's stderr lines to the test's output (shown when a test
/// fails) and into a channel.
fn forward_lines(child: &mut Child, who: &str) -> mpsc::UnboundedReceiver<String> {
    let stderr = child.stderr.take().expect("stderr is piped");
    let (tx, rx) = mpsc::unbounded_channel();
    let who = who.to_owned();
    tokio::spawn(async move {
        let mut lines = BufReader::new(stderr).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            println!("[{who}] {line}");
            let _ = tx.send(line);
        }
    });
    rx
}

/// Reads a build counter (a file that test derivations append their name
/// to, outside the store) into name -> how many times it was built.
pub fn count_lines(path: &Path) -> Result<std::collections::BTreeMap<String, usize>> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow!("reading the build counter {}: {e}", path.display()))?;
    let mut counts = std::collections::BTreeMap::new();
    for line in text.lines() {
        *counts.entry(line.to_owned()).or_insert(0) += 1;
    }
    Ok(counts)
}
