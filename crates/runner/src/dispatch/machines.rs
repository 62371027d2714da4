//! Connected builders and the choice of a machine for a step.

use std::collections::{HashMap, HashSet};

use hydra_proto::v1::RunnerMessage;
use tokio::sync::mpsc;
use uuid::Uuid;

/// The sending half of a builder's control stream.
pub type ControlTx = mpsc::Sender<Result<RunnerMessage, tonic::Status>>;

#[derive(Debug)]
pub struct Machine {
    pub name: String,
    /// This connection's id (Welcome.machine_id).
    pub connection: String,
    pub systems: Vec<String>,
    pub supported_features: Vec<String>,
    pub mandatory_features: Vec<String>,
    pub max_jobs: u32,
    pub speed_factor: f32,
    pub running: HashSet<Uuid>,
    pub load1: f32,
    /// Unknown until the first ping.
    pub free_disk: Option<u64>,
    pub tx: ControlTx,
}

impl Machine {
    /// System and features, as Hydra matches them: the system is one of the
    /// machine's (`builtin` runs anywhere), every required feature is
    /// supported, and every mandatory feature of the machine is required.
    pub fn supports(&self, system: &str, required: &[String]) -> bool {
        (system == "builtin" || self.systems.iter().any(|s| s == system))
            && required
                .iter()
                .all(|f| self.supported_features.contains(f) || self.mandatory_features.contains(f))
            && self.mandatory_features.iter().all(|f| required.contains(f))
    }

    pub fn free_slots(&self) -> u32 {
        self.max_jobs.saturating_sub(self.running.len() as u32)
    }

    fn has_disk(&self, min_free: u64) -> bool {
        self.free_disk.is_none_or(|free| free >= min_free)
    }

    fn load(&self) -> f32 {
        self.running.len() as f32 / self.max_jobs.max(1) as f32
    }
}

#[derive(Debug, Default)]
pub struct Machines {
    by_name: HashMap<String, Machine>,
}

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
    /// whose attempts are lost.
    pub fn register(&mut self, machine: Machine) -> Option<Machine> {
        self.by_name.insert(machine.name.clone(), machine)
    }

    /// Removes the machine if `connection` is still its connection.
    pub fn unregister(&mut self, name: &str, connection: &str) -> Option<Machine> {
        if self.by_name.get(name)?.connection == connection {
            self.by_name.remove(name)
        } else {
            None
        }
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
        }
    }

    /// The best machine for a step: fastest, then fewest of its slots in
    /// use, then the lowest reported load.
    pub fn choose(
        &self,
        system: &str,
        required: &[String],
        min_free_disk: u64,
    ) -> Result<&Machine, NoMachine> {
        let mut supporting = self
            .by_name
            .values()
            .filter(|m| m.supports(system, required))
            .peekable();
        if supporting.peek().is_none() {
            return Err(NoMachine::Unsupported);
        }
        supporting
            .filter(|m| m.free_slots() > 0 && m.has_disk(min_free_disk))
            .max_by(|a, b| {
                a.speed_factor
                    .total_cmp(&b.speed_factor)
                    .then(b.load().total_cmp(&a.load()))
                    .then(b.load1.total_cmp(&a.load1))
                    .then(b.name.cmp(&a.name))
            })
            .ok_or(NoMachine::Busy)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn machine(
        name: &str,
        systems: &[&str],
        features: &[&str],
        mandatory: &[&str],
        speed: f32,
        jobs: u32,
    ) -> Machine {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect();
        Machine {
            name: name.into(),
            connection: format!("{name}-conn"),
            systems: s(systems),
            supported_features: s(features),
            mandatory_features: s(mandatory),
            max_jobs: jobs,
            speed_factor: speed,
            running: HashSet::new(),
            load1: 0.0,
            free_disk: None,
            tx: mpsc::channel(1).0,
        }
    }

    fn f(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn features_required_and_mandatory_decide_support() {
        let kvm = machine("kvm", &["x86_64-linux"], &["kvm"], &[], 1.0, 1);
        let bench = machine("bench", &["x86_64-linux"], &[], &["benchmark"], 1.0, 1);
        assert!(kvm.supports("x86_64-linux", &f(&["kvm"])));
        assert!(kvm.supports("x86_64-linux", &[]));
        assert!(!kvm.supports("aarch64-linux", &[]));
        assert!(kvm.supports("builtin", &[]));
        assert!(
            !bench.supports("x86_64-linux", &[]),
            "a mandatory feature must be required"
        );
        assert!(bench.supports("x86_64-linux", &f(&["benchmark"])));
    }

    #[test]
    fn the_fastest_free_machine_wins_and_full_ones_are_busy() {
        let mut ms = Machines::default();
        ms.register(machine("slow", &["x86_64-linux"], &[], &[], 1.0, 1));
        ms.register(machine("fast", &["x86_64-linux"], &[], &[], 4.0, 1));
        assert_eq!(ms.choose("x86_64-linux", &[], 0).unwrap().name, "fast");
        ms.get_mut("fast").unwrap().running.insert(Uuid::new_v4());
        assert_eq!(ms.choose("x86_64-linux", &[], 0).unwrap().name, "slow");
        ms.get_mut("slow").unwrap().running.insert(Uuid::new_v4());
        assert_eq!(
            ms.choose("x86_64-linux", &[], 0).unwrap_err(),
            NoMachine::Busy
        );
        assert_eq!(
            ms.choose("riscv64-linux", &[], 0).unwrap_err(),
            NoMachine::Unsupported
        );
    }

    #[test]
    fn between_equal_machines_the_less_loaded_one_wins() {
        let mut ms = Machines::default();
        let mut busy = machine("busy", &["x86_64-linux"], &[], &[], 1.0, 2);
        busy.load1 = 8.0;
        let mut idle = machine("idle", &["x86_64-linux"], &[], &[], 1.0, 2);
        idle.load1 = 0.5;
        ms.register(busy);
        ms.register(idle);
        assert_eq!(ms.choose("x86_64-linux", &[], 0).unwrap().name, "idle");
        ms.get_mut("idle").unwrap().running.insert(Uuid::new_v4());
        assert_eq!(
            ms.choose("x86_64-linux", &[], 0).unwrap().name,
            "busy",
            "free slots count before reported load"
        );
    }

    #[test]
    fn a_machine_short_of_disk_gets_nothing() {
        let mut ms = Machines::default();
        let mut m = machine("m", &["x86_64-linux"], &[], &[], 1.0, 2);
        m.free_disk = Some(10);
        ms.register(m);
        assert_eq!(
            ms.choose("x86_64-linux", &[], 100).unwrap_err(),
            NoMachine::Busy
        );
        assert!(ms.choose("x86_64-linux", &[], 5).is_ok());
    }

    #[test]
    fn a_stale_connection_does_not_unregister_the_new_one() {
        let mut ms = Machines::default();
        ms.register(machine("m", &["x86_64-linux"], &[], &[], 1.0, 1));
        let mut again = machine("m", &["x86_64-linux"], &[], &[], 1.0, 1);
        again.connection = "second".into();
        assert!(ms.register(again).is_some());
        assert!(ms.unregister("m", "m-conn").is_none());
        assert!(ms.unregister("m", "second").is_some());
    }
}
