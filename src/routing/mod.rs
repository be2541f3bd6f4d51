//! Semantic routing (PROTOCOL §10): a route with `strategy = "semantic"` has tiers, cheapest
//! first, and sends each request to the tier its difficulty calls for. The [`Classifier`]
//! scores a request (the probability that it is hard); the route's thresholds turn the score
//! into a tier; a tier the client forces wins, and a conversation that the classifier escalated
//! stays at least that high for the route's `sticky_turns` turns.
//!
//! The examples shipped with the binary are the training split of the project's evaluation
//! set (`data/routing/eval.jsonl`); a route adds its own from its config or a JSONL file.

pub mod classifier;
pub mod eval;
pub mod signals;

use std::collections::HashMap;
use std::sync::{Arc, LazyLock};

pub use classifier::{Classifier, Example, ExampleSet, Label, Scored};
pub use signals::Subject;

use crate::cache::embed::Embedder;
use crate::config::{RouteConfig, Strategy};
use crate::domain::TierReason;
use crate::provider::ChatRequest;

/// The project's labelled evaluation set, one JSON object per line.
pub const EVAL_SET: &str = include_str!("../../data/routing/eval.jsonl");

/// The examples every semantic route starts from: the evaluation set's training split, each
/// by its newest user message.
pub fn default_examples() -> Vec<Example> {
    eval::parse(EVAL_SET)
        .unwrap_or_default()
        .into_iter()
        .filter(|i| i.split == eval::Split::Train)
        .map(|i| Example {
            text: Subject::of(&i.messages, i.tools.len()).question,
            label: i.label,
        })
        .collect()
}

static DEFAULTS: LazyLock<Vec<Example>> = LazyLock::new(default_examples);

/// A semantic route's tiers and how it chooses among them.
#[derive(Debug, Clone, PartialEq)]
pub struct Tiers {
    /// Cheapest first.
    pub names: Vec<String>,
    /// Ascending: a score at or above `thresholds[i]` goes to tier `i + 1` or higher.
    pub thresholds: Vec<f32>,
    /// Turns an escalation holds for, after the turn that escalated.
    pub sticky_turns: u32,
}

/// The threshold of a two-tier route that sets none (fitted with the weights).
pub const DEFAULT_THRESHOLD: f32 = 0.5;

impl Tiers {
    /// The tiers of a semantic route (`None` for any other).
    pub fn of(route: &RouteConfig) -> Option<Self> {
        if route.strategy != Strategy::Semantic {
            return None;
        }
        let thresholds = match (&route.thresholds, route.threshold) {
            (Some(t), _) => t.clone(),
            (None, t) => vec![t.unwrap_or(DEFAULT_THRESHOLD)],
        };
        Some(Self {
            names: route.tiers.iter().map(|t| t.name.clone()).collect(),
            thresholds,
            sticky_turns: route.sticky_turns,
        })
    }

    pub fn index(&self, name: &str) -> Option<usize> {
        self.names.iter().position(|n| n == name)
    }

    /// The tier a score calls for.
    pub fn for_score(&self, score: f32) -> usize {
        self.thresholds
            .iter()
            .filter(|t| score >= **t)
            .count()
            .min(self.names.len().saturating_sub(1))
    }
}

/// What a face knows about the tier of a request before it is classified.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TierAsk {
    /// The tier the client forced, by index.
    pub forced: Option<usize>,
    /// The least tier: a recent escalation of the conversation that still holds.
    pub floor: usize,
}

/// Where a request of a semantic route went, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct TierDecision {
    pub index: usize,
    pub name: String,
    pub reason: TierReason,
    /// The classifier's score (`None` when the client forced the tier).
    pub score: Option<f32>,
    /// The tier chosen had no target in the request's regions; this is the nearest that has.
    /// The reason stays the classifier's or stickiness's, so a conversation's escalation holds.
    pub moved_for_region: bool,
}

impl TierDecision {
    /// The decision's label in metrics: its reason, or `region` when it was moved.
    pub fn label(&self) -> &'static str {
        if self.moved_for_region {
            "region"
        } else {
            self.reason.as_str()
        }
    }
}

/// The classifiers of the semantic routes.
#[derive(Clone, Default)]
pub struct Routing {
    classifiers: HashMap<String, Arc<Classifier>>,
}

impl Routing {
    /// A classifier per semantic route, over the shipped examples and the route's own.
    ///
    /// # Errors
    /// A route's `examples_file` that cannot be read or holds a bad line, named by its field.
    pub fn build(routes: &[RouteConfig], embedder: &Arc<dyn Embedder>) -> Result<Self, String> {
        let defaults = Arc::new(ExampleSet::new(DEFAULTS.clone()));
        let mut classifiers = HashMap::new();
        for (i, r) in routes.iter().enumerate() {
            if r.strategy != Strategy::Semantic {
                continue;
            }
            let mut own = r.examples.clone();
            if let Some(path) = &r.examples_file {
                own.extend(
                    read_examples(path).map_err(|e| {
                        format!("routes[{i}].examples_file: {}: {e}", path.display())
                    })?,
                );
            }
            let mut sets = Vec::new();
            if r.default_examples {
                sets.push(Arc::clone(&defaults));
            }
            if !own.is_empty() {
                sets.push(Arc::new(ExampleSet::new(own)));
            }
            let classifier = Classifier::new(Arc::clone(embedder), sets);
            classifier.warm_now();
            classifiers.insert(r.model.clone(), Arc::new(classifier));
        }
        Ok(Self { classifiers })
    }

    /// Embeds every route's examples (at start, off the request path).
    pub async fn warm(&self) {
        for c in self.classifiers.values() {
            c.warm().await;
        }
    }

    /// Decides the tier of `chat` on a route with `tiers`. `embed`: whether the request's text
    /// may go to the embedder (it is in the request's regions). Answers the decision, and the
    /// embedding of the newest user message when the classifier made one.
    pub async fn decide(
        &self,
        route: &str,
        tiers: &Tiers,
        chat: &ChatRequest,
        ask: TierAsk,
        embed: bool,
        allowed: &[bool],
    ) -> (TierDecision, Option<Vec<f32>>) {
        let decision = |index: usize, reason, score| TierDecision {
            index,
            name: tiers.names.get(index).cloned().unwrap_or_default(),
            reason,
            score,
            moved_for_region: false,
        };
        if let Some(forced) = ask.forced {
            return (decision(forced, TierReason::Forced, None), None);
        }
        let Scored { score, question } = match self.classifiers.get(route) {
            Some(c) => {
                c.score(&Subject::of(&chat.messages, chat.tools.len()), embed)
                    .await
            }
            None => Scored {
                score: 0.0,
                question: None,
            },
        };
        let classified = tiers.for_score(score);
        let floor = ask.floor.min(tiers.names.len().saturating_sub(1));
        let decided = if floor > classified {
            decision(floor, TierReason::Sticky, Some(score))
        } else {
            decision(classified, TierReason::Classified, Some(score))
        };
        match nearest_allowed(decided.index, allowed) {
            Some(i) if i != decided.index => {
                let mut moved = decision(i, decided.reason, Some(score));
                moved.moved_for_region = true;
                (moved, question)
            }
            _ => (decided, question),
        }
    }
}

/// The tier nearest `chosen` that the request's regions allow, a stronger one before a weaker
/// one (`None` when none is; admission refused such a request already). Every tier is allowed
/// when `allowed` says nothing of it.
fn nearest_allowed(chosen: usize, allowed: &[bool]) -> Option<usize> {
    let ok = |i: usize| allowed.get(i).copied().unwrap_or(true);
    if ok(chosen) {
        return Some(chosen);
    }
    (chosen + 1..allowed.len())
        .find(|&i| ok(i))
        .or_else(|| (0..chosen).rev().find(|&i| ok(i)))
}

/// Reads a JSONL file of `{"text": "...", "label": "easy" | "hard"}` examples.
fn read_examples(path: &std::path::Path) -> Result<Vec<Example>, String> {
    let text = std::fs::read_to_string(path).map_err(|e| e.to_string())?;
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(n, l)| {
            serde_json::from_str::<Example>(l).map_err(|e| format!("line {}: {e}", n + 1))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_tier_outside_the_regions_gives_way_to_the_nearest_stronger_then_weaker() {
        assert_eq!(nearest_allowed(0, &[true, true]), Some(0));
        assert_eq!(nearest_allowed(0, &[false, true]), Some(1));
        assert_eq!(nearest_allowed(1, &[true, false]), Some(0));
        assert_eq!(nearest_allowed(1, &[true, false, true]), Some(2));
        assert_eq!(nearest_allowed(2, &[false, true, false]), Some(1));
        assert_eq!(nearest_allowed(1, &[false, false]), None);
        assert_eq!(nearest_allowed(1, &[]), Some(1));
    }

    #[test]
    fn the_shipped_examples_are_the_training_split() {
        let items = eval::parse(EVAL_SET).unwrap(); // ok: test
        assert!(items.len() >= 300, "{}", items.len());
        let train = items
            .iter()
            .filter(|i| i.split == eval::Split::Train)
            .count();
        assert_eq!(default_examples().len(), train);
        assert!(default_examples().iter().any(|e| e.label == Label::Hard));
        assert!(default_examples().iter().any(|e| e.label == Label::Easy));
    }

    #[test]
    fn scores_map_to_tiers_by_threshold() {
        let tiers = Tiers {
            names: vec!["fast".into(), "mid".into(), "strong".into()],
            thresholds: vec![0.4, 0.7],
            sticky_turns: 2,
        };
        assert_eq!(tiers.for_score(0.1), 0);
        assert_eq!(tiers.for_score(0.4), 1);
        assert_eq!(tiers.for_score(0.69), 1);
        assert_eq!(tiers.for_score(0.99), 2);
        assert_eq!(tiers.index("strong"), Some(2));
        assert_eq!(tiers.index("huge"), None);
    }

    #[test]
    fn examples_files_are_read_and_bad_lines_named() {
        let dir = tempfile::tempdir().unwrap(); // ok: test
        let path = dir.path().join("ex.jsonl");
        std::fs::write(
            &path,
            "{\"text\": \"hi\", \"label\": \"easy\"}\n\n{\"text\": \"prove it\", \"label\": \"hard\"}\n",
        )
        .unwrap(); // ok: test
        assert_eq!(read_examples(&path).unwrap().len(), 2); // ok: test
        std::fs::write(&path, "{\"text\": \"hi\", \"label\": \"medium\"}\n").unwrap(); // ok: test
        let err = read_examples(&path).unwrap_err(); // ok: test
        assert!(err.starts_with("line 1:"), "{err}");
    }
}
