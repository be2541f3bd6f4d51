//! A deployment: one API key of one provider, with its own rate-limit buckets (requests and
//! tokens per minute), concurrency cap, circuit breaker and recent latency. Owned by the
//! provider actor; every method takes the current time.

use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

use super::backend::Backend;
use super::RateHeaders;
use crate::config::ProviderConfig;
use crate::limits::{BreakerState, CircuitBreaker, TokenBucket, Transition};
use crate::store::Usage;

/// Why a deployment cannot take a request now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// Its breaker is open (or a half-open probe is out) for this long.
    Open(Duration),
    /// Its buckets or concurrency cap are full; a slot may free up in this long.
    Full(Duration),
    /// Its buckets are shared through Redis (cluster mode), which cannot be reached.
    Unreachable,
}

/// How a generation ended, as the provider actor accounts for it.
#[derive(Debug, Clone)]
pub enum Outcome {
    Succeeded {
        usage: Option<Usage>,
        ttft: Duration,
    },
    /// An upstream failure (status, connection, timeout, broken stream).
    Failed { status: Option<u16> },
    /// The consumer left (cancel, shutdown, ttft timeout): says nothing of the upstream's health.
    Abandoned,
    /// An embeddings request answered: counted and billed to the buckets, but its latency is
    /// not a time to first token.
    Embedded { usage: Option<Usage> },
}

pub struct Deployment {
    pub backend: Arc<Backend>,
    rpm: TokenBucket,
    tpm: TokenBucket,
    max_concurrency: u32,
    pub in_flight: u32,
    breaker: CircuitBreaker,
    ttft_ms: Option<f64>,
    served: u64,
}

/// A deployment as `/admin/providers` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct DeploymentInfo {
    pub key_index: usize,
    pub breaker: BreakerState,
    pub in_flight: u32,
    pub max_concurrency: u32,
    pub rpm_capacity: f64,
    pub rpm_available: f64,
    pub tpm_capacity: f64,
    pub tpm_available: f64,
    pub error_rate: f64,
    pub ttft_ms: Option<f64>,
    pub served: u64,
}

impl Deployment {
    /// `local_buckets`: whether this process counts the deployment's requests and tokens per
    /// minute (`false` in cluster mode, where Redis counts them for every node).
    pub fn new(cfg: &ProviderConfig, backend: Backend, now: Instant, local_buckets: bool) -> Self {
        let per_minute = |n: u32| TokenBucket::per_minute(if local_buckets { n } else { 0 }, now);
        Self {
            backend: Arc::new(backend),
            rpm: per_minute(cfg.rpm),
            tpm: per_minute(cfg.tpm),
            max_concurrency: cfg.max_concurrency,
            in_flight: 0,
            breaker: CircuitBreaker::new(cfg.breaker.clone()),
            ttft_ms: None,
            served: 0,
        }
    }

    /// Whether the deployment could take a request of `tokens` now.
    ///
    /// # Errors
    /// The [`Refusal`] that applies.
    pub fn check(&mut self, tokens: u32, now: Instant) -> Result<(), Refusal> {
        if !self.breaker.would_allow(now) {
            return Err(Refusal::Open(
                self.breaker.allow(now).err().unwrap_or_default(),
            ));
        }
        if self.max_concurrency > 0 && self.in_flight >= self.max_concurrency {
            // A slot frees when a generation ends; the actor re-checks its queue then.
            return Err(Refusal::Full(Duration::from_millis(50)));
        }
        let rpm = self.rpm.check(1, now).err();
        let tpm = self.tpm.check(tokens, now).err();
        match rpm.max(tpm) {
            Some(wait) => Err(Refusal::Full(wait)),
            None => Ok(()),
        }
    }

    /// Takes the slot [`Deployment::check`] found (buckets, concurrency, breaker probe).
    pub fn take(&mut self, tokens: u32, now: Instant) -> Option<Transition> {
        let _ = self.rpm.try_take(1, now);
        let _ = self.tpm.try_take(tokens, now);
        self.in_flight += 1;
        self.breaker.allow(now).ok().flatten()
    }

    /// Accounts for a finished generation that reserved `reserved` tokens.
    pub fn finish(
        &mut self,
        reserved: u32,
        outcome: &Outcome,
        headers: RateHeaders,
        now: Instant,
    ) -> Option<Transition> {
        self.in_flight = self.in_flight.saturating_sub(1);
        if let Some(n) = headers.remaining_requests {
            self.rpm.clamp_to(n, now);
        }
        if let Some(n) = headers.remaining_tokens {
            self.tpm.clamp_to(n, now);
        }
        match outcome {
            Outcome::Succeeded { usage, ttft, .. } => {
                self.served += 1;
                if let Some(u) = usage {
                    self.tpm
                        .adjust(i64::from(reserved) - i64::from(u.total_tokens), now);
                }
                let ms = ttft.as_secs_f64() * 1000.0;
                self.ttft_ms = Some(self.ttft_ms.map_or(ms, |old| 0.8 * old + 0.2 * ms));
                self.breaker.on_success(now)
            }
            // The upstream answered, refusing this one request as malformed or too large: that
            // says nothing of its health (a client must not be able to open the breaker).
            Outcome::Failed {
                status: Some(400 | 413 | 422),
            } => {
                self.breaker.release_probe();
                None
            }
            Outcome::Failed { status } => {
                if *status == Some(429) {
                    if let Some(after) = headers.retry_after {
                        self.rpm.hold_until(now + after, now);
                    }
                }
                self.breaker.on_failure(now)
            }
            Outcome::Embedded { usage } => {
                self.served += 1;
                if let Some(u) = usage {
                    self.tpm
                        .adjust(i64::from(reserved) - i64::from(u.total_tokens), now);
                }
                self.breaker.on_success(now)
            }
            Outcome::Abandoned => {
                // A probe that was abandoned proves nothing: let the next request probe.
                self.breaker.release_probe();
                None
            }
        }
    }

    pub fn ttft_ms(&self) -> Option<f64> {
        self.ttft_ms
    }

    pub fn info(&mut self, key_index: usize, now: Instant) -> DeploymentInfo {
        DeploymentInfo {
            key_index,
            breaker: self.breaker.state(),
            in_flight: self.in_flight,
            max_concurrency: self.max_concurrency,
            rpm_capacity: self.rpm.capacity(),
            rpm_available: self.rpm.level(now),
            tpm_capacity: self.tpm.capacity(),
            tpm_available: self.tpm.level(now),
            error_rate: self.breaker.error_rate(now),
            ttft_ms: self.ttft_ms,
            served: self.served,
        }
    }
}
