//! The settle step: what a generation used is counted once — metrics, the key's bill, the usage
//! record — and a complete plain reply goes into the semantic cache. A cache hit is settled
//! here too: nothing billed, the saving recorded.

use std::time::Instant;

use super::stream::Streamed;
use super::{Deps, Event, Outcome, Request, Sink};
use crate::cache::index::ScopeKey;
use crate::cache::Hit;
use crate::domain::{FinishReason, Usage};
use crate::store::{CacheRecord, UsageRecord};
use crate::tokens;

/// Serves a cache hit: the stored reply streams through the same events, in pieces of a few
/// words so clients render it as any stream. No upstream is called and the key is charged
/// nothing; the usage record notes what the hit saved.
pub(super) async fn hit(deps: &Deps, req: Request, hit: Hit, sink: &mut impl Sink) -> Outcome {
    let rec = hit.record;
    tracing::debug!(entry = hit.id, similarity = hit.similarity, "cache hit");
    let ttft = req.begun.elapsed();
    sink.emit(Event::Started {
        provider: rec.provider.clone(),
        model: rec.model.clone(),
        tier: req.decided.as_ref().map(|d| d.name.clone()),
    })
    .await;
    for piece in chunks(&rec.reply) {
        sink.emit(Event::Text(piece)).await;
    }
    let completion_tokens = tokens::count_async(req.encoding, rec.reply.clone()).await;
    let mut req = req;
    if let Some(b) = req.bill.as_mut() {
        b.set(0, 0.0);
    }
    drop(req.bill.take());
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
            ..record(
                &req.route,
                &req,
                &rec.provider,
                &rec.model,
                FinishReason::Stop,
            )
        })
        .await;
    Outcome {
        finish: FinishReason::Stop,
        text: rec.reply,
        tool_calls: Vec::new(),
        usage: rec.usage,
        cached: true,
        provider: rec.provider,
        model: rec.model,
        ttft: Some(ttft),
        error: None,
        flags: Vec::new(),
        completion_tokens,
        logprobs: Vec::new(),
        tier: req.decided,
        cost: Some(0.0),
    }
}

/// Settles a generation that went upstream (or tried to).
pub(super) async fn finish(
    deps: &Deps,
    req: Request,
    s: Streamed,
    insert: Option<(ScopeKey, Vec<f32>, String)>,
) -> Outcome {
    let error_code = s.error.as_ref().map(|e| e.code);
    deps.metrics.observe_turn(&s.provider, s.ttft, error_code);
    let tool_calls = s.calls.finish();
    // A conversation stores the reply with its size under our encoding (trimming reads it); a
    // stateless reply whose usage the upstream reported needs no count of ours.
    let completion_tokens = match s.usage {
        Some(u) if req.conversation.is_none() => u.completion_tokens,
        _ => {
            let mut counted_text = s.text.clone();
            for c in &tool_calls {
                counted_text.push_str(&c.name);
                counted_text.push_str(&c.arguments);
            }
            tokens::count_async(req.encoding, counted_text).await
        }
    };
    // A generation that never reached a provider (refused, cancelled before it started) used
    // nothing; one without the upstream's own figures is counted here.
    let reached = s.ttft.is_some();
    let usage = match (s.usage, reached) {
        (Some(u), _) => u,
        (None, true) => Usage::new(req.prompt_tokens(), completion_tokens),
        (None, false) => Usage::default(),
    };
    if s.usage.is_some() && usage.completion_tokens != completion_tokens {
        tracing::debug!(
            reported = usage.completion_tokens,
            counted = completion_tokens,
            "upstream usage differs from our count; the upstream's wins"
        );
    }
    deps.metrics.add_tokens(&s.provider, usage);
    let cost = deps.governor.prices().cost(
        &s.model,
        u64::from(usage.prompt_tokens),
        u64::from(usage.completion_tokens),
    );
    let priced = deps.governor.prices().has(&s.model);
    let mut req = req;
    if let Some(b) = req.bill.as_mut() {
        b.set(u64::from(usage.total_tokens), cost);
    }
    if reached {
        deps.usage
            .record(UsageRecord {
                prompt_tokens: usage.prompt_tokens,
                completion_tokens: usage.completion_tokens,
                ttft_ms: s.ttft.map(|t| t.as_millis() as u64),
                cost,
                trimmed_tokens: req.trimmed_tokens,
                ..record(&req.route, &req, &s.provider, &s.model, s.finish)
            })
            .await;
    }
    // The reservation settles now, before the face answers.
    drop(req.bill.take());
    // Only a complete plain reply is cached: never a cancelled, cut, interrupted or failed one,
    // one with tool calls, or one a guard flagged; and before the face answers, so the next
    // question after it can already hit.
    let complete = s.complete
        && s.finish == FinishReason::Stop
        && s.error.is_none()
        && s.flags.is_empty()
        && tool_calls.is_empty()
        && !s.text.is_empty();
    if let (true, Some((key, vector, question))) = (complete, insert) {
        deps.cache.insert(
            key,
            vector,
            CacheRecord {
                tenant: req.principal.tenant.as_str().to_owned(),
                scope: String::new(),
                question,
                reply: s.text.clone(),
                usage,
                provider: s.provider.clone(),
                model: s.model.clone(),
                conversation: req.conversation.clone(),
                created_ms: 0,
                expires_ms: 0,
            },
        );
    }
    tracing::debug!(
        elapsed_ms = req.begun.elapsed().as_millis() as u64,
        finish_reason = s.finish.as_str(),
        "generation finished"
    );
    Outcome {
        finish: s.finish,
        text: s.text,
        tool_calls,
        usage,
        cached: false,
        provider: s.provider,
        model: s.model,
        ttft: s.ttft,
        error: s.error,
        flags: s.flags,
        completion_tokens,
        logprobs: s.logprobs,
        tier: req.decided,
        cost: priced.then_some(cost),
    }
}

/// A usage record of `req` with nothing used, cached or saved yet.
fn record(
    route: &str,
    req: &Request,
    provider: &str,
    model: &str,
    finish: FinishReason,
) -> UsageRecord {
    UsageRecord {
        ts_ms: chrono::Utc::now().timestamp_millis(),
        tenant: req.principal.tenant.clone(),
        key_id: req.principal.key_id.clone(),
        conversation: req.conversation.clone(),
        route: route.to_owned(),
        provider: provider.to_owned(),
        model: model.to_owned(),
        prompt_tokens: 0,
        completion_tokens: 0,
        cached: false,
        latency_ms: Instant::now().duration_since(req.begun).as_millis() as u64,
        ttft_ms: None,
        cost: 0.0,
        trimmed_tokens: 0,
        finish_reason: finish.as_str().to_owned(),
        saved_tokens: 0,
        saved_cost: 0.0,
        max_tokens_clamped: req.bill.as_ref().and_then(crate::tenant::Bill::clamped),
        tier: req.decided.as_ref().map(|d| d.name.clone()),
    }
}

/// Pieces a cached reply is streamed in: a few words each, white space kept.
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
