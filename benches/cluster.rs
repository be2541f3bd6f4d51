#![allow(
    clippy::print_stdout,
    clippy::print_stderr,
    clippy::unwrap_used,
    clippy::expect_used
)]
//! Cluster mode's cost, measured with the `turns` scenario of the WebSocket driver
//! (`benches/ws/turns.rs`) against parley run as separate processes:
//!
//! - one node on sled (the single-node default);
//! - one node on Redis (`[cluster]`, a local `redis-server` with `appendfsync always`);
//! - three nodes on one Redis, each conversation run by one node and driven from a socket on
//!   another, so every turn crosses a relay.
//!
//! For the Redis set-ups it also counts the nodes' round trips to Redis per turn (their
//! `parley_redis_calls_total`; the background ones of leases and the cache stream included). Knobs: CLUSTER_SETUPS (`sled1,redis1,redis3`), and the `turns`
//! knobs of `benches/ws.rs` (WS_TURNS_RATE, WS_TURNS_SECONDS, WS_TURNS_CONVERSATIONS, …).
//! Needs `redis-server` on the PATH. Bounded in time and count; all traffic on 127.0.0.x.

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

use parley::cluster::testing::TestRedis;
pub use report::{env_or, ms, percentile, Row};
use server::ServerProc;

/// Round trips to Redis the nodes made so far (their `parley_redis_calls_total`).
fn redis_calls(servers: &[ServerProc]) -> u64 {
    servers
        .iter()
        .map(|s| {
            let text = reqwest::blocking::get(format!("http://{}/metrics", s.addr))
                .and_then(reqwest::blocking::Response::text)
                .unwrap_or_default();
            text.lines()
                .find_map(|l| l.strip_prefix("parley_redis_calls_total "))
                .and_then(|v| v.trim().parse::<u64>().ok())
                .unwrap_or(0)
        })
        .sum()
}

fn main() -> anyhow::Result<()> {
    let quick = !std::env::args().any(|a| a == "--bench");
    let bin = std::env::var_os("PARLEY_BIN").map_or_else(
        || PathBuf::from(env!("CARGO_BIN_EXE_parley")),
        PathBuf::from,
    );
    let setups = std::env::var("CLUSTER_SETUPS").unwrap_or_else(|_| "sled1,redis1,redis3".into());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let cfg = turns::Turns::from_env(quick);
    let mut table = Vec::new();
    for setup in setups.split(',') {
        let nodes = match setup {
            "sled1" => 0,
            "redis1" => 1,
            "redis3" => 3,
            other => anyhow::bail!("unknown setup {other:?} (sled1, redis1, redis3)"),
        };
        let (rows, per_turn) = if nodes == 0 {
            let server = ServerProc::start(&bin, cfg.upstream_ttft_ms)?;
            (
                rt.block_on(turns::run(&cfg, server.addr, &[server.pid])),
                None,
            )
        } else {
            let redis = TestRedis::start()?;
            let servers = (0..nodes)
                .map(|i| {
                    let extra = format!(
                        "\n[cluster]\nredis_url = \"{}\"\nnode_id = \"bench-{i}\"\n",
                        redis.url()
                    );
                    ServerProc::start_with(&bin, cfg.upstream_ttft_ms, &extra)
                })
                .collect::<anyhow::Result<Vec<_>>>()?;
            let addrs: Vec<_> = servers.iter().map(|s| s.addr).collect();
            let before = redis_calls(&servers);
            let pids: Vec<_> = servers.iter().map(|s| s.pid).collect();
            let rows = rt.block_on(turns::run_on(&cfg, &addrs, nodes > 1, &pids));
            let calls = redis_calls(&servers) - before;
            (rows, Some(calls))
        };
        for r in rows {
            if r.what == "sent / answered (first delta) / done / errors" {
                if let Some(commands) = per_turn {
                    let sent: f64 = r
                        .figure
                        .split(" / ")
                        .next()
                        .and_then(|n| n.trim().parse().ok())
                        .unwrap_or(0.0);
                    // Setup (create, subscribe) counted in: a small share of a run's turns.
                    table.push(Row::new(
                        "turns",
                        "Redis round trips per turn (set-up and background included)",
                        format!("{:.1}", commands as f64 / sent.max(1.0)),
                    ));
                }
            }
            table.push(Row {
                scenario: match setup {
                    "sled1" => "1 node, sled",
                    "redis1" => "1 node, Redis",
                    _ => "3 nodes, Redis, relayed",
                },
                ..r
            });
        }
    }
    println!(
        "\nparley cluster cost ({}; 2 cores shared by driver, nodes and Redis)\n",
        bin.display()
    );
    println!("| set-up | measure | figure |\n|---|---|---|");
    for r in table {
        println!("| {} | {} | {} |", r.scenario, r.what, r.figure);
    }
    Ok(())
}
