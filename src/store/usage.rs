//! Usage: raw records for a bounded retention, per-minute roll-ups that reports read, and
//! per-key period totals that quotas read.
//!
//! - raw records: not in sled but appended, one JSON line each, to a file per UTC day
//!   (`<data_dir>/usage/2026-11-30.jsonl`), synced once per batch; expiry deletes whole days.
//!   Kept in sled, hundreds of bytes per request would grow its in-memory structures with
//!   every request served.
//! - `usage_rollups`: tenant ‖ 0 ‖ minute (i64 BE, offset, ms) ‖ key id ‖ 0 ‖ model ‖ 0 ‖
//!   conversation → [`Rollup`]: what one key spent on one model in one conversation (or none)
//!   in one minute. At a steady 1 000 requests/s of one key and model that is one row a minute.
//! - `usage_totals`: key id ‖ 0 ‖ period (`d2026-11-27`, `m2026-11`) → [`PeriodTotal`].
//!
//! One writer per node (the usage recorder) appends in batches; a roll-up or total row is
//! updated by compare-and-swap, so the writers of several nodes sharing Redis add up.
//! In cluster mode the raw records stay in each node's own daily files (reports read the
//! roll-ups, which are shared).

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use super::{decode, encode, PeriodTotal, Store, StoreError, UsageRecord};
use crate::ids::{ConversationId, TenantId};

const MINUTE_MS: i64 = 60_000;

fn time_bytes(ts_ms: i64) -> [u8; 8] {
    // Offset so that the big-endian bytes of negative times still sort before positive ones.
    ((ts_ms as u64) ^ (1 << 63)).to_be_bytes()
}

fn time_from(bytes: &[u8]) -> Option<i64> {
    let raw: [u8; 8] = bytes.get(..8)?.try_into().ok()?;
    Some((u64::from_be_bytes(raw) ^ (1 << 63)) as i64)
}

fn total_key(key_id: &str, period: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(key_id.len() + period.len() + 1);
    key.extend_from_slice(key_id.as_bytes());
    key.push(0);
    key.extend_from_slice(period.as_bytes());
    key
}

/// The periods a record counts in: its UTC day and month (`d2026-11-30`, `m2026-11`). Written
/// from the date's numbers: a limit check asks for them on every request, and chrono's
/// `format` parses its pattern each time.
pub fn periods(ts_ms: i64) -> (String, String) {
    use chrono::Datelike;
    let d = chrono::DateTime::from_timestamp_millis(ts_ms)
        .unwrap_or_default()
        .date_naive();
    let (y, m) = (d.year(), d.month());
    (
        format!("d{y:04}-{m:02}-{:02}", d.day()),
        format!("m{y:04}-{m:02}"),
    )
}

const DAY_MS: i64 = 86_400_000;

/// `2026-11-30` for day number `day` since the epoch.
fn day_name(day: i64) -> String {
    chrono::DateTime::from_timestamp_millis(day * DAY_MS)
        .unwrap_or_default()
        .format("%Y-%m-%d")
        .to_string()
}

fn io(e: std::io::Error) -> StoreError {
    StoreError::Task(format!("usage file: {e}"))
}

/// The JSON lines of `records`, grouped by UTC day.
fn raw_lines(
    records: &[UsageRecord],
) -> Result<std::collections::BTreeMap<i64, Vec<u8>>, StoreError> {
    let mut days: std::collections::BTreeMap<i64, Vec<u8>> = Default::default();
    for r in records {
        let buf = days.entry(r.ts_ms.div_euclid(DAY_MS)).or_default();
        buf.extend_from_slice(&encode(r)?);
        buf.push(b'\n');
    }
    Ok(days)
}

/// Appends each day's lines to its file in `dir` and syncs it.
fn write_raw(
    dir: &std::path::Path,
    days: std::collections::BTreeMap<i64, Vec<u8>>,
) -> Result<(), StoreError> {
    use std::io::Write;
    if days.is_empty() {
        return Ok(());
    }
    std::fs::create_dir_all(dir).map_err(io)?;
    for (day, buf) in days {
        let path = dir.join(format!("{}.jsonl", day_name(day)));
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(io)?;
        f.write_all(&buf).map_err(io)?;
        f.sync_data().map_err(io)?;
    }
    Ok(())
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
    /// A semantic route's tier.
    pub tier: Option<String>,
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
            tier: r.tier.as_ref().map(|t| t.replace('\0', "")),
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
        // Keys written before tiers existed end after the conversation.
        if let Some(t) = &self.tier {
            key.push(0);
            key.extend_from_slice(t.as_bytes());
        }
        key
    }

    fn decode(raw: &[u8]) -> Option<Self> {
        let zero = raw.iter().position(|b| *b == 0)?;
        let tenant = TenantId(std::str::from_utf8(&raw[..zero]).ok()?.to_owned());
        let rest = raw.get(zero + 1..)?;
        let minute_ms = time_from(rest)?;
        let mut parts = rest.get(8..)?.splitn(4, |b| *b == 0);
        fn text(p: Option<&[u8]>) -> Option<&str> {
            p.and_then(|p| std::str::from_utf8(p).ok())
        }
        let key_id = text(parts.next())?;
        let model = text(parts.next())?.to_owned();
        let conversation = text(parts.next())?;
        let tier = match parts.next() {
            Some(t) => Some(text(Some(t))?.to_owned()),
            None => None,
        };
        Some(Self {
            tier,
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
    /// The roll-up of one record.
    fn of(r: &UsageRecord) -> Self {
        Self {
            requests: 1,
            cached_requests: u64::from(r.cached),
            prompt_tokens: u64::from(r.prompt_tokens),
            completion_tokens: u64::from(r.completion_tokens),
            cost: r.cost,
            trimmed_tokens: u64::from(r.trimmed_tokens),
            saved_tokens: u64::from(r.saved_tokens),
            saved_cost: r.saved_cost,
        }
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
            self.append_raw(records).await?;
        }
        self.add_to_rollups(records)?;
        let mut totals: HashMap<Vec<u8>, PeriodTotal> = HashMap::new();
        for r in records {
            let Some(key_id) = &r.key_id else { continue };
            let (day, month) = periods(r.ts_ms);
            for period in [day, month] {
                let t = totals.entry(total_key(key_id, &period)).or_default();
                t.tokens += u64::from(r.prompt_tokens) + u64::from(r.completion_tokens);
                t.spend += r.cost;
            }
        }
        // One atomic read-modify-write per row: in a cluster every node adds to the same rows.
        for (k, add) in totals {
            self.usage_totals.update_and_fetch(&k, |old| {
                let mut total: PeriodTotal = old
                    .and_then(|v| decode("usage_totals", "<total>", v).ok())
                    .unwrap_or_default();
                total.tokens += add.tokens;
                total.spend += add.spend;
                encode(&total).ok()
            })?;
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

    /// Raw usage records with `from_ms <= ts < to_ms`, of one tenant or of all: the first
    /// `limit` in the files' (batch) order, returned oldest first. Only records within the retention are still there. Reads files:
    /// call it off the async threads.
    ///
    /// # Errors
    /// Unreadable files or corrupt records.
    pub fn usage_between(
        &self,
        tenant: Option<&TenantId>,
        from_ms: i64,
        to_ms: i64,
        limit: usize,
    ) -> Result<Vec<UsageRecord>, StoreError> {
        let mut out = Vec::new();
        for (day, path) in self.raw_days()? {
            // A day's file holds the records of that UTC day (and a few late ones after it).
            let day_start = day * DAY_MS;
            if day_start >= to_ms || day_start + 2 * DAY_MS <= from_ms {
                continue;
            }
            // Line by line: a day's file can be far larger than memory.
            let file = std::io::BufReader::new(std::fs::File::open(&path).map_err(io)?);
            for line in std::io::BufRead::lines(file) {
                let line = line.map_err(io)?;
                if line.is_empty() {
                    continue;
                }
                let r: UsageRecord = decode("usage", "<raw usage>", line.as_bytes())?;
                let wanted = r.ts_ms >= from_ms && r.ts_ms < to_ms;
                if wanted && tenant.is_none_or(|t| *t == r.tenant) {
                    out.push(r);
                    if out.len() >= limit {
                        break;
                    }
                }
            }
            if out.len() >= limit {
                break;
            }
        }
        out.sort_by_key(|r| r.ts_ms);
        Ok(out)
    }

    /// Appends `records` to their days' files and syncs them, on the blocking pool.
    async fn append_raw(&self, records: &[UsageRecord]) -> Result<(), StoreError> {
        let lines = raw_lines(records)?;
        let dir = self.usage_dir.clone();
        match tokio::task::spawn_blocking(move || write_raw(&dir, lines)).await {
            Ok(written) => written,
            Err(e) => Err(StoreError::Task(e.to_string())),
        }
    }

    /// The days that have a raw usage file, oldest first (day number since the epoch, path).
    fn raw_days(&self) -> Result<Vec<(i64, std::path::PathBuf)>, StoreError> {
        let entries = match std::fs::read_dir(&self.usage_dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(io(e)),
        };
        let mut days = Vec::new();
        for entry in entries {
            let path = entry.map_err(io)?.path();
            let day = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".jsonl"))
                .and_then(|d| chrono::NaiveDate::parse_from_str(d, "%Y-%m-%d").ok())
                .and_then(|d| d.and_hms_opt(0, 0, 0))
                .map(|t| t.and_utc().timestamp_millis().div_euclid(DAY_MS));
            if let Some(day) = day {
                days.push((day, path));
            }
        }
        days.sort();
        Ok(days)
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
        let iter = match tenant {
            Some(t) if from_minute < to_ms => self
                .usage_rollups
                .range(RollupKey::prefix(t, from_minute)..RollupKey::prefix(t, to_ms)),
            Some(_) => return Ok(()),
            None => self.usage_rollups.iter(),
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

    /// Removes the raw usage records of the days that ended before `before_ms`; answers how
    /// many days' files went.
    ///
    /// # Errors
    /// Files that cannot be removed.
    pub fn expire_usage(&self, before_ms: i64) -> Result<usize, StoreError> {
        let mut removed = 0;
        for (day, path) in self.raw_days()? {
            if (day + 1) * DAY_MS <= before_ms {
                std::fs::remove_file(path).map_err(io)?;
                removed += 1;
            }
        }
        Ok(removed)
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
                let raw = self.migrate_batch(old, &mut records)?;
                write_raw(&self.usage_dir, raw_lines(&raw)?)?;
                moved += 1024;
            }
        }
        moved += records.len();
        let raw = self.migrate_batch(old, &mut records)?;
        write_raw(&self.usage_dir, raw_lines(&raw)?)?;
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
    ) -> Result<Vec<UsageRecord>, StoreError> {
        let mut gone = sled::Batch::default();
        let mut moved = Vec::with_capacity(records.len());
        for (k, r) in records.drain(..) {
            gone.remove(k);
            moved.push(r);
        }
        self.add_to_rollups(&moved)?;
        old.apply_batch(gone)?;
        Ok(moved)
    }

    /// Adds `records` to their minutes' roll-ups: one read-modify-write per row they touch.
    fn add_to_rollups(&self, records: &[UsageRecord]) -> Result<(), StoreError> {
        let mut rollups: HashMap<RollupKey, Rollup> = HashMap::new();
        for r in records {
            rollups
                .entry(RollupKey::of(r))
                .or_default()
                .merge(&Rollup::of(r));
        }
        // One atomic read-modify-write per row: in a cluster every node adds to the same rows.
        for (key, add) in rollups {
            self.usage_rollups.update_and_fetch(key.encode(), |old| {
                let mut row: Rollup = old
                    .and_then(|v| decode("usage_rollups", "<rollup>", v).ok())
                    .unwrap_or_default();
                row.merge(&add);
                encode(&row).ok()
            })?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn periods_are_the_dates_chrono_formats() {
        // Across years, months, days, leap days and the epoch, one step every ~7 hours.
        let mut ts = 0_i64;
        while ts < 4_200_000_000_000 {
            let dt = chrono::DateTime::from_timestamp_millis(ts).unwrap(); // ok: test
            let expected = (
                dt.format("d%Y-%m-%d").to_string(),
                dt.format("m%Y-%m").to_string(),
            );
            assert_eq!(periods(ts), expected, "{ts}");
            ts += 25_200_001;
        }
    }

    #[test]
    fn rollup_keys_round_trip() {
        let conversation = ConversationId::parse("conv_0123456789abcdef0123456789abcdef").unwrap(); // ok: test
        for key in [
            RollupKey {
                tenant: TenantId("acme".into()),
                minute_ms: 1_764_000_000_000,
                key_id: Some("key_1".into()),
                model: "gpt-4o-mini".into(),
                conversation: Some(conversation.clone()),
                tier: None,
            },
            RollupKey {
                tenant: TenantId("acme".into()),
                minute_ms: 1_764_000_000_000,
                key_id: Some("key_1".into()),
                model: "gpt-4o".into(),
                conversation: Some(conversation),
                tier: Some("strong".into()),
            },
            RollupKey {
                tenant: TenantId("acme".into()),
                minute_ms: 0,
                key_id: None,
                model: "gpt-4o-mini".into(),
                conversation: None,
                tier: Some("fast".into()),
            },
            RollupKey {
                tenant: TenantId("local".into()),
                minute_ms: -60_000,
                key_id: None,
                model: String::new(),
                conversation: None,
                tier: None,
            },
        ] {
            assert_eq!(RollupKey::decode(&key.encode()), Some(key));
        }
    }
}
