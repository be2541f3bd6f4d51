//! The OpenAI Chat Completions wire of the mock: a request body read into a [`MockRequest`]
//! (refusing what OpenAI refuses: bad image URLs, unknown part types, tool messages without or
//! with an unknown `tool_call_id`, tools without a function name) and a [`Plan`] written back as a
//! `chat.completion` or as `chat.completion.chunk` SSE events.

use std::collections::HashSet;

use serde_json::{json, Value};

use super::{max_tokens_of, parts_text, text_of};
use crate::mock_upstream::generator::{
    assistant_content, fragments, MockCall, MockChoice, MockMessage, MockRequest, MockTool, Plan,
};

/// Events before the first content chunk: the one that opens the assistant message.
pub(super) const OPENING: usize = 1;

/// Tool-call arguments stream in pieces of at most this many characters.
const ARGUMENT_FRAGMENT_CHARS: usize = 10;

/// Reads a Chat Completions body.
///
/// # Errors
/// The message of the 400 a real OpenAI would answer.
pub(super) fn read_request(body: &Value) -> Result<MockRequest, String> {
    let mut req = MockRequest {
        max_tokens: max_tokens_of(body, "max_tokens")
            .or_else(|| max_tokens_of(body, "max_completion_tokens")),
        tools: read_tools(body.get("tools"))?,
        choice: read_choice(body.get("tool_choice"))?,
        ..MockRequest::default()
    };
    read_format(body.get("response_format"), &mut req)?;
    let mut call_ids = HashSet::new();
    let messages = body.get("messages").and_then(Value::as_array);
    for (i, m) in messages.into_iter().flatten().enumerate() {
        let role = m.get("role").and_then(Value::as_str).unwrap_or("user");
        let (text, images, image_tokens) = read_content(m.get("content"), i)?;
        req.image_tokens += image_tokens;
        let content = match role {
            "assistant" => {
                let calls = read_calls(m, i)?;
                call_ids.extend(calls.iter().map(|c| c.id.clone()));
                assistant_content(&text, &calls)
            }
            "tool" => {
                let id = m
                    .get("tool_call_id")
                    .and_then(Value::as_str)
                    .ok_or(format!("messages[{i}].tool_call_id is required"))?;
                if !call_ids.contains(id) {
                    return Err(format!(
                        "messages[{i}].tool_call_id {id:?} does not answer any earlier tool call"
                    ));
                }
                text
            }
            _ => text,
        };
        if role == "user" {
            req.images = images;
        }
        req.messages.push(MockMessage {
            role: role.to_owned(),
            content,
        });
    }
    let trailing = req.messages.iter().rev().take_while(|m| m.role == "tool");
    let mut results: Vec<(String, bool)> = trailing.map(|m| (m.content.clone(), false)).collect();
    results.reverse();
    req.tool_results = results;
    Ok(req)
}

/// A message's text, its number of image parts and what they cost.
fn read_content(content: Option<&Value>, i: usize) -> Result<(String, usize, u32), String> {
    let Some(Value::Array(parts)) = content else {
        return Ok((content.map(text_of).unwrap_or_default(), 0, 0));
    };
    let mut images = 0;
    let mut image_tokens = 0;
    for (j, part) in parts.iter().enumerate() {
        match part.get("type").and_then(Value::as_str) {
            Some("text") => {}
            Some("image_url") => {
                let url = part
                    .pointer("/image_url/url")
                    .and_then(Value::as_str)
                    .ok_or(format!(
                        "messages[{i}].content[{j}].image_url.url is required"
                    ))?;
                if !["https:", "http:", "data:"]
                    .iter()
                    .any(|s| url.starts_with(s))
                {
                    return Err(format!(
                        "messages[{i}].content[{j}].image_url.url: invalid image URL, expected \
                         an http(s) URL or a data URL"
                    ));
                }
                images += 1;
                let detail = part
                    .pointer("/image_url/detail")
                    .and_then(|d| serde_json::from_value(d.clone()).ok());
                image_tokens += crate::tokens::image_tokens(&crate::domain::ImageUrl {
                    url: url.to_owned(),
                    detail,
                });
            }
            other => {
                return Err(format!(
                    "messages[{i}].content[{j}].type: unknown content part type {:?}",
                    other.unwrap_or("")
                ))
            }
        }
    }
    Ok((parts_text(parts), images, image_tokens))
}

/// The `tool_calls` of an assistant message.
fn read_calls(m: &Value, i: usize) -> Result<Vec<MockCall>, String> {
    let calls = m.get("tool_calls").and_then(Value::as_array);
    calls
        .into_iter()
        .flatten()
        .enumerate()
        .map(|(j, c)| {
            let field = |path: &str| c.pointer(path).and_then(Value::as_str);
            let missing = |what: &str| format!("messages[{i}].tool_calls[{j}].{what} is required");
            Ok(MockCall {
                id: field("/id").ok_or_else(|| missing("id"))?.to_owned(),
                name: field("/function/name")
                    .ok_or_else(|| missing("function.name"))?
                    .to_owned(),
                arguments: field("/function/arguments").unwrap_or("{}").to_owned(),
            })
        })
        .collect()
}

fn read_tools(tools: Option<&Value>) -> Result<Vec<MockTool>, String> {
    let tools = match tools {
        None | Some(Value::Null) => return Ok(Vec::new()),
        Some(Value::Array(tools)) => tools,
        Some(_) => return Err("tools must be an array".into()),
    };
    tools
        .iter()
        .enumerate()
        .map(|(i, t)| {
            let name = t
                .pointer("/function/name")
                .and_then(Value::as_str)
                .filter(|n| !n.is_empty())
                .ok_or(format!("tools[{i}].function.name is required"))?;
            Ok(MockTool {
                name: name.to_owned(),
                parameters: t
                    .pointer("/function/parameters")
                    .cloned()
                    .unwrap_or(Value::Null),
            })
        })
        .collect()
}

fn read_choice(choice: Option<&Value>) -> Result<MockChoice, String> {
    match choice {
        None | Some(Value::Null) => Ok(MockChoice::Auto),
        Some(Value::String(s)) => match s.as_str() {
            "auto" => Ok(MockChoice::Auto),
            "none" => Ok(MockChoice::None),
            "required" => Ok(MockChoice::Required),
            other => Err(format!("tool_choice: unknown value {other:?}")),
        },
        Some(c) => c
            .pointer("/function/name")
            .and_then(Value::as_str)
            .filter(|_| c.get("type").and_then(Value::as_str) == Some("function"))
            .map(|n| MockChoice::Named(n.to_owned()))
            .ok_or("tool_choice: expected {\"type\":\"function\",\"function\":{\"name\"}}".into()),
    }
}

fn read_format(format: Option<&Value>, req: &mut MockRequest) -> Result<(), String> {
    let Some(format) = format.filter(|f| !f.is_null()) else {
        return Ok(());
    };
    match format.get("type").and_then(Value::as_str) {
        Some("text") => {}
        Some("json_object") => req.json_object = true,
        Some("json_schema") => {
            let spec = format
                .get("json_schema")
                .filter(|s| s.is_object())
                .ok_or("response_format.json_schema is required")?;
            req.json_schema = Some(spec.get("schema").cloned().unwrap_or(Value::Null));
        }
        other => {
            return Err(format!(
                "response_format.type: unknown value {:?}",
                other.unwrap_or("")
            ))
        }
    }
    Ok(())
}

/// The `chat.completion` answer.
pub(super) fn answer(plan: &Plan, model: &str) -> Value {
    let mut message = json!({"role": "assistant", "content": plan.text()});
    if !plan.tool_calls.is_empty() {
        if plan.chunks.is_empty() {
            message["content"] = Value::Null;
        }
        message["tool_calls"] = plan
            .tool_calls
            .iter()
            .map(|c| {
                json!({"id": c.id, "type": "function",
                            "function": {"name": c.name, "arguments": c.arguments}})
            })
            .collect();
    }
    json!({
        "id": "chatcmpl-mock", "object": "chat.completion", "created": 0, "model": model,
        "choices": [{"index": 0, "message": message, "finish_reason": plan.finish_reason}],
        "usage": usage(plan),
    })
}

fn usage(plan: &Plan) -> Value {
    json!({
        "prompt_tokens": plan.prompt_tokens,
        "completion_tokens": plan.completion_tokens,
        "total_tokens": plan.prompt_tokens + plan.completion_tokens,
    })
}

/// SSE events; the i-th content chunk is at index i + [`OPENING`]. Tool calls follow: for each,
/// one event naming it, then its arguments in fragments.
pub(super) fn events(plan: &Plan, model: &str, include_usage: bool) -> Vec<String> {
    let chunk = |delta: Value, finish: Option<&str>| {
        json!({"id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": 0, "model": model,
               "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})
    };
    let opening = if plan.chunks.is_empty() && !plan.tool_calls.is_empty() {
        json!({"role": "assistant", "content": null})
    } else {
        json!({"role": "assistant", "content": ""})
    };
    let mut events = vec![data(&chunk(opening, None))];
    events.extend(
        plan.chunks
            .iter()
            .map(|c| data(&chunk(json!({"content": c}), None))),
    );
    for (i, call) in plan.tool_calls.iter().enumerate() {
        let head = json!({"tool_calls": [{"index": i, "id": call.id, "type": "function",
                                          "function": {"name": call.name, "arguments": ""}}]});
        events.push(data(&chunk(head, None)));
        events.extend(
            fragments(&call.arguments, ARGUMENT_FRAGMENT_CHARS)
                .into_iter()
                .map(|frag| {
                    let delta =
                        json!({"tool_calls": [{"index": i, "function": {"arguments": frag}}]});
                    data(&chunk(delta, None))
                }),
        );
    }
    events.push(data(&chunk(json!({}), Some(plan.finish_reason))));
    if include_usage {
        let u = json!({"id": "chatcmpl-mock", "object": "chat.completion.chunk", "created": 0, "model": model,
                       "choices": [], "usage": usage(plan)});
        events.push(data(&u));
    }
    events.push("data: [DONE]\n\n".into());
    events
}

fn data(v: &Value) -> String {
    format!("data: {v}\n\n")
}

#[cfg(test)]
#[path = "openai_tests.rs"]
mod tests;
