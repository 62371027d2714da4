//! A current Nix for the tests' machines, as production builders run it:
//! Debian 13's `nix-bin` (Nix 2.26, worker protocol 1.38) in a root made
//! with `mmdebstrap` from Debian's archive, with the sandbox on (no
//! fallback) and build users of each machine's own.
//!
//! `HQ_NIX=2.26` makes every [`crate::NixStore`] run its nix-daemon and its
//! Nix CLI from that root; without it they are the host's (Debian 12's Nix
//! 2.8, sandbox off). The root is made on first use (about a minute and
//! 220 MB) and kept outside the repository, in `HQ_NIX_ROOTS` or
//! `~/.cache/hydra-queue-runner`, for every later run; test processes that
//! start at once wait for the one that makes it.
//!
//! Facts this rests on (learnt on this machine, each checked by a test):
//! - inside a chroot, Nix 2.26 refuses the sandbox unless `/` is a mount
//!   point, and with the default `sandbox-fallback = true` then builds
//!   unsandboxed without a word; so the root is bind-mounted onto itself
//!   and the fallback is off;
//! - several machines on one kernel need build users of their own: Nix
//!   kills a build user's processes before each build, so two daemons
//!   sharing `nixbld1` kill each other's builds. Each store gets its own
//!   `/etc/passwd` and `/etc/group`, with uids drawn at random from a range
//!   no system user has;
//! - Debian's Nix puts `/bin/sh` (bash-static) in the sandbox; the test
//!   derivations' coreutils come from the root's `/usr`, bound in;
//! - a quick builder is sometimes killed as it exits ("failed due to signal
//!   9", NixOS/nix#2176), under load and with several builds at once; the
//!   test prelude keeps the log open until the builder's exit status is
//!   settled (`holdLog`);
//! - the sandbox is `relaxed`: the few test derivations that must reach a
//!   file of their test (a gate, a counter) say `__noChroot = true`.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::nix::NixError;

/// Which Nix the tests' machines run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NixVersion {
    /// The host's (Debian 12's `nix-bin`, 2.8), sandbox off.
    Host,
    /// Debian 13's `nix-bin` (2.26) in a root of its own, sandboxed.
    Current,
}

impl NixVersion {
    /// From `HQ_NIX` (`2.26` for [`NixVersion::Current`]; unset or `2.8`
    /// for the host's).
    pub fn from_env() -> Result<NixVersion, NixError> {
        match std::env::var("HQ_NIX").as_deref() {
            Err(_) | Ok("") | Ok("2.8") | Ok("host") => Ok(NixVersion::Host),
            Ok("2.26") | Ok("current") => Ok(NixVersion::Current),
            Ok(other) => Err(NixError::Setup(format!(
                "HQ_NIX={other}: the tests know Nix 2.8 (the host's) and 2.26"
            ))),
        }
    }
}

/// The Nix settings of a machine on the current Nix: sandboxed, with build
/// users, no substituters, CA derivations enabled.
pub fn nix_config() -> String {
    [
        // Sandboxed; only a derivation that says `__noChroot = true` (a
        // test's that must reach a file of the test, a gate or a counter)
        // builds outside it.
        "sandbox = relaxed",
        "sandbox-fallback = false",
        "build-users-group = nixbld",
        "extra-sandbox-paths = /usr /lib=/usr/lib /lib64=/usr/lib64",
        "substituters =",
        "experimental-features = nix-command ca-derivations dynamic-derivations",
        "keep-derivations = true",
        "warn-dirty = false",
    ]
    .join("\n")
}

/// The Debian release whose `nix-bin` is the current Nix.
const SUITE: &str = "trixie";
const MIRROR: &str = "http://deb.debian.org/debian";
/// Build users per machine (a builder runs at most a few jobs at once).
const BUILD_USERS: u32 = 8;

/// The root with Nix 2.26, made when missing.
pub fn root() -> Result<PathBuf, NixError> {
    let cache = match std::env::var_os("HQ_NIX_ROOTS") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into()))
            .join(".cache/hydra-queue-runner"),
    };
    std::fs::create_dir_all(&cache)?;
    let root = cache.join(format!("nix-debian-{SUITE}"));
    let complete = root.join(".complete");
    if complete.exists() {
        return Ok(root);
    }
    // One process makes it; the others wait on the lock, then find it.
    let lock = std::fs::File::create(cache.join(format!("nix-debian-{SUITE}.lock")))?;
    // SAFETY: flock on a descriptor we own, released when it closes.
    if unsafe { libc::flock(std::os::fd::AsRawFd::as_raw_fd(&lock), libc::LOCK_EX) } != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    if complete.exists() {
        return Ok(root);
    }
    make_root(&root)?;
    std::fs::File::create(&complete)?;
    Ok(root)
}

fn make_root(root: &Path) -> Result<(), NixError> {
    let partial = root.with_extension("partial");
    let _ = std::fs::remove_dir_all(&partial);
    let _ = std::fs::remove_dir_all(root);
    eprintln!(
        "making a Debian 13 root with nix-bin (Nix 2.26) in {} for the tests' machines: once, about a minute",
        root.display()
    );
    let out = Command::new("mmdebstrap")
        .args([
            "--variant=essential",
            "--include=nix-bin",
            "--components=main",
            SUITE,
        ])
        .arg(&partial)
        .arg(MIRROR)
        .output()
        .map_err(|e| {
            NixError::Setup(format!(
                "running mmdebstrap (apt-get install mmdebstrap; scripts/test.sh does): {e}"
            ))
        })?;
    if !out.status.success() {
        return Err(NixError::Command {
            what: format!("mmdebstrap {SUITE} with nix-bin"),
            status: out.status.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        });
    }
    // Mount points for a machine's store and the host's temporary files.
    std::fs::create_dir_all(partial.join("nix"))?;
    std::fs::rename(&partial, root)?;
    Ok(())
}

/// Writes a machine's own `passwd` and `group` into `dir` (bound over the
/// root's): root, nobody, and build users `nixbld1..` in group `nixbld`,
/// with uids drawn at random from 1,000,000 up, so that machines on one
/// kernel never share one.
pub fn write_build_users(dir: &Path) -> Result<(), NixError> {
    let slot = (uuid::Uuid::new_v4().as_u128() % 1_000_000) as u32;
    let gid = 1_000_000 + slot * (BUILD_USERS + 1);
    let mut passwd = std::fs::File::create(dir.join("passwd"))?;
    writeln!(passwd, "root:x:0:0:root:/root:/bin/sh")?;
    writeln!(
        passwd,
        "nobody:x:65534:65534:nobody:/nonexistent:/usr/sbin/nologin"
    )?;
    let mut members = Vec::new();
    for i in 1..=BUILD_USERS {
        writeln!(
            passwd,
            "nixbld{i}:x:{}:{gid}:Nix build user {i}:/var/empty:/usr/sbin/nologin",
            gid + i
        )?;
        members.push(format!("nixbld{i}"));
    }
    let mut group = std::fs::File::create(dir.join("group"))?;
    writeln!(group, "root:x:0:")?;
    writeln!(group, "nogroup:x:65534:")?;
    writeln!(group, "nixbld:x:{gid}:{}", members.join(","))?;
    Ok(())
}

/// The shell line that, in a new mount namespace, makes `$1` (the root)
/// a machine with store `$2` and the users in `$3`, with the host's `/tmp`
/// (where tests keep their files and the store's expressions), reports on
/// fd 4, and execs the daemon inside it (socket activation on fd 3, as for
/// the host's).
pub const SERVE: &str = r#"mount --bind "$1" "$1" && mount -t proc proc "$1/proc" && mount --rbind /dev "$1/dev" && mount --bind "$2" "$1/nix" && mount --bind /tmp "$1/tmp" && mount --bind "$3/passwd" "$1/etc/passwd" && mount --bind "$3/group" "$1/etc/group" && echo ready >&4 && exec 4>&- && export LISTEN_PID=$$ LISTEN_FDS=1 && exec chroot "$1" nix-daemon"#;
