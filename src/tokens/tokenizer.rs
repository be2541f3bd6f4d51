//! The tokenizer of a model: tiktoken encodings, `cl100k_base` where the model is unknown.
//!
//! Counting runs [`BpeCounter`], built on first use per encoding; tiktoken-rs itself is used
//! only to map model names to encodings (and as the reference in tests), because its `CoreBPE`
//! keeps about 30 MB of maps per encoding.

use std::sync::OnceLock;

use tiktoken_rs::tokenizer::{get_tokenizer, Tokenizer};

use super::bpe::{BpeCounter, CL100K_BASE_PATTERN, O200K_BASE_PATTERN};
use super::vocab;

/// Texts longer than this are counted on the blocking pool, off the async threads.
const INLINE_COUNT_LIMIT: usize = 8 * 1024;

/// A tiktoken encoding.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Encoding {
    Cl100kBase,
    O200kBase,
}

impl Encoding {
    /// The encoding of `model` (an upstream model name), `cl100k_base` when tiktoken does not
    /// know it (Anthropic, Llama, the mock …): a fair estimate for budgeting.
    pub fn for_model(model: &str) -> Self {
        match get_tokenizer(model) {
            Some(Tokenizer::O200kBase | Tokenizer::O200kHarmony) => Self::O200kBase,
            _ => Self::Cl100kBase,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Self::Cl100kBase => "cl100k_base",
            Self::O200kBase => "o200k_base",
        }
    }

    /// The counter of this encoding, built on first use (a few milliseconds); `None` if it
    /// could not be built, which the tests rule out.
    pub(super) fn counter(self) -> Option<&'static BpeCounter> {
        static CL100K_BASE: OnceLock<Option<BpeCounter>> = OnceLock::new();
        static O200K_BASE: OnceLock<Option<BpeCounter>> = OnceLock::new();
        let (cell, blob, pattern) = match self {
            Self::Cl100kBase => (&CL100K_BASE, vocab::CL100K_BASE, CL100K_BASE_PATTERN),
            Self::O200kBase => (&O200K_BASE, vocab::O200K_BASE, O200K_BASE_PATTERN),
        };
        cell.get_or_init(|| match BpeCounter::new(blob, pattern) {
            Ok(counter) => {
                tracing::debug!(
                    encoding = self.name(),
                    bytes = counter.memory_bytes(),
                    "token counter built"
                );
                Some(counter)
            }
            Err(e) => {
                tracing::error!(encoding = self.name(), error = %e, "token counter unavailable");
                None
            }
        })
        .as_ref()
    }
}

/// Number of tokens of `text` (special-token text is counted as ordinary text, as it is sent).
pub fn count(encoding: Encoding, text: &str) -> u32 {
    // Without a counter, one token per byte is an upper bound that keeps budgeting safe.
    let n = match encoding.counter() {
        Some(counter) => counter.count(text),
        None => text.len(),
    };
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// Like [`count`], but long texts are counted on the blocking pool.
pub async fn count_async(encoding: Encoding, text: String) -> u32 {
    if text.len() <= INLINE_COUNT_LIMIT {
        return count(encoding, &text);
    }
    let len = text.len();
    tokio::task::spawn_blocking(move || count(encoding, &text))
        .await
        // A panic while counting is not expected; an upper bound keeps budgeting safe.
        .unwrap_or(u32::try_from(len).unwrap_or(u32::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_counts() {
        assert_eq!(count(Encoding::Cl100kBase, "hello world"), 2);
        assert_eq!(count(Encoding::Cl100kBase, ""), 0);
        assert_eq!(count(Encoding::O200kBase, "hello world"), 2);
        // Special tokens in user text are plain text, never control tokens.
        assert!(count(Encoding::Cl100kBase, "<|endoftext|>") > 1);
    }

    #[test]
    fn model_encodings() {
        assert_eq!(Encoding::for_model("gpt-4o-mini"), Encoding::O200kBase);
        assert_eq!(Encoding::for_model("gpt-4"), Encoding::Cl100kBase);
        assert_eq!(
            Encoding::for_model("claude-3-5-haiku-latest"),
            Encoding::Cl100kBase
        );
        assert_eq!(Encoding::for_model("mock-1"), Encoding::Cl100kBase);
    }
}
