//! A sliding-window limiter: at most `limit` units in any trailing minute, counted exactly from a
//! log of grants (bounded by the limit itself, as each entry holds at least one unit).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

const WINDOW: Duration = Duration::from_secs(60);

#[derive(Debug, Clone)]
pub struct SlidingWindow {
    limit: u64,
    used: u64,
    log: VecDeque<(Instant, u64)>,
}

impl SlidingWindow {
    /// At most `per_minute` units in any minute; `0` means unlimited.
    pub fn per_minute(per_minute: u32) -> Self {
        Self {
            limit: u64::from(per_minute),
            used: 0,
            log: VecDeque::new(),
        }
    }

    fn expire(&mut self, now: Instant) {
        while let Some(&(t, n)) = self.log.front() {
            if now.saturating_duration_since(t) < WINDOW {
                break;
            }
            self.used -= n;
            self.log.pop_front();
        }
    }

    /// The most units the window holds (0: unlimited).
    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// Grants `n` units, or answers how long until they fit.
    ///
    /// # Errors
    /// The wait until enough of the window has expired.
    pub fn try_take(&mut self, n: u32, now: Instant) -> Result<(), Duration> {
        if self.limit == 0 || n == 0 {
            return Ok(());
        }
        self.expire(now);
        let n = u64::from(n).min(self.limit);
        if self.used + n <= self.limit {
            self.used += n;
            self.log.push_back((now, n));
            return Ok(());
        }
        // Walk the log until enough units would have expired.
        let mut freed = 0;
        for &(t, m) in &self.log {
            freed += m;
            if self.used - freed + n <= self.limit {
                return Err((t + WINDOW).saturating_duration_since(now));
            }
        }
        Err(WINDOW)
    }

    /// Returns up to `n` units of the grant made at `granted_at` (a reservation larger than the
    /// use). Only that grant's entry shrinks, never another request's; a grant that has
    /// already left the window has nothing to give back.
    pub fn give_back(&mut self, granted_at: Instant, n: u64) {
        let Some(i) = self
            .log
            .iter()
            .rposition(|(t, m)| *t == granted_at && *m > 0)
        else {
            return;
        };
        let take = self.log[i].1.min(n);
        self.log[i].1 -= take;
        self.used -= take;
        if self.log[i].1 == 0 {
            self.log.remove(i);
        }
    }

    /// Counts `n` more units used now (usage above the reservation).
    pub fn add(&mut self, n: u64, now: Instant) {
        if self.limit == 0 || n == 0 {
            return;
        }
        self.used += n;
        self.log.push_back((now, n));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_exactly_over_the_trailing_minute() {
        let t0 = Instant::now();
        let mut w = SlidingWindow::per_minute(3);
        w.try_take(1, t0).unwrap(); // ok: test code
        w.try_take(1, t0 + Duration::from_secs(10)).unwrap(); // ok: test code
        w.try_take(1, t0 + Duration::from_secs(20)).unwrap(); // ok: test code
                                                              // Full: the first grant expires at t0 + 60 s.
        assert_eq!(
            w.try_take(1, t0 + Duration::from_secs(30)),
            Err(Duration::from_secs(30))
        );
        w.try_take(1, t0 + Duration::from_secs(60)).unwrap(); // ok: test code
                                                              // Two units need the grants of t0+10 and t0+20 to expire.
        assert_eq!(
            w.try_take(2, t0 + Duration::from_secs(61)),
            Err(Duration::from_secs(19))
        );
    }

    #[test]
    fn give_back_touches_only_its_own_grant() {
        let t0 = Instant::now();
        let t1 = t0 + Duration::from_secs(30);
        let mut w = SlidingWindow::per_minute(100);
        w.try_take(50, t0).unwrap(); // ok: test code
        w.try_take(50, t1).unwrap(); // ok: test code
        w.give_back(t0, 40); // the first request used 10
                             // At t0 + 60 s the first grant (10 left) expires; the second (50) still counts.
        let t2 = t0 + Duration::from_secs(60);
        w.try_take(50, t2).unwrap(); // ok: test code
        assert!(w.try_take(1, t2).is_err());
    }

    #[test]
    fn give_back_and_add() {
        let t0 = Instant::now();
        let mut w = SlidingWindow::per_minute(100);
        w.try_take(100, t0).unwrap(); // ok: test code
        w.give_back(t0, 60);
        w.try_take(60, t0).unwrap(); // ok: test code
        assert!(w.try_take(1, t0).is_err());
        let mut w = SlidingWindow::per_minute(0);
        w.try_take(u32::MAX, t0).unwrap(); // ok: test code
        w.add(5, t0);
    }
}
