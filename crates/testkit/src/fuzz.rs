//! Structure-aware fuzzing on the stable toolchain, with proptest: valid
//! seeds mutated (bytes flipped, inserted, deleted, the tail cut off, runs
//! repeated), and plain random bytes. The parsers' fuzz tests use it.

use proptest::prelude::*;

/// Cases per fuzzed parser: `HQ_FUZZ_CASES`, 2,000 by default (the
/// suite); the README's fuzz command runs 120,000.
pub fn cases() -> u32 {
    std::env::var("HQ_FUZZ_CASES")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(2000)
}

/// A proptest configuration of [`cases`] cases that writes no regression
/// files (a failure prints its minimal input instead).
pub fn config() -> ProptestConfig {
    ProptestConfig {
        cases: cases(),
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

#[derive(Debug, Clone)]
pub enum Mutation {
    Flip(usize, u8),
    Insert(usize, Vec<u8>),
    Delete(usize, usize),
    Truncate(usize),
    Repeat(usize, usize),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    prop_oneof![
        4 => (any::<usize>(), any::<u8>()).prop_map(|(p, b)| Mutation::Flip(p, b)),
        2 => (any::<usize>(), proptest::collection::vec(any::<u8>(), 1..16))
            .prop_map(|(p, b)| Mutation::Insert(p, b)),
        2 => (any::<usize>(), 1..32usize).prop_map(|(p, n)| Mutation::Delete(p, n)),
        1 => any::<usize>().prop_map(Mutation::Truncate),
        1 => (any::<usize>(), 1..64usize).prop_map(|(p, n)| Mutation::Repeat(p, n)),
    ]
}

/// `seed` with `mutations` applied in order (positions wrap around).
pub fn apply(seed: &[u8], mutations: &[Mutation]) -> Vec<u8> {
    let mut v = seed.to_vec();
    for m in mutations {
        let at = |p: usize, len: usize| if len == 0 { 0 } else { p % (len + 1) };
        match m {
            Mutation::Flip(p, b) if !v.is_empty() => {
                let i = p % v.len();
                v[i] ^= b | 1;
            }
            Mutation::Flip(..) => {}
            Mutation::Insert(p, bytes) => {
                let i = at(*p, v.len());
                v.splice(i..i, bytes.iter().copied());
            }
            Mutation::Delete(p, n) => {
                let i = at(*p, v.len());
                let end = (i + n).min(v.len());
                v.drain(i..end);
            }
            Mutation::Truncate(p) => {
                let i = at(*p, v.len());
                v.truncate(i);
            }
            Mutation::Repeat(p, n) => {
                let i = at(*p, v.len());
                let end = (i + n).min(v.len());
                let run: Vec<u8> = v[i..end].to_vec();
                v.splice(i..i, run);
            }
        }
    }
    v
}

/// Inputs for a parser: one of `seeds` mutated, or random bytes.
pub fn input(seeds: Vec<Vec<u8>>) -> impl Strategy<Value = Vec<u8>> {
    let n = seeds.len();
    prop_oneof![
        8 => (0..n, proptest::collection::vec(mutation(), 1..6))
            .prop_map(move |(i, ms)| apply(&seeds[i], &ms)),
        1 => proptest::collection::vec(any::<u8>(), 0..512),
    ]
}
