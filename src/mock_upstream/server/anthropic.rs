//! The Anthropic Messages wire of the mock: a request body read into a [`MockRequest`], as
//! strictly as Anthropic reads it (so that a gateway sending OpenAI habits gets caught), and a
//! [`Plan`] written back as a `message` or as its SSE events. Tool call ids are the generator's
//! with `toolu_` for `call_`.

use serde_json::{json, Value};

use super::{max_tokens_of, parts_text, text_of};
use crate::mock_upstream::generator::{
    assistant_content, fragments, MockCall, MockChoice, MockMessage, MockRequest, MockTool, Plan,
};

/// Events before the first content chunk: `message_start` and the first `content_block_start`.
pub(super) const OPENING: usize = 2;

/// Tool input JSON streams in pieces of at most this many characters.
const INPUT_FRAGMENT_CHARS: usize = 10;

/// Top-level fields of the OpenAI API that Anthropic refuses.
const OPENAI_ONLY: &[&str] = &[
    "response_format",
    "logprobs",
    "n",
    "frequency_penalty",
    "presence_penalty",
    "seed",
];

const IMAGE_TYPES: &[&str] = &["image/jpeg", "image/png", "image/gif", "image/webp"];

/// Reads a Messages body.
///
/// # Errors
/// The message of the 400 a real Anthropic would answer.
pub(super) fn read_request(body: &Value) -> Result<MockRequest, String> {
    if let Some(field) = OPENAI_ONLY.iter().find(|f| body.get(**f).is_some()) {
        return Err(format!("{field}: Extra inputs are not permitted"));
    }
    let max_tokens = match body.get("max_tokens") {
        None => return Err("max_tokens: Field required".into()),
        Some(_) => max_tokens_of(body, "max_tokens")
            .ok_or("max_tokens: Input should be a valid integer")?,
    };
    let mut req = MockRequest {
        max_tokens: Some(max_tokens),
        tools: read_tools(body.get("tools"))?,
        choice: read_choice(body.get("tool_choice"))?,
        ..MockRequest::default()
    };
    if let Some(system) = body.get("system") {
        req.messages.push(MockMessage {
            role: "system".into(),
            content: text_of(system),
        });
    }
    let messages = match body.get("messages") {
        Some(Value::Array(m)) if !m.is_empty() => m,
        Some(Value::Array(_)) => return Err("messages: at least one message is required".into()),
        _ => return Err("messages: Field required".into()),
    };
    let mut previous: Option<Turn> = None;
    for (i, m) in messages.iter().enumerate() {
        let turn = read_message(m, i, previous.as_ref())?;
        req.messages.extend(turn.messages.iter().cloned());
        req.image_tokens += turn.image_tokens;
        if turn.role == "user" {
            req.images = turn.images;
        }
        previous = Some(turn);
    }
    if let Some(last) = previous.filter(|t| t.only_results) {
        req.tool_results = last.results;
    }
    Ok(req)
}

/// One message of the request, read.
struct Turn {
    role: &'static str,
    /// As the generator sees it: the results of a user turn as `tool` messages, then its text.
    messages: Vec<MockMessage>,
    images: usize,
    image_tokens: u32,
    /// The ids of an assistant turn's `tool_use` blocks.
    tool_use_ids: Vec<String>,
    results: Vec<(String, bool)>,
    /// A user turn made of `tool_result` blocks and nothing else.
    only_results: bool,
}

fn read_message(m: &Value, i: usize, previous: Option<&Turn>) -> Result<Turn, String> {
    let role = match m.get("role").and_then(Value::as_str) {
        Some("user") => "user",
        Some("assistant") => "assistant",
        _ => {
            return Err(format!(
                "messages.{i}.role: Input should be 'user' or 'assistant' (a system prompt goes \
                 in the top-level `system` field)"
            ))
        }
    };
    match previous {
        None if role != "user" => {
            return Err("messages: first message must use the \"user\" role".into())
        }
        Some(p) if p.role == role => {
            return Err(format!(
                "messages: roles must alternate between \"user\" and \"assistant\", but found \
                 multiple \"{role}\" roles in a row"
            ))
        }
        _ => {}
    }
    if m.get("tool_calls").is_some() {
        return Err(format!(
            "messages.{i}.tool_calls: Extra inputs are not permitted"
        ));
    }
    let mut turn = Turn {
        role,
        messages: Vec::new(),
        images: 0,
        image_tokens: 0,
        tool_use_ids: Vec::new(),
        results: Vec::new(),
        only_results: false,
    };
    let blocks = match m.get("content") {
        Some(Value::String(s)) => {
            turn.messages.push(MockMessage {
                role: role.into(),
                content: s.clone(),
            });
            return Ok(turn);
        }
        Some(Value::Array(blocks)) => blocks,
        _ => return Err(format!("messages.{i}.content: Field required")),
    };
    let answered = previous.map_or(&[][..], |p| p.tool_use_ids.as_slice());
    let mut calls = Vec::new();
    let mut others = 0;
    for (j, block) in blocks.iter().enumerate() {
        let at = format!("messages.{i}.content.{j}");
        match (block.get("type").and_then(Value::as_str), role) {
            (Some("text"), _) => others += 1,
            (Some("image"), "user") => {
                turn.image_tokens += check_image(block.get("source"), &at)?;
                turn.images += 1;
                others += 1;
            }
            (Some("tool_use"), "assistant") => calls.push(read_tool_use(block, &at)?),
            (Some("tool_result"), "user") => {
                turn.results.push(read_tool_result(block, &at, answered)?)
            }
            (kind, _) => {
                return Err(format!(
                    "{at}.type: block type {:?} is not allowed in a {role} message",
                    kind.unwrap_or("")
                ))
            }
        }
    }
    turn.tool_use_ids = calls.iter().map(|c| c.id.clone()).collect();
    turn.only_results = !turn.results.is_empty() && others == 0;
    turn.messages
        .extend(turn.results.iter().map(|(content, _)| MockMessage {
            role: "tool".into(),
            content: content.clone(),
        }));
    if !turn.only_results {
        let text = parts_text(
            blocks
                .iter()
                .filter(|b| b.get("type").and_then(Value::as_str) == Some("text")),
        );
        let content = if role == "assistant" {
            assistant_content(&text, &calls)
        } else {
            text
        };
        turn.messages.push(MockMessage {
            role: role.into(),
            content,
        });
    }
    Ok(turn)
}

/// Checks an image source; answers its input tokens as Anthropic counts them: about one per
/// 750 pixels after scaling the long edge to at most 1568, 1600 when the size is unknown.
fn check_image(source: Option<&Value>, at: &str) -> Result<u32, String> {
    let source = source.ok_or(format!("{at}.source: Field required"))?;
    let field = |k: &str| source.get(k).and_then(Value::as_str);
    match field("type") {
        Some("base64") => {
            if !field("media_type").is_some_and(|t| IMAGE_TYPES.contains(&t)) {
                return Err(format!(
                    "{at}.source.media_type: Input should be 'image/jpeg', 'image/png', \
                     'image/gif' or 'image/webp'"
                ));
            }
            if field("data").is_none_or(str::is_empty) {
                return Err(format!("{at}.source.data: image data must not be empty"));
            }
            Ok(area_tokens(field("data").unwrap_or_default()))
        }
        Some("url") => match field("url") {
            Some(u) if u.starts_with("https://") || u.starts_with("http://") => {
                Ok(UNKNOWN_IMAGE_TOKENS)
            }
            _ => Err(format!("{at}.source.url: Input should be an http(s) URL")),
        },
        _ => Err(format!(
            "{at}.source.type: Input should be 'base64' or 'url'"
        )),
    }
}

/// Anthropic's figure for an image whose size is not known.
const UNKNOWN_IMAGE_TOKENS: u32 = 1600;

fn area_tokens(base64_data: &str) -> u32 {
    use base64::Engine;
    let mut end = base64_data.len().min(64 * 1024);
    end -= end % 4;
    let size = base64::engine::general_purpose::STANDARD
        .decode(&base64_data[..end])
        .ok()
        .and_then(|b| imagesize::blob_size(&b).ok());
    let Some(size) = size else {
        return UNKNOWN_IMAGE_TOKENS;
    };
    let (w, h) = (size.width as f64, size.height as f64);
    let scale = (1568.0 / w.max(h)).min(1.0);
    ((w * scale) * (h * scale) / 750.0).ceil() as u32
}

fn read_tool_use(block: &Value, at: &str) -> Result<MockCall, String> {
    let field = |k: &str| {
        block
            .get(k)
            .and_then(Value::as_str)
            .map(str::to_owned)
            .ok_or(format!("{at}.{k}: Field required"))
    };
    let input = block.get("input").cloned().unwrap_or_else(|| json!({}));
    Ok(MockCall {
        id: field("id")?,
        name: field("name")?,
        arguments: input.to_string(),
    })
}

fn read_tool_result(
    block: &Value,
    at: &str,
    answered: &[String],
) -> Result<(String, bool), String> {
    let id = block
        .get("tool_use_id")
        .and_then(Value::as_str)
        .ok_or(format!("{at}.tool_use_id: Field required"))?;
    if !answered.iter().any(|a| a == id) {
        return Err(format!(
            "{at}: unexpected `tool_use_id` found in `tool_result` blocks: {id}. Each \
             `tool_result` block must have a corresponding `tool_use` block in the previous message."
        ));
    }
    let content = block.get("content").map(text_of).unwrap_or_default();
    let is_error = block
        .get("is_error")
        .and_then(Value::as_bool)
        .unwrap_or(false);
    Ok((content, is_error))
}

fn read_tools(tools: Option<&Value>) -> Result<Vec<MockTool>, String> {
    let tools = match tools {
        None => return Ok(Vec::new()),
        Some(Value::Array(tools)) => tools,
        Some(_) => return Err("tools: Input should be a valid list".into()),
    };
    tools
        .iter()
        .enumerate()
        .map(|(i, t)| {
            if t.get("function").is_some()
                || t.get("type").and_then(Value::as_str) == Some("function")
            {
                return Err(format!(
                    "tools.{i}: OpenAI-style function tools are not accepted; give `name`, \
                     `description` and `input_schema`"
                ));
            }
            let name = t
                .get("name")
                .and_then(Value::as_str)
                .ok_or(format!("tools.{i}.name: Field required"))?;
            let schema = t
                .get("input_schema")
                .filter(|s| s.is_object())
                .ok_or(format!("tools.{i}.input_schema: Field required"))?;
            Ok(MockTool {
                name: name.to_owned(),
                parameters: schema.clone(),
            })
        })
        .collect()
}

fn read_choice(choice: Option<&Value>) -> Result<MockChoice, String> {
    let Some(choice) = choice else {
        return Ok(MockChoice::Auto);
    };
    if !choice.is_object() {
        return Err("tool_choice: Input should be an object with a `type`".into());
    }
    match choice.get("type").and_then(Value::as_str) {
        Some("auto") => Ok(MockChoice::Auto),
        Some("any") => Ok(MockChoice::Required),
        Some("none") => Ok(MockChoice::None),
        Some("tool") => choice
            .get("name")
            .and_then(Value::as_str)
            .map(|n| MockChoice::Named(n.to_owned()))
            .ok_or("tool_choice.name: Field required".into()),
        _ => Err("tool_choice.type: Input should be 'auto', 'any', 'tool' or 'none'".into()),
    }
}

/// The wire id of a call: `toolu_` where the generator says `call_`.
pub(super) fn call_id(id: &str) -> String {
    match id.strip_prefix("call_") {
        Some(rest) => format!("toolu_{rest}"),
        None => id.to_owned(),
    }
}

fn stop_reason(plan: &Plan) -> &'static str {
    match plan.finish_reason {
        "length" => "max_tokens",
        "tool_calls" => "tool_use",
        _ => "end_turn",
    }
}

/// A call's arguments as the `input` object (the generator always writes an object).
fn input(call: &MockCall) -> Value {
    serde_json::from_str(&call.arguments).unwrap_or_else(|_| json!({}))
}

/// Whether the reply has a text block: it has text, or it has nothing else.
fn has_text(plan: &Plan) -> bool {
    !plan.chunks.is_empty() || plan.tool_calls.is_empty()
}

/// The `message` answer.
pub(super) fn answer(plan: &Plan, model: &str) -> Value {
    let mut content: Vec<Value> = Vec::new();
    if has_text(plan) {
        content.push(json!({"type": "text", "text": plan.text()}));
    }
    content.extend(plan.tool_calls.iter().map(
        |c| json!({"type": "tool_use", "id": call_id(&c.id), "name": c.name, "input": input(c)}),
    ));
    json!({
        "id": "msg_mock", "type": "message", "role": "assistant", "model": model,
        "content": content,
        "stop_reason": stop_reason(plan),
        "usage": {"input_tokens": plan.prompt_tokens, "output_tokens": plan.completion_tokens},
    })
}

/// SSE events: the text block at index 0 (its i-th chunk at index i + [`OPENING`]), then one
/// `tool_use` block per call with its input JSON in fragments.
pub(super) fn events(plan: &Plan, model: &str) -> Vec<String> {
    let ev = |name: &str, v: Value| format!("event: {name}\ndata: {v}\n\n");
    let mut events = vec![ev(
        "message_start",
        json!({"type": "message_start", "message": {"id": "msg_mock", "type": "message", "role": "assistant",
               "model": model, "content": [], "stop_reason": null, "stop_sequence": null,
               "usage": {"input_tokens": plan.prompt_tokens, "output_tokens": 0}}}),
    )];
    let text_blocks = usize::from(has_text(plan));
    if text_blocks == 1 {
        events.push(ev(
            "content_block_start",
            json!({"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}),
        ));
        events.extend(plan.chunks.iter().map(|c| {
            ev("content_block_delta", json!({"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": c}}))
        }));
        events.push(ev(
            "content_block_stop",
            json!({"type": "content_block_stop", "index": 0}),
        ));
    }
    for (k, call) in plan.tool_calls.iter().enumerate() {
        let index = k + text_blocks;
        events.push(ev(
            "content_block_start",
            json!({"type": "content_block_start", "index": index, "content_block":
                   {"type": "tool_use", "id": call_id(&call.id), "name": call.name, "input": {}}}),
        ));
        events.extend(fragments(&call.arguments, INPUT_FRAGMENT_CHARS).into_iter().map(|frag| {
            ev("content_block_delta", json!({"type": "content_block_delta", "index": index,
                                             "delta": {"type": "input_json_delta", "partial_json": frag}}))
        }));
        events.push(ev(
            "content_block_stop",
            json!({"type": "content_block_stop", "index": index}),
        ));
    }
    events.push(ev(
        "message_delta",
        json!({"type": "message_delta", "delta": {"stop_reason": stop_reason(plan)}, "usage": {"output_tokens": plan.completion_tokens}}),
    ));
    events.push(ev("message_stop", json!({"type": "message_stop"})));
    events
}

#[cfg(test)]
#[path = "anthropic_tests.rs"]
mod tests;
