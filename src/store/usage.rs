//! Usage records and per-key period totals.
//!
//! - `usage`: tenant ‖ 0 ‖ ts_ms (i64 BE, offset) ‖ n (u32 BE) → [`UsageRecord`], so one
//!   tenant's records scan in time order.
//! - `usage_totals`: key id ‖ 0 ‖ period (`d2026-11-27`, `m2026-11`) → [`PeriodTotal`].
//!
//! One writer (the usage recorder) appends in batches; totals are read-modify-written by it
//! alone, so no transaction is needed.

use std::sync::atomic::{AtomicU32, Ordering};

use super::{decode, encode, PeriodTotal, Store, StoreError, UsageRecord};
use crate::ids::TenantId;

static SEQ: AtomicU32 = AtomicU32::new(0);

fn usage_key(tenant: &TenantId, ts_ms: i64, n: u32) -> Vec<u8> {
    let mut key = Vec::with_capacity(tenant.0.len() + 13);
    key.extend_from_slice(tenant.0.as_bytes());
    key.push(0);
    // Offset so that the big-endian bytes of negative times still sort before positive ones.
    key.extend_from_slice(&((ts_ms as u64) ^ (1 << 63)).to_be_bytes());
    key.extend_from_slice(&n.to_be_bytes());
    key
}

fn total_key(key_id: &str, period: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(key_id.len() + period.len() + 1);
    key.extend_from_slice(key_id.as_bytes());
    key.push(0);
    key.extend_from_slice(period.as_bytes());
    key
}

/// The periods a record counts in: its UTC day and month.
pub fn periods(ts_ms: i64) -> (String, String) {
    let dt = chrono::DateTime::from_timestamp_millis(ts_ms).unwrap_or_default();
    (
        dt.format("d%Y-%m-%d").to_string(),
        dt.format("m%Y-%m").to_string(),
    )
}

impl Store {
    /// Appends a batch of usage records and adds them to their keys' day and month totals,
    /// then flushes once for the whole batch.
    ///
    /// # Errors
    /// Storage failures.
    pub async fn append_usage(&self, records: &[UsageRecord]) -> Result<(), StoreError> {
        let mut batch = sled::Batch::default();
        for r in records {
            let n = SEQ.fetch_add(1, Ordering::Relaxed);
            batch.insert(usage_key(&r.tenant, r.ts_ms, n), encode(r)?);
        }
        self.usage.apply_batch(batch)?;
        for r in records {
            let Some(key_id) = &r.key_id else { continue };
            let (day, month) = periods(r.ts_ms);
            for period in [day, month] {
                let k = total_key(key_id, &period);
                let mut total = self.period_total_raw(&k)?;
                total.tokens += u64::from(r.prompt_tokens) + u64::from(r.completion_tokens);
                total.spend += r.cost;
                self.usage_totals.insert(k, encode(&total)?)?;
            }
        }
        self.flush().await
    }

    fn period_total_raw(&self, k: &[u8]) -> Result<PeriodTotal, StoreError> {
        match self.usage_totals.get(k)? {
            Some(v) => decode("usage_totals", "<key>", &v),
            None => Ok(PeriodTotal::default()),
        }
    }

    /// A key's total over `period` (`d2026-11-27` or `m2026-11`).
    ///
    /// # Errors
    /// Storage failures.
    pub fn period_total(&self, key_id: &str, period: &str) -> Result<PeriodTotal, StoreError> {
        self.period_total_raw(&total_key(key_id, period))
    }

    /// Usage records with `from_ms <= ts < to_ms`, of one tenant or of all, at most `limit`.
    ///
    /// # Errors
    /// Storage failures or corrupt records.
    pub fn usage_between(
        &self,
        tenant: Option<&TenantId>,
        from_ms: i64,
        to_ms: i64,
        limit: usize,
    ) -> Result<Vec<UsageRecord>, StoreError> {
        let mut out = Vec::new();
        self.fold_usage(tenant, from_ms, to_ms, |r| {
            out.push(r);
            out.len() < limit
        })?;
        Ok(out)
    }

    /// Feeds every usage record with `from_ms <= ts < to_ms` (of one tenant, or of all) to `f`,
    /// in key order, without collecting them; `f` answers whether to go on.
    ///
    /// # Errors
    /// Storage failures or corrupt records.
    pub fn fold_usage(
        &self,
        tenant: Option<&TenantId>,
        from_ms: i64,
        to_ms: i64,
        mut f: impl FnMut(UsageRecord) -> bool,
    ) -> Result<(), StoreError> {
        let iter: Box<dyn Iterator<Item = sled::Result<(sled::IVec, sled::IVec)>>> = match tenant {
            Some(t) => Box::new(
                self.usage
                    .range(usage_key(t, from_ms, 0)..usage_key(t, to_ms, 0)),
            ),
            None => Box::new(self.usage.iter()),
        };
        for kv in iter {
            let r: UsageRecord = decode("usage", "<usage>", &kv?.1)?;
            if r.ts_ms >= from_ms && r.ts_ms < to_ms && !f(r) {
                break;
            }
        }
        Ok(())
    }
}
