//! The fake LLM provider behind `parley mock-upstream`, the integration tests and the load bench.
//! It speaks OpenAI (`/v1/chat/completions`, `/v1/embeddings`, `/v1/models`) and Anthropic
//! (`/v1/messages`), streaming and not; replies come from [`generator`], so they are
//! deterministic per seed and request. Faults are drawn per request (`error_rate`,
//! `rate_limit_rate`) or asked for by directives in the prompt (see [`generator`]). Both wires
//! carry tools (calls and results), images and (OpenAI) `response_format`: `server` reads them into
//! a [`generator::MockRequest`], refusing with a 400 what the real API refuses, and `tools` holds
//! the tool-use rules the generator applies.

pub mod generator;
mod server;
pub(crate) use server::embed;
mod tools;

use std::collections::VecDeque;
use std::net::{SocketAddr, TcpListener};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::{Mutex, RwLock};

use crate::cli::MockArgs;

/// Waits `d`, to within the scheduler's wake-up rather than tokio's millisecond tick (which
/// makes a 5 ms wait last 5 to 6 ms): a load driver subtracts the mock's time to first token
/// from what it measures, so the wait must be what it says. A timer descriptor that cannot be
/// made (or read) leaves the rest of the wait to tokio's timer.
pub async fn sleep(d: Duration) {
    if d.is_zero() {
        return;
    }
    let deadline = std::time::Instant::now() + d;
    #[cfg(target_os = "linux")]
    if let Ok(delay) = tokio_timerfd::Delay::new(deadline) {
        if delay.await.is_ok() {
            return;
        }
    }
    tokio::time::sleep_until(deadline.into()).await;
}

/// Request bodies kept for inspection (the newest).
const RECEIVED_KEPT: usize = 1000;

/// How the mock behaves for every request (directives in a prompt override per request).
#[derive(Debug, Clone, Default)]
pub struct Behaviour {
    pub ttft: Duration,
    /// Chunks per second; 0 streams as fast as possible.
    pub tokens_per_sec: f64,
    pub error_rate: f64,
    pub rate_limit_rate: f64,
    pub seed: u64,
    /// Break every streamed reply after this many chunks (tests set it; no CLI flag).
    pub drop_after: Option<usize>,
}

impl From<&MockArgs> for Behaviour {
    fn from(a: &MockArgs) -> Self {
        Self {
            ttft: Duration::from_millis(a.ttft_ms),
            tokens_per_sec: a.tokens_per_sec,
            error_rate: a.error_rate,
            rate_limit_rate: a.rate_limit_rate,
            seed: a.seed,
            drop_after: None,
        }
    }
}

/// Shared state of a running mock.
pub struct MockState {
    behaviour: RwLock<Behaviour>,
    requests: AtomicU64,
    /// Embedding requests and the texts they carried.
    embeddings: AtomicU64,
    embedded_texts: AtomicU64,
    received: Mutex<VecDeque<serde_json::Value>>,
    draws: Mutex<u64>,
}

impl MockState {
    fn new(behaviour: Behaviour) -> Self {
        let draws = Mutex::new(behaviour.seed ^ 0x5eed);
        Self {
            behaviour: RwLock::new(behaviour),
            requests: AtomicU64::new(0),
            embeddings: AtomicU64::new(0),
            embedded_texts: AtomicU64::new(0),
            received: Mutex::new(VecDeque::new()),
            draws,
        }
    }

    fn record(&self, body: &serde_json::Value) {
        self.requests.fetch_add(1, Ordering::Relaxed);
        let mut received = self.received.lock();
        if received.len() == RECEIVED_KEPT {
            received.pop_front();
        }
        received.push_back(body.clone());
    }

    /// A uniform draw in [0, 1) from the seeded sequence.
    fn draw(&self) -> f64 {
        let mut s = self.draws.lock();
        *s = s.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = *s;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        ((z ^ (z >> 31)) >> 11) as f64 / (1u64 << 53) as f64
    }
}

/// A mock upstream running on its own thread, for tests and benches.
pub struct MockUpstream {
    addr: SocketAddr,
    state: Arc<MockState>,
    handle: actix_web::dev::ServerHandle,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl MockUpstream {
    /// Starts a mock on `127.0.0.1:0`.
    ///
    /// # Errors
    /// When the port cannot be bound or the server thread cannot start.
    pub fn spawn(behaviour: Behaviour) -> std::io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let state = Arc::new(MockState::new(behaviour));
        let (tx, rx) = std::sync::mpsc::channel();
        let thread_state = Arc::clone(&state);
        let thread = std::thread::Builder::new()
            .name("mock-upstream".into())
            .spawn(move || {
                let system = actix_web::rt::System::new();
                system.block_on(async move {
                    match server::build(listener, thread_state, 1) {
                        Ok(server) => {
                            let _ = tx.send(Ok(server.handle()));
                            let _ = server.await;
                        }
                        Err(e) => {
                            let _ = tx.send(Err(e));
                        }
                    }
                });
            })?;
        let handle = rx.recv().map_err(std::io::Error::other)??;
        Ok(Self {
            addr,
            state,
            handle,
            thread: Some(thread),
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// The base URL to configure a provider with (`http://127.0.0.1:PORT/v1`).
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// Generation requests received so far (chat completions and messages).
    pub fn requests(&self) -> u64 {
        self.state.requests.load(Ordering::Relaxed)
    }

    /// Embedding requests received so far, and the texts they carried.
    pub fn embedding_requests(&self) -> (u64, u64) {
        (
            self.state.embeddings.load(Ordering::Relaxed),
            self.state.embedded_texts.load(Ordering::Relaxed),
        )
    }

    /// The bodies of the newest generation requests, oldest first.
    pub fn received(&self) -> Vec<serde_json::Value> {
        self.state.received.lock().iter().cloned().collect()
    }

    pub fn set_behaviour(&self, behaviour: Behaviour) {
        *self.state.behaviour.write() = behaviour;
    }

    /// Stops the server and waits for its thread.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        let stopping = self.handle.stop(false);
        if let Some(thread) = self.thread.take() {
            drop(stopping);
            let _ = thread.join();
        }
    }
}

impl Drop for MockUpstream {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Runs `parley mock-upstream` until SIGINT/SIGTERM.
///
/// # Errors
/// When the address cannot be bound.
pub async fn serve(args: &MockArgs) -> std::io::Result<()> {
    let listener = TcpListener::bind(&args.listen)?;
    let addr = listener.local_addr()?;
    let server = server::build(listener, Arc::new(MockState::new(Behaviour::from(args))), 0)?;
    tracing::info!(%addr, "mock upstream listening on {addr}");
    server.await
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    #[tokio::test]
    async fn sleep_waits_at_least_its_duration() {
        for d in [Duration::from_micros(1500), Duration::from_millis(3)] {
            let started = Instant::now();
            super::sleep(d).await;
            assert!(started.elapsed() >= d, "woke before {d:?}");
        }
        // Zero returns at once, without a timer.
        super::sleep(Duration::ZERO).await;
    }
}
