//! The driver's side of a socket: bind a loopback source address, connect, upgrade; read and
//! write JSON frames.

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::time::Duration;

use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio::net::{TcpSocket, TcpStream};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;

pub type Ws = WebSocketStream<TcpStream>;

/// The source address of client socket `i` when each address carries `per_addr` sockets:
/// 127.0.0.2, 127.0.0.3, … (the server listens on 127.0.0.1).
pub fn source(i: usize, per_addr: usize) -> IpAddr {
    let n = i / per_addr.max(1);
    let [_, b, c, d] = (0x7f00_0002_u32 + n as u32).to_be_bytes();
    IpAddr::V4(Ipv4Addr::new(127, b, c, d))
}

/// A WebSocket from `src` (any port) to the server's `/v1/ws`.
pub async fn connect(src: IpAddr, server: SocketAddr) -> anyhow::Result<Ws> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(src, 0))?;
    let stream = socket.connect(server).await?;
    stream.set_nodelay(true)?;
    let (ws, _) = tokio_tungstenite::client_async(format!("ws://{server}/v1/ws"), stream).await?;
    Ok(ws)
}

pub async fn send(ws: &mut Ws, frame: &Value) -> anyhow::Result<()> {
    ws.send(Message::Text(frame.to_string())).await?;
    Ok(())
}

/// The next JSON frame; `None` when the socket ended. Pings are answered by tungstenite.
pub async fn recv(ws: &mut Ws) -> Option<Value> {
    loop {
        match ws.next().await? {
            Ok(Message::Text(t)) => return serde_json::from_str(&t).ok(),
            Ok(Message::Close(_)) | Err(_) => return None,
            Ok(_) => {}
        }
    }
}

/// The next frame of type `ty` within `wait` (other frames are skipped); an `error` frame or
/// the end of the socket is an error.
pub async fn expect(ws: &mut Ws, ty: &str, wait: Duration) -> anyhow::Result<Value> {
    let found = tokio::time::timeout(wait, async {
        while let Some(frame) = recv(ws).await {
            match frame["type"].as_str() {
                Some(t) if t == ty => return Ok(frame),
                Some("error") => anyhow::bail!("error frame: {}", frame["code"]),
                _ => {}
            }
        }
        anyhow::bail!("socket closed before {ty}")
    })
    .await;
    found.map_err(|_| anyhow::anyhow!("no {ty} within {wait:?}"))?
}

/// Opens a socket and creates a conversation on route `mock`: the socket and the id.
pub async fn open_conversation(
    src: IpAddr,
    server: SocketAddr,
    wait: Duration,
) -> anyhow::Result<(Ws, String)> {
    let mut ws = tokio::time::timeout(wait, connect(src, server))
        .await
        .map_err(|_| anyhow::anyhow!("connect timed out"))??;
    let create = serde_json::json!({"type": "create", "client_id": "c", "model": "mock"});
    send(&mut ws, &create).await?;
    let created = expect(&mut ws, "created", wait).await?;
    let id = created["conversation"]
        .as_str()
        .ok_or_else(|| anyhow::anyhow!("created without an id"))?
        .to_owned();
    Ok((ws, id))
}

/// Closes politely, waiting at most `wait` for the server's close.
pub async fn close(mut ws: Ws, wait: Duration) {
    let _ = tokio::time::timeout(wait, async {
        let _ = ws.close(None).await;
        while recv(&mut ws).await.is_some() {}
    })
    .await;
}

/// A short name for an error, to count failures by kind.
pub fn kind(e: &anyhow::Error) -> String {
    e.to_string().chars().take(80).collect()
}
