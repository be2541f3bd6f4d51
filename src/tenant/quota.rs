//! Per-key limits and quotas, checked before any upstream call: requests and tokens per minute
//! (token buckets, or exact sliding windows), tokens per UTC day and month, and spend per
//! month. A request reserves its estimated prompt tokens plus `max_tokens` (or the configured
//! reply reserve); the reservation is reconciled with the real usage when the turn ends, so
//! concurrent streams cannot overrun a budget. Day and month totals survive restarts: they are
//! read back from the usage totals the usage writer keeps.
//!
//! In cluster mode ([`Governor::with_redis`]) all of this lives in Redis instead, shared by
//! every node (see [`shared`]); without Redis nothing here touches the network.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use parking_lot::Mutex;

use self::shared::{settle_shared, take_request_shared};
use super::Principal;
use crate::cluster::limits::SharedLimits;
use crate::cluster::redis::Redis;
use crate::error::{ApiError, ErrorCode};
use crate::limits::{SlidingWindow, TokenBucket};
use crate::store::{periods, KeyRecord, LimitWindow, Store};

#[cfg(test)]
mod cluster_tests;
mod shared;

pub use crate::domain::Price;

/// The price table; models without a price cost nothing.
#[derive(Debug, Clone, Default)]
pub struct Prices(pub HashMap<String, Price>);

impl Prices {
    /// Whether the table prices `model`.
    pub fn has(&self, model: &str) -> bool {
        self.0.contains_key(model)
    }

    pub fn cost(&self, model: &str, prompt_tokens: u64, completion_tokens: u64) -> f64 {
        self.0.get(model).map_or(0.0, |p| {
            (prompt_tokens as f64 * p.input_per_mtok + completion_tokens as f64 * p.output_per_mtok)
                / 1e6
        })
    }
}

/// What a request holds against its key until it is settled.
#[derive(Debug)]
pub struct Reservation {
    key_id: String,
    tokens: u64,
    /// What the tokens-per-minute limiter really counted of `tokens`, and when.
    tpm_granted: u64,
    granted_at: Instant,
    /// The UTC day and month the reservation was counted in.
    periods: (String, String),
    spend: f64,
    /// The reply's token limit when the key's budget leaves less than it asked for.
    max_tokens: Option<u32>,
    /// What the reservation holds in Redis (cluster mode).
    shared: Option<shared::Held>,
}

impl Reservation {
    /// The reply's token limit the budget imposes, when it is lower than what was asked for.
    pub fn max_tokens(&self) -> Option<u32> {
        self.max_tokens
    }
}

/// A reservation that settles itself, with the usage set on it, when dropped: however a
/// request ends (an error, a cancel, a panic), its key is charged what it used, not what it held.
pub struct Bill {
    governor: std::sync::Arc<Governor>,
    reservation: Option<Reservation>,
    used: u64,
    cost: f64,
}

impl Bill {
    pub fn new(governor: std::sync::Arc<Governor>, reservation: Option<Reservation>) -> Self {
        Self {
            governor,
            reservation,
            used: 0,
            cost: 0.0,
        }
    }

    /// The price of `prompt` and `completion` tokens of `model`.
    pub fn cost(&self, model: &str, prompt: u64, completion: u64) -> f64 {
        self.governor.prices().cost(model, prompt, completion)
    }

    /// The reply's token limit the key's budget imposes, if it lowered what was asked for.
    pub fn clamped(&self) -> Option<u32> {
        self.reservation.as_ref().and_then(Reservation::max_tokens)
    }

    /// What the request used in the end.
    pub fn set(&mut self, used_tokens: u64, cost: f64) {
        self.used = used_tokens;
        self.cost = cost;
    }
}

impl Drop for Bill {
    fn drop(&mut self) {
        if let Some(r) = self.reservation.take() {
            self.governor.settle(r, self.used, self.cost);
        }
    }
}

enum Limiter {
    Bucket(TokenBucket),
    Sliding(SlidingWindow),
}

impl Limiter {
    fn new(per_minute: Option<u32>, window: LimitWindow, now: Instant) -> Self {
        let n = per_minute.unwrap_or(0);
        match window {
            LimitWindow::Bucket => Self::Bucket(TokenBucket::per_minute(n, now)),
            LimitWindow::Sliding => Self::Sliding(SlidingWindow::per_minute(n)),
        }
    }

    /// Takes `n` units; answers how many were really counted (a request larger than the whole
    /// limit is admitted on a full limiter and counts as the limit; unlimited counts nothing).
    fn try_take(&mut self, n: u64, now: Instant) -> Result<u64, Duration> {
        let n32 = u32::try_from(n).unwrap_or(u32::MAX);
        match self {
            Self::Bucket(b) => b.try_take(n32, now).map(|()| (b.capacity() as u64).min(n)),
            Self::Sliding(w) => w.try_take(n32, now).map(|()| w.limit().min(n)),
        }
    }

    /// Corrects the grant made at `granted_at` by `delta` (positive: give back; negative:
    /// take more).
    fn adjust(&mut self, delta: i64, granted_at: Instant, now: Instant) {
        match self {
            Self::Bucket(b) => b.adjust(delta, now),
            Self::Sliding(w) if delta >= 0 => w.give_back(granted_at, delta.unsigned_abs()),
            Self::Sliding(w) => w.add(delta.unsigned_abs(), now),
        }
    }
}

struct KeyState {
    rpm: Limiter,
    tpm: Limiter,
    day: String,
    day_tokens: u64,
    month: String,
    month_tokens: u64,
    month_spend: f64,
}

/// Enforces every key's limits; shared by all edges.
pub struct Governor {
    store: Store,
    prices: Prices,
    reply_reserve: u32,
    keys: Mutex<HashMap<String, KeyState>>,
    /// Cluster mode: every limit and budget is counted in Redis, none in `keys`.
    shared: Option<SharedLimits>,
}

impl Governor {
    /// `reply_reserve`: tokens reserved for the reply when a request gives no `max_tokens`.
    pub fn new(store: Store, prices: Prices, reply_reserve: u32) -> Self {
        Self {
            store,
            prices,
            reply_reserve,
            keys: Mutex::new(HashMap::new()),
            shared: None,
        }
    }

    /// Counts every key's limits and budgets in Redis, shared with the other nodes of the
    /// cluster (PROTOCOL §9), instead of in this process.
    #[must_use]
    pub fn with_redis(mut self, redis: Redis) -> Self {
        self.shared = Some(SharedLimits::new(redis));
        self
    }

    pub fn prices(&self) -> &Prices {
        &self.prices
    }

    /// Whether admitting `principal`'s requests needs their prompt's size: its key limits
    /// tokens (per minute, day or month) or spend. Other keys reserve the reply alone, and the
    /// settlement counts what was really used.
    pub fn limits_tokens(&self, principal: &Principal) -> bool {
        principal.limits.as_deref().is_some_and(|rec| {
            rec.tpm.is_some()
                || rec.daily_tokens.is_some()
                || rec.monthly_tokens.is_some()
                || rec.monthly_spend.is_some()
        })
    }

    /// Admits a request of `prompt_tokens` for `model` (priced by that name), or refuses it
    /// with `rate_limited` / `quota_exceeded` and a retry hint. Development mode has no limits.
    ///
    /// # Errors
    /// `rate_limited` past rpm/tpm, `quota_exceeded` past a daily, monthly or spend budget;
    /// in cluster mode `upstream_unavailable` when Redis cannot be reached.
    pub fn admit(
        &self,
        principal: &Principal,
        model: &str,
        prompt_tokens: u32,
        max_tokens: Option<u32>,
    ) -> Result<Option<Reservation>, ApiError> {
        let Some(rec) = principal.limits.as_deref() else {
            return Ok(None);
        };
        if let Some(shared) = &self.shared {
            return self
                .admit_shared(shared, rec, model, prompt_tokens, max_tokens)
                .map(Some);
        }
        let now = Instant::now();
        let wall_ms = chrono::Utc::now().timestamp_millis();
        let mut keys = self.keys.lock();
        let state = self.state_of(&mut keys, rec, wall_ms, now);
        // A budget that covers the prompt serves it: what the reply may use is clamped to what
        // is left (at least one token); only a prompt that does not fit is refused.
        let prompt = u64::from(prompt_tokens);
        check_budget(
            rec.daily_tokens,
            state.day_tokens + prompt + 1,
            "daily token",
            until_next_day(wall_ms),
        )?;
        check_budget(
            rec.monthly_tokens,
            state.month_tokens + prompt + 1,
            "monthly token",
            until_next_month(wall_ms),
        )?;
        let wanted = u64::from(max_tokens.unwrap_or(self.reply_reserve));
        let left = [
            rec.daily_tokens
                .map(|l| l.saturating_sub(state.day_tokens + prompt)),
            rec.monthly_tokens
                .map(|l| l.saturating_sub(state.month_tokens + prompt)),
        ]
        .into_iter()
        .flatten()
        .min();
        let reply = left.map_or(wanted, |left| wanted.min(left));
        let clamped = (reply < wanted).then(|| u32::try_from(reply).unwrap_or(u32::MAX));
        let tokens = prompt + reply;
        let spend = self.prices.cost(model, prompt, reply);
        if let Some(limit) = rec.monthly_spend {
            if state.month_spend + spend > limit {
                return Err(quota("monthly spend", until_next_month(wall_ms)));
            }
        }
        state
            .rpm
            .try_take(1, now)
            .map_err(|wait| limited("requests", wait))?;
        let tpm_granted = match state.tpm.try_take(tokens, now) {
            Ok(granted) => granted,
            Err(wait) => {
                state.rpm.adjust(1, now, now);
                return Err(limited("tokens", wait));
            }
        };
        state.day_tokens += tokens;
        state.month_tokens += tokens;
        state.month_spend += spend;
        let periods = (state.day.clone(), state.month.clone());
        Ok(Some(Reservation {
            key_id: rec.id.clone(),
            tokens,
            tpm_granted,
            granted_at: now,
            periods,
            spend,
            max_tokens: clamped,
            shared: None,
        }))
    }

    /// Counts a request that reaches no model (creating a conversation) against the key's
    /// requests per minute: work a key asks for is metered even when it costs no tokens.
    ///
    /// # Errors
    /// `rate_limited` past the key's rpm; in cluster mode `upstream_unavailable` when Redis
    /// cannot be reached.
    pub fn take_request(&self, principal: &Principal) -> Result<(), ApiError> {
        let Some(rec) = principal.limits.as_deref() else {
            return Ok(());
        };
        if let Some(shared) = &self.shared {
            return take_request_shared(shared, rec);
        }
        let now = Instant::now();
        let wall_ms = chrono::Utc::now().timestamp_millis();
        let mut keys = self.keys.lock();
        self.state_of(&mut keys, rec, wall_ms, now)
            .rpm
            .try_take(1, now)
            .map(|_| ())
            .map_err(|wait| limited("requests", wait))
    }

    /// Replaces a reservation by what the request really used.
    pub fn settle(&self, mut reservation: Reservation, used_tokens: u64, cost: f64) {
        if let (Some(shared), Some(held)) = (&self.shared, reservation.shared.take()) {
            settle_shared(shared, &reservation, &held, used_tokens, cost);
            return;
        }
        let now = Instant::now();
        let mut keys = self.keys.lock();
        let Some(state) = keys.get_mut(&reservation.key_id) else {
            return;
        };
        let delta = i64::try_from(reservation.tpm_granted).unwrap_or(i64::MAX)
            - i64::try_from(used_tokens).unwrap_or(i64::MAX);
        state.tpm.adjust(delta, reservation.granted_at, now);
        // A reservation made before midnight (or the month's end) was counted in a period
        // that is over: the new period gets the real use, not the old reservation's credit.
        let (day, month) = &reservation.periods;
        let held = |same: bool| if same { reservation.tokens } else { 0 };
        state.day_tokens = (state.day_tokens + used_tokens).saturating_sub(held(*day == state.day));
        state.month_tokens =
            (state.month_tokens + used_tokens).saturating_sub(held(*month == state.month));
        let spent = if *month == state.month {
            reservation.spend
        } else {
            0.0
        };
        state.month_spend = (state.month_spend + cost - spent).max(0.0);
    }

    /// The key's state, loaded on first use and rolled over to the current day and month.
    fn state_of<'a>(
        &self,
        keys: &'a mut HashMap<String, KeyState>,
        rec: &KeyRecord,
        wall_ms: i64,
        now: Instant,
    ) -> &'a mut KeyState {
        let state = keys
            .entry(rec.id.clone())
            .or_insert_with(|| self.load(rec, wall_ms, now));
        self.roll(state, rec, wall_ms);
        state
    }

    fn load(&self, rec: &KeyRecord, wall_ms: i64, now: Instant) -> KeyState {
        let (day, month) = periods(wall_ms);
        let total = |period: &str| self.store.period_total(&rec.id, period).unwrap_or_default();
        let (d, m) = (total(&day), total(&month));
        let window = rec.window.unwrap_or_default();
        KeyState {
            rpm: Limiter::new(rec.rpm, window, now),
            tpm: Limiter::new(rec.tpm, window, now),
            day,
            day_tokens: d.tokens,
            month,
            month_tokens: m.tokens,
            month_spend: m.spend,
        }
    }

    /// Starts new day and month counts when the UTC date has moved on.
    fn roll(&self, state: &mut KeyState, rec: &KeyRecord, wall_ms: i64) {
        let (day, month) = periods(wall_ms);
        if day != state.day {
            state.day_tokens = self
                .store
                .period_total(&rec.id, &day)
                .unwrap_or_default()
                .tokens;
            state.day = day;
        }
        if month != state.month {
            let m = self.store.period_total(&rec.id, &month).unwrap_or_default();
            state.month_tokens = m.tokens;
            state.month_spend = m.spend;
            state.month = month;
        }
    }
}

fn check_budget(
    limit: Option<u64>,
    after: u64,
    what: &str,
    retry: Duration,
) -> Result<(), ApiError> {
    match limit {
        Some(limit) if after > limit => Err(quota(what, retry)),
        _ => Ok(()),
    }
}

fn quota(what: &str, retry: Duration) -> ApiError {
    ApiError::new(
        ErrorCode::QuotaExceeded,
        format!("this key's {what} budget is used up"),
    )
    .with_retry_after(retry)
}

fn limited(what: &str, wait: Duration) -> ApiError {
    ApiError::new(
        ErrorCode::RateLimited,
        format!("this key's {what} per minute limit is reached"),
    )
    .with_retry_after(wait.max(Duration::from_millis(1)))
}

fn until_next_day(wall_ms: i64) -> Duration {
    let day = 86_400_000;
    Duration::from_millis(u64::try_from(day - wall_ms.rem_euclid(day)).unwrap_or(0))
}

fn until_next_month(wall_ms: i64) -> Duration {
    use chrono::Datelike;
    let now = chrono::DateTime::from_timestamp_millis(wall_ms).unwrap_or_default();
    let (y, m) = if now.month() == 12 {
        (now.year() + 1, 1)
    } else {
        (now.year(), now.month() + 1)
    };
    let next = chrono::NaiveDate::from_ymd_opt(y, m, 1)
        .and_then(|d| d.and_hms_opt(0, 0, 0))
        .map_or(wall_ms, |d| d.and_utc().timestamp_millis());
    Duration::from_millis(u64::try_from(next - wall_ms).unwrap_or(0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::TenantId;
    use std::sync::Arc;

    fn principal(rec: KeyRecord) -> Principal {
        Principal {
            tenant: rec.tenant.clone(),
            key_id: Some(rec.id.clone()),
            models: None,
            limits: Some(Arc::new(rec)),
        }
    }

    fn key(id: &str) -> KeyRecord {
        KeyRecord {
            id: id.into(),
            tenant: TenantId("t".into()),
            rpm: None,
            tpm: None,
            daily_tokens: None,
            models: None,
            monthly_tokens: None,
            monthly_spend: None,
            regions: None,
            window: None,
            pii: None,
            cache: None,
            prefix: String::new(),
            created_at: 0,
        }
    }

    fn governor() -> (tempfile::TempDir, Governor) {
        let dir = tempfile::tempdir().unwrap(); // ok: test code
        let store = Store::open(dir.path()).unwrap(); // ok: test code
        let prices = Prices(HashMap::from([(
            "m".to_owned(),
            Price {
                input_per_mtok: 1e6,
                output_per_mtok: 2e6,
            },
        )]));
        (dir, Governor::new(store, prices, 100))
    }

    #[test]
    fn rpm_and_tpm_refuse_with_a_retry_hint() {
        let (_d, g) = governor();
        let p = principal(KeyRecord {
            rpm: Some(2),
            ..key("a")
        });
        g.admit(&p, "x", 10, None).unwrap(); // ok: test code
        g.admit(&p, "x", 10, None).unwrap(); // ok: test code
        let err = g.admit(&p, "x", 10, None).unwrap_err();
        assert_eq!(err.code, ErrorCode::RateLimited);
        assert!(err.retry_after.unwrap() > Duration::from_secs(20)); // ok: test code
        let p = principal(KeyRecord {
            tpm: Some(300),
            window: Some(LimitWindow::Sliding),
            ..key("b")
        });
        g.admit(&p, "x", 50, Some(50)).unwrap(); // ok: test code
        g.admit(&p, "x", 50, Some(50)).unwrap(); // ok: test code
        g.admit(&p, "x", 50, Some(50)).unwrap(); // ok: test code
        assert_eq!(
            g.admit(&p, "x", 50, Some(50)).unwrap_err().code,
            ErrorCode::RateLimited
        );
    }

    #[test]
    fn reservations_are_reconciled_with_real_usage() {
        let (_d, g) = governor();
        let p = principal(KeyRecord {
            daily_tokens: Some(1000),
            ..key("c")
        });
        // Each request reserves 10 + 100 (the reply reserve): nine fit, the tenth does not...
        let held: Vec<_> = (0..9)
            .map(|_| g.admit(&p, "x", 10, None).unwrap().unwrap()) // ok: test code
            .collect();
        let err = g.admit(&p, "x", 10, None).unwrap_err();
        assert_eq!(err.code, ErrorCode::QuotaExceeded);
        assert!(err.retry_after.is_some());
        // ...until the held ones settle at 20 tokens each.
        for r in held {
            g.settle(r, 20, 0.0);
        }
        g.admit(&p, "x", 10, None).unwrap(); // ok: test code
    }

    #[test]
    fn spend_budget_counts_the_price_table() {
        let (_d, g) = governor();
        // 1 prompt token costs 1.0 and 1 completion token 2.0 under model "m".
        let p = principal(KeyRecord {
            monthly_spend: Some(10.0),
            ..key("s")
        });
        let r = g.admit(&p, "m", 1, Some(1)).unwrap().unwrap(); // ok: test code; reserves 3.0
        g.settle(r, 2, 3.0);
        let r = g.admit(&p, "m", 2, Some(2)).unwrap().unwrap(); // ok: test code; 6.0 more: 9.0
        assert_eq!(
            g.admit(&p, "m", 1, Some(1)).unwrap_err().code,
            ErrorCode::QuotaExceeded
        );
        g.settle(r, 1, 1.0); // really 1.0: 4.0 in all
        g.admit(&p, "m", 1, Some(1)).unwrap(); // ok: test code
    }

    #[test]
    fn development_mode_is_unlimited() {
        let (_d, g) = governor();
        assert!(g
            .admit(&Principal::local(), "m", u32::MAX, None)
            .unwrap() // ok: test code
            .is_none());
    }

    #[test]
    fn month_boundaries() {
        // 2026-12-31T23:00:00Z → one hour to the next month and day.
        let ms = chrono::NaiveDate::from_ymd_opt(2026, 12, 31)
            .unwrap() // ok: test code
            .and_hms_opt(23, 0, 0)
            .unwrap() // ok: test code
            .and_utc()
            .timestamp_millis();
        assert_eq!(until_next_month(ms), Duration::from_secs(3600));
        assert_eq!(until_next_day(ms), Duration::from_secs(3600));
    }

    #[test]
    fn a_budget_that_covers_the_prompt_clamps_the_reply() {
        let (_dir, g) = governor();
        let p = principal(KeyRecord {
            daily_tokens: Some(100),
            ..key("small")
        });
        // The default reserve (1024) does not fit: the reply gets what is left.
        let r = g.admit(&p, "x", 30, None).unwrap().unwrap(); // ok: test code
        assert_eq!(r.max_tokens(), Some(70));
        g.settle(r, 0, 0.0);
        // A limit that fits is left alone.
        let r = g.admit(&p, "x", 30, Some(20)).unwrap().unwrap(); // ok: test code
        assert_eq!(r.max_tokens(), None);
        // A prompt that leaves no room for one reply token is refused.
        let err = g.admit(&p, "x", 100, None).unwrap_err(); // ok: test code
        assert_eq!(err.code, ErrorCode::QuotaExceeded);
    }
}
