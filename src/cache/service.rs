//! The cache service: a handle turns use, and the worker thread that owns the index.
//!
//! Every index operation (search, insert, removal, expiry, eviction, compaction) runs on one
//! dedicated thread fed by a bounded queue, so no conversation actor or turn task ever waits on
//! the index. A turn embeds its question itself (the builtin embedder takes microseconds; a
//! provider embedder is an HTTP call), then sends the vector to the worker; embedding and
//! answer together take at most `lookup_timeout`: a full queue or a slow answer is a miss,
//! never a stall.
//!
//! Entries are written to sled before the worker indexes them; a candidate the worker finds is
//! read back from sled before it is served, so an entry whose conversation was deleted (its
//! records gone) can never be served, whatever the index still holds. The index holds
//! quantised vectors and no text: a candidate near the threshold is scored again with its
//! exact stored vector, and the guards compare the stored question.
//!
//! The worker dumps the index's graphs at shutdown (and every [`DUMP_EVERY`] when they
//! changed), and a start restores them (see `index/dump.rs`).

use std::collections::HashSet;
use std::sync::mpsc::{sync_channel, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};
use tokio::sync::oneshot;

use super::embed::Embedder;
use super::guards::{self, Guard};
use super::index::{EntryId, EntryMeta, Index, ScopeKey};
use crate::metrics::Metrics;
use crate::store::{CacheRecord, Store, StoreError};

/// Questions longer than this are neither looked up nor cached (a long document is rarely
/// asked twice).
pub const MAX_QUESTION_BYTES: usize = 4096;
/// Commands waiting for the worker, at most.
const QUEUE: usize = 4096;
/// Candidates checked per lookup.
const CANDIDATES: usize = 4;
/// How often the worker expires, evicts and compacts.
const MAINTENANCE_EVERY: Duration = Duration::from_secs(30);
/// How often, at most, the worker dumps graphs that changed (besides at shutdown), so a
/// crash costs a start at most this much of inserts to redo.
const DUMP_EVERY: Duration = Duration::from_secs(15 * 60);
/// How far below `min_similarity` an index similarity (of quantised vectors, within 0.01 of
/// the exact one) may be and the entry still be read back and scored exactly.
const RESCORE_MARGIN: f32 = 0.02;

/// The cache's settings, from `[cache]`.
#[derive(Debug, Clone)]
pub struct CacheSettings {
    pub enabled: bool,
    pub min_similarity: f32,
    pub ttl: Duration,
    pub max_entries: usize,
    pub lookup_timeout: Duration,
    pub disabled_tenants: HashSet<String>,
}

/// The scope of one tier of a semantic route within `key`: each tier's replies are kept apart.
pub fn tier_scope(key: ScopeKey, tier: &str) -> ScopeKey {
    let mut h = Sha256::new();
    h.update(key);
    h.update(b"tier\0");
    h.update(tier.as_bytes());
    let digest = h.finalize();
    let mut out = [0u8; 16];
    out.copy_from_slice(&digest[..16]);
    out
}

/// The preceding context a reply was given in: everything that, besides the new question,
/// decides the answer.
pub struct ScopeParts<'a> {
    pub tenant: &'a str,
    pub route: &'a str,
    pub system: Option<&'a str>,
    pub prompt_version: Option<&'a str>,
    /// Role and content of each message sent before the new one, oldest first.
    pub context: &'a [(&'a str, &'a str)],
    /// The sampling temperature asked for (a reply at 1.5 is no answer for one at 0).
    pub temperature: Option<f32>,
}

impl ScopeParts<'_> {
    /// The scope key: a hash of every part, length-prefixed so parts cannot run into each
    /// other, and of the embedder (vectors of two embedders are never compared).
    pub fn key(&self, embedder: &str) -> ScopeKey {
        let mut h = Sha256::new();
        let mut part = |bytes: &[u8]| {
            h.update((bytes.len() as u64).to_be_bytes());
            h.update(bytes);
        };
        part(embedder.as_bytes());
        part(self.tenant.as_bytes());
        part(self.route.as_bytes());
        part(self.system.map_or(&[0xff][..], str::as_bytes));
        part(self.prompt_version.unwrap_or("").as_bytes());
        part(
            self.temperature
                .map_or_else(String::new, |t| format!("{t:.3}"))
                .as_bytes(),
        );
        for (role, content) in self.context {
            part(role.as_bytes());
            part(content.as_bytes());
        }
        let digest = h.finalize();
        let mut key = [0u8; 16];
        key.copy_from_slice(&digest[..16]);
        key
    }
}

/// A served entry.
#[derive(Debug, Clone)]
pub struct Hit {
    pub id: EntryId,
    pub similarity: f32,
    pub record: CacheRecord,
}

/// What a lookup found.
#[derive(Debug)]
pub enum Outcome {
    Hit(Hit),
    /// Nothing similar enough passed the guards; `rejected_by` names the guards that turned
    /// similar candidates away (near misses).
    Miss {
        rejected_by: Vec<Guard>,
    },
    /// The lookup could not run (embedding failed, queue full, too slow).
    Skipped,
}

/// What to look up: a question in a scope, from a tenant, for a reply of at most
/// `max_tokens` completion tokens (a longer cached reply is no answer to it).
pub struct Query<'a> {
    pub key: ScopeKey,
    pub tenant: &'a str,
    pub question: &'a str,
    pub max_tokens: Option<u32>,
}

/// A lookup's outcome and the question's vector (kept to insert the reply on a miss).
pub struct Looked {
    pub outcome: Outcome,
    pub vector: Option<Vec<f32>>,
    pub key: ScopeKey,
}

pub(crate) enum Command {
    Lookup {
        key: ScopeKey,
        tenant: String,
        question: String,
        max_tokens: Option<u32>,
        vector: Vec<f32>,
        reply: oneshot::Sender<Outcome>,
    },
    Insert {
        id: EntryId,
        meta: EntryMeta,
        vector: Vec<f32>,
    },
    Forget(Vec<EntryId>),
    Len(oneshot::Sender<(usize, usize)>),
    /// Ends the worker (shutdown): what it was sent before is done first.
    Stop,
}

struct Inner {
    settings: CacheSettings,
    embedder: Arc<dyn Embedder>,
    embedder_id: String,
    store: Store,
    metrics: Metrics,
    tx: SyncSender<Command>,
    /// Cluster mode: the stream this node announces its changes on and tails others' from.
    sync: Option<super::sync::Sync>,
    /// The worker thread, joined at shutdown so it lets go of the store before the last flush.
    worker: parking_lot::Mutex<Option<std::thread::JoinHandle<()>>>,
}

/// The handle to the cache; cheap to clone.
#[derive(Clone)]
pub struct Cache {
    inner: Arc<Inner>,
}

fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

impl Cache {
    /// Starts the worker, which first rebuilds the index from the stored entries (entries of
    /// another embedder are dropped).
    ///
    /// # Errors
    /// Storage failures, or the worker thread cannot start.
    pub fn start(
        settings: CacheSettings,
        embedder: Arc<dyn Embedder>,
        store: Store,
        metrics: Metrics,
        sync: Option<super::sync::Sync>,
    ) -> Result<Self, StoreError> {
        let embedder_id = embedder.id();
        // Read before the worker loads the stored entries: what others add from here on is
        // tailed, so nothing falls between the two.
        let position = sync.as_ref().map(super::sync::Sync::position);
        let dropped = store.cache_use_embedder(&embedder_id)?;
        if dropped > 0 {
            tracing::info!(
                dropped,
                embedder = %embedder_id,
                "cache entries of another embedder dropped"
            );
        }
        let (tx, rx) = sync_channel(QUEUE);
        let worker = Worker {
            store: store.clone(),
            metrics: metrics.clone(),
            min_similarity: settings.min_similarity,
            max_entries: settings.max_entries.max(1),
            index: Index::new(0),
            tag: embedder_id.clone(),
            last_dump: Instant::now(),
            sync: sync.clone(),
        };
        let thread = std::thread::Builder::new()
            .name("parley-cache".into())
            .spawn(move || worker.run(rx))
            .map_err(|e| StoreError::Task(e.to_string()))?;
        if let (Some(sync), Some(from)) = (&sync, position) {
            sync.tail(from, store.clone(), tx.clone());
        }
        Ok(Self {
            inner: Arc::new(Inner {
                settings,
                embedder,
                embedder_id,
                store,
                metrics,
                tx,
                sync,
                worker: parking_lot::Mutex::new(Some(thread)),
            }),
        })
    }

    /// Stops the worker after what it was already sent, and waits for its thread to end.
    pub async fn stop(&self) {
        if let Some(sync) = &self.inner.sync {
            sync.stop();
        }
        let Some(thread) = self.inner.worker.lock().take() else {
            return;
        };
        let tx = self.inner.tx.clone();
        // `send` waits for room in the queue: off the async threads, like the join.
        let _ = tokio::task::spawn_blocking(move || {
            let _ = tx.send(Command::Stop);
            let _ = thread.join();
        })
        .await;
    }

    pub fn settings(&self) -> &CacheSettings {
        &self.inner.settings
    }

    pub fn embedder(&self) -> &Arc<dyn Embedder> {
        &self.inner.embedder
    }

    /// Whether the cache serves this tenant (globally enabled, tenant not excluded).
    pub fn serves(&self, tenant: &str) -> bool {
        self.inner.settings.enabled && !self.inner.settings.disabled_tenants.contains(tenant)
    }

    /// Whether `question`, from `principal` on a route that `route_caches`, may be looked up
    /// and cached: plain questions only — never one carrying personal data, flagged by a
    /// guardrail or too long — and never against the tenant's, the key's, the route's or the
    /// request's wish, nor through an embedder outside the key's regions.
    pub fn admits(
        &self,
        principal: &crate::tenant::Principal,
        route_caches: bool,
        question: &str,
        flagged: bool,
    ) -> bool {
        route_caches
            && !flagged
            && principal.cache()
            && self.serves(principal.tenant.as_str())
            && question.len() <= MAX_QUESTION_BYTES
            && self.embedder_allowed(principal.regions())
            && crate::guard::pii::detect(question).is_empty()
    }

    /// Whether a request restricted to `regions` may have its text embedded: always by an
    /// in-process embedder; by a provider only inside those regions.
    pub fn embedder_allowed(&self, regions: Option<&[String]>) -> bool {
        match (self.inner.embedder.remote_region(), regions) {
            (None, _) | (Some(_), None) => true,
            (Some(Some(r)), Some(allowed)) => allowed.contains(&r),
            (Some(None), Some(_)) => false,
        }
    }

    /// Whether texts leave the process to be embedded.
    pub fn embeds_remotely(&self) -> bool {
        self.inner.embedder.remote_region().is_some()
    }

    pub fn scope_key(&self, parts: &ScopeParts<'_>) -> ScopeKey {
        parts.key(&self.inner.embedder_id)
    }

    /// Looks a question up; `known` is its embedding when the caller has it.
    pub async fn lookup(&self, q: Query<'_>, known: Option<Vec<f32>>) -> Looked {
        let Query {
            key,
            tenant,
            question,
            max_tokens,
        } = q;
        let begun = Instant::now();
        let metrics = &self.inner.metrics;
        let timeout = self.inner.settings.lookup_timeout;
        let vector = match known {
            Some(v) => Some(v),
            None => self.embed_one(question, timeout).await,
        };
        let Some(vector) = vector else {
            metrics.cache_lookup("skipped", None, &[]);
            return Looked {
                outcome: Outcome::Skipped,
                vector: None,
                key,
            };
        };
        let (reply, answer) = oneshot::channel();
        let cmd = Command::Lookup {
            key,
            tenant: tenant.to_owned(),
            question: question.to_owned(),
            max_tokens,
            vector: vector.clone(),
            reply,
        };
        let left = timeout.saturating_sub(begun.elapsed());
        let outcome = match self.inner.tx.try_send(cmd) {
            Ok(()) => match tokio::time::timeout(left, answer).await {
                Ok(Ok(outcome)) => outcome,
                _ => Outcome::Skipped,
            },
            Err(_) => Outcome::Skipped,
        };
        match &outcome {
            Outcome::Hit(_) => metrics.cache_lookup("hit", Some(begun.elapsed()), &[]),
            Outcome::Miss { rejected_by } if rejected_by.is_empty() => {
                metrics.cache_lookup("miss", Some(begun.elapsed()), &[]);
            }
            Outcome::Miss { rejected_by } => {
                let names: Vec<&str> = rejected_by.iter().map(|g| g.as_str()).collect();
                metrics.cache_lookup("near_miss", Some(begun.elapsed()), &names);
            }
            Outcome::Skipped => metrics.cache_lookup("skipped", Some(begun.elapsed()), &[]),
        }
        Looked {
            outcome,
            vector: Some(vector),
            key,
        }
    }

    /// The embedding of one text within `timeout` (`None`, logged, when it fails).
    async fn embed_one(&self, text: &str, timeout: Duration) -> Option<Vec<f32>> {
        let texts = [text.to_owned()];
        match tokio::time::timeout(timeout, self.inner.embedder.embed(&texts)).await {
            Ok(Ok(mut v)) if v.len() == 1 => v.pop(),
            Ok(Ok(_)) => None,
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "cache lookup skipped: embedding failed");
                None
            }
            Err(_) => {
                tracing::warn!("cache lookup skipped: embedding slower than lookup_timeout_ms");
                None
            }
        }
    }

    /// Stores a complete reply under scope `key`; the worker indexes it. Failures are logged:
    /// a reply that could not be cached is simply not cached.
    pub fn insert(&self, key: ScopeKey, vector: Vec<f32>, mut record: CacheRecord) {
        let store = &self.inner.store;
        let now = now_ms();
        let ttl = i64::try_from(self.inner.settings.ttl.as_millis()).unwrap_or(i64::MAX);
        record.scope = hex::encode(key);
        record.created_ms = now;
        record.expires_ms = now.saturating_add(ttl);
        let id = match store.cache_next_id() {
            Ok(id) => id,
            Err(e) => {
                tracing::warn!(error = %e, "cache entry not stored");
                return;
            }
        };
        if let Err(e) = store.put_cache_entry(id, &record, &vector) {
            tracing::warn!(error = %e, "cache entry not stored");
            return;
        }
        let meta = EntryMeta {
            scope: key,
            expires_ms: record.expires_ms,
            last_used_ms: now,
        };
        let announced = self.inner.sync.as_ref().map(|s| (s, meta));
        if let Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) =
            self.inner.tx.try_send(Command::Insert { id, meta, vector })
        {
            tracing::warn!("cache worker busy; entry dropped");
            let _ = store.remove_cache_entries(&[id]);
            return;
        }
        if let Some((sync, meta)) = announced {
            sync.inserted(id, &meta);
        }
    }

    /// Drops entries from the index (their records are already gone from storage).
    pub fn forget(&self, ids: Vec<EntryId>) {
        if let (Some(sync), false) = (&self.inner.sync, ids.is_empty()) {
            sync.removed(&ids);
        }
        if !ids.is_empty() && self.inner.tx.try_send(Command::Forget(ids)).is_err() {
            // The index keeps them until the next compaction; lookups check storage anyway.
            tracing::debug!("cache worker busy; forgotten entries stay as tombstones");
        }
    }

    /// Living entries and tombstones in the index (after every command sent before).
    pub async fn len(&self) -> Option<(usize, usize)> {
        let (reply, answer) = oneshot::channel();
        self.inner.tx.try_send(Command::Len(reply)).ok()?;
        answer.await.ok()
    }
}

struct Worker {
    store: Store,
    metrics: Metrics,
    min_similarity: f32,
    max_entries: usize,
    index: Index,
    /// The embedder's id: graphs dumped for another embedder are not reloaded.
    tag: String,
    last_dump: Instant,
    sync: Option<super::sync::Sync>,
}

impl Worker {
    fn run(mut self, rx: Receiver<Command>) {
        self.load();
        let mut last = Instant::now();
        loop {
            let cmd = match rx.recv_timeout(MAINTENANCE_EVERY) {
                Ok(Command::Stop) | Err(RecvTimeoutError::Disconnected) => {
                    self.dump();
                    return;
                }
                Ok(cmd) => Some(cmd),
                Err(RecvTimeoutError::Timeout) => None,
            };
            // A panic (a bug of ours, or a library's assertion) must not end the worker (every
            // lookup would then be skipped). The index may be half-updated: rebuild it from storage.
            let survived = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                if let Some(cmd) = cmd {
                    self.handle(cmd);
                }
                if last.elapsed() >= MAINTENANCE_EVERY {
                    self.maintain();
                    last = Instant::now();
                }
            }));
            if survived.is_err() {
                tracing::error!("cache worker panicked; rebuilding the index from storage");
                self.load();
            }
        }
    }

    fn publish_len(&mut self) {
        let n = self.index.len();
        self.metrics.cache_entries.set(n as i64);
    }

    /// Builds the index from storage and the graphs dumped at the last stop, timed in the
    /// log.
    fn load(&mut self) {
        let begun = Instant::now();
        let heads = match self.store.cache_entry_heads() {
            Ok(h) => h,
            Err(e) => {
                tracing::error!(error = %e, "cache entries unreadable; starting with an empty cache");
                Vec::new()
            }
        };
        let now = now_ms();
        let (live, expired): (Vec<_>, Vec<_>) = heads.into_iter().partition(|h| h.expires_ms > now);
        let expired: Vec<u64> = expired.iter().map(|h| h.id).collect();
        if let Err(e) = self.store.remove_cache_entries(&expired) {
            tracing::warn!(error = %e, "expired cache entries not removed");
        }
        let store = self.store.clone();
        let mut vector_of = |id| match store.cache_vector(id) {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(error = %e, "cache vector unreadable; entry not indexed");
                None
            }
        };
        let dim = live
            .iter()
            .find_map(|h| vector_of(h.id))
            .map_or(0, |v| v.len());
        let entries = live
            .into_iter()
            .filter_map(|h| {
                let meta = EntryMeta {
                    scope: scope_from_hex(&h.scope)?,
                    expires_ms: h.expires_ms,
                    last_used_ms: h.created_ms,
                };
                Some((h.id, meta))
            })
            .collect();
        let mut index = Index::new(dim);
        let r = index.restore(
            self.store.cache_index_dir(),
            &self.tag,
            entries,
            &mut vector_of,
        );
        for problem in &r.problems {
            tracing::warn!(%problem, "cache index dump not used; rebuilt from storage");
        }
        self.metrics.cache_entries.set(r.entries as i64);
        tracing::info!(
            entries = r.entries,
            expired = expired.len(),
            graphs_reloaded = r.reloaded,
            inserted_since_dump = r.inserted,
            tombstones = r.tombstones,
            rebuilt = r.rebuilt,
            skipped = r.skipped,
            elapsed_ms = begun.elapsed().as_millis() as u64,
            "cache index restored from storage"
        );
        self.index = index;
        self.evict();
    }

    /// Dumps the graphs that changed since their last dump (logged; a failed dump only means
    /// a slower next start).
    fn dump(&mut self) {
        let begun = Instant::now();
        self.last_dump = begun;
        let dir = self.store.cache_index_dir().to_owned();
        match self.index.dump(&dir, &self.tag) {
            Ok(d) if d.written > 0 || d.failed > 0 => tracing::info!(
                graphs = d.graphs,
                written = d.written,
                failed = d.failed,
                elapsed_ms = begun.elapsed().as_millis() as u64,
                "cache index dumped"
            ),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "cache index not dumped"),
        }
    }

    fn handle(&mut self, cmd: Command) {
        match cmd {
            Command::Lookup {
                key,
                tenant,
                question,
                max_tokens,
                vector,
                reply,
            } => {
                let q = Query {
                    key,
                    tenant: &tenant,
                    question: &question,
                    max_tokens,
                };
                let outcome = self.lookup(&q, &vector);
                let _ = reply.send(outcome);
            }
            Command::Insert { id, meta, vector } => {
                let index = &mut self.index;
                // The first vector fixes the dimensions of an empty index.
                if index.is_empty() && index.tombstones() == 0 {
                    *index = Index::new(vector.len());
                }
                if let Err(e) = self.index.insert(id, meta, &vector) {
                    tracing::warn!(error = %e, "cache entry not indexed");
                    let _ = self.store.remove_cache_entries(&[id]);
                }
                self.evict();
                self.publish_len();
            }
            Command::Forget(ids) => {
                for id in ids {
                    self.index.remove(id);
                }
                self.publish_len();
            }
            Command::Len(reply) => {
                let index = &mut self.index;
                let _ = reply.send((index.len(), index.tombstones()));
            }
            Command::Stop => {}
        }
    }

    fn lookup(&mut self, q: &Query<'_>, vector: &[f32]) -> Outcome {
        let (tenant, question) = (q.tenant, q.question);
        let now = now_ms();
        let mut rejected_by = Vec::new();
        let scope = hex::encode(q.key);
        for (id, similarity) in self.rescored(&q.key, vector) {
            // A NaN similarity is no hit either.
            if similarity.is_nan() || similarity < self.min_similarity {
                break;
            }
            if self.index.meta(id).is_none_or(|m| m.expires_ms <= now) {
                continue;
            }
            let record = match self.store.cache_entry(id) {
                Ok(Some(record)) => record,
                Ok(None) => {
                    // Deleted with its conversation (or evicted): never served again.
                    self.index.remove(id);
                    continue;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "cache entry unreadable");
                    continue;
                }
            };
            if let Err(g) = guards::check(question, &record.question) {
                rejected_by.push(g);
                continue;
            }
            if q.max_tokens
                .is_some_and(|m| record.usage.completion_tokens > m)
            {
                continue;
            }
            if record.tenant != tenant || record.scope != scope {
                // Not this scope's entry: never served from it.
                self.index.remove(id);
                continue;
            }
            self.index.touch(id, now);
            return Outcome::Hit(Hit {
                id,
                similarity,
                record,
            });
        }
        Outcome::Miss { rejected_by }
    }

    /// The index's candidates near enough to `min_similarity`, scored again with their
    /// exact stored vectors, most similar first: a hit is decided on the same similarity as
    /// without quantisation.
    fn rescored(&mut self, key: &ScopeKey, vector: &[f32]) -> Vec<(EntryId, f32)> {
        let floor = self.min_similarity - RESCORE_MARGIN;
        let candidates = self.index.search(key, vector, CANDIDATES);
        let mut scored = Vec::with_capacity(candidates.len());
        for (id, approximate) in candidates {
            // NaN included: no hit.
            if approximate.is_nan() || approximate < floor {
                break;
            }
            match self.store.cache_vector(id) {
                Ok(Some(exact)) => scored.push((id, super::embed::cosine(vector, &exact))),
                Ok(None) => {
                    self.index.remove(id);
                }
                Err(e) => tracing::warn!(error = %e, "cache vector unreadable"),
            }
        }
        scored.sort_by(|a, b| b.1.total_cmp(&a.1));
        scored
    }

    /// Over the size cap: removes the least recently used twentieth of the cap.
    fn evict(&mut self) {
        let max = self.max_entries;
        let index = &mut self.index;
        if index.len() <= max {
            return;
        }
        let n = index.len() - max + (max / 20).max(1);
        let victims = index.least_recently_used(n);
        for id in &victims {
            index.remove(*id);
        }
        if let Err(e) = self.store.remove_cache_entries(&victims) {
            tracing::warn!(error = %e, "evicted cache entries not removed from storage");
        }
        if let Some(sync) = &self.sync {
            sync.removed(&victims);
        }
        tracing::debug!(evicted = victims.len(), "cache over its size cap");
    }

    fn maintain(&mut self) {
        let now = now_ms();
        let expired = self.index.expired(now);
        for id in &expired {
            self.index.remove(*id);
        }
        if let Err(e) = self.store.remove_cache_entries(&expired) {
            tracing::warn!(error = %e, "expired cache entries not removed");
        }
        let begun = Instant::now();
        let rebuilt = self.index.compact();
        if rebuilt > 0 {
            tracing::info!(
                partitions = rebuilt,
                elapsed_ms = begun.elapsed().as_millis() as u64,
                "cache index compacted"
            );
        }
        self.publish_len();
        if self.last_dump.elapsed() >= DUMP_EVERY {
            self.dump();
        }
    }
}

fn scope_from_hex(s: &str) -> Option<ScopeKey> {
    hex::decode(s).ok()?.try_into().ok()
}
