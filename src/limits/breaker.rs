//! A circuit breaker per deployment: closed → open after a run of consecutive failures, or a
//! failure ratio over a sliding window with enough requests → half-open after a cool-down, where
//! one probe request is let through → closed on its success, open again on its failure.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct BreakerConfig {
    /// Consecutive failures that open the breaker (0 = never on a run).
    pub failures: u32,
    /// Failure ratio over the window that opens it (0 = never on a ratio).
    pub failure_ratio: f64,
    /// Requests the window must hold before the ratio counts.
    pub min_requests: u32,
    pub window_secs: u64,
    /// How long an open breaker refuses before letting a probe through.
    pub cooldown_ms: u64,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            failures: 5,
            failure_ratio: 0.5,
            min_requests: 20,
            window_secs: 30,
            cooldown_ms: 15_000,
        }
    }
}

/// The breaker's state, as reported.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

/// A change of state, for the trace.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transition {
    Opened,
    HalfOpened,
    Closed,
}

#[derive(Debug, Clone, Copy)]
enum Inner {
    Closed,
    Open { until: Instant },
    HalfOpen { probing: bool },
}

#[derive(Debug, Clone)]
pub struct CircuitBreaker {
    cfg: BreakerConfig,
    inner: Inner,
    consecutive: u32,
    window: VecDeque<(Instant, bool)>,
}

impl CircuitBreaker {
    pub fn new(cfg: BreakerConfig) -> Self {
        Self {
            cfg,
            inner: Inner::Closed,
            consecutive: 0,
            window: VecDeque::new(),
        }
    }

    pub fn state(&self) -> BreakerState {
        match self.inner {
            Inner::Closed => BreakerState::Closed,
            Inner::Open { .. } => BreakerState::Open,
            Inner::HalfOpen { .. } => BreakerState::HalfOpen,
        }
    }

    /// Whether a request may go now. An open breaker whose cool-down has passed turns
    /// half-open and lets exactly one probe through.
    ///
    /// # Errors
    /// How long until the breaker may let a request through (zero while a probe is out).
    pub fn allow(&mut self, now: Instant) -> Result<Option<Transition>, Duration> {
        match self.inner {
            Inner::Closed => Ok(None),
            Inner::Open { until } if now >= until => {
                self.inner = Inner::HalfOpen { probing: true };
                Ok(Some(Transition::HalfOpened))
            }
            Inner::Open { until } => Err(until - now),
            Inner::HalfOpen { probing: false } => {
                self.inner = Inner::HalfOpen { probing: true };
                Ok(None)
            }
            Inner::HalfOpen { probing: true } => Err(Duration::ZERO),
        }
    }

    /// Whether [`CircuitBreaker::allow`] would let a request through (without taking a probe).
    pub fn would_allow(&self, now: Instant) -> bool {
        match self.inner {
            Inner::Closed | Inner::HalfOpen { probing: false } => true,
            Inner::Open { until } => now >= until,
            Inner::HalfOpen { probing: true } => false,
        }
    }

    pub fn on_success(&mut self, now: Instant) -> Option<Transition> {
        self.record(now, true);
        self.consecutive = 0;
        match self.inner {
            Inner::HalfOpen { .. } => {
                self.inner = Inner::Closed;
                self.window.clear();
                Some(Transition::Closed)
            }
            _ => None,
        }
    }

    pub fn on_failure(&mut self, now: Instant) -> Option<Transition> {
        self.record(now, false);
        self.consecutive = self.consecutive.saturating_add(1);
        let open = match self.inner {
            Inner::HalfOpen { .. } => true,
            Inner::Open { .. } => false,
            Inner::Closed => {
                let run = self.cfg.failures > 0 && self.consecutive >= self.cfg.failures;
                let total = self.window.len() as u32;
                let failed = self.window.iter().filter(|(_, ok)| !ok).count() as f64;
                let ratio = self.cfg.failure_ratio > 0.0
                    && total >= self.cfg.min_requests.max(1)
                    && failed / f64::from(total) >= self.cfg.failure_ratio;
                run || ratio
            }
        };
        if open {
            self.inner = Inner::Open {
                until: now + Duration::from_millis(self.cfg.cooldown_ms),
            };
            Some(Transition::Opened)
        } else {
            None
        }
    }

    /// Gives back a half-open probe whose request was abandoned before it proved anything.
    pub fn release_probe(&mut self) {
        if let Inner::HalfOpen { probing: true } = self.inner {
            self.inner = Inner::HalfOpen { probing: false };
        }
    }

    /// Failures over requests in the window (0 when empty).
    pub fn error_rate(&mut self, now: Instant) -> f64 {
        self.expire(now);
        if self.window.is_empty() {
            return 0.0;
        }
        self.window.iter().filter(|(_, ok)| !ok).count() as f64 / self.window.len() as f64
    }

    fn record(&mut self, now: Instant, ok: bool) {
        self.expire(now);
        self.window.push_back((now, ok));
        // Bounded whatever the traffic: the ratio only needs a recent sample.
        if self.window.len() > 1000 {
            self.window.pop_front();
        }
    }

    fn expire(&mut self, now: Instant) {
        let window = Duration::from_secs(self.cfg.window_secs);
        while self
            .window
            .front()
            .is_some_and(|(t, _)| now.saturating_duration_since(*t) > window)
        {
            self.window.pop_front();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> BreakerConfig {
        BreakerConfig {
            failures: 3,
            failure_ratio: 0.5,
            min_requests: 10,
            window_secs: 10,
            cooldown_ms: 1000,
        }
    }

    #[test]
    fn opens_on_a_run_then_probes_then_closes() {
        let t0 = Instant::now();
        let mut b = CircuitBreaker::new(cfg());
        assert_eq!(b.on_failure(t0), None);
        assert_eq!(b.on_failure(t0), None);
        assert_eq!(b.on_failure(t0), Some(Transition::Opened));
        assert_eq!(b.state(), BreakerState::Open);
        assert_eq!(
            b.allow(t0 + Duration::from_millis(400)),
            Err(Duration::from_millis(600))
        );
        // After the cool-down one probe goes through; the others wait for its result.
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(b.allow(t1), Ok(Some(Transition::HalfOpened)));
        assert_eq!(b.allow(t1), Err(Duration::ZERO));
        assert_eq!(b.on_success(t1), Some(Transition::Closed));
        assert_eq!(b.allow(t1), Ok(None));
    }

    #[test]
    fn failed_probe_reopens() {
        let t0 = Instant::now();
        let mut b = CircuitBreaker::new(cfg());
        for _ in 0..3 {
            b.on_failure(t0);
        }
        let t1 = t0 + Duration::from_secs(1);
        b.allow(t1).unwrap(); // ok: test code
        assert_eq!(b.on_failure(t1), Some(Transition::Opened));
        assert!(b.allow(t1 + Duration::from_millis(999)).is_err());
        assert!(b.allow(t1 + Duration::from_secs(1)).is_ok());
    }

    #[test]
    fn a_success_resets_the_run() {
        let t0 = Instant::now();
        let mut b = CircuitBreaker::new(BreakerConfig {
            failure_ratio: 0.0,
            ..cfg()
        });
        for _ in 0..10 {
            b.on_failure(t0);
            b.on_failure(t0);
            b.on_success(t0);
        }
        assert_eq!(b.state(), BreakerState::Closed);
    }

    #[test]
    fn opens_on_a_ratio_once_the_window_is_full_enough() {
        let t0 = Instant::now();
        let mut b = CircuitBreaker::new(BreakerConfig {
            failures: 0,
            ..cfg()
        });
        for _ in 0..4 {
            b.on_success(t0);
            assert_eq!(b.on_failure(t0), None);
        }
        b.on_success(t0);
        assert_eq!(b.on_failure(t0), Some(Transition::Opened)); // 5 of 10
        assert!((b.error_rate(t0) - 0.5).abs() < 1e-9);
        // Old outcomes leave the window.
        assert_eq!(b.error_rate(t0 + Duration::from_secs(11)), 0.0);
    }
}
