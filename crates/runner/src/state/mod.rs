//! The runner's in-memory state, behind one handle: the step graph, the
//! machines, the running attempts and the jobsets' shares.
//!
//! It is the only owner of those facts. Its methods are named after what
//! happened (a build was loaded, an attempt started, a machine left, a
//! step succeeded); each keeps every record of a fact consistent (that a
//! step runs is known to the step's state, to its machine's slots and to
//! the attempts, and only these methods change any of them) and wakes the
//! dispatcher or the resolver when the event gives them work. Callers never
//! lock anything: one mutex, taken inside each method, never held across an
//! await, so there is no lock order to keep. Read-only questions that need
//! several facts at once go through [`State::read`].
//!
//! [`State::check`] states the invariants; a property test drives random
//! sequences of events through the handle and checks them after each.

mod adoption;
mod invariants;
pub mod machines;
mod views;

#[cfg(test)]
mod tests;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

use hydra_nix::StorePath;
use parking_lot::{Mutex, MutexGuard};
use tokio::sync::Notify;
use uuid::Uuid;

use crate::attempts::{Attempt, Attempts, OpenAttempt, OwnershipError};
use crate::config::RunnerConfig;
use crate::dispatch::order::Shares;
use crate::dispatch::plan::{self, Assignment, Round};
use crate::graph::{
    Build, BuildId, Dropped, Failed, Graph, InsertError, LoadPlan, NewStep, StepId, Succeeded,
    SystemSteps, TransitionError,
};
use crate::tunnel::BuilderLink;
use machines::Machines;

pub use adoption::{Adoption, Expired, Joined};
pub use views::{MachineView, QueueCounts};

/// Everything the handle owns.
#[derive(Default)]
struct Inner {
    graph: Graph,
    machines: Machines,
    attempts: Attempts,
    shares: Shares,
    /// Builds that had a step started in this process (for `build_started`).
    started_builds: HashSet<BuildId>,
    /// Attempts a runner before this one left open, by derivation, until
    /// their step is loaded (then they are attempts like any other) or
    /// their builder fails to come back in time.
    inherited: BTreeMap<StorePath, OpenAttempt>,
    /// When each derivation last succeeded here (recent ones only): a load
    /// plan made before that is stale if it would make the step again.
    succeeded: HashMap<StorePath, Instant>,
}

/// How long a success is remembered against stale load plans: far longer
/// than a plan takes.
const SUCCESS_MEMORY: Duration = Duration::from_secs(600);

impl Inner {
    fn note_succeeded(&mut self, drvs: impl Iterator<Item = StorePath>, now: Instant) {
        if self.succeeded.len() > 10_000 {
            self.succeeded
                .retain(|_, t| now.saturating_duration_since(*t) < SUCCESS_MEMORY);
        }
        for d in drvs {
            self.succeeded.insert(d, now);
        }
    }
}

/// Read-only access to the state, for questions that need several facts
/// at once (status pages, Explain). Nothing in it can change anything.
pub struct View<'a> {
    pub graph: &'a Graph,
    pub machines: &'a Machines,
    pub attempts: &'a Attempts,
}

#[derive(Default)]
pub struct State {
    inner: Mutex<Inner>,
    dispatcher: Notify,
    resolver: Notify,
    /// Woken with every event that may let a result held for its inputs'
    /// verification go on, or withdraw it.
    verification: Notify,
}

/// How an attempt ended, for its machine's record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttemptEnd {
    /// The build ran to a result (success or a failure of the build): the
    /// machine works.
    Completed,
    /// A fault of the machine or the transfer: it counts towards a rest.
    Aborted,
    /// Not the machine's doing (a transient failure of the build, a
    /// cancel): nothing is counted.
    Neutral,
}

/// What became of a step whose attempt was aborted, and the attempts of
/// dependents that had run ahead of it (to withdraw, [`State::attempt_withdrawn`]).
#[derive(Debug, PartialEq, Eq)]
pub struct Requeue {
    pub then: Requeued,
    pub withdraw: Vec<Uuid>,
}

/// Whether a running attempt's result may be recorded now, as far as its
/// inputs go (see [`State::inputs_verified`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verification {
    /// Every input it was built from is verified.
    Verified,
    /// An input it ran ahead of was requeued: it is to be withdrawn.
    Withdrawn,
    /// It does not run its step (any more).
    NotRunning,
}

/// What became of a step whose attempt was aborted.
#[derive(Debug, PartialEq, Eq)]
pub enum Requeued {
    /// Back in its queue, after the backoff.
    Queued,
    /// Nobody needs it any more, or it is not this attempt's step.
    Gone,
    /// It was tried `tries` times: it fails now.
    GiveUp { step: StepId, tries: u32 },
}

/// A step about to succeed, as the state had it before the transaction.
#[derive(Debug, Clone)]
pub struct Finishing {
    pub step: StepId,
    /// Builds whose top-level step it is.
    pub direct: Vec<Build>,
    /// Derivations that resolved to it.
    pub resolved_from: Vec<StorePath>,
    /// Every build that needs it now (for its event).
    pub needed_by: Vec<BuildId>,
    pub system: String,
}

/// A step about to fail, as the graph had it.
#[derive(Debug, Clone)]
pub struct Failing {
    pub drv: StorePath,
    pub system: String,
    /// Derivations resolved to it: a build of one of them failed itself,
    /// it is not a dependency failure.
    pub resolved_from: Vec<StorePath>,
    /// Every build that needs it.
    pub builds: Vec<Build>,
}

impl Failing {
    pub fn is_top_level_of(&self, build: &Build) -> bool {
        build.drv_path == self.drv || self.resolved_from.contains(&build.drv_path)
    }
}

/// A step taken for resolution, as the graph had it.
#[derive(Debug, Clone)]
pub struct Resolving {
    pub drv_path: StorePath,
    pub system: String,
    pub required_features: Vec<String>,
    /// The build whose BuildSteps rows record the step.
    pub owner: Build,
    /// Every live build that needs it.
    pub builds: Vec<BuildId>,
}

impl State {
    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock()
    }

    fn wake(&self) {
        self.dispatcher.notify_one();
        self.resolver.notify_one();
        self.verification.notify_waiters();
    }

    /// Waits until something may have given the dispatcher work.
    pub async fn dispatcher_woken(&self) {
        self.dispatcher.notified().await
    }

    /// Waits until something may have given the resolver work.
    pub async fn resolver_woken(&self) {
        self.resolver.notified().await
    }

    /// The configuration changed (limits, drains): everybody looks again.
    pub fn settings_changed(&self) {
        self.wake();
    }

    /// Answers a question that needs several facts at once.
    pub fn read<R>(&self, f: impl FnOnce(&View<'_>) -> R) -> R {
        let inner = self.lock();
        f(&View {
            graph: &inner.graph,
            machines: &inner.machines,
            attempts: &inner.attempts,
        })
    }

    // Builds, from the queue monitor.

    pub fn has_build(&self, id: BuildId) -> bool {
        self.lock().graph.build(id).is_some()
    }

    pub fn has_step(&self, drv: &StorePath) -> bool {
        self.lock().graph.step_id(drv).is_some()
    }

    /// A build was read from the queue, with the steps it needs. The
    /// dispatcher is not woken for each (a batch of thousands would make
    /// a round of each): [`State::batch_loaded`] wakes it.
    /// A step an attempt inherited from the runner before runs that
    /// attempt from the start (the returned adoptions are for builders that
    /// declared theirs before the step was loaded).
    pub fn build_loaded(
        &self,
        build: Build,
        plan: LoadPlan,
        now: Instant,
    ) -> Result<Vec<Adoption>, InsertError> {
        let mut inner = self.lock();
        // A step the plan makes may have succeeded since it was planned
        // (loads run side by side, and an inherited attempt ends quickly):
        // then it is built, and the build is read again.
        if let Some(planned) = plan.planned_at
            && let Some(gone) = plan.new_steps.iter().find(|s| {
                inner.graph.step_id(&s.drv_path).is_none()
                    && inner
                        .succeeded
                        .get(&s.drv_path)
                        .is_some_and(|t| *t >= planned)
            })
        {
            return Err(InsertError::Vanished(gone.drv_path.to_string()));
        }
        let runnable = inner.graph.insert_build(build, plan, now)?;
        if inner.inherited.is_empty() {
            return Ok(Vec::new());
        }
        Ok(runnable
            .into_iter()
            .filter_map(|id| inner.adopt_inherited(id))
            .collect())
    }

    /// A batch of builds was loaded (or some of one, to start early).
    pub fn batch_loaded(&self) {
        self.wake();
    }

    /// Builds left the queue (cancelled, deleted, superseded): they leave
    /// the graph with the steps only they needed. With `keep_running`, a
    /// running step only they needed finishes first (a soft supersede).
    pub fn builds_removed(&self, ids: &[BuildId], keep_running: bool) -> Dropped {
        let dropped = {
            let mut inner = self.lock();
            for id in ids {
                inner.started_builds.remove(id);
            }
            if keep_running {
                inner.graph.remove_builds_keeping_running(ids)
            } else {
                inner.graph.remove_builds(ids)
            }
        };
        self.wake();
        dropped
    }

    /// An admin bumped a build's priority.
    pub fn build_bumped(&self, id: BuildId, global_priority: i32) {
        self.lock().graph.bump_build(id, global_priority);
        self.wake();
    }

    /// The jobsets' scheduling shares and recent build time were read:
    /// (jobset, shares, seconds used in the last 24 h).
    pub fn shares_loaded(&self, rows: impl IntoIterator<Item = (i32, u32, f64)>) {
        let mut inner = self.lock();
        for (jobset, shares, used) in rows {
            inner.shares.set_shares(jobset, shares);
            inner.shares.set_used(jobset, used);
        }
    }

    /// `build`'s jobset used `secs` of build time.
    pub fn time_used(&self, build: BuildId, secs: f64, now: Instant) {
        let mut inner = self.lock();
        if let Some(jobset) = inner.graph.build(build).map(|b| b.jobset_id) {
            inner.shares.add_used(jobset, secs, now);
        }
    }

    // Dispatch.

    /// When the next running attempt reaches its deadline.
    pub fn next_attempt_deadline(&self) -> Option<Instant> {
        self.lock().attempts.next_deadline()
    }

    /// Plans a dispatch round (a pure decision, [`plan::plan`]) and applies
    /// it: every assigned step runs on its machine from now on (its slot
    /// taken), and what no machine supports is marked so.
    pub fn plan_round(&self, config: &RunnerConfig, now: Instant) -> Round {
        let mut inner = self.lock();
        let memory = Duration::from_secs(config.machine_memory_secs);
        inner.machines.forget_departed(now, memory);
        let adoptions = inner.adopt_inherited_runnable();
        let Inner {
            graph,
            machines,
            shares,
            attempts,
            inherited,
            ..
        } = &mut *inner;
        let policy = plan::Policy::of(config);
        let decided = plan::plan(graph, machines, shares, &policy, now);
        decided.note_on(graph, now);
        let mut round = Round {
            unsupported: decided.unsupported,
            next_deadline: decided.next_deadline,
            adoptions,
            ..Round::default()
        };
        if let Some(t) = machines.next_forgotten(memory) {
            round.due(t);
        }
        if let Some(t) = attempts.next_expiry() {
            round.due(t);
        }
        if let Some(t) = inherited.values().map(|o| o.deadline).min() {
            round.due(t);
        }
        let mut ahead_of_dispatched = false;
        for (id, machine) in decided.assignments {
            let step = graph.step(id).expect("a planned step is in the graph");
            let (owner, builds) = graph
                .owner_and_dependents(id)
                .expect("a step in the graph has a build");
            let m = machines.get(&machine).expect("a planned machine");
            let assignment = Assignment {
                step: id,
                drv_path: step.drv_path.clone(),
                system: step.system.clone(),
                attempt: Uuid::new_v4(),
                machine: machine.clone(),
                connection: m.connection.clone(),
                link: m.link.clone(),
                owner,
                builds,
                runnable_since: step.runnable_since(now),
                facts: step.sched.clone(),
                ahead: step.only_on().is_some(),
                after: graph.unbuilt_inputs(id),
            };
            graph
                .mark_dispatched(id, assignment.attempt, &machine)
                .expect("a planned step is runnable");
            if config.run_ahead {
                ahead_of_dispatched |= graph.send_dependents_ahead(id, now);
            }
            machines
                .get_mut(&machine)
                .expect("a planned machine")
                .running
                .insert(assignment.attempt);
            round.assignments.push(assignment);
        }
        // Dependents that may now be sent ahead of what was just planned
        // are planned in the next round, once these jobs are sent.
        if ahead_of_dispatched {
            self.wake();
        }
        round
    }

    /// Whether a step of `build` was started before in this process.
    pub fn build_started_before(&self, build: BuildId) -> bool {
        self.lock().started_builds.contains(&build)
    }

    /// The attempt was persisted: it runs from now on, unless its machine
    /// left meanwhile (then it is handed back, for the caller to abort: the
    /// machine's departure took its attempts before this one was there).
    pub fn attempt_started(&self, attempt: Attempt) -> Result<(), Box<Attempt>> {
        let mut inner = self.lock();
        let connected = inner
            .machines
            .get(&attempt.machine)
            .is_some_and(|m| m.connection == attempt.connection);
        if !connected {
            return Err(Box::new(attempt));
        }
        inner.started_builds.insert(attempt.build);
        inner.attempts.insert(attempt);
        Ok(())
    }

    /// An assignment was never persisted (its owner build was deleted
    /// meanwhile): the slot is freed and the step planned again after
    /// `pause`, with nothing counted against step or machine.
    pub fn attempt_not_started(&self, a: &Assignment, pause: Duration) {
        {
            let mut inner = self.lock();
            inner.machines.release(&a.machine, &a.attempt);
            let now = Instant::now();
            let _ = inner
                .graph
                .unstart(&a.drv_path, &a.attempt, now, Some(now + pause));
        }
        self.wake();
    }

    /// A step whose job could not even be prepared leaves its machine (its
    /// slot freed); the caller fails it.
    pub fn attempt_unprepared(&self, a: &Assignment) -> bool {
        let mut inner = self.lock();
        inner.machines.release(&a.machine, &a.attempt);
        // Nothing ran ahead of an attempt that never started.
        inner
            .graph
            .requeue(&a.drv_path, &a.attempt, Instant::now(), None)
            .is_ok()
    }

    /// The builder that runs attempt `id` (owned by `connection`) built its
    /// step and sends the outputs: dependents whose inputs are all built
    /// there may start there now, and its build slot is free (the attempt
    /// runs on until its outputs are in).
    pub fn attempt_built(&self, id: &str, connection: &str) {
        {
            let mut inner = self.lock();
            let Ok(a) = inner.attempts.owned(id, connection) else {
                return;
            };
            let (drv, attempt, machine) = (a.drv_path.clone(), a.id, a.machine.clone());
            inner.machines.built(&machine, &attempt);
            let _ = inner.graph.step_built(&drv, &attempt, Instant::now());
        }
        self.wake();
    }

    /// Whether the result of attempt `id` (owned by `connection`) may be
    /// recorded now, as far as its inputs go.
    fn verification(&self, id: &str, connection: &str) -> Result<Verification, ()> {
        let mut inner = self.lock();
        let Ok(a) = inner.attempts.owned(id, connection) else {
            return Ok(Verification::NotRunning);
        };
        let (drv, attempt) = (a.drv_path.clone(), a.id);
        let graph = &inner.graph;
        let Some(step) = graph.step_of_attempt(&drv, &attempt) else {
            return Ok(Verification::NotRunning);
        };
        match graph.step(step).map(|s| &s.ahead) {
            Some(crate::graph::Ahead::No) | None => Ok(Verification::Verified),
            Some(crate::graph::Ahead::Broken) => Ok(Verification::Withdrawn),
            Some(crate::graph::Ahead::On(_)) => Err(()),
        }
    }

    /// Whether attempt `id` (owned by `connection`) is to be withdrawn: an
    /// input it ran ahead of was aborted (while it was being persisted,
    /// say, before the withdrawal could find it).
    pub fn is_withdrawn(&self, id: &str, connection: &str) -> bool {
        self.verification(id, connection) == Ok(Verification::Withdrawn)
    }

    /// Waits until the inputs attempt `id` ran ahead of are verified (at
    /// once when it ran after them), or until it is to be withdrawn or no
    /// longer runs: no result is recorded before the inputs it was built
    /// from are.
    pub async fn inputs_verified(&self, id: &str, connection: &str) -> Verification {
        loop {
            let woken = self.verification.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            match self.verification(id, connection) {
                Ok(v) => return v,
                Err(()) => woken.await,
            }
        }
    }

    /// A withdrawn attempt's records are closed (its slot freed): its step
    /// waits for its inputs again, nothing counted against it. Returns
    /// attempts that ran ahead of it and are to be withdrawn too.
    pub fn attempt_withdrawn(&self, attempt: &Attempt) -> Vec<Uuid> {
        let above = {
            let mut inner = self.lock();
            inner
                .graph
                .withdraw(&attempt.drv_path, &attempt.id, Instant::now())
                .unwrap_or_default()
        };
        self.wake();
        above
    }

    // Attempts, from builders' calls.

    /// `f` on the running attempt `id`, if `connection` owns it.
    pub fn with_attempt<R>(
        &self,
        id: &str,
        connection: &str,
        f: impl FnOnce(&mut Attempt) -> R,
    ) -> Result<R, OwnershipError> {
        let mut inner = self.lock();
        inner.attempts.owned(id, connection).map(f)
    }

    /// Takes attempt `id` out of the running set, if `connection` owns it:
    /// whoever takes it is the only one to finish it.
    pub fn take_attempt(&self, id: &str, connection: &str) -> Result<Attempt, OwnershipError> {
        self.lock().attempts.take_owned(id, connection)
    }

    /// Takes attempt `id` out of the running set, whoever owns it.
    pub fn take_attempt_by_id(&self, id: &Uuid) -> Option<Attempt> {
        self.lock().attempts.take(id)
    }

    /// An attempt (taken out of the running set) ended: its slot is free,
    /// and its machine's record counts how. Returns the rest the machine
    /// now takes, when this abort makes it rest.
    pub fn attempt_ended(
        &self,
        attempt: &Attempt,
        how: AttemptEnd,
        config: &RunnerConfig,
        now: Instant,
    ) -> Option<Duration> {
        let rest = {
            let mut inner = self.lock();
            inner.machines.release(&attempt.machine, &attempt.id);
            inner
                .machines
                .count_done(&attempt.machine, attempt.dispatched_at.elapsed());
            match how {
                AttemptEnd::Completed => {
                    inner.machines.record_success(&attempt.machine);
                    None
                }
                AttemptEnd::Aborted => inner
                    .machines
                    .record_failure(&attempt.machine, now, |n| config.machine_rest(n)),
                AttemptEnd::Neutral => None,
            }
        };
        self.wake();
        rest
    }

    /// The ended `attempt`'s step goes back to its queue after `wait`; or
    /// gives up after `max_tries`; or is dropped when only a superseded
    /// build wanted it.
    pub fn attempt_requeued(&self, attempt: &Attempt, wait: Duration, max_tries: u32) -> Requeue {
        let outcome = {
            let mut inner = self.lock();
            let graph = &mut inner.graph;
            let mut withdraw = Vec::new();
            let then = match graph.step_id(&attempt.drv_path) {
                None => Requeued::Gone,
                Some(id) => {
                    let tries = graph.step(id).map_or(0, |s| s.aborted_attempts) + 1;
                    let now = Instant::now();
                    match graph.requeue(&attempt.drv_path, &attempt.id, now, Some(now + wait)) {
                        Err(_) => Requeued::Gone,
                        Ok(above) => {
                            withdraw = above;
                            if graph.drop_if_unneeded(id) {
                                Requeued::Gone
                            } else if tries >= max_tries {
                                Requeued::GiveUp { step: id, tries }
                            } else {
                                Requeued::Queued
                            }
                        }
                    }
                }
            };
            Requeue { then, withdraw }
        };
        self.wake();
        outcome
    }

    // Machines, from the tunnel.

    /// A ping: the machine's load, free disk and substituter timeouts.
    pub fn machine_pinged(&self, name: &str, load1: f32, free_disk: Option<u64>, timeouts: u64) {
        if let Some(m) = self.lock().machines.get_mut(name) {
            m.load1 = load1;
            m.free_disk = free_disk;
            m.substituter_timeouts = timeouts;
        }
    }

    /// An operator drained (or undrained) a machine, connected or not.
    pub fn machine_drained(&self, name: &str, drained: bool) {
        self.lock().machines.set_drained(name, drained);
        self.wake();
    }

    /// The name of the machine whose current connection is `connection`.
    pub fn machine_of_connection(&self, connection: &str) -> Option<String> {
        self.lock().machines.name_of(connection)
    }

    /// The link to every connected builder.
    pub fn links(&self) -> Vec<BuilderLink> {
        self.lock()
            .machines
            .connected()
            .map(|m| m.link.clone())
            .collect()
    }

    /// The link to `machine`, if it is connected.
    pub fn link_of(&self, machine: &str) -> Option<BuilderLink> {
        self.lock().machines.get(machine).map(|m| m.link.clone())
    }

    // Steps, from completion and the resolver.

    /// The step that `attempt` runs, if it still does.
    pub fn step_of_attempt(&self, drv: &StorePath, attempt: &Uuid) -> Option<StepId> {
        self.lock().graph.step_of_attempt(drv, attempt)
    }

    /// The step of `drv_path` about to succeed, if `attempt` still runs it
    /// (or, with no attempt, if it is still in the graph).
    pub fn finishing(&self, drv_path: &StorePath, attempt: Option<&Uuid>) -> Option<Finishing> {
        let inner = self.lock();
        let graph = &inner.graph;
        let step = match attempt {
            Some(a) => graph.step_of_attempt(drv_path, a)?,
            None => graph.step_id(drv_path)?,
        };
        let s = graph.step(step)?;
        Some(Finishing {
            step,
            direct: graph.top_level_builds(step),
            needed_by: graph.dependent_builds(step).iter().map(|b| b.id).collect(),
            resolved_from: s.resolved_from.clone(),
            system: s.system.clone(),
        })
    }

    /// A step and every build that needs it, for a failure's rows.
    pub fn failing(&self, step: StepId) -> Option<Failing> {
        let inner = self.lock();
        let s = inner.graph.step(step)?;
        Some(Failing {
            drv: s.drv_path.clone(),
            system: s.system.clone(),
            resolved_from: s.resolved_from.clone(),
            builds: inner.graph.dependent_builds(step),
        })
    }

    /// The step succeeded (by `attempt`, or without one): it leaves the
    /// graph with the builds it was the top level of; its dependents run.
    pub fn step_succeeded(
        &self,
        step: StepId,
        attempt: Option<&Uuid>,
        now: Instant,
    ) -> Result<Succeeded, TransitionError> {
        let result = {
            let mut inner = self.lock();
            let drv = inner.graph.step(step).map(|s| s.drv_path.clone());
            let result = inner.graph.step_succeeded(step, attempt, now)?;
            inner.note_succeeded(
                drv.into_iter().chain(result.resolved_from.iter().cloned()),
                now,
            );
            for b in &result.builds {
                inner.started_builds.remove(&b.id);
            }
            result
        };
        self.wake();
        Ok(result)
    }

    /// The step failed permanently: it, the builds that need it and what
    /// only they needed leave the graph.
    pub fn step_failed(
        &self,
        step: StepId,
        attempt: Option<&Uuid>,
    ) -> Result<Failed, TransitionError> {
        let result = {
            let mut inner = self.lock();
            let result = inner.graph.step_failed(step, attempt)?;
            for b in &result.builds {
                inner.started_builds.remove(&b.id);
            }
            result
        };
        self.wake();
        Ok(result)
    }

    /// A step waiting for the resolver, taken out of its queue, with what
    /// resolving it needs to know.
    pub fn next_to_resolve(&self) -> Option<(StepId, Option<Resolving>)> {
        let mut inner = self.lock();
        let id = inner.graph.next_to_resolve()?;
        let graph = &inner.graph;
        let pending = match (
            graph.step(id).filter(|s| s.is_resolving()),
            graph.owner_and_dependents(id),
        ) {
            (Some(s), Some((owner, builds))) => Some(Resolving {
                drv_path: s.drv_path.clone(),
                system: s.system.clone(),
                required_features: s.required_features.clone(),
                owner,
                builds,
            }),
            _ => None,
        };
        Some((id, pending))
    }

    /// The step was resolved to `resolved`, whose step takes over its
    /// builds and dependents.
    /// An attempt inherited for the resolved derivation runs it from now
    /// on (returned when its builder is to be told).
    pub fn step_resolved(
        &self,
        id: StepId,
        resolved: NewStep,
        now: Instant,
    ) -> Result<(StepId, Option<Adoption>), TransitionError> {
        let result = {
            let mut inner = self.lock();
            inner
                .graph
                .replace_with_resolved(id, resolved, now)
                .map(|step| {
                    let adoption = if inner.graph.step(step).is_some_and(|s| s.is_runnable()) {
                        inner.adopt_inherited(step)
                    } else {
                        None
                    };
                    (step, adoption)
                })
        };
        if result.is_ok() {
            self.wake();
        }
        result
    }

    /// The system and features of a step (for a message about them).
    pub fn step_kind(&self, step: StepId) -> Option<(String, Vec<String>)> {
        let inner = self.lock();
        let s = inner.graph.step(step)?;
        Some((s.system.clone(), s.required_features.clone()))
    }

    // Views.

    /// How much is queued and running.
    pub fn queue_counts(&self) -> QueueCounts {
        let inner = self.lock();
        QueueCounts {
            builds: inner.graph.build_count(),
            steps: inner.graph.step_count(),
            runnable: inner.graph.runnable_count(),
            running: inner.attempts.len(),
            machines: inner.machines.connected().count(),
        }
    }

    /// Steps of each system by where they are.
    pub fn steps_per_system(&self) -> BTreeMap<String, SystemSteps> {
        self.lock().graph.steps_per_system()
    }

    /// Every machine the runner knows (connected, drained, or failing
    /// lately), as the status document, `/metrics`, the page and the
    /// client API show them.
    pub fn machine_views(&self, now: Instant) -> Vec<MachineView> {
        let inner = self.lock();
        views::machines(&inner.machines, &inner.attempts, now)
    }

    /// The running attempts: (drv, machine, running for).
    pub fn running_attempts(&self) -> Vec<(StorePath, String, Duration)> {
        self.lock()
            .attempts
            .iter()
            .map(|a| {
                (
                    a.drv_path.clone(),
                    a.machine.clone(),
                    a.dispatched_at.elapsed(),
                )
            })
            .collect()
    }
}
