//! `WsSession`: one WebSocket. It stays thin: frames in are decoded and queued, in order, for
//! the session's commands ([`commands`](super::commands)); frames out arrive as [`Outbound`]
//! messages and are written as text. It pings every [`PING_INTERVAL`] and drops a peer silent
//! for [`CLIENT_TIMEOUT`]; a frame over the size limit closes the socket with 1009.

use std::time::{Duration, Instant};

use actix::prelude::*;
use actix_http::ws::Item;
use actix_web::web;
use actix_web_actors::ws::{self, CloseCode, CloseReason};
use std::sync::Arc;

use secrecy::SecretString;

use super::commands::{CommandCtx, Commands, Incoming, Work};
use super::frames::decode;
use crate::conversation::frames::ErrorFrame;
use crate::conversation::{next_sink_id, Outbound, ServerFrame, SinkId};
use crate::error::{ApiError, ErrorCode};
use crate::server::AppState;
use crate::tenant::Principal;

pub const PING_INTERVAL: Duration = Duration::from_secs(15);
pub const CLIENT_TIMEOUT: Duration = Duration::from_secs(45);
/// Frames delivered to the socket that may wait in its mailbox.
const MAILBOX: usize = 8192;

pub struct WsSession {
    state: web::Data<AppState>,
    principal: Principal,
    sink_id: SinkId,
    heartbeat: Instant,
    max_frame: usize,
    /// Set when the actor starts.
    commands: Option<Commands>,
    /// The client's key, kept only in cluster mode (relays present it to the owning node).
    token: Option<Arc<SecretString>>,
    /// A fragmented text message being reassembled.
    partial: Option<Vec<u8>>,
}

impl WsSession {
    pub fn new(
        state: web::Data<AppState>,
        principal: Principal,
        token: Option<Arc<SecretString>>,
        max_frame: usize,
    ) -> Self {
        Self {
            state,
            principal,
            token,
            sink_id: next_sink_id(),
            heartbeat: Instant::now(),
            max_frame,
            commands: None,
            partial: None,
        }
    }

    fn send_error(ctx: &mut ws::WebsocketContext<Self>, frame: ErrorFrame) {
        if let Outbound::Frame { json, .. } = ServerFrame::Error(frame).encode() {
            ctx.text(&*json);
        }
    }

    fn on_text(&mut self, text: &str, ctx: &mut ws::WebsocketContext<Self>) {
        let frame = match decode(text) {
            Ok(frame) => frame,
            Err(bad) => {
                let mut frame = ErrorFrame::new(&bad.error);
                frame.conversation = bad
                    .conversation
                    .and_then(|c| crate::ids::ConversationId::parse(&c));
                frame.client_id = bad.client_id;
                return Self::send_error(ctx, frame);
            }
        };
        let Some(commands) = &self.commands else {
            return;
        };
        // Cluster mode keeps the frame as sent, for relaying.
        let raw = self.state.cluster().map(|_| Box::<str>::from(text));
        if !commands.push(Work::Frame(Box::new(Incoming { frame, raw }))) {
            let err = ApiError::new(
                ErrorCode::RateLimited,
                "too many frames in flight on this socket",
            )
            .with_retry_after(Duration::from_secs(1));
            Self::send_error(ctx, ErrorFrame::new(&err));
        }
    }

    fn close(ctx: &mut ws::WebsocketContext<Self>, code: CloseCode, description: &str) {
        ctx.close(Some(CloseReason {
            code,
            description: Some(description.to_owned()),
        }));
        ctx.stop();
    }
}

/// How long a peer last heard `heard_ago` may stay silent before it is dropped (`None`: now).
fn silence_left(heard_ago: Duration) -> Option<Duration> {
    CLIENT_TIMEOUT
        .checked_sub(heard_ago)
        .filter(|left| !left.is_zero())
}

impl WsSession {
    /// Drops the peer once it has been silent for [`CLIENT_TIMEOUT`], to the moment: the watch
    /// wakes when the silence would end and, if the peer spoke meanwhile, sleeps again for what
    /// is left.
    fn watch(&self, ctx: &mut ws::WebsocketContext<Self>) {
        match silence_left(self.heartbeat.elapsed()) {
            Some(left) => {
                ctx.run_later(left, |act, ctx| act.watch(ctx));
            }
            None => {
                tracing::debug!("websocket peer timed out");
                ctx.stop();
            }
        }
    }
}

impl Actor for WsSession {
    type Context = ws::WebsocketContext<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(MAILBOX);
        ctx.run_interval(PING_INTERVAL, |_, ctx| ctx.ping(b""));
        self.watch(ctx);
        let me = ctx.address().recipient::<Outbound>();
        self.state
            .sockets
            .register(self.sink_id, self.principal.key_id.clone(), me.clone());
        let cx = CommandCtx::new(
            self.state.clone(),
            self.principal.clone(),
            self.sink_id,
            me,
            self.token.take(),
        );
        self.commands = Some(Commands::new(cx));
        self.state.metrics.ws_connections.inc();
    }

    fn stopped(&mut self, _ctx: &mut Self::Context) {
        if let Some(commands) = &self.commands {
            commands.close();
        }
        self.state.sockets.unregister(self.sink_id);
        self.state.metrics.ws_connections.dec();
    }
}

impl Handler<Outbound> for WsSession {
    type Result = ();

    fn handle(&mut self, msg: Outbound, ctx: &mut Self::Context) {
        match msg {
            Outbound::Frame { json, .. } | Outbound::Relayed(json) => ctx.text(&*json),
            Outbound::Close { code, reason } => Self::close(ctx, CloseCode::from(code), reason),
        }
    }
}

impl StreamHandler<Result<ws::Message, ws::ProtocolError>> for WsSession {
    fn handle(&mut self, msg: Result<ws::Message, ws::ProtocolError>, ctx: &mut Self::Context) {
        self.heartbeat = Instant::now();
        let msg = match msg {
            Ok(msg) => msg,
            Err(ws::ProtocolError::Overflow) => {
                return Self::close(ctx, CloseCode::Size, "frame too large")
            }
            // actix reports a text frame that is not UTF-8 as an I/O error carrying the UTF-8
            // error's text; RFC 6455 closes such a socket with 1007, not 1002.
            Err(ws::ProtocolError::Io(e)) if e.to_string().contains("utf-8") => {
                return Self::close(ctx, CloseCode::Invalid, "text is not UTF-8");
            }
            Err(e) => {
                tracing::debug!(error = %e, "websocket protocol error");
                return Self::close(ctx, CloseCode::Protocol, "protocol error");
            }
        };
        match msg {
            ws::Message::Text(text) => self.on_text(&text, ctx),
            ws::Message::Binary(_) => {
                Self::send_error(
                    ctx,
                    ErrorFrame::new(&ApiError::bad_request("frames must be JSON text")),
                );
            }
            ws::Message::Continuation(item) => self.on_continuation(item, ctx),
            ws::Message::Ping(bytes) => ctx.pong(&bytes),
            ws::Message::Pong(_) | ws::Message::Nop => {}
            ws::Message::Close(reason) => {
                ctx.close(reason);
                ctx.stop();
            }
        }
    }
}

impl WsSession {
    fn on_continuation(&mut self, item: Item, ctx: &mut ws::WebsocketContext<Self>) {
        let (bytes, last) = match item {
            Item::FirstText(b) => {
                self.partial = Some(Vec::new());
                (b, false)
            }
            Item::FirstBinary(_) => {
                self.partial = None;
                return Self::send_error(
                    ctx,
                    ErrorFrame::new(&ApiError::bad_request("frames must be JSON text")),
                );
            }
            Item::Continue(b) => (b, false),
            Item::Last(b) => (b, true),
        };
        let Some(buf) = self.partial.as_mut() else {
            return;
        };
        if buf.len() + bytes.len() > self.max_frame {
            return Self::close(ctx, CloseCode::Size, "frame too large");
        }
        buf.extend_from_slice(&bytes);
        if last {
            let buf = self.partial.take().unwrap_or_default();
            match String::from_utf8(buf) {
                Ok(text) => self.on_text(&text, ctx),
                Err(_) => Self::close(ctx, CloseCode::Invalid, "text is not UTF-8"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_silent_peer_is_dropped_at_the_timeout_not_the_next_ping() {
        assert_eq!(silence_left(Duration::ZERO), Some(CLIENT_TIMEOUT));
        // Heard 44 s ago: one second left, not until the next 15 s ping tick.
        assert_eq!(
            silence_left(Duration::from_secs(44)),
            Some(Duration::from_secs(1))
        );
        assert_eq!(silence_left(CLIENT_TIMEOUT), None);
        assert_eq!(silence_left(Duration::from_secs(60)), None);
    }
}
