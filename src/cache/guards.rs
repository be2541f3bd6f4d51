//! False-hit guards: two questions similar enough by embedding must also agree on what makes
//! them different questions. Each guard compares one kind of token as a set:
//!
//! - `numbers`: digits runs, with decimals ("2 + 2" is not "2 + 3");
//! - `dates`: ISO dates and day-month-name forms (`2024-01-15`, `15 March`);
//! - `quoted`: text in single, double or typographic quotes;
//! - `entities`: capitalised words that do not start a sentence ("France" vs "Germany"), and
//!   code identifiers (`snake_case`, `camelCase`, `dotted.names`, `call()`);
//! - `negation`: a negation word in one question and not in the other ("is X safe" vs
//!   "is X not safe");
//! - `operators`: the arithmetic operators next to the numbers ("2 + 2" vs "2 * 2");
//! - `words`: a content word swapped for another ("sort" vs "reverse", "water" vs "ethanol"):
//!   words only one side has, on both sides, that are not spelling variants of each other.
//!   Adding words is allowed ("the capital" vs "which city is the capital").
//!
//! A hit needs every guard to pass.

use std::collections::BTreeSet;
use std::sync::LazyLock;

use regex::Regex;

/// The guard that rejected a near hit (named in metrics).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Guard {
    Numbers,
    Dates,
    Quoted,
    Entities,
    Negation,
    Operators,
    Words,
}

impl Guard {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Numbers => "numbers",
            Self::Dates => "dates",
            Self::Quoted => "quoted",
            Self::Entities => "entities",
            Self::Negation => "negation",
            Self::Operators => "operators",
            Self::Words => "words",
        }
    }
}

#[allow(clippy::expect_used)] // ok: constant patterns, proven by the unit tests
static PATTERNS: LazyLock<[Regex; 4]> = LazyLock::new(|| {
    let r = |p: &str| Regex::new(p).expect("valid pattern"); // ok: constant patterns
    [
        r(r"[0-9]+(?:[.,][0-9]+)?"),
        r(
            r"(?i)\b[0-9]{4}-[0-9]{2}-[0-9]{2}\b|\b[0-9]{1,2}(?:st|nd|rd|th)? (?:jan|feb|mar|apr|may|jun|jul|aug|sep|oct|nov|dec)[a-z]*\b|\b(?:jan|feb|mar|apr|may|jun|jul|aug|sep|oct|nov|dec)[a-z]* [0-9]{1,2}\b",
        ),
        r(r#""[^"]+"|'[^']+'|“[^”]+”|‘[^’]+’"#),
        r(
            r"\b[a-z]+(?:_[a-z0-9]+)+\b|\b[a-z]+[A-Z][A-Za-z0-9]*\b|\b[A-Za-z_]+\.[A-Za-z_.]+\b|\b[A-Za-z_][A-Za-z0-9_]*\(\)",
        ),
    ]
});

const NEGATIONS: &[&str] = &[
    "not",
    "no",
    "never",
    "none",
    "nobody",
    "nothing",
    "neither",
    "nor",
    "without",
    "isn't",
    "aren't",
    "don't",
    "doesn't",
    "didn't",
    "can't",
    "cannot",
    "won't",
    "shouldn't",
    "wouldn't",
    "isnt",
    "dont",
    "doesnt",
    "cant",
];

fn set(re: &Regex, text: &str) -> BTreeSet<String> {
    re.find_iter(text)
        .map(|m| m.as_str().to_lowercase())
        .collect()
}

/// Capitalised words that do not start a sentence.
fn proper_nouns(text: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut sentence_start = true;
    for raw in text.split_whitespace() {
        let word = raw.trim_matches(|c: char| !c.is_alphanumeric());
        if !sentence_start && word.chars().next().is_some_and(char::is_uppercase) {
            out.insert(word.to_lowercase());
        }
        sentence_start = raw.ends_with(['.', '?', '!']);
    }
    out
}

fn negated(text: &str) -> bool {
    text.split_whitespace()
        .map(|w| {
            w.trim_matches(|c: char| !c.is_alphanumeric() && c != '\'')
                .to_lowercase()
        })
        .any(|w| NEGATIONS.contains(&w.as_str()) || w.ends_with("n't"))
}

/// Checks two similar questions; answers the first guard that tells them apart.
///
/// # Errors
/// The [`Guard`] that rejected the pair.
pub fn check(a: &str, b: &str) -> Result<(), Guard> {
    let [numbers, dates, quoted, code] = &*PATTERNS;
    if set(numbers, a) != set(numbers, b) {
        return Err(Guard::Numbers);
    }
    if set(dates, a) != set(dates, b) {
        return Err(Guard::Dates);
    }
    if set(quoted, a) != set(quoted, b) {
        return Err(Guard::Quoted);
    }
    if proper_nouns(a) != proper_nouns(b) || set(code, a) != set(code, b) {
        return Err(Guard::Entities);
    }
    if negated(a) != negated(b) {
        return Err(Guard::Negation);
    }
    if operators(a) != operators(b) {
        return Err(Guard::Operators);
    }
    if swapped_words(a, b) {
        return Err(Guard::Words);
    }
    Ok(())
}

const STOPWORDS: &[&str] = &[
    "the", "and", "for", "are", "was", "were", "is", "what", "whats", "which", "who", "whom",
    "how", "when", "where", "why", "can", "could", "would", "should", "will", "does", "did", "do",
    "you", "your", "me", "my", "have", "has", "had", "with", "about", "into", "from", "this",
    "that", "these", "those", "there", "it", "its", "to", "of", "in", "on", "at", "by", "an", "a",
    "be", "during", "please", "tell", "give", "some",
];

/// Content words, lower case, without a plural `s`.
fn content_words(text: &str) -> BTreeSet<String> {
    text.split(|c: char| !c.is_alphanumeric())
        .map(str::to_lowercase)
        .filter(|w| {
            w.chars().count() >= 3
                && !STOPWORDS.contains(&w.as_str())
                && !w.chars().all(|c| c.is_ascii_digit())
        })
        .map(|w| {
            w.strip_suffix('s')
                .filter(|s| s.len() >= 3)
                .map_or(w.clone(), str::to_owned)
        })
        .collect()
}

/// Spelling and inflection variants: one a prefix of the other, or five letters in common at
/// the start ("boil"/"boiling", "summarise"/"summarize", "capital"/"capitol").
fn variants(a: &str, b: &str) -> bool {
    let common = a.chars().zip(b.chars()).take_while(|(x, y)| x == y).count();
    a.starts_with(b) || b.starts_with(a) || common >= 5
}

fn swapped_words(a: &str, b: &str) -> bool {
    let (wa, wb) = (content_words(a), content_words(b));
    let only_a: Vec<&String> = wa.difference(&wb).collect();
    let only_b: Vec<&String> = wb.difference(&wa).collect();
    let unmatched_a = only_a
        .iter()
        .filter(|x| !only_b.iter().any(|y| variants(x, y)))
        .count();
    let unmatched_b = only_b
        .iter()
        .filter(|y| !only_a.iter().any(|x| variants(x, y)))
        .count();
    unmatched_a > 0 && unmatched_b > 0
}

/// Arithmetic operators written between numbers.
fn operators(text: &str) -> BTreeSet<char> {
    let chars: Vec<char> = text.chars().filter(|c| !c.is_whitespace()).collect();
    chars
        .windows(3)
        .filter(|w| w[0].is_ascii_digit() && w[2].is_ascii_digit() && "+-*/x×÷^%".contains(w[1]))
        .map(|w| w[1])
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn near_misses_are_told_apart() {
        assert_eq!(
            check(
                "What is the capital of France?",
                "What is the capital of Germany?"
            ),
            Err(Guard::Entities)
        );
        assert_eq!(
            check("What is 2 + 2?", "What is 2 + 3?"),
            Err(Guard::Numbers)
        );
        assert_eq!(
            check("Is aspirin safe?", "Is aspirin not safe?"),
            Err(Guard::Negation)
        );
        assert_eq!(
            check("Meetings on 2024-01-15?", "Meetings on 2024-01-16?"),
            Err(Guard::Numbers)
        );
        assert_eq!(
            check(
                "Translate \"hello\" to French",
                "Translate \"goodbye\" to French"
            ),
            Err(Guard::Quoted)
        );
        assert_eq!(
            check("What does parse_config do?", "What does load_config do?"),
            Err(Guard::Entities)
        );
        assert_eq!(
            check("Who won on 3 March", "Who won on 3 May"),
            Err(Guard::Dates)
        );
    }

    #[test]
    fn rewordings_pass() {
        assert_eq!(
            check(
                "What is the capital of France?",
                "what's the capital of France"
            ),
            Ok(())
        );
        assert_eq!(
            check("Is aspirin safe?", "Is aspirin safe to take?"),
            Ok(())
        );
        assert_eq!(
            check(
                "How do I sort a list in Python?",
                "How can I sort a list in Python"
            ),
            Ok(())
        );
        assert_eq!(check("What is 2 + 2?", "what is 2+2"), Ok(()));
        assert_eq!(
            check(
                "Summarize the plot of Hamlet",
                "summarise the plot of Hamlet"
            ),
            Ok(())
        );
        assert_eq!(
            check(
                "What is the capital of France?",
                "Which city is the capital of France?"
            ),
            Ok(())
        );
    }
}
