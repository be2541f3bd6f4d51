//! The `provider:<name>/<model>` embedder: a configured OpenAI-compatible provider's
//! `/v1/embeddings` (OpenAI, Ollama, vLLM, `parley mock-upstream`), called through that
//! provider's actor so its request and token buckets, concurrency cap and breaker apply.
//! Texts go in batches of [`BATCH`]; concurrent small calls (cache lookups) are coalesced
//! into shared requests while earlier ones are in flight ([`Batcher`]); vectors are
//! L2-normalised here, whatever the server does.

use actix::Addr;
use futures_util::future::BoxFuture;
use tokio::sync::oneshot;

use super::batcher::Batcher;
use super::embed::{normalise_vector, EmbedError, Embedder};
use crate::provider::{Embed, ProviderActor};

/// Texts per embeddings request.
pub const BATCH: usize = 128;
/// Embedding requests in flight at once before calls start to share requests.
const IN_FLIGHT: usize = 4;

pub struct ProviderEmbedder {
    provider: String,
    model: String,
    region: Option<String>,
    addr: Addr<ProviderActor>,
    batcher: Batcher,
}

impl ProviderEmbedder {
    pub fn new(
        provider: &str,
        model: &str,
        region: Option<String>,
        addr: Addr<ProviderActor>,
    ) -> Self {
        let (a, m) = (addr.clone(), model.to_owned());
        let batcher = Batcher::start(
            move |texts: Vec<String>| request(a.clone(), m.clone(), texts),
            BATCH,
            IN_FLIGHT,
        );
        Self {
            provider: provider.to_owned(),
            model: model.to_owned(),
            region,
            addr,
            batcher,
        }
    }
}

/// One embeddings request through the provider's actor.
async fn request(
    addr: Addr<ProviderActor>,
    model: String,
    texts: Vec<String>,
) -> Result<Vec<Vec<f32>>, EmbedError> {
    // A cheap estimate for the tokens-per-minute bucket (about four bytes a token).
    let tokens: usize = texts.iter().map(|t| t.len() / 4 + 1).sum();
    let (reply, answer) = oneshot::channel();
    let msg = Embed {
        model,
        texts,
        tokens: u32::try_from(tokens).unwrap_or(u32::MAX),
        reply,
    };
    addr.send(msg)
        .await
        .map_err(|e| EmbedError::Provider(e.to_string()))?;
    let mut vectors = answer
        .await
        .map_err(|_| EmbedError::Provider("provider actor stopped".into()))?
        .map_err(|e| EmbedError::Provider(e.to_string()))?;
    vectors.iter_mut().for_each(|v| normalise_vector(v));
    Ok(vectors)
}

impl Embedder for ProviderEmbedder {
    fn id(&self) -> String {
        format!("provider:{}/{}", self.provider, self.model)
    }

    fn remote_region(&self) -> Option<Option<String>> {
        Some(self.region.clone())
    }

    fn embed<'a>(
        &'a self,
        texts: &'a [String],
    ) -> BoxFuture<'a, Result<Vec<Vec<f32>>, EmbedError>> {
        Box::pin(async move {
            if texts.len() < BATCH {
                let vectors = self.batcher.embed(texts.to_vec()).await?;
                if vectors.len() != texts.len() {
                    return Err(EmbedError::Malformed(format!(
                        "{} vectors for {} texts",
                        vectors.len(),
                        texts.len()
                    )));
                }
                return Ok(vectors);
            }
            let mut out = Vec::with_capacity(texts.len());
            for chunk in texts.chunks(BATCH) {
                let vectors =
                    request(self.addr.clone(), self.model.clone(), chunk.to_vec()).await?;
                if vectors.len() != chunk.len() {
                    return Err(EmbedError::Malformed(format!(
                        "{} vectors for {} texts",
                        vectors.len(),
                        chunk.len()
                    )));
                }
                out.extend(vectors);
            }
            Ok(out)
        })
    }
}
