//! Tables on stdout and JSON under the results folder (not committed).

use std::path::PathBuf;

use anyhow::Result;
use serde_json::Value;

/// Prints `rows` under `headers`, columns padded to the widest cell.
pub fn table(title: &str, headers: &[&str], rows: &[Vec<String>]) {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in rows {
        for (w, c) in widths.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    let line = |cells: Vec<&str>| {
        cells
            .iter()
            .zip(&widths)
            .map(|(c, w)| format!("{c:>w$}"))
            .collect::<Vec<_>>()
            .join("  ")
    };
    println!("\n{title}");
    println!("{}", line(headers.to_vec()));
    for r in rows {
        println!("{}", line(r.iter().map(String::as_str).collect()));
    }
}

/// Where results go: `$HQ_BENCH_RESULTS`, else `bench-results/` here.
pub fn results_dir() -> PathBuf {
    std::env::var_os("HQ_BENCH_RESULTS")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("bench-results"))
}

/// Writes `value` as `<scenario>-<unix time>.json`; returns the path.
pub fn save(scenario: &str, value: &Value) -> Result<PathBuf> {
    let dir = results_dir();
    std::fs::create_dir_all(&dir)?;
    let stamp = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)?
        .as_secs();
    let path = dir.join(format!("{scenario}-{stamp}.json"));
    std::fs::write(&path, serde_json::to_string_pretty(value)?)?;
    println!("(written to {})", path.display());
    Ok(path)
}

/// The `p`-th percentile (0..=100) of `values`, by nearest rank.
pub fn percentile(values: &[f64], p: f64) -> f64 {
    if values.is_empty() {
        return f64::NAN;
    }
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v[rank.clamp(1, v.len()) - 1]
}

pub fn ms(seconds: f64) -> String {
    format!("{:.1}", seconds * 1000.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_by_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 50.0), 50.0);
        assert_eq!(percentile(&v, 99.0), 99.0);
        assert_eq!(percentile(&v, 100.0), 100.0);
        assert!(percentile(&[], 50.0).is_nan());
    }
}
