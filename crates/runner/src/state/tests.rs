//! The state's invariants hold after every event, whatever their order:
//! a property test drives random sequences of dispatch rounds, starts,
//! aborts, successes, failures, machines leaving and rejoining and builds
//! leaving through the handle, doing what the runner does after each
//! (aborting lost attempts, closing dropped ones), and checks
//! [`State::check`] after each.

use std::time::{Duration, Instant};

use hydra_nix::StorePath;
use proptest::prelude::*;
use uuid::Uuid;

use super::machines::Machine;

use super::*;
use crate::dispatch::plan::Assignment;
use crate::graph::{LoadPlan, NewStep};

fn path(name: &str) -> StorePath {
    StorePath::from_base_name(&format!("7rjj86a15146cq1d3qy068lml7n8ykzm-{name}.drv")).unwrap()
}

fn machine(name: &str, instance: &str) -> Machine {
    Machine {
        name: name.into(),
        connection: Uuid::new_v4().to_string(),
        instance_id: instance.into(),
        systems: vec!["x86_64-linux".into()],
        supported_features: vec![],
        mandatory_features: vec![],
        max_jobs: 2,
        speed_factor: 1.0,
        running: Default::default(),
        uploading: Default::default(),
        load1: 0.0,
        free_disk: None,
        substituter_timeouts: 0,
        link: BuilderLink::detached(),
        follows_local_jobs: false,
    }
}

/// The property test's machines: `m2` starts jobs after the local jobs
/// they name, so dependents are sent there ahead of inputs still building.
fn farm_machine(name: &str) -> Machine {
    Machine {
        follows_local_jobs: name == "m2",
        ..machine(name, name)
    }
}

/// Builds 1..=n, each a chain `b<i>-top -> b<i>-dep`, plus a shared step.
fn loaded(n: i32) -> State {
    let state = State::default();
    for i in 1..=n {
        let top = path(&format!("b{i}-top"));
        let dep = path(&format!("b{i}-dep"));
        let step = |p: &StorePath, inputs: Vec<StorePath>| NewStep {
            drv_path: p.clone(),
            system: "x86_64-linux".into(),
            required_features: vec![],
            inputs,
            needs_resolution: false,
        };
        let mut plan = LoadPlan {
            new_steps: vec![
                step(&top, vec![dep.clone(), path("shared")]),
                step(&dep, vec![]),
            ],
            ..LoadPlan::default()
        };
        if i == 1 {
            plan.new_steps.push(step(&path("shared"), vec![]));
        } else {
            plan.existing.insert(path("shared"));
        }
        let build = Build {
            id: i,
            drv_path: top,
            jobset_id: 1,
            project: "p".into(),
            jobset: "j".into(),
            job: format!("b{i}"),
            timestamp: 0,
            local_priority: 0,
            global_priority: 0,
            max_silent_secs: 60,
            timeout_secs: 60,
        };
        state.build_loaded(build, plan, Instant::now()).unwrap();
    }
    state
}

fn attempt_of(a: &Assignment) -> Attempt {
    Attempt {
        id: a.attempt,
        machine: a.machine.clone(),
        connection: a.connection.clone(),
        drv_path: a.drv_path.clone(),
        build: a.owner.id,
        stepnr: 1,
        builds: a.builds.clone(),
        start_time: 0,
        dispatched_at: Instant::now(),
        outputs: vec![],
        uploads: Default::default(),
        log_bytes: 0,
        away: None,
        inputs: None,
        ran_ahead_of: Vec::new(),
        busy: hydra_db::status::StepProgress::Preparing.code(),
        deadline: None,
    }
}

#[derive(Debug, Clone)]
enum Event {
    Round {
        persist: Vec<bool>,
    },
    Abort(usize),
    /// The builder says the attempt built its step (outputs on their way).
    Built(usize),
    Succeed(usize),
    Fail(usize),
    MachineLeft(usize),
    /// The machine joins again, declaring the attempts picked by the mask.
    MachineRejoined(usize, u8),
    /// The reconnect grace of every away attempt runs out.
    GraceOver,
    BuildRemoved(i32, bool),
}

fn event() -> impl Strategy<Value = Event> {
    prop_oneof![
        3 => proptest::collection::vec(proptest::bool::weighted(0.9), 0..6)
            .prop_map(|persist| Event::Round { persist }),
        2 => any::<usize>().prop_map(Event::Abort),
        2 => any::<usize>().prop_map(Event::Built),
        3 => any::<usize>().prop_map(Event::Succeed),
        1 => any::<usize>().prop_map(Event::Fail),
        1 => (0..2usize).prop_map(Event::MachineLeft),
        1 => (0..2usize, any::<u8>()).prop_map(|(m, mask)| Event::MachineRejoined(m, mask)),
        1 => Just(Event::GraceOver),
        1 => (1..=4i32, any::<bool>()).prop_map(|(b, soft)| Event::BuildRemoved(b, soft)),
    ]
}

const GRACE: Duration = Duration::from_secs(90);

/// What the runner does around the handle, without PostgreSQL.
struct Runner {
    state: State,
    config: RunnerConfig,
    /// The running attempts it knows of (as builders' reports would name them).
    names: [&'static str; 2],
}

impl Runner {
    fn running(&self) -> Vec<Uuid> {
        self.state
            .read(|v| v.attempts.iter().map(|a| a.id).collect())
    }

    fn abort(&self, a: Attempt) {
        self.state
            .attempt_ended(&a, AttemptEnd::Aborted, &self.config, Instant::now());
        let requeue = self.state.attempt_requeued(&a, Duration::ZERO, 1000);
        self.withdraw(requeue.withdraw);
    }

    fn withdraw(&self, mut todo: Vec<Uuid>) {
        while let Some(id) = todo.pop() {
            if let Some(a) = self.state.take_attempt_by_id(&id) {
                self.state
                    .attempt_ended(&a, AttemptEnd::Neutral, &self.config, Instant::now());
                todo.extend(self.state.attempt_withdrawn(&a));
            }
        }
    }

    /// Whether a report for `id` may be applied now, as the tunnel waits
    /// for its inputs (withdrawing it when one of them was aborted).
    fn may_report(&self, id: &Uuid) -> bool {
        let Some(conn) = self.state.read(|v| {
            v.attempts
                .iter()
                .find(|a| a.id == *id)
                .map(|a| a.connection.clone())
        }) else {
            return false;
        };
        match self.state.verification(&id.to_string(), &conn) {
            Ok(Verification::Withdrawn) => {
                self.withdraw(vec![*id]);
                false
            }
            Ok(_) => true,
            Err(()) => false,
        }
    }

    fn close_dropped(&self, dropped: Dropped) {
        for (id, _) in dropped.running {
            if let Some(a) = self.state.take_attempt_by_id(&id) {
                self.state
                    .attempt_ended(&a, AttemptEnd::Neutral, &self.config, Instant::now());
            }
        }
    }

    fn apply(&self, e: &Event) {
        let pick = |i: usize| {
            let running = self.running();
            (!running.is_empty()).then(|| running[i % running.len()])
        };
        match e {
            Event::Round { persist } => {
                let round = self.state.plan_round(&self.config, Instant::now());
                for (i, a) in round.assignments.iter().enumerate() {
                    if persist.get(i).copied().unwrap_or(true) {
                        if let Err(back) = self.state.attempt_started(attempt_of(a)) {
                            self.abort(*back);
                        } else if self
                            .state
                            .is_withdrawn(&a.attempt.to_string(), &a.connection)
                        {
                            self.withdraw(vec![a.attempt]);
                        }
                    } else {
                        self.state.attempt_not_started(a, Duration::ZERO);
                    }
                }
            }
            Event::Abort(i) => {
                if let Some(a) = pick(*i).and_then(|id| self.state.take_attempt_by_id(&id)) {
                    self.abort(a);
                }
            }
            Event::Built(i) => {
                if let Some(id) = pick(*i) {
                    let conn = self.state.read(|v| {
                        v.attempts
                            .iter()
                            .find(|a| a.id == id)
                            .map(|a| a.connection.clone())
                    });
                    if let Some(conn) = conn {
                        self.state.attempt_built(&id.to_string(), &conn);
                    }
                }
            }
            Event::Succeed(i) => {
                let reportable = pick(*i).filter(|id| self.may_report(id));
                if let Some(a) = reportable.and_then(|id| self.state.take_attempt_by_id(&id)) {
                    if let Some(step) = self.state.step_of_attempt(&a.drv_path, &a.id) {
                        self.state
                            .step_succeeded(step, Some(&a.id), Instant::now())
                            .unwrap();
                    }
                    self.state.attempt_ended(
                        &a,
                        AttemptEnd::Completed,
                        &self.config,
                        Instant::now(),
                    );
                }
            }
            Event::Fail(i) => {
                let reportable = pick(*i).filter(|id| self.may_report(id));
                if let Some(a) = reportable.and_then(|id| self.state.take_attempt_by_id(&id)) {
                    if let Some(step) = self.state.step_of_attempt(&a.drv_path, &a.id) {
                        let failed = self.state.step_failed(step, Some(&a.id)).unwrap();
                        self.close_dropped(failed.dropped);
                    }
                    self.state.attempt_ended(
                        &a,
                        AttemptEnd::Completed,
                        &self.config,
                        Instant::now(),
                    );
                }
            }
            Event::MachineLeft(m) => {
                let name = self.names[*m];
                let connection = self
                    .state
                    .read(|v| v.machines.get(name).map(|m| m.connection.clone()));
                if let Some(connection) = connection {
                    self.state
                        .machine_left(name, &connection, "gone", Instant::now(), GRACE);
                }
            }
            Event::MachineRejoined(m, mask) => {
                let name = self.names[*m];
                let mut held: Vec<String> = self.state.read(|v| {
                    v.attempts
                        .iter()
                        .filter(|a| a.machine == name)
                        .enumerate()
                        .filter(|(i, _)| mask & (1 << (i % 8)) != 0)
                        .map(|(_, a)| a.id.to_string())
                        .collect()
                });
                held.push(Uuid::new_v4().to_string()); // one the runner never had
                let joined = self
                    .state
                    .machine_joined(farm_machine(name), &held, || {})
                    .unwrap();
                assert_eq!(joined.unknown.len(), 1, "only the made-up one is unknown");
                for a in joined.lost {
                    self.abort(a);
                }
            }
            Event::GraceOver => {
                let expired = self.state.adoption_expired(Instant::now() + GRACE);
                for a in expired.attempts {
                    self.abort(a);
                }
            }
            Event::BuildRemoved(b, soft) => {
                let dropped = self.state.builds_removed(&[*b], *soft);
                self.close_dropped(dropped);
            }
        }
    }
}

proptest! {
    #[test]
    fn every_record_of_a_running_step_agrees_after_every_event(
        events in proptest::collection::vec(event(), 1..60)
    ) {
        let runner = Runner {
            state: loaded(4),
            config: RunnerConfig::default(),
            names: ["m1", "m2"],
        };
        for name in runner.names {
            runner.state.machine_joined(farm_machine(name), &[], || {}).unwrap();
        }
        for (n, e) in events.iter().enumerate() {
            runner.apply(e);
            if let Err(broken) = runner.state.check() {
                prop_assert!(false, "after event {n} ({e:?}): {broken}");
            }
        }
    }
}

/// One build (`loaded(1)`) and machine `m` with three slots, joined
/// (`follows`: it starts jobs after the local jobs they name); returns the
/// runner and the machine's connection.
fn one_build_on_m(follows: bool) -> (Runner, String) {
    let runner = Runner {
        state: loaded(1),
        config: RunnerConfig::default(),
        names: ["m", "m"],
    };
    let m = Machine {
        max_jobs: 3,
        follows_local_jobs: follows,
        ..machine("m", "m")
    };
    let conn = m.connection.clone();
    runner.state.machine_joined(m, &[], || {}).unwrap();
    (runner, conn)
}

/// Step `name` waits for its inputs again, no aborted attempt counted
/// against it (it was withdrawn).
fn assert_waits_with_nothing_counted(state: &State, name: &str) {
    let (now, tries) = state.read(|v| {
        let s = v.graph.step(v.graph.step_id(&path(name)).unwrap()).unwrap();
        (s.state.clone(), s.aborted_attempts)
    });
    assert_eq!(
        (now, tries),
        (crate::graph::StepState::Waiting, 0),
        "{name}"
    );
}

/// Starts every attempt a round plans on one machine `m`; returns them.
fn started_on_m(state: &State) -> Vec<Uuid> {
    let round = state.plan_round(&RunnerConfig::default(), Instant::now());
    assert!(!round.assignments.is_empty());
    for a in &round.assignments {
        state.attempt_started(attempt_of(a)).unwrap();
    }
    round.assignments.iter().map(|a| a.attempt).collect()
}

#[test]
fn a_machine_that_left_gets_no_attempt_started_on_it() {
    let state = loaded(1);
    state.machine_joined(machine("m", "m"), &[], || {}).unwrap();
    let round = state.plan_round(&RunnerConfig::default(), Instant::now());
    assert!(!round.assignments.is_empty());
    let a = &round.assignments[0];
    let connection = a.connection.clone();
    state.machine_left("m", &connection, "gone", Instant::now(), GRACE);
    let back = state.attempt_started(attempt_of(a)).unwrap_err();
    assert_eq!(back.id, a.attempt, "handed back for the caller to abort");
}

#[test]
fn a_builder_that_comes_back_carries_on_with_what_it_declared_and_loses_the_rest() {
    let state = loaded(2);
    let first = machine("m", "one");
    let connection = first.connection.clone();
    state.machine_joined(first, &[], || {}).unwrap();
    let running = started_on_m(&state);
    assert_eq!(running.len(), 2, "two slots, two steps");
    state.machine_left("m", &connection, "gone", Instant::now(), GRACE);
    assert_eq!(state.queue_counts().running, 2, "away, not aborted");
    state.check().unwrap();

    // Another process (it restarted) that kept only the first attempt.
    let again = machine("m", "two");
    let new_connection = again.connection.clone();
    let held = vec![running[0].to_string(), Uuid::new_v4().to_string()];
    let joined = state.machine_joined(again, &held, || {}).unwrap();
    assert_eq!(
        joined.adopted.iter().map(|a| a.attempt).collect::<Vec<_>>(),
        vec![running[0]]
    );
    assert_eq!(joined.unknown, vec![held[1].clone()]);
    assert_eq!(
        joined.lost.iter().map(|a| a.id).collect::<Vec<_>>(),
        vec![running[1]]
    );
    state.check().unwrap();
    // The re-adopted attempt answers to the new connection only.
    let id = running[0].to_string();
    assert!(state.with_attempt(&id, &new_connection, |_| ()).is_ok());
    assert!(state.with_attempt(&id, &connection, |_| ()).is_err());
}

#[test]
fn an_attempt_whose_builder_stays_away_past_the_grace_expires() {
    let state = loaded(1);
    let m = machine("m", "one");
    let connection = m.connection.clone();
    state.machine_joined(m, &[], || {}).unwrap();
    let mut running = started_on_m(&state);
    running.sort();
    let left = Instant::now();
    state.machine_left("m", &connection, "gone", left, GRACE);
    assert!(state.adoption_expired(left + GRACE / 2).is_empty());
    let round = state.plan_round(&RunnerConfig::default(), left);
    assert!(
        round.next_deadline.is_some_and(|t| t <= left + GRACE),
        "the dispatcher looks again when the grace ends"
    );
    let expired = state.adoption_expired(left + GRACE);
    let mut ids: Vec<Uuid> = expired.attempts.iter().map(|a| a.id).collect();
    ids.sort();
    assert_eq!(ids, running);
    assert_eq!(state.queue_counts().running, 0);
}

fn open_attempt(drv: &str, machine: &str, deadline: Instant) -> OpenAttempt {
    OpenAttempt {
        id: Uuid::new_v4(),
        build: 1,
        stepnr: 1,
        drv_path: path(drv),
        machine: machine.into(),
        start_time: 0,
        outputs: vec![],
        log_bytes: 17,
        deadline,
        attempt_grace: Duration::from_secs(600),
        claimed_by: None,
    }
}

#[test]
fn an_attempt_from_before_a_restart_runs_its_step_once_it_loads() {
    let state = State::default();
    let deadline = Instant::now() + GRACE;
    let declared = open_attempt("b1-dep", "m", deadline);
    let undeclared = open_attempt("shared", "gone", deadline);
    state.attempts_inherited(vec![declared.clone(), undeclared.clone()]);
    // The builder comes back before the build is loaded, declaring it.
    let m = machine("m", "one");
    let joined = state
        .machine_joined(m, &[declared.id.to_string()], || {})
        .unwrap();
    assert!(joined.adopted.is_empty() && joined.unknown.is_empty());

    let loaded = {
        let top = path("b1-top");
        let step = |p: &StorePath, inputs: Vec<StorePath>| NewStep {
            drv_path: p.clone(),
            system: "x86_64-linux".into(),
            required_features: vec![],
            inputs,
            needs_resolution: false,
        };
        let plan = LoadPlan {
            new_steps: vec![
                step(&top, vec![path("b1-dep"), path("shared")]),
                step(&path("b1-dep"), vec![]),
                step(&path("shared"), vec![]),
            ],
            ..LoadPlan::default()
        };
        let build = Build {
            id: 1,
            drv_path: top,
            jobset_id: 1,
            project: "p".into(),
            jobset: "j".into(),
            job: "b1".into(),
            timestamp: 0,
            local_priority: 0,
            global_priority: 0,
            max_silent_secs: 60,
            timeout_secs: 60,
        };
        state.build_loaded(build, plan, Instant::now()).unwrap()
    };
    assert_eq!(loaded.len(), 1, "the declared one is adopted as it loads");
    assert_eq!(loaded[0].attempt, declared.id);
    assert_eq!(
        loaded[0].log_offset, 17,
        "the builder sends the log on from there"
    );
    assert_eq!(state.queue_counts().running, 2, "both run; one is away");
    state.check().unwrap();
    // Neither is dispatched again.
    let round = state.plan_round(&RunnerConfig::default(), Instant::now());
    assert!(
        round.assignments.is_empty(),
        "{:?}",
        round.assignments.len()
    );
    // The undeclared one's builder never comes back.
    let expired = state.adoption_expired(deadline);
    assert_eq!(
        expired.attempts.iter().map(|a| a.id).collect::<Vec<_>>(),
        vec![undeclared.id]
    );
}

#[test]
fn another_process_cannot_take_a_connected_machines_name() {
    let state = loaded(1);
    state
        .machine_joined(machine("m", "one"), &[], || {})
        .unwrap();
    let mut joined = false;
    let refused = state.machine_joined(machine("m", "two"), &[], || joined = true);
    assert!(refused.is_err());
    assert!(!joined, "nothing is queued for a refused builder");
}

#[test]
fn a_plan_made_before_its_step_succeeded_is_stale() {
    let state = State::default();
    let new_step = || NewStep {
        drv_path: path("quick"),
        system: "x86_64-linux".into(),
        required_features: vec![],
        inputs: vec![],
        needs_resolution: false,
    };
    let build = |id: BuildId| Build {
        id,
        drv_path: path("quick"),
        jobset_id: 1,
        project: "p".into(),
        jobset: "j".into(),
        job: "quick".into(),
        timestamp: 0,
        local_priority: 0,
        global_priority: 0,
        max_silent_secs: 60,
        timeout_secs: 60,
    };
    let planned = Instant::now();
    // Build 1 loads the step, which runs and succeeds...
    let first = LoadPlan {
        new_steps: vec![new_step()],
        planned_at: Some(planned),
        ..LoadPlan::default()
    };
    state.build_loaded(build(1), first, planned).unwrap();
    let (id, _) = state
        .read(|v| {
            v.graph
                .runnable()
                .next()
                .map(|(id, s)| (id, s.drv_path.clone()))
        })
        .unwrap();
    state.step_succeeded(id, None, planned).unwrap();
    // ...before build 2's plan, made at the same time, is inserted.
    let second = LoadPlan {
        new_steps: vec![new_step()],
        planned_at: Some(planned),
        ..LoadPlan::default()
    };
    let stale = state.build_loaded(build(2), second, Instant::now());
    assert!(matches!(stale, Err(InsertError::Vanished(_))), "{stale:?}");
    assert_eq!(state.queue_counts().runnable, 0, "nothing to build twice");
}

#[test]
fn an_attempt_whose_input_was_aborted_while_it_was_persisted_is_withdrawn_not_sent() {
    let (runner, conn) = one_build_on_m(false);
    let inputs = started_on_m(&runner.state);
    assert_eq!(inputs.len(), 2, "b1-dep and shared");
    for a in &inputs {
        runner.state.attempt_built(&a.to_string(), &conn);
    }
    let round = runner
        .state
        .plan_round(&RunnerConfig::default(), Instant::now());
    let [top] = &round.assignments[..] else {
        panic!("b1-top runs ahead: {:?}", round.assignments);
    };
    assert!(top.ahead && top.drv_path == path("b1-top"));
    // An input's upload is refused before the top's attempt is recorded.
    let dep = runner.state.take_attempt_by_id(&inputs[0]).unwrap();
    runner.abort(dep);
    runner.state.attempt_started(attempt_of(top)).unwrap();
    let id = top.attempt.to_string();
    assert!(runner.state.is_withdrawn(&id, &conn));
    runner.withdraw(vec![top.attempt]);
    runner.state.check().unwrap();
    assert_waits_with_nothing_counted(&runner.state, "b1-top");
    assert_eq!(
        runner.state.queue_counts().running,
        1,
        "the other input runs on"
    );
}

#[test]
fn only_the_connection_that_owns_an_attempt_can_say_it_is_built() {
    let state = loaded(1);
    let mut m = machine("m", "m");
    m.max_jobs = 3;
    let conn = m.connection.clone();
    state.machine_joined(m, &[], || {}).unwrap();
    let inputs = started_on_m(&state);
    for a in &inputs {
        state.attempt_built(&a.to_string(), "another-connection");
        state.attempt_built("not\0an attempt", &conn);
    }
    let round = state.plan_round(&RunnerConfig::default(), Instant::now());
    assert!(
        round.assignments.is_empty(),
        "nothing runs ahead on a claim not the owner's"
    );
    for a in &inputs {
        state.attempt_built(&a.to_string(), &conn);
    }
    let round = state.plan_round(&RunnerConfig::default(), Instant::now());
    assert_eq!(round.assignments.len(), 1, "the owner's word counts");
    state.check().unwrap();
}

#[test]
fn a_dependent_is_sent_ahead_of_inputs_still_building_only_to_a_machine_that_follows_them() {
    let (runner, _) = one_build_on_m(true);
    let inputs = started_on_m(&runner.state);
    assert_eq!(inputs.len(), 2, "b1-dep and shared");
    // Neither input has built: the top goes to the same machine, to start
    // after both.
    let round = runner.state.plan_round(&runner.config, Instant::now());
    let [top] = &round.assignments[..] else {
        panic!("b1-top is sent ahead: {:?}", round.assignments);
    };
    assert!(top.ahead && top.drv_path == path("b1-top"));
    let mut after = inputs.clone();
    after.sort();
    assert_eq!(top.after, after, "the job names the local jobs it follows");
    runner.state.attempt_started(attempt_of(top)).unwrap();
    runner.state.check().unwrap();
    let conn = top.connection.clone();
    let id = top.attempt.to_string();
    assert_eq!(
        runner.state.verification(&id, &conn),
        Err(()),
        "its result waits for its inputs"
    );
    // One input is aborted: the top is withdrawn, nothing counted.
    let aborted = runner.state.take_attempt_by_id(&inputs[0]).unwrap();
    runner.abort(aborted);
    runner.state.check().unwrap();
    assert_waits_with_nothing_counted(&runner.state, "b1-top");
}

#[test]
fn a_built_attempt_sending_its_outputs_frees_its_build_slot_but_still_runs() {
    let state = loaded(2);
    let mut m = machine("m", "m");
    m.max_jobs = 1;
    let conn = m.connection.clone();
    state.machine_joined(m, &[], || {}).unwrap();
    let first = started_on_m(&state);
    assert_eq!(first.len(), 1);
    let round = state.plan_round(&RunnerConfig::default(), Instant::now());
    assert!(round.assignments.is_empty(), "the one slot builds");
    state.attempt_built(&first[0].to_string(), &conn);
    let round = state.plan_round(&RunnerConfig::default(), Instant::now());
    assert_eq!(round.assignments.len(), 1, "the slot builds the next step");
    state
        .attempt_started(attempt_of(&round.assignments[0]))
        .unwrap();
    state.check().unwrap();
    let (running, building) = state.read(|v| {
        let m = v.machines.get("m").unwrap();
        (m.running.len(), m.building())
    });
    assert_eq!((running, building), (2, 1), "one uploads, one builds");
    let round = state.plan_round(&RunnerConfig::default(), Instant::now());
    assert!(round.assignments.is_empty(), "no more than max_jobs build");
}
