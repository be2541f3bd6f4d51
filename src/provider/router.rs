//! `Router`: route name (the model clients ask for) → ordered targets. A generation starts on the
//! first target that produces its first event; a target that fails before any text is left for
//! the next (fallback). Once text has flowed, the stream belongs to that target.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use actix::Addr;
use tokio::sync::mpsc;

use super::{ChatRequest, Dispatch, ProviderActor, ProviderError, UpstreamEvent};
use crate::error::{ApiError, ErrorCode};
use crate::tokens::Encoding;

#[derive(Debug, thiserror::Error)]
pub enum RouterError {
    #[error("model {0:?} does not exist")]
    UnknownRoute(String),
    #[error(transparent)]
    Provider(#[from] ProviderError),
    #[error("provider actor unavailable: {0}")]
    Mailbox(#[from] actix::MailboxError),
}

impl From<RouterError> for ApiError {
    fn from(err: RouterError) -> Self {
        match err {
            RouterError::UnknownRoute(_) => {
                ApiError::new(ErrorCode::ModelNotFound, err.to_string())
            }
            RouterError::Provider(e) => e.into(),
            RouterError::Mailbox(e) => e.into(),
        }
    }
}

#[derive(Clone)]
struct Target {
    provider: String,
    model: String,
    addr: Addr<ProviderActor>,
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
    routes: HashMap<String, Vec<Target>>,
}

impl Router {
    /// Builds the routes from `(route, [(provider, model)])`, resolving providers in `actors`.
    /// Config validation has already proven every provider name exists; unknown ones are skipped.
    pub fn new<'a>(
        routes: impl IntoIterator<Item = (&'a str, Vec<(&'a str, &'a str)>)>,
        actors: &HashMap<String, Addr<ProviderActor>>,
    ) -> Self {
        let routes = routes
            .into_iter()
            .map(|(name, targets)| {
                let targets = targets
                    .into_iter()
                    .filter_map(|(p, m)| {
                        let addr = actors.get(p)?.clone();
                        Some(Target {
                            provider: p.to_owned(),
                            model: m.to_owned(),
                            addr,
                        })
                    })
                    .collect();
                (name.to_owned(), targets)
            })
            .collect();
        Self { routes }
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
            .and_then(|t| t.first())
            .map_or("", |t| t.model.as_str());
        Encoding::for_model(model)
    }

    /// Starts a generation on the first target of `route` that answers.
    ///
    /// # Errors
    /// `UnknownRoute`; otherwise the last target's error when every target failed before text.
    pub async fn start(&self, route: &str, mut req: ChatRequest) -> Result<Started, RouterError> {
        let targets = self
            .routes
            .get(route)
            .ok_or_else(|| RouterError::UnknownRoute(route.to_owned()))?;
        let begun = Instant::now();
        let mut last_err = None;
        for (i, target) in targets.iter().enumerate() {
            req.model.clone_from(&target.model);
            let mut rx = match target.addr.send(Dispatch(req.clone())).await {
                Ok(Ok(rx)) => rx,
                Ok(Err(e)) => {
                    last_err = Some(RouterError::Provider(e));
                    continue;
                }
                Err(e) => {
                    last_err = Some(RouterError::Mailbox(e));
                    continue;
                }
            };
            let first = rx.recv().await.unwrap_or_else(|| {
                UpstreamEvent::Failed(ProviderError::Unavailable {
                    provider: target.provider.clone(),
                    message: "generation ended without a result".into(),
                })
            });
            match first {
                UpstreamEvent::Failed(e) if e.is_retryable() && i + 1 < targets.len() => {
                    tracing::warn!(provider = %target.provider, error = %e, "target failed, falling back");
                    last_err = Some(RouterError::Provider(e));
                }
                UpstreamEvent::Failed(e) => return Err(RouterError::Provider(e)),
                first => {
                    return Ok(Started {
                        first,
                        rest: rx,
                        provider: target.provider.clone(),
                        model: target.model.clone(),
                        ttft: begun.elapsed(),
                    })
                }
            }
        }
        Err(last_err.unwrap_or_else(|| RouterError::UnknownRoute(route.to_owned())))
    }
}
