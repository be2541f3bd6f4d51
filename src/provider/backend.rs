//! The wire clients behind one deployment: OpenAI-compatible, Anthropic, or the in-process mock.

use std::time::Duration;

use secrecy::SecretString;

use super::anthropic::AnthropicClient;
use super::mock::MockBackend;
use super::openai::OpenAiClient;
use super::{ChatRequest, EventTx, Observed, ProviderError, RateHeaders};
use crate::config::{ProviderConfig, ProviderKind};

pub enum Backend {
    OpenAi(OpenAiClient),
    Anthropic(AnthropicClient),
    Mock(MockBackend),
}

impl Backend {
    /// The client of `cfg` using `key` (none for keyless servers and the mock).
    pub fn new(cfg: &ProviderConfig, key: Option<SecretString>, http: reqwest::Client) -> Self {
        let (name, url, timeout) = (&cfg.name, cfg.base_url(), cfg.timeout());
        match cfg.kind {
            ProviderKind::Openai => Self::OpenAi(OpenAiClient::new(name, url, key, http, timeout)),
            ProviderKind::Anthropic => {
                Self::Anthropic(AnthropicClient::new(name, url, key, http, timeout))
            }
            ProviderKind::Mock => Self::Mock(MockBackend::new(
                name,
                cfg.seed.unwrap_or(0),
                Duration::from_millis(cfg.ttft_ms.unwrap_or(0)),
                cfg.tokens_per_sec.unwrap_or(0.0),
                timeout,
            )),
        }
    }

    /// Whether the wire format continues a reply from an assistant prefix (prefill).
    pub fn supports_prefill(&self) -> bool {
        matches!(self, Self::Anthropic(_) | Self::Mock(_))
    }

    /// Embeds `texts` with `model`: the vectors in order, the usage reported, and the rate
    /// headers seen.
    pub async fn embed(
        &self,
        model: &str,
        texts: &[String],
    ) -> (
        Result<(Vec<Vec<f32>>, Option<crate::store::Usage>), ProviderError>,
        RateHeaders,
    ) {
        match self {
            Self::OpenAi(c) => c.embed(model, texts).await,
            Self::Mock(m) => {
                let v = texts
                    .iter()
                    .map(|t| crate::mock_upstream::embed(m.seed(), t))
                    .collect();
                (Ok((v, None)), RateHeaders::default())
            }
            Self::Anthropic(c) => (
                Err(ProviderError::Protocol {
                    provider: c.name().to_owned(),
                    message: "anthropic has no embeddings API".into(),
                }),
                RateHeaders::default(),
            ),
        }
    }

    pub async fn run(&self, req: ChatRequest, tx: &EventTx, seen: &Observed) {
        match self {
            Self::OpenAi(c) => c.run(req, tx, seen).await,
            Self::Anthropic(c) => c.run(req, tx, seen).await,
            Self::Mock(m) => m.run(req, tx).await,
        }
    }
}
