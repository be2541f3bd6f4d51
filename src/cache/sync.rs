//! Cluster mode: every node's index learns of the entries other nodes add and remove.
//!
//! Entries live in Redis with the rest of the store. Each node keeps its own index of them
//! (the HNSW graphs are per process), so a node announces what it added or removed on a Redis
//! stream (`<prefix>cache:stream`, capped at [`STREAM_MAX`] entries) and every node tails it,
//! feeding its worker as if the change were its own. A node reads the stream's position before
//! it loads its index from storage, so nothing added in between is missed; an insert seen twice
//! is indexed once. Serving never depends on this: a candidate is read back from storage before
//! it is served, so an entry removed anywhere is never served anywhere.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{SyncSender, TrySendError};
use std::sync::Arc;
use std::time::Duration;

use redis::streams::{StreamReadOptions, StreamReadReply};

use super::index::{EntryId, EntryMeta};
use super::service::Command;
use crate::cluster::redis::Redis;
use crate::store::Store;

/// Stream entries kept (approximately): a node that falls further behind misses inserts (they
/// are not hits there until it restarts), never a deletion's effect.
const STREAM_MAX: usize = 100_000;

/// This node's end of the stream.
#[derive(Clone)]
pub struct Sync {
    redis: Redis,
    node: String,
    key: String,
    stop: Arc<AtomicBool>,
}

impl Sync {
    pub fn new(redis: Redis, node: String) -> Self {
        let key = redis.key("cache:stream");
        Self {
            redis,
            node,
            key,
            stop: Arc::new(AtomicBool::new(false)),
        }
    }

    /// The id of the newest stream entry now (`0-0` when empty): tailing starts after it.
    pub fn position(&self) -> String {
        let read = self.redis.run(|c| {
            redis::cmd("XREVRANGE")
                .arg(&self.key)
                .arg("+")
                .arg("-")
                .arg("COUNT")
                .arg(1)
                .query::<Vec<(String, Vec<(String, String)>)>>(c)
        });
        match read {
            Ok(v) => v.into_iter().next().map_or_else(|| "0-0".into(), |e| e.0),
            Err(e) => {
                tracing::warn!(error = %e, "cache stream unreadable; tailing from its end");
                "$".into()
            }
        }
    }

    fn add(&self, fields: &[(&str, String)]) {
        let added = self.redis.run(|c| {
            let mut cmd = redis::cmd("XADD");
            cmd.arg(&self.key)
                .arg("MAXLEN")
                .arg("~")
                .arg(STREAM_MAX)
                .arg("*")
                .arg("n")
                .arg(&self.node);
            for (k, v) in fields {
                cmd.arg(*k).arg(v);
            }
            cmd.query::<String>(c)
        });
        if let Err(e) = added {
            tracing::warn!(error = %e, "cache change not announced to the other nodes");
        }
    }

    /// Announces an entry this node stored.
    pub fn inserted(&self, id: EntryId, meta: &EntryMeta) {
        self.add(&[
            ("o", "i".into()),
            ("id", id.to_string()),
            ("s", hex::encode(meta.scope)),
            ("e", meta.expires_ms.to_string()),
        ]);
    }

    /// Announces entries this node removed (a deleted conversation's, evicted ones).
    pub fn removed(&self, ids: &[EntryId]) {
        for chunk in ids.chunks(1024) {
            let list: Vec<String> = chunk.iter().map(u64::to_string).collect();
            self.add(&[("o", "f".into()), ("ids", list.join(","))]);
        }
    }

    /// Stops the tail (within a second).
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }

    /// Tails the stream from `from` on a thread of its own, feeding the worker what other
    /// nodes changed.
    pub(crate) fn tail(&self, from: String, store: Store, worker: SyncSender<Command>) {
        let me = self.clone();
        let spawned = std::thread::Builder::new()
            .name("parley-cache-tail".into())
            .spawn(move || me.run(from, &store, &worker));
        if let Err(e) = spawned {
            tracing::error!(error = %e, "cannot tail the cache stream; other nodes' entries stay unknown here");
        }
    }

    fn run(&self, mut from: String, store: &Store, worker: &SyncSender<Command>) {
        // Blocks for less than a pooled connection's read timeout (1 s): a read that timed out
        // would mark Redis down for every caller.
        let opts = StreamReadOptions::default().block(400).count(512);
        while !self.stop.load(Ordering::Relaxed) {
            let read = self.redis.run(|c| {
                redis::Commands::xread_options::<_, _, StreamReadReply>(
                    c,
                    &[&self.key],
                    &[&from],
                    &opts,
                )
            });
            let reply = match read {
                Ok(r) => r,
                Err(_) => {
                    // Redis away: the gate fails fast; look again shortly.
                    std::thread::sleep(Duration::from_millis(200));
                    continue;
                }
            };
            for key in reply.keys {
                for entry in key.ids {
                    from.clone_from(&entry.id);
                    let field = |name: &str| entry.get::<String>(name);
                    if field("n").as_deref() == Some(self.node.as_str()) {
                        continue;
                    }
                    let cmd = match field("o").as_deref() {
                        Some("i") => insert(store, &field),
                        Some("f") => field("ids").map(|ids| {
                            Command::Forget(ids.split(',').filter_map(|i| i.parse().ok()).collect())
                        }),
                        _ => None,
                    };
                    let Some(cmd) = cmd else { continue };
                    match worker.try_send(cmd) {
                        Ok(()) => {}
                        Err(TrySendError::Full(_)) => {
                            tracing::debug!(
                                "cache worker busy; a change from another node skipped"
                            );
                        }
                        Err(TrySendError::Disconnected(_)) => return,
                    }
                }
            }
        }
    }
}

fn insert(store: &Store, field: &impl Fn(&str) -> Option<String>) -> Option<Command> {
    let id: EntryId = field("id")?.parse().ok()?;
    let scope = hex::decode(field("s")?).ok()?.try_into().ok()?;
    let expires_ms: i64 = field("e")?.parse().ok()?;
    // Removed meanwhile: nothing to index.
    let vector = store.cache_vector(id).ok()??;
    let meta = EntryMeta {
        scope,
        expires_ms,
        last_used_ms: chrono::Utc::now().timestamp_millis(),
    };
    Some(Command::Insert { id, meta, vector })
}
