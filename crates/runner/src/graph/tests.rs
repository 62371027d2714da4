//! Tests of the step graph.

use super::*;

fn path(name: &str) -> StorePath {
    StorePath::from_base_name(&format!(
        "7rjj86a15146cq1d3qy068lml7n8ykz{}-{name}.drv",
        name.len() % 10
    ))
    .unwrap()
}

fn build(id: BuildId, top: &str) -> Build {
    Build {
        id,
        drv_path: path(top),
        jobset_id: 1,
        project: "p".into(),
        jobset: "j".into(),
        job: top.into(),
        timestamp: 0,
        local_priority: 0,
        global_priority: 0,
        max_silent_secs: 60,
        timeout_secs: 600,
    }
}

/// A plan of new steps: (name, inputs).
fn plan(steps: &[(&str, &[&str])]) -> LoadPlan {
    LoadPlan {
        new_steps: steps
            .iter()
            .map(|(name, inputs)| NewStep {
                drv_path: path(name),
                system: "x86_64-linux".into(),
                required_features: vec![],
                inputs: inputs.iter().map(|i| path(i)).collect(),
                needs_resolution: false,
            })
            .collect(),
        existing: HashSet::new(),
        cached: 0,
        planned_at: None,
    }
}

fn runnable_names(g: &Graph) -> Vec<String> {
    let mut v: Vec<String> = g
        .runnable()
        .map(|(_, s)| s.drv_path.name().to_owned())
        .collect();
    v.sort();
    v
}

#[test]
fn a_shared_dependency_is_one_step_for_both_builds() {
    let mut g = Graph::default();
    let now = Instant::now();
    g.insert_build(
        build(1, "app"),
        plan(&[("app", &["lib"]), ("lib", &[])]),
        now,
    )
    .unwrap();
    let mut second = plan(&[("tool", &["lib"])]);
    second.existing.insert(path("lib"));
    g.insert_build(build(2, "tool"), second, now).unwrap();
    assert_eq!(g.step_count(), 3);
    let lib = g.step_id(&path("lib")).unwrap();
    assert_eq!(g.dependent_builds(lib).len(), 2);
    assert_eq!(runnable_names(&g), ["lib.drv"]);
}

#[test]
fn a_step_is_owned_by_a_build_whose_top_level_it_is_else_the_oldest() {
    let mut g = Graph::default();
    let now = Instant::now();
    g.insert_build(
        build(1, "app"),
        plan(&[("app", &["lib"]), ("lib", &[])]),
        now,
    )
    .unwrap();
    let lib = g.step_id(&path("lib")).unwrap();
    let (owner, needed) = g.owner_and_dependents(lib).unwrap();
    assert_eq!((owner.id, needed), (1, vec![1]));
    let mut p = plan(&[]);
    p.existing.insert(path("lib"));
    g.insert_build(build(5, "lib"), p, now).unwrap();
    let (owner, needed) = g.owner_and_dependents(lib).unwrap();
    assert_eq!((owner.id, needed), (5, vec![1, 5]));
}

#[test]
fn a_soft_removal_keeps_running_steps_until_their_attempt_ends() {
    let mut g = Graph::default();
    let now = Instant::now();
    g.insert_build(
        build(1, "app"),
        plan(&[("app", &["lib", "doc"]), ("lib", &[]), ("doc", &[])]),
        now,
    )
    .unwrap();
    let (lib, doc) = (
        g.step_id(&path("lib")).unwrap(),
        g.step_id(&path("doc")).unwrap(),
    );
    let (a, d) = (Uuid::new_v4(), Uuid::new_v4());
    g.mark_dispatched(lib, a, "m").unwrap();
    g.mark_dispatched(doc, d, "m").unwrap();
    let dropped = g.remove_builds_keeping_running(&[1]);
    assert!(dropped.running.is_empty(), "nothing running is aborted");
    assert!(
        g.step_id(&path("app")).is_none(),
        "the waiting step is gone"
    );
    // lib finishes as usual, for no build.
    let done = g.step_succeeded(lib, Some(&a), now).unwrap();
    assert!(done.builds.is_empty() && done.unblocked.is_empty());
    // doc's attempt aborts: nobody wants a retry.
    g.requeue(&path("doc"), &d, now, None).unwrap();
    assert!(g.drop_if_unneeded(doc));
    assert_eq!(g.step_count(), 0);
    assert_eq!(runnable_names(&g), Vec::<String>::new());
}

#[test]
fn a_hard_removal_aborts_running_steps_no_other_build_needs() {
    let mut g = Graph::default();
    let now = Instant::now();
    g.insert_build(
        build(1, "app"),
        plan(&[("app", &["lib"]), ("lib", &[])]),
        now,
    )
    .unwrap();
    let mut p = plan(&[("other", &["lib"])]);
    p.existing.insert(path("lib"));
    g.insert_build(build(2, "other"), p, now).unwrap();
    let lib = g.step_id(&path("lib")).unwrap();
    g.mark_dispatched(lib, Uuid::new_v4(), "m").unwrap();
    let dropped = g.remove_builds(&[1]);
    assert!(dropped.running.is_empty(), "build 2 still needs lib");
    let dropped = g.remove_builds(&[2]);
    assert_eq!(dropped.running.len(), 1);
    assert_eq!(g.step_count(), 0);
}

#[test]
fn a_plan_relying_on_a_finished_step_is_refused() {
    let mut g = Graph::default();
    let mut p = plan(&[("app", &["lib"])]);
    p.existing.insert(path("lib"));
    assert!(matches!(
        g.insert_build(build(1, "app"), p, Instant::now()),
        Err(InsertError::Vanished(_))
    ));
    assert_eq!(g.step_count(), 0);
}

#[test]
fn success_makes_dependents_runnable_and_finishes_top_level_builds() {
    let mut g = Graph::default();
    let now = Instant::now();
    g.insert_build(
        build(1, "app"),
        plan(&[("app", &["lib"]), ("lib", &[])]),
        now,
    )
    .unwrap();
    let lib = g.step_id(&path("lib")).unwrap();
    let a = Uuid::new_v4();
    g.mark_dispatched(lib, a, "m").unwrap();
    let done = g.step_succeeded(lib, Some(&a), now).unwrap();
    assert!(done.builds.is_empty());
    assert_eq!(runnable_names(&g), ["app.drv"]);
    let app = g.step_id(&path("app")).unwrap();
    let b = Uuid::new_v4();
    g.mark_dispatched(app, b, "m").unwrap();
    let done = g.step_succeeded(app, Some(&b), now).unwrap();
    assert_eq!(done.builds.iter().map(|b| b.id).collect::<Vec<_>>(), [1]);
    assert_eq!(g.step_count(), 0);
    assert!(g.build(1).is_none());
}

#[test]
fn failure_takes_every_build_above_and_drops_what_only_they_needed() {
    let mut g = Graph::default();
    let now = Instant::now();
    // app needs lib and data; other needs data only.
    g.insert_build(
        build(1, "app"),
        plan(&[("app", &["lib", "data"]), ("lib", &[]), ("data", &[])]),
        now,
    )
    .unwrap();
    let mut p = plan(&[("other", &["data"])]);
    p.existing.insert(path("data"));
    g.insert_build(build(2, "other"), p, now).unwrap();
    let (lib, data) = (
        g.step_id(&path("lib")).unwrap(),
        g.step_id(&path("data")).unwrap(),
    );
    let (a, d) = (Uuid::new_v4(), Uuid::new_v4());
    g.mark_dispatched(lib, a, "m1").unwrap();
    g.mark_dispatched(data, d, "m2").unwrap();
    let failed = g.step_failed(lib, Some(&a)).unwrap();
    assert_eq!(failed.builds.iter().map(|b| b.id).collect::<Vec<_>>(), [1]);
    assert!(
        failed.dropped.running.is_empty(),
        "data is still needed by build 2"
    );
    assert!(g.step_id(&path("app")).is_none());
    assert!(g.step_id(&path("data")).is_some());
    assert!(g.build(2).is_some());
}

#[test]
fn removing_the_last_build_drops_its_running_steps_for_abort() {
    let mut g = Graph::default();
    let now = Instant::now();
    g.insert_build(
        build(1, "app"),
        plan(&[("app", &["lib"]), ("lib", &[])]),
        now,
    )
    .unwrap();
    let mut p = plan(&[]);
    p.existing.insert(path("lib"));
    g.insert_build(build(2, "lib"), p, now).unwrap();
    let lib = g.step_id(&path("lib")).unwrap();
    let a = Uuid::new_v4();
    g.mark_dispatched(lib, a, "m").unwrap();
    let dropped = g.remove_builds(&[1]);
    assert_eq!(
        dropped.steps,
        vec![path("app")],
        "lib is build 2's top level"
    );
    assert!(dropped.running.is_empty());
    let dropped = g.remove_builds(&[2]);
    assert_eq!(dropped.running, vec![(a, "m".to_owned())]);
    assert_eq!(g.step_count(), 0);
}

#[test]
fn facts_take_the_largest_limits_and_longest_chain() {
    let mut g = Graph::default();
    let now = Instant::now();
    g.insert_build(
        build(1, "app"),
        plan(&[("app", &["lib"]), ("lib", &["base"]), ("base", &[])]),
        now,
    )
    .unwrap();
    let mut big = build(2, "test");
    big.timeout_secs = 99_999;
    big.global_priority = 5;
    let mut p = plan(&[("test", &["base"])]);
    p.existing.insert(path("base"));
    g.insert_build(big, p, now).unwrap();
    let base = g.step(g.step_id(&path("base")).unwrap()).unwrap();
    assert_eq!(base.sched.timeout_secs, 99_999);
    assert_eq!(base.sched.global_priority, 5);
    assert_eq!(base.sched.critical_path, 3, "app -> lib -> base");
    assert_eq!(base.sched.lowest_build_id, 1);
}

/// `plan`, with the steps named in `ca` needing resolution.
fn ca_plan(steps: &[(&str, &[&str])], ca: &[&str]) -> LoadPlan {
    let mut p = plan(steps);
    for s in &mut p.new_steps {
        s.needs_resolution = ca.contains(&s.drv_path.name().trim_end_matches(".drv"));
    }
    p
}

fn resolved(name: &str) -> NewStep {
    NewStep {
        drv_path: path(name),
        system: "x86_64-linux".into(),
        required_features: vec![],
        inputs: vec![],
        needs_resolution: false,
    }
}

fn build_step(g: &mut Graph, name: &str) -> Succeeded {
    let id = g.step_id(&path(name)).unwrap();
    let a = Uuid::new_v4();
    g.mark_dispatched(id, a, "m").unwrap();
    g.step_succeeded(id, Some(&a), Instant::now()).unwrap()
}

#[test]
fn a_ca_dependent_waits_for_the_resolver_not_the_dispatcher() {
    let mut g = Graph::default();
    let now = Instant::now();
    g.insert_build(
        build(1, "app"),
        ca_plan(&[("app", &["ca"]), ("ca", &[])], &["app"]),
        now,
    )
    .unwrap();
    assert_eq!(g.next_to_resolve(), None);
    let done = build_step(&mut g, "ca");
    let app = g.step_id(&path("app")).unwrap();
    assert_eq!(done.unblocked, vec![app]);
    assert!(runnable_names(&g).is_empty(), "not dispatched unresolved");
    assert_eq!(g.next_to_resolve(), Some(app));
    assert_eq!(g.next_to_resolve(), None, "taken once");
}

#[test]
fn a_resolved_step_takes_over_builds_and_dependents() {
    let mut g = Graph::default();
    let now = Instant::now();
    // top (a build of its own) needs app, which needs ca and must be resolved.
    g.insert_build(
        build(1, "top"),
        ca_plan(
            &[("top", &["app"]), ("app", &["ca"]), ("ca", &[])],
            &["top", "app"],
        ),
        now,
    )
    .unwrap();
    let mut p = plan(&[]);
    p.existing.insert(path("app"));
    g.insert_build(build(2, "app"), p, now).unwrap();
    build_step(&mut g, "ca");
    let app = g.next_to_resolve().unwrap();
    let r = g
        .replace_with_resolved(app, resolved("app-resolved"), now)
        .unwrap();
    assert_eq!(runnable_names(&g), ["app-resolved.drv"]);
    assert_eq!(g.step_id(&path("app")), Some(r), "the original is an alias");
    assert_eq!(g.step(r).unwrap().resolved_from, vec![path("app")]);
    assert_eq!(
        g.top_level_builds(r)
            .iter()
            .map(|b| b.id)
            .collect::<Vec<_>>(),
        [2]
    );
    assert_eq!(
        g.dependent_builds(r)
            .iter()
            .map(|b| b.id)
            .collect::<Vec<_>>(),
        [1, 2]
    );
    let done = build_step(&mut g, "app-resolved");
    assert_eq!(done.builds.iter().map(|b| b.id).collect::<Vec<_>>(), [2]);
    assert_eq!(g.step_id(&path("app")), None, "the alias left with it");
    assert_eq!(g.next_to_resolve(), g.step_id(&path("top")));
}

#[test]
fn two_derivations_resolving_alike_share_one_step() {
    let mut g = Graph::default();
    let now = Instant::now();
    g.insert_build(
        build(1, "down1"),
        ca_plan(&[("down1", &["up1"]), ("up1", &[])], &["down1"]),
        now,
    )
    .unwrap();
    g.insert_build(
        build(2, "down2"),
        ca_plan(&[("down2", &["up2"]), ("up2", &[])], &["down2"]),
        now,
    )
    .unwrap();
    build_step(&mut g, "up1");
    build_step(&mut g, "up2");
    let first = g.next_to_resolve().unwrap();
    let second = g.next_to_resolve().unwrap();
    let r1 = g
        .replace_with_resolved(first, resolved("down-res"), now)
        .unwrap();
    let r2 = g
        .replace_with_resolved(second, resolved("down-res"), now)
        .unwrap();
    assert_eq!(r1, r2);
    assert_eq!(g.step_count(), 1);
    let done = build_step(&mut g, "down-res");
    assert_eq!(done.builds.len(), 2);
    assert_eq!(g.step_count(), 0);
}

#[test]
fn a_step_that_is_not_resolving_is_not_replaced() {
    let mut g = Graph::default();
    let now = Instant::now();
    g.insert_build(build(1, "app"), plan(&[("app", &[])]), now)
        .unwrap();
    let app = g.step_id(&path("app")).unwrap();
    assert!(g.replace_with_resolved(app, resolved("x"), now).is_err());
    assert_eq!(runnable_names(&g), ["app.drv"]);
}

#[test]
fn a_step_another_load_created_meanwhile_keeps_its_own_inputs() {
    let mut g = Graph::default();
    let now = Instant::now();
    // Build 1's load found `lib` built: `app` needs nothing, and runs.
    g.insert_build(build(1, "app"), plan(&[("app", &[])]), now)
        .unwrap();
    let app = g.step_id(&path("app")).unwrap();
    let attempt = Uuid::new_v4();
    g.mark_dispatched(app, attempt, "m").unwrap();
    // Build 2's plan, made before, still had `lib` to build under `app`.
    g.insert_build(
        build(2, "app"),
        plan(&[("app", &["lib"]), ("lib", &[])]),
        now,
    )
    .unwrap();
    g.check_links().unwrap();
    assert!(g.step_id(&path("lib")).is_none(), "only app needed lib");
    let done = g.step_succeeded(app, Some(&attempt), now).unwrap();
    assert_eq!(done.builds.len(), 2, "both builds end with app");
    g.check_links().unwrap();
    assert_eq!(g.step_count(), 0);
}

#[test]
fn a_dependent_remembers_which_machines_built_its_inputs() {
    let mut g = Graph::default();
    let now = Instant::now();
    g.insert_build(
        build(1, "app"),
        plan(&[
            ("app", &["lib", "doc", "data"]),
            ("lib", &[]),
            ("doc", &[]),
            ("data", &[]),
        ]),
        now,
    )
    .unwrap();
    for (name, machine) in [("lib", "m1"), ("doc", "m2"), ("data", "m1")] {
        let id = g.step_id(&path(name)).unwrap();
        let a = Uuid::new_v4();
        g.mark_dispatched(id, a, machine).unwrap();
        g.step_succeeded(id, Some(&a), now).unwrap();
    }
    let app = g.step(g.step_id(&path("app")).unwrap()).unwrap();
    let mut held = app.inputs_on.clone();
    held.sort();
    assert_eq!(held, [("m1".to_owned(), 2), ("m2".to_owned(), 1)]);
}

// Running ahead of inputs' verification.

/// A chain `top -> mid -> base` in one build; `base` dispatched on `m`.
fn chain_with_base_on(g: &mut Graph, machine: &str, now: Instant) -> (StepId, StepId, Uuid) {
    g.insert_build(
        build(1, "top"),
        plan(&[("top", &["mid"]), ("mid", &["base"]), ("base", &[])]),
        now,
    )
    .unwrap();
    let base = g.step_id(&path("base")).unwrap();
    let mid = g.step_id(&path("mid")).unwrap();
    let a = Uuid::new_v4();
    g.mark_dispatched(base, a, machine).unwrap();
    (base, mid, a)
}

#[test]
fn a_dependent_runs_ahead_only_on_the_machine_that_built_its_input() {
    let mut g = Graph::default();
    let now = Instant::now();
    let (base, mid, a) = chain_with_base_on(&mut g, "m1", now);
    assert!(runnable_names(&g).is_empty());
    let ahead = g.step_built(&path("base"), &a, now).unwrap();
    assert_eq!(ahead, [mid]);
    assert_eq!(runnable_names(&g), ["mid.drv"]);
    assert_eq!(g.step(mid).unwrap().only_on(), Some("m1"));
    assert!(
        g.step_built(&path("base"), &a, now).unwrap().is_empty(),
        "said again, it is no news"
    );
    g.check_links().unwrap();
    // Its input succeeds: an ordinary runnable step, on any machine.
    let done = g.step_succeeded(base, Some(&a), now).unwrap();
    assert!(done.unblocked.is_empty(), "it was runnable already");
    assert_eq!(g.step(mid).unwrap().ahead, Ahead::No);
    assert_eq!(runnable_names(&g), ["mid.drv"]);
    g.check_links().unwrap();
}

#[test]
fn a_result_ahead_of_its_inputs_cannot_be_recorded_until_they_succeed() {
    let mut g = Graph::default();
    let now = Instant::now();
    let (base, mid, a) = chain_with_base_on(&mut g, "m1", now);
    g.step_built(&path("base"), &a, now).unwrap();
    let b = Uuid::new_v4();
    g.mark_dispatched(mid, b, "m1").unwrap();
    assert!(
        g.step_succeeded(mid, Some(&b), now).is_err(),
        "no success before the input's"
    );
    assert!(g.step_failed(mid, Some(&b)).is_err(), "nor a failure");
    g.step_succeeded(base, Some(&a), now).unwrap();
    g.step_succeeded(mid, Some(&b), now).unwrap();
    assert_eq!(runnable_names(&g), ["top.drv"]);
    g.check_links().unwrap();
}

#[test]
fn an_aborted_input_sends_its_dependents_back_to_wait_and_withdraws_running_ones_uncounted() {
    let mut g = Graph::default();
    let now = Instant::now();
    let (base, mid, a) = chain_with_base_on(&mut g, "m1", now);
    let top = g.step_id(&path("top")).unwrap();
    g.step_built(&path("base"), &a, now).unwrap();
    let b = Uuid::new_v4();
    g.mark_dispatched(mid, b, "m1").unwrap();
    // mid is built too: top may run ahead of both.
    assert_eq!(g.step_built(&path("mid"), &b, now).unwrap(), [top]);
    assert_eq!(runnable_names(&g), ["top.drv"]);
    g.check_links().unwrap();

    // base's upload is refused: its attempt is aborted.
    let withdrawn = g.requeue(&path("base"), &a, now, None).unwrap();
    assert_eq!(withdrawn, [b], "mid's attempt is to be withdrawn");
    assert_eq!(g.step(mid).unwrap().ahead, Ahead::Broken);
    assert_eq!(
        g.step(top).unwrap().state,
        StepState::Waiting,
        "top ran ahead of mid, which ran ahead of base"
    );
    assert_eq!(runnable_names(&g), ["base.drv"]);
    assert!(g.step_succeeded(mid, Some(&b), now).is_err());
    g.check_links().unwrap();

    assert!(g.withdraw(&path("mid"), &b, now).unwrap().is_empty());
    let mid_step = g.step(mid).unwrap();
    assert_eq!(mid_step.state, StepState::Waiting);
    assert_eq!(
        (mid_step.aborted_attempts, mid_step.failed_on.len()),
        (0, 0),
        "nothing of mid's failed"
    );
    assert_eq!(g.step(base).unwrap().aborted_attempts, 1);
    g.check_links().unwrap();
}

#[test]
fn a_step_whose_inputs_are_built_on_two_machines_or_must_be_resolved_waits_for_them() {
    let mut g = Graph::default();
    let now = Instant::now();
    let p = plan(&[("app", &["lib", "doc"]), ("lib", &[]), ("doc", &[])]);
    g.insert_build(build(1, "app"), p, now).unwrap();
    let mut other = plan(&[("ca-user", &["lib"])]);
    other.new_steps[0].needs_resolution = true;
    other.existing.insert(path("lib"));
    g.insert_build(build(2, "ca-user"), other, now).unwrap();
    let (lib, doc) = (
        g.step_id(&path("lib")).unwrap(),
        g.step_id(&path("doc")).unwrap(),
    );
    let (a, d) = (Uuid::new_v4(), Uuid::new_v4());
    g.mark_dispatched(lib, a, "m1").unwrap();
    g.mark_dispatched(doc, d, "m2").unwrap();
    assert!(g.step_built(&path("lib"), &a, now).unwrap().is_empty());
    assert!(g.step_built(&path("doc"), &d, now).unwrap().is_empty());
    assert!(runnable_names(&g).is_empty());
    // doc verified: app may now run ahead of lib, on lib's machine.
    let done = g.step_succeeded(doc, Some(&d), now).unwrap();
    assert_eq!(done.unblocked, [g.step_id(&path("app")).unwrap()]);
    assert_eq!(g.step(done.unblocked[0]).unwrap().only_on(), Some("m1"));
    g.check_links().unwrap();
}
