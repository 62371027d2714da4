//! The jobs' records on disk, under `state_dir`: what a restarted builder
//! needs to hand a finished job to a runner.
//!
//! - `jobs/<attempt>.json`: the job (its derivation's path, when it
//!   started) and, once built, its report;
//! - `jobs/<attempt>.drv`: the derivation's ATerm text, as the runner sent it;
//! - `logs/<attempt>.log`: the whole build log;
//! - `gcroots/<attempt>-<output>`: symlinks to finished outputs, registered
//!   with the nix-daemon as indirect roots, so a garbage collection cannot
//!   take a result no runner has yet.
//!
//! Attempt ids come from the runner and name files: only UUIDs are used.

use std::io::Write;
use std::path::{Path, PathBuf};

use hydra_proto::v1::{BuiltOutput, CompletionReport};
use serde::{Deserialize, Serialize};

use crate::BuilderError;

/// One job, as kept on disk.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct JobRecord {
    pub attempt_id: String,
    pub drv_path: String,
    /// Seconds since the epoch.
    pub started_at: u64,
    /// Present once the job was built (or failed): what goes to the runner.
    pub report: Option<StoredReport>,
}

/// A completion report without its connection-specific fields.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StoredReport {
    pub outcome: i32,
    pub error_msg: String,
    /// (name, path, nar hash, nar size).
    pub outputs: Vec<(String, String, String, u64)>,
    pub start_time: u64,
    pub stop_time: u64,
    pub times_built: u32,
    pub is_non_deterministic: bool,
}

impl StoredReport {
    pub fn of(r: &CompletionReport) -> StoredReport {
        StoredReport {
            outcome: r.outcome,
            error_msg: r.error_msg.clone(),
            outputs: r
                .outputs
                .iter()
                .map(|o| {
                    (
                        o.name.clone(),
                        o.path.clone(),
                        o.nar_hash.clone(),
                        o.nar_size,
                    )
                })
                .collect(),
            start_time: r.start_time,
            stop_time: r.stop_time,
            times_built: r.times_built,
            is_non_deterministic: r.is_non_deterministic,
        }
    }

    /// The report for the connection `machine_id`.
    pub fn to_report(&self, machine_id: &str, attempt_id: &str) -> CompletionReport {
        CompletionReport {
            machine_id: machine_id.to_owned(),
            attempt_id: attempt_id.to_owned(),
            outcome: self.outcome,
            error_msg: self.error_msg.clone(),
            outputs: self
                .outputs
                .iter()
                .map(|(name, path, nar_hash, nar_size)| BuiltOutput {
                    name: name.clone(),
                    path: path.clone(),
                    nar_hash: nar_hash.clone(),
                    nar_size: *nar_size,
                })
                .collect(),
            start_time: self.start_time,
            stop_time: self.stop_time,
            times_built: self.times_built,
            is_non_deterministic: self.is_non_deterministic,
        }
    }
}

/// The `state_dir` of this builder.
#[derive(Debug)]
pub struct Records {
    root: PathBuf,
}

/// Whether `id` may name files: a UUID, as the runner makes them.
pub fn usable_id(id: &str) -> bool {
    uuid::Uuid::parse_str(id).is_ok()
}

impl Records {
    /// Opens (creating) `state_dir` and its folders.
    pub fn open(root: &Path) -> Result<Records, BuilderError> {
        for sub in ["jobs", "logs", "gcroots"] {
            let dir = root.join(sub);
            std::fs::create_dir_all(&dir)
                .map_err(|source| BuilderError::State { path: dir, source })?;
        }
        Ok(Records {
            root: root.to_owned(),
        })
    }

    fn record_path(&self, id: &str) -> PathBuf {
        self.root.join("jobs").join(format!("{id}.json"))
    }

    fn drv_file(&self, id: &str) -> PathBuf {
        self.root.join("jobs").join(format!("{id}.drv"))
    }

    pub fn log_path(&self, id: &str) -> PathBuf {
        self.root.join("logs").join(format!("{id}.log"))
    }

    /// Where the root of output `name` of attempt `id` goes.
    pub fn root_link(&self, id: &str, name: &str) -> PathBuf {
        self.root.join("gcroots").join(format!("{id}-{name}"))
    }

    /// A job arrived: its record and derivation are written before it runs.
    pub fn started(&self, record: &JobRecord, drv: &[u8]) -> std::io::Result<()> {
        write_atomically(&self.drv_file(&record.attempt_id), drv)?;
        self.write(record)
    }

    /// The job was built (or failed): its report is kept with it.
    pub fn finished(&self, record: &JobRecord) -> std::io::Result<()> {
        self.write(record)
    }

    fn write(&self, record: &JobRecord) -> std::io::Result<()> {
        let json = serde_json::to_vec_pretty(record).map_err(std::io::Error::other)?;
        write_atomically(&self.record_path(&record.attempt_id), &json)
    }

    /// Removes everything kept of attempt `id` (a runner has it, or it was
    /// dropped).
    pub fn forget(&self, id: &str) {
        if !usable_id(id) {
            return;
        }
        for path in [self.record_path(id), self.drv_file(id), self.log_path(id)] {
            let _ = std::fs::remove_file(path);
        }
        if let Ok(entries) = std::fs::read_dir(self.root.join("gcroots")) {
            let prefix = format!("{id}-");
            for e in entries.flatten() {
                if e.file_name().to_string_lossy().starts_with(&prefix) {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
    }

    /// Every job kept, with its derivation's text. Unreadable records are
    /// logged and removed (there is nothing a runner could do with them).
    pub fn all(&self) -> Vec<(JobRecord, Vec<u8>)> {
        let mut out = Vec::new();
        let Ok(entries) = std::fs::read_dir(self.root.join("jobs")) else {
            return out;
        };
        for e in entries.flatten() {
            let path = e.path();
            if path.extension().is_none_or(|x| x != "json") {
                continue;
            }
            let id = path
                .file_stem()
                .map(|s| s.to_string_lossy().into_owned())
                .unwrap_or_default();
            let read = std::fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice::<JobRecord>(&b).map_err(|e| e.to_string()))
                .and_then(|r| {
                    let drv = std::fs::read(self.drv_file(&id)).map_err(|e| e.to_string())?;
                    Ok((r, drv))
                });
            match read {
                Ok((r, drv)) if r.attempt_id == id && usable_id(&id) => out.push((r, drv)),
                Ok(_) => {
                    tracing::warn!(path = %path.display(), "a job record that names another attempt: removed");
                    self.forget(&id);
                    let _ = std::fs::remove_file(&path);
                }
                Err(e) => {
                    tracing::warn!(path = %path.display(), "an unreadable job record ({e}): removed");
                    self.forget(&id);
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
        out
    }
}

/// Writes `path` whole or not at all (a crash mid-write leaves the old
/// file), and durably: a record is what a restarted builder trusts.
fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension("tmp");
    let mut f = std::fs::File::create(&tmp)?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// Seconds since the epoch.
pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str, report: Option<StoredReport>) -> JobRecord {
        JobRecord {
            attempt_id: id.into(),
            drv_path: "/nix/store/7rjj86a15146cq1d3qy068lml7n8ykzm-hello.drv".into(),
            started_at: 1,
            report,
        }
    }

    #[test]
    fn a_record_and_its_report_survive_a_reopen_and_are_forgotten_whole() {
        let dir = tempfile::tempdir().unwrap();
        let id = uuid::Uuid::new_v4().to_string();
        let records = Records::open(dir.path()).unwrap();
        records.started(&record(&id, None), b"Derive(...)").unwrap();
        std::fs::write(records.log_path(&id), "line\n").unwrap();
        std::os::unix::fs::symlink("/nix/store/x", records.root_link(&id, "out")).unwrap();
        let report = StoredReport {
            outcome: 1,
            error_msg: String::new(),
            outputs: vec![("out".into(), "/nix/store/x".into(), "sha256:0".into(), 8)],
            start_time: 1,
            stop_time: 2,
            times_built: 1,
            is_non_deterministic: false,
        };
        records
            .finished(&record(&id, Some(report.clone())))
            .unwrap();

        let again = Records::open(dir.path()).unwrap();
        let all = again.all();
        assert_eq!(all.len(), 1);
        assert_eq!(all[0].0.report.as_ref(), Some(&report));
        assert_eq!(all[0].1, b"Derive(...)");

        again.forget(&id);
        assert!(again.all().is_empty());
        assert!(!again.log_path(&id).exists());
        assert!(std::fs::symlink_metadata(again.root_link(&id, "out")).is_err());
    }

    #[test]
    fn a_garbled_record_is_removed_not_trusted() {
        let dir = tempfile::tempdir().unwrap();
        let records = Records::open(dir.path()).unwrap();
        let id = uuid::Uuid::new_v4().to_string();
        std::fs::write(
            dir.path().join("jobs").join(format!("{id}.json")),
            "{not json",
        )
        .unwrap();
        assert!(records.all().is_empty());
        assert!(!dir.path().join("jobs").join(format!("{id}.json")).exists());
    }

    #[test]
    fn only_uuids_name_files() {
        assert!(usable_id(&uuid::Uuid::new_v4().to_string()));
        for bad in ["", "../../etc/passwd", "a/b", "x"] {
            assert!(!usable_id(bad), "{bad}");
        }
    }
}
