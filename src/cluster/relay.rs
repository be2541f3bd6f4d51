//! Relaying a conversation's traffic to the node that runs it.
//!
//! The owner sees an ordinary client with the client's own credentials, so keys, limits,
//! ordering, idempotency and fan-out are the owner's, exactly as on one node. A relayed request
//! carries `x-parley-relayed` and is never relayed again: a node that receives one for a
//! conversation it does not hold serves it itself (taking the lease) or refuses it.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::Recipient;
use futures_util::{SinkExt, StreamExt};
use secrecy::{ExposeSecret, SecretString};
use serde::Deserialize;
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message as WsMessage;

use super::{Cluster, Owner};
use crate::conversation::frames::ErrorFrame;
use crate::conversation::{Outbound, ServerFrame};
use crate::error::{ApiError, ErrorCode};
use crate::ids::ConversationId;

/// The header that marks a relayed request (its value: the relaying node).
pub const RELAYED: &str = "x-parley-relayed";

/// How often a caller looks again while a dead node's lease lapses.
const LAPSE_POLL: Duration = Duration::from_millis(100);

/// Who runs `id`, waiting while a dead node's lease lapses (at most the lease time and a
/// second more). `None`: nobody, so this node may take it.
///
/// # Errors
/// `upstream_unavailable` when Redis cannot be reached or the lease never lapses.
pub async fn settled_owner(
    cluster: &Cluster,
    id: &ConversationId,
) -> Result<Option<Owner>, ApiError> {
    let deadline = Instant::now() + cluster.lease() + Duration::from_secs(1);
    loop {
        match cluster.owner(id).map_err(ApiError::from)? {
            Some(Owner::Lapsing) if Instant::now() < deadline => {
                tokio::time::sleep(LAPSE_POLL).await;
            }
            Some(Owner::Lapsing) => {
                return Err(ApiError::new(
                    ErrorCode::UpstreamUnavailable,
                    "the node that ran this conversation is gone and its lease has not lapsed",
                ))
            }
            other => return Ok(other),
        }
    }
}

/// Where traffic for `id` goes: `None` to this node (it holds the lease now, or took it as
/// nobody did), or the node to relay to. Taking a free lease here, atomically, is what keeps
/// two nodes from both deciding to serve it.
///
/// # Errors
/// As [`settled_owner`].
pub async fn route(
    cluster: &Cluster,
    id: &ConversationId,
) -> Result<Option<(String, String)>, ApiError> {
    loop {
        let owner = match settled_owner(cluster, id).await? {
            Some(owner) => owner,
            None => cluster.acquire(id).map_err(ApiError::from)?,
        };
        match owner {
            Owner::Here => return Ok(None),
            Owner::There { node, addr } => return Ok(Some((node, addr))),
            // Taken by a node that died at once: wait for that lapse too.
            Owner::Lapsing => tokio::time::sleep(LAPSE_POLL).await,
        }
    }
}

/// What a relay link tells its socket's command task.
#[derive(Debug)]
pub struct Lost {
    pub node: String,
    /// Which link of that node broke (a newer one may have replaced it already).
    pub link: u64,
    /// Conversations the socket watched through the link, with the last `seq` it saw.
    pub watched: Vec<(ConversationId, u64)>,
    /// Client frames that never reached the node, in order: they go where the conversation
    /// runs now (a frame that did reach it is the client's to resend if it was not acked).
    pub unsent: Vec<String>,
}

#[derive(Default)]
struct Watch {
    last_seq: u64,
    /// The user message whose reply is streaming (an `ack` or `delta` without its end).
    streaming: Option<u64>,
    subscribed: bool,
}

/// The few fields of a server frame a link follows.
#[derive(Deserialize)]
struct Peek {
    #[serde(rename = "type")]
    kind: String,
    conversation: Option<String>,
    seq: Option<u64>,
    reply_to: Option<u64>,
    last_seq: Option<u64>,
}

/// A frame for the owner, and the conversation it subscribes the socket to (if it does).
pub struct ToOwner {
    pub text: String,
    pub subscribes: Option<ConversationId>,
    /// The newest `seq` the socket has seen of that conversation.
    pub seen: u64,
}

/// One client socket's relay to one node: a WebSocket to it, opened on first use.
pub struct Link {
    tx: mpsc::Sender<ToOwner>,
    pub id: u64,
}

static LINKS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// Client frames that may wait for a relay socket (as many as for the socket's own handling).
const LINK_QUEUE: usize = 256;

impl Link {
    /// Opens a link to `addr` for the socket `socket`, authenticated as the socket's client.
    /// When it breaks, every watcher of a reply that was streaming through it gets
    /// `upstream_interrupted`, and `lost` hears what it watched.
    pub fn open(
        cluster: &Cluster,
        node: String,
        addr: &str,
        token: Option<Arc<SecretString>>,
        socket: Recipient<Outbound>,
        lost: mpsc::UnboundedSender<Lost>,
    ) -> Self {
        let (tx, rx) = mpsc::channel(LINK_QUEUE);
        let url = format!("ws://{addr}/v1/ws");
        let me = cluster.node().to_owned();
        let id = LINKS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        actix::spawn(run_link(url, me, (node, id), token, socket, rx, lost));
        Self { tx, id }
    }

    /// Queues a frame for the node; gives it back when the queue is full or the link is gone.
    ///
    /// # Errors
    /// `Full` or `Closed`, with the frame.
    pub fn send(&self, frame: ToOwner) -> Result<(), mpsc::error::TrySendError<ToOwner>> {
        self.tx.try_send(frame)
    }
}

async fn run_link(
    url: String,
    me: String,
    (node, link): (String, u64),
    token: Option<Arc<SecretString>>,
    socket: Recipient<Outbound>,
    mut rx: mpsc::Receiver<ToOwner>,
    lost: mpsc::UnboundedSender<Lost>,
) {
    let mut watched: HashMap<ConversationId, Watch> = HashMap::new();
    let mut pending: Vec<ToOwner> = Vec::new();
    match connect(&url, &me, token.as_deref()).await {
        Ok(ws) => {
            let (mut write, mut read) = ws.split();
            loop {
                tokio::select! {
                    out = rx.recv() => {
                        let Some(out) = out else {
                            // The client socket closed: close ours.
                            let _ = write.send(WsMessage::Close(None)).await;
                            return;
                        };
                        if let Some(id) = &out.subscribes {
                            let w = watched.entry(id.clone()).or_default();
                            w.subscribed = true;
                            w.last_seq = w.last_seq.max(out.seen);
                        }
                        if write.send(WsMessage::Text(out.text.clone())).await.is_err() {
                            pending.push(out);
                            break;
                        }
                    }
                    inbound = read.next() => match inbound {
                        Some(Ok(WsMessage::Text(text))) => {
                            follow(&mut watched, &text);
                            socket.do_send(Outbound::Relayed(Arc::from(text.as_str())));
                        }
                        Some(Ok(WsMessage::Close(_)) | Err(_)) | None => break,
                        Some(Ok(_)) => {}
                    },
                }
            }
        }
        Err(e) => tracing::warn!(node = %node, error = %e, "cannot open a relay to the node"),
    }
    // Frames sent into the dead link were never seen by the owner.
    while let Ok(out) = rx.try_recv() {
        pending.push(out);
    }
    // A link that never opened (or broke) leaves its client's frames unsent; re-sending
    // one subscribes the socket again, so it is not counted as watched here.
    let unsent = pending.into_iter().map(|out| out.text).collect();
    for (id, w) in &watched {
        if let Some(reply_to) = w.streaming {
            let mut frame = ErrorFrame::new(&ApiError::new(
                ErrorCode::UpstreamInterrupted,
                "the node running this conversation stopped during the reply",
            ));
            frame.conversation = Some(id.clone());
            frame.reply_to = Some(reply_to);
            socket.do_send(ServerFrame::Error(frame).encode());
        }
    }
    let watched = watched
        .into_iter()
        .filter(|(_, w)| w.subscribed)
        .map(|(id, w)| (id, w.last_seq))
        .collect();
    let _ = lost.send(Lost {
        node,
        link,
        watched,
        unsent,
    });
}

async fn connect(
    url: &str,
    me: &str,
    token: Option<&SecretString>,
) -> Result<
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>,
    String,
> {
    let mut req = url.into_client_request().map_err(|e| e.to_string())?;
    let headers = req.headers_mut();
    if let Some(t) = token {
        let value = format!("Bearer {}", t.expose_secret());
        headers.insert(
            "authorization",
            value.parse().map_err(|_| "unusable token".to_owned())?,
        );
    }
    headers.insert(RELAYED, me.parse().map_err(|_| "bad node id".to_owned())?);
    let connected = tokio::time::timeout(
        Duration::from_secs(5),
        tokio_tungstenite::connect_async(req),
    )
    .await
    .map_err(|_| "timed out".to_owned())?;
    connected.map(|(ws, _)| ws).map_err(|e| e.to_string())
}

/// Follows a frame from the owner: the newest `seq` seen, and whether a reply is streaming.
fn follow(watched: &mut HashMap<ConversationId, Watch>, text: &str) {
    let Ok(peek) = serde_json::from_str::<Peek>(text) else {
        return;
    };
    let Some(id) = peek.conversation.as_deref().and_then(ConversationId::parse) else {
        return;
    };
    let w = watched.entry(id).or_default();
    match peek.kind.as_str() {
        "ack" => {
            w.subscribed = true;
            w.last_seq = w.last_seq.max(peek.seq.unwrap_or(0));
            w.streaming = peek.seq;
        }
        "delta" => w.streaming = peek.reply_to.or(w.streaming),
        "done" => {
            w.last_seq = w.last_seq.max(peek.seq.unwrap_or(0));
            w.streaming = None;
        }
        "error" if peek.reply_to.is_some() => w.streaming = None,
        "message" => w.last_seq = w.last_seq.max(peek.seq.unwrap_or(0)),
        "subscribed" => {
            w.subscribed = true;
            w.last_seq = w.last_seq.max(peek.last_seq.unwrap_or(0));
        }
        _ => {}
    }
}

/// Forwards an HTTP request whole to the node at `addr` and streams its answer back.
///
/// # Errors
/// `upstream_unavailable` when the node cannot be reached.
pub async fn http(
    client: &reqwest::Client,
    me: &str,
    addr: &str,
    req: &actix_web::HttpRequest,
    body: bytes::Bytes,
) -> Result<actix_web::HttpResponse, ApiError> {
    let path = req
        .uri()
        .path_and_query()
        .map_or(req.path(), |p| p.as_str());
    let url = format!("http://{addr}{path}");
    let method = reqwest::Method::from_bytes(req.method().as_str().as_bytes())
        .map_err(|_| ApiError::bad_request("unsupported method"))?;
    let mut out = client.request(method, &url).header(RELAYED, me).body(body);
    for (name, value) in req.headers() {
        let n = name.as_str();
        if matches!(
            n,
            "authorization" | "content-type" | "accept" | "x-parley-tier" | "idempotency-key"
        ) {
            out = out.header(n, value.as_bytes());
        }
    }
    let answer = out.send().await.map_err(|e| {
        tracing::warn!(node = %addr, error = %e.without_url(), "relay to the owning node failed");
        ApiError::new(
            ErrorCode::UpstreamUnavailable,
            "the node running this conversation cannot be reached; try again shortly",
        )
    })?;
    let status = actix_web::http::StatusCode::from_u16(answer.status().as_u16())
        .unwrap_or(actix_web::http::StatusCode::BAD_GATEWAY);
    let mut reply = actix_web::HttpResponse::build(status);
    for (name, value) in answer.headers() {
        let n = name.as_str();
        if matches!(
            n,
            "content-type" | "retry-after" | "cache-control" | "location"
        ) {
            reply.insert_header((n, value.as_bytes()));
        }
    }
    Ok(reply.streaming(answer.bytes_stream()))
}
