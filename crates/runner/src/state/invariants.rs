//! The invariants of the [`State`] handle, checked by its tests after
//! every event.

use super::State;

impl State {
    /// The invariants that make "this step runs" one fact, though three
    /// records hold it (the step's state, its machine's slot, the attempt):
    ///
    /// 1. every running attempt's step runs that attempt (or has left the
    ///    graph, when no build needs it and its end is being recorded);
    /// 2. a connected machine's slots hold only attempts of steps that run
    ///    on it;
    /// 3. a step that runs on a connected machine holds one of its slots;
    /// 4. an attempt that is not away is owned by its machine's current
    ///    connection; an away one's machine is not connected;
    /// 5. the graph's links are whole (`Graph::check_links`);
    /// 6. a slot freed for building by a built attempt is one of the
    ///    machine's running attempts, whose step was built there.
    pub fn check(&self) -> Result<(), String> {
        let inner = self.lock();
        inner.graph.check_links()?;
        for a in inner.attempts.iter() {
            let machine = inner.machines.get(&a.machine);
            match (&a.away, machine) {
                (None, Some(m)) if m.connection == a.connection => {}
                (None, _) => {
                    return Err(format!(
                        "attempt {} is not away, but its connection is not {}'s",
                        a.id, a.machine
                    ));
                }
                (Some(_), Some(_)) => {
                    return Err(format!(
                        "attempt {} is away, but {} is connected",
                        a.id, a.machine
                    ));
                }
                (Some(_), None) => {}
            }
        }
        for a in inner.attempts.iter() {
            if let Some(id) = inner.graph.step_id(&a.drv_path)
                && inner.graph.step_of_attempt(&a.drv_path, &a.id) != Some(id)
            {
                return Err(format!(
                    "attempt {} runs a step that runs something else",
                    a.id
                ));
            }
        }
        for m in inner.machines.connected() {
            for slot in &m.running {
                let runs_here = inner.graph.steps().any(|(_, s)| {
                    s.running_attempt()
                        .is_some_and(|(a, machine)| a == slot && machine == m.name)
                });
                if !runs_here {
                    return Err(format!(
                        "machine {} holds a slot for {slot}, which no step runs",
                        m.name
                    ));
                }
            }
            for up in &m.uploading {
                let built_here = inner.graph.steps().any(|(_, s)| {
                    matches!(&s.state, crate::graph::StepState::Running {
                        attempt, machine, built: true,
                    } if attempt == up && *machine == m.name)
                });
                if !m.running.contains(up) || !built_here {
                    return Err(format!(
                        "machine {} frees the build slot of {up}, which is not built there",
                        m.name
                    ));
                }
            }
        }
        for (_, s) in inner.graph.steps() {
            if let Some((a, machine)) = s.running_attempt()
                && let Some(m) = inner.machines.get(machine)
                && !m.running.contains(a)
            {
                return Err(format!("{} runs on {machine} without a slot", s.drv_path));
            }
        }
        Ok(())
    }
}
