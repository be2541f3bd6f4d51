//! Token counting (tiktoken-rs lives only here) and context trimming.
//!
//! `tokenizer` picks the encoding of a model and counts with `bpe`, an exact tiktoken-compatible
//! counter over the compact vocabularies of `vocab`; `budget` is pure arithmetic that decides
//! which stored messages fit the budget of PROTOCOL §6.

mod bpe;
mod budget;
mod messages;
#[cfg(test)]
mod reference;
mod tokenizer;
mod vocab;

pub use budget::{
    fit_history, group_cost, groups, ContextBudget, Kind, TooLarge, MESSAGE_FRAMING_TOKENS,
};
pub use messages::{
    content_tokens, image_tokens, message_tokens, request_tokens, PromptTokens, IMAGE_MAX_TOKENS,
};
pub use tokenizer::{count, count_async, Encoding};
