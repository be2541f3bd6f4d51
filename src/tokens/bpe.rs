//! An exact BPE token counter: tiktoken's pre-tokenisation and merges, counting instead of
//! encoding.
//!
//! Text is split with the encoding's regex (the same pattern and the same `fancy-regex` that
//! tiktoken-rs runs), and each piece is merged the way tiktoken merges it: a piece that is a
//! token is one token; otherwise, starting from single bytes, the adjacent pair whose
//! concatenation has the lowest rank is merged (the leftmost of equal ranks) until no adjacent
//! pair is a token. The number of parts left is the piece's count. [`super::vocab::Vocab`]
//! answers the rank look-ups; the `reference` tests compare every count with tiktoken-rs.

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use fancy_regex::Regex;

use super::vocab::{Rank, Vocab};

/// The cl100k_base split pattern, as tiktoken-rs 0.12 writes it (`cl100k_base()` in its
/// `tiktoken_ext/openai_public.rs`; it is not exported). The `reference` tests hold it to
/// tiktoken-rs's counts.
pub(super) const CL100K_BASE_PATTERN: &str = r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s";
/// The o200k_base split pattern, exported by tiktoken-rs.
pub(super) const O200K_BASE_PATTERN: &str = tiktoken_rs::O200K_BASE_PAT_STR;

/// Pieces at least this long are merged with a heap (O(n log n)); shorter ones with a linear
/// scan over a stack array, which is faster at the sizes text mostly has. Both merge alike.
const LONG_PIECE: usize = 128;
/// "No token": the pair rank of parts that do not form a token.
const NONE: Rank = Rank::MAX;

/// Counts the tokens of one encoding.
pub(super) struct BpeCounter {
    vocab: Vocab,
    split: Regex,
}

impl BpeCounter {
    /// Indexes `blob` (see [`super::vocab`]) and compiles `pattern`.
    ///
    /// # Errors
    /// When `pattern` does not compile.
    pub(super) fn new(blob: &'static [u8], pattern: &str) -> Result<Self, Box<fancy_regex::Error>> {
        let split = Regex::new(pattern).map_err(Box::new)?;
        Ok(Self {
            vocab: Vocab::new(blob),
            split,
        })
    }

    /// Number of tokens of `text`, as `encode_ordinary(text).len()` in tiktoken.
    pub(super) fn count(&self, text: &str) -> usize {
        let mut tokens = 0;
        let mut counted_to = 0;
        for piece in self.split.find_iter(text) {
            match piece {
                Ok(piece) => {
                    tokens += self.count_piece(piece.as_str().as_bytes());
                    counted_to = piece.end();
                }
                // fancy-regex gave up (its backtracking limit), where tiktoken would panic:
                // count the rest as one token per byte, an upper bound.
                Err(_) => return tokens + (text.len() - counted_to),
            }
        }
        tokens
    }

    /// Bytes the vocabulary takes (the compiled regex and its caches are not included).
    pub(super) fn memory_bytes(&self) -> usize {
        self.vocab.memory_bytes()
    }

    /// Number of tokens in the vocabulary.
    #[cfg(test)]
    pub(super) fn vocab_len(&self) -> usize {
        self.vocab.len()
    }

    fn count_piece(&self, piece: &[u8]) -> usize {
        if piece.len() <= 1 || self.vocab.rank(piece).is_some() {
            return piece.len().min(1);
        }
        if piece.len() < LONG_PIECE {
            self.merge_short(piece)
        } else {
            self.merge_long(piece)
        }
    }

    fn pair_rank(&self, bytes: &[u8]) -> Rank {
        self.vocab.rank(bytes).unwrap_or(NONE)
    }

    /// The merge of a piece of 2 to `LONG_PIECE - 1` bytes: parts in arrays, a scan for the
    /// lowest pair rank per merge.
    fn merge_short(&self, piece: &[u8]) -> usize {
        let n = piece.len();
        // `bounds[i]` is where part `i` starts, and `bounds[parts] == n`; positions fit a `u8`
        // because `n < LONG_PIECE`.
        let mut bounds = [0u8; LONG_PIECE];
        for (i, bound) in bounds.iter_mut().enumerate().take(n + 1) {
            *bound = i as u8;
        }
        // `pair[i]` is the rank of parts `i` and `i + 1` together, `NONE` if not a token.
        let mut pair = [NONE; LONG_PIECE];
        for (i, rank) in pair.iter_mut().enumerate().take(n - 1) {
            *rank = self.pair_rank(&piece[i..i + 2]);
        }
        let span = |bounds: &[u8], from: usize, to: usize| {
            &piece[usize::from(bounds[from])..usize::from(bounds[to])]
        };
        let mut parts = n;
        loop {
            let mut best = (NONE, 0);
            for (i, &rank) in pair[..parts - 1].iter().enumerate() {
                if rank < best.0 {
                    best = (rank, i);
                }
            }
            if best.0 == NONE {
                return parts;
            }
            // Merge part `at + 1` into part `at`.
            let at = best.1;
            bounds.copy_within(at + 2..=parts, at + 1);
            if at + 2 < parts {
                pair.copy_within(at + 2..parts - 1, at + 1);
            }
            parts -= 1;
            pair[at] = if at + 1 < parts {
                self.pair_rank(span(&bounds, at, at + 2))
            } else {
                NONE
            };
            if at > 0 {
                pair[at - 1] = self.pair_rank(span(&bounds, at - 1, at + 1));
            }
        }
    }

    /// The merge of a long piece: parts as a linked list over byte positions, candidate merges
    /// in a min-heap by (rank, position). An entry is stale when the pair rank at its position
    /// has changed since; a pair only ever grows, so a stale rank never comes back.
    fn merge_long(&self, piece: &[u8]) -> usize {
        let n = piece.len();
        // For a part starting at `i`: where the next part starts, where the previous one
        // starts, and the rank of it merged with the next (`NONE` if not a token, or once
        // the part has been merged into its left neighbour).
        let mut next: Vec<usize> = (1..=n).collect();
        let mut prev: Vec<usize> = (0..n).map(|i| i.wrapping_sub(1)).collect();
        let mut pair = vec![NONE; n];
        let mut heap = BinaryHeap::with_capacity(n);
        for i in 0..n - 1 {
            pair[i] = self.pair_rank(&piece[i..i + 2]);
            if pair[i] != NONE {
                heap.push(Reverse((pair[i], i)));
            }
        }
        let mut parts = n;
        while let Some(Reverse((rank, at))) = heap.pop() {
            if pair[at] != rank {
                continue;
            }
            let right = next[at];
            let end = next[right];
            next[at] = end;
            pair[right] = NONE;
            parts -= 1;
            pair[at] = if end < n {
                prev[end] = at;
                self.pair_rank(&piece[at..next[end]])
            } else {
                NONE
            };
            if pair[at] != NONE {
                heap.push(Reverse((pair[at], at)));
            }
            if at > 0 {
                let left = prev[at];
                pair[left] = self.pair_rank(&piece[left..end]);
                if pair[left] != NONE {
                    heap.push(Reverse((pair[left], left)));
                }
            }
        }
        parts
    }
}

#[cfg(test)]
mod tests {
    use super::super::vocab::CL100K_BASE;
    use super::*;

    #[test]
    fn short_and_long_merges_agree() {
        let counter = BpeCounter::new(CL100K_BASE, CL100K_BASE_PATTERN).unwrap(); // ok: test
        let pieces: [&[u8]; 6] = [
            b"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa",
            b"xqzjvkwpxqzjvkwpxqzjvkwpxqzjvkwp",
            b"internationalisationunderstandingnotwithstanding",
            "çàéèüöñßøåæœ日本語テキスト".as_bytes(),
            b"\x00\x01\x02\xff\xfe\x80abc",
            b"ab",
        ];
        for piece in pieces {
            assert_eq!(
                counter.merge_short(piece),
                counter.merge_long(piece),
                "{piece:?}"
            );
        }
    }
}
