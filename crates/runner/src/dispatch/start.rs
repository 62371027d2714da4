//! Starting an attempt: persist it, then send the job.

use hydra_nix::daemon::DaemonClient;
use uuid::Uuid;

use super::Assignment;
use crate::attempts::Attempt;
use crate::events::{Kind, NewEvent};
use crate::job_inputs::{self, PrepareError};
use crate::record::{self, Dispatch, NewStepRow};
use crate::tunnel::Job;
use crate::{Fatal, Shared};

/// Persists the attempt (busy BuildSteps row, `hqr_attempts`) and only
/// then sends the job. A step whose `.drv` or inputs are gone from the
/// runner's store fails as aborted with the reason; a machine that left
/// meanwhile only costs the attempt.
pub async fn start_attempt(shared: &Shared, a: Assignment) -> Result<(), Fatal> {
    let mut client = shared.store.client().await?;
    let job = match prepare_job(shared, &mut client, &a).await {
        Ok(job) => {
            shared.store.release(client);
            job
        }
        Err(e) => {
            let reason = e.into_reason()?;
            tracing::error!(drv = %a.drv_path, "cannot prepare step: {reason}");
            if shared.state.attempt_unprepared(&a) {
                crate::outcome::fail_unpreparable(shared, a.step, &reason).await?;
            }
            return Ok(());
        }
    };
    let Some(mut attempt) = persist(shared, &a, &job.outputs).await? else {
        // The build that was to record the step was deleted meanwhile: the
        // queue monitor is about to take it out of the graph. The step
        // waits a moment and is planned again (for its other builds).
        tracing::info!(drv = %a.drv_path, build = a.owner.id, "not started: the build is gone");
        shared.state.attempt_not_started(&a, OWNER_GONE_PAUSE);
        return Ok(());
    };
    crate::failpoint::stop_at("dispatch-recorded", &a.drv_path);
    // What `FetchInputs` serves: the job's inputs in the runner's store (a
    // job that runs ahead also names outputs only its builder has).
    attempt.inputs = Some(std::sync::Arc::new(job.closure));
    attempt.ran_ahead_of = job.on_builder;
    shared.logs.start(&a.drv_path).await?;
    // The machine may have left while the attempt was persisted: then its
    // departure took its attempts before this one was there.
    if let Err(attempt) = shared.state.attempt_started(attempt) {
        let reason = "the machine disconnected before the job was sent";
        return crate::outcome::abort_attempt(shared, *attempt, reason).await;
    }
    // An input it was to run ahead of was aborted meanwhile: the job is
    // not sent at all.
    let id = a.attempt.to_string();
    if shared.state.is_withdrawn(&id, &a.connection) {
        return crate::outcome::withdraw_reported(shared, &id, &a.connection).await;
    }
    tracing::info!(drv = %a.drv_path, machine = %a.machine, attempt = %a.attempt, "dispatched");
    let sent = a.link.send_job(job.job);
    shared
        .metrics
        .dispatch_seconds
        .lock()
        .observe(a.runnable_since.elapsed());
    if let Err(e) = sent
        && let Some(attempt) = shared.state.take_attempt_by_id(&a.attempt)
    {
        let reason = format!("the job was not sent: {e}");
        crate::outcome::abort_attempt(shared, attempt, &reason).await?;
    }
    Ok(())
}

struct PreparedJob {
    job: Job,
    /// The job's input closure in the runner's store.
    closure: std::collections::HashSet<String>,
    /// Output name -> path where known (for BuildStepOutputs).
    outputs: Vec<(String, Option<String>)>,
    /// Inputs' outputs only the builder holds yet (a job sent ahead).
    on_builder: Vec<String>,
}

/// Re-reads the `.drv` and turns it into the job a builder needs: the
/// derivation with its input derivations' outputs as plain sources (so
/// the builder needs no `.drv` but this one), and the closure of those
/// sources. A step reaching here needs no resolution, so its inputs'
/// outputs have fixed paths.
async fn prepare_job(
    shared: &Shared,
    client: &mut DaemonClient,
    a: &Assignment,
) -> Result<PreparedJob, PrepareError> {
    let dir = shared.store.dir();
    let inputs = job_inputs::of(shared, client, &a.drv_path, a.ahead).await?;
    let (drv, basic) = (&inputs.drv, &inputs.basic);
    let outputs = drv
        .outputs
        .iter()
        .map(|(name, o)| (name.clone(), o.path().map(|p| dir.display(p))))
        .collect();
    let config = shared.config();
    Ok(PreparedJob {
        job: Job {
            attempt_id: a.attempt.to_string(),
            drv_path: dir.display(&a.drv_path),
            drv: basic.to_aterm(dir).into_bytes(),
            input_paths: inputs
                .closure
                .iter()
                .chain(&inputs.on_builder)
                .cloned()
                .collect(),
            max_silent_secs: a.facts.max_silent_secs as u64,
            timeout_secs: a.facts.timeout_secs as u64,
            max_log_bytes: config.max_log_size,
            max_output_bytes: config.max_output_size,
            after_attempts: a.after.iter().map(Uuid::to_string).collect(),
        },
        outputs,
        closure: inputs.closure.into_iter().collect(),
        on_builder: inputs.on_builder,
    })
}

/// How long a step whose owner build was deleted waits before it is
/// planned again (the queue monitor drops the build meanwhile).
const OWNER_GONE_PAUSE: std::time::Duration = std::time::Duration::from_secs(1);

/// Writes the busy step row, the attempt and the step's event: one
/// statement, so no transaction. None when the owner build is gone.
async fn persist(
    shared: &Shared,
    a: &Assignment,
    outputs: &[(String, Option<String>)],
) -> Result<Option<Attempt>, Fatal> {
    let start_time = record::now();
    let drv = shared.store.dir().display(&a.drv_path);
    let base_name = a.drv_path.to_string();
    let started = NewEvent::new(Kind::StepStarted, a.builds.clone())
        .drv(drv.as_str())
        .machine(a.machine.as_str());
    let row = NewStepRow {
        build: a.owner.id,
        drv_path: &drv,
        system: &a.system,
        status: None,
        machine: &a.machine,
        start_time: Some(start_time),
        error_msg: None,
        propagated_from: None,
        outputs,
        resolved_drv_path: None,
        dispatch: Some(Dispatch {
            attempt: &a.attempt,
            drv_base_name: &base_name,
            event: &started,
            first_of_build: !shared.state.build_started_before(a.owner.id),
        }),
    };
    let stepnr = on_connection!(shared, |db| {
        Ok(record::create_build_step(&mut db, &row).await?)
    })?;
    let Some(stepnr) = stepnr else {
        return Ok(None);
    };
    let grace = std::time::Duration::from_secs(shared.config().attempt_grace_secs);
    Ok(Some(new_attempt(a, stepnr, start_time, outputs, grace)))
}

fn new_attempt(
    a: &Assignment,
    stepnr: i32,
    start_time: i64,
    outputs: &[(String, Option<String>)],
    grace: std::time::Duration,
) -> Attempt {
    let timeout = std::time::Duration::from_secs(a.facts.timeout_secs.into());
    Attempt {
        id: a.attempt,
        machine: a.machine.clone(),
        connection: a.connection.clone(),
        drv_path: a.drv_path.clone(),
        build: a.owner.id,
        stepnr,
        builds: a.builds.clone(),
        dispatched_at: std::time::Instant::now(),
        start_time,
        outputs: outputs.to_vec(),
        uploads: Default::default(),
        log_bytes: 0,
        away: None,
        inputs: None,
        ran_ahead_of: Vec::new(),
        busy: hydra_db::status::StepProgress::Preparing.code(),
        deadline: (!timeout.is_zero()).then(|| std::time::Instant::now() + timeout + grace),
    }
}
