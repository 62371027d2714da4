//! A successful attempt: its outputs checked, measured and recorded.

use std::time::Instant;

use hydra_db::status::BuildStatus;
use hydra_nix::StorePath;
use hydra_nix::daemon::DaemonClient;
use uuid::Uuid;

use super::{CheckedReport, abort_attempt, ended, write_success};
use crate::attempts::Attempt;
use crate::events;
use crate::graph::StepId;
use crate::nix_support::{BuildOutputInfo, OutputScan, scan_nar};
use crate::realisations;
use crate::record::{self, StepResult, Success};
use crate::state::{AttemptEnd, Finishing};
use crate::store::StoreError;
use crate::{Fatal, Shared};

/// A built output: its path, NAR size, and what Hydra reads from it.
pub struct BuiltOutput {
    pub name: String,
    pub path: String,
    pub nar_size: u64,
    pub scan: OutputScan,
}

/// Outputs of a build, measured: everything `Builds` records about them.
pub struct Measured {
    pub outputs: Vec<BuiltOutput>,
    pub info: BuildOutputInfo,
    pub size: i64,
    pub closure_size: i64,
    /// The outputs' closure, references first (what a cache must hold).
    pub closure: Vec<String>,
}

impl Measured {
    pub fn paths(&self) -> Vec<(String, String)> {
        self.outputs
            .iter()
            .map(|o| (o.name.clone(), o.path.clone()))
            .collect()
    }

    pub fn success<'a>(
        &'a self,
        paths: &'a [(String, String)],
        start_time: i64,
        stop_time: i64,
    ) -> Success<'a> {
        Success {
            info: &self.info,
            outputs: paths,
            size: self.size,
            closure_size: self.closure_size,
            start_time,
            stop_time,
        }
    }
}

/// Reads an output already in the runner's store (not uploaded by this
/// attempt): its NAR is streamed out of the store and scanned as it comes.
pub async fn scan_store_output(
    client: &mut DaemonClient,
    path: &str,
) -> Result<(u64, OutputScan), StoreError> {
    let info = client.require_path_info(path).await?;
    let scan = crate::store::export_into(client, &info, |nar| scan_nar(nar)).await;
    match scan {
        Ok(scan) => Ok((info.nar_size, scan)),
        Err(crate::store::ExportError::Store(e)) => Err(e.into()),
        Err(crate::store::ExportError::Consumer(e)) => Err(StoreError::BadNar {
            path: path.to_owned(),
            message: e.to_string(),
        }),
    }
}

/// Sizes and `nix-support` of `outputs` (name, path), which must be valid
/// in the runner's store; `scans` has what the upload already learnt.
pub async fn measure(
    client: &mut DaemonClient,
    outputs: Vec<(String, String)>,
    mut uploaded: impl FnMut(&str) -> Option<(u64, OutputScan)>,
) -> Result<Measured, StoreError> {
    let mut built = Vec::new();
    for (name, path) in outputs {
        let (nar_size, scan) = match uploaded(&path) {
            Some(known) => known,
            None => scan_store_output(client, &path).await?,
        };
        built.push(BuiltOutput {
            name,
            path,
            nar_size,
            scan,
        });
    }
    let paths: Vec<String> = built.iter().map(|o| o.path.clone()).collect();
    let closure = client.query_closure(&paths).await?;
    let closure_size = closure.values().map(|i| i.nar_size as i64).sum();
    let closure = hydra_nix::daemon::references_first(closure.into_values())
        .into_iter()
        .map(|i| i.path)
        .collect();
    let size = built.iter().map(|o| o.nar_size as i64).sum();
    let named: Vec<(String, String, &OutputScan)> = built
        .iter()
        .map(|o| (o.name.clone(), o.path.clone(), &o.scan))
        .collect();
    let info = BuildOutputInfo::from_scans(&named);
    Ok(Measured {
        outputs: built,
        info,
        size,
        closure_size,
        closure,
    })
}

/// How a floating output `name` of the attempt's derivation is content
/// addressed, as the prefix of a path's `ca` (`fixed:r:sha256:`, say).
async fn floating_ca_prefix(
    shared: &Shared,
    client: &mut DaemonClient,
    attempt: &Attempt,
    name: &str,
) -> Result<Option<String>, Fatal> {
    // Valid when the attempt was prepared; its file is all that is read.
    let drv = match shared
        .store
        .read_derivation_file(client, &attempt.drv_path)
        .await
    {
        Ok((d, _)) => d,
        Err(e) if e.is_infrastructure() => return Err(e.into()),
        Err(_) => return Ok(None),
    };
    Ok(match drv.outputs.get(name) {
        Some(hydra_nix::derivation::DerivationOutput::Floating { method, algo }) => {
            Some(match method {
                hydra_nix::store_path::ContentAddressMethod::Text => format!("text:{algo}:"),
                hydra_nix::store_path::ContentAddressMethod::Recursive => {
                    format!("fixed:r:{algo}:")
                }
                hydra_nix::store_path::ContentAddressMethod::Flat => format!("fixed:{algo}:"),
            })
        }
        _ => None,
    })
}

/// The builder says the attempt built the step. Every output must be in
/// the runner's store (uploaded and verified by this attempt, or already
/// there); otherwise the attempt is aborted and the step retried.
pub async fn succeed(
    shared: &Shared,
    mut attempt: Attempt,
    report: &CheckedReport,
) -> Result<(), Fatal> {
    let mut client = shared.store.client().await?;
    let (outputs, learnt) = match expected_outputs(shared, &mut client, &attempt, report).await {
        Ok(o) => o,
        Err(reason) => return abort_attempt(shared, attempt, &reason).await,
    };
    for (name, path) in &outputs {
        if attempt.uploads.contains_key(path) {
            continue;
        }
        if !client.is_valid_path(path).await.map_err(StoreError::from)? {
            let reason =
                format!("the builder reported success but output '{name}' ({path}) never arrived");
            return abort_attempt(shared, attempt, &reason).await;
        }
        // A floating output the runner has already: only a copy whose
        // content address its store checked shows that the path is what
        // its name says.
        if !attempt.is_fixed_output(path) {
            let wanted = floating_ca_prefix(shared, &mut client, &attempt, name).await?;
            let info = client
                .query_path_info(path)
                .await
                .map_err(StoreError::from)?;
            let ca = info.and_then(|i| i.ca).unwrap_or_default();
            if wanted.is_none_or(|w| !ca.starts_with(&w)) {
                let reason = format!(
                    "the builder claims {path}, already in the runner's store, for output '{name}', but that copy is not content-addressed as the output is ({}): nothing shows it is this output",
                    if ca.is_empty() {
                        "it has no content address"
                    } else {
                        ca.as_str()
                    }
                );
                return abort_attempt(shared, attempt, &reason).await;
            }
        }
    }
    let uploads = std::mem::take(&mut attempt.uploads);
    let measured = measure(&mut client, outputs, |p| {
        uploads.get(p).map(|u| (u.nar_size, u.scan.clone()))
    })
    .await?;
    let Some(done) = shared.state.finishing(&attempt.drv_path, Some(&attempt.id)) else {
        return super::close_dropped(shared, &attempt).await;
    };
    let log_file = shared
        .logs
        .finish(&attempt.drv_path)
        .await?
        .display()
        .to_string();
    let start_time = report.start_time.map_or(attempt.start_time, i64::from);
    let stop_time = report.stop_time.map_or_else(record::now, i64::from);
    let paths = measured.paths();
    let success = measured.success(&paths, start_time, stop_time);
    let realised = realised(&done, &attempt.drv_path, learnt);
    let drv_full = shared.store.dir().display(&attempt.drv_path);
    let base_name = attempt.drv_path.to_string();
    let terminal = record::Terminal {
        drv_path: &drv_full,
        base_name: &base_name,
        system: &done.system,
        machine: &attempt.machine,
        start_time,
        stop_time,
        outputs: &paths,
        except: Some(attempt.build),
    };
    let finished = events::step_finished(
        &drv_full,
        &attempt,
        &done.needed_by,
        BuildStatus::Success,
        None,
    );
    let result = StepResult {
        status: BuildStatus::Success,
        error_msg: None,
        start_time,
        stop_time,
        machine: &attempt.machine,
        times_built: report.times_built,
        is_non_deterministic: report.is_non_deterministic.then_some(true),
        log_file: &log_file,
        outputs: &paths,
        event: Some(&finished),
    };
    let destinations = &shared.config().destinations;
    // Only a derivation others resolved to can be the terminal of a
    // status-13 row: its graph step then lists them. (A resolution made
    // after `finishing` is met by `apply_success`; one recorded before a
    // restart is redone when its build loads again, and finds these
    // outputs valid: an early cutoff writes the row.)
    let resolved_to = !done.resolved_from.is_empty();
    // Most steps of a large DAG are no build's top level, feed no cache
    // and realise nothing: their close is the one statement, with no
    // transaction around it.
    let alone =
        destinations.is_empty() && realised.is_empty() && !resolved_to && done.direct.is_empty();
    let written = if alone {
        on_connection!(shared, |db| {
            record::finish_build_step(&mut db, &attempt.id, attempt.build, attempt.stepnr, &result)
                .await?;
            Ok(())
        })
    } else {
        in_transaction!(shared, |tx| {
            record::finish_build_step(&mut tx, &attempt.id, attempt.build, attempt.stepnr, &result)
                .await?;
            crate::uploads::enqueue_log(&mut tx, destinations, &drv_full).await?;
            record_realisations(shared, &mut tx, &realised, &paths, &measured.closure).await?;
            if resolved_to {
                record::record_resolved_terminal(&mut tx, &terminal).await?;
            }
            write_success(&mut tx, &done.direct, attempt.build, &success).await?;
            Ok(())
        })
    };
    // What the build put in its outputs (`nix-support`) reaches Hydra's
    // tables here: should the database refuse it, the attempt ends as a
    // fault and is retried, up to `max_tries`; the runner carries on.
    if let Err(e) = &written
        && let Some(reason) = e.refused_data()
    {
        return abort_attempt(shared, attempt, &reason).await;
    }
    written?;
    tracing::info!(drv = %attempt.drv_path, machine = %attempt.machine, "step succeeded");

    let used = (stop_time - start_time).max(0) as f64;
    shared.state.time_used(attempt.build, used, Instant::now());
    shared.wake_uploads.notify_one();
    apply_success(
        shared,
        &done,
        Some(&attempt.id),
        attempt.build,
        &success,
        &terminal,
    )
    .await?;
    ended(shared, &attempt, AttemptEnd::Completed);
    register_realisations(shared, &mut client, &realised, &paths).await?;
    shared.store.release(client);
    Ok(())
}

/// A resolving step whose resolved derivation (`resolved`) has outputs
/// known and valid already (early cutoff): it succeeds without a build,
/// with those outputs; `owner` holds its status-13 row, and gets a row of
/// the resolved derivation beside it.
pub async fn succeed_unbuilt(
    shared: &Shared,
    step: StepId,
    resolved: &StorePath,
    outputs: Vec<(String, String)>,
    owner: i32,
) -> Result<(), Fatal> {
    let mut client = shared.store.client().await?;
    let measured = measure(&mut client, outputs, |_| None).await?;
    let Some(drv_path) = shared
        .state
        .read(|v| v.graph.step(step).map(|s| s.drv_path.clone()))
    else {
        return Ok(());
    };
    let Some(done) = shared.state.finishing(&drv_path, None) else {
        return Ok(());
    };
    let now = record::now();
    let paths = measured.paths();
    let success = measured.success(&paths, now, now);
    // The resolving step is the original: its outputs are the resolved ones.
    let realised = realised(&done, &drv_path, true);
    let resolved_full = shared.store.dir().display(resolved);
    let resolved_base = resolved.to_string();
    let terminal = record::Terminal {
        drv_path: &resolved_full,
        base_name: &resolved_base,
        system: &done.system,
        machine: "",
        start_time: now,
        stop_time: now,
        outputs: &paths,
        except: None,
    };
    in_transaction!(shared, |tx| {
        record_realisations(shared, &mut tx, &realised, &paths, &measured.closure).await?;
        record::record_resolved_terminal(&mut tx, &terminal).await?;
        write_success(&mut tx, &done.direct, owner, &success).await?;
        Ok(())
    })?;
    tracing::info!(drv = %drv_path, "outputs known already (early cutoff): nothing to build");
    shared.wake_uploads.notify_one();
    apply_success(shared, &done, None, owner, &success, &terminal).await?;
    register_realisations(shared, &mut client, &realised, &paths).await
}

/// The derivations whose outputs the step's outputs are, and that need
/// them recorded: the step's own when its outputs were `learnt` from the
/// build (not fixed by the `.drv`), and every derivation resolved to it.
fn realised(done: &Finishing, drv_path: &StorePath, learnt: bool) -> Vec<StorePath> {
    let own = learnt.then(|| drv_path.clone());
    own.into_iter()
        .chain(done.resolved_from.iter().cloned())
        .collect()
}

/// The graph side of a success, after its transaction: the step leaves,
/// dependents move on, and what attached to it meanwhile is recorded too:
/// builds (finished), and derivations that resolved to it (their
/// realisations, and their builds' rows of the resolved step).
async fn apply_success(
    shared: &Shared,
    done: &Finishing,
    attempt: Option<&Uuid>,
    owner: i32,
    success: &record::Success<'_>,
    terminal: &record::Terminal<'_>,
) -> Result<(), Fatal> {
    let Ok(result) = shared
        .state
        .step_succeeded(done.step, attempt, Instant::now())
    else {
        return Ok(()); // another completion won the step
    };
    let late = super::failure::late_builds(result.builds, &done.direct);
    let late_resolved: Vec<StorePath> = result
        .resolved_from
        .into_iter()
        .filter(|d| !done.resolved_from.contains(d))
        .collect();
    if !late.is_empty() || !late_resolved.is_empty() {
        let paths = success.outputs;
        in_transaction!(shared, |tx| {
            write_success(&mut tx, &late, owner, success).await?;
            let destinations = &shared.config().destinations;
            for drv in &late_resolved {
                let drv = shared.store.dir().display(drv);
                realisations::record(&mut tx, &drv, paths).await?;
                crate::uploads::enqueue_realisations(&mut tx, destinations, &drv, paths).await?;
            }
            record::record_resolved_terminal(&mut tx, terminal).await?;
            Ok(())
        })?;
        if !late_resolved.is_empty() {
            let mut client = shared.store.client().await?;
            register_realisations(shared, &mut client, &late_resolved, paths).await?;
        }
    }
    Ok(())
}

/// Realisations of the derivations whose outputs these are, and the
/// queued uploads of the outputs' closure and of those realisations.
async fn record_realisations(
    shared: &Shared,
    tx: &mut sqlx::PgConnection,
    realised: &[StorePath],
    paths: &[(String, String)],
    closure: &[String],
) -> Result<(), Fatal> {
    let destinations = &shared.config().destinations;
    crate::uploads::enqueue_paths(tx, destinations, closure).await?;
    for drv in realised {
        let drv = shared.store.dir().display(drv);
        realisations::record(tx, &drv, paths).await?;
        crate::uploads::enqueue_realisations(tx, destinations, &drv, paths).await?;
    }
    Ok(())
}

async fn register_realisations(
    shared: &Shared,
    client: &mut DaemonClient,
    realised: &[StorePath],
    paths: &[(String, String)],
) -> Result<(), Fatal> {
    for drv in realised {
        realisations::register_in_store(shared, client, drv, paths).await?;
    }
    Ok(())
}

/// Output name -> path: from the `.drv` where the path is fixed, from the
/// builder's report where it is known only after the build (CA); and
/// whether any was learnt from the report.
async fn expected_outputs(
    shared: &Shared,
    client: &mut DaemonClient,
    attempt: &Attempt,
    report: &CheckedReport,
) -> Result<(Vec<(String, String)>, bool), String> {
    let dir = shared.store.dir();
    // Valid when the attempt was prepared; its file is all that is read.
    let (drv, _) = shared
        .store
        .read_derivation_file(client, &attempt.drv_path)
        .await
        .map_err(|e| format!("cannot re-read the derivation: {e}"))?;
    if let Some((extra, _)) = report
        .outputs
        .iter()
        .find(|(name, _)| !drv.outputs.contains_key(name))
    {
        return Err(format!(
            "the builder reported an output '{extra}' that the derivation does not have"
        ));
    }
    let mut outputs = Vec::new();
    let mut learnt = false;
    for (name, out) in &drv.outputs {
        let path = match out.path() {
            Some(p) => dir.display(p),
            None => {
                learnt = true;
                let (_, reported) = report
                    .outputs
                    .iter()
                    .find(|(n, _)| n == name)
                    .ok_or_else(|| format!("the builder did not report output '{name}'"))?;
                dir.parse_path(reported)
                    .map_err(|e| format!("the builder reported a bad path for '{name}': {e}"))?;
                if !attempt.may_output(dir, reported) {
                    return Err(format!(
                        "the builder reported {reported} for output '{name}', which is not named as that output"
                    ));
                }
                reported.clone()
            }
        };
        outputs.push((name.clone(), path));
    }
    Ok((outputs, learnt))
}
