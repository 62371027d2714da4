//! The order in which runnable steps get machines (the brief's order):
//! global priority, then jobset fair share, then critical path, then local
//! priority, then the oldest build. The global priority ages: a step that
//! waits long enough overtakes newer work of a higher class, so background
//! submissions are never starved for ever.

use std::cmp::Ordering;
use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use crate::graph::SchedFacts;

/// A runnable step's sort key; smaller sorts first.
#[derive(Debug, Clone, PartialEq)]
pub struct OrderKey {
    pub global_priority: i32,
    /// Seconds built in the last 24 h per scheduling share, for the most
    /// deserving jobset that needs the step.
    pub share_used: f64,
    pub critical_path: u32,
    pub local_priority: i32,
    pub lowest_build_id: i32,
}

/// The most a step's global priority grows by waiting.
pub const MAX_AGING_BONUS: i32 = 20;

/// Global priority points a step earned by waiting `waited`: one per
/// `period_secs` (0: none), at most [`MAX_AGING_BONUS`].
pub fn aging_bonus(waited: Duration, period_secs: u64) -> i32 {
    if period_secs == 0 {
        return 0;
    }
    (waited.as_secs() / period_secs).min(MAX_AGING_BONUS as u64) as i32
}

impl OrderKey {
    /// `bonus`: what the step earned by waiting (see [`aging_bonus`]).
    pub fn new(facts: &SchedFacts, shares: &Shares, bonus: i32) -> OrderKey {
        OrderKey {
            global_priority: facts.global_priority.saturating_add(bonus),
            share_used: facts
                .jobsets
                .iter()
                .map(|j| shares.used(*j))
                .fold(f64::INFINITY, f64::min),
            critical_path: facts.critical_path,
            local_priority: facts.local_priority,
            lowest_build_id: facts.lowest_build_id,
        }
    }

    pub fn dispatch_order(&self, other: &OrderKey) -> Ordering {
        other
            .global_priority
            .cmp(&self.global_priority)
            .then(self.share_used.total_cmp(&other.share_used))
            .then(other.critical_path.cmp(&self.critical_path))
            .then(other.local_priority.cmp(&self.local_priority))
            .then(self.lowest_build_id.cmp(&other.lowest_build_id))
    }
}

const WINDOW: Duration = Duration::from_secs(24 * 3600);

/// Jobsets' scheduling shares and the build time they used recently.
#[derive(Debug, Default)]
pub struct Shares {
    shares: HashMap<i32, u32>,
    used: HashMap<i32, f64>,
    recent: VecDeque<(Instant, i32, f64)>,
}

impl Shares {
    pub fn set_shares(&mut self, jobset: i32, shares: u32) {
        self.shares.insert(jobset, shares.max(1));
    }

    /// Build seconds a jobset used (loaded from the database at start).
    pub fn set_used(&mut self, jobset: i32, seconds: f64) {
        self.used.insert(jobset, seconds);
    }

    /// A finished step of `jobset` took `seconds`.
    pub fn add_used(&mut self, jobset: i32, seconds: f64, now: Instant) {
        *self.used.entry(jobset).or_default() += seconds;
        self.recent.push_back((now, jobset, seconds));
        while let Some((t, j, s)) = self.recent.front().copied() {
            if now.duration_since(t) < WINDOW {
                break;
            }
            self.recent.pop_front();
            if let Some(u) = self.used.get_mut(&j) {
                *u = (*u - s).max(0.0);
            }
        }
    }

    pub fn used(&self, jobset: i32) -> f64 {
        self.used.get(&jobset).copied().unwrap_or(0.0)
            / self.shares.get(&jobset).copied().unwrap_or(100) as f64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(global: i32, share: f64, cp: u32, local: i32, id: i32) -> OrderKey {
        OrderKey {
            global_priority: global,
            share_used: share,
            critical_path: cp,
            local_priority: local,
            lowest_build_id: id,
        }
    }

    #[test]
    fn each_criterion_breaks_the_ties_of_the_ones_before() {
        let mut keys = [
            key(0, 1.0, 1, 0, 1),
            key(0, 0.5, 1, 0, 9),
            key(0, 0.5, 5, 0, 9),
            key(0, 0.5, 5, 3, 9),
            key(0, 0.5, 5, 3, 8),
            key(10, 9.0, 0, 0, 99),
        ];
        keys.sort_by(|a, b| a.dispatch_order(b));
        let ids: Vec<(i32, i32)> = keys
            .iter()
            .map(|k| (k.global_priority, k.lowest_build_id))
            .collect();
        assert_eq!(ids, [(10, 99), (0, 8), (0, 9), (0, 9), (0, 9), (0, 1)]);
        assert_eq!((keys[2].local_priority, keys[2].critical_path), (3, 5));
        assert_eq!((keys[3].local_priority, keys[3].critical_path), (0, 5));
        assert_eq!(keys[4].critical_path, 1);
    }

    #[test]
    fn waiting_earns_priority_up_to_a_cap() {
        let minute = Duration::from_secs(60);
        assert_eq!(aging_bonus(minute * 3, 60), 3);
        assert_eq!(aging_bonus(minute * 1000, 60), MAX_AGING_BONUS);
        assert_eq!(aging_bonus(minute * 1000, 0), 0, "0 turns aging off");
    }

    #[test]
    fn a_background_step_that_waited_long_overtakes_fresh_normal_work() {
        use crate::api::priority::PriorityClass;
        let shares = Shares::default();
        let facts = |class: PriorityClass| SchedFacts {
            global_priority: class.global_priority(),
            local_priority: class.local_priority(),
            ..SchedFacts::none()
        };
        let background = facts(PriorityClass::Background);
        let normal = facts(PriorityClass::Normal);
        let fresh = OrderKey::new(&normal, &shares, 0);
        let young = OrderKey::new(
            &background,
            &shares,
            aging_bonus(Duration::from_secs(60), 60),
        );
        let old = OrderKey::new(
            &background,
            &shares,
            aging_bonus(Duration::from_secs(660), 60),
        );
        assert_eq!(fresh.dispatch_order(&young), Ordering::Less);
        assert_eq!(old.dispatch_order(&fresh), Ordering::Less);
    }

    #[test]
    fn a_jobset_with_more_shares_counts_as_less_used() {
        let mut s = Shares::default();
        s.set_shares(1, 100);
        s.set_shares(2, 400);
        s.add_used(1, 100.0, Instant::now());
        s.add_used(2, 100.0, Instant::now());
        assert!(s.used(2) < s.used(1));
    }
}
