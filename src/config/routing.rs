//! Providers, routes and retries: what the upstream side of the configuration says.

use std::time::Duration;

use serde::Deserialize;

use crate::limits::{Backoff, BreakerConfig};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProviderKind {
    Openai,
    Anthropic,
    Mock,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderConfig {
    pub name: String,
    pub kind: ProviderKind,
    #[serde(default)]
    pub base_url: Option<String>,
    #[serde(default)]
    pub api_key_env: Option<String>,
    #[serde(default)]
    pub api_keys_env: Vec<String>,
    #[serde(default)]
    pub region: Option<String>,
    #[serde(default)]
    pub rpm: u32,
    #[serde(default)]
    pub tpm: u32,
    #[serde(default = "default_timeout_secs")]
    pub timeout_secs: u64,
    /// `mock` only: delay before the first token.
    #[serde(default)]
    pub ttft_ms: Option<u64>,
    /// `mock` only: streaming pace (0 = as fast as possible).
    #[serde(default)]
    pub tokens_per_sec: Option<f64>,
    /// `mock` only: the seed of the reply generator.
    #[serde(default)]
    pub seed: Option<u64>,
    /// Requests in flight per deployment (API key) at most (0 = unlimited).
    #[serde(default)]
    pub max_concurrency: u32,
    /// How long a request may wait for a rate-limit slot before it goes to the next target.
    #[serde(default = "default_queue_timeout_ms")]
    pub queue_timeout_ms: u64,
    /// Requests that may wait for a slot at once.
    #[serde(default = "default_max_queue")]
    pub max_queue: usize,
    #[serde(default)]
    pub breaker: BreakerConfig,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    pub model: String,
    /// The targets (every strategy but `semantic`, whose targets are in its tiers).
    #[serde(default)]
    pub targets: Vec<TargetConfig>,
    #[serde(default)]
    pub strategy: Strategy,
    /// `semantic`: the tiers, cheapest first.
    #[serde(default)]
    pub tiers: Vec<TierConfig>,
    /// `semantic` with two tiers: the difficulty score (0–1) at or above which a request goes
    /// to the second.
    #[serde(default)]
    pub threshold: Option<f32>,
    /// `semantic` with more tiers: one ascending threshold per tier after the first.
    #[serde(default)]
    pub thresholds: Option<Vec<f32>>,
    /// `semantic`: turns a conversation stays at least at a tier the classifier escalated it to.
    #[serde(default = "default_sticky_turns")]
    pub sticky_turns: u32,
    /// `semantic`: labelled example prompts added to the shipped ones.
    #[serde(default)]
    pub examples: Vec<crate::routing::Example>,
    /// `semantic`: a JSONL file of more examples (`{"text": ..., "label": "easy" | "hard"}`).
    #[serde(default)]
    pub examples_file: Option<std::path::PathBuf>,
    /// `semantic`: whether the shipped examples are used (else only the route's own).
    #[serde(default = "yes")]
    pub default_examples: bool,
    /// A target silent this long before its first token is abandoned for the next (0 = off).
    #[serde(default)]
    pub ttft_timeout_ms: u64,
    /// When a stream breaks after text was sent, finish the reply on another target.
    #[serde(default)]
    pub continue_on_fallback: bool,
    /// Provider regions this route may send to (data residency; `None`: any).
    #[serde(default)]
    pub regions: Option<Vec<String>>,
    /// A versioned system prompt (`name@3`, `name@latest`) for conversations without one.
    #[serde(default)]
    pub prompt: Option<String>,
    /// PII in what leaves: `off`, `redact` (default) or `block`.
    #[serde(default)]
    pub pii: crate::guard::pii::PiiMode,
    /// Prompt-injection screening of user messages: `off` (default), `flag` or `block`.
    #[serde(default)]
    pub injection: crate::guard::injection::InjectionMode,
    /// Whether this route's turns use the semantic cache.
    #[serde(default = "yes")]
    pub cache: bool,
    /// Request parameters that a target cannot honour and may be left out for it (by their
    /// OpenAI names, as `logprobs`); any other such parameter is refused with `bad_request`.
    #[serde(default)]
    pub drop_unsupported: Vec<String>,
}

/// How a route orders its targets for each request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Strategy {
    /// In the configured order.
    #[default]
    Fallback,
    /// Randomly, by weight.
    Weighted,
    /// Fewest requests in flight first, then best recent latency.
    LeastBusy,
    /// By the request's difficulty, to one of the route's `tiers` (each with its own strategy).
    Semantic,
}

/// One tier of a `semantic` route.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TierConfig {
    pub name: String,
    pub targets: Vec<TargetConfig>,
    #[serde(default)]
    pub strategy: Strategy,
}

fn default_sticky_turns() -> u32 {
    3
}

/// Retries of a request whose targets all failed before any text (`[retry]`).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetryConfig {
    /// Passes over the targets after the first (0 = no retry).
    pub max_retries: u32,
    pub base_ms: u64,
    pub cap_ms: u64,
    /// Total time a request may spend retrying.
    pub budget_ms: u64,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self {
            max_retries: 2,
            base_ms: 250,
            cap_ms: 4_000,
            budget_ms: 20_000,
        }
    }
}

impl RetryConfig {
    pub fn backoff(&self) -> Backoff {
        Backoff {
            base: Duration::from_millis(self.base_ms),
            cap: Duration::from_millis(self.cap_ms),
        }
    }

    pub fn budget(&self) -> Duration {
        Duration::from_millis(self.budget_ms)
    }
}

impl RouteConfig {
    pub fn new(model: &str, targets: Vec<TargetConfig>) -> Self {
        Self {
            model: model.into(),
            targets,
            strategy: Strategy::default(),
            tiers: Vec::new(),
            threshold: None,
            thresholds: None,
            sticky_turns: default_sticky_turns(),
            examples: Vec::new(),
            examples_file: None,
            default_examples: true,
            ttft_timeout_ms: 0,
            continue_on_fallback: false,
            regions: None,
            prompt: None,
            pii: crate::guard::pii::PiiMode::default(),
            injection: crate::guard::injection::InjectionMode::default(),
            cache: true,
            drop_unsupported: Vec::new(),
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TargetConfig {
    pub provider: String,
    pub model: String,
    /// Relative share under the `weighted` strategy.
    #[serde(default = "default_weight")]
    pub weight: u32,
}

impl TargetConfig {
    pub fn new(provider: &str, model: &str) -> Self {
        Self {
            provider: provider.into(),
            model: model.into(),
            weight: default_weight(),
        }
    }
}

fn default_weight() -> u32 {
    1
}

fn default_queue_timeout_ms() -> u64 {
    2_000
}

fn default_max_queue() -> usize {
    256
}

fn default_timeout_secs() -> u64 {
    60
}

impl ProviderConfig {
    /// The built-in mock provider, as the embedded default serves it.
    pub fn builtin_mock() -> Self {
        Self {
            name: "mock".into(),
            kind: ProviderKind::Mock,
            base_url: None,
            api_key_env: None,
            api_keys_env: Vec::new(),
            region: Some("local".into()),
            rpm: 0,
            tpm: 0,
            timeout_secs: default_timeout_secs(),
            ttft_ms: None,
            tokens_per_sec: None,
            seed: None,
            max_concurrency: 0,
            queue_timeout_ms: default_queue_timeout_ms(),
            max_queue: default_max_queue(),
            breaker: BreakerConfig::default(),
        }
    }

    pub(super) fn hosted(name: &str, kind: ProviderKind, base_url: &str, key_env: &str) -> Self {
        Self {
            name: name.into(),
            kind,
            base_url: Some(base_url.into()),
            api_key_env: Some(key_env.into()),
            region: None,
            ..Self::builtin_mock()
        }
    }

    /// The base URL, with the kind's public endpoint when none is configured.
    pub fn base_url(&self) -> &str {
        match (&self.base_url, self.kind) {
            (Some(url), _) => url.trim_end_matches('/'),
            (None, ProviderKind::Openai) => "https://api.openai.com/v1",
            (None, ProviderKind::Anthropic) => "https://api.anthropic.com/v1",
            (None, ProviderKind::Mock) => "",
        }
    }

    /// The environment variables that hold this provider's keys, in order.
    pub fn key_envs(&self) -> Vec<&str> {
        self.api_key_env
            .iter()
            .chain(&self.api_keys_env)
            .map(String::as_str)
            .collect()
    }

    pub fn timeout(&self) -> Duration {
        Duration::from_secs(self.timeout_secs)
    }
}

pub(super) fn target(provider: &str, model: &str) -> TargetConfig {
    TargetConfig::new(provider, model)
}

fn yes() -> bool {
    true
}
