//! OpenAI Chat Completions: the request body, the `chat.completion` answer and the
//! `chat.completion.chunk` stream events, both ways (parley serves them and sends them upstream).
//! Field names and shapes follow OpenAI's API reference, so the official SDKs read them as theirs.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::{Map, Value};

use crate::domain::{
    Content, FinishReason, Message, Params, ResponseFormat, Role, Tool, ToolCall, ToolChoice, Usage,
};

/// `POST /v1/chat/completions`. Unknown fields are kept in `extra`.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ChatCompletionRequest {
    pub model: String,
    pub messages: Vec<RequestMessage>,
    #[serde(default, skip_serializing_if = "is_false")]
    pub stream: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_options: Option<StreamOptions>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_completion_tokens: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tools: Option<Vec<FunctionTool>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_choice: Option<WireToolChoice>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parallel_tool_calls: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub response_format: Option<ResponseFormat>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop: Option<Stop>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub presence_penalty: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub frequency_penalty: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logit_bias: Option<Map<String, Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub top_logprobs: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub n: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Map<String, Value>>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

fn is_false(b: &bool) -> bool {
    !*b
}

#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct StreamOptions {
    #[serde(default)]
    pub include_usage: bool,
}

/// A message of a request, any role.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct RequestMessage {
    pub role: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<WireContent>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<WireToolCall>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_call_id: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
}

/// A message's content on the wire: read raw, so that [`ChatCompletionRequest::decode`] can
/// name the message a refusal is about; written from the domain content as it is (no detour
/// through a JSON tree for every message of every upstream request).
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum WireContent {
    Raw(Value),
    Content(Content),
}

impl<'de> Deserialize<'de> for WireContent {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        Value::deserialize(d).map(Self::Raw)
    }
}

/// `{"type": "function", "function": {...}}`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FunctionTool {
    #[serde(rename = "type")]
    pub kind: String,
    pub function: Tool,
}

/// A call as OpenAI writes it in an assistant message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireToolCall {
    pub id: String,
    #[serde(rename = "type", default = "function_kind")]
    pub kind: String,
    pub function: FunctionCall,
}

fn function_kind() -> String {
    "function".into()
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FunctionCall {
    pub name: String,
    #[serde(default)]
    pub arguments: String,
}

impl From<&ToolCall> for WireToolCall {
    fn from(c: &ToolCall) -> Self {
        Self {
            id: c.id.clone(),
            kind: function_kind(),
            function: FunctionCall {
                name: c.name.clone(),
                arguments: c.arguments.clone(),
            },
        }
    }
}

impl From<WireToolCall> for ToolCall {
    fn from(c: WireToolCall) -> Self {
        Self {
            id: c.id,
            name: c.function.name,
            arguments: c.function.arguments,
        }
    }
}

/// `"auto"`, `"none"`, `"required"` or `{"type": "function", "function": {"name": ...}}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WireToolChoice(pub ToolChoice);

impl Serialize for WireToolChoice {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match &self.0 {
            ToolChoice::Auto => s.serialize_str("auto"),
            ToolChoice::None => s.serialize_str("none"),
            ToolChoice::Required => s.serialize_str("required"),
            ToolChoice::Function(name) => {
                serde_json::json!({"type": "function", "function": {"name": name}}).serialize(s)
            }
        }
    }
}

impl<'de> Deserialize<'de> for WireToolChoice {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        use serde::de::Error;
        let v = Value::deserialize(d)?;
        let choice = match &v {
            Value::String(s) => match s.as_str() {
                "auto" => ToolChoice::Auto,
                "none" => ToolChoice::None,
                "required" => ToolChoice::Required,
                other => {
                    return Err(D::Error::custom(format!(
                        "tool_choice {other:?} is not auto, none or required"
                    )))
                }
            },
            Value::Object(_) => match v.pointer("/function/name").and_then(Value::as_str) {
                Some(name) => ToolChoice::Function(name.to_owned()),
                None => return Err(D::Error::custom("tool_choice object needs function.name")),
            },
            _ => {
                return Err(D::Error::custom(
                    "tool_choice must be a string or an object",
                ))
            }
        };
        Ok(Self(choice))
    }
}

/// `stop`: one string or several.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Stop {
    One(String),
    Many(Vec<String>),
}

impl Stop {
    pub fn into_vec(self) -> Vec<String> {
        match self {
            Self::One(s) => vec![s],
            Self::Many(v) => v,
        }
    }
}

/// A request in domain terms, and what only this face needs.
pub struct Decoded {
    pub messages: Vec<Message>,
    pub tools: Vec<Tool>,
    pub tool_choice: Option<ToolChoice>,
    pub params: Params,
    pub max_tokens: Option<u32>,
    pub temperature: Option<f32>,
}

impl ChatCompletionRequest {
    /// The request in domain terms.
    ///
    /// # Errors
    /// A message naming the field that is wrong (`messages[2].role`, `tools[0].type`).
    pub fn decode(&mut self) -> Result<Decoded, String> {
        if self.messages.is_empty() {
            return Err("messages must not be empty".into());
        }
        let messages = std::mem::take(&mut self.messages)
            .into_iter()
            .enumerate()
            .map(|(i, m)| m.decode().map_err(|e| format!("messages[{i}]{e}")))
            .collect::<Result<Vec<_>, _>>()?;
        let (tools, tool_choice) = decode_tools(
            std::mem::take(&mut self.tools).unwrap_or_default(),
            self.tool_choice.take(),
        )?;
        let params = Params {
            top_p: self.top_p,
            stop: self.stop.take().map(Stop::into_vec).unwrap_or_default(),
            seed: self.seed,
            presence_penalty: self.presence_penalty,
            frequency_penalty: self.frequency_penalty,
            logit_bias: self.logit_bias.take(),
            logprobs: self.logprobs,
            top_logprobs: self.top_logprobs,
            n: self.n,
            user: self.user.take(),
            metadata: self.metadata.take(),
            parallel_tool_calls: self.parallel_tool_calls,
            response_format: self.response_format.take(),
            extra: std::mem::take(&mut self.extra),
            max_completion_tokens: self.max_completion_tokens.is_some(),
        };
        Ok(Decoded {
            messages,
            tools,
            tool_choice,
            params,
            max_tokens: self.max_completion_tokens.or(self.max_tokens),
            temperature: self.temperature,
        })
    }

    /// The upstream request of `req` for an OpenAI-compatible server: always streaming, with
    /// the final usage chunk asked for.
    pub fn encode(req: &crate::provider::ChatRequest) -> Self {
        let p = &req.params;
        Self {
            model: req.model.clone(),
            messages: req.messages.iter().map(RequestMessage::encode).collect(),
            stream: true,
            stream_options: Some(StreamOptions {
                include_usage: true,
            }),
            max_tokens: req.max_tokens.filter(|_| !p.max_completion_tokens),
            max_completion_tokens: req.max_tokens.filter(|_| p.max_completion_tokens),
            temperature: req.temperature,
            tools: (!req.tools.is_empty()).then(|| {
                req.tools
                    .iter()
                    .map(|t| FunctionTool {
                        kind: function_kind(),
                        function: t.clone(),
                    })
                    .collect()
            }),
            tool_choice: req.tool_choice.clone().map(WireToolChoice),
            parallel_tool_calls: p.parallel_tool_calls,
            response_format: p.response_format.clone(),
            stop: (!p.stop.is_empty()).then(|| Stop::Many(p.stop.clone())),
            top_p: p.top_p,
            seed: p.seed,
            presence_penalty: p.presence_penalty,
            frequency_penalty: p.frequency_penalty,
            logit_bias: p.logit_bias.clone(),
            logprobs: p.logprobs,
            top_logprobs: p.top_logprobs,
            n: p.n,
            user: p.user.clone(),
            metadata: p.metadata.clone(),
            extra: p.extra.clone(),
        }
    }
}

/// Function tools and the choice among them, checked: every tool a function with a name, a
/// named choice among the tools, `required` only with tools.
///
/// # Errors
/// A message naming the field that is wrong.
pub fn decode_tools(
    tools: Vec<FunctionTool>,
    choice: Option<WireToolChoice>,
) -> Result<(Vec<Tool>, Option<ToolChoice>), String> {
    let tools = tools
        .into_iter()
        .enumerate()
        .map(|(i, t)| {
            if t.kind != "function" {
                return Err(format!(
                    "tools[{i}].type: {:?} is not supported (function is)",
                    t.kind
                ));
            }
            if t.function.name.is_empty() {
                return Err(format!("tools[{i}].function.name must not be empty"));
            }
            Ok(t.function)
        })
        .collect::<Result<Vec<_>, _>>()?;
    let choice = choice.map(|c| c.0);
    if let Some(ToolChoice::Function(name)) = &choice {
        if !tools.iter().any(|t| &t.name == name) {
            return Err(format!("tool_choice names {name:?}, which is not in tools"));
        }
    }
    if matches!(choice, Some(ToolChoice::Required)) && tools.is_empty() {
        return Err("tool_choice is required but no tools are given".into());
    }
    Ok((tools, choice))
}

impl RequestMessage {
    fn decode(self) -> Result<Message, String> {
        let role = match self.role.as_str() {
            "system" | "developer" => Role::System,
            "user" => Role::User,
            "assistant" => Role::Assistant,
            "tool" => Role::Tool,
            other => {
                return Err(format!(
                    ".role: {other:?} is not system, developer, user, assistant or tool"
                ))
            }
        };
        let content = match self.content {
            Some(WireContent::Raw(v)) => Content::from_value(v).map_err(|e| format!(".{e}"))?,
            Some(WireContent::Content(c)) => c,
            None => Content::default(),
        };
        let tool_calls: Vec<ToolCall> = self
            .tool_calls
            .unwrap_or_default()
            .into_iter()
            .map(ToolCall::from)
            .collect();
        if !tool_calls.is_empty() && role != Role::Assistant {
            return Err(".tool_calls: only assistant messages make tool calls".into());
        }
        if role == Role::Tool && self.tool_call_id.as_deref().is_none_or(str::is_empty) {
            return Err(".tool_call_id: a tool message must name the call it answers".into());
        }
        if role != Role::User && content.has_images() {
            return Err(".content: only user messages may carry images".into());
        }
        Ok(Message {
            role,
            content,
            tool_calls,
            tool_call_id: self.tool_call_id.filter(|_| role == Role::Tool),
            is_error: false,
            name: self.name,
        })
    }

    fn encode(m: &Message) -> Self {
        // An assistant message that only calls tools has null content, as OpenAI writes it.
        let content =
            if m.role == Role::Assistant && !m.tool_calls.is_empty() && m.content.is_empty() {
                None
            } else {
                Some(WireContent::Content(m.content.clone()))
            };
        Self {
            role: m.role.as_str().to_owned(),
            content,
            tool_calls: (!m.tool_calls.is_empty())
                .then(|| m.tool_calls.iter().map(WireToolCall::from).collect()),
            tool_call_id: m.tool_call_id.clone(),
            name: m.name.clone(),
        }
    }
}

/// The non-streaming answer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ChatCompletion {
    pub id: String,
    pub object: String,
    pub created: i64,
    pub model: String,
    pub choices: Vec<Choice>,
    pub usage: Usage,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Choice {
    pub index: u32,
    pub message: AssistantMessage,
    pub finish_reason: FinishReason,
    #[serde(default)]
    pub logprobs: Option<Value>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AssistantMessage {
    pub role: String,
    pub content: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<WireToolCall>>,
    #[serde(default)]
    pub refusal: Option<String>,
}

impl AssistantMessage {
    pub fn new(text: String, calls: &[ToolCall]) -> Self {
        Self {
            role: "assistant".into(),
            content: (!text.is_empty() || calls.is_empty()).then_some(text),
            tool_calls: (!calls.is_empty()).then(|| calls.iter().map(WireToolCall::from).collect()),
            refusal: None,
        }
    }
}

/// A `chat.completion.chunk` as an upstream streams it, reduced to what parley reads: the
/// fields it ignores (`id`, `object`, `created`, …) are skipped without being allocated, and the
/// model name is borrowed from the event unless it holds escapes.
#[derive(Debug, Default, Deserialize)]
pub struct UpstreamChunk<'a> {
    #[serde(default, borrow)]
    pub model: Option<Text<'a>>,
    #[serde(default, borrow)]
    pub choices: Vec<UpstreamChoice<'a>>,
    #[serde(default)]
    pub usage: Option<Usage>,
    #[serde(default)]
    pub error: Option<WireError>,
}

#[derive(Debug, Default, Deserialize)]
pub struct UpstreamChoice<'a> {
    #[serde(default)]
    pub index: u32,
    #[serde(default)]
    pub delta: UpstreamDelta,
    #[serde(default, borrow)]
    pub finish_reason: Option<Text<'a>>,
    #[serde(default)]
    pub logprobs: Option<Value>,
}

#[derive(Debug, Default, Deserialize)]
pub struct UpstreamDelta {
    #[serde(default)]
    pub content: Option<String>,
    #[serde(default)]
    pub tool_calls: Option<Vec<ToolCallChunk>>,
}

/// A string borrowed from the JSON it was read from when it has no escapes.
#[derive(Debug, Deserialize)]
pub struct Text<'a>(#[serde(borrow)] pub std::borrow::Cow<'a, str>);

/// One `chat.completion.chunk` event.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ChatCompletionChunk {
    #[serde(default)]
    pub id: String,
    #[serde(default)]
    pub object: String,
    #[serde(default)]
    pub created: i64,
    #[serde(default)]
    pub model: String,
    #[serde(default)]
    pub choices: Vec<ChunkChoice>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage: Option<Usage>,
    /// Some compatible servers report a failure inside the stream.
    #[serde(default, skip_serializing)]
    pub error: Option<WireError>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ChunkChoice {
    #[serde(default)]
    pub index: u32,
    #[serde(default)]
    pub delta: ChunkDelta,
    /// Read as a plain string: an upstream may use words of its own.
    #[serde(default)]
    pub finish_reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub logprobs: Option<Value>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ChunkDelta {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub role: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub content: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<Vec<ToolCallChunk>>,
}

/// A fragment of a streamed tool call.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ToolCallChunk {
    pub index: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    #[serde(rename = "type", default, skip_serializing_if = "Option::is_none")]
    pub kind: Option<String>,
    #[serde(default)]
    pub function: FunctionChunk,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct FunctionChunk {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arguments: Option<String>,
}

impl From<&crate::domain::ToolCallDelta> for ToolCallChunk {
    fn from(d: &crate::domain::ToolCallDelta) -> Self {
        Self {
            index: d.index,
            id: d.id.clone(),
            kind: d.id.as_ref().map(|_| function_kind()),
            function: FunctionChunk {
                name: d.name.clone(),
                arguments: Some(d.arguments.clone()),
            },
        }
    }
}

/// `{"error": {"message": ...}}` inside a stream.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct WireError {
    #[serde(default)]
    pub message: Option<String>,
}

/// An upstream's finish reason in domain terms (`complete` only for a real `stop`).
pub fn finish_of(reason: &str) -> crate::domain::UpstreamFinish {
    use crate::domain::UpstreamFinish;
    match reason {
        "stop" => UpstreamFinish::known(FinishReason::Stop),
        "length" => UpstreamFinish::known(FinishReason::Length),
        "tool_calls" | "function_call" => UpstreamFinish::known(FinishReason::ToolCalls),
        "content_filter" => UpstreamFinish::known(FinishReason::ContentFilter),
        _ => UpstreamFinish::UNKNOWN,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_a_full_request_and_keeps_unknown_fields() {
        let raw = r#"{"model":"default","messages":[
            {"role":"developer","content":"be brief"},
            {"role":"user","content":[{"type":"text","text":"hi"},{"type":"image_url","image_url":{"url":"https://e.x/a.png"}}]},
            {"role":"assistant","content":null,"tool_calls":[{"id":"c1","type":"function","function":{"name":"f","arguments":"{}"}}]},
            {"role":"tool","tool_call_id":"c1","content":"42"}],
            "tools":[{"type":"function","function":{"name":"f","parameters":{"type":"object"}}}],
            "tool_choice":{"type":"function","function":{"name":"f"}},
            "stop":"x","seed":7,"logprobs":true,"service_tier":"flex"}"#;
        let mut req: ChatCompletionRequest = serde_json::from_str(raw).unwrap(); // ok: test
        let d = req.decode().unwrap(); // ok: test
        assert_eq!(d.messages[0].role, Role::System);
        assert_eq!(d.messages[2].tool_calls[0].name, "f");
        assert_eq!(d.messages[3].tool_call_id.as_deref(), Some("c1"));
        assert_eq!(d.tool_choice, Some(ToolChoice::Function("f".into())));
        assert_eq!(d.params.stop, vec!["x".to_owned()]);
        assert_eq!(
            d.params.extra.get("service_tier"),
            Some(&Value::from("flex"))
        );
    }

    #[test]
    fn a_participant_name_reaches_openai_compatible_targets() {
        let mut req: ChatCompletionRequest = serde_json::from_str(
            r#"{"model":"m","messages":[{"role":"user","name":"ada","content":"hi"}]}"#,
        )
        .unwrap(); // ok: test
        let d = req.decode().unwrap(); // ok: test
        assert_eq!(d.messages[0].name.as_deref(), Some("ada"));
        let up = crate::provider::ChatRequest {
            messages: d.messages,
            ..Default::default()
        };
        let v = serde_json::to_value(ChatCompletionRequest::encode(&up)).unwrap(); // ok: test
        assert_eq!(v["messages"][0]["name"], "ada");
        assert_eq!(
            crate::wire::anthropic::unsupported(&up),
            vec!["name".to_owned()]
        );
    }

    #[test]
    fn refusals_name_the_field() {
        let bad = |raw: &str| {
            let mut req: ChatCompletionRequest = serde_json::from_str(raw).unwrap(); // ok: test
            req.decode().err().unwrap_or_default()
        };
        assert!(
            bad(r#"{"model":"m","messages":[{"role":"robot","content":"x"}]}"#)
                .starts_with("messages[0].role")
        );
        assert!(
            bad(r#"{"model":"m","messages":[{"role":"tool","content":"x"}]}"#)
                .starts_with("messages[0].tool_call_id")
        );
        assert!(bad(r#"{"model":"m","messages":[{"role":"user","content":"x"}],"tools":[{"type":"code","function":{"name":"f"}}]}"#)
            .starts_with("tools[0].type"));
        assert!(bad(
            r#"{"model":"m","messages":[{"role":"user","content":"x"}],"tool_choice":"required"}"#
        )
        .contains("no tools"));
        assert!(bad(r#"{"model":"m","messages":[]}"#).contains("empty"));
    }

    #[test]
    fn encodes_upstream_with_null_content_for_pure_calls() {
        let req = crate::provider::ChatRequest {
            model: "gpt".into(),
            messages: vec![Message {
                role: Role::Assistant,
                tool_calls: vec![ToolCall {
                    id: "c".into(),
                    name: "f".into(),
                    arguments: "{}".into(),
                }],
                ..Message::default()
            }],
            ..Default::default()
        };
        let v = serde_json::to_value(ChatCompletionRequest::encode(&req)).unwrap(); // ok: test
        assert_eq!(v["messages"][0]["content"], Value::Null);
        assert_eq!(v["messages"][0]["tool_calls"][0]["function"]["name"], "f");
        assert_eq!(v["stream"], true);
        assert_eq!(v["stream_options"]["include_usage"], true);
        assert!(v.get("tools").is_none());
    }
}
