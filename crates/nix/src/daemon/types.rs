use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// What the store knows about a valid path (`ValidPathInfo`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PathInfo {
    /// The full store path.
    pub path: String,
    pub deriver: Option<String>,
    /// `sha256:<base16>` hash of the path's NAR.
    pub nar_hash: crate::Hash,
    pub references: Vec<String>,
    pub registration_time: u64,
    pub nar_size: u64,
    pub ultimate: bool,
    pub signatures: Vec<String>,
    /// Content address (`fixed:r:sha256:...`, `text:sha256:...`), if any.
    pub ca: Option<String>,
}

/// A realisation: which path a CA derivation's output was built to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Realisation {
    /// `sha256:<hashModulo hex>!<output>`.
    pub id: String,
    /// Base name of the output path, as Nix 2.8 writes it.
    #[serde(rename = "outPath")]
    pub out_path: String,
    #[serde(default)]
    pub signatures: Vec<String>,
    #[serde(rename = "dependentRealisations", default)]
    pub dependent_realisations: BTreeMap<String, String>,
}

/// `BuildMode`: how to build.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BuildMode {
    Normal = 0,
    Repair = 1,
    Check = 2,
}

/// Nix's `BuildResult::Status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BuildStatus {
    Built,
    Substituted,
    AlreadyValid,
    PermanentFailure,
    InputRejected,
    OutputRejected,
    TransientFailure,
    CachedFailure,
    TimedOut,
    MiscFailure,
    DependencyFailed,
    LogLimitExceeded,
    NotDeterministic,
    ResolvesToAlreadyValid,
    NoSubstituters,
    Unknown(u64),
}

impl BuildStatus {
    pub(crate) fn from_code(code: u64) -> BuildStatus {
        use BuildStatus::*;
        match code {
            0 => Built,
            1 => Substituted,
            2 => AlreadyValid,
            3 => PermanentFailure,
            4 => InputRejected,
            5 => OutputRejected,
            6 => TransientFailure,
            7 => CachedFailure,
            8 => TimedOut,
            9 => MiscFailure,
            10 => DependencyFailed,
            11 => LogLimitExceeded,
            12 => NotDeterministic,
            13 => ResolvesToAlreadyValid,
            14 => NoSubstituters,
            other => Unknown(other),
        }
    }

    pub fn is_success(self) -> bool {
        matches!(
            self,
            BuildStatus::Built
                | BuildStatus::Substituted
                | BuildStatus::AlreadyValid
                | BuildStatus::ResolvesToAlreadyValid
        )
    }
}

/// The outcome of a build through the daemon.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BuildResult {
    pub status: BuildStatus,
    pub error_msg: String,
    pub times_built: u64,
    pub is_non_deterministic: bool,
    pub start_time: u64,
    pub stop_time: u64,
    /// CPU time of the build's processes (protocol >= 1.37, when the
    /// daemon measured it).
    pub cpu_user: Option<std::time::Duration>,
    pub cpu_system: Option<std::time::Duration>,
    /// Realisations of the built outputs, by output name.
    pub built_outputs: BTreeMap<String, Realisation>,
}

/// A line of output from the daemon while it works.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogLine {
    /// A line the build itself printed, as bytes: builds print what they
    /// like (NUL, Latin-1), and a log is kept byte for byte.
    Build(Vec<u8>),
    /// A message of the daemon's (`building '...'`, warnings), decoded
    /// lossily for display.
    Daemon(String),
}

/// Orders paths so that each comes after the paths (of this set) it refers
/// to, as an import needs them. Store paths cannot form reference cycles
/// except to themselves; should a store claim otherwise, the rest keep
/// their order and the import judges.
pub fn references_first(infos: impl IntoIterator<Item = PathInfo>) -> Vec<PathInfo> {
    let mut pending: Vec<PathInfo> = infos.into_iter().collect();
    let mut ordered = Vec::with_capacity(pending.len());
    while !pending.is_empty() {
        let waiting: std::collections::HashSet<String> =
            pending.iter().map(|i| i.path.clone()).collect();
        let (ready, rest): (Vec<_>, Vec<_>) = pending.into_iter().partition(|i| {
            i.references
                .iter()
                .all(|r| *r == i.path || !waiting.contains(r))
        });
        if ready.is_empty() {
            ordered.extend(rest);
            break;
        }
        ordered.extend(ready);
        pending = rest;
    }
    ordered
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info(path: &str, refs: &[&str]) -> PathInfo {
        PathInfo {
            path: path.into(),
            deriver: None,
            nar_hash: crate::Hash::sha256(b""),
            references: refs.iter().map(|r| r.to_string()).collect(),
            registration_time: 0,
            nar_size: 1,
            ultimate: false,
            signatures: vec![],
            ca: None,
        }
    }

    #[test]
    fn references_come_first_and_self_references_do_not_block() {
        let order = references_first([
            info("c", &["b", "c"]),
            info("b", &["a", "outside"]),
            info("a", &[]),
        ]);
        let paths: Vec<&str> = order.iter().map(|i| i.path.as_str()).collect();
        assert_eq!(paths, ["a", "b", "c"]);
    }
}
