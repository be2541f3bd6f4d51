//! The difficulty classifier: a logistic model over the request's [signals](super::signals) and
//! its similarity, by the cache's embedder, to labelled example prompts (the nearest examples'
//! vote, and how much nearer the nearest hard one is than the nearest easy one). The weights
//! were fitted on the training half of the project's evaluation set (`parley route-eval
//! --fit`); the score is the probability that the request is hard.

use std::sync::Arc;
use std::time::Duration;

use serde::Deserialize;

use super::signals::{log_share, Subject, TextSignals};
use crate::cache::embed::{EmbedError, Embedder};

/// Examples consulted per request.
const NEIGHBOURS: usize = 7;

/// How long a request waits for its embedding before it is scored on signals alone.
const EMBED_TIMEOUT: Duration = Duration::from_secs(2);

/// Number of features, the bias included.
pub const FEATURES: usize = 15;

/// Names of the features, in order (for the fitting report).
pub const FEATURE_NAMES: [&str; FEATURES] = [
    "bias",
    "knn_vote",
    "knn_margin",
    "length",
    "code",
    "math",
    "steps",
    "analysis",
    "simple",
    "tools",
    "tool_results",
    "earlier_turns",
    "previous_vote",
    "context_code_math",
    "previous_signals",
];

/// The fitted weights (`parley route-eval --fit`, builtin embedder, training split).
pub const WEIGHTS: [f32; FEATURES] = [
    -3.196, 3.379, 0.832, 6.609, -0.522, 2.781, 3.048, 4.039, -2.966, 0.250, 0.000, 1.474, 0.835,
    1.397, 0.513,
];

/// Easy or hard: what an example prompt is labelled.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Label {
    Easy,
    Hard,
}

/// One labelled example prompt.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Example {
    pub text: String,
    pub label: Label,
}

/// Examples and, once computed, their embeddings.
pub struct ExampleSet {
    examples: Vec<Example>,
    hard: Vec<bool>,
    vectors: tokio::sync::OnceCell<Vec<Vec<f32>>>,
}

impl ExampleSet {
    pub fn new(examples: Vec<Example>) -> Self {
        Self {
            hard: examples.iter().map(|e| e.label == Label::Hard).collect(),
            examples,
            vectors: tokio::sync::OnceCell::new(),
        }
    }

    /// Embeds the examples, once.
    ///
    /// # Errors
    /// The embedder's; the next call tries again.
    async fn embed(&self, embedder: &dyn Embedder) -> Result<(), EmbedError> {
        self.vectors
            .get_or_try_init(|| {
                embed_chunked(embedder, self.examples.iter().map(|e| e.text.clone()))
            })
            .await
            .map(|_| ())
    }

    /// The examples as neighbours, once embedded.
    fn neighbours(&self) -> Option<Neighbours<'_>> {
        Some(Neighbours {
            vectors: self.vectors.get()?,
            hard: &self.hard,
        })
    }
}

/// Embeds many texts in chunks of 64, so a provider embedder gets requests of a sensible size.
///
/// # Errors
/// The embedder's.
pub async fn embed_chunked(
    embedder: &dyn Embedder,
    texts: impl Iterator<Item = String>,
) -> Result<Vec<Vec<f32>>, EmbedError> {
    let texts: Vec<String> = texts.collect();
    let mut out = Vec::with_capacity(texts.len());
    for chunk in texts.chunks(64) {
        out.extend(embedder.embed(chunk).await?);
    }
    Ok(out)
}

/// The labelled vectors one request is compared with.
pub struct Neighbours<'a> {
    pub vectors: &'a [Vec<f32>],
    pub hard: &'a [bool],
}

/// What the nearest examples of `sets` say about a vector: their vote for "hard" (`-0.5..0.5`,
/// weighted by similarity) and how much nearer the nearest hard example is than the nearest
/// easy one. `skip` leaves out one example, by its index across the sets (fitting scores each
/// training example without itself).
pub fn knn(q: &[f32], sets: &[Neighbours<'_>], skip: Option<usize>) -> (f32, f32) {
    let mut top: Vec<(f32, bool)> = Vec::with_capacity(NEIGHBOURS + 1);
    let (mut best_hard, mut best_easy) = (0f32, 0f32);
    let all = sets.iter().flat_map(|n| n.vectors.iter().zip(n.hard));
    for (i, (v, hard)) in all.enumerate() {
        if Some(i) == skip || v.len() != q.len() {
            continue;
        }
        let sim = crate::cache::embed::cosine(v, q);
        if *hard {
            best_hard = best_hard.max(sim);
        } else {
            best_easy = best_easy.max(sim);
        }
        if top.len() < NEIGHBOURS || top.last().is_some_and(|(s, _)| sim > *s) {
            let at = top.partition_point(|(s, _)| *s >= sim);
            top.insert(at, (sim, *hard));
            top.truncate(NEIGHBOURS);
        }
    }
    let (mut votes, mut weight) = (0f32, 0f32);
    for (sim, hard) in top {
        let w = sim.max(0.0).powi(2);
        weight += w;
        if hard {
            votes += w;
        }
    }
    let vote = if weight > 0.0 {
        votes / weight - 0.5
    } else {
        0.0
    };
    (vote, best_hard - best_easy)
}

/// A request's features: what the classifier weighs.
pub type Features = [f32; FEATURES];

/// The features of `subject`, given what its question's and previous message's nearest
/// examples say (`None`: no embeddings, the similarity features are neutral).
pub fn features(
    subject: &Subject,
    question: Option<(f32, f32)>,
    previous: Option<f32>,
) -> Features {
    let q = TextSignals::of(&subject.question);
    let (vote, margin) = question.unwrap_or((0.0, 0.0));
    let ctx = TextSignals::of(&subject.context);
    let prev = subject
        .previous
        .as_deref()
        .map(TextSignals::of)
        .unwrap_or_default();
    [
        1.0,
        vote,
        margin,
        q.length,
        q.code,
        q.math,
        q.steps,
        q.analysis,
        q.simple,
        log_share(subject.tools, 8),
        f32::from(u8::from(subject.tool_results > 0)),
        log_share(subject.earlier, 12),
        previous.unwrap_or(0.0),
        ctx.code.max(ctx.math),
        (prev.length + prev.steps + prev.analysis) / 3.0,
    ]
}

/// The probability, under `weights`, that a request with these features is hard.
pub fn probability(weights: &Features, f: &Features) -> f32 {
    let z: f32 = weights.iter().zip(f).map(|(w, x)| w * x).sum();
    1.0 / (1.0 + (-z).exp())
}

/// A request's difficulty score, and its question's embedding when it was made (the cache's
/// lookup of the same question uses it rather than embedding it again).
#[derive(Debug, Clone, PartialEq)]
pub struct Scored {
    /// The probability that the request is hard.
    pub score: f32,
    pub question: Option<Vec<f32>>,
}

/// Scores requests against a route's examples.
pub struct Classifier {
    embedder: Arc<dyn Embedder>,
    sets: Vec<Arc<ExampleSet>>,
    weights: Features,
}

impl Classifier {
    pub fn new(embedder: Arc<dyn Embedder>, sets: Vec<Arc<ExampleSet>>) -> Self {
        Self {
            embedder,
            sets,
            weights: WEIGHTS,
        }
    }

    /// Embeds the examples at once when the embedder answers without waiting (the builtin
    /// one), so a server's first requests already compare with them.
    pub fn warm_now(&self) {
        use futures_util::FutureExt as _;
        for set in &self.sets {
            let _ = set.embed(self.embedder.as_ref()).now_or_never();
        }
    }

    /// Embeds the examples, off the request path: at start, and again with growing pauses
    /// while the embedder fails (a provider that is down). Until then requests are scored on
    /// the signals alone.
    pub async fn warm(&self) {
        let mut pause = Duration::from_secs(1);
        for set in &self.sets {
            while let Err(e) = set.embed(self.embedder.as_ref()).await {
                tracing::warn!(error = %e, retry_in_s = pause.as_secs(), "routing examples could not be embedded; scoring on signals alone meanwhile");
                tokio::time::sleep(pause).await;
                pause = (pause * 2).min(Duration::from_secs(300));
            }
        }
    }

    /// Scores `subject`. `embed`: whether its texts may be embedded (the embedder is in the
    /// request's regions); without embeddings (or when they fail or take too long) the score
    /// rests on the signals alone.
    pub async fn score(&self, subject: &Subject, embed: bool) -> Scored {
        let knn = if embed {
            tokio::time::timeout(EMBED_TIMEOUT, self.similarity(subject))
                .await
                .unwrap_or_else(|_| {
                    tracing::warn!("routing embedding timed out; scoring on signals alone");
                    None
                })
        } else {
            None
        };
        let (question, previous, vector) = match knn {
            Some((q, p, v)) => (Some(q), p, Some(v)),
            None => (None, None, None),
        };
        Scored {
            score: probability(&self.weights, &features(subject, question, previous)),
            question: vector,
        }
    }

    /// The nearest examples' verdicts on the question and on the previous user message, and
    /// the question's embedding; `None` until the examples are embedded, or when embedding the
    /// request fails.
    async fn similarity(&self, subject: &Subject) -> Option<((f32, f32), Option<f32>, Vec<f32>)> {
        let sets: Vec<Neighbours<'_>> = self
            .sets
            .iter()
            .map(|s| s.neighbours())
            .collect::<Option<_>>()?;
        let mut texts = vec![subject.question.clone()];
        texts.extend(subject.previous.clone());
        let mut embedded = match self.embedder.embed(&texts).await {
            Ok(v) => v,
            Err(e) => {
                tracing::warn!(error = %e, "routing embedding failed; scoring on signals alone");
                return None;
            }
        };
        let previous = embedded.get(1).map(|v| knn(v, &sets, None).0);
        embedded.truncate(1);
        let vector = embedded.pop()?;
        let question = knn(&vector, &sets, None);
        Some((question, previous, vector))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn knn_votes_by_similarity_and_can_leave_one_out() {
        let vectors = vec![vec![1.0, 0.0], vec![0.0, 1.0], vec![0.8, 0.6]];
        let hard = vec![true, false, true];
        let n = [Neighbours {
            vectors: &vectors,
            hard: &hard,
        }];
        let (vote, margin) = knn(&[1.0, 0.0], &n, None);
        assert!(
            (vote - 0.5).abs() < 1e-6,
            "only hard examples are similar: {vote}"
        );
        assert!((margin - 1.0).abs() < 1e-6);
        let (vote, margin) = knn(&[0.0, 1.0], &n, Some(1));
        assert!(
            vote > 0.0 && margin > 0.0,
            "without the easy example: {vote} {margin}"
        );
        // A vector of another size (another embedder) counts for nothing.
        assert_eq!(knn(&[1.0, 0.0, 0.0], &n, None), (0.0, 0.0));
    }

    #[test]
    fn probability_is_a_logistic_of_the_weighted_features() {
        let mut w = [0.0; FEATURES];
        let f = [1.0; FEATURES];
        assert_eq!(probability(&w, &f), 0.5);
        w[0] = 10.0;
        assert!(probability(&w, &f) > 0.99);
    }
}
