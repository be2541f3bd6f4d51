//! Property tests of the config loader: any text is a config or a typed error (`Parse` naming
//! the file), and any config that parses is accepted by `validate` or refused with problems
//! that each name the field they concern. Nothing panics on the way.
//!
//! `listen` only ever gets values that resolve without a name lookup: validation resolves host
//! names, and a test must not query DNS.

use std::path::Path;

use proptest::prelude::*;
use regex::Regex;

use super::{Config, ConfigError};

fn config() -> ProptestConfig {
    ProptestConfig {
        cases: 384,
        failure_persistence: None,
        ..ProptestConfig::default()
    }
}

const HEADERS: &[&str] = &[
    "[auth]",
    "[context]",
    "[cache]",
    "[server]",
    "[retry]",
    "[prices]",
    "[prices.mock]",
    "[[providers]]",
    "[[routes]]",
    "[[routes.targets]]",
    "[providers.breaker]",
    "[nonsense]",
    "[[server]]",
];

const KEYS: &[&str] = &[
    "data_dir",
    "admin_key_env",
    "budget_tokens",
    "reserve_output_tokens",
    "memory",
    "recall_share",
    "recall_min_similarity",
    "enabled",
    "min_similarity",
    "ttl_secs",
    "embedder",
    "max_entries",
    "lookup_timeout_ms",
    "disabled_tenants",
    "max_frame_bytes",
    "idle_timeout_secs",
    "shutdown_timeout_secs",
    "max_queued_turns",
    "workers",
    "max_conversations_per_tenant",
    "max_retries",
    "base_ms",
    "cap_ms",
    "budget_ms",
    "name",
    "kind",
    "base_url",
    "api_key_env",
    "api_keys_env",
    "region",
    "rpm",
    "tpm",
    "timeout_secs",
    "ttft_ms",
    "tokens_per_sec",
    "seed",
    "max_concurrency",
    "model",
    "targets",
    "strategy",
    "provider",
    "weight",
    "tiers",
    "threshold",
    "thresholds",
    "sticky_turns",
    "examples",
    "examples_file",
    "default_examples",
    "pii",
    "injection",
    "cache",
    "prompt",
    "input",
    "output",
    "bogus",
];

/// Listen values that parse or fail without a DNS query.
const LISTENS: &[&str] = &[
    "127.0.0.1:0",
    "[::1]:8080",
    "127.0.0.1",
    "nope",
    "1.2.3.4:70000",
    "",
];

/// TOML values of every type, including the edges (negative, huge, NaN, infinities).
fn toml_value() -> impl Strategy<Value = String> {
    let leaf = prop_oneof![
        any::<i64>().prop_map(|n| n.to_string()),
        prop::sample::select(
            &[
                "0",
                "-1",
                "1",
                "18446744073709551615",
                "9223372036854775807"
            ][..]
        )
        .prop_map(str::to_owned),
        prop::sample::select(&["nan", "inf", "-inf", "-0.0", "0.5", "1e308", "2.0"][..])
            .prop_map(str::to_owned),
        any::<f64>().prop_map(|f| format!("{f:?}")),
        any::<bool>().prop_map(|b| b.to_string()),
        prop::sample::select(
            &[
                "mock",
                "openai",
                "anthropic",
                "builtin",
                "provider:mock/m",
                "local:/nonexistent",
                "recall",
                "window",
                "redact",
                "block",
                "weighted",
                "http://127.0.0.1:9/v1",
                "ftp://x"
            ][..]
        )
        .prop_map(|s| format!("{s:?}")),
        any::<String>().prop_map(|s| format!("{s:?}")),
    ];
    leaf.prop_recursive(2, 16, 4, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..4).prop_map(|v| format!("[{}]", v.join(", "))),
            prop::collection::vec((prop::sample::select(KEYS), inner), 0..4).prop_map(|kv| {
                let fields: Vec<String> = kv.iter().map(|(k, v)| format!("{k} = {v}")).collect();
                format!("{{ {} }}", fields.join(", "))
            }),
        ]
    })
}

fn toml_line() -> impl Strategy<Value = String> {
    prop_oneof![
        2 => prop::sample::select(HEADERS).prop_map(str::to_owned),
        6 => (prop::sample::select(KEYS), toml_value()).prop_map(|(k, v)| format!("{k} = {v}")),
        1 => prop::sample::select(LISTENS).prop_map(|l| format!("listen = {l:?}")),
        1 => "[ -~]{0,30}",
    ]
}

fn toml_ish() -> impl Strategy<Value = String> {
    prop::collection::vec(toml_line(), 0..24).prop_map(|lines| lines.join("\n"))
}

/// Loads `text`; answers whether it parsed. Panics (failing the case) on an untyped outcome.
fn load_and_validate(text: &str) -> Result<bool, TestCaseError> {
    let path = Path::new("props.toml");
    let cfg = match Config::from_toml(text, path) {
        Ok(cfg) => cfg,
        Err(ConfigError::Parse { path: p, message }) => {
            prop_assert_eq!(p.as_path(), path);
            prop_assert!(!message.is_empty());
            return Ok(false);
        }
        Err(other) => return Err(TestCaseError::fail(format!("not a parse error: {other}"))),
    };
    // A test never resolves a name (see the module doc).
    prop_assert!(LISTENS.contains(&cfg.listen.as_str()) || cfg.listen == Config::default().listen);
    let field = Regex::new(r"^[a-z_]+(\[\d+\])?(\.[a-z_]+(\[\d+\])?)*:").unwrap(); // ok: test
    match cfg.validate(|name| name == "SET_KEY") {
        Ok(()) => {
            // What a valid config hands the rest of the server is usable as it is.
            let _ = (
                cfg.idle_timeout(),
                cfg.shutdown_timeout(),
                cfg.retry.budget(),
            );
            for attempt in [0, 1, 31, u32::MAX] {
                let _ = cfg.retry.backoff().delay(attempt, 0.99);
            }
            prop_assert!(!cfg.routes.is_empty());
        }
        Err(ConfigError::Invalid(problems)) => {
            prop_assert!(!problems.is_empty());
            for p in &problems {
                prop_assert!(field.is_match(p), "problem names no field: {p:?}");
            }
        }
        Err(other) => {
            return Err(TestCaseError::fail(format!(
                "not a validation error: {other}"
            )))
        }
    }
    Ok(true)
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn any_text_is_a_config_or_a_parse_error(text in "[ -~\n]{0,200}") {
        // Printable junk with the odd valid line; `listen` is unlikely but checked above.
        if !text.contains("listen") {
            load_and_validate(&text)?;
        }
    }

    #[test]
    fn any_unicode_is_a_config_or_a_parse_error(text in any::<String>()) {
        if !text.contains("listen") {
            load_and_validate(&text)?;
        }
    }

    #[test]
    fn toml_ish_documents_are_accepted_or_refused_by_field(text in toml_ish()) {
        load_and_validate(&text)?;
    }
}
