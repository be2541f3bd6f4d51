//! The request parameters besides messages, tools and the two every provider knows
//! (`max_tokens`, `temperature`): what a client may set, carried to the provider that honours it.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

/// What form the reply must take.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ResponseFormat {
    Text,
    JsonObject,
    JsonSchema { json_schema: JsonSchema },
}

/// A named JSON schema the reply must match.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct JsonSchema {
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub strict: Option<bool>,
}

/// Sampling and other parameters of a generation; `None` means "the provider's default".
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Params {
    pub top_p: Option<f64>,
    pub stop: Vec<String>,
    pub seed: Option<i64>,
    pub presence_penalty: Option<f64>,
    pub frequency_penalty: Option<f64>,
    pub logit_bias: Option<Map<String, Value>>,
    pub logprobs: Option<bool>,
    pub top_logprobs: Option<u32>,
    pub n: Option<u32>,
    pub user: Option<String>,
    pub metadata: Option<Map<String, Value>>,
    pub parallel_tool_calls: Option<bool>,
    pub response_format: Option<ResponseFormat>,
    /// Fields parley does not know, passed verbatim to OpenAI-compatible targets.
    pub extra: Map<String, Value>,
    /// The client named the limit `max_completion_tokens` (which newer OpenAI models require);
    /// an OpenAI-compatible target gets it under the name the client used.
    pub max_completion_tokens: bool,
}

impl Params {
    /// Whether the reply must be anything but free text.
    pub fn wants_structured(&self) -> bool {
        !matches!(self.response_format, None | Some(ResponseFormat::Text))
    }
}
