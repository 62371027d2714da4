//! Connected builders and the choice of a machine for a step.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use uuid::Uuid;

use crate::tunnel::BuilderLink;

#[derive(Debug)]
pub struct Machine {
    pub name: String,
    /// This connection's id (Welcome.machine_id).
    pub connection: String,
    /// The builder process's own id (Join.instance_id): a reconnect of
    /// the same process may replace its old connection, another builder
    /// using the same name may not.
    pub instance_id: String,
    pub systems: Vec<String>,
    pub supported_features: Vec<String>,
    pub mandatory_features: Vec<String>,
    pub max_jobs: u32,
    pub speed_factor: f32,
    pub running: HashSet<Uuid>,
    /// Those of `running` whose builder said they are built: they send
    /// their outputs and no longer take a build slot (a dependent may be
    /// sent into it, to start as soon as its input, building next to it,
    /// is built).
    pub uploading: HashSet<Uuid>,
    pub load1: f32,
    /// Unknown until the first ping.
    pub free_disk: Option<u64>,
    /// Substitutions from binary caches that timed out on the machine.
    pub substituter_timeouts: u64,
    /// Where jobs, aborts and settings go.
    pub link: BuilderLink,
    /// The builder starts a job after local jobs it names
    /// (Join.follows_local_jobs): dependents may be sent to it while their
    /// inputs still build there.
    pub follows_local_jobs: bool,
}

/// System and features, as Hydra matches them: the system is one of the
/// machine's (`builtin` runs anywhere), every required feature is
/// supported, and every mandatory feature of the machine is required.
fn supports(
    systems: &[String],
    supported: &[String],
    mandatory: &[String],
    system: &str,
    required: &[String],
) -> bool {
    (system == "builtin" || systems.iter().any(|s| s == system))
        && required
            .iter()
            .all(|f| supported.contains(f) || mandatory.contains(f))
        && mandatory.iter().all(|f| required.contains(f))
}

impl Machine {
    pub fn supports(&self, system: &str, required: &[String]) -> bool {
        supports(
            &self.systems,
            &self.supported_features,
            &self.mandatory_features,
            system,
            required,
        )
    }

    /// Slots not taken by an attempt that is building (or about to).
    pub fn free_slots(&self) -> u32 {
        self.max_jobs.saturating_sub(self.building())
    }

    /// Attempts that hold a build slot: running, not yet built.
    pub fn building(&self) -> u32 {
        (self.running.len() - self.running.intersection(&self.uploading).count()) as u32
    }

    pub fn has_disk(&self, min_free: u64) -> bool {
        self.free_disk.is_none_or(|free| free >= min_free)
    }
}

/// How a machine has fared lately. Kept by name across reconnects: a
/// machine that crashes and comes back is the same machine.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Health {
    /// Aborted attempts (builder faults) since its last completed one.
    pub consecutive_failures: u32,
    /// It gets no steps before this.
    pub rested_until: Option<Instant>,
}

/// A machine that went away (a reboot, a network cut): what it offered,
/// remembered for `machine_memory_secs`, so that the steps only it builds
/// wait for it rather than fail as unsupported.
#[derive(Debug, Clone)]
pub struct Departed {
    pub systems: Vec<String>,
    pub supported_features: Vec<String>,
    pub mandatory_features: Vec<String>,
    pub left: Instant,
}

/// What a machine has done since the runner started, by name (for the
/// status Hydra's web interface shows).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Done {
    pub steps: u64,
    pub total_millis: u64,
}

#[derive(Debug, Default)]
pub struct Machines {
    by_name: HashMap<String, Machine>,
    done: HashMap<String, Done>,
    departed: HashMap<String, Departed>,
    health: HashMap<String, Health>,
    /// Drained by an operator (by name, connected or not): they finish
    /// what they run and get nothing new.
    drained: HashSet<String>,
}

/// Why the machines that support a step do not take it now (for Explain).
#[derive(Debug, PartialEq, Eq)]
pub enum Availability {
    /// A machine could take it: the next dispatch round will.
    Free,
    /// No connected machine supports the system and features.
    Unsupported,
    /// Only machines that went away support it; it waits for them (until
    /// `machine_memory_secs` after the last left).
    Away { machines: Vec<String> },
    /// Every supporting machine is drained.
    Drained,
    /// Every supporting machine not drained is resting, until the earliest.
    Rested { until: Instant },
    /// Every supporting machine is short of disk.
    LowDisk,
    /// Every supporting machine's slots are taken.
    NoFreeSlot { machines: usize, slots: u32 },
}

/// Another builder process is connected under this machine name.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
#[error(
    "the machine name '{0}' is in use by another connected builder; give each builder a machine_name of its own (the default is the host name). If this builder restarted, the runner frees the name once it notices the old connection is gone (within ping_timeout_secs)"
)]
pub struct NameTaken(pub String);

/// Why no machine took a step.
#[derive(Debug, PartialEq, Eq)]
pub enum NoMachine {
    /// No connected machine supports the system and features.
    Unsupported,
    /// Some do, but none has a free slot and disk.
    Busy,
}

impl Machines {
    /// Adds a machine; returns the previous connection of the same name,
    /// whose attempts are lost. Refuses (returning it) a machine whose
    /// name another builder process is connected under: two builders of
    /// one name would take each other's connection and attempts.
    pub fn register(&mut self, machine: Machine) -> Result<Option<Machine>, NameTaken> {
        if let Some(old) = self.by_name.get(&machine.name)
            && old.instance_id != machine.instance_id
        {
            return Err(NameTaken(machine.name));
        }
        self.departed.remove(&machine.name);
        Ok(self.by_name.insert(machine.name.clone(), machine))
    }

    /// Removes the machine if `connection` is still its connection; what
    /// it offered is remembered (see [`Departed`]).
    pub fn unregister(&mut self, name: &str, connection: &str, now: Instant) -> Option<Machine> {
        if self.by_name.get(name)?.connection != connection {
            return None;
        }
        let gone = self.by_name.remove(name)?;
        self.departed.insert(
            name.to_owned(),
            Departed {
                systems: gone.systems.clone(),
                supported_features: gone.supported_features.clone(),
                mandatory_features: gone.mandatory_features.clone(),
                left: now,
            },
        );
        Some(gone)
    }

    /// Forgets machines that left more than `memory` ago.
    pub fn forget_departed(&mut self, now: Instant, memory: Duration) {
        self.departed
            .retain(|_, d| now.saturating_duration_since(d.left) < memory);
    }

    /// Machines that went away and are still remembered, by name.
    pub fn departed(&self) -> impl Iterator<Item = (&String, &Departed)> {
        self.departed.iter()
    }

    /// When the next remembered machine is forgotten (the dispatcher looks
    /// again then: steps only it supported may be unsupported now).
    pub fn next_forgotten(&self, memory: Duration) -> Option<Instant> {
        self.departed.values().map(|d| d.left + memory).min()
    }

    /// Remembered machines that would support `system` with `required`.
    fn away_supporting(&self, system: &str, required: &[String]) -> Vec<String> {
        let mut names: Vec<String> = self
            .departed
            .iter()
            .filter(|(_, d)| {
                supports(
                    &d.systems,
                    &d.supported_features,
                    &d.mandatory_features,
                    system,
                    required,
                )
            })
            .map(|(n, _)| n.clone())
            .collect();
        names.sort();
        names
    }

    /// The name of the machine whose current connection is `connection`.
    pub fn name_of(&self, connection: &str) -> Option<String> {
        self.by_name
            .values()
            .find(|m| m.connection == connection)
            .map(|m| m.name.clone())
    }

    pub fn get(&self, name: &str) -> Option<&Machine> {
        self.by_name.get(name)
    }

    pub fn get_mut(&mut self, name: &str) -> Option<&mut Machine> {
        self.by_name.get_mut(name)
    }

    pub fn is_empty(&self) -> bool {
        self.by_name.is_empty()
    }

    /// Frees the slot `attempt` held on `name`.
    pub fn release(&mut self, name: &str, attempt: &Uuid) {
        if let Some(m) = self.by_name.get_mut(name) {
            m.running.remove(attempt);
            m.uploading.remove(attempt);
        }
    }

    /// `attempt` on `name` is built and sends its outputs: its build slot
    /// is free (the attempt still runs until it ends).
    pub fn built(&mut self, name: &str, attempt: &Uuid) {
        if let Some(m) = self.by_name.get_mut(name)
            && m.running.contains(attempt)
        {
            m.uploading.insert(*attempt);
        }
    }

    /// An attempt on `name` ended after `took` (its slot is released
    /// separately).
    pub fn count_done(&mut self, name: &str, took: Duration) {
        let done = self.done.entry(name.to_owned()).or_default();
        done.steps += 1;
        done.total_millis += took.as_millis() as u64;
    }

    /// What `name` has done since the runner started.
    pub fn done(&self, name: &str) -> Done {
        self.done.get(name).copied().unwrap_or_default()
    }

    /// An attempt on `name` aborted (a builder fault). Returns how long
    /// the machine now rests, when this failure makes it rest.
    pub fn record_failure(
        &mut self,
        name: &str,
        now: Instant,
        rest: impl Fn(u32) -> Option<Duration>,
    ) -> Option<Duration> {
        let health = self.health.entry(name.to_owned()).or_default();
        health.consecutive_failures += 1;
        let pause = rest(health.consecutive_failures)?;
        health.rested_until = Some(now + pause);
        Some(pause)
    }

    /// An attempt on `name` completed (built, or failed as a build): the
    /// machine works.
    pub fn record_success(&mut self, name: &str) {
        self.health.remove(name);
    }

    pub fn connected(&self) -> impl Iterator<Item = &Machine> {
        self.by_name.values()
    }

    /// Every machine that failed lately, connected or not.
    pub fn all_health(&self) -> impl Iterator<Item = (&String, &Health)> {
        self.health.iter()
    }

    pub fn health(&self, name: &str) -> Health {
        self.health.get(name).cloned().unwrap_or_default()
    }

    /// The earliest end of a rest after `now`, when the dispatcher must
    /// look again.
    pub fn next_rest_end(&self, now: Instant) -> Option<Instant> {
        self.health
            .values()
            .filter_map(|h| h.rested_until)
            .filter(|t| *t > now)
            .min()
    }

    /// Whether any connected machine supports `system` with `required`
    /// (busy, resting or drained ones too), or a remembered one that went
    /// away (call [`Machines::forget_departed`] first).
    pub fn supports_any(&self, system: &str, required: &[String]) -> bool {
        self.by_name.values().any(|m| m.supports(system, required))
            || !self.away_supporting(system, required).is_empty()
    }

    /// Drains (`true`) or undrains a machine by name.
    pub fn set_drained(&mut self, name: &str, drained: bool) {
        if drained {
            self.drained.insert(name.to_owned());
        } else {
            self.drained.remove(name);
        }
    }

    pub fn drained_names(&self) -> impl Iterator<Item = &String> {
        self.drained.iter()
    }

    pub fn is_drained(&self, name: &str) -> bool {
        self.drained.contains(name)
    }

    /// Why a step of `system` needing `required` is not taken (the same
    /// tests as [`Machines::choose`], reported instead of applied).
    pub fn availability(
        &self,
        system: &str,
        required: &[String],
        min_free_disk: u64,
        now: Instant,
    ) -> Availability {
        let supporting: Vec<&Machine> = self
            .by_name
            .values()
            .filter(|m| m.supports(system, required))
            .collect();
        if supporting.is_empty() {
            let away = self.away_supporting(system, required);
            if !away.is_empty() {
                return Availability::Away { machines: away };
            }
            return Availability::Unsupported;
        }
        let open: Vec<&&Machine> = supporting
            .iter()
            .filter(|m| !self.drained.contains(&m.name))
            .collect();
        if open.is_empty() {
            return Availability::Drained;
        }
        let awake: Vec<&&&Machine> = open
            .iter()
            .filter(|m| !self.is_rested(&m.name, now))
            .collect();
        if awake.is_empty() {
            let until = open
                .iter()
                .filter_map(|m| self.health.get(&m.name).and_then(|h| h.rested_until))
                .min()
                .unwrap_or(now);
            return Availability::Rested { until };
        }
        if awake.iter().all(|m| !m.has_disk(min_free_disk)) {
            return Availability::LowDisk;
        }
        if awake.iter().all(|m| m.free_slots() == 0) {
            return Availability::NoFreeSlot {
                machines: awake.len(),
                slots: awake.iter().map(|m| m.max_jobs).sum(),
            };
        }
        Availability::Free
    }

    fn is_rested(&self, name: &str, now: Instant) -> bool {
        self.health
            .get(name)
            .and_then(|h| h.rested_until)
            .is_some_and(|t| t > now)
    }

    /// The best machine for a step: one not in `avoid` (machines its
    /// earlier attempts aborted on) when there is one, then the fastest,
    /// the fewest of its slots in use, the lowest reported load. Rested
    /// and drained machines count as busy, never as unsupported.
    pub fn choose(
        &self,
        system: &str,
        required: &[String],
        min_free_disk: u64,
        now: Instant,
        avoid: &[String],
    ) -> Result<&Machine, NoMachine> {
        self.choose_with(
            system,
            required,
            min_free_disk,
            now,
            avoid,
            &[],
            &HashMap::new(),
            None,
        )
    }

    /// [`Machines::choose`], preferring (after `avoid`) the machines that
    /// hold the most of the step's inputs (`holding`: machine, inputs it
    /// built), with `planned` slots of some machines already promised (to
    /// steps earlier in the same round); only machine `only` when given (a
    /// step running ahead of inputs that only that machine holds).
    #[allow(clippy::too_many_arguments)]
    pub fn choose_with(
        &self,
        system: &str,
        required: &[String],
        min_free_disk: u64,
        now: Instant,
        avoid: &[String],
        holding: &[(String, u32)],
        planned: &HashMap<String, u32>,
        only: Option<&str>,
    ) -> Result<&Machine, NoMachine> {
        let mut supporting = self
            .by_name
            .values()
            .filter(|m| m.supports(system, required))
            .peekable();
        if supporting.peek().is_none() {
            return Err(NoMachine::Unsupported);
        }
        let taken = |m: &Machine| planned.get(&m.name).copied().unwrap_or(0);
        let load = |m: &Machine| (m.building() + taken(m)) as f32 / m.max_jobs.max(1) as f32;
        supporting
            .filter(|m| {
                only.is_none_or(|o| o == m.name)
                    && m.free_slots() > taken(m)
                    && m.has_disk(min_free_disk)
                    && !self.is_rested(&m.name, now)
                    && !self.drained.contains(&m.name)
            })
            .max_by(|a, b| {
                let fresh = |m: &Machine| !avoid.contains(&m.name);
                let held = |m: &Machine| {
                    holding
                        .iter()
                        .find(|(h, _)| *h == m.name)
                        .map_or(0, |(_, n)| *n)
                };
                fresh(a)
                    .cmp(&fresh(b))
                    .then(held(a).cmp(&held(b)))
                    .then(a.speed_factor.total_cmp(&b.speed_factor))
                    .then(load(b).total_cmp(&load(a)))
                    .then(b.load1.total_cmp(&a.load1))
                    .then(b.name.cmp(&a.name))
            })
            .ok_or(NoMachine::Busy)
    }
}

#[cfg(test)]
#[path = "machines_tests.rs"]
mod tests;
