//! Attempts that outlive their connection: a machine that leaves makes
//! its attempts *away* for `reconnect_grace_secs`, a machine that joins
//! re-adopts the ones it declares, and a runner that starts *inherits* the
//! attempts the runner before it left open, each taken up when its step
//! loads. Part of the [`State`] handle: the same lock, the same rules.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use hydra_nix::StorePath;
use uuid::Uuid;

use super::machines::{Machine, NameTaken};
use super::{Inner, State};
use crate::attempts::{Attempt, OpenAttempt};
use crate::graph::StepId;
use crate::tunnel::BuilderLink;

/// An attempt a builder is to carry on with: tell it through `link`.
#[derive(Debug, Clone)]
pub struct Adoption {
    pub attempt: Uuid,
    /// How much of the log the runner has: the builder sends the rest.
    pub log_offset: u64,
    pub link: BuilderLink,
}

/// What a builder's join decided about the attempts of its machine.
#[derive(Debug, Default)]
pub struct Joined {
    /// Attempts it declared and the runner holds: it carries on with them.
    pub adopted: Vec<Adoption>,
    /// Attempts it declared that the runner does not hold (finished,
    /// aborted, cancelled, or another machine's): it drops them.
    pub unknown: Vec<String>,
    /// The runner's attempts on this machine it did not declare (it
    /// restarted and lost them): to abort and retry.
    pub lost: Vec<Attempt>,
    /// Inherited attempts on this machine it did not declare: their rows
    /// are to be closed.
    pub lost_inherited: Vec<OpenAttempt>,
}

/// Attempts whose builder did not come back within the grace.
#[derive(Debug, Default)]
pub struct Expired {
    /// To abort and retry.
    pub attempts: Vec<Attempt>,
    /// Still running past their deadline: to stop on the builder (through
    /// the link, when connected), abort and retry.
    pub overdue: Vec<(Attempt, Option<BuilderLink>)>,
    /// Inherited ones never loaded: their rows are to be closed, and the
    /// builder that declared one (if still connected) told to drop it.
    pub inherited: Vec<(OpenAttempt, Option<BuilderLink>)>,
}

impl Expired {
    pub fn is_empty(&self) -> bool {
        self.attempts.is_empty() && self.inherited.is_empty() && self.overdue.is_empty()
    }
}

impl Inner {
    /// Takes up the inherited attempt of runnable step `id`, if there is
    /// one: the step runs it, on its machine's slot when the builder that
    /// declared it is connected (then it is returned, to tell the builder),
    /// else away until the attempt's deadline.
    pub(super) fn adopt_inherited(&mut self, id: StepId) -> Option<Adoption> {
        let step = self.graph.step(id)?;
        let drv = step.drv_path.clone();
        let timeout = Duration::from_secs(step.sched.timeout_secs.into());
        // Runnable only ahead of its inputs on another machine: the
        // inherited attempt cannot be this step's (it expires).
        if let Some(on) = step.only_on()
            && self.inherited.get(&drv).is_some_and(|o| o.machine != on)
        {
            return None;
        }
        let o = self.inherited.remove(&drv)?;
        let (owner, builds) = self.graph.owner_and_dependents(id)?;
        let _ = owner;
        if self.graph.mark_dispatched(id, o.id, &o.machine).is_err() {
            return None;
        }
        let live = o.claimed_by.as_ref().and_then(|c| {
            self.machines
                .get(&o.machine)
                .filter(|m| &m.connection == c)
                .map(|m| m.link.clone())
        });
        let attempt = Attempt {
            id: o.id,
            machine: o.machine.clone(),
            connection: o.claimed_by.clone().unwrap_or_default(),
            drv_path: o.drv_path,
            build: o.build,
            stepnr: o.stepnr,
            builds,
            start_time: o.start_time,
            dispatched_at: Instant::now(),
            outputs: o.outputs,
            uploads: Default::default(),
            log_bytes: o.log_bytes,
            away: live.is_none().then(|| crate::attempts::Away {
                until: o.deadline,
                why: "the runner restarted".to_owned(),
            }),
            inputs: None,
            ran_ahead_of: Vec::new(),
            busy: 0,
            deadline: (!timeout.is_zero()).then(|| Instant::now() + timeout + o.attempt_grace),
        };
        self.started_builds.insert(o.build);
        self.attempts.insert(attempt);
        let link = live?;
        self.machines
            .get_mut(&o.machine)
            .expect("connected")
            .running
            .insert(o.id);
        Some(Adoption {
            attempt: o.id,
            log_offset: o.log_bytes,
            link,
        })
    }

    /// Takes up the inherited attempts of steps that became runnable since
    /// they loaded (a dependent the runner before sent ahead of an input,
    /// runnable again once that input built or runs here again).
    pub(super) fn adopt_inherited_runnable(&mut self) -> Vec<Adoption> {
        if self.inherited.is_empty() {
            return Vec::new();
        }
        let runnable: Vec<StepId> = self
            .inherited
            .keys()
            .filter_map(|drv| self.graph.step_id(drv))
            .filter(|id| self.graph.step(*id).is_some_and(|s| s.is_runnable()))
            .collect();
        runnable
            .into_iter()
            .filter_map(|id| self.adopt_inherited(id))
            .collect()
    }
}

impl State {
    /// The attempts a runner before this one left open: each waits for its
    /// builder (until its deadline) and is taken up when its step loads.
    pub fn attempts_inherited(&self, open: Vec<OpenAttempt>) {
        let mut inner = self.lock();
        for o in open {
            inner.inherited.insert(o.drv_path.clone(), o);
        }
    }

    /// Whether an attempt inherited from the runner before runs `drv`: the
    /// loader makes it a step even when its outputs are valid (they were
    /// imported, but the runner died before recording the success), so the
    /// builder's report is recorded rather than the row left busy.
    pub fn has_inherited(&self, drv: &StorePath) -> bool {
        self.lock().inherited.contains_key(drv)
    }

    /// How many inherited attempts still wait for their step to load.
    pub fn inherited_waiting(&self) -> usize {
        self.lock().inherited.len()
    }

    /// A builder joined, declaring the attempts it holds (`held`, ids).
    /// Refused (with the reason) when another builder process is connected
    /// under its name. Otherwise every attempt of the machine, away or
    /// owned by a connection it replaces, is re-adopted when declared and
    /// handed back as lost when not; declared ones the runner does not hold
    /// are to be dropped. `on_joined` runs while no job can be queued for
    /// it yet (the welcome goes first).
    pub fn machine_joined(
        &self,
        machine: Machine,
        held: &[String],
        on_joined: impl FnOnce(),
    ) -> Result<Joined, NameTaken> {
        let joined = {
            let mut inner = self.lock();
            let (name, connection, link) = (
                machine.name.clone(),
                machine.connection.clone(),
                machine.link.clone(),
            );
            let follows = machine.follows_local_jobs;
            inner.machines.register(machine)?;
            inner.graph.machine_follows(&name, follows);
            on_joined();
            let declared: HashSet<&str> = held.iter().map(String::as_str).collect();
            let mut matched: HashSet<String> = HashSet::new();
            let mut joined = Joined::default();
            let Inner {
                machines,
                attempts,
                inherited,
                ..
            } = &mut *inner;
            let slots = machines.get_mut(&name).expect("just registered");
            for id in attempts.of_machine(&name) {
                let key = id.to_string();
                // Declared or not, it holds a slot until it ends.
                slots.running.insert(id);
                if declared.contains(key.as_str()) {
                    let a = attempts.get_mut(&id).expect("listed");
                    a.connection = connection.clone();
                    a.away = None;
                    joined.adopted.push(Adoption {
                        attempt: id,
                        log_offset: a.log_bytes,
                        link: link.clone(),
                    });
                    matched.insert(key);
                } else {
                    joined.lost.extend(attempts.take(&id));
                }
            }
            let mine: Vec<StorePath> = inherited
                .iter()
                .filter(|(_, o)| o.machine == name)
                .map(|(drv, _)| drv.clone())
                .collect();
            for drv in mine {
                let o = inherited.get_mut(&drv).expect("listed");
                let key = o.id.to_string();
                if declared.contains(key.as_str()) {
                    o.claimed_by = Some(connection.clone());
                    matched.insert(key);
                } else {
                    joined.lost_inherited.extend(inherited.remove(&drv));
                }
            }
            joined.unknown = held
                .iter()
                .filter(|id| !matched.contains(id.as_str()))
                .cloned()
                .collect();
            joined
        };
        self.wake();
        Ok(joined)
    }

    /// The machine's connection ended: it leaves (remembered for
    /// `machine_memory_secs`), and its running attempts are away until
    /// `now + grace`: the builder may come back and re-adopt them, and they
    /// are aborted after. One step: no attempt can start on it after this.
    pub fn machine_left(
        &self,
        name: &str,
        connection: &str,
        why: &str,
        now: Instant,
        grace: Duration,
    ) {
        {
            let mut inner = self.lock();
            inner.machines.unregister(name, connection, now);
            inner.attempts.set_away(connection, now + grace, why);
        }
        self.wake();
    }

    /// Takes the attempts whose time is up: away ones whose builder did not
    /// come back (to abort), inherited ones never loaded (to close), and
    /// running ones past their deadline (to stop and abort).
    pub fn adoption_expired(&self, now: Instant) -> Expired {
        let mut inner = self.lock();
        let attempts = inner.attempts.take_expired(now);
        let due: Vec<StorePath> = inner
            .inherited
            .iter()
            .filter(|(_, o)| o.deadline <= now)
            .map(|(drv, _)| drv.clone())
            .collect();
        let mut inherited = Vec::new();
        for drv in due {
            let o = inner.inherited.remove(&drv).expect("listed");
            let link = o.claimed_by.as_ref().and_then(|c| {
                inner
                    .machines
                    .get(&o.machine)
                    .filter(|m| &m.connection == c)
                    .map(|m| m.link.clone())
            });
            inherited.push((o, link));
        }
        let overdue = inner
            .attempts
            .take_overdue(now)
            .into_iter()
            .map(|a| {
                let link = inner
                    .machines
                    .get(&a.machine)
                    .filter(|m| m.connection == a.connection)
                    .map(|m| m.link.clone());
                (a, link)
            })
            .collect();
        Expired {
            attempts,
            inherited,
            overdue,
        }
    }
}
