//! The wire formats parley speaks, as typed serde structs: OpenAI Chat Completions (served to
//! clients and spoken to OpenAI-compatible upstreams) and the Anthropic Messages API (spoken to
//! Anthropic upstreams), and the Responses API (served to clients), with their mapping to and
//! from [`crate::domain`].

pub mod anthropic;
pub mod openai;
pub mod responses;
