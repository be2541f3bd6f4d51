//! The semantic cache's building blocks (issue "Embedded semantic cache and recall memory"):
//! embedders behind one trait ([`embed`]) and the false-hit guards ([`guards`]). The HNSW index,
//! its scope keys and its lifecycle come next; nothing here is wired into turns yet.

pub mod embed;
pub mod guards;

/// Whether two questions are a cache hit under an embedder, a similarity threshold and the
/// false-hit guards.
pub fn is_hit(embedder: &dyn embed::Embedder, a: &str, b: &str, min_similarity: f32) -> bool {
    let v = embedder.embed(&[a, b]);
    match (v.first(), v.get(1)) {
        (Some(x), Some(y)) => embed::cosine(x, y) >= min_similarity && guards::check(a, b).is_ok(),
        _ => false,
    }
}

#[cfg(test)]
mod paraphrases;
