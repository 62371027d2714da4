//! The jobs' records on disk, under `state_dir`: what a restarted builder
//! needs to hand a finished job to a runner.
//!
//! - `jobs.journal`: one JSON line per event of a job: it started (its
//!   derivation's path, when, and the ATerm text the runner sent), it
//!   finished (its report), it was forgotten. Rewritten with only the
//!   live jobs when the builder starts and when forgotten lines pile up;
//! - `logs/<attempt>.log`: the whole build log (none for a silent build);
//! - `gcroots/<attempt>-<output>`: symlinks to finished outputs that no
//!   runner took within a second, registered with the nix-daemon as
//!   indirect roots, so a garbage collection cannot take a result no runner
//!   has yet.
//!
//! One file for every job's record, appended to, rather than files of
//! each job written whole: making a file is the costly part (on a
//! filesystem without a journal, an inode allocation here cost 0.4 ms of
//! CPU), and the records were three of them a job. Appends are not synced.
//! The records serve a restart of the builder's process, whose writes the
//! kernel keeps; after a crash of the machine, a line lost or torn makes
//! its job lost or unfinished, which the runner retries (the build itself
//! died with the machine). No line can make a job look built that was not.
//! Older builders' per-job files (`jobs/<attempt>.json` and `.drv`) are
//! read once and moved into the journal.
//!
//! Attempt ids come from the runner and name files: only UUIDs are used.

use std::collections::HashMap;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};

use base64::Engine;
use hydra_proto::v1::{BuiltOutput, CompletionReport};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use crate::BuilderError;

/// One job, as kept on disk.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
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
    journal: Mutex<Journal>,
}

/// The journal file and what its lines add up to.
#[derive(Debug)]
struct Journal {
    file: std::fs::File,
    /// The live jobs and their derivations' text, as the journal has them.
    live: HashMap<String, (JobRecord, Vec<u8>)>,
    /// Lines in the file: once they are many more than the live jobs, the
    /// journal is rewritten.
    lines: usize,
}

/// A line of the journal.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Line {
    Started {
        record: JobRecord,
        /// The derivation's ATerm text, base64 (Nix strings are bytes).
        drv: String,
    },
    Finished {
        attempt_id: String,
        report: StoredReport,
    },
    Forgotten {
        attempt_id: String,
    },
}

/// Forgotten lines the journal may hold beyond its live jobs' before it
/// is rewritten (a rewrite makes a file; a line is an append).
const SLACK_LINES: usize = 4096;

/// Whether `id` may name files: a UUID, as the runner makes them.
pub fn usable_id(id: &str) -> bool {
    uuid::Uuid::parse_str(id).is_ok()
}

fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::STANDARD
}

impl Records {
    /// Opens (creating) `state_dir` and its folders, and reads the jobs
    /// kept there (rewriting the journal with only the live ones).
    pub fn open(root: &Path) -> Result<Records, BuilderError> {
        for sub in ["logs", "gcroots"] {
            let dir = root.join(sub);
            std::fs::create_dir_all(&dir)
                .map_err(|source| BuilderError::State { path: dir, source })?;
        }
        let path = root.join("jobs.journal");
        let state = |source| BuilderError::State {
            path: path.clone(),
            source,
        };
        let mut live = read_journal(&path).map_err(state)?;
        for (id, kept) in read_legacy(&root.join("jobs")) {
            live.entry(id).or_insert(kept);
        }
        let file = rewrite(&path, &live).map_err(state)?;
        remove_legacy(&root.join("jobs"));
        let lines = live.len() * 2;
        Ok(Records {
            root: root.to_owned(),
            journal: Mutex::new(Journal { file, live, lines }),
        })
    }

    fn journal_path(&self) -> PathBuf {
        self.root.join("jobs.journal")
    }

    pub fn log_path(&self, id: &str) -> PathBuf {
        self.root.join("logs").join(format!("{id}.log"))
    }

    /// Where the root of output `name` of attempt `id` goes.
    pub fn root_link(&self, id: &str, name: &str) -> PathBuf {
        self.root.join("gcroots").join(format!("{id}-{name}"))
    }

    /// A job arrived: its record and derivation.
    pub fn started(&self, record: &JobRecord, drv: &[u8]) -> std::io::Result<()> {
        let line = Line::Started {
            record: record.clone(),
            drv: b64().encode(drv),
        };
        let mut j = self.journal.lock();
        append(&mut j.file, &line)?;
        j.lines += 1;
        j.live
            .insert(record.attempt_id.clone(), (record.clone(), drv.to_vec()));
        Ok(())
    }

    /// The job was built (or failed): its report is kept with it.
    pub fn finished(&self, record: &JobRecord) -> std::io::Result<()> {
        let Some(report) = record.report.clone() else {
            return Ok(());
        };
        let mut j = self.journal.lock();
        let Some((kept, _)) = j.live.get_mut(&record.attempt_id) else {
            return Err(std::io::Error::other("the job has no record"));
        };
        kept.report = Some(report.clone());
        let line = Line::Finished {
            attempt_id: record.attempt_id.clone(),
            report,
        };
        append(&mut j.file, &line)?;
        j.lines += 1;
        Ok(())
    }

    /// Removes everything kept of attempt `id` (a runner has it, or it was
    /// dropped).
    pub fn forget(&self, id: &str) {
        if !usable_id(id) {
            return;
        }
        let _ = std::fs::remove_file(self.log_path(id));
        if let Ok(entries) = std::fs::read_dir(self.root.join("gcroots")) {
            let prefix = format!("{id}-");
            for e in entries.flatten() {
                if e.file_name().to_string_lossy().starts_with(&prefix) {
                    let _ = std::fs::remove_file(e.path());
                }
            }
        }
        let mut j = self.journal.lock();
        if j.live.remove(id).is_none() {
            return;
        }
        let line = Line::Forgotten {
            attempt_id: id.to_owned(),
        };
        if let Err(e) = append(&mut j.file, &line) {
            tracing::warn!(attempt = %id, "cannot note in the journal that the job is gone ({e}): a restart will find it and drop it");
        }
        j.lines += 1;
        if j.lines > j.live.len() * 2 + SLACK_LINES {
            match rewrite(&self.journal_path(), &j.live) {
                Ok(file) => {
                    j.file = file;
                    j.lines = j.live.len() * 2;
                }
                Err(e) => tracing::warn!("cannot rewrite the job journal ({e}); appending on"),
            }
        }
    }

    /// Every job kept, with its derivation's text.
    pub fn all(&self) -> Vec<(JobRecord, Vec<u8>)> {
        let mut all: Vec<_> = self.journal.lock().live.values().cloned().collect();
        all.sort_by(|a, b| a.0.attempt_id.cmp(&b.0.attempt_id));
        all
    }
}

/// One line, appended whole (`O_APPEND`, one write).
fn append(file: &mut std::fs::File, line: &Line) -> std::io::Result<()> {
    file.write_all(&line_bytes(line)?)
}

/// `line` as the journal holds it: JSON and a newline.
fn line_bytes(line: &Line) -> std::io::Result<Vec<u8>> {
    let mut bytes = serde_json::to_vec(line).map_err(std::io::Error::other)?;
    bytes.push(b'\n');
    Ok(bytes)
}

/// The live jobs of the journal at `path` (none when there is none). A
/// line that does not parse (torn by a crash, or garbled) is skipped and
/// logged: at worst a job is lost or unfinished, and the runner retries.
fn read_journal(path: &Path) -> std::io::Result<HashMap<String, (JobRecord, Vec<u8>)>> {
    let mut live = HashMap::new();
    let file = match std::fs::File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(live),
        Err(e) => return Err(e),
    };
    for (n, line) in std::io::BufReader::new(file).split(b'\n').enumerate() {
        let line = line?;
        let parsed = serde_json::from_slice::<Line>(&line)
            .map_err(|e| e.to_string())
            .and_then(|l| match l {
                Line::Started { record, drv } => {
                    let drv = b64().decode(drv).map_err(|e| e.to_string())?;
                    if !usable_id(&record.attempt_id) {
                        return Err(format!("attempt id {:?} is not a UUID", record.attempt_id));
                    }
                    live.insert(record.attempt_id.clone(), (record, drv));
                    Ok(())
                }
                Line::Finished { attempt_id, report } => {
                    if let Some((r, _)) = live.get_mut(&attempt_id) {
                        r.report = Some(report);
                    }
                    Ok(())
                }
                Line::Forgotten { attempt_id } => {
                    live.remove(&attempt_id);
                    Ok(())
                }
            });
        if let Err(e) = parsed {
            tracing::warn!(path = %path.display(), line = n + 1, "an unreadable line of the job journal ({e}): skipped");
        }
    }
    Ok(live)
}

/// Writes `live` as a new journal at `path` (through a file renamed into
/// place, synced: this happens rarely) and opens it for appending.
fn rewrite(
    path: &Path,
    live: &HashMap<String, (JobRecord, Vec<u8>)>,
) -> std::io::Result<std::fs::File> {
    let tmp = path.with_extension("journal.tmp");
    let mut f = std::io::BufWriter::new(std::fs::File::create(&tmp)?);
    for (record, drv) in live.values() {
        let started = Line::Started {
            record: JobRecord {
                report: None,
                ..record.clone()
            },
            drv: b64().encode(drv),
        };
        f.write_all(&line_bytes(&started)?)?;
        if let Some(report) = &record.report {
            let finished = Line::Finished {
                attempt_id: record.attempt_id.clone(),
                report: report.clone(),
            };
            f.write_all(&line_bytes(&finished)?)?;
        }
    }
    f.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    std::fs::rename(&tmp, path)?;
    std::fs::OpenOptions::new().append(true).open(path)
}

/// The per-job files an older builder kept in `jobs/` (`<attempt>.json`,
/// `<attempt>.drv`); unreadable ones are logged and left out.
fn read_legacy(dir: &Path) -> Vec<(String, (JobRecord, Vec<u8>))> {
    let mut out = Vec::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
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
                let drv = std::fs::read(path.with_extension("drv")).map_err(|e| e.to_string())?;
                Ok((r, drv))
            });
        match read {
            Ok((r, drv)) if r.attempt_id == id && usable_id(&id) => out.push((id, (r, drv))),
            Ok(_) => {
                tracing::warn!(path = %path.display(), "a job record that names another attempt: removed")
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), "an unreadable job record ({e}): removed")
            }
        }
    }
    out
}

/// Removes the per-job files of an older builder (once in the journal).
fn remove_legacy(dir: &Path) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries.flatten() {
        let _ = std::fs::remove_file(e.path());
    }
    let _ = std::fs::remove_dir(dir);
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

    fn report() -> StoredReport {
        StoredReport {
            outcome: 1,
            error_msg: String::new(),
            outputs: vec![("out".into(), "/nix/store/x".into(), "sha256:0".into(), 8)],
            start_time: 1,
            stop_time: 2,
            times_built: 1,
            is_non_deterministic: false,
        }
    }

    fn id() -> String {
        uuid::Uuid::new_v4().to_string()
    }

    /// Not valid UTF-8: Nix strings are bytes.
    const DRV: &[u8] = b"Derive([(\"out\",\"\xff\")])";

    #[test]
    fn a_record_and_its_report_survive_a_reopen_and_are_forgotten_whole() {
        let dir = tempfile::tempdir().unwrap();
        let id = id();
        let records = Records::open(dir.path()).unwrap();
        records.started(&record(&id, None), DRV).unwrap();
        std::fs::write(records.log_path(&id), "line\n").unwrap();
        std::os::unix::fs::symlink("/nix/store/x", records.root_link(&id, "out")).unwrap();
        records.finished(&record(&id, Some(report()))).unwrap();

        let again = Records::open(dir.path()).unwrap();
        let all = again.all();
        assert_eq!(all, vec![(record(&id, Some(report())), DRV.to_vec())]);

        again.forget(&id);
        assert!(again.all().is_empty());
        assert!(!again.log_path(&id).exists());
        assert!(std::fs::symlink_metadata(again.root_link(&id, "out")).is_err());
        assert!(
            Records::open(dir.path()).unwrap().all().is_empty(),
            "forgotten on disk too"
        );
    }

    /// A job's record makes no file of its own: one append to the journal
    /// for its start, one for its report, one when it is forgotten.
    #[test]
    fn jobs_append_to_one_journal() {
        let dir = tempfile::tempdir().unwrap();
        let records = Records::open(dir.path()).unwrap();
        let ids: Vec<String> = (0..3).map(|_| id()).collect();
        for id in &ids {
            records.started(&record(id, None), DRV).unwrap();
            records.finished(&record(id, Some(report()))).unwrap();
        }
        records.forget(&ids[0]);

        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert!(
            names
                .iter()
                .all(|n| ["jobs.journal", "logs", "gcroots"].contains(&n.as_str())),
            "{names:?}"
        );
        let text = std::fs::read_to_string(dir.path().join("jobs.journal")).unwrap();
        assert_eq!(text.lines().count(), 7);
        assert_eq!(records.all().len(), 2);
    }

    /// What a crash can leave: a torn last line, garbage. The jobs whose
    /// lines are whole are kept; a report that was torn off leaves its job
    /// unfinished (the builder then asks Nix, or drops it).
    #[test]
    fn a_torn_or_garbled_line_loses_only_itself() {
        let dir = tempfile::tempdir().unwrap();
        let (kept, torn) = (id(), id());
        {
            let records = Records::open(dir.path()).unwrap();
            records.started(&record(&kept, None), DRV).unwrap();
            records.finished(&record(&kept, Some(report()))).unwrap();
            records.started(&record(&torn, None), DRV).unwrap();
            records.finished(&record(&torn, Some(report()))).unwrap();
        }
        let path = dir.path().join("jobs.journal");
        let mut bytes = std::fs::read(&path).unwrap();
        bytes.truncate(bytes.len() - 10);
        bytes.extend_from_slice(b"\n{not json\n\xff\xfe\n");
        std::fs::write(&path, bytes).unwrap();

        let all = Records::open(dir.path()).unwrap().all();
        let by_id: HashMap<_, _> = all.iter().map(|(r, _)| (r.attempt_id.clone(), r)).collect();
        assert_eq!(by_id.len(), 2);
        assert_eq!(by_id[&kept].report, Some(report()));
        assert_eq!(by_id[&torn].report, None);
    }

    /// Forgotten jobs' lines do not pile up: the journal is rewritten with
    /// the live jobs once they are many.
    #[test]
    fn the_journal_is_rewritten_when_forgotten_lines_pile_up() {
        let dir = tempfile::tempdir().unwrap();
        let records = Records::open(dir.path()).unwrap();
        let live = id();
        records.started(&record(&live, None), DRV).unwrap();
        for _ in 0..SLACK_LINES {
            let id = id();
            records.started(&record(&id, None), DRV).unwrap();
            records.forget(&id);
        }
        let text = std::fs::read_to_string(dir.path().join("jobs.journal")).unwrap();
        assert!(
            text.lines().count() < SLACK_LINES,
            "{} lines",
            text.lines().count()
        );
        records.finished(&record(&live, Some(report()))).unwrap();
        let all = Records::open(dir.path()).unwrap().all();
        assert_eq!(all, vec![(record(&live, Some(report())), DRV.to_vec())]);
    }

    /// A builder upgraded with jobs kept the old way (a file per job)
    /// still delivers them; garbled old records are dropped.
    #[test]
    fn an_older_builders_job_files_move_into_the_journal() {
        let dir = tempfile::tempdir().unwrap();
        let jobs = dir.path().join("jobs");
        std::fs::create_dir_all(&jobs).unwrap();
        let (old, garbled) = (id(), id());
        let json = serde_json::to_vec(&record(&old, Some(report()))).unwrap();
        std::fs::write(jobs.join(format!("{old}.json")), json).unwrap();
        std::fs::write(jobs.join(format!("{old}.drv")), DRV).unwrap();
        std::fs::write(jobs.join(format!("{garbled}.json")), "{not json").unwrap();

        let all = Records::open(dir.path()).unwrap().all();
        assert_eq!(all, vec![(record(&old, Some(report())), DRV.to_vec())]);
        assert!(!jobs.exists(), "the old files are gone");
        assert_eq!(Records::open(dir.path()).unwrap().all().len(), 1);
    }

    #[test]
    fn only_uuids_name_files() {
        assert!(usable_id(&id()));
        for bad in ["", "../../etc/passwd", "a/b", "x"] {
            assert!(!usable_id(bad), "{bad}");
        }
    }
}
