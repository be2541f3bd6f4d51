//! `Router`: route name (the model clients ask for) → targets, ordered per request by the
//! route's strategy (`fallback`, `weighted`, `least_busy`). A generation starts on the first
//! target whose first event arrives in time; a target that fails before any text — refused by
//! its limits or breaker, an upstream error, silence past `ttft_timeout_ms` — is left for the
//! next. When every target failed, the whole pass is retried after exponential backoff with
//! full jitter (at least the upstream's `Retry-After`), bounded in passes and in total time.
//! Errors that retrying cannot fix (400-class but 408/429) end the request at once.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use actix::Addr;
use rand::Rng;
use tokio::sync::{mpsc, oneshot};

use super::actor::{Describe, Limits, ProviderInfo, ProviderStats};
use super::{ChatRequest, Dispatch, ProviderActor, ProviderError, UpstreamEvent};
use crate::config::{ProviderKind, RetryConfig, RouteConfig, Strategy};
use crate::domain::{Message, Role};
use crate::error::{ApiError, ErrorCode};
use crate::tokens::{Encoding, PromptTokens};

/// The instruction that asks an OpenAI-compatible model to continue a cut-off reply.
pub const CONTINUE_INSTRUCTION: &str =
    "Your previous reply was cut off. Continue it exactly where it stopped, without repeating anything.";

#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    #[error("model {0:?} does not exist")]
    UnknownRoute(String),
    #[error(transparent)]
    Provider(#[from] ProviderError),
    #[error("provider actor unavailable: {0}")]
    Mailbox(#[from] actix::MailboxError),
    /// No target of the chosen tier is in a region the request may use.
    #[error("no target of {0:?} that this request may use (its tier's targets are all outside its regions)")]
    NoTarget(String),
}

impl RouterError {
    fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Provider(e) => e.retry_after(),
            _ => None,
        }
    }

    fn is_retryable(&self) -> bool {
        match self {
            Self::Provider(e) => e.is_retryable(),
            Self::Mailbox(_) => true,
            Self::UnknownRoute(_) | Self::NoTarget(_) => false,
        }
    }
}

impl From<RouterError> for ApiError {
    fn from(err: RouterError) -> Self {
        match err {
            RouterError::UnknownRoute(_) => {
                ApiError::new(ErrorCode::ModelNotFound, err.to_string())
            }
            RouterError::Provider(e) => e.into(),
            RouterError::Mailbox(e) => e.into(),
            RouterError::NoTarget(_) => ApiError::new(ErrorCode::Forbidden, err.to_string()),
        }
    }
}

/// A provider as the router knows it.
#[derive(Clone)]
pub struct ProviderHandle {
    pub name: String,
    /// The provider's data-residency region.
    pub region: Option<String>,
    pub addr: Addr<ProviderActor>,
    /// The deployments' limits, for starting a generation without a round trip to the actor.
    pub limits: Arc<Limits>,
    pub stats: Arc<ProviderStats>,
    pub prefill: bool,
    /// The wire format it speaks, which decides what a request may carry to it.
    pub kind: ProviderKind,
    /// Whether its deployments count tokens per minute (`tpm`), which a request must then
    /// reserve before it starts.
    pub limits_tokens: bool,
}

#[derive(Clone)]
struct Target {
    provider: ProviderHandle,
    model: String,
    weight: u32,
}

/// A part of a route's targets with its own order: the whole route, or one tier of a
/// semantic route.
#[derive(Clone)]
struct TierTargets {
    targets: std::ops::Range<usize>,
    strategy: Strategy,
}

#[derive(Clone)]
struct Route {
    /// Every target (of every tier).
    targets: Vec<Target>,
    /// One entry for a plain route; a semantic route's tiers, cheapest first.
    tiers: Vec<TierTargets>,
    /// A semantic route's tier names, thresholds and stickiness.
    tiering: Option<Arc<crate::routing::Tiers>>,
    /// Regions this route's requests may go to (`None`: any).
    regions: Option<Vec<String>>,
    /// The versioned system prompt of conversations on this route that have none of their own.
    prompt: Option<String>,
    pii: crate::guard::pii::PiiMode,
    injection: crate::guard::injection::InjectionMode,
    ttft_timeout: Option<Duration>,
    continue_on_fallback: bool,
    cache: bool,
    drop_unsupported: Vec<String>,
}

/// A generation that has produced its first event.
pub struct Started {
    pub first: UpstreamEvent,
    pub rest: mpsc::Receiver<UpstreamEvent>,
    pub provider: String,
    pub model: String,
    pub ttft: Duration,
}

/// Routes and their targets; immutable after start, shared by every caller.
#[derive(Clone, Default)]
pub struct Router {
    routes: HashMap<String, Route>,
    providers: Vec<ProviderHandle>,
    retry: RetryConfig,
}

impl Router {
    /// Builds the routes; config validation has proven every provider exists (unknown ones are
    /// skipped).
    pub fn new(routes: &[RouteConfig], providers: Vec<ProviderHandle>, retry: RetryConfig) -> Self {
        let by_name: HashMap<&str, &ProviderHandle> =
            providers.iter().map(|p| (p.name.as_str(), p)).collect();
        let routes = routes
            .iter()
            .map(|r| {
                let target = |t: &crate::config::TargetConfig| {
                    let provider = (*by_name.get(t.provider.as_str())?).clone();
                    Some(Target {
                        provider,
                        model: t.model.clone(),
                        weight: t.weight,
                    })
                };
                let mut targets: Vec<Target> = Vec::new();
                let mut tiers = Vec::new();
                if r.strategy == Strategy::Semantic {
                    for tier in &r.tiers {
                        let start = targets.len();
                        targets.extend(tier.targets.iter().filter_map(target));
                        tiers.push(TierTargets {
                            targets: start..targets.len(),
                            strategy: tier.strategy,
                        });
                    }
                } else {
                    targets.extend(r.targets.iter().filter_map(target));
                    tiers.push(TierTargets {
                        targets: 0..targets.len(),
                        strategy: r.strategy,
                    });
                }
                let route = Route {
                    targets,
                    tiers,
                    tiering: crate::routing::Tiers::of(r).map(Arc::new),
                    regions: r.regions.clone(),
                    prompt: r.prompt.clone(),
                    pii: r.pii,
                    injection: r.injection,
                    ttft_timeout: (r.ttft_timeout_ms > 0)
                        .then(|| Duration::from_millis(r.ttft_timeout_ms)),
                    continue_on_fallback: r.continue_on_fallback,
                    cache: r.cache,
                    drop_unsupported: r.drop_unsupported.clone(),
                };
                (r.model.clone(), route)
            })
            .collect();
        Self {
            routes,
            providers,
            retry,
        }
    }

    /// The actor of provider `name`.
    pub fn provider(&self, name: &str) -> Option<Addr<ProviderActor>> {
        self.providers
            .iter()
            .find(|p| p.name == name)
            .map(|p| p.addr.clone())
    }

    /// The region of provider `name`, if it has one.
    pub fn provider_region(&self, name: &str) -> Option<String> {
        self.providers
            .iter()
            .find(|p| p.name == name)
            .and_then(|p| p.region.clone())
    }

    /// Whether the route's turns use the semantic cache.
    pub fn caches(&self, route: &str) -> bool {
        self.routes.get(route).is_some_and(|r| r.cache)
    }

    /// A semantic route's tiers (`None` for any other route).
    pub fn tiers(&self, route: &str) -> Option<&Arc<crate::routing::Tiers>> {
        self.routes.get(route)?.tiering.as_ref()
    }

    /// The tier a client asked for by name, by its index on `route`.
    ///
    /// # Errors
    /// `bad_request` when the route has no tier of that name (a plain route has none).
    pub fn tier_index(&self, route: &str, name: &str) -> Result<usize, ApiError> {
        let tiers = self.tiers(route);
        tiers.and_then(|t| t.index(name)).ok_or_else(|| {
            ApiError::bad_request(match tiers {
                Some(t) => format!(
                    "tier: {name:?} is not a tier of model {route:?} (its tiers: {})",
                    t.names.join(", ")
                ),
                None => format!("tier: model {route:?} has no tiers (it is not a semantic route)"),
            })
        })
    }

    pub fn has_route(&self, route: &str) -> bool {
        self.routes.contains_key(route)
    }

    /// Route names, sorted.
    pub fn route_names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.routes.keys().map(String::as_str).collect();
        names.sort_unstable();
        names
    }

    /// The tokenizer for budgeting a route: its first target's model.
    pub fn encoding(&self, route: &str) -> Encoding {
        let model = self
            .routes
            .get(route)
            .and_then(|r| r.targets.first())
            .map_or("", |t| t.model.as_str());
        Encoding::for_model(model)
    }

    /// The route's guardrail modes (PII, injection); defaults for an unknown route.
    pub fn guards(
        &self,
        route: &str,
    ) -> (
        crate::guard::pii::PiiMode,
        crate::guard::injection::InjectionMode,
    ) {
        self.routes
            .get(route)
            .map(|r| (r.pii, r.injection))
            .unwrap_or_default()
    }

    /// The route's versioned system prompt reference, if it names one.
    pub fn route_prompt(&self, route: &str) -> Option<&str> {
        self.routes.get(route)?.prompt.as_deref()
    }

    /// The provider and upstream model of the first target of a route's tier (0 on a plain
    /// route).
    pub fn primary_target(&self, route: &str, tier: usize) -> Option<(String, String)> {
        let r = self.routes.get(route)?;
        let t = r.targets.get(r.tiers.get(tier)?.targets.start)?;
        Some((t.provider.name.clone(), t.model.clone()))
    }

    /// The upstream model a request's reservation is priced at: a semantic route's forced tier,
    /// else its last (dearest) tier, since the tier is chosen only later; a plain route's first
    /// target.
    pub fn reserve_model(&self, route: &str, forced: Option<usize>) -> Option<&str> {
        let r = self.routes.get(route)?;
        let tier = forced.or_else(|| r.tiers.len().checked_sub(1))?;
        r.targets
            .get(r.tiers.get(tier)?.targets.start)
            .map(|t| t.model.as_str())
    }

    /// Refuses, with `bad_request` naming it, what a target of the route cannot honour and the
    /// route does not allow to be dropped (and drops what it allows; a target's wire format
    /// leaves out the rest): a parameter outside the target's wire format
    /// (`logprobs` on Anthropic), an image kind it cannot take, more than one choice (`n`).
    ///
    /// # Errors
    /// `bad_request` as above; `model_not_found` for no route.
    pub fn check_request(&self, route: &str, req: &mut ChatRequest) -> Result<(), ApiError> {
        let r = self
            .routes
            .get(route)
            .ok_or_else(|| RouterError::UnknownRoute(route.to_owned()))?;
        let allowed = |name: &str| r.drop_unsupported.iter().any(|d| d == name);
        if req.params.n.is_some_and(|n| n > 1) {
            if !allowed("n") {
                return Err(ApiError::bad_request(
                    "n: parley answers one choice per request; send n requests, or allow dropping \"n\" with the route's drop_unsupported",
                ));
            }
            req.params.n = None;
        }
        for t in &r.targets {
            if t.provider.kind != ProviderKind::Anthropic {
                continue;
            }
            let refused: Vec<String> = crate::wire::anthropic::unsupported(req)
                .into_iter()
                .filter(|p| !allowed(p))
                .collect();
            if let Some(first) = refused.first() {
                return Err(ApiError::bad_request(format!(
                    "{first}: not supported by provider {:?} (anthropic){}; the route may allow dropping it with drop_unsupported",
                    t.provider.name,
                    if refused.len() > 1 {
                        format!(", nor {}", refused[1..].join(", "))
                    } else {
                        String::new()
                    }
                )));
            }
            for m in &req.messages {
                for image in m.content.images() {
                    if let Some((media, _)) = image.data() {
                        if !crate::wire::anthropic::IMAGE_TYPES.contains(&media) {
                            return Err(ApiError::bad_request(format!(
                                "image_url: {media} images are not supported by provider {:?} (anthropic takes {})",
                                t.provider.name,
                                crate::wire::anthropic::IMAGE_TYPES.join(", ")
                            )));
                        }
                    }
                }
            }
        }
        Ok(())
    }

    /// Refuses a request none of whose targets (of the tier it forces, if it forces one) is in
    /// a region it may use.
    ///
    /// # Errors
    /// `forbidden` then; `model_not_found` for an unknown route.
    pub fn check_regions(
        &self,
        route: &str,
        forced: Option<usize>,
        key_regions: Option<&[String]>,
    ) -> Result<(), ApiError> {
        let r = self
            .routes
            .get(route)
            .ok_or_else(|| RouterError::UnknownRoute(route.to_owned()))?;
        match forced {
            None if r.targets.iter().any(|t| r.allows(t, key_regions)) => Ok(()),
            None => Err(ApiError::new(
                ErrorCode::Forbidden,
                format!("no target of {route:?} is in a region this request may use"),
            )),
            Some(tier) if r.tier_allowed(tier, key_regions) => Ok(()),
            Some(tier) => {
                let name = r
                    .tiering
                    .as_ref()
                    .and_then(|t| t.names.get(tier))
                    .map_or("", String::as_str);
                Err(ApiError::new(
                    ErrorCode::Forbidden,
                    format!(
                        "no target of tier {name:?} of {route:?} is in a region this request may use"
                    ),
                ))
            }
        }
    }

    /// Per tier of `route` (one entry for a plain route), whether it has a target in a region
    /// the request may use.
    pub fn tiers_allowed(&self, route: &str, key_regions: Option<&[String]>) -> Vec<bool> {
        self.routes.get(route).map_or_else(Vec::new, |r| {
            (0..r.tiers.len())
                .map(|t| r.tier_allowed(t, key_regions))
                .collect()
        })
    }

    pub fn continues_on_fallback(&self, route: &str) -> bool {
        self.routes
            .get(route)
            .is_some_and(|r| r.continue_on_fallback)
    }

    /// Every provider's deployments, for `/admin/providers`.
    pub async fn describe(&self) -> Vec<ProviderInfo> {
        let mut out = Vec::with_capacity(self.providers.len());
        for p in &self.providers {
            if let Ok(info) = p.addr.send(Describe).await {
                out.push(info);
            }
        }
        out
    }

    /// Starts a generation of `req` (whose prompt size `tokens` is counted if a target limits
    /// tokens per minute) on `route`.
    ///
    /// # Errors
    /// `UnknownRoute`; otherwise the last failure once targets and retries are exhausted.
    pub async fn start(
        &self,
        route: &str,
        tier: usize,
        req: &ChatRequest,
        tokens: &PromptTokens,
        regions: Option<&[String]>,
    ) -> Result<Started, RouterError> {
        self.start_excluding(route, tier, req, tokens, None, None, regions)
            .await
    }

    /// Continues a reply that broke after `partial` was sent, on another target of the route:
    /// the partial reply is handed over as an assistant prefix (prefill) or, for
    /// OpenAI-compatible targets, with an instruction to continue.
    ///
    /// # Errors
    /// As [`Router::start`].
    #[allow(clippy::too_many_arguments)]
    pub async fn continue_reply(
        &self,
        route: &str,
        tier: usize,
        req: &ChatRequest,
        tokens: &PromptTokens,
        partial: &str,
        failed_provider: &str,
        regions: Option<&[String]>,
    ) -> Result<Started, RouterError> {
        let (exclude, partial) = (Some(failed_provider), Some(partial));
        self.start_excluding(route, tier, req, tokens, exclude, partial, regions)
            .await
    }

    #[allow(clippy::too_many_arguments)]
    async fn start_excluding(
        &self,
        route_name: &str,
        tier: usize,
        req: &ChatRequest,
        tokens: &PromptTokens,
        exclude: Option<&str>,
        partial: Option<&str>,
        regions: Option<&[String]>,
    ) -> Result<Started, RouterError> {
        let route = self
            .routes
            .get(route_name)
            .ok_or_else(|| RouterError::UnknownRoute(route_name.to_owned()))?;
        // A first-token limit needs a stream to watch.
        let whole = req.whole && route.ttft_timeout.is_none();
        let begun = Instant::now();
        let deadline = begun + self.retry.budget();
        let backoff = self.retry.backoff();
        let mut last_err = None;
        for pass in 0..=self.retry.max_retries {
            let mut hint: Option<Duration> = None;
            let allowed = route
                .order(tier)
                .into_iter()
                .filter(|t| Some(t.provider.name.as_str()) != exclude && route.allows(t, regions));
            for target in allowed {
                // Each attempt gets its own copy (the only one made of the request).
                let mut sent = target.request(req, partial);
                sent.whole = whole;
                match self
                    .try_target(
                        target,
                        sent,
                        req,
                        tokens,
                        pass > 0,
                        route.ttft_timeout,
                        begun,
                    )
                    .await
                {
                    Ok(started) => return Ok(started),
                    Err(e) if !e.is_retryable() => return Err(e),
                    Err(e) => {
                        tracing::warn!(route = route_name, provider = %target.provider.name, pass, error = %e, "target failed; trying the next");
                        hint = hint.max(e.retry_after());
                        last_err = Some(e);
                    }
                }
            }
            if pass == self.retry.max_retries || last_err.is_none() {
                break;
            }
            let wait = backoff.delay_random(pass).max(hint.unwrap_or_default());
            if Instant::now() + wait > deadline {
                tracing::warn!(
                    route = route_name,
                    wait_ms = wait.as_millis() as u64,
                    "retry budget exhausted"
                );
                break;
            }
            tracing::info!(
                route = route_name,
                pass = pass + 1,
                wait_ms = wait.as_millis() as u64,
                "retrying after backoff"
            );
            tokio::time::sleep(wait).await;
        }
        Err(last_err.unwrap_or_else(|| RouterError::NoTarget(route_name.to_owned())))
    }

    #[allow(clippy::too_many_arguments)]
    async fn try_target(
        &self,
        target: &Target,
        req: ChatRequest,
        prompt: &ChatRequest,
        tokens: &PromptTokens,
        retry: bool,
        ttft_timeout: Option<Duration>,
        begun: Instant,
    ) -> Result<Started, RouterError> {
        let handle = &target.provider;
        let provider = handle.name.clone();
        // Only a tokens-per-minute bucket needs the prompt's size before the answer.
        let tokens = if handle.limits_tokens {
            tokens.of(&prompt.messages, &prompt.tools)
        } else {
            0
        };
        let generation = match handle
            .limits
            .try_dispatch(&handle.addr, req, tokens, retry)?
        {
            Ok(generation) => generation,
            // It must wait for a slot: the actor keeps the queue.
            Err(req) => {
                let (reply, answer) = oneshot::channel();
                handle
                    .addr
                    .send(Dispatch {
                        req,
                        tokens,
                        retry,
                        reply,
                        span: tracing::Span::current(),
                    })
                    .await?;
                answer.await.map_err(|_| ProviderError::Unavailable {
                    provider: provider.clone(),
                    message: "provider actor stopped".into(),
                    retry_after: None,
                })??
            }
        };
        let mut rx = generation.rx;
        let admitted = Instant::now();
        let first = match ttft_timeout {
            Some(limit) => match tokio::time::timeout(limit, rx.recv()).await {
                Ok(first) => first,
                Err(_) => {
                    tracing::warn!(%provider, limit_ms = limit.as_millis() as u64, "no first token in time; abandoning the target");
                    return Err(ProviderError::Timeout { provider }.into());
                }
            },
            None => rx.recv().await,
        };
        match first {
            Some(UpstreamEvent::Failed(e)) => Err(e.into()),
            None => Err(ProviderError::Unavailable {
                provider,
                message: "generation ended without a result".into(),
                retry_after: None,
            }
            .into()),
            Some(first) => {
                tracing::debug!(%provider, wait_ms = (admitted - begun).as_millis() as u64, "first event");
                Ok(Started {
                    first,
                    rest: rx,
                    provider,
                    model: target.model.clone(),
                    ttft: begun.elapsed(),
                })
            }
        }
    }
}

impl Route {
    /// Whether `target` is in a region both the route and the key allow (data residency: the
    /// router never sends a request anywhere else).
    fn allows(&self, target: &Target, key_regions: Option<&[String]>) -> bool {
        let region = target.provider.region.as_deref();
        let ok = |list: Option<&[String]>| {
            list.is_none_or(|l| region.is_some_and(|r| l.iter().any(|x| x == r)))
        };
        ok(self.regions.as_deref()) && ok(key_regions)
    }

    /// Whether `tier` has a target in a region both the route and the key allow.
    fn tier_allowed(&self, tier: usize, key_regions: Option<&[String]>) -> bool {
        self.tiers.get(tier).is_some_and(|t| {
            self.targets[t.targets.clone()]
                .iter()
                .any(|x| self.allows(x, key_regions))
        })
    }

    /// The targets of `tier` (0 for a plain route) in the order this request tries them.
    fn order(&self, tier: usize) -> Vec<&Target> {
        let Some(tier) = self.tiers.get(tier) else {
            return Vec::new();
        };
        let mut targets: Vec<&Target> = self.targets[tier.targets.clone()].iter().collect();
        match tier.strategy {
            // Tiers order their own targets; a semantic route's tier is chosen before.
            Strategy::Fallback | Strategy::Semantic => {}
            Strategy::Weighted => {
                // Weighted sampling without replacement: key = u^(1/w), largest first.
                let mut rng = rand::thread_rng();
                let mut keyed: Vec<(f64, &Target)> = targets
                    .into_iter()
                    .map(|t| (rng.gen::<f64>().powf(1.0 / f64::from(t.weight.max(1))), t))
                    .collect();
                keyed.sort_by(|a, b| b.0.total_cmp(&a.0));
                targets = keyed.into_iter().map(|(_, t)| t).collect();
            }
            Strategy::LeastBusy => {
                targets.sort_by_key(|t| {
                    let s = &t.provider.stats;
                    (
                        s.in_flight.load(Ordering::Relaxed),
                        s.ttft_us.load(Ordering::Relaxed),
                    )
                });
            }
        }
        targets
    }
}

impl Target {
    /// `req` for this target: its model, and the continuation of `partial` if any.
    fn request(&self, req: &ChatRequest, partial: Option<&str>) -> ChatRequest {
        let mut req = req.clone();
        req.model.clone_from(&self.model);
        if let Some(partial) = partial {
            // Anthropic refuses an assistant prefix that ends in white space; the model puts
            // the space back at the start of its continuation.
            let content = if self.provider.prefill {
                partial.trim_end()
            } else {
                partial
            };
            req.messages.push(Message::text(Role::Assistant, content));
            if !self.provider.prefill {
                req.messages
                    .push(Message::text(Role::User, CONTINUE_INSTRUCTION));
            }
        }
        req
    }
}
