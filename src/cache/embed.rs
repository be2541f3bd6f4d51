//! Text embeddings for the semantic cache and recall memory, behind one trait.
//!
//! [`Builtin`] is the offline default: no model files, deterministic. Text is put in its
//! canonical form ([`super::normalise`]: number words as digits, American spelling, compounds
//! joined, plurals singular, one-letter typos fixed), then normalised (lower case, contractions
//! expanded — "what's" is "what is" —, punctuation folded to spaces, runs of white space
//! collapsed); its features are the words, word bigrams and character
//! trigrams inside each padded word of three letters or more (what makes typo and inflection
//! variants land close together). Function words ("the", "please", "tell me") weigh little, so
//! a rewording that only changes them stays close; content words weigh most. Each feature is
//! hashed (FNV-1a) into one of [`DIM`] dimensions with a hashed sign, and the vector is
//! L2-normalised, so cosine similarity is a dot product.
//!
//! [`ProviderEmbedder`](super::provider_embed::ProviderEmbedder) asks a configured
//! provider's `/v1/embeddings`; `local` (cargo feature `local-embed`) runs a sentence
//! transformer in-process.

use futures_util::future::BoxFuture;

/// Dimensions of the builtin embedding.
pub const DIM: usize = 512;

/// Why texts could not be embedded (the turn then goes on without the cache).
#[derive(Debug, thiserror::Error)]
pub enum EmbedError {
    #[error("embedding provider failed: {0}")]
    Provider(String),
    #[error("embedding answer malformed: {0}")]
    Malformed(String),
    #[error("local embedding model failed: {0}")]
    Local(String),
}

/// Something that turns texts into unit vectors.
pub trait Embedder: Send + Sync {
    /// A stable name of the embedder and its model: entries made by another embedder are never
    /// compared with this one's.
    fn id(&self) -> String;
    /// One unit vector per text, in order.
    fn embed<'a>(&'a self, texts: &'a [String])
        -> BoxFuture<'a, Result<Vec<Vec<f32>>, EmbedError>>;
    /// Where texts go to be embedded: `None` when they never leave the process, else the
    /// provider's region (`Some(None)` when it has none).
    fn remote_region(&self) -> Option<Option<String>> {
        None
    }
}

/// The builtin hashed n-gram embedder.
#[derive(Debug, Clone, Copy, Default)]
pub struct Builtin;

impl Builtin {
    /// The embedding of one text (synchronous: a few microseconds).
    pub fn vector(text: &str) -> Vec<f32> {
        embed_one(text)
    }
}

impl Embedder for Builtin {
    fn id(&self) -> String {
        // v2: text in canonical form first (vectors of v1 are not comparable).
        format!("builtin-v2-{DIM}")
    }

    fn embed<'a>(
        &'a self,
        texts: &'a [String],
    ) -> BoxFuture<'a, Result<Vec<Vec<f32>>, EmbedError>> {
        let out = texts.iter().map(|t| embed_one(t)).collect();
        Box::pin(std::future::ready(Ok(out)))
    }
}

const CONTRACTIONS: &[(&str, &str)] = &[
    ("n't", " not"),
    ("'re", " are"),
    ("'m", " am"),
    ("'ll", " will"),
    ("'ve", " have"),
    ("'d", " would"),
    ("'s", " is"),
];

/// Lower case, contractions expanded, punctuation to spaces, single spaces.
pub fn normalise(text: &str) -> String {
    let mut lower: String = text
        .chars()
        .flat_map(char::to_lowercase)
        .map(|c| if c == '’' { '\'' } else { c })
        .collect();
    if lower.contains('\'') {
        lower = lower
            .replace("can't", "can not")
            .replace("won't", "will not");
        for (from, to) in CONTRACTIONS {
            lower = lower.replace(from, to);
        }
    }
    let mapped: String = lower
        .chars()
        .map(|c| if c.is_alphanumeric() { c } else { ' ' })
        .collect();
    mapped.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// Words that carry little of a question's meaning. Interrogatives other than "what" and
/// "which" are not here: "when" and "where" ask different questions.
const FUNCTION_WORDS: &[&str] = &[
    "the", "and", "for", "are", "was", "were", "is", "be", "been", "what", "which", "can", "could",
    "would", "should", "will", "does", "did", "do", "you", "your", "me", "my", "i", "have", "has",
    "had", "with", "about", "this", "that", "these", "those", "there", "it", "its", "to", "of",
    "in", "on", "at", "by", "an", "a", "please", "tell", "give", "some", "show", "explain", "know",
    "want", "like", "need", "us", "we", "our", "hey", "hi", "hello", "thanks", "kindly", "just",
    "so", "then", "into",
];

fn weight(word: &str) -> f32 {
    if FUNCTION_WORDS.contains(&word) {
        0.15
    } else if word.chars().count() <= 2 {
        0.5
    } else {
        1.0
    }
}

fn embed_one(text: &str) -> Vec<f32> {
    let norm = normalise(&super::normalise::canonical(text));
    let words: Vec<&str> = norm.split(' ').filter(|w| !w.is_empty()).collect();
    let mut v = vec![0f32; DIM];
    let mut add = |feature: &[u8], weight: f32| {
        let h = fnv1a(feature);
        let sign = if h >> 63 == 0 { 1.0 } else { -1.0 };
        v[(h % DIM as u64) as usize] += sign * weight;
    };
    let mut content = Vec::with_capacity(words.len());
    for w in &words {
        let w8 = weight(w);
        add(w.as_bytes(), w8);
        if w8 < 1.0 {
            continue;
        }
        content.push(*w);
        let padded: Vec<char> = format!("^{w}$").chars().collect();
        for tri in padded.windows(3) {
            let s: String = tri.iter().collect();
            add(format!("#{s}").as_bytes(), 0.6);
        }
    }
    // Bigrams of content words, skipping function words between them ("capital of france"
    // and "france's capital" share "capital france" either way round).
    for pair in content.windows(2) {
        let (a, b) = if pair[0] <= pair[1] {
            (pair[0], pair[1])
        } else {
            (pair[1], pair[0])
        };
        add(format!("{a} {b}").as_bytes(), 0.5);
    }
    let len = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if len > 0.0 {
        v.iter_mut().for_each(|x| *x /= len);
    }
    v
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ u64::from(*b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Cosine similarity of two unit vectors: their dot product, summed in eight lanes so the
/// compiler can vectorise it.
pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let mut lanes = [0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| x * y)
        .sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            lanes[i] += x[i] * y[i];
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// Scales a vector to unit length (a zero vector stays zero; one with non-finite values stays
/// as it is, and the index refuses it).
pub fn normalise_vector(v: &mut [f32]) {
    let len = v.iter().map(|x| x * x).sum::<f32>().sqrt();
    if len > 0.0 && len.is_finite() {
        v.iter_mut().for_each(|x| *x /= len);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sim(a: &str, b: &str) -> f32 {
        cosine(&Builtin::vector(a), &Builtin::vector(b))
    }

    #[test]
    fn unit_vectors_and_determinism() {
        let v = Builtin::vector("Hello, world!");
        let len: f32 = v.iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((len - 1.0).abs() < 1e-5);
        assert_eq!(v, Builtin::vector("Hello, world!"));
        assert_eq!(Builtin::vector("").iter().filter(|x| **x != 0.0).count(), 0);
    }

    #[test]
    fn contractions_are_expanded() {
        assert_eq!(normalise("What's the capital?"), "what is the capital");
        assert_eq!(normalise("I don’t know"), "i do not know");
        assert_eq!(normalise("It can't be"), "it can not be");
    }

    #[test]
    fn rewordings_are_close_and_other_questions_far() {
        let same = sim(
            "What is the capital of France?",
            "what's the capital of france",
        );
        let reworded = sim(
            "What is the capital of France?",
            "Tell me the capital of France, please",
        );
        let typo = sim(
            "What is the capital of France?",
            "What is the capitol of France?",
        );
        let other = sim(
            "What is the capital of France?",
            "How do I bake sourdough bread?",
        );
        assert!(same > 0.99, "{same}");
        assert!(reworded > 0.92, "{reworded}");
        assert!(typo > 0.6, "{typo}");
        assert!(other < 0.3, "{other}");
        assert!(same > typo && typo > other);
    }
}
