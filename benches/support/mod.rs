//! What the server benches share: parley on loopback (in-process, on its own actix system
//! thread, with a tempdir store) with route `up` to a mock upstream.

use std::net::TcpListener;

use parley::config::{Config, ProviderConfig, ProviderKind, RouteConfig, TargetConfig};
use parley::mock_upstream::MockUpstream;

pub struct Server {
    pub addr: std::net::SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

impl Server {
    /// Starts parley with route `up` → `upstream`; `configure` adjusts the config first.
    pub fn start(upstream: &MockUpstream, configure: impl FnOnce(&mut Config)) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let mut cfg = Config::embedded(|_| false);
        cfg.auth.admin_key_env = "PARLEY_BENCH_NO_ADMIN_KEY".into();
        cfg.providers.push(ProviderConfig {
            name: "up".into(),
            kind: ProviderKind::Openai,
            base_url: Some(upstream.base_url()),
            region: None,
            ..ProviderConfig::builtin_mock()
        });
        cfg.routes.push(RouteConfig::new(
            "up",
            vec![TargetConfig::new("up", "mock-1")],
        ));
        configure(&mut cfg);
        let (addr_tx, addr_rx) = std::sync::mpsc::channel();
        let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
        let data = dir.path().to_owned();
        let thread = std::thread::spawn(move || {
            actix_web::rt::System::new().block_on(async move {
                let store = parley::store::Store::open(&data).unwrap();
                let listener = TcpListener::bind("127.0.0.1:0").unwrap();
                let handle = parley::app::start(cfg, listener, store).unwrap();
                addr_tx.send(handle.addr).unwrap();
                let _ = stop_rx.await;
                handle.shutdown().await.unwrap();
            });
        });
        let addr = addr_rx.recv().unwrap();
        Self {
            addr,
            stop: Some(stop_tx),
            thread: Some(thread),
            _dir: dir,
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(s) = self.stop.take() {
            let _ = s.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The value at fraction `p` of sorted durations.
pub fn percentile(sorted: &[std::time::Duration], p: f64) -> std::time::Duration {
    if sorted.is_empty() {
        return std::time::Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// A WebSocket client of the server.
pub type Socket =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

/// The next JSON frame (pings are answered by tungstenite itself).
pub async fn frame(ws: &mut Socket) -> serde_json::Value {
    use futures_util::StreamExt;
    loop {
        let msg = tokio::time::timeout(std::time::Duration::from_secs(10), ws.next())
            .await
            .expect("frame before the timeout")
            .expect("socket open")
            .expect("frame");
        if let tokio_tungstenite::tungstenite::Message::Text(t) = msg {
            return serde_json::from_str(&t).unwrap();
        }
    }
}
