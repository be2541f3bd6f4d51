//! Scenario `acks`: C conversations (one socket each), each keeping a window of W user messages
//! sent but not yet acked; `ack`s (the message is durably stored, PROTOCOL §5) are counted over
//! D seconds. A user message is acked when its turn starts, so replies are made cheap: the
//! built-in mock with no wait and one-word replies.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::task::JoinSet;

use super::client::{self, Ws};
use super::{env_or, Row};

pub struct Acks {
    pub conversations: usize,
    pub window: usize,
    pub secs: u64,
}

impl Acks {
    pub fn from_env(quick: bool) -> Self {
        Self {
            conversations: env_or("WS_ACK_CONVERSATIONS", if quick { 20 } else { 1000 }).max(1),
            // The server queues up to 32 turns per conversation ([server] max_queued_turns).
            window: env_or("WS_ACK_WINDOW", 8).clamp(1, 32),
            secs: env_or("WS_ACK_SECONDS", if quick { 1 } else { 10 }) as u64,
        }
    }
}

#[derive(Default)]
struct Counts {
    acks: AtomicU64,
    dones: AtomicU64,
    errors: AtomicU64,
}

async fn conversation(
    mut ws: Ws,
    id: String,
    window: usize,
    go: Arc<AtomicBool>,
    counts: Arc<Counts>,
) {
    let mut sent = 0usize;
    let mut acked = 0usize;
    let message = |n: usize| json!({"type": "user_message", "conversation": id, "client_id": format!("m{n}"), "content": format!("message {n} [[mock:words=1]]")});
    while go.load(Ordering::Relaxed) {
        while sent < acked + window {
            sent += 1;
            if client::send(&mut ws, &message(sent)).await.is_err() {
                return;
            }
        }
        let Ok(frame) =
            tokio::time::timeout(Duration::from_millis(200), client::recv(&mut ws)).await
        else {
            continue;
        };
        let Some(frame) = frame else { return };
        match frame["type"].as_str() {
            Some("ack") => {
                acked += 1;
                if go.load(Ordering::Relaxed) {
                    counts.acks.fetch_add(1, Ordering::Relaxed);
                }
            }
            Some("done") => {
                counts.dones.fetch_add(1, Ordering::Relaxed);
            }
            Some("error") => {
                // A refused message frees its slot in the window.
                acked += 1;
                counts.errors.fetch_add(1, Ordering::Relaxed);
            }
            _ => {}
        }
    }
    client::close(ws, Duration::from_secs(2)).await;
}

pub async fn run(cfg: &Acks, server: SocketAddr) -> Vec<Row> {
    let mut sockets = Vec::new();
    for i in 0..cfg.conversations {
        match client::open_conversation(client::source(i, 20_000), server, Duration::from_secs(30))
            .await
        {
            Ok(s) => sockets.push(s),
            Err(e) => return vec![Row::new("acks", "setup failed", client::kind(&e))],
        }
    }
    let go = Arc::new(AtomicBool::new(true));
    let counts = Arc::new(Counts::default());
    let mut tasks = JoinSet::new();
    let start = Instant::now();
    for (ws, id) in sockets {
        tasks.spawn(conversation(ws, id, cfg.window, go.clone(), counts.clone()));
    }
    let mut per_second = Vec::new();
    let mut last = 0;
    for s in 1..=cfg.secs {
        tokio::time::sleep_until((start + Duration::from_secs(s)).into()).await;
        let now = counts.acks.load(Ordering::Relaxed);
        per_second.push(now - last);
        last = now;
    }
    go.store(false, Ordering::Relaxed);
    let elapsed = start.elapsed();
    let acks = counts.acks.load(Ordering::Relaxed);
    let dones = counts.dones.load(Ordering::Relaxed);
    let errors = counts.errors.load(Ordering::Relaxed);
    while tokio::time::timeout(Duration::from_secs(10), tasks.join_next())
        .await
        .ok()
        .flatten()
        .is_some()
    {}
    let best = per_second.iter().max().copied().unwrap_or(0);
    let worst = per_second.iter().min().copied().unwrap_or(0);
    vec![
        Row::new(
            "acks",
            "settings",
            format!(
                "{} conversations, window {} unacked each, {} s, 1-word replies, upstream TTFT 0",
                cfg.conversations, cfg.window, cfg.secs
            ),
        ),
        Row::new(
            "acks",
            "durably acked user messages",
            format!(
                "{:.0}/s (seconds: min {worst}, max {best}) (target ≥ 20 000/s)",
                acks as f64 / elapsed.as_secs_f64()
            ),
        ),
        Row::new(
            "acks",
            "replies done / errors",
            format!("{:.0}/s / {errors}", dones as f64 / elapsed.as_secs_f64()),
        ),
    ]
}
