//! Usage attribution: every turn's record goes through a bounded channel to one writer task
//! that stores them in batches (every [`BATCH`] records or [`BATCH_INTERVAL`], whichever comes
//! first): never one write per token or per turn. Shutdown drains the channel, so no record is
//! lost. The writer also expires raw records past their retention (reports read the per-minute
//! roll-ups, which stay). Also the reports of `GET /v1/usage` and `GET /admin/usage` (JSON or
//! CSV).

use std::collections::BTreeMap;
use std::time::Duration;

use serde::Serialize;
use tokio::sync::mpsc;

use crate::store::{Rollup, RollupKey, Store, UsageRecord};

/// Records written together (one flush).
pub const BATCH: usize = 4096;
/// The longest a record waits before its batch is written.
pub const BATCH_INTERVAL: Duration = Duration::from_millis(100);
/// Records that may wait for the writer; senders wait beyond that (backpressure, not loss).
const CHANNEL: usize = 16_384;
/// How often raw records past their retention are removed.
const EXPIRE_EVERY: Duration = Duration::from_secs(600);

/// The sending side; cheap to clone.
#[derive(Clone)]
pub struct UsageRecorder {
    tx: mpsc::Sender<UsageRecord>,
}

/// The writer task's handle: [`UsageWriter::finish`] stores every record queued so far.
pub struct UsageWriter {
    done: tokio::sync::oneshot::Receiver<()>,
    stop: tokio_util::sync::CancellationToken,
}

impl UsageRecorder {
    /// Starts the writer task on the current runtime. Raw records are kept for `retention`
    /// (`None`: not kept at all; roll-ups and period totals always are).
    pub fn start(store: Store, retention: Option<Duration>) -> (Self, UsageWriter) {
        let (tx, rx) = mpsc::channel(CHANNEL);
        let (done_tx, done) = tokio::sync::oneshot::channel();
        let stop = tokio_util::sync::CancellationToken::new();
        let stopped = stop.clone();
        tokio::spawn(async move {
            write_batches(store, rx, stopped, retention).await;
            let _ = done_tx.send(());
        });
        (Self { tx }, UsageWriter { done, stop })
    }

    /// Queues a record; waits only when the writer is far behind.
    pub async fn record(&self, record: UsageRecord) {
        if self.tx.send(record).await.is_err() {
            tracing::error!("usage writer is gone; a usage record was lost");
        }
    }
}

impl UsageRecorder {
    /// Queues a record from synchronous code: at once when there is room, else from a task.
    pub fn record_detached(&self, record: UsageRecord) {
        match self.tx.try_send(record) {
            Ok(()) => {}
            Err(mpsc::error::TrySendError::Full(record)) => {
                let tx = self.tx.clone();
                tokio::spawn(async move {
                    if tx.send(record).await.is_err() {
                        tracing::error!("usage writer is gone; a usage record was lost");
                    }
                });
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                tracing::error!("usage writer is gone; a usage record was lost");
            }
        }
    }
}

impl UsageWriter {
    /// Stops taking records and waits until every queued one is stored (shutdown).
    pub async fn finish(self) {
        self.stop.cancel();
        let _ = self.done.await;
    }
}

async fn write_batches(
    store: Store,
    mut rx: mpsc::Receiver<UsageRecord>,
    stop: tokio_util::sync::CancellationToken,
    retention: Option<Duration>,
) {
    let mut batch = Vec::with_capacity(BATCH);
    let mut expiry = tokio::time::interval(EXPIRE_EVERY);
    expiry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let first = tokio::select! {
            r = rx.recv() => r,
            _ = expiry.tick(), if retention.is_some() => {
                expire(&store, retention).await;
                continue;
            }
            () = stop.cancelled() => {
                // Refuse new records, then drain what is queued.
                rx.close();
                rx.recv().await
            }
        };
        let Some(first) = first else { break };
        batch.push(first);
        // Let the batch gather without waking up for each record (a record sent to a sleeping
        // task wakes its thread), then take what came.
        tokio::select! {
            () = tokio::time::sleep(BATCH_INTERVAL) => {}
            () = stop.cancelled() => {}
        }
        while batch.len() < BATCH {
            match rx.try_recv() {
                Ok(r) => batch.push(r),
                Err(_) => break,
            }
        }
        if let Err(e) = store.append_usage(&batch, retention.is_some()).await {
            tracing::error!(error = %e, records = batch.len(), "usage batch could not be stored");
        }
        batch.clear();
    }
}

/// Removes the raw records older than `retention`, off the async threads.
async fn expire(store: &Store, retention: Option<Duration>) {
    let Some(retention) = retention else { return };
    let before = chrono::Utc::now().timestamp_millis()
        - i64::try_from(retention.as_millis()).unwrap_or(i64::MAX);
    let store = store.clone();
    match tokio::task::spawn_blocking(move || store.expire_usage(before)).await {
        Ok(Ok(0)) => {}
        Ok(Ok(n)) => tracing::info!(records = n, "expired raw usage records"),
        Ok(Err(e)) => tracing::error!(error = %e, "raw usage records could not be expired"),
        Err(e) => tracing::error!(error = %e, "usage expiry task failed"),
    }
}

/// How a usage report groups records.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum GroupBy {
    Day,
    Model,
    Key,
    Conversation,
    /// A semantic route's tier (`-` for requests of other routes).
    Tier,
}

/// One row of a usage report.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct UsageRow {
    pub group: String,
    pub requests: u64,
    pub cached_requests: u64,
    pub prompt_tokens: u64,
    pub completion_tokens: u64,
    pub total_tokens: u64,
    pub cost: f64,
    pub trimmed_tokens: u64,
    /// Tokens and cost that cached replies saved.
    pub saved_tokens: u64,
    pub saved_cost: f64,
}

impl UsageRow {
    /// Adds `o`'s figures to this row's (its group stays).
    pub fn add(&mut self, o: &UsageRow) {
        self.requests += o.requests;
        self.cached_requests += o.cached_requests;
        self.prompt_tokens += o.prompt_tokens;
        self.completion_tokens += o.completion_tokens;
        self.total_tokens += o.total_tokens;
        self.cost += o.cost;
        self.trimmed_tokens += o.trimmed_tokens;
        self.saved_tokens += o.saved_tokens;
        self.saved_cost += o.saved_cost;
    }
}

/// The report rows of one tenant (or all) over `[from_ms, to_ms)`, read from the per-minute
/// roll-ups (a minute counts when it starts in the range). Scans storage: call it off the
/// async threads.
///
/// # Errors
/// Storage failures.
pub fn report_rows(
    store: &Store,
    tenant: Option<&crate::ids::TenantId>,
    from_ms: i64,
    to_ms: i64,
    by: GroupBy,
) -> Result<Vec<UsageRow>, crate::store::StoreError> {
    let mut agg = Aggregator::new(by);
    store.fold_rollups(tenant, from_ms, to_ms, |k, r| agg.add(k, r))?;
    Ok(agg.rows())
}

/// Groups roll-up rows into report rows as they stream by, holding one row per group.
pub struct Aggregator {
    by: GroupBy,
    rows: BTreeMap<String, UsageRow>,
}

impl Aggregator {
    pub fn new(by: GroupBy) -> Self {
        Self {
            by,
            rows: BTreeMap::new(),
        }
    }

    pub fn rows(self) -> Vec<UsageRow> {
        self.rows.into_values().collect()
    }

    /// Adds one roll-up row to its group.
    pub fn add(&mut self, key: &RollupKey, r: &Rollup) {
        let (by, rows) = (self.by, &mut self.rows);
        let group = match by {
            GroupBy::Day => crate::store::periods(key.minute_ms)
                .0
                .trim_start_matches('d')
                .to_owned(),
            GroupBy::Model => key.model.clone(),
            GroupBy::Key => key.key_id.clone().unwrap_or_else(|| "-".into()),
            GroupBy::Conversation => key
                .conversation
                .as_ref()
                .map_or_else(|| "-".into(), ToString::to_string),
            GroupBy::Tier => key.tier.clone().unwrap_or_else(|| "-".into()),
        };
        let row = rows.entry(group.clone()).or_insert_with(|| UsageRow {
            group,
            ..UsageRow::default()
        });
        row.add(&UsageRow {
            group: String::new(),
            requests: r.requests,
            cached_requests: r.cached_requests,
            prompt_tokens: r.prompt_tokens,
            completion_tokens: r.completion_tokens,
            total_tokens: r.prompt_tokens + r.completion_tokens,
            cost: r.cost,
            trimmed_tokens: r.trimmed_tokens,
            saved_tokens: r.saved_tokens,
            saved_cost: r.saved_cost,
        });
    }
}

/// The rows as CSV with a header line.
pub fn to_csv(rows: &[UsageRow]) -> String {
    let mut out = String::from("group,requests,cached_requests,prompt_tokens,completion_tokens,total_tokens,cost,trimmed_tokens,saved_tokens,saved_cost\n");
    for r in rows {
        let group = if r.group.contains([',', '"', '\n']) {
            format!("\"{}\"", r.group.replace('"', "\"\""))
        } else {
            r.group.clone()
        };
        out.push_str(&format!(
            "{group},{},{},{},{},{},{:.6},{},{},{:.6}\n",
            r.requests,
            r.cached_requests,
            r.prompt_tokens,
            r.completion_tokens,
            r.total_tokens,
            r.cost,
            r.trimmed_tokens,
            r.saved_tokens,
            r.saved_cost
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ids::TenantId;

    fn rec(ts_ms: i64, model: &str, prompt: u32, completion: u32) -> UsageRecord {
        UsageRecord {
            ts_ms,
            tenant: TenantId("t".into()),
            key_id: Some("k".into()),
            conversation: None,
            route: "r".into(),
            provider: "p".into(),
            model: model.into(),
            prompt_tokens: prompt,
            completion_tokens: completion,
            cached: false,
            latency_ms: 1,
            ttft_ms: None,
            cost: 0.5,
            trimmed_tokens: 0,
            saved_tokens: 0,
            max_tokens_clamped: None,
            saved_cost: 0.0,
            tier: None,
            finish_reason: "stop".into(),
        }
    }

    #[tokio::test]
    async fn reports_read_rollups_and_outlive_raw_records() {
        let dir = tempfile::tempdir().unwrap(); // ok: test code
        let store = Store::open(dir.path()).unwrap(); // ok: test code
        let day = 86_400_000;
        let first_day = [
            rec(0, "a", 1, 2),
            rec(10, "b", 3, 4),
            rec(61_000, "a", 7, 0),
        ];
        store.append_usage(&first_day, true).await.unwrap(); // ok: test code
        store
            .append_usage(&[rec(day, "a", 5, 6)], true)
            .await
            .unwrap(); // ok: test code
        let t = TenantId("t".into());
        let rows = |from, to, by| report_rows(&store, Some(&t), from, to, by).unwrap(); // ok: test code
        let by_day = rows(0, i64::MAX, GroupBy::Day);
        assert_eq!(by_day.len(), 2);
        assert_eq!(by_day[0].group, "1970-01-01");
        assert_eq!(by_day[0].total_tokens, 17);
        assert_eq!(by_day[0].requests, 3);
        let by_model = rows(0, i64::MAX, GroupBy::Model);
        assert_eq!(by_model[0].group, "a");
        assert_eq!(by_model[0].requests, 3);
        assert!((by_model[0].cost - 1.5).abs() < 1e-9);
        let csv = to_csv(&by_model);
        assert!(csv.starts_with("group,requests"));
        assert!(
            csv.contains("\na,3,0,13,8,21,1.500000,0,0,0.000000\n"),
            "{csv}"
        );
        // A range holds the minutes that start in it; another tenant sees nothing.
        assert_eq!(rows(60_000, day, GroupBy::Model)[0].requests, 1);
        assert!(report_rows(
            &store,
            Some(&TenantId("u".into())),
            0,
            i64::MAX,
            GroupBy::Day
        )
        .unwrap() // ok: test code
        .is_empty());
        // Raw records expire; the reports stay the same.
        assert_eq!(store.usage_between(None, 0, i64::MAX, 10).unwrap().len(), 4); // ok: test code
        assert_eq!(store.expire_usage(day).unwrap(), 1); // ok: test code
        assert_eq!(store.usage_between(None, 0, i64::MAX, 10).unwrap().len(), 1); // ok: test code
        assert_eq!(rows(0, i64::MAX, GroupBy::Day), by_day);
        // Without retention no raw record is kept, and the roll-ups still add up.
        store
            .append_usage(&[rec(day + 5, "a", 1, 1)], false)
            .await
            .unwrap(); // ok: test code
        assert_eq!(store.usage_between(None, 0, i64::MAX, 10).unwrap().len(), 1); // ok: test code
        assert_eq!(rows(day, i64::MAX, GroupBy::Day)[0].requests, 2);
    }

    #[tokio::test]
    async fn batches_are_written_and_drained_at_shutdown() {
        let dir = tempfile::tempdir().unwrap(); // ok: test code
        let store = Store::open(dir.path()).unwrap(); // ok: test code
        let (recorder, writer) =
            UsageRecorder::start(store.clone(), Some(Duration::from_secs(3600)));
        // Recent records: older ones would be expired by the writer's first sweep.
        let now = chrono::Utc::now().timestamp_millis();
        for i in 0..1000 {
            recorder.record(rec(now + i, "m", 1, 1)).await;
        }
        writer.finish().await;
        drop(recorder);
        let all = store
            .usage_between(Some(&TenantId("t".into())), 0, i64::MAX, usize::MAX)
            .unwrap(); // ok: test code
        assert_eq!(all.len(), 1000);
        let (day, month) = crate::store::periods(now);
        assert_eq!(store.period_total("k", &day).unwrap().tokens, 2000); // ok: test code
        let spend = store.period_total("k", &month).unwrap().spend; // ok: test code
        assert!((spend - 500.0).abs() < 1e-6);
    }
}
