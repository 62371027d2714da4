//! Starting an attempt: persist it, then send the job.

use std::collections::BTreeMap;

use hydra_nix::Derivation;
use hydra_nix::daemon::DaemonClient;
use hydra_proto::v1::{BuildJob, Limits, RunnerMessage, runner_message};

use super::Assignment;
use crate::attempts::{self, Attempt};
use crate::record::{self, NewStepRow};
use crate::store::StoreError;
use crate::{Fatal, Shared};

/// Persists the attempt (busy BuildSteps row, `hqr_attempts`) and only
/// then sends the job. A step whose `.drv` or inputs are gone from the
/// runner's store fails as aborted with the reason; a machine that left
/// meanwhile only costs the attempt.
pub async fn start_attempt(shared: &Shared, a: Assignment) -> Result<(), Fatal> {
    let mut client = shared.store.client().await?;
    let job = match prepare_job(shared, &mut client, &a).await {
        Ok(job) => job,
        Err(e) if e.is_infrastructure() => return Err(e.into()),
        Err(e) => {
            tracing::error!(drv = %a.drv_path, "cannot prepare step: {e}");
            crate::completion::fail_before_start(shared, &a, &e.to_string()).await?;
            return Ok(());
        }
    };
    let attempt = persist(shared, &a, &job.outputs).await?;
    shared.logs.start(&a.drv_path)?;
    shared.attempts.lock().insert(attempt);
    tracing::info!(drv = %a.drv_path, machine = %a.machine, attempt = %a.attempt, "dispatched");
    let msg = RunnerMessage {
        msg: Some(runner_message::Msg::Build(job.job)),
    };
    if a.tx.send(Ok(msg)).await.is_err() {
        let taken = shared.attempts.lock().take(&a.attempt);
        if let Some(attempt) = taken {
            crate::completion::abort_attempt(
                shared,
                attempt,
                "the machine disconnected before the job was sent",
            )
            .await?;
        }
    }
    Ok(())
}

struct PreparedJob {
    job: BuildJob,
    /// Output name -> path where known (for BuildStepOutputs).
    outputs: Vec<(String, Option<String>)>,
}

/// Re-reads the `.drv` and turns it into the job a builder needs: the
/// derivation with its input derivations' outputs as plain sources, and
/// the closure of those sources.
async fn prepare_job(
    shared: &Shared,
    client: &mut DaemonClient,
    a: &Assignment,
) -> Result<PreparedJob, StoreError> {
    let store = &shared.store;
    let dir = store.dir();
    let drv = store.read_derivation(client, &a.drv_path).await?;
    let mut basic = Derivation {
        input_drvs: BTreeMap::new(),
        ..drv.clone()
    };
    for (input, wanted) in &drv.input_drvs {
        let outputs = client
            .query_derivation_output_map(&dir.display(input))
            .await?;
        for name in wanted {
            let path = outputs
                .get(name)
                .cloned()
                .flatten()
                .ok_or_else(|| StoreError::Missing {
                    path: format!("{}!{name}", dir.display(input)),
                })?;
            if !client.is_valid_path(&path).await? {
                return Err(StoreError::Missing { path });
            }
            basic.input_srcs.insert(
                dir.parse_path(&path)
                    .map_err(hydra_nix::daemon::DaemonError::from)?,
            );
        }
    }
    let srcs: Vec<String> = basic.input_srcs.iter().map(|p| dir.display(p)).collect();
    let closure = client.query_closure(&srcs).await?;
    let outputs = drv
        .outputs
        .iter()
        .map(|(name, o)| (name.clone(), o.path().map(|p| dir.display(p))))
        .collect();
    let config = &shared.config;
    Ok(PreparedJob {
        job: BuildJob {
            attempt_id: a.attempt.to_string(),
            drv_path: dir.display(&a.drv_path),
            drv: basic.to_aterm(dir).into_bytes(),
            input_paths: closure.into_keys().collect(),
            limits: Some(Limits {
                max_silent_secs: a.facts.max_silent_secs as u64,
                timeout_secs: a.facts.timeout_secs as u64,
                max_log_bytes: config.max_log_size,
                max_output_bytes: config.max_output_size,
            }),
        },
        outputs,
    })
}

/// Writes the busy step row and the attempt, in one transaction.
async fn persist(
    shared: &Shared,
    a: &Assignment,
    outputs: &[(String, Option<String>)],
) -> Result<Attempt, Fatal> {
    let start_time = record::now();
    let drv = shared.store.dir().display(&a.drv_path);
    let mut tx = shared.pool.begin().await?;
    let stepnr = record::create_build_step(
        &mut tx,
        &NewStepRow {
            build: a.owner.id,
            drv_path: &drv,
            system: &a.system,
            status: None,
            machine: &a.machine,
            start_time: Some(start_time),
            error_msg: None,
            propagated_from: None,
            outputs,
        },
    )
    .await?;
    let attempt = Attempt {
        id: a.attempt,
        machine: a.machine.clone(),
        connection: a.connection.clone(),
        drv_path: a.drv_path.clone(),
        build: a.owner.id,
        stepnr,
        start_time,
        uploads: Default::default(),
        log_bytes: 0,
    };
    attempts::persist(&mut tx, &attempt).await?;
    let first_step = shared.started_builds.lock().insert(a.owner.id);
    if first_step {
        record::notify_build_started(&mut tx, a.owner.id).await?;
    }
    tx.commit().await?;
    Ok(attempt)
}
