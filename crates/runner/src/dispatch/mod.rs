//! The dispatcher: gives runnable steps to machines, in priority order.
//!
//! It sleeps until woken (a step became runnable, a slot came free, a
//! machine joined) or until the next deadline (a backoff ends, a step has
//! been unsupported for too long). Pings do not wake it.

pub mod machines;
pub mod order;
mod start;

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hydra_nix::StorePath;
use uuid::Uuid;

use crate::graph::{Build, SchedFacts, StepId, StepState};
use crate::{Fatal, Shared};
use machines::{ControlTx, NoMachine};
use order::OrderKey;

pub use start::start_attempt;

/// A step given to a machine, before it is persisted and sent.
#[derive(Debug)]
pub struct Assignment {
    pub step: StepId,
    pub drv_path: StorePath,
    pub system: String,
    pub attempt: Uuid,
    pub machine: String,
    pub connection: String,
    pub tx: ControlTx,
    /// The build whose BuildSteps records the attempt.
    pub owner: Build,
    /// When the step became runnable (for the dispatch latency).
    pub runnable_since: Instant,
    /// Every live build that needs the step (for its events).
    pub builds: Vec<crate::graph::BuildId>,
    pub facts: SchedFacts,
}

/// What one round decided.
#[derive(Debug, Default)]
pub struct Round {
    pub assignments: Vec<Assignment>,
    /// Runnable steps no connected machine supported for too long.
    pub unsupported: Vec<StepId>,
    /// When the next round is due without a wake-up.
    pub next_deadline: Option<Instant>,
}

/// Attempts started at once in a round.
const CONCURRENT_STARTS: usize = 16;

pub async fn run(shared: Arc<Shared>) -> Result<(), Fatal> {
    use futures::TryStreamExt;
    loop {
        let began = Instant::now();
        let round = plan_round(&shared, began);
        shared.metrics.round_seconds.lock().observe(began.elapsed());
        for step in round.unsupported {
            crate::completion::fail_unsupported(&shared, step).await?;
        }
        // Each start reads the `.drv`, writes a transaction and sends the
        // job: mostly waiting, so many go at once.
        futures::stream::iter(round.assignments.into_iter().map(Ok))
            .try_for_each_concurrent(CONCURRENT_STARTS, |a| start_attempt(&shared, a))
            .await?;
        match round.next_deadline {
            Some(deadline) => {
                tokio::select! {
                    _ = shared.wake_dispatcher.notified() => {}
                    _ = tokio::time::sleep_until(deadline.into()) => {}
                }
            }
            None => shared.wake_dispatcher.notified().await,
        }
    }
}

/// A kind of step, as machines see it: its system and required features.
type Kind = (String, Vec<String>);

/// Decides which runnable steps go where, and marks them dispatched.
pub fn plan_round(shared: &Shared, now: Instant) -> Round {
    let mut graph = shared.graph.lock();
    let mut machines = shared.machines.lock();
    let shares = shared.shares.lock();
    let config = shared.config();
    let max_unsupported = Duration::from_secs(config.max_unsupported_secs);

    let aging = config.priority_aging_secs;
    let mut round = Round::default();
    let due = |t: Instant, round: &mut Round| {
        round.next_deadline = Some(round.next_deadline.map_or(t, |d| d.min(t)));
    };
    // Machines that went away count as supporting what they offered for
    // `machine_memory_secs`: a reboot of the only aarch64 builder must not
    // fail every aarch64 step as unsupported.
    let memory = Duration::from_secs(config.machine_memory_secs);
    machines.forget_departed(now, memory);
    if let Some(t) = machines.next_forgotten(memory) {
        due(t, &mut round);
    }

    // Steps no connected machine supports are set aside before sorting
    // (a queue full of them must not slow every round); which kinds of
    // step have no free machine is remembered for the rest of the round.
    // With no machine connected at all, it is an outage, not an
    // unsupported system: nothing fails for it.
    let outage = machines.is_empty();
    let mut supported: HashMap<(&str, &[String]), bool> = HashMap::new();
    let mut newly_unsupported = Vec::new();
    let mut queue: Vec<(OrderKey, StepId)> = Vec::new();
    for (id, step) in graph.runnable() {
        let any = *supported
            .entry((&step.system, &step.required_features))
            .or_insert_with(|| machines.supports_any(&step.system, &step.required_features));
        match step.state {
            StepState::Runnable {
                not_before: Some(t),
                ..
            } if t > now => due(t, &mut round),
            _ if !any => {
                if outage {
                    continue;
                }
                let since = step.unsupported_since.unwrap_or(now);
                if step.unsupported_since.is_none() {
                    newly_unsupported.push(id);
                }
                if now.duration_since(since) >= max_unsupported {
                    round.unsupported.push(id);
                } else {
                    due(since + max_unsupported, &mut round);
                }
            }
            StepState::Runnable { since, .. } => {
                let bonus = order::aging_bonus(now.saturating_duration_since(since), aging);
                queue.push((OrderKey::new(&step.sched, &shares, bonus), id));
            }
            _ => queue.push((OrderKey::new(&step.sched, &shares, 0), id)),
        }
    }
    drop(supported);
    for id in newly_unsupported {
        graph.set_unsupported_since(id, Some(now));
    }
    queue.sort_by(|a, b| a.0.dispatch_order(&b.0));

    let mut full: HashSet<Kind> = HashSet::new();
    for (_, id) in queue {
        let step = graph.step(id).expect("runnable step");
        let kind = (step.system.clone(), step.required_features.clone());
        let chosen = if full.contains(&kind) {
            Err(NoMachine::Busy)
        } else {
            machines.choose(
                &step.system,
                &step.required_features,
                config.min_free_disk,
                now,
                &step.failed_on,
            )
        };
        match chosen {
            // No connected machine, but one that went away supports it
            // (those nobody supports were set aside before sorting): it
            // waits for that machine as for a busy one.
            Err(NoMachine::Unsupported | NoMachine::Busy) => {
                if step.unsupported_since.is_some() {
                    graph.set_unsupported_since(id, None);
                }
                if full.insert(kind)
                    && let Some(t) = machines.next_rest_end(now)
                {
                    due(t, &mut round);
                }
            }
            Ok(machine) => {
                let attempt = Uuid::new_v4();
                let (owner, builds) = graph
                    .owner_and_dependents(id)
                    .expect("a step in the graph has a build");
                let assignment = Assignment {
                    step: id,
                    drv_path: step.drv_path.clone(),
                    system: step.system.clone(),
                    attempt,
                    machine: machine.name.clone(),
                    connection: machine.connection.clone(),
                    tx: machine.tx.clone(),
                    owner,
                    builds,
                    // After a backoff, from its end.
                    runnable_since: match step.state {
                        StepState::Runnable { since, not_before } => {
                            not_before.map_or(since, |t| t.max(since))
                        }
                        _ => now,
                    },
                    facts: step.sched.clone(),
                };
                graph.set_unsupported_since(id, None);
                graph
                    .mark_dispatched(id, attempt, &assignment.machine)
                    .expect("a runnable step can be dispatched");
                machines
                    .get_mut(&assignment.machine)
                    .expect("chosen machine")
                    .running
                    .insert(attempt);
                round.assignments.push(assignment);
            }
        }
    }
    round
}
