//! The evaluation set of semantic routing and what `parley route-eval` prints: the confusion
//! matrix of easy/hard against the tier chosen, the share sent to the cheap tier, and the
//! estimated cost against sending everything to the flagship. Also the fitting of the
//! classifier's weights on the training split (`--fit`), each training example scored without
//! itself among the examples.

use std::fmt::Write as _;

use serde::Deserialize;

use super::classifier::{
    embed_chunked, features, knn, probability, Features, Label, Neighbours, FEATURES,
};
use super::signals::Subject;
use crate::cache::embed::{EmbedError, Embedder};
use crate::domain::{Message, Role, Tool};
use crate::tokens::Encoding;

/// Which half of the set an item is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Split {
    Train,
    Test,
}

#[derive(Deserialize)]
struct RawMessage {
    role: Role,
    content: String,
}

#[derive(Deserialize)]
struct RawTool {
    name: String,
    #[serde(default)]
    description: Option<String>,
}

#[derive(Deserialize)]
struct RawItem {
    id: String,
    label: Label,
    split: Split,
    kind: String,
    messages: Vec<RawMessage>,
    #[serde(default)]
    tools: Vec<RawTool>,
}

/// One labelled request of the evaluation set.
#[derive(Debug, Clone)]
pub struct Item {
    pub id: String,
    pub label: Label,
    pub split: Split,
    /// `chat`, `writing`, `code`, `math`, `reasoning`, `tools`, `multi_turn`.
    pub kind: String,
    /// Oldest first; the last is the new user message.
    pub messages: Vec<Message>,
    pub tools: Vec<Tool>,
}

/// Parses the set (JSONL).
///
/// # Errors
/// The first bad line, by number.
pub fn parse(text: &str) -> Result<Vec<Item>, String> {
    text.lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
        .map(|(n, l)| {
            let raw: RawItem =
                serde_json::from_str(l).map_err(|e| format!("line {}: {e}", n + 1))?;
            Ok(Item {
                id: raw.id,
                label: raw.label,
                split: raw.split,
                kind: raw.kind,
                messages: raw
                    .messages
                    .into_iter()
                    .map(|m| Message::text(m.role, m.content))
                    .collect(),
                tools: raw
                    .tools
                    .into_iter()
                    .map(|t| Tool {
                        name: t.name,
                        description: t.description,
                        parameters: None,
                        strict: None,
                    })
                    .collect(),
            })
        })
        .collect()
}

/// The features of every item, compared with the training items as examples (a training item
/// without itself). `embedder: None` scores on signals alone.
///
/// # Errors
/// The embedder's.
pub async fn featurise(
    items: &[Item],
    embedder: Option<&dyn Embedder>,
) -> Result<Vec<Features>, EmbedError> {
    let subjects: Vec<Subject> = items
        .iter()
        .map(|i| Subject::of(&i.messages, i.tools.len()))
        .collect();
    let Some(embedder) = embedder else {
        return Ok(subjects.iter().map(|s| features(s, None, None)).collect());
    };
    let train: Vec<usize> = (0..items.len())
        .filter(|i| items[*i].split == Split::Train)
        .collect();
    let questions = embed_chunked(embedder, subjects.iter().map(|s| s.question.clone())).await?;
    let previous = embed_chunked(
        embedder,
        subjects
            .iter()
            .map(|s| s.previous.clone().unwrap_or_default()),
    )
    .await?;
    let vectors: Vec<Vec<f32>> = train.iter().map(|i| questions[*i].clone()).collect();
    let hard: Vec<bool> = train
        .iter()
        .map(|i| items[*i].label == Label::Hard)
        .collect();
    let n = [Neighbours {
        vectors: &vectors,
        hard: &hard,
    }];
    Ok(subjects
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let skip = train.iter().position(|t| *t == i);
            let q = knn(&questions[i], &n, skip);
            let p = s.previous.as_ref().map(|_| knn(&previous[i], &n, skip).0);
            features(s, Some(q), p)
        })
        .collect())
}

/// Fits logistic weights to `(features, hard)` by gradient descent with a little L2 penalty;
/// a hard example counts `hard_weight` times (sending a hard request to the cheap tier is the
/// costly error).
pub fn fit(data: &[(Features, bool)], hard_weight: f32) -> Features {
    let mut w = [0f32; FEATURES];
    let total: f32 = data
        .iter()
        .map(|(_, h)| if *h { hard_weight } else { 1.0 })
        .sum();
    if total == 0.0 {
        return w;
    }
    let (rate, l2) = (0.5f32, 1e-3f32);
    for _ in 0..20_000 {
        let mut grad = [0f32; FEATURES];
        for (f, hard) in data {
            let p = probability(&w, f);
            let (y, c) = if *hard {
                (1.0, hard_weight)
            } else {
                (0.0, 1.0)
            };
            for (g, x) in grad.iter_mut().zip(f) {
                *g += c * (p - y) * x;
            }
        }
        for (j, (wj, g)) in w.iter_mut().zip(grad).enumerate() {
            let penalty = if j == 0 { 0.0 } else { l2 * *wj };
            *wj -= rate * (g / total + penalty);
        }
    }
    w
}

/// Prices per million tokens of the reference tiers the cost estimate uses.
#[derive(Debug, Clone, Copy)]
pub struct TierPrices {
    pub fast: (&'static str, f64, f64),
    pub strong: (&'static str, f64, f64),
}

/// The reference price table (USD per million input / output tokens, list prices).
pub const REFERENCE_PRICES: TierPrices = TierPrices {
    fast: ("gpt-4o-mini", 0.15, 0.60),
    strong: ("gpt-4o", 2.50, 10.00),
};

/// Reply tokens assumed per request in the cost estimate: easy requests get short answers,
/// hard ones long.
pub const ASSUMED_REPLY_TOKENS: (u64, u64) = (150, 600);

/// What the classifier did on a set of items at one threshold.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Report {
    /// `[easy→fast, easy→strong, hard→fast, hard→strong]`.
    pub confusion: [usize; 4],
    /// Per kind: items, hard items sent to the cheap tier, easy items sent to the flagship.
    pub by_kind: Vec<(String, usize, usize, usize)>,
    pub cost_routed: f64,
    pub cost_all_strong: f64,
    /// Hard items sent to the cheap tier, by id.
    pub missed: Vec<String>,
}

impl Report {
    pub fn total(&self) -> usize {
        self.confusion.iter().sum()
    }

    /// Share of items sent to the cheap tier.
    pub fn cheap_share(&self) -> f64 {
        (self.confusion[0] + self.confusion[2]) as f64 / self.total().max(1) as f64
    }

    pub fn accuracy(&self) -> f64 {
        (self.confusion[0] + self.confusion[3]) as f64 / self.total().max(1) as f64
    }

    /// Hard items sent to the cheap tier, as a share of hard items.
    pub fn hard_missed_share(&self) -> f64 {
        self.confusion[2] as f64 / (self.confusion[2] + self.confusion[3]).max(1) as f64
    }
}

/// Scores the items with `weights` and sends those at or above `threshold` to the flagship.
pub fn report(items: &[&Item], feats: &[&Features], weights: &Features, threshold: f32) -> Report {
    let enc = Encoding::for_model(REFERENCE_PRICES.strong.0);
    let mut r = Report::default();
    let mut kinds: std::collections::BTreeMap<String, (usize, usize, usize)> = Default::default();
    let price = |p: (&str, f64, f64), prompt: u64, reply: u64| {
        (prompt as f64 * p.1 + reply as f64 * p.2) / 1e6
    };
    for (item, f) in items.iter().zip(feats) {
        let strong = probability(weights, f) >= threshold;
        let hard = item.label == Label::Hard;
        r.confusion[usize::from(hard) * 2 + usize::from(strong)] += 1;
        let k = kinds.entry(item.kind.clone()).or_default();
        k.0 += 1;
        if hard && !strong {
            k.1 += 1;
            r.missed.push(item.id.clone());
        }
        if !hard && strong {
            k.2 += 1;
        }
        let prompt = u64::from(crate::tokens::request_tokens(
            enc,
            &item.messages,
            &item.tools,
        ));
        let reply = if hard {
            ASSUMED_REPLY_TOKENS.1
        } else {
            ASSUMED_REPLY_TOKENS.0
        };
        let strong_cost = price(REFERENCE_PRICES.strong, prompt, reply);
        r.cost_all_strong += strong_cost;
        r.cost_routed += if strong {
            strong_cost
        } else {
            price(REFERENCE_PRICES.fast, prompt, reply)
        };
    }
    r.by_kind = kinds
        .into_iter()
        .map(|(k, (n, missed, over))| (k, n, missed, over))
        .collect();
    r
}

/// The report as the command prints it (Markdown tables).
pub fn render(title: &str, r: &Report) -> String {
    let mut s = String::new();
    let [ef, es, hf, hs] = r.confusion;
    let _ = writeln!(s, "### {title}: {} prompts\n", r.total());
    let _ = writeln!(s, "| label \\ tier | fast | strong |\n|---|---|---|");
    let _ = writeln!(s, "| easy | {ef} | {es} |\n| hard | {hf} | {hs} |\n");
    let _ = writeln!(
        s,
        "accuracy {:.3}; sent to the cheap tier {:.1} %; hard prompts sent to the cheap tier: {hf} of {} ({:.1} %)",
        r.accuracy(),
        100.0 * r.cheap_share(),
        hf + hs,
        100.0 * r.hard_missed_share(),
    );
    let _ = writeln!(
        s,
        "estimated cost {:.4} USD routed vs {:.4} USD all-flagship ({:.1} % of it; {} at {}/{} and {} at {}/{} USD per Mtok in/out, {} / {} reply tokens for easy / hard)\n",
        r.cost_routed,
        r.cost_all_strong,
        100.0 * r.cost_routed / r.cost_all_strong.max(f64::MIN_POSITIVE),
        REFERENCE_PRICES.fast.0,
        REFERENCE_PRICES.fast.1,
        REFERENCE_PRICES.fast.2,
        REFERENCE_PRICES.strong.0,
        REFERENCE_PRICES.strong.1,
        REFERENCE_PRICES.strong.2,
        ASSUMED_REPLY_TOKENS.0,
        ASSUMED_REPLY_TOKENS.1,
    );
    let _ = writeln!(
        s,
        "| kind | prompts | hard → fast | easy → strong |\n|---|---|---|---|"
    );
    for (k, n, missed, over) in &r.by_kind {
        let _ = writeln!(s, "| {k} | {n} | {missed} | {over} |");
    }
    if !r.missed.is_empty() {
        let _ = writeln!(s, "\nhard → fast: {}", r.missed.join(", "));
    }
    s
}

/// How many times a hard example counts when fitting.
pub const HARD_WEIGHT: f32 = 2.0;

/// `parley route-eval`: the report (and with `--fit` the fitted weights) as Markdown.
///
/// # Errors
/// A set that cannot be read or parsed, an unknown split, an embedder that cannot be built or
/// fails.
pub async fn command(args: &crate::cli::RouteEvalArgs) -> Result<String, String> {
    let text = match &args.set {
        Some(path) => {
            std::fs::read_to_string(path).map_err(|e| format!("--set {}: {e}", path.display()))?
        }
        None => super::EVAL_SET.to_owned(),
    };
    let items = parse(&text)?;
    let split = match args.split.as_str() {
        "test" => Some(Split::Test),
        "train" => Some(Split::Train),
        "all" => None,
        other => return Err(format!("--split: {other:?} is not test, train or all")),
    };
    let embedder = if args.signals_only {
        None
    } else {
        let spec = crate::config::CacheConfig {
            embedder: args.embedder.clone(),
            ..crate::config::CacheConfig::default()
        }
        .embedder_spec()
        .map_err(|e| e.replace("cache.embedder", "--embedder"))?;
        Some(
            crate::cache::build_embedder(&spec, &crate::provider::Router::default())
                .map_err(|e| e.replace("cache.embedder", "--embedder"))?,
        )
    };
    let feats = featurise(&items, embedder.as_deref())
        .await
        .map_err(|e| e.to_string())?;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "# semantic routing: {} ({}), threshold {}\n",
        embedder.as_ref().map_or("signals only".into(), |e| e.id()),
        match split {
            Some(Split::Test) => "held-out test split",
            Some(Split::Train) => "training split, each prompt without itself among the examples",
            None => "whole set",
        },
        args.threshold,
    );
    let mut weights = super::classifier::WEIGHTS;
    if args.fit {
        let train: Vec<(Features, bool)> = items
            .iter()
            .zip(&feats)
            .filter(|(i, _)| i.split == Split::Train)
            .map(|(i, f)| (*f, i.label == Label::Hard))
            .collect();
        weights = fit(&train, HARD_WEIGHT);
        let _ = writeln!(
            out,
            "fitted on {} training prompts (hard counted {HARD_WEIGHT}x):\n",
            train.len()
        );
        let _ = writeln!(out, "```rust\npub const WEIGHTS: [f32; FEATURES] = [");
        for (name, w) in super::classifier::FEATURE_NAMES.iter().zip(weights) {
            let _ = writeln!(out, "    {w:.3}, // {name}");
        }
        let _ = writeln!(out, "];\n```\n");
        let _ = writeln!(
            out,
            "| threshold | train: cheap share | train: hard → fast |\n|---|---|---|"
        );
        let (ti, tf): (Vec<&Item>, Vec<&Features>) = items
            .iter()
            .zip(&feats)
            .filter(|(i, _)| i.split == Split::Train)
            .unzip();
        for step in 6..=14 {
            let t = step as f32 * 0.05;
            let r = report(&ti, &tf, &weights, t);
            let _ = writeln!(
                out,
                "| {t:.2} | {:.1} % | {} of {} |",
                100.0 * r.cheap_share(),
                r.confusion[2],
                r.confusion[2] + r.confusion[3]
            );
        }
        out.push('\n');
    }
    let (chosen, chosen_feats): (Vec<&Item>, Vec<&Features>) = items
        .iter()
        .zip(&feats)
        .filter(|(i, _)| split.is_none_or(|s| i.split == s))
        .unzip();
    let r = report(&chosen, &chosen_feats, &weights, args.threshold);
    out.push_str(&render(&args.split, &r));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fitting_separates_a_separable_set() {
        let mut data = Vec::new();
        for i in 0..20 {
            let mut f = [0f32; FEATURES];
            f[0] = 1.0;
            f[3] = i as f32 / 20.0;
            data.push((f, i >= 10));
        }
        let w = fit(&data, 1.0);
        for (f, hard) in &data {
            assert_eq!(probability(&w, f) >= 0.5, *hard, "{f:?}");
        }
    }

    #[test]
    fn the_set_parses_and_has_both_splits_and_labels_of_every_kind() {
        let items = parse(super::super::EVAL_SET).unwrap(); // ok: test
        for kind in [
            "chat",
            "writing",
            "code",
            "math",
            "reasoning",
            "tools",
            "multi_turn",
        ] {
            for split in [Split::Train, Split::Test] {
                for label in [Label::Easy, Label::Hard] {
                    assert!(
                        items
                            .iter()
                            .any(|i| i.kind == kind && i.split == split && i.label == label),
                        "{kind} {split:?} {label:?}"
                    );
                }
            }
        }
        assert!(items
            .iter()
            .all(|i| i.messages.last().is_some_and(|m| m.role == Role::User)));
        assert!(parse("{\"id\": 1}").unwrap_err().starts_with("line 1:")); // ok: test
    }
}
