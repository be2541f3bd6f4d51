//! A provider's deployments in cluster mode: their requests and tokens per minute are token
//! buckets in Redis, one pair per deployment (keyed by provider name and key index), so every
//! node draws from the same allowance; breakers, concurrency caps and latency stay per node.
//! There is no local fast path: a slot costs one Redis round trip (and a refused deployment
//! one more for the next candidate).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::{merge, Backend, Limits, Outcome, ProviderError, RateHeaders, Refusal};
use crate::cluster::limits::{Adjustment, Limiter, SharedLimits};
use crate::cluster::redis::Redis;
use crate::config::ProviderConfig;
use crate::provider::DeploymentInfo;

/// How long a caller refused because Redis is down is told to wait.
const UNREACHABLE_RETRY: Duration = Duration::from_secs(1);

pub(super) struct SharedBuckets {
    limits: SharedLimits,
    /// Requests and tokens per minute of each deployment, by key index.
    buckets: Vec<(Limiter, Limiter)>,
}

impl SharedBuckets {
    pub(super) fn new(redis: Redis, cfg: &ProviderConfig, deployments: usize) -> Self {
        let limits = SharedLimits::new(redis);
        let buckets = (0..deployments)
            .map(|i| {
                (
                    limits.deployment_limiter(&cfg.name, i, "rpm", u64::from(cfg.rpm)),
                    limits.deployment_limiter(&cfg.name, i, "tpm", u64::from(cfg.tpm)),
                )
            })
            .collect();
        Self { limits, buckets }
    }

    /// Takes a request and `tokens` from deployment `i`'s buckets, or neither.
    fn take(&self, i: usize, tokens: u32) -> Result<(), Refusal> {
        let Some((rpm, tpm)) = self.buckets.get(i) else {
            return Err(Refusal::Full(Duration::from_millis(50)));
        };
        match self.limits.take(&[(rpm, 1), (tpm, u64::from(tokens))]) {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(refused)) => Err(Refusal::Full(refused.wait)),
            Err(e) => {
                tracing::debug!(error = %e, "shared provider limits unreachable");
                Err(Refusal::Unreachable)
            }
        }
    }

    /// Applies `adjustments` of deployment `i`, logging a failure (the buckets then stay on
    /// the safe side: what was taken stays taken).
    fn adjust(&self, adjustments: &[Adjustment<'_>]) {
        if adjustments.is_empty() {
            return;
        }
        if let Err(e) = self.limits.adjust(adjustments) {
            tracing::warn!(error = %e, "shared provider limits could not be corrected");
        }
    }

    /// Gives back what [`SharedBuckets::take`] took for a slot that was not used.
    fn give_back(&self, i: usize, tokens: u32) {
        let Some((rpm, tpm)) = self.buckets.get(i) else {
            return;
        };
        let back = |limiter, delta| Adjustment {
            limiter,
            lower_to: None,
            delta,
            entry: "",
        };
        self.adjust(&[back(rpm, 1), back(tpm, i64::from(tokens))]);
    }

    /// What [`Deployment::finish`](super::Deployment::finish) does to the buckets: the real
    /// token use replaces the reservation, the upstream's remaining counts lower the levels, and
    /// a 429 with `Retry-After` holds the requests until then.
    pub(super) fn finish(&self, i: usize, reserved: u32, outcome: &Outcome, headers: RateHeaders) {
        let Some((rpm, tpm)) = self.buckets.get(i) else {
            return;
        };
        let used = match outcome {
            Outcome::Succeeded { usage, .. } | Outcome::Embedded { usage } => *usage,
            Outcome::Failed { .. } | Outcome::Abandoned => None,
        };
        let hold = match (outcome, headers.retry_after) {
            (Outcome::Failed { status: Some(429) }, Some(after)) if rpm.per_minute() > 0 => {
                Some(1.0 - after.as_secs_f64() * rpm.per_minute() as f64 / 60.0)
            }
            _ => None,
        };
        let rpm_lower = [headers.remaining_requests.map(|n| n as f64), hold]
            .into_iter()
            .flatten()
            .reduce(f64::min);
        let mut adjustments = Vec::with_capacity(2);
        if rpm_lower.is_some() {
            adjustments.push(Adjustment {
                limiter: rpm,
                lower_to: rpm_lower,
                delta: 0,
                entry: "",
            });
        }
        let delta = used.map_or(0, |u| i64::from(reserved) - i64::from(u.total_tokens));
        if delta != 0 || headers.remaining_tokens.is_some() {
            adjustments.push(Adjustment {
                limiter: tpm,
                lower_to: headers.remaining_tokens.map(|n| n as f64),
                delta,
                entry: "",
            });
        }
        self.adjust(&adjustments);
    }

    /// Fills in the shared buckets' capacities and levels (unknown while Redis is down).
    pub(super) fn describe(&self, infos: &mut [DeploymentInfo]) {
        let all: Vec<&Limiter> = self.buckets.iter().flat_map(|(r, t)| [r, t]).collect();
        let levels = self.limits.levels(&all).ok();
        for (info, (rpm, tpm)) in infos.iter_mut().zip(&self.buckets) {
            let at = |j: usize| {
                levels
                    .as_ref()
                    .and_then(|l| l.get(2 * info.key_index + j).copied())
                    .unwrap_or(f64::NAN)
            };
            info.rpm_capacity = rpm.per_minute() as f64;
            info.tpm_capacity = tpm.per_minute() as f64;
            info.rpm_available = at(0);
            info.tpm_available = at(1);
        }
    }
}

impl Limits {
    /// [`Limits::pick`] in cluster mode: the least busy deployment whose breaker and
    /// concurrency cap let it take a request, and whose shared buckets grant it. No lock is
    /// held across a Redis call.
    pub(super) fn pick_shared(
        &self,
        shared: &SharedBuckets,
        tokens: u32,
    ) -> Result<(usize, Arc<Backend>), Refusal> {
        let now = Instant::now();
        let mut refusal: Option<Refusal> = None;
        let mut candidates: Vec<(u32, usize)> = Vec::new();
        for (i, d) in self.deployments.lock().iter_mut().enumerate() {
            match d.check(tokens, now) {
                Ok(()) => candidates.push((d.in_flight, i)),
                Err(r) => refusal = Some(merge(refusal, r)),
            }
        }
        candidates.sort_unstable();
        for (_, i) in candidates {
            if let Err(r) = shared.take(i, tokens) {
                if r == Refusal::Unreachable {
                    return Err(r);
                }
                refusal = Some(merge(refusal, r));
                continue;
            }
            // Granted: take the slot here unless the breaker or the cap changed meanwhile.
            let now = Instant::now();
            let mut deployments = self.deployments.lock();
            let Some(d) = deployments.get_mut(i) else {
                continue;
            };
            if let Err(r) = d.check(tokens, now) {
                drop(deployments);
                shared.give_back(i, tokens);
                refusal = Some(merge(refusal, r));
                continue;
            }
            let transition = d.take(tokens, now);
            let backend = Arc::clone(&d.backend);
            drop(deployments);
            if let Some(t) = transition {
                self.trace(i, t);
            }
            self.stats.in_flight.fetch_add(1, Ordering::Relaxed);
            return Ok((i, backend));
        }
        Err(refusal.unwrap_or(Refusal::Full(Duration::from_millis(50))))
    }

    /// The refusal of a request while the shared limits cannot be reached.
    pub(super) fn unreachable(&self) -> ProviderError {
        ProviderError::Unavailable {
            provider: self.name.clone(),
            message: "its shared rate limits cannot be read (Redis cannot be reached)".into(),
            retry_after: Some(UNREACHABLE_RETRY),
        }
    }
}

#[cfg(test)]
mod tests;
