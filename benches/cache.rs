#![allow(clippy::print_stdout, clippy::unwrap_used, clippy::expect_used)]
//! The semantic cache's figures:
//! 1. builtin embedding throughput (criterion);
//! 2. the cache at scale, every entry in one scope (the HNSW path; `cache/scale.rs`): memory
//!    per entry, build, dump and restore (a start), insert and lookup latency p50/p99 over
//!    individually timed operations, recall of exact questions; in the index alone, then
//!    through the cache's worker on a sled store;
//! 3. end-to-end cached-reply latency through the WebSocket: the real server and mock upstream
//!    on loopback, one entry primed, then reworded questions in fresh conversations, timed
//!    from sending `user_message` to the first `delta` and to `done`.
//!
//! `cargo bench --bench cache`; `cargo test --benches` runs a small quick version.
//! `CACHE_BENCH_ENTRIES=1000000 cargo bench --bench cache -- --scale-only` runs part 2 alone,
//! at that size (other knobs in `cache/scale.rs`).

#[path = "cache/scale.rs"]
mod scale;
#[path = "support/mod.rs"]
mod support;
use support::{frame, percentile, Server, Socket};

use std::time::{Duration, Instant};

use criterion::{black_box, Criterion, Throughput};
use futures_util::SinkExt;
use parley::cache::embed::Builtin;
use parley::mock_upstream::{Behaviour, MockUpstream};
use serde_json::json;
use tokio_tungstenite::tungstenite::Message;

const SUBJECTS: &[&str] = &[
    "capital",
    "population",
    "history",
    "climate",
    "economy",
    "language",
    "currency",
    "flag",
    "anthem",
    "cuisine",
    "geography",
    "president",
    "army",
    "railway",
    "coastline",
    "river",
    "mountain",
    "university",
    "museum",
    "festival",
];
const PLACES: &[&str] = &[
    "France", "Germany", "Spain", "Italy", "Japan", "Brazil", "Canada", "Kenya", "India", "Peru",
    "Norway", "Egypt", "Chile", "Vietnam", "Mexico", "Ghana", "Poland", "Greece", "Turkey",
    "Nepal", "Cuba", "Iran", "Iraq", "Fiji", "Laos",
];
const ASKS: &[&str] = &[
    "What is the",
    "Tell me about the",
    "Describe the",
    "Explain the",
    "Summarize the",
    "How old is the",
    "Why is the",
    "Where is the",
    "When did the",
    "Who runs the",
];

/// The `i`-th synthetic question (distinct for every i below 5000 × 10 years).
fn question(i: usize) -> String {
    let ask = ASKS[i % ASKS.len()];
    let subject = SUBJECTS[(i / ASKS.len()) % SUBJECTS.len()];
    let place = PLACES[(i / (ASKS.len() * SUBJECTS.len())) % PLACES.len()];
    let year = 1900 + i / (ASKS.len() * SUBJECTS.len() * PLACES.len());
    format!("{ask} {subject} of {place} in {year}?")
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

/// One turn in a fresh conversation: (time to first delta, time to done, cached).
async fn timed_turn(ws: &mut Socket, question: &str, n: usize) -> (Duration, Duration, bool) {
    ws.send(Message::Text(
        json!({"type": "create", "client_id": format!("c{n}"), "model": "up"}).to_string(),
    ))
    .await
    .unwrap();
    let created = frame(ws).await;
    let conv = created["conversation"].as_str().unwrap().to_owned();
    let sent = Instant::now();
    ws.send(Message::Text(
        json!({"type": "user_message", "conversation": conv, "client_id": "q", "content": question})
            .to_string(),
    ))
    .await
    .unwrap();
    let mut first = None;
    loop {
        let f = frame(ws).await;
        match f["type"].as_str() {
            Some("delta") => {
                first.get_or_insert_with(|| sent.elapsed());
            }
            Some("done") => {
                let done = sent.elapsed();
                return (
                    first.unwrap_or(done),
                    done,
                    f["cached"].as_bool().unwrap_or(false),
                );
            }
            Some("error") => panic!("turn failed: {f}"),
            _ => {}
        }
    }
}

fn end_to_end(turns: usize) {
    let upstream = MockUpstream::spawn(Behaviour {
        ttft: Duration::from_millis(20),
        ..Behaviour::default()
    })
    .unwrap();
    let server = Server::start(&upstream, |_| {});
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let (mut ws, _) = tokio_tungstenite::connect_async(format!("ws://{}/v1/ws", server.addr))
            .await
            .unwrap();
        // Misses first (distinct questions, the upstream answers after 20 ms), for comparison.
        let mut miss_firsts = Vec::new();
        for n in 0..(turns / 10).max(5) {
            let q = format!("Tell me fact number {n} about the sea. [[mock:words=60]]");
            let (first, _, cached) = timed_turn(&mut ws, &q, 10_000 + n).await;
            assert!(!cached);
            miss_firsts.push(first);
        }
        miss_firsts.sort();
        let (_, _, cached) =
            timed_turn(&mut ws, "What is the capital of France? [[mock:words=60]]", 0).await;
        assert!(!cached);
        let mut firsts = Vec::new();
        let mut dones = Vec::new();
        for n in 1..=turns {
            let (first, done, cached) = timed_turn(
                &mut ws,
                "what's the capital of France? [[mock:words=60]]",
                n,
            )
            .await;
            assert!(cached, "the reworded question must hit");
            firsts.push(first);
            dones.push(done);
        }
        firsts.sort();
        dones.sort();
        println!(
            "cache end to end (WebSocket, 60-word reply): miss first delta p50 {:.1} ms over {} misses (upstream ttft 20 ms); \
             hit first delta p50 {:.2} ms p99 {:.2} ms, done p50 {:.2} ms p99 {:.2} ms over {turns} hits; upstream calls {}",
            ms(percentile(&miss_firsts, 0.5)),
            miss_firsts.len(),
            ms(percentile(&firsts, 0.5)),
            ms(percentile(&firsts, 0.99)),
            ms(percentile(&dones, 0.5)),
            ms(percentile(&dones, 0.99)),
            upstream.requests(),
        );
    });
    drop(server);
}

/// The `local:` embedder's throughput, when built with it and its model is at hand
/// (`PARLEY_MINILM_DIR`, or where `scripts/test.sh` unpacks it).
#[cfg(feature = "local-embed")]
fn local_embedding(c: &mut Criterion, batch: &[String]) {
    let dir = std::env::var("PARLEY_MINILM_DIR").unwrap_or_else(|_| {
        concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/target/models/all-minilm-l6-v2"
        )
        .to_owned()
    });
    let Ok(model) = parley::cache::local_embed::LocalEmbedder::load(std::path::Path::new(&dir))
    else {
        println!("local embedding: no model in {dir}; skipped");
        return;
    };
    let mut group = c.benchmark_group("local embedding (all-MiniLM-L6-v2)");
    let one = vec!["What is the capital of France, and when did it become the capital?".to_owned()];
    group.throughput(Throughput::Elements(1));
    group.bench_function("one question", |b| {
        b.iter(|| model.embed_blocking(black_box(&one)).unwrap())
    });
    group.throughput(Throughput::Elements(batch.len() as u64));
    group.bench_function("32 questions", |b| {
        b.iter(|| model.embed_blocking(black_box(batch)).unwrap())
    });
    group.finish();
}

#[cfg(not(feature = "local-embed"))]
fn local_embedding(_: &mut Criterion, _: &[String]) {}

/// Part 2 at `CACHE_BENCH_ENTRIES` entries (or the default sizes).
fn scale_figures(sizes: &[usize], lookups: usize) {
    let sizes = match scale::env("CACHE_BENCH_ENTRIES", 0) {
        0 => sizes.to_vec(),
        n => vec![n],
    };
    let lookups = scale::env("CACHE_BENCH_LOOKUPS", lookups);
    let inserts = scale::env("CACHE_BENCH_INSERTS", 1_000);
    for n in sizes {
        scale::index_figures(n, inserts.min(n), lookups);
        if scale::env("CACHE_BENCH_STORE", 1) != 0 {
            scale::store_figures(n, lookups);
        }
    }
}

fn main() {
    let quick = !std::env::args().any(|a| a == "--bench");
    if std::env::args().any(|a| a == "--scale-only") {
        scale_figures(&[100_000], 2_000);
        return;
    }
    let mut c = Criterion::default()
        .configure_from_args()
        .sample_size(if quick { 10 } else { 50 })
        .measurement_time(Duration::from_secs(if quick { 1 } else { 3 }));
    let mut group = c.benchmark_group("builtin embedding");
    let one = "What is the capital of France, and when did it become the capital?";
    group.throughput(Throughput::Elements(1));
    group.bench_function("one question", |b| {
        b.iter(|| Builtin::vector(black_box(one)))
    });
    let batch: Vec<String> = (0..32).map(question).collect();
    group.throughput(Throughput::Elements(32));
    group.bench_function("32 questions", |b| {
        b.iter(|| {
            batch
                .iter()
                .map(|q| Builtin::vector(black_box(q)))
                .collect::<Vec<_>>()
        })
    });
    group.finish();
    local_embedding(&mut c, &batch);

    if quick {
        scale::index_figures(2_000, 100, 200);
        scale::store_figures(2_000, 200);
        end_to_end(20);
    } else {
        scale_figures(&[10_000, 100_000], 2_000);
        end_to_end(500);
    }
    c.final_summary();
}
