//! The conversation REST API (PROTOCOL §4): create, read, page messages, post a turn (JSON or
//! SSE), cancel, delete. A posted turn goes through the same actor as WebSocket turns, so every
//! subscribed socket sees it too.

use crate::tenant::Principal;
use actix_web::{web, HttpResponse};
use futures_util::stream;
use serde::Deserialize;
use tokio::sync::mpsc;

use crate::conversation::messages::{Cancel, PostUserMessage, TurnOptions};
use crate::conversation::{
    next_sink_id, NewConversation, Outbound, Scope, ServerFrame, Sink, WireMessage,
};
use crate::domain::{Content, Message, Role};
use crate::error::ApiError;
use crate::ids::ConversationId;
use crate::server::auth::Client;
use crate::server::{sse, AppState};
use crate::store::ConversationRecord;
use crate::tokens;
use crate::wire::openai::{decode_tools, FunctionTool, WireToolChoice};

/// Frames buffered for one HTTP turn before the request is dropped as too slow.
const TURN_BUFFER: usize = 4096;
const DEFAULT_PAGE: usize = 1000;
const MAX_PAGE: usize = 10_000;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CreateBody {
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    prompt: Option<String>,
    #[serde(default)]
    system: Option<String>,
    #[serde(default)]
    metadata: Option<serde_json::Value>,
    /// `window` or `recall`.
    #[serde(default)]
    memory: Option<crate::domain::MemoryMode>,
    #[serde(default)]
    tools: Option<Vec<FunctionTool>>,
    #[serde(default)]
    tool_choice: Option<WireToolChoice>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostBody {
    /// A string, or parts (`text`, `image_url`).
    content: Content,
    /// `user` (default) or `tool` for a tool result, with `tool_call_id`.
    #[serde(default)]
    role: Option<String>,
    #[serde(default)]
    tool_call_id: Option<String>,
    #[serde(default)]
    is_error: bool,
    #[serde(default)]
    client_id: Option<String>,
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    options: TurnOptions,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Page {
    #[serde(default)]
    after_seq: u64,
    #[serde(default)]
    limit: Option<usize>,
}

/// Parses a conversation id from a path; a malformed id names no conversation.
pub fn parse_id(raw: &str) -> Result<ConversationId, ApiError> {
    ConversationId::parse(raw).ok_or_else(|| ApiError::not_found("conversation"))
}

pub fn conversation_json(rec: &ConversationRecord) -> serde_json::Value {
    serde_json::json!({
        "id": rec.id,
        "object": "conversation",
        "model": rec.model,
        "system": rec.system,
        "prompt": rec.prompt,
        "created_at": rec.created_at,
        "metadata": rec.metadata,
        "last_seq": rec.last_seq,
        "memory": rec.memory.as_str(),
        "tools": rec.tools.iter().map(|t| FunctionTool { kind: "function".into(), function: t.clone() }).collect::<Vec<_>>(),
        "tool_choice": rec.tool_choice.clone().map(WireToolChoice),
    })
}

/// A JSON body that must be an object (serde would read `[]` as a struct with every field
/// left out).
fn object<T: serde::de::DeserializeOwned>(v: serde_json::Value) -> Result<T, ApiError> {
    if !v.is_object() {
        return Err(ApiError::bad_request("the body must be a JSON object"));
    }
    if v.get("metadata")
        .is_some_and(|m| !m.is_object() && !m.is_null())
    {
        return Err(ApiError::bad_request("metadata must be an object"));
    }
    serde_json::from_value(v).map_err(|e| ApiError::bad_request(format!("invalid body: {e}")))
}

pub async fn create(
    Client(p): Client,
    state: web::Data<AppState>,
    body: web::Json<serde_json::Value>,
) -> Result<HttpResponse, ApiError> {
    let body: CreateBody = object(body.into_inner())?;
    let (tools, tool_choice) = decode_tools(body.tools.unwrap_or_default(), body.tool_choice)
        .map_err(ApiError::bad_request)?;
    let new = NewConversation {
        model: body.model,
        system: body.system,
        prompt: body.prompt,
        metadata: body.metadata,
        memory: body.memory,
        tools,
        tool_choice,
    };
    p.check_model(new.model.as_deref().unwrap_or("default"))?;
    state.governor.take_request(&p)?;
    let rec = state.registry.create(&p.tenant, new).await?;
    Ok(HttpResponse::Created().json(conversation_json(&rec)))
}

/// `GET /v1/conversations?limit=&after=`: the tenant's conversations, newest first.
pub async fn list(
    Client(p): Client,
    state: web::Data<AppState>,
    q: web::Query<super::CursorPage>,
) -> Result<HttpResponse, ApiError> {
    let limit = q.limit();
    let after = q.after.as_deref().map(parse_id).transpose()?;
    let store = state.store().clone();
    let tenant = p.tenant.clone();
    let (page, has_more) =
        web::block(move || store.list_conversations(&tenant, after.as_ref(), limit))
            .await
            .map_err(|_| ApiError::internal())??;
    let data: Vec<serde_json::Value> = page.iter().map(conversation_json).collect();
    Ok(HttpResponse::Ok().json(serde_json::json!({
        "object": "list",
        "first_id": page.first().map(|c| c.id.to_string()),
        "last_id": page.last().map(|c| c.id.to_string()),
        "has_more": has_more,
        "data": data,
    })))
}

pub async fn get(
    Client(p): Client,
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let rec = state
        .store()
        .owned_conversation(&parse_id(&id)?, &p.tenant)?;
    Ok(HttpResponse::Ok().json(conversation_json(&rec)))
}

pub async fn delete(
    Client(p): Client,
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    state.registry.delete(&parse_id(&id)?, &p.tenant).await?;
    Ok(HttpResponse::NoContent().finish())
}

pub async fn list_messages(
    Client(p): Client,
    state: web::Data<AppState>,
    id: web::Path<String>,
    page: web::Query<Page>,
) -> Result<HttpResponse, ApiError> {
    let id = parse_id(&id)?;
    state.store().owned_conversation(&id, &p.tenant)?;
    let limit = page.limit.unwrap_or(DEFAULT_PAGE).clamp(1, MAX_PAGE);
    let data: Vec<WireMessage> = state
        .store()
        .messages_after(&id, page.after_seq, limit)?
        .into_iter()
        .map(Into::into)
        .collect();
    Ok(HttpResponse::Ok().json(serde_json::json!({ "object": "list", "data": data })))
}

pub async fn cancel(
    Client(p): Client,
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let live = state.registry.get(&parse_id(&id)?, &p.tenant)?;
    live.addr.send(Cancel).await?;
    Ok(HttpResponse::Accepted().json(serde_json::json!({})))
}

pub async fn post_message(
    Client(p): Client,
    state: web::Data<AppState>,
    req: actix_web::HttpRequest,
    id: web::Path<String>,
    body: web::Json<serde_json::Value>,
) -> Result<HttpResponse, ApiError> {
    let mut body = body.into_inner();
    // The header forces the tier unless the body's `options.tier` names one itself.
    if let Some(tier) = super::stateless::tier_header(&req)? {
        if let Some(obj) = body.as_object_mut() {
            let options = obj
                .entry("options")
                .or_insert_with(|| serde_json::json!({}));
            if options.is_null() {
                *options = serde_json::json!({});
            }
            let Some(o) = options.as_object_mut() else {
                return Err(ApiError::bad_request("options: must be an object"));
            };
            o.entry("tier").or_insert(serde_json::Value::String(tier));
        }
    }
    Ok(match post(&state, p, &id, body).await? {
        Answer::Stream(rx) => sse::response(turn_events(rx)),
        Answer::Whole(status, v) => HttpResponse::build(status).json(v),
    })
}

/// A conversation turn answered whole (`stream` is ignored), as an async job runs it: the
/// REST answer's JSON.
///
/// # Errors
/// As `POST /v1/conversations/{id}/messages`.
pub async fn turn(
    state: &AppState,
    p: Principal,
    id: &str,
    mut body: serde_json::Value,
) -> Result<serde_json::Value, ApiError> {
    if let Some(obj) = body.as_object_mut() {
        obj.remove("stream");
    }
    match post(state, p, id, body).await? {
        Answer::Whole(_, v) => Ok(v),
        Answer::Stream(_) => Err(ApiError::internal()),
    }
}

/// A turn's answer: its SSE events, or the whole reply with its status.
enum Answer {
    Stream(mpsc::Receiver<Outbound>),
    Whole(actix_web::http::StatusCode, serde_json::Value),
}

async fn post(
    state: &AppState,
    p: Principal,
    id: &str,
    body: serde_json::Value,
) -> Result<Answer, ApiError> {
    let id = parse_id(id)?;
    let body: PostBody = object(body)?;
    let live = state.registry.get(&id, &p.tenant)?;
    p.check_model(body.options.model.as_deref().unwrap_or(&live.model))?;
    let message = match body.role.as_deref() {
        None | Some("user") if body.tool_call_id.is_some() || body.is_error => {
            return Err(ApiError::bad_request(
                "tool_call_id and is_error belong to a tool result (\"role\": \"tool\")",
            ))
        }
        None | Some("user") => Message {
            content: body.content,
            ..Message::default()
        },
        Some("tool") => Message {
            role: Role::Tool,
            content: body.content,
            tool_call_id: Some(body.tool_call_id.ok_or_else(|| {
                ApiError::bad_request("tool_call_id: a tool result must name its call")
            })?),
            is_error: body.is_error,
            ..Message::default()
        },
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "role: {other:?} is not user or tool"
            )))
        }
    };
    let tokens = tokens::content_tokens(state.router().encoding(&live.model), &message).await;
    let client_id = body
        .client_id
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let (tx, rx) = mpsc::channel(TURN_BUFFER);
    let listener = (
        next_sink_id(),
        Sink::Channel(tx),
        Scope::Turn(client_id.clone()),
    );
    let post = PostUserMessage {
        client_id,
        message,
        history: Vec::new(),
        tokens,
        options: body.options,
        listener: Some(listener),
        principal: p,
        span: tracing::Span::current(),
    };
    live.ask(post).await?;
    if body.stream {
        Ok(Answer::Stream(rx))
    } else {
        let (status, v) = wait_reply(state, &id, rx).await?;
        Ok(Answer::Whole(status, v))
    }
}

/// The turn's frames as SSE events, ending after `done` or `error`.
fn turn_events(
    rx: mpsc::Receiver<Outbound>,
) -> impl futures_util::Stream<Item = Result<bytes::Bytes, actix_web::Error>> {
    stream::unfold((rx, false), |(mut rx, ended)| async move {
        if ended {
            return None;
        }
        match rx.recv().await? {
            Outbound::Frame { frame, json } => {
                let last = matches!(*frame, ServerFrame::Done(_) | ServerFrame::Error(_));
                Some((Ok(sse::event(Some(frame.kind()), &json)), (rx, last)))
            }
            Outbound::Close { .. } | Outbound::Relayed(_) => None,
        }
    })
}

/// Waits for the turn's end and answers the stored reply.
async fn wait_reply(
    state: &AppState,
    id: &ConversationId,
    mut rx: mpsc::Receiver<Outbound>,
) -> Result<(actix_web::http::StatusCode, serde_json::Value), ApiError> {
    let mut acked = None;
    while let Some(out) = rx.recv().await {
        let Outbound::Frame { frame, .. } = out else {
            break;
        };
        match &*frame {
            ServerFrame::Ack { seq, .. } => acked = Some(*seq),
            ServerFrame::Done(done) => {
                let msg = state
                    .store()
                    .message(id, done.seq)?
                    .ok_or_else(ApiError::internal)?;
                return Ok((
                    actix_web::http::StatusCode::OK,
                    serde_json::json!({
                        "message": WireMessage::from(msg),
                        "usage": done.usage,
                        "cached": done.cached,
                        "provider": done.provider,
                        "model": done.model,
                        "tier": done.tier,
                        "cost": done.cost,
                    }),
                ));
            }
            ServerFrame::Error(e) => {
                let mut err = ApiError::new(e.code, e.message.clone());
                err.retry_after = e.retry_after_ms.map(std::time::Duration::from_millis);
                return Err(err);
            }
            _ => {}
        }
    }
    // A tool result that leaves other calls open is stored and acked, and nothing runs yet.
    if let Some(seq) = acked {
        if let Some(msg) = state.store().message(id, seq)? {
            if msg.role == crate::store::Role::Tool {
                return Ok((
                    actix_web::http::StatusCode::ACCEPTED,
                    serde_json::json!({ "message": WireMessage::from(msg) }),
                ));
            }
        }
    }
    tracing::error!(conversation = %id, "turn ended without done or error");
    Err(ApiError::internal())
}
