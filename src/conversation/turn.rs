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
use crate::error::{ApiError, ErrorCode};
use crate::guard::injection::Leak;
use crate::guard::pii::{PiiMode, Restorer, Vault};
use crate::ids::{unix_now, ConversationId};
use crate::provider::{ChatMessage, ChatRequest, UpstreamEvent};
use crate::store::UsageRecord;
use crate::store::{MessageRecord, ReplyMeta, Role, StoredError, Usage};
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

    let (request, prompt_tokens, vault, trimmed_tokens) = match build_request(deps, &input) {
        Ok(r) => r,
        Err(e) => {
            fail(e, Some(input.user_seq));
            return input.user_seq;
        }
    };
    let reply_seq = input.user_seq + 1;
    let begun = Instant::now();
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
                ts_ms: chrono::Utc::now().timestamp_millis(),
                tenant: input.principal.tenant.clone(),
                key_id: input.principal.key_id.clone(),
                conversation: Some(conv.clone()),
                route: input.route.clone(),
                provider: provider.clone(),
                model: model.clone(),
                prompt_tokens: usage.prompt_tokens,
                completion_tokens: usage.completion_tokens,
                cached: false,
                latency_ms: begun.elapsed().as_millis() as u64,
                ttft_ms: ttft.map(|t| t.as_millis() as u64),
                cost,
                trimmed_tokens,
                finish_reason: ending.finish_reason.to_owned(),
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
                let reason = match finish_reason.as_str() {
                    "length" => "length",
                    "content_filter" => "content_filter",
                    "tool_calls" => "tool_calls",
                    _ => "stop",
                };
                let done = Ending {
                    finish_reason: reason,
                    error: None,
                    usage,
                    model,
                    provider: None,
                    flags: Vec::new(),
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
    }
}

/// The request, its prompt tokens, the PII vault that restores the reply, and the history
/// tokens trimming left out.
type Built = (ChatRequest, u32, Option<Vault>, u32);

/// The context of PROTOCOL §6: system prompt, newest earlier messages that fit, new message.
fn build_request(deps: &Deps, input: &TurnInput) -> Result<Built, ApiError> {
    let mut taken = Vec::new();
    let mut read_error = None;
    let history = deps
        .store
        .messages_newest_first(&input.conversation)
        .filter_map(|m| m.map_err(|e| read_error = Some(e)).ok())
        .filter(|m| m.seq < input.user_seq && !m.content.is_empty())
        .map(|m| {
            let t = m.tokens;
            taken.push(m);
            t
        });
    let fitted = fit_history(deps.budget, input.system_tokens, input.tokens, history);
    if let Some(e) = read_error {
        return Err(e.into());
    }
    let (n, prompt_tokens) =
        fitted.map_err(|e| ApiError::new(ErrorCode::TooLarge, e.to_string()))?;
    taken.truncate(n);
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
    let mut messages = Vec::with_capacity(n + 2);
    if let Some(system) = &input.system {
        messages.push(ChatMessage {
            role: "system",
            content: system.clone(),
        });
    }
    messages.extend(taken.into_iter().rev().map(|m| ChatMessage {
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
    Ok((request, prompt_tokens, vault, trimmed))
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
