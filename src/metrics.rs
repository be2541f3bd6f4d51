//! Prometheus metrics: time to first token, tokens and errors per provider, live sockets.
//! Labels carry provider names and error codes only: never keys, tenants' secrets or prompts.

use std::time::Duration;

use prometheus::{
    Encoder, HistogramOpts, HistogramVec, IntCounterVec, IntGauge, Opts, Registry, TextEncoder,
};

use crate::error::ErrorCode;
use crate::store::Usage;

#[derive(Clone)]
pub struct Metrics {
    registry: Registry,
    turns: IntCounterVec,
    ttft: HistogramVec,
    tokens: IntCounterVec,
    errors: IntCounterVec,
    pub ws_connections: IntGauge,
    pub live_conversations: IntGauge,
    /// Conversation actors stopped for being idle.
    pub conversation_idle_stops: prometheus::IntCounter,
    guard_events: IntCounterVec,
    cache_lookups: IntCounterVec,
    cache_near_misses: IntCounterVec,
    cache_lookup_seconds: prometheus::Histogram,
    pub cache_entries: IntGauge,
    tier_decisions: IntCounterVec,
    gen_ai: GenAi,
}

/// The GenAI semantic conventions' client and server histograms, Prometheus-named.
#[derive(Clone)]
struct GenAi {
    duration: HistogramVec,
    tokens: HistogramVec,
    ttft: HistogramVec,
    per_token: HistogramVec,
}

/// One generation as the GenAI histograms see it.
pub struct GenAiObservation<'a> {
    /// The route asked for (`gen_ai.request.model`).
    pub request_model: &'a str,
    pub provider: &'a str,
    pub response_model: &'a str,
    pub duration: Duration,
    pub ttft: Option<Duration>,
    pub input_tokens: u32,
    pub output_tokens: u32,
    /// The error code, when it failed.
    pub error: Option<&'a str>,
}

impl Metrics {
    /// Creates the metric families.
    ///
    /// # Errors
    /// Only on an invalid metric definition (a bug), reported at start.
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let turns = IntCounterVec::new(
            Opts::new("parley_turns_total", "Turns by provider and outcome"),
            &["provider", "outcome"],
        )?;
        let buckets = vec![0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0];
        let ttft = HistogramVec::new(
            HistogramOpts::new("parley_ttft_seconds", "Time to first token by provider")
                .buckets(buckets),
            &["provider"],
        )?;
        let tokens = IntCounterVec::new(
            Opts::new("parley_tokens_total", "Tokens by provider and kind"),
            &["provider", "kind"],
        )?;
        let errors = IntCounterVec::new(
            Opts::new("parley_errors_total", "Failed turns by provider and code"),
            &["provider", "code"],
        )?;
        let ws_connections = IntGauge::new("parley_ws_connections", "Open WebSocket connections")?;
        let live_conversations =
            IntGauge::new("parley_live_conversations", "Conversation actors in memory")?;
        registry.register(Box::new(turns.clone()))?;
        registry.register(Box::new(ttft.clone()))?;
        registry.register(Box::new(tokens.clone()))?;
        registry.register(Box::new(errors.clone()))?;
        registry.register(Box::new(ws_connections.clone()))?;
        registry.register(Box::new(live_conversations.clone()))?;
        let conversation_idle_stops = prometheus::IntCounter::new(
            "parley_conversation_idle_stops_total",
            "Conversation actors stopped for being idle (history stays on disk)",
        )?;
        registry.register(Box::new(conversation_idle_stops.clone()))?;
        let guard_events = IntCounterVec::new(
            Opts::new(
                "parley_guard_events_total",
                "Guardrail findings by guard and action",
            ),
            &["guard", "action"],
        )?;
        registry.register(Box::new(guard_events.clone()))?;
        let cache_lookups = IntCounterVec::new(
            Opts::new(
                "parley_cache_lookups_total",
                "Semantic cache lookups by result (hit, miss, near_miss, skipped)",
            ),
            &["result"],
        )?;
        let cache_near_misses = IntCounterVec::new(
            Opts::new(
                "parley_cache_near_misses_total",
                "Candidates similar enough but rejected, by the false-hit guard that rejected them",
            ),
            &["guard"],
        )?;
        let cache_lookup_seconds = prometheus::Histogram::with_opts(
            HistogramOpts::new(
                "parley_cache_lookup_seconds",
                "Semantic cache lookup latency, embedding included",
            )
            .buckets(vec![
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.1, 0.5,
            ]),
        )?;
        let cache_entries = IntGauge::new(
            "parley_cache_entries",
            "Entries in the semantic cache index",
        )?;
        registry.register(Box::new(cache_lookups.clone()))?;
        registry.register(Box::new(cache_near_misses.clone()))?;
        registry.register(Box::new(cache_lookup_seconds.clone()))?;
        registry.register(Box::new(cache_entries.clone()))?;
        let tier_decisions = IntCounterVec::new(
            Opts::new(
                "parley_tier_decisions_total",
                "Semantic routes' requests by route, tier and reason (classified, sticky, forced)",
            ),
            &["route", "tier", "reason"],
        )?;
        registry.register(Box::new(tier_decisions.clone()))?;
        let gen_ai = GenAi::new(&registry)?;
        Ok(Self {
            gen_ai,
            tier_decisions,
            cache_lookups,
            cache_near_misses,
            cache_lookup_seconds,
            cache_entries,
            registry,
            turns,
            ttft,
            tokens,
            errors,
            ws_connections,
            live_conversations,
            conversation_idle_stops,
            guard_events,
        })
    }

    pub fn observe_turn(&self, provider: &str, ttft: Option<Duration>, error: Option<ErrorCode>) {
        let provider = if provider.is_empty() {
            "none"
        } else {
            provider
        };
        let outcome = if error.is_some() { "error" } else { "ok" };
        self.turns.with_label_values(&[provider, outcome]).inc();
        if let Some(t) = ttft {
            self.ttft
                .with_label_values(&[provider])
                .observe(t.as_secs_f64());
        }
        if let Some(code) = error {
            self.errors
                .with_label_values(&[provider, code.as_str()])
                .inc();
        }
    }

    /// A generation, in the GenAI histograms.
    pub fn observe_gen_ai<'a>(&self, o: &GenAiObservation<'a>) {
        let none = |s: &'a str| if s.is_empty() { "none" } else { s };
        let (provider, response) = (none(o.provider), none(o.response_model));
        let g = &self.gen_ai;
        g.duration
            .with_label_values(&[
                "chat",
                provider,
                o.request_model,
                response,
                o.error.unwrap_or(""),
            ])
            .observe(o.duration.as_secs_f64());
        if o.error.is_none() || o.input_tokens + o.output_tokens > 0 {
            for (kind, n) in [("input", o.input_tokens), ("output", o.output_tokens)] {
                g.tokens
                    .with_label_values(&["chat", provider, o.request_model, response, kind])
                    .observe(f64::from(n));
            }
        }
        if let Some(ttft) = o.ttft {
            let labels = ["chat", provider, o.request_model, response];
            g.ttft
                .with_label_values(&labels)
                .observe(ttft.as_secs_f64());
            if o.output_tokens > 1 {
                let rest = o.duration.saturating_sub(ttft).as_secs_f64();
                g.per_token
                    .with_label_values(&labels)
                    .observe(rest / f64::from(o.output_tokens - 1));
            }
        }
    }

    /// A semantic route's decision.
    pub fn count_tier(&self, route: &str, tier: &str, reason: &str) {
        self.tier_decisions
            .with_label_values(&[route, tier, reason])
            .inc();
    }

    /// A guardrail finding (`pii`/`prompt_injection`/`system_prompt_leak`; `flag`/`block`/`cut`).
    /// One cache lookup: its result, its latency, and the guards that rejected candidates.
    pub fn cache_lookup(&self, result: &str, elapsed: Option<Duration>, rejected_by: &[&str]) {
        self.cache_lookups.with_label_values(&[result]).inc();
        if let Some(e) = elapsed {
            self.cache_lookup_seconds.observe(e.as_secs_f64());
        }
        for g in rejected_by {
            self.cache_near_misses.with_label_values(&[g]).inc();
        }
    }

    pub fn guard_event(&self, guard: &str, action: &str) {
        self.guard_events.with_label_values(&[guard, action]).inc();
    }

    pub fn add_tokens(&self, provider: &str, usage: Usage) {
        let provider = if provider.is_empty() {
            "none"
        } else {
            provider
        };
        self.tokens
            .with_label_values(&[provider, "prompt"])
            .inc_by(u64::from(usage.prompt_tokens));
        self.tokens
            .with_label_values(&[provider, "completion"])
            .inc_by(u64::from(usage.completion_tokens));
    }

    /// The text exposition format.
    pub fn render(&self) -> String {
        let mut buf = Vec::new();
        // Encoding gathered families into a Vec cannot fail but for a bug; an empty page is fine.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buf);
        String::from_utf8(buf).unwrap_or_default()
    }
}

impl GenAi {
    fn new(registry: &Registry) -> Result<Self, prometheus::Error> {
        let model = [
            "gen_ai_operation_name",
            "gen_ai_provider_name",
            "gen_ai_request_model",
            "gen_ai_response_model",
        ];
        let hist = |name: &str, help: &str, buckets: Vec<f64>, extra: &[&str]| {
            let labels: Vec<&str> = model.iter().chain(extra).copied().collect();
            let h = HistogramVec::new(HistogramOpts::new(name, help).buckets(buckets), &labels)?;
            registry.register(Box::new(h.clone()))?;
            Ok::<_, prometheus::Error>(h)
        };
        Ok(Self {
            duration: hist(
                "gen_ai_client_operation_duration_seconds",
                "GenAI operation duration (gen_ai.client.operation.duration)",
                vec![
                    0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48,
                    40.96, 81.92,
                ],
                &["error_type"],
            )?,
            tokens: hist(
                "gen_ai_client_token_usage",
                "Tokens used per GenAI operation, by gen_ai_token_type (gen_ai.client.token.usage)",
                vec![
                    1.0, 4.0, 16.0, 64.0, 256.0, 1024.0, 4096.0, 16384.0, 65536.0, 262144.0,
                    1048576.0, 4194304.0, 16777216.0, 67108864.0,
                ],
                &["gen_ai_token_type"],
            )?,
            ttft: hist(
                "gen_ai_server_time_to_first_token_seconds",
                "Time to the first token of a reply (gen_ai.server.time_to_first_token)",
                vec![
                    0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5,
                    5.0, 7.5, 10.0,
                ],
                &[],
            )?,
            per_token: hist(
                "gen_ai_server_time_per_output_token_seconds",
                "Time per output token after the first (gen_ai.server.time_per_output_token)",
                vec![
                    0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
                ],
                &[],
            )?,
        })
    }
}
