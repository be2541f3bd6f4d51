//! HTTP handlers, one file per surface. Each stays short and delegates to the core.

pub mod admin;
pub mod batches;
pub mod conversations;
pub mod health;
pub mod jobs;
pub mod openai;
pub mod responses;
pub mod stateless;
pub mod ui;
pub mod usage;

/// A page of a list in the OpenAI style: `limit` (20 by default, at most 100) items after the
/// id `after` (the previous page's `last_id`).
#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CursorPage {
    #[serde(default)]
    limit: Option<usize>,
    #[serde(default)]
    pub after: Option<String>,
}

impl CursorPage {
    pub fn limit(&self) -> usize {
        self.limit.unwrap_or(20).clamp(1, 100)
    }
}
