//! Where the CPU goes during a run, from `/proc`: the whole machine's busy
//! time, and the processes alive at both ends of the run by kind (this
//! process, which is the runner and the builder agents; PostgreSQL; the
//! nix-daemons). A build's own processes exit before the run ends, so they
//! count only in the machine's total: subtracting what local Nix spent on
//! the same derivations leaves what the farm costs on top of the builds.

use std::collections::HashMap;

/// The kinds of process a run is split into.
pub const KINDS: [&str; 3] = ["runner+builders", "postgres", "nix-daemon"];

#[derive(Debug, Clone, Default)]
pub struct Sample {
    /// Busy time of all CPUs (user, nice, system, irq, softirq), in ticks.
    busy: u64,
    /// pid -> (kind, utime + stime in ticks), for processes of a kind.
    procs: HashMap<u32, (&'static str, u64)>,
}

/// What a run cost, in CPU seconds.
#[derive(Debug, Clone, Default)]
pub struct Spent {
    pub machine: f64,
    /// By kind (see [`KINDS`]), processes alive at both ends only.
    pub by_kind: Vec<(&'static str, f64)>,
}

fn ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

impl Sample {
    pub fn now() -> Sample {
        let f = machine_ticks();
        let busy = f.iter().take(3).sum::<u64>() + f.get(5..7).map_or(0, |v| v.iter().sum());
        let me = std::process::id();
        let mut procs = HashMap::new();
        if let Ok(dir) = std::fs::read_dir("/proc") {
            for entry in dir.flatten() {
                let Some(pid) = entry
                    .file_name()
                    .to_str()
                    .and_then(|s| s.parse::<u32>().ok())
                else {
                    continue;
                };
                let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                    continue;
                };
                // pid (comm) state ppid ... : comm may hold spaces, so split
                // after its closing parenthesis.
                let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
                    continue;
                };
                let comm = &stat[open + 1..close];
                let kind = if pid == me {
                    KINDS[0]
                } else if comm.starts_with("postgres") {
                    KINDS[1]
                } else if comm.starts_with("nix-daemon") {
                    KINDS[2]
                } else {
                    continue;
                };
                let fields: Vec<&str> = stat[close + 2..].split_whitespace().collect();
                // utime and stime are fields 14 and 15 of the whole line.
                let t = |i: usize| fields.get(i).and_then(|x| x.parse::<u64>().ok());
                if let (Some(u), Some(s)) = (t(11), t(12)) {
                    procs.insert(pid, (kind, u + s));
                }
            }
        }
        Sample { busy, procs }
    }

    /// What was spent from `self` to `later`.
    pub fn until(&self, later: &Sample) -> Spent {
        let hz = ticks_per_second();
        let mut by: HashMap<&'static str, u64> = HashMap::new();
        for (pid, (kind, t)) in &later.procs {
            if let Some((_, before)) = self.procs.get(pid) {
                *by.entry(kind).or_default() += t.saturating_sub(*before);
            }
        }
        Spent {
            machine: later.busy.saturating_sub(self.busy) as f64 / hz,
            by_kind: KINDS
                .iter()
                .map(|k| (*k, by.get(k).copied().unwrap_or(0) as f64 / hz))
                .collect(),
        }
    }
}

/// The machine's CPU time so far, and how much of it the hypervisor took
/// (`steal` in `/proc/stat`), in ticks. On this VM steal reached a fifth
/// of a run for seconds at a time, and the same ingestion measured 12,250
/// steps/s with 19% stolen and 22,694 with none: a figure is read beside
/// its steal.
pub fn steal_ticks() -> (u64, u64) {
    let fields = machine_ticks();
    let total = fields.iter().take(8).sum();
    (fields.get(7).copied().unwrap_or(0), total)
}

/// The `cpu` line of `/proc/stat`: user nice system idle iowait irq
/// softirq steal (and more), in ticks; empty when it cannot be read.
fn machine_ticks() -> Vec<u64> {
    std::fs::read_to_string("/proc/stat")
        .ok()
        .and_then(|s| s.lines().next().map(str::to_owned))
        .map(|cpu| {
            cpu.split_whitespace()
                .skip(1)
                .filter_map(|x| x.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// The share of the CPU time from `before` to `after` (both
/// [`steal_ticks`]) that the hypervisor took, in percent.
pub fn stolen_percent(before: (u64, u64), after: (u64, u64)) -> f64 {
    let total = after.1.saturating_sub(before.1);
    if total == 0 {
        return 0.0;
    }
    100.0 * after.0.saturating_sub(before.0) as f64 / total as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stolen_share_is_steal_over_all_time() {
        assert_eq!(stolen_percent((10, 1000), (30, 1200)), 10.0);
        assert_eq!(stolen_percent((10, 1000), (10, 1000)), 0.0);
        let (steal, total) = steal_ticks();
        assert!(steal <= total && total > 0);
    }
}
