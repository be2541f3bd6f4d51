//! Text embeddings for the semantic cache, behind one trait.
//!
//! [`Builtin`] is the offline default: no model files, deterministic. Text is normalised
//! (lower case, punctuation folded to spaces, runs of white space collapsed); its features are
//! the words (weighted 1.0, words of two or three letters 0.5, single letters dropped), word
//! bigrams (0.7) and character trigrams inside each padded word of three letters or more (0.4 —
//! what makes typo and inflection variants land close together). Each feature is hashed
//! (FNV-1a) into one of [`DIM`] dimensions with a hashed sign, and the vector is L2-normalised,
//! so cosine similarity is a dot product.

/// Dimensions of the builtin embedding.
pub const DIM: usize = 512;

/// Something that turns texts into unit vectors.
pub trait Embedder: Send + Sync {
    /// Dimensions of every vector this embedder produces.
    fn dim(&self) -> usize;
    /// One unit vector per text.
    fn embed(&self, texts: &[&str]) -> Vec<Vec<f32>>;
}

/// The builtin hashed n-gram embedder.
#[derive(Debug, Clone, Copy, Default)]
pub struct Builtin;

impl Embedder for Builtin {
    fn dim(&self) -> usize {
        DIM
    }

    fn embed(&self, texts: &[&str]) -> Vec<Vec<f32>> {
        texts.iter().map(|t| embed_one(t)).collect()
    }
}

/// Lower case, punctuation to spaces, single spaces.
pub fn normalise(text: &str) -> String {
    let mapped: String = text
        .chars()
        .flat_map(char::to_lowercase)
        .map(|c| if c.is_alphanumeric() { c } else { ' ' })
        .collect();
    mapped.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn embed_one(text: &str) -> Vec<f32> {
    let norm = normalise(text);
    let words: Vec<&str> = norm.split(' ').filter(|w| !w.is_empty()).collect();
    let mut v = vec![0f32; DIM];
    let mut add = |feature: &[u8], weight: f32| {
        let h = fnv1a(feature);
        let sign = if h >> 63 == 0 { 1.0 } else { -1.0 };
        v[(h % DIM as u64) as usize] += sign * weight;
    };
    for w in &words {
        // Short words carry little meaning ("a", the "s" of "what's"), long ones most.
        let n = w.chars().count();
        if n < 2 {
            continue;
        }
        add(w.as_bytes(), if n <= 3 { 0.5 } else { 1.0 });
        if n < 3 {
            continue;
        }
        let padded: Vec<char> = format!("^{w}$").chars().collect();
        for tri in padded.windows(3) {
            let s: String = tri.iter().collect();
            add(format!("#{s}").as_bytes(), 0.4);
        }
    }
    for pair in words.windows(2) {
        add(format!("{} {}", pair[0], pair[1]).as_bytes(), 0.7);
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

/// Cosine similarity of two unit vectors.
pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| x * y).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sim(a: &str, b: &str) -> f32 {
        let v = Builtin.embed(&[a, b]);
        cosine(&v[0], &v[1])
    }

    #[test]
    fn unit_vectors_and_determinism() {
        let v = Builtin.embed(&["Hello, world!"]);
        let len: f32 = v[0].iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((len - 1.0).abs() < 1e-5);
        assert_eq!(v, Builtin.embed(&["Hello, world!"]));
        assert_eq!(
            Builtin.embed(&[""])[0]
                .iter()
                .filter(|x| **x != 0.0)
                .count(),
            0
        );
    }

    #[test]
    fn rewordings_are_close_and_other_questions_far() {
        let same = sim(
            "What is the capital of France?",
            "what's the capital of france",
        );
        let typo = sim(
            "What is the capital of France?",
            "What is the capitol of Frnace?",
        );
        let other = sim(
            "What is the capital of France?",
            "How do I bake sourdough bread?",
        );
        assert!(same > 0.85, "{same}");
        assert!(typo > 0.5, "{typo}");
        assert!(other < 0.3, "{other}");
        assert!(same > typo && typo > other);
    }
}
