//! Attempts: one dispatch of a step to a machine. An attempt is persisted
//! (`hqr_attempts`, with its busy BuildSteps row) before its job is sent,
//! and every report from a builder names one; a report is applied only by
//! the connection that owns the attempt.
//!
//! Attempts outlive connections: when a builder's connection ends, its
//! attempts are *away* for `reconnect_grace_secs` and the builder may
//! re-adopt them when it joins again; when the runner starts, the attempts
//! left open by the runner before it ([`OpenAttempt`]) wait as long for
//! their builders.

use std::collections::HashMap;

use hydra_nix::StorePath;
use sqlx::PgConnection;
use thiserror::Error;
use uuid::Uuid;

use crate::graph::BuildId;
use crate::nix_support::OutputScan;

/// An output NAR received from the builder, verified and imported.
#[derive(Debug, Clone)]
pub struct Upload {
    pub nar_size: u64,
    pub scan: OutputScan,
}

#[derive(Debug)]
pub struct Attempt {
    pub id: Uuid,
    /// The machine's name, as BuildSteps.machine records it.
    pub machine: String,
    /// The connection (Welcome.machine_id) that owns the attempt.
    pub connection: String,
    pub drv_path: StorePath,
    /// The BuildSteps row: (build, stepnr).
    pub build: BuildId,
    pub stepnr: i32,
    /// The builds that needed the step when it was dispatched: its events
    /// concern them.
    pub builds: Vec<BuildId>,
    pub start_time: i64,
    /// When it was dispatched (for the step duration histogram).
    pub dispatched_at: std::time::Instant,
    /// The step's outputs: name -> path where the `.drv` fixes it (CA
    /// outputs are learnt from the build).
    pub outputs: Vec<(String, Option<String>)>,
    /// Output path -> what was uploaded for it.
    pub uploads: HashMap<String, Upload>,
    /// How long the runner's copy of the log is.
    pub log_bytes: u64,
    /// Its builder went away: the attempt waits for it to come back and
    /// re-adopt it until then, and is aborted after.
    pub away: Option<Away>,
    /// The job's input closure in the runner's store: all `FetchInputs`
    /// serves for it, and what its outputs may refer to besides themselves.
    /// None for an attempt inherited from the runner before (the closure is
    /// computed again when asked).
    pub inputs: Option<std::sync::Arc<std::collections::HashSet<String>>>,
    /// The inputs' outputs it was sent ahead of (its machine built them;
    /// the runner did not hold them yet): `inputs` lacks them and their
    /// closure until an output refers outside `inputs`, by when they are
    /// verified and their closure is added.
    pub ran_ahead_of: Vec<String>,
    /// When it is aborted if still running: the step's timeout plus
    /// `attempt_grace_secs`, from when it started on this runner. None
    /// when the step has no timeout (0, as Nix's `timeout`).
    pub deadline: Option<std::time::Instant>,
    /// The progress code (`BuildSteps.busy`) last queued for its row:
    /// `Preparing` as dispatch writes it, 0 when unknown (inherited). A
    /// report of the code it has already is not written again.
    pub busy: i32,
}

/// Why and until when an attempt's builder is away.
#[derive(Debug, Clone)]
pub struct Away {
    pub until: std::time::Instant,
    /// How its connection ended, for the abort's message.
    pub why: String,
}

impl Attempt {
    /// Whether `path` (a full store path) can be one of the step's
    /// outputs: a fixed output path, or, for an output known only after
    /// the build, a path with that output's name. Anything else a builder
    /// uploads was not asked for.
    pub fn may_output(&self, dir: &hydra_nix::StoreDir, path: &str) -> bool {
        let Ok(parsed) = dir.parse_path(path) else {
            return false;
        };
        let drv_name = self
            .drv_path
            .name()
            .strip_suffix(".drv")
            .unwrap_or(self.drv_path.name());
        self.outputs.iter().any(|(name, fixed)| match fixed {
            Some(p) => p == path,
            None => parsed.name() == hydra_nix::store_path::output_path_name(drv_name, name),
        })
    }
}

impl Attempt {
    /// The builder reports progress code `busy`: false when the row has it
    /// already (a builder's first report, `Preparing`, is what dispatch
    /// wrote), so it costs no write.
    pub fn progressed(&mut self, busy: i32) -> bool {
        std::mem::replace(&mut self.busy, busy) != busy
    }

    /// Whether `path` is one of the step's output paths fixed by its
    /// `.drv` (input-addressed or fixed-output), not one learnt after the
    /// build (a floating CA output, which must prove its content address).
    pub fn is_fixed_output(&self, path: &str) -> bool {
        self.outputs.iter().any(|(_, f)| f.as_deref() == Some(path))
    }
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum OwnershipError {
    #[error("'{0}' is not an attempt id")]
    BadId(String),
    #[error("attempt {0} is not running (finished, aborted or unknown)")]
    Unknown(Uuid),
    #[error(
        "attempt {attempt} belongs to another connection of machine {machine}; this report is not applied"
    )]
    NotOwner { attempt: Uuid, machine: String },
}

impl From<OwnershipError> for tonic::Status {
    fn from(e: OwnershipError) -> tonic::Status {
        match e {
            OwnershipError::BadId(_) => tonic::Status::invalid_argument(e.to_string()),
            _ => tonic::Status::failed_precondition(e.to_string()),
        }
    }
}

/// The running attempts, by id.
#[derive(Debug, Default)]
pub struct Attempts {
    running: HashMap<Uuid, Attempt>,
}

impl Attempts {
    pub fn insert(&mut self, attempt: Attempt) {
        self.running.insert(attempt.id, attempt);
    }

    /// The attempt `id`, if `connection` owns it.
    pub fn owned(&mut self, id: &str, connection: &str) -> Result<&mut Attempt, OwnershipError> {
        let uuid = Uuid::parse_str(id).map_err(|_| OwnershipError::BadId(id.to_owned()))?;
        let attempt = self
            .running
            .get_mut(&uuid)
            .ok_or(OwnershipError::Unknown(uuid))?;
        if attempt.connection != connection {
            return Err(OwnershipError::NotOwner {
                attempt: uuid,
                machine: attempt.machine.clone(),
            });
        }
        Ok(attempt)
    }

    /// Takes the attempt out of the running set, if `connection` owns it:
    /// whoever takes it is the only one to finish it.
    pub fn take_owned(&mut self, id: &str, connection: &str) -> Result<Attempt, OwnershipError> {
        let uuid = self.owned(id, connection)?.id;
        Ok(self.running.remove(&uuid).expect("just found"))
    }

    pub fn take(&mut self, id: &Uuid) -> Option<Attempt> {
        self.running.remove(id)
    }

    pub fn get_mut(&mut self, id: &Uuid) -> Option<&mut Attempt> {
        self.running.get_mut(id)
    }

    /// The connection `connection` ended (`why`): its attempts are away
    /// until `until`.
    pub fn set_away(&mut self, connection: &str, until: std::time::Instant, why: &str) {
        for a in self.running.values_mut() {
            if a.connection == connection {
                a.away = Some(Away {
                    until,
                    why: why.to_owned(),
                });
            }
        }
    }

    /// The attempts of the machine `name`, whichever connection owns them.
    pub fn of_machine(&self, name: &str) -> Vec<Uuid> {
        self.running
            .values()
            .filter(|a| a.machine == name)
            .map(|a| a.id)
            .collect()
    }

    /// Takes the attempts still running past their deadline at `now`.
    pub fn take_overdue(&mut self, now: std::time::Instant) -> Vec<Attempt> {
        let ids: Vec<Uuid> = self
            .running
            .values()
            .filter(|a| a.deadline.is_some_and(|d| d <= now))
            .map(|a| a.id)
            .collect();
        ids.iter()
            .filter_map(|id| self.running.remove(id))
            .collect()
    }

    /// The earliest deadline of a running attempt.
    pub fn next_deadline(&self) -> Option<std::time::Instant> {
        self.running.values().filter_map(|a| a.deadline).min()
    }

    /// Takes the away attempts whose builder did not come back by `now`.
    pub fn take_expired(&mut self, now: std::time::Instant) -> Vec<Attempt> {
        let ids: Vec<Uuid> = self
            .running
            .values()
            .filter(|a| a.away.as_ref().is_some_and(|w| w.until <= now))
            .map(|a| a.id)
            .collect();
        ids.iter()
            .filter_map(|id| self.running.remove(id))
            .collect()
    }

    /// When the next away attempt expires.
    pub fn next_expiry(&self) -> Option<std::time::Instant> {
        self.running
            .values()
            .filter_map(|a| a.away.as_ref().map(|w| w.until))
            .min()
    }

    /// Attempts owned by `connection`.
    pub fn take_all_of(&mut self, connection: &str) -> Vec<Attempt> {
        let ids: Vec<Uuid> = self
            .running
            .values()
            .filter(|a| a.connection == connection)
            .map(|a| a.id)
            .collect();
        ids.iter()
            .filter_map(|id| self.running.remove(id))
            .collect()
    }

    /// Every running attempt, for status reports.
    pub fn iter(&self) -> impl Iterator<Item = &Attempt> {
        self.running.values()
    }

    pub fn len(&self) -> usize {
        self.running.len()
    }

    pub fn is_empty(&self) -> bool {
        self.running.is_empty()
    }
}

/// Records how an attempt ended (a BuildSteps status code). A finished
/// step row closes its attempt itself (`record::finish_build_step`).
async fn close(tx: &mut PgConnection, id: &Uuid, outcome: i32) -> Result<(), sqlx::Error> {
    sqlx::query("update hqr_attempts set finished_at = now(), outcome = $2 where id = $1 and finished_at is null")
        .bind(id)
        .bind(outcome)
        .execute(tx)
        .await
        .map(|_| ())
}

/// An attempt a runner before this one left open (it was stopped or
/// died while the step ran), with what its BuildSteps row says.
#[derive(Debug, Clone)]
pub struct OpenAttempt {
    pub id: Uuid,
    pub build: BuildId,
    pub stepnr: i32,
    pub drv_path: StorePath,
    pub machine: String,
    pub start_time: i64,
    /// Output name -> path (None for a CA output), from BuildStepOutputs.
    pub outputs: Vec<(String, Option<String>)>,
    /// How long the runner's copy of its log is.
    pub log_bytes: u64,
    /// Waits for its builder until then.
    pub deadline: std::time::Instant,
    /// `attempt_grace_secs` when it was loaded: once adopted, it may run
    /// for the step's timeout plus this.
    pub attempt_grace: std::time::Duration,
    /// The connection of the builder that declared it, when one did
    /// before its step was loaded.
    pub claimed_by: Option<String>,
}

/// The attempts left open whose step row is still busy, oldest first,
/// each waiting for its builder until `deadline`; `log_len` says how much
/// of each one's log the runner has.
pub async fn load_open(
    db: &mut PgConnection,
    dir: &hydra_nix::StoreDir,
    deadline: std::time::Instant,
    attempt_grace: std::time::Duration,
    log_len: impl Fn(&StorePath) -> u64,
) -> Result<Vec<OpenAttempt>, sqlx::Error> {
    type Row = (Uuid, BuildId, i32, String, String, Option<i32>);
    let rows: Vec<Row> = sqlx::query_as(
        "select a.id, a.build, a.stepnr, a.drv_path, a.machine, s.startTime
           from hqr_attempts a
           join BuildSteps s on s.build = a.build and s.stepnr = a.stepnr
          where a.finished_at is null and s.busy != 0
          order by a.started_at",
    )
    .fetch_all(&mut *db)
    .await?;
    let mut open = Vec::new();
    for (id, build, stepnr, drv, machine, start) in rows {
        // Written as a base name; a full path is taken too.
        let parsed = StorePath::from_base_name(&drv).or_else(|_| dir.parse_path(&drv));
        let Ok(drv_path) = parsed else {
            tracing::warn!(attempt = %id, "an open attempt names {drv:?}, not a derivation of this store: closed as aborted");
            close_unreadable(db, id, build, stepnr).await?;
            continue;
        };
        let outputs: Vec<(String, Option<String>)> = sqlx::query_as(
            "select name, path from BuildStepOutputs where build = $1 and stepnr = $2 order by name",
        )
        .bind(build)
        .bind(stepnr)
        .fetch_all(&mut *db)
        .await?;
        open.push(OpenAttempt {
            id,
            build,
            stepnr,
            log_bytes: log_len(&drv_path),
            drv_path,
            machine,
            start_time: start.unwrap_or(0).into(),
            outputs,
            deadline,
            attempt_grace,
            claimed_by: None,
        });
    }
    Ok(open)
}

/// Closes an open attempt whose row cannot be taken over, and its step row.
async fn close_unreadable(
    db: &mut PgConnection,
    id: Uuid,
    build: BuildId,
    stepnr: i32,
) -> Result<(), sqlx::Error> {
    close(db, &id, 3).await?;
    crate::record::abort_step_row(
        db,
        build,
        stepnr,
        "aborted: the queue runner stopped while the step ran",
    )
    .await
}

/// Finished attempts older than `days` days go (open ones stay).
pub async fn prune_finished(pool: &sqlx::PgPool, days: u32) -> Result<u64, sqlx::Error> {
    sqlx::query("delete from hqr_attempts where finished_at < now() - make_interval(days => $1)")
        .bind(days as i32)
        .execute(pool)
        .await
        .map(|r| r.rows_affected())
}

/// How attempt `id` was recorded as ending (a BuildSteps status code), if
/// it was: a report sent again after its first was recorded is answered
/// from this.
pub async fn recorded_outcome(db: &sqlx::PgPool, id: &Uuid) -> Result<Option<i32>, sqlx::Error> {
    let row: Option<Option<i32>> = sqlx::query_scalar(
        "select outcome from hqr_attempts where id = $1 and finished_at is not null",
    )
    .bind(id)
    .fetch_optional(db)
    .await?;
    Ok(row.flatten())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attempt(connection: &str) -> Attempt {
        Attempt {
            id: Uuid::new_v4(),
            machine: "b1".into(),
            connection: connection.into(),
            drv_path: StorePath::from_base_name("7rjj86a15146cq1d3qy068lml7n8ykzm-hello.drv")
                .unwrap(),
            build: 1,
            builds: vec![1],
            stepnr: 1,
            dispatched_at: std::time::Instant::now(),
            start_time: 0,
            outputs: vec![("out".into(), None)],
            uploads: HashMap::new(),
            log_bytes: 0,
            away: None,
            inputs: None,
            ran_ahead_of: Vec::new(),
            busy: hydra_db::status::StepProgress::Preparing.code(),
            deadline: None,
        }
    }

    #[test]
    fn a_progress_code_the_row_has_already_is_not_written_again() {
        use hydra_db::status::StepProgress;
        let mut a = attempt("conn-1");
        assert!(
            !a.progressed(StepProgress::Preparing.code()),
            "dispatch wrote it"
        );
        assert!(a.progressed(StepProgress::Building.code()));
        assert!(!a.progressed(StepProgress::Building.code()));
        assert!(a.progressed(StepProgress::ReceivingOutputs.code()));
        let mut inherited = Attempt {
            busy: 0,
            ..attempt("conn-1")
        };
        assert!(
            inherited.progressed(StepProgress::Preparing.code()),
            "an inherited row's code is unknown"
        );
    }

    #[test]
    fn only_the_owning_connection_may_report() {
        let mut all = Attempts::default();
        let a = attempt("conn-1");
        let id = a.id.to_string();
        all.insert(a);
        assert!(matches!(
            all.owned(&id, "conn-2"),
            Err(OwnershipError::NotOwner { .. })
        ));
        assert!(matches!(
            all.owned("garbage", "conn-1"),
            Err(OwnershipError::BadId(_))
        ));
        assert!(all.take_owned(&id, "conn-1").is_ok());
        assert!(matches!(
            all.take_owned(&id, "conn-1"),
            Err(OwnershipError::Unknown(_))
        ));
    }

    #[test]
    fn a_disconnect_takes_every_attempt_of_that_connection() {
        let mut all = Attempts::default();
        all.insert(attempt("c1"));
        all.insert(attempt("c1"));
        all.insert(attempt("c2"));
        assert_eq!(all.take_all_of("c1").len(), 2);
        assert_eq!(all.len(), 1);
    }

    #[test]
    fn only_the_steps_own_outputs_may_be_uploaded() {
        let dir = hydra_nix::StoreDir::default();
        let mut a = attempt("conn-1");
        a.outputs = vec![
            ("out".into(), None),
            ("dev".into(), None),
            (
                "doc".into(),
                Some("/nix/store/00000000000000000000000000000000-hello-doc".into()),
            ),
        ];
        assert!(a.may_output(&dir, "/nix/store/11111111111111111111111111111111-hello"));
        assert!(a.may_output(
            &dir,
            "/nix/store/11111111111111111111111111111111-hello-dev"
        ));
        assert!(a.may_output(
            &dir,
            "/nix/store/00000000000000000000000000000000-hello-doc"
        ));
        assert!(!a.may_output(
            &dir,
            "/nix/store/11111111111111111111111111111111-hello-doc"
        ));
        assert!(!a.may_output(&dir, "/nix/store/11111111111111111111111111111111-bash"));
        assert!(!a.may_output(&dir, "/etc/passwd"));
    }
}
