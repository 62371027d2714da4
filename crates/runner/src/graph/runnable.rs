//! The runnable steps, by kind (system and required features): a dispatch
//! round asks once per kind whether any machine supports it, and passes
//! over a kind no machine supports in one step while nothing about it has
//! changed, however many steps of it wait.

use std::collections::HashMap;
use std::time::Instant;

use rustc_hash::FxHashSet;

use super::StepId;

/// A kind of step, as machines see it: its system and required features.
pub type KindId = u32;

/// The steps of one kind that wait for a machine.
#[derive(Debug, Default)]
pub struct Bucket {
    pub system: String,
    pub features: Vec<String>,
    pub steps: FxHashSet<StepId>,
    /// Bumped whenever a step joins: what a round concluded about the
    /// bucket holds while it is unchanged.
    pub generation: u64,
    /// Found unsupported with every step's time noted, at `generation`:
    /// nothing to do for it before the instant (the first of its steps
    /// to fail as unsupported) unless a step joins or a machine supports
    /// the kind.
    pub quiet: Option<(u64, Instant)>,
    /// Some of its steps may carry an unsupported-since time (to clear
    /// once the kind is supported again).
    pub marked: bool,
}

impl Bucket {
    /// Whether a round may pass over it (unsupported, nothing changed),
    /// and until when.
    pub fn quiet_until(&self, now: Instant) -> Option<Instant> {
        match self.quiet {
            Some((g, until)) if g == self.generation && now < until => Some(until),
            _ => None,
        }
    }
}

/// What a dispatch round learnt of a kind it looked at.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KindCheck {
    pub kind: KindId,
    /// Unsupported, every step noted as of the bucket's generation (the
    /// first field): rounds may pass over it until the instant.
    pub quiet: Option<(u64, Instant)>,
    /// Its steps carry unsupported-since marks.
    pub marked: bool,
}

/// Runnable steps by kind.
#[derive(Debug, Default)]
pub struct Runnable {
    kinds: HashMap<(String, Vec<String>), KindId>,
    buckets: Vec<Bucket>,
    len: usize,
}

impl Runnable {
    /// The id of the kind (system, features), made on first sight.
    pub fn kind_of(&mut self, system: &str, features: &[String]) -> KindId {
        if let Some(k) = self.kinds.get(&(system.to_owned(), features.to_vec())) {
            return *k;
        }
        let k = self.buckets.len() as KindId;
        self.kinds.insert((system.to_owned(), features.to_vec()), k);
        self.buckets.push(Bucket {
            system: system.to_owned(),
            features: features.to_vec(),
            ..Bucket::default()
        });
        k
    }

    pub fn insert(&mut self, kind: KindId, id: StepId) {
        let b = &mut self.buckets[kind as usize];
        if b.steps.insert(id) {
            b.generation += 1;
            self.len += 1;
        }
    }

    pub fn remove(&mut self, kind: KindId, id: StepId) {
        if self.buckets[kind as usize].steps.remove(&id) {
            self.len -= 1;
        }
    }

    pub fn contains(&self, kind: KindId, id: StepId) -> bool {
        self.buckets[kind as usize].steps.contains(&id)
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The kinds that have runnable steps.
    pub fn buckets(&self) -> impl Iterator<Item = (KindId, &Bucket)> + '_ {
        self.buckets
            .iter()
            .enumerate()
            .filter(|(_, b)| !b.steps.is_empty())
            .map(|(k, b)| (k as KindId, b))
    }

    pub fn bucket_mut(&mut self, kind: KindId) -> &mut Bucket {
        &mut self.buckets[kind as usize]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_is_quiet_only_while_unchanged_and_before_its_time() {
        let mut r = Runnable::default();
        let k = r.kind_of("riscv64-linux", &[]);
        assert_eq!(r.kind_of("riscv64-linux", &[]), k, "one id a kind");
        assert_ne!(r.kind_of("riscv64-linux", &["kvm".into()]), k);
        r.insert(k, 1);
        let now = Instant::now();
        let later = now + std::time::Duration::from_secs(60);
        let b = r.bucket_mut(k);
        b.quiet = Some((b.generation, later));
        assert_eq!(r.buckets().next().unwrap().1.quiet_until(now), Some(later));
        assert_eq!(
            r.buckets().next().unwrap().1.quiet_until(later),
            None,
            "its time came"
        );
        r.remove(k, 1);
        r.insert(k, 2);
        assert_eq!(
            r.buckets().next().unwrap().1.quiet_until(now),
            None,
            "a step joined"
        );
        assert_eq!(r.len(), 1);
    }
}
