//! The connection to Redis shared by every part of a clustered node: a small pool of
//! synchronous connections with read and write timeouts, and a fail-fast gate.
//!
//! Storage calls are synchronous (they were sled's, a few microseconds each); on Redis each is
//! one loopback or LAN round trip. When Redis cannot be reached a call would otherwise wait for
//! its timeout, and the next, and the next: after a failure the gate answers `Unavailable` at
//! once until a probe (one caller per `RETRY_EVERY`) finds Redis back.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::store::StoreError;

/// How often, while Redis is down, one caller tries it again.
const RETRY_EVERY: Duration = Duration::from_millis(200);

/// Timeouts of one Redis call.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub connect: Duration,
    pub io: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            connect: Duration::from_millis(500),
            io: Duration::from_millis(1_000),
        }
    }
}

/// Opens connections with the timeouts set (r2d2's own manager for `redis::Client` sets none,
/// so a stalled Redis would hold a caller forever).
#[derive(Debug)]
struct Manager {
    client: redis::Client,
    timeouts: Timeouts,
}

/// A pooled connection and whether a failed call left it unusable (a reply cut by a timeout
/// would otherwise be read as the answer to the next command).
pub struct Link {
    conn: redis::Connection,
    broken: bool,
}

impl r2d2::ManageConnection for Manager {
    type Connection = Link;
    type Error = redis::RedisError;

    fn connect(&self) -> Result<Self::Connection, Self::Error> {
        let conn = self
            .client
            .get_connection_with_timeout(self.timeouts.connect)?;
        conn.set_read_timeout(Some(self.timeouts.io))?;
        conn.set_write_timeout(Some(self.timeouts.io))?;
        Ok(Link {
            conn,
            broken: false,
        })
    }

    fn is_valid(&self, link: &mut Self::Connection) -> Result<(), Self::Error> {
        redis::cmd("PING").query::<()>(&mut link.conn)
    }

    fn has_broken(&self, link: &mut Self::Connection) -> bool {
        link.broken || !redis::ConnectionLike::is_open(&link.conn)
    }
}

struct Inner {
    pool: r2d2::Pool<Manager>,
    client: redis::Client,
    timeouts: Timeouts,
    /// Set by a failed call, cleared by a successful one.
    down: AtomicBool,
    /// When the last attempt while down was made (ms since `epoch`).
    last_try_ms: AtomicU64,
    epoch: Instant,
    /// Prefixed to every key parley writes.
    prefix: String,
    /// Calls made (each one round trip), for `/metrics`.
    calls: AtomicU64,
}

/// A handle on Redis; cheap to clone.
#[derive(Clone)]
pub struct Redis {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Redis {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Redis")
            .field("prefix", &self.inner.prefix)
            .finish_non_exhaustive()
    }
}

impl Redis {
    /// Connects to `url` (`redis://host:port/db`); keys are written under `prefix`.
    ///
    /// # Errors
    /// When the URL is malformed. An unreachable Redis is not an error here: the node starts
    /// not-ready and serves once Redis answers.
    pub fn connect(url: &str, prefix: &str, timeouts: Timeouts) -> Result<Self, StoreError> {
        let client = redis::Client::open(url).map_err(|e| {
            // The URL may carry a password: name the problem, not the URL.
            StoreError::Unavailable(format!("redis_url is not a Redis URL: {}", e.category()))
        })?;
        let pool = r2d2::Pool::builder()
            .max_size(32)
            .min_idle(Some(0))
            .connection_timeout(timeouts.connect)
            // Connections are tested by use; a failed one is dropped (`has_broken`).
            .test_on_check_out(false)
            .error_handler(Box::new(r2d2::NopErrorHandler))
            .build_unchecked(Manager {
                client: client.clone(),
                timeouts,
            });
        Ok(Self {
            inner: Arc::new(Inner {
                pool,
                client,
                timeouts,
                down: AtomicBool::new(false),
                last_try_ms: AtomicU64::new(0),
                epoch: Instant::now(),
                prefix: prefix.to_owned(),
                calls: AtomicU64::new(0),
            }),
        })
    }

    /// The prefix of every key.
    pub fn prefix(&self) -> &str {
        &self.inner.prefix
    }

    /// `prefix` followed by `name`.
    pub fn key(&self, name: &str) -> String {
        format!("{}{name}", self.inner.prefix)
    }

    /// A new connection of its own (for subscriptions), with the same timeouts but no read
    /// timeout (a subscriber waits for messages).
    ///
    /// # Errors
    /// When Redis cannot be reached.
    pub fn dedicated(&self) -> Result<redis::Connection, StoreError> {
        let conn = self
            .inner
            .client
            .get_connection_with_timeout(self.inner.timeouts.connect)
            .map_err(unavailable)?;
        conn.set_write_timeout(Some(self.inner.timeouts.io))
            .map_err(unavailable)?;
        Ok(conn)
    }

    /// Calls made so far (each one round trip to Redis, a script included).
    pub fn calls(&self) -> u64 {
        self.inner.calls.load(Ordering::Relaxed)
    }

    /// Whether the last call reached Redis.
    pub fn is_up(&self) -> bool {
        !self.inner.down.load(Ordering::Relaxed)
    }

    /// Runs `f` on a pooled connection. A transport failure marks Redis down (later calls fail
    /// at once until a probe succeeds) and is answered `Unavailable`.
    ///
    /// # Errors
    /// `Unavailable` when Redis cannot be reached or answers an error.
    pub fn run<T>(
        &self,
        f: impl FnOnce(&mut redis::Connection) -> redis::RedisResult<T>,
    ) -> Result<T, StoreError> {
        let inner = &self.inner;
        inner.calls.fetch_add(1, Ordering::Relaxed);
        if inner.down.load(Ordering::Relaxed) {
            let now = inner.epoch.elapsed().as_millis() as u64;
            let last = inner.last_try_ms.load(Ordering::Relaxed);
            let due = now.saturating_sub(last) >= RETRY_EVERY.as_millis() as u64;
            // One caller per interval probes; the others fail fast.
            if !due
                || inner
                    .last_try_ms
                    .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                    .is_err()
            {
                return Err(StoreError::Unavailable("Redis cannot be reached".into()));
            }
        }
        let mut conn = match inner.pool.get() {
            Ok(c) => c,
            Err(e) => {
                self.mark_down();
                return Err(StoreError::Unavailable(format!(
                    "Redis cannot be reached: {e}"
                )));
            }
        };
        match f(&mut conn.conn) {
            Ok(v) => {
                inner.down.store(false, Ordering::Relaxed);
                Ok(v)
            }
            Err(e) => {
                if e.is_io_error() || e.is_timeout() || e.is_connection_dropped() {
                    self.mark_down();
                    // The connection may be mid-reply: the pool drops it.
                    conn.broken = true;
                }
                Err(unavailable(e))
            }
        }
    }

    fn mark_down(&self) {
        let inner = &self.inner;
        if !inner.down.swap(true, Ordering::Relaxed) {
            tracing::error!("Redis cannot be reached; requests that need it fail until it is back");
        }
        inner
            .last_try_ms
            .store(inner.epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
    }

    /// Pings Redis (readiness), bypassing the fail-fast gate.
    pub fn ping(&self) -> bool {
        let ok = self
            .inner
            .pool
            .get()
            .ok()
            .and_then(|mut c| redis::cmd("PING").query::<()>(&mut c.conn).ok())
            .is_some();
        if ok {
            self.inner.down.store(false, Ordering::Relaxed);
        } else {
            self.mark_down();
        }
        ok
    }
}

/// A Redis failure as a storage error (no URL, no secret: only the kind and Redis's text).
pub fn unavailable(e: redis::RedisError) -> StoreError {
    StoreError::Unavailable(format!("Redis: {e}"))
}
