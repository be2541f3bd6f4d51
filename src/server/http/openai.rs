//! The OpenAI-compatible surface: `GET /v1/models` and stateless `POST /v1/chat/completions`
//! (JSON, or SSE chunks ending in `data: [DONE]`, with a usage chunk when asked), shaped so the
//! official SDKs work unchanged against `http://HOST/v1`.

use actix_web::{web, HttpResponse};
use futures_util::{stream, StreamExt};
use serde::Deserialize;
use serde_json::{json, Value};

use crate::cache::{Cache, Hit, Outcome, Query, ScopeParts};
use crate::error::{ApiError, ErrorCode};
use crate::guard::injection::InjectionMode;
use crate::guard::pii::{PiiMode, Restorer, Vault};
use crate::ids::unix_now;
use crate::metrics::Metrics;
use crate::provider::{ChatMessage, ChatRequest, Started, UpstreamEvent};
use crate::server::auth::Client;
use crate::server::{sse, AppState};
use crate::store::{CacheRecord, Usage, UsageRecord};
use crate::tenant::usage::UsageRecorder;
use crate::tenant::{Bill, Principal};
use crate::tokens::{self, MESSAGE_FRAMING_TOKENS};

/// The request body. Unknown fields are accepted (SDKs send many) and ignored.
#[derive(Deserialize)]
pub struct ChatCompletionBody {
    model: String,
    messages: Vec<InMessage>,
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    #[serde(default)]
    max_tokens: Option<u32>,
    #[serde(default)]
    max_completion_tokens: Option<u32>,
    #[serde(default)]
    temperature: Option<f32>,
}

#[derive(Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

#[derive(Deserialize)]
struct InMessage {
    role: String,
    #[serde(default)]
    content: Option<Value>,
}

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
    body: web::Json<ChatCompletionBody>,
) -> Result<HttpResponse, ApiError> {
    let body = body.into_inner();
    if !state.router().has_route(&body.model) {
        return Err(ApiError::new(
            ErrorCode::ModelNotFound,
            format!("model {:?} does not exist", body.model),
        ));
    }
    p.check_model(&body.model)?;
    let (messages, vault, flagged) =
        guard_request(&state, &p, &body.model, convert_messages(body.messages)?)?;
    let encoding = state.router().encoding(&body.model);
    let prompt_tokens = messages
        .iter()
        .map(|m| tokens::count(encoding, &m.content) + MESSAGE_FRAMING_TOKENS)
        .sum();
    let request = ChatRequest {
        model: String::new(),
        messages,
        max_tokens: body.max_completion_tokens.or(body.max_tokens),
        temperature: body.temperature,
    };
    state.router().check_regions(&body.model, p.regions())?;
    let price_model = state
        .router()
        .primary_model(&body.model)
        .unwrap_or(&body.model)
        .to_owned();
    let reservation = state
        .governor
        .admit(&p, &price_model, prompt_tokens, request.max_tokens)?;
    let bill = Bill::new(std::sync::Arc::clone(&state.governor), reservation);
    let begun = std::time::Instant::now();
    let cache = &state.registry.deps().cache;
    // A stateless request is cached only without personal data anywhere in it.
    let cacheable = vault.is_none()
        && request.messages.split_last().is_some_and(|(last, before)| {
            last.role == "user"
                && cache.admits(
                    &p,
                    state.router().caches(&body.model),
                    &last.content,
                    flagged,
                )
                && before
                    .iter()
                    .all(|m| crate::guard::pii::detect(&m.content).is_empty())
        });
    let mut insert = None;
    let mut hit = None;
    if cacheable {
        let (key, question) = scope_of(
            cache,
            &p,
            &body.model,
            &request.messages,
            request.temperature,
        );
        let query = Query {
            key,
            tenant: p.tenant.as_str(),
            question: &question,
            max_tokens: request.max_tokens,
        };
        let looked = cache.lookup(query, None).await;
        match looked.outcome {
            Outcome::Hit(h) => hit = Some(h),
            _ => insert = looked.vector.map(|v| (cache.clone(), key, v, question)),
        }
    }
    let cached = hit.is_some();
    let started = match hit {
        Some(h) => cached_start(h, begun),
        None => {
            state
                .router()
                .start(&body.model, request, prompt_tokens, p.regions())
                .await?
        }
    };
    let id = format!("chatcmpl-{}", uuid::Uuid::new_v4().simple());
    let meta = Meta {
        id,
        created: unix_now(),
        model: started.model.clone(),
        prompt_tokens,
        encoding,
        provider: started.provider.clone(),
        ttft: started.ttft,
        metrics: state.metrics.clone(),
        route: body.model.clone(),
        principal: p,
        bill,
        usage: state.registry.deps().usage.clone(),
        begun: std::time::Instant::now(),
        restorer: vault.map(|v| (Restorer::default(), v)),
        generated: String::new(),
        recorded: false,
        cached,
        insert,
    };
    if body.stream {
        let include_usage = body.stream_options.is_some_and(|o| o.include_usage);
        Ok(sse::response(chunks(started, meta, include_usage)))
    } else {
        complete(started, meta).await
    }
}

/// The cache scope of a stateless request and its question (the last message). A leading
/// system message is the system prompt and the messages between it and the question are the
/// context, so a conversation's first turn and the same stateless request share entries.
fn scope_of(
    cache: &Cache,
    p: &Principal,
    route: &str,
    messages: &[ChatMessage],
    temperature: Option<f32>,
) -> (crate::cache::index::ScopeKey, String) {
    let (question, before) = match messages.split_last() {
        Some((last, before)) => (last.content.clone(), before),
        None => (String::new(), messages),
    };
    let (system, context) = match before.split_first() {
        Some((first, rest)) if first.role == "system" => (Some(first.content.as_str()), rest),
        _ => (None, before),
    };
    let context: Vec<(&str, &str)> = context
        .iter()
        .map(|m| (m.role, m.content.as_str()))
        .collect();
    let key = cache.scope_key(&ScopeParts {
        tenant: p.tenant.as_str(),
        route,
        system,
        prompt_version: None,
        context: &context,
        temperature,
    });
    (key, question)
}

/// A cache hit as a generation that has started: the stored reply, then its end.
fn cached_start(hit: Hit, begun: std::time::Instant) -> Started {
    let (tx, rest) = tokio::sync::mpsc::channel(1);
    let rec = hit.record;
    let _ = tx.try_send(UpstreamEvent::Finished {
        finish_reason: "stop".into(),
        usage: Some(rec.usage),
        model: Some(rec.model.clone()),
    });
    Started {
        first: UpstreamEvent::Delta(rec.reply),
        rest,
        provider: rec.provider,
        model: rec.model,
        ttft: begun.elapsed(),
    }
}

/// The route's and key's guardrails on a stateless request: PII redacted (answering the vault
/// that restores the reply) or refused, injections in the last user message flagged or refused.
/// Answers the messages, the vault, and whether an injection was flagged.
fn guard_request(
    state: &AppState,
    p: &Principal,
    route: &str,
    mut messages: Vec<ChatMessage>,
) -> Result<(Vec<ChatMessage>, Option<Vault>, bool), ApiError> {
    let mut flagged = false;
    let (route_pii, injection) = state.router().guards(route);
    if injection != InjectionMode::Off {
        let last_user = messages
            .iter()
            .rev()
            .find(|m| m.role == "user")
            .map_or("", |m| m.content.as_str());
        if crate::guard::injection::screen(last_user).is_injection() {
            if injection == InjectionMode::Block {
                state.metrics.guard_event("prompt_injection", "block");
                return Err(ApiError::new(
                    ErrorCode::Blocked,
                    "the message looks like a prompt injection",
                ));
            }
            state.metrics.guard_event("prompt_injection", "flag");
            tracing::warn!(route, "prompt injection flagged");
            flagged = true;
        }
    }
    match p.pii().unwrap_or(route_pii) {
        PiiMode::Off => Ok((messages, None, flagged)),
        PiiMode::Block => {
            let kinds: Vec<&str> = messages
                .iter()
                .flat_map(|m| crate::guard::pii::detect(&m.content))
                .collect();
            if kinds.is_empty() {
                Ok((messages, None, flagged))
            } else {
                state.metrics.guard_event("pii", "block");
                Err(ApiError::new(
                    ErrorCode::Blocked,
                    format!("the request contains personal data ({})", kinds.join(", ")),
                ))
            }
        }
        PiiMode::Redact => {
            let mut vault = Vault::default();
            // Every message comes from the client here, system messages included.
            for m in &mut messages {
                m.content = vault.redact(&m.content).0;
            }
            Ok((messages, (!vault.is_empty()).then_some(vault), flagged))
        }
    }
}

/// OpenAI message content is a string or a list of parts; text parts are joined.
fn convert_messages(messages: Vec<InMessage>) -> Result<Vec<ChatMessage>, ApiError> {
    if messages.is_empty() {
        return Err(ApiError::bad_request("messages must not be empty"));
    }
    messages
        .into_iter()
        .map(|m| {
            let role = match m.role.as_str() {
                "system" | "developer" => "system",
                "user" => "user",
                "assistant" => "assistant",
                other => {
                    return Err(ApiError::bad_request(format!(
                        "unsupported message role {other:?}"
                    )))
                }
            };
            let content = match m.content {
                None | Some(Value::Null) => String::new(),
                Some(Value::String(s)) => s,
                Some(Value::Array(parts)) => parts
                    .iter()
                    .filter_map(|part| part.get("text").and_then(Value::as_str))
                    .collect::<Vec<_>>()
                    .join(""),
                Some(_) => {
                    return Err(ApiError::bad_request(
                        "message content must be a string or a list of parts",
                    ))
                }
            };
            Ok(ChatMessage { role, content })
        })
        .collect()
}

struct Meta {
    id: String,
    created: i64,
    model: String,
    prompt_tokens: u32,
    encoding: tokens::Encoding,
    provider: String,
    ttft: std::time::Duration,
    metrics: Metrics,
    route: String,
    principal: Principal,
    bill: Bill,
    usage: UsageRecorder,
    begun: std::time::Instant,
    /// Puts the originals of redacted PII back into the reply.
    restorer: Option<(Restorer, Vault)>,
    /// The text generated so far, billed if the client leaves before the end.
    generated: String,
    recorded: bool,
    /// Served from the semantic cache: nothing billed, the saving recorded.
    cached: bool,
    /// On a miss: where to cache a complete reply.
    insert: Option<(Cache, crate::cache::index::ScopeKey, Vec<f32>, String)>,
}

impl Drop for Meta {
    /// A client that disconnects mid-stream drops the response: what was generated until then
    /// is still counted and billed.
    fn drop(&mut self) {
        if !self.recorded {
            let generated = std::mem::take(&mut self.generated);
            let usage = self.usage(None, &generated);
            self.record(usage, None, "cancelled");
        }
    }
}

impl Meta {
    /// Counts the request in the metrics, the key's quotas and the usage records, with the
    /// tokens generated so far.
    fn record(&mut self, usage: Usage, error: Option<ErrorCode>, finish_reason: &str) {
        self.recorded = true;
        let (prompt, completion) = (
            u64::from(usage.prompt_tokens),
            u64::from(usage.completion_tokens),
        );
        let original_cost = self.bill.cost(&self.model, prompt, completion);
        let (billed, cost, saved) = if self.cached {
            self.metrics.observe_turn("cache", Some(self.ttft), error);
            (Usage::default(), 0.0, (usage.total_tokens, original_cost))
        } else {
            self.metrics
                .observe_turn(&self.provider, Some(self.ttft), error);
            self.metrics.add_tokens(&self.provider, usage);
            (usage, original_cost, (0, 0.0))
        };
        self.bill.set(
            u64::from(billed.prompt_tokens) + u64::from(billed.completion_tokens),
            cost,
        );
        if let Some((cache, key, vector, question)) = self.insert.take() {
            if error.is_none() && finish_reason == "stop" && !self.generated.is_empty() {
                cache.insert(
                    key,
                    vector,
                    CacheRecord {
                        tenant: self.principal.tenant.as_str().to_owned(),
                        scope: String::new(),
                        question,
                        reply: self.generated.clone(),
                        usage,
                        provider: self.provider.clone(),
                        model: self.model.clone(),
                        conversation: None,
                        created_ms: 0,
                        expires_ms: 0,
                    },
                );
            }
        }
        self.usage.record_detached(UsageRecord {
            ts_ms: chrono::Utc::now().timestamp_millis(),
            tenant: self.principal.tenant.clone(),
            key_id: self.principal.key_id.clone(),
            conversation: None,
            route: self.route.clone(),
            provider: self.provider.clone(),
            model: self.model.clone(),
            prompt_tokens: billed.prompt_tokens,
            completion_tokens: billed.completion_tokens,
            cached: self.cached,
            latency_ms: self.begun.elapsed().as_millis() as u64 + self.ttft.as_millis() as u64,
            ttft_ms: Some(self.ttft.as_millis() as u64),
            cost,
            trimmed_tokens: 0,
            saved_tokens: saved.0,
            saved_cost: saved.1,
            finish_reason: finish_reason.to_owned(),
        });
    }

    /// A delta as the client sees it (PII restored; possibly held back in part).
    fn restore(&mut self, delta: &str) -> String {
        match self.restorer.as_mut() {
            Some((r, vault)) => r.push(vault, delta),
            None => delta.to_owned(),
        }
    }

    /// What the restorer still holds, at the end of the reply.
    fn restore_rest(&mut self) -> String {
        match self.restorer.as_mut() {
            Some((r, vault)) => r.finish(vault),
            None => String::new(),
        }
    }

    fn fail(&mut self, code: ErrorCode, message: String, text: &str) -> ApiError {
        let usage = self.usage(None, text);
        self.record(usage, Some(code), "error");
        ApiError::new(code, message)
    }

    fn usage(&self, reported: Option<Usage>, text: &str) -> Usage {
        reported
            .unwrap_or_else(|| Usage::new(self.prompt_tokens, tokens::count(self.encoding, text)))
    }

    fn chunk(&self, delta: Value, finish_reason: Option<&str>) -> Value {
        json!({
            "id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}],
        })
    }
}

async fn complete(started: Started, mut meta: Meta) -> Result<HttpResponse, ApiError> {
    let mut rest = started.rest;
    let mut next = Some(started.first);
    let mut text = String::new();
    loop {
        let event = match next.take() {
            Some(e) => e,
            None => rest.recv().await.unwrap_or_else(|| {
                UpstreamEvent::Failed(crate::provider::ProviderError::Interrupted {
                    provider: meta.provider.clone(),
                    message: "upstream stream ended".into(),
                })
            }),
        };
        match event {
            UpstreamEvent::Delta(t) => {
                meta.generated.push_str(&t);
                text.push_str(&t);
            }
            UpstreamEvent::Failed(e) if !text.is_empty() => {
                return Err(meta.fail(ErrorCode::UpstreamInterrupted, e.to_string(), &text))
            }
            UpstreamEvent::Failed(e) => {
                let retry_after = e.retry_after();
                let mut err = meta.fail(e.code(), e.to_string(), &text);
                err.retry_after = retry_after;
                return Err(err);
            }
            UpstreamEvent::Finished {
                finish_reason,
                usage,
                model,
            } => {
                let usage = meta.usage(usage, &text);
                meta.record(usage, None, &finish_reason);
                let finish_reason = crate::provider::shown_finish_reason(&finish_reason);
                let restored = meta.restore(&text) + &meta.restore_rest();
                return Ok(HttpResponse::Ok().json(json!({
                    "id": meta.id, "object": "chat.completion", "created": meta.created,
                    "model": model.unwrap_or_else(|| meta.model.clone()),
                    "choices": [{
                        "index": 0,
                        "message": {"role": "assistant", "content": restored},
                        "finish_reason": finish_reason,
                    }],
                    "usage": usage,
                })));
            }
        }
    }
}

/// The SSE chunks of a streamed completion: a role chunk, content chunks, a finish chunk, the
/// usage chunk when asked, then `[DONE]`. A failure mid-stream is sent as an error event.
fn chunks(
    started: Started,
    meta: Meta,
    include_usage: bool,
) -> impl futures_util::Stream<Item = Result<bytes::Bytes, actix_web::Error>> {
    let first = meta.chunk(json!({"role": "assistant", "content": ""}), None);
    let state = (
        Some(started.first),
        started.rest,
        meta,
        String::new(),
        false,
    );
    let body = stream::unfold(
        state,
        move |(mut next, mut rest, mut meta, mut text, ended)| async move {
            if ended {
                return None;
            }
            let event = match next.take() {
                Some(e) => e,
                None => rest.recv().await.unwrap_or_else(|| {
                    UpstreamEvent::Failed(crate::provider::ProviderError::Interrupted {
                        provider: String::new(),
                        message: "upstream stream ended".into(),
                    })
                }),
            };
            let (out, ended) = match event {
                UpstreamEvent::Delta(t) => {
                    text.push_str(&t);
                    meta.generated.push_str(&t);
                    let shown = meta.restore(&t);
                    if shown.is_empty() {
                        (bytes::Bytes::new(), false)
                    } else {
                        (
                            sse::event(
                                None,
                                &meta.chunk(json!({"content": shown}), None).to_string(),
                            ),
                            false,
                        )
                    }
                }
                UpstreamEvent::Finished {
                    finish_reason,
                    usage,
                    ..
                } => {
                    let rest = meta.restore_rest();
                    let mut out = Vec::new();
                    if !rest.is_empty() {
                        out.extend_from_slice(&sse::event(
                            None,
                            &meta.chunk(json!({"content": rest}), None).to_string(),
                        ));
                    }
                    let finish = meta
                        .chunk(
                            json!({}),
                            Some(crate::provider::shown_finish_reason(&finish_reason)),
                        )
                        .to_string();
                    out.extend_from_slice(&sse::event(None, &finish));
                    let usage = meta.usage(usage, &text);
                    meta.record(usage, None, &finish_reason);
                    if include_usage {
                        let chunk = json!({
                            "id": meta.id, "object": "chat.completion.chunk", "created": meta.created,
                            "model": meta.model, "choices": [], "usage": usage,
                        });
                        out.extend_from_slice(&sse::event(None, &chunk.to_string()));
                    }
                    out.extend_from_slice(&sse::event(None, "[DONE]"));
                    (bytes::Bytes::from(out), true)
                }
                UpstreamEvent::Failed(e) => {
                    let code = if text.is_empty() {
                        e.code()
                    } else {
                        ErrorCode::UpstreamInterrupted
                    };
                    let err = meta.fail(code, e.to_string(), &text);
                    (sse::event(None, &err.body().to_string()), true)
                }
            };
            Some((Ok(out), (next, rest, meta, text, ended)))
        },
    );
    stream::once(async move { Ok(sse::event(None, &first.to_string())) }).chain(body)
}
