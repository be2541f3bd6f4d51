//! The route and stream steps: start the generation on the route's first healthy target, pass
//! each delta through the guards on the way out (PII restored, system-prompt leaks cut), and
//! with the route's `continue_on_fallback` move a reply whose stream broke after text to
//! another target, which continues from the partial reply.

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::{Deps, Event, Request, Sink};
use crate::domain::{CallsBuilder, FinishReason, UpstreamFinish, Usage};
use crate::error::{ApiError, ErrorCode};
use crate::guard::injection::Leak;
use crate::guard::pii::{Restorer, Vault};
use crate::provider::{ProviderError, Started, UpstreamEvent};

/// How many times one reply may move to another target after its stream broke.
const MAX_SWITCHES: usize = 2;

/// The room a reply's text starts with.
const REPLY_START: usize = 256;

/// What the stream produced, before it is settled.
pub(super) struct Streamed {
    pub finish: FinishReason,
    /// The upstream itself said the reply is whole.
    pub complete: bool,
    pub error: Option<ApiError>,
    /// What the upstream reported (`None` after a switch: it would cover only the last part).
    pub usage: Option<Usage>,
    pub provider: String,
    pub model: String,
    /// `None` when no target was reached.
    pub ttft: Option<Duration>,
    pub text: String,
    pub calls: CallsBuilder,
    pub flags: Vec<String>,
    pub logprobs: Vec<serde_json::Value>,
}

impl Streamed {
    fn new(finish: FinishReason, error: Option<ApiError>) -> Self {
        Self {
            finish,
            complete: false,
            error,
            usage: None,
            provider: String::new(),
            model: String::new(),
            ttft: None,
            text: String::new(),
            calls: CallsBuilder::default(),
            flags: Vec::new(),
            logprobs: Vec::new(),
        }
    }
}

pub(super) async fn run(
    deps: &Deps,
    req: &Request,
    sink: &mut impl Sink,
    cancel: &CancellationToken,
) -> Streamed {
    let regions = req.principal.regions();
    let start = deps
        .router
        .start(
            &req.route,
            req.tier_index(),
            &req.chat,
            &req.prompt,
            regions,
        )
        .instrument(tracing::Span::current());
    let started = tokio::select! {
        () = cancel.cancelled() => None,
        started = start => Some(started),
    };
    match started {
        // Cancelled before any target answered: the outcome still names where it was going.
        None => {
            let mut s = Streamed::new(FinishReason::Cancelled, None);
            if let Some((provider, model)) =
                deps.router.primary_target(&req.route, req.tier_index())
            {
                (s.provider, s.model) = (provider, model);
            }
            s
        }
        Some(Err(e)) => Streamed::new(FinishReason::Error, Some(e.into())),
        Some(Ok(started)) => {
            let span = tracing::Span::current();
            span.record("provider", started.provider.as_str());
            span.record("ttft_ms", started.ttft.as_millis() as u64);
            let mut out = Streamed::new(FinishReason::Stop, None);
            out.provider.clone_from(&started.provider);
            out.model.clone_from(&started.model);
            out.ttft = Some(started.ttft);
            sink.emit(Event::Started {
                provider: out.provider.clone(),
                model: out.model.clone(),
                tier: req.decided.as_ref().map(|d| d.name.clone()),
            })
            .await;
            let mut guards = Guards {
                restorer: req.vault.as_ref().map(|v| (Restorer::default(), v)),
                leak: Leak::new(req.system.as_deref().unwrap_or_default()),
            };
            pump(deps, req, started, &mut out, &mut guards, sink, cancel).await;
            // Text held back as a possible placeholder goes out before the reply ends.
            guards.flush(&mut out.text, sink).await;
            out
        }
    }
}

/// What each delta passes through: PII restoration and the leak watcher.
struct Guards<'a> {
    restorer: Option<(Restorer, &'a Vault)>,
    leak: Leak,
}

impl Guards<'_> {
    /// Sends and keeps the text the restorer still holds back.
    async fn flush(&mut self, text: &mut String, sink: &mut impl Sink) {
        let Some((restorer, vault)) = self.restorer.as_mut() else {
            return;
        };
        let rest = restorer.finish(vault);
        if !rest.is_empty() {
            text.push_str(&rest);
            sink.emit(Event::Text(rest)).await;
        }
    }
}

/// Forwards deltas until the reply ends, fails, or is cancelled, filling `out`.
async fn pump(
    deps: &Deps,
    req: &Request,
    started: Started,
    out: &mut Streamed,
    guards: &mut Guards<'_>,
    sink: &mut impl Sink,
    cancel: &CancellationToken,
) {
    // The reply is gathered delta by delta: room for a short one from the start.
    out.text.reserve(REPLY_START);
    let mut rest = started.rest;
    let mut next = Some(started.first);
    let mut switches = 0;
    let end = |out: &mut Streamed, finish: FinishReason, error: Option<ApiError>| {
        out.finish = finish;
        out.error = error;
    };
    loop {
        let event = match next.take() {
            Some(e) => e,
            None => tokio::select! {
                () = cancel.cancelled() => return end(out, FinishReason::Cancelled, None),
                e = rest.recv() => e.unwrap_or_else(|| UpstreamEvent::Failed(ProviderError::Interrupted {
                    provider: out.provider.clone(),
                    message: "generation ended without a result".into(),
                })),
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
                out.text.push_str(&delta);
                sink.emit(Event::Text(delta)).await;
                if leaked {
                    tracing::warn!(route = %req.route, "reply reproduces the system prompt; cut");
                    deps.metrics.guard_event("system_prompt_leak", "cut");
                    out.flags.push("system_prompt_leak".into());
                    return end(out, FinishReason::ContentFilter, None);
                }
            }
            UpstreamEvent::ToolCall(d) => {
                out.calls.push(&d);
                sink.emit(Event::ToolCall(d)).await;
            }
            UpstreamEvent::Logprobs(items) => {
                out.logprobs.extend(items.iter().cloned());
                sink.emit(Event::Logprobs(items)).await;
            }
            UpstreamEvent::Finished {
                finish,
                usage,
                model,
            } => {
                let UpstreamFinish { reason, complete } = finish;
                out.complete = complete;
                if switches == 0 {
                    out.usage = usage;
                }
                if let Some(m) = model {
                    out.model = m;
                }
                return end(out, reason, None);
            }
            UpstreamEvent::Failed(e) if out.text.is_empty() && out.calls.is_empty() => {
                return end(out, FinishReason::Error, Some(e.into()));
            }
            UpstreamEvent::Failed(e) => {
                tracing::warn!(error = %e, provider = %out.provider, "upstream stream broke after the reply began");
                let resumable = out.calls.is_empty()
                    && switches < MAX_SWITCHES
                    && deps.router.continues_on_fallback(&req.route);
                if resumable {
                    // Text the restorer holds back belongs to the part already written.
                    guards.flush(&mut out.text, sink).await;
                    let partial = match req.vault.as_ref() {
                        Some(vault) => vault.clone().redact(&out.text).0,
                        None => out.text.clone(),
                    };
                    let resumed = tokio::select! {
                        () = cancel.cancelled() => return end(out, FinishReason::Cancelled, None),
                        r = deps.router.continue_reply(&req.route, req.tier_index(), &req.chat, &req.prompt, &partial, &out.provider, req.principal.regions()) => r,
                    };
                    match resumed {
                        Ok(s) => {
                            tracing::info!(from = %out.provider, to = %s.provider, "reply continues on another target");
                            sink.emit(Event::Switched {
                                from: out.provider.clone(),
                                to: s.provider.clone(),
                            })
                            .await;
                            switches += 1;
                            out.provider = s.provider;
                            out.usage = None;
                            rest = s.rest;
                            next = Some(s.first);
                            continue;
                        }
                        Err(e2) => {
                            tracing::warn!(error = %e2, "no target could continue the reply");
                        }
                    }
                }
                let err = ApiError::new(ErrorCode::UpstreamInterrupted, e.to_string());
                return end(out, FinishReason::Interrupted, Some(err));
            }
        }
    }
}
