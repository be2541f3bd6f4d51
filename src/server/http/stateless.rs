//! The stateless path shared by `/v1/chat/completions` and `/v1/responses` with `store: false`:
//! the steps before the generation core that a conversation would otherwise take (route and
//! model checks, parameters, guards, PII redaction, counting, admission, cache scope), and the
//! generation running on its own task, its events and outcome sent to the response.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use bytes::{Bytes, BytesMut};
use futures_util::{FutureExt, Stream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::cache::ScopeParts;
use crate::domain::{FinishReason, Role};
use crate::error::{ApiError, ErrorCode};
use crate::generation::{self, CacheSlot, Deps, Event, Outcome, Request, Sink};
use crate::guard::pii::{PiiMode, Vault};
use crate::provider::ChatRequest;
use crate::tenant::{Bill, Principal};
use crate::tokens::PromptTokens;

/// Events buffered between the generation and a slow HTTP client.
const EVENT_BUFFER: usize = 64;

/// The most bytes a streaming body gathers into one chunk before handing it to the connection.
const BODY_CHUNK: usize = 32 * 1024;

/// The room a streaming body's buffer starts with: a short answer that arrived whole fits
/// without the buffer growing (and being copied) chunk by chunk.
const FIRST_CHUNK: usize = 4 * 1024;

/// Admission, guards and the cache scope of a stateless request: the steps before the core.
pub fn prepare(
    deps: &Deps,
    p: Principal,
    route: &str,
    mut chat: ChatRequest,
    tier: Option<&str>,
) -> Result<Request, ApiError> {
    if !deps.router.has_route(route) {
        return Err(ApiError::new(
            ErrorCode::ModelNotFound,
            format!("model {route:?} does not exist"),
        ));
    }
    p.check_model(route)?;
    let forced = tier.map(|t| deps.router.tier_index(route, t)).transpose()?;
    deps.router.check_request(route, &mut chat)?;
    deps.router.check_regions(route, forced, p.regions())?;
    let texts: Vec<String> = chat.messages.iter().map(|m| m.content.text()).collect();
    // Injections are looked for in the newest user message; personal data everywhere.
    let newest_user = chat
        .messages
        .iter()
        .rposition(|m| m.role == Role::User)
        .unwrap_or(0);
    let screened = generation::screen(
        deps,
        route,
        &p,
        &texts[newest_user],
        texts.iter().map(String::as_str),
    )?;
    let vault = match screened.pii {
        PiiMode::Redact => {
            let mut vault = Vault::default();
            // Every message comes from the client here, system messages included.
            for m in &mut chat.messages {
                m.content.map_text(|t| vault.redact(t).0);
            }
            (!vault.is_empty()).then_some(vault)
        }
        PiiMode::Off | PiiMode::Block => None,
    };
    let encoding = deps.router.encoding(route);
    let prompt = PromptTokens::uncounted(encoding);
    let price_model = deps
        .router
        .reserve_model(route, forced)
        .unwrap_or(route)
        .to_owned();
    // Only a key with token or spend limits needs the prompt's size before the answer.
    let reserved_prompt = if deps.governor.limits_tokens(&p) {
        prompt.of(&chat.messages, &chat.tools)
    } else {
        0
    };
    let reservation = deps
        .governor
        .admit(&p, &price_model, reserved_prompt, chat.max_tokens)?;
    if let Some(max) = reservation.as_ref().and_then(|r| r.max_tokens()) {
        chat.max_tokens = Some(max);
    }
    let cacheable = vault.is_none()
        && chat.is_plain()
        && chat.messages.last().is_some_and(|last| {
            last.role == Role::User
                && deps.cache.admits(
                    &p,
                    deps.router.caches(route),
                    &last.content.text(),
                    !screened.flags.is_empty(),
                )
        });
    let cache = cacheable.then(|| cache_slot(deps, &p, route, &chat));
    Ok(Request {
        route: route.to_owned(),
        bill: Some(Bill::new(Arc::clone(&deps.governor), reservation)),
        principal: p,
        chat,
        prompt,
        encoding,
        vault,
        system: None,
        cache,
        conversation: None,
        trimmed_tokens: 0,
        begun: std::time::Instant::now(),
        tier: crate::routing::TierAsk { forced, floor: 0 },
        decided: None,
    })
}

/// The cache scope of a stateless request: a leading system message is the system prompt, the
/// messages between it and the last are the context, so a conversation's first turn and the same
/// stateless request share entries.
fn cache_slot(deps: &Deps, p: &Principal, route: &str, chat: &ChatRequest) -> CacheSlot {
    let texts: Vec<(&'static str, String)> = chat
        .messages
        .iter()
        .map(|m| (m.role.as_str(), m.content.text()))
        .collect();
    let (question, before) = match texts.split_last() {
        Some((last, before)) => (last.1.clone(), before),
        None => (String::new(), &texts[..]),
    };
    let (system, context) = match before.split_first() {
        Some((first, rest)) if first.0 == "system" => (Some(first.1.as_str()), rest),
        _ => (None, before),
    };
    let context: Vec<(&str, &str)> = context.iter().map(|(r, c)| (*r, c.as_str())).collect();
    let key = deps.cache.scope_key(&ScopeParts {
        tenant: p.tenant.as_str(),
        route,
        system,
        prompt_version: None,
        context: &context,
        temperature: chat.temperature,
    });
    CacheSlot {
        key,
        question,
        vector: None,
    }
}

/// What the generation sends the response: its events, then its outcome.
pub enum Piece {
    Event(Event),
    Done(Box<Outcome>),
}

struct ChannelSink(mpsc::Sender<Piece>);

impl Sink for ChannelSink {
    async fn emit(&mut self, event: Event) {
        // A client that left is noticed through the cancel token; what it missed is lost with it.
        let _ = self.0.send(Piece::Event(event)).await;
    }
}

type Generation = Pin<Box<dyn Future<Output = ()> + Send>>;

/// A generation driven by the response that reads it: polling for the next piece runs the
/// generation as far as it can go on the caller's own task, so a request costs no task hand-off
/// per event, and the events of one upstream read are ready together. Dropped before the end
/// (the client went away), the generation is cancelled and finishes on a task of its own,
/// settling what it used.
pub struct Running {
    generation: Option<Generation>,
    rx: mpsc::Receiver<Piece>,
    cancel: CancellationToken,
    tasks: TaskTracker,
}

impl Running {
    pub fn start(deps: Arc<Deps>, request: Request) -> Self {
        let (tx, rx) = mpsc::channel(EVENT_BUFFER);
        let cancel = CancellationToken::new();
        let token = cancel.clone();
        let tasks = deps.tasks.clone();
        // The generation's span is a child of the request's.
        let span = tracing::Span::current();
        let generation = async move {
            let mut sink = ChannelSink(tx);
            let run = generation::run(&deps, request, &mut sink, &token);
            // A panic ends this generation with an error outcome, never the worker.
            let out = AssertUnwindSafe(run)
                .catch_unwind()
                .await
                .unwrap_or_else(|_| lost());
            let _ = sink.0.send(Piece::Done(Box::new(out))).await;
        };
        Self {
            generation: Some(Box::pin(tracing::Instrument::instrument(generation, span))),
            rx,
            cancel,
            tasks,
        }
    }

    /// Runs the generation until it waits, then takes the next piece it produced, if any.
    pub fn poll_piece(&mut self, cx: &mut Context<'_>) -> Poll<Piece> {
        if let Some(generation) = self.generation.as_mut() {
            if generation.as_mut().poll(cx).is_ready() {
                self.generation = None;
            }
        }
        self.rx
            .poll_recv(cx)
            .map(|p| p.unwrap_or_else(|| Piece::Done(Box::new(lost()))))
    }

    pub async fn next(&mut self) -> Piece {
        std::future::poll_fn(|cx| self.poll_piece(cx)).await
    }

    /// A response body of the generation's pieces rendered by `render` into the buffer it is
    /// given (returning whether that piece ended the answer). Every piece ready when the body is
    /// polled leaves in one chunk of bytes (at most [`BODY_CHUNK`]): what the upstream reader
    /// passed on together (one burst, `provider::sse`) reaches the client in one write, and a
    /// reply that trickles in leaves piece by piece, each at once.
    pub fn body<S: 'static>(
        mut self,
        mut state: S,
        mut render: impl FnMut(&mut S, Piece, &mut BytesMut) -> bool + 'static,
    ) -> impl Stream<Item = Result<Bytes, actix_web::Error>> {
        let mut buf = BytesMut::with_capacity(FIRST_CHUNK);
        let mut ended = false;
        futures_util::stream::poll_fn(move |cx| {
            while !ended && buf.len() < BODY_CHUNK {
                match self.poll_piece(cx) {
                    Poll::Ready(piece) => ended = render(&mut state, piece, &mut buf),
                    Poll::Pending => break,
                }
            }
            if buf.is_empty() {
                return if ended {
                    Poll::Ready(None)
                } else {
                    Poll::Pending
                };
            }
            Poll::Ready(Some(Ok(buf.split().freeze())))
        })
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        let Some(generation) = self.generation.take() else {
            return;
        };
        self.cancel.cancel();
        // Outside a runtime (the process is ending) there is nothing left to settle on.
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            self.tasks.spawn_on(generation, &rt);
        }
    }
}

/// The outcome of a generation that ended without one (it panicked).
fn lost() -> Outcome {
    Outcome {
        finish: FinishReason::Error,
        text: String::new(),
        tool_calls: Vec::new(),
        usage: crate::domain::Usage::default(),
        cached: false,
        provider: String::new(),
        model: String::new(),
        ttft: None,
        error: Some(ApiError::new(ErrorCode::Internal, "the generation failed")),
        flags: Vec::new(),
        completion_tokens: 0,
        logprobs: Vec::new(),
        tier: None,
        cost: None,
    }
}

/// The header that forces a semantic route's tier on any HTTP request.
pub const TIER_HEADER: &str = "x-parley-tier";

/// The tier a request's `x-parley-tier` header forces, if any.
///
/// # Errors
/// `bad_request` for a value that is not text.
pub fn tier_header(req: &actix_web::HttpRequest) -> Result<Option<String>, ApiError> {
    req.headers()
        .get(TIER_HEADER)
        .map(|v| {
            v.to_str()
                .map(|t| t.trim().to_owned())
                .map_err(|_| ApiError::bad_request("x-parley-tier: not a tier name"))
        })
        .transpose()
}

/// Names the tier that answered in the response's `x-parley-tier` header.
pub fn with_tier(mut resp: actix_web::HttpResponse, tier: Option<&str>) -> actix_web::HttpResponse {
    if let Some(v) = tier.and_then(|t| actix_web::http::header::HeaderValue::from_str(t).ok()) {
        resp.headers_mut().insert(
            actix_web::http::header::HeaderName::from_static(TIER_HEADER),
            v,
        );
    }
    resp
}

/// The error a failed outcome answers: after part of a reply, `upstream_interrupted`.
pub fn failure(out: &mut Outcome) -> Option<ApiError> {
    let mut err = out.error.take()?;
    if !out.text.is_empty() || !out.tool_calls.is_empty() {
        err.code = ErrorCode::UpstreamInterrupted;
    }
    Some(err)
}
