//! Usage: raw records for a bounded retention, per-minute roll-ups that reports read, and
//! per-key period totals that quotas read.
//!
//! - `usage_log`: ts_ms (i64 BE, offset) ‖ n (u32 BE) → up to [`LOG_CHUNK`] [`UsageRecord`]s
//!   of one batch, the key's time being the newest of them. One write per chunk, not per
//!   record; time first, so expiry is one range delete from the start of the tree.
//! - `usage_rollups`: tenant ‖ 0 ‖ minute (i64 BE, offset, ms) ‖ key id ‖ 0 ‖ model ‖ 0 ‖
//!   conversation → [`Rollup`]: what one key spent on one model in one conversation (or none)
//!   in one minute. At a steady 1 000 requests/s of one key and model that is one row a minute.
//! - `usage_totals`: key id ‖ 0 ‖ period (`d2026-11-27`, `m2026-11`) → [`PeriodTotal`].
//!
//! One writer (the usage recorder) appends in batches; roll-ups and totals are
//! read-modify-written by it alone, so no transaction is needed.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, Ordering};

use serde::{Deserialize, Serialize};

use super::{decode, encode, PeriodTotal, Store, StoreError, UsageRecord};
use crate::ids::{ConversationId, TenantId};

static SEQ: AtomicU32 = AtomicU32::new(0);

const MINUTE_MS: i64 = 60_000;

/// Raw records stored under one key.
pub const LOG_CHUNK: usize = 256;

/// How much older than the newest record of its chunk a record may be (it waited in the
/// writer's queue): range reads look this far past their end.
const CHUNK_SPREAD_MS: i64 = 3_600_000;

/// Chunks removed per batch when expiring, so one sweep never holds a huge batch.
const EXPIRE_BATCH: usize = 1024;

fn time_bytes(ts_ms: i64) -> [u8; 8] {
    // Offset so that the big-endian bytes of negative times still sort before positive ones.
    ((ts_ms as u64) ^ (1 << 63)).to_be_bytes()
}

fn time_from(bytes: &[u8]) -> Option<i64> {
    let raw: [u8; 8] = bytes.get(..8)?.try_into().ok()?;
    Some((u64::from_be_bytes(raw) ^ (1 << 63)) as i64)
}

fn log_key(ts_ms: i64, n: u32) -> [u8; 12] {
    let mut key = [0; 12];
    key[..8].copy_from_slice(&time_bytes(ts_ms));
    key[8..].copy_from_slice(&n.to_be_bytes());
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

/// The chunks of raw records of one batch, each filed under its newest record's time.
fn log_batch(records: &[UsageRecord]) -> Result<sled::Batch, StoreError> {
    let mut batch = sled::Batch::default();
    for chunk in records.chunks(LOG_CHUNK) {
        let newest = chunk.iter().map(|r| r.ts_ms).max().unwrap_or(0);
        let n = SEQ.fetch_add(1, Ordering::Relaxed);
        batch.insert(&log_key(newest, n)[..], encode(&chunk)?);
    }
    Ok(batch)
}

/// What a roll-up row is about: one tenant's key, model and conversation in one minute.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RollupKey {
    pub tenant: TenantId,
    /// The minute's start, in milliseconds since the Unix epoch.
    pub minute_ms: i64,
    pub key_id: Option<String>,
    pub model: String,
    pub conversation: Option<ConversationId>,
}

impl RollupKey {
    fn of(r: &UsageRecord) -> Self {
        Self {
            tenant: r.tenant.clone(),
            minute_ms: r.ts_ms.div_euclid(MINUTE_MS) * MINUTE_MS,
            key_id: r.key_id.clone(),
            // The parts are separated by NUL bytes: a model name (from the upstream) has none.
            model: r.model.replace('\0', ""),
            conversation: r.conversation.clone(),
        }
    }

    fn prefix(tenant: &TenantId, minute_ms: i64) -> Vec<u8> {
        let mut key = Vec::with_capacity(tenant.0.len() + 9);
        key.extend_from_slice(tenant.0.as_bytes());
        key.push(0);
        key.extend_from_slice(&time_bytes(minute_ms));
        key
    }

    fn encode(&self) -> Vec<u8> {
        let mut key = Self::prefix(&self.tenant, self.minute_ms);
        key.extend_from_slice(self.key_id.as_deref().unwrap_or("").as_bytes());
        key.push(0);
        key.extend_from_slice(self.model.as_bytes());
        key.push(0);
        if let Some(c) = &self.conversation {
            key.extend_from_slice(c.to_string().as_bytes());
        }
        key
    }

    fn decode(raw: &[u8]) -> Option<Self> {
        let zero = raw.iter().position(|b| *b == 0)?;
        let tenant = TenantId(std::str::from_utf8(&raw[..zero]).ok()?.to_owned());
        let rest = raw.get(zero + 1..)?;
        let minute_ms = time_from(rest)?;
        let mut parts = rest.get(8..)?.splitn(3, |b| *b == 0);
        fn text(p: Option<&[u8]>) -> Option<&str> {
            p.and_then(|p| std::str::from_utf8(p).ok())
        }
        let key_id = text(parts.next())?;
        let model = text(parts.next())?.to_owned();
        let conversation = text(parts.next())?;
        Some(Self {
            tenant,
            minute_ms,
            key_id: (!key_id.is_empty()).then(|| key_id.to_owned()),
            model,
            conversation: if conversation.is_empty() {
                None
            } else {
                Some(ConversationId::parse(conversation)?)
            },
        })
    }
}

/// The sums of the usage records of one [`RollupKey`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Rollup {
    pub requests: u64,
    pub cached_requests: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub cost: f64,
    pub trimmed_tokens: u64,
    pub saved_tokens: u64,
    pub saved_cost: f64,
}

impl Rollup {
    fn add(&mut self, r: &UsageRecord) {
        self.requests += 1;
        self.cached_requests += u64::from(r.cached);
        self.prompt_tokens += u64::from(r.prompt_tokens);
        self.completion_tokens += u64::from(r.completion_tokens);
        self.cost += r.cost;
        self.trimmed_tokens += u64::from(r.trimmed_tokens);
        self.saved_tokens += u64::from(r.saved_tokens);
        self.saved_cost += r.saved_cost;
    }

    fn merge(&mut self, o: &Rollup) {
        self.requests += o.requests;
        self.cached_requests += o.cached_requests;
        self.prompt_tokens += o.prompt_tokens;
        self.completion_tokens += o.completion_tokens;
        self.cost += o.cost;
        self.trimmed_tokens += o.trimmed_tokens;
        self.saved_tokens += o.saved_tokens;
        self.saved_cost += o.saved_cost;
    }
}

impl Store {
    /// Appends a batch of usage records: the raw records (when `keep_raw`), their minutes'
    /// roll-ups and their keys' day and month totals; then flushes once for the whole batch.
    ///
    /// # Errors
    /// Storage failures.
    pub async fn append_usage(
        &self,
        records: &[UsageRecord],
        keep_raw: bool,
    ) -> Result<(), StoreError> {
        if keep_raw {
            self.usage_log.apply_batch(log_batch(records)?)?;
        }
        let mut rollups: HashMap<RollupKey, Rollup> = HashMap::new();
        let mut totals: HashMap<Vec<u8>, PeriodTotal> = HashMap::new();
        for r in records {
            rollups.entry(RollupKey::of(r)).or_default().add(r);
            let Some(key_id) = &r.key_id else { continue };
            let (day, month) = periods(r.ts_ms);
            for period in [day, month] {
                let t = totals.entry(total_key(key_id, &period)).or_default();
                t.tokens += u64::from(r.prompt_tokens) + u64::from(r.completion_tokens);
                t.spend += r.cost;
            }
        }
        let mut batch = sled::Batch::default();
        for (key, add) in rollups {
            let k = key.encode();
            let mut row: Rollup = match self.usage_rollups.get(&k)? {
                Some(v) => decode("usage_rollups", "<rollup>", &v)?,
                None => Rollup::default(),
            };
            row.merge(&add);
            batch.insert(k, encode(&row)?);
        }
        self.usage_rollups.apply_batch(batch)?;
        let mut batch = sled::Batch::default();
        for (k, add) in totals {
            let mut total = self.period_total_raw(&k)?;
            total.tokens += add.tokens;
            total.spend += add.spend;
            batch.insert(k, encode(&total)?);
        }
        self.usage_totals.apply_batch(batch)?;
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

    /// Raw usage records with `from_ms <= ts < to_ms`, of one tenant or of all, at most
    /// `limit`, oldest first. Only records within the retention are still there.
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
        if from_ms >= to_ms {
            return Ok(out);
        }
        // A chunk is filed under its newest record, so every record from `from_ms` on is in a
        // chunk filed at or after it, and one before `to_ms` may be filed a little after.
        let end = to_ms.saturating_add(CHUNK_SPREAD_MS);
        for kv in self
            .usage_log
            .range(time_bytes(from_ms).to_vec()..time_bytes(end).to_vec())
        {
            let chunk: Vec<UsageRecord> = decode("usage_log", "<usage>", &kv?.1)?;
            for r in chunk {
                if out.len() >= limit {
                    return Ok(out);
                }
                let wanted = r.ts_ms >= from_ms && r.ts_ms < to_ms;
                if wanted && tenant.is_none_or(|t| *t == r.tenant) {
                    out.push(r);
                }
            }
        }
        out.sort_by_key(|r| r.ts_ms);
        Ok(out)
    }

    /// Feeds every roll-up of a minute in `[from_ms, to_ms)` (a minute counts when it starts
    /// in the range), of one tenant or of all, to `f`.
    ///
    /// # Errors
    /// Storage failures or corrupt rows.
    pub fn fold_rollups(
        &self,
        tenant: Option<&TenantId>,
        from_ms: i64,
        to_ms: i64,
        mut f: impl FnMut(&RollupKey, &Rollup),
    ) -> Result<(), StoreError> {
        let from_minute = from_ms.div_euclid(MINUTE_MS) * MINUTE_MS;
        let iter: Box<dyn Iterator<Item = sled::Result<(sled::IVec, sled::IVec)>>> = match tenant {
            Some(t) if from_minute < to_ms => Box::new(
                self.usage_rollups
                    .range(RollupKey::prefix(t, from_minute)..RollupKey::prefix(t, to_ms)),
            ),
            Some(_) => return Ok(()),
            None => Box::new(self.usage_rollups.iter()),
        };
        for kv in iter {
            let (k, v) = kv?;
            let Some(key) = RollupKey::decode(&k) else {
                return Err(StoreError::Corrupt {
                    tree: "usage_rollups",
                    key: String::from_utf8_lossy(&k).into_owned(),
                    message: "malformed key".into(),
                });
            };
            if key.minute_ms < from_minute || key.minute_ms >= to_ms {
                continue;
            }
            let row: Rollup = decode("usage_rollups", "<rollup>", &v)?;
            f(&key, &row);
        }
        Ok(())
    }

    /// Removes the raw usage records older than `before_ms` (whole chunks, filed by their
    /// newest record); answers how many chunks went.
    ///
    /// # Errors
    /// Storage failures.
    pub fn expire_usage(&self, before_ms: i64) -> Result<usize, StoreError> {
        let end = time_bytes(before_ms);
        let mut removed = 0;
        loop {
            let mut batch = sled::Batch::default();
            let mut n = 0;
            for k in self
                .usage_log
                .range(..end.to_vec())
                .keys()
                .take(EXPIRE_BATCH)
            {
                batch.remove(k?);
                n += 1;
            }
            if n == 0 {
                return Ok(removed);
            }
            self.usage_log.apply_batch(batch)?;
            removed += n;
        }
    }

    /// Moves the records of the tenant-first `usage` tree of older versions into the log and
    /// the roll-ups, once, then empties it.
    pub(super) fn migrate_usage(&self, old: &sled::Tree) -> Result<(), StoreError> {
        if old.is_empty() {
            return Ok(());
        }
        let mut records = Vec::with_capacity(1024);
        let mut moved = 0usize;
        for kv in old.iter() {
            let (k, v) = kv?;
            let r: UsageRecord = decode("usage", "<usage>", &v)?;
            records.push((k, r));
            if records.len() == 1024 {
                self.migrate_batch(old, &mut records)?;
                moved += 1024;
            }
        }
        moved += records.len();
        self.migrate_batch(old, &mut records)?;
        tracing::info!(
            records = moved,
            "usage records moved to the usage log and roll-ups"
        );
        Ok(())
    }

    fn migrate_batch(
        &self,
        old: &sled::Tree,
        records: &mut Vec<(sled::IVec, UsageRecord)>,
    ) -> Result<(), StoreError> {
        let mut rollups: HashMap<RollupKey, Rollup> = HashMap::new();
        let mut gone = sled::Batch::default();
        let mut moved = Vec::with_capacity(records.len());
        for (k, r) in records.drain(..) {
            rollups.entry(RollupKey::of(&r)).or_default().add(&r);
            gone.remove(k);
            moved.push(r);
        }
        let log = log_batch(&moved)?;
        let mut batch = sled::Batch::default();
        for (key, add) in rollups {
            let k = key.encode();
            let mut row: Rollup = match self.usage_rollups.get(&k)? {
                Some(v) => decode("usage_rollups", "<rollup>", &v)?,
                None => Rollup::default(),
            };
            row.merge(&add);
            batch.insert(k, encode(&row)?);
        }
        self.usage_log.apply_batch(log)?;
        self.usage_rollups.apply_batch(batch)?;
        old.apply_batch(gone)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rollup_keys_round_trip() {
        let conversation = ConversationId::parse("conv_0123456789abcdef0123456789abcdef").unwrap(); // ok: test
        for key in [
            RollupKey {
                tenant: TenantId("acme".into()),
                minute_ms: 1_764_000_000_000,
                key_id: Some("key_1".into()),
                model: "gpt-4o-mini".into(),
                conversation: Some(conversation),
            },
            RollupKey {
                tenant: TenantId("local".into()),
                minute_ms: -60_000,
                key_id: None,
                model: String::new(),
                conversation: None,
            },
        ] {
            assert_eq!(RollupKey::decode(&key.encode()), Some(key));
        }
    }
}
