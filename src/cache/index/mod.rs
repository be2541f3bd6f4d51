//! The in-memory similarity index, partitioned by scope.
//!
//! A hit needs the same scope (tenant, route, system prompt, preceding context) before any
//! similarity counts, so the index keeps one partition per scope and never searches across
//! them. Most scopes are small (the entries of one context); they are scanned exactly. A scope
//! that grows past [`Index::graph_at`] entries (typically the first turns of one route and
//! tenant) moves into its own HNSW graph (usearch).
//!
//! Memory is what limits a scope's size, so the index keeps per entry only what a search
//! needs: its vector quantised to 8 bits ([`quant`]), its graph links, and its scope and times
//! ([`EntryMeta`]). The question, the reply and the exact vector stay in storage: similarities
//! the index answers are approximate, and the service reads an entry back (exact vector
//! included) before it decides on a hit.
//!
//! A graph keeps its nodes flat: the 8-bit vector, the key and fixed arrays of 32-bit links,
//! about 900 bytes an entry at 512 dimensions in a large graph (hnsw_rs, used before, kept about 2.1 KiB: an
//! allocation per link and per point). A removed entry leaves its node as a tombstone, never
//! found again and reused by the next insertion; [`Index::compact`] rebuilds graphs where
//! tombstones outnumber the living.
//!
//! Graphs are dumped to files and reloaded at start ([`dump`]), so a large scope is not built
//! again point by point at every start.
//!
//! Not thread-safe by design: one worker thread owns it (see `service.rs`).

mod dump;
pub mod quant;

use std::collections::HashMap;

pub use dump::{DumpError, Dumped, Restored};

pub type EntryId = u64;
pub type ScopeKey = [u8; 16];

/// HNSW parameters: links per node (twice as many on the lowest layer), construction and
/// search breadth.
const MAX_CONNECTIONS: usize = 16;
const EF_CONSTRUCTION: usize = 128;
const EF_SEARCH: usize = 64;
/// Graphs get this many points at once on several threads; fewer one by one.
const PARALLEL_FROM: usize = 10_000;
/// A graph's first room, in entries (it doubles when full).
const FIRST_ROOM: usize = 1024;

/// What the index keeps of an entry besides its vector.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EntryMeta {
    pub scope: ScopeKey,
    pub expires_ms: i64,
    pub last_used_ms: i64,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum IndexError {
    #[error("vector has {got} dimensions, the index {want}")]
    Dimensions { got: usize, want: usize },
    #[error("vector is not finite")]
    NotFinite,
    #[error("graph refused the entry: {0}")]
    Graph(String),
}

struct Graph {
    vectors: usearch::Index,
    /// Each living entry by its vector's fingerprint ([`quant::fingerprint`]): an exact
    /// repeat is found whatever the graph's shape (HNSW loses points in clusters whose members
    /// are all about as far from each other, as templated questions that differ only in
    /// numbers are under the builtin embedder).
    exact: Repeats,
    /// Threads its room was reserved for (usearch refuses an add beyond them).
    threads: usize,
    /// Living entries.
    live: usize,
    /// Nodes of removed entries, waiting to be reused.
    tombstones: usize,
    /// Where the graph was last dumped, while nothing has changed since.
    dumped: Option<dump::DumpedGraph>,
}

enum Partition {
    Flat(Vec<(EntryId, Vec<i8>)>),
    Graph(Graph),
}

/// The index: entries' metadata and one partition per scope.
pub struct Index {
    dim: usize,
    graph_at: usize,
    /// Search breadth in graphs (recall against time).
    ef_search: usize,
    entries: HashMap<EntryId, EntryMeta>,
    scopes: HashMap<ScopeKey, Partition>,
}

impl Index {
    /// Scopes larger than this move from an exact scan to an HNSW graph.
    pub const DEFAULT_GRAPH_AT: usize = 256;

    pub fn new(dim: usize) -> Self {
        Self::with_graph_at(dim, Self::DEFAULT_GRAPH_AT)
    }

    pub fn with_graph_at(dim: usize, graph_at: usize) -> Self {
        Self {
            dim,
            graph_at: graph_at.max(1),
            ef_search: EF_SEARCH,
            entries: HashMap::new(),
            scopes: HashMap::new(),
        }
    }

    pub fn graph_at(&self) -> usize {
        self.graph_at
    }

    /// Sets how many candidates a graph search keeps (at least the default): more finds
    /// more of a dense cluster's members, in more time (the benches measure both).
    pub fn set_ef_search(&mut self, ef: usize) {
        self.ef_search = ef.max(EF_SEARCH);
        for p in self.scopes.values() {
            if let Partition::Graph(g) = p {
                g.vectors.change_expansion_search(self.ef_search);
            }
        }
    }

    pub fn dim(&self) -> usize {
        self.dim
    }

    /// Living entries.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Removed entries still held in graphs.
    pub fn tombstones(&self) -> usize {
        self.scopes
            .values()
            .map(|p| match p {
                Partition::Graph(g) => g.tombstones,
                Partition::Flat(_) => 0,
            })
            .sum()
    }

    pub fn meta(&self, id: EntryId) -> Option<&EntryMeta> {
        self.entries.get(&id)
    }

    /// Marks an entry as just used (for eviction).
    pub fn touch(&mut self, id: EntryId, now_ms: i64) {
        if let Some(m) = self.entries.get_mut(&id) {
            m.last_used_ms = now_ms;
        }
    }

    fn check(&self, vector: &[f32]) -> Result<(), IndexError> {
        // An empty vector (an embedder that answered nothing) is similar to nothing, and a
        // graph of zero dimensions is no graph.
        if vector.len() != self.dim || vector.is_empty() {
            return Err(IndexError::Dimensions {
                got: vector.len(),
                want: self.dim,
            });
        }
        if !vector.iter().all(|x| x.is_finite()) {
            return Err(IndexError::NotFinite);
        }
        Ok(())
    }

    /// Adds an entry (an id already present is replaced).
    ///
    /// # Errors
    /// A vector of the wrong dimension or with non-finite values, or one its scope's graph
    /// could not take (out of memory); the entry is then not in the index.
    pub fn insert(
        &mut self,
        id: EntryId,
        meta: EntryMeta,
        vector: &[f32],
    ) -> Result<(), IndexError> {
        self.check(vector)?;
        self.remove(id);
        let vector = quant::quantise(vector);
        match self.scopes.get_mut(&meta.scope) {
            Some(Partition::Graph(g)) => {
                g.add(id, &vector).map_err(IndexError::Graph)?;
                self.entries.insert(id, meta);
            }
            Some(Partition::Flat(items)) if items.len() < self.graph_at => {
                items.push((id, vector));
                self.entries.insert(id, meta);
            }
            _ => {
                self.entries.insert(id, meta);
                self.add_scopes(
                    HashMap::from([(meta.scope, vec![(id, vector)])]),
                    Vec::new(),
                );
                if !self.entries.contains_key(&id) {
                    return Err(IndexError::Graph(
                        "its scope's graph could not be built".into(),
                    ));
                }
            }
        }
        Ok(())
    }

    /// Loads many entries at once (start-up): each scope is built in one go, large graphs on
    /// several threads.
    pub fn bulk_load(&mut self, items: Vec<(EntryId, EntryMeta, Vec<f32>)>) -> usize {
        let mut by_scope: HashMap<ScopeKey, Vec<(EntryId, Vec<i8>)>> = HashMap::new();
        let mut metas = Vec::with_capacity(items.len());
        let mut seen = std::collections::HashSet::with_capacity(items.len());
        for (id, meta, vector) in items {
            // An id already indexed, or twice in `items`, is loaded once (a graph refuses a
            // key it holds).
            if self.check(&vector).is_err() || self.entries.contains_key(&id) || !seen.insert(id) {
                continue;
            }
            // Quantised as it comes, so the f32 vectors go one by one.
            by_scope
                .entry(meta.scope)
                .or_default()
                .push((id, quant::quantise(&vector)));
            metas.push((id, meta));
        }
        let before = self.entries.len();
        self.add_scopes(by_scope, metas);
        self.entries.len() - before
    }

    /// Adds quantised entries grouped by scope, with their metadata. An entry its graph
    /// refuses (out of memory) is logged and left out; a scope whose graph cannot be made at
    /// all stays an exact scan.
    fn add_scopes(
        &mut self,
        by_scope: HashMap<ScopeKey, Vec<(EntryId, Vec<i8>)>>,
        metas: Vec<(EntryId, EntryMeta)>,
    ) {
        self.entries.extend(metas);
        for (scope, items) in by_scope {
            let (partition, refused) = match self.scopes.remove(&scope) {
                None => self.partition(items),
                Some(Partition::Flat(mut existing)) => {
                    existing.extend(items);
                    self.partition(existing)
                }
                Some(Partition::Graph(mut g)) => {
                    let refused = g.add_all(&items);
                    (Partition::Graph(g), refused)
                }
            };
            self.scopes.insert(scope, partition);
            if !refused.is_empty() {
                tracing::warn!(
                    entries = refused.len(),
                    scope = %hex::encode(scope),
                    "cache graph refused entries; they stay unindexed"
                );
                for id in refused {
                    self.entries.remove(&id);
                }
            }
        }
    }

    /// `items` of one scope as an exact scan, or as a graph past [`Self::graph_at`]; with the
    /// ids a graph refused.
    fn partition(&self, items: Vec<(EntryId, Vec<i8>)>) -> (Partition, Vec<EntryId>) {
        if items.len() <= self.graph_at {
            return (Partition::Flat(items), Vec::new());
        }
        match Graph::new(self.dim, items.len(), self.ef_search) {
            Ok(mut g) => {
                let refused = g.add_all(&items);
                (Partition::Graph(g), refused)
            }
            Err(e) => {
                tracing::warn!(error = %e, "cache graph not made; its scope stays an exact scan");
                (Partition::Flat(items), Vec::new())
            }
        }
    }

    /// Removes an entry; answers its metadata if it was there.
    pub fn remove(&mut self, id: EntryId) -> Option<EntryMeta> {
        let meta = self.entries.remove(&id)?;
        let mut empty = false;
        if let Some(p) = self.scopes.get_mut(&meta.scope) {
            match p {
                Partition::Flat(items) => {
                    items.retain(|(i, _)| *i != id);
                    empty = items.is_empty();
                }
                Partition::Graph(g) => g.remove(id),
            }
        }
        if empty {
            self.scopes.remove(&meta.scope);
        }
        Some(meta)
    }

    /// The `k` living entries of `scope` most similar to `vector`, most similar first, with
    /// their approximate cosine similarity (of the quantised vectors: within about 0.01 of
    /// the exact one).
    pub fn search(&self, scope: &ScopeKey, vector: &[f32], k: usize) -> Vec<(EntryId, f32)> {
        if self.check(vector).is_err() || k == 0 {
            return Vec::new();
        }
        let query = quant::quantise(vector);
        match self.scopes.get(scope) {
            None => Vec::new(),
            Some(Partition::Flat(items)) => {
                let mut scored: Vec<(EntryId, f32)> = items
                    .iter()
                    .map(|(id, v)| (*id, quant::similarity(&query, v)))
                    .collect();
                scored.sort_by(|a, b| b.1.total_cmp(&a.1));
                scored.truncate(k);
                scored
            }
            // A zero vector is similar to nothing (the graph would call two of them equal).
            Some(Partition::Graph(_)) if quant::is_zero(&query) => Vec::new(),
            Some(Partition::Graph(g)) => {
                let components = quant::components(&query);
                // Checked against the stored vector: a print is 64 bits, not the vector.
                let repeat = g.exact.first(quant::fingerprint(components)).filter(|id| {
                    g.vector(*id)
                        .is_some_and(|v| quant::components(&v) == components)
                });
                let mut found: Vec<(EntryId, f32)> =
                    repeat.map(|id| (id, 1.0)).into_iter().collect();
                found.extend(
                    self.graph_search(g, components, k)
                        .into_iter()
                        .filter(|(id, _)| Some(*id) != repeat),
                );
                found.retain(|(id, _)| self.entries.get(id).is_some_and(|m| m.scope == *scope));
                found.truncate(k);
                found
            }
        }
    }

    /// What the graph alone finds (the benches measure its recall without exact repeats).
    fn graph_search(&self, g: &Graph, components: &[i8], k: usize) -> Vec<(EntryId, f32)> {
        match g.vectors.search(components, k) {
            // Tombstones are never returned.
            Ok(found) => found
                .keys
                .into_iter()
                .zip(found.distances)
                .map(|(id, d)| (id, 1.0 - d))
                .collect(),
            Err(e) => {
                tracing::warn!(error = %e, "cache graph search failed");
                Vec::new()
            }
        }
    }

    /// The graph's own answer for `scope`, without the exact-repeat lookup: what the benches
    /// measure recall on. Empty for a scope that is not a graph.
    pub fn search_graph_only(
        &self,
        scope: &ScopeKey,
        vector: &[f32],
        k: usize,
    ) -> Vec<(EntryId, f32)> {
        match self.scopes.get(scope) {
            Some(Partition::Graph(g)) if self.check(vector).is_ok() => {
                let query = quant::quantise(vector);
                self.graph_search(g, quant::components(&query), k)
            }
            _ => Vec::new(),
        }
    }

    /// Entries whose time is up.
    pub fn expired(&self, now_ms: i64) -> Vec<EntryId> {
        self.entries
            .iter()
            .filter(|(_, m)| m.expires_ms <= now_ms)
            .map(|(id, _)| *id)
            .collect()
    }

    /// The `n` least recently used entries.
    pub fn least_recently_used(&self, n: usize) -> Vec<EntryId> {
        let mut all: Vec<(i64, EntryId)> = self
            .entries
            .iter()
            .map(|(id, m)| (m.last_used_ms, *id))
            .collect();
        let n = n.min(all.len());
        if n == 0 {
            return Vec::new();
        }
        all.select_nth_unstable(n - 1);
        all.truncate(n);
        all.into_iter().map(|(_, id)| id).collect()
    }

    /// Rebuilds the graphs where tombstones outnumber living entries (a graph that shrank to
    /// a small scope goes back to an exact scan). Answers how many partitions were rebuilt.
    pub fn compact(&mut self) -> usize {
        let stale: HashMap<ScopeKey, Vec<EntryId>> = self
            .scopes
            .iter()
            .filter(|(_, p)| matches!(p, Partition::Graph(g) if g.tombstones > g.live))
            .map(|(k, _)| (*k, Vec::new()))
            .collect();
        if stale.is_empty() {
            return 0;
        }
        let mut stale = stale;
        for (id, m) in &self.entries {
            if let Some(ids) = stale.get_mut(&m.scope) {
                ids.push(*id);
            }
        }
        let rebuilt = stale.len();
        for (scope, ids) in stale {
            let Some(Partition::Graph(g)) = self.scopes.remove(&scope) else {
                continue;
            };
            let mut items = Vec::with_capacity(ids.len());
            let mut lost = Vec::new();
            for id in ids {
                match g.vector(id) {
                    Some(v) => items.push((id, v)),
                    None => lost.push(id),
                }
            }
            drop(g);
            for id in lost {
                self.entries.remove(&id);
            }
            if !items.is_empty() {
                let metas = Vec::new();
                self.add_scopes(HashMap::from([(scope, items)]), metas);
            }
        }
        rebuilt
    }
}

impl Graph {
    /// An empty graph for `dim`-dimension vectors, with room for `room` entries.
    fn new(dim: usize, room: usize, ef_search: usize) -> Result<Self, String> {
        let options = usearch::IndexOptions {
            dimensions: dim,
            metric: usearch::MetricKind::Cos,
            quantization: usearch::ScalarKind::I8,
            connectivity: MAX_CONNECTIONS,
            expansion_add: EF_CONSTRUCTION,
            expansion_search: ef_search,
            multi: false,
        };
        let vectors = usearch::Index::new(&options).map_err(|e| e.to_string())?;
        let threads = threads();
        vectors
            .reserve_capacity_and_threads(room.max(FIRST_ROOM), threads)
            .map_err(|e| e.to_string())?;
        Ok(Self {
            vectors,
            exact: Repeats::default(),
            threads,
            live: 0,
            tombstones: 0,
            dumped: None,
        })
    }

    /// Room for `more` entries beyond what the graph holds (tombstones are reused first).
    fn make_room(&mut self, more: usize) -> Result<(), String> {
        let need = (self.live + more).max(self.live + self.tombstones);
        if need > self.vectors.capacity() {
            let room = need.max(self.vectors.capacity() * 2);
            self.vectors
                .reserve_capacity_and_threads(room, self.threads)
                .map_err(|e| e.to_string())?;
        }
        Ok(())
    }

    fn add(&mut self, id: EntryId, vector: &[i8]) -> Result<(), String> {
        self.make_room(1)?;
        let components = quant::components(vector);
        self.vectors
            .add(id, components)
            .map_err(|e| e.to_string())?;
        self.exact.add(quant::fingerprint(components), id);
        self.added(1);
        Ok(())
    }

    fn added(&mut self, n: usize) {
        if n > 0 {
            self.tombstones = self.tombstones.saturating_sub(n);
            self.live += n;
            self.dumped = None;
        }
    }

    /// Adds `items`, on several threads when they are many; answers the ids it refused.
    fn add_all(&mut self, items: &[(EntryId, Vec<i8>)]) -> Vec<EntryId> {
        if let Err(e) = self.make_room(items.len()) {
            tracing::warn!(error = %e, "cache graph could not grow");
            return items.iter().map(|(id, _)| *id).collect();
        }
        let threads = self.threads;
        let refused: Vec<EntryId> = if items.len() < PARALLEL_FROM || threads == 1 {
            items
                .iter()
                .filter(|(id, v)| self.vectors.add(*id, quant::components(v)).is_err())
                .map(|(id, _)| *id)
                .collect()
        } else {
            let vectors = &self.vectors;
            let share = items.len().div_ceil(threads);
            std::thread::scope(|s| {
                let workers: Vec<_> = items
                    .chunks(share)
                    .map(|chunk| {
                        let worker = s.spawn(move || {
                            chunk
                                .iter()
                                .filter(|(id, v)| vectors.add(*id, quant::components(v)).is_err())
                                .map(|(id, _)| *id)
                                .collect::<Vec<_>>()
                        });
                        (chunk, worker)
                    })
                    .collect();
                workers
                    .into_iter()
                    .flat_map(|(chunk, worker)| {
                        // A worker that panicked: what it did not add is refused.
                        worker.join().unwrap_or_else(|_| {
                            chunk
                                .iter()
                                .filter(|(id, _)| !vectors.contains(*id))
                                .map(|(id, _)| *id)
                                .collect()
                        })
                    })
                    .collect()
            })
        };
        self.added(items.len() - refused.len());
        let refused_set: std::collections::HashSet<EntryId> = refused.iter().copied().collect();
        self.exact.reserve(items.len());
        for (id, v) in items.iter().filter(|(id, _)| !refused_set.contains(id)) {
            self.exact
                .add(quant::fingerprint(quant::components(v)), *id);
        }
        refused
    }

    fn remove(&mut self, id: EntryId) {
        if let Some(v) = self.vector(id) {
            self.exact
                .remove(quant::fingerprint(quant::components(&v)), id);
        }
        if matches!(self.vectors.remove(id), Ok(n) if n > 0) {
            self.live = self.live.saturating_sub(1);
            self.tombstones += 1;
            self.dumped = None;
        }
    }

    /// An entry's quantised vector, as [`quant::quantise`] made it.
    fn vector(&self, id: EntryId) -> Option<Vec<i8>> {
        let mut v = vec![0i8; self.vectors.dimensions()];
        match self.vectors.get(id, &mut v) {
            Ok(1) => Some(quant::with_tail(v)),
            _ => None,
        }
    }
}

/// Entries by their vector's fingerprint. Most prints have one entry; the few that have more
/// (the same question stored twice) keep the others aside, so removing one leaves the rest
/// findable.
#[derive(Default)]
struct Repeats {
    first: HashMap<u64, EntryId>,
    more: HashMap<u64, Vec<EntryId>>,
}

impl Repeats {
    fn add(&mut self, print: u64, id: EntryId) {
        if let Some(old) = self.first.insert(print, id) {
            if old != id {
                self.more.entry(print).or_default().push(old);
            }
        }
    }

    fn remove(&mut self, print: u64, id: EntryId) {
        if self.first.get(&print) == Some(&id) {
            match self.more.get_mut(&print).and_then(Vec::pop) {
                Some(next) => {
                    self.first.insert(print, next);
                }
                None => {
                    self.first.remove(&print);
                }
            }
        } else if let Some(others) = self.more.get_mut(&print) {
            others.retain(|o| *o != id);
        }
        if self.more.get(&print).is_some_and(Vec::is_empty) {
            self.more.remove(&print);
        }
    }

    fn first(&self, print: u64) -> Option<EntryId> {
        self.first.get(&print).copied()
    }

    fn reserve(&mut self, n: usize) {
        self.first.reserve(n);
    }
}

/// Threads a large graph is built on.
fn threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get().min(8))
}

#[cfg(test)]
mod tests {
    use super::dump::MANIFEST as MANIFEST_NAME;
    use super::*;
    use crate::cache::embed::{Builtin, DIM};

    fn meta(scope: u8) -> EntryMeta {
        EntryMeta {
            scope: [scope; 16],
            expires_ms: 1_000,
            last_used_ms: 0,
        }
    }

    fn questions(n: usize) -> Vec<String> {
        (0..n)
            .map(|i| {
                format!(
                    "question number {i} about topic {} and item {}",
                    i % 97,
                    i * 7
                )
            })
            .collect()
    }

    /// How many of `ids` are found first when their own question is asked.
    fn found_first(
        index: &Index,
        scope: u8,
        qs: &[String],
        ids: impl Iterator<Item = usize>,
    ) -> usize {
        ids.filter(|&i| {
            let top = index.search(&[scope; 16], &Builtin::vector(&qs[i]), 1);
            top.first().map(|t| t.0) == Some(i as u64)
        })
        .count()
    }

    #[test]
    fn scopes_never_mix_and_removal_is_immediate() {
        let mut index = Index::new(DIM);
        let q = "What is the capital of France?";
        index
            .insert(1, meta(1), &Builtin::vector(q))
            .expect("insert"); // ok: test
        let v = Builtin::vector("what's the capital of france");
        let found = index.search(&[1; 16], &v, 3);
        assert_eq!(found.len(), 1);
        assert!(found[0].1 > 0.9);
        assert!(index.search(&[2; 16], &v, 3).is_empty());
        assert_eq!(index.remove(1), Some(meta(1)));
        assert!(index.search(&[1; 16], &v, 3).is_empty());
        assert!(index.is_empty());
        assert_eq!(
            index.insert(2, meta(1), &[0.0; 3]),
            Err(IndexError::Dimensions { got: 3, want: DIM })
        );
    }

    #[test]
    fn a_large_scope_moves_to_a_graph_that_finds_its_entries() {
        let mut index = Index::with_graph_at(DIM, 32);
        let qs = questions(300);
        for (i, q) in qs.iter().enumerate() {
            index
                .insert(i as u64, meta(7), &Builtin::vector(q))
                .expect("insert"); // ok: test
        }
        // These questions differ only in their numbers: under the builtin embedder every two
        // are about as far apart, where HNSW loses points. Exact repeats are found all the same.
        assert_eq!(found_first(&index, 7, &qs, 0..300), 300);
        // Tombstones: removed entries never come back, and compaction rebuilds.
        for i in 0..200u64 {
            index.remove(i);
        }
        assert_eq!(index.tombstones(), 200);
        let top = index.search(&[7; 16], &Builtin::vector(&qs[5]), 5);
        assert!(top.iter().all(|(id, _)| *id >= 200), "{top:?}");
        assert_eq!(index.compact(), 1);
        assert_eq!(index.tombstones(), 0);
        assert_eq!(index.len(), 100);
        let top = index.search(&[7; 16], &Builtin::vector(&qs[250]), 1);
        assert_eq!(top.first().map(|t| t.0), Some(250));
    }

    #[test]
    fn the_graph_alone_finds_templated_questions() {
        let mut index = Index::with_graph_at(DIM, 32);
        let qs: Vec<String> = (0..2000)
            .map(|i| {
                format!(
                    "What is the {} of place number {} in {}?",
                    i % 7,
                    i,
                    1900 + i
                )
            })
            .collect();
        for (i, q) in qs.iter().enumerate() {
            index
                .insert(i as u64, meta(7), &Builtin::vector(q))
                .expect("insert"); // ok: test
        }
        let found = qs
            .iter()
            .enumerate()
            .filter(|(i, q)| {
                let top = index.search_graph_only(&[7; 16], &Builtin::vector(q), 1);
                top.first().map(|t| t.0) == Some(*i as u64)
            })
            .count();
        assert!(found >= 1900, "graph recall@1 {found}/2000");
        // A question near an entry (not a repeat) is answered by the graph.
        let near = index.search(
            &[7; 16],
            &Builtin::vector("what is the 3 of place number 10 in 1910"),
            1,
        );
        assert_eq!(near.first().map(|t| t.0), Some(10));
    }

    #[test]
    fn repeats_keep_every_entry_of_a_print() {
        let mut r = Repeats::default();
        r.add(7, 1);
        r.add(7, 2);
        r.add(7, 3);
        assert_eq!(r.first(7), Some(3));
        r.remove(7, 3);
        assert_eq!(r.first(7), Some(2));
        r.remove(7, 1);
        assert_eq!(r.first(7), Some(2));
        r.remove(7, 2);
        assert_eq!(r.first(7), None);
        assert!(r.more.is_empty());
        // Re-adding the same id is no duplicate.
        r.add(8, 4);
        r.add(8, 4);
        r.remove(8, 4);
        assert_eq!(r.first(8), None);
    }

    #[test]
    fn empty_vectors_are_refused() {
        let mut index = Index::new(0);
        assert!(index.insert(1, meta(1), &[]).is_err());
        assert!(index.bulk_load(vec![(2, meta(1), Vec::new())]) == 0);
        assert!(index.search(&[1; 16], &[], 1).is_empty());
    }

    #[test]
    fn bulk_load_expiry_and_lru() {
        let mut index = Index::with_graph_at(DIM, 16);
        let qs = questions(40);
        let items = qs
            .iter()
            .enumerate()
            .map(|(i, q)| {
                let mut m = meta(if i < 30 { 1 } else { 2 });
                m.expires_ms = i as i64;
                m.last_used_ms = 100 - i as i64;
                (i as u64, m, Builtin::vector(q))
            })
            // An id twice (scope 1 is a graph): loaded once, and found.
            .chain([(3, meta(1), Builtin::vector(&qs[3]))])
            .collect();
        assert_eq!(index.bulk_load(items), 40);
        assert_eq!(index.len(), 40);
        let top = index.search(&[1; 16], &Builtin::vector(&qs[3]), 1);
        assert_eq!(top.first().map(|t| t.0), Some(3));
        assert_eq!(
            index
                .search_graph_only(&[1; 16], &Builtin::vector(&qs[3]), 1)
                .len(),
            1
        );
        let mut expired = index.expired(5);
        expired.sort_unstable();
        assert_eq!(expired, vec![0, 1, 2, 3, 4, 5]);
        let mut lru = index.least_recently_used(3);
        lru.sort_unstable();
        assert_eq!(lru, vec![37, 38, 39]);
    }

    /// Scope 7 with entries 0..300 in a graph, scope 1 with 10 flat entries (ids 1000..),
    /// dumped into `dir`.
    fn dumped(dir: &std::path::Path, qs: &[String]) -> Index {
        let mut index = Index::with_graph_at(DIM, 32);
        let items = (0..300)
            .map(|i| (i as u64, meta(7), Builtin::vector(&qs[i])))
            .chain((0..10).map(|i| (1000 + i as u64, meta(1), Builtin::vector(&qs[i]))))
            .collect();
        assert_eq!(index.bulk_load(items), 310);
        let report = index.dump(dir, "builtin").expect("dump"); // ok: test
        assert_eq!((report.graphs, report.written, report.failed), (1, 1, 0));
        index
    }

    /// What storage would hand a restore: `ids` of scope 7, the flat scope 1, and a reader
    /// of their vectors.
    #[allow(clippy::type_complexity)]
    fn stored(
        qs: &[String],
        ids: impl Iterator<Item = usize>,
    ) -> (
        Vec<(EntryId, EntryMeta)>,
        impl FnMut(EntryId) -> Option<Vec<f32>> + '_,
    ) {
        let entries = ids
            .map(|i| (i as u64, meta(7)))
            .chain((0..10).map(|i| (1000 + i as u64, meta(1))))
            .collect();
        let read = |id: EntryId| {
            let i = if id >= 1000 { id - 1000 } else { id } as usize;
            qs.get(i).map(|q| Builtin::vector(q))
        };
        (entries, read)
    }

    #[test]
    fn a_dumped_graph_reloads_and_is_reconciled_with_storage() {
        let dir = tempfile::tempdir().expect("tempdir"); // ok: test
        let qs = questions(360);
        let mut before = dumped(dir.path(), &qs);
        // Since the dump, entries 0..50 were removed and 300..340 stored.
        let (entries, mut read) = stored(&qs, 50..340);
        let mut index = Index::with_graph_at(DIM, 32);
        let report = index.restore(dir.path(), "builtin", entries, &mut read);
        assert!(report.problems.is_empty(), "{report:?}");
        assert_eq!(
            (
                report.reloaded,
                report.tombstones,
                report.inserted,
                report.rebuilt
            ),
            (1, 50, 40, 10)
        );
        assert_eq!((report.entries, index.len()), (300, 300));
        // Two entries of one question: removing one leaves the other found as a repeat.
        let twice = Builtin::vector(&qs[345]);
        index.insert(2000, meta(7), &twice).expect("insert"); // ok: test
        index.insert(2001, meta(7), &twice).expect("insert"); // ok: test
        index.remove(2001);
        assert_eq!(
            index.search(&[7; 16], &twice, 1).first().map(|t| t.0),
            Some(2000)
        );
        index.remove(2000);
        // The 40 inserted took the nodes of 40 of the 50 removed.
        assert_eq!(index.tombstones(), 10);
        // Removed entries are tombstones: never found, even by their own question.
        for q in &qs[..50] {
            let top = index.search(&[7; 16], &Builtin::vector(q), 4);
            assert!(top.iter().all(|(id, _)| *id >= 50), "{top:?}");
        }
        let found = found_first(&index, 7, &qs, 50..340);
        assert!(found >= 280, "recall after reload {found}/290");
        let top = index.search(&[1; 16], &Builtin::vector(&qs[3]), 1);
        assert_eq!(top.first().map(|t| t.0), Some(1003));
        // Dumping again writes the changed graph only once, and the old files go.
        let again = index.dump(dir.path(), "builtin").expect("dump"); // ok: test
        assert_eq!((again.graphs, again.written), (1, 1));
        let unchanged = index.dump(dir.path(), "builtin").expect("dump"); // ok: test
        assert_eq!((unchanged.graphs, unchanged.written), (1, 0));
        let files = std::fs::read_dir(dir.path()).expect("dir").count(); // ok: test
        assert_eq!(files, 3, "a manifest and one graph's two files");
        // The first index's graph is gone from disk; it could still dump itself.
        let dumped = before.dump(dir.path(), "builtin").expect("dump"); // ok: test
        assert_eq!(dumped.written, 1);
    }

    #[test]
    fn a_graph_reloaded_unchanged_is_not_written_again() {
        let dir = tempfile::tempdir().expect("tempdir"); // ok: test
        let qs = questions(300);
        dumped(dir.path(), &qs);
        let (entries, mut read) = stored(&qs, 0..300);
        let mut index = Index::with_graph_at(DIM, 32);
        let report = index.restore(dir.path(), "builtin", entries, &mut read);
        assert_eq!(
            (report.reloaded, report.inserted, report.tombstones),
            (1, 0, 0)
        );
        let again = index.dump(dir.path(), "builtin").expect("dump"); // ok: test
        assert_eq!((again.graphs, again.written), (1, 0));
    }

    /// Restores from `dir` after `spoil` changed it: everything is built from storage.
    fn restored_after(spoil: impl FnOnce(&std::path::Path)) -> Restored {
        let dir = tempfile::tempdir().expect("tempdir"); // ok: test
        let qs = questions(300);
        dumped(dir.path(), &qs);
        spoil(dir.path());
        let (entries, mut read) = stored(&qs, 0..300);
        let mut index = Index::with_graph_at(DIM, 32);
        let report = index.restore(dir.path(), "builtin", entries, &mut read);
        assert_eq!(
            (report.reloaded, report.rebuilt, index.len()),
            (0, 310, 310)
        );
        let found = found_first(&index, 7, &qs, 0..300);
        assert!(found >= 285, "recall after rebuild {found}/300");
        report
    }

    fn graph_file(dir: &std::path::Path) -> std::path::PathBuf {
        std::fs::read_dir(dir)
            .expect("dir") // ok: test
            .flatten()
            .map(|e| e.path())
            .find(|p| p.to_string_lossy().ends_with(".usearch"))
            .expect("graph file") // ok: test
    }

    #[test]
    fn a_bad_dump_falls_back_to_a_rebuild() {
        // An altered graph file (same length).
        let report = restored_after(|dir| {
            let path = graph_file(dir);
            let mut raw = std::fs::read(&path).expect("read"); // ok: test
            let at = raw.len() / 2;
            raw[at] ^= 0xff;
            std::fs::write(&path, raw).expect("write"); // ok: test
        });
        assert!(report.problems[0].contains("checksum"), "{report:?}");
        // A missing keys file.
        let report = restored_after(|dir| {
            let keys = graph_file(dir).with_extension("keys");
            std::fs::remove_file(keys).expect("rm"); // ok: test
        });
        assert_eq!(report.problems.len(), 1, "{report:?}");
        // A corrupt manifest, and one of another embedder.
        let report = restored_after(|dir| {
            let manifest = dir.join(MANIFEST_NAME);
            std::fs::write(manifest, b"{\"format\":1,").expect("write"); // ok: test
        });
        assert!(report.problems[0].contains("corrupt"), "{report:?}");
        let report = restored_after(|dir| {
            let path = dir.join(MANIFEST_NAME);
            let raw = std::fs::read_to_string(&path).expect("read"); // ok: test
            let other = raw.replace("builtin", "other");
            std::fs::write(&path, other).expect("write"); // ok: test
        });
        assert!(report.problems[0].contains("not builtin"), "{report:?}");
        // A truncated graph file whose manifest was made to match: usearch itself fails
        // reading it, and nothing else happens.
        let report = restored_after(|dir| {
            let path = graph_file(dir);
            let mut raw = std::fs::read(&path).expect("read"); // ok: test
            raw.truncate(raw.len() / 2);
            std::fs::write(&path, &raw).expect("write"); // ok: test
            let manifest = dir.join(MANIFEST_NAME);
            let text = std::fs::read_to_string(&manifest).expect("read"); // ok: test
            let mut m: serde_json::Value = serde_json::from_str(&text).expect("json"); // ok: test
            let file = &mut m["graphs"][0]["files"][0];
            file["len"] = raw.len().into();
            file["sha256"] = hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&raw)).into();
            std::fs::write(&manifest, m.to_string()).expect("write"); // ok: test
        });
        assert_eq!(report.problems.len(), 1, "{report:?}");
        // No dump at all is no problem.
        let report = restored_after(|dir| {
            std::fs::remove_file(dir.join(MANIFEST_NAME)).expect("rm"); // ok: test
        });
        assert!(report.problems.is_empty(), "{report:?}");
    }
}
