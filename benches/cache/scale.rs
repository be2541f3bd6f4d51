//! The cache at scale: every entry in ONE scope (one HNSW graph, the worst case).
//!
//! 1. The index alone: memory (process RSS growth per entry, from /proc/self/status), build,
//!    insert and lookup latency, exact-question recall@1 on sampled questions, dump, and the
//!    restore a start does (reload the dump, insert what was stored since, tombstone what was
//!    removed since).
//! 2. The real start path: the entries in a sled store, `Cache::start` until the worker
//!    answers — once with no dump (a full rebuild), once after `Cache::stop` dumped the graph
//!    — and lookups through the worker (candidates scored again with their stored vector,
//!    guards, record read), with the rate at which an exact question is served its own entry.
//!
//! Knobs: `CACHE_BENCH_ENTRIES` (entries), `CACHE_BENCH_LOOKUPS`, `CACHE_BENCH_INSERTS`,
//! `CACHE_BENCH_STORE=0` to skip the store part, `CACHE_BENCH_EF=128,256` to measure lookups
//! again at those search breadths.

use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::black_box;
use parley::cache::embed::{Builtin, Embedder, DIM};
use parley::cache::index::{EntryMeta, Index};
use parley::cache::{Cache, CacheSettings, Outcome, Query};
use parley::metrics::Metrics;
use parley::store::{CacheRecord, Store, Usage};

use super::support::percentile;
use super::{question, us};

const SCOPE: [u8; 16] = [1; 16];
/// Entries generated and loaded at a time, so the f32 vectors never all exist at once.
const CHUNK: usize = 20_000;

pub fn env(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Resident memory of this process, in bytes, once glibc has handed back the free pages of
/// all its arenas (memory freed by the build's threads stays resident in their arenas otherwise;
/// the figure is what the index holds, not what the allocator keeps for later).
fn rss() -> usize {
    trim();
    rss_untrimmed()
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn trim() {
    // SAFETY: malloc_trim only releases free memory; it touches no live allocation.
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn trim() {}

/// Resident memory without trimming first.
fn rss_untrimmed() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|l| l.split_whitespace().next())
        .and_then(|kb| kb.parse::<usize>().ok())
        .map_or(0, |kb| kb * 1024)
}

fn meta() -> EntryMeta {
    EntryMeta {
        scope: SCOPE,
        expires_ms: i64::MAX,
        last_used_ms: 0,
    }
}

/// `count` entries spread over `0..n` (a multiplicative hash, so the sample is not aligned
/// with the way questions are generated).
fn sample(n: usize, count: usize) -> impl Iterator<Item = usize> {
    (0..count as u64).map(move |k| ((k.wrapping_mul(2_654_435_761) + 17) % n as u64) as usize)
}

struct Latency {
    times: Vec<Duration>,
}

impl Latency {
    fn new() -> Self {
        Self { times: Vec::new() }
    }
    fn time<T>(&mut self, f: impl FnOnce() -> T) -> T {
        let t = Instant::now();
        let out = f();
        self.times.push(t.elapsed());
        out
    }
    fn show(&mut self) -> String {
        self.times.sort();
        format!(
            "p50 {:.0} µs p99 {:.0} µs",
            us(percentile(&self.times, 0.5)),
            us(percentile(&self.times, 0.99))
        )
    }
}

/// Lookups of sampled questions of living entries (`living(i)`) in the index: latency, and
/// exact-question recall@1 of the graph alone (the index also finds an exact repeat by its
/// vector's fingerprint, so its own answer to a repeated question is always right).
fn lookups(
    index: &Index,
    n: usize,
    count: usize,
    living: impl Fn(usize) -> bool,
) -> (Latency, f64) {
    let mut latency = Latency::new();
    let mut found = 0;
    for i in sample(n, count).filter(|i| living(*i)) {
        let v = Builtin::vector(&question(i));
        let top = latency.time(|| black_box(index.search(&SCOPE, &v, 4)));
        assert_eq!(top.first().map(|x| x.0), Some(i as u64));
        let graph = index.search_graph_only(&SCOPE, &v, 1);
        found += usize::from(graph.first().map(|x| x.0) == Some(i as u64));
    }
    let asked = latency.times.len().max(1);
    (latency, found as f64 / asked as f64)
}

pub fn index_figures(n: usize, inserts: usize, count: usize) {
    let before = rss();
    let mut index = Index::new(DIM);
    let begun = Instant::now();
    for start in (0..n).step_by(CHUNK) {
        let items = (start..(start + CHUNK).min(n))
            .map(|i| (i as u64, meta(), Builtin::vector(&question(i))))
            .collect();
        index.bulk_load(items);
    }
    let built = begun.elapsed();
    let untrimmed = rss_untrimmed().saturating_sub(before) as f64 / n as f64;
    let per_entry = rss().saturating_sub(before) as f64 / n as f64;
    let (mut lookup, recall) = lookups(&index, n, count, |_| true);
    println!(
        "cache index, {n} entries in one scope: RSS growth {per_entry:.0} B/entry \
         ({untrimmed:.0} before glibc's free pages were trimmed); build {:.1} s; \
         lookup {}; exact-question recall@1 of the graph alone {recall:.3} ({count} sampled)",
        built.as_secs_f64(),
        lookup.show(),
    );

    let breadths = std::env::var("CACHE_BENCH_EF").unwrap_or_default();
    for ef in breadths.split(',').filter_map(|e| e.trim().parse().ok()) {
        index.set_ef_search(ef);
        let (mut lookup, recall) = lookups(&index, n, count, |_| true);
        println!(
            "cache index, {n} entries, search breadth {ef}: lookup {}; exact-question recall@1 \
             {recall:.3}",
            lookup.show()
        );
    }
    index.set_ef_search(0);

    let dir = tempfile::tempdir().unwrap();
    let begun = Instant::now();
    let dumped = index.dump(dir.path(), "bench").unwrap();
    let dump_time = begun.elapsed();
    let on_disk: u64 = std::fs::read_dir(dir.path())
        .unwrap()
        .flatten()
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum();
    assert_eq!(dumped.written, 1);

    // After the dump: inserts (each timed), and one entry in a hundred removed.
    let mut insert = Latency::new();
    for i in n..n + inserts {
        let v = Builtin::vector(&question(i));
        insert.time(|| index.insert(i as u64, meta(), &v).unwrap());
    }
    let removed: Vec<u64> = (0..n as u64).step_by(100).collect();
    for id in &removed {
        index.remove(*id);
    }
    drop(index);

    let entries: Vec<(u64, EntryMeta)> = (0..(n + inserts) as u64)
        .filter(|id| id % 100 != 0 || *id >= n as u64)
        .map(|id| (id, meta()))
        .collect();
    let living = entries.len();
    let mut restored = Index::new(DIM);
    let begun = Instant::now();
    let report = restored.restore(dir.path(), "bench", entries, &mut |id| {
        Some(Builtin::vector(&question(id as usize)))
    });
    let restore_time = begun.elapsed();
    assert_eq!(report.reloaded, 1, "{report:?}");
    assert_eq!(
        (report.entries, report.inserted, report.tombstones),
        (living, inserts, removed.len())
    );
    let per_entry_now = rss().saturating_sub(before) as f64 / living as f64;
    let (_, recall_after) = lookups(&restored, n, count, |i| i % 100 != 0);
    println!(
        "cache index, {n} entries: insert {}; dump {:.1} s ({} MB on disk); restore {:.1} s \
         (reload, {} inserted since the dump, {} tombstones); recall@1 after restore \
         {recall_after:.3}; RSS growth since start {per_entry_now:.0} B/entry",
        insert.show(),
        dump_time.as_secs_f64(),
        on_disk >> 20,
        restore_time.as_secs_f64(),
        report.inserted,
        report.tombstones,
    );
}

fn record(i: usize, now: i64) -> CacheRecord {
    CacheRecord {
        tenant: "t".into(),
        scope: hex::encode(SCOPE),
        question: question(i),
        reply: format!("The answer to question {i}, in a sentence or two of cached text."),
        usage: Usage::new(12, 20),
        provider: "mock".into(),
        model: "mock-1".into(),
        conversation: None,
        created_ms: now,
        expires_ms: now + 86_400_000,
    }
}

fn settings() -> CacheSettings {
    CacheSettings {
        enabled: true,
        min_similarity: 0.92,
        ttl: Duration::from_secs(86_400),
        max_entries: usize::MAX,
        lookup_timeout: Duration::from_secs(5),
        disabled_tenants: Default::default(),
    }
}

/// Starts the cache on `store` and waits until its worker has loaded the index.
async fn start(store: &Store) -> (Cache, Duration) {
    let begun = Instant::now();
    let cache = Cache::start(
        settings(),
        Arc::new(Builtin),
        store.clone(),
        Metrics::new().unwrap(),
        None,
    )
    .unwrap();
    while cache.len().await.is_none() {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    (cache, begun.elapsed())
}

pub fn store_figures(n: usize, count: usize) {
    let dir = tempfile::tempdir().unwrap();
    // A page cache the size of the vectors: with the default 16 MiB, filling a store this
    // fast churns segments, and sled 0.34 can deadlock truncating them (spacejam/sled#1412).
    let store = Store::open_with(dir.path(), 1 << 30).unwrap();
    store.cache_use_embedder(&Builtin.id()).unwrap();
    let now = chrono::Utc::now().timestamp_millis();
    let begun = Instant::now();
    for i in 0..n {
        let v = Builtin::vector(&question(i));
        store
            .put_cache_entry(i as u64, &record(i, now), &v)
            .unwrap();
    }
    store.flush_blocking().unwrap();
    let filled = begun.elapsed();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let (cache, rebuild) = start(&store).await;
        assert_eq!(cache.len().await, Some((n, 0)));
        let begun = Instant::now();
        cache.stop().await;
        let dump = begun.elapsed();
        let (cache, restart) = start(&store).await;
        assert_eq!(cache.len().await, Some((n, 0)));
        let mut latency = Latency::new();
        let mut served = 0;
        for i in sample(n, count) {
            let q = question(i);
            let v = Builtin::vector(&q);
            let query = Query {
                key: SCOPE,
                tenant: "t",
                question: &q,
                max_tokens: None,
            };
            let t = Instant::now();
            let looked = cache.lookup(query, Some(v)).await;
            latency.times.push(t.elapsed());
            if let Outcome::Hit(hit) = looked.outcome {
                served += usize::from(hit.id == i as u64);
            }
        }
        cache.stop().await;
        println!(
            "cache service, {n} entries in one sled store (filled in {:.0} s): start with no dump \
             (full rebuild) {:.1} s; dump at stop {:.1} s; start from the dump {:.1} s; lookup \
             through the worker {}; exact question served its own entry {:.3} ({count} sampled)",
            filled.as_secs_f64(),
            rebuild.as_secs_f64(),
            dump.as_secs_f64(),
            restart.as_secs_f64(),
            latency.show(),
            served as f64 / count as f64,
        );
    });
}
