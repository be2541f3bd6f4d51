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
