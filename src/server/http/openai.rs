//! The OpenAI-compatible surface: `GET /v1/models` and stateless `POST /v1/chat/completions`
//! (JSON, or SSE chunks ending in `data: [DONE]`, with a usage chunk when asked), shaped so the
//! official SDKs work unchanged against `http://HOST/v1`. The request is decoded into domain
//! terms, prepared (guard, redact, count, admit, cache scope) and handed to the generation core;
//! this file only translates its events and outcome back into the wire format.

use crate::tenant::Principal;
use std::sync::Arc;

use actix_web::{web, HttpResponse};
use bytes::{BufMut, BytesMut};
use serde_json::{json, Value};

use super::stateless::{failure, prepare, tier_header, with_tier, Piece, Running};
use crate::domain::{FinishReason, Usage};
use crate::error::ApiError;
use crate::generation::{Event, Outcome};
use crate::ids::unix_now;
use crate::provider::ChatRequest;
use crate::server::auth::Client;
use crate::server::{sse, AppState};
use crate::wire::openai::{
    AssistantMessage, ChatCompletion, ChatCompletionRequest, Choice, ChunkDelta, ToolCallChunk,
};

pub async fn models(Client(p): Client, state: web::Data<AppState>) -> HttpResponse {
    let data: Vec<Value> = state
        .router()
        .route_names()
        .into_iter()
        .filter(|m| p.may_use(m))
        .map(|m| json!({"id": m, "object": "model", "created": 0, "owned_by": "parley"}))
        .collect();
    HttpResponse::Ok().json(json!({"object": "list", "data": data}))
}

pub async fn chat_completions(
    Client(p): Client,
    state: web::Data<AppState>,
    req: actix_web::HttpRequest,
    body: web::Json<ChatCompletionRequest>,
) -> Result<HttpResponse, ApiError> {
    let tier = tier_header(&req)?;
    answer(&state, p, body.into_inner(), tier.as_deref()).await
}

/// A chat completion answered whole (`stream` is ignored), as an async job runs it.
///
/// # Errors
/// As `POST /v1/chat/completions`.
pub async fn completion(
    state: &AppState,
    p: Principal,
    mut body: ChatCompletionRequest,
) -> Result<serde_json::Value, ApiError> {
    body.stream = false;
    let (run, reply) = start(state, p, &mut body, None)?;
    serde_json::to_value(complete(run, reply).await?.0).map_err(|_| ApiError::internal())
}

async fn answer(
    state: &AppState,
    p: Principal,
    mut body: ChatCompletionRequest,
    tier: Option<&str>,
) -> Result<HttpResponse, ApiError> {
    let (run, reply) = start(state, p, &mut body, tier)?;
    if body.stream {
        let include_usage = body.stream_options.is_some_and(|o| o.include_usage);
        stream_reply(run, reply, include_usage).await
    } else {
        let (body, tier) = complete(run, reply).await?;
        Ok(with_tier(HttpResponse::Ok().json(body), tier.as_deref()))
    }
}

/// Checks and admits the request and starts its generation.
fn start(
    state: &AppState,
    p: Principal,
    body: &mut ChatCompletionRequest,
    tier: Option<&str>,
) -> Result<(Running, Reply), ApiError> {
    let decoded = body.decode().map_err(ApiError::bad_request)?;
    let chat = ChatRequest {
        model: String::new(),
        messages: decoded.messages,
        max_tokens: decoded.max_tokens,
        temperature: decoded.temperature,
        tools: decoded.tools,
        tool_choice: decoded.tool_choice,
        params: Box::new(decoded.params),
        whole: !body.stream,
    };
    let logprobs = chat.params.logprobs == Some(true);
    let deps = state.registry.deps();
    let request = prepare(deps, p, &body.model, chat, tier)?;
    let run = Running::start(Arc::clone(deps), request);
    let reply = Reply {
        id: format!("chatcmpl-{}", uuid::Uuid::new_v4().simple()),
        created: unix_now(),
        logprobs,
    };
    Ok((run, reply))
}

/// What every answer of one request shares.
struct Reply {
    id: String,
    created: i64,
    logprobs: bool,
}

impl Reply {
    /// The SSE framing and JSON of a text chunk up to its text: rendered once per answer.
    fn text_head(&self, model: &str) -> String {
        let mut head = BytesMut::new();
        self.put_chunk(&mut head, model, &ChunkDelta::default(), None, None);
        // `data: {…"delta":{},"finish_reason":null}]}\n\n` → `data: {…"delta":{"content":`
        let cut = find(&head, b"{},\"finish_reason\"").unwrap_or(head.len());
        head.truncate(cut);
        let mut head = String::from_utf8_lossy(&head).into_owned();
        head.push_str("{\"content\":");
        head
    }

    /// Writes one `chat.completion.chunk` event with one choice into `buf`: the bytes
    /// [`ChatCompletionChunk`](crate::wire::openai::ChatCompletionChunk) serialises to, written
    /// from borrowed parts.
    fn put_chunk(
        &self,
        buf: &mut BytesMut,
        model: &str,
        delta: &ChunkDelta,
        finish: Option<FinishReason>,
        logprobs: Option<Value>,
    ) {
        let choice = ChoiceOut {
            index: 0,
            delta,
            finish_reason: finish.map(FinishReason::as_str),
            logprobs,
        };
        put_event(
            buf,
            &self.chunk_out(model, std::slice::from_ref(&choice), None),
        );
    }

    fn chunk_out<'a>(
        &'a self,
        model: &'a str,
        choices: &'a [ChoiceOut<'a>],
        usage: Option<Usage>,
    ) -> ChunkOut<'a> {
        ChunkOut {
            id: &self.id,
            object: "chat.completion.chunk",
            created: self.created,
            model,
            choices,
            usage,
        }
    }
}

/// A [`ChatCompletionChunk`](crate::wire::openai::ChatCompletionChunk) as parts borrowed from
/// the answer in progress: serialised to the same bytes, field for field, without cloning the
/// id and model into every chunk.
#[derive(serde::Serialize)]
struct ChunkOut<'a> {
    id: &'a str,
    object: &'static str,
    created: i64,
    model: &'a str,
    choices: &'a [ChoiceOut<'a>],
    #[serde(skip_serializing_if = "Option::is_none")]
    usage: Option<Usage>,
}

/// A [`ChunkChoice`](crate::wire::openai::ChunkChoice) as [`ChunkOut`] writes it.
#[derive(serde::Serialize)]
struct ChoiceOut<'a> {
    index: u32,
    delta: &'a ChunkDelta,
    finish_reason: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    logprobs: Option<Value>,
}

/// Writes `v` into `buf` as one SSE event of one `data:` line.
fn put_event(buf: &mut BytesMut, v: &impl serde::Serialize) {
    buf.extend_from_slice(b"data: ");
    // Structs of strings, numbers and JSON values (string keys only), written into memory:
    // this cannot fail.
    let _ = serde_json::to_writer((&mut *buf).writer(), v);
    buf.extend_from_slice(b"\n\n");
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).rposition(|w| w == needle)
}

/// The whole answer, and the tier that wrote it on a semantic route.
async fn complete(
    mut run: Running,
    reply: Reply,
) -> Result<(ChatCompletion, Option<String>), ApiError> {
    let mut out = loop {
        if let Piece::Done(out) = run.next().await {
            break *out;
        }
    };
    if let Some(err) = failure(&mut out) {
        return Err(err);
    }
    let body = ChatCompletion {
        id: reply.id,
        object: "chat.completion".into(),
        created: reply.created,
        model: out.model,
        choices: vec![Choice {
            index: 0,
            message: AssistantMessage::new(out.text, &out.tool_calls),
            finish_reason: out.finish,
            logprobs: reply.logprobs.then(|| json!({"content": out.logprobs})),
        }],
        usage: out.usage,
    };
    Ok((body, out.tier.map(|t| t.name)))
}

/// The SSE answer: a role chunk, content and tool-call chunks, a finish chunk, the usage chunk
/// when asked, then `[DONE]`; a failure mid-stream is sent as an error event. A failure before
/// anything streamed is answered with its HTTP status instead, as a non-streaming request is.
async fn stream_reply(
    mut run: Running,
    reply: Reply,
    include_usage: bool,
) -> Result<HttpResponse, ApiError> {
    let (model, tier) = match run.next().await {
        Piece::Event(Event::Started { model, tier, .. }) => (model, tier),
        Piece::Done(mut out) => {
            // Nothing streamed yet: a failure is answered with its status.
            if let Some(err) = failure(&mut out) {
                return Err(err);
            }
            (out.model, out.tier.map(|t| t.name))
        }
        Piece::Event(_) => (String::new(), None),
    };
    let text_head = reply.text_head(&model);
    let out = SseReply {
        reply,
        model,
        text_head,
        logprobs: Vec::new(),
        include_usage,
        opened: false,
    };
    let body = run.body(out, |s, piece, buf| {
        if !s.opened {
            // The role chunk leaves with the first piece.
            let opening = ChunkDelta {
                role: Some("assistant".into()),
                content: Some(String::new()),
                tool_calls: None,
            };
            s.reply.put_chunk(buf, &s.model, &opening, None, None);
            s.opened = true;
        }
        match piece {
            Piece::Event(e) => {
                s.put_event(e, buf);
                false
            }
            Piece::Done(out) => {
                s.put_end(*out, buf);
                true
            }
        }
    });
    Ok(with_tier(sse::response(body), tier.as_deref()))
}

/// A streaming answer in progress.
struct SseReply {
    reply: Reply,
    model: String,
    /// The part of a text chunk before its text (see [`Reply::text_head`]).
    text_head: String,
    /// Log probabilities waiting for the text they belong to.
    logprobs: Vec<Value>,
    include_usage: bool,
    /// The role chunk has been written.
    opened: bool,
}

impl SseReply {
    /// Writes the chunk of one event, if it makes one.
    fn put_event(&mut self, e: Event, buf: &mut BytesMut) {
        let delta = match e {
            Event::Text(text) if self.logprobs.is_empty() => {
                return put_text(buf, &self.text_head, &text)
            }
            Event::Text(text) => ChunkDelta {
                content: Some(text),
                ..ChunkDelta::default()
            },
            Event::ToolCall(d) => ChunkDelta {
                tool_calls: Some(vec![ToolCallChunk::from(&d)]),
                ..ChunkDelta::default()
            },
            Event::Logprobs(items) => {
                self.logprobs.extend(items);
                return;
            }
            Event::Started { .. } | Event::Switched { .. } => return,
        };
        let logprobs = (self.reply.logprobs && !self.logprobs.is_empty())
            .then(|| json!({"content": std::mem::take(&mut self.logprobs)}));
        self.reply
            .put_chunk(buf, &self.model, &delta, None, logprobs);
    }

    /// Writes the end: the finish chunk, the usage chunk when asked and `[DONE]`, or the
    /// error event of a failure.
    fn put_end(&self, mut out: Outcome, buf: &mut BytesMut) {
        if let Some(err) = failure(&mut out) {
            put_event(buf, &err.body());
            return;
        }
        self.reply.put_chunk(
            buf,
            &out.model,
            &ChunkDelta::default(),
            Some(out.finish),
            None,
        );
        if self.include_usage {
            put_event(buf, &self.reply.chunk_out(&out.model, &[], Some(out.usage)));
        }
        buf.extend_from_slice(b"data: [DONE]\n\n");
    }
}

/// Writes a text chunk from its rendered head: the text escaped, then the chunk's closing
/// bytes.
fn put_text(buf: &mut BytesMut, head: &str, text: &str) {
    const TAIL: &str = "},\"finish_reason\":null}]}\n\n";
    buf.reserve(head.len() + text.len() + TAIL.len() + 8);
    buf.extend_from_slice(head.as_bytes());
    // Escaping a string into memory cannot fail.
    let _ = serde_json::to_writer((&mut *buf).writer(), text);
    buf.extend_from_slice(TAIL.as_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::openai::{ChatCompletionChunk, ChunkChoice};

    /// The chunk as the wire type serialises it, framed as one event.
    fn via_struct(
        reply: &Reply,
        model: &str,
        delta: Option<ChunkDelta>,
        finish: Option<FinishReason>,
        usage: Option<Usage>,
        logprobs: Option<Value>,
    ) -> String {
        let chunk = ChatCompletionChunk {
            id: reply.id.clone(),
            object: "chat.completion.chunk".into(),
            created: reply.created,
            model: model.into(),
            choices: delta
                .map(|delta| ChunkChoice {
                    index: 0,
                    delta,
                    finish_reason: finish.map(|f| f.as_str().to_owned()),
                    logprobs,
                })
                .into_iter()
                .collect(),
            usage,
            error: None,
        };
        format!("data: {}\n\n", serde_json::to_string(&chunk).unwrap()) // ok: test code
    }

    fn written(f: impl FnOnce(&mut BytesMut)) -> String {
        let mut buf = BytesMut::new();
        f(&mut buf);
        String::from_utf8(buf.to_vec()).unwrap() // ok: test code
    }

    #[test]
    fn written_chunks_are_the_chunk_struct_serialised() {
        let reply = Reply {
            id: "chatcmpl-1".into(),
            created: 1_700_000_000,
            logprobs: false,
        };
        for model in ["gpt-4o-mini", "we\"ird/mödel\\"] {
            let head = reply.text_head(model);
            for text in [
                "hello ",
                "",
                "quote \" slash \\ newline \n tab \t",
                "ünï 😀 \u{1}",
            ] {
                let delta = ChunkDelta {
                    content: Some(text.into()),
                    ..ChunkDelta::default()
                };
                let expected = via_struct(&reply, model, Some(delta.clone()), None, None, None);
                assert_eq!(
                    written(|b| put_text(b, &head, text)),
                    expected,
                    "{model:?} {text:?}"
                );
                assert_eq!(
                    written(|b| reply.put_chunk(b, model, &delta, None, None)),
                    expected
                );
            }
            let opening = ChunkDelta {
                role: Some("assistant".into()),
                content: Some(String::new()),
                tool_calls: None,
            };
            assert_eq!(
                written(|b| reply.put_chunk(b, model, &opening, None, None)),
                via_struct(&reply, model, Some(opening.clone()), None, None, None)
            );
            let finish = Some(FinishReason::Length);
            let empty = ChunkDelta::default();
            assert_eq!(
                written(|b| reply.put_chunk(b, model, &empty, finish, None)),
                via_struct(&reply, model, Some(empty), finish, None, None)
            );
            let call = ChunkDelta {
                tool_calls: Some(vec![ToolCallChunk {
                    index: 0,
                    id: Some("call_1".into()),
                    kind: Some("function".into()),
                    function: crate::wire::openai::FunctionChunk {
                        name: Some("weather".into()),
                        arguments: Some("{\"city\":".into()),
                    },
                }]),
                ..ChunkDelta::default()
            };
            assert_eq!(
                written(|b| reply.put_chunk(b, model, &call, None, None)),
                via_struct(&reply, model, Some(call.clone()), None, None, None)
            );
            let text = ChunkDelta {
                content: Some("hi".into()),
                ..ChunkDelta::default()
            };
            let logprobs =
                json!({"content": [{"token": "hi", "logprob": -0.5, "bytes": [104, 105]}]});
            assert_eq!(
                written(|b| reply.put_chunk(b, model, &text, None, Some(logprobs.clone()))),
                via_struct(&reply, model, Some(text), None, None, Some(logprobs))
            );
            let usage = Usage::new(12, 8);
            assert_eq!(
                written(|b| put_event(b, &reply.chunk_out(model, &[], Some(usage)))),
                via_struct(&reply, model, None, None, Some(usage), None)
            );
        }
    }
}
