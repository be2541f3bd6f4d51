//! parley: a self-hosted LLM conversation server.
//!
//! Map of the crate, edges first:
//! - [`cli`]: the command line of PROTOCOL §1.
//! - [`config`]: `Config`, its embedded default, layering and validation.
//! - [`app`]: builds the state, starts the actors, runs the HTTP server, shuts down cleanly.
//! - [`server`]: the edges: HTTP routes (OpenAI, conversations, admin, health), SSE, WebSocket,
//!   and the chat page and dashboard (`server/ui/`, built into the binary).
//! - [`generation`]: the one generation path every face drives (guard, cache, route, stream, settle).
//! - [`conversation`]: one supervised actor per live conversation, its registry and its turns.
//! - [`provider`]: provider actors, the router with fallback, OpenAI/Anthropic/mock wire formats.
//! - [`routing`]: semantic routing: the difficulty classifier, tiers, the evaluation set.
//! - [`cache`]: semantic-cache building blocks: embedders and false-hit guards (not wired yet).
//! - [`tokens`]: token counting (tiktoken encodings, compact counter) and context trimming.
//! - [`limits`]: token buckets, circuit breaker, backoff: state machines with the clock passed in.
//! - [`guard`]: PII redaction and restoration, prompt-injection screening, system-prompt leaks.
//! - [`tenant`]: API keys (hashed) and the tenant a request acts for.
//! - [`store`]: the only module that touches sled.
//! - [`cluster`]: cluster mode: the shared Redis connection, and the per-minute limits and
//!   budgets every node counts there (atomic Lua scripts on Redis's clock).
//! - [`mock_upstream`]: the fake provider used by the CLI, the tests and the benches.
//! - [`domain`]: plain types every layer shares (messages, parts, tools, usage, finish reasons).
//! - [`wire`]: the OpenAI and Anthropic wire formats as typed serde structs, and their mapping.
//! - [`error`]: the protocol's error codes, one mapping to HTTP and WebSocket.
//! - [`metrics`], [`telemetry`]: Prometheus registry and tracing setup.

pub mod app;
pub mod cache;
pub mod cli;
pub mod cluster;
pub mod config;
pub mod conversation;
pub mod domain;
pub mod error;
pub mod generation;
pub mod guard;
pub mod ids;
pub mod jobs;
pub mod limits;
pub mod metrics;
pub mod mock_upstream;
pub mod provider;
pub mod routing;
pub mod server;
pub mod store;
pub mod telemetry;
pub mod tenant;
pub mod tokens;
pub mod webhooks;
pub mod wire;
