//! The Anthropic Messages API: the request parley sends and the stream events it reads, with
//! the translation from the domain (OpenAI-shaped) request: system messages to `system`, tool
//! results to `tool_result` blocks in user turns, images to `base64`/`url` sources, function
//! tools to `input_schema` tools, `tool_choice` to `auto`/`any`/`tool`/`none`, and a
//! `json_schema` response format to a forced tool whose input is the answer.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::domain::{
    Content, FinishReason, Message, Part, ResponseFormat, Role, ToolChoice, UpstreamFinish,
};
use crate::provider::ChatRequest;

/// Anthropic requires `max_tokens`; this is used when the client gives none.
pub const DEFAULT_MAX_TOKENS: u32 = 1024;

/// The image media types the Messages API takes as base64 sources.
pub const IMAGE_TYPES: &[&str] = &["image/jpeg", "image/png", "image/gif", "image/webp"];

/// The tool that carries a structured answer when the request asks for `json_schema` or
/// `json_object` (its input is the answer, unwrapped back into text).
pub const ANSWER_TOOL: &str = "json_answer";

#[derive(Debug, Clone, Serialize)]
pub struct MessagesRequest {
    pub model: String,
    pub messages: Vec<AnthropicMessage>,
    pub max_tokens: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub system: Option<String>,
    pub stream: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub top_p: Option<f64>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub stop_sequences: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tools: Vec<AnthropicTool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_choice: Option<AnthropicToolChoice>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub metadata: Option<Metadata>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AnthropicMessage {
    pub role: &'static str,
    /// A lone text block is sent as a plain string, the API's short form.
    #[serde(serialize_with = "short_content")]
    pub content: Vec<Block>,
}

fn short_content<S: serde::Serializer>(blocks: &[Block], s: S) -> Result<S::Ok, S::Error> {
    match blocks {
        [Block::Text { text }] => s.serialize_str(text),
        blocks => blocks.serialize(s),
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Block {
    Text {
        text: String,
    },
    Image {
        source: ImageSource,
    },
    ToolUse {
        id: String,
        name: String,
        input: Value,
    },
    ToolResult {
        tool_use_id: String,
        content: String,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        is_error: bool,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ImageSource {
    Base64 { media_type: String, data: String },
    Url { url: String },
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AnthropicTool {
    pub name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub description: Option<String>,
    pub input_schema: Value,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum AnthropicToolChoice {
    Auto {
        #[serde(skip_serializing_if = "Option::is_none")]
        disable_parallel_tool_use: Option<bool>,
    },
    Any {
        #[serde(skip_serializing_if = "Option::is_none")]
        disable_parallel_tool_use: Option<bool>,
    },
    Tool {
        name: String,
        #[serde(skip_serializing_if = "Option::is_none")]
        disable_parallel_tool_use: Option<bool>,
    },
    None,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Metadata {
    pub user_id: String,
}

/// The Messages API request of `req`. Parameters Anthropic cannot honour were refused, or
/// allowed to be dropped, by the router before the request got here (see [`unsupported`]).
///
/// # Errors
/// When a tool call's arguments are not a JSON object (Anthropic takes only objects).
pub fn encode(req: &ChatRequest) -> Result<MessagesRequest, String> {
    let system: Vec<String> = req
        .messages
        .iter()
        .filter(|m| m.role == Role::System)
        .map(|m| m.content.text())
        .collect();
    let mut messages: Vec<AnthropicMessage> = Vec::new();
    for m in req.messages.iter().filter(|m| m.role != Role::System) {
        let (role, blocks) = blocks_of(m)?;
        // The API wants user and assistant turns to alternate: same-role neighbours merge
        // (tool results join the user turn that follows them, as Anthropic expects).
        match messages.last_mut() {
            Some(last) if last.role == role => merge(&mut last.content, blocks),
            _ => messages.push(AnthropicMessage {
                role,
                content: blocks,
            }),
        }
    }
    let p = &req.params;
    let disable_parallel = p.parallel_tool_calls.map(|parallel| !parallel);
    let mut tools: Vec<AnthropicTool> = req
        .tools
        .iter()
        .map(|t| AnthropicTool {
            name: t.name.clone(),
            description: t.description.clone(),
            input_schema: t
                .parameters
                .clone()
                .unwrap_or_else(|| serde_json::json!({"type": "object", "properties": {}})),
        })
        .collect();
    let mut tool_choice = req.tool_choice.as_ref().map(|c| match c {
        ToolChoice::Auto => AnthropicToolChoice::Auto {
            disable_parallel_tool_use: disable_parallel,
        },
        ToolChoice::Required => AnthropicToolChoice::Any {
            disable_parallel_tool_use: disable_parallel,
        },
        ToolChoice::Function(name) => AnthropicToolChoice::Tool {
            name: name.clone(),
            disable_parallel_tool_use: disable_parallel,
        },
        ToolChoice::None => AnthropicToolChoice::None,
    });
    if tool_choice.is_none() && disable_parallel.is_some() && !tools.is_empty() {
        tool_choice = Some(AnthropicToolChoice::Auto {
            disable_parallel_tool_use: disable_parallel,
        });
    }
    if let Some(schema) = answer_schema(req) {
        // The answer comes as the input of a tool the model must call; with tools of the
        // client's own it may call those instead.
        tools.push(AnthropicTool {
            name: ANSWER_TOOL.into(),
            description: Some("Answer with this tool; its input is the whole answer.".into()),
            input_schema: schema,
        });
        let named = matches!(req.tool_choice, None | Some(ToolChoice::None)) || tools.len() == 1;
        tool_choice = Some(if named {
            AnthropicToolChoice::Tool {
                name: ANSWER_TOOL.into(),
                disable_parallel_tool_use: None,
            }
        } else {
            AnthropicToolChoice::Any {
                disable_parallel_tool_use: disable_parallel,
            }
        });
        if matches!(req.tool_choice, Some(ToolChoice::None)) {
            tools.retain(|t| t.name == ANSWER_TOOL);
        }
    }
    Ok(MessagesRequest {
        model: req.model.clone(),
        messages,
        max_tokens: req.max_tokens.unwrap_or(DEFAULT_MAX_TOKENS),
        system: (!system.is_empty()).then(|| system.join("\n\n")),
        stream: true,
        temperature: req.temperature,
        top_p: p.top_p,
        stop_sequences: p.stop.clone(),
        tools,
        tool_choice,
        metadata: p.user.clone().map(|user_id| Metadata { user_id }),
    })
}

/// The schema of a structured answer the request asks for, if any.
fn answer_schema(req: &ChatRequest) -> Option<Value> {
    match &req.params.response_format {
        Some(ResponseFormat::JsonSchema { json_schema }) => Some(
            json_schema
                .schema
                .clone()
                .unwrap_or_else(|| serde_json::json!({"type": "object"})),
        ),
        Some(ResponseFormat::JsonObject) => Some(serde_json::json!({"type": "object"})),
        Some(ResponseFormat::Text) | None => None,
    }
}

/// Whether `req` asks for a structured answer through [`ANSWER_TOOL`].
pub fn wants_answer_tool(req: &ChatRequest) -> bool {
    answer_schema(req).is_some()
}

/// The parameters of `req` that the Messages API cannot honour, by their OpenAI names.
pub fn unsupported(req: &ChatRequest) -> Vec<String> {
    let p = &req.params;
    let mut out: Vec<String> = Vec::new();
    let mut flag = |set: bool, name: &str| {
        if set {
            out.push(name.to_owned());
        }
    };
    flag(p.seed.is_some(), "seed");
    flag(p.presence_penalty.is_some(), "presence_penalty");
    flag(p.frequency_penalty.is_some(), "frequency_penalty");
    flag(p.logit_bias.is_some(), "logit_bias");
    flag(p.logprobs == Some(true), "logprobs");
    flag(p.top_logprobs.is_some(), "top_logprobs");
    flag(p.metadata.is_some(), "metadata");
    flag(req.messages.iter().any(|m| m.name.is_some()), "name");
    out.extend(p.extra.keys().cloned());
    out
}

fn merge(into: &mut Vec<Block>, blocks: Vec<Block>) {
    for b in blocks {
        match (into.last_mut(), b) {
            (Some(Block::Text { text: a }), Block::Text { text: b }) => {
                a.push_str("\n\n");
                a.push_str(&b);
            }
            (_, b) => into.push(b),
        }
    }
}

fn blocks_of(m: &Message) -> Result<(&'static str, Vec<Block>), String> {
    let mut blocks = Vec::new();
    if m.role == Role::Tool {
        blocks.push(Block::ToolResult {
            tool_use_id: m.tool_call_id.clone().unwrap_or_default(),
            content: m.content.text(),
            is_error: m.is_error,
        });
        return Ok(("user", blocks));
    }
    match &m.content {
        Content::Text(t) if t.is_empty() => {}
        Content::Text(t) => blocks.push(Block::Text { text: t.clone() }),
        Content::Parts(parts) => {
            for p in parts {
                match p {
                    Part::Text { text } if text.is_empty() => {}
                    Part::Text { text } => blocks.push(Block::Text { text: text.clone() }),
                    Part::ImageUrl { image_url } => {
                        let source = match image_url.data() {
                            Some((media_type, data)) => ImageSource::Base64 {
                                media_type: media_type.to_owned(),
                                data: data.to_owned(),
                            },
                            None => ImageSource::Url {
                                url: image_url.url.clone(),
                            },
                        };
                        blocks.push(Block::Image { source });
                    }
                }
            }
        }
    }
    for c in &m.tool_calls {
        let input: Value = if c.arguments.trim().is_empty() {
            Value::Object(serde_json::Map::new())
        } else {
            serde_json::from_str(&c.arguments)
                .map_err(|e| format!("tool call {:?}: arguments are not JSON: {e}", c.id))?
        };
        if !input.is_object() {
            return Err(format!(
                "tool call {:?}: arguments must be a JSON object",
                c.id
            ));
        }
        blocks.push(Block::ToolUse {
            id: c.id.clone(),
            name: c.name.clone(),
            input,
        });
    }
    let role = if m.role == Role::Assistant {
        "assistant"
    } else {
        "user"
    };
    Ok((role, blocks))
}

/// One event of a Messages stream.
#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum StreamEvent {
    MessageStart {
        message: StartMessage,
    },
    ContentBlockStart {
        #[serde(default)]
        index: u32,
        content_block: StartBlock,
    },
    ContentBlockDelta {
        #[serde(default)]
        index: u32,
        delta: BlockDelta,
    },
    ContentBlockStop {
        #[serde(default)]
        index: u32,
    },
    MessageDelta {
        #[serde(default)]
        delta: MessageDeltaBody,
        #[serde(default)]
        usage: Option<OutputUsage>,
    },
    MessageStop,
    Ping,
    Error {
        #[serde(default)]
        error: ErrorBody,
    },
    #[serde(other)]
    Other,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct StartMessage {
    #[serde(default)]
    pub model: Option<String>,
    #[serde(default)]
    pub usage: Option<InputUsage>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct InputUsage {
    #[serde(default)]
    pub input_tokens: u32,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct OutputUsage {
    #[serde(default)]
    pub output_tokens: Option<u32>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum StartBlock {
    Text {
        #[serde(default)]
        text: String,
    },
    ToolUse {
        id: String,
        name: String,
    },
    #[serde(other)]
    Other,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum BlockDelta {
    TextDelta {
        text: String,
    },
    InputJsonDelta {
        partial_json: String,
    },
    #[serde(other)]
    Other,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct MessageDeltaBody {
    #[serde(default)]
    pub stop_reason: Option<String>,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct ErrorBody {
    #[serde(default)]
    pub message: Option<String>,
}

/// Anthropic's stop reasons in domain terms; others (`pause_turn`, future ones) are shown as
/// `stop`, never taken for a complete reply.
pub fn finish_of(reason: &str) -> UpstreamFinish {
    match reason {
        "end_turn" | "stop_sequence" => UpstreamFinish::known(FinishReason::Stop),
        "max_tokens" => UpstreamFinish::known(FinishReason::Length),
        "tool_use" => UpstreamFinish::known(FinishReason::ToolCalls),
        "refusal" => UpstreamFinish::known(FinishReason::ContentFilter),
        _ => UpstreamFinish::UNKNOWN,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::{ImageUrl, JsonSchema, Params, Tool, ToolCall};

    fn req(messages: Vec<Message>) -> ChatRequest {
        ChatRequest {
            model: "claude".into(),
            messages,
            ..Default::default()
        }
    }

    #[test]
    fn system_goes_apart_and_roles_alternate() {
        let body = encode(&req(vec![
            Message::text(Role::System, "be kind"),
            Message::text(Role::User, "a"),
            Message::text(Role::User, "b"),
            Message::text(Role::Assistant, "c"),
        ]))
        .unwrap(); // ok: test
        assert_eq!(body.system.as_deref(), Some("be kind"));
        assert_eq!(body.max_tokens, DEFAULT_MAX_TOKENS);
        assert_eq!(body.messages.len(), 2);
        assert_eq!(
            body.messages[0].content,
            vec![Block::Text {
                text: "a\n\nb".into()
            }]
        );
    }

    #[test]
    fn tools_results_and_images_translate() {
        let mut r = req(vec![
            Message {
                role: Role::User,
                content: Content::Parts(vec![
                    Part::Text { text: "see".into() },
                    Part::ImageUrl {
                        image_url: ImageUrl {
                            url: "data:image/png;base64,AAAA".into(),
                            detail: None,
                        },
                    },
                    Part::ImageUrl {
                        image_url: ImageUrl {
                            url: "https://e.x/a.jpg".into(),
                            detail: None,
                        },
                    },
                ]),
                ..Message::default()
            },
            Message {
                role: Role::Assistant,
                tool_calls: vec![
                    ToolCall {
                        id: "c1".into(),
                        name: "f".into(),
                        arguments: "{\"a\":1}".into(),
                    },
                    ToolCall {
                        id: "c2".into(),
                        name: "f".into(),
                        arguments: "{}".into(),
                    },
                ],
                ..Message::default()
            },
            Message {
                role: Role::Tool,
                tool_call_id: Some("c1".into()),
                content: Content::Text("one".into()),
                ..Message::default()
            },
            Message {
                role: Role::Tool,
                tool_call_id: Some("c2".into()),
                content: Content::Text("bad".into()),
                is_error: true,
                ..Message::default()
            },
        ]);
        r.tools = vec![Tool {
            name: "f".into(),
            description: None,
            parameters: Some(serde_json::json!({"type": "object"})),
            strict: None,
        }];
        r.tool_choice = Some(ToolChoice::Required);
        r.params.parallel_tool_calls = Some(false);
        let v = serde_json::to_value(encode(&r).unwrap()).unwrap(); // ok: test
        assert_eq!(v["messages"][0]["content"][1]["source"]["type"], "base64");
        assert_eq!(
            v["messages"][0]["content"][1]["source"]["media_type"],
            "image/png"
        );
        assert_eq!(v["messages"][0]["content"][2]["source"]["type"], "url");
        assert_eq!(v["messages"][1]["content"][0]["type"], "tool_use");
        assert_eq!(v["messages"][1]["content"][0]["input"]["a"], 1);
        // Both results in one user turn.
        assert_eq!(v["messages"].as_array().map(Vec::len), Some(3));
        assert_eq!(v["messages"][2]["content"][1]["is_error"], true);
        assert_eq!(v["tools"][0]["input_schema"]["type"], "object");
        assert_eq!(v["tool_choice"]["type"], "any");
        assert_eq!(v["tool_choice"]["disable_parallel_tool_use"], true);
    }

    #[test]
    fn json_schema_becomes_a_forced_tool_and_bad_arguments_are_refused() {
        let mut r = req(vec![Message::text(Role::User, "x")]);
        *r.params = Params {
            response_format: Some(ResponseFormat::JsonSchema {
                json_schema: JsonSchema {
                    name: "person".into(),
                    description: None,
                    schema: Some(
                        serde_json::json!({"type": "object", "properties": {"name": {"type": "string"}}}),
                    ),
                    strict: Some(true),
                },
            }),
            seed: Some(1),
            ..Params::default()
        };
        let v = serde_json::to_value(encode(&r).unwrap()).unwrap(); // ok: test
        assert_eq!(v["tools"][0]["name"], ANSWER_TOOL);
        assert_eq!(v["tool_choice"]["name"], ANSWER_TOOL);
        assert_eq!(unsupported(&r), vec!["seed".to_owned()]);
        let bad = req(vec![Message {
            role: Role::Assistant,
            tool_calls: vec![ToolCall {
                id: "c".into(),
                name: "f".into(),
                arguments: "[1]".into(),
            }],
            ..Message::default()
        }]);
        assert!(encode(&bad).is_err());
    }
}
