//! The semantic cache (issue "Embedded semantic cache and recall memory"): embedders behind one
//! trait ([`embed`]), the canonical form questions take before both ([`normalise`]), the
//! false-hit guards ([`guards`]), the scope-partitioned HNSW index
//! ([`index`]) and the service that owns it on its own thread ([`service`]). Turns use it
//! through [`Cache`]; recall memory ([`recall`]) uses the same embedder.

pub mod batcher;
pub mod embed;
pub mod guards;
pub mod index;
#[cfg(feature = "local-embed")]
pub mod local_embed;
pub mod normalise;
pub mod provider_embed;
pub mod recall;
pub mod service;
pub mod sync;

pub use service::{Cache, CacheSettings, Hit, Looked, Outcome, Query, ScopeParts};

/// Whether two questions are a cache hit under the builtin embedder, a similarity threshold
/// and the false-hit guards.
pub fn is_hit(a: &str, b: &str, min_similarity: f32) -> bool {
    let (x, y) = (embed::Builtin::vector(a), embed::Builtin::vector(b));
    embed::cosine(&x, &y) >= min_similarity && guards::check(a, b).is_ok()
}

#[cfg(test)]
mod paraphrases;

/// The embedder `[cache].embedder` names.
///
/// # Errors
/// A provider that is not configured, or a local model that cannot load.
pub fn build_embedder(
    spec: &crate::config::EmbedderSpec,
    router: &crate::provider::Router,
) -> Result<std::sync::Arc<dyn embed::Embedder>, String> {
    use crate::config::EmbedderSpec;
    match spec {
        EmbedderSpec::Builtin => Ok(std::sync::Arc::new(embed::Builtin)),
        EmbedderSpec::Provider { provider, model } => {
            let addr = router
                .provider(provider)
                .ok_or_else(|| format!("cache.embedder: unknown provider {provider:?}"))?;
            Ok(std::sync::Arc::new(provider_embed::ProviderEmbedder::new(
                provider,
                model,
                router.provider_region(provider),
                addr,
            )))
        }
        #[cfg(feature = "local-embed")]
        EmbedderSpec::Local(dir) => local_embed::LocalEmbedder::load(dir)
            .map(|e| std::sync::Arc::new(e) as std::sync::Arc<dyn embed::Embedder>)
            .map_err(|e| format!("cache.embedder: {e}")),
        #[cfg(not(feature = "local-embed"))]
        EmbedderSpec::Local(_) => Err(
            "cache.embedder: local embedders need parley built with --features local-embed".into(),
        ),
    }
}
