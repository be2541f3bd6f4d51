//! `Registry`: conversation id → its live actor, started on demand under a `Supervisor`: on the
//! worker thread of the connection that asked for it, or else on one of the conversation
//! arbiters.
//!
//! The registry holds each actor weakly. An idle actor stops; if nobody holds its address it
//! ends, and the next `get` starts a fresh one from storage. If a message is on its way (a
//! caller got the address just before), the supervisor restarts the same actor, still the
//! registry's, and it serves the message: there is never a second actor for one conversation,
//! nor a revived one that answers `not_found`. Deleting a conversation removes its entry and
//! stops its actor for good.

use std::cell::Cell;
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use actix::prelude::*;
use actix::WeakAddr;
use parking_lot::Mutex;

use super::actor::ConversationActor;
use super::messages::Shutdown;
use super::Deps;
use crate::error::{ApiError, ErrorCode};
use crate::ids::{unix_now, ConversationId, TenantId};
use crate::store::ConversationRecord;
use crate::tokens;

#[derive(Clone)]
pub struct Registry {
    inner: Arc<Inner>,
}

struct Inner {
    deps: Arc<Deps>,
    actors: Mutex<HashMap<ConversationId, Entry>>,
    /// Conversations being deleted: no actor is started for them meanwhile (always locked
    /// after `actors`).
    deleting: Mutex<std::collections::HashSet<ConversationId>>,
    arbiters: Vec<ArbiterHandle>,
    next: AtomicUsize,
}

thread_local! {
    /// Whether this thread is one of the HTTP server's workers ([`mark_worker_thread`]).
    static ON_WORKER: Cell<bool> = const { Cell::new(false) };
}

/// Marks the calling thread as an HTTP worker: conversations started from it run on it. The
/// server's app factory calls it, as actix-web runs the factory once on each worker thread.
pub fn mark_worker_thread() {
    ON_WORKER.with(|w| w.set(true));
}

/// Actors started between two sweeps of the entries of actors that ended.
const SWEEP_EVERY: usize = 1024;

/// A started actor, and what every frame for its conversation checks: its owner and route.
/// Both are fixed when the conversation is created, so a frame for a live conversation needs
/// no read of the store.
struct Entry {
    actor: WeakAddr<ConversationActor>,
    tenant: TenantId,
    model: String,
}

fn alive(entry: &Entry) -> Option<Addr<ConversationActor>> {
    entry.actor.upgrade().filter(Addr::connected)
}

/// A live conversation actor and the conversation's route.
pub struct Live {
    pub addr: Addr<ConversationActor>,
    pub model: String,
}

impl Live {
    /// Sends `msg` and waits for its answer. A closed mailbox means the actor stopped for
    /// good (an actor that means to live is restarted by its supervisor): its conversation
    /// was deleted meanwhile, or the server is shutting down, so the answer is `not_found`.
    ///
    /// # Errors
    /// The actor's own refusal, or `not_found`.
    pub async fn ask<M, R>(&self, msg: M) -> Result<R, ApiError>
    where
        M: Message<Result = Result<R, ApiError>> + Send + 'static,
        R: Send + 'static,
        ConversationActor: Handler<M>,
    {
        match self.addr.send(msg).await {
            Ok(answer) => answer,
            Err(_) => Err(ApiError::not_found("conversation")),
        }
    }
}

/// What a client gives to create a conversation.
#[derive(Debug, Default, Clone)]
pub struct NewConversation {
    pub model: Option<String>,
    pub system: Option<String>,
    /// A versioned system prompt (`name@3`, `name@latest`), instead of `system`.
    pub prompt: Option<String>,
    pub metadata: Option<serde_json::Value>,
    /// `window` or `recall` (the configured default when absent).
    pub memory: Option<crate::domain::MemoryMode>,
    pub tools: Vec<crate::domain::Tool>,
    pub tool_choice: Option<crate::domain::ToolChoice>,
}

impl Registry {
    /// `arbiters` host the conversation actors (at least one).
    pub fn new(deps: Arc<Deps>, arbiters: Vec<ArbiterHandle>) -> Self {
        Self {
            inner: Arc::new(Inner {
                deps,
                actors: Mutex::new(HashMap::new()),
                deleting: Mutex::new(std::collections::HashSet::new()),
                arbiters,
                next: AtomicUsize::new(0),
            }),
        }
    }

    pub fn deps(&self) -> &Arc<Deps> {
        &self.inner.deps
    }

    /// Creates and durably stores a conversation of `tenant`.
    ///
    /// # Errors
    /// `model_not_found` for an unknown route, `too_large` for a system prompt over the budget.
    pub async fn create(
        &self,
        tenant: &TenantId,
        new: NewConversation,
    ) -> Result<ConversationRecord, ApiError> {
        let deps = self.deps();
        let stored = deps.store.tenant_conversations(tenant)?;
        if stored >= deps.max_conversations_per_tenant {
            return Err(ApiError::new(
                ErrorCode::QuotaExceeded,
                format!(
                    "this tenant keeps {stored} conversations, the most it may; delete some first"
                ),
            ));
        }
        let model = new.model.unwrap_or_else(|| "default".into());
        if !deps.router.has_route(&model) {
            return Err(ApiError::new(
                ErrorCode::ModelNotFound,
                format!("model {model:?} does not exist"),
            ));
        }
        let system_tokens = match &new.system {
            Some(s) => tokens::count_async(deps.router.encoding(&model), s.clone()).await,
            None => 0,
        };
        if new.system.is_some() {
            tokens::fit_history(deps.budget, Some(system_tokens), 0, [])
                .map_err(|e| ApiError::new(ErrorCode::TooLarge, format!("system prompt: {e}")))?;
        }
        if let Some(reference) = &new.prompt {
            if new.system.is_some() {
                return Err(ApiError::bad_request("give system or prompt, not both"));
            }
            super::prompts::resolve(&deps.store, reference)?;
        }
        let record = ConversationRecord {
            id: ConversationId::generate(),
            tenant: tenant.clone(),
            model,
            system: new.system,
            system_tokens,
            prompt: new.prompt,
            metadata: new.metadata.unwrap_or_else(|| serde_json::json!({})),
            created_at: unix_now(),
            last_seq: 0,
            history_tokens: 0,
            memory: new.memory.unwrap_or(deps.memory.mode),
            tools: new.tools,
            tool_choice: new.tool_choice,
        };
        deps.store.create_conversation(&record).await?;
        Ok(record)
    }

    /// The live actor of a conversation of `tenant`, started if needed, with the
    /// conversation's route (model).
    ///
    /// # Errors
    /// `not_found` when the conversation does not exist or belongs to another tenant.
    pub fn get(&self, id: &ConversationId, tenant: &TenantId) -> Result<Live, ApiError> {
        {
            let actors = self.inner.actors.lock();
            if let Some((entry, addr)) = actors.get(id).and_then(|e| Some((e, alive(e)?))) {
                // Another tenant's conversation is "not found", as from the store.
                if &entry.tenant != tenant {
                    return Err(ApiError::not_found("conversation"));
                }
                let model = entry.model.clone();
                return Ok(Live { addr, model });
            }
        }
        // Not live: read outside the lock, then start one unless someone did meanwhile.
        let record = self.deps().store.owned_conversation(id, tenant)?;
        let model = record.model.clone();
        if let Some(cluster) = &self.deps().cluster {
            // One live actor per conversation in the whole cluster: the lease holder's.
            // Callers relay to the owner first; this is a node that lost that race.
            if cluster.acquire(id)? != crate::cluster::Owner::Here {
                return Err(ApiError::new(
                    ErrorCode::UpstreamUnavailable,
                    "the conversation is running on another node; try again",
                )
                .with_retry_after(Duration::from_millis(200)));
            }
        }
        let mut actors = self.inner.actors.lock();
        if let Some(addr) = actors.get(id).and_then(alive) {
            return Ok(Live { addr, model });
        }
        if self.inner.deleting.lock().contains(id) {
            return Err(ApiError::not_found("conversation"));
        }
        let n = self.inner.next.fetch_add(1, Ordering::Relaxed);
        if n % SWEEP_EVERY == SWEEP_EVERY - 1 {
            actors.retain(|_, entry| alive(entry).is_some());
        }
        // A conversation started by a request or a socket runs on that connection's worker
        // thread: its turns then go from the socket to the actor, the upstream and back without
        // waking another thread. Started elsewhere (jobs, batch, a cluster takeover), it goes
        // to the conversation arbiters in turn.
        let arbiter = ON_WORKER
            .with(Cell::get)
            .then(Arbiter::try_current)
            .flatten()
            .or_else(|| {
                let i = n % self.inner.arbiters.len().max(1);
                self.inner.arbiters.get(i).cloned()
            })
            .unwrap_or_else(Arbiter::current);
        let deps = Arc::clone(&self.inner.deps);
        let owner = record.tenant.clone();
        let addr =
            Supervisor::start_in_arbiter(&arbiter, move |_| ConversationActor::new(record, deps));
        let entry = Entry {
            actor: addr.downgrade(),
            tenant: owner,
            model: model.clone(),
        };
        actors.insert(id.clone(), entry);
        Ok(Live { addr, model })
    }

    /// Deletes a conversation: stops its actor (cancelling its turn), then removes its data.
    ///
    /// # Errors
    /// `not_found` as for [`Registry::get`]; storage failures.
    pub async fn delete(&self, id: &ConversationId, tenant: &TenantId) -> Result<(), ApiError> {
        self.deps().store.owned_conversation(id, tenant)?;
        let live = {
            // Atomically with `get`: from here on no caller starts a new actor for it.
            let mut actors = self.inner.actors.lock();
            self.inner.deleting.lock().insert(id.clone());
            actors.remove(id)
        };
        if let Some(addr) = live.as_ref().and_then(alive) {
            // A stopped actor has nothing to wait for.
            let _ = addr.send(Shutdown).await;
        }
        let deleted = self.deps().store.delete_conversation(id).await;
        self.inner.deleting.lock().remove(id);
        self.deps().cache.forget(deleted?);
        Ok(())
    }

    /// Tells every live conversation that `key_id` was revoked: turns acting for it stop.
    pub fn key_revoked(&self, key_id: &str) {
        let actors: Vec<Addr<ConversationActor>> = self
            .inner
            .actors
            .lock()
            .values()
            .filter_map(alive)
            .collect();
        for addr in actors {
            addr.do_send(super::messages::KeyRevoked {
                key_id: key_id.to_owned(),
            });
        }
    }

    /// The live actor of a conversation, without starting one.
    pub fn peek(&self, id: &ConversationId) -> Option<Addr<ConversationActor>> {
        self.inner.actors.lock().get(id).and_then(alive)
    }

    /// The conversations with a live actor here (cluster mode renews their leases).
    pub fn live_ids(&self) -> Vec<ConversationId> {
        self.inner
            .actors
            .lock()
            .iter()
            .filter(|(_, e)| alive(e).is_some())
            .map(|(id, _)| id.clone())
            .collect()
    }

    /// Stops the actor of a conversation this node no longer holds the lease of (cluster
    /// mode): its turn is cancelled, and the node that holds it now serves it.
    pub fn lost(&self, id: &ConversationId) {
        let live = self.inner.actors.lock().remove(id);
        if let Some(addr) = live.as_ref().and_then(alive) {
            tracing::warn!(conversation = %id, "lease lost to another node; stopping here");
            addr.do_send(Shutdown);
        }
    }

    /// Number of live conversation actors.
    pub fn live(&self) -> usize {
        self.inner
            .actors
            .lock()
            .values()
            .filter(|weak| alive(weak).is_some())
            .count()
    }

    /// Cancels every turn and waits (up to `timeout`) until each has stored what it had.
    pub async fn shutdown(&self, timeout: Duration) {
        let deps = self.deps();
        deps.shutdown.cancel();
        deps.tasks.close();
        if tokio::time::timeout(timeout, deps.tasks.wait())
            .await
            .is_err()
        {
            tracing::error!(
                remaining = deps.tasks.len(),
                "turns still running at shutdown timeout"
            );
        }
    }
}
