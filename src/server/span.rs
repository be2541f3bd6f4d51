//! The root span of every HTTP request: method, path (never the query string, which may carry
//! `access_token`), status and latency. Headers and bodies are never recorded.

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::Error;
use tracing::Span;
use tracing_actix_web::RootSpanBuilder;

pub struct SafeRootSpan;

impl RootSpanBuilder for SafeRootSpan {
    fn on_request_start(request: &ServiceRequest) -> Span {
        // The route's pattern (`/v1/conversations/{id}`) names the span; the path is recorded
        // as it came (never the query string).
        let route = request.match_pattern();
        let span = tracing::info_span!(
            "http",
            otel.name = %format_args!("{} {}", request.method(), route.as_deref().unwrap_or("unmatched")),
            otel.kind = "server",
            http.request.method = %request.method(),
            http.route = route.as_deref().unwrap_or(""),
            method = %request.method(),
            path = %request.path(),
            status = tracing::field::Empty,
            http.response.status_code = tracing::field::Empty,
        );
        crate::telemetry::adopt_remote_parent(&span, request.headers());
        span
    }

    fn on_request_end<B: MessageBody>(span: Span, outcome: &Result<ServiceResponse<B>, Error>) {
        let status = match outcome {
            Ok(res) => res
                .response()
                .error()
                .map_or(res.status(), |e| e.as_response_error().status_code()),
            Err(e) => e.as_response_error().status_code(),
        };
        span.record("status", status.as_u16());
        span.record("http.response.status_code", status.as_u16());
        let _guard = span.enter();
        // One line at most per request above debug: a 5xx is logged where it is answered
        // (`ApiError`, with its code); a 4xx is the client's and logs nothing, so log volume
        // never follows abusive traffic.
        tracing::debug!(status = status.as_u16(), "request done");
    }
}
