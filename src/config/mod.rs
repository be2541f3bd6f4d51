//! Configuration: one struct, read once at start, immutable afterwards (`Arc<Config>`).
//!
//! Layering, lowest first: the embedded default (PROTOCOL §1), the TOML file (`--config` or
//! `PARLEY_CONFIG`), then flags (which clap also fills from `PARLEY_LISTEN` / `PARLEY_DATA_DIR`).
//! The file names environment variables, never secrets; [`Config::validate`] checks that they
//! are set and collects every problem with the path of the field it concerns.

use std::collections::HashSet;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

mod routing;

use routing::target;
pub use routing::{
    ProviderConfig, ProviderKind, RetryConfig, RouteConfig, Strategy, TargetConfig, TierConfig,
};

/// Why a configuration was refused.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("invalid configuration:\n  {}", .0.join("\n  "))]
    Invalid(Vec<String>),
}

/// A config file as written: every part optional, nothing filled in while parsing.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    listen: Option<String>,
    data_dir: Option<PathBuf>,
    auth: Option<AuthConfig>,
    context: Option<ContextConfig>,
    cache: Option<CacheConfig>,
    server: Option<ServerConfig>,
    storage: Option<StorageConfig>,
    telemetry: Option<TelemetryConfig>,
    cluster: Option<ClusterConfig>,
    jobs: Option<JobsConfig>,
    retry: Option<RetryConfig>,
    prices: Option<std::collections::HashMap<String, crate::domain::Price>>,
    providers: Option<Vec<ProviderConfig>>,
    routes: Option<Vec<RouteConfig>>,
}

impl FileConfig {
    /// The file laid over `defaults`.
    fn over(self, defaults: Config) -> Config {
        let (providers, routes) = match (self.providers, self.routes) {
            (Some(providers), routes) => (providers, routes.unwrap_or_default()),
            (None, Some(routes)) => (defaults.providers, routes),
            (None, None) => (defaults.providers, defaults.routes),
        };
        Config {
            listen: self.listen.unwrap_or(defaults.listen),
            data_dir: self.data_dir.unwrap_or(defaults.data_dir),
            auth: self.auth.unwrap_or(defaults.auth),
            context: self.context.unwrap_or(defaults.context),
            cache: self.cache.unwrap_or(defaults.cache),
            server: self.server.unwrap_or(defaults.server),
            storage: self.storage.unwrap_or(defaults.storage),
            telemetry: self.telemetry.unwrap_or(defaults.telemetry),
            cluster: self.cluster.or(defaults.cluster),
            jobs: self.jobs.unwrap_or(defaults.jobs),
            retry: self.retry.unwrap_or(defaults.retry),
            prices: self.prices.unwrap_or(defaults.prices),
            providers,
            routes,
        }
    }
}

#[derive(Debug, Clone)]
pub struct Config {
    pub listen: String,
    pub data_dir: PathBuf,
    pub auth: AuthConfig,
    pub context: ContextConfig,
    pub cache: CacheConfig,
    pub server: ServerConfig,
    pub storage: StorageConfig,
    /// `[telemetry]`: logs' format, OpenTelemetry export.
    pub telemetry: TelemetryConfig,
    /// `[cluster]`: several nodes sharing one Redis (PROTOCOL §9); absent on a single node.
    pub cluster: Option<ClusterConfig>,
    /// `[jobs]`: async jobs (PROTOCOL §10).
    pub jobs: JobsConfig,
    pub retry: RetryConfig,
    /// Prices per upstream model, per million tokens (`[prices."gpt-4o-mini"]`).
    pub prices: std::collections::HashMap<String, crate::domain::Price>,
    pub providers: Vec<ProviderConfig>,
    pub routes: Vec<RouteConfig>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// The environment variable that holds the admin key.
    pub admin_key_env: String,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ContextConfig {
    pub budget_tokens: u32,
    pub reserve_output_tokens: u32,
    /// What a new conversation sends when its history outgrows the budget (a conversation
    /// may choose its own at creation): `window` (the newest turns) or `recall`.
    pub memory: MemoryMode,
    /// In `recall` mode, the share of the prompt budget kept for relevant older turns.
    pub recall_share: f32,
    /// In `recall` mode, the least similarity an older turn needs to be recalled.
    pub recall_min_similarity: f32,
}

pub use crate::domain::MemoryMode;

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    pub enabled: bool,
    pub min_similarity: f32,
    pub ttl_secs: u64,
    /// `builtin`, `provider:<name>/<model>` or `local:<dir>` (cargo feature `local-embed`).
    pub embedder: String,
    /// Entries kept at most; the least recently used go first.
    pub max_entries: usize,
    /// A lookup slower than this is a miss.
    pub lookup_timeout_ms: u64,
    /// Tenants whose requests never use the cache.
    pub disabled_tenants: Vec<String>,
}

/// The embedder named by `cache.embedder`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum EmbedderSpec {
    Builtin,
    Provider { provider: String, model: String },
    Local(PathBuf),
}

impl CacheConfig {
    /// Parses `embedder`.
    ///
    /// # Errors
    /// A message for `cache.embedder` when it names no known embedder.
    pub fn embedder_spec(&self) -> Result<EmbedderSpec, String> {
        let e = self.embedder.trim();
        if e == "builtin" {
            return Ok(EmbedderSpec::Builtin);
        }
        if let Some(rest) = e.strip_prefix("provider:") {
            return match rest.split_once('/') {
                Some((p, m)) if !p.is_empty() && !m.is_empty() => Ok(EmbedderSpec::Provider {
                    provider: p.to_owned(),
                    model: m.to_owned(),
                }),
                _ => Err(format!(
                    "cache.embedder: {e:?} must be provider:<name>/<model>"
                )),
            };
        }
        if let Some(dir) = e.strip_prefix("local:") {
            if dir.is_empty() {
                return Err("cache.embedder: local:<dir> needs a directory".into());
            }
            return Ok(EmbedderSpec::Local(PathBuf::from(dir)));
        }
        Err(format!(
            "cache.embedder: {e:?} is not builtin, provider:<name>/<model> or local:<dir>"
        ))
    }
}

/// Settings of the edges and of actor lifecycles (parley additions to PROTOCOL §2).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Largest WebSocket frame (and HTTP JSON body) accepted, in bytes.
    pub max_frame_bytes: usize,
    /// A conversation actor with no subscriber and no work stops after this long.
    pub idle_timeout_secs: u64,
    /// How long shutdown waits for in-flight turns to store what they have.
    pub shutdown_timeout_secs: u64,
    /// Turns waiting behind the running one, per conversation, before `rate_limited`.
    pub max_queued_turns: usize,
    /// HTTP worker threads (0 = one per core).
    pub workers: usize,
    /// Threads that host conversation actors started outside a connection (jobs, batch, a
    /// cluster takeover); a conversation a request or socket starts runs on its worker thread
    /// (0 = one per core).
    pub conversation_threads: usize,
    /// Conversations one tenant may keep stored; creating more is `quota_exceeded`.
    pub max_conversations_per_tenant: u64,
}

/// `[telemetry]`: how logs are written and where traces go.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// `text` (default) or `json` (one JSON object per line, for log collectors).
    pub log_format: LogFormat,
    /// An OTLP/HTTP collector (`http://127.0.0.1:4318`; `/v1/traces` is appended) to export
    /// traces to. Without it the standard `OTEL_EXPORTER_OTLP_ENDPOINT` /
    /// `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT` variables turn export on.
    pub otlp_endpoint: Option<String>,
    /// `service.name` of the exported spans (else `OTEL_SERVICE_NAME`, else `parley`).
    pub service_name: Option<String>,
    /// Put the messages and replies in the spans (`gen_ai.input.messages`,
    /// `gen_ai.output.messages`). Off: spans carry no content.
    pub capture_content: bool,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    #[default]
    Text,
    Json,
}

/// `[storage]`: how much memory the store may keep, and how long raw usage records stay.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    /// The store's page cache, in MiB (sled's own default is 1 GiB).
    pub cache_mb: u64,
    /// Days a raw usage record is kept (in daily files, removed whole); reports read
    /// per-minute roll-ups, which stay. 0 keeps no raw records at all.
    pub usage_retention_days: u32,
}

/// `[jobs]`: the workers that run async jobs.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct JobsConfig {
    /// Jobs run at once by this node (a backlog never takes more from interactive traffic).
    pub workers: usize,
    /// Webhooks may go to loopback, private and link-local addresses (off: SSRF).
    pub allow_private_webhooks: bool,
    /// Days ended jobs, batches and batch files are kept (0: for ever).
    pub retention_days: u32,
    /// Seconds a batch has to finish (its `completion_window`, "24h": 86 400). Past it the
    /// batch expires: requests not yet ended are cancelled, what finished stays in its output.
    pub batch_window_secs: u64,
}

impl Default for JobsConfig {
    fn default() -> Self {
        Self {
            workers: 2,
            allow_private_webhooks: false,
            retention_days: 30,
            batch_window_secs: 86_400,
        }
    }
}

/// `[cluster]`: where the shared Redis is, and who this node is.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClusterConfig {
    /// `redis://host:port/db`; or name a variable that holds it with `redis_url_env` (a URL
    /// with a password is a secret).
    pub redis_url: Option<String>,
    pub redis_url_env: Option<String>,
    /// Unique per node; default: the host name and the listening port.
    pub node_id: Option<String>,
    /// How long a conversation stays owned by a node that stopped renewing it (a dead node's
    /// conversations are taken over within this).
    #[serde(default = "default_lease_ms")]
    pub lease_ms: u64,
    /// The `host:port` other nodes reach this one at (they relay a conversation's traffic to
    /// the node that runs it); default: the listening address, or on a wildcard address
    /// (`0.0.0.0`) the host name and the port.
    pub advertise: Option<String>,
}

fn default_lease_ms() -> u64 {
    5_000
}

impl ClusterConfig {
    /// The Redis URL, from the file or its variable.
    pub fn url(&self) -> Option<String> {
        self.redis_url.clone().or_else(|| {
            self.redis_url_env
                .as_deref()
                .and_then(|v| std::env::var(v).ok())
                .filter(|v| !v.is_empty())
        })
    }
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self {
            cache_mb: 16,
            usage_retention_days: 1,
        }
    }
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            admin_key_env: "PARLEY_ADMIN_KEY".into(),
        }
    }
}

impl Default for ContextConfig {
    fn default() -> Self {
        Self {
            budget_tokens: 8192,
            reserve_output_tokens: 1024,
            memory: MemoryMode::Window,
            recall_share: 0.25,
            recall_min_similarity: 0.2,
        }
    }
}

impl Default for CacheConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            min_similarity: 0.92,
            ttl_secs: 86_400,
            embedder: "builtin".into(),
            max_entries: 50_000,
            lookup_timeout_ms: 250,
            disabled_tenants: Vec::new(),
        }
    }
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            max_frame_bytes: 1 << 20,
            idle_timeout_secs: 300,
            shutdown_timeout_secs: 10,
            max_queued_turns: 32,
            workers: 0,
            conversation_threads: 0,
            max_conversations_per_tenant: 100_000,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Self::embedded(|name| std::env::var_os(name).is_some_and(|v| !v.is_empty()))
    }
}

impl Config {
    /// The embedded default of PROTOCOL §1; `has_env` tells which provider keys are set.
    pub fn embedded(has_env: impl Fn(&str) -> bool) -> Self {
        let mut providers = vec![ProviderConfig::builtin_mock()];
        let mut default_targets = Vec::new();
        if has_env("OPENAI_API_KEY") {
            let p = ProviderConfig::hosted(
                "openai",
                ProviderKind::Openai,
                "https://api.openai.com/v1",
                "OPENAI_API_KEY",
            );
            providers.push(p);
            default_targets.push(target("openai", "gpt-4o-mini"));
        }
        if has_env("ANTHROPIC_API_KEY") {
            let p = ProviderConfig::hosted(
                "anthropic",
                ProviderKind::Anthropic,
                "https://api.anthropic.com/v1",
                "ANTHROPIC_API_KEY",
            );
            providers.push(p);
            default_targets.push(target("anthropic", "claude-3-5-haiku-latest"));
        }
        if default_targets.is_empty() {
            default_targets.push(target("mock", "mock-1"));
        }
        Self {
            listen: "127.0.0.1:8080".into(),
            data_dir: PathBuf::from("./data"),
            auth: AuthConfig::default(),
            context: ContextConfig::default(),
            cache: CacheConfig::default(),
            server: ServerConfig::default(),
            storage: StorageConfig::default(),
            telemetry: TelemetryConfig::default(),
            cluster: None,
            jobs: JobsConfig::default(),
            retry: RetryConfig::default(),
            prices: std::collections::HashMap::new(),
            providers,
            routes: vec![
                RouteConfig::new("mock", vec![target("mock", "mock-1")]),
                RouteConfig::new("default", default_targets),
            ],
        }
    }

    /// Parses a TOML document as written (without validating it), then lays it over the
    /// embedded default: what the file sets replaces the default's. A file that declares its
    /// own providers also declares its own routes (none if it gives none), so it never inherits
    /// routes that point at providers it does not know of.
    ///
    /// # Errors
    /// `Parse` with the TOML error, which names the offending key and line.
    pub fn from_toml(text: &str, path: &Path) -> Result<Self, ConfigError> {
        let file: FileConfig = toml::from_str(text).map_err(|e| ConfigError::Parse {
            path: path.to_owned(),
            message: e.to_string(),
        })?;
        Ok(file.over(Self::default()))
    }

    /// Reads and parses a config file.
    ///
    /// # Errors
    /// `Read` when the file cannot be read, `Parse` when it is not a valid config.
    pub fn from_file(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::from_toml(&text, path)
    }

    /// The listen address as a socket address: an address, or a host name and port that
    /// resolves (`localhost:8080`; IPv4 preferred when the name has both).
    ///
    /// # Errors
    /// `Invalid` naming `listen` when it neither parses nor resolves.
    pub fn listen_addr(&self) -> Result<SocketAddr, ConfigError> {
        if let Ok(addr) = self.listen.parse() {
            return Ok(addr);
        }
        let invalid =
            |e: String| ConfigError::Invalid(vec![format!("listen: {:?}: {e}", self.listen)]);
        let addrs: Vec<SocketAddr> = std::net::ToSocketAddrs::to_socket_addrs(&self.listen)
            .map_err(|e| invalid(e.to_string()))?
            .collect();
        addrs
            .iter()
            .find(|a| a.is_ipv4())
            .or(addrs.first())
            .copied()
            .ok_or_else(|| invalid("the name resolves to no address".into()))
    }

    /// Checks everything that can be checked before start, and names each problem's field.
    ///
    /// # Errors
    /// `Invalid` with every problem found.
    pub fn validate(&self, has_env: impl Fn(&str) -> bool) -> Result<(), ConfigError> {
        let mut problems = Vec::new();
        if let Err(ConfigError::Invalid(p)) = self.listen_addr() {
            problems.extend(p);
        }
        let ctx = &self.context;
        if ctx.budget_tokens == 0 {
            problems.push("context.budget_tokens: must be greater than 0".into());
        }
        if ctx.reserve_output_tokens >= ctx.budget_tokens {
            problems.push(format!(
                "context.reserve_output_tokens: {} leaves no room in budget_tokens {}",
                ctx.reserve_output_tokens, ctx.budget_tokens
            ));
        }
        if !(0.0..=1.0).contains(&self.cache.min_similarity) {
            problems.push("cache.min_similarity: must be between 0 and 1".into());
        }
        if !(0.0..1.0).contains(&ctx.recall_share) {
            problems.push("context.recall_share: must be at least 0 and below 1".into());
        }
        if !(0.0..=1.0).contains(&ctx.recall_min_similarity) {
            problems.push("context.recall_min_similarity: must be between 0 and 1".into());
        }
        if let Some(c) = &self.cluster {
            match (&c.redis_url, &c.redis_url_env) {
                (Some(_), Some(_)) => {
                    problems.push(
                        "cluster.redis_url: give redis_url or redis_url_env, not both".into(),
                    );
                }
                (None, None) => problems.push("cluster.redis_url: required".into()),
                (None, Some(var)) if !has_env(var) => problems.push(format!(
                    "cluster.redis_url_env: environment variable {var} is not set"
                )),
                (Some(url), None) if !url.starts_with("redis://") => {
                    problems.push("cluster.redis_url: must start with redis://".into());
                }
                _ => {}
            }
            if c.lease_ms < 500 {
                problems.push("cluster.lease_ms: must be at least 500".into());
            }
            if c.node_id
                .as_deref()
                .is_some_and(|n| n.is_empty() || n.len() > 64)
            {
                problems.push("cluster.node_id: 1 to 64 characters".into());
            }
        }
        if self.jobs.batch_window_secs == 0 {
            problems.push("jobs.batch_window_secs: must be greater than 0".into());
        }
        if self.cache.max_entries == 0 {
            problems.push("cache.max_entries: must be greater than 0".into());
        }
        match self.cache.embedder_spec() {
            Err(p) => problems.push(p),
            Ok(EmbedderSpec::Provider { provider, .. }) => {
                match self.providers.iter().find(|p| p.name == provider) {
                    None => problems.push(format!(
                        "cache.embedder: unknown provider {provider:?}"
                    )),
                    Some(p) if p.kind == ProviderKind::Anthropic => problems.push(format!(
                        "cache.embedder: provider {provider:?} is anthropic, which has no embeddings API"
                    )),
                    Some(_) => {}
                }
            }
            Ok(EmbedderSpec::Local(dir)) => {
                if !cfg!(feature = "local-embed") {
                    problems.push(
                        "cache.embedder: local embedders need parley built with --features local-embed"
                            .into(),
                    );
                } else if !dir.join("model.safetensors").is_file() {
                    problems.push(format!(
                        "cache.embedder: {} has no model.safetensors",
                        dir.display()
                    ));
                }
            }
            Ok(EmbedderSpec::Builtin) => {}
        }
        if !(1..=1 << 20).contains(&self.storage.cache_mb) {
            problems.push("storage.cache_mb: must be between 1 and 1048576".into());
        }
        if self.server.max_frame_bytes < 1024 {
            problems.push("server.max_frame_bytes: must be at least 1024".into());
        }
        let mut names = HashSet::new();
        for (i, p) in self.providers.iter().enumerate() {
            validate_provider(i, p, &has_env, &mut problems);
            if !names.insert(p.name.as_str()) {
                problems.push(format!(
                    "providers[{i}].name: duplicate provider {:?}",
                    p.name
                ));
            }
        }
        let mut models = HashSet::new();
        for (i, r) in self.routes.iter().enumerate() {
            if r.model.is_empty() {
                problems.push(format!("routes[{i}].model: must not be empty"));
            }
            if !models.insert(r.model.as_str()) {
                problems.push(format!("routes[{i}].model: duplicate route {:?}", r.model));
            }
            if r.strategy == Strategy::Semantic {
                validate_tiers(i, r, &names, &mut problems);
            } else {
                if r.targets.is_empty() {
                    problems.push(format!("routes[{i}].targets: needs at least one target"));
                }
                if !r.tiers.is_empty() {
                    problems.push(format!(
                        "routes[{i}].tiers: only a route with strategy = \"semantic\" has tiers"
                    ));
                }
                validate_targets(
                    &format!("routes[{i}].targets"),
                    &r.targets,
                    &names,
                    &mut problems,
                );
            }
        }
        if self.routes.is_empty() {
            problems.push("routes: at least one route is needed".into());
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(ConfigError::Invalid(problems))
        }
    }

    pub fn idle_timeout(&self) -> Duration {
        Duration::from_secs(self.server.idle_timeout_secs)
    }

    pub fn shutdown_timeout(&self) -> Duration {
        Duration::from_secs(self.server.shutdown_timeout_secs)
    }
}

fn validate_targets(
    field: &str,
    targets: &[TargetConfig],
    providers: &HashSet<&str>,
    problems: &mut Vec<String>,
) {
    for (j, t) in targets.iter().enumerate() {
        if !providers.contains(t.provider.as_str()) {
            problems.push(format!(
                "{field}[{j}].provider: unknown provider {:?}",
                t.provider
            ));
        }
    }
}

/// A `semantic` route: two tiers or more, each with targets and a plain strategy, names unique,
/// thresholds that fit the tiers.
fn validate_tiers(
    i: usize,
    r: &RouteConfig,
    providers: &HashSet<&str>,
    problems: &mut Vec<String>,
) {
    if !r.targets.is_empty() {
        problems.push(format!(
            "routes[{i}].targets: a semantic route lists its targets in its tiers"
        ));
    }
    if r.tiers.len() < 2 {
        problems.push(format!(
            "routes[{i}].tiers: a semantic route needs at least two tiers"
        ));
    }
    let mut seen = HashSet::new();
    for (k, t) in r.tiers.iter().enumerate() {
        if t.name.is_empty() {
            problems.push(format!("routes[{i}].tiers[{k}].name: must not be empty"));
        } else if !seen.insert(t.name.as_str()) {
            problems.push(format!(
                "routes[{i}].tiers[{k}].name: duplicate tier {:?}",
                t.name
            ));
        }
        if t.targets.is_empty() {
            problems.push(format!(
                "routes[{i}].tiers[{k}].targets: needs at least one target"
            ));
        }
        if t.strategy == Strategy::Semantic {
            problems.push(format!(
                "routes[{i}].tiers[{k}].strategy: a tier orders its targets by fallback, weighted or least_busy"
            ));
        }
        validate_targets(
            &format!("routes[{i}].tiers[{k}].targets"),
            &t.targets,
            providers,
            problems,
        );
    }
    let in_range = |t: f32| t > 0.0 && t < 1.0;
    match (&r.threshold, &r.thresholds) {
        (Some(_), Some(_)) => problems.push(format!(
            "routes[{i}].thresholds: set threshold (two tiers) or thresholds, not both"
        )),
        (Some(t), None) => {
            if !in_range(*t) {
                problems.push(format!(
                    "routes[{i}].threshold: must be between 0 and 1 (exclusive), not {t}"
                ));
            }
            if r.tiers.len() > 2 {
                problems.push(format!(
                    "routes[{i}].threshold: a route with {} tiers needs thresholds, one per tier after the first",
                    r.tiers.len()
                ));
            }
        }
        (None, Some(ts)) => {
            if ts.len() + 1 != r.tiers.len() {
                problems.push(format!(
                    "routes[{i}].thresholds: {} tiers need {} thresholds, not {}",
                    r.tiers.len(),
                    r.tiers.len().saturating_sub(1),
                    ts.len()
                ));
            }
            if !ts.iter().all(|t| in_range(*t)) || ts.windows(2).any(|w| w[0] >= w[1]) {
                problems.push(format!(
                    "routes[{i}].thresholds: must be ascending, each between 0 and 1 (exclusive)"
                ));
            }
        }
        (None, None) => {
            if r.tiers.len() > 2 {
                problems.push(format!(
                    "routes[{i}].thresholds: a route with {} tiers needs thresholds, one per tier after the first",
                    r.tiers.len()
                ));
            }
        }
    }
    if !r.default_examples && r.examples.is_empty() && r.examples_file.is_none() {
        problems.push(format!(
            "routes[{i}].default_examples: without the shipped examples the route needs examples or examples_file"
        ));
    }
}

fn validate_provider(
    i: usize,
    p: &ProviderConfig,
    has_env: &impl Fn(&str) -> bool,
    problems: &mut Vec<String>,
) {
    if p.name.is_empty() {
        problems.push(format!("providers[{i}].name: must not be empty"));
    }
    if let Some(url) = &p.base_url {
        if !(url.starts_with("http://") || url.starts_with("https://")) {
            problems.push(format!(
                "providers[{i}].base_url: {url:?} is not an http(s) URL"
            ));
        }
    }
    if p.api_key_env.is_some() && !p.api_keys_env.is_empty() {
        problems.push(format!(
            "providers[{i}].api_keys_env: give api_key_env or api_keys_env, not both"
        ));
    }
    for env in p.key_envs() {
        if !has_env(env) {
            let field = if p.api_key_env.as_deref() == Some(env) {
                "api_key_env"
            } else {
                "api_keys_env"
            };
            problems.push(format!(
                "providers[{i}].{field}: environment variable {env} is not set"
            ));
        }
    }
    match p.kind {
        ProviderKind::Anthropic if p.key_envs().is_empty() => {
            problems.push(format!(
                "providers[{i}].api_key_env: anthropic needs an API key"
            ));
        }
        ProviderKind::Openai | ProviderKind::Anthropic => {
            if p.ttft_ms.is_some() || p.tokens_per_sec.is_some() || p.seed.is_some() {
                problems.push(format!(
                    "providers[{i}]: ttft_ms, tokens_per_sec and seed apply to kind \"mock\" only"
                ));
            }
        }
        ProviderKind::Mock => {
            let tps = p.tokens_per_sec.unwrap_or(0.0);
            if tps != 0.0 && crate::mock_upstream::generator::pace(tps).is_none() {
                problems.push(format!(
                    "providers[{i}].tokens_per_sec: {tps} is not 0 or between 1/60 and 1000000"
                ));
            }
        }
    }
    if p.timeout_secs == 0 {
        problems.push(format!(
            "providers[{i}].timeout_secs: must be greater than 0"
        ));
    }
}

#[cfg(test)]
mod props;

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::from_toml(text, Path::new("test.toml"))
    }

    #[test]
    fn a_file_with_its_own_providers_does_not_inherit_the_default_routes() {
        let cfg = parse(
            r#"
[[providers]]
name = "local"
kind = "openai"
base_url = "http://127.0.0.1:9/v1"
"#,
        )
        .unwrap(); // ok: test code
        assert!(cfg.routes.is_empty());
        let err = cfg.validate(|_| false).unwrap_err().to_string(); // ok: test code
        assert!(err.contains("routes"), "{err}");
        // Routes alone are laid over the default providers; an empty file is the default.
        let cfg = parse(
            "[[routes]]\nmodel = \"m\"\ntargets = [{ provider = \"mock\", model = \"x\" }]\n",
        )
        .unwrap(); // ok: test code
        assert_eq!(cfg.routes.len(), 1);
        assert_eq!(cfg.providers[0].name, "mock");
        let cfg = parse("").unwrap(); // ok: test code
        assert_eq!(cfg.routes.len(), 2);
    }

    #[test]
    fn listen_takes_addresses_and_host_names() {
        let mut cfg = Config::embedded(|_| false);
        cfg.listen = "localhost:8080".into();
        let addr = cfg.listen_addr().unwrap(); // ok: test code
        assert!(addr.ip().is_loopback() && addr.port() == 8080, "{addr}");
        cfg.listen = "127.0.0.1:9".into();
        assert_eq!(cfg.listen_addr().unwrap().port(), 9); // ok: test code
        cfg.listen = "no port".into();
        assert!(cfg.listen_addr().is_err());
    }

    #[test]
    fn embedded_default_serves_mock_and_default() {
        let cfg = Config::embedded(|_| false);
        assert_eq!(cfg.listen, "127.0.0.1:8080");
        let routes: Vec<_> = cfg.routes.iter().map(|r| r.model.as_str()).collect();
        assert_eq!(routes, ["mock", "default"]);
        assert_eq!(cfg.routes[1].targets[0].provider, "mock");
        cfg.validate(|_| false).unwrap(); // ok: test code
    }

    #[test]
    fn embedded_default_prefers_openai_then_anthropic() {
        let cfg = Config::embedded(|_| true);
        let t: Vec<_> = cfg.routes[1]
            .targets
            .iter()
            .map(|t| t.provider.as_str())
            .collect();
        assert_eq!(t, ["openai", "anthropic"]);
        assert_eq!(cfg.routes[1].targets[1].model, "claude-3-5-haiku-latest");
    }

    #[test]
    fn semantic_routes_are_read_and_their_mistakes_named() {
        let cfg = parse(
            r#"
            [[providers]]
            name = "a"
            kind = "mock"
            [[routes]]
            model = "auto"
            strategy = "semantic"
            threshold = 0.6
            sticky_turns = 5
            examples = [{ text = "prove it", label = "hard" }]
            tiers = [
              { name = "fast", targets = [{ provider = "a", model = "small" }] },
              { name = "strong", targets = [{ provider = "a", model = "big" }, { provider = "a", model = "big-2" }], strategy = "least_busy" },
            ]
            "#,
        )
        .unwrap(); // ok: test code
        cfg.validate(|_| true).unwrap(); // ok: test code
        let tiers = crate::routing::Tiers::of(&cfg.routes[0]).unwrap(); // ok: test code
        assert_eq!(tiers.names, ["fast", "strong"]);
        assert_eq!(tiers.thresholds, [0.6]);
        assert_eq!(tiers.sticky_turns, 5);

        let bad = parse(
            r#"
            [[providers]]
            name = "a"
            kind = "mock"
            [[routes]]
            model = "auto"
            strategy = "semantic"
            targets = [{ provider = "a", model = "x" }]
            thresholds = [0.7, 0.4]
            tiers = [
              { name = "fast", targets = [{ provider = "nope", model = "small" }] },
              { name = "fast", targets = [] },
              { name = "big", targets = [{ provider = "a", model = "big" }], strategy = "semantic" },
            ]
            [[routes]]
            model = "plain"
            targets = [{ provider = "a", model = "x" }]
            tiers = [{ name = "fast", targets = [{ provider = "a", model = "x" }] }]
            [[routes]]
            model = "one"
            strategy = "semantic"
            threshold = 1.5
            tiers = [{ name = "only", targets = [{ provider = "a", model = "x" }] }]
            "#,
        )
        .unwrap(); // ok: test code
        let err = bad.validate(|_| true).unwrap_err().to_string();
        for named in [
            "routes[0].targets: a semantic route lists its targets in its tiers",
            "routes[0].tiers[0].targets[0].provider: unknown provider \"nope\"",
            "routes[0].tiers[1].name: duplicate tier \"fast\"",
            "routes[0].tiers[1].targets: needs at least one target",
            "routes[0].tiers[2].strategy",
            "routes[0].thresholds: must be ascending",
            "routes[1].tiers: only a route with strategy = \"semantic\" has tiers",
            "routes[2].tiers: a semantic route needs at least two tiers",
            "routes[2].threshold: must be between 0 and 1",
        ] {
            assert!(err.contains(named), "{named} missing from {err}");
        }
    }

    #[test]
    fn unknown_provider_in_route_is_named() {
        let cfg = parse(
            r#"
            [[providers]]
            name = "a"
            kind = "mock"
            [[routes]]
            model = "m"
            targets = [{ provider = "a", model = "x" }, { provider = "foo", model = "y" }]
            "#,
        )
        .unwrap(); // ok: test code
        let err = cfg.validate(|_| true).unwrap_err().to_string();
        assert!(
            err.contains("routes[0].targets[1].provider: unknown provider \"foo\""),
            "{err}"
        );
    }

    #[test]
    fn unknown_field_and_bad_toml_are_refused() {
        let err = parse("listen = \"127.0.0.1:1\"\nbogus = 1\n")
            .unwrap_err()
            .to_string();
        assert!(err.contains("bogus"), "{err}");
        let err = parse("listen = ").unwrap_err().to_string();
        assert!(err.contains("invalid config file"), "{err}");
    }

    #[test]
    fn unset_key_env_is_named() {
        let cfg = parse(
            r#"
            [[providers]]
            name = "openai"
            kind = "openai"
            api_key_env = "NOPE_KEY"
            [[routes]]
            model = "m"
            targets = [{ provider = "openai", model = "gpt" }]
            "#,
        )
        .unwrap(); // ok: test code
        let err = cfg.validate(|_| false).unwrap_err().to_string();
        assert!(
            err.contains("providers[0].api_key_env: environment variable NOPE_KEY"),
            "{err}"
        );
    }

    #[test]
    fn collects_every_problem() {
        let cfg = parse(
            r#"
            listen = "nowhere"
            [context]
            budget_tokens = 100
            reserve_output_tokens = 100
            "#,
        )
        .unwrap(); // ok: test code
        let Err(ConfigError::Invalid(problems)) = cfg.validate(|_| true) else {
            panic!()
        };
        assert_eq!(problems.len(), 2, "{problems:?}");
    }
}
