//! A token bucket: `capacity` tokens, refilled continuously at `capacity` per minute. Used for
//! requests per minute (one token a request) and tokens per minute (the prompt estimate taken
//! before sending, corrected by the real usage afterwards).

use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct TokenBucket {
    capacity: f64,
    per_sec: f64,
    level: f64,
    last: Instant,
}

impl TokenBucket {
    /// A full bucket of `per_minute` tokens; `0` means unlimited.
    pub fn per_minute(per_minute: u32, now: Instant) -> Self {
        let capacity = f64::from(per_minute);
        Self {
            capacity,
            per_sec: capacity / 60.0,
            level: capacity,
            last: now,
        }
    }

    pub fn is_unlimited(&self) -> bool {
        self.capacity == 0.0
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.level = (self.level + elapsed * self.per_sec).min(self.capacity);
        self.last = self.last.max(now);
    }

    /// Takes `n` tokens if they are there; otherwise answers how long until they would be.
    /// A request larger than the whole bucket is admitted when the bucket is full, so it can
    /// never wait forever.
    ///
    /// # Errors
    /// The wait until `n` tokens are available.
    pub fn try_take(&mut self, n: u32, now: Instant) -> Result<(), Duration> {
        if self.is_unlimited() {
            return Ok(());
        }
        self.refill(now);
        let n = f64::from(n).min(self.capacity);
        if self.level >= n {
            self.level -= n;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((n - self.level) / self.per_sec))
        }
    }

    /// Whether `n` tokens could be taken now (without taking them).
    pub fn check(&mut self, n: u32, now: Instant) -> Result<(), Duration> {
        let mut probe = self.clone();
        probe.try_take(n, now)
    }

    /// Gives back `n` tokens (a reservation that turned out too large) or, negative, takes
    /// more (usage above the estimate; the level may go below zero, which delays the next).
    pub fn adjust(&mut self, delta: i64, now: Instant) {
        if self.is_unlimited() {
            return;
        }
        self.refill(now);
        self.level = (self.level + delta as f64).min(self.capacity);
    }

    /// Lowers the level to what the upstream says remains (never raises it: our own count may
    /// be the stricter one).
    pub fn clamp_to(&mut self, remaining: u64, now: Instant) {
        if self.is_unlimited() {
            return;
        }
        self.refill(now);
        self.level = self.level.min(remaining as f64);
    }

    /// Holds the bucket until `until` (an upstream 429 with `Retry-After`): nothing may be taken
    /// before, one token then (not a whole refill interval later), and the usual pace after.
    pub fn hold_until(&mut self, until: Instant, now: Instant) {
        if self.is_unlimited() {
            return;
        }
        self.refill(now);
        let wait = until.saturating_duration_since(now).as_secs_f64();
        self.level = self.level.min(1.0 - wait * self.per_sec);
    }

    /// The current level (for `/admin/providers`).
    pub fn level(&mut self, now: Instant) -> f64 {
        self.refill(now);
        self.level
    }

    pub fn capacity(&self) -> f64 {
        self.capacity
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn takes_until_empty_then_says_how_long_to_wait() {
        let t0 = Instant::now();
        let mut b = TokenBucket::per_minute(60, t0); // one a second
        for _ in 0..60 {
            b.try_take(1, t0).unwrap(); // ok: test code
        }
        assert_eq!(b.try_take(1, t0), Err(Duration::from_secs(1)));
        assert_eq!(
            b.try_take(1, t0 + Duration::from_millis(500)).unwrap_err(),
            Duration::from_millis(500)
        );
        b.try_take(1, t0 + Duration::from_secs(1)).unwrap(); // ok: test code
                                                             // Refill never exceeds capacity.
        assert!((b.level(t0 + Duration::from_secs(3600)) - 60.0).abs() < 1e-9);
    }

    #[test]
    fn unlimited_always_admits() {
        let t0 = Instant::now();
        let mut b = TokenBucket::per_minute(0, t0);
        for _ in 0..10_000 {
            b.try_take(1_000_000, t0).unwrap(); // ok: test code
        }
    }

    #[test]
    fn oversized_request_is_admitted_on_a_full_bucket() {
        let t0 = Instant::now();
        let mut b = TokenBucket::per_minute(100, t0);
        b.try_take(500, t0).unwrap(); // ok: test code
        assert!(b.try_take(1, t0).is_err());
    }

    #[test]
    fn usage_corrections_and_upstream_hints() {
        let t0 = Instant::now();
        let mut b = TokenBucket::per_minute(6000, t0); // 100 a second
        b.try_take(1000, t0).unwrap(); // ok: test code
        b.adjust(800, t0); // the reply used 200, not 1000
        assert!((b.level(t0) - 5800.0).abs() < 1e-9);
        b.adjust(-6000, t0); // far above the estimate: in debt
        assert_eq!(b.check(1, t0).unwrap_err(), Duration::from_secs_f64(2.01));
        let mut b = TokenBucket::per_minute(6000, t0);
        b.clamp_to(10, t0);
        assert!(b.try_take(20, t0).is_err());
        b.hold_until(t0 + Duration::from_secs(1), t0);
        assert_eq!(b.check(1, t0).unwrap_err(), Duration::from_secs(1));
        assert!(b.check(1, t0 + Duration::from_millis(999)).is_err());
        b.try_take(1, t0 + Duration::from_secs(1)).unwrap(); // ok: test code
        assert!(b.check(1, t0 + Duration::from_secs(1)).is_err());
    }
}
