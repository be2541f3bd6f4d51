//! The only module that touches storage: sled's typed trees, key encoding, durable appends,
//! flush, and the daily files of raw usage records.
//!
//! Trees:
//! - `conversations`: conversation id → [`ConversationRecord`]
//! - `messages`: conversation id ‖ seq (u64 big-endian) → [`MessageRecord`], so a prefix scan
//!   walks one conversation in `seq` order (and backwards, newest first, for trimming)
//! - `client_ids`: conversation id ‖ client id → seq of the user message (idempotency)
//! - `keys`: SHA-256 of a key's secret → [`KeyRecord`]; `key_ids`: key id → that hash
//! - `cache_entries`, `cache_vectors`, `cache_by_conversation`, `cache_meta`: the semantic
//!   cache; `recall_vectors`: message embeddings kept for recall memory (see `cache.rs`); the
//!   cache's index dumps its graphs beside the trees, in `cache-index`
//! - `responses`, `responses_by_conversation`: Responses API records (see `responses.rs`)
//! - `tenant_conversations`: tenant → how many conversations it keeps
//! - `usage_rollups`, `usage_totals`: per-minute usage and per-key period totals; raw usage
//!   records go to daily files beside the trees (see `usage.rs`)
//!
//! An append writes the message, its client-id entry and the header, in that order (a sled
//! transaction would cost two extra log writes; see [`Store::append_message_unflushed`]),
//! then flushes, so a message the caller acknowledges has reached the disk; callers flushing
//! at the same time share one flush (`commit.rs`).

mod cache;
mod commit;
mod files;
mod jobs;
pub mod kv;
mod prompts;
mod records;
mod responses;
mod usage;

use std::path::Path;

use serde::de::DeserializeOwned;
use serde::Serialize;
use sled::transaction::{ConflictableTransactionError, TransactionError, Transactional};

use kv::{Batch, Tree};

pub use cache::{CacheHead, CacheRecord, StoredEntry};
pub use files::{BadLine, BatchRecord, FileRecord, Settled};
pub use jobs::{Delivery, JobError, JobRecord, JobRequest, JobStatus, WebhookState};
pub use records::{
    ConversationRecord, KeyRecord, LimitWindow, MessageRecord, PeriodTotal, PromptVersion,
    ReplyMeta, Role, StoredError, Usage, UsageRecord,
};
pub use responses::ResponseRecord;
pub use usage::{periods, Rollup, RollupKey};

use crate::cluster::redis::Redis;
use crate::error::{ApiError, ErrorCode};
use crate::ids::{ConversationId, TenantId};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("storage failed: {0}")]
    Sled(#[from] sled::Error),
    /// Redis (cluster mode) cannot be reached or failed the call.
    #[error("storage unavailable: {0}")]
    Unavailable(String),
    #[error("stored record {tree}/{key} is corrupt: {message}")]
    Corrupt {
        tree: &'static str,
        key: String,
        message: String,
    },
    #[error("storage task failed: {0}")]
    Task(String),
    #[error("conversation {0} not found")]
    NoConversation(ConversationId),
    #[error("seq conflict in conversation {conversation}: expected {expected}, got {got}")]
    SeqConflict {
        conversation: ConversationId,
        expected: u64,
        got: u64,
    },
}

impl StoreError {
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::NoConversation(_) => ErrorCode::NotFound,
            Self::Unavailable(_) => ErrorCode::UpstreamUnavailable,
            Self::Sled(_) | Self::Corrupt { .. } | Self::SeqConflict { .. } | Self::Task(_) => {
                ErrorCode::Internal
            }
        }
    }
}

impl From<StoreError> for ApiError {
    fn from(err: StoreError) -> Self {
        match err.code() {
            ErrorCode::NotFound => ApiError::not_found("conversation"),
            ErrorCode::UpstreamUnavailable => {
                tracing::warn!(error = %err, "storage unavailable");
                ApiError::new(
                    ErrorCode::UpstreamUnavailable,
                    "storage is unavailable (Redis cannot be reached); try again shortly",
                )
            }
            _ => {
                tracing::error!(error = %err, "store failed");
                ApiError::internal()
            }
        }
    }
}

/// The page cache of a store opened without a setting (`[storage] cache_mb` has the same).
pub const DEFAULT_CACHE_BYTES: u64 = 16 << 20;

/// Where the trees live.
#[derive(Clone)]
enum Backend {
    Sled(sled::Db),
    Redis(Redis),
}

/// The handle to parley's storage; cheap to clone.
#[derive(Clone)]
pub struct Store {
    db: Backend,
    conversations: Tree,
    messages: Tree,
    client_ids: Tree,
    keys: Tree,
    key_ids: Tree,
    /// Raw usage records, one file per UTC day (`<data_dir>/usage`).
    usage_dir: std::path::PathBuf,
    /// Where the cache's index dumps its graphs (`<data_dir>/cache-index`, see `cache.rs`).
    cache_index_dir: std::path::PathBuf,
    usage_rollups: Tree,
    usage_totals: Tree,
    prompts: Tree,
    pii_vaults: Tree,
    cache_entries: Tree,
    cache_vectors: Tree,
    cache_by_conversation: Tree,
    cache_meta: Tree,
    recall_vectors: Tree,
    responses: Tree,
    responses_by_conversation: Tree,
    /// Tenant → how many conversations it keeps (u64 big-endian).
    tenant_conversations: Tree,
    /// Tenant ‖ 0 ‖ created at (seconds, BE) ‖ conversation id → nothing: a tenant's
    /// conversations in order, for listing.
    conversations_by_tenant: Tree,
    /// Conversation id → the reply streaming now, as far as it was checkpointed (cluster
    /// mode: what a node that takes over a dead node's conversation stores as interrupted).
    partials: Tree,
    jobs: Tree,
    jobs_queue: Tree,
    jobs_running: Tree,
    /// Whether this process has built `jobs_running` from the jobs once (so running jobs that
    /// a binary without the index started are found too).
    running_indexed: std::sync::Arc<std::sync::atomic::AtomicBool>,
    jobs_by_tenant: Tree,
    webhooks_due: Tree,
    webhook_secrets: Tree,
    files: Tree,
    file_contents: Tree,
    batches: Tree,
    batches_by_tenant: Tree,
    commit: std::sync::Arc<commit::GroupCommit>,
    /// Redis only: the header this node last wrote per conversation. Only a conversation's
    /// owner appends to it, so the next append can skip reading the header back; the append
    /// script checks it is still the stored one, so a stale entry costs a retry, never a
    /// wrong write.
    headers: std::sync::Arc<parking_lot::Mutex<std::collections::HashMap<ConversationId, Vec<u8>>>>,
}

/// Headers remembered at most (then forgotten all at once).
const HEADERS_KEPT: usize = 16_384;

impl Store {
    /// Opens (or creates) the store in `dir`.
    ///
    /// # Errors
    /// When sled cannot open the directory (missing permissions, held by another process).
    pub fn open(dir: &Path) -> Result<Self, StoreError> {
        Self::open_with(dir, DEFAULT_CACHE_BYTES)
    }

    /// Opens (or creates) the store in `dir`, its page cache bounded to `cache_bytes`.
    ///
    /// # Errors
    /// As [`Store::open`].
    pub fn open_with(dir: &Path, cache_bytes: u64) -> Result<Self, StoreError> {
        let db = sled::Config::new()
            .path(dir)
            .mode(sled::Mode::HighThroughput)
            .cache_capacity(cache_bytes)
            .open()?;
        let store = Self::with_trees(Backend::Sled(db.clone()), dir, |name| {
            Ok(Tree::Sled(db.open_tree(name)?))
        })?;
        // Stores of earlier versions kept raw usage records tenant first, with no roll-ups.
        if db.tree_names().iter().any(|n| n.as_ref() == b"usage") {
            let old = db.open_tree("usage")?;
            store.migrate_usage(&old)?;
            db.drop_tree("usage")?;
        }
        store.index_conversations()?;
        Ok(store)
    }

    /// A store whose trees live in Redis (cluster mode): every node reads and writes the same
    /// records. `dir` keeps only what is the node's own: its raw usage log and the cache
    /// index's dumps.
    ///
    /// # Errors
    /// None today (Redis is reached on first use); kept fallible like [`Store::open`].
    pub fn open_redis(redis: &Redis, dir: &Path) -> Result<Self, StoreError> {
        Self::with_trees(Backend::Redis(redis.clone()), dir, |name| {
            Ok(Tree::Redis(kv::RedisTree::new(redis, name)))
        })
    }

    fn with_trees(
        db: Backend,
        dir: &Path,
        open: impl Fn(&str) -> Result<Tree, StoreError>,
    ) -> Result<Self, StoreError> {
        Ok(Self {
            conversations: open("conversations")?,
            messages: open("messages")?,
            client_ids: open("client_ids")?,
            keys: open("keys")?,
            key_ids: open("key_ids")?,
            usage_dir: dir.join("usage"),
            cache_index_dir: dir.join("cache-index"),
            usage_rollups: open("usage_rollups")?,
            usage_totals: open("usage_totals")?,
            prompts: open("prompts")?,
            pii_vaults: open("pii_vaults")?,
            cache_entries: open("cache_entries")?,
            cache_vectors: open("cache_vectors")?,
            cache_by_conversation: open("cache_by_conversation")?,
            cache_meta: open("cache_meta")?,
            recall_vectors: open("recall_vectors")?,
            responses: open("responses")?,
            responses_by_conversation: open("responses_by_conversation")?,
            tenant_conversations: open("tenant_conversations")?,
            conversations_by_tenant: open("conversations_by_tenant")?,
            partials: open("partials")?,
            jobs: open("jobs")?,
            jobs_queue: open("jobs_queue")?,
            jobs_running: open("jobs_running")?,
            running_indexed: Default::default(),
            jobs_by_tenant: open("jobs_by_tenant")?,
            webhooks_due: open("webhooks_due")?,
            webhook_secrets: open("webhook_secrets")?,
            files: open("files")?,
            file_contents: open("file_contents")?,
            batches: open("batches")?,
            batches_by_tenant: open("batches_by_tenant")?,
            commit: commit::GroupCommit::new()
                .map_err(|e| StoreError::Task(format!("cannot start the flusher thread: {e}")))?,
            headers: Default::default(),
            db,
        })
    }

    /// The Redis this store lives in, in cluster mode.
    pub fn redis(&self) -> Option<&Redis> {
        match &self.db {
            Backend::Redis(r) => Some(r),
            Backend::Sled(_) => None,
        }
    }

    /// Waits until everything written so far is on disk.
    ///
    /// # Errors
    /// When the disk write fails.
    pub async fn flush(&self) -> Result<(), StoreError> {
        match &self.db {
            // Callers waiting at the same time share one flush (group commit).
            Backend::Sled(db) => self.commit.flush(db).await,
            // With `appendfsync always` Redis answered each write once it was on disk.
            Backend::Redis(_) => Ok(()),
        }
    }

    /// Waits until no flush started earlier is still running (shutdown: a flush holds the
    /// database, and with it the directory's lock).
    pub async fn idle(&self) {
        self.commit.idle().await;
    }

    /// Flushes from synchronous code (shutdown).
    ///
    /// # Errors
    /// When the disk write fails.
    pub fn flush_blocking(&self) -> Result<(), StoreError> {
        if let Backend::Sled(db) = &self.db {
            db.flush()?;
        }
        Ok(())
    }

    // ---- conversations ----

    /// Stores a new conversation and waits until it is durable.
    ///
    /// # Errors
    /// On a storage failure.
    pub async fn create_conversation(&self, rec: &ConversationRecord) -> Result<(), StoreError> {
        self.conversations.insert(rec.id.as_bytes(), encode(rec)?)?;
        self.conversations_by_tenant.insert(listing_key(rec), [])?;
        self.count_conversation(&rec.tenant, 1)?;
        self.flush().await
    }

    /// A page of `tenant`'s conversations, newest first, after the conversation `after` (a
    /// cursor from the previous page); and whether more follow.
    ///
    /// # Errors
    /// On a storage failure; `NoConversation` for a cursor that is not the tenant's.
    pub fn list_conversations(
        &self,
        tenant: &TenantId,
        after: Option<&ConversationId>,
        limit: usize,
    ) -> Result<(Vec<ConversationRecord>, bool), StoreError> {
        let mut prefix = tenant.as_str().as_bytes().to_vec();
        prefix.push(0);
        let upper = match after {
            Some(id) => listing_key(&self.owned_conversation(id, tenant)?),
            None => {
                let mut end = tenant.as_str().as_bytes().to_vec();
                end.push(1);
                end
            }
        };
        let mut out = Vec::new();
        for k in self
            .conversations_by_tenant
            .range(prefix.clone()..upper)
            .keys()
            .rev()
        {
            let k = k?;
            let Some(id) = k
                .get(prefix.len() + 8..)
                .and_then(|b| std::str::from_utf8(b).ok())
                .and_then(ConversationId::parse)
            else {
                continue;
            };
            // An entry whose conversation is gone (a delete cut short) is skipped.
            let Some(rec) = self.conversation(&id)? else {
                continue;
            };
            if out.len() == limit {
                return Ok((out, true));
            }
            out.push(rec);
        }
        Ok((out, false))
    }

    /// Builds the listing index of conversations stored before it existed (once: at open,
    /// when the index is empty and conversations are not).
    fn index_conversations(&self) -> Result<(), StoreError> {
        if !self.conversations_by_tenant.is_empty()? || self.conversations.is_empty()? {
            return Ok(());
        }
        let mut n = 0usize;
        for v in self.conversations.iter().values() {
            if let Ok(rec) = decode::<ConversationRecord>("conversations", "", &v?) {
                self.conversations_by_tenant.insert(listing_key(&rec), [])?;
                n += 1;
            }
        }
        tracing::info!(conversations = n, "conversation listing index built");
        Ok(())
    }

    /// How many conversations `tenant` keeps stored (counted from when counting began).
    ///
    /// # Errors
    /// On a storage failure.
    pub fn tenant_conversations(&self, tenant: &TenantId) -> Result<u64, StoreError> {
        Ok(self
            .tenant_conversations
            .get(tenant.as_str().as_bytes())?
            .and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
            .map_or(0, u64::from_be_bytes))
    }

    fn count_conversation(&self, tenant: &TenantId, delta: i64) -> Result<(), StoreError> {
        self.tenant_conversations
            .update_and_fetch(tenant.as_str().as_bytes(), |old| {
                let n = old
                    .and_then(|v| <[u8; 8]>::try_from(v).ok())
                    .map_or(0, u64::from_be_bytes);
                Some(n.saturating_add_signed(delta).to_be_bytes().to_vec())
            })?;
        Ok(())
    }

    /// Changes a conversation's settings (tools, tool choice) atomically with respect to
    /// appends, and waits until the change is durable. Answers the updated record.
    ///
    /// # Errors
    /// `NoConversation` when absent; a storage failure.
    pub async fn update_conversation(
        &self,
        id: &ConversationId,
        change: impl Fn(&mut ConversationRecord),
    ) -> Result<ConversationRecord, StoreError> {
        loop {
            let old = self
                .conversations
                .get(id.as_bytes())?
                .ok_or_else(|| StoreError::NoConversation(id.clone()))?;
            let mut rec: ConversationRecord = decode("conversations", id.as_str(), &old)?;
            self.headers.lock().remove(id);
            change(&mut rec);
            let new = encode(&rec)?;
            // A concurrent append changed the header: read it again and re-apply.
            if self
                .conversations
                .compare_and_swap(id.as_bytes(), Some(old), Some(new))?
                .is_ok()
            {
                self.flush().await?;
                return Ok(rec);
            }
        }
    }

    /// The conversation, if it exists.
    ///
    /// # Errors
    /// On a storage failure or a corrupt record.
    pub fn conversation(
        &self,
        id: &ConversationId,
    ) -> Result<Option<ConversationRecord>, StoreError> {
        self.conversations
            .get(id.as_bytes())?
            .map(|v| decode("conversations", id.as_str(), &v))
            .transpose()
    }

    /// The conversation if it exists and belongs to `tenant`; another tenant's is "not found".
    ///
    /// # Errors
    /// `NoConversation` when absent or owned by someone else.
    pub fn owned_conversation(
        &self,
        id: &ConversationId,
        tenant: &TenantId,
    ) -> Result<ConversationRecord, StoreError> {
        match self.conversation(id)? {
            Some(rec) if &rec.tenant == tenant => Ok(rec),
            _ => Err(StoreError::NoConversation(id.clone())),
        }
    }

    /// Removes a conversation with all its messages and index entries, durably.
    ///
    /// # Errors
    /// On a storage failure.
    /// Answers the ids of the cache entries made from it (removed with it).
    pub async fn delete_conversation(&self, id: &ConversationId) -> Result<Vec<u64>, StoreError> {
        self.headers.lock().remove(id);
        // The header goes first, so a turn still finishing cannot append to a half-deleted
        // conversation (its transaction finds no header).
        if let Some(old) = self.conversations.remove(id.as_bytes())? {
            let rec: ConversationRecord = decode("conversations", id.as_str(), &old)?;
            self.count_conversation(&rec.tenant, -1)?;
            self.conversations_by_tenant.remove(listing_key(&rec))?;
        }
        self.pii_vaults.remove(id.as_bytes())?;
        self.partials.remove(id.as_bytes())?;
        let mut batch = Batch::default();
        for kv in self.messages.scan_prefix(id.as_bytes()) {
            batch.remove(kv?.0);
        }
        self.messages.apply_batch(batch)?;
        let mut batch = Batch::default();
        for kv in self.client_ids.scan_prefix(id.as_bytes()) {
            batch.remove(kv?.0);
        }
        self.client_ids.apply_batch(batch)?;
        let cached = self.remove_conversation_cache(id)?;
        let mut batch = Batch::default();
        for kv in self.recall_vectors.scan_prefix(id.as_bytes()) {
            batch.remove(kv?.0);
        }
        self.recall_vectors.apply_batch(batch)?;
        self.remove_conversation_responses(id)?;
        self.flush().await?;
        Ok(cached)
    }

    // ---- messages ----

    /// Appends `msg` as the next message of the conversation, atomically with its client-id
    /// index entry and the header's `last_seq`, then waits until it is durable.
    ///
    /// # Errors
    /// `SeqConflict` when `msg.seq` is not `last_seq + 1`; storage failures.
    pub async fn append_message(
        &self,
        id: &ConversationId,
        msg: &MessageRecord,
    ) -> Result<(), StoreError> {
        self.append_message_unflushed(id, msg)?;
        self.flush().await
    }

    /// [`Store::append_message`] without waiting for the disk: for synchronous callers that
    /// flush afterwards.
    ///
    /// Three single-key writes, not one sled transaction: sled seals and writes its IO buffer
    /// twice for every transaction or batch (`pin_log`), which cost more than the rest of a
    /// turn. They go in an order a crash can only cut into a prefix of — the message, its
    /// client-id entry, then the header — and [`Store::repair_tail`] rolls such a prefix
    /// forward. Only the conversation's actor appends to it, so appends never interleave; the
    /// header is swapped only if unchanged, so an update or a delete running meanwhile is seen.
    ///
    /// # Errors
    /// As [`Store::append_message`].
    pub fn append_message_unflushed(
        &self,
        id: &ConversationId,
        msg: &MessageRecord,
    ) -> Result<(), StoreError> {
        let value = encode(msg)?;
        let key = message_key(id, msg.seq);
        if let (Tree::Redis(conversations), Tree::Redis(messages), Tree::Redis(client_ids)) =
            (&self.conversations, &self.messages, &self.client_ids)
        {
            // One script: the three writes happen together, and only if the header is still
            // the one read, or the one this node wrote last (one round trip an append when this
            // node appended before; no prefix to repair).
            let kept = self.headers.lock().remove(id).filter(|kept| {
                decode::<ConversationRecord>("conversations", id.as_str(), kept)
                    .is_ok_and(|h| h.last_seq + 1 == msg.seq)
            });
            let mut raw = match kept {
                Some(kept) => sled::IVec::from(kept),
                None => self.header_for(id, msg.seq)?,
            };
            loop {
                let mut header: ConversationRecord = decode("conversations", id.as_str(), &raw)?;
                header.last_seq = msg.seq;
                header.history_tokens += msg.history_cost();
                let mut txn = kv::Txn::default()
                    .require(
                        conversations,
                        id.as_bytes(),
                        kv::Expect::Equals(raw.to_vec()),
                    )
                    .insert(messages, &key, &value);
                if let (Role::User | Role::Tool, Some(cid)) = (msg.role, &msg.client_id) {
                    txn = txn.insert(client_ids, &client_key(id, cid), &msg.seq.to_be_bytes());
                }
                let new = encode(&header)?;
                if txn.insert(conversations, id.as_bytes(), &new).commit()? {
                    let mut headers = self.headers.lock();
                    if headers.len() >= HEADERS_KEPT {
                        headers.clear();
                    }
                    headers.insert(id.clone(), new);
                    return Ok(());
                }
                // Changed meanwhile (its tools updated, it was deleted, another node appended):
                // read it again.
                raw = self.header_for(id, msg.seq)?;
            }
        }
        let mut raw = self.header_for(id, msg.seq)?;
        self.messages.insert(key.as_slice(), value)?;
        if let (Role::User | Role::Tool, Some(cid)) = (msg.role, &msg.client_id) {
            self.client_ids
                .insert(client_key(id, cid), msg.seq.to_be_bytes())?;
        }
        loop {
            let mut header: ConversationRecord = decode("conversations", id.as_str(), &raw)?;
            header.last_seq = msg.seq;
            header.history_tokens += msg.history_cost();
            let new = encode(&header)?;
            match self
                .conversations
                .compare_and_swap(id.as_bytes(), Some(&raw), Some(new))?
            {
                Ok(()) => return Ok(()),
                // Changed meanwhile (its tools updated, or it was deleted): read it again.
                Err(_) => match self.header_for(id, msg.seq) {
                    Ok(now) => raw = now,
                    Err(e) => {
                        self.messages.remove(key.as_slice())?;
                        if let Some(cid) = &msg.client_id {
                            self.client_ids.remove(client_key(id, cid))?;
                        }
                        return Err(e);
                    }
                },
            }
        }
    }

    /// The stored header of a conversation whose next message is `seq`.
    fn header_for(&self, id: &ConversationId, seq: u64) -> Result<sled::IVec, StoreError> {
        let raw = self
            .conversations
            .get(id.as_bytes())?
            .ok_or_else(|| StoreError::NoConversation(id.clone()))?;
        let header: ConversationRecord = decode("conversations", id.as_str(), &raw)?;
        if seq != header.last_seq + 1 {
            return Err(StoreError::SeqConflict {
                conversation: id.clone(),
                expected: header.last_seq + 1,
                got: seq,
            });
        }
        Ok(raw)
    }

    /// Completes an append a crash cut short — its message stored, its client-id entry or
    /// header not — so that the header's `last_seq` is again the newest message's, and answers
    /// the header (`None` for a conversation that does not exist). Nothing such was acked: an
    /// append is acknowledged only after the flush that follows all three writes.
    ///
    /// # Errors
    /// On a storage failure or a corrupt record.
    pub fn repair_tail(
        &self,
        id: &ConversationId,
    ) -> Result<Option<ConversationRecord>, StoreError> {
        let Some(raw) = self.conversations.get(id.as_bytes())? else {
            return Ok(None);
        };
        let mut header: ConversationRecord = decode("conversations", id.as_str(), &raw)?;
        let newest = match self.messages.scan_prefix(id.as_bytes()).next_back() {
            Some(kv) => decode::<MessageRecord>("messages", id.as_str(), &kv?.1)?.seq,
            None => 0,
        };
        if newest == header.last_seq {
            return Ok(Some(header));
        }
        tracing::warn!(conversation = %id, header = header.last_seq, newest, "an append was cut short; completing it");
        let tail = self.messages_after(id, header.last_seq, usize::MAX)?;
        for m in &tail {
            if let (Role::User | Role::Tool, Some(cid)) = (m.role, &m.client_id) {
                self.client_ids
                    .insert(client_key(id, cid), m.seq.to_be_bytes())?;
            }
            header.last_seq = m.seq;
            header.history_tokens += m.history_cost();
        }
        if header.last_seq != newest {
            // A header ahead of its messages (never left by an append, whose header goes
            // last): count again from what is stored.
            header.last_seq = newest;
            header.history_tokens = self
                .messages_after(id, 0, usize::MAX)?
                .iter()
                .map(MessageRecord::history_cost)
                .sum();
        }
        let new = encode(&header)?;
        match self
            .conversations
            .compare_and_swap(id.as_bytes(), Some(raw), Some(new))?
        {
            Ok(()) => Ok(Some(header)),
            // Someone else changed it meanwhile: theirs is as current.
            Err(_) => self.conversation(id),
        }
    }

    /// One stored message.
    ///
    /// # Errors
    /// On a storage failure or a corrupt record.
    pub fn message(
        &self,
        id: &ConversationId,
        seq: u64,
    ) -> Result<Option<MessageRecord>, StoreError> {
        let key = message_key(id, seq);
        self.messages
            .get(key)?
            .map(|v| decode("messages", id.as_str(), &v))
            .transpose()
    }

    /// Up to `limit` messages with `seq > after`, in `seq` order.
    ///
    /// # Errors
    /// On a storage failure or a corrupt record.
    pub fn messages_after(
        &self,
        id: &ConversationId,
        after: u64,
        limit: usize,
    ) -> Result<Vec<MessageRecord>, StoreError> {
        let start = message_key(id, after.saturating_add(1));
        let end = message_key(id, u64::MAX);
        self.messages
            .range(start..=end)
            .take(limit)
            .map(|kv| decode("messages", id.as_str(), &kv?.1))
            .collect()
    }

    /// The conversation's messages newest first, read lazily (trimming stops early).
    pub fn messages_newest_first<'a>(
        &'a self,
        id: &'a ConversationId,
    ) -> impl Iterator<Item = Result<MessageRecord, StoreError>> + 'a {
        self.messages
            .scan_prefix(id.as_bytes())
            .rev()
            .map(move |kv| decode("messages", id.as_str(), &kv?.1))
    }

    /// The seq of the user message sent with `client_id`, if there is one.
    ///
    /// # Errors
    /// On a storage failure or a corrupt index entry.
    pub fn seq_for_client_id(
        &self,
        id: &ConversationId,
        client_id: &str,
    ) -> Result<Option<u64>, StoreError> {
        let Some(raw) = self.client_ids.get(client_key(id, client_id))? else {
            return Ok(None);
        };
        let bytes: [u8; 8] = raw.as_ref().try_into().map_err(|_| StoreError::Corrupt {
            tree: "client_ids",
            key: id.to_string(),
            message: "seq is not 8 bytes".into(),
        })?;
        Ok(Some(u64::from_be_bytes(bytes)))
    }

    // ---- PII placeholders ----

    /// A conversation's PII placeholder vault.
    ///
    /// # Errors
    /// Storage failures or a corrupt record.
    pub fn pii_vault<T: DeserializeOwned>(
        &self,
        id: &ConversationId,
    ) -> Result<Option<T>, StoreError> {
        self.pii_vaults
            .get(id.as_bytes())?
            .map(|v| decode("pii_vaults", id.as_str(), &v))
            .transpose()
    }

    /// Replaces a conversation's vault (flushed with the turn's next durable write).
    ///
    /// # Errors
    /// Storage failures.
    pub fn put_pii_vault<T: Serialize>(
        &self,
        id: &ConversationId,
        vault: &T,
    ) -> Result<(), StoreError> {
        self.pii_vaults.insert(id.as_bytes(), encode(vault)?)?;
        Ok(())
    }

    // ---- checkpoints of streaming replies ----

    /// Checkpoints the reply to message `reply_to` as streamed so far.
    ///
    /// # Errors
    /// Storage failures.
    pub fn put_partial(
        &self,
        id: &ConversationId,
        reply_to: u64,
        text: &str,
    ) -> Result<(), StoreError> {
        let mut value = Vec::with_capacity(8 + text.len());
        value.extend_from_slice(&reply_to.to_be_bytes());
        value.extend_from_slice(text.as_bytes());
        self.partials.insert(id.as_bytes(), value)?;
        Ok(())
    }

    /// The checkpointed reply of a conversation, if there is one: the message it answers and
    /// its text.
    ///
    /// # Errors
    /// Storage failures.
    pub fn partial(&self, id: &ConversationId) -> Result<Option<(u64, String)>, StoreError> {
        Ok(self.partials.get(id.as_bytes())?.and_then(|raw| {
            let seq = u64::from_be_bytes(raw.get(..8)?.try_into().ok()?);
            let text = String::from_utf8_lossy(raw.get(8..)?).into_owned();
            Some((seq, text))
        }))
    }

    /// Drops a conversation's checkpoint (its reply was stored).
    ///
    /// # Errors
    /// Storage failures.
    pub fn remove_partial(&self, id: &ConversationId) -> Result<(), StoreError> {
        self.partials.remove(id.as_bytes())?;
        Ok(())
    }

    // ---- keys ----

    /// Stores a key record under the hash of its secret.
    ///
    /// # Errors
    /// On a storage failure.
    pub async fn put_key(&self, hash: &str, rec: &KeyRecord) -> Result<(), StoreError> {
        let (Tree::Sled(keys), Tree::Sled(key_ids)) = (&self.keys, &self.key_ids) else {
            if let (Tree::Redis(keys), Tree::Redis(ids)) = (&self.keys, &self.key_ids) {
                kv::Txn::default()
                    .insert(keys, hash.as_bytes(), &encode(rec)?)
                    .insert(ids, rec.id.as_bytes(), hash.as_bytes())
                    .commit()?;
            }
            return Ok(());
        };
        (keys, key_ids)
            .transaction(|(keys, ids)| {
                keys.insert(
                    hash.as_bytes(),
                    encode(rec).map_err(ConflictableTransactionError::Abort)?,
                )?;
                ids.insert(rec.id.as_bytes(), hash.as_bytes())?;
                Ok(())
            })
            .map_err(tx_error)?;
        self.flush().await
    }

    /// The key whose secret hashes to `hash`.
    ///
    /// # Errors
    /// On a storage failure or a corrupt record.
    pub fn key_by_hash(&self, hash: &str) -> Result<Option<KeyRecord>, StoreError> {
        self.keys
            .get(hash.as_bytes())?
            .map(|v| decode("keys", "<hash>", &v))
            .transpose()
    }

    /// The key with id `id`, if it exists (not revoked).
    ///
    /// # Errors
    /// On a storage failure or a corrupt record.
    pub fn key_by_id(&self, id: &str) -> Result<Option<KeyRecord>, StoreError> {
        let Some(hash) = self.key_ids.get(id.as_bytes())? else {
            return Ok(None);
        };
        self.key_by_hash(&String::from_utf8_lossy(&hash))
    }

    /// Every key, without secrets (none are stored).
    ///
    /// # Errors
    /// On a storage failure or a corrupt record.
    pub fn list_keys(&self) -> Result<Vec<KeyRecord>, StoreError> {
        self.keys
            .iter()
            .values()
            .map(|v| decode("keys", "<hash>", &v?))
            .collect()
    }

    /// Revokes a key; answers whether it existed.
    ///
    /// # Errors
    /// On a storage failure.
    pub async fn delete_key(&self, id: &str) -> Result<bool, StoreError> {
        let Some(hash) = self.key_ids.remove(id.as_bytes())? else {
            return Ok(false);
        };
        self.keys.remove(hash)?;
        self.flush().await?;
        Ok(true)
    }
}

fn tx_error(e: TransactionError<StoreError>) -> StoreError {
    match e {
        TransactionError::Abort(e) => e,
        TransactionError::Storage(e) => e.into(),
    }
}

fn message_key(id: &ConversationId, seq: u64) -> [u8; ConversationId::LEN + 8] {
    let mut key = [0u8; ConversationId::LEN + 8];
    key[..ConversationId::LEN].copy_from_slice(id.as_bytes());
    key[ConversationId::LEN..].copy_from_slice(&seq.to_be_bytes());
    key
}

fn client_key(id: &ConversationId, client_id: &str) -> Vec<u8> {
    let mut key = Vec::with_capacity(ConversationId::LEN + client_id.len());
    key.extend_from_slice(id.as_bytes());
    key.extend_from_slice(client_id.as_bytes());
    key
}

fn encode<T: Serialize>(value: &T) -> Result<Vec<u8>, StoreError> {
    serde_json::to_vec(value).map_err(|e| StoreError::Corrupt {
        tree: "encode",
        key: String::new(),
        message: e.to_string(),
    })
}

fn decode<T: DeserializeOwned>(tree: &'static str, key: &str, raw: &[u8]) -> Result<T, StoreError> {
    serde_json::from_slice(raw).map_err(|e| StoreError::Corrupt {
        tree,
        key: key.to_owned(),
        message: e.to_string(),
    })
}

#[cfg(test)]
mod tests;

/// A conversation's key in `conversations_by_tenant`: its tenant, then its creation time and id
/// (so a tenant's keys sort oldest first).
fn listing_key(rec: &ConversationRecord) -> Vec<u8> {
    let mut k = rec.tenant.as_str().as_bytes().to_vec();
    k.push(0);
    k.extend_from_slice(&rec.created_at.to_be_bytes());
    k.extend_from_slice(rec.id.as_str().as_bytes());
    k
}
