//! Limits that add up across nodes (PROTOCOL §9): per-minute limiters (token buckets and exact
//! sliding windows) and per-period budgets with reservations, kept in Redis and changed only by
//! the atomic scripts of [`lua`]. The tenant governor and the provider deployments call this in
//! cluster mode; nothing here knows keys or providers beyond the names it is given.
//!
//! Bounds, with time read from Redis:
//! - token bucket: at most `per_minute` at once plus the refill (`per_minute` a minute), so at
//!   most `per_minute + per_minute * t / 60 s` in any span `t`; exactly the local bucket's bound;
//! - sliding window: never more than `per_minute` granted within any 60 s window (usage found
//!   above a reservation at settle time is counted after the fact, as on one node);
//! - budgets: the check and the reservation are one step, so the reservations and settled use
//!   counted in a period never exceed its budget.

use std::time::Duration;

use super::redis::Redis;
use crate::store::StoreError;

mod lua;
#[cfg(test)]
mod tests;

/// How a per-minute limiter counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Counting {
    /// A token bucket: bursts up to the limit, refilled continuously.
    Bucket,
    /// At most the limit in any trailing minute, counted from a log of grants.
    Sliding,
}

impl Counting {
    fn mode(self) -> &'static str {
        match self {
            Self::Bucket => "b",
            Self::Sliding => "w",
        }
    }
}

/// One per-minute limiter in Redis; `per_minute == 0` is unlimited.
#[derive(Debug, Clone)]
pub struct Limiter {
    first: String,
    second: String,
    counting: Counting,
    per_minute: u64,
}

impl Limiter {
    pub fn per_minute(&self) -> u64 {
        self.per_minute
    }
}

/// What a limiter granted: the units it counted and, for a sliding window, the grant's entry
/// (a give-back goes to that grant only).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Grant {
    pub counted: u64,
    pub entry: String,
}

/// A refused take: which limiter (index into the takes) refused first, and the longest wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused {
    pub index: usize,
    pub wait: Duration,
}

/// A correction of one limiter.
#[derive(Debug, Clone, Copy)]
pub struct Adjustment<'a> {
    pub limiter: &'a Limiter,
    /// Lower a bucket's level to this first (an upstream's remaining count, a hold).
    pub lower_to: Option<f64>,
    /// Units given back (negative: taken more).
    pub delta: i64,
    /// The grant a window gives back to.
    pub entry: &'a str,
}

/// Which budget refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Budget {
    DailyTokens,
    MonthlyTokens,
    MonthlySpend,
}

/// The budgets a key has and what one request asks of them.
#[derive(Debug, Clone)]
pub struct Ask<'a> {
    pub key_id: &'a str,
    /// Period names (`d2026-01-31`, `m2026-01`) and when their counters may go (ms).
    pub day: &'a str,
    pub month: &'a str,
    pub day_ends_ms: i64,
    pub month_ends_ms: i64,
    pub daily_tokens: Option<u64>,
    pub monthly_tokens: Option<u64>,
    pub monthly_spend_micros: Option<u64>,
    pub prompt: u64,
    /// Reply tokens wanted (clamped to what the token budgets leave).
    pub wanted: u64,
    /// Micro-units a prompt and a reply token cost.
    pub price_micros: (f64, f64),
    pub rpm: &'a Limiter,
    pub tpm: &'a Limiter,
}

/// A period's totals before its counter existed (the store's usage totals).
#[derive(Debug, Clone, Copy, Default)]
pub struct Seed {
    pub day_tokens: u64,
    pub month_tokens: u64,
    pub month_spend_micros: u64,
}

/// The answer to an [`Ask`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Admission {
    Granted {
        reply: u64,
        spend_micros: u64,
        tpm: Grant,
    },
    /// A period counter does not exist yet: ask again with a [`Seed`].
    NeedsSeed,
    OverBudget(Budget),
    /// Past the requests (`true`) or tokens per minute; the wait until it would fit.
    Limited {
        requests: bool,
        wait: Duration,
    },
}

/// A reservation replaced by the real use.
#[derive(Debug, Clone)]
pub struct Settlement<'a> {
    pub key_id: &'a str,
    /// The periods the reservation was counted in, and the current ones.
    pub held: (&'a str, &'a str),
    pub now: (&'a str, &'a str),
    pub reserved_tokens: u64,
    pub used_tokens: u64,
    pub reserved_micros: u64,
    pub spent_micros: u64,
    pub tpm: &'a Limiter,
    pub tpm_delta: i64,
    pub tpm_entry: &'a str,
}

/// The shared limits of a cluster; cheap to clone.
#[derive(Debug, Clone)]
pub struct SharedLimits {
    redis: Redis,
}

fn bad_reply() -> StoreError {
    StoreError::Unavailable("Redis sent an unexpected limits reply".into())
}

fn num(s: Option<&String>) -> Result<u64, StoreError> {
    s.and_then(|s| s.parse().ok()).ok_or_else(bad_reply)
}

impl SharedLimits {
    pub fn new(redis: Redis) -> Self {
        Self { redis }
    }

    /// Limiter `which` (`rpm`, `tpm`) of API key `key_id`.
    pub fn key_limiter(&self, key_id: &str, which: &str, c: Counting, per_minute: u64) -> Limiter {
        self.limiter(&format!("lim:{{{key_id}}}:{which}"), c, per_minute)
    }

    /// Limiter `which` of deployment `index` of provider `provider` (a token bucket).
    pub fn deployment_limiter(
        &self,
        provider: &str,
        index: usize,
        which: &str,
        per_minute: u64,
    ) -> Limiter {
        let name = format!("lim:{{prov:{provider}:{index}}}:{which}");
        self.limiter(&name, Counting::Bucket, per_minute)
    }

    fn limiter(&self, name: &str, counting: Counting, per_minute: u64) -> Limiter {
        Limiter {
            first: self.redis.key(name),
            second: self.redis.key(&format!("{name}:h")),
            counting,
            per_minute,
        }
    }

    fn budget_key(&self, key_id: &str, period: &str) -> String {
        self.redis.key(&format!("lim:{{{key_id}}}:{period}"))
    }

    /// Takes `n` units of each limiter, or of none.
    ///
    /// # Errors
    /// `Unavailable` when Redis cannot be reached.
    pub fn take(
        &self,
        takes: &[(&Limiter, u64)],
    ) -> Result<Result<Vec<Grant>, Refused>, StoreError> {
        let mut inv = lua::TAKE.prepare_invoke();
        for (l, n) in takes {
            inv.key(&l.first).key(&l.second);
            inv.arg(l.counting.mode()).arg(l.per_minute).arg(*n);
        }
        let reply: Vec<String> = self.redis.run(|c| inv.invoke(c))?;
        match reply.first().map(String::as_str) {
            Some("ok") => reply[1..]
                .chunks(2)
                .map(|pair| {
                    Ok(Grant {
                        counted: num(pair.first())?,
                        entry: pair.get(1).cloned().unwrap_or_default(),
                    })
                })
                .collect::<Result<Vec<_>, _>>()
                .map(Ok),
            Some("wait") => Ok(Err(Refused {
                index: usize::try_from(num(reply.get(1))?.saturating_sub(1)).unwrap_or(0),
                wait: Duration::from_millis(num(reply.get(2))?),
            })),
            _ => Err(bad_reply()),
        }
    }

    /// Applies corrections to limiters.
    ///
    /// # Errors
    /// `Unavailable` when Redis cannot be reached.
    pub fn adjust(&self, adjustments: &[Adjustment<'_>]) -> Result<(), StoreError> {
        let mut inv = lua::ADJUST.prepare_invoke();
        for a in adjustments {
            inv.key(&a.limiter.first).key(&a.limiter.second);
            inv.arg(a.limiter.counting.mode())
                .arg(a.limiter.per_minute)
                .arg(a.delta)
                .arg(a.entry)
                .arg(a.lower_to.map(|v| format!("{v}")).unwrap_or_default());
        }
        self.redis.run(|c| inv.invoke::<String>(c)).map(drop)
    }

    /// The levels of token buckets (for `/admin/providers`).
    ///
    /// # Errors
    /// `Unavailable` when Redis cannot be reached.
    pub fn levels(&self, buckets: &[&Limiter]) -> Result<Vec<f64>, StoreError> {
        let mut inv = lua::PEEK.prepare_invoke();
        for l in buckets {
            inv.key(&l.first).arg(l.per_minute);
        }
        let reply: Vec<String> = self.redis.run(|c| inv.invoke(c))?;
        reply
            .iter()
            .map(|s| s.parse().map_err(|_| bad_reply()))
            .collect()
    }

    /// Checks a request against its key's budgets and per-minute limiters and, when it fits,
    /// reserves it in all of them, in one atomic step.
    ///
    /// # Errors
    /// `Unavailable` when Redis cannot be reached.
    pub fn admit(&self, ask: &Ask<'_>, seed: Option<Seed>) -> Result<Admission, StoreError> {
        let opt = |v: Option<u64>| v.map(|v| v.to_string()).unwrap_or_default();
        let seed_given = seed.is_some();
        let seed = seed.unwrap_or_default();
        let mut inv = lua::ADMIT.prepare_invoke();
        inv.key(&ask.rpm.first)
            .key(&ask.rpm.second)
            .key(&ask.tpm.first)
            .key(&ask.tpm.second)
            .key(self.budget_key(ask.key_id, ask.day))
            .key(self.budget_key(ask.key_id, ask.month));
        inv.arg(ask.tpm.counting.mode())
            .arg(ask.rpm.per_minute)
            .arg(ask.tpm.per_minute)
            .arg(ask.prompt)
            .arg(ask.wanted)
            .arg(opt(ask.daily_tokens))
            .arg(opt(ask.monthly_tokens))
            .arg(opt(ask.monthly_spend_micros))
            .arg(format!("{}", ask.price_micros.0))
            .arg(format!("{}", ask.price_micros.1))
            .arg(if seed_given { "1" } else { "0" })
            .arg(seed.day_tokens)
            .arg(seed.month_tokens)
            .arg(seed.month_spend_micros)
            .arg(ask.day_ends_ms)
            .arg(ask.month_ends_ms);
        let reply: Vec<String> = self.redis.run(|c| inv.invoke(c))?;
        let at = |i: usize| reply.get(i).map(String::as_str);
        Ok(match (at(0), at(1)) {
            (Some("ok"), _) => Admission::Granted {
                reply: num(reply.get(1))?,
                spend_micros: num(reply.get(2))?,
                tpm: Grant {
                    counted: num(reply.get(3))?,
                    entry: reply.get(4).cloned().unwrap_or_default(),
                },
            },
            (Some("seed"), _) => Admission::NeedsSeed,
            (Some("quota"), Some("day")) => Admission::OverBudget(Budget::DailyTokens),
            (Some("quota"), Some("month")) => Admission::OverBudget(Budget::MonthlyTokens),
            (Some("quota"), Some("spend")) => Admission::OverBudget(Budget::MonthlySpend),
            (Some("limited"), Some(what)) => Admission::Limited {
                requests: what == "requests",
                wait: Duration::from_millis(num(reply.get(2))?),
            },
            _ => return Err(bad_reply()),
        })
    }

    /// Replaces a reservation by the real use: budgets and the tokens-per-minute limiter.
    ///
    /// # Errors
    /// `Unavailable` when Redis cannot be reached.
    pub fn settle(&self, s: &Settlement<'_>) -> Result<(), StoreError> {
        let mut inv = lua::SETTLE.prepare_invoke();
        inv.key(&s.tpm.first)
            .key(&s.tpm.second)
            .key(self.budget_key(s.key_id, s.held.0))
            .key(self.budget_key(s.key_id, s.held.1))
            .key(self.budget_key(s.key_id, s.now.0))
            .key(self.budget_key(s.key_id, s.now.1));
        inv.arg(s.tpm.counting.mode())
            .arg(s.tpm.per_minute)
            .arg(s.tpm_delta)
            .arg(s.tpm_entry)
            .arg(s.reserved_tokens)
            .arg(s.used_tokens)
            .arg(s.reserved_micros)
            .arg(s.spent_micros);
        self.redis.run(|c| inv.invoke::<String>(c)).map(drop)
    }
}
