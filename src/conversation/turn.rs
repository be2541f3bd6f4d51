//! One turn: store the user message, build the context within the budget, stream the reply from
//! the router to every subscriber, store the reply, answer `done` (or `error`).
//!
//! A turn runs as its own task so the actor's mailbox stays free for `Cancel` and `Subscribe`.
//! Ordering guarantees: the user message is durable before `ack`; the reply is durable before
//! `done`; the deltas' concatenation is exactly the stored content.

use std::sync::Arc;
use std::time::Instant;

use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::fanout::Fanout;
use super::frames::{Done, ErrorFrame, ServerFrame};
use super::messages::TurnOptions;
use super::Deps;
use crate::cache::{Hit, Looked, Outcome, Query, ScopeParts};
use crate::config::MemoryMode;
use crate::error::{ApiError, ErrorCode};
use crate::guard::injection::Leak;
use crate::guard::pii::{PiiMode, Restorer, Vault};
use crate::ids::{unix_now, ConversationId};
use crate::provider::{ChatMessage, ChatRequest, UpstreamEvent};
use crate::store::UsageRecord;
use crate::store::{CacheRecord, MessageRecord, ReplyMeta, Role, StoredError, Usage};
use crate::tenant::{Bill, Principal};
use crate::tokens::{self, fit_history, Encoding};

/// Everything a turn needs to know about its conversation and message.
pub struct TurnInput {
    pub conversation: ConversationId,
    pub route: String,
    pub system: Option<String>,
    pub system_tokens: Option<u32>,
    pub encoding: Encoding,
    pub user_seq: u64,
    pub client_id: String,
    pub content: String,
    pub tokens: u32,
    pub options: TurnOptions,
    pub principal: Principal,
    /// The key's reservation, settled with what the turn used.
    pub bill: Option<Bill>,
    /// The versioned prompt `system` came from (`name@version`).
    pub prompt_version: Option<String>,
    /// What to do with PII in what leaves.
    pub pii: PiiMode,
    /// Guardrail findings on the user message, stored with it.
    pub flags: Vec<String>,
    /// Whether this turn may be served from, and stored in, the semantic cache.
    pub cache: bool,
    /// How the context is chosen once history outgrows the budget.
    pub memory: MemoryMode,
}

/// How a reply ended, before it is stored.
struct Ending {
    finish_reason: &'static str,
    error: Option<ApiError>,
    usage: Option<Usage>,
    model: Option<String>,
    /// The provider that finished the reply, when it is not the one that started it.
    provider: Option<String>,
    /// Guardrail findings on the reply.
    flags: Vec<String>,
    /// The upstream itself said the reply is complete (`stop`): only such a reply is cached.
    complete: bool,
}

/// Runs one turn; answers the conversation's `last_seq` afterwards.
pub async fn run(
    deps: Arc<Deps>,
    fanout: Fanout,
    input: TurnInput,
    cancel: CancellationToken,
) -> u64 {
    let span = tracing::info_span!(
        "turn",
        conversation = %input.conversation,
        seq = input.user_seq,
        model = %input.route,
        provider = tracing::field::Empty,
        ttft_ms = tracing::field::Empty,
    );
    run_inner(&deps, &fanout, input, &cancel)
        .instrument(span)
        .await
}

async fn run_inner(
    deps: &Deps,
    fanout: &Fanout,
    mut input: TurnInput,
    cancel: &CancellationToken,
) -> u64 {
    // Settles the key's reservation however the turn ends (even by a panic).
    let mut billing = input.bill.take();
    let conv = input.conversation.clone();
    let cid = input.client_id.clone();
    let fail = |err: ApiError, reply_to: Option<u64>| {
        let mut frame = ErrorFrame::new(&err);
        frame.conversation = Some(conv.clone());
        frame.client_id = Some(cid.clone());
        frame.reply_to = reply_to;
        fanout.broadcast(&ServerFrame::Error(frame), Some(&cid));
    };

    let user = MessageRecord {
        flags: input.flags.clone(),
        seq: input.user_seq,
        role: Role::User,
        content: input.content.clone(),
        created_at: unix_now(),
        client_id: Some(input.client_id.clone()),
        finish_reason: None,
        tokens: input.tokens,
        reply: None,
    };
    if let Err(e) = deps.store.append_message(&conv, &user).await {
        fail(e.into(), None);
        return input.user_seq - 1;
    }
    let ack = ServerFrame::Ack {
        conversation: conv.clone(),
        client_id: cid.clone(),
        seq: input.user_seq,
    };
    fanout.broadcast(&ack, Some(&cid));

    #[cfg(feature = "fault-injection")]
    if input.content.contains("[[parley:panic]]") {
        panic!("fault injection: turn panicked");
    }

    let begun = Instant::now();
    let Built {
        request,
        prompt_tokens,
        vault,
        trimmed: trimmed_tokens,
        scope,
        question_vector,
    } = match build_request(deps, &input).await {
        Ok(r) => r,
        Err(e) => {
            fail(e, Some(input.user_seq));
            return input.user_seq;
        }
    };
    let mut looked: Option<Looked> = None;
    if let Some(key) = scope {
        let query = Query {
            key,
            tenant: input.principal.tenant.as_str(),
            question: &input.content,
            max_tokens: input.options.max_tokens,
        };
        let l = deps.cache.lookup(query, question_vector).await;
        if let Outcome::Hit(hit) = &l.outcome {
            return serve_hit(deps, fanout, &input, hit, billing, begun).await;
        }
        looked = Some(l);
    }
    let reply_seq = input.user_seq + 1;
    let mut text = String::new();
    let started = tokio::select! {
        () = cancel.cancelled() => None,
        started = deps.router.start(&input.route, request.clone(), prompt_tokens, input.principal.regions()) => Some(started),
    };
    let (ending, provider, model, ttft) = match started {
        // Cancelled before any target answered: `done` still names where the turn was going.
        None => {
            let (provider, model) = deps.router.primary_target(&input.route).unwrap_or_default();
            (ending("cancelled", None), provider, model, None)
        }
        Some(Err(e)) => {
            let err: ApiError = e.into();
            (
                ending("error", Some(err)),
                String::new(),
                String::new(),
                None,
            )
        }
        Some(Ok(started)) => {
            let span = tracing::Span::current();
            span.record("provider", started.provider.as_str());
            span.record("ttft_ms", started.ttft.as_millis() as u64);
            let (provider, model, ttft) = (
                started.provider.clone(),
                started.model.clone(),
                started.ttft,
            );
            let ctx = StreamCtx {
                fanout,
                conv: &conv,
                client_id: &cid,
                reply_to: input.user_seq,
                deps,
                route: &input.route,
                request: &request,
                tokens: prompt_tokens,
                regions: input.principal.regions(),
                vault: vault.as_ref(),
                system: input.system.as_deref(),
            };
            let ending = stream(&ctx, started, &mut text, cancel).await;
            let provider = ending.provider.clone().unwrap_or(provider);
            (ending, provider, model, Some(ttft))
        }
    };
    deps.metrics
        .observe_turn(&provider, ttft, ending.error.as_ref().map(|e| e.code));

    let completion_tokens = tokens::count_async(input.encoding, text.clone()).await;
    // A turn that never reached a provider (refused, cancelled before it started) used nothing.
    let reached = ttft.is_some();
    let usage = match (ending.usage, reached) {
        (Some(u), _) => u,
        (None, true) => Usage::new(prompt_tokens, completion_tokens),
        (None, false) => Usage::default(),
    };
    let model = ending.model.unwrap_or(model);
    let reply = MessageRecord {
        flags: ending.flags.clone(),
        seq: reply_seq,
        role: Role::Assistant,
        content: text,
        created_at: unix_now(),
        client_id: None,
        finish_reason: Some(ending.finish_reason.to_owned()),
        tokens: completion_tokens,
        reply: Some(ReplyMeta {
            reply_to: input.user_seq,
            usage,
            cached: false,
            provider: provider.clone(),
            model: model.clone(),
            ttft_ms: ttft.map(|t| t.as_millis() as u64),
            prompt_version: input.prompt_version.clone(),
            error: ending.error.as_ref().map(|e| StoredError {
                code: e.code,
                message: e.message.clone(),
            }),
        }),
    };
    deps.metrics.add_tokens(&provider, usage);
    if ending.usage.is_some() && usage.completion_tokens != completion_tokens {
        tracing::debug!(
            reported = usage.completion_tokens,
            counted = completion_tokens,
            "upstream usage differs from our count; the upstream's wins"
        );
    }
    let cost = deps.governor.prices().cost(
        &model,
        u64::from(usage.prompt_tokens),
        u64::from(usage.completion_tokens),
    );
    if let Some(b) = billing.as_mut() {
        b.set(u64::from(usage.total_tokens), cost);
    }
    if reached {
        deps.usage
            .record(UsageRecord {
                prompt_tokens: usage.prompt_tokens,
                completion_tokens: usage.completion_tokens,
                ttft_ms: ttft.map(|t| t.as_millis() as u64),
                cost,
                trimmed_tokens,
                ..usage_record(&input, &provider, &model, begun, ending.finish_reason)
            })
            .await;
    }
    if let Err(e) = deps.store.append_message(&conv, &reply).await {
        fail(e.into(), Some(input.user_seq));
        return input.user_seq;
    }
    tracing::debug!(
        elapsed_ms = begun.elapsed().as_millis() as u64,
        finish_reason = ending.finish_reason,
        "turn finished"
    );
    // Only a complete reply is cached (never a cancelled, cut, interrupted or failed one), and
    // before `done`, so the next question after it can already hit.
    let complete = ending.complete
        && ending.finish_reason == "stop"
        && ending.error.is_none()
        && ending.flags.is_empty()
        && !reply.content.is_empty();
    if let (
        true,
        Some(Looked {
            vector: Some(vector),
            key,
            ..
        }),
    ) = (complete, looked)
    {
        deps.cache.insert(
            key,
            vector,
            CacheRecord {
                tenant: input.principal.tenant.as_str().to_owned(),
                scope: String::new(),
                question: input.content.clone(),
                reply: reply.content.clone(),
                usage,
                provider: provider.clone(),
                model: model.clone(),
                conversation: Some(conv.clone()),
                created_ms: 0,
                expires_ms: 0,
            },
        );
    }
    match ending.error {
        Some(err) => fail(err, Some(input.user_seq)),
        None => {
            if let Some(done) = outcome_frame(&conv, &reply, &cid) {
                fanout.broadcast(&done, Some(&cid));
            }
        }
    }
    reply_seq
}

/// Pieces a cached reply is streamed in: a few words each, white space kept, so clients render
/// it as they render any stream.
fn chunks(text: &str) -> Vec<String> {
    const WORDS: usize = 4;
    let mut out = Vec::new();
    let mut cur = String::new();
    let mut words = 0;
    for (i, piece) in text.split_inclusive(char::is_whitespace).enumerate() {
        cur.push_str(piece);
        if piece.ends_with(char::is_whitespace) {
            words += 1;
        }
        if words >= WORDS && i > 0 {
            out.push(std::mem::take(&mut cur));
            words = 0;
        }
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

/// Serves a cache hit: the stored reply streams through the same `delta`s, is stored like any
/// reply (marked `cached`, with the original reply's usage and provider), and `done` follows.
/// No upstream is called and the key is charged nothing; the usage record notes what the hit
/// saved.
async fn serve_hit(
    deps: &Deps,
    fanout: &Fanout,
    input: &TurnInput,
    hit: &Hit,
    mut billing: Option<Bill>,
    begun: Instant,
) -> u64 {
    let conv = &input.conversation;
    let cid = &input.client_id;
    let rec = &hit.record;
    tracing::debug!(entry = hit.id, similarity = hit.similarity, "cache hit");
    let ttft = begun.elapsed();
    for text in chunks(&rec.reply) {
        let frame = ServerFrame::Delta {
            conversation: conv.clone(),
            reply_to: input.user_seq,
            text,
        };
        fanout.broadcast(&frame, Some(cid));
    }
    let completion_tokens = tokens::count_async(input.encoding, rec.reply.clone()).await;
    let reply = MessageRecord {
        flags: Vec::new(),
        seq: input.user_seq + 1,
        role: Role::Assistant,
        content: rec.reply.clone(),
        created_at: unix_now(),
        client_id: None,
        finish_reason: Some("stop".into()),
        tokens: completion_tokens,
        reply: Some(ReplyMeta {
            reply_to: input.user_seq,
            usage: rec.usage,
            cached: true,
            provider: rec.provider.clone(),
            model: rec.model.clone(),
            ttft_ms: Some(ttft.as_millis() as u64),
            prompt_version: input.prompt_version.clone(),
            error: None,
        }),
    };
    if let Some(b) = billing.as_mut() {
        b.set(0, 0.0);
    }
    deps.metrics.observe_turn("cache", Some(ttft), None);
    let saved_cost = deps.governor.prices().cost(
        &rec.model,
        u64::from(rec.usage.prompt_tokens),
        u64::from(rec.usage.completion_tokens),
    );
    deps.usage
        .record(UsageRecord {
            cached: true,
            ttft_ms: Some(ttft.as_millis() as u64),
            saved_tokens: rec.usage.total_tokens,
            saved_cost,
            ..usage_record(input, &rec.provider, &rec.model, begun, "stop")
        })
        .await;
    if let Err(e) = deps.store.append_message(conv, &reply).await {
        let mut frame = ErrorFrame::new(&e.into());
        frame.conversation = Some(conv.clone());
        frame.client_id = Some(cid.clone());
        frame.reply_to = Some(input.user_seq);
        fanout.broadcast(&ServerFrame::Error(frame), Some(cid));
        return input.user_seq;
    }
    if let Some(done) = outcome_frame(conv, &reply, cid) {
        fanout.broadcast(&done, Some(cid));
    }
    input.user_seq + 1
}

/// A usage record of this turn with nothing used, cached or saved yet.
fn usage_record(
    input: &TurnInput,
    provider: &str,
    model: &str,
    begun: Instant,
    finish_reason: &str,
) -> UsageRecord {
    UsageRecord {
        ts_ms: chrono::Utc::now().timestamp_millis(),
        tenant: input.principal.tenant.clone(),
        key_id: input.principal.key_id.clone(),
        conversation: Some(input.conversation.clone()),
        route: input.route.clone(),
        provider: provider.to_owned(),
        model: model.to_owned(),
        prompt_tokens: 0,
        completion_tokens: 0,
        cached: false,
        latency_ms: begun.elapsed().as_millis() as u64,
        ttft_ms: None,
        cost: 0.0,
        trimmed_tokens: 0,
        finish_reason: finish_reason.to_owned(),
        saved_tokens: 0,
        saved_cost: 0.0,
    }
}

/// What the streaming loop needs besides the stream itself.
struct StreamCtx<'a> {
    fanout: &'a Fanout,
    conv: &'a ConversationId,
    client_id: &'a str,
    reply_to: u64,
    deps: &'a Deps,
    route: &'a str,
    request: &'a ChatRequest,
    tokens: u32,
    regions: Option<&'a [String]>,
    vault: Option<&'a Vault>,
    system: Option<&'a str>,
}

/// How many times one reply may move to another target after its stream broke.
const MAX_SWITCHES: usize = 2;

/// Forwards deltas until the reply ends, fails, or is cancelled. With the route's
/// `continue_on_fallback`, a stream that breaks after text moves to another target, which
/// continues from the partial reply; the client's deltas simply go on.
async fn stream(
    cx: &StreamCtx<'_>,
    started: crate::provider::Started,
    text: &mut String,
    cancel: &CancellationToken,
) -> Ending {
    let mut guards = Guards {
        restorer: cx.vault.map(|v| (Restorer::default(), v)),
        leak: Leak::new(cx.system.unwrap_or_default()),
    };
    let ending = stream_inner(cx, started, text, cancel, &mut guards).await;
    // Text held back as a possible placeholder goes out before the turn ends.
    guards.flush(cx, text);
    ending
}

/// What the stream passes each delta through: PII restoration and the leak watcher.
struct Guards<'a> {
    restorer: Option<(Restorer, &'a Vault)>,
    leak: Leak,
}

impl Guards<'_> {
    /// Sends and keeps the text the restorer still holds back.
    fn flush(&mut self, cx: &StreamCtx<'_>, text: &mut String) {
        let Some((restorer, vault)) = self.restorer.as_mut() else {
            return;
        };
        let rest = restorer.finish(vault);
        if !rest.is_empty() {
            text.push_str(&rest);
            let frame = ServerFrame::Delta {
                conversation: cx.conv.clone(),
                reply_to: cx.reply_to,
                text: rest,
            };
            cx.fanout.broadcast(&frame, Some(cx.client_id));
        }
    }
}

async fn stream_inner(
    cx: &StreamCtx<'_>,
    started: crate::provider::Started,
    text: &mut String,
    cancel: &CancellationToken,
    guards: &mut Guards<'_>,
) -> Ending {
    let mut provider = started.provider;
    let mut rest = started.rest;
    let mut next = Some(started.first);
    let mut switches = 0;
    loop {
        let event = match next.take() {
            Some(e) => e,
            None => tokio::select! {
                () = cancel.cancelled() => return ending("cancelled", None).switched(switches, &provider),
                e = rest.recv() => e.unwrap_or_else(|| {
                    UpstreamEvent::Failed(crate::provider::ProviderError::Interrupted {
                        provider: provider.clone(),
                        message: "generation ended without a result".into(),
                    })
                }),
            },
        };
        match event {
            UpstreamEvent::Delta(delta) => {
                let delta = match guards.restorer.as_mut() {
                    Some((restorer, vault)) => restorer.push(vault, &delta),
                    None => delta,
                };
                if delta.is_empty() {
                    continue;
                }
                let leaked = guards.leak.push(&delta);
                text.push_str(&delta);
                let frame = ServerFrame::Delta {
                    conversation: cx.conv.clone(),
                    reply_to: cx.reply_to,
                    text: delta,
                };
                cx.fanout.broadcast(&frame, Some(cx.client_id));
                if leaked {
                    tracing::warn!(conversation = %cx.conv, "reply reproduces the system prompt; cut");
                    cx.deps.metrics.guard_event("system_prompt_leak", "cut");
                    let mut cut = ending("content_filter", None);
                    cut.flags.push("system_prompt_leak".into());
                    return cut.switched(switches, &provider);
                }
            }
            UpstreamEvent::Finished {
                finish_reason,
                usage,
                model,
            } => {
                let done = Ending {
                    finish_reason: crate::provider::shown_finish_reason(&finish_reason),
                    error: None,
                    usage,
                    model,
                    provider: None,
                    flags: Vec::new(),
                    complete: finish_reason == "stop",
                };
                return done.switched(switches, &provider);
            }
            UpstreamEvent::Failed(e) if !text.is_empty() => {
                tracing::warn!(error = %e, %provider, "upstream stream broke after text was sent");
                if switches < MAX_SWITCHES && cx.deps.router.continues_on_fallback(cx.route) {
                    // Text the restorer holds back belongs to the part already written.
                    guards.flush(cx, text);
                    let partial = upstream_text(cx, text);
                    let resumed = tokio::select! {
                        () = cancel.cancelled() => return ending("cancelled", None).switched(switches, &provider),
                        r = cx.deps.router.continue_reply(cx.route, cx.request, cx.tokens, &partial, &provider, cx.regions) => r,
                    };
                    match resumed {
                        Ok(s) => {
                            tracing::info!(from = %provider, to = %s.provider, "reply continues on another target");
                            let notice = ServerFrame::Notice {
                                conversation: cx.conv.clone(),
                                reply_to: cx.reply_to,
                                code: "provider_switched",
                                message: format!(
                                    "the reply continues on {} after {provider} failed",
                                    s.provider
                                ),
                                provider: s.provider.clone(),
                            };
                            cx.fanout.broadcast(&notice, Some(cx.client_id));
                            switches += 1;
                            provider = s.provider;
                            rest = s.rest;
                            next = Some(s.first);
                            continue;
                        }
                        Err(e2) => {
                            tracing::warn!(error = %e2, "no target could continue the reply")
                        }
                    }
                }
                let err = ApiError::new(ErrorCode::UpstreamInterrupted, e.to_string());
                return ending("interrupted", Some(err)).switched(switches, &provider);
            }
            UpstreamEvent::Failed(e) => return ending("error", Some(e.into())),
        }
    }
}

/// The reply so far as the upstream wrote it (with placeholders, never the restored PII).
fn upstream_text(cx: &StreamCtx<'_>, text: &str) -> String {
    match cx.vault {
        Some(vault) => vault.clone().redact(text).0,
        None => text.to_owned(),
    }
}

impl Ending {
    /// After a switch the upstream's usage covers only the last part: count it ourselves.
    fn switched(mut self, switches: usize, provider: &str) -> Self {
        if switches > 0 {
            self.usage = None;
            self.provider = Some(provider.to_owned());
        }
        self
    }
}

fn ending(finish_reason: &'static str, error: Option<ApiError>) -> Ending {
    Ending {
        finish_reason,
        error,
        usage: None,
        model: None,
        provider: None,
        flags: Vec::new(),
        complete: false,
    }
}

/// A turn's upstream request and what it was built from.
struct Built {
    request: ChatRequest,
    prompt_tokens: u32,
    /// The PII vault that restores the reply.
    vault: Option<Vault>,
    /// History tokens trimming left out.
    trimmed: u32,
    /// The cache scope of this turn, when it may use the cache.
    scope: Option<crate::cache::index::ScopeKey>,
    /// The new message's embedding, if recall computed it.
    question_vector: Option<Vec<f32>>,
}

/// The earlier messages to send (oldest first), the prompt tokens, and the new message's
/// embedding when choosing them needed it.
type Context = (Vec<MessageRecord>, u32, Option<Vec<f32>>);

/// Older messages recall memory looks at, at most (the newest ones before the window).
const RECALL_SCAN: usize = 1000;
/// How long recall may spend embedding before the turn goes on with the window.
const RECALL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

/// The context of PROTOCOL §6: system prompt, newest earlier messages that fit, new message;
/// in `recall` mode, with the older turns most relevant to the new message.
async fn build_request(deps: &Deps, input: &TurnInput) -> Result<Built, ApiError> {
    let (taken, prompt_tokens, question_vector) = match input.memory {
        MemoryMode::Window => window(deps, input)?,
        MemoryMode::Recall => recall(deps, input).await?,
    };
    let framing = u64::from(tokens::MESSAGE_FRAMING_TOKENS);
    let sent: u64 = taken
        .iter()
        .map(|m| u64::from(m.tokens) + framing)
        .sum::<u64>()
        + u64::from(input.tokens)
        + framing;
    let stored = deps
        .store
        .conversation(&input.conversation)?
        .map_or(0, |c| c.history_tokens);
    let trimmed = u32::try_from(stored.saturating_sub(sent)).unwrap_or(u32::MAX);
    let scope = input.cache.then(|| {
        let context: Vec<(&str, &str)> = taken
            .iter()
            .map(|m| (m.role.as_str(), m.content.as_str()))
            .collect();
        deps.cache.scope_key(&ScopeParts {
            tenant: input.principal.tenant.as_str(),
            route: &input.route,
            system: input.system.as_deref(),
            prompt_version: input.prompt_version.as_deref(),
            context: &context,
            temperature: input.options.temperature,
        })
    });
    let mut messages = Vec::with_capacity(taken.len() + 2);
    if let Some(system) = &input.system {
        messages.push(ChatMessage {
            role: "system",
            content: system.clone(),
        });
    }
    messages.extend(taken.into_iter().map(|m| ChatMessage {
        role: m.role.as_str(),
        content: m.content,
    }));
    messages.push(ChatMessage {
        role: "user",
        content: input.content.clone(),
    });
    let vault = match input.pii {
        // A versioned prompt is the operator's; a conversation's own system text is the client's.
        PiiMode::Redact => Some(redact(
            deps,
            &input.conversation,
            &mut messages,
            input.prompt_version.is_none(),
        )?),
        PiiMode::Off | PiiMode::Block => None,
    };
    let request = ChatRequest {
        model: String::new(),
        messages,
        max_tokens: input.options.max_tokens,
        temperature: input.options.temperature,
    };
    Ok(Built {
        request,
        prompt_tokens,
        vault,
        trimmed,
        scope,
        question_vector,
    })
}

/// Earlier messages of the conversation, newest first, that are sent as context (non-empty),
/// read lazily.
fn earlier<'a>(
    deps: &'a Deps,
    input: &'a TurnInput,
    read_error: &'a mut Option<crate::store::StoreError>,
) -> impl Iterator<Item = MessageRecord> + 'a {
    let user_seq = input.user_seq;
    deps.store
        .messages_newest_first(&input.conversation)
        .filter_map(move |m| m.map_err(|e| *read_error = Some(e)).ok())
        .filter(move |m| m.seq < user_seq && !m.content.is_empty())
}

fn too_large(e: tokens::TooLarge) -> ApiError {
    ApiError::new(ErrorCode::TooLarge, e.to_string())
}

/// The newest earlier messages that fit, oldest first, and the prompt tokens.
fn window(deps: &Deps, input: &TurnInput) -> Result<Context, ApiError> {
    let mut taken = Vec::new();
    let mut read_error = None;
    let history = earlier(deps, input, &mut read_error).map(|m| {
        let t = m.tokens;
        taken.push(m);
        t
    });
    let fitted = fit_history(deps.budget, input.system_tokens, input.tokens, history);
    if let Some(e) = read_error {
        return Err(e.into());
    }
    let (n, prompt_tokens) = fitted.map_err(too_large)?;
    taken.truncate(n);
    taken.reverse();
    Ok((taken, prompt_tokens, None))
}

/// The new message's embedding, then each older message's: stored ones read back, the others
/// embedded in one call and stored for the next turns. `None` when embedding fails.
async fn recall_vectors(
    deps: &Deps,
    input: &TurnInput,
    older: &[MessageRecord],
) -> Option<Vec<Vec<f32>>> {
    let seqs: Vec<u64> = older.iter().map(|m| m.seq).collect();
    let mut stored = deps
        .store
        .recall_vectors(&input.conversation, &seqs)
        .unwrap_or_else(|_| vec![None; seqs.len()]);
    let missing: Vec<usize> = (0..older.len()).filter(|&i| stored[i].is_none()).collect();
    // A provider embedder sees the texts with personal data replaced, like any upstream.
    let remote = deps.cache.embeds_remotely();
    let prepare = |text: &str| {
        if remote {
            Vault::default().redact(text).0
        } else {
            text.to_owned()
        }
    };
    let mut texts = Vec::with_capacity(missing.len() + 1);
    texts.push(prepare(&input.content));
    texts.extend(missing.iter().map(|&i| prepare(&older[i].content)));
    let mut fresh = match deps.cache.embedder().embed(&texts).await {
        Ok(v) if v.len() == texts.len() => v.into_iter(),
        _ => return None,
    };
    let question = fresh.next()?;
    let mut new_ones = Vec::with_capacity(missing.len());
    for (&i, v) in missing.iter().zip(fresh) {
        new_ones.push((older[i].seq, v.clone()));
        stored[i] = Some(v);
    }
    let refs: Vec<(u64, &[f32])> = new_ones.iter().map(|(s, v)| (*s, v.as_slice())).collect();
    if let Err(e) = deps.store.put_recall_vectors(&input.conversation, &refs) {
        tracing::warn!(error = %e, "recall vectors not kept");
    }
    let dim = question.len();
    let mut out = Vec::with_capacity(older.len() + 1);
    out.push(question);
    for v in stored {
        // A vector of another size (another embedder) scores nothing.
        out.push(
            v.filter(|v| v.len() == dim)
                .unwrap_or_else(|| vec![0.0; dim]),
        );
    }
    Some(out)
}

/// Recall mode: when everything fits, the window; otherwise the newest run within the budget
/// less the recall share, plus the older turns most relevant to the new message within what is
/// left, oldest first.
async fn recall(deps: &Deps, input: &TurnInput) -> Result<Context, ApiError> {
    let mut read_error = None;
    let all: Vec<MessageRecord> = earlier(deps, input, &mut read_error)
        .take(RECALL_SCAN)
        .collect();
    if let Some(e) = read_error {
        return Err(e.into());
    }
    let costs = || all.iter().map(|m| m.tokens);
    let (n_all, used_all) =
        fit_history(deps.budget, input.system_tokens, input.tokens, costs()).map_err(too_large)?;
    let window_only = |n: usize, used: u32| {
        let mut run: Vec<MessageRecord> = all[..n].to_vec();
        run.reverse();
        (run, used, None)
    };
    if n_all == all.len() {
        return Ok(window_only(n_all, used_all));
    }
    let share = (f64::from(deps.budget.limit) * f64::from(deps.memory.share)) as u32;
    let run_budget = tokens::ContextBudget {
        limit: deps.budget.limit.saturating_sub(share),
    };
    let Ok((n_run, used_run)) = fit_history(run_budget, input.system_tokens, input.tokens, costs())
    else {
        // The new message and system prompt leave no room for a recall share.
        return Ok(window_only(n_all, used_all));
    };
    if !deps.cache.embedder_allowed(input.principal.regions()) {
        // The embedder is a provider outside this key's regions: the window, not recall.
        return Ok(window_only(n_all, used_all));
    }
    let older = &all[n_run..];
    let embedded = tokio::time::timeout(RECALL_TIMEOUT, recall_vectors(deps, input, older)).await;
    let Ok(Some(mut vectors)) = embedded else {
        tracing::warn!(
            "recall memory unavailable (embedding failed or too slow); sending the window"
        );
        return Ok(window_only(n_all, used_all));
    };
    let framing = tokens::MESSAGE_FRAMING_TOKENS;
    // Oldest first for `choose`.
    let scored: Vec<crate::cache::recall::Older> = older
        .iter()
        .zip(&vectors[1..])
        .rev()
        .map(|(m, v)| crate::cache::recall::Older {
            seq: m.seq,
            is_user: m.role == Role::User,
            cost: m.tokens.saturating_add(framing),
            score: crate::cache::embed::cosine(&vectors[0], v),
        })
        .collect();
    let left = deps.budget.limit.saturating_sub(used_run);
    let chosen = crate::cache::recall::choose(&scored, left, deps.memory.min_similarity);
    let recalled_tokens: u32 = chosen.iter().map(|&i| scored[i].cost).sum();
    // Positions in `older` (newest first) of the recalled messages.
    let mut taken: std::collections::BTreeSet<usize> =
        chosen.iter().map(|&i| older.len() - 1 - i).collect();
    let recalled = taken.len();
    // What recall left unused goes back to the window: it extends backwards while it fits.
    let mut spare = left.saturating_sub(recalled_tokens);
    let mut extended = 0;
    for (pos, m) in older.iter().enumerate() {
        if taken.contains(&pos) {
            continue;
        }
        let cost = m.tokens.saturating_add(framing);
        if cost > spare {
            break;
        }
        spare -= cost;
        extended += 1;
        taken.insert(pos);
    }
    tracing::debug!(
        recalled,
        recalled_tokens,
        window = n_run,
        extended,
        "recall memory"
    );
    // Everything chosen, oldest first: recalled turns, then the newest run.
    let mut out: Vec<MessageRecord> = taken.iter().rev().map(|&p| older[p].clone()).collect();
    out.extend(all[..n_run].iter().rev().cloned());
    let used = deps.budget.limit.saturating_sub(spare);
    // The new message's vector serves the cache lookup too.
    let question = vectors.swap_remove(0);
    Ok((out, used, Some(question)))
}

/// Replaces PII in every message (the system prompt too, unless it is the operator's versioned
/// prompt) with the conversation's placeholders; the vault is kept so the next turns use the
/// same ones.
fn redact(
    deps: &Deps,
    conv: &ConversationId,
    messages: &mut [ChatMessage],
    system_too: bool,
) -> Result<Vault, ApiError> {
    let mut vault: Vault = deps.store.pii_vault(conv)?.unwrap_or_default();
    let before = vault.clone();
    for m in messages
        .iter_mut()
        .filter(|m| system_too || m.role != "system")
    {
        m.content = vault.redact(&m.content).0;
    }
    if vault != before {
        deps.store.put_pii_vault(conv, &vault)?;
    }
    Ok(vault)
}

/// How a stored reply ended, as the frame that announced it: `done`, or `error` for a turn
/// that failed (`None` for a message that is not a reply).
pub fn outcome_frame(
    conv: &ConversationId,
    reply: &MessageRecord,
    client_id: &str,
) -> Option<ServerFrame> {
    let meta = reply.reply.as_ref()?;
    if let Some(err) = &meta.error {
        return Some(ServerFrame::Error(ErrorFrame {
            code: err.code,
            message: err.message.clone(),
            conversation: Some(conv.clone()),
            client_id: Some(client_id.to_owned()),
            reply_to: Some(meta.reply_to),
            retry_after_ms: None,
        }));
    }
    Some(ServerFrame::Done(Done {
        conversation: conv.clone(),
        reply_to: meta.reply_to,
        seq: reply.seq,
        finish_reason: reply.finish_reason.clone().unwrap_or_else(|| "stop".into()),
        usage: meta.usage,
        cached: meta.cached,
        provider: meta.provider.clone(),
        model: meta.model.clone(),
        ttft_ms: meta.ttft_ms,
    }))
}

/// The reply stored for a turn that ended without one (its task panicked), so that history
/// keeps alternating and a resent client id learns how the turn ended.
pub fn failed_reply(user_seq: u64, err: &ApiError) -> MessageRecord {
    MessageRecord {
        flags: Vec::new(),
        seq: user_seq + 1,
        role: Role::Assistant,
        content: String::new(),
        created_at: unix_now(),
        client_id: None,
        finish_reason: Some("error".into()),
        tokens: 0,
        reply: Some(ReplyMeta {
            reply_to: user_seq,
            usage: Usage::default(),
            cached: false,
            provider: String::new(),
            model: String::new(),
            ttft_ms: None,
            prompt_version: None,
            error: Some(StoredError {
                code: err.code,
                message: err.message.clone(),
            }),
        }),
    }
}
