//! One view of the machines and the queue, for everything that shows
//! them: the status document, hydra-web's `/status/machines`, `/metrics`,
//! the status page and the client API's Machines call.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use hydra_nix::StorePath;

use crate::attempts::Attempts;
use crate::state::machines::Machines;

/// How much is queued and running.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct QueueCounts {
    pub builds: usize,
    pub steps: usize,
    pub runnable: usize,
    pub running: usize,
    /// Connected machines.
    pub machines: usize,
}

/// A machine as every status view shows it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct MachineView {
    pub name: String,
    /// Connected now (a drained or recently failing machine is shown
    /// while away too).
    pub connected: bool,
    pub systems: Vec<String>,
    pub supported_features: Vec<String>,
    pub mandatory_features: Vec<String>,
    pub max_jobs: u32,
    /// Slots in use.
    pub running: u32,
    pub speed_factor: f32,
    pub load1: f32,
    pub substituter_timeouts: u64,
    pub drained: bool,
    /// Resting after repeated failures, for this long.
    pub rested_for: Option<Duration>,
    pub consecutive_failures: u32,
    /// Attempts ended on it since the runner started, and their average.
    pub steps_done: u64,
    pub avg_step: Duration,
    /// The derivations it runs.
    pub current_steps: Vec<StorePath>,
}

impl MachineView {
    /// Whether it would take a step now (a slot free, not drained or
    /// resting).
    pub fn has_capacity(&self) -> bool {
        self.connected && self.running < self.max_jobs && !self.drained && self.rested_for.is_none()
    }
}

pub(super) fn machines(machines: &Machines, attempts: &Attempts, now: Instant) -> Vec<MachineView> {
    let mut current: BTreeMap<&str, Vec<StorePath>> = BTreeMap::new();
    for a in attempts.iter() {
        current
            .entry(a.machine.as_str())
            .or_default()
            .push(a.drv_path.clone());
    }
    let mut by_name: BTreeMap<String, MachineView> = BTreeMap::new();
    let rest = |name: &str| {
        let health = machines.health(name);
        (
            health
                .rested_until
                .filter(|t| *t > now)
                .map(|t| t.duration_since(now)),
            health.consecutive_failures,
        )
    };
    let done = |name: &str| {
        let d = machines.done(name);
        let avg = Duration::from_millis(d.total_millis.checked_div(d.steps).unwrap_or(0));
        (d.steps, avg)
    };
    for m in machines.connected() {
        let (rested_for, consecutive_failures) = rest(&m.name);
        let (steps_done, avg_step) = done(&m.name);
        by_name.insert(
            m.name.clone(),
            MachineView {
                name: m.name.clone(),
                connected: true,
                systems: m.systems.clone(),
                supported_features: m.supported_features.clone(),
                mandatory_features: m.mandatory_features.clone(),
                max_jobs: m.max_jobs,
                running: m.running.len() as u32,
                speed_factor: m.speed_factor,
                load1: m.load1,
                substituter_timeouts: m.substituter_timeouts,
                drained: machines.is_drained(&m.name),
                rested_for,
                consecutive_failures,
                steps_done,
                avg_step,
                current_steps: current.remove(m.name.as_str()).unwrap_or_default(),
            },
        );
    }
    let away = machines
        .drained_names()
        .cloned()
        .chain(machines.all_health().map(|(n, _)| n.clone()));
    for name in away {
        by_name.entry(name.clone()).or_insert_with(|| {
            let (rested_for, consecutive_failures) = rest(&name);
            let (steps_done, avg_step) = done(&name);
            MachineView {
                drained: machines.is_drained(&name),
                rested_for,
                consecutive_failures,
                steps_done,
                avg_step,
                name,
                ..MachineView::default()
            }
        });
    }
    by_name.into_values().collect()
}
