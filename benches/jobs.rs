#![allow(
    clippy::print_stdout,
    clippy::print_stderr,
    clippy::unwrap_used,
    clippy::expect_used
)]
//! Interactive turns while a backlog of async jobs drains (PROTOCOL §10): the `turns` scenario
//! of the WebSocket driver (`benches/ws/turns.rs`) against parley run as a separate process,
//! once idle and once right after JOBS_COUNT (10 000) chat-completion jobs were submitted, with
//! the time the backlog took to drain. Knobs: JOBS_COUNT, JOBS_WORKERS (the server's `[jobs]
//! workers`, 2), and the `turns` knobs of `benches/ws.rs` (defaults here: 200 turns/s × 10 s
//! over 50 conversations). Bounded in time and count; all traffic on 127.0.0.x.

#[path = "ws/client.rs"]
mod client;
#[path = "ws/report.rs"]
#[allow(dead_code)]
mod report;
// The WebSocket driver's process helpers, of which this one needs only starting.
#[path = "ws/server.rs"]
#[allow(dead_code)]
mod server;
#[path = "ws/turns.rs"]
mod turns;

use std::path::PathBuf;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
pub use report::{env_or, ms, percentile, Row};
use serde_json::{json, Value};
use server::ServerProc;

async fn submit_all(base: &str, n: usize) -> Vec<String> {
    let client = reqwest::Client::new();
    futures_util::stream::iter(0..n)
        .map(|i| {
            let client = client.clone();
            let url = format!("{base}/v1/jobs");
            async move {
                let body = json!({"request": {"model": "mock", "messages": [{"role": "user", "content": format!("backlog job {i} [[mock:words=5]]")}]}});
                let v: Value = client.post(url).json(&body).send().await.unwrap().json().await.unwrap();
                v["id"].as_str().unwrap().to_owned()
            }
        })
        .buffered(64)
        .collect()
        .await
}

async fn status(base: &str, id: &str) -> String {
    let v: Value = reqwest::get(format!("{base}/v1/jobs/{id}"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    v["status"].as_str().unwrap_or("").to_owned()
}

fn main() -> anyhow::Result<()> {
    let quick = !std::env::args().any(|a| a == "--bench");
    let bin = std::env::var_os("PARLEY_BIN").map_or_else(
        || PathBuf::from(env!("CARGO_BIN_EXE_parley")),
        PathBuf::from,
    );
    let jobs = env_or("JOBS_COUNT", if quick { 50 } else { 10_000 });
    let workers = env_or("JOBS_WORKERS", 2);
    let mut cfg = turns::Turns::from_env(quick);
    if std::env::var("WS_TURNS_RATE").is_err() {
        cfg.rate = if quick { 50 } else { 200 };
    }
    if std::env::var("WS_TURNS_CONVERSATIONS").is_err() {
        cfg.conversations = if quick { 5 } else { 50 };
    }
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let server = ServerProc::start_with(
        &bin,
        cfg.upstream_ttft_ms,
        &format!("\n[jobs]\nworkers = {workers}\n"),
    )?;
    let base = format!("http://{}", server.addr);
    let idle = rt.block_on(turns::run(&cfg, server.addr, &[]));
    let submitted = Instant::now();
    let ids = rt.block_on(submit_all(&base, jobs));
    let submit_time = submitted.elapsed();
    let busy = rt.block_on(turns::run(&cfg, server.addr, &[]));
    let measured_until = submitted.elapsed();
    // Oldest first: the last submitted ends last.
    let last = ids.last().cloned().unwrap_or_default();
    let drained = rt.block_on(async {
        let deadline = Instant::now() + Duration::from_secs(600);
        while Instant::now() < deadline {
            if matches!(status(&base, &last).await.as_str(), "succeeded" | "failed") {
                return Some(submitted.elapsed());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        None
    });
    let mut failed = 0;
    rt.block_on(async {
        for id in ids.iter().step_by((jobs / 100).max(1)) {
            if status(&base, id).await != "succeeded" {
                failed += 1;
            }
        }
    });
    println!("\nparley: interactive turns while {jobs} jobs drain ({workers} job workers; 2 cores shared by driver and server)\n");
    println!("| when | measure | figure |\n|---|---|---|");
    for (when, rows) in [("idle", idle), ("backlog draining", busy)] {
        for r in rows {
            println!("| {when} | {} | {} |", r.what, r.figure);
        }
    }
    println!(
        "| backlog | submitted in | {:.1} s |",
        submit_time.as_secs_f64()
    );
    println!(
        "| backlog | drained after | {} (turns measured until {:.1} s) |",
        drained.map_or_else(
            || "not within 600 s".into(),
            |d| format!("{:.1} s", d.as_secs_f64())
        ),
        measured_until.as_secs_f64()
    );
    println!(
        "| backlog | sampled jobs not succeeded | {failed} of {} |",
        ids.iter().step_by((jobs / 100).max(1)).count()
    );
    Ok(())
}
