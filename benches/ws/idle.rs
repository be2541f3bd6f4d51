//! Scenario `idle`: N sockets, each creating its own conversation and subscribing to it, then
//! idle; the server's RSS before, with all open, after all closed and 5 s later.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::json;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::client::{self, Ws};
use super::server::ServerProc;
use super::{env_or, mib, Row};

pub struct Idle {
    pub sockets: usize,
    pub per_addr: usize,
    pub in_flight: usize,
    pub open_secs: u64,
    pub hold_secs: u64,
    /// Sockets opened and closed before the baseline is read, so that what the first
    /// conversation loads once (tokenizer tables, pools) is not counted per socket.
    pub warmup: usize,
    pub until: Until,
}

impl Idle {
    pub fn from_env(quick: bool) -> Self {
        Self {
            sockets: env_or("WS_IDLE_SOCKETS", if quick { 200 } else { 50_000 }),
            per_addr: env_or("WS_PER_ADDR", 20_000).max(1),
            in_flight: env_or("WS_IDLE_IN_FLIGHT", 500).max(1),
            open_secs: env_or("WS_IDLE_OPEN_SECONDS", if quick { 20 } else { 400 }) as u64,
            until: match std::env::var("WS_IDLE_UNTIL").as_deref() {
                Ok("connect") => Until::Connect,
                Ok("create") => Until::Create,
                _ => Until::Subscribe,
            },
            warmup: env_or("WS_IDLE_WARMUP", if quick { 20 } else { 500 }),
            hold_secs: env_or("WS_IDLE_HOLD_SECONDS", if quick { 1 } else { 5 }) as u64,
        }
    }
}

/// Sets one socket up (create, subscribe), reports, then holds it (answering pings) until
/// `stop`; closes it.
/// How far each socket goes before it idles: the steps differ by what the server keeps.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Until {
    /// Only the WebSocket (the connection and the session actor).
    Connect,
    /// Plus `create` (a stored conversation; the socket is not subscribed).
    Create,
    /// Plus `subscribe` (the conversation actor is live, with this socket as subscriber).
    Subscribe,
}

#[derive(Clone, Copy)]
struct Target {
    server: SocketAddr,
    per_addr: usize,
    until: Until,
}

async fn one(
    i: usize,
    t: Target,
    permit: OwnedSemaphorePermit,
    opened: mpsc::UnboundedSender<Result<(), String>>,
    stop: CancellationToken,
) {
    let wait = Duration::from_secs(30);
    let src = client::source(i, t.per_addr);
    let setup = async {
        if t.until == Until::Connect {
            let ws = tokio::time::timeout(wait, client::connect(src, t.server)).await;
            return ws.map_err(|_| anyhow::anyhow!("connect timed out"))?;
        }
        let (mut ws, id) = client::open_conversation(src, t.server, wait).await?;
        if t.until == Until::Subscribe {
            client::send(&mut ws, &json!({"type": "subscribe", "conversation": id})).await?;
            client::expect(&mut ws, "subscribed", wait).await?;
        }
        Ok::<Ws, anyhow::Error>(ws)
    };
    let mut ws = match setup.await {
        Ok(ws) => ws,
        Err(e) => {
            let _ = opened.send(Err(client::kind(&e)));
            return;
        }
    };
    let _ = opened.send(Ok(()));
    drop(permit);
    loop {
        tokio::select! {
            () = stop.cancelled() => break,
            frame = client::recv(&mut ws) => if frame.is_none() { return },
        }
    }
    client::close(ws, Duration::from_secs(10)).await;
}

/// Opens and closes `n` sockets the way [`run`] does, one batch.
async fn warm_up(n: usize, t: Target) {
    let stop = CancellationToken::new();
    let gate = Arc::new(Semaphore::new(n.max(1)));
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut tasks = JoinSet::new();
    for i in 0..n {
        if let Ok(permit) = gate.clone().acquire_owned().await {
            tasks.spawn(one(i, t, permit, tx.clone(), stop.clone()));
        }
    }
    drop(tx);
    for _ in 0..n {
        if rx.recv().await.is_none() {
            break;
        }
    }
    stop.cancel();
    while tasks.join_next().await.is_some() {}
}

pub async fn run(idle: &Idle, server: &mut ServerProc) -> Vec<Row> {
    let kib_start = server.status_kib("VmRSS");
    let target = Target {
        server: server.addr,
        per_addr: idle.per_addr,
        until: idle.until,
    };
    // What this process may open bounds the run (the server's limit shows in its failures).
    let nofile = rlimit::getrlimit(rlimit::Resource::NOFILE).map_or(0, |l| l.0) as usize;
    let sockets = idle.sockets.min(nofile.saturating_sub(200));
    warm_up(idle.warmup, target).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let kib_before = server.status_kib("VmRSS");
    let anon_before = server.status_kib("RssAnon");
    let stop = CancellationToken::new();
    let gate = Arc::new(Semaphore::new(idle.in_flight));
    let (tx, mut rx) = mpsc::unbounded_channel();
    let mut tasks = JoinSet::new();
    let started = Instant::now();
    let deadline = started + Duration::from_secs(idle.open_secs);
    let mut launched = 0;
    let mut failures: BTreeMap<String, usize> = BTreeMap::new();
    let mut open = 0usize;
    let mut last_print = Instant::now();
    while launched < sockets && Instant::now() < deadline {
        let Ok(Ok(permit)) =
            tokio::time::timeout_at(deadline.into(), gate.clone().acquire_owned()).await
        else {
            break;
        };
        let (tx, stop) = (tx.clone(), stop.clone());
        tasks.spawn(one(launched, target, permit, tx, stop));
        launched += 1;
        while let Ok(r) = rx.try_recv() {
            tally(r, &mut open, &mut failures);
        }
        if last_print.elapsed() > Duration::from_secs(5) {
            eprintln!(
                "idle: {open} open, {launched} launched, {:.0} s",
                started.elapsed().as_secs_f64()
            );
            last_print = Instant::now();
        }
    }
    drop(tx);
    // Every launched setup ends (30 s bound each) before the count is final.
    while open + failures.values().sum::<usize>() < launched {
        match tokio::time::timeout(Duration::from_secs(40), rx.recv()).await {
            Ok(Some(r)) => tally(r, &mut open, &mut failures),
            _ => break,
        }
    }
    let open_time = started.elapsed();
    tokio::time::sleep(Duration::from_secs(idle.hold_secs)).await;
    let kib_open = server.status_kib("VmRSS");
    let anon_open = server.status_kib("RssAnon");
    let fds_open = server.fds();
    let alive = server.alive();
    stop.cancel();
    let closing = Instant::now();
    while tokio::time::timeout(Duration::from_secs(60), tasks.join_next())
        .await
        .ok()
        .flatten()
        .is_some()
    {}
    let close_time = closing.elapsed();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let kib_closed = server.status_kib("VmRSS");
    tokio::time::sleep(Duration::from_secs(5)).await;
    let kib_later = server.status_kib("VmRSS");

    let per_socket = (kib_open.saturating_sub(kib_before)) as f64 / open.max(1) as f64;
    let anon_per_socket = (anon_open.saturating_sub(anon_before)) as f64 / open.max(1) as f64;
    let addrs = sockets.div_ceil(idle.per_addr);
    let mut rows = vec![
        Row::new(
            "idle",
            "sockets open / asked",
            format!(
                "{open} / {} ({addrs} source addresses, {} in flight, each to {:?})",
                idle.sockets, idle.in_flight, idle.until
            ),
        ),
        Row::new(
            "idle",
            "time to open",
            format!(
                "{:.1} s ({:.0} sockets/s); closing {:.1} s",
                open_time.as_secs_f64(),
                open as f64 / open_time.as_secs_f64(),
                close_time.as_secs_f64()
            ),
        ),
        Row::new(
            "idle",
            "server RSS at start / after warm-up / all open",
            format!(
                "{} / {} ({} sockets opened and closed) / {} (anon {}), {fds_open} fds",
                mib(kib_start),
                mib(kib_before),
                idle.warmup,
                mib(kib_open),
                mib(anon_open)
            ),
        ),
        Row::new(
            "idle",
            "server RSS per socket",
            format!("{per_socket:.1} KiB, anonymous {anon_per_socket:.1} KiB (target ≤ 10 KiB)"),
        ),
        Row::new(
            "idle",
            "server RSS all closed / 5 s later",
            format!("{} / {}", mib(kib_closed), mib(kib_later)),
        ),
    ];
    if !alive {
        rows.push(Row::new(
            "idle",
            "server",
            "exited while sockets were open".into(),
        ));
    }
    if open < idle.sockets {
        let why: Vec<String> = failures.iter().map(|(k, n)| format!("{n}× {k}")).collect();
        let capped = sockets < idle.sockets;
        let timed_out = launched < sockets;
        rows.push(Row::new(
            "idle",
            "short of N because",
            format!(
                "{}{}{}; {}",
                if capped {
                    "the driver's RLIMIT_NOFILE (capped at the limit − 200); "
                } else {
                    ""
                },
                if timed_out {
                    "open time bound reached; "
                } else {
                    ""
                },
                why.join(", "),
                super::limits(Some(server))
            ),
        ));
    }
    rows
}

fn tally(r: Result<(), String>, open: &mut usize, failures: &mut BTreeMap<String, usize>) {
    match r {
        Ok(()) => *open += 1,
        Err(k) => *failures.entry(k).or_default() += 1,
    }
}
