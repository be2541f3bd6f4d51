//! The index's vectors as 8-bit integers: a quarter of the memory of f32, close enough to find
//! candidates. The service decides a hit on the exact f32 vector read back from storage, so
//! quantisation moves no threshold.
//!
//! A vector is scaled so its largest component is ±127 and rounded; four more bytes carry
//! the f32 inverse of the rounded vector's length, so the similarity of two quantised vectors
//! is an integer dot product times two factors: the cosine of the rounded vectors, which is
//! within about 0.01 of the cosine of the originals (see the tests).

/// Bytes after the components: the inverse length, as f32 little-endian.
pub const TAIL: usize = 4;

/// The quantised form of `v` (`v.len() + TAIL` bytes). A zero vector quantises to zeros with
/// an inverse length of zero: similar to nothing.
pub fn quantise(v: &[f32]) -> Vec<i8> {
    let max = v.iter().fold(0f32, |m, x| m.max(x.abs()));
    let scale = if max > 0.0 && max.is_finite() {
        127.0 / max
    } else {
        0.0
    };
    let mut q: Vec<i8> = Vec::with_capacity(v.len() + TAIL);
    // In range by construction: |x| * 127 / max ≤ 127.
    q.extend(
        v.iter()
            .map(|x| (x * scale).round().clamp(-127.0, 127.0) as i8),
    );
    with_tail(q)
}

/// The inverse length carried in the tail (0 for a slice too short to hold one).
fn inverse_length(q: &[i8]) -> f32 {
    match q.len().checked_sub(TAIL).and_then(|at| q.get(at..)) {
        Some([a, b, c, d]) => f32::from_le_bytes([*a as u8, *b as u8, *c as u8, *d as u8]),
        _ => 0.0,
    }
}

/// The components of a quantised vector, without the tail.
pub fn components(q: &[i8]) -> &[i8] {
    &q[..q.len().saturating_sub(TAIL)]
}

/// A fingerprint of a vector's components (64-bit FNV-1a): equal vectors, equal prints; the
/// same in every build, so it could be stored.
pub fn fingerprint(components: &[i8]) -> u64 {
    components.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b as u8)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Whether a quantised vector is all zeros (similar to nothing).
pub fn is_zero(q: &[i8]) -> bool {
    components(q).iter().all(|&x| x == 0)
}

/// A quantised vector from its components alone (as a graph keeps them): the tail added.
pub fn with_tail(mut components: Vec<i8>) -> Vec<i8> {
    let norm = components
        .iter()
        .map(|&x| i64::from(x) * i64::from(x))
        .sum::<i64>() as f32;
    let inverse = if norm > 0.0 { norm.sqrt().recip() } else { 0.0 };
    components.extend(inverse.to_le_bytes().map(|b| b as i8));
    components
}

/// Integer dot product, in sixteen i32 lanes so the compiler can vectorise it.
fn dot(a: &[i8], b: &[i8]) -> i32 {
    let n = a.len().min(b.len());
    let (a, b) = (&a[..n], &b[..n]);
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let tail: i32 = ca
        .remainder()
        .iter()
        .zip(cb.remainder())
        .map(|(x, y)| i32::from(*x) * i32::from(*y))
        .sum();
    let mut lanes = [0i32; 16];
    for (x, y) in ca.zip(cb) {
        for i in 0..16 {
            lanes[i] += i32::from(x[i]) * i32::from(y[i]);
        }
    }
    lanes.iter().sum::<i32>() + tail
}

/// The cosine similarity of two quantised vectors.
pub fn similarity(a: &[i8], b: &[i8]) -> f32 {
    dot(components(a), components(b)) as f32 * inverse_length(a) * inverse_length(b)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::embed::{cosine, Builtin};

    #[test]
    fn round_trip_keeps_similarities_within_a_hundredth() {
        let questions: Vec<String> = (0..200)
            .map(|i| {
                format!(
                    "What is the {} of place number {} in {}?",
                    i % 7,
                    i,
                    1900 + i
                )
            })
            .chain([
                "What is the capital of France?".to_owned(),
                "what's the capital of france".to_owned(),
                "Tell me about the history of Rome".to_owned(),
            ])
            .collect();
        let exact: Vec<Vec<f32>> = questions.iter().map(|q| Builtin::vector(q)).collect();
        let quantised: Vec<Vec<i8>> = exact.iter().map(|v| quantise(v)).collect();
        let mut worst = 0f32;
        for i in 0..exact.len() {
            assert_eq!(quantised[i].len(), exact[i].len() + TAIL);
            // A vector is its own nearest: similarity 1 (to rounding).
            assert!((similarity(&quantised[i], &quantised[i]) - 1.0).abs() < 1e-5);
            for j in (i + 1..exact.len()).step_by(7) {
                let e = cosine(&exact[i], &exact[j]);
                let q = similarity(&quantised[i], &quantised[j]);
                worst = worst.max((e - q).abs());
            }
        }
        assert!(worst < 0.01, "largest error {worst}");
        let n = exact.len();
        let paraphrase = similarity(&quantised[n - 3], &quantised[n - 2]);
        assert!((paraphrase - cosine(&exact[n - 3], &exact[n - 2])).abs() < 0.01);
    }

    #[test]
    fn degenerate_vectors_are_similar_to_nothing() {
        let zero = quantise(&[0.0; 8]);
        let one = quantise(&[1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]);
        assert_eq!(similarity(&zero, &one), 0.0);
        assert!(is_zero(&zero) && !is_zero(&one));
        assert!((similarity(&one, &one) - 1.0).abs() < 1e-6);
        // Opposite vectors: -1; a slice too short for its tail: similarity 0.
        let minus = quantise(&[-1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]);
        assert!((similarity(&one, &minus) + 1.0).abs() < 1e-6);
        assert_eq!(similarity(&[1, 2], &[1, 2]), 0.0);
        // The tail is rebuilt from the components alone.
        let v = quantise(&[0.3, -0.2, 0.9, 0.0, 0.1, 0.0, 0.0, 0.4]);
        assert_eq!(with_tail(components(&v).to_vec()), v);
    }
}
