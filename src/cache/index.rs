//! The in-memory similarity index, partitioned by scope.
//!
//! A hit needs the same scope (tenant, route, system prompt, preceding context) before any
//! similarity counts, so the index keeps one partition per scope and never searches across
//! them. Most scopes are small (the entries of one context); they are scanned exactly. A scope
//! that grows past [`Index::graph_at`] entries (typically the first turns of one route and
//! tenant) moves into its own HNSW graph (hnsw_rs).
//!
//! hnsw_rs cannot delete points: a removed entry of a graph stays in it as a tombstone —
//! filtered out of search results, since only entries still in the index are eligible — until
//! [`Index::compact`] rebuilds graphs where tombstones outnumber the living.
//!
//! Not thread-safe by design: one worker thread owns it (see `service.rs`).

use std::collections::HashMap;

use hnsw_rs::prelude::{Distance, Hnsw};

pub type EntryId = u64;
pub type ScopeKey = [u8; 16];

/// HNSW parameters: links per node, layers, construction and search breadth.
const MAX_CONNECTIONS: usize = 16;
const MAX_LAYERS: usize = 16;
const EF_CONSTRUCTION: usize = 100;
const EF_SEARCH: usize = 64;

/// Cosine distance of unit vectors, clamped (rounding can put a dot product above 1).
#[derive(Debug, Default, Clone, Copy)]
pub struct UnitCosine;

impl Distance<f32> for UnitCosine {
    fn eval(&self, va: &[f32], vb: &[f32]) -> f32 {
        (1.0 - super::embed::cosine(va, vb)).max(0.0)
    }
}

/// What the index keeps of an entry besides its vector.
#[derive(Debug, Clone, PartialEq)]
pub struct EntryMeta {
    pub scope: ScopeKey,
    pub question: String,
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

struct Graph {
    hnsw: Hnsw<'static, f32, UnitCosine>,
    /// Points in the graph, tombstones included.
    points: usize,
    live: usize,
}

enum Partition {
    Flat(Vec<(EntryId, Vec<f32>)>),
    Graph(Graph),
}

/// The index: entries' metadata and one partition per scope.
pub struct Index {
    dim: usize,
    graph_at: usize,
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
            entries: HashMap::new(),
            scopes: HashMap::new(),
        }
    }

    pub fn graph_at(&self) -> usize {
        self.graph_at
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
        vector: Vec<f32>,
    ) -> Result<(), IndexError> {
        self.check(&vector)?;
        self.remove(id);
        let scope = meta.scope;
        let graph_at = self.graph_at;
        let partition = self
            .scopes
            .entry(scope)
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
            }
        }
        // Known only once its partition holds it (a panic above leaves no half entry).
        self.entries.insert(id, meta);
        Ok(())
    }

    /// Loads many entries at once (start-up): each scope is built in one go, graphs with
    /// parallel insertion.
    pub fn bulk_load(&mut self, items: Vec<(EntryId, EntryMeta, Vec<f32>)>) -> usize {
        let mut by_scope: HashMap<ScopeKey, Vec<(EntryId, Vec<f32>)>> = HashMap::new();
        let mut loaded = 0;
        for (id, meta, vector) in items {
            if self.check(&vector).is_err() || self.entries.contains_key(&id) {
                continue;
            }
            by_scope.entry(meta.scope).or_default().push((id, vector));
            self.entries.insert(id, meta);
            loaded += 1;
        }
        for (scope, items) in by_scope {
            match self.scopes.remove(&scope) {
                None if items.len() <= self.graph_at => {
                    self.scopes.insert(scope, Partition::Flat(items));
                }
                None => {
                    self.scopes
                        .insert(scope, Partition::Graph(build_graph(&items)));
                }
                Some(existing) => {
                    // Rare (bulk loading into a scope that has entries): insert one by one.
                    self.scopes.insert(scope, existing);
                    for (id, v) in items {
                        if let Some(meta) = self.entries.remove(&id) {
                            let _ = self.insert(id, meta, v);
                        }
                    }
                }
            }
        }
        loaded
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
    /// their cosine similarity.
    pub fn search(&self, scope: &ScopeKey, vector: &[f32], k: usize) -> Vec<(EntryId, f32)> {
        if self.check(vector).is_err() || k == 0 {
            return Vec::new();
        }
        match self.scopes.get(scope) {
            None => Vec::new(),
            Some(Partition::Flat(items)) => {
                let mut scored: Vec<(EntryId, f32)> = items
                    .iter()
                    .map(|(id, v)| (*id, super::embed::cosine(vector, v)))
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
                    .search(vector, room, EF_SEARCH.max(room))
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
            let items: Vec<(EntryId, Vec<f32>)> = g
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

fn build_graph(items: &[(EntryId, Vec<f32>)]) -> Graph {
    let mut hnsw = Hnsw::new(
        MAX_CONNECTIONS,
        items.len().max(1024),
        MAX_LAYERS,
        EF_CONSTRUCTION,
        UnitCosine,
    );
    // Cache entries cluster (the same question with other numbers or names); without extended
    // candidates, points inserted one by one among near-equal neighbours end up unreachable
    // (a third of them in the unit test below).
    hnsw.set_extend_candidates(true);
    let refs: Vec<(&Vec<f32>, usize)> = items.iter().map(|(id, v)| (v, *id as usize)).collect();
    hnsw.parallel_insert(&refs);
    Graph {
        hnsw,
        points: items.len(),
        live: items.len(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::embed::Builtin;

    fn meta(scope: u8, question: &str) -> EntryMeta {
        EntryMeta {
            scope: [scope; 16],
            question: question.into(),
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

    #[test]
    fn scopes_never_mix_and_removal_is_immediate() {
        let mut index = Index::new(crate::cache::embed::DIM);
        let q = "What is the capital of France?";
        index
            .insert(1, meta(1, q), Builtin::vector(q))
            .expect("insert"); // ok: test
        let v = Builtin::vector("what's the capital of france");
        let found = index.search(&[1; 16], &v, 3);
        assert_eq!(found.len(), 1);
        assert!(found[0].1 > 0.9);
        assert!(index.search(&[2; 16], &v, 3).is_empty());
        assert_eq!(index.remove(1).map(|m| m.question), Some(q.to_owned()));
        assert!(index.search(&[1; 16], &v, 3).is_empty());
        assert!(index.is_empty());
        assert_eq!(
            index.insert(2, meta(1, q), vec![0.0; 3]),
            Err(IndexError::Dimensions {
                got: 3,
                want: crate::cache::embed::DIM
            })
        );
    }

    #[test]
    fn a_large_scope_moves_to_a_graph_that_finds_its_entries() {
        let mut index = Index::with_graph_at(crate::cache::embed::DIM, 32);
        let qs = questions(300);
        for (i, q) in qs.iter().enumerate() {
            index
                .insert(i as u64, meta(7, q), Builtin::vector(q))
                .expect("insert"); // ok: test
        }
        let mut found = 0;
        for (i, q) in qs.iter().enumerate() {
            let top = index.search(&[7; 16], &Builtin::vector(q), 1);
            if top.first().map(|t| t.0) == Some(i as u64) {
                found += 1;
            }
        }
        // Approximate search (its parallel build varies from run to run): 95% at least.
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
        let mut index = Index::with_graph_at(crate::cache::embed::DIM, 16);
        let qs = questions(40);
        let items = qs
            .iter()
            .enumerate()
            .map(|(i, q)| {
                let mut m = meta(if i < 30 { 1 } else { 2 }, q);
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
}
