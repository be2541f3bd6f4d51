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

mod objects;
mod plan;
mod turn;
mod unstored;

use objects::*;
use plan::*;
use turn::*;
use unstored::*;

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
    settings.tier = crate::server::http::stateless::tier_header(&req)?;
    if let Some(tier) = &settings.tier {
        state.router().tier_index(&settings.route, tier)?;
    }
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

/// The response `id` of the key's tenant; any other is not found.
fn owned(state: &AppState, p: &Principal, id: &str) -> Result<ResponseRecord, ApiError> {
    state
        .store()
        .response(id, &p.tenant)?
        .ok_or_else(|| ApiError::not_found("response"))
}

pub async fn get(
    Client(p): Client,
    state: web::Data<AppState>,
    id: web::Path<String>,
) -> Result<HttpResponse, ApiError> {
    let rec = owned(&state, &p, &id)?;
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
    let rec = owned(&state, &p, &id)?;
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
    let rec = owned(&state, &p, &id)?;
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
    let limit = query.limit.unwrap_or(20).clamp(1, 100);
    let has_more = items.len() > limit;
    items.truncate(limit);
    let first_id = items
        .first()
        .and_then(|i| i["id"].as_str())
        .map(str::to_owned);
    let last_id = items
        .last()
        .and_then(|i| i["id"].as_str())
        .map(str::to_owned);
    Ok(HttpResponse::Ok().json(serde_json::json!({
        "object": "list", "data": items, "first_id": first_id, "last_id": last_id, "has_more": has_more,
    })))
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ItemsQuery {
    #[serde(default)]
    order: Option<String>,
    /// Items per page, 1 to 100 (20 when absent), as OpenAI pages them.
    #[serde(default)]
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
