//! One turn: store the user message, build the context within the budget, stream the reply from
//! the router to every subscriber, store the reply, answer `done` (or `error`).
//!
//! A turn runs as its own task so the actor's mailbox stays free for `Cancel` and `Subscribe`.
//! Ordering guarantees: the user message is durable before `ack`; the reply is durable before
//! `done`; the deltas' concatenation is exactly the stored content. The request is built and
//! the upstream asked while the user message is being stored; the reply's frames wait for the
//! `ack`; if the message could not be stored, the generation is dropped unfinished.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

use futures_util::future::Either;
use futures_util::FutureExt;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::fanout::Fanout;
use super::frames::{Done, ErrorFrame, ServerFrame};
use super::messages::TurnOptions;
use super::recent::Recent;
use super::Deps;
use crate::cache::ScopeParts;
use crate::domain::MemoryMode;
use crate::domain::{Content, FinishReason, Message, Params, Role, TierReason, Tool, ToolChoice};
use crate::error::{ApiError, ErrorCode};
use crate::generation::{self, CacheSlot, Event, Request, Sink};
use crate::guard::pii::{PiiMode, Vault};
use crate::ids::{unix_now, ConversationId};
use crate::provider::ChatRequest;
use crate::routing::TierAsk;
use crate::store::{MessageRecord, ReplyMeta, StoredError, Usage};
use crate::tenant::{Bill, Principal};
use crate::tokens::{self, fit_history, Encoding, Kind, PromptTokens};
use crate::wire::openai::{ToolCallChunk, WireToolCall};

/// Everything a turn needs to know about its conversation and message.
pub struct TurnInput {
    pub conversation: ConversationId,
    pub route: String,
    pub system: Option<String>,
    pub system_tokens: Option<u32>,
    pub encoding: Encoding,
    pub user_seq: u64,
    pub client_id: String,
    /// The new message: a user message (text or parts) or a tool result.
    pub message: Message,
    /// Messages stored just before it, without replies, with their content tokens.
    pub history: Vec<(Message, u32)>,
    /// Its text (the question the cache and recall compare).
    pub content: String,
    pub tokens: u32,
    /// The tools offered on this conversation's turns.
    pub tools: Vec<Tool>,
    pub tool_choice: Option<ToolChoice>,
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
    /// The conversation's newest messages as its actor keeps them; `None`: read the store.
    pub recent: Option<Arc<Recent>>,
    /// The conversation's `history_tokens` before this turn stored anything.
    pub history_tokens: u64,
    /// The ids of the reply's tool calls, told to the actor before the reply is stored (until
    /// it hears that the turn ended, they are the open calls).
    pub reply_calls: Arc<std::sync::OnceLock<Vec<String>>>,
    /// The span of the request that posted the message (none for a socket).
    pub span: tracing::Span,
}

/// How a turn ended, for its actor.
pub struct TurnEnd {
    /// The conversation's `last_seq` as the turn left it.
    pub last_seq: u64,
    /// What the turn stored, in order.
    pub stored: Vec<MessageRecord>,
    /// A store call failed: what is stored may differ from `stored`.
    pub unsure: bool,
}

/// Runs one turn; answers what it stored.
pub async fn run(
    deps: Arc<Deps>,
    fanout: Fanout,
    input: TurnInput,
    cancel: CancellationToken,
) -> TurnEnd {
    let span = tracing::info_span!(
        parent: &input.span,
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

/// The turn's listeners: every subscriber of the conversation, as frames.
struct FanoutSink<'a> {
    fanout: &'a Fanout,
    /// Frames wait for the user message's ack.
    acked: &'a Gate,
    conversation: &'a ConversationId,
    client_id: &'a str,
    reply_to: u64,
    checkpoint: Option<Checkpoint<'a>>,
}

/// How often a streaming reply's text is checkpointed in cluster mode.
const CHECKPOINT_EVERY: std::time::Duration = std::time::Duration::from_millis(200);

/// Cluster mode: the reply's text so far, written to the store now and then, so that a node
/// taking over this conversation after this one died stores what its watchers saw (most of).
struct Checkpoint<'a> {
    store: &'a crate::store::Store,
    text: String,
    /// When the last checkpoint was written (or the reply began).
    since: std::time::Instant,
    written: bool,
}

impl Checkpoint<'_> {
    fn push(&mut self, conv: &ConversationId, reply_to: u64, delta: &str) {
        self.text.push_str(delta);
        if self.since.elapsed() < CHECKPOINT_EVERY {
            return;
        }
        self.since = std::time::Instant::now();
        self.written = true;
        if let Err(e) = self.store.put_partial(conv, reply_to, &self.text) {
            tracing::debug!(error = %e, "reply checkpoint not written");
        }
    }
}

impl Sink for FanoutSink<'_> {
    async fn emit(&mut self, event: Event) {
        self.acked.wait().await;
        if let (Event::Text(text), Some(c)) = (&event, self.checkpoint.as_mut()) {
            c.push(self.conversation, self.reply_to, text);
        }
        let frame = match event {
            Event::Text(text) => ServerFrame::Delta {
                conversation: self.conversation.clone(),
                reply_to: self.reply_to,
                text,
                tool_calls: None,
            },
            Event::ToolCall(d) => ServerFrame::Delta {
                conversation: self.conversation.clone(),
                reply_to: self.reply_to,
                text: String::new(),
                tool_calls: Some(vec![ToolCallChunk::from(&d)]),
            },
            Event::Switched { from, to } => ServerFrame::Notice {
                conversation: self.conversation.clone(),
                reply_to: self.reply_to,
                code: "provider_switched",
                message: format!("the reply continues on {to} after {from} failed"),
                provider: to,
            },
            Event::Started { .. } | Event::Logprobs(_) => return,
        };
        self.fanout.broadcast(&frame, Some(self.client_id));
    }
}

async fn run_inner(
    deps: &Deps,
    fanout: &Fanout,
    mut input: TurnInput,
    cancel: &CancellationToken,
) -> TurnEnd {
    let mut end = TurnEnd {
        last_seq: input.user_seq - input.history.len() as u64 - 1,
        stored: Vec::with_capacity(input.history.len() + 2),
        unsure: false,
    };
    end.last_seq = run_steps(deps, fanout, &mut input, cancel, &mut end).await;
    end
}

/// Appends `rec` durably, noting it in `end` (or that the store may now differ from it).
async fn store_message(
    deps: &Deps,
    conv: &ConversationId,
    rec: MessageRecord,
    end: &mut TurnEnd,
) -> Result<(), crate::store::StoreError> {
    #[cfg(feature = "fault-injection")]
    if rec.role == Role::User {
        // A write reported failed: a slow one that fails (the reply is generated meanwhile, and
        // must go nowhere), or one that lands all the same (a Redis call that timed out after
        // Redis applied it: the store holds a message its turn was told it does not).
        let applied = rec.content.contains("[[parley:store-fail-applied]]");
        if applied || rec.content.contains("[[parley:store-fail]]") {
            if applied {
                let _ = deps.store.append_message(conv, &rec).await;
            } else {
                tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            }
            end.unsure = true;
            return Err(crate::store::StoreError::Task(
                "fault injection: the append was reported failed".into(),
            ));
        }
    }
    match deps.store.append_message(conv, &rec).await {
        Ok(()) => {
            end.stored.push(rec);
            Ok(())
        }
        Err(e) => {
            end.unsure = true;
            Err(e)
        }
    }
}

/// A turn that failed after its message was acked, before it had a reply: stores the error
/// as the reply (history keeps alternating, and a resent client id hears how it ended).
/// Answers the conversation's `last_seq`; if even that store fails, `end` says so and the
/// actor repairs it before the next turn.
async fn answer_failed(
    deps: &Deps,
    conv: &ConversationId,
    user_seq: u64,
    err: &ApiError,
    end: &mut TurnEnd,
) -> u64 {
    let reply = failed_reply(user_seq, err, FinishReason::Error);
    match store_message(deps, conv, reply, end).await {
        Ok(()) => user_seq + 1,
        Err(_) => user_seq,
    }
}

async fn run_steps(
    deps: &Deps,
    fanout: &Fanout,
    input: &mut TurnInput,
    cancel: &CancellationToken,
    end: &mut TurnEnd,
) -> u64 {
    let conv = input.conversation.clone();
    let cid = input.client_id.clone();
    let fail = |err: ApiError, reply_to: Option<u64>| {
        let mut frame = ErrorFrame::new(&err);
        frame.conversation = Some(conv.clone());
        frame.client_id = Some(cid.clone());
        frame.reply_to = reply_to;
        fanout.broadcast(&ServerFrame::Error(frame), Some(&cid));
    };

    let first_seq = input.user_seq - input.history.len() as u64;
    for (i, (m, tokens)) in std::mem::take(&mut input.history).into_iter().enumerate() {
        let seq = first_seq + i as u64;
        let rec = MessageRecord {
            seq,
            created_at: unix_now(),
            tokens,
            ..record_of(m)
        };
        input.history_tokens += rec.history_cost();
        if let Err(e) = store_message(deps, &conv, rec, end).await {
            fail(e.into(), None);
            return seq - 1;
        }
    }
    let user = MessageRecord {
        flags: input.flags.clone(),
        seq: input.user_seq,
        created_at: unix_now(),
        client_id: Some(input.client_id.clone()),
        tokens: input.tokens,
        ..record_of(input.message.clone())
    };
    input.history_tokens += user.history_cost();

    // The user message's durable write (and its `ack`) runs alongside building the request and
    // the upstream call, so a real upstream's time to first token hides the flush. Nothing of
    // the reply reaches a subscriber before the ack: its frames wait on `acked`. If the write
    // fails, the generation is dropped where it stands (the upstream call closed, the key's
    // reservation given back unused; nothing billed, recorded or cached). A panic of the
    // generation is held until the write has ended, so that it still follows the ack.
    let user_seq = input.user_seq;
    let acked = Gate::default();
    let outcome = {
        let store_user = std::pin::pin!(async {
            let stored = store_message(deps, &conv, user, end).await;
            if stored.is_ok() {
                let ack = ServerFrame::Ack {
                    conversation: conv.clone(),
                    client_id: cid.clone(),
                    seq: user_seq,
                };
                fanout.broadcast(&ack, Some(&cid));
                acked.open();
            }
            stored
        });
        let generate = std::pin::pin!(std::panic::AssertUnwindSafe(generate(
            deps, fanout, input, &acked, cancel
        ))
        .catch_unwind());
        match futures_util::future::select(store_user, generate).await {
            Either::Left((Ok(()), generate)) => Ok(generate.await),
            Either::Left((Err(e), _)) => Err(e),
            Either::Right((generated, store_user)) => store_user.await.map(|()| generated),
        }
    };
    let generated = match outcome {
        Err(e) => {
            fail(e.into(), None);
            return user_seq - 1;
        }
        Ok(Err(panic)) => std::panic::resume_unwind(panic),
        Ok(Ok(generated)) => generated,
    };
    let (out, checkpointed) = match generated {
        Generated::Waiting => return input.user_seq,
        Generated::Failed(err) => {
            fail(err.clone(), Some(input.user_seq));
            return answer_failed(deps, &conv, input.user_seq, &err, end).await;
        }
        Generated::Done(out, checkpointed) => (*out, checkpointed),
    };
    let reply_seq = input.user_seq + 1;
    let reply = MessageRecord {
        flags: out.flags.clone(),
        seq: reply_seq,
        role: Role::Assistant,
        content: out.text,
        created_at: unix_now(),
        client_id: None,
        finish_reason: Some(out.finish.as_str().to_owned()),
        tokens: out.completion_tokens,
        // Calls are kept only from a reply that ended asking for them; a cut one is no call.
        tool_calls: if out.finish == FinishReason::ToolCalls {
            out.tool_calls
        } else {
            Vec::new()
        },
        reply: Some(ReplyMeta {
            reply_to: input.user_seq,
            usage: out.usage,
            cached: out.cached,
            provider: out.provider,
            model: out.model,
            ttft_ms: out.ttft.map(|t| t.as_millis() as u64),
            prompt_version: input.prompt_version.clone(),
            error: out.error.as_ref().map(|e| StoredError {
                code: e.code,
                message: e.message.clone(),
            }),
            tier: out.tier.as_ref().map(|t| t.name.clone()),
            tier_reason: out.tier.as_ref().map(|t| t.reason),
            cost: out.cost,
        }),
        ..MessageRecord::default()
    };
    let outcome = outcome_frame(&conv, &reply, &cid);
    if !reply.tool_calls.is_empty() {
        let _ = input
            .reply_calls
            .set(reply.tool_calls.iter().map(|c| c.id.clone()).collect());
    }
    if let Err(e) = store_message(deps, &conv, reply, end).await {
        fail(e.into(), Some(input.user_seq));
        return input.user_seq;
    }
    if checkpointed {
        // The reply is stored: its checkpoint would only be read for a reply still missing.
        if let Err(e) = deps.store.remove_partial(&conv) {
            tracing::debug!(error = %e, "reply checkpoint not removed");
        }
    }
    match out.error {
        Some(err) => fail(err, Some(input.user_seq)),
        None => {
            if let Some(done) = outcome {
                fanout.broadcast(&done, Some(&cid));
            }
        }
    }
    reply_seq
}

/// Opens once the user message is stored and acked; the reply's frames wait for it. A write
/// that fails leaves it shut: the generation waiting on it is dropped.
#[derive(Default)]
struct Gate {
    open: AtomicBool,
    opened: tokio::sync::Notify,
}

impl Gate {
    fn open(&self) {
        self.open.store(true, Ordering::Release);
        self.opened.notify_waiters();
    }

    async fn wait(&self) {
        while !self.open.load(Ordering::Acquire) {
            // Registered before the second look, so an `open` in between still wakes it.
            let opened = self.opened.notified();
            if self.open.load(Ordering::Acquire) {
                return;
            }
            opened.await;
        }
    }
}

/// How the generation side of a turn ended.
enum Generated {
    /// A tool result while other calls of its reply are still open: no turn runs yet.
    Waiting,
    /// The turn failed before the upstream was asked.
    Failed(ApiError),
    /// The reply, and whether a checkpoint of it was written.
    Done(Box<generation::Outcome>, bool),
}

/// Builds the request and streams the reply to the subscribers once the message is acked
/// (`acked`); runs while the user message is being stored.
async fn generate(
    deps: &Deps,
    fanout: &Fanout,
    input: &mut TurnInput,
    acked: &Gate,
    cancel: &CancellationToken,
) -> Generated {
    if input.message.role == Role::Tool {
        // Which calls are still open is read from the store, with this result in it.
        acked.wait().await;
        // The next turn runs by itself once every call of the reply has its result.
        match super::tools::open_calls(&deps.store, &input.conversation) {
            Ok(open) if !open.is_empty() => return Generated::Waiting,
            Ok(_) => {}
            Err(e) => return Generated::Failed(e.into()),
        }
    }

    // At once, while the message is still being stored: the panic must still follow its ack.
    #[cfg(feature = "fault-injection")]
    if input.content.contains("[[parley:panic]]") {
        crate::error::injected_panic("fault injection: turn panicked");
    }

    let begun = Instant::now();
    let built = match build_request(deps, input).await {
        Ok(r) => r,
        Err(e) => return Generated::Failed(e),
    };
    let conv = &input.conversation;
    let request = Request {
        route: input.route.clone(),
        principal: input.principal.clone(),
        chat: built.request,
        prompt: PromptTokens::known(input.encoding, built.prompt_tokens),
        encoding: input.encoding,
        vault: built.vault,
        system: input.system.clone(),
        cache: built.scope.map(|key| CacheSlot {
            key,
            question: input.content.clone(),
            vector: built.question_vector,
        }),
        conversation: Some(conv.clone()),
        trimmed_tokens: built.trimmed,
        bill: input.bill.take(),
        begun,
        tier: tier_ask(deps, input),
        decided: None,
    };
    let mut sink = FanoutSink {
        fanout,
        acked,
        conversation: conv,
        client_id: &input.client_id,
        reply_to: input.user_seq,
        // The first checkpoint after CHECKPOINT_EVERY: a short reply never writes one.
        checkpoint: deps.store.redis().map(|_| Checkpoint {
            store: &deps.store,
            text: String::new(),
            since: std::time::Instant::now(),
            written: false,
        }),
    };
    let out = generation::run(deps, request, &mut sink, cancel).await;
    let checkpointed = sink.checkpoint.is_some_and(|c| c.written);
    Generated::Done(Box::new(out), checkpointed)
}

/// On a semantic route: the tier the client forced (`options.tier`, checked when the message
/// was posted) and the least tier a recent escalation holds the conversation at — the highest
/// tier the classifier chose among its last `sticky_turns` replies.
fn tier_ask(deps: &Deps, input: &TurnInput) -> TierAsk {
    let Some(tiers) = deps.router.tiers(&input.route) else {
        return TierAsk::default();
    };
    let forced = input.options.tier.as_deref().and_then(|t| tiers.index(t));
    if forced.is_some() || tiers.sticky_turns == 0 {
        return TierAsk { forced, floor: 0 };
    }
    // The stored replies, newest first (read lazily: only the last few are needed; the
    // actor's recent window is bounded by tokens, not turns, and leaves out failed replies).
    let mut floor = 0;
    let replies = deps
        .store
        .messages_newest_first(&input.conversation)
        .filter_map(|m| match m {
            Ok(m) => Some(m),
            Err(e) => {
                tracing::warn!(error = %e, "history unreadable; no sticky tier this turn");
                None
            }
        })
        .filter(|m| m.seq < input.user_seq)
        .filter_map(|m| m.reply)
        .take(tiers.sticky_turns as usize);
    for meta in replies {
        if meta.tier_reason == Some(TierReason::Classified) {
            if let Some(i) = meta.tier.as_deref().and_then(|t| tiers.index(t)) {
                floor = floor.max(i);
            }
        }
    }
    TierAsk { forced, floor }
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
type Context = (Vec<Arc<MessageRecord>>, u32, Option<Vec<f32>>);

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
    let trimmed = u32::try_from(input.history_tokens.saturating_sub(sent)).unwrap_or(u32::MAX);
    let plain = taken
        .iter()
        .all(|m| m.parts.is_none() && m.tool_calls.is_empty() && m.role != Role::Tool);
    let scope = (input.cache && plain).then(|| {
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
    // The seq of each message that is stored history.
    let mut seqs = Vec::with_capacity(taken.len() + 2);
    if let Some(system) = &input.system {
        messages.push(Message::text(Role::System, system.clone()));
        seqs.push(None);
    }
    messages.extend(taken.iter().map(|m| m.to_message()));
    seqs.extend(taken.iter().map(|m| Some(m.seq)));
    messages.push(input.message.clone());
    seqs.push(None);
    let vault = match input.pii {
        // A versioned prompt is the operator's; a conversation's own system text is the client's.
        PiiMode::Redact => Some(redact(
            deps,
            input,
            &mut messages,
            &seqs,
            input.prompt_version.is_none(),
        )?),
        PiiMode::Off | PiiMode::Block => None,
    };
    let request = ChatRequest {
        messages,
        max_tokens: input.options.max_tokens,
        temperature: input.options.temperature,
        tools: input.tools.clone(),
        tool_choice: input.tool_choice.clone(),
        params: Box::new(Params {
            response_format: input.options.turn.response_format.clone(),
            top_p: input.options.turn.top_p,
            parallel_tool_calls: input.options.turn.parallel_tool_calls,
            user: input.options.turn.user.clone(),
            ..Params::default()
        }),
        ..ChatRequest::default()
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

/// Earlier messages of the conversation, newest first, that are sent as context (non-empty):
/// from the actor's [`Recent`] when `recent` allows and it has them (enough for the window,
/// not for recall's look further back), else read lazily from the store.
fn earlier<'a>(
    deps: &'a Deps,
    input: &'a TurnInput,
    recent: bool,
    read_error: &'a mut Option<crate::store::StoreError>,
) -> impl Iterator<Item = Arc<MessageRecord>> + 'a {
    let user_seq = input.user_seq;
    let kept = input.recent.as_ref().filter(|_| recent);
    let stored = kept.is_none().then(|| {
        deps.store
            .messages_newest_first(&input.conversation)
            .filter_map(move |m| m.map_err(|e| *read_error = Some(e)).ok())
            .map(Arc::new)
    });
    let kept = kept.map(|r| r.newest_first().cloned());
    kept.into_iter()
        .flatten()
        .chain(stored.into_iter().flatten())
        .filter(move |m| m.seq < user_seq && m.is_sent())
}

fn too_large(e: tokens::TooLarge) -> ApiError {
    ApiError::new(ErrorCode::TooLarge, e.to_string())
}

/// A message as it is stored (seq, time and tokens left for the caller).
fn record_of(m: Message) -> MessageRecord {
    MessageRecord {
        role: m.role,
        content: m.content.text(),
        parts: match m.content {
            Content::Parts(parts) => Some(parts),
            Content::Text(_) => None,
        },
        tool_calls: m.tool_calls,
        tool_call_id: m.tool_call_id,
        is_error: m.is_error,
        ..MessageRecord::default()
    }
}

/// How a message groups for trimming.
fn kind(m: &Arc<MessageRecord>) -> Kind {
    super::recent::kind(m)
}

/// What the new message costs with the messages that must go with it (for a tool result, the
/// call and the other results: a group is sent whole).
fn new_cost(input: &TurnInput, forced: &[Arc<MessageRecord>]) -> u32 {
    forced.iter().fold(input.tokens, |n, m| {
        n.saturating_add(m.tokens)
            .saturating_add(tokens::MESSAGE_FRAMING_TOKENS)
    })
}

/// The group the new message belongs to, when it is a tool result: the assistant message with
/// the calls and the results stored before this one, newest first.
fn forced_group(
    input: &TurnInput,
    groups: &mut impl Iterator<Item = Vec<Arc<MessageRecord>>>,
) -> Vec<Arc<MessageRecord>> {
    if input.message.role == Role::Tool {
        groups.next().unwrap_or_default()
    } else {
        Vec::new()
    }
}

/// The newest earlier messages that fit, whole groups only, oldest first, and the prompt
/// tokens.
fn window(deps: &Deps, input: &TurnInput) -> Result<Context, ApiError> {
    let mut taken: Vec<Vec<Arc<MessageRecord>>> = Vec::new();
    let mut read_error = None;
    let mut all = tokens::groups(earlier(deps, input, true, &mut read_error), kind);
    let forced = forced_group(input, &mut all);
    let history = all.map(|g| {
        let cost = tokens::group_cost(g.iter().map(|m| m.tokens));
        taken.push(g);
        cost
    });
    let fitted = fit_history(
        deps.budget,
        input.system_tokens,
        new_cost(input, &forced),
        history,
    );
    if let Some(e) = read_error {
        return Err(e.into());
    }
    let (n, prompt_tokens) = fitted.map_err(too_large)?;
    taken.truncate(n);
    let mut run: Vec<Arc<MessageRecord>> = forced
        .into_iter()
        .chain(taken.into_iter().flatten())
        .collect();
    run.reverse();
    Ok((run, prompt_tokens, None))
}

/// The new message's embedding, then each older message's: stored ones read back, the others
/// embedded in one call and stored for the next turns. `None` when embedding fails.
async fn recall_vectors(
    deps: &Deps,
    input: &TurnInput,
    older: &[Arc<MessageRecord>],
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
    let mut groups = tokens::groups(
        earlier(deps, input, false, &mut read_error).take(RECALL_SCAN),
        kind,
    );
    let forced = forced_group(input, &mut groups);
    let all: Vec<Vec<Arc<MessageRecord>>> = groups.collect();
    if let Some(e) = read_error {
        return Err(e.into());
    }
    let new_tokens = new_cost(input, &forced);
    let costs = || {
        all.iter()
            .map(|g| tokens::group_cost(g.iter().map(|m| m.tokens)))
    };
    let (n_all, used_all) =
        fit_history(deps.budget, input.system_tokens, new_tokens, costs()).map_err(too_large)?;
    // The newest `n` groups and the new message's own group, oldest first.
    let run_of = |n: usize| {
        let mut run: Vec<Arc<MessageRecord>> = forced
            .iter()
            .chain(all[..n].iter().flatten())
            .cloned()
            .collect();
        run.reverse();
        run
    };
    let window_only = |n: usize, used: u32| (run_of(n), used, None);
    if n_all == all.len() {
        return Ok(window_only(n_all, used_all));
    }
    let share = (f64::from(deps.budget.limit) * f64::from(deps.memory.share)) as u32;
    let run_budget = tokens::ContextBudget {
        limit: deps.budget.limit.saturating_sub(share),
    };
    let Ok((n_run, used_run)) = fit_history(run_budget, input.system_tokens, new_tokens, costs())
    else {
        // The new message and system prompt leave no room for a recall share.
        return Ok(window_only(n_all, used_all));
    };
    if !deps.cache.embedder_allowed(input.principal.regions()) {
        // The embedder is a provider outside this key's regions: the window, not recall.
        return Ok(window_only(n_all, used_all));
    }
    // Recall picks single messages: tool calls and results, which only travel as a group, stay
    // with the window.
    let older: Vec<Arc<MessageRecord>> = all[n_run..]
        .iter()
        .flatten()
        .filter(|m| kind(m) == Kind::Plain)
        .cloned()
        .collect();
    let older = &older[..];
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
    let mut out: Vec<Arc<MessageRecord>> = taken.iter().rev().map(|&p| older[p].clone()).collect();
    out.extend(run_of(n_run));
    let used = deps.budget.limit.saturating_sub(spare);
    // The new message's vector serves the cache lookup too.
    let question = vectors.swap_remove(0);
    Ok((out, used, Some(question)))
}

/// Replaces PII in every message (the system prompt too, unless it is the operator's versioned
/// prompt) with the conversation's placeholders; the vault is kept so the next turns use the
/// same ones. A stored message (`seqs`) the actor keeps is replaced as an earlier turn did when
/// the vault has not grown since.
fn redact(
    deps: &Deps,
    input: &TurnInput,
    messages: &mut [Message],
    seqs: &[Option<u64>],
    system_too: bool,
) -> Result<Vault, ApiError> {
    let conv = &input.conversation;
    let kept = input.recent.as_deref();
    let mut vault: Vault = deps.store.pii_vault(conv)?.unwrap_or_default();
    // A vault only gains values, so its size tells whether it changed.
    let before = vault.len();
    for (m, seq) in messages
        .iter_mut()
        .zip(seqs)
        .filter(|(m, _)| system_too || m.role != Role::System)
    {
        let kept = seq.zip(kept);
        match kept.and_then(|(seq, k)| k.redacted(seq, vault.len())) {
            Some(Some(content)) => m.content = content,
            Some(None) => {}
            None => {
                let size = vault.len();
                let mut changed = false;
                m.content.map_text(|t| {
                    let out = vault.redact(t).0;
                    changed |= out != t;
                    out
                });
                if let Some((seq, k)) = kept {
                    k.keep_redacted(seq, size, changed.then(|| m.content.clone()));
                }
            }
        }
    }
    if vault.len() != before {
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
        tool_calls: reply.tool_calls.iter().map(WireToolCall::from).collect(),
        tier: meta.tier.clone(),
        cost: meta.cost,
    }))
}

/// The reply stored for a turn that ended without one (its task panicked, or the process died
/// while it ran), so that history keeps alternating and a resent client id learns how the turn
/// ended.
pub fn failed_reply(user_seq: u64, err: &ApiError, finish: FinishReason) -> MessageRecord {
    MessageRecord {
        flags: Vec::new(),
        seq: user_seq + 1,
        role: Role::Assistant,
        content: String::new(),
        created_at: unix_now(),
        client_id: None,
        finish_reason: Some(finish.as_str().to_owned()),
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
            tier: None,
            tier_reason: None,
            cost: None,
        }),
        ..MessageRecord::default()
    }
}
