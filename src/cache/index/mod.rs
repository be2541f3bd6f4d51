//! The in-memory similarity index, partitioned by scope.
//!
//! A hit needs the same scope (tenant, route, system prompt, preceding context) before any
//! similarity counts, so the index keeps one partition per scope and never searches across
//! them. Most scopes are small (the entries of one context); they are scanned exactly. A scope
//! that grows past [`Index::graph_at`] entries (typically the first turns of one route and
//! tenant) moves into its own HNSW graph (hnsw_rs).
//!
//! Memory is what limits a scope's size, so the index keeps per entry only what a search
//! needs: its vector quantised to 8 bits ([`quant`]), its graph links, and its scope and times
//! ([`EntryMeta`]). The question, the reply and the exact vector stay in storage: similarities
//! the index answers are approximate, and the service reads an entry back (exact vector
//! included) before it decides on a hit.
//!
//! hnsw_rs cannot delete points: a removed entry of a graph stays in it as a tombstone —
//! filtered out of search results, since only entries still in the index are eligible — until
//! [`Index::compact`] rebuilds graphs where tombstones outnumber the living.
//!
//! Graphs are dumped to files and reloaded at start ([`dump`]), so a large scope is not built
//! again point by point at every start.
//!
//! Not thread-safe by design: one worker thread owns it (see `service.rs`).

mod dump;
pub mod quant;

use std::collections::HashMap;

use hnsw_rs::prelude::Hnsw;

pub use dump::{DumpError, Dumped, Restored};
use quant::QuantisedCosine;

pub type EntryId = u64;
pub type ScopeKey = [u8; 16];

/// HNSW parameters: links per node, layers, construction and search breadth.
const MAX_CONNECTIONS: usize = 16;
const MAX_LAYERS: usize = 16;
const EF_CONSTRUCTION: usize = 100;
const EF_SEARCH: usize = 64;
/// Graphs get this many points at once in parallel; fewer one by one (hnsw_rs's threads race
/// while linking, which costs a small graph a few percent of its recall for no gain in time).
const PARALLEL_FROM: usize = 10_000;

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
}

type Vectors = Hnsw<'static, i8, QuantisedCosine>;

struct Graph {
    hnsw: Vectors,
    /// Points in the graph, tombstones included.
    points: usize,
    live: usize,
    /// Where the graph was last dumped, while no point has been added since.
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
                Partition::Graph(g) => g.points - g.live,
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
        if vector.len() != self.dim {
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
    /// A vector of the wrong dimension or with non-finite values.
    pub fn insert(
        &mut self,
        id: EntryId,
        meta: EntryMeta,
        vector: &[f32],
    ) -> Result<(), IndexError> {
        self.check(vector)?;
        self.remove(id);
        let vector = quant::quantise(vector);
        let graph_at = self.graph_at;
        let partition = self
            .scopes
            .entry(meta.scope)
            .or_insert_with(|| Partition::Flat(Vec::new()));
        match partition {
            Partition::Flat(items) => {
                items.push((id, vector));
                if items.len() > graph_at {
                    let items = std::mem::take(items);
                    *partition = Partition::Graph(build_graph(&items));
                }
            }
            Partition::Graph(g) => {
                g.hnsw.insert((&vector, id as usize));
                g.points += 1;
                g.live += 1;
                g.dumped = None;
            }
        }
        // Known only once its partition holds it (a panic above leaves no half entry).
        self.entries.insert(id, meta);
        Ok(())
    }

    /// Loads many entries at once (start-up): each scope is built in one go, graphs with
    /// parallel insertion.
    pub fn bulk_load(&mut self, items: Vec<(EntryId, EntryMeta, Vec<f32>)>) -> usize {
        let mut by_scope: HashMap<ScopeKey, Vec<(EntryId, Vec<i8>)>> = HashMap::new();
        let mut metas = Vec::with_capacity(items.len());
        for (id, meta, vector) in items {
            if self.check(&vector).is_err() || self.entries.contains_key(&id) {
                continue;
            }
            // Quantised as it comes, so the f32 vectors go one by one.
            by_scope
                .entry(meta.scope)
                .or_default()
                .push((id, quant::quantise(&vector)));
            metas.push((id, meta));
        }
        let loaded = metas.len();
        self.add_scopes(by_scope, metas);
        loaded
    }

    /// Adds quantised entries grouped by scope, with their metadata.
    fn add_scopes(
        &mut self,
        by_scope: HashMap<ScopeKey, Vec<(EntryId, Vec<i8>)>>,
        metas: Vec<(EntryId, EntryMeta)>,
    ) {
        self.entries.extend(metas);
        for (scope, items) in by_scope {
            match self.scopes.remove(&scope) {
                None if items.len() <= self.graph_at => {
                    self.scopes.insert(scope, Partition::Flat(items));
                }
                None => {
                    self.scopes
                        .insert(scope, Partition::Graph(build_graph(&items)));
                }
                Some(Partition::Flat(mut existing)) => {
                    existing.extend(items);
                    let partition = if existing.len() <= self.graph_at {
                        Partition::Flat(existing)
                    } else {
                        Partition::Graph(build_graph(&existing))
                    };
                    self.scopes.insert(scope, partition);
                }
                Some(Partition::Graph(mut g)) => {
                    add_to_graph(&mut g, &items);
                    self.scopes.insert(scope, Partition::Graph(g));
                }
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
                // The point stays in the graph as a tombstone.
                Partition::Graph(g) => g.live = g.live.saturating_sub(1),
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
            Some(Partition::Graph(g)) => {
                // hnsw_rs's own filtered search can empty its result heap and panic when
                // every near point is filtered out; search unfiltered with room for
                // tombstones (compaction keeps them fewer than the living) and filter here.
                let room = k + (g.points - g.live).min(4 * k + 16);
                g.hnsw
                    .search(&query, room, self.ef_search.max(room))
                    .into_iter()
                    .map(|n| (n.d_id as u64, 1.0 - n.distance))
                    .filter(|(id, _)| self.entries.get(id).is_some_and(|m| m.scope == *scope))
                    .take(k)
                    .collect()
            }
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
        let stale: Vec<ScopeKey> = self
            .scopes
            .iter()
            .filter(|(_, p)| matches!(p, Partition::Graph(g) if g.points - g.live > g.live))
            .map(|(k, _)| *k)
            .collect();
        for scope in &stale {
            let Some(Partition::Graph(g)) = self.scopes.remove(scope) else {
                continue;
            };
            let items: Vec<(EntryId, Vec<i8>)> = g
                .hnsw
                .get_point_indexation()
                .into_iter()
                .map(|p| (p.get_origin_id() as u64, p.get_v().to_vec()))
                .filter(|(id, _)| self.entries.get(id).is_some_and(|m| m.scope == *scope))
                .collect();
            if items.is_empty() {
                continue;
            }
            let partition = if items.len() <= self.graph_at {
                Partition::Flat(items)
            } else {
                Partition::Graph(build_graph(&items))
            };
            self.scopes.insert(*scope, partition);
        }
        stale.len()
    }
}

fn build_graph(items: &[(EntryId, Vec<i8>)]) -> Graph {
    let mut hnsw = Hnsw::new(
        MAX_CONNECTIONS,
        items.len().max(1024),
        MAX_LAYERS,
        EF_CONSTRUCTION,
        QuantisedCosine,
    );
    // Cache entries cluster (the same question with other numbers or names); without extended
    // candidates, points inserted one by one among near-equal neighbours end up unreachable
    // (a third of them in the unit test below).
    hnsw.set_extend_candidates(true);
    let mut g = Graph {
        hnsw,
        points: 0,
        live: 0,
        dumped: None,
    };
    add_to_graph(&mut g, items);
    g
}

fn add_to_graph(g: &mut Graph, items: &[(EntryId, Vec<i8>)]) {
    if items.len() < PARALLEL_FROM {
        for (id, v) in items {
            g.hnsw.insert((v, *id as usize));
        }
    } else {
        let refs: Vec<(&Vec<i8>, usize)> = items.iter().map(|(id, v)| (v, *id as usize)).collect();
        g.hnsw.parallel_insert(&refs);
    }
    g.points += items.len();
    g.live += items.len();
    g.dumped = None;
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
        // Approximate search (its parallel build varies from run to run): 95% at least.
        let found = found_first(&index, 7, &qs, 0..300);
        assert!(found >= 285, "recall of exact questions {found}/300");
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
            .collect();
        assert_eq!(index.bulk_load(items), 40);
        assert_eq!(index.len(), 40);
        let top = index.search(&[1; 16], &Builtin::vector(&qs[3]), 1);
        assert_eq!(top.first().map(|t| t.0), Some(3));
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
        assert_eq!(index.tombstones(), 50);
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
            .find(|p| p.to_string_lossy().ends_with(".hnsw.graph"))
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
        // A missing data file.
        let report = restored_after(|dir| {
            let data = graph_file(dir).with_extension("data");
            std::fs::remove_file(data).expect("rm"); // ok: test
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
        // A truncated graph file whose manifest was made to match: hnsw_rs itself fails
        // (or panics) reading it, and nothing else happens.
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
