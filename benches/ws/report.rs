//! What the WebSocket load drivers share: knobs from the environment, percentiles, and the
//! rows of the result table.

use std::time::Duration;

pub fn env_or(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

pub fn mib(kib: u64) -> String {
    format!("{:.1} MiB", kib as f64 / 1024.0)
}

/// One line of the result table.
pub struct Row {
    pub scenario: &'static str,
    pub what: &'static str,
    pub figure: String,
}

impl Row {
    pub fn new(scenario: &'static str, what: &'static str, figure: String) -> Self {
        Self {
            scenario,
            what,
            figure,
        }
    }
}
