//! The in-memory DAG: unfinished builds and the steps they need.
//!
//! One step per derivation, shared by every build that needs it. Steps whose
//! outputs are already valid never enter the graph. The graph is plain data
//! behind one lock; nothing here awaits or touches the database: callers
//! write PostgreSQL first and then apply the outcome here.

pub mod runnable;
pub mod step;

use rustc_hash::FxHashMap;
use std::collections::{HashMap, HashSet};
use std::time::Instant;

use hydra_nix::StorePath;
use thiserror::Error;
use uuid::Uuid;

pub use runnable::{Bucket, KindCheck, KindId};
pub use step::{Ahead, SchedFacts, Step, StepState, TransitionError};

pub type StepId = u64;
pub type BuildId = i32;

/// A queued build, as the runner keeps it in memory.
#[derive(Debug, Clone)]
pub struct Build {
    pub id: BuildId,
    pub drv_path: StorePath,
    pub jobset_id: i32,
    pub project: String,
    pub jobset: String,
    pub job: String,
    pub timestamp: i64,
    pub local_priority: i32,
    pub global_priority: i32,
    pub max_silent_secs: u32,
    pub timeout_secs: u32,
}

impl Build {
    /// What this build contributes to each step it needs, `depth` steps below it.
    fn facts(&self, depth: u32) -> SchedFacts {
        SchedFacts {
            global_priority: self.global_priority,
            local_priority: self.local_priority,
            lowest_build_id: self.id,
            jobsets: vec![self.jobset_id],
            critical_path: depth,
            max_silent_secs: self.max_silent_secs,
            timeout_secs: self.timeout_secs,
        }
    }
}

/// A step the loader found unbuilt, with the input derivations it waits for.
#[derive(Debug, Clone)]
pub struct NewStep {
    pub drv_path: StorePath,
    pub system: String,
    pub required_features: Vec<String>,
    /// Input derivations that are not valid: new steps of the same plan, or
    /// steps already in the graph.
    pub inputs: Vec<StorePath>,
    /// Depends on floating CA outputs: resolved once its inputs are built.
    pub needs_resolution: bool,
}

/// Steps of one system, by where they are (see [`Graph::steps_per_system`]).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct SystemSteps {
    pub runnable: u32,
    pub running: u32,
    pub waiting: u32,
}

/// What the loader read for one build: its new steps, and the steps it
/// expects to find in the graph already.
#[derive(Debug, Default)]
pub struct LoadPlan {
    pub new_steps: Vec<NewStep>,
    pub existing: HashSet<StorePath>,
    /// Derivations of the closure found built already (for the counters).
    pub cached: u32,
    /// When the loader began the plan: a new step that succeeded since
    /// makes it stale (the build is read again, rather than build twice).
    pub planned_at: Option<std::time::Instant>,
}

#[derive(Debug, Error, PartialEq, Eq)]
pub enum InsertError {
    /// A step the plan relied on finished while the build was being read:
    /// read the build again (its outputs are now valid, or it failed).
    #[error("step {0} finished while the build was loading")]
    Vanished(String),
    #[error("build {0} is already in the graph")]
    Duplicate(BuildId),
}

/// Steps that left the graph because no live build needs them any more;
/// the running ones must be aborted on their machines.
#[derive(Debug, Default)]
pub struct Dropped {
    pub steps: Vec<StorePath>,
    pub running: Vec<(Uuid, String)>,
}

/// The effect of a step's success.
#[derive(Debug)]
pub struct Succeeded {
    /// Builds whose top-level step this was; they left the graph.
    pub builds: Vec<Build>,
    /// Dependents whose last input this was (runnable, or to resolve).
    pub unblocked: Vec<StepId>,
    /// Derivations that had resolved to it, up to the moment it left.
    pub resolved_from: Vec<StorePath>,
}

/// The effect of a step's permanent failure.
#[derive(Debug)]
pub struct Failed {
    /// Every build that needed the step; they left the graph.
    pub builds: Vec<Build>,
    pub dropped: Dropped,
}

#[derive(Debug, Default)]
pub struct Graph {
    /// Boxed: the table grows by doubling, and its slack then costs a
    /// pointer per empty slot instead of a whole step (a fifth of the
    /// memory per step at 300,000 steps).
    /// Keyed by ids the graph hands out itself, so a fast hash (a round
    /// looks up every runnable step) is safe from crafted keys.
    steps: FxHashMap<StepId, Box<Step>>,
    by_path: HashMap<StorePath, StepId>,
    builds: HashMap<BuildId, Build>,
    runnable: runnable::Runnable,
    /// Steps in `Resolving` that the resolver has not taken yet.
    to_resolve: HashSet<StepId>,
    next_id: StepId,
    /// Machines whose builders start a job after the local jobs it names
    /// (Join.follows_local_jobs): a dependent may be sent there while its
    /// inputs still build there.
    follow_on: HashSet<String>,
}

impl Graph {
    pub fn step_id(&self, drv: &StorePath) -> Option<StepId> {
        self.by_path.get(drv).copied()
    }

    pub fn step(&self, id: StepId) -> Option<&Step> {
        self.steps.get(&id).map(|s| &**s)
    }

    pub fn build(&self, id: BuildId) -> Option<&Build> {
        self.builds.get(&id)
    }

    /// Every step, for status reports.
    pub fn steps(&self) -> impl Iterator<Item = (StepId, &Step)> + '_ {
        self.steps.iter().map(|(id, s)| (*id, &**s))
    }

    /// How many steps of each system wait for a machine, run, or wait for
    /// inputs (or the resolver).
    pub fn steps_per_system(&self) -> std::collections::BTreeMap<String, SystemSteps> {
        let mut by_system: std::collections::BTreeMap<String, SystemSteps> = Default::default();
        for step in self.steps.values() {
            let row = by_system.entry(step.system.clone()).or_default();
            match step.state {
                StepState::Runnable { .. } => row.runnable += 1,
                StepState::Running { .. } => row.running += 1,
                StepState::Waiting | StepState::Resolving => row.waiting += 1,
                StepState::Finished => {}
            }
        }
        by_system
    }

    /// The steps `build` still needs: its top-level step and everything
    /// below it in the graph.
    pub fn steps_of_build(&self, build: BuildId) -> Vec<StepId> {
        let Some(top) = self
            .builds
            .get(&build)
            .and_then(|b| self.by_path.get(&b.drv_path))
        else {
            return Vec::new();
        };
        let mut seen = HashSet::new();
        let mut todo = vec![*top];
        while let Some(id) = todo.pop() {
            if seen.insert(id) {
                todo.extend(self.steps[&id].deps.iter().copied());
            }
        }
        let mut ids: Vec<StepId> = seen.into_iter().collect();
        ids.sort();
        ids
    }

    pub fn step_count(&self) -> usize {
        self.steps.len()
    }

    pub fn build_count(&self) -> usize {
        self.builds.len()
    }

    pub fn runnable_count(&self) -> usize {
        self.runnable.len()
    }

    pub fn runnable(&self) -> impl Iterator<Item = (StepId, &Step)> + '_ {
        self.runnable
            .buckets()
            .flat_map(|(_, b)| b.steps.iter().map(|id| (*id, &*self.steps[id])))
    }

    /// The runnable steps by kind.
    pub fn runnable_kinds(&self) -> impl Iterator<Item = (KindId, &Bucket)> + '_ {
        self.runnable.buckets()
    }

    /// What a round learnt of a kind: later rounds may pass over it while
    /// it is unchanged, and whether its steps carry unsupported marks.
    pub fn kind_checked(&mut self, check: &KindCheck) {
        let b = self.runnable.bucket_mut(check.kind);
        b.quiet = check.quiet;
        b.marked = check.marked;
    }

    fn queue(&mut self, id: StepId) {
        let kind = self.steps[&id].kind;
        self.runnable.insert(kind, id);
    }

    fn dequeue(&mut self, id: StepId) {
        if let Some(s) = self.steps.get(&id) {
            self.runnable.remove(s.kind, id);
        }
    }

    /// Adds a build with the new steps its plan found. Returns the steps
    /// that became runnable.
    pub fn insert_build(
        &mut self,
        build: Build,
        plan: LoadPlan,
        now: Instant,
    ) -> Result<Vec<StepId>, InsertError> {
        if self.builds.contains_key(&build.id) {
            return Err(InsertError::Duplicate(build.id));
        }
        if let Some(gone) = plan
            .existing
            .iter()
            .find(|p| !self.by_path.contains_key(*p))
        {
            return Err(InsertError::Vanished(gone.to_string()));
        }
        let mut created = Vec::new();
        for ns in &plan.new_steps {
            if !self.by_path.contains_key(&ns.drv_path) {
                let id = self.next_id;
                self.next_id += 1;
                let mut step = Step::new(
                    ns.drv_path.clone(),
                    ns.system.clone(),
                    ns.required_features.clone(),
                );
                step.needs_resolution = ns.needs_resolution;
                step.kind = self.runnable.kind_of(&ns.system, &ns.required_features);
                self.steps.insert(id, Box::new(step));
                self.by_path.insert(ns.drv_path.clone(), id);
                created.push(id);
            }
        }
        // Only the steps this plan created take their inputs from it. A step
        // that another build's load created meanwhile keeps the inputs its
        // creator found (its plan is the newer one): linking it here could
        // give a running step an input, and an input of a finished step
        // would dangle.
        let fresh: HashSet<StepId> = created.iter().copied().collect();
        for ns in &plan.new_steps {
            let id = self.by_path[&ns.drv_path];
            if !fresh.contains(&id) {
                continue;
            }
            for input in &ns.inputs {
                if let Some(&dep) = self.by_path.get(input) {
                    self.link(id, dep);
                }
            }
        }
        let top = self.by_path.get(&build.drv_path).copied();
        if let Some(top) = top {
            self.steps
                .get_mut(&top)
                .expect("top step")
                .toplevel_of
                .push(build.id);
            self.push_facts(top, &build);
        }
        self.builds.insert(build.id, build);
        // A created step that only an existing step would have needed is
        // not needed after all.
        let orphans: Vec<StepId> = created
            .iter()
            .copied()
            .filter(|id| Some(*id) != top && self.steps[id].rdeps.is_empty())
            .collect();
        self.drop_unneeded(orphans, false);
        let mut unblocked = Vec::new();
        for id in created {
            if self.steps.get(&id).is_some_and(|s| s.deps.is_empty()) {
                self.unblock(id, now).expect("a new step waits");
                unblocked.push(id);
            }
        }
        Ok(unblocked)
    }

    /// The last input of `id` is built: it joins the dispatcher's queue,
    /// or the resolver's.
    fn unblock(&mut self, id: StepId, now: Instant) -> Result<(), TransitionError> {
        let step = self.steps.get_mut(&id).expect("step");
        step.inputs_built(now)?;
        if step.is_resolving() {
            self.to_resolve.insert(id);
        } else {
            self.queue(id);
        }
        Ok(())
    }

    /// A step waiting for the resolver, taken out of its queue.
    pub fn next_to_resolve(&mut self) -> Option<StepId> {
        let id = *self.to_resolve.iter().next()?;
        self.to_resolve.remove(&id);
        Some(id)
    }

    /// Replaces the resolving step `id` by the step of its resolved
    /// derivation (`resolved`, created unless another step resolved to it
    /// already): the builds and dependents of `id` move there, and `id`'s
    /// path stays an alias of it until it finishes. Returns its id.
    pub fn replace_with_resolved(
        &mut self,
        id: StepId,
        resolved: NewStep,
        now: Instant,
    ) -> Result<StepId, TransitionError> {
        self.steps.get_mut(&id).expect("step").replaced()?;
        let original = self.remove_step(id);
        let target = match self.by_path.get(&resolved.drv_path) {
            Some(t) => *t,
            None => {
                let t = self.next_id;
                self.next_id += 1;
                let mut step = Step::new(
                    resolved.drv_path.clone(),
                    resolved.system,
                    resolved.required_features,
                );
                step.kind = self.runnable.kind_of(&step.system, &step.required_features);
                self.steps.insert(t, Box::new(step));
                self.by_path.insert(resolved.drv_path, t);
                self.unblock(t, now)?;
                t
            }
        };
        for r in &original.rdeps {
            let rdep = self.steps.get_mut(r).expect("rdep");
            rdep.deps.remove(&id);
            rdep.deps.insert(target);
        }
        let step = self.steps.get_mut(&target).expect("resolved step");
        step.rdeps.extend(original.rdeps.iter().copied());
        step.toplevel_of
            .extend(original.toplevel_of.iter().copied());
        step.sched.merge(&original.sched);
        for alias in std::iter::once(original.drv_path).chain(original.resolved_from) {
            step.resolved_from.push(alias.clone());
            self.by_path.insert(alias, target);
        }
        Ok(target)
    }

    /// The links are whole: every input and dependent named is a step of
    /// the graph, each link is known at both ends, a runnable step is in
    /// the queue, and a runnable or running step waits for no input unless
    /// it runs ahead on the machine that built every input it waits for.
    pub fn check_links(&self) -> Result<(), String> {
        for (id, s) in &self.steps {
            for d in &s.deps {
                let Some(dep) = self.steps.get(d) else {
                    return Err(format!("{} has a removed input {d}", s.drv_path));
                };
                if !dep.rdeps.contains(id) {
                    return Err(format!(
                        "{} needs {}, which does not know it",
                        s.drv_path, dep.drv_path
                    ));
                }
            }
            for r in &s.rdeps {
                let Some(rdep) = self.steps.get(r) else {
                    return Err(format!("{} has a removed dependent {r}", s.drv_path));
                };
                if !rdep.deps.contains(id) {
                    return Err(format!(
                        "{} lists {} as dependent, which does not need it",
                        s.drv_path, rdep.drv_path
                    ));
                }
            }
            let waits = !s.deps.is_empty();
            let queued_or_running = s.is_runnable() || s.running_attempt().is_some();
            match &s.ahead {
                Ahead::No if queued_or_running && waits => {
                    return Err(format!("{} runs while it waits for inputs", s.drv_path));
                }
                Ahead::On(m) => {
                    if !queued_or_running || !waits {
                        return Err(format!(
                            "{} is ahead on {m} but not queued or waiting",
                            s.drv_path
                        ));
                    }
                    if let Some((_, runs_on)) = s.running_attempt()
                        && runs_on != m
                    {
                        return Err(format!(
                            "{} is ahead on {m} but runs on {runs_on}",
                            s.drv_path
                        ));
                    }
                    let runs_there = |d: &StepId| {
                        let dep = &self.steps[d];
                        dep.ahead != Ahead::Broken
                            && dep.running_attempt().is_some_and(|(_, on)| on == m)
                    };
                    if let Some(d) = s.deps.iter().find(|d| !runs_there(d)) {
                        return Err(format!(
                            "{} runs ahead on {m} of {}, which does not run there",
                            s.drv_path, self.steps[d].drv_path
                        ));
                    }
                }
                Ahead::Broken if s.running_attempt().is_none() => {
                    return Err(format!("{} is withdrawn but does not run", s.drv_path));
                }
                _ => {}
            }
            if s.is_runnable() != self.runnable.contains(s.kind, *id) {
                return Err(format!(
                    "{} is runnable but not queued, or the reverse",
                    s.drv_path
                ));
            }
        }
        Ok(())
    }

    fn link(&mut self, step: StepId, dep: StepId) {
        self.steps.get_mut(&step).expect("step").deps.insert(dep);
        self.steps.get_mut(&dep).expect("dep").rdeps.insert(step);
    }

    /// Merges a build's scheduling facts into its steps, top-down, stopping
    /// where nothing changes (facts only grow, so below is unchanged too).
    fn push_facts(&mut self, top: StepId, build: &Build) {
        let mut todo = vec![(top, 1u32)];
        while let Some((id, depth)) = todo.pop() {
            let step = self.steps.get_mut(&id).expect("step in graph");
            if step.sched.merge(&build.facts(depth)) {
                todo.extend(step.deps.iter().map(|d| (*d, depth + 1)));
            }
        }
    }

    /// Updates a build's priority (an admin bump) and its steps' facts.
    pub fn bump_build(&mut self, id: BuildId, global_priority: i32) {
        let Some(build) = self.builds.get_mut(&id) else {
            return;
        };
        build.global_priority = global_priority;
        let build = build.clone();
        if let Some(top) = self.by_path.get(&build.drv_path).copied() {
            self.push_facts(top, &build);
        }
    }

    /// Live builds whose top-level step `step` is.
    pub fn top_level_builds(&self, step: StepId) -> Vec<Build> {
        self.steps[&step]
            .toplevel_of
            .iter()
            .filter_map(|b| self.builds.get(b))
            .cloned()
            .collect()
    }

    /// Live builds that need `step`, directly or through other steps.
    pub fn dependent_builds(&self, step: StepId) -> Vec<Build> {
        let mut seen = HashSet::new();
        let mut todo = vec![step];
        let mut builds = Vec::new();
        while let Some(id) = todo.pop() {
            if !seen.insert(id) {
                continue;
            }
            let Some(s) = self.steps.get(&id) else {
                continue; // `check_links` says this never happens
            };
            builds.extend(
                s.toplevel_of
                    .iter()
                    .filter_map(|b| self.builds.get(b))
                    .cloned(),
            );
            todo.extend(s.rdeps.iter().copied());
        }
        builds.sort_by_key(|b| b.id);
        builds.dedup_by_key(|b| b.id);
        builds
    }

    /// The build whose BuildSteps rows record `step` (one that has it as
    /// its top level if any, as Hydra picks, else the oldest that needs
    /// it), and every live build that needs it, from one walk.
    pub fn owner_and_dependents(&self, step: StepId) -> Option<(Build, Vec<BuildId>)> {
        let top = self.steps.get(&step)?.toplevel_of.clone();
        let needed = self.dependent_builds(step);
        let owner = needed
            .iter()
            .find(|b| top.contains(&b.id))
            .or_else(|| needed.first())?
            .clone();
        Some((owner, needed.iter().map(|b| b.id).collect()))
    }

    pub fn mark_dispatched(
        &mut self,
        id: StepId,
        attempt: Uuid,
        machine: &str,
    ) -> Result<(), TransitionError> {
        let step = self
            .steps
            .get_mut(&id)
            .expect("dispatching a step in the graph");
        step.dispatched(attempt, machine)?;
        self.dequeue(id);
        Ok(())
    }

    /// The running step `id`'s dependents whose every other input is built
    /// or runs on the same machine become runnable there, ahead of it, if
    /// that machine starts a job after the local jobs it names. Returns
    /// whether any did.
    pub fn send_dependents_ahead(&mut self, id: StepId, now: Instant) -> bool {
        let Some(step) = self.steps.get(&id) else {
            return false;
        };
        if self.ahead_source(step).is_none() {
            return false;
        }
        let rdeps: Vec<StepId> = step.rdeps.iter().copied().collect();
        rdeps
            .into_iter()
            .fold(false, |any, r| self.try_ahead(r, now) | any)
    }

    /// Whether the builder of `machine` starts jobs after the local jobs
    /// they name (it said so when it joined).
    pub fn machine_follows(&mut self, machine: &str, follows: bool) {
        if follows {
            self.follow_on.insert(machine.to_owned());
        } else {
            self.follow_on.remove(machine);
        }
    }

    /// The attempts building inputs of `id` that have not built yet: a job
    /// sent ahead of them starts after them on its machine.
    pub fn unbuilt_inputs(&self, id: StepId) -> Vec<Uuid> {
        let Some(step) = self.steps.get(&id) else {
            return Vec::new();
        };
        let mut attempts: Vec<Uuid> = step
            .deps
            .iter()
            .filter_map(|d| {
                let dep = &self.steps[d];
                match &dep.state {
                    StepState::Running {
                        attempt,
                        built: false,
                        ..
                    } => Some(*attempt),
                    _ => None,
                }
            })
            .collect();
        attempts.sort();
        attempts
    }

    /// Whether `id` runs ahead of an input that has not even built yet.
    pub fn follows_unbuilt(&self, id: StepId) -> bool {
        self.steps[&id].only_on().is_some()
            && self.steps[&id]
                .deps
                .iter()
                .any(|d| self.steps[d].built_on().is_none())
    }

    /// Where dependents of `s` may run ahead of it: where it was built
    /// (its outputs on their way), or where it runs on a machine that
    /// starts a dependent's job once it has built.
    fn ahead_source<'a>(&self, s: &'a Step) -> Option<&'a str> {
        if let Some(m) = s.built_on() {
            return Some(m);
        }
        match &s.state {
            StepState::Running { machine, .. }
                if s.ahead != Ahead::Broken && self.follow_on.contains(machine) =>
            {
                Some(machine)
            }
            _ => None,
        }
    }

    /// An attempt was aborted: the step goes back to its queue. Returns the
    /// attempts of dependents that ran ahead of it, to withdraw.
    pub fn requeue(
        &mut self,
        drv: &StorePath,
        attempt: &Uuid,
        now: Instant,
        not_before: Option<Instant>,
    ) -> Result<Vec<Uuid>, TransitionError> {
        let Some(id) = self.step_id(drv) else {
            return Ok(Vec::new()); // dropped meanwhile: nothing to requeue
        };
        self.steps
            .get_mut(&id)
            .expect("step")
            .requeued(attempt, now, not_before)?;
        Ok(self.back_in_queue(id, now))
    }

    /// An attempt that was never started: the step is runnable again,
    /// not before `not_before`, with nothing counted against it.
    pub fn unstart(
        &mut self,
        drv: &StorePath,
        attempt: &Uuid,
        now: Instant,
        not_before: Option<Instant>,
    ) -> Result<(), TransitionError> {
        let Some(id) = self.step_id(drv) else {
            return Ok(());
        };
        self.steps
            .get_mut(&id)
            .expect("step")
            .not_started(attempt, now, not_before)?;
        self.back_in_queue(id, now);
        Ok(())
    }

    /// `attempt` built its step on its machine; the outputs are on their
    /// way. Returns the dependents that may now run ahead there.
    pub fn step_built(
        &mut self,
        drv: &StorePath,
        attempt: &Uuid,
        now: Instant,
    ) -> Result<Vec<StepId>, TransitionError> {
        let Some(id) = self.step_of_attempt(drv, attempt) else {
            return Ok(Vec::new());
        };
        let step = self.steps.get_mut(&id).expect("step");
        if !step.built(attempt)? || step.built_on().is_none() {
            return Ok(Vec::new());
        }
        let rdeps: Vec<StepId> = step.rdeps.iter().copied().collect();
        Ok(rdeps
            .into_iter()
            .filter(|r| self.try_ahead(*r, now))
            .collect())
    }

    /// A running-ahead attempt was withdrawn (its record closed): the step
    /// waits for its inputs again, nothing counted. Returns attempts that
    /// ran ahead of it in turn (none, when they were withdrawn with it).
    pub fn withdraw(
        &mut self,
        drv: &StorePath,
        attempt: &Uuid,
        now: Instant,
    ) -> Result<Vec<Uuid>, TransitionError> {
        let Some(id) = self.step_of_attempt(drv, attempt) else {
            return Ok(Vec::new());
        };
        self.steps
            .get_mut(&id)
            .expect("step")
            .withdrawn(attempt, now)?;
        let above = self.back_in_queue(id, now);
        // Kept running only for a build removed since (a soft supersede).
        self.drop_if_unneeded(id);
        Ok(above)
    }

    /// A step whose attempt ended unbuilt is back in its queue (or waits,
    /// if it had run ahead): dependents that ran ahead of it wait again
    /// (their attempts returned, to withdraw), and it may run ahead itself.
    fn back_in_queue(&mut self, id: StepId, now: Instant) -> Vec<Uuid> {
        let withdrawn = self.withdraw_above(id);
        if self.steps[&id].is_runnable() {
            self.queue(id);
        } else {
            self.try_ahead(id, now);
        }
        withdrawn
    }

    /// Every step that ran ahead of `id`, transitively: runnable ones wait
    /// again; running ones' attempts are returned, to withdraw.
    fn withdraw_above(&mut self, id: StepId) -> Vec<Uuid> {
        let mut withdrawn = Vec::new();
        let mut todo: Vec<StepId> = self.steps[&id].rdeps.iter().copied().collect();
        while let Some(r) = todo.pop() {
            let rdep = self.steps.get_mut(&r).expect("rdep");
            if rdep.only_on().is_none() {
                continue;
            }
            match rdep.input_withdrawn() {
                Some(attempt) => {
                    withdrawn.push(attempt);
                    todo.extend(rdep.rdeps.iter().copied());
                }
                None => {
                    self.dequeue(r);
                }
            }
        }
        withdrawn
    }

    /// Makes the waiting step `id` runnable ahead of its inputs, when every
    /// one it waits for is built on one machine, or runs there and the
    /// machine starts dependents after it ([`Graph::machine_follows`]);
    /// true if it did.
    fn try_ahead(&mut self, id: StepId, now: Instant) -> bool {
        let step = &self.steps[&id];
        if step.state != StepState::Waiting || step.needs_resolution || step.deps.is_empty() {
            return false;
        }
        let mut on: Option<&str> = None;
        for d in &step.deps {
            match self.steps.get(d).and_then(|s| self.ahead_source(s)) {
                Some(m) if on.is_none_or(|o| o == m) => on = Some(m),
                _ => return false,
            }
        }
        let machine = on.expect("some input").to_owned();
        let step = self.steps.get_mut(&id).expect("step");
        if step.inputs_built_ahead(&machine, now).is_err() {
            return false;
        }
        self.queue(id);
        true
    }

    /// The step that `attempt` runs, if it still does.
    pub fn step_of_attempt(&self, drv: &StorePath, attempt: &Uuid) -> Option<StepId> {
        let id = self.step_id(drv)?;
        match self.steps[&id].running_attempt() {
            Some((a, _)) if a == attempt => Some(id),
            _ => None,
        }
    }

    /// `attempt` built its step: the step and the builds it was the top
    /// level of leave the graph; dependents whose last input this was
    /// become runnable.
    pub fn step_succeeded(
        &mut self,
        id: StepId,
        attempt: Option<&Uuid>,
        now: Instant,
    ) -> Result<Succeeded, TransitionError> {
        let step = self.steps.get_mut(&id).expect("step");
        let built_on = step.running_attempt().map(|(_, m)| m.to_owned());
        match attempt {
            Some(a) => step.attempt_finished(a)?,
            None => step.finished_unbuilt()?,
        }
        let step = self.remove_step(id);
        for d in &step.deps {
            if let Some(dep) = self.steps.get_mut(d) {
                dep.rdeps.remove(&id);
            }
        }
        let builds = step
            .toplevel_of
            .iter()
            .filter_map(|b| self.builds.remove(b))
            .collect();
        let mut unblocked = Vec::new();
        for r in step.rdeps {
            let rdep = self.steps.get_mut(&r).expect("rdep");
            rdep.deps.remove(&id);
            if let Some(machine) = &built_on {
                rdep.input_built_on(machine);
            }
            if rdep.state != StepState::Waiting {
                // It ran ahead of this input: its result may count once
                // nothing else is left unverified.
                rdep.inputs_verified();
            } else if rdep.deps.is_empty() {
                self.unblock(r, now)?;
                unblocked.push(r);
            } else if self.try_ahead(r, now) {
                unblocked.push(r);
            }
        }
        Ok(Succeeded {
            builds,
            unblocked,
            resolved_from: step.resolved_from,
        })
    }

    /// The step failed permanently (`attempt`, or before any attempt): it,
    /// every step above it and every build that needs it leave the graph,
    /// with the steps only those builds needed.
    pub fn step_failed(
        &mut self,
        id: StepId,
        attempt: Option<&Uuid>,
    ) -> Result<Failed, TransitionError> {
        let step = self.steps.get_mut(&id).expect("step");
        match attempt {
            Some(a) => step.attempt_finished(a)?,
            None => step.finished_unbuilt()?,
        }
        let builds = self.dependent_builds(id);
        let mut above = HashSet::new();
        let mut todo = vec![id];
        while let Some(s) = todo.pop() {
            if above.insert(s) {
                todo.extend(self.steps[&s].rdeps.iter().copied());
            }
        }
        let mut dropped = Dropped::default();
        let mut below = Vec::new();
        for s in &above {
            let step = self.remove_step(*s);
            below.extend(
                step.deps
                    .iter()
                    .filter(|d| !above.contains(d))
                    .map(|d| (*d, *s)),
            );
            if *s != id {
                dropped.note(&step);
            }
        }
        let mut candidates = Vec::new();
        for (dep, gone) in below {
            self.steps.get_mut(&dep).expect("dep").rdeps.remove(&gone);
            candidates.push(dep);
        }
        for b in &builds {
            self.builds.remove(&b.id);
        }
        dropped.extend(self.drop_unneeded(candidates, false));
        Ok(Failed { builds, dropped })
    }

    /// Builds that left the queue (cancelled, deleted, finished elsewhere):
    /// they leave the graph with the steps only they needed.
    pub fn remove_builds(&mut self, ids: &[BuildId]) -> Dropped {
        let candidates = self.detach_builds(ids);
        self.drop_unneeded(candidates, false)
    }

    /// Like [`Graph::remove_builds`], but a running step only they needed
    /// stays until its attempt ends (a soft supersede lets it finish): it
    /// is recorded as usual if it succeeds or fails, and dropped if it is
    /// aborted (see [`Graph::drop_if_unneeded`]).
    pub fn remove_builds_keeping_running(&mut self, ids: &[BuildId]) -> Dropped {
        let candidates = self.detach_builds(ids);
        self.drop_unneeded(candidates, true)
    }

    /// Drops `id` if no build needs it (a step kept running for a removed
    /// build, whose attempt was aborted). Returns whether it was dropped.
    /// Its inputs that still run (it may have run ahead of them) stay
    /// until their attempts end, as for the soft removal that kept it.
    pub fn drop_if_unneeded(&mut self, id: StepId) -> bool {
        let dropped = self.drop_unneeded(vec![id], true);
        !dropped.steps.is_empty()
    }

    /// Takes `ids` out of the graph; returns the top-level steps that may
    /// now be unneeded.
    fn detach_builds(&mut self, ids: &[BuildId]) -> Vec<StepId> {
        let mut candidates = Vec::new();
        for id in ids {
            let Some(build) = self.builds.remove(id) else {
                continue;
            };
            if let Some(top) = self.by_path.get(&build.drv_path).copied() {
                self.steps
                    .get_mut(&top)
                    .expect("top")
                    .toplevel_of
                    .retain(|b| b != id);
                candidates.push(top);
            }
        }
        candidates
    }

    /// Removes, from `candidates` downwards, every step that no build has as
    /// top level and no step waits for (but running ones, with
    /// `keep_running`).
    fn drop_unneeded(&mut self, mut todo: Vec<StepId>, keep_running: bool) -> Dropped {
        let mut dropped = Dropped::default();
        while let Some(id) = todo.pop() {
            let Some(step) = self.steps.get(&id) else {
                continue;
            };
            let live_top = step.toplevel_of.iter().any(|b| self.builds.contains_key(b));
            if live_top || !step.rdeps.is_empty() {
                continue;
            }
            // A step sent ahead of inputs that have not built is not
            // building yet: it goes, like the steps that never started.
            if keep_running && step.running_attempt().is_some() && !self.follows_unbuilt(id) {
                continue;
            }
            let step = self.remove_step(id);
            for d in &step.deps {
                self.steps.get_mut(d).expect("dep").rdeps.remove(&id);
                todo.push(*d);
            }
            dropped.note(&step);
        }
        dropped
    }

    fn remove_step(&mut self, id: StepId) -> Step {
        let step = self
            .steps
            .remove(&id)
            .map(|boxed| *boxed)
            .expect("removing a step in the graph");
        self.by_path.remove(&step.drv_path);
        for alias in &step.resolved_from {
            self.by_path.remove(alias);
        }
        self.runnable.remove(step.kind, id);
        self.to_resolve.remove(&id);
        step
    }

    /// Marks when a runnable step was first found with no machine able to
    /// build it (None clears it).
    pub fn set_unsupported_since(&mut self, id: StepId, since: Option<Instant>) {
        if let Some(s) = self.steps.get_mut(&id) {
            s.unsupported_since = since;
            if since.is_some() {
                self.runnable.bucket_mut(s.kind).marked = true;
            }
        }
    }
}

impl Dropped {
    fn note(&mut self, step: &Step) {
        if let Some((attempt, machine)) = step.running_attempt() {
            self.running.push((*attempt, machine.to_owned()));
        }
        self.steps.push(step.drv_path.clone());
    }

    fn extend(&mut self, other: Dropped) {
        self.steps.extend(other.steps);
        self.running.extend(other.running);
    }
}

#[cfg(test)]
mod tests;
