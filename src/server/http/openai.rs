//! The OpenAI-compatible surface: `GET /v1/models` and stateless `POST /v1/chat/completions`
//! (JSON, or SSE chunks ending in `data: [DONE]`, with a usage chunk when asked), shaped so the
//! official SDKs work unchanged against `http://HOST/v1`. The request is decoded into domain
//! terms, prepared (guard, redact, count, admit, cache scope) and handed to the generation core;
//! this file only translates its events and outcome back into the wire format.

use crate::tenant::Principal;
use std::sync::Arc;

use actix_web::{web, HttpResponse};
use serde_json::{json, Value};

use super::stateless::{failure, prepare, tier_header, with_tier, Piece, Running};
use crate::domain::FinishReason;
use crate::error::ApiError;
use crate::generation::{Event, Outcome};
use crate::ids::unix_now;
use crate::provider::ChatRequest;
use crate::server::auth::Client;
use crate::server::{sse, AppState};
use crate::wire::openai::{
    AssistantMessage, ChatCompletion, ChatCompletionChunk, ChatCompletionRequest, Choice,
    ChunkChoice, ChunkDelta, ToolCallChunk,
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
        let mut head = to_json(&self.chunk(model, ChunkDelta::default(), None));
        // `…"delta":{},"finish_reason":null}]}` → `…"delta":{"content":`
        let cut = head.rfind("{},\"finish_reason\"").unwrap_or(head.len());
        head.truncate(cut);
        format!("data: {head}{{\"content\":")
    }

    fn chunk(
        &self,
        model: &str,
        delta: ChunkDelta,
        finish: Option<FinishReason>,
    ) -> ChatCompletionChunk {
        ChatCompletionChunk {
            id: self.id.clone(),
            object: "chat.completion.chunk".into(),
            created: self.created,
            model: model.to_owned(),
            choices: vec![ChunkChoice {
                index: 0,
                delta,
                finish_reason: finish.map(|f| f.as_str().to_owned()),
                logprobs: None,
            }],
            usage: None,
            error: None,
        }
    }
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
    };
    let opening = out.chunk(ChunkDelta {
        role: Some("assistant".into()),
        content: Some(String::new()),
        tool_calls: None,
    });
    let mut started = false;
    let body = run.body(out, move |s, piece, buf| {
        if !started {
            // The role chunk leaves with the first piece.
            buf.extend_from_slice(&opening);
            started = true;
        }
        match piece {
            Piece::Event(e) => {
                buf.extend_from_slice(&s.event_bytes(e));
                false
            }
            Piece::Done(out) => {
                buf.extend_from_slice(&s.end_bytes(*out));
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
}

impl SseReply {
    fn chunk(&self, delta: ChunkDelta) -> bytes::Bytes {
        let chunk = self.reply.chunk(&self.model, delta, None);
        sse::event(None, &to_json(&chunk))
    }

    fn event_bytes(&mut self, e: Event) -> bytes::Bytes {
        let delta = match e {
            Event::Text(text) if self.logprobs.is_empty() => return self.text_chunk(&text),
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
                return bytes::Bytes::new();
            }
            Event::Started { .. } | Event::Switched { .. } => return bytes::Bytes::new(),
        };
        let mut chunk = self.reply.chunk(&self.model, delta, None);
        if self.reply.logprobs && !self.logprobs.is_empty() {
            if let Some(c) = chunk.choices.first_mut() {
                c.logprobs = Some(json!({"content": std::mem::take(&mut self.logprobs)}));
            }
        }
        sse::event(None, &to_json(&chunk))
    }

    /// A chunk of text alone, the most frequent event: the text escaped into the chunk's
    /// rendered head and tail, the same bytes the chunk struct would serialise to.
    fn text_chunk(&self, text: &str) -> bytes::Bytes {
        render_text(&self.text_head, text)
    }

    fn end_bytes(&self, mut out: Outcome) -> bytes::Bytes {
        if let Some(err) = failure(&mut out) {
            return sse::event(None, &err.body().to_string());
        }
        let mut bytes = Vec::new();
        let finish = self
            .reply
            .chunk(&out.model, ChunkDelta::default(), Some(out.finish));
        bytes.extend_from_slice(&sse::event(None, &to_json(&finish)));
        if self.include_usage {
            let mut usage = self.reply.chunk(&out.model, ChunkDelta::default(), None);
            usage.choices.clear();
            usage.usage = Some(out.usage);
            bytes.extend_from_slice(&sse::event(None, &to_json(&usage)));
        }
        bytes.extend_from_slice(&sse::event(None, "[DONE]"));
        bytes::Bytes::from(bytes)
    }
}

/// A text chunk from its rendered head: the text escaped, then the chunk's closing bytes.
fn render_text(head: &str, text: &str) -> bytes::Bytes {
    const TAIL: &str = "},\"finish_reason\":null}]}\n\n";
    let mut out = Vec::with_capacity(head.len() + text.len() + TAIL.len() + 8);
    out.extend_from_slice(head.as_bytes());
    // Escaping a string into a Vec cannot fail.
    let _ = serde_json::to_writer(&mut out, text);
    out.extend_from_slice(TAIL.as_bytes());
    bytes::Bytes::from(out)
}

fn to_json(v: &impl serde::Serialize) -> String {
    // Plain structs of strings and numbers: serialising them cannot fail.
    serde_json::to_string(v).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rendered_text_chunk_is_the_chunk_struct_serialised() {
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
                let rendered = render_text(&head, text);
                let via_struct = sse::event(
                    None,
                    &to_json(&reply.chunk(
                        model,
                        ChunkDelta {
                            content: Some(text.into()),
                            ..ChunkDelta::default()
                        },
                        None,
                    )),
                );
                assert_eq!(rendered, via_struct, "{model:?} {text:?}");
            }
        }
    }
}
