//! The semantic cache's persistence:
//! - `cache_entries`: entry id (u64 BE) → [`CacheRecord`] (JSON)
//! - `cache_vectors`: entry id → the question's embedding (f32 little-endian)
//! - `cache_by_conversation`: conversation id ‖ entry id → (), so a deleted conversation takes
//!   its entries with it
//! - `cache_meta`: `embedder` → the id of the embedder that made the entries
//! - `recall_vectors`: conversation id ‖ seq → a stored message's embedding, so recall memory
//!   embeds each message once, not at every turn
//!
//! The in-memory HNSW index is restored from these trees at start, with the graphs it dumped
//! in [`Store::cache_index_dir`] (files the cache module writes with usearch, which lives
//! there only; a dump is a copy of what these trees hold, never the truth).

use serde::{Deserialize, Serialize};
use sled::transaction::{ConflictableTransactionError, TransactionError, Transactional};

use super::{decode, encode, Store, StoreError, Usage};
use crate::ids::ConversationId;

/// One cached reply and the question it answered.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CacheRecord {
    pub tenant: String,
    /// Hex of the scope key: tenant, route, system prompt and version, preceding context.
    pub scope: String,
    pub question: String,
    pub reply: String,
    pub usage: Usage,
    pub provider: String,
    pub model: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub conversation: Option<ConversationId>,
    pub created_ms: i64,
    pub expires_ms: i64,
}

/// An entry as loaded at start.
#[derive(Debug, Clone)]
pub struct StoredEntry {
    pub id: u64,
    pub record: CacheRecord,
    pub vector: Vec<f32>,
}

/// What the index needs of an entry at start: neither its texts nor its vector.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct CacheHead {
    #[serde(skip)]
    pub id: u64,
    pub scope: String,
    pub created_ms: i64,
    pub expires_ms: i64,
}

fn conv_key(conv: &ConversationId, id: u64) -> Vec<u8> {
    let mut key = Vec::with_capacity(ConversationId::LEN + 8);
    key.extend_from_slice(conv.as_bytes());
    key.extend_from_slice(&id.to_be_bytes());
    key
}

fn vector_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

fn vector_from(raw: &[u8]) -> Vec<f32> {
    raw.chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect()
}

fn id_from(raw: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(raw.try_into().ok()?))
}

impl Store {
    /// A fresh entry id (monotonic).
    ///
    /// # Errors
    /// Storage failures.
    pub fn cache_next_id(&self) -> Result<u64, StoreError> {
        match &self.db {
            super::Backend::Sled(db) => Ok(db.generate_id()?),
            super::Backend::Redis(r) => {
                let key = r.key("cache:next_id");
                r.run(|c| redis::cmd("INCR").arg(&key).query(c))
            }
        }
    }

    /// Stores an entry with its vector and its conversation index, atomically.
    ///
    /// # Errors
    /// Storage failures.
    pub fn put_cache_entry(
        &self,
        id: u64,
        rec: &CacheRecord,
        vector: &[f32],
    ) -> Result<(), StoreError> {
        let key = id.to_be_bytes();
        let value = encode(rec)?;
        let vec = vector_bytes(vector);
        let conv = rec.conversation.as_ref().map(|c| conv_key(c, id));
        use super::kv::{Expect, Tree, Txn};
        let trees = (
            &self.cache_entries,
            &self.cache_vectors,
            &self.cache_by_conversation,
            &self.conversations,
        );
        let conv_id = rec.conversation.clone();
        match trees {
            (Tree::Sled(e), Tree::Sled(v), Tree::Sled(b), Tree::Sled(c)) => (e, v, b, c)
                .transaction(|(entries, vectors, by_conv, conversations)| {
                    // A conversation deleted meanwhile takes no new entry (its deletion scan
                    // may have run already).
                    if let Some(c) = &conv_id {
                        if conversations.get(c.as_bytes())?.is_none() {
                            return Err(ConflictableTransactionError::Abort(
                                StoreError::NoConversation(c.clone()),
                            ));
                        }
                    }
                    entries.insert(&key, value.as_slice())?;
                    vectors.insert(&key, vec.as_slice())?;
                    if let Some(k) = &conv {
                        by_conv.insert(k.as_slice(), &[] as &[u8])?;
                    }
                    Ok::<_, ConflictableTransactionError<StoreError>>(())
                })
                .map_err(|e| match e {
                    TransactionError::Abort(e) => e,
                    TransactionError::Storage(e) => e.into(),
                }),
            (Tree::Redis(e), Tree::Redis(v), Tree::Redis(b), Tree::Redis(c)) => {
                let mut txn = Txn::default();
                if let Some(id) = &conv_id {
                    // Likewise: one script checks and writes.
                    txn = txn.require(c, id.as_bytes(), Expect::Exists);
                }
                txn = txn.insert(e, &key, &value).insert(v, &key, &vec);
                if let Some(k) = &conv {
                    txn = txn.insert(b, k, &[]);
                }
                match (txn.commit()?, conv_id) {
                    (false, Some(id)) => Err(StoreError::NoConversation(id)),
                    _ => Ok(()),
                }
            }
            _ => Err(StoreError::Task("cache trees on mixed backends".into())),
        }
    }

    /// The entry `id`, if it still exists.
    ///
    /// # Errors
    /// Storage failures, a corrupt record.
    pub fn cache_entry(&self, id: u64) -> Result<Option<CacheRecord>, StoreError> {
        self.cache_entries
            .get(id.to_be_bytes())?
            .map(|raw| decode("cache_entries", &id.to_string(), &raw))
            .transpose()
    }

    /// Removes entries (expired, evicted).
    ///
    /// # Errors
    /// Storage failures.
    pub fn remove_cache_entries(&self, ids: &[u64]) -> Result<(), StoreError> {
        for &id in ids {
            let key = id.to_be_bytes();
            if let Some(raw) = self.cache_entries.remove(key)? {
                if let Ok(rec) = decode::<CacheRecord>("cache_entries", "", &raw) {
                    if let Some(conv) = rec.conversation {
                        self.cache_by_conversation.remove(conv_key(&conv, id))?;
                    }
                }
            }
            self.cache_vectors.remove(key)?;
        }
        Ok(())
    }

    /// Removes every entry made from conversation `conv`; answers their ids.
    ///
    /// # Errors
    /// Storage failures.
    pub fn remove_conversation_cache(&self, conv: &ConversationId) -> Result<Vec<u64>, StoreError> {
        let mut ids = Vec::new();
        for kv in self.cache_by_conversation.scan_prefix(conv.as_bytes()) {
            let (k, _) = kv?;
            if let Some(id) = k.get(ConversationId::LEN..).and_then(id_from) {
                ids.push(id);
            }
            self.cache_by_conversation.remove(k)?;
        }
        for &id in &ids {
            self.cache_entries.remove(id.to_be_bytes())?;
            self.cache_vectors.remove(id.to_be_bytes())?;
        }
        Ok(ids)
    }

    /// Every stored entry with its vector (entries whose vector is missing are skipped).
    ///
    /// # Errors
    /// Storage failures; corrupt records are skipped with a log line.
    pub fn cache_entries_all(&self) -> Result<Vec<StoredEntry>, StoreError> {
        let mut out = Vec::new();
        for kv in self.cache_entries.iter() {
            let (k, v) = kv?;
            let Some(id) = id_from(&k) else { continue };
            let record = match decode::<CacheRecord>("cache_entries", &id.to_string(), &v) {
                Ok(r) => r,
                Err(e) => {
                    tracing::warn!(error = %e, "skipping a corrupt cache entry");
                    continue;
                }
            };
            let Some(raw) = self.cache_vectors.get(k)? else {
                continue;
            };
            out.push(StoredEntry {
                id,
                record,
                vector: vector_from(&raw),
            });
        }
        Ok(out)
    }

    /// The head of every stored entry that has a vector: a start reads a million of them, so
    /// the texts are skipped while parsing, never copied.
    ///
    /// # Errors
    /// Storage failures; corrupt records are skipped with a log line.
    pub fn cache_entry_heads(&self) -> Result<Vec<CacheHead>, StoreError> {
        let mut out = Vec::new();
        for kv in self.cache_entries.iter() {
            let (k, v) = kv?;
            let Some(id) = id_from(&k) else { continue };
            match decode::<CacheHead>("cache_entries", &id.to_string(), &v) {
                Ok(head) if self.cache_vectors.contains_key(&k)? => {
                    out.push(CacheHead { id, ..head });
                }
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "skipping a corrupt cache entry"),
            }
        }
        Ok(out)
    }

    /// The stored vector of entry `id`, if it still exists.
    ///
    /// # Errors
    /// Storage failures.
    pub fn cache_vector(&self, id: u64) -> Result<Option<Vec<f32>>, StoreError> {
        Ok(self
            .cache_vectors
            .get(id.to_be_bytes())?
            .map(|raw| vector_from(&raw)))
    }

    /// The directory the cache's index dumps its graphs in.
    pub fn cache_index_dir(&self) -> &std::path::Path {
        &self.cache_index_dir
    }

    /// Number of stored entries.
    ///
    /// # Errors
    /// Storage failures.
    pub fn cache_len(&self) -> Result<usize, StoreError> {
        self.cache_entries.len()
    }

    /// Makes sure the stored entries were made by embedder `id`; entries of another embedder
    /// are dropped (their vectors cannot be compared). Answers how many were dropped.
    ///
    /// # Errors
    /// Storage failures.
    pub fn cache_use_embedder(&self, id: &str) -> Result<usize, StoreError> {
        let current = self.cache_meta.get("embedder")?;
        if current.as_deref() == Some(id.as_bytes()) {
            return Ok(0);
        }
        let dropped = self.cache_entries.len()?;
        self.cache_entries.clear()?;
        self.cache_vectors.clear()?;
        self.cache_by_conversation.clear()?;
        self.recall_vectors.clear()?;
        self.cache_meta.insert("embedder", id.as_bytes())?;
        Ok(dropped)
    }
}

impl Store {
    /// The stored embeddings of messages `seqs` of `conv` (`None` where there is none).
    ///
    /// # Errors
    /// Storage failures.
    pub fn recall_vectors(
        &self,
        conv: &ConversationId,
        seqs: &[u64],
    ) -> Result<Vec<Option<Vec<f32>>>, StoreError> {
        seqs.iter()
            .map(|&seq| {
                Ok(self
                    .recall_vectors
                    .get(conv_key(conv, seq))?
                    .map(|raw| vector_from(&raw)))
            })
            .collect()
    }

    /// Keeps message embeddings for recall memory (not flushed: they can be computed again).
    ///
    /// # Errors
    /// Storage failures.
    pub fn put_recall_vectors(
        &self,
        conv: &ConversationId,
        vectors: &[(u64, &[f32])],
    ) -> Result<(), StoreError> {
        let mut batch = super::kv::Batch::default();
        for (seq, v) in vectors {
            batch.insert(conv_key(conv, *seq), vector_bytes(v));
        }
        self.recall_vectors.apply_batch(batch)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(conv: Option<ConversationId>) -> CacheRecord {
        CacheRecord {
            tenant: "t".into(),
            scope: "00".into(),
            question: "q".into(),
            reply: "r".into(),
            usage: Usage::new(3, 4),
            provider: "p".into(),
            model: "m".into(),
            conversation: conv,
            created_ms: 1,
            expires_ms: 2,
        }
    }

    #[tokio::test]
    async fn entries_roundtrip_and_leave_with_their_conversation() {
        let dir = tempfile::tempdir().expect("tempdir"); // ok: test
        let store = Store::open(dir.path()).expect("open"); // ok: test
        assert_eq!(store.cache_use_embedder("e1").expect("meta"), 0); // ok: test
        let conv = ConversationId::generate();
        // No entry for a conversation that does not exist (deleted meanwhile).
        assert!(store
            .put_cache_entry(9, &record(Some(conv.clone())), &[1.0])
            .is_err());
        let header = crate::store::ConversationRecord {
            id: conv.clone(),
            tenant: crate::ids::TenantId::local(),
            model: "m".into(),
            system: None,
            system_tokens: 0,
            prompt: None,
            metadata: serde_json::json!({}),
            created_at: 0,
            last_seq: 0,
            history_tokens: 0,
            memory: Default::default(),
            tools: Vec::new(),
            tool_choice: None,
        };
        store.create_conversation(&header).await.expect("create"); // ok: test
        let a = store.cache_next_id().expect("id"); // ok: test
        let b = store.cache_next_id().expect("id"); // ok: test
        store
            .put_cache_entry(a, &record(Some(conv.clone())), &[0.5, -0.25])
            .expect("put"); // ok: test
        store
            .put_cache_entry(b, &record(None), &[1.0])
            .expect("put"); // ok: test
        let all = store.cache_entries_all().expect("all"); // ok: test
        assert_eq!(all.len(), 2);
        assert_eq!(all[0].vector, vec![0.5, -0.25]);
        let heads = store.cache_entry_heads().expect("heads"); // ok: test
        let ids: Vec<u64> = heads.iter().map(|h| h.id).collect();
        assert_eq!(ids, vec![a, b]);
        assert_eq!((heads[0].scope.as_str(), heads[0].expires_ms), ("00", 2));
        assert_eq!(store.cache_vector(a).expect("get"), Some(vec![0.5, -0.25])); // ok: test
        assert_eq!(store.remove_conversation_cache(&conv).expect("rm"), vec![a]); // ok: test
        assert!(store.cache_entry(a).expect("get").is_none()); // ok: test
        assert!(store.cache_vector(a).expect("get").is_none()); // ok: test
        assert!(store.cache_entry(b).expect("get").is_some()); // ok: test
        store.remove_cache_entries(&[b]).expect("rm"); // ok: test
        assert_eq!(store.cache_len().unwrap(), 0); // ok: test
        store
            .put_cache_entry(b, &record(None), &[1.0])
            .expect("put"); // ok: test
        assert_eq!(store.cache_use_embedder("e2").expect("meta"), 1); // ok: test
        assert_eq!(store.cache_len().unwrap(), 0); // ok: test
    }
}
