//! The `local:<dir>` embedder (cargo feature `local-embed`): a sentence transformer of the
//! all-MiniLM-L6-v2 class (BERT) run in-process on the CPU with candle, from `config.json`,
//! `tokenizer.json` and `model.safetensors` in `<dir>`. No network, no C or C++ code.
//!
//! It follows the model's sentence-transformers pipeline: WordPiece tokens truncated at 256
//! (special tokens included) and padded to the longest text of each batch, the BERT forward
//! pass, the mean of the last hidden state over real tokens, then L2 normalisation. Texts go
//! in their canonical form ([`super::normalise`]), as for the builtin embedder: the model
//! knows "three" is near "3", but not as near as the same word. Forward
//! passes are CPU-bound, so they run on the blocking pool, [`BATCH`] texts at a time.

use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use candle_transformers::models::bert::{BertModel, Config};
use futures_util::future::BoxFuture;
use tokenizers::{PaddingStrategy, Tokenizer, TruncationParams};

use super::embed::{EmbedError, Embedder};

/// Tokens per text at most, as the model was trained (`sentence_bert_config.json`).
pub const MAX_TOKENS: usize = 256;
/// Texts per forward pass.
pub const BATCH: usize = 32;

struct Model {
    bert: BertModel,
    tokenizer: Tokenizer,
    device: Device,
}

/// The loaded model; cheap to clone.
#[derive(Clone)]
pub struct LocalEmbedder {
    model: Arc<Model>,
    name: String,
}

fn read(dir: &Path, file: &str) -> Result<Vec<u8>, String> {
    let path = dir.join(file);
    std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))
}

impl LocalEmbedder {
    /// Loads the model in `dir`.
    ///
    /// # Errors
    /// A missing or malformed file, or weights that do not fit a BERT model.
    pub fn load(dir: &Path) -> Result<Self, String> {
        let device = Device::Cpu;
        let config: Config = serde_json::from_slice(&read(dir, "config.json")?)
            .map_err(|e| format!("{}/config.json: {e}", dir.display()))?;
        let tokenizer_path = dir.join("tokenizer.json");
        let mut tokenizer = Tokenizer::from_file(&tokenizer_path)
            .map_err(|e| format!("{}: {e}", tokenizer_path.display()))?;
        // The shipped tokenizer pads every text to 128 and cuts there; sentence-transformers
        // pads to the longest text of a batch and cuts at 256.
        let mut padding = tokenizer.get_padding().cloned().unwrap_or_default();
        padding.strategy = PaddingStrategy::BatchLongest;
        if let Some(id) = tokenizer.token_to_id("[PAD]") {
            padding.pad_id = id;
            padding.pad_token = "[PAD]".into();
        }
        padding.pad_type_id = 0;
        tokenizer.with_padding(Some(padding));
        tokenizer
            .with_truncation(Some(TruncationParams {
                max_length: MAX_TOKENS.min(config.max_position_embeddings),
                ..TruncationParams::default()
            }))
            .map_err(|e| format!("tokenizer truncation: {e}"))?;
        let weights = read(dir, "model.safetensors")?;
        // The id names the model by content: other weights in the same place are another
        // embedder, whose vectors are never compared with these.
        let digest = {
            use sha2::{Digest, Sha256};
            let mut h = Sha256::new();
            h.update(read(dir, "config.json")?);
            h.update(&weights);
            hex::encode(&h.finalize()[..6])
        };
        let vb = VarBuilder::from_buffered_safetensors(weights, DType::F32, &device)
            .map_err(|e| format!("{}/model.safetensors: {e}", dir.display()))?;
        // sentence-transformers exports name tensors from the root; BertFor* checkpoints put
        // them under `bert.`.
        let vb = if vb.contains_tensor("embeddings.word_embeddings.weight") {
            vb
        } else if vb.contains_tensor("bert.embeddings.word_embeddings.weight") {
            vb.pp("bert")
        } else {
            return Err(format!(
                "{}/model.safetensors holds no BERT embeddings",
                dir.display()
            ));
        };
        let bert = BertModel::load(vb, &config).map_err(|e| format!("BERT weights: {e}"))?;
        let name = dir.file_name().map_or_else(
            || format!("model-{digest}"),
            |n| format!("{}-{digest}", n.to_string_lossy()),
        );
        Ok(Self {
            model: Arc::new(Model {
                bert,
                tokenizer,
                device,
            }),
            name,
        })
    }

    /// Embeds texts synchronously (CPU-bound: call it off the async runtime).
    ///
    /// # Errors
    /// Tokenizer or model failures.
    pub fn embed_blocking(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, EmbedError> {
        let mut out = Vec::with_capacity(texts.len());
        let canonical: Vec<String> = texts
            .iter()
            .map(|t| super::normalise::canonical(t))
            .collect();
        for chunk in canonical.chunks(BATCH) {
            out.extend(self.model.batch(chunk).map_err(EmbedError::Local)?);
        }
        Ok(out)
    }
}

impl Model {
    fn batch(&self, texts: &[String]) -> Result<Vec<Vec<f32>>, String> {
        if texts.is_empty() {
            return Ok(Vec::new());
        }
        let encodings = self
            .tokenizer
            .encode_batch(texts.to_vec(), true)
            .map_err(|e| format!("tokenizer: {e}"))?;
        let rows = encodings.len();
        let cols = encodings.first().map_or(0, |e| e.get_ids().len());
        let (mut ids, mut types, mut mask) = (
            Vec::with_capacity(rows * cols),
            Vec::with_capacity(rows * cols),
            Vec::with_capacity(rows * cols),
        );
        for e in &encodings {
            if e.get_ids().len() != cols {
                return Err("tokenizer did not pad the batch".into());
            }
            ids.extend_from_slice(e.get_ids());
            types.extend_from_slice(e.get_type_ids());
            mask.extend_from_slice(e.get_attention_mask());
        }
        let forward = || -> candle_core::Result<Vec<Vec<f32>>> {
            let ids = Tensor::from_vec(ids, (rows, cols), &self.device)?;
            let types = Tensor::from_vec(types, (rows, cols), &self.device)?;
            let mask = Tensor::from_vec(mask, (rows, cols), &self.device)?;
            let hidden = self.bert.forward(&ids, &types, Some(&mask))?;
            // Mean over real tokens, then unit length (the clamps sentence-transformers uses).
            let m = mask.to_dtype(DType::F32)?.unsqueeze(2)?;
            let sum = hidden.broadcast_mul(&m)?.sum(1)?;
            let count = m.sum(1)?.clamp(1e-9f32, f32::MAX)?;
            let mean = sum.broadcast_div(&count)?;
            let norm = mean
                .sqr()?
                .sum_keepdim(1)?
                .sqrt()?
                .clamp(1e-12f32, f32::MAX)?;
            mean.broadcast_div(&norm)?.to_vec2::<f32>()
        };
        forward().map_err(|e| format!("model: {e}"))
    }
}

impl Embedder for LocalEmbedder {
    fn id(&self) -> String {
        // "+c": texts in canonical form (vectors made from raw text are not comparable).
        format!("local:{}+c", self.name)
    }

    fn embed<'a>(
        &'a self,
        texts: &'a [String],
    ) -> BoxFuture<'a, Result<Vec<Vec<f32>>, EmbedError>> {
        let me = self.clone();
        let texts = texts.to_vec();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || me.embed_blocking(&texts))
                .await
                .map_err(|e| EmbedError::Local(e.to_string()))?
        })
    }
}

/// The model directory for tests: `PARLEY_MINILM_DIR`, or where `scripts/test.sh` unpacks it.
#[cfg(test)]
pub fn test_model_dir() -> std::path::PathBuf {
    std::env::var_os("PARLEY_MINILM_DIR").map_or_else(
        || {
            std::path::PathBuf::from(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/target/models/all-minilm-l6-v2"
            ))
        },
        std::path::PathBuf::from,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::embed::cosine;

    #[test]
    fn embeds_like_a_sentence_transformer() {
        let dir = test_model_dir();
        let model = LocalEmbedder::load(&dir).unwrap_or_else(|e| {
            panic!("the local-embed tests need the model (run scripts/test.sh, or set PARLEY_MINILM_DIR): {e}")
        });
        let texts: Vec<String> = [
            "What is the capital of France?",
            "Which city is France's capital?",
            "How do I bake sourdough bread?",
        ]
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
        let v = model.embed_blocking(&texts).expect("embed"); // ok: test
        assert_eq!(v.len(), 3);
        assert_eq!(v[0].len(), 384);
        let len: f32 = v[0].iter().map(|x| x * x).sum::<f32>().sqrt();
        assert!((len - 1.0).abs() < 1e-4, "{len}");
        let (same, other) = (cosine(&v[0], &v[1]), cosine(&v[0], &v[2]));
        assert!(same > 0.85, "paraphrase {same}");
        assert!(other < 0.3, "unrelated {other}");
        // Batched and alone agree (padding changes nothing).
        let alone = model.embed_blocking(&texts[..1]).expect("embed"); // ok: test
        assert!(cosine(&alone[0], &v[0]) > 0.9999);
        // A text past the token limit is cut, not refused.
        let long = vec!["word ".repeat(2000)];
        assert_eq!(model.embed_blocking(&long).expect("embed")[0].len(), 384); // ok: test
    }
}
