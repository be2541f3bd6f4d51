//! `ProviderActor`: the one path to a provider. A provider has one [`Deployment`] per API key,
//! each with its buckets, concurrency cap and breaker, held in [`Limits`]. A request goes to the
//! least busy deployment that can take it; one that cannot start now waits in the actor's
//! bounded queue up to the provider's `queue_timeout_ms`, else is refused with `Limited` (or
//! `Unavailable` when every breaker is open) so the router can move on.
//!
//! The common case never crosses a thread: while nobody is queued, the caller takes a slot
//! under the limits' lock ([`ProviderHandle::dispatch`](super::ProviderHandle)) and runs the
//! generation on its own thread, so an upstream stream is read where its client reads it. Only a
//! request that must wait goes to the actor, which owns the queue and its timers. Each generation
//! reports how it ended to the limits, which feeds the buckets, the breaker and the latency
//! figures, and wakes the actor when someone waits.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::prelude::*;
use parking_lot::Mutex;
use secrecy::SecretString;
use tokio::sync::{mpsc, oneshot};

use super::backend::Backend;
use super::deployment::{Deployment, DeploymentInfo, Outcome, Refusal};
use super::{ChatRequest, ProviderError, RateHeaders, UpstreamEvent, STREAM_BUFFER};
use crate::cluster::redis::Redis;
use crate::config::ProviderConfig;
use crate::limits::Transition;

mod shared;

use shared::SharedBuckets;

/// Mailbox capacity: requests beyond this wait in the sender's `send()`.
const MAILBOX: usize = 1024;

/// Figures the router reads without a round trip (for `least_busy`).
#[derive(Debug, Default)]
pub struct ProviderStats {
    pub in_flight: AtomicUsize,
    /// Recent time to first token in microseconds (0 = unknown).
    pub ttft_us: AtomicU64,
}

/// A generation admitted by a provider: its events, and which deployment serves it.
pub struct Generation {
    pub rx: mpsc::Receiver<UpstreamEvent>,
    pub key_index: usize,
}

type Reply = oneshot::Sender<Result<Generation, ProviderError>>;

/// A provider's deployments, shared by its actor and the callers that start generations
/// directly. Every critical section is a few bucket updates: no I/O, no await under the lock.
pub struct Limits {
    name: String,
    deployments: Mutex<Vec<Deployment>>,
    /// Requests waiting in the actor's queue: while there are any, callers join the queue too,
    /// so that nobody overtakes a waiting request.
    queued: AtomicUsize,
    stats: Arc<ProviderStats>,
    /// Cluster mode: the deployments' requests and tokens per minute are counted in Redis for
    /// every node (the deployments' own buckets are then unlimited); breakers stay per node.
    shared: Option<SharedBuckets>,
}

impl Limits {
    /// Takes a slot on the least busy deployment that can take `tokens` now.
    fn pick(&self, tokens: u32) -> Result<(usize, Arc<Backend>), Refusal> {
        if let Some(shared) = &self.shared {
            return self.pick_shared(shared, tokens);
        }
        let now = Instant::now();
        let mut deployments = self.deployments.lock();
        let mut refusal: Option<Refusal> = None;
        let mut best: Option<(u32, usize)> = None;
        for (i, d) in deployments.iter_mut().enumerate() {
            match d.check(tokens, now) {
                Ok(()) => best = best.min(Some((d.in_flight, i))).or(Some((d.in_flight, i))),
                Err(r) => refusal = Some(merge(refusal, r)),
            }
        }
        let Some((_, i)) = best else {
            return Err(refusal.unwrap_or(Refusal::Full(Duration::from_millis(50))));
        };
        let d = &mut deployments[i];
        let transition = d.take(tokens, now);
        let backend = Arc::clone(&d.backend);
        drop(deployments);
        if let Some(t) = transition {
            self.trace(i, t);
        }
        self.stats.in_flight.fetch_add(1, Ordering::Relaxed);
        Ok((i, backend))
    }

    /// Accounts for a generation that ended; answers whether anyone is queued.
    fn finish(
        &self,
        key_index: usize,
        tokens: u32,
        outcome: &Outcome,
        headers: RateHeaders,
    ) -> bool {
        self.stats.in_flight.fetch_sub(1, Ordering::Relaxed);
        let now = Instant::now();
        let mut deployments = self.deployments.lock();
        let Some(d) = deployments.get_mut(key_index) else {
            return false;
        };
        let transition = d.finish(tokens, outcome, headers, now);
        if let Some(ttft) = d.ttft_ms() {
            self.stats
                .ttft_us
                .store((ttft * 1000.0) as u64, Ordering::Relaxed);
        }
        drop(deployments);
        if let Some(shared) = &self.shared {
            shared.finish(key_index, tokens, outcome, headers);
        }
        if let Some(t) = transition {
            self.trace(key_index, t);
        }
        if let Outcome::Failed { status } = outcome {
            tracing::debug!(provider = %self.name, key_index, ?status, "upstream failure recorded");
        }
        self.queued.load(Ordering::Relaxed) > 0
    }

    /// The shortest wait until some deployment that is only full could take `tokens`.
    fn full_wait(&self, tokens: u32) -> Duration {
        let now = Instant::now();
        self.deployments
            .lock()
            .iter_mut()
            .filter_map(|d| match d.check(tokens, now) {
                Err(Refusal::Full(wait)) => Some(wait),
                _ => None,
            })
            .min()
            .unwrap_or(Duration::from_secs(1))
    }

    fn limited(&self, wait: Duration) -> ProviderError {
        ProviderError::Limited {
            provider: self.name.clone(),
            retry_after: wait.max(Duration::from_millis(1)),
        }
    }

    fn unavailable(&self, wait: Duration) -> ProviderError {
        ProviderError::Unavailable {
            provider: self.name.clone(),
            message: "circuit breaker open".into(),
            retry_after: Some(wait),
        }
    }

    fn trace(&self, key_index: usize, t: Transition) {
        match t {
            Transition::Opened => {
                tracing::warn!(provider = %self.name, key_index, "circuit breaker opened")
            }
            Transition::HalfOpened => {
                tracing::info!(provider = %self.name, key_index, "circuit breaker half-open: probing")
            }
            Transition::Closed => {
                tracing::info!(provider = %self.name, key_index, "circuit breaker closed")
            }
        }
    }

    /// Starts `req` now on the caller's thread when nobody waits and a deployment can take it:
    /// `Ok(Some)` started, `Err` refused for good (every breaker open), `Ok(None)` it must wait
    /// in the actor's queue.
    pub(super) fn try_dispatch(
        self: &Arc<Self>,
        actor: &Addr<ProviderActor>,
        req: ChatRequest,
        tokens: u32,
        retry: bool,
    ) -> Result<Result<Generation, ChatRequest>, ProviderError> {
        if self.queued.load(Ordering::Relaxed) > 0 {
            return Ok(Err(req));
        }
        match self.pick(tokens) {
            Ok((i, backend)) => Ok(Ok(spawn_generation(
                Arc::clone(self),
                actor.clone(),
                backend,
                i,
                req,
                tokens,
                retry,
            ))),
            Err(Refusal::Open(wait)) => Err(self.unavailable(wait)),
            Err(Refusal::Unreachable) => Err(self.unreachable()),
            Err(Refusal::Full(_)) => Ok(Err(req)),
        }
    }
}

struct Waiting {
    req: ChatRequest,
    tokens: u32,
    retry: bool,
    reply: Reply,
    deadline: Instant,
    /// The caller's span: the attempt's span is its child even after a wait in the queue.
    span: tracing::Span,
}

pub struct ProviderActor {
    limits: Arc<Limits>,
    queue: VecDeque<Waiting>,
    max_queue: usize,
    queue_timeout: Duration,
    recheck: Option<SpawnHandle>,
    /// Whether the deployments continue a reply from an assistant prefix.
    prefill: bool,
}

impl ProviderActor {
    /// Builds the actor of one configured provider, resolving its key variables from `env`:
    /// one deployment per key (one keyless deployment when it has none).
    pub fn new(
        cfg: &ProviderConfig,
        http: reqwest::Client,
        env: impl Fn(&str) -> Option<String>,
    ) -> Self {
        Self::build(cfg, http, env, None)
    }

    /// [`ProviderActor::new`], with the deployments' requests and tokens per minute counted
    /// in `redis` for every node of the cluster when it is given (PROTOCOL §9).
    pub fn build(
        cfg: &ProviderConfig,
        http: reqwest::Client,
        env: impl Fn(&str) -> Option<String>,
        redis: Option<Redis>,
    ) -> Self {
        // A provider with no rpm or tpm has nothing to count across nodes: no round trip to
        // Redis per request (its 429 holds stay per node).
        let redis = redis.filter(|_| cfg.rpm > 0 || cfg.tpm > 0);
        let now = Instant::now();
        let mut keys: Vec<Option<SecretString>> = cfg
            .key_envs()
            .into_iter()
            .filter_map(env)
            .map(|k| Some(SecretString::from(k)))
            .collect();
        if keys.is_empty() {
            keys.push(None);
        }
        let deployments: Vec<Deployment> = keys
            .into_iter()
            .map(|key| {
                let backend = Backend::new(cfg, key, http.clone());
                Deployment::new(cfg, backend, now, redis.is_none())
            })
            .collect();
        let shared = redis.map(|r| SharedBuckets::new(r, cfg, deployments.len()));
        let prefill = deployments
            .first()
            .is_some_and(|d| d.backend.supports_prefill());
        Self {
            limits: Arc::new(Limits {
                name: cfg.name.clone(),
                deployments: Mutex::new(deployments),
                queued: AtomicUsize::new(0),
                stats: Arc::new(ProviderStats::default()),
                shared,
            }),
            queue: VecDeque::new(),
            max_queue: cfg.max_queue,
            queue_timeout: Duration::from_millis(cfg.queue_timeout_ms),
            recheck: None,
            prefill,
        }
    }

    pub fn stats(&self) -> Arc<ProviderStats> {
        Arc::clone(&self.limits.stats)
    }

    /// The limits callers share with the actor (for the direct path).
    pub fn limits(&self) -> Arc<Limits> {
        Arc::clone(&self.limits)
    }

    /// Whether this provider continues a reply from an assistant prefix.
    pub fn supports_prefill(&self) -> bool {
        self.prefill
    }

    /// Starts `req` on the least busy deployment that can take it now.
    // A refused request comes back whole to wait in the queue: one move of a small struct.
    #[allow(clippy::result_large_err)]
    fn try_start(
        &mut self,
        req: ChatRequest,
        tokens: u32,
        retry: bool,
        span: &tracing::Span,
        ctx: &mut Context<Self>,
    ) -> Result<Generation, (ChatRequest, Refusal)> {
        // The attempt's span (made in `spawn_generation`) is a child of the caller's.
        let _caller = span.enter();
        match self.limits.pick(tokens) {
            Ok((i, backend)) => Ok(spawn_generation(
                Arc::clone(&self.limits),
                ctx.address(),
                backend,
                i,
                req,
                tokens,
                retry,
            )),
            Err(r) => Err((req, r)),
        }
    }

    fn set_queued(&self) {
        self.limits
            .queued
            .store(self.queue.len(), Ordering::Relaxed);
    }

    /// Serves the queue in order: starts what fits, refuses what waited too long.
    fn drain(&mut self, ctx: &mut Context<Self>) {
        self.drain_queue(ctx);
        self.set_queued();
    }

    fn drain_queue(&mut self, ctx: &mut Context<Self>) {
        self.recheck = None;
        let mut next_wait: Option<Duration> = None;
        while let Some(w) = self.queue.pop_front() {
            if w.reply.is_closed() {
                continue;
            }
            let now = Instant::now();
            match self.try_start(w.req, w.tokens, w.retry, &w.span, ctx) {
                Ok(generation) => {
                    let _ = w.reply.send(Ok(generation));
                }
                Err((_, Refusal::Open(wait))) => {
                    let _ = w.reply.send(Err(self.limits.unavailable(wait)));
                }
                Err((_, Refusal::Unreachable)) => {
                    let _ = w.reply.send(Err(self.limits.unreachable()));
                }
                Err((req, Refusal::Full(wait))) if now < w.deadline => {
                    next_wait = Some(wait.min(w.deadline - now));
                    self.queue.push_front(Waiting { req, ..w });
                    break;
                }
                Err((_, Refusal::Full(wait))) => {
                    let _ = w.reply.send(Err(self.limits.limited(wait)));
                }
            }
        }
        if let Some(wait) = next_wait {
            let wait = wait.max(Duration::from_millis(1));
            self.recheck = Some(ctx.run_later(wait, |act, ctx| act.drain(ctx)));
        }
    }
}

/// Runs a generation that took a slot of deployment `key_index` as a task on the current
/// thread; it forwards the events and, once it ends, settles the slot (and wakes the actor when
/// requests wait for one).
fn spawn_generation(
    limits: Arc<Limits>,
    actor: Addr<ProviderActor>,
    backend: Arc<Backend>,
    key_index: usize,
    req: ChatRequest,
    tokens: u32,
    retry: bool,
) -> Generation {
    let (tx, rx) = mpsc::channel(STREAM_BUFFER);
    // One upstream attempt: a client span of the GenAI `chat` operation.
    let span = tracing::info_span!(
        "upstream",
        otel.name = %format_args!("chat {}", req.model),
        otel.kind = "client",
        gen_ai.operation.name = "chat",
        gen_ai.provider.name = %limits.name,
        gen_ai.request.model = %req.model,
        parley.key_index = key_index,
        parley.retry = retry,
        error.type = tracing::field::Empty,
    );
    // `tokio::spawn`, not `actix::spawn`: the caller may be a plain task outside any `LocalSet`.
    tokio::spawn(tracing::Instrument::instrument(
        async move {
            let (outcome, headers) = forward(&backend, req, tx).await;
            // A request's 500s count once toward the breaker: the first has been counted, and
            // one request the upstream chokes on must not open a deployment for everyone. What
            // speaks of the deployment itself (429, 503, 529, connection failures, timeouts)
            // counts on every attempt.
            if let Outcome::Failed { status } = &outcome {
                let kind = status.map_or_else(|| "connection".to_owned(), |s| s.to_string());
                tracing::Span::current().record("error.type", kind.as_str());
            }
            let outcome = match outcome {
                Outcome::Failed { status: Some(500) } if retry => Outcome::Abandoned,
                other => other,
            };
            if limits.finish(key_index, tokens, &outcome, headers) {
                actor.do_send(Drain);
            }
        },
        span,
    ));
    Generation { rx, key_index }
}

/// The refusal that tells the caller most: any deployment merely full beats all being open.
fn merge(a: Option<Refusal>, b: Refusal) -> Refusal {
    match (a, b) {
        (None, r) => r,
        (Some(Refusal::Full(x)), Refusal::Full(y)) => Refusal::Full(x.min(y)),
        (Some(Refusal::Open(x)), Refusal::Open(y)) => Refusal::Open(x.min(y)),
        (Some(full @ Refusal::Full(_)), _) | (Some(_), full @ Refusal::Full(_)) => full,
        (Some(Refusal::Unreachable), _) | (Some(_), Refusal::Unreachable) => Refusal::Unreachable,
    }
}

/// Runs the backend, its events going straight to `tx`; answers how the generation ended.
async fn forward(
    backend: &Backend,
    req: ChatRequest,
    tx: mpsc::Sender<UpstreamEvent>,
) -> (Outcome, RateHeaders) {
    let seen = super::Observed::default();
    let events = super::EventTx::new(tx);
    backend.run(req, &events, &seen).await;
    let headers = *seen.lock();
    (events.outcome(), headers)
}

impl Actor for ProviderActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(MAILBOX);
        tracing::debug!(provider = %self.limits.name, "provider actor started");
    }
}

/// Asks for a generation; the answer arrives on `reply` once a deployment takes it (or it is
/// refused), so a request waiting for a slot never blocks the actor's mailbox.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Dispatch {
    pub req: ChatRequest,
    /// Prompt tokens, reserved against the tokens-per-minute bucket.
    pub tokens: u32,
    /// A later attempt of a request that already failed: a 500 of it is not counted again.
    pub retry: bool,
    pub reply: Reply,
    /// The caller's span, parent of the attempt's.
    pub span: tracing::Span,
}

impl Handler<Dispatch> for ProviderActor {
    type Result = ();

    fn handle(&mut self, msg: Dispatch, ctx: &mut Self::Context) {
        let Dispatch {
            req,
            tokens,
            retry,
            reply,
            span,
        } = msg;
        // With others waiting already, keep the order: join the queue.
        let req = if self.queue.is_empty() {
            match self.try_start(req, tokens, retry, &span, ctx) {
                Ok(generation) => {
                    let _ = reply.send(Ok(generation));
                    return;
                }
                Err((_, Refusal::Open(wait))) => {
                    let _ = reply.send(Err(self.limits.unavailable(wait)));
                    return;
                }
                Err((_, Refusal::Unreachable)) => {
                    let _ = reply.send(Err(self.limits.unreachable()));
                    return;
                }
                Err((req, Refusal::Full(_))) => req,
            }
        } else {
            req
        };
        let deadline = Instant::now() + self.queue_timeout;
        self.enqueue(
            Waiting {
                req,
                tokens,
                retry,
                reply,
                deadline,
                span,
            },
            ctx,
        );
    }
}

impl ProviderActor {
    fn enqueue(&mut self, w: Waiting, ctx: &mut Context<Self>) {
        if self.queue.len() >= self.max_queue || self.queue_timeout.is_zero() {
            let wait = self.limits.full_wait(w.tokens);
            let _ = w.reply.send(Err(self.limits.limited(wait)));
            return;
        }
        self.queue.push_back(w);
        self.set_queued();
        if self.recheck.is_none() {
            self.drain(ctx);
        }
    }
}

/// A slot freed up while requests wait: serve the queue.
#[derive(Message)]
#[rtype(result = "()")]
struct Drain;

impl Handler<Drain> for ProviderActor {
    type Result = ();

    fn handle(&mut self, _: Drain, ctx: &mut Self::Context) {
        if let Some(handle) = self.recheck.take() {
            ctx.cancel_future(handle);
        }
        self.drain(ctx);
    }
}

/// Asks for embeddings (the semantic cache's `provider:` embedder). They count against the same
/// request and token buckets, concurrency cap and breaker as generations, but never wait in
/// the queue: a cache lookup that cannot run now is a miss, not a delay.
#[derive(Message)]
#[rtype(result = "()")]
pub struct Embed {
    pub model: String,
    pub texts: Vec<String>,
    /// Estimated input tokens, reserved against the tokens-per-minute bucket.
    pub tokens: u32,
    pub reply: oneshot::Sender<Result<Vec<Vec<f32>>, ProviderError>>,
}

impl Handler<Embed> for ProviderActor {
    type Result = ();

    fn handle(&mut self, msg: Embed, ctx: &mut Self::Context) {
        let Embed {
            model,
            texts,
            tokens,
            reply,
        } = msg;
        let (i, backend) = match self.limits.pick(tokens) {
            Ok(picked) => picked,
            Err(Refusal::Open(wait)) => {
                let _ = reply.send(Err(self.limits.unavailable(wait)));
                return;
            }
            Err(Refusal::Unreachable) => {
                let _ = reply.send(Err(self.limits.unreachable()));
                return;
            }
            Err(Refusal::Full(wait)) => {
                let _ = reply.send(Err(self.limits.limited(wait)));
                return;
            }
        };
        let limits = Arc::clone(&self.limits);
        let me = ctx.address();
        actix::spawn(async move {
            let begun = Instant::now();
            let (result, headers) = backend.embed(&model, &texts).await;
            tracing::debug!(
                elapsed_ms = begun.elapsed().as_millis() as u64,
                texts = texts.len(),
                "embedded"
            );
            let outcome = match &result {
                Ok((_, usage)) => Outcome::Embedded { usage: *usage },
                // A refusal of this request (an unknown model, a bad key for embeddings) says
                // nothing of the provider's health for generations.
                Err(e) => match e.status() {
                    Some(s) if (400..500).contains(&s) && s != 429 => Outcome::Abandoned,
                    status => Outcome::Failed { status },
                },
            };

            if limits.finish(i, tokens, &outcome, headers) {
                me.do_send(Drain);
            }
            let _ = reply.send(result.map(|(v, _)| v));
        });
    }
}

/// A provider's deployments, for `/admin/providers`.
#[derive(Message)]
#[rtype(result = "ProviderInfo")]
pub struct Describe;

#[derive(Debug, Clone, serde::Serialize)]
pub struct ProviderInfo {
    pub name: String,
    pub queued: usize,
    pub deployments: Vec<DeploymentInfo>,
}

impl Handler<Describe> for ProviderActor {
    type Result = MessageResult<Describe>;

    fn handle(&mut self, _: Describe, _ctx: &mut Self::Context) -> Self::Result {
        let now = Instant::now();
        let mut deployments: Vec<DeploymentInfo> = self
            .limits
            .deployments
            .lock()
            .iter_mut()
            .enumerate()
            .map(|(i, d)| d.info(i, now))
            .collect();
        if let Some(shared) = &self.limits.shared {
            shared.describe(&mut deployments);
        }
        MessageResult(ProviderInfo {
            name: self.limits.name.clone(),
            queued: self.queue.len(),
            deployments,
        })
    }
}
