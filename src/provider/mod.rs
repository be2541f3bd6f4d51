//! Upstream LLM providers: one [`ProviderActor`] per configured provider, the [`Router`] that
//! turns a route name into an upstream stream with fallback, and the wire formats (OpenAI,
//! Anthropic, the in-process mock). reqwest is used only here.
//!
//! A generation is a bounded channel of [`UpstreamEvent`]s fed by a task the provider actor
//! spawns; dropping the receiving end closes the upstream request.

mod actor;
mod anthropic;
mod backend;
mod deployment;
pub mod http;
mod mock;
mod openai;
mod router;
mod sse;

use std::time::Duration;

pub use actor::{Dispatch, Embed, Generation, Limits, ProviderActor, ProviderInfo, ProviderStats};
pub use deployment::DeploymentInfo;
pub use router::{ProviderHandle, Router, RouterError, Started, CONTINUE_INSTRUCTION};

use crate::domain::{Message, Params, Tool, ToolCallDelta, ToolChoice, UpstreamFinish, Usage};
use crate::error::{ApiError, ErrorCode};

/// Events of a generation buffered between the upstream task and its consumer.
pub const STREAM_BUFFER: usize = 64;

/// Where a backend sends a generation's events: the consumer's channel, noting on the way what
/// the deployment's accounting needs (when the first event left, how the generation ended), so
/// no relay between the two is needed.
pub struct EventTx {
    tx: tokio::sync::mpsc::Sender<UpstreamEvent>,
    begun: std::time::Instant,
    /// When the first event left, and the first end that did (each set once, no lock).
    first: std::sync::OnceLock<Duration>,
    end: std::sync::OnceLock<End>,
}

#[derive(Clone, Copy)]
enum End {
    Finished(Option<Usage>),
    Failed(Option<u16>),
}

impl EventTx {
    pub fn new(tx: tokio::sync::mpsc::Sender<UpstreamEvent>) -> Self {
        Self {
            tx,
            begun: std::time::Instant::now(),
            first: std::sync::OnceLock::new(),
            end: std::sync::OnceLock::new(),
        }
    }

    /// Sends `event` to the consumer.
    ///
    /// # Errors
    /// The consumer is gone (the event comes back).
    pub async fn send(
        &self,
        event: UpstreamEvent,
    ) -> Result<(), tokio::sync::mpsc::error::SendError<UpstreamEvent>> {
        let end = match &event {
            UpstreamEvent::Finished { usage, .. } => Some(End::Finished(*usage)),
            UpstreamEvent::Failed(e) => Some(End::Failed(e.status())),
            UpstreamEvent::Delta(_) | UpstreamEvent::ToolCall(_) | UpstreamEvent::Logprobs(_) => {
                None
            }
        };
        let at = self.begun.elapsed();
        self.tx.send(event).await?;
        let _ = self.first.set(at);
        if let Some(end) = end {
            let _ = self.end.set(end);
        }
        Ok(())
    }

    /// Resolves when the consumer has gone.
    pub async fn closed(&self) {
        self.tx.closed().await;
    }

    pub fn is_closed(&self) -> bool {
        self.tx.is_closed()
    }

    /// How the generation ended for the deployment: succeeded (with its usage and time to the
    /// first event), failed, or abandoned (the consumer left before an end reached it).
    fn outcome(&self) -> deployment::Outcome {
        match self.end.get() {
            Some(End::Finished(usage)) => deployment::Outcome::Succeeded {
                usage: *usage,
                ttft: self.first.get().copied().unwrap_or_default(),
            },
            Some(End::Failed(status)) => deployment::Outcome::Failed { status: *status },
            None => deployment::Outcome::Abandoned,
        }
    }
}

/// A request for one generation, in provider-neutral terms.
#[derive(Debug, Clone, Default)]
pub struct ChatRequest {
    /// The upstream model (filled in per target by the router).
    pub model: String,
    pub messages: Vec<Message>,
    pub max_tokens: Option<u32>,
    pub temperature: Option<f32>,
    pub tools: Vec<Tool>,
    pub tool_choice: Option<ToolChoice>,
    /// Boxed: a request moves through queues and channels, and most carry no parameters.
    pub params: Box<Params>,
    /// The caller wants the reply in one piece (a non-streaming HTTP request): an
    /// OpenAI-compatible target may answer in one JSON body instead of a stream. The router
    /// clears it where a stream matters (a route with a time-to-first-token limit).
    pub whole: bool,
}

impl ChatRequest {
    /// Whether anything but plain text is asked for or carried: tools, tool results, images,
    /// a structured answer (the semantic cache stays away from such requests).
    pub fn is_plain(&self) -> bool {
        self.tools.is_empty()
            && !self.params.wants_structured()
            && self.messages.iter().all(Message::is_plain)
    }
}

/// What an upstream generation produces, in order: deltas (text, tool-call fragments), then
/// exactly one end.
#[derive(Debug, Clone)]
pub enum UpstreamEvent {
    Delta(String),
    ToolCall(ToolCallDelta),
    /// Log probabilities of the tokens of the next delta (OpenAI's `logprobs.content` items).
    Logprobs(Vec<serde_json::Value>),
    Finished {
        finish: UpstreamFinish,
        usage: Option<Usage>,
        model: Option<String>,
    },
    Failed(ProviderError),
}

/// Why an upstream call failed. Never carries a key or a prompt.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ProviderError {
    #[error("{provider} answered {status}: {message}")]
    Status {
        provider: String,
        status: u16,
        message: String,
        retry_after: Option<Duration>,
    },
    #[error("{provider} could not be reached: {message}")]
    Connect { provider: String, message: String },
    #[error("{provider} timed out")]
    Timeout { provider: String },
    #[error("{provider} stream broke: {message}")]
    Interrupted { provider: String, message: String },
    #[error("{provider} sent an invalid response: {message}")]
    Protocol { provider: String, message: String },
    #[error("provider {provider} is not available: {message}")]
    Unavailable {
        provider: String,
        message: String,
        retry_after: Option<Duration>,
    },
    /// The request cannot be put in this provider's wire format (a parameter it cannot honour,
    /// tool arguments that are not an object): the client's to fix, never retried.
    #[error("{provider} cannot take this request: {message}")]
    Invalid { provider: String, message: String },
    /// parley's own limits for the provider are exhausted for now.
    #[error("{provider} is at its rate limit")]
    Limited {
        provider: String,
        retry_after: Duration,
    },
}

impl ProviderError {
    /// The HTTP status this failure counts as for a deployment's health, if any.
    pub fn status(&self) -> Option<u16> {
        match self {
            Self::Status { status, .. } => Some(*status),
            // The request could not be put in the provider's format: the client's fault, as a 400.
            Self::Invalid { .. } => Some(400),
            _ => None,
        }
    }

    pub fn code(&self) -> ErrorCode {
        match self {
            Self::Status { status: 429, .. } | Self::Limited { .. } => ErrorCode::RateLimited,
            Self::Status { .. } | Self::Protocol { .. } => ErrorCode::UpstreamError,
            Self::Connect { .. } | Self::Timeout { .. } | Self::Unavailable { .. } => {
                ErrorCode::UpstreamUnavailable
            }
            Self::Interrupted { .. } => ErrorCode::UpstreamInterrupted,
            Self::Invalid { .. } => ErrorCode::BadRequest,
        }
    }

    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Status { retry_after, .. } | Self::Unavailable { retry_after, .. } => {
                *retry_after
            }
            Self::Limited { retry_after, .. } => Some(*retry_after),
            _ => None,
        }
    }

    /// Whether trying another target could help (anything but a request the upstream refused).
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Status { status, .. } => *status == 429 || *status == 408 || *status >= 500,
            Self::Connect { .. }
            | Self::Timeout { .. }
            | Self::Unavailable { .. }
            | Self::Limited { .. } => true,
            Self::Interrupted { .. } | Self::Protocol { .. } => true,
            Self::Invalid { .. } => false,
        }
    }
}

impl From<ProviderError> for ApiError {
    fn from(err: ProviderError) -> Self {
        let mut api = ApiError::new(err.code(), err.to_string());
        if let ProviderError::Timeout { .. } = err {
            api.status = Some(actix_web::http::StatusCode::GATEWAY_TIMEOUT);
        }
        match err.retry_after() {
            Some(after) => api.with_retry_after(after),
            None => api,
        }
    }
}

/// What an upstream's response headers said about its limits, kept by the generation for the
/// provider actor's buckets.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RateHeaders {
    pub remaining_requests: Option<u64>,
    pub remaining_tokens: Option<u64>,
    pub retry_after: Option<Duration>,
}

impl RateHeaders {
    /// Reads OpenAI (`x-ratelimit-remaining-*`) and Anthropic (`anthropic-ratelimit-*-remaining`)
    /// headers and `Retry-After`.
    pub fn read(headers: &reqwest::header::HeaderMap) -> Self {
        let get = |names: &[&str]| {
            names
                .iter()
                .find_map(|n| headers.get(*n)?.to_str().ok()?.trim().parse::<u64>().ok())
        };
        Self {
            remaining_requests: get(&[
                "x-ratelimit-remaining-requests",
                "anthropic-ratelimit-requests-remaining",
            ]),
            remaining_tokens: get(&[
                "x-ratelimit-remaining-tokens",
                "anthropic-ratelimit-tokens-remaining",
            ]),
            retry_after: headers
                .get(reqwest::header::RETRY_AFTER)
                .and_then(|v| v.to_str().ok())
                .and_then(parse_retry_after),
        }
    }
}

/// Where a generation leaves the rate headers it saw.
pub type Observed = parking_lot::Mutex<RateHeaders>;

/// Parses a `Retry-After` header value given in seconds (fractions allowed).
pub(crate) fn parse_retry_after(value: &str) -> Option<Duration> {
    let secs: f64 = value.trim().parse().ok()?;
    (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs.min(3600.0)))
}
