//! Upstream LLM providers: one [`ProviderActor`] per configured provider, the [`Router`] that
//! turns a route name into an upstream stream with fallback, and the wire formats (OpenAI,
//! Anthropic, the in-process mock). reqwest is used only here.
//!
//! A generation is a bounded channel of [`UpstreamEvent`]s fed by a task the provider actor
//! spawns; dropping the receiving end closes the upstream request.

mod actor;
mod anthropic;
mod mock;
mod openai;
mod router;
mod sse;

use std::time::Duration;

use serde::Serialize;

pub use actor::{Dispatch, ProviderActor};
pub use router::{Router, RouterError, Started};

use crate::error::{ApiError, ErrorCode};
use crate::store::Usage;

/// Events of a generation buffered between the upstream task and its consumer.
pub const STREAM_BUFFER: usize = 64;

/// One chat message sent upstream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChatMessage {
    pub role: &'static str,
    pub content: String,
}

/// A request for one generation, in provider-neutral terms.
#[derive(Debug, Clone)]
pub struct ChatRequest {
    /// The upstream model (filled in per target by the router).
    pub model: String,
    pub messages: Vec<ChatMessage>,
    pub max_tokens: Option<u32>,
    pub temperature: Option<f32>,
}

/// What an upstream generation produces, in order: deltas, then exactly one end.
#[derive(Debug, Clone)]
pub enum UpstreamEvent {
    Delta(String),
    Finished {
        finish_reason: String,
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
    Unavailable { provider: String, message: String },
}

impl ProviderError {
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::Status { status: 429, .. } => ErrorCode::RateLimited,
            Self::Status { .. } | Self::Protocol { .. } => ErrorCode::UpstreamError,
            Self::Connect { .. } | Self::Timeout { .. } | Self::Unavailable { .. } => {
                ErrorCode::UpstreamUnavailable
            }
            Self::Interrupted { .. } => ErrorCode::UpstreamInterrupted,
        }
    }

    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            Self::Status { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// Whether trying another target could help (anything but a request the upstream refused).
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Status { status, .. } => *status == 429 || *status == 408 || *status >= 500,
            Self::Connect { .. } | Self::Timeout { .. } | Self::Unavailable { .. } => true,
            Self::Interrupted { .. } | Self::Protocol { .. } => true,
        }
    }
}

impl From<ProviderError> for ApiError {
    fn from(err: ProviderError) -> Self {
        let api = ApiError::new(err.code(), err.to_string());
        match err.retry_after() {
            Some(after) => api.with_retry_after(after),
            None => api,
        }
    }
}

/// Parses a `Retry-After` header value given in seconds (fractions allowed).
pub(crate) fn parse_retry_after(value: &str) -> Option<Duration> {
    let secs: f64 = value.trim().parse().ok()?;
    (secs.is_finite() && secs >= 0.0).then(|| Duration::from_secs_f64(secs.min(3600.0)))
}
