//! One step (one derivation to build) and its life cycle.
//!
//! The life cycle is this state machine and nothing else changes a step's
//! state: every transition is a named method that checks where the step is.
//!
//! ```text
//!   Waiting ──inputs_built──▶ Runnable ──dispatched──▶ Running ──built──▶ Running, built
//!      │  ▲                     ▲  │                     │
//!      │  │ inputs_built_ahead  │  └─finished_unbuilt─┐  ├─requeued──▶ Runnable (after backoff)
//!      │  └─(ahead: on one ─────┤                     │  │             or Waiting (it ran ahead)
//!      │     machine only)      │                     │  ├─withdrawn─▶ Waiting (ran ahead of an
//!      │ inputs_built           │                     │  │             input that was requeued)
//!      │ (CA: must resolve)     └─────────────────────┼──┤
//!      ▼                                              ▼  ├─attempt_finished─▶ Finished
//!   Resolving ──replaced / finished_unbuilt──────▶ Finished
//! ```
//!
//! A dependent may run *ahead* of its inputs' verification: once every
//! input it waits for is built on one machine (`built`: the builder said
//! so, its outputs are on their way to the runner), or runs there and the
//! machine's builder starts a job after the local jobs it names (the job
//! then names them), it becomes runnable there and only there
//! (`inputs_built_ahead`, [`Ahead::On`]), and its result is held until
//! those inputs succeed (`inputs_verified`; until then `attempt_finished`
//! refuses). Should one of them be requeued
//! instead, a runnable dependent waits again, and a running one is marked
//! [`Ahead::Broken`] (`input_withdrawn`) and then withdrawn (`withdrawn`),
//! with nothing counted against it, since nothing of its own failed.
//!
//! A step whose derivation depends on floating content-addressed outputs
//! (or has deferred outputs) is never dispatched as it is: once its inputs
//! are built it waits in `Resolving` for the resolver, which replaces it by
//! the resolved derivation's step (`replaced`), or finishes it outright
//! when the resolved outputs are known already (early cutoff) or it cannot
//! be resolved. A finished step leaves the graph; dependents learn of it
//! through the graph.

use std::collections::HashSet;
use std::time::Instant;

use hydra_nix::StorePath;
use thiserror::Error;
use uuid::Uuid;

use super::{BuildId, StepId};

/// Where a step is in its life cycle.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StepState {
    /// Some input derivations are not built yet.
    Waiting,
    /// Every input is built; the step waits in its system's queue, not
    /// before `not_before` when it is backing off after an aborted attempt.
    Runnable {
        since: Instant,
        not_before: Option<Instant>,
    },
    /// Every input is built, but the derivation must be resolved before a
    /// builder may see it.
    Resolving,
    /// Sent to a machine as `attempt`; `built` once the machine said the
    /// build succeeded and its outputs are on their way (dependents may
    /// then run ahead there).
    Running {
        attempt: Uuid,
        machine: String,
        built: bool,
    },
    /// Built or failed; about to leave the graph.
    Finished,
}

/// Whether a runnable or running step is ahead of its inputs'
/// verification (see the module's head).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub enum Ahead {
    /// Its inputs are verified (or it waits for them).
    #[default]
    No,
    /// Every input it still waits for is built on this machine, not yet
    /// verified, or builds there (the machine starts the job after them):
    /// only that machine may run it (it holds them), and its result waits
    /// for them.
    On(String),
    /// An input it ran ahead of was requeued: its attempt is withdrawn,
    /// and its result never counts.
    Broken,
}

/// A transition that the step's state does not allow: a logic error in the
/// caller (a report for a step that is not running, say), never applied.
#[derive(Debug, Error, PartialEq, Eq)]
#[error("step {drv}: cannot {transition} while {state}")]
pub struct TransitionError {
    pub drv: String,
    pub transition: &'static str,
    pub state: &'static str,
}

/// The scheduling facts of a step, merged from every build that needs it.
/// Each only grows (or, for the build id, shrinks), so merging a build into
/// a step whose facts do not change need not go further down.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SchedFacts {
    pub global_priority: i32,
    pub local_priority: i32,
    pub lowest_build_id: BuildId,
    /// Jobsets of the builds that need the step (for fair share).
    pub jobsets: Vec<i32>,
    /// Length of the longest chain of unfinished steps that wait for this one.
    pub critical_path: u32,
    /// Limits: the largest over the builds that need the step, so a shared
    /// dependency does not inherit a small test's timeout.
    pub max_silent_secs: u32,
    pub timeout_secs: u32,
}

impl SchedFacts {
    pub fn none() -> SchedFacts {
        SchedFacts {
            global_priority: i32::MIN,
            local_priority: i32::MIN,
            lowest_build_id: BuildId::MAX,
            jobsets: Vec::new(),
            critical_path: 0,
            max_silent_secs: 0,
            timeout_secs: 0,
        }
    }

    /// Merges `other` in; true when anything changed.
    pub fn merge(&mut self, other: &SchedFacts) -> bool {
        let before = self.clone();
        self.global_priority = self.global_priority.max(other.global_priority);
        self.local_priority = self.local_priority.max(other.local_priority);
        self.lowest_build_id = self.lowest_build_id.min(other.lowest_build_id);
        for j in &other.jobsets {
            if !self.jobsets.contains(j) {
                self.jobsets.push(*j);
            }
        }
        self.critical_path = self.critical_path.max(other.critical_path);
        self.max_silent_secs = self.max_silent_secs.max(other.max_silent_secs);
        self.timeout_secs = self.timeout_secs.max(other.timeout_secs);
        *self != before
    }
}

/// A derivation to build, shared by every build that needs it. Kept small:
/// scheduling facts only; the `.drv` is re-read when the step is dispatched.
#[derive(Debug)]
pub struct Step {
    pub drv_path: StorePath,
    pub system: String,
    pub required_features: Vec<String>,
    pub state: StepState,
    /// Input steps not built yet.
    pub deps: HashSet<StepId>,
    /// Steps waiting for this one.
    pub rdeps: HashSet<StepId>,
    /// Builds whose top-level derivation this is.
    pub toplevel_of: Vec<BuildId>,
    pub sched: SchedFacts,
    /// Aborted attempts so far (infrastructure failures).
    pub aborted_attempts: u32,
    /// Machines those attempts ran on: a retry prefers another.
    pub failed_on: Vec<String>,
    /// Since when no connected machine could build the step.
    pub unsupported_since: Option<Instant>,
    /// Machines that built this step's inputs while this runner ran, with
    /// how many each: placement prefers the one holding most, since a
    /// builder that has an input in its store need not fetch it.
    pub inputs_on: Vec<(String, u32)>,
    /// The derivation depends on floating CA outputs (or has deferred
    /// outputs): it is resolved, never built as it is.
    pub needs_resolution: bool,
    /// Derivations that resolved to this one: their builds and dependents
    /// moved here, and they get this step's outputs as their realisations.
    pub resolved_from: Vec<StorePath>,
    /// Whether it runs ahead of its inputs' verification.
    pub ahead: Ahead,
    /// Its kind (system and features) as the graph's queue numbers it.
    pub kind: super::KindId,
}

impl Step {
    pub fn new(drv_path: StorePath, system: String, required_features: Vec<String>) -> Step {
        Step {
            drv_path,
            system,
            required_features,
            state: StepState::Waiting,
            deps: HashSet::new(),
            rdeps: HashSet::new(),
            toplevel_of: Vec::new(),
            sched: SchedFacts::none(),
            aborted_attempts: 0,
            failed_on: Vec::new(),
            unsupported_since: None,
            inputs_on: Vec::new(),
            needs_resolution: false,
            resolved_from: Vec::new(),
            ahead: Ahead::No,
            kind: 0,
        }
    }

    pub fn is_runnable(&self) -> bool {
        matches!(self.state, StepState::Runnable { .. })
    }

    /// The attempt running this step, if it runs.
    pub fn running_attempt(&self) -> Option<(&Uuid, &str)> {
        match &self.state {
            StepState::Running {
                attempt, machine, ..
            } => Some((attempt, machine)),
            _ => None,
        }
    }

    /// The machine that built the step, while its outputs are on their way
    /// (and its result may still count).
    pub fn built_on(&self) -> Option<&str> {
        match &self.state {
            StepState::Running {
                machine,
                built: true,
                ..
            } if self.ahead != Ahead::Broken => Some(machine),
            _ => None,
        }
    }

    /// The machine the step must run on, when it runs ahead of its inputs.
    pub fn only_on(&self) -> Option<&str> {
        match &self.ahead {
            Ahead::On(m) => Some(m),
            _ => None,
        }
    }

    /// Since when the step waits for a machine (after a backoff, from its
    /// end): the start of its dispatch latency.
    pub fn runnable_since(&self, now: Instant) -> Instant {
        match self.state {
            StepState::Runnable { since, not_before } => not_before.map_or(since, |t| t.max(since)),
            _ => now,
        }
    }

    /// One of the step's inputs was built on `machine`.
    pub fn input_built_on(&mut self, machine: &str) {
        match self.inputs_on.iter_mut().find(|(m, _)| m == machine) {
            Some((_, n)) => *n += 1,
            None => self.inputs_on.push((machine.to_owned(), 1)),
        }
    }

    pub fn is_resolving(&self) -> bool {
        self.state == StepState::Resolving
    }

    /// Waiting -> Runnable, once the last input is built; Waiting ->
    /// Resolving instead when the derivation must be resolved first.
    pub fn inputs_built(&mut self, now: Instant) -> Result<(), TransitionError> {
        match self.state {
            StepState::Waiting if self.deps.is_empty() => {
                self.state = if self.needs_resolution {
                    StepState::Resolving
                } else {
                    StepState::Runnable {
                        since: now,
                        not_before: None,
                    }
                };
                Ok(())
            }
            _ => Err(self.refuse("become runnable")),
        }
    }

    /// Waiting -> Runnable on `machine` only: every input it waits for is
    /// built there, not yet verified, or builds there on a machine that
    /// starts the job after it. Never for a step to resolve (that needs its
    /// inputs' recorded outputs).
    pub fn inputs_built_ahead(
        &mut self,
        machine: &str,
        now: Instant,
    ) -> Result<(), TransitionError> {
        match self.state {
            StepState::Waiting if !self.needs_resolution && !self.deps.is_empty() => {
                self.state = StepState::Runnable {
                    since: now,
                    not_before: None,
                };
                self.ahead = Ahead::On(machine.to_owned());
                Ok(())
            }
            _ => Err(self.refuse("run ahead of its inputs")),
        }
    }

    /// The last input it ran ahead of succeeded: the step is an ordinary
    /// runnable or running one, and its result may be recorded.
    pub fn inputs_verified(&mut self) {
        if self.deps.is_empty() && matches!(self.ahead, Ahead::On(_)) {
            self.ahead = Ahead::No;
        }
    }

    /// An input it ran ahead of is built no longer (requeued, withdrawn):
    /// Runnable -> Waiting; a running step's attempt is to be withdrawn
    /// (returned). Nothing for a step that is not ahead.
    pub fn input_withdrawn(&mut self) -> Option<Uuid> {
        if !matches!(self.ahead, Ahead::On(_)) {
            return None;
        }
        match &self.state {
            StepState::Runnable { .. } => {
                self.state = StepState::Waiting;
                self.ahead = Ahead::No;
                None
            }
            StepState::Running { attempt, .. } => {
                let attempt = *attempt;
                self.ahead = Ahead::Broken;
                Some(attempt)
            }
            _ => None,
        }
    }

    /// Running (broken ahead) -> Waiting, or Runnable if its inputs were
    /// built again meanwhile: the attempt was withdrawn; nothing is
    /// counted against the step or its machine.
    pub fn withdrawn(&mut self, attempt: &Uuid, now: Instant) -> Result<(), TransitionError> {
        match &self.state {
            StepState::Running { attempt: a, .. }
                if a == attempt && self.ahead == Ahead::Broken =>
            {
                self.back_to_queue(now, None);
                Ok(())
            }
            _ => Err(self.refuse("be withdrawn")),
        }
    }

    /// After an attempt that did not build it: Runnable when nothing is
    /// left to wait for, Waiting otherwise (it had run ahead).
    fn back_to_queue(&mut self, now: Instant, not_before: Option<Instant>) {
        self.ahead = Ahead::No;
        self.state = if self.deps.is_empty() {
            StepState::Runnable {
                since: now,
                not_before,
            }
        } else {
            StepState::Waiting
        };
    }

    /// Running -> Running, built: the machine built the step and sends its
    /// outputs. Returns whether this is news (a builder says it again when
    /// it delivers again).
    pub fn built(&mut self, attempt: &Uuid) -> Result<bool, TransitionError> {
        match &mut self.state {
            StepState::Running {
                attempt: a, built, ..
            } if a == attempt => Ok(!std::mem::replace(built, true)),
            _ => Err(self.refuse("be built by an attempt it does not run")),
        }
    }

    /// Resolving -> Finished: the resolved derivation's step takes over
    /// this one's builds and dependents.
    pub fn replaced(&mut self) -> Result<(), TransitionError> {
        match self.state {
            StepState::Resolving => {
                self.state = StepState::Finished;
                Ok(())
            }
            _ => Err(self.refuse("be replaced by its resolved derivation")),
        }
    }

    /// Runnable -> Running on `machine` as `attempt`.
    pub fn dispatched(&mut self, attempt: Uuid, machine: &str) -> Result<(), TransitionError> {
        match self.state {
            StepState::Runnable { .. } => {
                self.state = StepState::Running {
                    attempt,
                    machine: machine.to_owned(),
                    built: false,
                };
                Ok(())
            }
            _ => Err(self.refuse("be dispatched")),
        }
    }

    /// Running -> Runnable: `attempt` was aborted (an infrastructure fault,
    /// never a build failure); dispatch again, not before `not_before`
    /// (Waiting instead, if it had run ahead of inputs not verified yet).
    pub fn requeued(
        &mut self,
        attempt: &Uuid,
        now: Instant,
        not_before: Option<Instant>,
    ) -> Result<(), TransitionError> {
        match &self.state {
            StepState::Running {
                attempt: a,
                machine,
                ..
            } if a == attempt => {
                self.aborted_attempts += 1;
                if !self.failed_on.contains(machine) {
                    self.failed_on.push(machine.clone());
                }
                self.back_to_queue(now, not_before);
                Ok(())
            }
            _ => Err(self.refuse("be requeued")),
        }
    }

    /// Running -> Runnable: `attempt` never started (its build left before
    /// it was recorded); nothing failed, so nothing is counted.
    pub fn not_started(
        &mut self,
        attempt: &Uuid,
        now: Instant,
        not_before: Option<Instant>,
    ) -> Result<(), TransitionError> {
        match &self.state {
            StepState::Running { attempt: a, .. } if a == attempt => {
                self.back_to_queue(now, not_before);
                Ok(())
            }
            _ => Err(self.refuse("be put back unstarted")),
        }
    }

    /// Running -> Finished: `attempt` built the step, or failed permanently
    /// (never while it is ahead of inputs not verified).
    pub fn attempt_finished(&mut self, attempt: &Uuid) -> Result<(), TransitionError> {
        match &self.state {
            StepState::Running { attempt: a, .. } if a == attempt && self.ahead == Ahead::No => {
                self.state = StepState::Finished;
                Ok(())
            }
            _ => Err(self.refuse("finish an attempt it does not run")),
        }
    }

    /// Waiting, Runnable or Resolving -> Finished without an attempt:
    /// failed before dispatch (no machine supports it, it cannot be
    /// resolved), or its resolved outputs are known already (early cutoff).
    pub fn finished_unbuilt(&mut self) -> Result<(), TransitionError> {
        match self.state {
            StepState::Runnable { .. } | StepState::Waiting | StepState::Resolving => {
                self.state = StepState::Finished;
                Ok(())
            }
            _ => Err(self.refuse("finish without an attempt")),
        }
    }

    fn refuse(&self, transition: &'static str) -> TransitionError {
        TransitionError {
            drv: self.drv_path.to_string(),
            transition,
            state: match self.state {
                StepState::Waiting => "waiting for inputs",
                StepState::Runnable { .. } => "runnable",
                StepState::Resolving => "resolving",
                StepState::Running { .. } => "running",
                StepState::Finished => "finished",
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn step() -> Step {
        Step::new(
            StorePath::from_base_name("7rjj86a15146cq1d3qy068lml7n8ykzm-hello.drv").unwrap(),
            "x86_64-linux".into(),
            vec![],
        )
    }

    #[test]
    fn a_step_with_unbuilt_inputs_is_not_runnable() {
        let mut s = step();
        s.deps.insert(1);
        assert!(s.inputs_built(Instant::now()).is_err());
        s.deps.clear();
        s.inputs_built(Instant::now()).unwrap();
        assert!(s.is_runnable());
    }

    #[test]
    fn only_a_runnable_step_is_dispatched() {
        let mut s = step();
        let err = s.dispatched(Uuid::new_v4(), "m1").unwrap_err();
        assert_eq!(err.state, "waiting for inputs");
        s.inputs_built(Instant::now()).unwrap();
        let a = Uuid::new_v4();
        s.dispatched(a, "m1").unwrap();
        assert_eq!(s.running_attempt(), Some((&a, "m1")));
        assert!(s.dispatched(Uuid::new_v4(), "m2").is_err());
    }

    #[test]
    fn a_requeued_step_is_runnable_again_and_counts_the_abort() {
        let mut s = step();
        s.inputs_built(Instant::now()).unwrap();
        let a = Uuid::new_v4();
        s.dispatched(a, "m1").unwrap();
        let later = Instant::now() + std::time::Duration::from_secs(5);
        s.requeued(&a, Instant::now(), Some(later)).unwrap();
        assert!(matches!(s.state, StepState::Runnable { not_before: Some(t), .. } if t == later));
        assert_eq!(s.aborted_attempts, 1);
        assert_eq!(s.failed_on, ["m1"], "a retry prefers another machine");
    }

    #[test]
    fn only_the_owning_attempt_finishes_or_requeues_a_step() {
        let mut s = step();
        s.inputs_built(Instant::now()).unwrap();
        let a = Uuid::new_v4();
        s.dispatched(a, "m1").unwrap();
        let stale = Uuid::new_v4();
        assert!(s.attempt_finished(&stale).is_err());
        assert!(s.requeued(&stale, Instant::now(), None).is_err());
        s.attempt_finished(&a).unwrap();
        assert_eq!(s.state, StepState::Finished);
        assert!(s.attempt_finished(&a).is_err());
    }

    #[test]
    fn an_attempt_that_never_started_is_not_counted() {
        let mut s = step();
        s.inputs_built(Instant::now()).unwrap();
        let a = Uuid::new_v4();
        s.dispatched(a, "m1").unwrap();
        assert!(
            s.not_started(&Uuid::new_v4(), Instant::now(), None)
                .is_err()
        );
        s.not_started(&a, Instant::now(), None).unwrap();
        assert!(s.is_runnable());
        assert_eq!(s.aborted_attempts, 0);
        assert!(s.failed_on.is_empty());
    }

    #[test]
    fn a_running_step_cannot_fail_without_its_attempt() {
        let mut s = step();
        s.inputs_built(Instant::now()).unwrap();
        s.dispatched(Uuid::new_v4(), "m1").unwrap();
        assert!(s.finished_unbuilt().is_err());
    }

    #[test]
    fn a_step_that_needs_resolution_is_resolved_not_dispatched() {
        let mut s = step();
        s.needs_resolution = true;
        s.inputs_built(Instant::now()).unwrap();
        assert!(s.is_resolving());
        assert!(!s.is_runnable());
        let err = s.dispatched(Uuid::new_v4(), "m1").unwrap_err();
        assert_eq!(err.state, "resolving");
        s.replaced().unwrap();
        assert_eq!(s.state, StepState::Finished);
        assert!(s.replaced().is_err());
    }

    #[test]
    fn only_a_resolving_step_is_replaced() {
        let mut s = step();
        assert!(s.replaced().is_err(), "inputs not built yet");
        s.inputs_built(Instant::now()).unwrap();
        assert!(
            s.replaced().is_err(),
            "runnable steps are built as they are"
        );
    }

    #[test]
    fn a_resolving_step_can_finish_without_an_attempt() {
        let mut s = step();
        s.needs_resolution = true;
        s.inputs_built(Instant::now()).unwrap();
        s.finished_unbuilt().unwrap();
        assert_eq!(s.state, StepState::Finished);
    }

    #[test]
    fn merging_facts_reports_change_only_when_something_grows() {
        let mut f = SchedFacts::none();
        let build = SchedFacts {
            global_priority: 0,
            local_priority: 5,
            lowest_build_id: 7,
            jobsets: vec![1],
            critical_path: 2,
            max_silent_secs: 3600,
            timeout_secs: 36000,
        };
        assert!(f.merge(&build));
        assert!(!f.merge(&build));
        let smaller = SchedFacts {
            local_priority: 1,
            lowest_build_id: 9,
            ..build.clone()
        };
        assert!(!f.merge(&smaller));
        assert_eq!(f.lowest_build_id, 7);
        assert!(f.merge(&SchedFacts {
            jobsets: vec![2],
            ..build
        }));
        assert_eq!(f.jobsets, vec![1, 2]);
    }
}
