//! The OpenAI Responses API: the `POST /v1/responses` body with its input items, the Response
//! object with its output items, and the typed stream events, as the official SDKs read them.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::domain::{
    Content, Detail, ImageUrl, JsonSchema, Message, Part, ResponseFormat, Role, Tool, ToolCall,
    ToolChoice, Usage,
};

/// `POST /v1/responses`.
#[derive(Debug, Deserialize)]
pub struct CreateResponse {
    pub model: String,
    pub input: Value,
    #[serde(default)]
    pub instructions: Option<String>,
    #[serde(default)]
    pub previous_response_id: Option<String>,
    /// A parley conversation id, or `{"id": ...}`.
    #[serde(default)]
    pub conversation: Option<Value>,
    #[serde(default)]
    pub tools: Option<Vec<Value>>,
    #[serde(default)]
    pub tool_choice: Option<Value>,
    #[serde(default)]
    pub max_output_tokens: Option<u32>,
    #[serde(default)]
    pub temperature: Option<f32>,
    #[serde(default)]
    pub top_p: Option<f64>,
    #[serde(default)]
    pub text: Option<TextConfig>,
    #[serde(default)]
    pub store: Option<bool>,
    #[serde(default)]
    pub metadata: Option<Map<String, Value>>,
    #[serde(default)]
    pub stream: bool,
    #[serde(default)]
    pub parallel_tool_calls: Option<bool>,
    #[serde(default)]
    pub user: Option<String>,
    /// `auto` is what parley does (§6 trimming); `disabled` (fail rather than trim) is refused.
    #[serde(default)]
    pub truncation: Option<String>,
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct TextConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<Value>,
}

/// One input item, in domain terms.
#[derive(Debug, Clone, PartialEq)]
pub enum InputItem {
    /// A message of any role (`developer` and `system` are instructions).
    Message(Message),
    /// A call a previous output made (a transcript the client keeps itself).
    FunctionCall(ToolCall),
    /// The result of a call.
    FunctionCallOutput { call_id: String, output: String },
}

/// The request's settings in domain terms.
pub struct Decoded {
    pub items: Vec<InputItem>,
    pub tools: Vec<Tool>,
    pub tool_choice: Option<ToolChoice>,
    pub format: Option<ResponseFormat>,
}

impl CreateResponse {
    /// Reads the input items, tools, tool choice and text format.
    ///
    /// # Errors
    /// A message naming the field that is wrong or not supported.
    pub fn decode(&mut self) -> Result<Decoded, String> {
        if let Some(name) = self.extra.keys().find(|k| !harmless(k, &self.extra[*k])) {
            return Err(format!("{name}: not supported by parley's Responses API"));
        }
        match self.truncation.as_deref() {
            None | Some("auto") => {}
            Some(other) => {
                return Err(format!(
                    "truncation: {other:?} is not supported (parley trims history to the budget: \"auto\")"
                ))
            }
        }
        let items = match std::mem::take(&mut self.input) {
            Value::String(s) => vec![InputItem::Message(Message::text(Role::User, s))],
            Value::Array(items) => items
                .into_iter()
                .enumerate()
                .map(|(i, v)| item(v).map_err(|e| format!("input[{i}]{e}")))
                .collect::<Result<_, _>>()?,
            _ => return Err("input: must be a string or an array of items".into()),
        };
        if items.is_empty() {
            return Err("input: must not be empty".into());
        }
        let tools = self
            .tools
            .take()
            .unwrap_or_default()
            .into_iter()
            .enumerate()
            .map(|(i, t)| tool(t).map_err(|e| format!("tools[{i}]{e}")))
            .collect::<Result<Vec<_>, _>>()?;
        let tool_choice = match self.tool_choice.take() {
            None => None,
            Some(Value::String(s)) => Some(match s.as_str() {
                "auto" => ToolChoice::Auto,
                "none" => ToolChoice::None,
                "required" => ToolChoice::Required,
                other => return Err(format!("tool_choice: {other:?} is not auto, none or required")),
            }),
            Some(v) => match (v.get("type").and_then(Value::as_str), v.get("name").and_then(Value::as_str)) {
                (Some("function"), Some(name)) if tools.iter().any(|t| t.name == name) => {
                    Some(ToolChoice::Function(name.to_owned()))
                }
                (Some("function"), Some(name)) => {
                    return Err(format!("tool_choice: {name:?} is not in tools"))
                }
                _ => return Err("tool_choice: must be auto, none, required or {\"type\": \"function\", \"name\": ...}".into()),
            },
        };
        let format = match self.text.take().and_then(|t| t.format) {
            None => None,
            Some(f) => Some(format(f)?),
        };
        Ok(Decoded {
            items,
            tools,
            tool_choice,
            format,
        })
    }
}

/// Fields the SDKs may send with values that ask nothing parley does not do.
fn harmless(key: &str, v: &Value) -> bool {
    match key {
        "include" => v.as_array().is_some_and(Vec::is_empty) || v.is_null(),
        "background" => v == &Value::Bool(false) || v.is_null(),
        "service_tier" | "reasoning" | "prompt_cache_key" | "safety_identifier" => v.is_null(),
        _ => false,
    }
}

fn item(v: Value) -> Result<InputItem, String> {
    let kind = v.get("type").and_then(Value::as_str).unwrap_or("message");
    match kind {
        "message" => {
            let role = match v.get("role").and_then(Value::as_str) {
                Some("user") => Role::User,
                Some("assistant") => Role::Assistant,
                Some("system" | "developer") => Role::System,
                other => {
                    return Err(format!(
                        ".role: {:?} is not user, assistant, system or developer",
                        other.unwrap_or("")
                    ))
                }
            };
            let content = match v.get("content") {
                Some(Value::String(s)) => Content::Text(s.clone()),
                Some(Value::Array(parts)) => Content::Parts(
                    parts
                        .iter()
                        .enumerate()
                        .map(|(j, p)| part(p).map_err(|e| format!(".content[{j}]{e}")))
                        .collect::<Result<_, _>>()?,
                ),
                _ => return Err(".content: must be a string or an array of parts".into()),
            };
            if role != Role::User && content.has_images() {
                return Err(".content: only user messages may carry images".into());
            }
            Ok(InputItem::Message(Message {
                role,
                content,
                ..Message::default()
            }))
        }
        "function_call" => {
            let s = |k: &str| v.get(k).and_then(Value::as_str).map(str::to_owned);
            Ok(InputItem::FunctionCall(ToolCall {
                id: s("call_id").ok_or(".call_id: required")?,
                name: s("name").ok_or(".name: required")?,
                arguments: s("arguments").unwrap_or_default(),
            }))
        }
        "function_call_output" => {
            let call_id = v
                .get("call_id")
                .and_then(Value::as_str)
                .ok_or(".call_id: required")?
                .to_owned();
            let output = match v.get("output") {
                Some(Value::String(s)) => s.clone(),
                Some(Value::Array(parts)) => parts
                    .iter()
                    .filter_map(|p| p.get("text").and_then(Value::as_str))
                    .collect(),
                _ => return Err(".output: must be a string".into()),
            };
            Ok(InputItem::FunctionCallOutput { call_id, output })
        }
        other => Err(format!(
            ".type: {other:?} is not supported (message, function_call and function_call_output are)"
        )),
    }
}

fn part(p: &Value) -> Result<Part, String> {
    let text = || {
        p.get("text")
            .and_then(Value::as_str)
            .map(|t| Part::Text { text: t.to_owned() })
            .ok_or_else(|| ".text: required".to_owned())
    };
    match p.get("type").and_then(Value::as_str) {
        Some("input_text" | "output_text" | "text") => text(),
        Some("input_image") => {
            let url = p
                .get("image_url")
                .and_then(Value::as_str)
                .ok_or(".image_url: required (file_id images are not supported)")?;
            let detail = match p.get("detail").and_then(Value::as_str) {
                None | Some("auto") => None,
                Some("low") => Some(Detail::Low),
                Some("high") => Some(Detail::High),
                Some(other) => return Err(format!(".detail: {other:?} is not low, high or auto")),
            };
            let image_url = ImageUrl {
                url: url.to_owned(),
                detail,
            };
            image_url
                .validate()
                .map_err(|e| format!(".image_url: {e}"))?;
            Ok(Part::ImageUrl { image_url })
        }
        other => Err(format!(
            ".type: {:?} is not supported (input_text and input_image are)",
            other.unwrap_or("")
        )),
    }
}

fn tool(t: Value) -> Result<Tool, String> {
    if t.get("type").and_then(Value::as_str) != Some("function") {
        return Err(".type: only function tools are supported".into());
    }
    let name = t
        .get("name")
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
        .ok_or(".name: required")?;
    Ok(Tool {
        name: name.to_owned(),
        description: t
            .get("description")
            .and_then(Value::as_str)
            .map(str::to_owned),
        parameters: t.get("parameters").cloned().filter(|p| !p.is_null()),
        strict: t.get("strict").and_then(Value::as_bool),
    })
}

fn format(f: Value) -> Result<ResponseFormat, String> {
    match f.get("type").and_then(Value::as_str) {
        Some("text") => Ok(ResponseFormat::Text),
        Some("json_object") => Ok(ResponseFormat::JsonObject),
        Some("json_schema") => Ok(ResponseFormat::JsonSchema {
            json_schema: JsonSchema {
                name: f
                    .get("name")
                    .and_then(Value::as_str)
                    .ok_or("text.format.name: required")?
                    .to_owned(),
                description: f
                    .get("description")
                    .and_then(Value::as_str)
                    .map(str::to_owned),
                schema: f.get("schema").cloned(),
                strict: f.get("strict").and_then(Value::as_bool),
            },
        }),
        _ => Err("text.format.type: must be text, json_object or json_schema".into()),
    }
}

/// The `text.format` of a Response object.
pub fn format_json(f: Option<&ResponseFormat>) -> Value {
    match f {
        None | Some(ResponseFormat::Text) => serde_json::json!({"type": "text"}),
        Some(ResponseFormat::JsonObject) => serde_json::json!({"type": "json_object"}),
        Some(ResponseFormat::JsonSchema { json_schema }) => {
            let mut v = serde_json::json!({"type": "json_schema", "name": json_schema.name});
            if let Some(s) = &json_schema.schema {
                v["schema"] = s.clone();
            }
            if let Some(d) = &json_schema.description {
                v["description"] = Value::from(d.clone());
            }
            if let Some(strict) = json_schema.strict {
                v["strict"] = Value::from(strict);
            }
            v
        }
    }
}

/// A tool as a Response object lists it.
pub fn tool_json(t: &Tool) -> Value {
    serde_json::json!({
        "type": "function",
        "name": t.name,
        "description": t.description,
        "parameters": t.parameters,
        "strict": t.strict,
    })
}

/// `tool_choice` as a Response object shows it.
pub fn tool_choice_json(c: Option<&ToolChoice>) -> Value {
    match c {
        None | Some(ToolChoice::Auto) => Value::from("auto"),
        Some(ToolChoice::None) => Value::from("none"),
        Some(ToolChoice::Required) => Value::from("required"),
        Some(ToolChoice::Function(name)) => serde_json::json!({"type": "function", "name": name}),
    }
}

/// The Response object.
#[derive(Debug, Clone, Serialize)]
pub struct Response {
    pub id: String,
    pub object: &'static str,
    pub created_at: i64,
    pub status: &'static str,
    pub error: Option<ResponseError>,
    pub incomplete_details: Option<IncompleteDetails>,
    pub instructions: Option<String>,
    pub max_output_tokens: Option<u32>,
    pub model: String,
    pub output: Vec<OutputItem>,
    pub parallel_tool_calls: bool,
    pub previous_response_id: Option<String>,
    pub temperature: Option<f32>,
    pub top_p: Option<f64>,
    pub tool_choice: Value,
    pub tools: Vec<Value>,
    pub text: TextConfig,
    pub truncation: &'static str,
    pub usage: Option<ResponseUsage>,
    pub metadata: Map<String, Value>,
    pub store: bool,
    /// The parley conversation the response is a turn of (none when not stored).
    pub conversation: Option<ConversationRef>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ConversationRef {
    pub id: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct ResponseError {
    pub code: String,
    pub message: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct IncompleteDetails {
    pub reason: &'static str,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct ResponseUsage {
    pub input_tokens: u32,
    pub input_tokens_details: CachedTokens,
    pub output_tokens: u32,
    pub output_tokens_details: ReasoningTokens,
    pub total_tokens: u32,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct CachedTokens {
    pub cached_tokens: u32,
}

#[derive(Debug, Clone, Copy, Serialize)]
pub struct ReasoningTokens {
    pub reasoning_tokens: u32,
}

impl From<Usage> for ResponseUsage {
    fn from(u: Usage) -> Self {
        Self {
            input_tokens: u.prompt_tokens,
            input_tokens_details: CachedTokens { cached_tokens: 0 },
            output_tokens: u.completion_tokens,
            output_tokens_details: ReasoningTokens {
                reasoning_tokens: 0,
            },
            total_tokens: u.total_tokens,
        }
    }
}

/// An output item.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum OutputItem {
    Message {
        id: String,
        status: &'static str,
        role: &'static str,
        content: Vec<OutputText>,
    },
    FunctionCall {
        id: String,
        call_id: String,
        name: String,
        arguments: String,
        status: &'static str,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OutputText {
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub text: String,
    pub annotations: Vec<Value>,
    pub logprobs: Vec<Value>,
}

impl OutputText {
    pub fn new(text: String) -> Self {
        Self {
            kind: "output_text",
            text,
            annotations: Vec::new(),
            logprobs: Vec::new(),
        }
    }
}

/// One event of a streamed response; the writer numbers them (`sequence_number`).
#[derive(Debug, Clone, Serialize)]
#[serde(tag = "type")]
pub enum StreamEvent {
    #[serde(rename = "response.created")]
    Created { response: Box<Response> },
    #[serde(rename = "response.in_progress")]
    InProgress { response: Box<Response> },
    #[serde(rename = "response.output_item.added")]
    OutputItemAdded {
        output_index: usize,
        item: OutputItem,
    },
    #[serde(rename = "response.content_part.added")]
    ContentPartAdded {
        item_id: String,
        output_index: usize,
        content_index: usize,
        part: OutputText,
    },
    #[serde(rename = "response.output_text.delta")]
    OutputTextDelta {
        item_id: String,
        output_index: usize,
        content_index: usize,
        delta: String,
        logprobs: Vec<Value>,
    },
    #[serde(rename = "response.output_text.done")]
    OutputTextDone {
        item_id: String,
        output_index: usize,
        content_index: usize,
        text: String,
        logprobs: Vec<Value>,
    },
    #[serde(rename = "response.content_part.done")]
    ContentPartDone {
        item_id: String,
        output_index: usize,
        content_index: usize,
        part: OutputText,
    },
    #[serde(rename = "response.function_call_arguments.delta")]
    FunctionCallArgumentsDelta {
        item_id: String,
        output_index: usize,
        delta: String,
    },
    #[serde(rename = "response.function_call_arguments.done")]
    FunctionCallArgumentsDone {
        item_id: String,
        output_index: usize,
        name: String,
        arguments: String,
    },
    #[serde(rename = "response.output_item.done")]
    OutputItemDone {
        output_index: usize,
        item: OutputItem,
    },
    #[serde(rename = "response.completed")]
    Completed { response: Box<Response> },
    #[serde(rename = "response.incomplete")]
    Incomplete { response: Box<Response> },
    #[serde(rename = "response.failed")]
    Failed { response: Box<Response> },
}

impl StreamEvent {
    pub fn name(&self) -> &'static str {
        match self {
            Self::Created { .. } => "response.created",
            Self::InProgress { .. } => "response.in_progress",
            Self::OutputItemAdded { .. } => "response.output_item.added",
            Self::ContentPartAdded { .. } => "response.content_part.added",
            Self::OutputTextDelta { .. } => "response.output_text.delta",
            Self::OutputTextDone { .. } => "response.output_text.done",
            Self::ContentPartDone { .. } => "response.content_part.done",
            Self::FunctionCallArgumentsDelta { .. } => "response.function_call_arguments.delta",
            Self::FunctionCallArgumentsDone { .. } => "response.function_call_arguments.done",
            Self::OutputItemDone { .. } => "response.output_item.done",
            Self::Completed { .. } => "response.completed",
            Self::Incomplete { .. } => "response.incomplete",
            Self::Failed { .. } => "response.failed",
        }
    }
}

/// An event with its number, as it goes on the wire.
#[derive(Serialize)]
pub struct Numbered<'a> {
    #[serde(flatten)]
    pub event: &'a StreamEvent,
    pub sequence_number: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(v: Value) -> Result<Decoded, String> {
        let mut r: CreateResponse = serde_json::from_value(v).unwrap(); // ok: test
        r.decode()
    }

    #[test]
    fn reads_items_tools_and_format() {
        let d = decode(serde_json::json!({"model": "m", "input": [
            {"role": "developer", "content": "be brief"},
            {"role": "user", "content": [{"type": "input_text", "text": "hi"},
                {"type": "input_image", "image_url": "https://e.x/a.png", "detail": "low"}]},
            {"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
            {"type": "function_call_output", "call_id": "c1", "output": "42"}],
            "tools": [{"type": "function", "name": "f", "parameters": {"type": "object"}}],
            "tool_choice": {"type": "function", "name": "f"},
            "text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "object"}}}}))
        .unwrap(); // ok: test
        assert_eq!(d.items.len(), 4);
        assert!(matches!(&d.items[0], InputItem::Message(m) if m.role == Role::System));
        assert!(matches!(&d.items[1], InputItem::Message(m) if m.content.has_images()));
        assert!(
            matches!(&d.items[3], InputItem::FunctionCallOutput { call_id, .. } if call_id == "c1")
        );
        assert_eq!(d.tool_choice, Some(ToolChoice::Function("f".into())));
        assert!(matches!(d.format, Some(ResponseFormat::JsonSchema { .. })));
    }

    #[test]
    fn refusals_name_the_field() {
        let err = |v: Value| decode(v).err().unwrap_or_default();
        assert!(err(
            serde_json::json!({"model": "m", "input": [{"role": "robot", "content": "x"}]})
        )
        .starts_with("input[0].role"));
        assert!(err(serde_json::json!({"model": "m", "input": [{"role": "user", "content": [{"type": "input_file", "file_id": "f"}]}]})).starts_with("input[0].content[0].type"));
        assert!(err(
            serde_json::json!({"model": "m", "input": "x", "tools": [{"type": "web_search"}]})
        )
        .starts_with("tools[0].type"));
        assert!(err(
            serde_json::json!({"model": "m", "input": "x", "reasoning": {"effort": "high"}})
        )
        .starts_with("reasoning"));
        assert!(err(serde_json::json!({"model": "m", "input": []})).contains("empty"));
        assert!(decode(serde_json::json!({"model": "m", "input": "x", "include": []})).is_ok());
        assert!(
            err(serde_json::json!({"model": "m", "input": "x", "truncation": "disabled"}))
                .starts_with("truncation")
        );
        assert!(
            decode(serde_json::json!({"model": "m", "input": "x", "truncation": "auto"})).is_ok()
        );
    }

    #[test]
    fn events_carry_their_type_and_number() {
        let e = StreamEvent::OutputTextDelta {
            item_id: "msg_1".into(),
            output_index: 0,
            content_index: 0,
            delta: "Hi".into(),
            logprobs: Vec::new(),
        };
        let v = serde_json::to_value(Numbered {
            event: &e,
            sequence_number: 3,
        })
        .unwrap(); // ok: test
        assert_eq!(v["type"], "response.output_text.delta");
        assert_eq!(v["sequence_number"], 3);
        assert_eq!(v["delta"], "Hi");
    }
}
