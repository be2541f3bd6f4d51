#![allow(
    clippy::print_stdout,
    clippy::print_stderr,
    clippy::unwrap_used,
    clippy::expect_used
)]
//! WebSocket load driver against parley run as a separate process (the built binary), so the
//! server's RSS and limits can be read from `/proc`. Three scenarios from the performance
//! issue, each on a fresh server (tempdir store, built-in `mock` provider, cache off):
//!
//! - `idle`: N sockets (50 000), each creating and subscribing to its own conversation, spread
//!   over source addresses 127.0.0.2… (≤ 20 000 each); server RSS per socket.
//! - `turns`: open loop at R turns/s (1 000) for D s (10) over C conversations (200); overhead
//!   = `user_message` → first `delta` minus the mock's TTFT (0 ms: exactly known); and the
//!   server's CPU time per turn over the load (from `/proc/<pid>/stat`).
//! - `acks`: 1 000 conversations each keeping W (8) user messages unacked; acks per second.
//!
//! Knobs (environment): PARLEY_BIN (default: the bench's own build of `parley`), WS_SCENARIO
//! (idle|turns|acks|all), WS_IDLE_SOCKETS, WS_PER_ADDR, WS_IDLE_IN_FLIGHT,
//! WS_IDLE_OPEN_SECONDS, WS_IDLE_HOLD_SECONDS, WS_TURNS_RATE, WS_TURNS_SECONDS,
//! WS_TURNS_CONVERSATIONS, WS_TURNS_WORDS, WS_UPSTREAM_TTFT_MS, WS_ACK_CONVERSATIONS,
//! WS_ACK_WINDOW, WS_ACK_SECONDS, WS_SERVER_LOG (the server's RUST_LOG, default warn).
//! Every run is bounded in count and time and stops by itself; all traffic is on 127.0.0.x.
//! 50 000 sockets need 50 000+ descriptors in each process: raise the hard limit first
//! (`ulimit -n 120000` as root); the driver raises its soft limit to the hard one, and so does
//! `parley serve`.

#[path = "ws/acks.rs"]
mod acks;
#[path = "ws/client.rs"]
mod client;
#[path = "ws/idle.rs"]
mod idle;
#[path = "ws/report.rs"]
mod report;
#[path = "ws/server.rs"]
mod server;
#[path = "ws/turns.rs"]
mod turns;

pub use report::{env_or, mib, ms, percentile, Row};

use std::path::PathBuf;

use server::ServerProc;

fn read(path: &str) -> String {
    std::fs::read_to_string(path)
        .map(|s| s.split_whitespace().collect::<Vec<_>>().join("–"))
        .unwrap_or_else(|_| "?".into())
}

/// What bounds the number of sockets: descriptors of this process and the server, the
/// system's file table and the ephemeral port range (per source address).
pub fn limits(server: Option<&ServerProc>) -> String {
    let (soft, hard) = rlimit::getrlimit(rlimit::Resource::NOFILE).unwrap_or((0, 0));
    format!(
        "driver nofile {soft}/{hard}, server nofile {}, fs.file-max {}, fs.nr_open {}, ephemeral ports {} per source address",
        server.map_or_else(|| "-".into(), ServerProc::nofile),
        read("/proc/sys/fs/file-max"),
        read("/proc/sys/fs/nr_open"),
        read("/proc/sys/net/ipv4/ip_local_port_range"),
    )
}

fn main() -> anyhow::Result<()> {
    // `cargo bench` passes `--bench`; `cargo test --benches` runs this too: keep that short.
    let quick = !std::env::args().any(|a| a == "--bench");
    let bin = std::env::var_os("PARLEY_BIN").map_or_else(
        || PathBuf::from(env!("CARGO_BIN_EXE_parley")),
        PathBuf::from,
    );
    let scenario = std::env::var("WS_SCENARIO").unwrap_or_else(|_| "all".into());
    let nofile = rlimit::increase_nofile_limit(u64::MAX).unwrap_or(0);
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(cores.clamp(1, 2))
        .enable_all()
        .build()?;

    let mut rows = Vec::new();
    if matches!(scenario.as_str(), "all" | "idle") {
        let cfg = idle::Idle::from_env(quick);
        if (nofile as usize) < cfg.sockets + 100 {
            eprintln!("idle: this process may open {nofile} files, fewer than {} sockets: raise the hard limit (ulimit -n)", cfg.sockets);
        }
        let mut server = ServerProc::start(&bin, 0)?;
        rows.extend(rt.block_on(idle::run(&cfg, &mut server)));
    }
    if matches!(scenario.as_str(), "all" | "turns") {
        let cfg = turns::Turns::from_env(quick);
        let server = ServerProc::start(&bin, cfg.upstream_ttft_ms)?;
        rows.extend(rt.block_on(turns::run(&cfg, server.addr, &[server.pid])));
    }
    if matches!(scenario.as_str(), "all" | "acks") {
        let cfg = acks::Acks::from_env(quick);
        let server = ServerProc::start(&bin, 0)?;
        rows.extend(rt.block_on(acks::run(&cfg, server.addr)));
    }

    println!(
        "\nparley WebSocket load ({}; {cores} cores shared by driver and server; {})\n",
        bin.display(),
        limits(None)
    );
    println!("| scenario | measure | figure |\n|---|---|---|");
    for r in rows {
        println!("| {} | {} | {} |", r.scenario, r.what, r.figure);
    }
    Ok(())
}
