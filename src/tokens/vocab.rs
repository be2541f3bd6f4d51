//! A BPE vocabulary in a few bytes per token: token bytes → rank, nothing else.
//!
//! The bytes of all tokens sit in one blob that `build.rs` decodes from `vocab/*.tiktoken` and
//! the binary embeds: for every rank in order, a length byte and then the token's bytes. Next to
//! it, built on first use, one `u32` offset per rank and an open-addressing table of `u32` slots
//! (linear probing, load about 0.76). A slot holds the rank in its low [`RANK_BITS`] bits and 14
//! bits of the hash above them, so a probe that meets another token's slot is nearly always
//! rejected without reading the blob. tiktoken's `CoreBPE` keeps the same mapping as two hash
//! maps of `Vec<u8>` plus a sorted copy of every token, about ten times the size.

/// A token's rank: its id, and its merge priority (lower merges first).
pub(super) type Rank = u32;

/// Bits of a slot that hold the rank; o200k_base has 199 998 tokens, below 2^18.
const RANK_BITS: u32 = 18;
const RANK_MASK: u32 = (1 << RANK_BITS) - 1;
/// A free slot. No real slot equals it, because ranks stay far below `RANK_MASK`.
const EMPTY: u32 = u32::MAX;

/// The cl100k_base blob (see the module doc), made by `build.rs`.
pub(super) const CL100K_BASE: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/cl100k_base.bpe"));
/// The o200k_base blob (see the module doc), made by `build.rs`.
pub(super) const O200K_BASE: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/o200k_base.bpe"));

/// Token bytes → rank over an embedded blob.
pub(super) struct Vocab {
    blob: &'static [u8],
    /// Where each rank's length byte is in `blob`.
    offsets: Box<[u32]>,
    /// A power of two long; see the module doc for a slot's layout.
    slots: Box<[u32]>,
    /// `64 - log2(slots.len())`: the top bits of a hash choose the first slot.
    shift: u32,
}

impl Vocab {
    /// Indexes `blob`. Ranks past what a slot can hold, and a truncated last record, are left
    /// out; neither occurs in the blobs `build.rs` writes (a test checks the token counts).
    pub(super) fn new(blob: &'static [u8]) -> Self {
        let mut offsets = Vec::with_capacity(blob.len() / 6);
        let mut at = 0usize;
        while let Some(&len) = blob.get(at) {
            let end = at + 1 + usize::from(len);
            if end > blob.len() || offsets.len() > RANK_MASK as usize {
                break;
            }
            offsets.push(u32::try_from(at).unwrap_or(u32::MAX));
            at = end;
        }
        let capacity = (offsets.len() + offsets.len() / 4 + 1).next_power_of_two();
        let mut vocab = Self {
            blob,
            offsets: offsets.into_boxed_slice(),
            slots: vec![EMPTY; capacity].into_boxed_slice(),
            shift: 64 - capacity.trailing_zeros(),
        };
        for rank in 0..vocab.offsets.len() {
            // `rank` fits a slot: `offsets` stopped growing at `RANK_MASK`.
            let rank = rank as Rank;
            let hash = hash(vocab.token(rank));
            let mut i = vocab.first_slot(hash);
            while vocab.slots[i] != EMPTY {
                i = (i + 1) & (capacity - 1);
            }
            vocab.slots[i] = tag(hash) | rank;
        }
        vocab
    }

    /// The rank of the token whose bytes are exactly `bytes`, if there is one.
    #[inline]
    pub(super) fn rank(&self, bytes: &[u8]) -> Option<Rank> {
        let hash = hash(bytes);
        let tag = tag(hash);
        let mask = self.slots.len() - 1;
        // Most look-ups are of a few bytes: compare those as one word, not with `memcmp`.
        let short = (bytes.len() <= 8).then(|| short_word(bytes));
        let mut i = self.first_slot(hash);
        loop {
            let slot = self.slots[i];
            if slot == EMPTY {
                return None;
            }
            if slot & !RANK_MASK == tag {
                let token = self.token(slot & RANK_MASK);
                let same = token.len() == bytes.len()
                    && short.map_or_else(|| token == bytes, |word| short_word(token) == word);
                if same {
                    return Some(slot & RANK_MASK);
                }
            }
            i = (i + 1) & mask;
        }
    }

    /// Number of tokens.
    #[cfg(test)]
    pub(super) fn len(&self) -> usize {
        self.offsets.len()
    }

    /// Bytes this vocabulary uses: the heap index plus the embedded blob, which is resident
    /// once indexed.
    pub(super) fn memory_bytes(&self) -> usize {
        self.blob.len() + 4 * (self.offsets.len() + self.slots.len())
    }

    fn token(&self, rank: Rank) -> &[u8] {
        let at = self.offsets[rank as usize] as usize;
        let len = usize::from(self.blob[at]);
        &self.blob[at + 1..at + 1 + len]
    }

    fn first_slot(&self, hash: u64) -> usize {
        // The shift is at least 1 (there is at least one slot), and the result is below
        // `slots.len()`, which is a `usize`.
        (hash >> self.shift) as usize
    }
}

/// The hash bits a slot keeps above its rank: the low bits, as the top bits pick the slot.
fn tag(hash: u64) -> u32 {
    (hash as u32) << RANK_BITS
}

/// A fast hash of a short byte string: the bytes as one or more 64-bit words (see
/// [`short_word`]; longer strings in 8-byte steps, the last step overlapping), mixed with the
/// length, then MurmurHash3's 64-bit finaliser so that both the top and the low bits are usable.
#[inline]
fn hash(bytes: &[u8]) -> u64 {
    const MUL: u64 = 0x9e37_79b9_7f4a_7c15;
    let len = bytes.len();
    let mut h = (len as u64).wrapping_mul(MUL);
    if len <= 8 {
        h ^= short_word(bytes);
    } else {
        let mut at = 0;
        while at + 8 < len {
            h = (h ^ word(bytes, at)).wrapping_mul(MUL).rotate_left(29);
            at += 8;
        }
        h = (h ^ word(bytes, len - 8)).wrapping_mul(MUL).rotate_left(29);
    }
    h ^= h >> 33;
    h = h.wrapping_mul(0xff51_afd7_ed55_8ccd);
    h ^= h >> 33;
    h = h.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    h ^ (h >> 33)
}

/// Up to 8 bytes as one word, read without a copy loop. Between two strings of the same
/// length it is equal exactly when the bytes are: 4 to 8 bytes are read as their first and
/// their last 4 (overlapping), 1 to 3 as the first, middle and last byte.
#[inline]
fn short_word(bytes: &[u8]) -> u64 {
    let len = bytes.len();
    if len >= 4 {
        u64::from(half_word(bytes, 0)) | (u64::from(half_word(bytes, len - 4)) << 32)
    } else if len > 0 {
        u64::from(bytes[0]) | (u64::from(bytes[len / 2]) << 8) | (u64::from(bytes[len - 1]) << 16)
    } else {
        0
    }
}

/// The 8 bytes at `at` (callers keep `at + 8 <= bytes.len()`).
#[inline]
fn word(bytes: &[u8], at: usize) -> u64 {
    bytes[at..]
        .first_chunk()
        .map_or(0, |w| u64::from_le_bytes(*w))
}

/// The 4 bytes at `at` (callers keep `at + 4 <= bytes.len()`).
#[inline]
fn half_word(bytes: &[u8], at: usize) -> u32 {
    bytes[at..]
        .first_chunk()
        .map_or(0, |w| u32::from_le_bytes(*w))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_token_finds_its_rank() {
        for (blob, len) in [(CL100K_BASE, 100_256), (O200K_BASE, 199_998)] {
            let vocab = Vocab::new(blob);
            assert_eq!(vocab.len(), len);
            for rank in 0..len as Rank {
                assert_eq!(vocab.rank(vocab.token(rank)), Some(rank));
            }
            // All 256 single bytes are tokens, which BPE needs to end anywhere.
            for byte in 0..=255u8 {
                assert!(vocab.rank(&[byte]).is_some());
            }
            assert_eq!(vocab.rank(b""), None);
            assert_eq!(vocab.rank(b"\xff\xfe not a token \x00"), None);
        }
    }
}
