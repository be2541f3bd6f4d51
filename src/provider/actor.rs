//! `ProviderActor`: the one path to a provider. It owns the provider's client and credentials,
//! counts requests in flight, and spawns each generation as a task feeding a bounded channel.
//! Rate-limit buckets, concurrency caps and the circuit breaker belong here as well.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use actix::prelude::*;
use secrecy::SecretString;
use tokio::sync::mpsc;

use super::anthropic::AnthropicClient;
use super::mock::MockBackend;
use super::openai::OpenAiClient;
use super::{ChatRequest, ProviderError, UpstreamEvent, STREAM_BUFFER};
use crate::config::{ProviderConfig, ProviderKind};

/// Mailbox capacity: requests beyond this wait in the sender's `send()`.
const MAILBOX: usize = 1024;

enum Backend {
    OpenAi(OpenAiClient),
    Anthropic(AnthropicClient),
    Mock(MockBackend),
}

impl Backend {
    async fn run(&self, req: ChatRequest, tx: mpsc::Sender<UpstreamEvent>) {
        match self {
            Self::OpenAi(c) => c.run(req, tx).await,
            Self::Anthropic(c) => c.run(req, tx).await,
            Self::Mock(m) => m.run(req, tx).await,
        }
    }
}

pub struct ProviderActor {
    name: String,
    backend: Arc<Backend>,
    in_flight: Arc<AtomicUsize>,
}

impl ProviderActor {
    /// Builds the actor of one configured provider, resolving its key variables from `env`.
    pub fn new(
        cfg: &ProviderConfig,
        http: reqwest::Client,
        env: impl Fn(&str) -> Option<String>,
    ) -> Self {
        let keys: Vec<SecretString> = cfg
            .key_envs()
            .into_iter()
            .filter_map(env)
            .map(SecretString::from)
            .collect();
        let backend = match cfg.kind {
            ProviderKind::Openai => Backend::OpenAi(OpenAiClient::new(
                &cfg.name,
                cfg.base_url(),
                keys,
                http,
                cfg.timeout(),
            )),
            ProviderKind::Anthropic => Backend::Anthropic(AnthropicClient::new(
                &cfg.name,
                cfg.base_url(),
                keys,
                http,
                cfg.timeout(),
            )),
            ProviderKind::Mock => Backend::Mock(MockBackend::new(
                &cfg.name,
                cfg.seed.unwrap_or(0),
                std::time::Duration::from_millis(cfg.ttft_ms.unwrap_or(0)),
                cfg.tokens_per_sec.unwrap_or(0.0),
            )),
        };
        Self {
            name: cfg.name.clone(),
            backend: Arc::new(backend),
            in_flight: Arc::new(AtomicUsize::new(0)),
        }
    }
}

impl Actor for ProviderActor {
    type Context = Context<Self>;

    fn started(&mut self, ctx: &mut Self::Context) {
        ctx.set_mailbox_capacity(MAILBOX);
        tracing::debug!(provider = %self.name, "provider actor started");
    }
}

/// Starts one generation; the answer is the channel its events arrive on.
#[derive(Message)]
#[rtype(result = "Result<mpsc::Receiver<UpstreamEvent>, ProviderError>")]
pub struct Dispatch(pub ChatRequest);

impl Handler<Dispatch> for ProviderActor {
    type Result = Result<mpsc::Receiver<UpstreamEvent>, ProviderError>;

    fn handle(&mut self, msg: Dispatch, _ctx: &mut Self::Context) -> Self::Result {
        let (tx, rx) = mpsc::channel(STREAM_BUFFER);
        let backend = Arc::clone(&self.backend);
        let in_flight = Arc::clone(&self.in_flight);
        in_flight.fetch_add(1, Ordering::Relaxed);
        let span = tracing::debug_span!("upstream", provider = %self.name, model = %msg.0.model);
        actix::spawn(tracing::Instrument::instrument(
            async move {
                backend.run(msg.0, tx).await;
                in_flight.fetch_sub(1, Ordering::Relaxed);
            },
            span,
        ));
        Ok(rx)
    }
}

/// How many generations the provider is serving now.
#[derive(Message)]
#[rtype(result = "usize")]
pub struct InFlight;

impl Handler<InFlight> for ProviderActor {
    type Result = usize;

    fn handle(&mut self, _: InFlight, _ctx: &mut Self::Context) -> usize {
        self.in_flight.load(Ordering::Relaxed)
    }
}
