//! Precision and recall of each embedder (with and without the false-hit guards) on the
//! paraphrase set shipped in `data/paraphrases.tsv`. Run with `--nocapture` to see the tables
//! (`cargo test --release --all-features --lib paraphrases -- --nocapture`).

use std::collections::HashMap;

use super::embed::{cosine, Builtin};
use super::guards;

fn pairs() -> Vec<(String, String, bool)> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/data/paraphrases.tsv");
    let text = std::fs::read_to_string(path).expect("data/paraphrases.tsv is shipped"); // ok: test-only module, the file ships with the repo
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let f: Vec<&str> = l.split('\t').collect();
            (f[0].to_owned(), f[1].to_owned(), f[2].trim() == "1")
        })
        .collect()
}

fn score(pairs: &[(String, String, bool)], hit: impl Fn(&str, &str) -> bool) -> (f64, f64) {
    let (mut tp, mut fp, mut fn_) = (0.0, 0.0, 0.0);
    for (a, b, same) in pairs {
        match (hit(a, b), same) {
            (true, true) => tp += 1.0,
            (true, false) => fp += 1.0,
            (false, true) => fn_ += 1.0,
            (false, false) => {}
        }
    }
    let precision = if tp + fp > 0.0 { tp / (tp + fp) } else { 1.0 };
    (precision, tp / (tp + fn_))
}

const THRESHOLDS: [f32; 7] = [0.5, 0.6, 0.7, 0.8, 0.85, 0.9, 0.92];

/// Prints the table of one embedder; answers (precision, recall) with guards per threshold.
fn table(
    name: &str,
    pairs: &[(String, String, bool)],
    sim: impl Fn(&str, &str) -> f32,
) -> Vec<(f32, (f64, f64))> {
    eprintln!("{name} ({} pairs)", pairs.len());
    eprintln!("| min_similarity | similarity only: precision / recall | with guards: precision / recall |");
    eprintln!("|---|---|---|");
    let mut out = Vec::new();
    for t in THRESHOLDS {
        let plain = score(pairs, |a, b| sim(a, b) >= t);
        let guarded = score(pairs, |a, b| sim(a, b) >= t && guards::check(a, b).is_ok());
        eprintln!(
            "| {t:.2} | {:.2} / {:.2} | {:.2} / {:.2} |",
            plain.0, plain.1, guarded.0, guarded.1
        );
        out.push((t, guarded));
    }
    for (a, b, same) in pairs {
        if !same && sim(a, b) >= 0.92 {
            let guarded = guards::check(a, b)
                .err()
                .map_or("none", guards::Guard::as_str);
            eprintln!("similar at 0.92 but different: {a} | {b} (stopped by: {guarded})");
        }
    }
    out
}

fn at(rows: &[(f32, (f64, f64))], t: f32) -> (f64, f64) {
    rows.iter()
        .find(|(x, _)| (x - t).abs() < 1e-6)
        .map_or((0.0, 0.0), |(_, pr)| *pr)
}

#[test]
fn precision_and_recall_of_the_builtin_embedder() {
    let pairs = pairs();
    assert!(pairs.len() >= 100);
    let rows = table("builtin", &pairs, |a, b| {
        cosine(&Builtin::vector(a), &Builtin::vector(b))
    });
    // With the guards, the set's negatives (entity, number, negation, order, question-word,
    // quote, date and added-word changes) never hit, at the default threshold or far below.
    for t in [0.5, 0.7, 0.92] {
        assert!(
            at(&rows, t).0 >= 0.99,
            "precision at {t}: {:?}",
            at(&rows, t)
        );
    }
    assert!(at(&rows, 0.92).1 >= 0.6, "recall at 0.92");
    assert!(super::is_hit(&pairs[0].0, &pairs[0].1, 0.92));
}

#[cfg(feature = "local-embed")]
#[test]
fn precision_and_recall_of_the_local_embedder() {
    use super::local_embed::{test_model_dir, LocalEmbedder};
    let pairs = pairs();
    let model = LocalEmbedder::load(&test_model_dir()).unwrap_or_else(|e| {
        panic!("the local-embed tests need the model (run scripts/test.sh, or set PARLEY_MINILM_DIR): {e}")
    });
    let mut texts: Vec<String> = pairs
        .iter()
        .flat_map(|(a, b, _)| [a.clone(), b.clone()])
        .collect();
    texts.sort();
    texts.dedup();
    let vectors = model.embed_blocking(&texts).expect("embed"); // ok: test
    let by_text: HashMap<&str, &Vec<f32>> = texts
        .iter()
        .map(String::as_str)
        .zip(vectors.iter())
        .collect();
    let rows = table("local: all-MiniLM-L6-v2", &pairs, |a, b| {
        cosine(by_text[a], by_text[b])
    });
    assert!(
        at(&rows, 0.7).0 >= 0.99,
        "precision at 0.7: {:?}",
        at(&rows, 0.7)
    );
    assert!(
        at(&rows, 0.7).1 >= 0.6,
        "recall at 0.7: {:?}",
        at(&rows, 0.7)
    );
}
