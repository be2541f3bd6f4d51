//! The OpenAI-compatible surface: `GET /v1/models` and stateless `POST /v1/chat/completions`
//! (JSON, or SSE chunks ending in `data: [DONE]`, with a usage chunk when asked), shaped so the
//! official SDKs work unchanged against `http://HOST/v1`. The request is decoded into domain
//! terms, prepared (guard, redact, count, admit, cache scope) and handed to the generation core;
//! this file only translates its events and outcome back into the wire format.

use std::sync::Arc;

use actix_web::{web, HttpResponse};
use futures_util::{stream, StreamExt};
use serde_json::{json, Value};
use tokio::sync::mpsc;
use tokio_util::sync::{CancellationToken, DropGuard};

use crate::cache::ScopeParts;
use crate::domain::{FinishReason, Role};
use crate::error::{ApiError, ErrorCode};
use crate::generation::{self, CacheSlot, Deps, Event, Outcome, Request, Sink};
use crate::guard::pii::{PiiMode, Vault};
use crate::ids::unix_now;
use crate::provider::ChatRequest;
use crate::server::auth::Client;
use crate::server::{sse, AppState};
use crate::tenant::{Bill, Principal};
use crate::tokens;
use crate::wire::openai::{
    AssistantMessage, ChatCompletion, ChatCompletionChunk, ChatCompletionRequest, Choice,
    ChunkChoice, ChunkDelta, ToolCallChunk,
};

/// Events buffered between the generation and a slow HTTP client.
const EVENT_BUFFER: usize = 64;

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
    body: web::Json<ChatCompletionRequest>,
) -> Result<HttpResponse, ApiError> {
    let mut body = body.into_inner();
    let decoded = body.decode().map_err(ApiError::bad_request)?;
    let chat = ChatRequest {
        model: String::new(),
        messages: decoded.messages,
        max_tokens: decoded.max_tokens,
        temperature: decoded.temperature,
        tools: decoded.tools,
        tool_choice: decoded.tool_choice,
        params: decoded.params,
    };
    let logprobs = chat.params.logprobs == Some(true);
    let deps = state.registry.deps();
    let request = prepare(deps, p, &body.model, chat)?;
    let run = Running::start(Arc::clone(deps), request);
    let reply = Reply {
        id: format!("chatcmpl-{}", uuid::Uuid::new_v4().simple()),
        created: unix_now(),
        logprobs,
    };
    if body.stream {
        let include_usage = body.stream_options.is_some_and(|o| o.include_usage);
        stream_reply(run, reply, include_usage).await
    } else {
        complete(run, reply).await
    }
}

/// Admission, guards and the cache scope of a stateless request: the steps before the core.
fn prepare(
    deps: &Deps,
    p: Principal,
    route: &str,
    mut chat: ChatRequest,
) -> Result<Request, ApiError> {
    if !deps.router.has_route(route) {
        return Err(ApiError::new(
            ErrorCode::ModelNotFound,
            format!("model {route:?} does not exist"),
        ));
    }
    p.check_model(route)?;
    deps.router.check_request(route, &mut chat)?;
    deps.router.check_regions(route, p.regions())?;
    let texts: Vec<String> = chat.messages.iter().map(|m| m.content.text()).collect();
    // Injections are looked for in the newest user message; personal data everywhere.
    let newest_user = chat
        .messages
        .iter()
        .rposition(|m| m.role == Role::User)
        .unwrap_or(0);
    let screened = generation::screen(
        deps,
        route,
        &p,
        &texts[newest_user],
        texts.iter().map(String::as_str),
    )?;
    let vault = match screened.pii {
        PiiMode::Redact => {
            let mut vault = Vault::default();
            // Every message comes from the client here, system messages included.
            for m in &mut chat.messages {
                m.content.map_text(|t| vault.redact(t).0);
            }
            (!vault.is_empty()).then_some(vault)
        }
        PiiMode::Off | PiiMode::Block => None,
    };
    let encoding = deps.router.encoding(route);
    let prompt_tokens = tokens::request_tokens(encoding, &chat.messages, &chat.tools);
    let price_model = deps.router.primary_model(route).unwrap_or(route).to_owned();
    let reservation = deps
        .governor
        .admit(&p, &price_model, prompt_tokens, chat.max_tokens)?;
    let cacheable = vault.is_none()
        && chat.is_plain()
        && chat.messages.last().is_some_and(|last| {
            last.role == Role::User
                && deps.cache.admits(
                    &p,
                    deps.router.caches(route),
                    &last.content.text(),
                    !screened.flags.is_empty(),
                )
        });
    let cache = cacheable.then(|| cache_slot(deps, &p, route, &chat));
    Ok(Request {
        route: route.to_owned(),
        bill: Some(Bill::new(Arc::clone(&deps.governor), reservation)),
        principal: p,
        chat,
        prompt_tokens,
        encoding,
        vault,
        system: None,
        cache,
        conversation: None,
        trimmed_tokens: 0,
        begun: std::time::Instant::now(),
    })
}

/// The cache scope of a stateless request: a leading system message is the system prompt, the
/// messages between it and the last are the context, so a conversation's first turn and the same
/// stateless request share entries.
fn cache_slot(deps: &Deps, p: &Principal, route: &str, chat: &ChatRequest) -> CacheSlot {
    let texts: Vec<(&'static str, String)> = chat
        .messages
        .iter()
        .map(|m| (m.role.as_str(), m.content.text()))
        .collect();
    let (question, before) = match texts.split_last() {
        Some((last, before)) => (last.1.clone(), before),
        None => (String::new(), &texts[..]),
    };
    let (system, context) = match before.split_first() {
        Some((first, rest)) if first.0 == "system" => (Some(first.1.as_str()), rest),
        _ => (None, before),
    };
    let context: Vec<(&str, &str)> = context.iter().map(|(r, c)| (*r, c.as_str())).collect();
    let key = deps.cache.scope_key(&ScopeParts {
        tenant: p.tenant.as_str(),
        route,
        system,
        prompt_version: None,
        context: &context,
        temperature: chat.temperature,
    });
    CacheSlot {
        key,
        question,
        vector: None,
    }
}

/// What the generation task sends the response: its events, then its outcome.
enum Piece {
    Event(Event),
    Done(Box<Outcome>),
}

struct ChannelSink(mpsc::Sender<Piece>);

impl Sink for ChannelSink {
    async fn emit(&mut self, event: Event) {
        // A client that left is noticed through the cancel token; what it missed is lost with it.
        let _ = self.0.send(Piece::Event(event)).await;
    }
}

/// A generation running on its own task. Dropping it (the client went away) cancels the
/// generation, which still settles what it used.
struct Running {
    rx: mpsc::Receiver<Piece>,
    _cancel: DropGuard,
}

impl Running {
    fn start(deps: Arc<Deps>, request: Request) -> Self {
        let (tx, rx) = mpsc::channel(EVENT_BUFFER);
        let cancel = CancellationToken::new();
        let token = cancel.clone();
        let tracker = deps.tasks.clone();
        tracker.spawn(async move {
            let mut sink = ChannelSink(tx);
            let out = generation::run(&deps, request, &mut sink, &token).await;
            let _ = sink.0.send(Piece::Done(Box::new(out))).await;
        });
        Self {
            rx,
            _cancel: cancel.drop_guard(),
        }
    }

    async fn next(&mut self) -> Piece {
        self.rx
            .recv()
            .await
            .unwrap_or_else(|| Piece::Done(Box::new(lost())))
    }
}

/// The outcome of a generation task that ended without one (it panicked).
fn lost() -> Outcome {
    Outcome {
        finish: FinishReason::Error,
        text: String::new(),
        tool_calls: Vec::new(),
        usage: crate::domain::Usage::default(),
        cached: false,
        provider: String::new(),
        model: String::new(),
        ttft: None,
        error: Some(ApiError::new(ErrorCode::Internal, "the generation failed")),
        flags: Vec::new(),
        completion_tokens: 0,
        logprobs: Vec::new(),
    }
}

/// What every answer of one request shares.
struct Reply {
    id: String,
    created: i64,
    logprobs: bool,
}

impl Reply {
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

/// The error a failed outcome answers: after part of a reply, `upstream_interrupted`.
fn failure(out: &mut Outcome) -> Option<ApiError> {
    let mut err = out.error.take()?;
    if !out.text.is_empty() || !out.tool_calls.is_empty() {
        err.code = ErrorCode::UpstreamInterrupted;
    }
    Some(err)
}

async fn complete(mut run: Running, reply: Reply) -> Result<HttpResponse, ApiError> {
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
    Ok(HttpResponse::Ok().json(body))
}

/// The SSE answer: a role chunk, content and tool-call chunks, a finish chunk, the usage chunk
/// when asked, then `[DONE]`; a failure mid-stream is sent as an error event. A failure before
/// anything streamed is answered with its HTTP status instead, as a non-streaming request is.
async fn stream_reply(
    mut run: Running,
    reply: Reply,
    include_usage: bool,
) -> Result<HttpResponse, ApiError> {
    let model = match run.next().await {
        Piece::Event(Event::Started { model, .. }) => model,
        Piece::Done(mut out) => {
            // Nothing streamed yet: a failure is answered with its status.
            if let Some(err) = failure(&mut out) {
                return Err(err);
            }
            out.model
        }
        Piece::Event(_) => String::new(),
    };
    let out = SseReply {
        run,
        reply,
        model,
        logprobs: Vec::new(),
        include_usage,
        ended: false,
    };
    let opening = out.chunk(ChunkDelta {
        role: Some("assistant".into()),
        content: Some(String::new()),
        tool_calls: None,
    });
    let body = stream::unfold(out, |mut s| async move {
        if s.ended {
            return None;
        }
        let bytes = match s.run.next().await {
            Piece::Event(e) => s.event_bytes(e),
            Piece::Done(out) => {
                s.ended = true;
                s.end_bytes(*out)
            }
        };
        Some((Ok::<_, actix_web::Error>(bytes), s))
    });
    Ok(sse::response(
        stream::once(async move { Ok(opening) }).chain(body),
    ))
}

/// A streaming answer in progress.
struct SseReply {
    run: Running,
    reply: Reply,
    model: String,
    /// Log probabilities waiting for the text they belong to.
    logprobs: Vec<Value>,
    include_usage: bool,
    ended: bool,
}

impl SseReply {
    fn chunk(&self, delta: ChunkDelta) -> bytes::Bytes {
        let chunk = self.reply.chunk(&self.model, delta, None);
        sse::event(None, &to_json(&chunk))
    }

    fn event_bytes(&mut self, e: Event) -> bytes::Bytes {
        let delta = match e {
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

fn to_json(v: &impl serde::Serialize) -> String {
    // Plain structs of strings and numbers: serialising them cannot fail.
    serde_json::to_string(v).unwrap_or_default()
}
