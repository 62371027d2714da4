//! Reading a table in the order of a sequence without missing rows that
//! commit out of order.
//!
//! A sequence number (Builds.id, hqr_build_changes.seq) is handed out when
//! a row is inserted, not when its transaction commits: an evaluator's long
//! transaction may commit build 5 after a quick submission committed build
//! 6. A reader that only asks for numbers above the highest it saw would
//! never see build 5. So the cursor remembers the numbers it skipped (the
//! *gaps*) and asks for them again until each is either seen or known
//! never to come: a gap is given up only once every transaction that was
//! running when it was found has ended (PostgreSQL's snapshot `xmin`
//! passes the `xmax` of a snapshot taken after it was found), so what is
//! still missing then was rolled back (or deleted at once), not late.
//!
//! The horizon is taken a moment after the gap was found ([`SETTLE`]): a
//! transaction gets its id only when it first writes, a moment after it
//! drew its sequence number, so a snapshot taken in that moment would not
//! list it. Everything here is plain data; the queue monitor does the
//! queries.

use std::time::{Duration, Instant};

/// How long after finding a gap its horizon is taken.
pub const SETTLE: Duration = Duration::from_secs(1);
/// Gaps kept as separate runs, beyond which they are merged.
pub const MAX_RUNS: usize = 64;

/// A run of skipped numbers, `lo..=hi`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gap {
    pub lo: i64,
    pub hi: i64,
    found: Instant,
    /// The `xmax` of a snapshot taken at least [`SETTLE`] after the gap was
    /// found: once the oldest running transaction is newer, no transaction
    /// that could fill the gap is left.
    horizon: Option<u64>,
}

#[derive(Debug, Clone, Default)]
pub struct SeqCursor {
    /// The highest number seen.
    high: i64,
    /// Skipped numbers below `high`, in order, not overlapping.
    gaps: Vec<Gap>,
}

impl SeqCursor {
    /// A cursor that has seen everything up to `high`.
    pub fn new(high: i64) -> SeqCursor {
        SeqCursor {
            high,
            gaps: Vec::new(),
        }
    }

    pub fn high(&self) -> i64 {
        self.high
    }

    /// The runs still to ask for again.
    pub fn gaps(&self) -> &[Gap] {
        &self.gaps
    }

    /// Numbers now seen (above `high`, or inside gaps): gaps they leave
    /// behind above `high` are remembered, gaps they fill are closed.
    /// More than [`MAX_RUNS`] runs are merged into one that covers them
    /// (the first load, of every queued build, skips every finished one):
    /// asking for a run again returns numbers seen already too, which the
    /// caller skips.
    pub fn saw(&mut self, seen: &[i64], now: Instant) {
        let mut seen: Vec<i64> = seen.to_vec();
        seen.sort_unstable();
        seen.dedup();
        for n in seen {
            if n > self.high {
                if n > self.high + 1 {
                    self.gaps.push(Gap {
                        lo: self.high + 1,
                        hi: n - 1,
                        found: now,
                        horizon: None,
                    });
                }
                self.high = n;
            } else {
                self.fill(n);
            }
        }
        if self.gaps.len() > MAX_RUNS {
            let merged = Gap {
                lo: self.gaps[0].lo,
                hi: self.gaps[self.gaps.len() - 1].hi,
                found: self.gaps.iter().map(|g| g.found).min().unwrap_or(now),
                horizon: self
                    .gaps
                    .iter()
                    .map(|g| g.horizon)
                    .try_fold(0, |m, h| h.map(|h| m.max(h))),
            };
            self.gaps = vec![merged];
        }
    }

    /// Closes `n` inside a gap (splitting it when it lies inside).
    fn fill(&mut self, n: i64) {
        let Some(i) = self.gaps.iter().position(|g| g.lo <= n && n <= g.hi) else {
            return;
        };
        let g = self.gaps[i].clone();
        let mut replacement = Vec::new();
        if g.lo < n {
            replacement.push(Gap {
                hi: n - 1,
                ..g.clone()
            });
        }
        if n < g.hi {
            replacement.push(Gap { lo: n + 1, ..g });
        }
        self.gaps.splice(i..=i, replacement);
    }

    /// Gives the gaps found at least [`SETTLE`] ago the horizon `xmax`.
    pub fn set_horizons(&mut self, now: Instant, xmax: u64) {
        for g in &mut self.gaps {
            if g.horizon.is_none() && now.duration_since(g.found) >= SETTLE {
                g.horizon = Some(xmax);
            }
        }
    }

    /// Gives up the gaps no running transaction can fill any more (the
    /// oldest running one, `xmin`, began after their horizon). Call it only
    /// after asking for the gaps again with a snapshot taken at or after
    /// the one `xmin` comes from, so that what committed is seen first.
    /// Returns how many numbers were given up.
    pub fn settle(&mut self, xmin: u64) -> u64 {
        let mut given_up = 0;
        self.gaps.retain(|g| match g.horizon {
            Some(h) if xmin >= h => {
                given_up += (g.hi - g.lo + 1) as u64;
                false
            }
            _ => true,
        });
        given_up
    }

    /// When the monitor should look again with no notification: the next
    /// horizon to take, or soon while gaps wait to settle.
    pub fn next_check(&self, now: Instant) -> Option<Instant> {
        self.gaps
            .iter()
            .map(|g| match g.horizon {
                None => (g.found + SETTLE).max(now),
                Some(_) => now + SETTLE,
            })
            .min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runs(c: &SeqCursor) -> Vec<(i64, i64)> {
        c.gaps().iter().map(|g| (g.lo, g.hi)).collect()
    }

    #[test]
    fn numbers_seen_in_order_leave_no_gap() {
        let mut c = SeqCursor::new(0);
        c.saw(&[1, 2, 3], Instant::now());
        assert_eq!(c.high(), 3);
        assert!(c.gaps().is_empty());
    }

    #[test]
    fn a_number_committed_late_is_a_gap_until_it_is_seen() {
        let now = Instant::now();
        let mut c = SeqCursor::new(4);
        // 6 committed before 5.
        c.saw(&[6], now);
        assert_eq!((c.high(), runs(&c)), (6, vec![(5, 5)]));
        c.saw(&[5], now);
        assert!(c.gaps().is_empty());
    }

    #[test]
    fn a_number_inside_a_run_splits_it() {
        let now = Instant::now();
        let mut c = SeqCursor::new(0);
        c.saw(&[10], now);
        c.saw(&[4, 1], now);
        assert_eq!(runs(&c), vec![(2, 3), (5, 9)]);
        c.saw(&[9, 5], now);
        assert_eq!(runs(&c), vec![(2, 3), (6, 8)]);
    }

    #[test]
    fn a_gap_is_given_up_only_after_every_older_transaction_ended() {
        let t0 = Instant::now();
        let mut c = SeqCursor::new(0);
        c.saw(&[2], t0);
        c.set_horizons(t0, 50);
        assert_eq!(
            c.settle(u64::MAX),
            0,
            "too early for a horizon: the writer may not have its id yet"
        );
        let t1 = t0 + SETTLE;
        c.set_horizons(t1, 100);
        assert_eq!(c.settle(99), 0, "transaction 99 may still insert number 1");
        assert_eq!(runs(&c), vec![(1, 1)]);
        assert_eq!(c.settle(100), 1);
        assert!(c.gaps().is_empty());
    }

    #[test]
    fn many_runs_are_merged_into_one_that_covers_them() {
        let now = Instant::now();
        let mut c = SeqCursor::new(0);
        let every_other: Vec<i64> = (1..=1000).map(|n| n * 2).collect();
        c.saw(&every_other, now);
        assert_eq!(runs(&c), vec![(1, 1999)]);
        assert_eq!(c.high(), 2000);
    }

    #[test]
    fn the_next_check_waits_for_the_settle_time() {
        let t0 = Instant::now();
        let mut c = SeqCursor::new(0);
        assert_eq!(c.next_check(t0), None);
        c.saw(&[3], t0);
        assert_eq!(c.next_check(t0), Some(t0 + SETTLE));
    }
}
