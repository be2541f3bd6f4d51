//! Plain types every layer shares: roles, messages and their parts, tools and tool calls,
//! request parameters, usage and finish reasons, memory modes and prices. No I/O, and nothing of ours underneath, so
//! the store, the providers, the generation core and the faces can all speak them.

mod message;
mod params;
mod tools;

pub use message::{Content, Detail, ImageUrl, Message, Part};
pub use params::{JsonSchema, Params, ResponseFormat};
pub use tools::{CallsBuilder, Tool, ToolCall, ToolCallDelta, ToolChoice};

use serde::{Deserialize, Serialize};

/// Who wrote a message.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    #[default]
    User,
    Assistant,
    /// A tool's result, answering one call of the assistant message before it.
    Tool,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::System => "system",
            Self::User => "user",
            Self::Assistant => "assistant",
            Self::Tool => "tool",
        }
    }
}

/// Token usage of one reply.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Usage {
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub total_tokens: u32,
}

impl Usage {
    pub fn new(prompt_tokens: u32, completion_tokens: u32) -> Self {
        Self {
            prompt_tokens,
            completion_tokens,
            total_tokens: prompt_tokens.saturating_add(completion_tokens),
        }
    }
}

/// Why a semantic route's request went to its tier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TierReason {
    /// The classifier's score chose it.
    Classified,
    /// A recent escalation of the conversation holds it at least this high.
    Sticky,
    /// The client asked for it (`options.tier`, `x-parley-tier`).
    Forced,
}

impl TierReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Classified => "classified",
            Self::Sticky => "sticky",
            Self::Forced => "forced",
        }
    }
}

/// How a reply ended, in the words clients know (OpenAI's, plus parley's own three).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinishReason {
    Stop,
    Length,
    ToolCalls,
    ContentFilter,
    /// The client cancelled the turn.
    Cancelled,
    /// The upstream stream broke after text was sent.
    Interrupted,
    /// The turn failed before a reply.
    Error,
}

impl FinishReason {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Stop => "stop",
            Self::Length => "length",
            Self::ToolCalls => "tool_calls",
            Self::ContentFilter => "content_filter",
            Self::Cancelled => "cancelled",
            Self::Interrupted => "interrupted",
            Self::Error => "error",
        }
    }

    /// Reads a stored or wire reason; `None` for a word that is not one of ours.
    pub fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "stop" => Self::Stop,
            "length" => Self::Length,
            "tool_calls" => Self::ToolCalls,
            "content_filter" => Self::ContentFilter,
            "cancelled" => Self::Cancelled,
            "interrupted" => Self::Interrupted,
            "error" => Self::Error,
            _ => return None,
        })
    }
}

impl std::fmt::Display for FinishReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How an upstream said its reply ended. `complete` is true only when the upstream itself said
/// the reply is whole (OpenAI `stop`, Anthropic `end_turn`/`stop_sequence`): an unknown or
/// missing reason is shown as `stop` but is never taken for a complete reply (nor cached).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct UpstreamFinish {
    pub reason: FinishReason,
    pub complete: bool,
}

impl UpstreamFinish {
    /// A reason with no word from the upstream.
    pub const UNKNOWN: Self = Self {
        reason: FinishReason::Stop,
        complete: false,
    };

    pub fn known(reason: FinishReason) -> Self {
        Self {
            reason,
            complete: reason == FinishReason::Stop,
        }
    }
}

/// How a conversation's context is chosen when its history outgrows the budget.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MemoryMode {
    /// The newest turns that fit (PROTOCOL §6).
    #[default]
    Window,
    /// The newest turns that fit in part of the budget, plus the older turns most relevant to
    /// the new message in the rest.
    Recall,
}

impl MemoryMode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Window => "window",
            Self::Recall => "recall",
        }
    }
}

/// Price of a model per million tokens (`[prices."gpt-4o-mini"]`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Price {
    pub input_per_mtok: f64,
    pub output_per_mtok: f64,
}
