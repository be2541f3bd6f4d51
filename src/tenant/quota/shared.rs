//! The governor in cluster mode: each request is admitted by one Redis script that checks the
//! key's budgets and per-minute limiters and reserves in all of them at once, and settled by
//! another (see `cluster::limits`). Nothing is kept in this process, so there is no local fast
//! path: every admission is one Redis round trip (two on a period's first request, which seeds
//! the counters from the store's usage totals).

use std::time::Instant;

use super::{limited, quota, until_next_day, until_next_month, Governor, Reservation};
use crate::cluster::limits::{
    Admission, Ask, Budget, Counting, Limiter, Seed, Settlement, SharedLimits,
};
use crate::error::ApiError;
use crate::store::{periods, KeyRecord, LimitWindow, StoreError};

/// What a reservation holds in Redis besides its tokens.
#[derive(Debug)]
pub(super) struct Held {
    /// The key's tokens-per-minute limiter and the grant's window entry.
    tpm: Limiter,
    entry: String,
    spend_micros: u64,
}

/// A day counter stays this long past its period (and a month's), so that a node whose clock
/// is a little behind still finds it.
const GRACE_MS: i64 = 86_400_000;

fn limiter(
    shared: &SharedLimits,
    rec: &KeyRecord,
    which: &str,
    per_minute: Option<u32>,
) -> Limiter {
    let counting = match rec.window.unwrap_or_default() {
        LimitWindow::Bucket => Counting::Bucket,
        LimitWindow::Sliding => Counting::Sliding,
    };
    shared.key_limiter(&rec.id, which, counting, per_minute.map_or(0, u64::from))
}

/// Money as whole micro-units (Redis counts integers).
fn micros(amount: f64) -> u64 {
    // `as` saturates: a negative or NaN amount is 0.
    (amount * 1e6).round() as u64
}

impl Governor {
    pub(super) fn admit_shared(
        &self,
        shared: &SharedLimits,
        rec: &KeyRecord,
        model: &str,
        prompt_tokens: u32,
        max_tokens: Option<u32>,
    ) -> Result<Reservation, ApiError> {
        let wall_ms = chrono::Utc::now().timestamp_millis();
        let (day, month) = periods(wall_ms);
        let day_left = until_next_day(wall_ms);
        let month_left = until_next_month(wall_ms);
        let ends = |left: std::time::Duration| {
            wall_ms + i64::try_from(left.as_millis()).unwrap_or(i64::MAX / 2) + GRACE_MS
        };
        let (rpm, tpm) = (
            limiter(shared, rec, "rpm", rec.rpm),
            limiter(shared, rec, "tpm", rec.tpm),
        );
        let prompt = u64::from(prompt_tokens);
        let wanted = u64::from(max_tokens.unwrap_or(self.reply_reserve));
        let ask = Ask {
            key_id: &rec.id,
            day: &day,
            month: &month,
            day_ends_ms: ends(day_left),
            month_ends_ms: ends(month_left),
            daily_tokens: rec.daily_tokens,
            monthly_tokens: rec.monthly_tokens,
            monthly_spend_micros: rec.monthly_spend.map(micros),
            prompt,
            wanted,
            price_micros: self
                .prices
                .0
                .get(model)
                .map_or((0.0, 0.0), |p| (p.input_per_mtok, p.output_per_mtok)),
            rpm: &rpm,
            tpm: &tpm,
        };
        let mut admission = shared.admit(&ask, None)?;
        if admission == Admission::NeedsSeed {
            // The first request of a period on any node: start from what the store has
            // recorded. The script sets only counters still missing, so two nodes seeding at
            // once count it once.
            let d = self.store.period_total(&rec.id, &day)?;
            let m = self.store.period_total(&rec.id, &month)?;
            let seed = Seed {
                day_tokens: d.tokens,
                month_tokens: m.tokens,
                month_spend_micros: micros(m.spend),
            };
            admission = shared.admit(&ask, Some(seed))?;
        }
        match admission {
            Admission::Granted {
                reply,
                spend_micros,
                tpm: grant,
            } => Ok(Reservation {
                key_id: rec.id.clone(),
                tokens: prompt + reply,
                tpm_granted: grant.counted,
                granted_at: Instant::now(),
                periods: (day, month),
                spend: spend_micros as f64 / 1e6,
                max_tokens: (reply < wanted).then(|| u32::try_from(reply).unwrap_or(u32::MAX)),
                shared: Some(Held {
                    tpm,
                    entry: grant.entry,
                    spend_micros,
                }),
            }),
            Admission::OverBudget(Budget::DailyTokens) => Err(quota("daily token", day_left)),
            Admission::OverBudget(Budget::MonthlyTokens) => Err(quota("monthly token", month_left)),
            Admission::OverBudget(Budget::MonthlySpend) => Err(quota("monthly spend", month_left)),
            Admission::Limited { requests, wait } => {
                Err(limited(if requests { "requests" } else { "tokens" }, wait))
            }
            Admission::NeedsSeed => Err(StoreError::Unavailable(
                "Redis lost a budget counter while it was seeded".into(),
            )
            .into()),
        }
    }
}

/// [`Governor::take_request`] in cluster mode.
pub(super) fn take_request_shared(shared: &SharedLimits, rec: &KeyRecord) -> Result<(), ApiError> {
    if rec.rpm.unwrap_or(0) == 0 {
        return Ok(());
    }
    let rpm = limiter(shared, rec, "rpm", rec.rpm);
    match shared.take(&[(&rpm, 1)])? {
        Ok(_) => Ok(()),
        Err(refused) => Err(limited("requests", refused.wait)),
    }
}

/// [`Governor::settle`] in cluster mode. A settlement Redis cannot take leaves the reservation
/// counted until its period ends (the safe side of a budget), and is logged.
pub(super) fn settle_shared(
    shared: &SharedLimits,
    r: &Reservation,
    held: &Held,
    used_tokens: u64,
    cost: f64,
) {
    let (day, month) = periods(chrono::Utc::now().timestamp_millis());
    let settlement = Settlement {
        key_id: &r.key_id,
        held: (&r.periods.0, &r.periods.1),
        now: (&day, &month),
        reserved_tokens: r.tokens,
        used_tokens,
        reserved_micros: held.spend_micros,
        spent_micros: micros(cost),
        tpm: &held.tpm,
        tpm_delta: i64::try_from(r.tpm_granted).unwrap_or(i64::MAX)
            - i64::try_from(used_tokens).unwrap_or(i64::MAX),
        tpm_entry: &held.entry,
    };
    if let Err(e) = shared.settle(&settlement) {
        tracing::warn!(error = %e, "a reservation could not be settled in Redis; it stays counted");
    }
}
