#![allow(clippy::print_stdout, clippy::unwrap_used, clippy::expect_used)]
//! Load driver: starts parley and a mock upstream on loopback, drives many WebSocket
//! conversations at once, and prints time to first token (client-side, from sending the user
//! message to the first delta) and turn throughput. Bounded in count and time; stops by itself.
//!
//! Knobs (environment): LOAD_CONVERSATIONS (default 50), LOAD_TURNS per conversation (20),
//! LOAD_UPSTREAM_TTFT_MS (20), LOAD_WORDS per reply (30), LOAD_SECONDS time limit (60).

#[path = "support/mod.rs"]
#[allow(dead_code)] // each bench uses part of what they share
mod support;
use support::{percentile, Server};

use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use parley::mock_upstream::{Behaviour, MockUpstream};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

fn env_or(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// One conversation: `turns` turns in a row; answers the TTFT of each completed turn.
async fn conversation(
    addr: std::net::SocketAddr,
    turns: u64,
    words: u64,
    deadline: Instant,
) -> Vec<Duration> {
    let Ok((mut ws, _)) = tokio_tungstenite::connect_async(format!("ws://{addr}/v1/ws")).await
    else {
        return Vec::new();
    };
    let _ = ws
        .send(Message::Text(
            json!({"type": "create", "client_id": "c", "model": "up"}).to_string(),
        ))
        .await;
    let mut conv = None;
    let mut ttfts = Vec::new();
    let mut turn = 0;
    let mut sent_at = Instant::now();
    let mut first_seen = false;
    while Instant::now() < deadline {
        let Ok(Some(Ok(msg))) = tokio::time::timeout(Duration::from_secs(30), ws.next()).await
        else {
            break;
        };
        let Message::Text(text) = msg else { continue };
        let Ok(frame) = serde_json::from_str::<Value>(&text) else {
            continue;
        };
        match frame["type"].as_str() {
            Some("created") => conv = frame["conversation"].as_str().map(str::to_owned),
            Some("delta") if !first_seen => {
                first_seen = true;
                ttfts.push(sent_at.elapsed());
                continue;
            }
            Some("done" | "error") => {}
            _ => continue,
        }
        if turn == turns {
            break;
        }
        let Some(id) = &conv else { break };
        turn += 1;
        first_seen = false;
        sent_at = Instant::now();
        let content = format!("turn {turn} of a load test [[mock:words={words}]]");
        let frame = json!({"type": "user_message", "conversation": id, "client_id": format!("t{turn}"), "content": content});
        if ws.send(Message::Text(frame.to_string())).await.is_err() {
            break;
        }
    }
    let _ = ws.close(None).await;
    ttfts
}

fn main() {
    // `cargo bench` passes `--bench`; `cargo test --benches` runs this too: keep that short.
    let quick = !std::env::args().any(|a| a == "--bench");
    let conversations = env_or("LOAD_CONVERSATIONS", if quick { 4 } else { 50 });
    let turns = env_or("LOAD_TURNS", if quick { 2 } else { 20 });
    let upstream_ttft = env_or("LOAD_UPSTREAM_TTFT_MS", 20);
    let words = env_or("LOAD_WORDS", 30);
    let seconds = env_or("LOAD_SECONDS", 60);

    let upstream = MockUpstream::spawn(Behaviour {
        ttft: Duration::from_millis(upstream_ttft),
        ..Behaviour::default()
    })
    .unwrap();
    // Every conversation opens with the same question: measure routing, not the cache
    // (`cargo bench --bench cache` measures that).
    let server = Server::start(&upstream, |cfg| cfg.cache.enabled = false);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let started = Instant::now();
    let deadline = started + Duration::from_secs(seconds);
    let mut ttfts: Vec<Duration> = rt.block_on(async {
        let tasks: Vec<_> = (0..conversations)
            .map(|_| tokio::spawn(conversation(server.addr, turns, words, deadline)))
            .collect();
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.unwrap_or_default());
        }
        all
    });
    let elapsed = started.elapsed();
    ttfts.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    println!(
        "load: {conversations} conversations x {turns} turns, {words} words/reply, upstream ttft {upstream_ttft} ms"
    );
    println!(
        "load: {} turns in {:.2} s = {:.0} turns/s; ttft p50 {:.1} ms, p99 {:.1} ms (parley overhead p50 {:.1} ms)",
        ttfts.len(),
        elapsed.as_secs_f64(),
        ttfts.len() as f64 / elapsed.as_secs_f64(),
        ms(percentile(&ttfts, 0.5)),
        ms(percentile(&ttfts, 0.99)),
        ms(percentile(&ttfts, 0.5)) - upstream_ttft as f64,
    );
    println!("load: upstream served {} requests", upstream.requests());
    drop(server);
}
