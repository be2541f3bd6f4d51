//! The protocol's error codes and the one place they become HTTP responses and WebSocket frames.
//!
//! Every module has its own error enum; each maps to an [`ErrorCode`] and converts into
//! [`ApiError`]. One [`ResponseError`] impl writes the OpenAI error shape, and the WebSocket
//! `error` frame is built from the same value, so the two edges cannot drift apart.

use std::time::Duration;

use actix_web::http::{header, StatusCode};
use actix_web::{HttpResponse, ResponseError};
use serde::{Deserialize, Serialize};

/// The error codes of PROTOCOL §5, in the order they are listed there.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    BadRequest,
    Unauthorized,
    NotFound,
    ModelNotFound,
    Forbidden,
    RateLimited,
    QuotaExceeded,
    TooLarge,
    Blocked,
    UpstreamError,
    UpstreamUnavailable,
    UpstreamInterrupted,
    Internal,
}

impl ErrorCode {
    /// The HTTP status that carries this code.
    pub fn status(self) -> StatusCode {
        match self {
            Self::BadRequest => StatusCode::BAD_REQUEST,
            Self::Unauthorized => StatusCode::UNAUTHORIZED,
            Self::Forbidden => StatusCode::FORBIDDEN,
            Self::NotFound | Self::ModelNotFound => StatusCode::NOT_FOUND,
            Self::TooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Self::RateLimited | Self::QuotaExceeded => StatusCode::TOO_MANY_REQUESTS,
            Self::Blocked => StatusCode::BAD_REQUEST,
            Self::UpstreamError | Self::UpstreamInterrupted => StatusCode::BAD_GATEWAY,
            Self::UpstreamUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            Self::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The OpenAI error `type` for this code.
    pub fn openai_type(self) -> &'static str {
        match self {
            Self::BadRequest | Self::TooLarge | Self::Blocked => "invalid_request_error",
            Self::Unauthorized => "authentication_error",
            Self::Forbidden => "permission_error",
            Self::NotFound | Self::ModelNotFound => "not_found_error",
            Self::RateLimited | Self::QuotaExceeded => "rate_limit_error",
            Self::UpstreamError | Self::UpstreamUnavailable | Self::UpstreamInterrupted => {
                "upstream_error"
            }
            Self::Internal => "server_error",
        }
    }

    /// The wire string (`bad_request`, …).
    pub fn as_str(self) -> &'static str {
        match self {
            Self::BadRequest => "bad_request",
            Self::Unauthorized => "unauthorized",
            Self::NotFound => "not_found",
            Self::ModelNotFound => "model_not_found",
            Self::Forbidden => "forbidden",
            Self::RateLimited => "rate_limited",
            Self::QuotaExceeded => "quota_exceeded",
            Self::TooLarge => "too_large",
            Self::Blocked => "blocked",
            Self::UpstreamError => "upstream_error",
            Self::UpstreamUnavailable => "upstream_unavailable",
            Self::UpstreamInterrupted => "upstream_interrupted",
            Self::Internal => "internal",
        }
    }
}

/// An error as a client sees it: a code, a message fit for the client, and an optional retry hint.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{code:?}: {message}")]
pub struct ApiError {
    pub code: ErrorCode,
    pub message: String,
    pub retry_after: Option<Duration>,
    /// A status other than the code's own (an upstream timeout is 504 `upstream_unavailable`).
    pub status: Option<StatusCode>,
}

/// The retry hint of a rate-limit answer that came without one.
pub const DEFAULT_RETRY_AFTER: Duration = Duration::from_secs(1);

impl ApiError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
            retry_after: None,
            status: None,
        }
    }
    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(ErrorCode::BadRequest, message)
    }
    pub fn not_found(what: &str) -> Self {
        Self::new(ErrorCode::NotFound, format!("{what} not found"))
    }
    pub fn unauthorized() -> Self {
        Self::new(ErrorCode::Unauthorized, "missing or invalid API key")
    }
    /// A generic `internal` error; the cause is logged where it happened, never sent to clients.
    pub fn internal() -> Self {
        Self::new(ErrorCode::Internal, "internal error")
    }
    pub fn with_retry_after(mut self, after: Duration) -> Self {
        self.retry_after = Some(after);
        self
    }
    /// The `retry_after_ms` field of the WebSocket error frame.
    pub fn retry_after_ms(&self) -> Option<u64> {
        self.retry_hint()
            .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
    }

    /// The retry hint; rate-limit answers always carry one.
    pub fn retry_hint(&self) -> Option<Duration> {
        match self.code {
            ErrorCode::RateLimited | ErrorCode::QuotaExceeded => {
                Some(self.retry_after.unwrap_or(DEFAULT_RETRY_AFTER))
            }
            _ => self.retry_after,
        }
    }
    /// The OpenAI-shaped body `{"error": {...}}`.
    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({
            "error": {
                "message": self.message,
                "type": self.code.openai_type(),
                "code": self.code.as_str(),
            }
        })
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        self.status.unwrap_or_else(|| self.code.status())
    }

    fn error_response(&self) -> HttpResponse {
        if self.status_code().is_server_error() {
            tracing::error!(code = self.code.as_str(), message = %self.message, "request failed");
        } else {
            tracing::debug!(code = self.code.as_str(), message = %self.message, "request refused");
        }
        let mut resp = HttpResponse::build(self.status_code());
        if let Some(after) = self.retry_hint() {
            // Retry-After is in whole seconds; round up so clients never retry too early.
            let secs = after.as_millis().div_ceil(1000).max(1);
            resp.insert_header((header::RETRY_AFTER, secs.to_string()));
        }
        resp.json(self.body())
    }
}

impl From<actix::MailboxError> for ApiError {
    fn from(err: actix::MailboxError) -> Self {
        tracing::error!(error = %err, "actor mailbox failed");
        Self::internal()
    }
}

/// Fault injection (tests): unwinds as a panic does, without the panic hook, whose backtrace of
/// the test binary (symbolising its debug info) can hold the thread for seconds under load.
#[cfg(feature = "fault-injection")]
pub fn injected_panic(what: &'static str) -> ! {
    std::panic::resume_unwind(Box::new(what))
}
