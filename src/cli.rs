//! The command line (PROTOCOL §1).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

#[derive(Debug, Parser)]
#[command(
    name = "parley",
    version,
    about = "Self-hosted LLM conversation server"
)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the server (with no config file: the embedded default).
    Serve(ServeArgs),
    /// Run a fake LLM provider speaking the OpenAI and Anthropic wire formats.
    MockUpstream(MockArgs),
    /// Evaluate the semantic router's classifier on a labelled set: confusion matrix, share
    /// sent to the cheap tier, estimated cost against all-flagship.
    RouteEval(RouteEvalArgs),
}

#[derive(Debug, Clone, Args)]
pub struct RouteEvalArgs {
    /// Which part of the set to report: `test` (held out, never tuned on), `train` or `all`.
    #[arg(long, default_value = "test")]
    pub split: String,
    /// Difficulty score at or above which a prompt goes to the flagship.
    #[arg(long, default_value_t = crate::routing::DEFAULT_THRESHOLD)]
    pub threshold: f32,
    /// The embedder, as `cache.embedder` names it (`builtin`, `local:<dir>`).
    #[arg(long, default_value = "builtin")]
    pub embedder: String,
    /// Score on the cheap signals alone (no example similarity).
    #[arg(long)]
    pub signals_only: bool,
    /// Fit the weights on the training split first, print them, and report with them.
    #[arg(long)]
    pub fit: bool,
    /// A labelled set in the same JSONL format instead of the shipped one.
    #[arg(long)]
    pub set: Option<PathBuf>,
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// TOML config file.
    #[arg(long, env = "PARLEY_CONFIG")]
    pub config: Option<PathBuf>,
    /// Address to listen on (overrides the file).
    #[arg(long)]
    pub listen: Option<String>,
    /// Storage directory (overrides the file).
    #[arg(long)]
    pub data_dir: Option<PathBuf>,
}

#[derive(Debug, Clone, Args)]
pub struct MockArgs {
    #[arg(long, default_value = "127.0.0.1:8081")]
    pub listen: String,
    /// Delay before the first byte of a reply, in milliseconds.
    #[arg(long, default_value_t = 0)]
    pub ttft_ms: u64,
    /// Streaming pace (0 = as fast as possible; else one a minute to a million a second).
    #[arg(long, default_value_t = 0.0, value_parser = pace)]
    pub tokens_per_sec: f64,
    /// Fraction of requests (0–1) answered 500.
    #[arg(long, default_value_t = 0.0, value_parser = fraction)]
    pub error_rate: f64,
    /// Fraction of requests (0–1) answered 429 with `Retry-After: 1`.
    #[arg(long, default_value_t = 0.0, value_parser = fraction)]
    pub rate_limit_rate: f64,
    /// Seed of the reply generator and of the fault draws.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

fn pace(s: &str) -> Result<f64, String> {
    let f: f64 = s.parse().map_err(|e| format!("{e}"))?;
    if f == 0.0 || crate::mock_upstream::generator::pace(f).is_some() {
        Ok(f)
    } else {
        Err(format!(
            "{f} is not 0 or a pace between 1/60 and 1000000 chunks a second"
        ))
    }
}

fn fraction(s: &str) -> Result<f64, String> {
    let f: f64 = s.parse().map_err(|e| format!("{e}"))?;
    if (0.0..=1.0).contains(&f) {
        Ok(f)
    } else {
        Err(format!("{f} is not between 0 and 1"))
    }
}
