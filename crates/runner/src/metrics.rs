//! Distributions the runner measures for `/metrics`: how long steps take
//! on machines, and how long a runnable step waits until its job is sent.
//! Plain Prometheus histograms (cumulative buckets, sum, count).

use std::fmt::Write;
use std::time::Duration;

use parking_lot::Mutex;

/// Bucket bounds in seconds for waits (dispatch latency): milliseconds
/// matter here.
const LATENCY_BOUNDS: &[f64] = &[
    0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 60.0,
];
/// Bucket bounds in seconds for waits for a database connection: well
/// under a millisecond when all is well, up to the pool's 30 s timeout.
const WAIT_BOUNDS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 0.5, 1.0, 5.0, 30.0,
];
/// Bucket bounds in seconds for step durations.
const DURATION_BOUNDS: &[f64] = &[
    0.1,
    0.5,
    1.0,
    5.0,
    15.0,
    60.0,
    300.0,
    900.0,
    3600.0,
    4.0 * 3600.0,
    12.0 * 3600.0,
];

#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    /// Observations per bucket (not cumulative); the last is +Inf.
    counts: Vec<u64>,
    sum: f64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            counts: vec![0; bounds.len() + 1],
            sum: 0.0,
        }
    }

    pub fn observe(&mut self, d: Duration) {
        let v = d.as_secs_f64();
        let i = self
            .bounds
            .iter()
            .position(|b| v <= *b)
            .unwrap_or(self.bounds.len());
        self.counts[i] += 1;
        self.sum += v;
    }

    pub fn count(&self) -> u64 {
        self.counts.iter().sum()
    }

    /// The mean observation, in seconds (0 without any).
    pub fn mean(&self) -> f64 {
        match self.count() {
            0 => 0.0,
            n => self.sum / n as f64,
        }
    }

    /// The bucket bound at or below which a fraction `q` of the
    /// observations lie (+Inf as `f64::INFINITY`; 0 without any): a
    /// quantile as precise as the buckets, for reports.
    pub fn quantile(&self, q: f64) -> f64 {
        let total = self.count();
        if total == 0 {
            return 0.0;
        }
        let wanted = (q * total as f64).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, n) in self.counts.iter().enumerate() {
            seen += n;
            if seen >= wanted {
                return self.bounds.get(i).copied().unwrap_or(f64::INFINITY);
            }
        }
        f64::INFINITY
    }

    /// Writes the family in the Prometheus text format.
    pub fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}");
        let _ = writeln!(out, "# TYPE {name} histogram");
        let mut cumulative = 0;
        for (bound, n) in self.bounds.iter().zip(&self.counts) {
            cumulative += n;
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", self.count());
        let _ = writeln!(out, "{name}_sum {}", self.sum);
        let _ = writeln!(out, "{name}_count {}", self.count());
    }
}

#[derive(Debug)]
pub struct Metrics {
    /// From dispatch to the end of the attempt, whatever the outcome.
    pub step_seconds: Mutex<Histogram>,
    /// From a step becoming runnable to its job being sent to a machine.
    pub dispatch_seconds: Mutex<Histogram>,
    /// One dispatcher round's decisions (sorting the runnable steps and
    /// choosing machines), without sending the jobs.
    pub round_seconds: Mutex<Histogram>,
    /// How long the runner's transactions waited for a connection of its
    /// own pool (a starved pool shows here first).
    pub pool_wait_seconds: Mutex<Histogram>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            step_seconds: Mutex::new(Histogram::new(DURATION_BOUNDS)),
            dispatch_seconds: Mutex::new(Histogram::new(LATENCY_BOUNDS)),
            round_seconds: Mutex::new(Histogram::new(LATENCY_BOUNDS)),
            pool_wait_seconds: Mutex::new(Histogram::new(WAIT_BOUNDS)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buckets_are_cumulative_and_end_with_inf() {
        let mut h = Histogram::new(&[0.01, 0.1]);
        h.observe(Duration::from_millis(5));
        h.observe(Duration::from_millis(50));
        h.observe(Duration::from_secs(3));
        let mut out = String::new();
        h.render(&mut out, "x", "test");
        assert!(out.contains("x_bucket{le=\"0.01\"} 1\n"));
        assert!(out.contains("x_bucket{le=\"0.1\"} 2\n"));
        assert!(out.contains("x_bucket{le=\"+Inf\"} 3\n"));
        assert!(out.contains("x_count 3\n"));
    }

    #[test]
    fn a_quantile_is_the_bound_of_its_bucket() {
        let mut h = Histogram::new(&[0.01, 0.1]);
        assert_eq!(h.quantile(0.99), 0.0);
        for _ in 0..98 {
            h.observe(Duration::from_millis(5));
        }
        h.observe(Duration::from_millis(50));
        assert_eq!(h.quantile(0.5), 0.01);
        assert_eq!(h.quantile(0.99), 0.1);
        h.observe(Duration::from_secs(3));
        assert_eq!(h.quantile(0.99), 0.1);
        assert_eq!(h.quantile(1.0), f64::INFINITY);
    }
}
