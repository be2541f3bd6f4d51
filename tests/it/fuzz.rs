//! The black-box fuzz driver: random and mutated WebSocket frames, HTTP requests (every face,
//! bad JSON, wrong types, huge and nested values, invalid UTF-8, random methods, paths and
//! headers) and raw HTTP/1.1 bytes, thrown at the built binary on an ephemeral port with the
//! built-in mock provider. It fails on a crash (the process exits), a hang (a request, a
//! socket or `/healthz` not answered within a timeout), any HTTP 500, a panic in the server's
//! log, an unclean shutdown afterwards, or RSS growth beyond a bound.
//!
//! CI runs it for 20 s. A longer run, and a failing seed repeated:
//! `PARLEY_FUZZ_SECS=600 PARLEY_FUZZ_RSS_MB=1024 cargo test --release --all-features --test it fuzz -- --nocapture`
//! `PARLEY_FUZZ_SEED=<seed> PARLEY_FUZZ_WORKERS=1 cargo test --release --all-features --test it fuzz -- --nocapture`
//! (`PARLEY_FUZZ_MAX` bounds the request count, `PARLEY_FUZZ_RSS_MB` the RSS growth.)

mod inputs;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::protocol::frame::coding::{Data, OpCode};
use tokio_tungstenite::tungstenite::protocol::frame::Frame;
use tokio_tungstenite::tungstenite::Message;

use crate::common::*;
use inputs::Known;

/// A mock that times out a `hang` in a second and retries little, so every legitimate answer
/// comes well within [`ANSWER_TIMEOUT`]; idle actors are evicted while the run goes on.
const CONFIG: &str = r#"
[server]
idle_timeout_secs = 2
max_frame_bytes = 262144

[retry]
max_retries = 1
budget_ms = 1500

[[providers]]
name = "mock"
kind = "mock"
timeout_secs = 1

[[routes]]
model = "mock"
targets = [{ provider = "mock", model = "mock-1" }]

[[routes]]
model = "fallback"
targets = [{ provider = "mock", model = "mock-1" }, { provider = "mock", model = "mock-2" }]
"#;

/// Longest a request, a socket's answer or a raw exchange may take before it counts as a hang.
const ANSWER_TIMEOUT: Duration = Duration::from_secs(20);
const HEALTH_TIMEOUT: Duration = Duration::from_secs(10);

fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// What the workers share: the server, the ids it handed out, and what went wrong.
struct Shared {
    addr: String,
    known: Mutex<Known>,
    failures: Mutex<Vec<String>>,
    stop: AtomicBool,
    sent: AtomicU64,
    max: u64,
    statuses: Mutex<BTreeMap<u16, u64>>,
}

impl Shared {
    fn fail(&self, what: String) {
        eprintln!("fuzz failure: {what}");
        self.failures.lock().unwrap().push(what);
        self.stop.store(true, Ordering::Relaxed);
    }

    fn running(&self) -> bool {
        !self.stop.load(Ordering::Relaxed) && self.sent.fetch_add(1, Ordering::Relaxed) < self.max
    }

    fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Remembers the ids of objects an answer created.
    fn learn(&self, body: &[u8]) {
        let Ok(v) = serde_json::from_slice::<Value>(body) else {
            return;
        };
        let mut known = self.known.lock().unwrap();
        for id in [&v["id"], &v["conversation"]]
            .into_iter()
            .filter_map(Value::as_str)
        {
            if id.starts_with("conv_") {
                Known::remember(&mut known.conversations, id);
            } else if id.starts_with("resp_") {
                Known::remember(&mut known.responses, id);
            }
        }
    }
}

/// The resident set of `pid` in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn describe(body: &[u8]) -> String {
    let text = String::from_utf8_lossy(&body[..body.len().min(300)]).into_owned();
    format!("{} bytes {text:?}", body.len())
}

/// Sends one request; checks it is answered in time and not with a 500. Answers the status
/// and body, or `None` when the connection failed (a refused request is no finding by itself:
/// the process and `/healthz` checks tell a dead server).
async fn send(
    shared: &Shared,
    req: reqwest::RequestBuilder,
    what: &str,
) -> Option<(u16, bytes::Bytes)> {
    let resp = match req.send().await {
        Ok(resp) => resp,
        Err(e) if e.is_timeout() => {
            shared.fail(format!("no answer within {ANSWER_TIMEOUT:?}: {what}"));
            return None;
        }
        Err(_) => return None,
    };
    let status = resp.status().as_u16();
    *shared.statuses.lock().unwrap().entry(status).or_default() += 1;
    let body = match resp.bytes().await {
        Ok(b) => b,
        Err(e) if e.is_timeout() => {
            shared.fail(format!(
                "body not finished within {ANSWER_TIMEOUT:?}: {what}"
            ));
            return None;
        }
        Err(_) => return None,
    };
    if status == 500 {
        shared.fail(format!("500 {} for {what}", describe(&body)));
    }
    Some((status, body))
}

async fn http_case(shared: &Shared, http: &reqwest::Client, rng: &mut StdRng) {
    let (path, bare, seed) = {
        let known = shared.known.lock().unwrap();
        let path = inputs::path(rng, &known);
        let bare = path.split('?').next().unwrap_or("").to_owned();
        let seed = inputs::seed_body(rng, &bare, &known);
        (path, bare, seed)
    };
    let method = inputs::method(rng, &bare);
    let bodyless = matches!(method.as_str(), "GET" | "HEAD" | "DELETE" | "OPTIONS");
    let body = (!bodyless || rng.gen_bool(0.2)).then(|| inputs::body(rng, seed));
    let mut req = http.request(method.clone(), shared.url(&path));
    for (name, value) in inputs::headers(rng) {
        if let Ok(v) = reqwest::header::HeaderValue::from_bytes(&value) {
            req = req.header(name, v);
        }
    }
    let what = match &body {
        Some(b) => format!("{method} {path} with {}", describe(b)),
        None => format!("{method} {path}"),
    };
    if let Some(b) = body {
        req = req.body(b);
    }
    if let Some((200..=299, answer)) = send(shared, req, &what).await {
        shared.learn(&answer);
    }
}

/// Valid requests of every face, so the mutations find real conversations and responses.
async fn flow_case(shared: &Shared, http: &reqwest::Client, rng: &mut StdRng) {
    let body = json!({"model": "mock", "system": "be brief"});
    let req = http.post(shared.url("/v1/conversations")).json(&body);
    if let Some((201, answer)) = send(shared, req, "create a conversation").await {
        shared.learn(&answer);
        let conv: Value = serde_json::from_slice(&answer).unwrap_or_default();
        let id = conv["id"].as_str().unwrap_or_default();
        let text = inputs::content_text(rng);
        let post = json!({"content": text, "stream": rng.gen_bool(0.5)});
        let path = format!("/v1/conversations/{id}/messages");
        let what = format!("POST {path} {post}");
        send(shared, http.post(shared.url(&path)).json(&post), &what).await;
        send(shared, http.get(shared.url(&path)), "list messages").await;
    }
    let body = json!({"model": "mock", "input": inputs::content_text(rng), "store": true});
    let what = format!("POST /v1/responses {body}");
    if let Some((200, answer)) = send(
        shared,
        http.post(shared.url("/v1/responses")).json(&body),
        &what,
    )
    .await
    {
        shared.learn(&answer);
    }
}

/// One frame for a socket: a valid frame of each type, a mutated one, or no valid frame at all.
fn ws_message(rng: &mut StdRng, conv: &str) -> Vec<Message> {
    let client_id = format!("c{}", rng.gen::<u16>());
    let valid = match rng.gen_range(0..6) {
        0 => json!({"type": "user_message", "conversation": conv, "client_id": client_id,
                    "content": inputs::content_text(rng)}),
        1 => json!({"type": "subscribe", "conversation": conv, "after_seq": rng.gen_range(0..5)}),
        2 => json!({"type": "cancel", "conversation": conv}),
        3 => json!({"type": "update", "conversation": conv, "tools": [{"type": "function",
                    "function": {"name": "f", "parameters": {"type": "object"}}}]}),
        4 => json!({"type": "tool_result", "conversation": conv, "client_id": client_id,
                    "tool_call_id": "call_0", "content": "42"}),
        _ => json!({"type": "create", "client_id": client_id, "model": "mock"}),
    };
    let text = |s: String| Message::Text(s);
    let raw = |bytes: Vec<u8>, op: Data, fin: bool| {
        Message::Frame(Frame::message(bytes, OpCode::Data(op), fin))
    };
    match rng.gen_range(0..14) {
        0..=4 => vec![text(valid.to_string())],
        5..=7 => {
            let mut v = valid;
            for _ in 0..rng.gen_range(1..4) {
                inputs::mutate(rng, &mut v);
            }
            vec![text(v.to_string())]
        }
        8 => vec![text(inputs::random_value(rng, 4).to_string())],
        9 => vec![text(inputs::junk_string(rng, 200))],
        10 => vec![Message::Binary(valid.to_string().into_bytes())],
        11 => vec![raw(vec![b'{', 0xff, 0xfe, b'}'], Data::Text, true)],
        12 => {
            let s = valid.to_string().into_bytes();
            let (a, b) = s.split_at(rng.gen_range(0..=s.len()));
            vec![
                raw(a.to_vec(), Data::Text, false),
                raw(b.to_vec(), Data::Continue, true),
            ]
        }
        _ => vec![Message::Ping(vec![7; rng.gen_range(0..100)])],
    }
}

/// Reads frames until `stop` holds for one (`Some(true)`), the socket closes (`Some(false)`),
/// or `wait` passes (`None`).
async fn read_until(
    ws: &mut Ws,
    wait: Duration,
    mut stop: impl FnMut(&Value) -> bool,
) -> Option<bool> {
    let end = Instant::now() + wait;
    loop {
        let left = end.checked_duration_since(Instant::now())?;
        match tokio::time::timeout(left, ws.stream.next()).await.ok()? {
            Some(Ok(Message::Text(t))) => {
                let v: Value = serde_json::from_str(&t).unwrap_or_default();
                if stop(&v) {
                    return Some(true);
                }
            }
            Some(Ok(Message::Close(_)) | Err(_)) | None => return Some(false),
            Some(Ok(_)) => {}
        }
    }
}

async fn ws_case(shared: &Shared, rng: &mut StdRng) {
    let url = format!("ws://{}/v1/ws", shared.addr);
    let mut ws = match tokio::time::timeout(ANSWER_TIMEOUT, Ws::try_connect_url(&url)).await {
        Ok(Ok(ws)) => ws,
        Ok(Err(_)) => return,
        Err(_) => return shared.fail("websocket upgrade not answered".into()),
    };
    let conv = {
        let known = shared.known.lock().unwrap();
        inputs::id(rng, &known.conversations, "conv_")
    };
    let mut trail = Vec::new();
    for _ in 0..rng.gen_range(1..12) {
        for m in ws_message(rng, &conv) {
            trail.push(format!("{:.200}", format!("{m:?}")));
            if ws.stream.send(m).await.is_err() {
                return;
            }
        }
        // Take what the server says meanwhile, without waiting for it.
        if read_until(&mut ws, Duration::from_millis(rng.gen_range(0..30)), |_| {
            false
        })
        .await
            == Some(false)
        {
            return;
        }
    }
    // Whatever came before, the socket must still answer (or have been closed by the server).
    let probe = format!("probe{}", rng.gen::<u32>());
    let frame = json!({"type": "create", "client_id": probe, "model": "mock"});
    if ws
        .stream
        .send(Message::Text(frame.to_string()))
        .await
        .is_err()
    {
        return;
    }
    if read_until(&mut ws, ANSWER_TIMEOUT, |f| {
        f["client_id"] == probe.as_str()
    })
    .await
    .is_none()
    {
        shared.fail(format!("websocket stopped answering after {trail:?}"));
    }
    let _ = ws.stream.close(None).await;
}

async fn raw_case(shared: &Shared, rng: &mut StdRng) {
    let Ok(mut socket) = tokio::net::TcpStream::connect(&shared.addr).await else {
        return;
    };
    let bytes = inputs::raw_request(rng);
    let what = describe(&bytes);
    let _ = socket.write_all(&bytes).await;
    let _ = socket.shutdown().await;
    let mut answer = Vec::new();
    match tokio::time::timeout(ANSWER_TIMEOUT, socket.read_to_end(&mut answer)).await {
        Err(_) => shared.fail(format!("raw request neither answered nor closed: {what}")),
        Ok(_)
            if String::from_utf8_lossy(&answer)
                .lines()
                .any(|l| l.starts_with("HTTP/1.1 500")) =>
        {
            shared.fail(format!("500 for raw request {what}: {}", describe(&answer)));
        }
        Ok(_) => {}
    }
}

async fn worker(shared: Arc<Shared>, mut rng: StdRng, deadline: Instant) {
    let http = reqwest::Client::builder()
        .timeout(ANSWER_TIMEOUT)
        .build()
        .unwrap();
    while Instant::now() < deadline && shared.running() {
        match rng.gen_range(0..20) {
            0..=11 => http_case(&shared, &http, &mut rng).await,
            12..=15 => ws_case(&shared, &mut rng).await,
            16 | 17 => raw_case(&shared, &mut rng).await,
            _ => flow_case(&shared, &http, &mut rng).await,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fuzz_server() {
    let secs: u64 = env_or("PARLEY_FUZZ_SECS", 20).min(24 * 3600);
    let seed: u64 = env_or("PARLEY_FUZZ_SEED", rand::random());
    let workers: u64 = env_or("PARLEY_FUZZ_WORKERS", 4).clamp(1, 64);
    let rss_bound_mib: u64 = env_or("PARLEY_FUZZ_RSS_MB", 256);
    eprintln!(
        "fuzz: seed {seed}, {secs} s, {workers} workers (PARLEY_FUZZ_SEED={seed} repeats it)"
    );
    let tmp = tempfile::tempdir().unwrap();
    let mut bin = BinServer::start(CONFIG, tmp.path(), &[]);
    let pid = bin.child.id();
    let shared = Arc::new(Shared {
        addr: bin.addr.to_string(),
        known: Mutex::new(Known::default()),
        failures: Mutex::new(Vec::new()),
        stop: AtomicBool::new(false),
        sent: AtomicU64::new(0),
        max: env_or("PARLEY_FUZZ_MAX", 1_000_000),
        statuses: Mutex::new(BTreeMap::new()),
    });
    // Every face once before the baseline, so what loads lazily is not counted as growth.
    let http = reqwest::Client::builder()
        .timeout(ANSWER_TIMEOUT)
        .build()
        .unwrap();
    let mut rng = StdRng::seed_from_u64(seed);
    for _ in 0..3 {
        flow_case(&shared, &http, &mut rng).await;
    }
    let baseline = rss_kib(pid);
    let deadline = Instant::now() + Duration::from_secs(secs);
    let tasks: Vec<_> = (0..workers)
        .map(|i| {
            let rng = StdRng::seed_from_u64(seed ^ (i + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
            tokio::spawn(worker(shared.clone(), rng, deadline))
        })
        .collect();
    let mut peak = baseline;
    let mut tick = tokio::time::interval(Duration::from_millis(500));
    while Instant::now() < deadline && !shared.stop.load(Ordering::Relaxed) {
        tick.tick().await;
        if let Some(status) = bin.child.try_wait().unwrap() {
            shared.fail(format!("the server exited: {status}"));
            break;
        }
        match http
            .get(shared.url("/healthz"))
            .timeout(HEALTH_TIMEOUT)
            .send()
            .await
        {
            Ok(r) if r.status() == 200 => {}
            other => shared.fail(format!("/healthz: {other:?}")),
        }
        peak = peak.max(rss_kib(pid));
    }
    shared.stop.store(true, Ordering::Relaxed);
    for t in tasks {
        t.await.unwrap();
    }
    let end = rss_kib(pid);
    for line in bin
        .log
        .lock()
        .unwrap()
        .iter()
        .filter(|l| l.contains("panicked"))
    {
        shared.fail(format!("the server logged a panic: {line}"));
    }
    if shared.failures.lock().unwrap().is_empty() {
        let status = bin.terminate();
        if !status.success() {
            shared.fail(format!("shutdown after the run: {status}"));
        }
    }
    let statuses = shared.statuses.lock().unwrap().clone();
    eprintln!(
        "fuzz: {} cases, statuses {statuses:?}; RSS {} MiB → {} MiB (peak {} MiB)",
        shared.sent.load(Ordering::Relaxed),
        baseline / 1024,
        end / 1024,
        peak / 1024
    );
    let failures = shared.failures.lock().unwrap().clone();
    if !failures.is_empty() {
        let log = bin.log.lock().unwrap();
        let errors: Vec<&String> = log.iter().filter(|l| l.contains("ERROR")).collect();
        for line in &errors[errors.len().saturating_sub(30)..] {
            eprintln!("server: {line}");
        }
    }
    assert!(failures.is_empty(), "seed {seed}: {failures:#?}");
    assert!(
        end.saturating_sub(baseline) <= rss_bound_mib * 1024,
        "seed {seed}: RSS grew from {baseline} KiB to {end} KiB"
    );
    let count = |r: std::ops::Range<u16>| statuses.range(r).map(|(_, n)| n).sum::<u64>();
    assert!(
        count(200..300) > 0 && count(400..500) > 0,
        "the run reached nothing: {statuses:?}"
    );
}
