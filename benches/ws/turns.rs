//! Scenario `turns`: open loop at R turns/s for D seconds over C conversations (one socket
//! each). Each turn is timed on the client from sending `user_message` to the first `delta`
//! of its reply; the upstream (the built-in mock) waits exactly its configured TTFT, so the
//! overhead is that time minus the TTFT.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use super::client::{self, Ws};
use super::{env_or, ms, percentile, Row};

pub struct Turns {
    pub rate: usize,
    pub secs: u64,
    pub conversations: usize,
    pub words: usize,
    pub upstream_ttft_ms: u64,
}

impl Turns {
    pub fn from_env(quick: bool) -> Self {
        Self {
            rate: env_or("WS_TURNS_RATE", if quick { 100 } else { 1000 }).max(1),
            secs: env_or("WS_TURNS_SECONDS", if quick { 1 } else { 10 }) as u64,
            conversations: env_or("WS_TURNS_CONVERSATIONS", if quick { 10 } else { 200 }).max(1),
            words: env_or("WS_TURNS_WORDS", 5),
            upstream_ttft_ms: env_or("WS_UPSTREAM_TTFT_MS", 0) as u64,
        }
    }
}

#[derive(Default)]
struct Tally {
    /// `user_message` → first `delta`, and → `ack`.
    first_delta: Vec<Duration>,
    ack: Vec<Duration>,
    sent: usize,
    done: usize,
    errors: usize,
}

/// One conversation: sends a turn for every tick it gets, until the ticks end and every turn
/// is answered (or `drain` has passed since).
async fn conversation(
    mut ws: Ws,
    id: String,
    words: usize,
    mut ticks: mpsc::Receiver<()>,
) -> Tally {
    let mut t = Tally::default();
    let mut by_client: HashMap<String, Instant> = HashMap::new();
    let mut by_seq: HashMap<u64, Instant> = HashMap::new();
    let mut ticking = true;
    let mut drain_until = None;
    loop {
        if !ticking && t.done + t.errors >= t.sent {
            break;
        }
        let drain = tokio::time::sleep_until(
            drain_until
                .unwrap_or_else(|| Instant::now() + Duration::from_secs(3600))
                .into(),
        );
        tokio::select! {
            biased;
            frame = client::recv(&mut ws) => {
                let Some(frame) = frame else { break };
                on_frame(&frame, &mut t, &mut by_client, &mut by_seq);
            }
            tick = ticks.recv(), if ticking => {
                if tick.is_none() {
                    ticking = false;
                    drain_until = Some(Instant::now() + Duration::from_secs(10));
                    continue;
                }
                t.sent += 1;
                let cid = format!("t{}", t.sent);
                let content = format!("turn {} of a load test [[mock:words={words}]]", t.sent);
                let frame = json!({"type": "user_message", "conversation": id, "client_id": cid, "content": content});
                by_client.insert(cid, Instant::now());
                if client::send(&mut ws, &frame).await.is_err() {
                    break;
                }
            }
            () = drain => break,
        }
    }
    // Turns without an answer by the end of the drain count as errors.
    t.errors = t.errors.max(t.sent - t.done);
    client::close(ws, Duration::from_secs(5)).await;
    t
}

fn on_frame(
    f: &Value,
    t: &mut Tally,
    by_client: &mut HashMap<String, Instant>,
    by_seq: &mut HashMap<u64, Instant>,
) {
    let at = Instant::now();
    match f["type"].as_str() {
        Some("ack") => {
            let sent = f["client_id"].as_str().and_then(|c| by_client.remove(c));
            if let (Some(sent), Some(seq)) = (sent, f["seq"].as_u64()) {
                t.ack.push(at - sent);
                by_seq.insert(seq, sent);
            }
        }
        Some("delta") => {
            if let Some(sent) = f["reply_to"].as_u64().and_then(|s| by_seq.remove(&s)) {
                t.first_delta.push(at - sent);
            }
        }
        Some("done") => t.done += 1,
        Some("error") => {
            t.errors += 1;
            if let Some(c) = f["client_id"].as_str() {
                by_client.remove(c);
            }
            if let Some(s) = f["reply_to"].as_u64() {
                by_seq.remove(&s);
            }
        }
        _ => {}
    }
}

/// The scenario against one server (see [`run_on`]).
pub async fn run(cfg: &Turns, server: SocketAddr, cpu_of: &[u32]) -> Vec<Row> {
    run_on(cfg, &[server], false, cpu_of).await
}

/// Conversation `i` is created on node `i mod n`, which runs it; with `relay`, its turns are
/// sent (and its frames watched) from a socket on the next node, so every frame crosses a
/// relay (the worst case of a cluster behind a load balancer). Unless `cpu_of` is empty, also
/// reports the CPU time those server processes used between them per answered turn over the
/// load (the built-in mock's generation runs in them and is counted).
pub async fn run_on(cfg: &Turns, servers: &[SocketAddr], relay: bool, cpu_of: &[u32]) -> Vec<Row> {
    let mut tasks = JoinSet::new();
    let mut senders = Vec::new();
    let wait = Duration::from_secs(30);
    for i in 0..cfg.conversations {
        let owner = servers[i % servers.len()];
        let opened = match client::open_conversation(client::source(i, 20_000), owner, wait).await {
            Ok((ws, id)) if relay && servers.len() > 1 => {
                let other = servers[(i + 1) % servers.len()];
                watch_elsewhere(ws, id, client::source(i, 20_000), other, wait).await
            }
            other => other,
        };
        match opened {
            Ok((ws, id)) => {
                let (tx, rx) = mpsc::channel(64);
                senders.push(tx);
                tasks.spawn(conversation(ws, id, cfg.words, rx));
            }
            Err(e) => return vec![Row::new("turns", "setup failed", client::kind(&e))],
        }
    }
    // Open loop: turn k is due at start + k/R whatever became of the turns before it.
    let total = cfg.rate * cfg.secs as usize;
    let period = Duration::from_secs_f64(1.0 / cfg.rate as f64);
    let cpu_before = super::server::cpu_ms(cpu_of);
    let start = Instant::now();
    let mut skipped = 0;
    for k in 0..total {
        tokio::time::sleep_until((start + period * k as u32).into()).await;
        if senders[k % senders.len()].try_send(()).is_err() {
            skipped += 1;
        }
    }
    let elapsed = start.elapsed();
    drop(senders);
    let mut all = Tally::default();
    while let Some(done) = tasks.join_next().await {
        let t = done.unwrap_or_default();
        all.first_delta.extend(t.first_delta);
        all.ack.extend(t.ack);
        all.sent += t.sent;
        all.done += t.done;
        all.errors += t.errors;
    }
    let cpu = cpu_before.zip(super::server::cpu_ms(cpu_of));
    let mut rows = report(cfg, &mut all, elapsed, skipped);
    if let Some((before, after)) = cpu {
        let answered = all.first_delta.len().max(1) as f64;
        rows.push(Row::new(
            "turns",
            "server CPU per turn (every server process; built-in mock included)",
            format!("{:.3} ms", (after - before) / answered),
        ));
    }
    rows
}

/// Subscribes from a socket on node `other` to a conversation that `owner_ws`'s node runs (the
/// subscribe starts its actor there), then lets the owner's socket go.
async fn watch_elsewhere(
    mut owner_ws: Ws,
    id: String,
    src: std::net::IpAddr,
    other: SocketAddr,
    wait: Duration,
) -> anyhow::Result<(Ws, String)> {
    client::send(
        &mut owner_ws,
        &json!({"type": "subscribe", "conversation": id}),
    )
    .await?;
    client::expect(&mut owner_ws, "subscribed", wait).await?;
    let mut ws = client::connect(src, other).await?;
    client::send(&mut ws, &json!({"type": "subscribe", "conversation": id})).await?;
    client::expect(&mut ws, "subscribed", wait).await?;
    client::close(owner_ws, Duration::from_secs(5)).await;
    Ok((ws, id))
}

fn report(cfg: &Turns, all: &mut Tally, elapsed: Duration, skipped: usize) -> Vec<Row> {
    all.first_delta.sort();
    all.ack.sort();
    let ttft = Duration::from_millis(cfg.upstream_ttft_ms);
    let over = |p: f64| ms(percentile(&all.first_delta, p).saturating_sub(ttft));
    let max = all
        .first_delta
        .last()
        .copied()
        .unwrap_or_default()
        .saturating_sub(ttft);
    let settings = format!(
        "{} turns/s × {} s over {} conversations, {}-word replies, upstream TTFT {} ms",
        cfg.rate, cfg.secs, cfg.conversations, cfg.words, cfg.upstream_ttft_ms
    );
    vec![
        Row::new("turns", "settings", settings),
        Row::new(
            "turns",
            "sent / answered (first delta) / done / errors",
            format!(
                "{} / {} / {} / {} (client could not keep up: {skipped})",
                all.sent,
                all.first_delta.len(),
                all.done,
                all.errors
            ),
        ),
        Row::new(
            "turns",
            "achieved rate",
            format!("{:.0} turns/s", all.sent as f64 / elapsed.as_secs_f64()),
        ),
        Row::new(
            "turns",
            "overhead (first delta − TTFT) p50 / p99 / max",
            format!(
                "{:.2} / {:.2} / {:.2} ms (target ≤ 0.3 / ≤ 1 ms)",
                over(0.5),
                over(0.99),
                ms(max)
            ),
        ),
        Row::new(
            "turns",
            "… of which to ack (durable) p50 / p99",
            format!(
                "{:.2} / {:.2} ms",
                ms(percentile(&all.ack, 0.5)),
                ms(percentile(&all.ack, 0.99))
            ),
        ),
    ]
}
