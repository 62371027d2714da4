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
        load1: 0.0,
        free_disk: None,
        substituter_timeouts: 0,
        link: BuilderLink::detached(),
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
    }
}

#[derive(Debug, Clone)]
enum Event {
    Round { persist: Vec<bool> },
    Abort(usize),
    Succeed(usize),
    Fail(usize),
    MachineLeft(usize),
    MachineRejoined(usize),
    BuildRemoved(i32, bool),
}

fn event() -> impl Strategy<Value = Event> {
    prop_oneof![
        3 => proptest::collection::vec(proptest::bool::weighted(0.9), 0..6)
            .prop_map(|persist| Event::Round { persist }),
        2 => any::<usize>().prop_map(Event::Abort),
        3 => any::<usize>().prop_map(Event::Succeed),
        1 => any::<usize>().prop_map(Event::Fail),
        1 => (0..2usize).prop_map(Event::MachineLeft),
        1 => (0..2usize).prop_map(Event::MachineRejoined),
        1 => (1..=4i32, any::<bool>()).prop_map(|(b, soft)| Event::BuildRemoved(b, soft)),
    ]
}

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
        self.state.attempt_requeued(&a, Duration::ZERO, 1000);
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
            Event::Succeed(i) => {
                if let Some(a) = pick(*i).and_then(|id| self.state.take_attempt_by_id(&id)) {
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
                if let Some(a) = pick(*i).and_then(|id| self.state.take_attempt_by_id(&id)) {
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
                    for a in self.state.machine_left(name, &connection, Instant::now()) {
                        self.abort(a);
                    }
                }
            }
            Event::MachineRejoined(m) => {
                let name = self.names[*m];
                let lost = self
                    .state
                    .machine_joined(machine(name, name), || {})
                    .unwrap();
                for a in lost {
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
            runner.state.machine_joined(machine(name, name), || {}).unwrap();
        }
        for (n, e) in events.iter().enumerate() {
            runner.apply(e);
            if let Err(broken) = runner.state.check() {
                prop_assert!(false, "after event {n} ({e:?}): {broken}");
            }
        }
    }
}

#[test]
fn a_machine_that_left_gets_no_attempt_started_on_it() {
    let state = loaded(1);
    state.machine_joined(machine("m", "m"), || {}).unwrap();
    let round = state.plan_round(&RunnerConfig::default(), Instant::now());
    assert!(!round.assignments.is_empty());
    let a = &round.assignments[0];
    let connection = a.connection.clone();
    let lost = state.machine_left("m", &connection, Instant::now());
    assert!(lost.is_empty(), "the attempt was not started yet");
    let back = state.attempt_started(attempt_of(a)).unwrap_err();
    assert_eq!(back.id, a.attempt, "handed back for the caller to abort");
}

#[test]
fn another_process_cannot_take_a_connected_machines_name() {
    let state = loaded(1);
    state.machine_joined(machine("m", "one"), || {}).unwrap();
    let mut joined = false;
    let refused = state.machine_joined(machine("m", "two"), || joined = true);
    assert!(refused.is_err());
    assert!(!joined, "nothing is queued for a refused builder");
}
