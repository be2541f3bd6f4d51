//! Graphs on disk, so a start reloads a large scope instead of building it point by point
//! (a million points take minutes to insert, seconds to reload).
//!
//! [`Index::dump`] writes each graph with hnsw_rs's `file_dump` (`<basename>.hnsw.graph` and
//! `.hnsw.data`), then a `manifest.json` naming the files with their length and SHA-256, and
//! only then removes files the new manifest no longer names: a crash at any point leaves the
//! previous manifest and its files, or the new ones. A graph no point was added to since its
//! last dump keeps its files.
//!
//! [`Index::restore`] builds the index of the entries storage holds. A graph whose files match
//! the manifest is reloaded and reconciled with storage: entries stored after the dump are
//! inserted, points whose entry is gone are tombstones. Anything wrong — no manifest, another
//! embedder or dimension, a file missing, truncated or altered, a graph hnsw_rs cannot read —
//! means that scope is built from the stored vectors, as if there were no dump. hnsw_rs
//! asserts while reading and trusts lengths it reads, so a file is only handed to it once its
//! checksum matches, and inside `catch_unwind`.

use std::collections::{HashMap, HashSet};
use std::io::{Read, Write};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use hnsw_rs::api::AnnT;
use hnsw_rs::hnswio::HnswIo;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::quant::{QuantisedCosine, TAIL};
use super::{EntryId, EntryMeta, Graph, Index, Partition, ScopeKey, Vectors};

pub(super) const MANIFEST: &str = "manifest.json";
/// Changes whenever what is dumped changes meaning (quantisation, distance).
const FORMAT: u32 = 1;
const EXTENSIONS: [&str; 2] = ["hnsw.graph", "hnsw.data"];

#[derive(Serialize, Deserialize)]
struct Manifest {
    format: u32,
    /// Whose vectors these are (the embedder's id): another embedder's graph is useless.
    tag: String,
    dim: usize,
    graphs: Vec<DumpedGraph>,
}

/// One dumped graph: its scope, its files, and how many points it held.
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
        for (scope, partition) in &mut self.scopes {
            let Partition::Graph(g) = partition else {
                continue;
            };
            if let Some(d) = g.dumped.as_ref().filter(|d| files_intact(dir, d)) {
                graphs.push(d.clone());
                continue;
            }
            match dump_graph(dir, scope, g) {
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
        for (id, meta) in entries {
            if !self.entries.contains_key(&id) {
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
            let hnsw = match load_graph(dir, &dumped, self.dim) {
                Ok(hnsw) => hnsw,
                Err(problem) => {
                    report
                        .problems
                        .push(format!("{}: {problem}", dumped.basename));
                    continue;
                }
            };
            let held: HashSet<EntryId> = hnsw
                .get_point_indexation()
                .into_iter()
                .map(|p| p.get_origin_id() as u64)
                .collect();
            let (living, added): (Vec<_>, Vec<_>) =
                stored.iter().partition(|(id, _)| held.contains(id));
            let mut g = Graph {
                points: dumped.points,
                live: living.len(),
                hnsw,
                dumped: Some(dumped),
            };
            report.reloaded += 1;
            report.tombstones += g.points - g.live;
            let (vectors, metas) = self.quantised(added, vector_of, &mut report);
            report.inserted += metas.len();
            if !vectors.is_empty() {
                super::add_to_graph(&mut g, &vectors);
            }
            report.entries += living.len() + metas.len();
            self.entries.extend(living.into_iter().copied());
            self.entries.extend(metas);
            self.scopes.insert(scope, Partition::Graph(g));
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
        report.rebuilt = all_metas.len();
        report.entries += all_metas.len();
        self.add_scopes(rebuilt, all_metas);
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

fn dump_graph(dir: &Path, scope: &ScopeKey, g: &Graph) -> Result<DumpedGraph, String> {
    let basename = unique_basename(scope);
    // hnsw_rs panics when it cannot create a file.
    let written = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        g.hnsw.file_dump(dir, &basename)
    }));
    match written {
        Ok(Ok(name)) if name == basename => {}
        Ok(Ok(name)) => return Err(format!("written as {name}, not {basename}")),
        Ok(Err(e)) => return Err(e.to_string()),
        Err(_) => return Err("hnsw_rs panicked writing it".into()),
    }
    let mut files = Vec::new();
    for ext in EXTENSIONS {
        let name = format!("{basename}.{ext}");
        let (len, sha256) = digest(&dir.join(&name)).map_err(|e| format!("{name}: {e}"))?;
        files.push(DumpedFile { name, len, sha256 });
    }
    Ok(DumpedGraph {
        scope: hex::encode(scope),
        basename,
        points: g.points,
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
    if manifest.tag != tag || manifest.dim != dim {
        return Err(format!(
            "dump of {} ({} dimensions), not {tag} ({dim})",
            manifest.tag, manifest.dim
        ));
    }
    Ok(manifest.graphs)
}

/// Reloads one graph once its files match the manifest.
fn load_graph(dir: &Path, d: &DumpedGraph, dim: usize) -> Result<Vectors, String> {
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
    // The reloaded graph borrows its loader for its lifetime (hnsw_rs can map data files);
    // ours owns its data, but the type says 'static: one small loader per reloaded graph,
    // per start, is leaked.
    let io: &'static HnswIo = Box::leak(Box::new(HnswIo::new(dir, &d.basename)));
    let loaded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        io.load_hnsw_with_dist::<i8, QuantisedCosine>(QuantisedCosine)
    }));
    let hnsw = match loaded {
        Ok(Ok(hnsw)) => hnsw,
        Ok(Err(e)) => return Err(e.to_string()),
        Err(_) => return Err("hnsw_rs panicked reading it".into()),
    };
    let points = hnsw.get_nb_point();
    let width = hnsw.get_point_indexation().get_data_dimension();
    if points != d.points || points == 0 || width != dim + TAIL {
        return Err(format!(
            "{points} points of {width} bytes, the manifest says {} of {}",
            d.points,
            dim + TAIL
        ));
    }
    Ok(hnsw)
}
