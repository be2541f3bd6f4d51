//! Conversations: one supervised actor per live conversation ([`ConversationActor`]), found or
//! started through the [`Registry`], running its turns ([`turn`]) one at a time and fanning the
//! frames out to every subscriber ([`Fanout`]). Talks to `store` for history, `provider` for
//! generations and `tokens` for budgeting; knows nothing of HTTP or WebSockets.

mod actor;
mod fanout;
pub mod frames;
pub mod messages;
pub mod prompts;
mod registry;
mod turn;

use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use actor::{ConversationActor, MAX_REPLAY};
pub use fanout::{next_sink_id, Scope, SinkId};
pub use frames::{Outbound, ServerFrame, Sink, WireMessage};
pub use registry::{Live, NewConversation, Registry};
pub use turn::outcome_frame;

use crate::metrics::Metrics;
use crate::provider::Router;
use crate::store::Store;
use crate::tokens::ContextBudget;

/// What every conversation shares.
pub struct Deps {
    pub store: Store,
    pub router: Router,
    pub budget: ContextBudget,
    pub metrics: Metrics,
    pub idle_timeout: Duration,
    pub max_queued_turns: usize,
    /// Cancelled at shutdown: every turn's token is a child of it.
    pub shutdown: CancellationToken,
    /// Every running turn, so shutdown can wait for them to store their replies.
    pub tasks: TaskTracker,
    /// Per-key limits and quotas.
    pub governor: std::sync::Arc<crate::tenant::Governor>,
    /// Where each turn's usage record goes.
    pub usage: crate::tenant::usage::UsageRecorder,
    /// The semantic cache (and the embedder recall memory uses).
    pub cache: crate::cache::Cache,
    /// Recall memory settings.
    pub memory: MemorySettings,
}

/// `[context]` settings of recall memory.
#[derive(Debug, Clone, Copy)]
pub struct MemorySettings {
    /// The mode of conversations created without one.
    pub mode: crate::config::MemoryMode,
    /// Share of the prompt budget for recalled turns.
    pub share: f32,
    /// Least similarity a recalled turn needs.
    pub min_similarity: f32,
}
