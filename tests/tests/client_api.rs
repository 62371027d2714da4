//! The client API end to end: a service submits, watches, reads logs,
//! lists, cancels, supersedes and asks why; real PostgreSQL, Nix and
//! builders. Builds that must stay running hold on a [`Gate`], and tests
//! learn that a build started from a [`StartSignal`], so nothing here
//! waits on a clock.

use std::collections::BTreeSet;
use std::path::Path;
use std::time::Duration;

use hydra_proto::client::*;
use hydra_testkit::process::{Gate, StartSignal};
use hydra_testkit::{ApiClient, BuilderSpec, Farm, eventually};
use tokio_stream::StreamExt;

const LIMIT: Duration = Duration::from_secs(60);

fn submit_request(drvs: Vec<String>) -> SubmitRequest {
    SubmitRequest {
        drv_paths: drvs,
        tenant: "acme".into(),
        queue: "deploys".into(),
        ..Default::default()
    }
}

async fn submit(api: &mut ApiClient, req: SubmitRequest) -> Vec<u64> {
    api.submit(req).await.unwrap().into_inner().build_ids
}

async fn counters(api: &mut ApiClient, id: u64) -> StepCounters {
    let b = api
        .get_build(GetBuildRequest { build_id: id })
        .await
        .unwrap()
        .into_inner();
    b.steps.unwrap()
}

async fn build(api: &mut ApiClient, id: u64) -> BuildInfo {
    api.get_build(GetBuildRequest { build_id: id })
        .await
        .unwrap()
        .into_inner()
}

/// Waits until the counters of `id` are `want` (loading and dispatch
/// announce no event a client could await on their own).
async fn counters_become(api: &mut ApiClient, id: u64, want: [u32; 6]) {
    let result = eventually(LIMIT, || {
        let mut api = api.clone();
        async move {
            let c = counters(&mut api, id).await;
            let got = [
                c.total,
                c.cached,
                c.queued,
                c.running,
                c.succeeded,
                c.failed,
            ];
            Ok((got == want).then_some(()))
        }
    })
    .await;
    if result.is_err() {
        let c = counters(api, id).await;
        panic!("counters of build {id}: want {want:?}, have {c:?}");
    }
}

/// Every event of build `id` until it ends.
async fn events_until_finished(api: &mut ApiClient, id: u64, after: u64) -> Vec<Event> {
    let mut stream = api
        .watch(WatchRequest {
            build_id: id,
            after_seq: after,
            until_finished: true,
            include_logs: false,
        })
        .await
        .unwrap()
        .into_inner();
    let mut out = Vec::new();
    while let Some(e) = tokio::time::timeout(LIMIT, stream.next())
        .await
        .expect("an event within the limit")
    {
        out.push(e.unwrap());
    }
    out
}

fn kinds(events: &[Event]) -> Vec<EventKind> {
    events
        .iter()
        .map(|e| EventKind::try_from(e.kind).unwrap())
        .collect()
}

/// `dep`, then `top`, which prints three lines, holds on `gate`, prints a
/// fourth and ends.
fn gated_chain(signal: &Path, gate: &Path) -> String {
    format!(
        r#"with prelude; rec {{
  dep = mkDrv {{ name = "dep"; script = "echo dep > $out"; }};
  top = mkDrv {{
    name = "top";
    script = ''
      echo line 0; echo line 1; echo line 2
      echo started > {signal}
      read x < {gate}
      echo line 3
      cat ${{dep}} > $out
    '';
  }};
  quick = mkDrv {{ name = "quick"; script = "echo quick > $out"; }};
}}"#,
        signal = signal.display(),
        gate = gate.display()
    )
}

#[tokio::test]
async fn a_build_is_submitted_watched_logged_and_listed_with_right_counters() {
    let mut farm = Farm::start(|_| {}).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let signal = StartSignal::new(dir.path(), "started").unwrap();
    let gate = Gate::new(dir.path(), "gate").unwrap();
    let drvs = farm
        .runner_store
        .instantiate(&gated_chain(signal.path(), gate.path()), &["top", "quick"])
        .await
        .unwrap();
    let mut api = farm.api().await.unwrap();
    let id = submit(&mut api, submit_request(vec![drvs["top"].clone()])).await[0];

    // Queued, no machine yet: both steps wait.
    counters_become(&mut api, id, [2, 0, 2, 0, 0, 0]).await;
    assert_eq!(build(&mut api, id).await.status, "queued");

    farm.add_builder(BuilderSpec::new("b1")).await.unwrap();
    signal.started(LIMIT).await.unwrap();
    // dep built, top running (holding on the gate).
    counters_become(&mut api, id, [2, 0, 0, 1, 1, 0]).await;
    assert_eq!(build(&mut api, id).await.status, "running");

    // A watcher that asked for log lines gets the running step's too.
    let with_logs = tokio::spawn({
        let mut api = api.clone();
        async move {
            let mut s = api
                .watch(WatchRequest {
                    build_id: id,
                    until_finished: true,
                    include_logs: true,
                    ..Default::default()
                })
                .await
                .unwrap()
                .into_inner();
            let mut lines = Vec::new();
            while let Some(e) = tokio::time::timeout(LIMIT, s.next()).await.unwrap() {
                let e = e.unwrap();
                if e.kind == EventKind::Log as i32 {
                    assert_eq!(e.seq, 0, "log lines are not durable events");
                    lines.push(e.detail);
                }
            }
            lines
        }
    });

    // Follow the running log from line 1: lines 1 and 2 now, 3 after the gate.
    let mut log = api
        .get_log(GetLogRequest {
            build_id: id,
            from_line: 1,
            follow: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let mut lines: Vec<(u64, String)> = Vec::new();
    while lines.len() < 2 {
        let batch = log.next().await.unwrap().unwrap();
        for (i, l) in batch.lines.into_iter().enumerate() {
            lines.push((batch.first_line + i as u64, l));
        }
    }
    gate.open(LIMIT).await.unwrap();
    while let Some(batch) = tokio::time::timeout(LIMIT, log.next()).await.unwrap() {
        let batch = batch.unwrap();
        for (i, l) in batch.lines.into_iter().enumerate() {
            lines.push((batch.first_line + i as u64, l));
        }
    }
    let want: Vec<(u64, String)> = (1..=3).map(|n| (n, format!("line {n}"))).collect();
    assert_eq!(
        lines, want,
        "every line once, numbered, until the step ended"
    );
    let live: Vec<String> = (0..=3).map(|n| format!("line {n}")).collect();
    assert_eq!(with_logs.await.unwrap(), live);

    // The whole story, from the first event on.
    let events = events_until_finished(&mut api, id, 0).await;
    let k = kinds(&events);
    assert_eq!(k.first(), Some(&EventKind::Queued));
    assert_eq!(k.last(), Some(&EventKind::Completed));
    let started: Vec<&str> = events
        .iter()
        .filter(|e| e.kind == EventKind::StepStarted as i32)
        .map(|e| e.drv_path.rsplit('-').next().unwrap())
        .collect();
    assert_eq!(started, ["dep.drv", "top.drv"]);
    assert!(k.contains(&EventKind::StepProgress));
    assert!(events.windows(2).all(|w| w[0].seq < w[1].seq));
    let finished = build(&mut api, id).await;
    assert_eq!(
        (finished.status.as_str(), finished.build_status),
        ("succeeded", Some(0))
    );
    assert_eq!(finished.steps.unwrap().succeeded, 2);
    assert!(finished.outputs[0].path.ends_with("-top"));

    // A second build whose closure is partly built: `dep` counts as cached.
    let more: Vec<u64> = {
        let mut ids = Vec::new();
        for _ in 0..4 {
            ids.extend(submit(&mut api, submit_request(vec![drvs["quick"].clone()])).await);
        }
        ids
    };
    farm.wait_finished(more.iter().map(|i| *i as i32), LIMIT)
        .await
        .unwrap();
    // Pages of two, newest first, each build once.
    let mut seen = Vec::new();
    let mut after = 0;
    loop {
        let page = api
            .list_builds(ListBuildsRequest {
                tenant: "acme".into(),
                limit: 2,
                after_id: after,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        assert!(page.builds.len() <= 2);
        seen.extend(page.builds.iter().map(|b| b.id));
        if page.next_after_id == 0 {
            break;
        }
        after = page.next_after_id;
    }
    let mut all = more.clone();
    all.push(id);
    all.sort_by(|a, b| b.cmp(a));
    assert_eq!(seen, all);
    let other_tenant = api
        .list_builds(ListBuildsRequest {
            tenant: "nobody".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(other_tenant.builds.is_empty());
    let bad = api
        .list_builds(ListBuildsRequest {
            status: "sideways".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
}

/// Twenty two-step builds on four slots; a watcher of everything drops
/// its stream every few events and resumes from the last number it saw.
#[tokio::test]
async fn a_resumed_watcher_gets_every_later_event_exactly_once() {
    let mut farm = Farm::start(|_| {}).await.unwrap();
    farm.add_builder(BuilderSpec::new("w1").max_jobs(2))
        .await
        .unwrap();
    farm.add_builder(BuilderSpec::new("w2").max_jobs(2))
        .await
        .unwrap();
    let n = 20;
    let mut expr = String::from("with prelude; {\n");
    let mut attrs = Vec::new();
    for i in 0..n {
        expr.push_str(&format!(
            "  b{i} = let d = mkDrv {{ name = \"d{i}\"; script = \"echo {i} > $out\"; }}; in \
             mkDrv {{ name = \"b{i}\"; script = \"cat ${{d}} > $out\"; }};\n"
        ));
        attrs.push(format!("b{i}"));
    }
    expr.push('}');
    let attrs: Vec<&str> = attrs.iter().map(String::as_str).collect();
    let drvs = farm.runner_store.instantiate(&expr, &attrs).await.unwrap();
    let mut api = farm.api().await.unwrap();
    let ids = submit(&mut api, submit_request(drvs.values().cloned().collect())).await;
    assert_eq!(ids.len(), n);

    // One build's own stream, resumed after every two events, meanwhile.
    let one = ids[7];
    let one_watcher = tokio::spawn({
        let mut api = api.clone();
        async move {
            let mut seen: Vec<Event> = Vec::new();
            loop {
                let mut s = api
                    .watch(WatchRequest {
                        build_id: one,
                        after_seq: seen.last().map_or(0, |e| e.seq),
                        until_finished: true,
                        include_logs: false,
                    })
                    .await
                    .unwrap()
                    .into_inner();
                for _ in 0..2 {
                    match tokio::time::timeout(LIMIT, s.next()).await.unwrap() {
                        Some(e) => seen.push(e.unwrap()),
                        None => return seen,
                    }
                }
            }
        }
    });
    let mut received = Vec::new();
    let mut cursor = 0;
    let mut ended = BTreeSet::new();
    while ended.len() < n {
        let mut stream = api
            .watch(WatchRequest {
                after_seq: cursor,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        // Take a few events, then drop the stream mid-flow.
        for _ in 0..5 {
            let e = tokio::time::timeout(LIMIT, stream.next())
                .await
                .expect("events keep coming")
                .unwrap()
                .unwrap();
            cursor = e.seq;
            if matches!(
                EventKind::try_from(e.kind).unwrap(),
                EventKind::Completed | EventKind::Failed
            ) {
                ended.insert(e.build_ids[0]);
            }
            received.push(e.seq);
            if ended.len() == n {
                break;
            }
        }
    }
    let one_seen = one_watcher.await.unwrap();

    let stored: Vec<i64> =
        sqlx::query_scalar("select seq from hqr_events where seq <= $1 order by seq")
            .bind(cursor as i64)
            .fetch_all(&farm.db.pool)
            .await
            .unwrap();
    let stored: Vec<u64> = stored.into_iter().map(|s| s as u64).collect();
    assert_eq!(received, stored, "every event once, in order, none missing");
    let contiguous: Vec<u64> = (1..=cursor).collect();
    assert_eq!(stored, contiguous, "numbers have no gaps");
    let one_stored: Vec<i64> = sqlx::query_scalar(
        "select seq from hqr_events where builds @> array[$1::integer] order by seq",
    )
    .bind(one as i32)
    .fetch_all(&farm.db.pool)
    .await
    .unwrap();
    let one_seqs: Vec<i64> = one_seen.iter().map(|e| e.seq as i64).collect();
    assert_eq!(
        one_seqs, one_stored,
        "the one-build stream, resumed, is whole"
    );
}

/// `shared` holds on the gate; `a` and `b` both need it.
fn shared_dependency(signal: &Path, gate: &Path) -> String {
    format!(
        r#"with prelude; rec {{
  shared = mkDrv {{ name = "shared"; script = "echo started > {signal}; read x < {gate}; echo s > $out"; }};
  a = mkDrv {{ name = "a"; script = "cat ${{shared}} > $out"; }};
  b = mkDrv {{ name = "b"; script = "cat ${{shared}} > $out; echo b >> $out"; }};
}}"#,
        signal = signal.display(),
        gate = gate.display()
    )
}

#[tokio::test]
async fn a_cancel_keeps_the_shared_step_another_build_needs_and_is_no_failure() {
    let mut farm = Farm::start(|_| {}).await.unwrap();
    farm.add_builder(BuilderSpec::new("c1")).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let signal = StartSignal::new(dir.path(), "started").unwrap();
    let gate = Gate::new(dir.path(), "gate").unwrap();
    let drvs = farm
        .runner_store
        .instantiate(&shared_dependency(signal.path(), gate.path()), &["a", "b"])
        .await
        .unwrap();
    let mut api = farm.api().await.unwrap();
    let a = submit(&mut api, submit_request(vec![drvs["a"].clone()])).await[0];
    signal.started(LIMIT).await.unwrap();
    // b comes to need the shared step while it runs.
    let b = submit(&mut api, submit_request(vec![drvs["b"].clone()])).await[0];
    counters_become(&mut api, b, [2, 0, 1, 1, 0, 0]).await;

    let cancelled = api
        .cancel(CancelRequest {
            build_ids: vec![a],
            reason: "the release was pulled".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .cancelled;
    assert_eq!(cancelled, [a]);
    let events = events_until_finished(&mut api, a, 0).await;
    let last = events.last().unwrap();
    assert_eq!(last.kind, EventKind::Cancelled as i32);
    assert_eq!(last.detail, "the release was pulled");
    let info = build(&mut api, a).await;
    assert_eq!(
        (info.build_status, info.cancel_reason.as_str()),
        (Some(4), "the release was pulled")
    );

    // The shared step is still running for b, and b succeeds.
    let machines = api.machines(MachinesRequest {}).await.unwrap().into_inner();
    assert!(machines.machines[0].current_steps[0].ends_with("-shared.drv"));
    gate.open(LIMIT).await.unwrap();
    let b_events = events_until_finished(&mut api, b, 0).await;
    assert_eq!(b_events.last().unwrap().kind, EventKind::Completed as i32);
    let shared_done = b_events
        .iter()
        .any(|e| e.kind == EventKind::StepFinished as i32 && e.drv_path.ends_with("-shared.drv"));
    assert!(
        shared_done,
        "a build that joined a running step hears it finish"
    );
    counters_become(&mut api, b, [2, 0, 0, 0, 2, 0]).await;
    let failed: i64 = sqlx::query_scalar("select count(*) from FailedPaths")
        .fetch_one(&farm.db.pool)
        .await
        .unwrap();
    assert_eq!(failed, 0, "a cancel is never cached as a failure");
    let again = api
        .cancel(CancelRequest {
            build_ids: vec![a],
            reason: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(
        again.cancelled.is_empty(),
        "a finished build is not cancelled again"
    );
}

/// `old` (holding on its gate) with the step `keep`, which `other` also
/// needs; `new` replaces `old`.
fn deployments(signal: &Path, gate: &Path) -> String {
    format!(
        r#"with prelude; rec {{
  slow = mkDrv {{ name = "slow"; script = "echo started > {signal}; read x < {gate}; echo slow > $out"; }};
  old = mkDrv {{ name = "old"; script = "cat ${{slow}} > $out"; }};
  new = mkDrv {{ name = "new"; script = "echo new > $out"; }};
}}"#,
        signal = signal.display(),
        gate = gate.display()
    )
}

async fn step_status(farm: &Farm, build: u64, drv_suffix: &str) -> Option<i32> {
    sqlx::query_scalar(
        "select status from BuildSteps where build = $1 and drvPath like '%' || $2 order by stepnr desc limit 1",
    )
    .bind(build as i32)
    .bind(drv_suffix)
    .fetch_optional(&farm.db.pool)
    .await
    .unwrap()
    .flatten()
}

/// `old` running its gated step when `new` supersedes it in `mode`.
struct Superseded {
    farm: Farm,
    old: u64,
    new: u64,
    gate: Gate,
    _dir: tempfile::TempDir,
}

async fn supersede(mode: SupersedeMode) -> Superseded {
    let mut farm = Farm::start(|_| {}).await.unwrap();
    farm.add_builder(BuilderSpec::new("s1").max_jobs(2))
        .await
        .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let signal = StartSignal::new(dir.path(), "started").unwrap();
    let gate = Gate::new(dir.path(), "gate").unwrap();
    let drvs = farm
        .runner_store
        .instantiate(&deployments(signal.path(), gate.path()), &["old", "new"])
        .await
        .unwrap();
    let mut api = farm.api().await.unwrap();
    let keyed = |drv: &str| SubmitRequest {
        supersede_key: "prod".into(),
        supersede_mode: mode as i32,
        ..submit_request(vec![drv.to_owned()])
    };
    let old = submit(&mut api, keyed(&drvs["old"])).await[0];
    signal.started(LIMIT).await.unwrap();
    let r = api.submit(keyed(&drvs["new"])).await.unwrap().into_inner();
    assert_eq!(r.superseded, [old]);
    let new = r.build_ids[0];
    let info = build(&mut api, old).await;
    assert_eq!(info.build_status, Some(4));
    assert_eq!(info.cancel_reason, format!("superseded by build {new}"));
    Superseded {
        farm,
        old,
        new,
        gate,
        _dir: dir,
    }
}

#[tokio::test]
async fn a_hard_supersede_aborts_the_older_builds_running_steps() {
    let Superseded { farm, old, new, .. } = supersede(SupersedeMode::Hard).await;
    let mut api = farm.api().await.unwrap();
    let events = events_until_finished(&mut api, new, 0).await;
    assert_eq!(
        events.last().unwrap().kind,
        EventKind::Completed as i32,
        "{events:#?}"
    );
    // The slow step's attempt was cancelled (4), not left to finish.
    let done = eventually(LIMIT, || async {
        Ok(step_status(&farm, old, "-slow.drv").await)
    })
    .await
    .unwrap();
    assert_eq!(done, 4);
    let machines = api.machines(MachinesRequest {}).await.unwrap().into_inner();
    assert!(machines.machines[0].current_steps.is_empty());
}

#[tokio::test]
async fn a_soft_supersede_lets_running_steps_finish_and_drops_the_rest() {
    let Superseded {
        farm,
        old,
        new,
        gate,
        _dir,
    } = supersede(SupersedeMode::Soft).await;
    let mut api = farm.api().await.unwrap();
    events_until_finished(&mut api, new, 0).await;
    // Still running after the newer build is done.
    let machines = api.machines(MachinesRequest {}).await.unwrap().into_inner();
    assert!(machines.machines[0].current_steps[0].ends_with("-slow.drv"));
    gate.open(LIMIT).await.unwrap();
    let done = eventually(LIMIT, || async {
        Ok(step_status(&farm, old, "-slow.drv").await)
    })
    .await
    .unwrap();
    assert_eq!(done, 0, "the running step finished and was recorded");
    // What had not started never ran: it has no row, or (sent ahead to
    // the machine building its input, to start after it) a cancelled one.
    let never_ran = step_status(&farm, old, "-old.drv").await;
    assert!(matches!(never_ran, None | Some(4)), "{never_ran:?}");
    assert_eq!(build(&mut api, old).await.build_status, Some(4));
}

#[tokio::test]
async fn bad_requests_get_clear_errors_and_change_nothing() {
    let farm = Farm::start(|_| {}).await.unwrap();
    let mut api = farm.api().await.unwrap();
    let cases = [
        (
            submit_request(vec!["not a path".into()]),
            "is not a store path",
        ),
        (
            submit_request(vec![
                "/nix/store/7rjj86a15146cq1d3qy068lml7n8ykzm-gone.drv".into(),
            ]),
            "is not in the runner's store",
        ),
        (
            SubmitRequest {
                tenant: "no spaces".into(),
                ..submit_request(vec!["/nix/store/x.drv".into()])
            },
            "not a valid name",
        ),
        (
            SubmitRequest {
                drv_nars: vec![DrvNar {
                    store_path: "/nix/store/7rjj86a15146cq1d3qy068lml7n8ykzm-x.drv".into(),
                    nar: b"garbage".to_vec(),
                }],
                ..submit_request(vec![])
            },
            "not a single regular file",
        ),
        (submit_request(vec![]), "nothing to build"),
    ];
    for (req, message) in cases {
        let e = api.submit(req).await.unwrap_err();
        assert_eq!(e.code(), tonic::Code::InvalidArgument, "{}", e.message());
        assert!(e.message().contains(message), "{}", e.message());
    }
    let builds: i64 = sqlx::query_scalar("select count(*) from Builds")
        .fetch_one(&farm.db.pool)
        .await
        .unwrap();
    assert_eq!(builds, 0);
    let e = api
        .get_build(GetBuildRequest { build_id: 999 })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::NotFound);
}

#[tokio::test]
async fn a_derivation_sent_as_a_nar_is_added_and_built() {
    let mut farm = Farm::start(|_| {}).await.unwrap();
    farm.add_builder(BuilderSpec::new("n1")).await.unwrap();
    // Instantiated in another store: the runner's has never seen it.
    let other = hydra_testkit::NixStore::start().unwrap();
    let expr = r#"with prelude; { hello = mkDrv { name = "hello"; script = "echo hi > $out"; }; }"#;
    let drv = other
        .instantiate_salted(expr, &["hello"], farm.runner_store.salt())
        .await
        .unwrap()
        .remove("hello")
        .unwrap();
    let dump = other
        .command("nix-store")
        .args(["--dump", &drv])
        .output()
        .await
        .unwrap();
    assert!(dump.status.success());
    let nar = dump.stdout;
    let mut api = farm.api().await.unwrap();
    let mut wrong = nar.clone();
    let at = wrong.len() - 20;
    wrong[at] ^= 1;
    let e = api
        .submit(SubmitRequest {
            drv_nars: vec![DrvNar {
                store_path: drv.clone(),
                nar: wrong,
            }],
            ..submit_request(vec![])
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), tonic::Code::InvalidArgument, "{}", e.message());
    let id = submit(
        &mut api,
        SubmitRequest {
            drv_nars: vec![DrvNar {
                store_path: drv.clone(),
                nar,
            }],
            ..submit_request(vec![])
        },
    )
    .await[0];
    let events = events_until_finished(&mut api, id, 0).await;
    assert_eq!(events.last().unwrap().kind, EventKind::Completed as i32);
}

/// A watcher that stops reading while thousands of events are numbered
/// falls further behind than the sequencer's subscription keeps (4,096):
/// it reads the event table again from its cursor, and misses nothing and
/// sees nothing twice.
#[tokio::test]
async fn a_watcher_that_stops_reading_then_resumes_misses_nothing() {
    use hydra_queue_runner::events::{self, Kind, NewEvent};
    const EVENTS: usize = 6_000;
    let farm = Farm::start(|_| {}).await.unwrap();
    // A small HTTP/2 window: what the client does not read stays with the
    // runner (its stream's buffers fill within a few events).
    let channel =
        tonic::transport::Endpoint::from_shared(format!("http://{}", farm.runner().client_addr))
            .unwrap()
            .initial_stream_window_size(Some(4096))
            .initial_connection_window_size(Some(4096))
            .http2_adaptive_window(false)
            .connect()
            .await
            .unwrap();
    let mut api = ApiClient::new(channel);
    let start = events::last_seq(&farm.db.pool).await.unwrap() as u64;
    let mut stream = api
        .watch(WatchRequest {
            after_seq: start,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    // Written in batches while nobody reads the stream: its buffers fill,
    // the watcher's task waits on them, and its subscription overflows.
    for batch in 0..EVENTS / 500 {
        let new: Vec<NewEvent> = (0..500)
            .map(|i| {
                let mut e = NewEvent::new(Kind::StepProgress, vec![1]);
                e.detail = Some(format!("{}", batch * 500 + i));
                e
            })
            .collect();
        events::emit_now(&farm.db.pool, &new).await.unwrap();
    }
    farm.events_numbered(LIMIT).await.unwrap();
    let mut last = start;
    for want in 0..EVENTS {
        let event = tokio::time::timeout(LIMIT, stream.message())
            .await
            .expect("the watcher catches up")
            .unwrap()
            .expect("the stream stays open");
        assert!(event.seq > last, "event {} after {last}", event.seq);
        last = event.seq;
        assert_eq!(
            event.detail,
            want.to_string(),
            "every event, in order, once"
        );
    }
}

/// The sequencer's numbering, on its own: committed events get contiguous
/// numbers after the highest given, in the order they were written, and
/// other processes hear of each numbered batch; a pass with nothing to
/// number tells nobody.
#[tokio::test]
async fn committed_events_are_numbered_in_order_and_other_processes_told() {
    use hydra_queue_runner::events::{self, Kind, NewEvent};
    let db = hydra_testkit::TestDb::new().await;
    let mut told = sqlx::postgres::PgListener::connect_with(&db.pool)
        .await
        .unwrap();
    told.listen("hqr_events").await.unwrap();
    assert!(events::number_committed(&db.pool).await.unwrap().is_empty());

    for round in 0..2 {
        let written: Vec<NewEvent> = (0..3)
            .map(|i| {
                let mut e = NewEvent::new(Kind::StepProgress, vec![1]);
                e.detail = Some(format!("{round}.{i}"));
                e
            })
            .collect();
        events::emit_now(&db.pool, &written).await.unwrap();
        let numbered = events::number_committed(&db.pool).await.unwrap();
        let seqs: Vec<i64> = numbered.iter().map(|r| r.seq).collect();
        let base = round * 3;
        assert_eq!(seqs, vec![base + 1, base + 2, base + 3]);
        let details: Vec<String> = numbered.iter().filter_map(|r| r.detail.clone()).collect();
        assert_eq!(details, ["0", "1", "2"].map(|i| format!("{round}.{i}")));
        tokio::time::timeout(LIMIT, told.recv())
            .await
            .expect("a numbered batch is told")
            .unwrap();
        // Exactly one notification a batch: the empty pass before the
        // first batch told nobody, or a second would be waiting now.
        assert!(told.next_buffered().is_none(), "round {round}");
    }
}
