//! The OpenAI Responses API on top of conversations (PROTOCOL §8). Every stored response is a
//! turn of a parley conversation: `previous_response_id` continues that response's conversation
//! (a response that is not the newest of its conversation forks it, as branching from it
//! would), `conversation` names one, neither starts one. The turn runs through the conversation
//! actor like any other, so history, trimming, tools, guards and subscribers all apply; this
//! file translates the request into posts and the turn's frames into Response objects and
//! typed stream events. `store: false` runs the stateless path and keeps nothing.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix_web::{web, HttpRequest, HttpResponse};
use futures_util::{stream, StreamExt};
use sha2::{Digest, Sha256};
use tokio::sync::mpsc;

use super::stateless::{self, failure, Piece, Running};
use crate::conversation::messages::{PostUserMessage, TurnOptions, TurnOverrides};
use crate::conversation::{next_sink_id, NewConversation, Outbound, Scope, ServerFrame, Sink};
use crate::domain::{FinishReason, Message, Role, ToolCall};
use crate::error::{ApiError, ErrorCode};
use crate::generation::{Deps, Event, Outcome};
use crate::ids::{unix_now, ConversationId};
use crate::provider::ChatRequest;
use crate::server::auth::Client;
use crate::server::{sse, AppState};
use crate::store::{MessageRecord, ResponseRecord, StoredError};
use crate::tenant::Principal;
use crate::tokens;
use crate::wire::responses::{
    self as wire, ConversationRef, CreateResponse, IncompleteDetails, InputItem, OutputItem,
    OutputText, Response, ResponseError, StreamEvent,
};

/// Frames buffered for one streamed response before the request is dropped as too slow.
const TURN_BUFFER: usize = 4096;
/// How long a request's fingerprint is remembered for the SDK's retries of it.
const RETRY_MEMORY: Duration = Duration::from_secs(600);
/// Fingerprints remembered at most.
const RETRY_ENTRIES: usize = 10_000;

/// Response ids of recent requests by their fingerprint, so a retry of a request that reached
/// the server (the official SDKs resend the same body with `x-stainless-retry-count`) gets the
/// same response instead of a second turn.
#[derive(Default)]
pub struct Retries {
    seen: parking_lot::Mutex<HashMap<[u8; 32], (String, Instant)>>,
}

impl Retries {
    fn remember(&self, fingerprint: [u8; 32], id: &str) {
        let mut seen = self.seen.lock();
        if seen.len() >= RETRY_ENTRIES {
            seen.retain(|_, (_, at)| at.elapsed() < RETRY_MEMORY);
        }
        if seen.len() < RETRY_ENTRIES {
            seen.insert(fingerprint, (id.to_owned(), Instant::now()));
        }
    }

    fn recall(&self, fingerprint: &[u8; 32]) -> Option<String> {
        let seen = self.seen.lock();
        let (id, at) = seen.get(fingerprint)?;
        (at.elapsed() < RETRY_MEMORY).then(|| id.clone())
    }
}

/// The response id of a request: from its `Idempotency-Key`, from an earlier attempt when the
/// SDK says this is a retry, or new.
fn response_id(state: &AppState, p: &Principal, req: &HttpRequest, body: &[u8]) -> String {
    let header = |name: &str| req.headers().get(name).and_then(|v| v.to_str().ok());
    let mut h = Sha256::new();
    h.update(p.tenant.as_str().as_bytes());
    h.update([0]);
    if let Some(key) = header("idempotency-key") {
        h.update(b"key:");
        h.update(key.as_bytes());
        return format!("resp_{}", &hex::encode(h.finalize())[..32]);
    }
    h.update(body);
    let fingerprint: [u8; 32] = h.finalize().into();
    let retry = header("x-stainless-retry-count")
        .and_then(|n| n.parse::<u32>().ok())
        .is_some_and(|n| n > 0);
    if retry {
        if let Some(id) = state.retries.recall(&fingerprint) {
            return id;
        }
    }
    let id = format!("resp_{}", uuid::Uuid::new_v4().simple());
    state.retries.remember(fingerprint, &id);
    id
}

pub async fn create(
    Client(p): Client,
    state: web::Data<AppState>,
    req: HttpRequest,
    body: web::Bytes,
) -> Result<HttpResponse, ApiError> {
    let mut create: CreateResponse = serde_json::from_slice(&body)
        .map_err(|e| ApiError::bad_request(format!("invalid JSON body: {e}")))?;
    let decoded = create.decode().map_err(ApiError::bad_request)?;
    if !state.router().has_route(&create.model) {
        return Err(ApiError::new(
            ErrorCode::ModelNotFound,
            format!("model {:?} does not exist", create.model),
        ));
    }
    p.check_model(&create.model)?;
    let mut settings = Settings::new(create, decoded);
    if !settings.store {
        return stateless_response(&state, p, settings).await;
    }
    let id = response_id(&state, &p, &req, &body);
    let existing = state.store().response(&id, &p.tenant)?;
    let (record, posts) = match existing {
        // A retry: the same posts again, which the conversation answers once.
        Some(rec) => {
            let posts = plan_posts(&mut settings, &rec.id)?;
            (rec, posts)
        }
        None => {
            let conv = conversation_for(&state, &p, &settings).await?;
            let posts = plan_posts(&mut settings, &id)?;
            check_outputs(&state, &conv, &posts)?;
            let rec = settings.record(id, &p, conv);
            state.store().put_response(&rec).await?;
            (rec, posts)
        }
    };
    let history = posts.history.len() as u64;
    let rx = post_all(&state, &p, &record, &settings, posts).await?;
    let turn = Turn {
        state: state.clone(),
        record,
        settings,
        rx,
        history,
    };
    if turn.settings.stream {
        Ok(sse::response(turn.events()))
    } else {
        turn.complete().await
    }
}

/// What the request asks of this response, besides its input.
struct Settings {
    route: String,
    items: Vec<InputItem>,
    instructions: Option<String>,
    previous: Option<String>,
    conversation: Option<String>,
    tools: Vec<crate::domain::Tool>,
    tool_choice: Option<crate::domain::ToolChoice>,
    format: Option<crate::domain::ResponseFormat>,
    max_output_tokens: Option<u32>,
    temperature: Option<f32>,
    top_p: Option<f64>,
    parallel_tool_calls: Option<bool>,
    user: Option<String>,
    metadata: serde_json::Map<String, serde_json::Value>,
    store: bool,
    stream: bool,
}

impl Settings {
    fn new(c: CreateResponse, d: wire::Decoded) -> Self {
        let conversation = c.conversation.and_then(|v| match v {
            serde_json::Value::String(s) => Some(s),
            v => v.get("id").and_then(|i| i.as_str()).map(str::to_owned),
        });
        Self {
            route: c.model,
            items: d.items,
            instructions: c.instructions,
            previous: c.previous_response_id,
            conversation,
            tools: d.tools,
            tool_choice: d.tool_choice,
            format: d.format,
            max_output_tokens: c.max_output_tokens,
            temperature: c.temperature,
            top_p: c.top_p,
            parallel_tool_calls: c.parallel_tool_calls,
            user: c.user,
            metadata: c.metadata.unwrap_or_default(),
            store: c.store != Some(false),
            stream: c.stream,
        }
    }

    /// The turn's options: this request's route, limits, tools and instructions.
    fn options(&self) -> TurnOptions {
        TurnOptions {
            model: Some(self.route.clone()),
            max_tokens: self.max_output_tokens,
            temperature: self.temperature,
            cache: None,
            turn: TurnOverrides {
                instructions: self.instructions.clone(),
                tools: Some(self.tools.clone()),
                tool_choice: self.tool_choice.clone(),
                response_format: self.format.clone(),
                top_p: self.top_p,
            },
        }
    }

    fn record(&self, id: String, p: &Principal, conversation: ConversationId) -> ResponseRecord {
        ResponseRecord {
            id,
            tenant: p.tenant.clone(),
            conversation,
            model: self.route.clone(),
            created_at: unix_now(),
            input_seqs: (0, 0),
            reply_seq: None,
            status: "in_progress".into(),
            error: None,
            usage: crate::domain::Usage::default(),
            upstream_model: String::new(),
            previous_response_id: self.previous.clone(),
            instructions: self.instructions.clone(),
            metadata: self.metadata.clone(),
            tools: self.tools.clone(),
            tool_choice: self.tool_choice.clone(),
            temperature: self.temperature,
            top_p: self.top_p,
            max_output_tokens: self.max_output_tokens,
            format: self.format.clone(),
        }
    }
}

/// What a request posts to its conversation: tool results first, then the message that runs
/// the turn, with the transcript before it.
struct Posts {
    results: Vec<Message>,
    history: Vec<Message>,
    last: Message,
}

/// Splits the input into posts. System and developer messages join the instructions; a run of
/// `function_call_output` items answers the previous response's calls; otherwise the input
/// ends with a user message and what comes before it is stored as given.
fn plan_posts(s: &mut Settings, id: &str) -> Result<Posts, ApiError> {
    let mut rest = Vec::new();
    let mut instructions: Vec<String> = s.instructions.iter().cloned().collect();
    for item in std::mem::take(&mut s.items) {
        match item {
            InputItem::Message(m) if m.role == Role::System => instructions.push(m.content.text()),
            other => rest.push(other),
        }
    }
    s.instructions = (!instructions.is_empty()).then(|| instructions.join("\n\n"));
    let results = rest
        .iter()
        .filter(|i| matches!(i, InputItem::FunctionCallOutput { .. }))
        .count();
    if results > 0 && results == rest.len() {
        let mut results: Vec<Message> = rest
            .into_iter()
            .filter_map(|i| match i {
                InputItem::FunctionCallOutput { call_id, output } => Some(Message {
                    role: Role::Tool,
                    content: crate::domain::Content::Text(output),
                    tool_call_id: Some(call_id),
                    ..Message::default()
                }),
                _ => None,
            })
            .collect();
        let last = results.pop().ok_or_else(ApiError::internal)?;
        return Ok(Posts {
            results,
            history: Vec::new(),
            last,
        });
    }
    let Some(InputItem::Message(last)) = rest.pop() else {
        return Err(ApiError::bad_request(format!(
            "input: must end with a user message, or be only function_call_output items (response {id})"
        )));
    };
    if last.role != Role::User {
        return Err(ApiError::bad_request(
            "input: the last message must be the user's",
        ));
    }
    let mut history: Vec<Message> = Vec::new();
    for item in rest {
        match item {
            InputItem::Message(m) => history.push(m),
            InputItem::FunctionCall(call) => match history.last_mut() {
                Some(prev) if prev.role == Role::Assistant => prev.tool_calls.push(call),
                _ => history.push(Message {
                    role: Role::Assistant,
                    tool_calls: vec![call],
                    ..Message::default()
                }),
            },
            InputItem::FunctionCallOutput { call_id, output } => history.push(Message {
                role: Role::Tool,
                content: crate::domain::Content::Text(output),
                tool_call_id: Some(call_id),
                ..Message::default()
            }),
        }
    }
    Ok(Posts {
        results: Vec::new(),
        history,
        last,
    })
}

/// Tool results must answer every open call of the conversation at once (otherwise nothing
/// would run and the response would have no output).
fn check_outputs(state: &AppState, conv: &ConversationId, posts: &Posts) -> Result<(), ApiError> {
    if posts.last.role != Role::Tool {
        return Ok(());
    }
    let open = crate::conversation::open_calls(state.store(), conv)?;
    let given: Vec<&str> = posts
        .results
        .iter()
        .chain([&posts.last])
        .filter_map(|m| m.tool_call_id.as_deref())
        .collect();
    if let Some(stray) = given.iter().find(|g| !open.iter().any(|o| o == *g)) {
        return Err(ApiError::bad_request(format!(
            "input: function_call_output for {stray:?}, which is not an open call"
        )));
    }
    let missing: Vec<&str> = open
        .iter()
        .map(String::as_str)
        .filter(|o| !given.contains(o))
        .collect();
    if !missing.is_empty() {
        return Err(ApiError::bad_request(format!(
            "input: function_call_output is missing for {}",
            missing.join(", ")
        )));
    }
    Ok(())
}

/// The conversation of a new response: the previous response's (forked when that response is
/// not the newest turn), the one named, or a new one.
async fn conversation_for(
    state: &AppState,
    p: &Principal,
    s: &Settings,
) -> Result<ConversationId, ApiError> {
    let store = state.store();
    if let Some(prev) = &s.previous {
        let rec = store
            .response(prev, &p.tenant)?
            .ok_or_else(|| ApiError::not_found("response"))?;
        let reply = rec.reply_seq.ok_or_else(|| {
            ApiError::bad_request(format!(
                "previous_response_id: {prev} has no reply to continue from"
            ))
        })?;
        let conv = store.owned_conversation(&rec.conversation, &p.tenant)?;
        if conv.last_seq == reply {
            return Ok(conv.id);
        }
        return fork(state, p, &conv, reply).await;
    }
    if let Some(raw) = &s.conversation {
        let id = ConversationId::parse(raw).ok_or_else(|| ApiError::not_found("conversation"))?;
        store.owned_conversation(&id, &p.tenant)?;
        return Ok(id);
    }
    let new = NewConversation {
        model: Some(s.route.clone()),
        ..NewConversation::default()
    };
    Ok(state.registry.create(&p.tenant, new).await?.id)
}

/// A new conversation with the messages of `conv` up to `upto`: continuing from a response
/// that later turns followed branches from it.
async fn fork(
    state: &AppState,
    p: &Principal,
    conv: &crate::store::ConversationRecord,
    upto: u64,
) -> Result<ConversationId, ApiError> {
    let new = NewConversation {
        model: Some(conv.model.clone()),
        system: conv.system.clone(),
        prompt: conv.prompt.clone(),
        metadata: Some(conv.metadata.clone()),
        memory: Some(conv.memory),
        tools: conv.tools.clone(),
        tool_choice: conv.tool_choice.clone(),
    };
    let fork = state.registry.create(&p.tenant, new).await?;
    let store = state.store();
    let limit = usize::try_from(upto).unwrap_or(usize::MAX);
    for m in store.messages_after(&conv.id, 0, limit)? {
        store.append_message_unflushed(&fork.id, &m)?;
    }
    store.flush().await?;
    Ok(fork.id)
}

/// Posts the tool results and the message that runs the turn; answers the turn's frames.
async fn post_all(
    state: &AppState,
    p: &Principal,
    rec: &ResponseRecord,
    s: &Settings,
    posts: Posts,
) -> Result<mpsc::Receiver<Outbound>, ApiError> {
    let live = state.registry.get(&rec.conversation, &p.tenant)?;
    let encoding = state.router().encoding(&live.model);
    let post = |client_id: String, message: Message, history: Vec<(Message, u32)>, listener| {
        let principal = p.clone();
        let options = s.options();
        async move {
            let tokens = tokens::content_tokens(encoding, &message).await;
            PostUserMessage {
                client_id,
                message,
                history,
                tokens,
                options,
                listener,
                principal,
            }
        }
    };
    for (i, m) in posts.results.into_iter().enumerate() {
        let msg = post(format!("{}/{i}", rec.id), m, Vec::new(), None).await;
        live.addr.send(msg).await??;
    }
    let mut history = Vec::with_capacity(posts.history.len());
    for m in posts.history {
        let t = tokens::message_tokens(encoding, &m).saturating_sub(tokens::MESSAGE_FRAMING_TOKENS);
        history.push((m, t));
    }
    let (tx, rx) = mpsc::channel(TURN_BUFFER);
    let listener = (
        next_sink_id(),
        Sink::Channel(tx),
        Scope::Turn(rec.id.clone()),
    );
    let msg = post(rec.id.clone(), posts.last, history, Some(listener)).await;
    live.addr.send(msg).await??;
    Ok(rx)
}

/// A stored response's turn in progress.
struct Turn {
    state: web::Data<AppState>,
    record: ResponseRecord,
    settings: Settings,
    rx: mpsc::Receiver<Outbound>,
    /// Messages stored before the one that ran the turn, as its transcript.
    history: u64,
}

impl Turn {
    /// The next frame of the turn (`None` when it ended without `done` or `error`).
    async fn next(&mut self) -> Option<std::sync::Arc<ServerFrame>> {
        match self.rx.recv().await? {
            Outbound::Frame { frame, .. } => Some(frame),
            Outbound::Close { .. } => None,
        }
    }

    /// Stores how the turn ended and answers the Response object. `ack` is the seq of the
    /// message that ran the turn, when its `ack` was seen.
    async fn settle(&mut self, end: Option<&ServerFrame>, ack: Option<u64>) -> Response {
        let store = self.state.store();
        let rec = &mut self.record;
        let mut last = ack;
        match end {
            Some(ServerFrame::Done(done)) => {
                last = Some(done.reply_to);
                rec.reply_seq = Some(done.seq);
                rec.usage = done.usage;
                rec.upstream_model.clone_from(&done.model);
                rec.status = if done.finish_reason == FinishReason::Length.as_str() {
                    "incomplete".into()
                } else {
                    "completed".into()
                };
            }
            Some(ServerFrame::Error(e)) => {
                last = e.reply_to.or(last);
                rec.status = "failed".into();
                rec.error = Some(StoredError {
                    code: e.code,
                    message: e.message.clone(),
                });
            }
            _ => {
                rec.status = "failed".into();
                rec.error = Some(StoredError {
                    code: ErrorCode::Internal,
                    message: "the turn ended without a reply".into(),
                });
            }
        }
        if let Some(last) = last {
            // Tool results came first (their client ids are the response's); otherwise the
            // transcript stored just before the message.
            let first_result = store
                .seq_for_client_id(&rec.conversation, &format!("{}/0", rec.id))
                .ok()
                .flatten();
            let first = first_result.unwrap_or(last.saturating_sub(self.history));
            rec.input_seqs = (first, last);
        }
        if let Err(e) = store.put_response(rec).await {
            tracing::error!(error = %e, response = %rec.id, "response record not stored");
        }
        let reply = rec
            .reply_seq
            .and_then(|seq| store.message(&rec.conversation, seq).ok().flatten());
        response_of(rec, reply.as_ref())
    }

    async fn complete(mut self) -> Result<HttpResponse, ApiError> {
        let mut first_seq = None;
        let end = loop {
            match self.next().await {
                Some(frame) => match &*frame {
                    ServerFrame::Ack { seq, .. } => first_seq = Some(*seq),
                    ServerFrame::Done(_) | ServerFrame::Error(_) => break Some(frame),
                    _ => {}
                },
                None => break None,
            }
        };
        let response = self.settle(end.as_deref(), first_seq).await;
        if let Some(ServerFrame::Error(e)) = end.as_deref() {
            let mut err = ApiError::new(e.code, e.message.clone());
            err.retry_after = e.retry_after_ms.map(Duration::from_millis);
            return Err(err);
        }
        Ok(HttpResponse::Ok().json(response))
    }

    /// The typed SSE events of the turn.
    fn events(self) -> impl futures_util::Stream<Item = Result<bytes::Bytes, actix_web::Error>> {
        let skeleton = response_of(&self.record, None);
        let writer = Writer::new(skeleton);
        stream::unfold(
            (self, writer, None::<u64>, false),
            |(mut turn, mut w, mut first_seq, ended)| async move {
                if ended {
                    return None;
                }
                if w.seq == 0 {
                    let bytes = w.start();
                    return Some((Ok(bytes), (turn, w, first_seq, false)));
                }
                let frame = turn.next().await;
                let bytes = match frame.as_deref() {
                    Some(ServerFrame::Ack { seq, .. }) => {
                        first_seq.get_or_insert(*seq);
                        bytes::Bytes::new()
                    }
                    Some(ServerFrame::Delta {
                        text, tool_calls, ..
                    }) => {
                        let mut out = w.text(text);
                        for c in tool_calls.iter().flatten() {
                            out.extend_from_slice(&w.call(
                                c.index as usize,
                                c.id.as_deref(),
                                c.function.name.as_deref(),
                                c.function.arguments.as_deref().unwrap_or_default(),
                            ));
                        }
                        bytes::Bytes::from(out)
                    }
                    Some(end @ (ServerFrame::Done(_) | ServerFrame::Error(_))) => {
                        let response = turn.settle(Some(end), first_seq).await;
                        return Some((Ok(w.finish(response)), (turn, w, first_seq, true)));
                    }
                    Some(_) => bytes::Bytes::new(),
                    None => {
                        let response = turn.settle(None, first_seq).await;
                        return Some((Ok(w.finish(response)), (turn, w, first_seq, true)));
                    }
                };
                Some((Ok(bytes), (turn, w, first_seq, false)))
            },
        )
    }
}

/// Item ids derive from the response's, so a stored response shows the same ids again.
fn message_item_id(response: &str) -> String {
    format!("msg_{}", response.trim_start_matches("resp_"))
}

fn call_item_id(response: &str, i: usize) -> String {
    format!("fc_{}_{i}", response.trim_start_matches("resp_"))
}

/// The output items of a reply: its text as a message, then its calls.
fn output_of(id: &str, text: &str, calls: &[ToolCall]) -> Vec<OutputItem> {
    let mut out = Vec::new();
    if !text.is_empty() {
        out.push(OutputItem::Message {
            id: message_item_id(id),
            status: "completed",
            role: "assistant",
            content: vec![OutputText::new(text.to_owned())],
        });
    }
    for (i, c) in calls.iter().enumerate() {
        out.push(OutputItem::FunctionCall {
            id: call_item_id(id, i),
            call_id: c.id.clone(),
            name: c.name.clone(),
            arguments: c.arguments.clone(),
            status: "completed",
        });
    }
    out
}

/// The Response object of a record, with its reply's output when there is one.
fn response_of(rec: &ResponseRecord, reply: Option<&MessageRecord>) -> Response {
    let status: &'static str = match rec.status.as_str() {
        "completed" => "completed",
        "incomplete" => "incomplete",
        "failed" => "failed",
        _ => "in_progress",
    };
    Response {
        id: rec.id.clone(),
        object: "response",
        created_at: rec.created_at,
        status,
        error: rec.error.as_ref().map(|e| ResponseError {
            code: e.code.as_str().to_owned(),
            message: e.message.clone(),
        }),
        incomplete_details: (status == "incomplete").then_some(IncompleteDetails {
            reason: "max_output_tokens",
        }),
        instructions: rec.instructions.clone(),
        max_output_tokens: rec.max_output_tokens,
        model: if rec.upstream_model.is_empty() {
            rec.model.clone()
        } else {
            rec.upstream_model.clone()
        },
        output: reply.map_or_else(Vec::new, |m| output_of(&rec.id, &m.content, &m.tool_calls)),
        parallel_tool_calls: true,
        previous_response_id: rec.previous_response_id.clone(),
        temperature: rec.temperature,
        top_p: rec.top_p,
        tool_choice: wire::tool_choice_json(rec.tool_choice.as_ref()),
        tools: rec.tools.iter().map(wire::tool_json).collect(),
        text: wire::TextConfig {
            format: Some(wire::format_json(rec.format.as_ref())),
        },
        truncation: "auto",
        usage: (status != "in_progress").then(|| rec.usage.into()),
        metadata: rec.metadata.clone(),
        store: true,
        conversation: Some(ConversationRef {
            id: rec.conversation.to_string(),
        }),
    }
}

/// Writes the typed events of one response as output arrives: items open when their first
/// piece comes and close when the next item starts or the response ends.
struct Writer {
    seq: u64,
    response: Response,
    /// Items closed so far.
    output: Vec<OutputItem>,
    open: Option<Open>,
}

enum Open {
    Text {
        text: String,
    },
    Call {
        index: usize,
        call_id: String,
        name: String,
        arguments: String,
    },
}

impl Writer {
    fn new(response: Response) -> Self {
        Self {
            seq: 0,
            response,
            output: Vec::new(),
            open: None,
        }
    }

    fn emit(&mut self, out: &mut Vec<u8>, event: StreamEvent) {
        let numbered = wire::Numbered {
            event: &event,
            sequence_number: self.seq,
        };
        self.seq += 1;
        let json = serde_json::to_string(&numbered).unwrap_or_default();
        out.extend_from_slice(&sse::event(Some(event.name()), &json));
    }

    fn start(&mut self) -> bytes::Bytes {
        let mut out = Vec::new();
        let r = Box::new(self.response.clone());
        self.emit(
            &mut out,
            StreamEvent::Created {
                response: r.clone(),
            },
        );
        self.emit(&mut out, StreamEvent::InProgress { response: r });
        bytes::Bytes::from(out)
    }

    fn id(&self) -> &str {
        &self.response.id
    }

    fn text(&mut self, delta: &str) -> Vec<u8> {
        let mut out = Vec::new();
        if delta.is_empty() {
            return out;
        }
        if !matches!(self.open, Some(Open::Text { .. })) {
            self.close(&mut out);
            let item = OutputItem::Message {
                id: message_item_id(self.id()),
                status: "in_progress",
                role: "assistant",
                content: Vec::new(),
            };
            let index = self.output.len();
            self.emit(
                &mut out,
                StreamEvent::OutputItemAdded {
                    output_index: index,
                    item,
                },
            );
            let item_id = message_item_id(self.id());
            self.emit(
                &mut out,
                StreamEvent::ContentPartAdded {
                    item_id,
                    output_index: index,
                    content_index: 0,
                    part: OutputText::new(String::new()),
                },
            );
            self.open = Some(Open::Text {
                text: String::new(),
            });
        }
        if let Some(Open::Text { text }) = &mut self.open {
            text.push_str(delta);
        }
        let item_id = message_item_id(self.id());
        let output_index = self.output.len();
        self.emit(
            &mut out,
            StreamEvent::OutputTextDelta {
                item_id,
                output_index,
                content_index: 0,
                delta: delta.to_owned(),
                logprobs: Vec::new(),
            },
        );
        out
    }

    fn call(&mut self, index: usize, id: Option<&str>, name: Option<&str>, args: &str) -> Vec<u8> {
        let mut out = Vec::new();
        let same = matches!(&self.open, Some(Open::Call { index: i, .. }) if *i == index);
        if !same {
            self.close(&mut out);
            let call_id = id.unwrap_or_default().to_owned();
            let name = name.unwrap_or_default().to_owned();
            let item = OutputItem::FunctionCall {
                id: call_item_id(self.id(), index),
                call_id: call_id.clone(),
                name: name.clone(),
                arguments: String::new(),
                status: "in_progress",
            };
            let output_index = self.output.len();
            self.emit(
                &mut out,
                StreamEvent::OutputItemAdded { output_index, item },
            );
            self.open = Some(Open::Call {
                index,
                call_id,
                name,
                arguments: String::new(),
            });
        }
        if !args.is_empty() {
            if let Some(Open::Call { arguments, .. }) = &mut self.open {
                arguments.push_str(args);
            }
            let item_id = call_item_id(self.id(), index);
            let output_index = self.output.len();
            self.emit(
                &mut out,
                StreamEvent::FunctionCallArgumentsDelta {
                    item_id,
                    output_index,
                    delta: args.to_owned(),
                },
            );
        }
        out
    }

    /// Closes the open item with its `done` events.
    fn close(&mut self, out: &mut Vec<u8>) {
        let output_index = self.output.len();
        let item = match self.open.take() {
            None => return,
            Some(Open::Text { text }) => {
                let item_id = message_item_id(self.id());
                let part = OutputText::new(text.clone());
                self.emit(
                    out,
                    StreamEvent::OutputTextDone {
                        item_id: item_id.clone(),
                        output_index,
                        content_index: 0,
                        text,
                        logprobs: Vec::new(),
                    },
                );
                self.emit(
                    out,
                    StreamEvent::ContentPartDone {
                        item_id: item_id.clone(),
                        output_index,
                        content_index: 0,
                        part: part.clone(),
                    },
                );
                OutputItem::Message {
                    id: item_id,
                    status: "completed",
                    role: "assistant",
                    content: vec![part],
                }
            }
            Some(Open::Call {
                index,
                call_id,
                name,
                arguments,
            }) => {
                let item_id = call_item_id(self.id(), index);
                self.emit(
                    out,
                    StreamEvent::FunctionCallArgumentsDone {
                        item_id: item_id.clone(),
                        output_index,
                        name: name.clone(),
                        arguments: arguments.clone(),
                    },
                );
                OutputItem::FunctionCall {
                    id: item_id,
                    call_id,
                    name,
                    arguments,
                    status: "completed",
                }
            }
        };
        self.emit(
            out,
            StreamEvent::OutputItemDone {
                output_index,
                item: item.clone(),
            },
        );
        self.output.push(item);
    }

    /// Closes what is open and ends with `response.completed` (or `incomplete`, `failed`).
    fn finish(&mut self, response: Response) -> bytes::Bytes {
        let mut out = Vec::new();
        self.close(&mut out);
        let status = response.status;
        let response = Box::new(response);
        let event = match status {
            "completed" => StreamEvent::Completed { response },
            "incomplete" => StreamEvent::Incomplete { response },
            _ => StreamEvent::Failed { response },
        };
        self.emit(&mut out, event);
        bytes::Bytes::from(out)
    }
}

pub async fn get(
    Client(p): Client,
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let rec = state
        .store()
        .response(&id, &p.tenant)?
        .ok_or_else(|| ApiError::not_found("response"))?;
    let reply = match rec.reply_seq {
        Some(seq) => state.store().message(&rec.conversation, seq)?,
        None => None,
    };
    Ok(HttpResponse::Ok().json(response_of(&rec, reply.as_ref())))
}

pub async fn delete(
    Client(p): Client,
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let rec = state
        .store()
        .response(&id, &p.tenant)?
        .ok_or_else(|| ApiError::not_found("response"))?;
    state.store().delete_response(&rec).await?;
    Ok(HttpResponse::Ok().json(serde_json::json!({
        "id": rec.id, "object": "response.deleted", "deleted": true,
    })))
}

/// `GET /v1/responses/{id}/input_items`: what the response was given, newest first unless
/// `order=asc`.
pub async fn input_items(
    Client(p): Client,
    state: web::Data<AppState>,
    id: web::Path<String>,
    query: web::Query<ItemsQuery>,
) -> Result<HttpResponse, ApiError> {
    let rec = state
        .store()
        .response(&id, &p.tenant)?
        .ok_or_else(|| ApiError::not_found("response"))?;
    let (first, last) = rec.input_seqs;
    let count = usize::try_from(last.saturating_sub(first) + 1).unwrap_or(usize::MAX);
    let mut items: Vec<serde_json::Value> = if first == 0 {
        Vec::new()
    } else {
        state
            .store()
            .messages_after(&rec.conversation, first - 1, count)?
            .iter()
            .flat_map(input_item_json)
            .collect()
    };
    if query.order.as_deref() != Some("asc") {
        items.reverse();
    }
    let first_id = items
        .first()
        .and_then(|i| i["id"].as_str())
        .map(str::to_owned);
    let last_id = items
        .last()
        .and_then(|i| i["id"].as_str())
        .map(str::to_owned);
    Ok(HttpResponse::Ok().json(serde_json::json!({
        "object": "list", "data": items, "first_id": first_id, "last_id": last_id, "has_more": false,
    })))
}

#[derive(serde::Deserialize)]
pub struct ItemsQuery {
    #[serde(default)]
    order: Option<String>,
    #[serde(default)]
    #[allow(dead_code)]
    limit: Option<usize>,
}

/// A stored input message as Responses input items.
fn input_item_json(m: &MessageRecord) -> Vec<serde_json::Value> {
    let id = format!("item_{}", m.seq);
    match m.role {
        Role::Tool => vec![serde_json::json!({
            "type": "function_call_output", "id": id,
            "call_id": m.tool_call_id, "output": m.content, "status": "completed",
        })],
        Role::Assistant if !m.tool_calls.is_empty() => m
            .tool_calls
            .iter()
            .enumerate()
            .map(|(i, c)| {
                serde_json::json!({
                    "type": "function_call", "id": format!("{id}_{i}"), "call_id": c.id,
                    "name": c.name, "arguments": c.arguments, "status": "completed",
                })
            })
            .collect(),
        role => {
            let kind = if role == Role::Assistant {
                "output_text"
            } else {
                "input_text"
            };
            let content: Vec<serde_json::Value> = match m.content() {
                crate::domain::Content::Text(t) => {
                    vec![serde_json::json!({"type": kind, "text": t})]
                }
                crate::domain::Content::Parts(parts) => parts
                    .iter()
                    .map(|p| match p {
                        crate::domain::Part::Text { text } => {
                            serde_json::json!({"type": kind, "text": text})
                        }
                        crate::domain::Part::ImageUrl { image_url } => serde_json::json!({
                            "type": "input_image", "image_url": image_url.url,
                            "detail": image_url.detail.map_or("auto", |d| match d {
                                crate::domain::Detail::Low => "low",
                                crate::domain::Detail::High => "high",
                                crate::domain::Detail::Auto => "auto",
                            }),
                        }),
                    })
                    .collect(),
            };
            vec![serde_json::json!({
                "type": "message", "id": id, "role": role.as_str(), "status": "completed",
                "content": content,
            })]
        }
    }
}

/// `store: false`: the stateless path, with the previous response's history when given;
/// nothing is kept.
async fn stateless_response(
    state: &AppState,
    p: Principal,
    mut s: Settings,
) -> Result<HttpResponse, ApiError> {
    let id = format!("resp_{}", uuid::Uuid::new_v4().simple());
    let posts = plan_posts(&mut s, &id)?;
    let deps = state.registry.deps();
    let mut messages = Vec::new();
    if let Some(i) = &s.instructions {
        messages.push(Message::text(Role::System, i.clone()));
    }
    if let Some(prev) = &s.previous {
        let rec = state
            .store()
            .response(prev, &p.tenant)?
            .ok_or_else(|| ApiError::not_found("response"))?;
        let upto = usize::try_from(rec.reply_seq.unwrap_or(rec.input_seqs.1)).unwrap_or(0);
        let earlier = state.store().messages_after(&rec.conversation, 0, upto)?;
        messages.extend(
            earlier
                .iter()
                .filter(|m| m.is_sent())
                .map(MessageRecord::to_message),
        );
    }
    messages.extend(posts.history);
    messages.extend(posts.results);
    messages.push(posts.last);
    let chat = ChatRequest {
        model: String::new(),
        messages: trim(deps, &s.route, messages)?,
        max_tokens: s.max_output_tokens,
        temperature: s.temperature,
        tools: s.tools.clone(),
        tool_choice: s.tool_choice.clone(),
        params: Box::new(crate::domain::Params {
            top_p: s.top_p,
            user: s.user.clone(),
            parallel_tool_calls: s.parallel_tool_calls,
            response_format: s.format.clone(),
            ..crate::domain::Params::default()
        }),
    };
    let request = stateless::prepare(deps, p.clone(), &s.route, chat)?;
    let mut run = Running::start(Arc::clone(deps), request);
    let rec = s.record(id, &p, ConversationId::generate());
    let first = run.next().await;
    if let Piece::Done(out) = first {
        // Nothing streamed: a failure answers with its status, as it does without `stream`.
        let mut out = *out;
        if let Some(err) = failure(&mut out) {
            return Err(err);
        }
        let response = unstored(&rec, &out);
        if !s.stream {
            return Ok(HttpResponse::Ok().json(response));
        }
        let mut w = Writer::new(unstored_skeleton(&rec));
        let mut bytes = w.start().to_vec();
        bytes.extend_from_slice(&w.text(&out.text));
        for (i, c) in out.tool_calls.iter().enumerate() {
            bytes.extend_from_slice(&w.call(i, Some(&c.id), Some(&c.name), &c.arguments));
        }
        bytes.extend_from_slice(&w.finish(response));
        return Ok(sse::response(stream::once(async move {
            Ok::<_, actix_web::Error>(bytes::Bytes::from(bytes))
        })));
    }
    if !s.stream {
        let mut out = loop {
            if let Piece::Done(out) = run.next().await {
                break *out;
            }
        };
        if let Some(err) = failure(&mut out) {
            return Err(err);
        }
        return Ok(HttpResponse::Ok().json(unstored(&rec, &out)));
    }
    let mut w = Writer::new(unstored_skeleton(&rec));
    let opening = w.start();
    let body = stream::unfold(
        (run, w, rec, false),
        |(mut run, mut w, rec, ended)| async move {
            if ended {
                return None;
            }
            let (bytes, ended) = match run.next().await {
                Piece::Event(Event::Text(t)) => (bytes::Bytes::from(w.text(&t)), false),
                Piece::Event(Event::ToolCall(d)) => {
                    let b = w.call(
                        d.index as usize,
                        d.id.as_deref(),
                        d.name.as_deref(),
                        &d.arguments,
                    );
                    (bytes::Bytes::from(b), false)
                }
                Piece::Event(_) => (bytes::Bytes::new(), false),
                Piece::Done(out) => (w.finish(unstored(&rec, &out)), true),
            };
            Some((Ok::<_, actix_web::Error>(bytes), (run, w, rec, ended)))
        },
    );
    Ok(sse::response(
        stream::once(async move { Ok(opening) }).chain(body),
    ))
}

fn unstored_skeleton(rec: &ResponseRecord) -> Response {
    let mut r = response_of(rec, None);
    r.store = false;
    r.conversation = None;
    r
}

/// The Response object of an unstored response.
fn unstored(rec: &ResponseRecord, out: &Outcome) -> Response {
    let mut rec = rec.clone();
    rec.usage = out.usage;
    rec.upstream_model.clone_from(&out.model);
    rec.status = match out.finish {
        _ if out.error.is_some() => "failed".into(),
        FinishReason::Length => "incomplete".into(),
        _ => "completed".into(),
    };
    rec.error = out.error.as_ref().map(|e| StoredError {
        code: e.code,
        message: e.message.clone(),
    });
    let mut r = unstored_skeleton(&rec);
    r.output = output_of(&rec.id, &out.text, &out.tool_calls);
    r
}

/// The newest messages that fit the route's budget, whole tool groups only, system first.
fn trim(deps: &Deps, route: &str, mut messages: Vec<Message>) -> Result<Vec<Message>, ApiError> {
    let encoding = deps.router.encoding(route);
    let system =
        (messages.first().map(|m| m.role) == Some(Role::System)).then(|| messages.remove(0));
    let last = messages
        .pop()
        .ok_or_else(|| ApiError::bad_request("input: must not be empty"))?;
    let cost = |m: &Message| {
        tokens::message_tokens(encoding, m).saturating_sub(tokens::MESSAGE_FRAMING_TOKENS)
    };
    let kind = |m: &Message| match m.role {
        Role::Tool => tokens::Kind::Result,
        Role::Assistant if !m.tool_calls.is_empty() => tokens::Kind::Calls,
        _ => tokens::Kind::Plain,
    };
    let groups: Vec<Vec<Message>> = tokens::groups(messages.into_iter().rev(), kind).collect();
    let (n, _) = tokens::fit_history(
        deps.budget,
        system.as_ref().map(cost),
        cost(&last),
        groups
            .iter()
            .map(|g| tokens::group_cost(g.iter().map(cost))),
    )
    .map_err(|e| ApiError::new(ErrorCode::TooLarge, e.to_string()))?;
    let mut kept: Vec<Message> = groups.into_iter().take(n).flatten().collect();
    kept.reverse();
    Ok(system.into_iter().chain(kept).chain([last]).collect())
}
