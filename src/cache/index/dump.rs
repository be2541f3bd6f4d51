//! Graphs on disk, so a start reloads a large scope instead of building it point by point
//! (a million points take minutes to insert, seconds to reload).
//!
//! [`Index::dump`] writes each graph with usearch's `save` (`<basename>.usearch`) and the ids of
//! its living entries (`<basename>.keys`, little-endian u64s; usearch cannot list its keys),
//! then a `manifest.json` naming the files with their length and SHA-256, and
//! only then removes files the new manifest no longer names: a crash at any point leaves the
//! previous manifest and its files, or the new ones. A graph no point was added to since its
//! last dump keeps its files.
//!
//! [`Index::restore`] builds the index of the entries storage holds. A graph whose files match
//! the manifest is reloaded and reconciled with storage: entries stored after the dump are
//! inserted, points whose entry is gone are tombstones. Anything wrong — no manifest, another
//! embedder or dimension, a file missing, truncated or altered, a graph usearch cannot read —
//! means that scope is built from the stored vectors, as if there were no dump. A file is
//! only handed to usearch once its checksum matches (it trusts the lengths it reads).

use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::{EntryId, EntryMeta, Graph, Index, Partition, ScopeKey};

pub(super) const MANIFEST: &str = "manifest.json";
/// Changes whenever what is dumped changes meaning (quantisation, distance, graph library):
/// 1 was hnsw_rs's files.
const FORMAT: u32 = 2;
const EXTENSIONS: [&str; 2] = ["usearch", "keys"];

#[derive(Serialize, Deserialize)]
struct Manifest {
    format: u32,
    /// Whose vectors these are (the embedder's id): another embedder's graph is useless.
    tag: String,
    dim: usize,
    /// The usearch version that wrote the graphs (it checks only its major version).
    #[serde(default)]
    library: String,
    graphs: Vec<DumpedGraph>,
}

/// One dumped graph: its scope, its files, and how many living entries it held.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(super) struct DumpedGraph {
    scope: String,
    basename: String,
    points: usize,
    files: Vec<DumpedFile>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct DumpedFile {
    name: String,
    len: u64,
    sha256: String,
}

#[derive(Debug, thiserror::Error)]
pub enum DumpError {
    #[error("cache index dump failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("cache index manifest not written: {0}")]
    Encode(#[from] serde_json::Error),
}

/// What a dump did.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Dumped {
    /// Graphs in the manifest.
    pub graphs: usize,
    /// Graphs written now (the others had not changed since their last dump).
    pub written: usize,
    /// Graphs that could not be written (logged; they are built again at the next start).
    pub failed: usize,
}

/// What a restore did.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Restored {
    /// Living entries indexed.
    pub entries: usize,
    /// Graphs reloaded from the dump.
    pub reloaded: usize,
    /// Entries stored after the dump, inserted into reloaded graphs.
    pub inserted: usize,
    /// Points of reloaded graphs whose entry is gone.
    pub tombstones: usize,
    /// Entries indexed from their stored vectors (no usable dump for their scope).
    pub rebuilt: usize,
    /// Entries skipped: no stored vector, or one the index refuses.
    pub skipped: usize,
    /// Why a dump or one of its graphs was not used.
    pub problems: Vec<String>,
}

impl Index {
    /// Dumps every graph (flat scopes are rebuilt from storage cheaply) into `dir`, for
    /// vectors of `tag`.
    ///
    /// # Errors
    /// The directory or the manifest cannot be written. A graph that cannot be written is
    /// left out of the manifest, logged and counted.
    pub fn dump(&mut self, dir: &Path, tag: &str) -> Result<Dumped, DumpError> {
        std::fs::create_dir_all(dir)?;
        let mut report = Dumped::default();
        let mut graphs = Vec::new();
        // The living ids of each graph to write, in one pass over the entries.
        let mut keys: HashMap<ScopeKey, Vec<EntryId>> = self
            .scopes
            .iter()
            .filter(|(_, p)| match p {
                Partition::Graph(g) => !g.dumped.as_ref().is_some_and(|d| files_intact(dir, d)),
                Partition::Flat(_) => false,
            })
            .map(|(scope, _)| (*scope, Vec::new()))
            .collect();
        if !keys.is_empty() {
            for (id, meta) in &self.entries {
                if let Some(ids) = keys.get_mut(&meta.scope) {
                    ids.push(*id);
                }
            }
        }
        for (scope, partition) in &mut self.scopes {
            let Partition::Graph(g) = partition else {
                continue;
            };
            let Some(ids) = keys.get(scope) else {
                if let Some(d) = &g.dumped {
                    graphs.push(d.clone());
                }
                continue;
            };
            match dump_graph(dir, scope, g, ids) {
                Ok(d) => {
                    g.dumped = Some(d.clone());
                    graphs.push(d);
                    report.written += 1;
                }
                Err(e) => {
                    tracing::warn!(error = %e, scope = %hex::encode(scope), "cache graph not dumped");
                    report.failed += 1;
                }
            }
        }
        report.graphs = graphs.len();
        let manifest = Manifest {
            format: FORMAT,
            tag: tag.to_owned(),
            dim: self.dim,
            library: usearch::version().to_owned(),
            graphs,
        };
        let tmp = dir.join(format!("{MANIFEST}.tmp"));
        let mut file = std::fs::File::create(&tmp)?;
        file.write_all(&serde_json::to_vec(&manifest)?)?;
        file.sync_all()?;
        std::fs::rename(&tmp, dir.join(MANIFEST))?;
        let keep: HashSet<&str> = manifest
            .graphs
            .iter()
            .flat_map(|g| g.files.iter().map(|f| f.name.as_str()))
            .chain([MANIFEST])
            .collect();
        for entry in std::fs::read_dir(dir)?.flatten() {
            let name = entry.file_name();
            if !name.to_str().is_some_and(|n| keep.contains(n)) {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        Ok(report)
    }

    /// Indexes `entries` (the living entries in storage, with their metadata), reusing the
    /// graphs dumped in `dir` for vectors of `tag` where they are sound; `vector_of` reads an
    /// entry's stored vector, for entries no reloaded graph holds. Never fails: what cannot be
    /// reloaded is built, and the reasons are in [`Restored::problems`].
    pub fn restore(
        &mut self,
        dir: &Path,
        tag: &str,
        entries: Vec<(EntryId, EntryMeta)>,
        vector_of: &mut dyn FnMut(EntryId) -> Option<Vec<f32>>,
    ) -> Restored {
        let mut report = Restored::default();
        let mut by_scope: HashMap<ScopeKey, Vec<(EntryId, EntryMeta)>> = HashMap::new();
        let mut seen = HashSet::with_capacity(entries.len());
        for (id, meta) in entries {
            if !self.entries.contains_key(&id) && seen.insert(id) {
                by_scope.entry(meta.scope).or_default().push((id, meta));
            }
        }
        if by_scope.is_empty() {
            // Nothing stored: whatever was dumped is stale (and the index has no dimension
            // yet to check it against); the next dump replaces it.
            return report;
        }
        let graphs = match read_manifest(dir, tag, self.dim) {
            Ok(graphs) => graphs,
            Err(problem) => {
                report.problems.push(problem);
                Vec::new()
            }
        };
        for dumped in graphs {
            let Some(scope) = scope_of(&dumped.scope) else {
                report
                    .problems
                    .push(format!("bad scope {:?}", dumped.scope));
                continue;
            };
            // A scope that shrank to an exact scan, or that is reloaded already, is built.
            let Some(stored) = by_scope.get(&scope).filter(|s| s.len() > self.graph_at) else {
                continue;
            };
            let (g, held) = match load_graph(dir, &dumped, self.dim, self.ef_search) {
                Ok(loaded) => loaded,
                Err(problem) => {
                    report
                        .problems
                        .push(format!("{}: {problem}", dumped.basename));
                    continue;
                }
            };
            let mut g = g;
            let stored_ids: HashSet<EntryId> = stored.iter().map(|(id, _)| *id).collect();
            // Entries removed since the dump become tombstones.
            let gone: Vec<EntryId> = held.difference(&stored_ids).copied().collect();
            for id in &gone {
                g.remove(*id);
            }
            let (living, added): (Vec<_>, Vec<_>) =
                stored.iter().partition(|(id, _)| held.contains(id));
            // Its files still hold it, unless entries went since (then the next dump
            // writes it again).
            if gone.is_empty() {
                g.dumped = Some(dumped);
            }
            report.reloaded += 1;
            report.tombstones += gone.len();
            let (vectors, metas) = self.quantised(added, vector_of, &mut report);
            report.entries += living.len();
            self.entries.extend(living.into_iter().copied());
            self.scopes.insert(scope, Partition::Graph(g));
            let before = self.entries.len();
            if !vectors.is_empty() {
                self.add_scopes(HashMap::from([(scope, vectors)]), metas);
            }
            report.inserted += self.entries.len() - before;
            report.entries += self.entries.len() - before;
            by_scope.remove(&scope);
        }
        // The rest from their stored vectors.
        let mut rebuilt = HashMap::new();
        let mut all_metas = Vec::new();
        for (scope, stored) in by_scope {
            let (vectors, metas) = self.quantised(stored.iter(), vector_of, &mut report);
            all_metas.extend(metas);
            rebuilt.insert(scope, vectors);
        }
        let before = self.entries.len();
        self.add_scopes(rebuilt, all_metas);
        report.rebuilt = self.entries.len() - before;
        report.entries += report.rebuilt;
        report
    }

    /// The quantised stored vectors of `entries`, and the metadata of those that have one;
    /// entries without a usable vector are counted as skipped.
    #[allow(clippy::type_complexity)]
    fn quantised<'a>(
        &self,
        entries: impl IntoIterator<Item = &'a (EntryId, EntryMeta)>,
        vector_of: &mut dyn FnMut(EntryId) -> Option<Vec<f32>>,
        report: &mut Restored,
    ) -> (Vec<(EntryId, Vec<i8>)>, Vec<(EntryId, EntryMeta)>) {
        let (mut vectors, mut metas) = (Vec::new(), Vec::new());
        for &(id, meta) in entries {
            match vector_of(id).filter(|v| self.check(v).is_ok()) {
                Some(v) => {
                    vectors.push((id, super::quant::quantise(&v)));
                    metas.push((id, meta));
                }
                None => report.skipped += 1,
            }
        }
        (vectors, metas)
    }
}

fn scope_of(hex_scope: &str) -> Option<ScopeKey> {
    hex::decode(hex_scope).ok()?.try_into().ok()
}

/// A name unique to this dump (files of the previous one stay until the manifest moves on).
fn unique_basename(scope: &ScopeKey) -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{}-{now:x}-{n:x}", hex::encode(scope))
}

fn dump_graph(
    dir: &Path,
    scope: &ScopeKey,
    g: &Graph,
    keys: &[EntryId],
) -> Result<DumpedGraph, String> {
    let basename = unique_basename(scope);
    let [graph_ext, keys_ext] = EXTENSIONS;
    let graph = dir.join(format!("{basename}.{graph_ext}"));
    let graph_path = graph
        .to_str()
        .ok_or_else(|| format!("{} is not UTF-8", graph.display()))?;
    g.vectors.save(graph_path).map_err(|e| e.to_string())?;
    let raw: Vec<u8> = keys.iter().flat_map(|k| k.to_le_bytes()).collect();
    let keys_path = dir.join(format!("{basename}.{keys_ext}"));
    std::fs::write(&keys_path, raw).map_err(|e| format!("{}: {e}", keys_path.display()))?;
    let mut files = Vec::new();
    for ext in EXTENSIONS {
        let name = format!("{basename}.{ext}");
        let path = dir.join(&name);
        // Durable before the manifest names it.
        std::fs::File::open(&path)
            .and_then(|f| f.sync_all())
            .map_err(|e| format!("{name}: {e}"))?;
        let (len, sha256) = digest(&path).map_err(|e| format!("{name}: {e}"))?;
        files.push(DumpedFile { name, len, sha256 });
    }
    Ok(DumpedGraph {
        scope: hex::encode(scope),
        basename,
        points: keys.len(),
        files,
    })
}

/// Length and SHA-256 (hex) of a file.
fn digest(path: &Path) -> std::io::Result<(u64, String)> {
    let mut file = std::fs::File::open(path)?;
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut len = 0u64;
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hash.update(&buf[..n]);
        len += n as u64;
    }
    Ok((len, hex::encode(hash.finalize())))
}

/// Whether a dumped graph's files are still there with their length (a cheap check before
/// the manifest names them again).
fn files_intact(dir: &Path, d: &DumpedGraph) -> bool {
    d.files
        .iter()
        .all(|f| std::fs::metadata(dir.join(&f.name)).is_ok_and(|m| m.len() == f.len))
}

/// The dumped graphs of `dir`, if its manifest is for vectors of `tag` and `dim`; none
/// without a manifest.
fn read_manifest(dir: &Path, tag: &str, dim: usize) -> Result<Vec<DumpedGraph>, String> {
    let raw = match std::fs::read(dir.join(MANIFEST)) {
        Ok(raw) => raw,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(format!("manifest unreadable: {e}")),
    };
    let manifest: Manifest =
        serde_json::from_slice(&raw).map_err(|e| format!("manifest corrupt: {e}"))?;
    if manifest.format != FORMAT {
        return Err(format!("manifest of format {}", manifest.format));
    }
    if manifest.library != usearch::version() {
        return Err(format!(
            "graphs of usearch {:?}, not {}",
            manifest.library,
            usearch::version()
        ));
    }
    if manifest.tag != tag || manifest.dim != dim {
        return Err(format!(
            "dump of {} ({} dimensions), not {tag} ({dim})",
            manifest.tag, manifest.dim
        ));
    }
    Ok(manifest.graphs)
}

/// Reloads one graph once its files match the manifest: the graph and the ids it holds.
fn load_graph(
    dir: &Path,
    d: &DumpedGraph,
    dim: usize,
    ef_search: usize,
) -> Result<(Graph, HashSet<EntryId>), String> {
    // Names this module wrote: hex digits and dashes, nothing that leaves `dir`.
    let plain = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-');
    if !plain(&d.basename) || d.files.len() != EXTENSIONS.len() {
        return Err("bad file names".into());
    }
    for (f, ext) in d.files.iter().zip(EXTENSIONS) {
        if f.name != format!("{}.{ext}", d.basename) {
            return Err(format!("unexpected file {:?}", f.name));
        }
        let (len, sha256) = digest(&dir.join(&f.name)).map_err(|e| format!("{}: {e}", f.name))?;
        if len != f.len || sha256 != f.sha256 {
            return Err(format!("{} does not match its checksum", f.name));
        }
    }
    let raw = std::fs::read(dir.join(&d.files[1].name)).map_err(|e| e.to_string())?;
    if raw.len() % 8 != 0 {
        return Err("keys file of a partial id".into());
    }
    let held: HashSet<EntryId> = raw
        .chunks_exact(8)
        .map(|c| {
            let mut b = [0u8; 8];
            b.copy_from_slice(c);
            u64::from_le_bytes(b)
        })
        .collect();
    let graph = dir.join(&d.files[0].name);
    let path = graph
        .to_str()
        .ok_or_else(|| format!("{} is not UTF-8", graph.display()))?;
    let head = usearch::Index::metadata(path).map_err(|e| e.to_string())?;
    let expected = (
        dim as u64,
        usearch::MetricKind::Cos,
        usearch::ScalarKind::I8,
        false,
    );
    if (head.dimensions, head.metric, head.quantization, head.multi) != expected
        || head.count_present as usize != d.points
        || held.len() != d.points
        || d.points == 0
    {
        return Err(format!(
            "{} entries of {} dimensions ({} ids), the manifest says {} of {dim}",
            head.count_present,
            head.dimensions,
            held.len(),
            d.points,
        ));
    }
    let mut g = Graph::new(dim, 0, ef_search)?;
    g.vectors.load(path).map_err(|e| e.to_string())?;
    g.vectors.change_expansion_search(ef_search);
    if g.vectors.size() != d.points || held.iter().any(|id| !g.vectors.contains(*id)) {
        return Err("the graph's entries are not the ids dumped with it".into());
    }
    g.exact.reserve(held.len());
    for id in &held {
        if let Some(v) = g.vector(*id) {
            g.exact
                .add(super::quant::fingerprint(super::quant::components(&v)), *id);
        }
    }
    g.live = d.points;
    g.tombstones = head.count_deleted as usize;
    Ok((g, held))
}
