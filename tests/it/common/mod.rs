//! Shared harness: the real server on an ephemeral port (in-process, on its own actix system
//! thread, or as the built binary), the real mock upstream, WebSocket and HTTP clients, and
//! `wait_until` for conditions with deadlines instead of sleeps.

#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use parley::config::{Config, ProviderConfig, ProviderKind, RouteConfig, TargetConfig};
pub use parley::mock_upstream::{Behaviour, MockUpstream};
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::Message;

pub const TIMEOUT: Duration = Duration::from_secs(10);

/// Polls `cond` until it holds or `deadline` passes.
pub async fn wait_until<F: FnMut() -> bool>(deadline: Duration, mut cond: F) -> bool {
    let end = Instant::now() + deadline;
    while Instant::now() < end {
        if cond() {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    cond()
}

/// A config with the built-in `mock` route, plus route `up` → provider `up` (kind openai) at
/// `upstream` when given.
pub fn config_with(upstream: Option<&MockUpstream>) -> Config {
    let mut cfg = Config::embedded(|_| false);
    cfg.server.idle_timeout_secs = 60;
    cfg.server.shutdown_timeout_secs = 5;
    cfg.server.workers = 2;
    cfg.auth.admin_key_env = unique_env("PARLEY_IT_ADMIN");
    // One attempt per target unless a test asks for retries, so counts of upstream calls are exact.
    cfg.retry.max_retries = 0;
    if let Some(up) = upstream {
        cfg.providers.push(openai_provider("up", &up.base_url()));
        cfg.routes.push(route("up", &[("up", "mock-1")]));
    }
    cfg
}

pub fn openai_provider(name: &str, base_url: &str) -> ProviderConfig {
    ProviderConfig {
        name: name.into(),
        kind: ProviderKind::Openai,
        base_url: Some(base_url.into()),
        timeout_secs: 5,
        region: None,
        ..ProviderConfig::builtin_mock()
    }
}

pub fn route(model: &str, targets: &[(&str, &str)]) -> RouteConfig {
    RouteConfig::new(
        model,
        targets
            .iter()
            .map(|(p, m)| TargetConfig::new(p, m))
            .collect(),
    )
}

/// A process-unique environment variable name (tests run in parallel threads).
pub fn unique_env(prefix: &str) -> String {
    static N: AtomicUsize = AtomicUsize::new(0);
    format!(
        "{prefix}_{}_{}",
        std::process::id(),
        N.fetch_add(1, Ordering::Relaxed)
    )
}

/// The real app on `127.0.0.1:0` with a tempdir store, on its own actix system thread.
pub struct TestServer {
    pub addr: SocketAddr,
    pub dir: PathBuf,
    _tmp: Option<tempfile::TempDir>,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    pub admin_key: Option<String>,
}

impl TestServer {
    /// Development mode (no admin key): requests without a key are tenant `local`.
    pub fn start(cfg: Config) -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_owned();
        let mut s = Self::start_in(cfg, &dir, None);
        s._tmp = Some(tmp);
        s
    }

    /// With an admin key: every request needs a key.
    pub fn start_with_admin(cfg: Config) -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().to_owned();
        let mut s = Self::start_in(cfg, &dir, Some("adm-test-secret".into()));
        s._tmp = Some(tmp);
        s
    }

    /// On an existing data directory (restart tests).
    pub fn start_in(mut cfg: Config, dir: &Path, admin_key: Option<String>) -> Self {
        if let Some(k) = &admin_key {
            // A unique variable name per server, so parallel tests do not see each other's.
            cfg.auth.admin_key_env = unique_env("PARLEY_IT_ADMIN");
            std::env::set_var(&cfg.auth.admin_key_env, k);
        }
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let data = dir.to_owned();
        let thread = std::thread::spawn(move || {
            let system = actix_web::rt::System::new();
            system.block_on(async move {
                let store = parley::store::Store::open(&data).unwrap();
                let listener = TcpListener::bind("127.0.0.1:0").unwrap();
                let handle = parley::app::start(cfg, listener, store).unwrap();
                addr_tx.send(handle.addr).unwrap();
                let _ = stop_rx.await;
                handle.shutdown().await.unwrap();
            });
        });
        let addr = addr_rx.recv_timeout(TIMEOUT).expect("server did not start");
        Self {
            addr,
            dir: dir.to_owned(),
            _tmp: None,
            stop: Some(stop_tx),
            thread: Some(thread),
            admin_key,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn ws_url(&self) -> String {
        format!("ws://{}/v1/ws", self.addr)
    }

    /// Graceful shutdown; waits until storage is flushed.
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }

    /// Creates a key for `tenant` through the admin API; answers `(id, secret)`.
    pub async fn create_key(&self, body: Value) -> (String, String) {
        let resp = http()
            .post(self.url("/admin/keys"))
            .bearer_auth(self.admin_key.as_deref().unwrap_or(""))
            .json(&body)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 201);
        let v: Value = resp.json().await.unwrap();
        (
            v["id"].as_str().unwrap().to_owned(),
            v["key"].as_str().unwrap().to_owned(),
        )
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.shutdown();
    }
}

pub fn http() -> reqwest::Client {
    reqwest::Client::builder().timeout(TIMEOUT).build().unwrap()
}

/// `GET path` without a key (development mode): the body as text.
pub async fn get_text(server: &TestServer, path: &str) -> String {
    http()
        .get(server.url(path))
        .send()
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

/// `GET path` without a key (development mode): the body as JSON.
pub async fn get_json(server: &TestServer, path: &str) -> Value {
    get_json_as(server, path, None).await
}

/// `GET path` with `key` (if any): the body as JSON.
pub async fn get_json_as(server: &TestServer, path: &str, key: Option<&str>) -> Value {
    with_key(http().get(server.url(path)), key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// Creates a conversation over REST; answers its id.
pub async fn create_conversation(server: &TestServer, key: Option<&str>, body: Value) -> String {
    let mut req = http().post(server.url("/v1/conversations")).json(&body);
    if let Some(k) = key {
        req = req.bearer_auth(k);
    }
    let resp = req.send().await.unwrap();
    assert_eq!(resp.status(), 201, "{:?}", resp.text().await);
    let v: Value = resp.json().await.unwrap();
    v["id"].as_str().unwrap().to_owned()
}

/// Stored messages of a conversation over REST.
pub async fn messages(server: &TestServer, key: Option<&str>, id: &str) -> Vec<Value> {
    let mut req = http().get(server.url(&format!("/v1/conversations/{id}/messages?limit=1000")));
    if let Some(k) = key {
        req = req.bearer_auth(k);
    }
    let v: Value = req.send().await.unwrap().json().await.unwrap();
    v["data"].as_array().unwrap().clone()
}

type WsStream =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// A WebSocket client speaking the protocol's JSON frames.
pub struct Ws {
    pub stream: WsStream,
}

impl Ws {
    pub async fn connect(server: &TestServer, key: Option<&str>) -> Self {
        Self::try_connect(server, key)
            .await
            .expect("websocket connect failed")
    }

    pub async fn try_connect(
        server: &TestServer,
        key: Option<&str>,
    ) -> Result<Self, tokio_tungstenite::tungstenite::Error> {
        use tokio_tungstenite::tungstenite::client::IntoClientRequest;
        let mut req = server.ws_url().into_client_request().unwrap();
        if let Some(k) = key {
            req.headers_mut()
                .insert("authorization", format!("Bearer {k}").parse().unwrap());
        }
        let (stream, _) = tokio_tungstenite::connect_async(req).await?;
        Ok(Self { stream })
    }

    /// Connects to `url` as given (e.g. with `?access_token=`), without an `Authorization` header.
    pub async fn try_connect_url(url: &str) -> Result<Self, tokio_tungstenite::tungstenite::Error> {
        let (stream, _) = tokio_tungstenite::connect_async(url).await?;
        Ok(Self { stream })
    }

    /// Sends a binary frame (the protocol wants text).
    pub async fn send_binary(&mut self, bytes: Vec<u8>) {
        self.stream.send(Message::Binary(bytes)).await.unwrap();
    }

    /// Asserts that no frame arrives within `quiet` (the socket stays silent); `quiet` must be
    /// more than zero, or the check could not fail.
    pub async fn assert_silent(&mut self, quiet: Duration) {
        assert!(!quiet.is_zero(), "a zero-length silence checks nothing");
        if let Some(f) = self.try_recv(quiet).await {
            panic!("expected no frame, got {f}");
        }
    }

    pub async fn send(&mut self, frame: Value) {
        self.stream
            .send(Message::Text(frame.to_string()))
            .await
            .unwrap();
    }

    pub async fn send_raw(&mut self, text: &str) {
        self.stream
            .send(Message::Text(text.to_owned()))
            .await
            .unwrap();
    }

    /// The next JSON frame (pings are answered by tungstenite itself).
    pub async fn recv(&mut self) -> Value {
        self.try_recv(TIMEOUT)
            .await
            .expect("no frame before the timeout")
    }

    /// The next JSON frame within `timeout`. A frame already received is always returned, even
    /// with a zero timeout (the socket is polled at least once).
    pub async fn try_recv(&mut self, timeout: Duration) -> Option<Value> {
        let end = Instant::now() + timeout;
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match tokio::time::timeout(left, self.stream.next())
                .await
                .ok()??
            {
                Ok(Message::Text(t)) => return Some(serde_json::from_str(&t).unwrap()),
                Ok(Message::Close(_)) | Err(_) => return None,
                Ok(_) => {}
            }
        }
    }

    /// Frames up to and including the first one for which `stop` holds.
    pub async fn recv_until(&mut self, mut stop: impl FnMut(&Value) -> bool) -> Vec<Value> {
        let mut out = Vec::new();
        loop {
            let f = self.recv().await;
            let done = stop(&f);
            out.push(f);
            if done {
                return out;
            }
        }
    }

    /// The close frame's code, waiting up to `timeout`.
    pub async fn close_code(&mut self, timeout: Duration) -> Option<u16> {
        let end = Instant::now() + timeout;
        loop {
            let left = end.checked_duration_since(Instant::now())?;
            match tokio::time::timeout(left, self.stream.next()).await.ok()? {
                Some(Ok(Message::Close(frame))) => return frame.map(|f| u16::from(f.code)),
                Some(Ok(_)) => {}
                Some(Err(_)) | None => return None,
            }
        }
    }

    /// Creates a conversation; answers its id.
    pub async fn create(&mut self, model: &str) -> String {
        self.send(json!({"type": "create", "client_id": "c-create", "model": model}))
            .await;
        let f = self.recv().await;
        assert_eq!(f["type"], "created", "{f}");
        f["conversation"].as_str().unwrap().to_owned()
    }

    /// Subscribes to a conversation's live frames (no replay).
    pub async fn subscribe(&mut self, conv: &str) {
        self.send(json!({"type": "subscribe", "conversation": conv}))
            .await;
        let f = self.recv().await;
        assert_eq!(f["type"], "subscribed", "{f}");
    }

    /// Sends a user message and collects frames until its `done` or `error`.
    pub async fn turn(&mut self, conv: &str, client_id: &str, content: &str) -> Vec<Value> {
        self.send(json!({"type": "user_message", "conversation": conv, "client_id": client_id, "content": content})).await;
        self.recv_until(|f| is_end_of(f, client_id)).await
    }
}

/// Whether `f` ends the turn of `client_id` (its `done`, or an `error` naming it).
pub fn is_end_of(f: &Value, client_id: &str) -> bool {
    f["type"] == "done" || (f["type"] == "error" && f["client_id"] == client_id)
}

/// The concatenated `delta` texts among `frames`.
pub fn delta_text(frames: &[Value]) -> String {
    frames
        .iter()
        .filter(|f| f["type"] == "delta")
        .map(|f| f["text"].as_str().unwrap())
        .collect()
}

/// The mock's reply to exactly these messages (for asserting on deterministic text).
pub fn mock_reply(seed: u64, messages: &[(&str, &str)]) -> String {
    let msgs: Vec<_> = messages
        .iter()
        .map(|(r, c)| parley::mock_upstream::generator::MockMessage {
            role: (*r).into(),
            content: (*c).into(),
        })
        .collect();
    parley::mock_upstream::generator::plan(seed, &msgs, None).text()
}

/// The built binary, run as a child process (startup, SIGTERM and `kill -9` tests).
pub struct BinServer {
    pub child: Child,
    pub addr: SocketAddr,
    pub log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl BinServer {
    /// Runs `parley serve --config FILE` and waits for its "listening on" line.
    pub fn start(config_toml: &str, dir: &Path, envs: &[(&str, &str)]) -> Self {
        let cfg_path = dir.join("parley.toml");
        std::fs::write(&cfg_path, config_toml).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_parley"));
        cmd.args(["serve", "--config"])
            .arg(&cfg_path)
            .args(["--listen", "127.0.0.1:0", "--data-dir"])
            .arg(dir.join("data"));
        cmd.env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .env_remove("PARLEY_CONFIG");
        for (k, v) in envs {
            cmd.env(k, v);
        }
        Self::spawn(cmd)
    }

    /// Runs a prepared `parley serve` command and waits for its "listening on" line.
    pub fn spawn(mut cmd: Command) -> Self {
        let mut child = cmd
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let log2 = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(addr) = line.split("listening on ").nth(1) {
                    let _ = tx.send(addr.trim().to_owned());
                }
                log2.lock().unwrap().push(line);
            }
        });
        let addr = rx
            .recv_timeout(Duration::from_secs(20))
            .expect("binary did not log its address");
        Self {
            child,
            addr: strip_ansi(&addr).parse().unwrap(),
            log,
        }
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    /// Stored messages of a conversation over REST (the first 10 000).
    pub async fn messages(&self, conv: &str) -> Vec<Value> {
        let v: Value = http()
            .get(self.url(&format!("/v1/conversations/{conv}/messages?limit=10000")))
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        v["data"]
            .as_array()
            .unwrap_or_else(|| panic!("no messages: {v}"))
            .clone()
    }

    pub fn kill9(&mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().unwrap();
        let end = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(Instant::now() < end, "server did not exit after SIGTERM");
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for BinServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::new();
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// The OpenAI error `type` the protocol pairs with each error `code` (PROTOCOL §4, §5).
pub fn openai_error_type(code: &str) -> &'static str {
    match code {
        "bad_request" | "too_large" | "blocked" => "invalid_request_error",
        "unauthorized" => "authentication_error",
        "forbidden" => "permission_error",
        "not_found" | "model_not_found" => "not_found_error",
        "rate_limited" | "quota_exceeded" => "rate_limit_error",
        "upstream_error" | "upstream_unavailable" | "upstream_interrupted" => "upstream_error",
        "internal" => "server_error",
        other => panic!("not a protocol error code: {other}"),
    }
}

/// Checks that `resp` is an error of `status` in the OpenAI shape with exactly `code` (and its
/// type), and nothing else in the body; answers the body.
pub async fn expect_error(resp: reqwest::Response, status: u16, code: &str) -> Value {
    let got = resp.status().as_u16();
    let ctype = resp
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let text = resp.text().await.unwrap();
    assert_eq!(got, status, "{text}");
    assert!(
        ctype.starts_with("application/json"),
        "content-type {ctype:?} of {text}"
    );
    let body: Value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("not JSON ({e}): {text}"));
    let err = body["error"]
        .as_object()
        .unwrap_or_else(|| panic!("no error object: {body}"));
    assert_eq!(body.as_object().unwrap().len(), 1, "{body}");
    let mut keys: Vec<_> = err.keys().map(String::as_str).collect();
    keys.sort_unstable();
    assert_eq!(keys, ["code", "message", "type"], "{body}");
    assert_eq!(err["code"], code, "{body}");
    assert_eq!(err["type"], openai_error_type(code), "{body}");
    assert!(!err["message"].as_str().unwrap().is_empty(), "{body}");
    body
}

/// The body `{"error": {"message", "type", "code"}}` the server answers for `code`.
pub fn error_body(code: &str, message: &str) -> Value {
    json!({"error": {"message": message, "type": openai_error_type(code), "code": code}})
}

/// One server-sent event.
#[derive(Debug, Clone, PartialEq)]
pub struct SseEvent {
    pub event: Option<String>,
    pub data: String,
}

/// Splits an SSE body into its events (`event:` and `data:` lines; comments skipped).
pub fn sse_events(body: &str) -> Vec<SseEvent> {
    let mut out = Vec::new();
    for block in body.replace("\r\n", "\n").split("\n\n") {
        let mut event = None;
        let mut data: Vec<&str> = Vec::new();
        for line in block.lines() {
            if let Some(v) = line.strip_prefix("event:") {
                event = Some(v.trim_start().to_owned());
            } else if let Some(v) = line.strip_prefix("data:") {
                data.push(v.strip_prefix(' ').unwrap_or(v));
            }
        }
        if event.is_some() || !data.is_empty() {
            out.push(SseEvent {
                event,
                data: data.join("\n"),
            });
        }
    }
    out
}

/// The mock's whole plan for exactly these messages (reply text and token counts).
pub fn mock_plan(seed: u64, messages: &[(&str, &str)]) -> parley::mock_upstream::generator::Plan {
    let msgs: Vec<_> = messages
        .iter()
        .map(|(r, c)| parley::mock_upstream::generator::MockMessage {
            role: (*r).into(),
            content: (*c).into(),
        })
        .collect();
    parley::mock_upstream::generator::plan(seed, &msgs, None)
}

/// A request with `Authorization: Bearer key` when `key` is given.
pub fn with_key(req: reqwest::RequestBuilder, key: Option<&str>) -> reqwest::RequestBuilder {
    match key {
        Some(k) => req.bearer_auth(k),
        None => req,
    }
}

/// Runs `python3 args…` with `envs`; answers (success, stdout, stderr).
pub async fn python(args: Vec<String>, envs: Vec<(String, String)>) -> (bool, String, String) {
    tokio::task::spawn_blocking(move || {
        let out = std::process::Command::new("python3")
            .args(&args)
            .envs(envs)
            .env_remove("OPENAI_BASE_URL")
            .env_remove("OPENAI_API_KEY")
            .output()
            .unwrap_or_else(|e| panic!("cannot run python3 ({e}): the OpenAI SDK test needs python3 with `pip install openai`"));
        (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
    })
    .await
    .unwrap()
}

/// A config file with only the built-in mock provider, for tests that run the binary.
pub const MOCK_ONLY: &str = r#"
[[providers]]
name = "mock"
kind = "mock"

[[routes]]
model = "mock"
targets = [{ provider = "mock", model = "mock-1" }]
"#;
