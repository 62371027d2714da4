use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};

use super::DaemonError;
use super::types::{BuildMode, BuildResult, BuildStatus, LogLine, PathInfo, Realisation};
use super::wire::*;
use crate::derivation::aterm::output_fields;
use crate::hash::{Hash, HashAlgo};
use crate::{Derivation, StoreDir};

const WORKER_MAGIC_1: u64 = 0x6e697863;
const WORKER_MAGIC_2: u64 = 0x6478696f;

/// The protocol version this client offers: Nix 2.26's. What each
/// version after Nix 2.8's 1.34 adds, and this client reads or writes:
/// 1.35 the daemon's trust in the client, after its version string in the
/// handshake; 1.36 nothing on the operations used here; 1.37 a build
/// result's user and system CPU time; 1.38 a feature exchange right after
/// the versions (each side sends the set of features it supports; this
/// client supports none yet, and Nix 2.26 defines none).
pub const PROTOCOL_VERSION: u64 = (1 << 8) | 38;
/// Protocol features this client understands (1.38's exchange).
pub const FEATURES: &[&str] = &[];
/// The oldest daemon spoken to: Nix 2.4's 1.32. Every field this client
/// reads unconditionally (build times >= 1.29, built outputs >= 1.28, JSON
/// realisations >= 1.31, the substitute flag >= 1.27) exists from there on.
const MIN_MINOR: u64 = 32;

const STDERR_NEXT: u64 = 0x6f6c6d67;
const STDERR_READ: u64 = 0x64617461;
const STDERR_WRITE: u64 = 0x64617416;
const STDERR_LAST: u64 = 0x616c7473;
const STDERR_ERROR: u64 = 0x63787470;
const STDERR_START_ACTIVITY: u64 = 0x53545254;
const STDERR_STOP_ACTIVITY: u64 = 0x53544f50;
const STDERR_RESULT: u64 = 0x52534c54;

const RES_BUILD_LOG_LINE: u64 = 101;
const RES_POST_BUILD_LOG_LINE: u64 = 107;

/// Frames of at most this size carry NAR data to the daemon.
const FRAME_SIZE: usize = 64 << 10;

#[repr(u64)]
enum Op {
    IsValidPath = 1,
    BuildPaths = 9,
    AddTempRoot = 11,
    AddIndirectRoot = 12,
    SetOptions = 19,
    QueryPathInfo = 26,
    QueryValidPaths = 31,
    BuildDerivation = 36,
    NarFromPath = 38,
    AddToStoreNar = 39,
    QueryDerivationOutputMap = 41,
    RegisterDrvOutput = 42,
    QueryRealisation = 43,
}

/// How many requests [`DaemonClient::add_temp_roots`] and
/// [`DaemonClient::query_path_infos`] send ahead of their answers: few
/// enough that the requests (each under 300 bytes) fit in the socket's
/// buffer, so this side's writes finish and it reads while the daemon
/// answers, however large the answers.
pub const PIPELINED: usize = 128;

/// The error for a path that is not valid where one was required.
fn not_valid(path: &str) -> DaemonError {
    DaemonError::Nix {
        message: format!("path '{path}' is not valid"),
        traces: vec![],
    }
}

/// Settings sent with `SetOptions`; limits apply to the builds that follow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientSettings {
    pub keep_failed: bool,
    pub keep_going: bool,
    pub try_fallback: bool,
    pub verbosity: u64,
    pub max_build_jobs: u64,
    /// Seconds without output before a build is killed (0 = no limit).
    pub max_silent_time: u64,
    pub build_cores: u64,
    pub use_substitutes: bool,
    /// Further settings by name (`timeout`, `max-build-log-size`, ...).
    pub overrides: BTreeMap<String, String>,
}

impl Default for ClientSettings {
    fn default() -> Self {
        ClientSettings {
            keep_failed: false,
            keep_going: false,
            try_fallback: false,
            verbosity: 0,
            max_build_jobs: 1,
            max_silent_time: 0,
            build_cores: 0,
            use_substitutes: false,
            overrides: BTreeMap::new(),
        }
    }
}

type Reader = BufReader<Box<dyn AsyncRead + Send + Unpin>>;
type Writer = BufWriter<Box<dyn AsyncWrite + Send + Unpin>>;

/// One connection to a nix-daemon. Operations take `&mut self`: a
/// connection carries one request at a time, as in Nix.
pub struct DaemonClient {
    r: Reader,
    w: Writer,
    minor: u64,
    daemon_version: Option<String>,
    /// Whether the daemon trusts this client (>= 1.35; None: it did not say).
    trusted: Option<bool>,
    /// The features both sides support (>= 1.38).
    features: BTreeSet<String>,
    store_dir: StoreDir,
    /// Temporary roots this connection's daemon process holds (added, or
    /// left by an import, as Nix roots what it adds): they last until the
    /// connection closes.
    temp_roots: u32,
    /// What the last `SetOptions` on this connection set: the daemon keeps
    /// it for the connection's life, so the same settings again are not
    /// sent (a round trip per build on a reused connection).
    applied: Option<ClientSettings>,
}

impl DaemonClient {
    /// How many temporary roots this connection may hold (see
    /// [`super::Spares::release`]).
    pub fn temp_roots(&self) -> u32 {
        self.temp_roots
    }

    /// Connects to a daemon's unix socket and performs the handshake.
    pub async fn connect(socket: &Path) -> Result<DaemonClient, DaemonError> {
        let stream = tokio::net::UnixStream::connect(socket).await?;
        let (r, w) = stream.into_split();
        Self::handshake(Box::new(r), Box::new(w)).await
    }

    /// Performs the handshake over any byte stream (a socket, or the stdio
    /// of `nix-daemon --stdio`).
    pub async fn handshake(
        r: Box<dyn AsyncRead + Send + Unpin>,
        w: Box<dyn AsyncWrite + Send + Unpin>,
    ) -> Result<DaemonClient, DaemonError> {
        let mut c = DaemonClient {
            r: BufReader::new(r),
            w: BufWriter::new(w),
            minor: 0,
            daemon_version: None,
            trusted: None,
            features: BTreeSet::new(),
            store_dir: StoreDir::default(),
            temp_roots: 0,
            applied: None,
        };
        write_u64(&mut c.w, WORKER_MAGIC_1).await?;
        c.w.flush().await?;
        let magic = read_u64(&mut c.r).await?;
        if magic != WORKER_MAGIC_2 {
            return Err(DaemonError::Protocol(format!(
                "not a nix-daemon (magic {magic:#x})"
            )));
        }
        let daemon = read_u64(&mut c.r).await?;
        let (major, minor) = (daemon >> 8, daemon & 0xff);
        if major != 1 || minor < MIN_MINOR {
            return Err(DaemonError::UnsupportedVersion { major, minor });
        }
        c.minor = minor.min(PROTOCOL_VERSION & 0xff);
        write_u64(&mut c.w, PROTOCOL_VERSION).await?;
        if c.minor >= 38 {
            write_strings(&mut c.w, FEATURES).await?;
            c.w.flush().await?;
            let theirs = read_strings(&mut c.r).await?;
            c.features = theirs
                .into_iter()
                .filter(|f| FEATURES.contains(&f.as_str()))
                .collect();
        }
        write_u64(&mut c.w, 0).await?; // no CPU affinity (>= 1.14)
        write_u64(&mut c.w, 0).await?; // obsolete reserveSpace (>= 1.11)
        c.w.flush().await?;
        if c.minor >= 33 {
            c.daemon_version = Some(read_string(&mut c.r).await?);
        }
        if c.minor >= 35 {
            c.trusted = match read_u64(&mut c.r).await? {
                0 => None,
                1 => Some(true),
                2 => Some(false),
                other => {
                    return Err(DaemonError::Protocol(format!(
                        "the daemon's trust flag is {other} (0, 1 or 2 expected)"
                    )));
                }
            };
        }
        c.process_stderr(&mut |_| {}).await?;
        Ok(c)
    }

    /// The negotiated protocol version, as (1, minor).
    pub fn protocol_minor(&self) -> u64 {
        self.minor
    }

    /// The daemon's Nix version, when it says (protocol >= 1.33).
    pub fn daemon_version(&self) -> Option<&str> {
        self.daemon_version.as_deref()
    }

    /// Whether the daemon trusts this client, when it says (>= 1.35).
    pub fn trusted(&self) -> Option<bool> {
        self.trusted
    }

    /// The protocol features both sides support (>= 1.38).
    pub fn features(&self) -> &BTreeSet<String> {
        &self.features
    }

    pub async fn set_options(&mut self, s: &ClientSettings) -> Result<(), DaemonError> {
        if self.applied.as_ref() == Some(s) {
            return Ok(());
        }
        // Unknown until the daemon has taken all of it.
        self.applied = None;
        self.op(Op::SetOptions).await?;
        for v in [
            s.keep_failed as u64,
            s.keep_going as u64,
            s.try_fallback as u64,
            s.verbosity,
            s.max_build_jobs,
            s.max_silent_time,
            1, // obsolete useBuildHook
            0, // build verbosity: lvlError
            0, // obsolete logType
            0, // obsolete printBuildTrace
            s.build_cores,
            s.use_substitutes as u64,
        ] {
            write_u64(&mut self.w, v).await?;
        }
        write_u64(&mut self.w, s.overrides.len() as u64).await?;
        for (k, v) in &s.overrides {
            write_bytes(&mut self.w, k.as_bytes()).await?;
            write_bytes(&mut self.w, v.as_bytes()).await?;
        }
        self.process_stderr(&mut |_| {}).await?;
        self.applied = Some(s.clone());
        Ok(())
    }

    pub async fn is_valid_path(&mut self, path: &str) -> Result<bool, DaemonError> {
        self.check_path(path)?;
        self.op(Op::IsValidPath).await?;
        write_bytes(&mut self.w, path.as_bytes()).await?;
        self.process_stderr(&mut |_| {}).await?;
        read_bool(&mut self.r).await
    }

    /// The subset of `paths` that is valid in the store.
    pub async fn query_valid_paths(
        &mut self,
        paths: &[String],
    ) -> Result<BTreeSet<String>, DaemonError> {
        // Nothing to ask is no round trip (a job without inputs asks so).
        if paths.is_empty() {
            return Ok(BTreeSet::new());
        }
        paths.iter().try_for_each(|p| self.check_path(p))?;
        self.op(Op::QueryValidPaths).await?;
        write_strings(&mut self.w, paths).await?;
        write_u64(&mut self.w, 0).await?; // do not substitute
        self.process_stderr(&mut |_| {}).await?;
        Ok(read_strings(&mut self.r).await?.into_iter().collect())
    }

    /// Path info of `path`, or `None` if it is not valid.
    pub async fn query_path_info(&mut self, path: &str) -> Result<Option<PathInfo>, DaemonError> {
        self.check_path(path)?;
        self.op(Op::QueryPathInfo).await?;
        write_bytes(&mut self.w, path.as_bytes()).await?;
        self.process_stderr(&mut |_| {}).await?;
        self.read_path_info(path).await
    }

    /// Path info of each of `paths` (`None` where not valid), in their
    /// order, each batch of [`PIPELINED`] requests sent before their
    /// answers are read: a round trip a batch rather than a path (a
    /// closure level, or a job's inputs, may be hundreds of paths). A Nix
    /// error on one path is returned after the batch's other answers are
    /// read, so the connection stays usable.
    pub async fn query_path_infos(
        &mut self,
        paths: &[String],
    ) -> Result<Vec<Option<PathInfo>>, DaemonError> {
        let mut infos = Vec::with_capacity(paths.len());
        for batch in paths.chunks(PIPELINED) {
            for p in batch {
                self.check_path(p)?;
            }
            for p in batch {
                self.op(Op::QueryPathInfo).await?;
                write_bytes(&mut self.w, p.as_bytes()).await?;
            }
            let mut first_error = None;
            for p in batch {
                match self.process_stderr(&mut |_| {}).await {
                    Ok(()) => infos.push(self.read_path_info(p).await?),
                    Err(e @ DaemonError::Nix { .. }) => {
                        first_error.get_or_insert(e);
                    }
                    Err(e) => return Err(e),
                }
            }
            if let Some(e) = first_error {
                return Err(e);
            }
        }
        Ok(infos)
    }

    /// The answer to a `QueryPathInfo` of `path`, after its stderr.
    async fn read_path_info(&mut self, path: &str) -> Result<Option<PathInfo>, DaemonError> {
        if !read_bool(&mut self.r).await? {
            return Ok(None);
        }
        let deriver = read_string(&mut self.r).await?;
        let nar_hash_hex = read_string(&mut self.r).await?;
        let nar_hash = Hash::parse_digest(HashAlgo::Sha256, &nar_hash_hex)
            .map_err(|e| DaemonError::Protocol(format!("bad NAR hash for {path}: {e}")))?;
        let references = read_strings(&mut self.r).await?;
        let registration_time = read_u64(&mut self.r).await?;
        let nar_size = read_u64(&mut self.r).await?;
        let ultimate = read_bool(&mut self.r).await?;
        let signatures = read_strings(&mut self.r).await?;
        let ca = read_string(&mut self.r).await?;
        Ok(Some(PathInfo {
            path: path.to_owned(),
            deriver: (!deriver.is_empty()).then_some(deriver),
            nar_hash,
            references,
            registration_time,
            nar_size,
            ultimate,
            signatures,
            ca: (!ca.is_empty()).then_some(ca),
        }))
    }

    /// Path info of `path`; a path that is not valid is an error naming it.
    pub async fn require_path_info(&mut self, path: &str) -> Result<PathInfo, DaemonError> {
        self.query_path_info(path)
            .await?
            .ok_or_else(|| not_valid(path))
    }

    /// The closure of `paths` under references (the paths included), with
    /// each path's info. A path that is not valid is an error naming it.
    /// Asked a level at a time ([`Self::query_path_infos`]): as many round
    /// trips as the closure is deep, not as it is large.
    pub async fn query_closure(
        &mut self,
        paths: &[String],
    ) -> Result<BTreeMap<String, PathInfo>, DaemonError> {
        let mut closure = BTreeMap::new();
        let mut level: Vec<String> = paths.to_vec();
        level.sort();
        level.dedup();
        while !level.is_empty() {
            let infos = self.query_path_infos(&level).await?;
            let mut next = BTreeSet::new();
            for (path, info) in level.into_iter().zip(infos) {
                let info = info.ok_or_else(|| not_valid(&path))?;
                next.extend(info.references.iter().cloned());
                closure.insert(path, info);
            }
            level = next
                .into_iter()
                .filter(|p| !closure.contains_key(p))
                .collect();
        }
        Ok(closure)
    }

    /// Streams the NAR of `path` into `sink`; returns its path info.
    pub async fn nar_from_path<W: AsyncWrite + Unpin>(
        &mut self,
        path: &str,
        sink: &mut W,
    ) -> Result<PathInfo, DaemonError> {
        let info = self.require_path_info(path).await?;
        self.export_nar(&info, sink).await?;
        Ok(info)
    }

    /// Streams the NAR of the path `info` describes into `sink`.
    pub async fn export_nar<W: AsyncWrite + Unpin>(
        &mut self,
        info: &PathInfo,
        sink: &mut W,
    ) -> Result<(), DaemonError> {
        if info.nar_size == 0 {
            return Err(DaemonError::UnknownNarSize(info.path.clone()));
        }
        self.check_path(&info.path)?;
        self.op(Op::NarFromPath).await?;
        write_bytes(&mut self.w, info.path.as_bytes()).await?;
        self.process_stderr(&mut |_| {}).await?;
        // The NAR follows unframed; its recorded size says where it ends.
        let mut limited = (&mut self.r).take(info.nar_size);
        let copied = tokio::io::copy(&mut limited, sink).await?;
        if copied != info.nar_size {
            return Err(DaemonError::Protocol(format!(
                "NAR of {} ended after {copied} of {} bytes",
                info.path, info.nar_size
            )));
        }
        Ok(())
    }

    /// The contents of a store path that is a regular file, such as a `.drv`.
    pub async fn read_store_file(&mut self, path: &str) -> Result<Vec<u8>, DaemonError> {
        let mut nar = Vec::new();
        self.nar_from_path(path, &mut nar).await?;
        crate::nar::single_file_contents(&nar)
            .map_err(|e| DaemonError::Protocol(format!("{path}: {e}")))
    }

    /// Adds a path from its NAR. The daemon checks the NAR against
    /// `info.nar_hash` and `info.nar_size`.
    pub async fn add_to_store_nar<R: AsyncRead + Unpin>(
        &mut self,
        info: &PathInfo,
        nar: &mut R,
        repair: bool,
        dont_check_sigs: bool,
    ) -> Result<(), DaemonError> {
        self.check_path(&info.path)?;
        info.references
            .iter()
            .try_for_each(|p| self.check_path(p))?;
        self.temp_roots += 1;
        self.op(Op::AddToStoreNar).await?;
        write_bytes(&mut self.w, info.path.as_bytes()).await?;
        write_bytes(
            &mut self.w,
            info.deriver.as_deref().unwrap_or("").as_bytes(),
        )
        .await?;
        write_bytes(&mut self.w, info.nar_hash.to_base16().as_bytes()).await?;
        write_strings(&mut self.w, &info.references).await?;
        write_u64(&mut self.w, info.registration_time).await?;
        write_u64(&mut self.w, info.nar_size).await?;
        write_u64(&mut self.w, info.ultimate as u64).await?;
        write_strings(&mut self.w, &info.signatures).await?;
        write_bytes(&mut self.w, info.ca.as_deref().unwrap_or("").as_bytes()).await?;
        write_u64(&mut self.w, repair as u64).await?;
        write_u64(&mut self.w, dont_check_sigs as u64).await?;
        let mut buf = vec![0u8; FRAME_SIZE];
        loop {
            let n = nar.read(&mut buf).await?;
            write_u64(&mut self.w, n as u64).await?;
            if n == 0 {
                break;
            }
            self.w.write_all(&buf[..n]).await?;
        }
        self.process_stderr(&mut |_| {}).await
    }

    /// Builds `drv` (a derivation without input derivations: resolved, or
    /// with every input already present) under the name `drv_path`.
    pub async fn build_derivation(
        &mut self,
        drv_path: &str,
        drv: &Derivation,
        mode: BuildMode,
        on_log: &mut (dyn FnMut(LogLine) + Send),
    ) -> Result<BuildResult, DaemonError> {
        self.check_path(drv_path)?;
        self.op(Op::BuildDerivation).await?;
        write_bytes(&mut self.w, drv_path.as_bytes()).await?;
        write_u64(&mut self.w, drv.outputs.len() as u64).await?;
        for (name, out) in &drv.outputs {
            write_bytes(&mut self.w, name.as_bytes()).await?;
            for field in output_fields(&self.store_dir, out, false) {
                write_bytes(&mut self.w, field.as_bytes()).await?;
            }
        }
        let srcs: Vec<String> = drv
            .input_srcs
            .iter()
            .map(|p| self.store_dir.display(p))
            .collect();
        write_strings(&mut self.w, &srcs).await?;
        write_bytes(&mut self.w, drv.platform.as_bytes()).await?;
        write_bytes(&mut self.w, drv.builder.as_bytes()).await?;
        write_strings(&mut self.w, &drv.args).await?;
        write_u64(&mut self.w, drv.env.len() as u64).await?;
        for (k, v) in &drv.env {
            write_bytes(&mut self.w, k.as_bytes()).await?;
            write_bytes(&mut self.w, v.as_bytes()).await?;
        }
        write_u64(&mut self.w, mode as u64).await?;
        self.process_stderr(on_log).await?;
        self.read_build_result().await
    }

    /// Builds derivations already in the store, given as `drv!out1,out2`
    /// (or `drv!*`), as `nix-store --realise` does.
    pub async fn build_paths(
        &mut self,
        paths: &[String],
        mode: BuildMode,
        on_log: &mut (dyn FnMut(LogLine) + Send),
    ) -> Result<(), DaemonError> {
        paths.iter().try_for_each(|p| self.check_path(p))?;
        self.op(Op::BuildPaths).await?;
        write_strings(&mut self.w, paths).await?;
        write_u64(&mut self.w, mode as u64).await?;
        self.process_stderr(on_log).await?;
        read_u64(&mut self.r).await?;
        Ok(())
    }

    /// Output name -> path (None where not known yet, as for CA outputs).
    pub async fn query_derivation_output_map(
        &mut self,
        drv_path: &str,
    ) -> Result<BTreeMap<String, Option<String>>, DaemonError> {
        self.check_path(drv_path)?;
        self.op(Op::QueryDerivationOutputMap).await?;
        write_bytes(&mut self.w, drv_path.as_bytes()).await?;
        self.process_stderr(&mut |_| {}).await?;
        let n = read_u64(&mut self.r).await?;
        let mut map = BTreeMap::new();
        for _ in 0..n {
            let name = read_string(&mut self.r).await?;
            let path = read_string(&mut self.r).await?;
            map.insert(name, (!path.is_empty()).then_some(path));
        }
        Ok(map)
    }

    pub async fn register_drv_output(
        &mut self,
        realisation: &Realisation,
    ) -> Result<(), DaemonError> {
        self.op(Op::RegisterDrvOutput).await?;
        let json = serde_json::to_string(realisation).expect("realisations serialise");
        write_bytes(&mut self.w, json.as_bytes()).await?;
        self.process_stderr(&mut |_| {}).await
    }

    /// The realisation recorded for `id` (`sha256:<hex>!<output>`), if any.
    pub async fn query_realisation(
        &mut self,
        id: &str,
    ) -> Result<Option<Realisation>, DaemonError> {
        self.op(Op::QueryRealisation).await?;
        write_bytes(&mut self.w, id.as_bytes()).await?;
        self.process_stderr(&mut |_| {}).await?;
        let found = read_strings(&mut self.r).await?;
        found
            .first()
            .map(|json| parse_realisation(json))
            .transpose()
    }

    /// Keeps `path` from garbage collection while this connection is open.
    pub async fn add_temp_root(&mut self, path: &str) -> Result<(), DaemonError> {
        self.check_path(path)?;
        self.temp_roots += 1;
        self.op(Op::AddTempRoot).await?;
        write_bytes(&mut self.w, path.as_bytes()).await?;
        self.process_stderr(&mut |_| {}).await?;
        read_u64(&mut self.r).await?;
        Ok(())
    }

    /// Temporary roots for many paths, each batch of requests sent before
    /// their answers are read: a round trip for every [`PIPELINED`] paths
    /// rather than for each (a job's inputs may be thousands of paths).
    pub async fn add_temp_roots(&mut self, paths: &[String]) -> Result<(), DaemonError> {
        for batch in paths.chunks(PIPELINED) {
            for p in batch {
                self.check_path(p)?;
            }
            for p in batch {
                self.temp_roots += 1;
                self.op(Op::AddTempRoot).await?;
                write_bytes(&mut self.w, p.as_bytes()).await?;
            }
            for _ in batch {
                self.process_stderr(&mut |_| {}).await?;
                read_u64(&mut self.r).await?;
            }
        }
        Ok(())
    }

    /// Makes `link` (an absolute path outside the store, a symlink to a
    /// store path) a garbage-collector root until the link is removed: the
    /// daemon records it in `gcroots/auto`. Unlike a temporary root it
    /// outlives this connection and this process.
    pub async fn add_indirect_root(&mut self, link: &Path) -> Result<(), DaemonError> {
        use std::os::unix::ffi::OsStrExt;
        self.op(Op::AddIndirectRoot).await?;
        write_bytes(&mut self.w, link.as_os_str().as_bytes()).await?;
        self.process_stderr(&mut |_| {}).await?;
        read_u64(&mut self.r).await?;
        Ok(())
    }

    /// Checks `path` is a store path before it goes to the daemon: Nix 2.8
    /// answers a malformed one by closing the connection.
    fn check_path(&self, path: &str) -> Result<(), DaemonError> {
        let p = path.split_once('!').map_or(path, |(p, _)| p);
        self.store_dir.parse_path(p)?;
        Ok(())
    }

    async fn op(&mut self, op: Op) -> Result<(), DaemonError> {
        write_u64(&mut self.w, op as u64).await
    }

    async fn read_build_result(&mut self) -> Result<BuildResult, DaemonError> {
        let status = BuildStatus::from_code(read_u64(&mut self.r).await?);
        // Nix's message for a failed build ends with the log's last lines.
        let error_msg = read_text(&mut self.r).await?;
        let times_built = read_u64(&mut self.r).await?;
        let is_non_deterministic = read_bool(&mut self.r).await?;
        let start_time = read_u64(&mut self.r).await?;
        let stop_time = read_u64(&mut self.r).await?;
        let (mut cpu_user, mut cpu_system) = (None, None);
        if self.minor >= 37 {
            cpu_user = self.read_optional_micros().await?;
            cpu_system = self.read_optional_micros().await?;
        }
        let n = read_u64(&mut self.r).await?;
        let mut built_outputs = BTreeMap::new();
        for _ in 0..n {
            let id = read_string(&mut self.r).await?;
            let json = read_string(&mut self.r).await?;
            let r = parse_realisation(&json)?;
            let output = id
                .rsplit_once('!')
                .map(|(_, o)| o.to_owned())
                .unwrap_or_default();
            built_outputs.insert(output, r);
        }
        Ok(BuildResult {
            status,
            error_msg,
            times_built,
            is_non_deterministic,
            start_time,
            stop_time,
            cpu_user,
            cpu_system,
            built_outputs,
        })
    }

    /// An optional duration in microseconds (1.37): a tag 0 (none) or 1,
    /// then the count.
    async fn read_optional_micros(&mut self) -> Result<Option<std::time::Duration>, DaemonError> {
        match read_u64(&mut self.r).await? {
            0 => Ok(None),
            1 => {
                let micros = read_u64(&mut self.r).await? as i64;
                Ok(Some(std::time::Duration::from_micros(micros.max(0) as u64)))
            }
            other => Err(DaemonError::Protocol(format!(
                "an optional duration's tag is {other} (0 or 1 expected)"
            ))),
        }
    }

    /// Flushes the request, then reads the daemon's messages up to
    /// `STDERR_LAST`, passing log lines on; an error message becomes
    /// [`DaemonError::Nix`].
    async fn process_stderr(
        &mut self,
        on_log: &mut (dyn FnMut(LogLine) + Send),
    ) -> Result<(), DaemonError> {
        self.w.flush().await?;
        loop {
            match read_u64(&mut self.r).await? {
                STDERR_LAST => return Ok(()),
                STDERR_NEXT => {
                    let msg = read_text(&mut self.r).await?;
                    on_log(LogLine::Daemon(msg.trim_end_matches('\n').to_owned()));
                }
                STDERR_ERROR => return Err(self.read_error().await?),
                STDERR_START_ACTIVITY => {
                    read_u64(&mut self.r).await?; // id
                    read_u64(&mut self.r).await?; // level
                    read_u64(&mut self.r).await?; // type
                    let text = read_text(&mut self.r).await?;
                    self.read_fields().await?;
                    read_u64(&mut self.r).await?; // parent
                    if !text.is_empty() {
                        on_log(LogLine::Daemon(text));
                    }
                }
                STDERR_STOP_ACTIVITY => {
                    read_u64(&mut self.r).await?;
                }
                STDERR_RESULT => {
                    read_u64(&mut self.r).await?; // activity id
                    let kind = read_u64(&mut self.r).await?;
                    let fields = self.read_fields().await?;
                    if matches!(kind, RES_BUILD_LOG_LINE | RES_POST_BUILD_LOG_LINE)
                        && let Some(line) = fields.into_iter().next()
                    {
                        on_log(LogLine::Build(line));
                    }
                }
                STDERR_READ | STDERR_WRITE => {
                    return Err(DaemonError::Protocol(
                        "daemon asked for a data transfer this client never requests".into(),
                    ));
                }
                other => {
                    return Err(DaemonError::Protocol(format!(
                        "unknown message {other:#x} from the daemon"
                    )));
                }
            }
        }
    }

    /// Reads activity fields, keeping the string ones as bytes (a build's
    /// log line is whatever it printed).
    async fn read_fields(&mut self) -> Result<Vec<Vec<u8>>, DaemonError> {
        let n = read_u64(&mut self.r).await?;
        let mut strings = Vec::new();
        for _ in 0..n {
            match read_u64(&mut self.r).await? {
                0 => {
                    read_u64(&mut self.r).await?;
                }
                1 => strings.push(read_bytes(&mut self.r).await?),
                t => return Err(DaemonError::Protocol(format!("unknown field type {t}"))),
            }
        }
        Ok(strings)
    }

    /// Reads the structured error (protocol >= 1.26).
    async fn read_error(&mut self) -> Result<DaemonError, DaemonError> {
        let _type = read_text(&mut self.r).await?;
        let _level = read_u64(&mut self.r).await?;
        let _name = read_text(&mut self.r).await?;
        let message = read_text(&mut self.r).await?;
        let _have_pos = read_u64(&mut self.r).await?;
        let n = read_u64(&mut self.r).await?;
        let mut traces = Vec::new();
        for _ in 0..n {
            let _have_pos = read_u64(&mut self.r).await?;
            traces.push(read_text(&mut self.r).await?);
        }
        Ok(DaemonError::Nix {
            message: strip_ansi(&message),
            traces,
        })
    }
}

fn parse_realisation(json: &str) -> Result<Realisation, DaemonError> {
    serde_json::from_str(json)
        .map_err(|e| DaemonError::Protocol(format!("bad realisation {json:?}: {e}")))
}

/// Nix colours its messages; logs and error texts are kept plain.
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' && chars.peek() == Some(&'[') {
            chars.next();
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A peer that answers the client's magic with `magic` and `version`.
    async fn handshake_with(magic: u64, version: u64) -> Result<DaemonClient, DaemonError> {
        let (client_end, mut peer) = tokio::io::duplex(64);
        tokio::spawn(async move {
            let _ = peer.read_u64_le().await;
            let _ = peer.write_u64_le(magic).await;
            let _ = peer.write_u64_le(version).await;
        });
        let (r, w) = tokio::io::split(client_end);
        DaemonClient::handshake(Box::new(r), Box::new(w)).await
    }

    #[tokio::test]
    async fn refuses_a_daemon_older_than_1_32() {
        let err = handshake_with(WORKER_MAGIC_2, (1 << 8) | 30)
            .await
            .err()
            .unwrap();
        assert!(
            matches!(
                err,
                DaemonError::UnsupportedVersion {
                    major: 1,
                    minor: 30
                }
            ),
            "{err:?}"
        );
        assert!(err.to_string().contains("at least 1.32"), "{err}");
    }

    #[tokio::test]
    async fn refuses_a_peer_that_is_not_a_daemon() {
        let err = handshake_with(0x1234, PROTOCOL_VERSION)
            .await
            .err()
            .unwrap();
        assert!(matches!(err, DaemonError::Protocol(_)), "{err:?}");
        assert!(err.to_string().contains("not a nix-daemon"), "{err}");
    }

    /// A daemon of protocol 1.`minor` that finishes the handshake as
    /// Nix's does (features, version string, trust), offering
    /// `features`, then writes `then` (what a test wants read next).
    async fn fake_daemon(
        minor: u64,
        features: &'static [&'static str],
        then: Vec<u8>,
    ) -> (DaemonClient, tokio::task::JoinHandle<Vec<String>>) {
        let (client_end, peer) = tokio::io::duplex(1 << 16);
        let (mut pr, mut pw) = tokio::io::split(peer);
        let peer = tokio::spawn(async move {
            assert_eq!(pr.read_u64_le().await.unwrap(), WORKER_MAGIC_1);
            write_u64(&mut pw, WORKER_MAGIC_2).await.unwrap();
            write_u64(&mut pw, (1 << 8) | minor).await.unwrap();
            let client_version = pr.read_u64_le().await.unwrap();
            assert_eq!(client_version, PROTOCOL_VERSION);
            let mut client_features = Vec::new();
            if minor >= 38 {
                client_features = read_strings(&mut pr).await.unwrap();
                write_strings(&mut pw, features).await.unwrap();
            }
            assert_eq!(pr.read_u64_le().await.unwrap(), 0, "no CPU affinity");
            assert_eq!(pr.read_u64_le().await.unwrap(), 0, "reserveSpace");
            write_bytes(&mut pw, b"2.99.0").await.unwrap();
            if minor >= 35 {
                write_u64(&mut pw, 1).await.unwrap(); // trusted
            }
            write_u64(&mut pw, STDERR_LAST).await.unwrap();
            pw.write_all(&then).await.unwrap();
            pw.flush().await.unwrap();
            // Keep the pipe open until the client is done with it.
            let mut rest = Vec::new();
            let _ = pr.read_to_end(&mut rest).await;
            client_features
        });
        let (r, w) = tokio::io::split(client_end);
        let client = DaemonClient::handshake(Box::new(r), Box::new(w))
            .await
            .unwrap();
        (client, peer)
    }

    /// A build result as a daemon of 1.`minor` writes it.
    async fn build_result_bytes(minor: u64) -> Vec<u8> {
        let mut out = Vec::new();
        write_u64(&mut out, 0).await.unwrap(); // Built
        write_bytes(&mut out, b"").await.unwrap();
        for v in [1, 0, 100, 160] {
            write_u64(&mut out, v).await.unwrap(); // times built, nondet, start, stop
        }
        if minor >= 37 {
            write_u64(&mut out, 1).await.unwrap();
            write_u64(&mut out, 1_500_000).await.unwrap();
            write_u64(&mut out, 0).await.unwrap(); // no system time
        }
        write_u64(&mut out, 0).await.unwrap(); // no built outputs
        out
    }

    #[tokio::test]
    async fn speaks_each_protocol_version_from_1_34_to_1_38() {
        for minor in 34..=38 {
            let then = build_result_bytes(minor).await;
            let (mut client, peer) = fake_daemon(minor, &["some-future-feature"], then).await;
            assert_eq!(client.protocol_minor(), minor);
            assert_eq!(client.daemon_version(), Some("2.99.0"));
            assert_eq!(
                client.trusted(),
                (minor >= 35).then_some(true),
                "the trust flag at 1.{minor}"
            );
            assert!(
                client.features().is_empty(),
                "a feature this client does not know is not taken up"
            );
            let result = client.read_build_result().await.unwrap();
            assert_eq!((result.start_time, result.stop_time), (100, 160));
            let cpu = (minor >= 37).then(|| std::time::Duration::from_micros(1_500_000));
            assert_eq!(result.cpu_user, cpu, "1.{minor}");
            assert_eq!(result.cpu_system, None);
            drop(client);
            let sent = peer.await.unwrap();
            assert!(sent.is_empty(), "this client offers no features: {sent:?}");
        }
    }

    #[tokio::test]
    async fn settings_already_in_force_on_the_connection_are_not_sent_again() {
        // The daemon answers two SetOptions: a third sent would wait forever.
        let mut then = Vec::new();
        write_u64(&mut then, STDERR_LAST).await.unwrap();
        write_u64(&mut then, STDERR_LAST).await.unwrap();
        let (mut client, _peer) = fake_daemon(38, &[], then).await;
        let mut limits = ClientSettings::default();
        limits.overrides.insert("timeout".into(), "60".into());
        let quick = std::time::Duration::from_secs(5);
        for settings in [&limits, &limits, &ClientSettings::default()] {
            tokio::time::timeout(quick, client.set_options(settings))
                .await
                .expect("the same settings again cost no round trip")
                .unwrap();
        }
    }

    #[tokio::test]
    async fn asking_about_no_paths_costs_no_round_trip() {
        // The daemon answers nothing: an op sent would wait forever.
        let (mut client, _peer) = fake_daemon(38, &[], Vec::new()).await;
        let quick = std::time::Duration::from_secs(5);
        let valid = tokio::time::timeout(quick, client.query_valid_paths(&[]))
            .await
            .expect("no paths, no question")
            .unwrap();
        assert!(valid.is_empty());
        tokio::time::timeout(quick, client.add_temp_roots(&[]))
            .await
            .expect("no roots, no question")
            .unwrap();
    }

    #[tokio::test]
    async fn a_root_refused_midway_through_a_pipelined_batch_is_an_error_not_a_hang() {
        // The daemon roots the first path and refuses the second (its
        // answers to the rest never come): the client reports the refusal
        // as the daemon said it, without waiting for the answers it lacks.
        let mut then = Vec::new();
        write_u64(&mut then, STDERR_LAST).await.unwrap();
        write_u64(&mut then, 1).await.unwrap();
        write_u64(&mut then, STDERR_ERROR).await.unwrap();
        write_bytes(&mut then, b"Error").await.unwrap();
        write_u64(&mut then, 0).await.unwrap(); // level
        write_bytes(&mut then, b"Error").await.unwrap();
        write_bytes(&mut then, b"cannot add a root").await.unwrap();
        write_u64(&mut then, 0).await.unwrap(); // no position
        write_u64(&mut then, 0).await.unwrap(); // no traces
        let (mut client, _peer) = fake_daemon(38, &[], then).await;
        let paths: Vec<String> = (0..5)
            .map(|i| format!("/nix/store/{}-p{i}", "0".repeat(32)))
            .collect();
        let err = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            client.add_temp_roots(&paths),
        )
        .await
        .expect("no wait for answers the daemon never sends")
        .unwrap_err();
        assert!(err.to_string().contains("cannot add a root"), "{err}");
    }

    #[tokio::test]
    async fn a_newer_daemon_is_spoken_to_at_this_clients_version() {
        let (client, _peer) = fake_daemon(40, &[], Vec::new()).await;
        assert_eq!(client.protocol_minor(), PROTOCOL_VERSION & 0xff);
    }

    #[test]
    fn strips_colours() {
        assert_eq!(
            super::strip_ansi("\u{1b}[31;1merror:\u{1b}[0m bad"),
            "error: bad"
        );
    }
}
