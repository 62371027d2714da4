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
    /// Where builders connect.
    pub address: String,
    /// Where the client API listens.
    pub client_address: String,
    pub database_url: String,
}

impl RunnerSetup {
    /// Writes a runner configuration for `store` under `dir`, listening
    /// on a fixed free address.
    pub fn new(dir: &Path, store: &NixStore, database_url: &str) -> Result<RunnerSetup> {
        Self::new_with(dir, store, database_url, "")
    }

    /// [`RunnerSetup::new`] with more lines for the TOML file.
    pub fn new_with(
        dir: &Path,
        store: &NixStore,
        database_url: &str,
        extra_config: &str,
    ) -> Result<RunnerSetup> {
        let address = free_address()?;
        let client_address = free_address()?;
        let config = dir.join("runner.toml");
        std::fs::write(
            &config,
            format!(
                "listen = \"{address}\"\nclient_listen = \"{client_address}\"\nstore_socket = \"{}\"\nstore_real_dir = \"{}\"\nhydra_data = \"{}\"\nretry_base_secs = 0.2\n{extra_config}\n",
                store.socket().display(),
                store.real_store_dir().display(),
                dir.display()
            ),
        )?;
        Ok(RunnerSetup {
            config,
            address,
            client_address,
            database_url: database_url.to_owned(),
        })
    }

    /// Starts `hydra-queue-runner serve`; `env` is added to its environment.
    /// Returns once it serves builders.
    pub async fn start(&self, env: &[(&str, &str)]) -> Result<RunnerProcess> {
        let mut process = self.launch(env)?;
        process
            .wait_for_line("serving builders on", Duration::from_secs(30))
            .await?;
        Ok(process)
    }

    /// Starts `hydra-queue-runner serve` without waiting for it to serve
    /// (a standby does not, until the active runner is gone).
    pub fn launch(&self, env: &[(&str, &str)]) -> Result<RunnerProcess> {
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
        Ok(RunnerProcess {
            lines: forward_lines(&mut child, "runner"),
            child,
        })
    }
}

/// A running `hydra-queue-runner serve`.
pub struct RunnerProcess {
    child: Child,
    lines: mpsc::UnboundedReceiver<String>,
}

/// How a runner process ended, and the last lines it printed.
pub struct RunnerExit {
    pub status: std::process::ExitStatus,
    pub output: String,
}

impl RunnerProcess {
    /// Waits until the runner prints a line containing `needle`.
    pub async fn wait_for_line(&mut self, needle: &str, limit: Duration) -> Result<String> {
        wait_for(&mut self.lines, needle, limit, "the runner").await
    }

    /// The process id (None once it was reaped).
    pub fn pid(&self) -> Option<u32> {
        self.child.id()
    }

    /// The most memory the process has had resident so far (`VmHWM`), in
    /// bytes.
    pub fn peak_resident_bytes(&self) -> Result<u64> {
        let pid = self.pid().context("the runner has exited")?;
        let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
        let kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmHWM:"))
            .context("no VmHWM")?
            .trim()
            .trim_end_matches("kB")
            .trim()
            .parse()?;
        Ok(kib * 1024)
    }

    /// SIGKILL, as a crash or the OOM killer would; waits until it is gone.
    pub async fn kill(mut self) -> Result<()> {
        self.child.kill().await?;
        Ok(())
    }

    /// [`RunnerProcess::kill`], returning every line it printed that no
    /// `wait_for_line` consumed.
    pub async fn kill_and_collect(mut self) -> Result<Vec<String>> {
        self.child.kill().await?;
        let mut out = Vec::new();
        while let Ok(Some(line)) =
            tokio::time::timeout(Duration::from_secs(5), self.lines.recv()).await
        {
            out.push(line);
        }
        Ok(out)
    }

    /// The lines printed so far that no `wait_for_line` consumed.
    pub fn printed(&mut self) -> Vec<String> {
        let mut out = Vec::new();
        while let Ok(line) = self.lines.try_recv() {
            out.push(line);
        }
        out
    }

    /// SIGTERM, as systemd stops a service.
    pub fn terminate(&self) -> Result<()> {
        self.signal(libc::SIGTERM)
    }

    /// SIGHUP, as `systemctl reload` does.
    pub fn hangup(&self) -> Result<()> {
        self.signal(libc::SIGHUP)
    }

    fn signal(&self, sig: i32) -> Result<()> {
        send_signal(&self.child, sig, "the runner")
    }

    /// Waits for the runner to exit by itself, with what it printed since
    /// the last line a `wait_for_line` consumed.
    pub async fn exit(mut self, limit: Duration) -> Result<RunnerExit> {
        let status = tokio::time::timeout(limit, self.child.wait())
            .await
            .map_err(|_| anyhow!("the runner did not exit within {limit:?}"))??;
        let mut output = String::new();
        while let Some(line) = self.lines.recv().await {
            output.push_str(&line);
            output.push('\n');
        }
        Ok(RunnerExit { status, output })
    }
}

/// A running `hydra-builder` over a store of its own.
pub struct BuilderProcess {
    pub name: String,
    pub store: NixStore,
    child: Child,
    lines: mpsc::UnboundedReceiver<String>,
    /// How to start it again (same configuration, store and state).
    config: PathBuf,
    urls: Vec<String>,
    env: Vec<(String, String)>,
}

impl BuilderProcess {
    /// Starts a builder named `name` that connects to `address`, and
    /// reconnects quickly when the runner goes away.
    pub fn start(name: &str, address: &str, dir: &Path) -> Result<BuilderProcess> {
        Self::start_with(name, address, dir, "")
    }

    /// [`BuilderProcess::start`] with more lines for its TOML configuration.
    pub fn start_with(
        name: &str,
        address: &str,
        dir: &Path,
        extra_config: &str,
    ) -> Result<BuilderProcess> {
        Self::start_urls(name, &[format!("http://{address}")], dir, extra_config, &[])
    }

    /// A builder trying `urls` in turn, with more configuration lines and
    /// environment variables.
    pub fn start_urls(
        name: &str,
        urls: &[String],
        dir: &Path,
        extra_config: &str,
        env: &[(&str, &str)],
    ) -> Result<BuilderProcess> {
        let store = NixStore::start()?;
        let config = dir.join(format!("{name}.toml"));
        let state = dir.join(format!("{name}-state"));
        std::fs::write(
            &config,
            format!(
                "reconnect_min_secs = 0.1\nreconnect_max_secs = 0.5\nmax_jobs = 2\nstate_dir = {:?}\n{extra_config}\n",
                state.display().to_string()
            ),
        )?;
        let urls: Vec<String> = urls.to_vec();
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        let (child, lines) = Self::spawn(name, &store, &config, &urls, &env)?;
        Ok(BuilderProcess {
            name: name.to_owned(),
            store,
            child,
            lines,
            config,
            urls,
            env,
        })
    }

    fn spawn(
        name: &str,
        store: &NixStore,
        config: &Path,
        urls: &[String],
        env: &[(String, String)],
    ) -> Result<(Child, mpsc::UnboundedReceiver<String>)> {
        let mut command = Command::new(binary("hydra-builder"));
        command.arg("--config").arg(config);
        for url in urls {
            command.args(["--runner-url", url]);
        }
        let mut child = command
            .args(["--machine-name", name])
            .arg("--nix-daemon-socket")
            .arg(store.socket())
            .env("RUST_LOG", "info,h2=warn,tower=warn")
            .envs(env.iter().map(|(k, v)| (k, v)))
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .context("starting hydra-builder")?;
        let lines = forward_lines(&mut child, name);
        Ok((child, lines))
    }

    /// SIGKILL, then the same builder again: the same configuration, store
    /// and state directory (what it kept of its jobs).
    pub async fn restart(&mut self) -> Result<()> {
        self.child.kill().await?;
        let (child, lines) =
            Self::spawn(&self.name, &self.store, &self.config, &self.urls, &self.env)?;
        self.child = child;
        self.lines = lines;
        Ok(())
    }

    /// Waits until the builder prints a line containing `needle`.
    pub async fn wait_for_line(&mut self, needle: &str, limit: Duration) -> Result<String> {
        wait_for(&mut self.lines, needle, limit, &self.name).await
    }

    /// The same builder again after [`kill`](Self::kill): the same
    /// configuration, store and state directory.
    pub fn start_again(&mut self) -> Result<()> {
        let (child, lines) =
            Self::spawn(&self.name, &self.store, &self.config, &self.urls, &self.env)?;
        self.child = child;
        self.lines = lines;
        Ok(())
    }

    /// SIGKILL, as a crashed machine; waits until it is gone.
    pub async fn kill(&mut self) -> Result<()> {
        self.child.kill().await?;
        Ok(())
    }

    /// SIGSTOP: the process is frozen, its connections stay open.
    pub fn freeze(&self) -> Result<()> {
        self.signal(libc::SIGSTOP)
    }

    /// SIGCONT after [`BuilderProcess::freeze`].
    pub fn thaw(&self) -> Result<()> {
        self.signal(libc::SIGCONT)
    }

    /// Waits for the builder to exit by itself; its exit status.
    pub async fn exit_status(&mut self, limit: Duration) -> Result<std::process::ExitStatus> {
        tokio::time::timeout(limit, self.child.wait())
            .await
            .map_err(|_| anyhow!("the builder did not exit within {limit:?}"))?
            .map_err(Into::into)
    }

    fn signal(&self, sig: i32) -> Result<()> {
        send_signal(&self.child, sig, &self.name)
    }
}

fn send_signal(child: &Child, sig: i32, who: &str) -> Result<()> {
    let pid = child.id().ok_or_else(|| anyhow!("{who} has exited"))?;
    // SAFETY: kill has no memory-safety preconditions.
    if unsafe { libc::kill(pid as i32, sig) } != 0 {
        bail!("kill({pid}, {sig}): {}", std::io::Error::last_os_error());
    }
    Ok(())
}

/// Runs a binary of this workspace to its end (a one-shot command such as
/// `config check`).
pub async fn run_binary(
    name: &str,
    args: impl IntoIterator<Item = impl AsRef<std::ffi::OsStr>>,
) -> std::process::Output {
    Command::new(binary(name))
        .args(args)
        .output()
        .await
        .unwrap_or_else(|e| panic!("running {name}: {e}"))
}

async fn wait_for(
    lines: &mut mpsc::UnboundedReceiver<String>,
    needle: &str,
    limit: Duration,
    who: &str,
) -> Result<String> {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, lines.recv()).await {
            Ok(Some(line)) if line.contains(needle) => return Ok(line),
            Ok(Some(_)) => continue,
            Ok(None) => bail!("{who} exited before printing {needle:?}"),
            Err(_) => bail!("{who} did not print {needle:?} within {limit:?}"),
        }
    }
}

/// A named pipe that a test derivation's builder writes to when it starts
/// (`echo started > <pipe>`): the test awaits that event instead of
/// polling. The writer blocks until [`StartSignal::started`] reads.
pub struct StartSignal {
    path: PathBuf,
}

fn mkfifo(path: &Path) -> Result<()> {
    let c = std::ffi::CString::new(path.to_str().expect("UTF-8 path"))?;
    // SAFETY: mkfifo reads the NUL-terminated path we own.
    if unsafe { libc::mkfifo(c.as_ptr(), 0o666) } != 0 {
        bail!(
            "mkfifo {}: {}",
            path.display(),
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

impl StartSignal {
    pub fn new(dir: &Path, name: &str) -> Result<StartSignal> {
        let path = dir.join(name);
        mkfifo(&path)?;
        Ok(StartSignal { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Waits until a builder script writes a line to the pipe; returns it.
    pub async fn started(&self, limit: Duration) -> Result<String> {
        let path = self.path.clone();
        let read = tokio::task::spawn_blocking(move || std::fs::read_to_string(path));
        let text = tokio::time::timeout(limit, read)
            .await
            .map_err(|_| anyhow!("no build started within {limit:?}"))???;
        Ok(text.trim().to_owned())
    }
}

/// A named pipe that a test derivation's builder reads before it goes on
/// (`read x < <pipe>`): the build holds until the test opens the gate, so a
/// test controls exactly when a running step finishes.
pub struct Gate {
    path: PathBuf,
}

impl Gate {
    pub fn new(dir: &Path, name: &str) -> Result<Gate> {
        let path = dir.join(name);
        mkfifo(&path)?;
        Ok(Gate { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Lets one waiting build go on (waits for it to be reading).
    pub async fn open(&self, limit: Duration) -> Result<()> {
        let path = self.path.clone();
        let write = tokio::task::spawn_blocking(move || std::fs::write(path, "go\n"));
        tokio::time::timeout(limit, write)
            .await
            .map_err(|_| anyhow!("no build read the gate within {limit:?}"))???;
        Ok(())
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

/// A runner's `/metrics` at `http` (host:port), parsed as Prometheus
/// parses them.
/// `GET http://<http><path>` as JSON (with curl, like an outside client).
pub async fn get_json(http: &str, path: &str) -> Result<serde_json::Value> {
    let out = Command::new("curl")
        .args(["-sf", &format!("http://{http}{path}")])
        .output()
        .await?;
    if !out.status.success() {
        bail!("GET http://{http}{path} failed");
    }
    Ok(serde_json::from_slice(&out.stdout)?)
}

pub async fn scrape(http: &str) -> Result<prometheus_parse::Scrape> {
    let out = Command::new("curl")
        .args(["-sf", &format!("http://{http}/metrics")])
        .output()
        .await?;
    if !out.status.success() {
        bail!("GET http://{http}/metrics failed");
    }
    let text = String::from_utf8(out.stdout)?;
    Ok(prometheus_parse::Scrape::parse(
        text.lines().map(|l| Ok(l.to_owned())),
    )?)
}

/// The value of metric `name` with label `key` = `value`, if scraped.
pub fn sample(
    scrape: &prometheus_parse::Scrape,
    name: &str,
    key: &str,
    value: &str,
) -> Option<f64> {
    scrape
        .samples
        .iter()
        .find(|s| s.metric == name && s.labels.get(key) == Some(value))
        .map(|s| match s.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            _ => f64::NAN,
        })
}

/// Starts a helper server (a test's S3 or HTTP cache) and returns once it
/// prints a line containing `ready` on stdout or stderr: it listens then.
pub async fn start_server(mut command: Command, ready: &str, limit: Duration) -> Result<Child> {
    let mut child = command
        .env("PYTHONUNBUFFERED", "1")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .context("starting a test server")?;
    let (tx, mut lines) = mpsc::unbounded_channel();
    let out = child.stdout.take().expect("piped");
    let err = child.stderr.take().expect("piped");
    for pipe in [
        Box::new(out) as Box<dyn tokio::io::AsyncRead + Unpin + Send>,
        Box::new(err),
    ] {
        let tx = tx.clone();
        tokio::spawn(async move {
            let mut reader = BufReader::new(pipe).lines();
            while let Ok(Some(line)) = reader.next_line().await {
                let _ = tx.send(line);
            }
        });
    }
    drop(tx);
    wait_for(&mut lines, ready, limit, "the test server").await?;
    // Keep draining, so that a chatty server never blocks on a full pipe.
    tokio::spawn(async move { while lines.recv().await.is_some() {} });
    Ok(child)
}
