//! Private Nix stores for tests, and instantiating test expressions.
//!
//! A [`NixStore`] is a nix-daemon running in its own mount namespace with a
//! private directory bind-mounted on `/nix`, so it has a store of its own,
//! as a separate machine would. Its socket lives outside that `/nix`, so
//! processes in the host namespace (the runner, tests, `nix-instantiate`)
//! reach that store through the daemon. The socket is bound before the
//! daemon starts and handed over by socket activation: nobody waits for it.
//!
//! With `HQ_NIX=2.26` the daemon and the Nix CLI come from a Debian 13
//! root instead, sandboxed, with build users of the store's own
//! ([`crate::current_nix`]).

use std::collections::BTreeMap;
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixListener;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use thiserror::Error;

use crate::current_nix::{self, NixVersion};

/// The Nix settings tests and the demo use: root without a daemon's build
/// users, no sandbox, no network substituters, CA derivations enabled.
pub fn nix_config() -> String {
    [
        "sandbox = false",
        "build-users-group =",
        "substituters =",
        "experimental-features = nix-command ca-derivations",
        "keep-derivations = true",
        "warn-dirty = false",
    ]
    .join("\n")
}

/// The settings of a store's daemon and tools.
fn version_config(version: NixVersion) -> String {
    match version {
        NixVersion::Host => nix_config(),
        NixVersion::Current => current_nix::nix_config(),
    }
}

#[derive(Debug, Error)]
pub enum NixError {
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("{what} failed ({status}): {stderr}")]
    Command {
        what: String,
        status: String,
        stderr: String,
    },
    #[error("private stores need root (for unshare --mount and the bind mount on /nix)")]
    NotRoot,
    #[error("{0}")]
    Setup(String),
}

/// A store of its own, served by a nix-daemon in a private mount namespace.
pub struct NixStore {
    root: PathBuf,
    /// Goes into every test derivation instantiated here, so that stores
    /// (tests) never share outputs, while two instantiations of one
    /// expression in one store give the same derivations, as on a farm.
    salt: String,
    socket: PathBuf,
    daemon: Child,
    /// A store opened at a fixed place (a benchmark's cache) outlives us.
    keep: bool,
    version: NixVersion,
}

impl NixStore {
    /// Starts a daemon over a new, empty store.
    pub fn start() -> Result<NixStore, NixError> {
        let root = tempfile::Builder::new()
            .prefix("hq-store-")
            .tempdir()?
            .keep();
        Self::serve(root, uuid::Uuid::new_v4().simple().to_string(), false)
    }

    /// Starts a daemon over the store kept at `root` (made when missing),
    /// which stays when the daemon stops: benchmarks cache what they
    /// instantiated there. `salt` must be the same on every opening for
    /// instantiations to give the same derivations.
    pub fn open(root: &Path, salt: &str) -> Result<NixStore, NixError> {
        std::fs::create_dir_all(root)?;
        let _ = std::fs::remove_file(root.join("daemon.sock"));
        Self::serve(root.to_owned(), salt.to_owned(), true)
    }

    fn serve(root: PathBuf, salt: String, keep: bool) -> Result<NixStore, NixError> {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            return Err(NixError::NotRoot);
        }
        let version = NixVersion::from_env()?;
        let nix_dir = root.join("nix");
        std::fs::create_dir_all(&nix_dir)?;
        let socket = root.join("daemon.sock");
        let listener = UnixListener::bind(&socket)?;
        let log = std::fs::File::create(root.join("daemon.log"))?;
        let fd = listener.as_raw_fd();
        // The shell reports on fd 4 once the bind mount is in place: from
        // then on its namespace is the store's, and `nsenter` reaches it.
        let (ready_read, ready_write) = std::io::pipe()?;
        let ready_fd = ready_write.as_raw_fd();
        let mut cmd = Command::new("unshare");
        cmd.args(["--mount", "--propagation", "private", "--", "sh", "-c"]);
        match version {
            NixVersion::Host => cmd
                .arg(r#"mount --bind "$0" /nix && echo ready >&4 && exec 4>&- && export LISTEN_PID=$$ LISTEN_FDS=1 && exec nix-daemon"#)
                .arg(&nix_dir),
            NixVersion::Current => {
                let users = root.join("users");
                std::fs::create_dir_all(&users)?;
                current_nix::write_build_users(&users)?;
                cmd.arg(current_nix::SERVE)
                    .arg("sh")
                    .arg(current_nix::root()?)
                    .arg(&nix_dir)
                    .arg(&users)
            }
        };
        cmd.env("NIX_CONFIG", version_config(version))
            .stdin(Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .process_group(0);
        // SAFETY: only async-signal-safe calls (dup2, fcntl) between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                for (from, to) in [(fd, 3), (ready_fd, 4)] {
                    if libc::dup2(from, to) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    libc::fcntl(to, libc::F_SETFD, 0);
                }
                Ok(())
            });
        }
        let daemon = cmd.spawn()?;
        drop((listener, ready_write));
        let store = NixStore {
            salt,
            root,
            socket,
            daemon,
            keep,
            version,
        };
        store.wait_until_mounted(ready_read)?;
        store.initialise()?;
        Ok(store)
    }

    /// Blocks until the shell in the new namespace says the bind mount is
    /// done (end of file instead means it failed: the log says why).
    fn wait_until_mounted(&self, mut ready: std::io::PipeReader) -> Result<(), NixError> {
        use std::io::Read;
        let mut buf = String::new();
        ready.read_to_string(&mut buf)?;
        if buf.trim() != "ready" {
            let log = std::fs::read_to_string(self.root.join("daemon.log")).unwrap_or_default();
            return Err(NixError::Command {
                what: "mounting a private /nix for nix-daemon".into(),
                status: "failed".into(),
                stderr: log,
            });
        }
        Ok(())
    }

    /// Creates the store's database and directories before any client
    /// connects: Nix 2.8 daemon children that open a fresh store at the
    /// same time race creating them ("creating symlink ... File exists"),
    /// and one of the two connections is dropped.
    fn initialise(&self) -> Result<(), NixError> {
        let out = Command::new("nsenter")
            .args(self.enter())
            .args(["nix-store", "--init"])
            .env("NIX_CONFIG", version_config(self.version))
            .env_remove("NIX_REMOTE")
            .output()?;
        check(&out, "nix-store --init")
    }

    /// `nsenter` arguments that reach the daemon's namespace (and, for
    /// the current Nix, its root), up to the program to run.
    fn enter(&self) -> Vec<String> {
        let mut args = vec!["-t".to_owned(), self.daemon.id().to_string(), "-m".into()];
        if self.version == NixVersion::Current {
            args.extend(["-r".into(), "-w".into()]);
        }
        args.push("--".into());
        args
    }

    /// Which Nix this store's daemon and tools are.
    pub fn version(&self) -> NixVersion {
        self.version
    }

    /// The daemon's socket: give it to our client or to Nix's tools.
    /// Where this store's nix-daemon keeps build logs (`<hash>-<name>.drv`
    /// files, compressed, under two-letter directories).
    pub fn build_logs_dir(&self) -> PathBuf {
        self.root.join("nix/var/log/nix/drvs")
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Where the files of the store (`/nix/store` inside the daemon's
    /// namespace) are outside it: the runner's `store_real_dir`.
    pub fn real_store_dir(&self) -> PathBuf {
        self.root.join("nix/store")
    }

    /// A command (a Nix tool, or `cat` of a store file) run inside the
    /// store's mount namespace, where it works on this store directly.
    ///
    /// Nix's CLI is not pointed at the daemon instead: through a daemon,
    /// Nix 2.8's `nix-store -r` reads `.drv` files from its own filesystem
    /// and fails on derivations that depend on CA outputs.
    pub fn command(&self, program: &str) -> tokio::process::Command {
        let mut cmd = tokio::process::Command::new("nsenter");
        cmd.args(self.enter())
            .arg(program)
            .env("NIX_CONFIG", version_config(self.version))
            .env_remove("NIX_REMOTE")
            .kill_on_drop(true);
        cmd
    }

    /// Runs a command in the store's namespace and returns its stdout.
    pub async fn run(&self, program: &str, args: &[&str]) -> Result<String, NixError> {
        output(
            self.command(program).args(args),
            &format!("{program} {}", args.join(" ")),
        )
        .await
    }

    /// Reads a file of the store (for example a `.drv`) as bytes.
    pub async fn read_store_file(&self, path: &str) -> Result<Vec<u8>, NixError> {
        let out = self.command("cat").arg(path).output().await?;
        check(&out, &format!("cat {path}"))?;
        Ok(out.stdout)
    }

    /// Instantiates the attributes `attrs` of `expr`, a Nix expression that
    /// may use the test prelude as `prelude` (`with prelude; { ... }`).
    /// Returns attribute -> `.drv` path.
    pub async fn instantiate(
        &self,
        expr: &str,
        attrs: &[&str],
    ) -> Result<BTreeMap<String, String>, NixError> {
        self.instantiate_salted(expr, attrs, &self.salt).await
    }

    /// Instantiates `expr`, whose value is a list of derivations (too many
    /// for `-A` arguments); returns their `.drv` paths in order.
    pub async fn instantiate_list(&self, expr: &str) -> Result<Vec<String>, NixError> {
        let file = self.write_expr(expr, &self.salt)?;
        let out = self
            .run(
                "nix-instantiate",
                &[file.to_str().expect("UTF-8 temp path")],
            )
            .await?;
        Ok(out.lines().map(str::to_owned).collect())
    }

    /// The salt of this store's test derivations.
    pub fn salt(&self) -> &str {
        &self.salt
    }

    /// [`NixStore::instantiate`] with another store's salt: the same
    /// derivations as there (to compare with what Nix builds of them).
    pub async fn instantiate_salted(
        &self,
        expr: &str,
        attrs: &[&str],
        salt: &str,
    ) -> Result<BTreeMap<String, String>, NixError> {
        let file = self.write_expr(expr, salt)?;
        let mut args: Vec<&str> = vec![file.to_str().expect("UTF-8 temp path")];
        for a in attrs {
            args.extend(["-A", a]);
        }
        let out = self.run("nix-instantiate", &args).await?;
        let paths: Vec<&str> = out.lines().collect();
        if paths.len() != attrs.len() {
            return Err(NixError::Command {
                what: format!("nix-instantiate {}", args.join(" ")),
                status: format!(
                    "printed {} paths for {} attributes",
                    paths.len(),
                    attrs.len()
                ),
                stderr: out,
            });
        }
        Ok(attrs
            .iter()
            .map(|a| a.to_string())
            .zip(paths.into_iter().map(str::to_owned))
            .collect())
    }

    /// Writes `expr` to a file, with the prelude in scope as `prelude`.
    fn write_expr(&self, expr: &str, salt: &str) -> Result<PathBuf, NixError> {
        let dir = self.root.join("exprs");
        std::fs::create_dir_all(&dir)?;
        let prelude = dir.join("prelude.nix");
        std::fs::write(&prelude, include_str!("prelude.nix"))?;
        let file = dir.join(format!("{}.nix", uuid::Uuid::new_v4().simple()));
        let hold = self.version == NixVersion::Current;
        std::fs::write(
            &file,
            format!(
                "let prelude = import {} {{ salt = \"{salt}\"; holdLog = {hold}; }}; in\n{expr}\n",
                prelude.display()
            ),
        )?;
        Ok(file)
    }
}

impl Drop for NixStore {
    fn drop(&mut self) {
        // The daemon forks a child per connection: end the whole group.
        // SAFETY: killpg on the group we created for the daemon.
        unsafe { libc::killpg(self.daemon.id() as i32, libc::SIGKILL) };
        let _ = self.daemon.wait();
        // HQ_KEEP_STORES=1 keeps the store and its daemon.log for a post-mortem.
        if !self.keep && std::env::var_os("HQ_KEEP_STORES").is_none() {
            let _ = std::fs::remove_dir_all(&self.root);
        }
    }
}

async fn output(cmd: &mut tokio::process::Command, what: &str) -> Result<String, NixError> {
    let out = cmd.output().await?;
    check(&out, what)?;
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn check(out: &std::process::Output, what: &str) -> Result<(), NixError> {
    if out.status.success() {
        return Ok(());
    }
    Err(NixError::Command {
        what: what.to_owned(),
        status: out.status.to_string(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}
