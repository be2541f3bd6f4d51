//! The one generation path every face drives — WebSocket and REST turns, `/v1/chat/completions`,
//! `/v1/responses` — in PROTOCOL order: admit → guard → context → cache → route → stream →
//! settle. The faces do what only they know (their wire format, a conversation's history and
//! storage) and hand [`run`] a [`Request`]; it answers an [`Outcome`] and streams [`Event`]s to
//! the face's [`Sink`] meanwhile. A rule that every face must keep (a guard, a cache condition,
//! a billing step) lives here, where no face can forget it.

mod screen;
mod settle;
mod stream;

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use screen::{screen, Screened};

use crate::cache::index::ScopeKey;
use crate::cache::{Outcome as Looked, Query};
use crate::domain::{FinishReason, ToolCall, ToolCallDelta, Usage};
use crate::error::ApiError;
use crate::guard::pii::Vault;
use crate::ids::ConversationId;
use crate::metrics::Metrics;
use crate::provider::{ChatRequest, Router};
use crate::routing::{Routing, TierAsk, TierDecision};
use crate::store::Store;
use crate::tenant::{Bill, Principal};
use crate::tokens::{ContextBudget, Encoding, PromptTokens};

/// What every generation shares.
pub struct Deps {
    pub store: Store,
    pub router: Router,
    pub budget: ContextBudget,
    pub metrics: Metrics,
    pub idle_timeout: Duration,
    pub max_queued_turns: usize,
    /// Conversations one tenant may keep stored.
    pub max_conversations_per_tenant: u64,
    /// Cancelled at shutdown: every turn's token is a child of it.
    pub shutdown: CancellationToken,
    /// Every running turn, so shutdown can wait for them to store their replies.
    pub tasks: TaskTracker,
    /// Per-key limits and quotas.
    pub governor: Arc<crate::tenant::Governor>,
    /// Where each generation's usage record goes.
    pub usage: crate::tenant::usage::UsageRecorder,
    /// The semantic cache (and the embedder recall memory uses).
    pub cache: crate::cache::Cache,
    /// Recall memory settings.
    pub memory: MemorySettings,
    /// Cluster mode: this node's leases on conversations (none on a single node).
    pub cluster: Option<crate::cluster::Cluster>,
    /// The classifiers of the semantic routes.
    pub routing: Routing,
}

/// `[context]` settings of recall memory.
#[derive(Debug, Clone, Copy)]
pub struct MemorySettings {
    /// The mode of conversations created without one.
    pub mode: crate::domain::MemoryMode,
    /// Share of the prompt budget for recalled turns.
    pub share: f32,
    /// Least similarity a recalled turn needs.
    pub min_similarity: f32,
}

/// Where a generation may be served from, and stored in, the semantic cache.
pub struct CacheSlot {
    pub key: ScopeKey,
    /// The new message, compared by similarity.
    pub question: String,
    /// Its embedding, when the face already has it (recall memory computed it).
    pub vector: Option<Vec<f32>>,
}

/// One generation, admitted, guarded and with its context built by the face.
pub struct Request {
    /// The route (model name) the client asked for.
    pub route: String,
    pub principal: Principal,
    /// What goes upstream: personal data already replaced when `vault` is set.
    pub chat: ChatRequest,
    /// The prompt's size in tokens, counted from `chat` when something needs it.
    pub prompt: PromptTokens,
    pub encoding: Encoding,
    /// Restores the personal data the request's placeholders stand for, in the reply.
    pub vault: Option<Vault>,
    /// The system prompt the leak watcher keeps out of the reply.
    pub system: Option<String>,
    /// `None`: the cache is not used (the face or the request opted out, or it is not plain).
    pub cache: Option<CacheSlot>,
    /// The conversation it is a turn of, for usage records and cache entries.
    pub conversation: Option<ConversationId>,
    /// History tokens trimming left out.
    pub trimmed_tokens: u32,
    /// The key's reservation, settled with what the generation used.
    pub bill: Option<Bill>,
    pub begun: Instant,
    /// A semantic route: the tier the client forced, the conversation's sticky floor.
    pub tier: TierAsk,
    /// A semantic route: the tier chosen ([`run`] decides it first).
    pub decided: Option<TierDecision>,
}

impl Request {
    /// The tier the generation runs on (0 on a plain route).
    pub fn tier_index(&self) -> usize {
        self.decided.as_ref().map_or(0, |d| d.index)
    }

    /// The prompt's size in tokens (counted now if it has not been).
    pub fn prompt_tokens(&self) -> u32 {
        self.prompt.of(&self.chat.messages, &self.chat.tools)
    }
}

/// What a face hears while the reply streams.
#[derive(Debug, Clone)]
pub enum Event {
    /// A target answered (or the cache did): who writes the reply, and on a semantic route
    /// the tier it was chosen from.
    Started {
        provider: String,
        model: String,
        tier: Option<String>,
    },
    /// Reply text, PII restored.
    Text(String),
    /// A fragment of a tool call.
    ToolCall(ToolCallDelta),
    /// Log probabilities of the next text.
    Logprobs(Vec<serde_json::Value>),
    /// The reply continues on another target after `from` failed.
    Switched { from: String, to: String },
}

/// A face's listener. `emit` may wait (a slow HTTP client holds the stream back, bounded).
pub trait Sink {
    fn emit(&mut self, event: Event) -> impl std::future::Future<Output = ()> + Send;
}

/// How a generation ended.
#[derive(Debug)]
pub struct Outcome {
    pub finish: FinishReason,
    /// The reply as the client saw it (PII restored).
    pub text: String,
    pub tool_calls: Vec<ToolCall>,
    pub usage: Usage,
    pub cached: bool,
    /// The provider that wrote (the end of) the reply; empty when none was reached.
    pub provider: String,
    pub model: String,
    pub ttft: Option<Duration>,
    pub error: Option<ApiError>,
    /// Guardrail findings on the reply (`system_prompt_leak`).
    pub flags: Vec<String>,
    /// Completion tokens of `text` under the request's encoding (counted once, here).
    pub completion_tokens: u32,
    pub logprobs: Vec<serde_json::Value>,
    /// A semantic route: the tier the request went to, and why.
    pub tier: Option<TierDecision>,
    /// What it cost at the price table (0 for a cached reply); `None` for a model the table
    /// has no price for.
    pub cost: Option<f64>,
}

/// Runs one generation: the cache, then the route with its fallbacks, streaming to `sink`, then
/// the settlement (metrics, bill, usage record, cache entry). Never fails: a failure is an
/// outcome with `error` set and `finish_reason` `error` (or `interrupted` after text).
///
/// Its span is the GenAI semantic conventions' `chat` operation: the route asked for, the
/// provider and model that answered, the tokens, the finish reason, the tier; fallbacks,
/// retries and cache hits are its events, each upstream attempt a child span.
pub async fn run(
    deps: &Deps,
    req: Request,
    sink: &mut impl Sink,
    cancel: &CancellationToken,
) -> Outcome {
    use tracing::field::Empty;
    let span = tracing::info_span!(
        "chat",
        otel.name = %format_args!("chat {}", req.route),
        otel.kind = "internal",
        gen_ai.operation.name = "chat",
        gen_ai.request.model = %req.route,
        gen_ai.request.max_tokens = req.chat.max_tokens.map(i64::from),
        gen_ai.provider.name = Empty,
        gen_ai.response.model = Empty,
        gen_ai.usage.input_tokens = Empty,
        gen_ai.usage.output_tokens = Empty,
        gen_ai.response.finish_reasons = Empty,
        gen_ai.conversation.id = req.conversation.as_ref().map(|c| c.to_string()),
        parley.cached = Empty,
        parley.tier = Empty,
        error.type = Empty,
    );
    // Content goes in an event of the traces' own target, never a span field: span fields
    // are printed on every log line inside the span.
    let captured = crate::telemetry::captures_content();
    let input = captured.then(|| input_messages(&req.chat));
    let (route, begun) = (req.route.clone(), req.begun);
    let out =
        tracing::Instrument::instrument(run_inner(deps, req, sink, cancel), span.clone()).await;
    // A span no layer wants (logs above info, no exporter) records nothing: its fields are not
    // even formatted.
    if !span.is_disabled() {
        record_outcome(&span, &out);
    }
    deps.metrics
        .observe_gen_ai(&crate::metrics::GenAiObservation {
            request_model: &route,
            provider: &out.provider,
            response_model: &out.model,
            duration: begun.elapsed(),
            // A cached reply's first token says nothing of a provider's speed.
            ttft: out.ttft.filter(|_| !out.cached),
            input_tokens: out.usage.prompt_tokens,
            output_tokens: out.usage.completion_tokens,
            error: out.error.as_ref().map(|e| e.code.as_str()),
        });
    if let Some(input) = input {
        let output = serde_json::json!([{
            "role": "assistant",
            "parts": [{"type": "text", "content": out.text}],
            "finish_reason": out.finish.as_str(),
        }]);
        span.in_scope(|| {
            tracing::debug!(
                target: crate::telemetry::OTEL_TARGET,
                { gen_ai.input.messages = %input, gen_ai.output.messages = %output },
                "gen_ai.client.inference.operation.details"
            );
        });
    }
    out
}

/// The outcome's GenAI attributes on the generation's span.
fn record_outcome(span: &tracing::Span, out: &Outcome) {
    if !out.provider.is_empty() {
        span.record("gen_ai.provider.name", out.provider.as_str());
    }
    if !out.model.is_empty() {
        span.record("gen_ai.response.model", out.model.as_str());
    }
    // As signed integers: OTLP's integer attributes are i64.
    span.record(
        "gen_ai.usage.input_tokens",
        i64::from(out.usage.prompt_tokens),
    );
    span.record(
        "gen_ai.usage.output_tokens",
        i64::from(out.usage.completion_tokens),
    );
    span.record(
        "gen_ai.response.finish_reasons",
        format!("[\"{}\"]", out.finish.as_str()).as_str(),
    );
    span.record("parley.cached", out.cached);
    if let Some(t) = &out.tier {
        span.record("parley.tier", t.name.as_str());
    }
    if let Some(e) = &out.error {
        span.record("error.type", e.code.as_str());
    }
}

/// The request's messages as the GenAI conventions' `gen_ai.input.messages` (text parts).
fn input_messages(chat: &ChatRequest) -> String {
    let messages: Vec<serde_json::Value> = chat
        .messages
        .iter()
        .map(|m| {
            serde_json::json!({
                "role": m.role.as_str(),
                "parts": [{"type": "text", "content": m.content.text()}],
            })
        })
        .collect();
    serde_json::Value::Array(messages).to_string()
}

async fn run_inner(
    deps: &Deps,
    mut req: Request,
    sink: &mut impl Sink,
    cancel: &CancellationToken,
) -> Outcome {
    if let Some(tiers) = deps.router.tiers(&req.route) {
        let embed = deps.cache.embedder_allowed(req.principal.regions());
        let allowed = deps
            .router
            .tiers_allowed(&req.route, req.principal.regions());
        let (decided, question) = deps
            .routing
            .decide(&req.route, tiers, &req.chat, req.tier, embed, &allowed)
            .await;
        // The same embedder made it: the cache's lookup of the same text needs no other.
        if let (Some(slot), Some(v)) = (req.cache.as_mut(), question) {
            let newest_user = req
                .chat
                .messages
                .iter()
                .rev()
                .find(|m| m.role == crate::domain::Role::User);
            if slot.vector.is_none()
                && newest_user.is_some_and(|m| m.content.text() == slot.question)
            {
                slot.vector = Some(v);
            }
        }
        deps.metrics
            .count_tier(&req.route, &decided.name, decided.label());
        tracing::debug!(tier = %decided.name, reason = decided.label(), score = ?decided.score, "tier chosen");
        req.decided = Some(decided);
    }
    let mut looked = None;
    if let Some(slot) = req.cache.take() {
        // A semantic route keeps each tier's replies apart: a cheap tier's reply never
        // answers a request that needs a stronger one.
        let key = match &req.decided {
            Some(d) => crate::cache::service::tier_scope(slot.key, &d.name),
            None => slot.key,
        };
        let query = Query {
            key,
            tenant: req.principal.tenant.as_str(),
            question: &slot.question,
            max_tokens: req.chat.max_tokens,
        };
        let l = deps.cache.lookup(query, slot.vector).await;
        if let Looked::Hit(hit) = l.outcome {
            tracing::debug!(
                target: crate::telemetry::OTEL_TARGET,
                { parley.cache.similarity = hit.similarity },
                "cache_hit"
            );
            return settle::hit(deps, req, hit, sink).await;
        }
        looked = l.vector.map(|v| (l.key, v, slot.question));
    }
    let streamed = stream::run(deps, &req, sink, cancel).await;
    settle::finish(deps, req, streamed, looked).await
}
