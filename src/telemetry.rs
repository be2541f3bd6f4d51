//! Logs and traces. Logs: lines on stderr (`text`, or `json` objects with `[telemetry]
//! log_format`), filtered by `RUST_LOG` (default `info`). Traces: with `[telemetry]
//! otlp_endpoint` (or the standard `OTEL_EXPORTER_OTLP_*` variables) the spans of requests,
//! generations and upstream attempts go to an OpenTelemetry collector over OTLP/HTTP, named by
//! the GenAI semantic conventions; a request's `traceparent` makes its spans part of the
//! caller's trace. Events of the target [`OTEL_TARGET`] (cache hits) go to the traces only.

use std::sync::atomic::{AtomicBool, Ordering};

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing::Level;
use tracing_subscriber::filter::Targets;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer as _};

use crate::config::{LogFormat, TelemetryConfig};

/// The target of events meant for traces, not logs.
pub const OTEL_TARGET: &str = "parley::otel";

static CAPTURE_CONTENT: AtomicBool = AtomicBool::new(false);

/// Whether spans may carry messages and replies (`[telemetry] capture_content`).
pub fn captures_content() -> bool {
    CAPTURE_CONTENT.load(Ordering::Relaxed)
}

/// What must be flushed before the process exits.
#[must_use]
pub struct Telemetry {
    provider: Option<SdkTracerProvider>,
}

impl Telemetry {
    /// Sends the spans still buffered (at shutdown).
    pub fn shutdown(self) {
        if let Some(p) = self.provider {
            if let Err(e) = p.shutdown() {
                eprintln!("parley: traces not all exported at shutdown: {e}");
            }
        }
    }
}

/// Installs the global subscriber; a second call (tests) installs nothing.
///
/// # Errors
/// An OTLP exporter that cannot be built (a malformed endpoint).
pub fn init(cfg: &TelemetryConfig) -> Result<Telemetry, String> {
    CAPTURE_CONTENT.store(cfg.capture_content, Ordering::Relaxed);
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let logs = match cfg.log_format {
        LogFormat::Text => tracing_subscriber::fmt::layer()
            .with_ansi(ansi)
            .with_writer(std::io::stderr)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .with_current_span(true)
            .with_writer(std::io::stderr)
            .boxed(),
    };
    // The traces' own target stays out of the logs.
    let logs = logs.with_filter(
        filter.add_directive(
            format!("{OTEL_TARGET}=off")
                .parse()
                .map_err(|e| format!("log filter: {e}"))?,
        ),
    );
    let from_env = [
        "OTEL_EXPORTER_OTLP_ENDPOINT",
        "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT",
    ]
    .iter()
    .any(|v| std::env::var_os(v).is_some_and(|x| !x.is_empty()));
    let provider = if cfg.otlp_endpoint.is_some() || from_env {
        Some(tracer_provider(cfg)?)
    } else {
        None
    };
    let traces = provider.as_ref().map(|p| {
        opentelemetry::global::set_text_map_propagator(
            opentelemetry_sdk::propagation::TraceContextPropagator::new(),
        );
        tracing_opentelemetry::layer()
            .with_tracer(p.tracer("parley"))
            .with_filter(
                Targets::new()
                    .with_target("parley", Level::INFO)
                    .with_target(OTEL_TARGET, Level::DEBUG),
            )
    });
    let _ = tracing_subscriber::registry()
        .with(logs)
        .with(traces)
        .try_init();
    Ok(Telemetry { provider })
}

fn tracer_provider(cfg: &TelemetryConfig) -> Result<SdkTracerProvider, String> {
    use opentelemetry_otlp::WithExportConfig as _;
    let mut exporter = opentelemetry_otlp::SpanExporter::builder().with_http();
    if let Some(base) = &cfg.otlp_endpoint {
        let base = base.trim_end_matches('/');
        let url = if base.ends_with("/v1/traces") {
            base.to_owned()
        } else {
            format!("{base}/v1/traces")
        };
        exporter = exporter.with_endpoint(url);
    }
    let exporter = exporter
        .build()
        .map_err(|e| format!("telemetry.otlp_endpoint: {e}"))?;
    let name = cfg
        .service_name
        .clone()
        .or_else(|| std::env::var("OTEL_SERVICE_NAME").ok())
        .unwrap_or_else(|| "parley".into());
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(
            opentelemetry_sdk::Resource::builder()
                .with_service_name(name)
                .build(),
        )
        .build())
}

/// Reads a request's trace context (`traceparent`) from actix's headers.
pub struct HeaderExtractor<'a>(pub &'a actix_web::http::header::HeaderMap);

impl opentelemetry::propagation::Extractor for HeaderExtractor<'_> {
    fn get(&self, key: &str) -> Option<&str> {
        self.0.get(key).and_then(|v| v.to_str().ok())
    }

    fn keys(&self) -> Vec<&str> {
        self.0
            .keys()
            .map(actix_web::http::header::HeaderName::as_str)
            .collect()
    }
}

/// Makes `span` a child of the trace the request names in its `traceparent`, if any.
pub fn adopt_remote_parent(span: &tracing::Span, headers: &actix_web::http::header::HeaderMap) {
    use tracing_opentelemetry::OpenTelemetrySpanExt as _;
    if headers.contains_key("traceparent") {
        let cx = opentelemetry::global::get_text_map_propagator(|p| {
            p.extract(&HeaderExtractor(headers))
        });
        let _ = span.set_parent(cx);
    }
}
