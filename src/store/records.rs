//! The records parley keeps in sled, serialised as JSON values.

use serde::{Deserialize, Serialize};

use crate::ids::{ConversationId, TenantId};

use crate::domain::{Content, Message, Part, Tool, ToolCall, ToolChoice};
pub use crate::domain::{Role, Usage};

/// A conversation's header; its messages are stored apart, keyed by `seq`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConversationRecord {
    pub id: ConversationId,
    pub tenant: TenantId,
    /// The route (model name) the client asked for.
    pub model: String,
    #[serde(default)]
    pub system: Option<String>,
    /// Tokens of the system prompt's content (0 without one).
    #[serde(default)]
    pub system_tokens: u32,
    /// A versioned system prompt (`name@3`, `name@latest`) used instead of `system`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt: Option<String>,
    #[serde(default)]
    pub metadata: serde_json::Value,
    pub created_at: i64,
    pub last_seq: u64,
    /// Content tokens plus framing of every stored message that is sent upstream (non-empty),
    /// kept with each append so a turn knows what trimming left out without reading it all.
    #[serde(default)]
    pub history_tokens: u64,
    /// `window` or `recall`: how context is chosen once history outgrows the budget.
    #[serde(default)]
    pub memory: crate::domain::MemoryMode,
    /// The function tools offered on every turn.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tools: Vec<Tool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_choice: Option<ToolChoice>,
}

/// What produced an assistant message; kept so a resent `client_id` gets the original `done`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ReplyMeta {
    pub reply_to: u64,
    pub usage: Usage,
    pub cached: bool,
    pub provider: String,
    pub model: String,
    pub ttft_ms: Option<u64>,
    /// The versioned system prompt the reply was written under (`name@version`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub prompt_version: Option<String>,
    /// How the turn failed, for a reply that ended in an error (replayed to a resent client id).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<StoredError>,
    /// A semantic route: the tier that wrote the reply, and why it was chosen (an escalation
    /// the classifier made holds the conversation's next turns).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tier: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tier_reason: Option<crate::domain::TierReason>,
    /// What the reply cost at the price table.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cost: Option<f64>,
}

/// The error a turn ended with.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StoredError {
    pub code: crate::error::ErrorCode,
    pub message: String,
}

/// One stored message of a conversation.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct MessageRecord {
    pub seq: u64,
    pub role: Role,
    pub content: String,
    pub created_at: i64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub finish_reason: Option<String>,
    /// Content tokens under the conversation's encoding, counted once when stored.
    pub tokens: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply: Option<ReplyMeta>,
    /// Guardrail findings (`prompt_injection`, `system_prompt_leak`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub flags: Vec<String>,
    /// The content as the client sent it, when it came as parts (`content` is then its text).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parts: Option<Vec<Part>>,
    /// An assistant message's tool calls.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub tool_calls: Vec<ToolCall>,
    /// A tool result's call.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    /// A tool result that reports a failure.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub is_error: bool,
}

impl MessageRecord {
    /// Whether the message is sent upstream as context: everything but a reply that ended
    /// with nothing (failed, or cancelled before its first word).
    pub fn is_sent(&self) -> bool {
        !self.content.is_empty()
            || self.parts.is_some()
            || !self.tool_calls.is_empty()
            || self.role == Role::Tool
    }

    /// What the message adds to its conversation's `history_tokens`: its content tokens and
    /// framing when it is sent, nothing otherwise.
    pub fn history_cost(&self) -> u64 {
        if self.is_sent() {
            u64::from(self.tokens) + u64::from(crate::tokens::MESSAGE_FRAMING_TOKENS)
        } else {
            0
        }
    }

    /// The content as it was sent: the parts, or the text.
    pub fn content(&self) -> Content {
        match &self.parts {
            Some(parts) => Content::Parts(parts.clone()),
            None => Content::Text(self.content.clone()),
        }
    }

    /// The message as it goes upstream.
    pub fn to_message(&self) -> Message {
        Message {
            role: self.role,
            content: self.content(),
            tool_calls: self.tool_calls.clone(),
            tool_call_id: self.tool_call_id.clone(),
            is_error: self.is_error,
            name: None,
        }
    }
}

/// How a key's per-minute limits count.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LimitWindow {
    #[default]
    Bucket,
    Sliding,
}

/// An API key, stored under the SHA-256 of its secret; the secret itself is never stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct KeyRecord {
    pub id: String,
    pub tenant: TenantId,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rpm: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tpm: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub daily_tokens: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub models: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub monthly_tokens: Option<u64>,
    /// Spend allowed per UTC month, in the price table's currency.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub monthly_spend: Option<f64>,
    /// Provider regions this key's requests may go to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub regions: Option<Vec<String>>,
    /// `bucket` (default: token buckets, bursts allowed) or `sliding` (exact trailing minute).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<LimitWindow>,
    /// PII handling for this key's requests, over the route's.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pii: Option<crate::guard::pii::PiiMode>,
    /// `false`: this key's requests never use the semantic cache.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<bool>,
    /// Four characters of the secret after `pk-`, enough for a human to tell keys apart.
    pub prefix: String,
    pub created_at: i64,
}

/// One turn's (or one stateless completion's) usage, attributed down to the conversation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct UsageRecord {
    /// Milliseconds since the Unix epoch.
    pub ts_ms: i64,
    pub tenant: TenantId,
    pub key_id: Option<String>,
    pub conversation: Option<ConversationId>,
    pub route: String,
    pub provider: String,
    pub model: String,
    pub prompt_tokens: u32,
    pub completion_tokens: u32,
    pub cached: bool,
    pub latency_ms: u64,
    pub ttft_ms: Option<u64>,
    /// In the price table's currency.
    pub cost: f64,
    /// Prompt tokens that trimming kept out of the request.
    #[serde(default)]
    pub trimmed_tokens: u32,
    pub finish_reason: String,
    /// The reply's token limit when the key's budget left less than was asked for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens_clamped: Option<u32>,
    /// A cached reply: the tokens and cost of the original reply that it saved.
    #[serde(default)]
    pub saved_tokens: u32,
    #[serde(default)]
    pub saved_cost: f64,
    /// A semantic route: the tier the request went to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tier: Option<String>,
}

/// Tokens and spend of one key over one period (a UTC day or month).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct PeriodTotal {
    pub tokens: u64,
    pub spend: f64,
}

/// One version of a named system prompt.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PromptVersion {
    pub name: String,
    pub version: u32,
    pub content: String,
    pub created_at: i64,
}
