#![allow(clippy::unwrap_used, clippy::expect_used)]
//! One plain text generation end to end, in-process against the mock upstream on loopback (no
//! pacing, cache off), through each face that drives the generation core: a WebSocket turn
//! (create a conversation, send a message, read deltas to `done`) and a stateless
//! `/v1/chat/completions` request, JSON and streamed. Used to compare the core before and after
//! a change: `cargo bench --bench turn`.

#[path = "support/mod.rs"]
#[allow(dead_code)] // each bench uses part of what they share
mod support;
use support::{frame, Server, Socket};

use std::time::Duration;

use criterion::{criterion_group, criterion_main, Criterion};
use futures_util::SinkExt;
use parley::mock_upstream::{Behaviour, MockUpstream};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

/// A new conversation and one turn in it, to its `done`.
async fn ws_turn(ws: &mut Socket, n: u64) {
    let create = json!({"type": "create", "client_id": format!("c{n}"), "model": "up"});
    ws.send(Message::Text(create.to_string())).await.unwrap();
    let created = frame(ws).await;
    let conv = created["conversation"].as_str().unwrap().to_owned();
    let msg = json!({"type": "user_message", "conversation": conv, "client_id": "q",
                     "content": format!("question {n} [[mock:words=30]]")});
    ws.send(Message::Text(msg.to_string())).await.unwrap();
    loop {
        let f = frame(ws).await;
        match f["type"].as_str() {
            Some("done") => return,
            Some("error") => panic!("turn failed: {f}"),
            _ => {}
        }
    }
}

async fn completion(http: &reqwest::Client, url: &str, n: u64, stream: bool) {
    let body = json!({"model": "up", "stream": stream,
                      "messages": [{"role": "user", "content": format!("question {n} [[mock:words=30]]")}]});
    let resp = http.post(url).json(&body).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let text = resp.text().await.unwrap();
    assert!(!text.is_empty());
}

fn bench(c: &mut Criterion) {
    let upstream = MockUpstream::spawn(Behaviour::default()).unwrap();
    let server = Server::start(&upstream, |cfg| cfg.cache.enabled = false);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut ws = rt.block_on(async {
        tokio_tungstenite::connect_async(format!("ws://{}/v1/ws", server.addr))
            .await
            .unwrap()
            .0
    });
    let http = reqwest::Client::new();
    let url = format!("http://{}/v1/chat/completions", server.addr);
    let mut g = c.benchmark_group("turn");
    g.measurement_time(Duration::from_secs(8));
    let mut n = 0;
    g.bench_function("websocket/plain_text", |b| {
        b.iter(|| {
            n += 1;
            rt.block_on(ws_turn(&mut ws, n));
        });
    });
    g.bench_function("chat_completions/json", |b| {
        b.iter(|| {
            n += 1;
            rt.block_on(completion(&http, &url, n, false));
        });
    });
    g.bench_function("chat_completions/stream", |b| {
        b.iter(|| {
            n += 1;
            rt.block_on(completion(&http, &url, n, true));
        });
    });
    g.finish();
    drop(ws);
    drop(server);
}

criterion_group!(benches, bench);
criterion_main!(benches);
