//! Cluster mode (PROTOCOL §9): several parley nodes serve one service through Redis.
//!
//! - Storage: every tree of the store lives in Redis (`store::kv`), so any node reads and
//!   writes any conversation, key, prompt, response, cache entry and usage roll-up.
//! - Ownership: a conversation's live actor runs on one node at a time, the one holding its
//!   lease (`lease:<id>` = node id, expiring after `lease_ms` unless renewed). A node takes a
//!   lease when it needs the actor and nobody holds it, renews the leases of its live actors
//!   every third of `lease_ms`, and gives one back when its actor stops. A dead node's leases
//!   lapse, and the next node that needs one of its conversations takes it over.
//! - Relay: traffic for a conversation another node owns is relayed to that node, found by its
//!   advertised address (`node:<id>`, renewed with the leases): HTTP requests are forwarded
//!   whole (`relay::http`), WebSocket frames through a relay socket per client socket and node
//!   (`relay::ws`), so the owner sees an ordinary client and every rule of §3–§8 holds there.
//! - Events: what every node must hear at once (a key revoked) goes over Redis pub/sub.
//! - Limits: per-key rpm/tpm, token and spend budgets with their reservations, and each
//!   provider deployment's buckets are counted in Redis by atomic scripts (`limits`), so they
//!   add up across nodes; breakers and concurrency caps stay per node.

pub mod events;
pub mod limits;
pub mod redis;
pub mod relay;
pub mod testing;

use std::sync::Arc;
use std::time::Duration;

use ::redis::Script;
use std::sync::LazyLock;

use crate::ids::ConversationId;
use crate::store::StoreError;
use redis::Redis;

/// Who runs a conversation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Owner {
    /// This node (it holds the lease).
    Here,
    /// Another node, reachable at `addr`.
    There { node: String, addr: String },
    /// Another node holds the lease but no longer announces itself: it died, and the lease
    /// lapses within `lease_ms`.
    Lapsing,
}

/// This node's part in the cluster; cheap to clone.
#[derive(Clone)]
pub struct Cluster {
    inner: Arc<Inner>,
}

struct Inner {
    redis: Redis,
    node: String,
    advertise: String,
    lease: Duration,
    /// For relayed HTTP requests (streamed answers: no overall timeout).
    http: reqwest::Client,
}

/// Takes the lease for ARGV[1] (node id) unless another node holds it; answers the holder.
static ACQUIRE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"local cur = redis.call('GET', KEYS[1])
if not cur or cur == ARGV[1] then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', tonumber(ARGV[2]))
  return ARGV[1]
end
return cur",
    )
});

/// Renews every lease in KEYS held by ARGV[1]; answers the positions (1-based) of those it
/// no longer holds.
static RENEW: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"local lost = {}
for i, k in ipairs(KEYS) do
  if redis.call('GET', k) == ARGV[1] then
    redis.call('PEXPIRE', k, tonumber(ARGV[2]))
  else
    lost[#lost + 1] = i
  end
end
return lost",
    )
});

/// Deletes KEYS[1] if ARGV[1] holds it.
static RELEASE: LazyLock<Script> = LazyLock::new(|| {
    Script::new(
        r"if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0",
    )
});

impl Cluster {
    pub fn new(redis: Redis, node: String, advertise: String, lease: Duration) -> Self {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(2))
            .redirect(reqwest::redirect::Policy::none())
            .tcp_nodelay(true)
            .build()
            .unwrap_or_default();
        Self {
            inner: Arc::new(Inner {
                redis,
                node,
                advertise,
                lease,
                http,
            }),
        }
    }

    /// The client relayed HTTP requests go out on.
    pub fn http(&self) -> &reqwest::Client {
        &self.inner.http
    }

    pub fn redis(&self) -> &Redis {
        &self.inner.redis
    }

    pub fn node(&self) -> &str {
        &self.inner.node
    }

    pub fn advertise(&self) -> &str {
        &self.inner.advertise
    }

    pub fn lease(&self) -> Duration {
        self.inner.lease
    }

    fn lease_ms(&self) -> u64 {
        u64::try_from(self.inner.lease.as_millis()).unwrap_or(u64::MAX)
    }

    fn lease_key(&self, id: &ConversationId) -> String {
        self.inner.redis.key(&format!("lease:{id}"))
    }

    fn node_key(&self, node: &str) -> String {
        self.inner.redis.key(&format!("node:{node}"))
    }

    /// Who runs `id` now, without taking it.
    ///
    /// # Errors
    /// `Unavailable` when Redis cannot be reached.
    pub fn owner(&self, id: &ConversationId) -> Result<Option<Owner>, StoreError> {
        let key = self.lease_key(id);
        let holder: Option<String> = self
            .inner
            .redis
            .run(|c| ::redis::cmd("GET").arg(&key).query(c))?;
        holder.map(|h| self.resolve(h)).transpose()
    }

    /// Takes `id` for this node unless another holds it; answers who runs it.
    ///
    /// # Errors
    /// `Unavailable` when Redis cannot be reached.
    pub fn acquire(&self, id: &ConversationId) -> Result<Owner, StoreError> {
        let key = self.lease_key(id);
        let holder: String = self.inner.redis.run(|c| {
            ACQUIRE
                .key(&key)
                .arg(&self.inner.node)
                .arg(self.lease_ms())
                .invoke(c)
        })?;
        self.resolve(holder)
    }

    fn resolve(&self, holder: String) -> Result<Owner, StoreError> {
        if holder == self.inner.node {
            return Ok(Owner::Here);
        }
        let key = self.node_key(&holder);
        let addr: Option<String> = self
            .inner
            .redis
            .run(|c| ::redis::cmd("GET").arg(&key).query(c))?;
        Ok(match addr {
            Some(addr) => Owner::There { node: holder, addr },
            None => Owner::Lapsing,
        })
    }

    /// Renews the leases of `ids` (this node's live conversations) and this node's address;
    /// answers the conversations whose lease this node no longer holds.
    ///
    /// # Errors
    /// `Unavailable` when Redis cannot be reached.
    pub fn renew(&self, ids: &[ConversationId]) -> Result<Vec<ConversationId>, StoreError> {
        let node_key = self.node_key(&self.inner.node);
        let ms = self.lease_ms();
        self.inner.redis.run(|c| {
            ::redis::cmd("SET")
                .arg(&node_key)
                .arg(&self.inner.advertise)
                .arg("PX")
                .arg(ms)
                .query::<()>(c)
        })?;
        let mut lost = Vec::new();
        for chunk in ids.chunks(512) {
            let mut inv = RENEW.prepare_invoke();
            for id in chunk {
                inv.key(self.lease_key(id));
            }
            inv.arg(&self.inner.node).arg(ms);
            let gone: Vec<usize> = self.inner.redis.run(|c| inv.invoke(c))?;
            lost.extend(
                gone.into_iter()
                    .filter_map(|i| chunk.get(i.checked_sub(1)?).cloned()),
            );
        }
        Ok(lost)
    }

    /// Gives `id` back (its actor stopped), so another node may take it at once.
    pub fn release(&self, id: &ConversationId) {
        let key = self.lease_key(id);
        let released = self
            .inner
            .redis
            .run(|c| RELEASE.key(&key).arg(&self.inner.node).invoke::<i64>(c));
        if let Err(e) = released {
            // It lapses by itself within the lease time.
            tracing::debug!(conversation = %id, error = %e, "lease not released");
        }
    }

    /// Whether `node` still announces itself (a Redis failure counts as alive: nothing is
    /// taken from a node that may be running).
    pub fn alive(&self, node: &str) -> bool {
        let key = self.node_key(node);
        self.inner
            .redis
            .run(|c| ::redis::cmd("EXISTS").arg(&key).query::<bool>(c))
            .unwrap_or(true)
    }

    /// Stops announcing this node (shutdown): relays to it stop at once.
    pub fn leave(&self) {
        let key = self.node_key(&self.inner.node);
        let _ = self
            .inner
            .redis
            .run(|c| ::redis::cmd("DEL").arg(&key).query::<()>(c));
    }
}
