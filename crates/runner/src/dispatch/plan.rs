//! Dispatch planning: which runnable steps go to which machines, as a
//! pure function of the graph, the machines, the shares and the policy.
//! [`crate::state::State::plan_round`] applies what it decides.
//!
//! The brief's rules: steps in the order of [`super::order::OrderKey`]
//! (global priority with aging, jobset fair share, critical path, local
//! priority, lowest build id); each to the fastest, least loaded machine
//! that supports its system and features, is neither resting nor drained,
//! has disk, and preferably has not failed it before and holds the most
//! of its inputs (built there). A step no machine
//! supports (connected, or away for less than `machine_memory_secs`) is
//! set aside before sorting, and fails as unsupported after
//! `max_unsupported_secs`, unless no machine is connected at all (an
//! outage fails nothing).

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use hydra_nix::StorePath;
use uuid::Uuid;

use super::order::{OrderKey, Shares, aging_bonus};
use crate::config::RunnerConfig;
use crate::graph::{Build, Graph, KindCheck, SchedFacts, StepId, StepState};
use crate::state::machines::{Machines, NoMachine};
use crate::tunnel::BuilderLink;

/// The settings planning depends on.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    pub max_unsupported: Duration,
    pub priority_aging_secs: u64,
    pub min_free_disk: u64,
}

impl Policy {
    pub fn of(config: &RunnerConfig) -> Policy {
        Policy {
            max_unsupported: Duration::from_secs(config.max_unsupported_secs),
            priority_aging_secs: config.priority_aging_secs,
            min_free_disk: config.min_free_disk,
        }
    }
}

/// What planning decided.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Decided {
    /// Steps and the machine each goes to, in dispatch order.
    pub assignments: Vec<(StepId, String)>,
    /// Runnable steps no machine supported for too long: they fail.
    pub unsupported: Vec<StepId>,
    /// Steps found unsupported now (the time is noted on them).
    pub newly_unsupported: Vec<StepId>,
    /// Steps that had been unsupported and are supported again.
    pub supported_again: Vec<StepId>,
    /// What the round learnt of each kind it looked at: whether later
    /// rounds may pass over it, until when, while it is unchanged, and
    /// whether its steps carry unsupported-since marks.
    pub kinds: Vec<KindCheck>,
    /// When to plan again without a wake-up (a backoff ends, a rest ends,
    /// a step has been unsupported long enough).
    pub next_deadline: Option<Instant>,
}

/// A step given to a machine, before it is persisted and sent.
#[derive(Debug)]
pub struct Assignment {
    pub step: StepId,
    pub drv_path: StorePath,
    pub system: String,
    pub attempt: Uuid,
    pub machine: String,
    pub connection: String,
    pub link: BuilderLink,
    /// The build whose BuildSteps records the attempt.
    pub owner: Build,
    /// When the step became runnable (for the dispatch latency).
    pub runnable_since: Instant,
    /// Every live build that needs the step (for its events).
    pub builds: Vec<crate::graph::BuildId>,
    pub facts: SchedFacts,
    /// It runs ahead of inputs the machine built and the runner's store
    /// does not hold yet: the job names them, and the builder has them.
    pub ahead: bool,
    /// Attempts on the same machine building inputs that have not built
    /// yet: the builder starts the job after them.
    pub after: Vec<Uuid>,
}

/// What one round does.
#[derive(Debug, Default)]
pub struct Round {
    pub assignments: Vec<Assignment>,
    /// Runnable steps no machine supported for too long.
    pub unsupported: Vec<StepId>,
    /// When the next round is due without a wake-up.
    pub next_deadline: Option<Instant>,
    /// Inherited attempts taken up for steps that became runnable: their
    /// builders are to be told.
    pub adoptions: Vec<crate::state::Adoption>,
}

impl Round {
    /// The next round is due at `t` at the latest.
    pub fn due(&mut self, t: Instant) {
        earliest(&mut self.next_deadline, t);
    }
}

/// Keeps in `at` the earlier of it and `t`.
fn earliest(at: &mut Option<Instant>, t: Instant) {
    *at = Some(at.map_or(t, |a| a.min(t)));
}

impl Decided {
    /// Writes what the round noted onto the graph's steps and kinds (when
    /// steps were first found unsupported, those supported again, which
    /// kinds later rounds may pass over).
    pub fn note_on(&self, graph: &mut Graph, now: Instant) {
        for id in &self.newly_unsupported {
            graph.set_unsupported_since(*id, Some(now));
        }
        for id in &self.supported_again {
            graph.set_unsupported_since(*id, None);
        }
        for check in &self.kinds {
            graph.kind_checked(check);
        }
    }

    fn due(&mut self, t: Instant) {
        earliest(&mut self.next_deadline, t);
    }
}

/// A runnable step in the round's queue: the greatest goes first (steps
/// that could build at once before those sent ahead of inputs that are
/// still building, which would hold a slot while they wait; then by
/// [`OrderKey::dispatch_order`], then the step id, so equal keys go in
/// a fixed order).
struct Queued {
    can_build_now: bool,
    key: OrderKey,
    id: StepId,
}

impl Ord for Queued {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.can_build_now
            .cmp(&other.can_build_now)
            .then(other.key.dispatch_order(&self.key))
            .then(other.id.cmp(&self.id))
    }
}

impl PartialOrd for Queued {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl PartialEq for Queued {
    fn eq(&self, other: &Self) -> bool {
        self.cmp(other).is_eq()
    }
}

impl Eq for Queued {}

/// A kind of step, as machines see it: its system and required features.
type Kind<'a> = (&'a str, &'a [String]);

/// Decides which runnable steps go where (see the module's head).
pub fn plan(
    graph: &Graph,
    machines: &Machines,
    shares: &Shares,
    policy: &Policy,
    now: Instant,
) -> Decided {
    let mut out = Decided::default();
    // Runnable steps come by kind: whether any machine supports a kind is
    // asked once, a kind no machine supports is set aside before sorting
    // (a queue full of them must not slow every round; one whose steps are
    // all noted already is passed over whole), and which kinds have no
    // free machine is remembered for the rest of the round.
    let outage = machines.is_empty();
    let mut free: u32 = machines.connected().map(|m| m.free_slots()).sum();
    let mut queue: Vec<Queued> = Vec::new();
    for (kind, bucket) in graph.runnable_kinds() {
        let any = machines.supports_any(&bucket.system, &bucket.features);
        if !any && outage {
            continue;
        }
        if !any && let Some(until) = bucket.quiet_until(now) {
            out.due(until);
            continue;
        }
        // With no free slot, a supported kind matters only for the marks
        // of its steps from when it was not supported.
        if any && free == 0 && !bucket.marked {
            continue;
        }
        // When the kind must be looked at again: a step fails as
        // unsupported, or a backoff ends (that step is noted then).
        let mut next_look: Option<Instant> = None;
        let mut failing = false;
        for id in &bucket.steps {
            let id = *id;
            let step = graph.step(id).expect("runnable step");
            // Noted here, not where the step is given a machine: a round
            // ends once every free slot is promised.
            if any && step.unsupported_since.is_some() {
                out.supported_again.push(id);
            }
            match step.state {
                StepState::Runnable {
                    not_before: Some(t),
                    ..
                } if t > now => {
                    out.due(t);
                    earliest(&mut next_look, t);
                }
                _ if !any => {
                    let since = step.unsupported_since.unwrap_or(now);
                    if step.unsupported_since.is_none() {
                        out.newly_unsupported.push(id);
                    }
                    let fails_at = since + policy.max_unsupported;
                    if now >= fails_at {
                        out.unsupported.push(id);
                        failing = true;
                    } else {
                        out.due(fails_at);
                        earliest(&mut next_look, fails_at);
                    }
                }
                _ if free == 0 => {}
                StepState::Runnable { since, .. } => {
                    let waited = now.saturating_duration_since(since);
                    let bonus = aging_bonus(waited, policy.priority_aging_secs);
                    queue.push(Queued {
                        can_build_now: !graph.follows_unbuilt(id),
                        key: OrderKey::new(&step.sched, shares, bonus),
                        id,
                    });
                }
                _ => queue.push(Queued {
                    can_build_now: !graph.follows_unbuilt(id),
                    key: OrderKey::new(&step.sched, shares, 0),
                    id,
                }),
            }
        }
        // An unsupported kind none of whose steps fails now can be passed
        // over until the first of them fails or ends its backoff.
        let quiet = match (any, failing, next_look) {
            (false, false, Some(t)) => Some((bucket.generation, t)),
            _ => None,
        };
        out.kinds.push(KindCheck {
            kind,
            quiet,
            marked: !any,
        });
    }
    // Taken first-first from a heap (made in linear time) until every
    // free slot is promised: a round with a long queue and few free slots
    // orders only what it dispatches.
    let mut queue = std::collections::BinaryHeap::from(queue);

    let mut full: HashSet<Kind<'_>> = HashSet::new();
    let mut planned: HashMap<String, u32> = HashMap::new();
    while free > 0
        && let Some(Queued { id, .. }) = queue.pop()
    {
        let step = graph.step(id).expect("runnable step");
        let kind = (step.system.as_str(), step.required_features.as_slice());
        // A step ahead of its inputs' verification may go only where they
        // are; its machine being busy says nothing of its kind's others.
        let only = step.only_on();
        let chosen = if full.contains(&kind) {
            Err(NoMachine::Busy)
        } else {
            machines.choose_with(
                &step.system,
                &step.required_features,
                policy.min_free_disk,
                now,
                &step.failed_on,
                &step.inputs_on,
                &planned,
                only,
            )
        };
        match chosen {
            Err(NoMachine::Unsupported | NoMachine::Busy) if only.is_some() => {}
            // No connected machine, but one that went away supports it
            // (those nobody supports were set aside before sorting): it
            // waits for that machine as for a busy one.
            Err(NoMachine::Unsupported | NoMachine::Busy) => {
                if full.insert(kind)
                    && let Some(t) = machines.next_rest_end(now)
                {
                    out.due(t);
                }
            }
            Ok(machine) => {
                *planned.entry(machine.name.clone()).or_default() += 1;
                free -= 1;
                out.assignments.push((id, machine.name.clone()));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::graph::{LoadPlan, NewStep};
    use crate::state::machines::Machine;

    fn path(name: &str) -> StorePath {
        StorePath::from_base_name(&format!("7rjj86a15146cq1d3qy068lml7n8ykzm-{name}.drv")).unwrap()
    }

    fn machine(name: &str, systems: &[&str], features: &[&str], speed: f32, jobs: u32) -> Machine {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect();
        Machine {
            name: name.into(),
            connection: format!("{name}-conn"),
            instance_id: name.into(),
            systems: s(systems),
            supported_features: s(features),
            mandatory_features: vec![],
            max_jobs: jobs,
            speed_factor: speed,
            running: Default::default(),
            uploading: Default::default(),
            load1: 0.0,
            free_disk: None,
            substituter_timeouts: 0,
            link: BuilderLink::detached(),
            follows_local_jobs: true,
        }
    }

    /// A build of one step `name` on `system`, with priorities.
    fn add(g: &mut Graph, id: i32, name: &str, system: &str, global: i32, local: i32) -> StepId {
        let build = Build {
            id,
            drv_path: path(name),
            jobset_id: 1,
            project: "p".into(),
            jobset: "j".into(),
            job: name.into(),
            timestamp: 0,
            local_priority: local,
            global_priority: global,
            max_silent_secs: 60,
            timeout_secs: 60,
        };
        let plan = LoadPlan {
            new_steps: vec![NewStep {
                drv_path: path(name),
                system: system.into(),
                required_features: vec![],
                inputs: vec![],
                needs_resolution: false,
            }],
            ..LoadPlan::default()
        };
        g.insert_build(build, plan, Instant::now()).unwrap();
        g.step_id(&path(name)).unwrap()
    }

    fn policy() -> Policy {
        Policy {
            max_unsupported: Duration::from_secs(60),
            priority_aging_secs: 0,
            min_free_disk: 0,
        }
    }

    fn names(g: &Graph, d: &Decided) -> Vec<(String, String)> {
        d.assignments
            .iter()
            .map(|(id, m)| (g.step(*id).unwrap().drv_path.name().to_owned(), m.clone()))
            .collect()
    }

    #[test]
    fn a_round_without_free_slots_assigns_nothing_yet_notes_steps_supported_again() {
        let mut g = Graph::default();
        let waiting = add(&mut g, 1, "waiting", "x86_64-linux", 0, 0);
        for i in 2..50 {
            add(&mut g, i, &format!("s{i}"), "x86_64-linux", i, 0);
        }
        g.set_unsupported_since(waiting, Some(Instant::now()));
        let mut ms = Machines::default();
        let mut busy = machine("busy", &["x86_64-linux"], &[], 1.0, 1);
        busy.running.insert(Uuid::new_v4());
        ms.register(busy).unwrap();
        let d = plan(&g, &ms, &Shares::default(), &policy(), Instant::now());
        assert!(d.assignments.is_empty());
        assert_eq!(
            d.supported_again,
            [waiting],
            "a machine supports it, though none is free"
        );
        // One slot for 49 steps: the highest priority takes it.
        ms.get_mut("busy").unwrap().running.clear();
        let d = plan(&g, &ms, &Shares::default(), &policy(), Instant::now());
        assert_eq!(names(&g, &d), [("s49.drv".into(), "busy".into())]);
    }

    #[test]
    fn the_highest_priority_steps_take_the_free_slots_fastest_machine_first() {
        let mut g = Graph::default();
        add(&mut g, 1, "low", "x86_64-linux", 0, 0);
        add(&mut g, 2, "bumped", "x86_64-linux", 10, 0);
        add(&mut g, 3, "local", "x86_64-linux", 0, 5);
        let mut ms = Machines::default();
        ms.register(machine("slow", &["x86_64-linux"], &[], 1.0, 1))
            .unwrap();
        ms.register(machine("fast", &["x86_64-linux"], &[], 4.0, 1))
            .unwrap();
        let d = plan(&g, &ms, &Shares::default(), &policy(), Instant::now());
        assert_eq!(
            names(&g, &d),
            [
                ("bumped.drv".into(), "fast".into()),
                ("local.drv".into(), "slow".into()),
            ],
            "two slots: global priority first, then local; the fastest machine first"
        );
    }

    #[test]
    fn planned_slots_count_within_a_round() {
        let mut g = Graph::default();
        for i in 0..5 {
            add(&mut g, i, &format!("s{i}"), "x86_64-linux", 0, 0);
        }
        let mut ms = Machines::default();
        ms.register(machine("m", &["x86_64-linux"], &[], 1.0, 3))
            .unwrap();
        let d = plan(&g, &ms, &Shares::default(), &policy(), Instant::now());
        assert_eq!(d.assignments.len(), 3, "three slots, three steps");
    }

    #[test]
    fn a_fairer_jobset_goes_first_at_equal_priority() {
        let mut g = Graph::default();
        let busy = add(&mut g, 1, "busy-jobset", "x86_64-linux", 0, 0);
        let _ = busy;
        let mut idle_build = g.build(1).unwrap().clone();
        idle_build.id = 2;
        idle_build.jobset_id = 2;
        idle_build.drv_path = path("idle-jobset");
        let plan_idle = LoadPlan {
            new_steps: vec![NewStep {
                drv_path: path("idle-jobset"),
                system: "x86_64-linux".into(),
                required_features: vec![],
                inputs: vec![],
                needs_resolution: false,
            }],
            ..LoadPlan::default()
        };
        g.insert_build(idle_build, plan_idle, Instant::now())
            .unwrap();
        let mut shares = Shares::default();
        shares.set_used(1, 10_000.0);
        let mut ms = Machines::default();
        ms.register(machine("m", &["x86_64-linux"], &[], 1.0, 1))
            .unwrap();
        let d = plan(&g, &ms, &shares, &policy(), Instant::now());
        assert_eq!(names(&g, &d)[0].0, "idle-jobset.drv");
    }

    #[test]
    fn an_unsupported_step_waits_then_fails_and_an_outage_fails_nothing() {
        let mut g = Graph::default();
        let arm = add(&mut g, 1, "arm", "aarch64-linux", 0, 0);
        let mut ms = Machines::default();
        let now = Instant::now();
        let outage = plan(&g, &ms, &Shares::default(), &policy(), now);
        assert!(outage.newly_unsupported.is_empty() && outage.unsupported.is_empty());
        ms.register(machine("x86", &["x86_64-linux"], &[], 1.0, 1))
            .unwrap();
        let first = plan(&g, &ms, &Shares::default(), &policy(), now);
        assert_eq!(first.newly_unsupported, vec![arm]);
        assert!(first.unsupported.is_empty());
        assert_eq!(first.next_deadline, Some(now + Duration::from_secs(60)));
        g.set_unsupported_since(arm, Some(now));
        let later = plan(
            &g,
            &ms,
            &Shares::default(),
            &policy(),
            now + Duration::from_secs(61),
        );
        assert_eq!(later.unsupported, vec![arm]);
    }

    #[test]
    fn a_step_backing_off_is_not_planned_before_its_time() {
        let mut g = Graph::default();
        let id = add(&mut g, 1, "flaky", "x86_64-linux", 0, 0);
        let now = Instant::now();
        let a = Uuid::new_v4();
        g.mark_dispatched(id, a, "m").unwrap();
        let t = now + Duration::from_secs(30);
        g.requeue(&path("flaky"), &a, now, Some(t)).unwrap();
        let mut ms = Machines::default();
        ms.register(machine("m", &["x86_64-linux"], &[], 1.0, 1))
            .unwrap();
        let d = plan(&g, &ms, &Shares::default(), &policy(), now);
        assert!(d.assignments.is_empty());
        assert_eq!(d.next_deadline, Some(t));
        let d = plan(&g, &ms, &Shares::default(), &policy(), t);
        assert_eq!(d.assignments.len(), 1);
    }

    #[test]
    fn a_required_feature_goes_only_to_a_machine_that_offers_it() {
        let mut g = Graph::default();
        let build = Build {
            id: 1,
            drv_path: path("kvm"),
            jobset_id: 1,
            project: "p".into(),
            jobset: "j".into(),
            job: "kvm".into(),
            timestamp: 0,
            local_priority: 0,
            global_priority: 0,
            max_silent_secs: 60,
            timeout_secs: 60,
        };
        let plan_kvm = LoadPlan {
            new_steps: vec![NewStep {
                drv_path: path("kvm"),
                system: "x86_64-linux".into(),
                required_features: vec!["kvm".into()],
                inputs: vec![],
                needs_resolution: false,
            }],
            ..LoadPlan::default()
        };
        g.insert_build(build, plan_kvm, Instant::now()).unwrap();
        let mut ms = Machines::default();
        ms.register(machine("plain", &["x86_64-linux"], &[], 9.0, 1))
            .unwrap();
        ms.register(machine("kvm-box", &["x86_64-linux"], &["kvm"], 1.0, 1))
            .unwrap();
        let d = plan(&g, &ms, &Shares::default(), &policy(), Instant::now());
        assert_eq!(names(&g, &d)[0].1, "kvm-box");
    }

    #[test]
    fn a_kind_no_machine_supports_is_passed_over_until_it_changes_or_its_first_step_fails() {
        let mut g = Graph::default();
        for i in 1..=100 {
            add(&mut g, i, &format!("none{i}"), "bench-none", 0, 0);
        }
        let mut ms = Machines::default();
        ms.register(machine("m", &["x86_64-linux"], &[], 1.0, 1))
            .unwrap();
        let t0 = Instant::now();
        let d = plan(&g, &ms, &Shares::default(), &policy(), t0);
        assert_eq!(d.newly_unsupported.len(), 100);
        d.note_on(&mut g, t0);

        // Nothing changed: the round passes over the kind, and knows when
        // to come back.
        let t1 = t0 + Duration::from_secs(1);
        let d = plan(&g, &ms, &Shares::default(), &policy(), t1);
        assert!(d.newly_unsupported.is_empty() && d.unsupported.is_empty());
        assert!(d.kinds.is_empty(), "the kind was not looked at");
        assert_eq!(d.next_deadline, Some(t0 + policy().max_unsupported));

        // A step joins: the kind is looked at again, the newcomer noted.
        let late = add(&mut g, 101, "none101", "bench-none", 0, 0);
        let d = plan(&g, &ms, &Shares::default(), &policy(), t1);
        assert_eq!(d.newly_unsupported, [late]);
        d.note_on(&mut g, t1);

        // Its first steps' time is up: they fail, the late one waits on.
        let t2 = t0 + policy().max_unsupported;
        let d = plan(&g, &ms, &Shares::default(), &policy(), t2);
        assert_eq!(d.unsupported.len(), 100);
        assert_eq!(d.next_deadline, Some(t1 + policy().max_unsupported));

        // A machine for the kind joins: every step is supported again.
        ms.register(machine("none", &["bench-none"], &[], 1.0, 1))
            .unwrap();
        let d = plan(&g, &ms, &Shares::default(), &policy(), t1);
        assert_eq!(d.supported_again.len(), 101);
        assert_eq!(d.assignments.len(), 1);
    }

    #[test]
    fn a_step_sent_ahead_of_an_input_still_building_takes_only_a_slot_nothing_else_wants() {
        let mut g = Graph::default();
        g.machine_follows("m", true);
        let build = Build {
            id: 1,
            drv_path: path("app"),
            jobset_id: 1,
            project: "p".into(),
            jobset: "j".into(),
            job: "app".into(),
            timestamp: 0,
            local_priority: 0,
            global_priority: 100,
            max_silent_secs: 60,
            timeout_secs: 60,
        };
        let step = |name: &str, inputs: Vec<StorePath>| NewStep {
            drv_path: path(name),
            system: "x86_64-linux".into(),
            required_features: vec![],
            inputs,
            needs_resolution: false,
        };
        let plan_of_app = LoadPlan {
            new_steps: vec![step("app", vec![path("lib")]), step("lib", vec![])],
            ..LoadPlan::default()
        };
        g.insert_build(build, plan_of_app, Instant::now()).unwrap();
        add(&mut g, 2, "other", "x86_64-linux", 0, 0);
        let lib = g.step_id(&path("lib")).unwrap();
        let a = Uuid::new_v4();
        g.mark_dispatched(lib, a, "m").unwrap();
        assert!(
            g.send_dependents_ahead(lib, Instant::now()),
            "app may follow lib on m"
        );
        let mut ms = Machines::default();
        let mut m = machine("m", &["x86_64-linux"], &[], 1.0, 2);
        m.running.insert(a);
        ms.register(m).unwrap();
        let d = plan(&g, &ms, &Shares::default(), &policy(), Instant::now());
        assert_eq!(
            names(&g, &d),
            [("other.drv".into(), "m".into())],
            "a step that can build now goes first, whatever the priorities"
        );
        ms.get_mut("m").unwrap().max_jobs = 3;
        let d = plan(&g, &ms, &Shares::default(), &policy(), Instant::now());
        assert_eq!(
            names(&g, &d),
            [
                ("other.drv".into(), "m".into()),
                ("app.drv".into(), "m".into())
            ]
        );
        assert_eq!(g.unbuilt_inputs(g.step_id(&path("app")).unwrap()), [a]);
    }
}
