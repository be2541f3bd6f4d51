//! Server → client frames (PROTOCOL §5) and the sinks they are delivered to.
//!
//! A frame is serialised once and shared by every subscriber. A sink is a WebSocket session (an
//! actor `Recipient`) or a channel (an HTTP request waiting for its reply); both are bounded, and
//! a subscriber that cannot keep up is dropped with a close notice rather than buffered forever.

use std::sync::Arc;

use actix::prelude::*;
use serde::Serialize;
use tokio::sync::mpsc;

use crate::domain::Content;
use crate::error::{ApiError, ErrorCode};
use crate::ids::ConversationId;
use crate::store::{MessageRecord, Role, Usage};
use crate::wire::openai::{ToolCallChunk, WireToolCall};

/// A stored message as clients see it: its content as it was sent (a string, or parts), and
/// for tool use its calls or the call it answers.
#[derive(Debug, Clone, Serialize)]
pub struct WireMessage {
    pub seq: u64,
    pub role: Role,
    pub content: Content,
    pub created_at: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub finish_reason: Option<String>,
    /// The versioned system prompt a reply was written under (`name@version`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub prompt_version: Option<String>,
    /// Guardrail findings (`prompt_injection`, `system_prompt_leak`).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub flags: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<WireToolCall>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub is_error: bool,
    /// A reply: the upstream model that wrote it, its usage, whether the cache served it, and
    /// a semantic route's tier (parley additions, so a client shows them after a reload too).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cached: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tier: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cost: Option<f64>,
}

impl From<MessageRecord> for WireMessage {
    fn from(m: MessageRecord) -> Self {
        Self {
            tool_calls: m.tool_calls.iter().map(WireToolCall::from).collect(),
            tool_call_id: m.tool_call_id.clone(),
            is_error: m.is_error,
            seq: m.seq,
            role: m.role,
            content: m.content(),
            created_at: m.created_at,
            client_id: m.client_id,
            finish_reason: m.finish_reason,
            model: m
                .reply
                .as_ref()
                .map(|r| r.model.clone())
                .filter(|x| !x.is_empty()),
            usage: m.reply.as_ref().map(|r| r.usage),
            cached: m.reply.as_ref().map(|r| r.cached),
            tier: m.reply.as_ref().and_then(|r| r.tier.clone()),
            cost: m.reply.as_ref().and_then(|r| r.cost),
            prompt_version: m.reply.and_then(|r| r.prompt_version),
            flags: m.flags,
        }
    }
}

/// The `done` frame's body.
#[derive(Debug, Clone, Serialize)]
pub struct Done {
    pub conversation: ConversationId,
    pub reply_to: u64,
    pub seq: u64,
    pub finish_reason: String,
    pub usage: Usage,
    pub cached: bool,
    pub provider: String,
    pub model: String,
    pub ttft_ms: Option<u64>,
    /// The calls of a reply that ended with `tool_calls`, as OpenAI writes them.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<WireToolCall>,
    /// A semantic route: the tier that wrote the reply.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tier: Option<String>,
    /// What the reply cost at the price table (parley addition).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cost: Option<f64>,
}

/// The `error` frame's body.
#[derive(Debug, Clone, Serialize)]
pub struct ErrorFrame {
    pub code: ErrorCode,
    pub message: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub conversation: Option<ConversationId>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reply_to: Option<u64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub retry_after_ms: Option<u64>,
}

impl ErrorFrame {
    pub fn new(err: &ApiError) -> Self {
        Self {
            // The frame's code list (PROTOCOL §5) has no `model_not_found`: an unknown model is
            // a thing not found; the message names it.
            code: match err.code {
                ErrorCode::ModelNotFound => ErrorCode::NotFound,
                code => code,
            },
            message: err.message.clone(),
            conversation: None,
            client_id: None,
            reply_to: None,
            retry_after_ms: err.retry_after_ms(),
        }
    }
}

/// Every frame the server sends.
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerFrame {
    Created {
        client_id: String,
        conversation: ConversationId,
    },
    Subscribed {
        conversation: ConversationId,
        last_seq: u64,
    },
    /// The conversation's tools changed (`update`); `tools` is how many it offers now.
    Updated {
        conversation: ConversationId,
        tools: usize,
    },
    Ack {
        conversation: ConversationId,
        client_id: String,
        seq: u64,
    },
    Delta {
        conversation: ConversationId,
        reply_to: u64,
        text: String,
        /// Fragments of the reply's tool calls, as OpenAI streams them.
        #[serde(skip_serializing_if = "Option::is_none")]
        tool_calls: Option<Vec<ToolCallChunk>>,
    },
    Done(Done),
    Message {
        conversation: ConversationId,
        #[serde(flatten)]
        message: WireMessage,
    },
    Error(ErrorFrame),
    /// Something the client may want to know mid-turn (`provider_switched`).
    Notice {
        conversation: ConversationId,
        reply_to: u64,
        code: &'static str,
        message: String,
        provider: String,
    },
}

impl ServerFrame {
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Created { .. } => "created",
            Self::Subscribed { .. } => "subscribed",
            Self::Updated { .. } => "updated",
            Self::Ack { .. } => "ack",
            Self::Delta { .. } => "delta",
            Self::Done(_) => "done",
            Self::Message { .. } => "message",
            Self::Error(_) => "error",
            Self::Notice { .. } => "notice",
        }
    }

    /// Serialises the frame once for every sink.
    pub fn encode(&self) -> Outbound {
        // Serialising these plain structs cannot fail; an empty object keeps the socket alive.
        let json = serde_json::to_string(self).unwrap_or_else(|_| "{}".into());
        Outbound::Frame {
            frame: Arc::new(self.clone()),
            json: json.into(),
        }
    }
}

/// Close code for a socket that could not keep up (1013, "try again later").
pub const CLOSE_LAGGING: u16 = 1013;

/// What is delivered to a sink.
#[derive(Debug, Clone, Message)]
#[rtype(result = "()")]
pub enum Outbound {
    Frame {
        frame: Arc<ServerFrame>,
        json: Arc<str>,
    },
    /// The subscriber fell behind or lost its right to listen; the socket closes with `code`.
    Close { code: u16, reason: &'static str },
    /// A frame the node running the conversation sent (cluster relay), passed on as it came.
    Relayed(Arc<str>),
}

/// Where frames of a conversation are delivered.
#[derive(Clone)]
pub enum Sink {
    Socket(Recipient<Outbound>),
    Channel(mpsc::Sender<Outbound>),
}

impl Sink {
    /// Delivers without waiting; `false` means the sink is gone or full and should be dropped.
    pub fn deliver(&self, out: &Outbound) -> bool {
        match self {
            Self::Socket(r) => match r.try_send(out.clone()) {
                Ok(()) => true,
                Err(SendError::Full(_)) => {
                    self.close_lagging();
                    false
                }
                Err(SendError::Closed(_)) => false,
            },
            Self::Channel(tx) => tx.try_send(out.clone()).is_ok(),
        }
    }

    /// Tells the listener it fell behind and is dropped (a socket closes with 1013). Beyond
    /// the mailbox's capacity on purpose: the notice must reach a lagging socket.
    pub fn close_lagging(&self) {
        let close = Outbound::Close {
            code: CLOSE_LAGGING,
            reason: "subscriber fell behind",
        };
        match self {
            Self::Socket(r) => r.do_send(close),
            Self::Channel(tx) => {
                let _ = tx.try_send(close);
            }
        }
    }

    /// Delivers a replay frame once the listener has room for it (a long replay keeps pace
    /// with the socket instead of piling up in its mailbox); `false` when the listener is gone.
    pub async fn deliver_paced(&self, out: &Outbound) -> bool {
        match self {
            Self::Socket(r) => r.send(out.clone()).await.is_ok(),
            Self::Channel(tx) => tx.send(out.clone()).await.is_ok(),
        }
    }

    /// Whether the listener behind the sink is gone.
    pub fn is_closed(&self) -> bool {
        match self {
            Self::Socket(r) => !r.connected(),
            Self::Channel(tx) => tx.is_closed(),
        }
    }
}
