//! The messages a conversation actor answers. Commands are imperative; notices are past tense.

use actix::prelude::*;

use super::fanout::{Scope, SinkId};
use super::frames::Sink;
use crate::domain::{Message, ResponseFormat, Tool, ToolChoice};
use crate::error::ApiError;
use crate::tenant::Principal;

/// Per-turn options of a user message (PROTOCOL §5 `options`).
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TurnOptions {
    /// A route to use for this turn instead of the conversation's.
    #[serde(default)]
    pub model: Option<String>,
    #[serde(default)]
    pub max_tokens: Option<u32>,
    #[serde(default)]
    pub temperature: Option<f32>,
    #[serde(default)]
    pub cache: Option<bool>,
    /// A semantic route's tier for this turn, instead of the one its difficulty calls for.
    #[serde(default)]
    pub tier: Option<String>,
    /// What the Responses face sets for one turn; clients of the WebSocket cannot.
    #[serde(skip)]
    pub turn: TurnOverrides,
}

/// Settings of one turn over the conversation's own (the Responses API sends them with every
/// request).
#[derive(Debug, Clone, Default)]
pub struct TurnOverrides {
    /// The system prompt of this turn instead of the conversation's.
    pub instructions: Option<String>,
    pub tools: Option<Vec<Tool>>,
    pub tool_choice: Option<ToolChoice>,
    pub response_format: Option<ResponseFormat>,
    pub top_p: Option<f64>,
    pub parallel_tool_calls: Option<bool>,
    pub user: Option<String>,
}

/// Subscribes a sink; the actor sends `subscribed`, then the replay after `after_seq` if given,
/// then live traffic. Answers the conversation's `last_seq`.
#[derive(Message)]
#[rtype(result = "Result<u64, ApiError>")]
pub struct Subscribe {
    pub sink_id: SinkId,
    pub sink: Sink,
    pub after_seq: Option<u64>,
}

#[derive(Message)]
#[rtype(result = "()")]
pub struct Unsubscribe {
    pub sink_id: SinkId,
}

/// Queues a user turn. The `ack`, `delta`s and `done` reach the conversation's subscribers and
/// `listener`; a `client_id` seen before appends nothing and replays the original answer.
#[derive(Message)]
#[rtype(result = "Result<Posted, ApiError>")]
pub struct PostUserMessage {
    pub client_id: String,
    /// A user message (text or parts) or a tool result (role `tool`, with its call's id).
    pub message: Message,
    /// Messages stored before it, as given, without replies of their own (a transcript the
    /// client sends at once), each with its content tokens.
    pub history: Vec<(Message, u32)>,
    /// Content tokens (text, images), counted by the caller off the actor's thread.
    pub tokens: u32,
    pub options: TurnOptions,
    /// Who hears this turn: a socket (which is thereby subscribed) or an HTTP request.
    pub listener: Option<(SinkId, Sink, Scope)>,
    /// Who sends it: its key's limits, quotas and regions apply.
    pub principal: Principal,
    /// The span of the request that posts it: the turn's span is its child, so a caller's
    /// `traceparent` reaches the turn.
    pub span: tracing::Span,
}

/// Changes the tools offered on the conversation's next turns; answers the updated record.
#[derive(Message)]
#[rtype(result = "Result<crate::store::ConversationRecord, ApiError>")]
pub struct Update {
    pub tools: Option<Vec<Tool>>,
    /// `Some(None)` clears the choice.
    pub tool_choice: Option<Option<ToolChoice>>,
}

/// What became of a posted message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Posted {
    Queued,
    Duplicate,
}

/// A key was revoked: its running turn is cancelled and its queued turns are refused.
#[derive(Message)]
#[rtype(result = "()")]
pub struct KeyRevoked {
    pub key_id: String,
}

/// Stops the generation in progress, if any.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Cancel;

/// Cancels everything and stops the actor (conversation deleted, or server shutting down).
#[derive(Message)]
#[rtype(result = "()")]
pub struct Shutdown;
