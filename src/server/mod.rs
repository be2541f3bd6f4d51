//! The edges: HTTP routes (OpenAI-compatible, conversations, admin, health), SSE and the
//! WebSocket session. Handlers decode, authenticate and delegate to `conversation`, `provider`
//! and `tenant`; the core never depends on this module.

pub mod auth;
pub mod http;
mod panic;
pub mod relay;
pub mod routes;
pub mod span;
pub mod sse;
pub mod ws;

use std::sync::Arc;

use crate::config::Config;
use crate::conversation::Registry;
use crate::metrics::Metrics;
use crate::provider::Router;
use crate::store::Store;
use crate::tenant::Auth;

pub use panic::CatchPanic;

/// Shared state of every handler.
pub struct AppState {
    pub config: Arc<Config>,
    pub auth: Auth,
    pub registry: Registry,
    pub metrics: Metrics,
    pub sockets: ws::SocketHub,
    pub governor: Arc<crate::tenant::Governor>,
    /// Recent Responses API requests, for the SDKs' retries.
    pub retries: http::responses::Retries,
    /// Async jobs: wakes the workers, cancels running jobs.
    pub jobs: crate::jobs::Jobs,
}

impl AppState {
    pub fn store(&self) -> &Store {
        &self.registry.deps().store
    }

    pub fn router(&self) -> &Router {
        &self.registry.deps().router
    }

    /// This node's part in the cluster (cluster mode only).
    pub fn cluster(&self) -> Option<&crate::cluster::Cluster> {
        self.registry.deps().cluster.as_ref()
    }
}
